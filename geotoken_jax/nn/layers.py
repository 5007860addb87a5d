"""Transformer building blocks: attention with a KV cache, MLP, encoder and decoder blocks.

Every parameter is float32 and carries logical sharding axis names (see
`geotoken_jax.models` and its LOGICAL_AXES for the vocabulary) as `out_sharding` metadata; the
names are never applied eagerly, so building a model needs no mesh and
`nnx.get_partition_spec` (under `flax.core.spmd.logical_axis_rules`) maps them
to mesh axes.  Matmuls run in the compute dtype; LayerNorm statistics, softmax
and the residual stream stay float32.

Activations are batch-major: [batch, length, ...].  Attention heads are kept
as explicit [heads, head_dim] axes ("heads", "kv") so a cache or a sharding
rule can address them without reshapes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Masked attention logits.  Finite so a fully masked row (never built here)
# would give a uniform softmax instead of NaN.
_ATTENTION_MASK_VALUE = -1e9

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
Rngs = nnx.Rngs | nnx.RngStream | None


# Initializers (PyTorch's defaults, so the "paper" preset starts like torch_ref)
# ------------------------------------------------------------------------------


def uniform_init(bound: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_linear_init(fan_in: int) -> Initializer:
  """nn.Linear's kaiming_uniform(a=sqrt(5)) weight (and bias) init: U(+-1/sqrt(fan_in))."""
  return uniform_init(1.0 / math.sqrt(fan_in))


def normal_init(stddev: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, shape, dtype)
  return init


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter annotated with logical axis names (one per dimension)."""
  shape = tuple(int(s) for s in shape)
  axes = tuple(axes)
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of shape {shape}")
  # eager_sharding=False: the names are logical, not mesh axes; the trainer
  # maps them through logical_axis_rules when it places the state.
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes,
                   eager_sharding=False)


# Small helpers
# ------------------------------------------------------------------------------


def as_rngs(rngs) -> Rngs:
  """Call-time dropout randomness: an nnx.Rngs / RngStream, a bare key, or None."""
  if rngs is None or isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
    return rngs
  if isinstance(rngs, jax.Array):
    return nnx.Rngs(dropout=rngs)
  raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream, a jax key or None, got {type(rngs)}")


def _mix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: a bijection with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 [shape]: a keyed counter hash, for dropout masks.

  64 key bits from jax.random, then per element two keyed murmur3 rounds of
  its flat index.  Threefry (jax.random.bernoulli, which nnx.Dropout uses)
  costs ~8 ns per element on CPU; this ~1 ns, and the paper model draws
  ~270 M dropout decisions per training step at batch 32.
  """
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"dropout on {size} elements: the counter is 32-bit")
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  h = _mix32(index * jnp.uint32(0x9E3779B9) + seed[0])
  return _mix32(h ^ seed[1])


def dropout(x: jax.Array, rate: float, *, deterministic: bool, rngs: Rngs) -> jax.Array:
  """Inverted dropout keyed by the call-time `rngs` ('dropout' stream, else 'default')."""
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout needs rngs (e.g. nnx.Rngs(dropout=key)) when deterministic=False")
  key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs()
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  keep = random_bits(key, x.shape) >= jnp.uint32(threshold)
  keep_prob = 1.0 - threshold / 2.0**32  # exact for the integer threshold
  return jnp.where(keep, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros((), x.dtype))


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    # Exact (erf) GELU, as torch's default and ViT's.
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "quick_gelu":
    # OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it.
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"activation must be 'relu', 'gelu' or 'quick_gelu', got {name!r}")


def sinusoid_table(length: int, dim: int) -> np.ndarray:
  """[length, dim] float32 table of torch_ref: sin on even, cos on odd channels."""
  pos = np.arange(length, dtype=np.float32)[:, None]
  freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)[:, :dim // 2]
  return table


class Positions(nnx.Module):
  """Additive position encodings: a fixed sinusoid table or a learned one."""

  def __init__(self, kind: str, length: int, dim: int, *, rngs: nnx.Rngs):
    if kind not in ("sinusoidal", "learned"):
      raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {kind!r}")
    self.kind = kind
    self.length = length
    self.dim = dim
    if kind == "learned":
      self.table = param(rngs, normal_init(0.02), (length, dim), ("position", "embed"))

  def _table(self) -> jax.Array:
    if self.kind == "learned":
      return self.table[...]
    return jnp.asarray(sinusoid_table(self.length, self.dim))  # a compile-time constant

  def first(self, length: int) -> jax.Array:
    """Encodings of positions 0..length-1: [length, dim] float32."""
    if length > self.length:
      raise ValueError(f"sequence of length {length} exceeds the {self.length} positions")
    return self._table()[:length]

  def at(self, position: jax.Array) -> jax.Array:
    """Encoding of one (possibly traced) position: [dim] float32."""
    return jax.lax.dynamic_index_in_dim(self._table(), position, axis=0, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis in float32, with a hand-written backward pass.

  The closed-form gradient (dx = inv * (g - mean(g) - xhat * mean(g * xhat)),
  g = dy * scale) makes fewer passes over [tokens, d] than autodiff's: ~30%
  faster per LayerNorm on CPU.
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  xhat = centred * inv
  return xhat * scale + bias, (xhat, inv, scale)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  xhat, inv, scale = residuals
  batch_axes = tuple(range(g.ndim - 1))
  g_scale = jnp.sum(g * xhat, axis=batch_axes)
  g_bias = jnp.sum(g, axis=batch_axes)
  gx = g * scale
  dx = inv * (gx - jnp.mean(gx, axis=-1, keepdims=True)
              - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
  return dx, g_scale, g_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (torch's eps 1e-5 by default)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, ones_init, (dim,), ("embed",))
    self.bias = param(rngs, zeros_init, (dim,), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


# Attention
# ------------------------------------------------------------------------------
#
# Layouts (chosen for XLA:CPU's batched matmuls, measured): queries and values
# [batch, heads, length, kv]; keys transposed, [batch, heads, kv, length], so
# q.k is a plain batched [q_len, kv] x [kv, kv_len] product.  The KV cache
# keeps the same layouts.


def attend(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array | None, *,
           dropout_rate: float, deterministic: bool, rngs: Rngs) -> jax.Array:
  """Softmax attention, one einsum per side, no loop over heads.

  q [batch, heads, q_len, kv] (already scaled by 1/sqrt(kv)); k_t [batch,
  heads, kv, kv_len]; v [batch, heads, kv_len, kv]; mask broadcastable to
  [batch, heads, q_len, kv_len] (True = attend) or None.  Returns float32
  [batch, heads, q_len, kv].
  """
  logits = jnp.einsum("bhqd,bhdk->bhqk", q, k_t, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _ATTENTION_MASK_VALUE)
  # Softmax with the division moved after the value product: one pass less
  # over the [q_len, kv_len] weights (and their gradient).  The max shift
  # does not change the result, so it needs no gradient.
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - shift)
  total = jnp.sum(weights, axis=-1, keepdims=True)  # [batch, heads, q_len, 1]
  # torch's nn.MultiheadAttention drops normalized attention weights; dropping
  # before normalizing is the same thing (the mask is elementwise).
  weights = dropout(weights, dropout_rate, deterministic=deterministic, rngs=rngs)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out / total


def _einsum_rounded(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """jnp.einsum(spec, x, w) of two low-precision operands, asked for in float32 and rounded
  to their dtype: the numbers of a low-precision-output dot (which accumulates in float32
  and rounds once), but XLA:CPU sends bf16 x bf16 -> f32 dots to YNNPACK's AMX /
  AVX512-BF16 kernels and runs bf16 -> bf16 ones on a generic path ~4-8x slower."""
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_low_precision_matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return _einsum_rounded(spec, x, w)


def _cpu_low_precision_matmul_fwd(spec, x, w):
  return _einsum_rounded(spec, x, w), (x, w)


def _cpu_low_precision_matmul_bwd(spec, residuals, g):
  # Without this rule the float32 product would make both gradient dots float32;
  # these are the einsum's own transposes, in the operands' dtype (every index of
  # x is in w or the output, and vice versa, in all the specs here).
  x, w = residuals
  inputs, out = spec.split("->")
  x_spec, w_spec = inputs.split(",")
  return (_einsum_rounded(f"{out},{w_spec}->{x_spec}", g, w),
          _einsum_rounded(f"{x_spec},{out}->{w_spec}", x, g))


_cpu_low_precision_matmul.defvjp(_cpu_low_precision_matmul_fwd, _cpu_low_precision_matmul_bwd)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """jnp.einsum(spec, x, w) with both operands cast to `dtype`, the result in `dtype`.

  A lower precision than float32 on the CPU backend goes through
  _cpu_low_precision_matmul: the same numbers and gradient dtypes, ~4x faster
  there.  Elsewhere (and in float32) the plain einsum.
  """
  x, w = x.astype(dtype), w.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32 or jax.default_backend() != "cpu":
    return jnp.einsum(spec, x, w)
  return _cpu_low_precision_matmul(spec, x, w)


def _out_projection(y: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """y [batch, heads, length, kv] -> [batch, length, embed] float32."""
  out = matmul("bhlk,hkd->bld", y, kernel, dtype)
  return out.astype(jnp.float32) + bias


class SelfAttention(nnx.Module):
  """Multi-head self-attention; Q/K/V weights stored fused as [embed, 3, heads, kv].

  Parameter count equals torch's nn.MultiheadAttention (in_proj 3d x d + 3d,
  out_proj d x d + d).
  """

  def __init__(self, dim: int, num_heads: int, *, attention_dropout: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    head_dim = dim // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.attention_dropout = attention_dropout
    self.dtype = dtype
    # torch: xavier_uniform over the stacked [3d, d] in_proj_weight, zero biases.
    bound = math.sqrt(6.0 / (dim + 3 * dim))
    self.qkv_kernel = param(rngs, uniform_init(bound), (dim, 3, num_heads, head_dim),
                            ("embed", None, "heads", "kv"))
    self.qkv_bias = param(rngs, zeros_init, (3, num_heads, head_dim), (None, "heads", "kv"))
    self.out_kernel = param(rngs, torch_linear_init(dim), (num_heads, head_dim, dim),
                            ("heads", "kv", "embed"))
    self.out_bias = param(rngs, zeros_init, (dim,), ("embed",))

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [batch, length, embed] -> q (scaled) [b, h, l, kv], k_t [b, h, kv, l], v [b, h, l, kv]."""
    dt = self.dtype
    b, l, d = x.shape
    h, k = self.num_heads, self.head_dim
    # One [tokens, d] x [d, 3d] product (the most efficient matmul shape on
    # CPU), then each operand moves to its attention layout.  1/sqrt(kv)
    # scales q on its way there: the multiply fuses into that transpose, where
    # scaling the [d, 3d] kernel was a pass of its own on every call (every
    # decoding step too).
    kernel = self.qkv_kernel[...].reshape(d, 3 * h * k)
    qkv = matmul("td,de->te", x.reshape(b * l, d), kernel, dt)
    qkv = qkv.reshape(b, l, 3, h, k) + self.qkv_bias[...].astype(dt)  # [batch, length, 3, heads, kv]
    # jnp.split, not indexing: its gradient is one concatenate, where the
    # gradients of separate slices are zero-padded and added.
    q, k_t, v = (y[:, :, 0] for y in jnp.split(qkv, 3, axis=2))
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(k))).astype(dt)  # exact for a power-of-2 kv
    return q.transpose(0, 2, 1, 3), k_t.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool,
               rngs: Rngs) -> jax.Array:
    q, k_t, v = self._qkv(x)
    y = attend(q, k_t, v, mask, dropout_rate=self.attention_dropout,
               deterministic=deterministic, rngs=rngs)
    return _out_projection(y, self.out_kernel[...], self.out_bias[...], self.dtype)

  def first_query(self, x: jax.Array, *, deterministic: bool, rngs: Rngs) -> jax.Array:
    """self(x)[:, :1] (no mask): position 0's output alone, every position still a key / value."""
    q, k_t, v = self._qkv(x)
    y = attend(q[:, :, :1], k_t, v, None, dropout_rate=self.attention_dropout,
               deterministic=deterministic, rngs=rngs)
    return _out_projection(y, self.out_kernel[...], self.out_bias[...], self.dtype)

  def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
    """self_k [batch, heads, kv, length] and self_v [batch, heads, length, kv], zeros."""
    h, k = self.num_heads, self.head_dim
    return {"self_k": jnp.zeros((batch, h, k, length), self.dtype),
            "self_v": jnp.zeros((batch, h, length, k), self.dtype)}

  def decode_step(self, x: jax.Array, position: jax.Array,
                  cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [batch, 1, embed] at `position`; writes its K/V into the cache, attends to <= position."""
    q, k_t, v = self._qkv(x)
    cache_k = jax.lax.dynamic_update_slice_in_dim(
        cache["self_k"], k_t.astype(cache["self_k"].dtype), position, axis=3)
    cache_v = jax.lax.dynamic_update_slice_in_dim(
        cache["self_v"], v.astype(cache["self_v"].dtype), position, axis=2)
    mask = jnp.arange(cache_k.shape[3]) <= position  # [kv_len], broadcasts over b, h, q
    y = attend(q, cache_k, cache_v, mask, dropout_rate=0.0, deterministic=True, rngs=None)
    out = _out_projection(y, self.out_kernel[...], self.out_bias[...], self.dtype)
    return out, {"self_k": cache_k, "self_v": cache_v}


class CrossAttention(nnx.Module):
  """Multi-head attention from decoder queries to the encoder memory.

  K/V ([embed, 2, heads, kv]) are a separate projection so they can be
  computed once per memory and cached.
  """

  def __init__(self, dim: int, num_heads: int, *, attention_dropout: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    head_dim = dim // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.attention_dropout = attention_dropout
    self.dtype = dtype
    bound = math.sqrt(6.0 / (dim + 3 * dim))  # torch's xavier over the stacked in_proj
    self.q_kernel = param(rngs, uniform_init(bound), (dim, num_heads, head_dim),
                          ("embed", "heads", "kv"))
    self.q_bias = param(rngs, zeros_init, (num_heads, head_dim), ("heads", "kv"))
    self.kv_kernel = param(rngs, uniform_init(bound), (dim, 2, num_heads, head_dim),
                           ("embed", None, "heads", "kv"))
    self.kv_bias = param(rngs, zeros_init, (2, num_heads, head_dim), (None, "heads", "kv"))
    self.out_kernel = param(rngs, torch_linear_init(dim), (num_heads, head_dim, dim),
                            ("heads", "kv", "embed"))
    self.out_bias = param(rngs, zeros_init, (dim,), ("embed",))

  def project_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """memory [batch, mem_len, embed] -> k_t [b, h, kv, mem_len], v [b, h, mem_len, kv]."""
    return project_memory_kv([self], memory)[0]

  def _queries(self, x: jax.Array) -> jax.Array:
    """x [batch, q_len, embed] -> q [batch, heads, q_len, kv], scaled by 1/sqrt(kv)."""
    dt = self.dtype
    scale = 1.0 / math.sqrt(self.head_dim)
    q = matmul("bld,dhk->bhlk", x, self.q_kernel[...] * scale, dt)
    return q + (self.q_bias[...] * scale).astype(dt)[:, None, :]

  def __call__(self, x: jax.Array, k_t: jax.Array, v: jax.Array, *, deterministic: bool,
               rngs: Rngs) -> jax.Array:
    """Attention to precomputed K/V (project_kv / the decoding cache)."""
    y = attend(self._queries(x), k_t, v, None, dropout_rate=self.attention_dropout,
               deterministic=deterministic, rngs=rngs)
    return _out_projection(y, self.out_kernel[...], self.out_bias[...], self.dtype)

  @staticmethod
  def absorbed_is_cheaper(q_len: int, mem_len: int, dim: int, num_heads: int) -> bool:
    """Whether `attend_memory` needs fewer FLOPs than projecting the memory to K/V.

    Per batch row, projecting K/V costs ~4 mem_len d^2 (+ 4 q_len mem_len d for
    the attention); the absorbed form ~4 q_len d^2 + 4 heads q_len mem_len d.
    """
    return q_len * dim + num_heads * q_len * mem_len < mem_len * dim + q_len * mem_len

  def attend_memory(self, x: jax.Array, memory: jax.Array, *, deterministic: bool,
                    rngs: Rngs) -> jax.Array:
    """Cross-attention straight from the memory, with W_k and W_v absorbed into the queries.

    q.(m W_k + b_k) = (q W_k^T).m + q.b_k, and q.b_k is the same for every key,
    so softmax drops it; sum_s p_s (m_s W_v + b_v) = (sum_s p_s m_s) W_v + b_v.
    The same function as project_kv + __call__ (b_k gets an exactly-zero
    gradient, torch's is zero up to rounding), but with few queries (the
    decoder's P = 11 against 214 memory tokens) it skips the [mem_len, d] x
    [d, 2d] projection: ~4.5x fewer cross-attention FLOPs in teacher forcing.
    x [batch, q_len, embed], memory [batch, mem_len, embed] -> [batch, q_len, embed] float32.
    """
    dt = self.dtype
    q = self._queries(x)  # [batch, heads, q_len, kv]
    k_kernel = self.kv_kernel[...][:, 0].astype(dt)  # [embed, heads, kv]
    v_kernel = self.kv_kernel[...][:, 1].astype(dt)
    v_bias = self.kv_bias[...][1]  # [heads, kv]
    memory = memory.astype(dt)
    q_mem = matmul("bhqk,ehk->bhqe", q, k_kernel, dt)  # queries in memory space
    # attend() with k_t = memory^T and v = memory, shared by all heads.
    logits = jnp.einsum("bhqe,bse->bhqs", q_mem, memory, preferred_element_type=jnp.float32)
    shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - shift)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = dropout(weights, self.attention_dropout, deterministic=deterministic, rngs=rngs)
    context = jnp.einsum("bhqs,bse->bhqe", weights.astype(dt), memory,
                         preferred_element_type=jnp.float32) / total
    y = jnp.einsum("bhqe,ehk->bhqk", context.astype(dt), v_kernel,
                   preferred_element_type=jnp.float32) + v_bias[:, None, :]
    return _out_projection(y, self.out_kernel[...], self.out_bias[...], dt)


def project_memory_kv(attentions: Sequence[CrossAttention], memory: jax.Array
                      ) -> list[tuple[jax.Array, jax.Array]]:
  """Cross-attention K/V of several layers from one memory, as ONE matmul.

  [b * mem_len, d] x [d, layers * 2 * d]: one wide product instead of one per
  layer (and in the backward pass one product that also sums the layers'
  memory gradients).  Returns per layer (k_t [b, h, kv, mem_len], v [b, h,
  mem_len, kv]) in the compute dtype.
  """
  first = attentions[0]
  dt, h, k = first.dtype, first.num_heads, first.head_dim
  kernel = jnp.concatenate([a.kv_kernel[...] for a in attentions], axis=1)  # [d, 2L, h, kv]
  bias = jnp.concatenate([a.kv_bias[...] for a in attentions], axis=0)  # [2L, h, kv]
  b, s, d = memory.shape
  n = 2 * len(attentions)
  kv = matmul("td,de->te", memory.reshape(b * s, d), kernel.reshape(d, n * h * k), dt)
  kv = kv.reshape(b, s, n, h, k) + bias.astype(dt)  # [batch, mem_len, 2L, heads, kv]
  parts = [y[:, :, 0] for y in jnp.split(kv, n, axis=2)]  # split: see SelfAttention._qkv
  return [(parts[2 * i].transpose(0, 2, 3, 1), parts[2 * i + 1].transpose(0, 2, 1, 3))
          for i in range(len(attentions))]


class MLP(nnx.Module):
  """Linear(d -> ff) - activation - dropout - Linear(ff -> d), as torch's transformer layers."""

  def __init__(self, dim: int, hidden: int, *, activation: str, dropout_rate: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.activation = activation
    self.dropout_rate = dropout_rate
    self.dtype = dtype
    self.wi = param(rngs, torch_linear_init(dim), (dim, hidden), ("embed", "mlp"))
    self.bi = param(rngs, torch_linear_init(dim), (hidden,), ("mlp",))
    self.wo = param(rngs, torch_linear_init(hidden), (hidden, dim), ("mlp", "embed"))
    self.bo = param(rngs, torch_linear_init(hidden), (dim,), ("embed",))

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: Rngs) -> jax.Array:
    h = matmul("bld,df->blf", x, self.wi[...], self.dtype)
    h = activation_fn(self.activation)(h + self.bi[...].astype(self.dtype))
    h = dropout(h, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    out = matmul("blf,fd->bld", h, self.wo[...], self.dtype)
    return out.astype(jnp.float32) + self.bo[...]


# Blocks
# ------------------------------------------------------------------------------


def _check_norm(norm: str) -> str:
  if norm not in ("post", "pre"):
    raise ValueError(f"norm must be 'post' (torch nn.Transformer) or 'pre', got {norm!r}")
  return norm


class EncoderBlock(nnx.Module):
  """Self-attention + MLP; "post" is torch's nn.TransformerEncoderLayer (norm_first=False)."""

  def __init__(self, dim: int, num_heads: int, ff_dim: int, *, norm: str, activation: str,
               dropout_rate: float, attention_dropout: float, eps: float, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.norm = _check_norm(norm)
    self.dropout_rate = dropout_rate
    self.attention = SelfAttention(dim, num_heads, attention_dropout=attention_dropout,
                                   dtype=dtype, rngs=rngs)
    self.mlp = MLP(dim, ff_dim, activation=activation, dropout_rate=dropout_rate, dtype=dtype,
                   rngs=rngs)
    self.norm1 = LayerNorm(dim, eps=eps, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=eps, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: Rngs) -> jax.Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    drop = lambda y: dropout(y, self.dropout_rate, **kw)  # noqa: E731
    if self.norm == "post":
      x = self.norm1(x + drop(self.attention(x, **kw)))
      return self.norm2(x + drop(self.mlp(x, **kw)))
    x = x + drop(self.attention(self.norm1(x), **kw))
    return x + drop(self.mlp(self.norm2(x), **kw))

  def first_token(self, x: jax.Array, *, deterministic: bool, rngs: Rngs) -> jax.Array:
    """self(x)[:, :1]: [batch, 1, embed], the output at position 0 alone.

    Every position is still a key / value, but the query, the output projection
    and the MLP run for that one row: a last block whose output is pooled from
    a CLS token (CLIP's embedding) costs ~1/6 of a full one.
    """
    kw = dict(deterministic=deterministic, rngs=rngs)
    drop = lambda y: dropout(y, self.dropout_rate, **kw)  # noqa: E731
    first = x[:, :1]
    if self.norm == "post":
      first = self.norm1(first + drop(self.attention.first_query(x, **kw)))
      return self.norm2(first + drop(self.mlp(first, **kw)))
    first = first + drop(self.attention.first_query(self.norm1(x), **kw))
    return first + drop(self.mlp(self.norm2(first), **kw))


class DecoderBlock(nnx.Module):
  """Causal self-attention + cross-attention + MLP (torch's nn.TransformerDecoderLayer)."""

  def __init__(self, dim: int, num_heads: int, ff_dim: int, *, norm: str, activation: str,
               dropout_rate: float, attention_dropout: float, eps: float, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.norm = _check_norm(norm)
    self.dropout_rate = dropout_rate
    self.self_attention = SelfAttention(dim, num_heads, attention_dropout=attention_dropout,
                                        dtype=dtype, rngs=rngs)
    self.cross_attention = CrossAttention(dim, num_heads, attention_dropout=attention_dropout,
                                          dtype=dtype, rngs=rngs)
    self.mlp = MLP(dim, ff_dim, activation=activation, dropout_rate=dropout_rate, dtype=dtype,
                   rngs=rngs)
    self.norm1 = LayerNorm(dim, eps=eps, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=eps, rngs=rngs)
    self.norm3 = LayerNorm(dim, eps=eps, rngs=rngs)

  def _apply(self, x, self_attend, cross_attend, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    drop = lambda y: dropout(y, self.dropout_rate, **kw)  # noqa: E731
    if self.norm == "post":
      x = self.norm1(x + drop(self_attend(x)))
      x = self.norm2(x + drop(cross_attend(x)))
      return self.norm3(x + drop(self.mlp(x, **kw)))
    x = x + drop(self_attend(self.norm1(x)))
    x = x + drop(cross_attend(self.norm2(x)))
    return x + drop(self.mlp(self.norm3(x), **kw))

  def __call__(self, x: jax.Array, memory: jax.Array | None = None,
               memory_kv: tuple[jax.Array, jax.Array] | None = None, *,
               deterministic: bool, rngs: Rngs) -> jax.Array:
    """Teacher forcing: x [batch, length, embed] with a causal mask.

    Cross-attention reads either `memory` [batch, mem_len, embed] (the
    absorbed form, CrossAttention.attend_memory) or this layer's precomputed
    `memory_kv` = (k_t, v) from project_memory_kv.
    """
    if (memory is None) == (memory_kv is None):
      raise ValueError("pass exactly one of memory and memory_kv")
    kw = dict(deterministic=deterministic, rngs=rngs)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    self_attend = lambda y: self.self_attention(y, mask=causal, **kw)  # noqa: E731
    if memory is not None:
      cross_attend = lambda y: self.cross_attention.attend_memory(y, memory, **kw)  # noqa: E731
    else:
      cross_attend = lambda y: self.cross_attention(y, *memory_kv, **kw)  # noqa: E731
    return self._apply(x, self_attend, cross_attend, deterministic, rngs)

  def decode_step(self, x: jax.Array, position: jax.Array,
                  cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One position: x [rows, 1, embed]; cache holds this layer's self K/V [rows, ...]
    and cross K/V [images, ...], rows = images * sequences per image."""
    new_self = {}

    def self_attend(y):
      out, updated = self.self_attention.decode_step(y, position, cache)
      new_self.update(updated)
      return out

    def cross_attend(y):
      # The cross K/V may be cached once per image while y holds `group`
      # sequences per image (beams or samples, rows image-major).  Those
      # sequences become `group` queries of their image's row: cross-attention
      # has no mask, so this is the same function without copying the memory's
      # K/V per sequence.
      images = cache["cross_k"].shape[0]
      rows, _, dim = y.shape
      if rows % images:
        raise ValueError(f"{rows} decoding rows do not group over {images} cached images")
      out = self.cross_attention(y.reshape(images, rows // images, dim), cache["cross_k"],
                                 cache["cross_v"], deterministic=True, rngs=None)
      return out.reshape(rows, 1, dim)

    x = self._apply(x, self_attend, cross_attend, True, None)
    return x, {**cache, **new_self}


class TransformerEncoder(nnx.Module):
  """A stack of EncoderBlocks (+ a final LayerNorm when pre-LN, as in pre-LN practice)."""

  def __init__(self, dim: int, num_heads: int, ff_dim: int, num_layers: int, *, norm: str,
               activation: str, dropout_rate: float, attention_dropout: float, eps: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        EncoderBlock(dim, num_heads, ff_dim, norm=norm, activation=activation,
                     dropout_rate=dropout_rate, attention_dropout=attention_dropout, eps=eps,
                     dtype=dtype, rngs=rngs) for _ in range(num_layers)])
    # torch_ref's nn.TransformerEncoder has no final norm (norm=None).
    self.final_norm = LayerNorm(dim, eps=eps, rngs=rngs) if _check_norm(norm) == "pre" else None

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: Rngs) -> jax.Array:
    for block in self.blocks:
      x = block(x, deterministic=deterministic, rngs=rngs)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x


def token_offsets(vocab_sizes: Sequence[int]) -> np.ndarray:
  """Row of each position's first token in a table of sum(vocab_sizes) rows: [positions] int32."""
  return np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]]).astype(np.int32)
