"""The CLIP vision tower in Flax NNX, its weight loaders, and CLIP preprocessing.

  cfg = clip.clip_config_from_weights("ViT-L-14.safetensors")  # or clip_vision_config("vit_l14")
  tower = clip.CLIPVisionTower(cfg, rngs=nnx.Rngs(0))
  clip.load_into(tower, cfg.weights)
  embedding = tower.features(images)  # uint8 [B, 224, 224, 3] -> [B, 768]

Weights come from a .safetensors file the user supplies (nothing is
downloaded, torch is never imported) in either layout:
  Hugging Face   CLIPModel / CLIPVisionModelWithProjection / CLIPVisionModel
                 (`vision_model.*`, `visual_projection.weight`), or a vision state dict
                 saved without the `vision_model.` prefix
  OpenAI         open_clip and OpenAI CLIP (`visual.*`, `visual.proj`), optionally
                 `module.`-prefixed

The host ships uint8 images (`preprocess`: resize + centre crop only); /255
and CLIP's mean / std happen on device, inside the tower.

Parameters (the nnx.Param state of CLIPVisionTower; logical axes in brackets):
  patch_kernel        [patch*patch*3, width]  ("patch", "embed")  the bias-free conv, rows
                      ordered (row, column, channel) as `patchify` flattens a patch
  class_embedding     [width]
  position_embedding  [1 + patches, width]  ("position", "embed"); row 0 is the CLS token's
  pre_norm            scale, bias [width]   (HF "pre_layrnorm", OpenAI "ln_pre")
  blocks.{i}          layers.EncoderBlock (pre-LN): norm1, attention.{qkv_kernel
                      [width, 3, heads, kv], qkv_bias [3, heads, kv], out_kernel
                      [heads, kv, width], out_bias}, norm2, mlp.{wi, bi, wo, bo}
  post_norm           scale, bias [width]   (HF "post_layernorm", OpenAI "ln_post")
  projection          [width, projection_dim] ("embed", None); absent when projection_dim is 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open

from geotoken_jax.nn import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")

# name: (image_size, patch_size, width, depth, num_heads, mlp_dim, projection_dim)
_PRESETS = {
    "tiny": (28, 14, 64, 2, 4, 256, 32),  # tests: 5 tokens
    "vit_b32": (224, 32, 768, 12, 12, 3072, 512),
    "vit_b16": (224, 16, 768, 12, 12, 3072, 512),
    "vit_l14": (224, 14, 1024, 24, 16, 4096, 768),
    "vit_l14_336": (336, 14, 1024, 24, 16, 4096, 768),
}


# Configuration
# ------------------------------------------------------------------------------


def clip_vision_config(name: str = "vit_l14") -> ml_collections.ConfigDict:
  """A CLIP vision config: "tiny", "vit_b32", "vit_b16", "vit_l14" or "vit_l14_336".

  projection_dim 0 means no projection (embedding = pooled); weights "" means
  random init, else the path of a .safetensors file; compute_dtype is the
  matmul dtype ("float32" or "bfloat16").
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(_PRESETS)}")
  image_size, patch_size, width, depth, num_heads, mlp_dim, projection_dim = _PRESETS[name]
  return ml_collections.ConfigDict(dict(
      name=name, image_size=image_size, patch_size=patch_size, width=width, depth=depth,
      num_heads=num_heads, mlp_dim=mlp_dim, projection_dim=projection_dim, eps=1e-5,
      activation="quick_gelu", mean=CLIP_MEAN, std=CLIP_STD, weights="",
      compute_dtype="float32"))


def check_clip_config(c) -> None:
  if c.image_size % c.patch_size:
    raise ValueError(f"clip.image_size {c.image_size} is not a multiple of clip.patch_size "
                     f"{c.patch_size}")
  if c.width % c.num_heads:
    raise ValueError(f"clip.width {c.width} is not divisible by clip.num_heads {c.num_heads}")
  if c.activation not in ACTIVATIONS:
    raise ValueError(f"clip.activation must be one of {ACTIVATIONS}, got {c.activation!r}")
  if c.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"clip.compute_dtype must be 'float32' or 'bfloat16', got "
                     f"{c.compute_dtype!r}")
  if (c.projection_dim or 0) < 0:
    raise ValueError(f"clip.projection_dim must be >= 0, got {c.projection_dim}")


def _num_tokens(c) -> int:
  return (c.image_size // c.patch_size)**2 + 1


# The tower
# ------------------------------------------------------------------------------


class CLIPVisionTower(nnx.Module):
  """images [batch, H, W, 3] -> CLIP's hidden states, pooled CLS and projected embedding.

  Pre-LN transformer: concat(CLS, patches) + positions -> pre_norm -> blocks;
  pooled = post_norm(CLS) and embedding = pooled @ projection, as both HF and
  OpenAI CLIP.  No dropout (CLIP has none).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    check_clip_config(config)
    # Frozen, so it is hashable static data of the graph; load_into reads it.
    self.config = ml_collections.FrozenConfigDict(config)
    c = self.config
    self.image_size = int(c.image_size)
    self.patch_size = int(c.patch_size)
    self.width = int(c.width)
    self.projection_dim = int(c.projection_dim or 0)
    self.dtype = jnp.dtype(c.compute_dtype)
    width = self.width
    patch_dim = self.patch_size**2 * 3
    # OpenAI's init for the embeddings and projection (std width^-0.5); the
    # blocks keep the project's torch-like init.  Loaded weights replace all.
    self.patch_kernel = layers.param(rngs, layers.normal_init(1.0 / math.sqrt(patch_dim)),
                                     (patch_dim, width), ("patch", "embed"))
    self.class_embedding = layers.param(rngs, layers.normal_init(width**-0.5), (width,),
                                        ("embed",))
    self.position_embedding = layers.param(rngs, layers.normal_init(width**-0.5),
                                           (_num_tokens(c), width), ("position", "embed"))
    self.pre_norm = layers.LayerNorm(width, eps=float(c.eps), rngs=rngs)
    self.blocks = nnx.List([
        layers.EncoderBlock(width, int(c.num_heads), int(c.mlp_dim), norm="pre",
                            activation=c.activation, dropout_rate=0.0, attention_dropout=0.0,
                            eps=float(c.eps), dtype=self.dtype, rngs=rngs)
        for _ in range(int(c.depth))])
    self.post_norm = layers.LayerNorm(width, eps=float(c.eps), rngs=rngs)
    if self.projection_dim:
      self.projection = layers.param(rngs, layers.normal_init(width**-0.5),
                                     (width, self.projection_dim), ("embed", None))
    else:
      self.projection = None

  @property
  def num_tokens(self) -> int:
    """1 + patches: the CLS token comes first."""
    return _num_tokens(self.config)

  def pixels(self, images: jax.Array) -> jax.Array:
    """uint8 images -> CLIP-normalized float32; float images are taken as already normalized."""
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected images [batch, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.shape}")
    if images.dtype == jnp.uint8:
      # Fold /255 and (x - mean) / std into one multiply-add per pixel.
      mean, std = self.config.mean, self.config.std
      scale = np.asarray([1.0 / (255.0 * s) for s in std], np.float32)
      shift = np.asarray([-m / s for m, s in zip(mean, std)], np.float32)
      return images.astype(jnp.float32) * scale + shift
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"images must be uint8 or normalized floats, got {images.dtype}")
    return images.astype(jnp.float32)

  def patchify(self, images: jax.Array) -> jax.Array:
    """images -> normalized patches [batch, patches, p*p*3], row-major, (row, col, channel)."""
    x = self.pixels(images)
    b, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def embed(self, images: jax.Array) -> jax.Array:
    """images -> pre_norm(concat(CLS, patches) + positions): [batch, tokens, width] float32."""
    dt = self.dtype
    x = jnp.einsum("bnp,pd->bnd", self.patchify(images).astype(dt),
                   self.patch_kernel[...].astype(dt), preferred_element_type=jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
    return self.pre_norm(x)

  def project(self, pooled: jax.Array) -> jax.Array:
    """pooled [batch, width] -> embedding [batch, projection_dim] (pooled itself without one)."""
    if self.projection is None:
      return pooled
    return jnp.matmul(pooled.astype(self.dtype), self.projection[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, images: jax.Array, *, output_hidden_states: bool = False
               ) -> dict[str, Any]:
    """images uint8 [batch, H, W, 3] (normalized here) or normalized float32 [batch, H, W, 3].

    Returns last_hidden_state [batch, tokens, width] (the last block's output,
    before post_norm), pooled [batch, width] (post_norm of CLS), embedding
    [batch, projection_dim], and with output_hidden_states the depth + 1
    hidden_states of transformers: the pre_norm'd embeddings, then each block's
    output.
    """
    x = self.embed(images)  # [batch, tokens, width]
    hidden_states = [x]
    for block in self.blocks:
      x = block(x, deterministic=True, rngs=None)
      hidden_states.append(x)
    pooled = self.post_norm(x[:, 0])  # [batch, width]
    out = {"last_hidden_state": x, "pooled": pooled, "embedding": self.project(pooled)}
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden_states)
    return out

  def features(self, images: jax.Array) -> jax.Array:
    """The projected embedding only: [batch, projection_dim] (the frozen feature extractor).

    self(images)["embedding"], but the last block runs for the CLS token alone
    (layers.EncoderBlock.first_token: only its keys / values need every token),
    since nothing else of it reaches the embedding: ~6% fewer FLOPs at ViT-B/32.
    """
    x = self.embed(images)
    blocks = list(self.blocks)
    for block in blocks[:-1]:
      x = block(x, deterministic=True, rngs=None)
    if blocks:
      x = blocks[-1].first_token(x, deterministic=True, rngs=None)
    return self.project(self.post_norm(x[:, 0]))


# Weight loading
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where one checkpoint layout keeps the vision tower (names after the prefix)."""
  name: str
  conv: str
  cls: str
  positions: str
  pre_norm: str
  post_norm: str
  block: str  # format string with {i}
  norm1: str
  norm2: str
  fc1: str
  fc2: str
  out_proj: str
  projection: str  # full key (no vision prefix)


_HF = _Layout(
    name="Hugging Face", conv="embeddings.patch_embedding.weight",
    cls="embeddings.class_embedding", positions="embeddings.position_embedding.weight",
    pre_norm="pre_layrnorm", post_norm="post_layernorm", block="encoder.layers.{i}.",
    norm1="layer_norm1", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2",
    out_proj="self_attn.out_proj", projection="visual_projection.weight")
_OPENAI = _Layout(
    name="OpenAI / open_clip", conv="conv1.weight", cls="class_embedding",
    positions="positional_embedding", pre_norm="ln_pre", post_norm="ln_post",
    block="transformer.resblocks.{i}.", norm1="ln_1", norm2="ln_2", fc1="mlp.c_fc",
    fc2="mlp.c_proj", out_proj="attn.out_proj", projection="visual.proj")


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
  """A safetensors file's vision tower: layout, key prefixes, and every key's shape."""
  path: str
  layout: _Layout
  module: str  # "module." when every key carries it, else ""
  prefix: str  # "vision_model.", "visual." or ""
  shapes: dict[str, tuple[int, ...]]  # key (module. stripped) -> shape
  dtypes: dict[str, str]

  def key(self, name: str) -> str:
    return self.prefix + name

  def is_vision(self, key: str) -> bool:
    """Keys the tower should account for (text tower keys are not)."""
    if key.endswith("position_ids"):  # a buffer older HF checkpoints saved
      return False
    if self.layout is _OPENAI:
      return key.startswith("visual.")
    if not self.prefix:
      return True
    return key.startswith(self.prefix) or key == self.layout.projection


def _read_checkpoint(path) -> _Checkpoint:
  path = os.fspath(path)
  shapes, dtypes = {}, {}
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      tensor = f.get_slice(key)
      shapes[key] = tuple(int(s) for s in tensor.get_shape())
      dtypes[key] = str(tensor.get_dtype())
  module = "module." if shapes and all(k.startswith("module.") for k in shapes) else ""
  shapes = {k[len(module):]: s for k, s in shapes.items()}
  dtypes = {k[len(module):]: d for k, d in dtypes.items()}
  if any(k.startswith("visual.") for k in shapes):
    layout, prefix = _OPENAI, "visual."
  elif any(k.startswith("vision_model.") for k in shapes):
    layout, prefix = _HF, "vision_model."
  elif any(k.startswith(("embeddings.patch_embedding", "pre_layrnorm.", "encoder.layers."))
           for k in shapes):
    layout, prefix = _HF, ""
  else:
    raise ValueError(f"{path}: not a CLIP vision checkpoint: no 'visual.*' (OpenAI / open_clip), "
                     f"'vision_model.*' or unprefixed 'embeddings.patch_embedding' (Hugging "
                     f"Face) keys; first keys: {sorted(shapes)[:5]}")
  return _Checkpoint(path, layout, module, prefix, shapes, dtypes)


# Converters: source arrays (float32, the checkpoint's layout) -> one parameter.


def _linear(w):  # torch Linear (out, in) -> (in, out)
  return w.T


def _conv(w):  # OIHW -> [(row, col, channel), out], the order patchify flattens a patch in
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _qkv_kernel(heads):  # three Linear weights (out, in) -> [in, 3, heads, kv]
  def convert(q, k, v):
    return np.stack([w.T.reshape(w.shape[1], heads, -1) for w in (q, k, v)], axis=1)
  return convert


def _qkv_bias(heads):  # three biases [width] -> [3, heads, kv]
  def convert(q, k, v):
    return np.stack([b.reshape(heads, -1) for b in (q, k, v)])
  return convert


def _out_kernel(heads):  # Linear (out, in = heads * kv) -> [heads, kv, out]
  return lambda w: w.T.reshape(heads, -1, w.shape[0])


def _identity(x):
  return x


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One parameter: the source keys it is made of, their expected shapes, the converter."""
  path: tuple
  keys: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  convert: Callable[..., np.ndarray]


def _leaves(ckpt: _Checkpoint, c) -> list[_Leaf]:
  """The tower's parameters in terms of the checkpoint's keys, for config c."""
  lay, key = ckpt.layout, ckpt.key
  w, m, p, h = int(c.width), int(c.mlp_dim), int(c.patch_size), int(c.num_heads)
  out = [
      _Leaf(("patch_kernel",), (key(lay.conv),), ((w, 3, p, p),), _conv),
      _Leaf(("class_embedding",), (key(lay.cls),), ((w,),), _identity),
      _Leaf(("position_embedding",), (key(lay.positions),), ((_num_tokens(c), w),), _identity),
  ]

  def norm(path, name):
    return [_Leaf(path + ("scale",), (key(name + ".weight"),), ((w,),), _identity),
            _Leaf(path + ("bias",), (key(name + ".bias"),), ((w,),), _identity)]

  def linear(path_w, path_b, name, shape, convert_w=_linear):
    return [_Leaf(path_w, (key(name + ".weight"),), (shape,), convert_w),
            _Leaf(path_b, (key(name + ".bias"),), ((shape[0],),), _identity)]

  out += norm(("pre_norm",), lay.pre_norm)
  for i in range(int(c.depth)):
    block = lay.block.format(i=i)
    b = ("blocks", i)
    a = b + ("attention",)
    out += norm(b + ("norm1",), block + lay.norm1)
    out += norm(b + ("norm2",), block + lay.norm2)
    if lay is _HF:
      names = [key(f"{block}self_attn.{x}_proj") for x in "qkv"]
      out.append(_Leaf(a + ("qkv_kernel",), tuple(n + ".weight" for n in names), ((w, w),) * 3,
                       _qkv_kernel(h)))
      out.append(_Leaf(a + ("qkv_bias",), tuple(n + ".bias" for n in names), ((w,),) * 3,
                       _qkv_bias(h)))
    else:  # q, k, v stacked along the output rows
      out.append(_Leaf(a + ("qkv_kernel",), (key(block + "attn.in_proj_weight"),),
                       ((3 * w, w),), lambda x: _qkv_kernel(h)(*np.split(x, 3))))
      out.append(_Leaf(a + ("qkv_bias",), (key(block + "attn.in_proj_bias"),), ((3 * w,),),
                       lambda x: _qkv_bias(h)(*np.split(x, 3))))
    out += linear(a + ("out_kernel",), a + ("out_bias",), block + lay.out_proj, (w, w),
                  _out_kernel(h))
    out += linear(b + ("mlp", "wi"), b + ("mlp", "bi"), block + lay.fc1, (m, w))
    out += linear(b + ("mlp", "wo"), b + ("mlp", "bo"), block + lay.fc2, (w, m))
  out += norm(("post_norm",), lay.post_norm)
  proj = int(c.projection_dim or 0)
  if proj:
    # HF keeps a Linear (proj, width); OpenAI a matrix used as x @ proj: no transpose.
    shape, convert = ((proj, w), _linear) if lay is _HF else ((w, proj), _identity)
    out.append(_Leaf(("projection",), (lay.projection,), (shape,), convert))
  return out


def _read_tensor(ckpt: _Checkpoint, f, key: str) -> np.ndarray:
  """One tensor as float32.  numpy has no bfloat16, so those bytes are read by hand."""
  if ckpt.dtypes[key] != "BF16":
    return np.asarray(f.get_tensor(ckpt.module + key), np.float32)
  import ml_dtypes

  with open(ckpt.path, "rb") as raw:
    (header_size,) = struct.unpack("<Q", raw.read(8))
    info = json.loads(raw.read(header_size))[ckpt.module + key]
    start, end = info["data_offsets"]
    raw.seek(8 + header_size + start)
    data = raw.read(end - start)
  return np.frombuffer(data, ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def load_clip_vision_weights(path, config) -> dict[tuple, np.ndarray]:
  """{parameter path: float32 array} for CLIPVisionTower(config), from a .safetensors file.

  The keys are exactly those of nnx.to_flat_state(nnx.state(tower, nnx.Param)).
  A file whose vision keys do not match the config raises one ValueError that
  lists every missing, unexpected and mis-shaped key.  Text-tower keys are
  ignored; with projection_dim 0 so is the file's projection.
  """
  check_clip_config(config)
  ckpt = _read_checkpoint(path)
  leaves = _leaves(ckpt, config)
  used = {k for leaf in leaves for k in leaf.keys}
  missing, mis_shaped = [], []
  for leaf in leaves:
    for k, shape in zip(leaf.keys, leaf.shapes):
      if k not in ckpt.shapes:
        missing.append(f"{k} (expected shape {shape})")
      elif ckpt.shapes[k] != shape:
        mis_shaped.append(f"{k}: expected shape {shape}, found {ckpt.shapes[k]}")
  ignored = set() if config.projection_dim else {ckpt.layout.projection}
  unexpected = sorted(k for k in ckpt.shapes
                      if ckpt.is_vision(k) and k not in used and k not in ignored)
  if missing or mis_shaped or unexpected:
    lines = [f"{ckpt.path}: {ckpt.layout.name} CLIP weights (prefix {ckpt.module + ckpt.prefix!r}) "
             f"do not match the config (width {config.width}, depth {config.depth}, patch "
             f"{config.patch_size}, image {config.image_size}, mlp {config.mlp_dim}, projection "
             f"{config.projection_dim}):"]
    lines += [f"  missing: {x}" for x in missing]
    lines += [f"  unexpected: {x}" for x in unexpected]
    lines += [f"  wrong shape: {x}" for x in mis_shaped]
    if any(x.startswith(ckpt.layout.projection + " ") for x in missing):
      lines.append("  (the file has no projection: set projection_dim = 0 to use pooled outputs)")
    raise ValueError("\n".join(lines))
  out = {}
  with safe_open(ckpt.path, framework="numpy") as f:
    for leaf in leaves:
      arrays = [_read_tensor(ckpt, f, k) for k in leaf.keys]
      out[leaf.path] = np.ascontiguousarray(leaf.convert(*arrays), np.float32)
  return out


def load_into(tower: CLIPVisionTower, path) -> None:
  """Set the tower's parameters, in place, from a .safetensors file.

  The tower may be abstract (nnx.eval_shape(lambda: CLIPVisionTower(...))):
  every parameter is replaced, so the random init can be skipped.
  """
  weights = load_clip_vision_weights(path, tower.config)
  params = dict(nnx.to_flat_state(nnx.state(tower, nnx.Param)))
  if set(weights) != set(params):  # a bug here, not in the file
    raise RuntimeError(f"loader paths {sorted(set(weights) ^ set(params))} differ from the tower's")
  for key, array in weights.items():
    params[key].set_value(jnp.asarray(array))


def _hf_config_json(path: str) -> Mapping[str, Any]:
  """The vision part of a Hugging Face config.json saved next to the weights, or {}."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.exists(config_path):
    return {}
  with open(config_path) as f:
    config = json.load(f)
  return config.get("vision_config") or config


def clip_config_from_weights(path, *, num_heads: int | None = None,
                             activation: str | None = None) -> ml_collections.ConfigDict:
  """The architecture of a .safetensors file (either layout), with weights = path.

  Shapes give width, depth, patch, image size (from the number of positions),
  mlp_dim and projection_dim (0 without one).  Heads and the activation are not
  in the shapes: a Hugging Face config.json next to the file gives them
  (num_attention_heads, hidden_act, layer_norm_eps); else heads = width // 64
  (every OpenAI model) and activation "quick_gelu" (OpenAI's; open_clip models
  trained elsewhere, e.g. LAION's, use "gelu": pass it).
  """
  ckpt = _read_checkpoint(path)
  lay, shapes = ckpt.layout, ckpt.shapes
  for name in (lay.cls, lay.conv, lay.positions):
    if ckpt.key(name) not in shapes:
      raise ValueError(f"{ckpt.path}: {lay.name} CLIP weights without {ckpt.key(name)}")
  width = shapes[ckpt.key(lay.cls)][0]
  patch = shapes[ckpt.key(lay.conv)][-1]
  positions = shapes[ckpt.key(lay.positions)][0]
  grid = math.isqrt(positions - 1)
  if grid * grid != positions - 1:
    raise ValueError(f"{ckpt.path}: {positions} positions are not 1 + a square grid of patches")
  block = re.escape(ckpt.key(lay.block)).replace(r"\{i\}", r"(\d+)")
  depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(block, k))), default=-1)
  fc1 = ckpt.key(lay.block.format(i=0) + lay.fc1 + ".weight")
  if not depth or fc1 not in shapes:
    raise ValueError(f"{ckpt.path}: {lay.name} CLIP weights without transformer blocks ({fc1})")
  projection = shapes.get(lay.projection)
  projection_dim = 0 if projection is None else (
      projection[0] if lay is _HF else projection[1])
  hf = _hf_config_json(ckpt.path) if lay is _HF else {}
  c = clip_vision_config("vit_l14")
  c.update(name=os.path.basename(ckpt.path), image_size=grid * patch, patch_size=patch,
           width=width, depth=depth, mlp_dim=shapes[fc1][0], projection_dim=projection_dim,
           num_heads=num_heads or hf.get("num_attention_heads") or max(width // 64, 1),
           activation=activation or hf.get("hidden_act") or "quick_gelu",
           eps=float(hf.get("layer_norm_eps", 1e-5)), weights=ckpt.path)
  check_clip_config(c)
  return c


# Preprocessing (host side)
# ------------------------------------------------------------------------------


def preprocess(image, size: int) -> np.ndarray:
  """PIL image or uint8 [H, W, 3] -> uint8 [size, size, 3]: bicubic resize, centre crop.

  transformers' CLIPImageProcessor (PIL backend) rules: the short side becomes
  `size`, the long side int(size * long / short); the crop starts at
  (new - size) // 2.  (torchvision's CenterCrop rounds that offset instead, so
  the OpenAI / torchvision pipelines can differ by one pixel row.)  No
  normalization: the tower does /255 and CLIP's mean / std on device.
  geotoken_jax.data.images.clip_resize_crop is the same computation (the data
  pipeline's "clip" resize mode; not imported here: geotoken_jax.data pulls in
  tensorflow_datasets and grain), and tests/test_clip_preprocessing.py checks both
  against CLIPImageProcessor.
  """
  from PIL import Image

  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  elif image.mode != "RGB":
    image = image.convert("RGB")
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if width <= height else (size, new_long)
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
  pixels = np.asarray(image)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(pixels[top:top + size, left:left + size])


# GeoToken's "clip" encoder
# ------------------------------------------------------------------------------


class CLIPEncoder(nnx.Module):
  """images uint8 [batch, H, W, 3] -> memory [batch, 1 + patches, d_model] (model_config.clip).

  The memory is every token of the last block after post_norm, then a
  trainable Dense to d_model.  post_norm was trained on the CLS token only, but
  it is per-token, and it brings all tokens to the scale of CLIP's output
  instead of the raw residual stream (whose scale grows with depth).  The
  tower is exactly model_config.clip's, so pretrained_leaves fits it; its
  projection is unused here (zero gradient).  No dropout; freezing the tower
  is the optimizer's business.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.tower = CLIPVisionTower(config.clip, rngs=rngs)
    self.dtype = jnp.dtype(config.compute_dtype)
    width, d_model = self.tower.width, int(config.d_model)
    # The input side keeps no name: "embed" already names the output side (as ViTEncoder).
    self.out_kernel = layers.param(rngs, layers.torch_linear_init(width), (width, d_model),
                                   (None, "embed"))
    self.out_bias = layers.param(rngs, layers.zeros_init, (d_model,), ("embed",))

  @property
  def num_tokens(self) -> int:
    return self.tower.num_tokens

  def __call__(self, images: jax.Array, *, deterministic: bool, rngs: layers.Rngs) -> jax.Array:
    del deterministic, rngs  # no dropout
    x = self.tower.post_norm(self.tower(images)["last_hidden_state"])  # [batch, tokens, width]
    x = jnp.einsum("bnw,wd->bnd", x.astype(self.dtype), self.out_kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return x + self.out_bias[...]


def pretrained_leaves(model_config, prefix: tuple = ("encoder", "tower")
                      ) -> dict[tuple, np.ndarray]:
  """The CLIP weights of a model whose tower is CLIPVisionTower(model_config.clip).

  {} when model_config.clip.weights is empty (random init); else
  {prefix + tower path: float32 array} for the trainer to place into the
  initialized, sharded parameters (GeoToken's "clip" encoder: prefix
  ("encoder", "tower")).
  """
  weights = model_config.clip.weights
  if not weights:
    return {}
  loaded = load_clip_vision_weights(weights, model_config.clip)
  return {tuple(prefix) + path: array for path, array in loaded.items()}
