"""The paper's encoder over precomputed features and retrieved neighbours.

Memory sequence, in torch_ref.py's order (length 4 + K (3 + P)):
  [CLS, q_image, q_location, q_text,
   n1_image, n1_location, n1_text, n1_tok_0 .. n1_tok_{P-1},
   ...,
   nK_image, nK_location, nK_text, nK_tok_0 .. nK_tok_{P-1}]
Each 768-d feature goes through its own Linear-ReLU-Linear and is then
L2-normalized; neighbour tokens are looked up in a second embedding table
(separate from the decoder's) with per-position offsets.  Then positions,
dropout and a transformer encoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from geotoken_jax import s2
from geotoken_jax.nn import layers


class FeatureEncoder(nnx.Module):

  def __init__(self, config, spec: s2.TokenSpec, *, rngs: nnx.Rngs):
    d = int(config.d_model)
    f = int(config.features.feature_dim)
    n = int(config.features.num_features)
    self.num_features = n
    self.feature_dim = f
    self.num_neighbors = int(config.features.num_neighbors)
    self.vocab_sizes = tuple(spec.vocab_sizes)
    self.dropout_rate = float(config.dropout)
    self.dtype = jnp.dtype(config.compute_dtype)
    self.cls = layers.param(rngs, layers.normal_init(1.0), (d,), ("embed",))
    # The n per-feature projections (torch: a ModuleList) as stacked weights,
    # so all features go through one batched einsum.
    self.proj_w1 = layers.param(rngs, layers.torch_linear_init(f), (n, f, d),
                                (None, "feature", "mlp"))
    self.proj_b1 = layers.param(rngs, layers.torch_linear_init(f), (n, d), (None, "mlp"))
    self.proj_w2 = layers.param(rngs, layers.torch_linear_init(d), (n, d, d),
                                (None, "mlp", "embed"))
    self.proj_b2 = layers.param(rngs, layers.torch_linear_init(d), (n, d), (None, "embed"))
    self.neighbor_embedding = layers.param(rngs, layers.normal_init(1.0),
                                           (sum(self.vocab_sizes), d), ("vocab", "embed"))
    self.positions = layers.Positions(config.positions, self.memory_length(self.num_neighbors),
                                      d, rngs=rngs)
    self.encoder = layers.TransformerEncoder(
        d, int(config.num_heads), int(config.ff_dim), int(config.encoder_layers),
        norm=config.norm, activation=config.activation, dropout_rate=self.dropout_rate,
        attention_dropout=float(config.attention_dropout), eps=float(config.layer_norm_eps),
        dtype=self.dtype, rngs=rngs)

  def memory_length(self, num_neighbors: int) -> int:
    return 1 + self.num_features + num_neighbors * (self.num_features + len(self.vocab_sizes))

  def project(self, features: jax.Array) -> jax.Array:
    """[..., n, 768] -> [..., n, d]: feature i through projection i, then L2-normalized."""
    dt = self.dtype
    h = jnp.einsum("...nf,nfd->...nd", features.astype(dt), self.proj_w1[...].astype(dt))
    h = jax.nn.relu(h.astype(jnp.float32) + self.proj_b1[...])
    out = jnp.einsum("...nd,nde->...ne", h.astype(dt), self.proj_w2[...].astype(dt))
    out = out.astype(jnp.float32) + self.proj_b2[...]
    norm = jnp.sqrt(jnp.sum(jnp.square(out), axis=-1, keepdims=True))
    return out / jnp.maximum(norm, 1e-12)

  def embed(self, query_features: jax.Array, neighbor_features: jax.Array,
            neighbor_tokens: jax.Array) -> jax.Array:
    """The memory sequence before positions: [batch, memory_length, d] float32."""
    b, k, p = neighbor_tokens.shape
    n = self.num_features
    if query_features.shape != (b, n, self.feature_dim):
      raise ValueError(f"query_features must be [batch, {n}, {self.feature_dim}], "
                       f"got {query_features.shape}")
    if neighbor_features.shape != (b, k, n, self.feature_dim):
      raise ValueError(f"neighbor_features must be [batch, {k}, {n}, {self.feature_dim}], "
                       f"got {neighbor_features.shape}")
    if p != len(self.vocab_sizes):
      raise ValueError(f"neighbor_tokens have {p} positions, the spec has {len(self.vocab_sizes)}")
    if k > self.num_neighbors:
      raise ValueError(f"{k} neighbours given, the model was built for at most {self.num_neighbors}")
    offsets = jnp.asarray(layers.token_offsets(self.vocab_sizes))
    tok = jnp.take(self.neighbor_embedding[...], neighbor_tokens.astype(jnp.int32) + offsets,
                   axis=0)  # [batch, K, P, d]
    neighbors = jnp.concatenate([self.project(neighbor_features), tok], axis=2)
    d = tok.shape[-1]
    cls = jnp.broadcast_to(self.cls[...], (b, 1, d))
    return jnp.concatenate(
        [cls, self.project(query_features), neighbors.reshape(b, k * (n + p), d)], axis=1)

  def __call__(self, query_features: jax.Array, neighbor_features: jax.Array,
               neighbor_tokens: jax.Array, *, deterministic: bool,
               rngs: layers.Rngs) -> jax.Array:
    """query [B, 3, 768], neighbours [B, K, 3, 768], tokens int [B, K, P] -> memory [B, S, d]."""
    x = self.embed(query_features, neighbor_features, neighbor_tokens)
    x = x + self.positions.first(x.shape[1])
    x = layers.dropout(x, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    return self.encoder(x, deterministic=deterministic, rngs=rngs)


class NeighborMemory(nnx.Module):
  """Retrieved neighbours as extra memory for an image encoder (ViT / CLIP + neighbours).

  Each of the K neighbours contributes P memory tokens, one per token position:
  token embedding (its own table, per-position offsets) + position p + rank k +
  its similarity times a learned direction, then a LayerNorm.  They are appended to
  the image tokens, so the decoder cross-attends to the image and to the
  neighbours' locations at once: [B, S_image + K * P, d].
  """

  def __init__(self, d_model: int, spec: s2.TokenSpec, num_neighbors: int, *, eps: float, rngs: nnx.Rngs):
    self.vocab_sizes = tuple(spec.vocab_sizes)
    self.num_neighbors = int(num_neighbors)
    p = len(self.vocab_sizes)
    self.token_embedding = layers.param(rngs, layers.normal_init(0.02), (sum(self.vocab_sizes), d_model),
                                        ("vocab", "embed"))
    self.position = layers.param(rngs, layers.normal_init(0.02), (p, d_model), ("position", "embed"))
    self.rank = layers.param(rngs, layers.normal_init(0.02), (self.num_neighbors, d_model), ("position", "embed"))
    self.similarity = layers.param(rngs, layers.normal_init(0.02), (d_model,), ("embed",))
    self.norm = layers.LayerNorm(d_model, eps=eps, rngs=rngs)

  def length(self, num_neighbors: int | None = None) -> int:
    return (self.num_neighbors if num_neighbors is None else num_neighbors) * len(self.vocab_sizes)

  def __call__(self, neighbor_tokens: jax.Array, neighbor_scores: jax.Array) -> jax.Array:
    """tokens int [B, K, P], scores [B, K] -> memory tokens [B, K * P, d] float32."""
    b, k, p = neighbor_tokens.shape
    if p != len(self.vocab_sizes) or k > self.num_neighbors:
      raise ValueError(f"neighbor_tokens [B, K, P] = {neighbor_tokens.shape}: the model takes K <= "
                       f"{self.num_neighbors} and P = {len(self.vocab_sizes)}")
    offsets = jnp.asarray(layers.token_offsets(self.vocab_sizes))
    x = jnp.take(self.token_embedding[...], neighbor_tokens.astype(jnp.int32) + offsets, axis=0)  # [B, K, P, d]
    x = x + self.position[...][None, None] + self.rank[...][None, :k, None]
    x = x + neighbor_scores.astype(jnp.float32)[:, :, None, None] * self.similarity[...]
    return self.norm(x).reshape(b, k * p, -1)
