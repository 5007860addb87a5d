"""Geo-alignment models: an image tower and a location tower trained to agree (GeoCLIP, G3).

  embed(batch)   {"image": [B, F] the image tower's feature (CLIP's projected embedding,
                  or a ViT trained from scratch), "loc_head": [B, E] that feature through
                  the MLP aligned with GPS, "text_head": [B, E] the one aligned with text
                  (when the config has a text head)}; all un-normalized, as G3 stores them
  locate(latlng) [N, E] location embeddings: GeoCLIP's RFF encoder (Equal Earth or Web
                  Mercator input) and an optional MLP head
  similarity     cos(loc_head, locate(...)) scaled by the learned logit scale

The loss (`contrastive_loss`) is the symmetric InfoNCE of CLIP with a learnable
temperature: image -> location over the batch's locations plus a FIFO queue of
past GPS (extra negatives, GeoCLIP), location -> image over the batch; with a
text head, a second symmetric term against the batch's text features.  With
place_weight > 0, a place-recognition term (`place_loss`): each image and a copy shifted by
up to place_max_shift pixels (another view of the same place) are positives, and so are any
two images of the batch within place_radius_km; multi-positive InfoNCE over the image
features at place_temperature, so the image feature (the "image" field retrieval searches)
learns "same place" rather than only "near this GPS".

Config (`align_config(preset)`):
  architecture    "align" (what geotoken_jax.models.build_model dispatches on)
  image_tower     "vit" (from scratch, the `vit` block; mean-pooled tokens -> feature_dim)
                  or "clip" (the `clip` block: a CLIP vision tower, its projected embedding)
  feature_dim     F: the image feature (CLIP's projection_dim when image_tower is clip)
  embed_dim       E: the aligned space
  loc_head        hidden sizes of the image -> E MLP (G3: (768,); GeoCLIP: (768,))
  location        a geotoken_jax.encoders.location config (weights "" = random init,
                  "geoclip" = GeoCLIP's shipped weights, converted once, or a path)
  location_head   hidden sizes of the location -> E MLP; None: no head (the encoder's
                  output must already be E wide, as in GeoCLIP)
  text_dim        0: no text head; else the width of the batch's "text_features"
  logit_scale_init  log of the initial inverse temperature (G3: 3.99; CLIP: log(1/0.07))
  queue_size      past GPS kept as extra negatives (0: none)
  place_weight, place_max_shift, place_radius_km, place_temperature   the place-recognition
                  term (0 = off; shift in pixels; positives within this many km; fixed temperature)
  image_mlp_weights  "" or "geoclip": load GeoCLIP's image MLP (768 -> 768 -> 512) into loc_head
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from geotoken_jax import metrics
from geotoken_jax.encoders import clip, geoclip_weights, location
from geotoken_jax.encoders.vit import ViTEncoder, vit_config
from geotoken_jax.nn import heads, layers

IMAGE_FEATURES_KEY = "image_features"  # precomputed features, when the tower is "features"
TEXT_FEATURES_KEY = "text_features"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the inverse temperature

ALIGN_PRESETS = ("earth_align", "geoclip", "g3")


def _location_config(**overrides):
  cfg = location.location_encoder_config()
  cfg.update(overrides)
  return cfg


def align_config(preset: str = "earth_align") -> ml_collections.ConfigDict:
  """Presets:
  earth_align  the earth benchmark's: a tiny ViT from scratch on 64x64 crops (feature 256),
               GeoCLIP's pretrained location encoder frozen + a trainable 512 -> 256 -> 256
               head, E 256, queue 1024
  geoclip      GeoCLIP: frozen CLIP ViT-L/14 (user weights) -> GeoCLIP's image MLP
               768 -> 768 -> 512; its location encoder, E 512, queue 4096
  g3           G3's alignment model: frozen CLIP ViT-L/14, loc / text heads 768 -> 768 -> 768,
               GeoCLIP's encoder on Web Mercator + 512 -> 512 -> 768, text head on
  """
  cfg = ml_collections.ConfigDict(dict(
      preset=preset, architecture="align", image_tower="vit", feature_dim=256, embed_dim=256,
      loc_head=(256,), location=_location_config(weights="geoclip"), location_head=(256,),
      text_dim=0, logit_scale_init=math.log(1 / 0.07), queue_size=1024, image_mlp_weights="", frozen=(),
      place_weight=0.0, place_max_shift=8, place_radius_km=25.0, place_temperature=0.1,
      layer_norm_eps=1e-5, compute_dtype="float32",
      vit=vit_config("vit_tiny"), clip=clip.clip_vision_config("vit_l14")))
  if preset == "earth_align":
    cfg.vit.update(width=128, num_heads=2, mlp_dim=512, depth=4)
  elif preset == "geoclip":
    cfg.update(image_tower="clip", feature_dim=768, embed_dim=512, loc_head=(768,), location_head=None,
               queue_size=4096, image_mlp_weights="geoclip", frozen=("image_tower/.*",))
  elif preset == "g3":
    cfg.update(image_tower="clip", feature_dim=768, embed_dim=768, loc_head=(768,), location_head=(512,),
               text_dim=768, logit_scale_init=3.99, queue_size=0, frozen=("image_tower/.*",))
    cfg.location.update(projection="mercator")
  else:
    raise ValueError(f"unknown alignment preset {preset!r}; known: {ALIGN_PRESETS}")
  return cfg


def is_alignment(model_config) -> bool:
  return model_config.get("architecture", "geotoken") == "align"


def check_align_config(cfg) -> None:
  if cfg.image_tower not in ("vit", "clip"):
    raise ValueError(f"model.image_tower must be 'vit' or 'clip', got {cfg.image_tower!r}")
  if cfg.image_tower == "clip" and int(cfg.clip.projection_dim or cfg.clip.width) != int(cfg.feature_dim):
    raise ValueError(f"model.feature_dim {cfg.feature_dim} must equal the CLIP tower's embedding width "
                     f"{cfg.clip.projection_dim or cfg.clip.width}")
  if cfg.location_head is None and int(cfg.location.out_dim) != int(cfg.embed_dim):
    raise ValueError(f"without a location_head the location encoder's out_dim {cfg.location.out_dim} must equal "
                     f"embed_dim {cfg.embed_dim}")
  if int(cfg.queue_size) < 0 or int(cfg.text_dim) < 0:
    raise ValueError("model.queue_size and model.text_dim must be >= 0")


class GeoAlignModel(nnx.Module):
  """Image tower + heads, location tower, learnable logit scales (see the module docstring)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_align_config(config)
    self.image_tower_kind = str(config.image_tower)
    self.embed_dim = int(config.embed_dim)
    dtype = jnp.dtype(config.compute_dtype)
    if self.image_tower_kind == "vit":
      self.image_tower = ViTEncoder(config.vit, out_dim=int(config.feature_dim), dropout_rate=0.0,
                                    attention_dropout=0.0, eps=float(config.layer_norm_eps), dtype=dtype,
                                    rngs=rngs)
      self.image_size = int(config.vit.image_size)
    else:
      self.image_tower = clip.CLIPVisionTower(config.clip, rngs=rngs)
      self.image_size = int(config.clip.image_size)
    feature_dim = int(config.feature_dim)
    self.loc_head = heads.MLPHead((feature_dim, *config.loc_head, self.embed_dim), dtype=dtype, rngs=rngs)
    self.text_head = (heads.MLPHead((feature_dim, *config.loc_head, int(config.text_dim)), dtype=dtype, rngs=rngs)
                      if int(config.text_dim) else None)
    self.location = location.LocationEncoder(config.location, rngs=rngs)
    self.location_head = (heads.MLPHead((int(config.location.out_dim), *config.location_head, self.embed_dim),
                                        dtype=dtype, rngs=rngs)
                          if config.location_head is not None else None)
    scale = float(config.logit_scale_init)
    constant = lambda key, shape, dtype=jnp.float32: jnp.full(shape, scale, dtype)  # noqa: E731
    self.loc_logit_scale = layers.param(rngs, constant, (), ())
    self.text_logit_scale = layers.param(rngs, constant, (), ()) if self.text_head is not None else None

  @property
  def input_keys(self) -> tuple[str, ...]:
    return ("image",)

  def image_features(self, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> [B, feature_dim] float32."""
    if self.image_tower_kind == "vit":
      tokens = self.image_tower(images, deterministic=True, rngs=None)  # [batch, patches, feature]
      return jnp.mean(tokens, axis=1)
    return self.image_tower.features(images)

  def embed(self, inputs: Mapping[str, Any] | jax.Array) -> dict[str, jax.Array]:
    images = inputs["image"] if isinstance(inputs, Mapping) else inputs
    feature = self.image_features(images)
    out = {"image": feature, "loc_head": self.loc_head(feature)}
    if self.text_head is not None:
      out["text_head"] = self.text_head(feature)
    return out

  def locate(self, latlng: jax.Array) -> jax.Array:
    """[N, 2] degrees -> [N, embed_dim] float32 (un-normalized)."""
    x = self.location(latlng)
    return x if self.location_head is None else self.location_head(x)

  def logit_scale(self) -> jax.Array:
    return jnp.exp(clamp_log_scale(self.loc_logit_scale[...]))

  def similarity(self, query: jax.Array, locations: jax.Array) -> jax.Array:
    """cos(query [B, E], locations [..., E]) for every pair -> [B, ...]."""
    q = normalize(query)
    g = normalize(locations)
    return jnp.einsum("be,...e->b...", q, g)


def clamp_log_scale(log_scale: jax.Array) -> jax.Array:
  """min(log_scale, log 100) forward, identity backward (straight-through): CLIP clamps the
  parameter after each update; a plain min would zero its gradient past the bound for good."""
  return log_scale + jax.lax.stop_gradient(jnp.minimum(log_scale, MAX_LOGIT_SCALE) - log_scale)


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


# ---------------------------------------------------------------------------
# The loss and the queue.


def info_nce(a: jax.Array, b: jax.Array, logit_scale: jax.Array, *, extra_b: jax.Array | None = None,
             extra_valid: jax.Array | None = None, mask: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE between paired rows of a [B, D] and b [B, D] (normalized here).

  a -> b: softmax over the batch's b plus `extra_b` [Q, D] (negatives only; rows of
  extra_valid False are left out); b -> a: over the batch's a.  Rows with mask
  False neither count nor serve as negatives.  Returns (loss, {"accuracy": a -> b
  top-1 over the batch's own candidates}).  logit_scale is the multiplier
  (exp of the learned log scale).
  """
  batch = a.shape[0]
  mask = jnp.ones((batch,), jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
  a, b = normalize(a), normalize(b)
  logits = logit_scale * a @ b.T  # [batch, batch]
  pair_ok = mask[:, None] & mask[None, :]
  logits = jnp.where(pair_ok, logits, -jnp.inf)
  if extra_b is not None:
    extra = logit_scale * a @ normalize(extra_b).T  # [batch, queue]
    if extra_valid is not None:
      extra = jnp.where(extra_valid[None, :], extra, -jnp.inf)
    forward_logits = jnp.concatenate([logits, extra], axis=1)
  else:
    forward_logits = logits
  diagonal = jnp.diagonal(logits)
  forward = jax.nn.logsumexp(forward_logits, axis=1) - diagonal  # a -> b
  backward = jax.nn.logsumexp(logits, axis=0) - diagonal  # b -> a
  weight = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = 0.5 * (jnp.sum(jnp.where(mask, forward, 0.0)) + jnp.sum(jnp.where(mask, backward, 0.0))) / count
  hits = (jnp.argmax(logits, axis=1) == jnp.arange(batch)) & mask
  return loss, {"accuracy": jnp.sum(hits) / count}


def init_queue(size: int, encoded_dim: int = 0) -> dict[str, jax.Array]:
  """An empty FIFO of past GPS: latlng [size, 2], filled [size] bool (newest at row 0), and
  with encoded_dim > 0 their location-encoder outputs [size, encoded_dim]: when the encoder
  is frozen they never change, so they are stored instead of re-encoded every step."""
  queue = {"latlng": jnp.zeros((size, 2), jnp.float32), "filled": jnp.zeros((size,), jnp.bool_)}
  if encoded_dim:
    queue["encoded"] = jnp.zeros((size, encoded_dim), jnp.float32)
  return queue


def push_queue(queue: dict[str, jax.Array], latlng: jax.Array, mask: jax.Array | None = None,
               encoded: jax.Array | None = None) -> dict[str, jax.Array]:
  """The batch's coordinates enter at the front (in batch order), the oldest leave at the back.

  Masked rows (padding) are not enqueued.  A batch larger than the queue keeps its
  first `size` rows.
  """
  size = queue["latlng"].shape[0]
  if size == 0:
    return queue
  batch = latlng.shape[0]
  mask = jnp.ones((batch,), jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
  order = jnp.argsort(~mask, stable=True)  # the kept rows first, in batch order
  kept = jnp.sum(mask.astype(jnp.int32))
  latlng = jnp.concatenate([latlng.astype(jnp.float32)[order], queue["latlng"]], axis=0)
  filled = jnp.concatenate([mask[order], queue["filled"]], axis=0)
  # Skip the batch's masked rows (positions kept .. batch - 1), then truncate.
  rows = jnp.arange(size)
  source = jnp.where(rows < kept, rows, rows + (batch - kept))
  out = {"latlng": latlng[source], "filled": filled[source]}
  if "encoded" in queue:
    if encoded is None:
      raise ValueError("this queue stores encoder outputs: pass the batch's `encoded`")
    out["encoded"] = jnp.concatenate([encoded.astype(jnp.float32)[order], queue["encoded"]], axis=0)[source]
  return out


def shifted_views(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """[B, H, W, C] images, each rolled by its own random (dy, dx) in [-max_shift, max_shift]^2
  (another view of the same place: the earth crops of nearby places are shifted windows)."""
  shifts = jax.random.randint(key, (images.shape[0], 2), -int(max_shift), int(max_shift) + 1)
  return jax.vmap(lambda image, shift: jnp.roll(image, (shift[0], shift[1]), axis=(0, 1)))(images, shifts)


def multi_positive_info_nce(a: jax.Array, b: jax.Array, positive: jax.Array, temperature: float,
                            mask: jax.Array | None = None) -> jax.Array:
  """Symmetric multi-positive InfoNCE between a [B, D] and b [B, D] (normalized here):
  row i of a against every row of b, -log(sum over positives of softmax); positive [B, B]
  bool (its diagonal must be True); rows with mask False neither count nor compete."""
  batch = a.shape[0]
  mask = jnp.ones((batch,), jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
  pair_ok = mask[:, None] & mask[None, :]
  logits = jnp.where(pair_ok, normalize(a) @ normalize(b).T / temperature, -jnp.inf)
  positive = positive & pair_ok

  def one_way(logits, positive):
    return jax.nn.logsumexp(logits, axis=1) - jax.nn.logsumexp(jnp.where(positive, logits, -jnp.inf), axis=1)

  forward, backward = one_way(logits, positive), one_way(logits.T, positive.T)
  count = jnp.maximum(jnp.sum(mask), 1)
  return 0.5 * (jnp.sum(jnp.where(mask, forward, 0.0)) + jnp.sum(jnp.where(mask, backward, 0.0))) / count


def place_loss(model: GeoAlignModel, batch: Mapping[str, jax.Array], key: jax.Array, *, max_shift: int,
               radius_km: float, temperature: float, features: jax.Array | None = None) -> jax.Array:
  """The place-recognition term: image features of the batch against those of shifted views,
  positives = the same image or any image within radius_km (module docstring)."""
  features = model.image_features(batch["image"]) if features is None else features
  shifted = model.image_features(shifted_views(batch["image"], key, max_shift))
  latlng = batch["latlng"].astype(jnp.float32)
  distance = metrics.haversine_km_jax(latlng[:, None, :], latlng[None, :, :])  # [B, B] km, the project's metric
  positive = (distance <= radius_km) | jnp.eye(latlng.shape[0], dtype=jnp.bool_)
  return multi_positive_info_nce(features, shifted, positive, temperature, batch.get("mask"))


def contrastive_loss(model: GeoAlignModel, batch: Mapping[str, jax.Array], queue: dict | None,
                     key: jax.Array | None = None, place: Mapping[str, Any] | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one (micro)batch: image <-> GPS InfoNCE with the queue's
  coordinates as extra negatives, plus image <-> text when the model has a text head
  and the batch has text features, plus with `place` (weight, max_shift, radius_km,
  temperature; weight > 0) the place-recognition term, its shifts drawn from `key`."""
  with_place = place is not None and float(place["weight"]) > 0
  if with_place and key is None:
    raise ValueError("the place-recognition term draws random shifts: pass a key")
  embedded = model.embed(batch)
  latlng = batch["latlng"].astype(jnp.float32)
  mask = batch.get("mask")
  batch_size = latlng.shape[0]
  if queue is not None and "encoded" in queue:  # a frozen encoder: only the head runs on the queue
    head = (lambda x: x) if model.location_head is None else model.location_head  # noqa: E731
    loc_batch, loc_queue, queue_valid = model.locate(latlng), head(queue["encoded"]), queue["filled"]
  elif queue is not None and queue["latlng"].shape[0]:
    located = model.locate(jnp.concatenate([latlng, queue["latlng"]], axis=0))
    loc_batch, loc_queue, queue_valid = located[:batch_size], located[batch_size:], queue["filled"]
  else:
    loc_batch, loc_queue, queue_valid = model.locate(latlng), None, None
  loss, aux = info_nce(embedded["loc_head"], loc_batch, model.logit_scale(), extra_b=loc_queue,
                       extra_valid=queue_valid, mask=mask)
  out = {"gps_loss": loss, "gps_accuracy": aux["accuracy"],
         "logit_scale": model.logit_scale()}
  if model.text_head is not None:
    if TEXT_FEATURES_KEY not in batch:
      raise ValueError(f"the model has a text head (text_dim {model.text_head.dims[-1]}) but the batch has no "
                       f"{TEXT_FEATURES_KEY!r}: use data with text features or set model.text_dim = 0")
    text_scale = jnp.exp(clamp_log_scale(model.text_logit_scale[...]))
    text_loss, text_aux = info_nce(embedded["text_head"], batch[TEXT_FEATURES_KEY], text_scale, mask=mask)
    loss = loss + text_loss
    out.update(text_loss=text_loss, text_accuracy=text_aux["accuracy"])
  if with_place:
    term = place_loss(model, batch, key, max_shift=int(place["max_shift"]), radius_km=float(place["radius_km"]),
                      temperature=float(place["temperature"]), features=embedded["image"])
    loss = loss + float(place["weight"]) * term
    out["place_loss"] = term
  return loss, out


def place_settings(model_config) -> dict | None:
  """The config's place-recognition term (None when off)."""
  weight = float(model_config.get("place_weight", 0.0))
  if weight <= 0:
    return None
  return {"weight": weight, "max_shift": int(model_config.get("place_max_shift", 8)),
          "radius_km": float(model_config.get("place_radius_km", 25.0)),
          "temperature": float(model_config.get("place_temperature", 0.1))}


def pretrained_leaves(model_config) -> dict[tuple, np.ndarray]:
  """{parameter path: array} of every pretrained part the config names (CLIP tower,
  GeoCLIP's location encoder, GeoCLIP's image MLP as loc_head); the trainer places
  them into the initialized, sharded parameters."""
  leaves: dict[tuple, np.ndarray] = {}
  if (model_config.image_tower == "clip" and not model_config.clip.get("weights")
      and any(p.startswith("image_tower") for p in model_config.get("frozen", ()))):
    raise ValueError("the CLIP image tower is frozen but model.clip.weights is empty: it would stay random. "
                     "Set --config.model.clip.weights=/path/to/model.safetensors (Hugging Face or OpenAI layout)")
  if model_config.image_tower == "clip" and model_config.clip.get("weights"):
    leaves.update(clip.pretrained_leaves(model_config, prefix=("image_tower",)))
  location_config = model_config.location
  if location_config.weights == "geoclip":  # the wheel's weights, converted to safetensors once
    location_config = ml_collections.ConfigDict(location_config.to_dict())
    location_config.weights = str(geoclip_weights.ensure_converted()["location_encoder"])
  leaves.update(location.pretrained_leaves(location_config, prefix=("location",)))
  if model_config.get("image_mlp_weights"):
    if model_config.image_mlp_weights != "geoclip":
      raise ValueError(f"model.image_mlp_weights must be '' or 'geoclip', got {model_config.image_mlp_weights!r}")
    paths = geoclip_weights.ensure_converted()
    mlp = geoclip_weights.load_image_mlp_weights(paths["image_mlp"])
    leaves.update({("loc_head", *k): v for k, v in mlp.items()})
    # GeoCLIP's learned temperature (log space), with its image MLP: GeoCLIP's scores exactly.
    leaves[("loc_logit_scale",)] = np.asarray(geoclip_weights.load_logit_scale(paths["logit_scale"]), np.float32)
  return leaves
