"""A ViT image encoder: uint8 pixels in, a token sequence for the decoder's cross-attention out.

The host ships uint8 images; scaling to [0, 1] and the per-channel mean / std
normalization happen here, on device.  No class token: the decoder attends to
every patch token.  Blocks are pre-LN with a final LayerNorm, as in ViT.

`vit_config(name)` gives a preset's config (re-exported as geotoken_jax.models.vit_config):
name, image_size, patch_size, width, depth, num_heads, mlp_dim, norm, activation, mean, std.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from geotoken_jax.nn import layers

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# name: (image_size, patch_size, width, depth, num_heads, mlp_dim)
_VIT_PRESETS = {
    "vit_tiny": (64, 8, 192, 4, 3, 768),      # CPU-sized, 64 tokens
    # ~3.1x vit_tiny's FLOPs at the same 64x64 input (dense: (256/192)^2 * 7/4).
    "vit_small64": (64, 8, 256, 7, 4, 1024),
    "vit_s16": (224, 16, 384, 12, 6, 1536),
    "vit_b16": (224, 16, 768, 12, 12, 3072),
    "vit_l14": (224, 14, 1024, 24, 16, 4096),
}


def vit_config(name: str = "vit_tiny") -> ml_collections.ConfigDict:
  """A ViT encoder config: one of "vit_tiny", "vit_small64", "vit_s16", "vit_b16", "vit_l14"."""
  if name not in _VIT_PRESETS:
    raise ValueError(f"unknown ViT preset {name!r}; known: {sorted(_VIT_PRESETS)}")
  image_size, patch_size, width, depth, num_heads, mlp_dim = _VIT_PRESETS[name]
  return ml_collections.ConfigDict(dict(
      name=name, image_size=image_size, patch_size=patch_size, width=width, depth=depth,
      num_heads=num_heads, mlp_dim=mlp_dim, norm="pre", activation="gelu",
      mean=_IMAGENET_MEAN, std=_IMAGENET_STD))


class ViTEncoder(nnx.Module):
  """images uint8 [batch, H, W, 3] -> tokens [batch, (H/p)(W/p), out_dim]."""

  def __init__(self, vit_config, *, out_dim: int, dropout_rate: float, attention_dropout: float,
               eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    c = vit_config
    if c.image_size % c.patch_size:
      raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
    self.image_size = int(c.image_size)
    self.patch_size = int(c.patch_size)
    self.mean = tuple(float(m) for m in c.mean)
    self.std = tuple(float(s) for s in c.std)
    self.dropout_rate = dropout_rate
    self.dtype = dtype
    width = int(c.width)
    patch_dim = self.patch_size**2 * 3
    num_patches = (self.image_size // self.patch_size)**2
    # lecun-normal patch embedding (ViT / a Conv2d with stride = kernel).
    self.patch_kernel = layers.param(rngs, layers.normal_init(1.0 / math.sqrt(patch_dim)),
                                     (patch_dim, width), ("patch", "embed"))
    self.patch_bias = layers.param(rngs, layers.zeros_init, (width,), ("embed",))
    self.positions = layers.Positions("learned", num_patches, width, rngs=rngs)
    self.encoder = layers.TransformerEncoder(
        width, int(c.num_heads), int(c.mlp_dim), int(c.depth), norm=c.norm,
        activation=c.activation, dropout_rate=dropout_rate, attention_dropout=attention_dropout,
        eps=eps, dtype=dtype, rngs=rngs)
    if width != out_dim:
      # The input side keeps no name: "embed" already names the output side.
      self.out_kernel = layers.param(rngs, layers.torch_linear_init(width), (width, out_dim),
                                     (None, "embed"))
      self.out_bias = layers.param(rngs, layers.zeros_init, (out_dim,), ("embed",))
    else:
      self.out_kernel = None

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size)**2

  def patchify(self, images: jax.Array) -> jax.Array:
    """uint8 [batch, H, W, 3] -> normalized float patches [batch, patches, p*p*3] (row-major)."""
    b, h, w, c = images.shape
    if (h, w, c) != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected images [batch, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.shape}")
    p = self.patch_size
    # Fold /255 and (x - mean) / std into one multiply-add per pixel.
    scale = np.asarray([1.0 / (255.0 * s) for s in self.std], np.float32)
    shift = np.asarray([-m / s for m, s in zip(self.mean, self.std)], np.float32)
    x = images.astype(jnp.float32) * scale + shift
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, images: jax.Array, *, deterministic: bool, rngs: layers.Rngs) -> jax.Array:
    x = self.patchify(images)  # [batch, patches, patch]
    x = jnp.einsum("bnp,pd->bnd", x.astype(self.dtype), self.patch_kernel[...].astype(self.dtype))
    x = x.astype(jnp.float32) + self.patch_bias[...] + self.positions.first(x.shape[1])
    x = layers.dropout(x, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    x = self.encoder(x, deterministic=deterministic, rngs=rngs)  # [batch, patches, width]
    if self.out_kernel is not None:
      x = jnp.einsum("bnw,wd->bnd", x.astype(self.dtype), self.out_kernel[...].astype(self.dtype))
      x = x.astype(jnp.float32) + self.out_bias[...]
    return x
