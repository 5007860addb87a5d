"""GeoTokenModel: an encoder (ViT, CLIP or the paper's feature encoder) + the token decoder.

Inputs are a dict (the encoder picks its keys):
  encoder "vit":       {"image": uint8 [B, H, W, 3]} (a bare image array works too)
  encoder "clip":      {"image": uint8 [B, S, S, 3]}, S = config.clip.image_size
  encoder "features":  {"query_features": [B, 3, 768], "neighbor_features": [B, K, 3, 768],
                        "neighbor_tokens": int [B, K, P]}
  neighbor_memory      an image encoder plus retrieved neighbours (features.num_neighbors
                       of them): also {"neighbor_tokens": int [B, K, P], "neighbor_scores":
                       [B, K]}, appended to the image tokens (feature_encoder.NeighborMemory)
Extra keys are ignored, so a whole batch dict (with "tokens", "mask", ...) can be passed.

Dropout randomness comes only from the `rngs` given at call time (an
nnx.Rngs with a 'dropout' stream, or a bare key), so a functional jitted
train step passes a fresh key per step; the model holds no RNG state.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geotoken_jax import s2
from geotoken_jax.encoders.clip import CLIPEncoder
from geotoken_jax.encoders.vit import ViTEncoder
from geotoken_jax.models.decoder import Cache, Decoder
from geotoken_jax.models.feature_encoder import FeatureEncoder, NeighborMemory
from geotoken_jax.nn import layers

FEATURE_INPUT_KEYS = ("query_features", "neighbor_features", "neighbor_tokens")
IMAGE_INPUT_KEY = "image"
NEIGHBOR_MEMORY_KEYS = ("neighbor_tokens", "neighbor_scores")
_IMAGE_ENCODERS = ("vit", "clip")


def input_keys(config) -> tuple[str, ...]:
  """The batch keys a model of this config reads (GeoTokenModel.input_keys, without building it):
  what an input pipeline must send it."""
  if str(config.encoder) not in _IMAGE_ENCODERS:
    return FEATURE_INPUT_KEYS
  return (IMAGE_INPUT_KEY,) + (NEIGHBOR_MEMORY_KEYS if bool(config.get("neighbor_memory", False)) else ())


class GeoTokenModel(nnx.Module):

  def __init__(self, config, spec: s2.TokenSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.encoder_kind = str(config.encoder)
    self.d_model = int(config.d_model)
    dtype = jnp.dtype(config.compute_dtype)
    if self.encoder_kind == "vit":
      self.encoder = ViTEncoder(
          config.vit, out_dim=self.d_model, dropout_rate=float(config.dropout),
          attention_dropout=float(config.attention_dropout), eps=float(config.layer_norm_eps),
          dtype=dtype, rngs=rngs)
    elif self.encoder_kind == "clip":
      self.encoder = CLIPEncoder(config, rngs=rngs)
    elif self.encoder_kind == "features":
      self.encoder = FeatureEncoder(config, spec, rngs=rngs)
    else:
      raise ValueError(f"encoder must be 'vit', 'clip' or 'features', got {config.encoder!r}")
    with_memory = bool(config.get("neighbor_memory", False))
    if with_memory and self.encoder_kind not in _IMAGE_ENCODERS:
      raise ValueError("neighbor_memory is for the image encoders (vit, clip); the feature encoder "
                       "reads its neighbours itself")
    self.neighbor_memory = nnx.data(NeighborMemory(self.d_model, spec, int(config.features.num_neighbors),
                                                   eps=float(config.layer_norm_eps), rngs=rngs)
                                    if with_memory else None)
    self.decoder = Decoder(config, spec, rngs=rngs)

  @property
  def num_positions(self) -> int:
    return self.decoder.num_positions

  @property
  def max_vocab_size(self) -> int:
    return self.decoder.max_vocab_size

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    return self.decoder.vocab_sizes

  @property
  def input_keys(self) -> tuple[str, ...]:
    if self.encoder_kind not in _IMAGE_ENCODERS:
      return FEATURE_INPUT_KEYS
    return (IMAGE_INPUT_KEY,) + (NEIGHBOR_MEMORY_KEYS if self.neighbor_memory is not None else ())

  @property
  def uses_neighbors(self) -> bool:
    return self.encoder_kind == "features" or self.neighbor_memory is not None

  def memory_length(self, num_neighbors: int | None = None) -> int:
    """Length S of the encoder's output sequence."""
    if self.encoder_kind in _IMAGE_ENCODERS:
      extra = self.neighbor_memory.length(num_neighbors) if self.neighbor_memory is not None else 0
      return self.encoder.num_tokens + extra
    k = self.encoder.num_neighbors if num_neighbors is None else num_neighbors
    return self.encoder.memory_length(k)

  def valid_vocab_mask(self) -> np.ndarray:
    """[positions, max_vocab] bool, True where a token id exists at that position."""
    return self.decoder.valid_vocab_mask()

  def encode(self, inputs: Mapping[str, Any] | jax.Array, *, deterministic: bool = True,
             rngs=None) -> jax.Array:
    """inputs -> memory [B, S, d_model] float32."""
    rngs = layers.as_rngs(rngs)
    if self.encoder_kind in _IMAGE_ENCODERS:
      images = inputs[IMAGE_INPUT_KEY] if isinstance(inputs, Mapping) else inputs
      memory = self.encoder(images, deterministic=deterministic, rngs=rngs)
      if self.neighbor_memory is None:
        return memory
      if not isinstance(inputs, Mapping) or any(k not in inputs for k in NEIGHBOR_MEMORY_KEYS):
        raise ValueError(f"this model reads retrieved neighbours: inputs need {NEIGHBOR_MEMORY_KEYS}")
      extra = self.neighbor_memory(inputs["neighbor_tokens"], inputs["neighbor_scores"])
      return jnp.concatenate([memory, extra.astype(memory.dtype)], axis=1)
    return self.encoder(*(inputs[k] for k in FEATURE_INPUT_KEYS), deterministic=deterministic,
                        rngs=rngs)

  def decode(self, memory: jax.Array, tokens: jax.Array, *, deterministic: bool,
             rngs=None) -> jax.Array:
    """Teacher forcing from a memory: tokens int [B, P] -> logits [B, P, max_vocab] float32."""
    return self.decoder(memory, tokens, deterministic=deterministic, rngs=layers.as_rngs(rngs))

  def __call__(self, inputs: Mapping[str, Any] | jax.Array, tokens: jax.Array, *,
               deterministic: bool, rngs=None) -> jax.Array:
    """Teacher forcing: logits [B, P, max_vocab] float32; ids >= vocab_p are MASKED_LOGIT."""
    rngs = layers.as_rngs(rngs)
    memory = self.encode(inputs, deterministic=deterministic, rngs=rngs)
    return self.decoder(memory, tokens, deterministic=deterministic, rngs=rngs)

  def init_cache(self, memory: jax.Array, sequences_per_image: int = 1) -> Cache:
    """A tuple with one dict per decoder layer: cross_k [B, heads, kv, S], cross_v
    [B, heads, S, kv] (from memory, once per image), self_k [R, heads, kv, P] and
    self_v [R, heads, P, kv] (zeros) for R = B * sequences_per_image decoding
    rows, image-major (beams or samples share their image's cross K/V)."""
    return self.decoder.init_cache(memory, sequences_per_image)

  def decode_step(self, prev_token: jax.Array, position, cache: Cache
                  ) -> tuple[jax.Array, Cache]:
    """(prev_token int [R], position) -> (logits [R, max_vocab] float32, new cache)."""
    return self.decoder.decode_step(prev_token, position, cache)
