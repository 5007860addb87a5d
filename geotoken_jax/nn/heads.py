"""MLP heads: Linear - ReLU - Linear - ... (G3's loc / text heads, GeoCLIP's image MLP)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from geotoken_jax.nn import layers


class Dense(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out] (torch's Linear weight transposed)."""

  def __init__(self, in_dim: int, out_dim: int, *, use_bias: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = layers.param(rngs, layers.torch_linear_init(in_dim), (in_dim, out_dim), (None, "mlp"))
    self.bias = (layers.param(rngs, layers.torch_linear_init(in_dim), (out_dim,), ("mlp",))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return y if self.bias is None else y + self.bias[...]


class MLPHead(nnx.Module):
  """dims = (in, hidden..., out): Dense layers with ReLU between them (none after the last).

  Parameters: layers[i].kernel [dims[i], dims[i+1]], layers[i].bias [dims[i+1]].
  """

  def __init__(self, dims: Sequence[int], *, dtype=jnp.float32, rngs: nnx.Rngs):
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2:
      raise ValueError(f"an MLP head needs at least (in, out) dims, got {dims}")
    self.dims = dims
    self.layers = nnx.List([Dense(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.relu(x)
    return x
