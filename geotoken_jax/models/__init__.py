"""GeoToken models in Flax NNX: configuration presets, construction, losses.

  cfg = models.model_config("paper")              # or "earth_tiny", "earth_small", ...
  model = models.build_model(cfg, s2.TokenSpec(), rngs=nnx.Rngs(0))
  logits = model(inputs, tokens, deterministic=False, rngs=nnx.Rngs(dropout=key))
  memory = model.encode(inputs); cache = model.init_cache(memory)
  logits, cache = model.decode_step(prev_token, position, cache)

Logical sharding axes.  Every parameter carries one name (or None) per
dimension as `out_sharding` metadata (not applied eagerly: no mesh is needed
to build a model).  Map them to mesh axes with
  with flax.core.spmd.logical_axis_rules(rules): specs = nnx.get_partition_spec(state)
The vocabulary:
  "embed"     d_model, and the ViT width
  "mlp"       feed-forward hidden units (also the feature projections' hidden layer)
  "heads"     attention heads
  "kv"        per-head dimension
  "vocab"     token-embedding rows and output-head columns (sum of the per-position vocabs)
  "feature"   the 768-d input features of the feature encoder
  "patch"     flattened patch pixels (patch * patch * 3) of the ViT
  "position"  rows of learned position tables
  None        small axes: the Q/K/V selector (3 or 2), the per-feature projection index (3),
              the ViT-width side of the ViT -> d_model projection
Biases and LayerNorm scales / offsets are named after the axis they run along
("embed", "mlp", ("heads", "kv"), "vocab").

Geo-alignment models (image tower + location tower, InfoNCE; geotoken_jax.models.align) are
built by the same build_model from `align_config(preset)`, whose `architecture` is "align".

Configuration (`model_config(preset)` returns an ml_collections.ConfigDict):
  encoder            "features" (the paper's), "vit" or "clip"
  d_model, num_heads, ff_dim          decoder (and feature encoder) width / heads / FF hidden
  encoder_layers     feature-encoder depth (the ViT's depth is vit.depth)
  decoder_layers
  norm               "post" (torch nn.Transformer, post-LN) or "pre" (pre-LN + final LayerNorm)
  activation         "relu" or "gelu" (exact)
  positions          "sinusoidal" (torch_ref's fixed table, added) or "learned"
  dropout            after embeddings, residual branches and inside the MLP
  attention_dropout  on attention weights (torch's MultiheadAttention uses `dropout` there)
  layer_norm_eps     1e-5 (torch)
  compute_dtype      "float32" or "bfloat16": matmul dtype; params, LayerNorm, softmax,
                     residuals, logits and loss stay float32
  features           ConfigDict: num_neighbors (K, 15), num_features (3), feature_dim (768)
                     of the feature encoder (and K of the neighbour memory)
  neighbor_memory    False; True appends K retrieved neighbours' tokens and similarities to
                     an image encoder's memory (models.feature_encoder.NeighborMemory)
  vit                ConfigDict: name, image_size, patch_size, width, depth, num_heads,
                     mlp_dim, norm, activation, mean, std (see `vit_config`, from encoders.vit)
  clip               ConfigDict, needed only by encoder "clip" (not in the presets: set
                     cfg.clip = geotoken_jax.encoders.clip.clip_vision_config("vit_l14") or
                     clip_config_from_weights(path)); its weights are placed by the trainer
                     from encoders.clip.pretrained_leaves, its compute_dtype is the tower's
"""

from __future__ import annotations

import re

import jax
import ml_collections
from flax import nnx

from geotoken_jax import s2
from geotoken_jax.encoders import clip
from geotoken_jax.encoders.vit import ViTEncoder, vit_config
from geotoken_jax.models import align
from geotoken_jax.models.align import GeoAlignModel, align_config
from geotoken_jax.models.decoder import MASKED_LOGIT, Cache, Decoder, head_tables
from geotoken_jax.models.feature_encoder import FeatureEncoder
from geotoken_jax.models.geotoken import FEATURE_INPUT_KEYS, IMAGE_INPUT_KEY, GeoTokenModel
from geotoken_jax.models.losses import (
    metrics_from_sums,
    per_row_losses,
    position_weights,
    weighted_cross_entropy,
    weighted_cross_entropy_sums,
)

LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "vocab", "feature", "patch", "position")

PRESETS = ("paper", "paper_modern", "earth_tiny", "earth_small")


def features_config(num_neighbors: int = 15) -> ml_collections.ConfigDict:
  """The feature encoder's inputs: K neighbours, 3 features (image, location, text) of 768."""
  return ml_collections.ConfigDict(dict(num_neighbors=num_neighbors, num_features=3,
                                        feature_dim=768))


def model_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Presets:
  paper         torch_ref.py's defaults: feature encoder, post-LN, ReLU, sinusoidal, d 512,
                10 + 10 layers, 8 heads, FF 1024, dropout 0.1, K 15 (54,797,478 params)
  paper_modern  the paper's sizes with pre-LN, GELU, learned positions
  earth_tiny    64x64 images: vit_tiny, pre-LN, GELU, learned, d 192, 4 decoder layers,
                3 heads, FF 768, no dropout
  earth_small   64x64 images: vit_small64 (~3x vit_tiny's FLOPs), d 256, 4 decoder layers,
                4 heads, FF 1024, no dropout
  """
  # Base: the modern defaults; "paper" switches everything to torch_ref's layout.
  cfg = ml_collections.ConfigDict(dict(
      preset=preset, encoder="features", d_model=512, num_heads=8, ff_dim=1024,
      encoder_layers=10, decoder_layers=10, norm="pre", activation="gelu", positions="learned",
      dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5, compute_dtype="float32",
      features=features_config(), vit=vit_config("vit_tiny"), neighbor_memory=False))
  if preset == "paper":
    cfg.update(norm="post", activation="relu", positions="sinusoidal", dropout=0.1,
               attention_dropout=0.1)
  elif preset == "paper_modern":
    cfg.update(dropout=0.1, attention_dropout=0.0)
  elif preset == "earth_tiny":
    cfg.update(encoder="vit", d_model=192, num_heads=3, ff_dim=768, encoder_layers=0,
               decoder_layers=4, vit=vit_config("vit_tiny"))
  elif preset == "earth_small":
    cfg.update(encoder="vit", d_model=256, num_heads=4, ff_dim=1024, encoder_layers=0,
               decoder_layers=4, vit=vit_config("vit_small64"))
  else:
    raise ValueError(f"unknown model preset {preset!r}; known: {PRESETS}")
  return cfg


def _check_config(cfg) -> None:
  choices = {"encoder": ("features", "vit", "clip"), "norm": ("post", "pre"),
             "activation": ("relu", "gelu"), "positions": ("sinusoidal", "learned"),
             "compute_dtype": ("float32", "bfloat16")}
  for field, allowed in choices.items():
    if cfg[field] not in allowed:
      raise ValueError(f"model_config.{field} must be one of {allowed}, got {cfg[field]!r}")
  if cfg.d_model % cfg.num_heads:
    raise ValueError(f"d_model {cfg.d_model} is not divisible by num_heads {cfg.num_heads}")
  if cfg.encoder == "vit" and cfg.vit.width % cfg.vit.num_heads:
    raise ValueError(f"vit.width {cfg.vit.width} is not divisible by vit.num_heads "
                     f"{cfg.vit.num_heads}")
  if cfg.encoder == "clip":
    if "clip" not in cfg:
      raise ValueError("encoder 'clip' needs model_config.clip: set it to "
                       "geotoken_jax.encoders.clip.clip_vision_config(...)")
    clip.check_clip_config(cfg.clip)
  if cfg.features.num_neighbors < 0:
    raise ValueError(f"features.num_neighbors must be >= 0, got {cfg.features.num_neighbors}")
  for field in ("dropout", "attention_dropout"):
    if not 0.0 <= cfg[field] < 1.0:
      raise ValueError(f"model_config.{field} must be in [0, 1), got {cfg[field]}")


def build_model(model_config: ml_collections.ConfigDict, spec: s2.TokenSpec, *,
                rngs: nnx.Rngs) -> GeoTokenModel | align.GeoAlignModel:
  """The config's model with float32 parameters drawn from rngs.params(): a GeoTokenModel,
  or a GeoAlignModel when model_config.architecture is "align" (see models.align)."""
  if align.is_alignment(model_config):
    return align.GeoAlignModel(model_config, rngs=rngs)
  _check_config(model_config)
  return GeoTokenModel(model_config, spec, rngs=rngs)


def pretrained_leaves(model_config: ml_collections.ConfigDict) -> dict:
  """{parameter path: numpy array} of the pretrained weights the config names (none: {})."""
  if align.is_alignment(model_config):
    return align.pretrained_leaves(model_config)
  if model_config.encoder == "clip":
    return clip.pretrained_leaves(model_config)
  return {}


def frozen(path: tuple, model_config: ml_collections.ConfigDict, patterns=()) -> bool:
  """Is this parameter kept fixed?  GeoCLIP's Fourier matrices always are; so is every
  parameter whose '/'-joined path matches one of `patterns` (regular expressions,
  config.optim.frozen) or of the model config's own `frozen` (the geoclip / g3 presets
  freeze their CLIP tower), e.g. "image_tower/.*"."""
  name = "/".join(str(p) for p in path)
  own = tuple(model_config.get("frozen", ())) if model_config is not None else ()
  patterns = tuple(patterns) + own
  return path[-1] == "fourier_matrix" or any(re.fullmatch(p, name) for p in patterns)


def param_count(model: nnx.Module) -> int:
  """Number of trainable (nnx.Param) scalars."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "LOGICAL_AXES", "MASKED_LOGIT", "PRESETS", "FEATURE_INPUT_KEYS", "IMAGE_INPUT_KEY",
    "Cache", "Decoder", "FeatureEncoder", "GeoTokenModel", "ViTEncoder",
    "GeoAlignModel", "align", "align_config", "build_model", "features_config", "frozen", "pretrained_leaves", "head_tables", "metrics_from_sums", "model_config",
    "param_count", "per_row_losses", "position_weights", "vit_config", "weighted_cross_entropy",
    "weighted_cross_entropy_sums",
]
