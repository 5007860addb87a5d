"""The autoregressive token decoder: teacher forcing and cached incremental decoding.

Input at position t: the learned start vector for t = 0, else the embedding
of token t-1 (one table of sum(vocab_sizes) rows, position t-1's rows start
at offsets[t-1]), plus the position encoding of t.

Output heads.  torch_ref has one nn.Linear(d, vocab_p) per position, i.e.
d * sum(vocab) + sum(vocab) parameters.  Here they are ONE flat kernel
[d, sum(vocab)] and bias [sum(vocab)] (the per-position heads side by side,
so the trainable count equals torch's exactly); a static index table
[P, max_vocab] gathers position p's columns (padded columns point at any
valid column and are masked), giving a per-position head that a traced
position can select inside lax loops.  Logits of ids >= vocab_p are set to
MASKED_LOGIT so softmax gives them ~0 and argmax never picks them.

Cross-attention in teacher forcing: with P = 11 queries against a memory of
214 tokens it is cheaper to fold W_k / W_v into the queries than to project
the memory (CrossAttention.attend_memory; same function, ~4.5x fewer FLOPs);
the decision is static (CrossAttention.absorbed_is_cheaper).  Incremental
decoding uses the classic per-layer K/V, projected once into the cache.

KV cache (a tuple with one dict per decoder layer).  Decoding runs R = B * G
rows: G sequences (beams or samples) per image, image-major.  The memory's
K/V is cached once per IMAGE and the G sequences attend to it as G queries of
their image's row, so beams and samples never copy it; the self-attention
buffers have one row per sequence (beam search reorders only those):
  cross_k  [B, heads, head_dim, memory_length]   from the memory, once
  cross_v  [B, heads, memory_length, head_dim]   from the memory, once
  self_k   [R, heads, head_dim, positions]       zeros, column t written at step t
  self_v   [R, heads, positions, head_dim]       zeros, row t written at step t
all in the compute dtype (keys are stored transposed: see layers.attend).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geotoken_jax import s2
from geotoken_jax.nn import layers

# Logit of ids outside a position's vocabulary: finite (no inf - inf NaNs in
# log_softmax or beam scores), and exp(MASKED_LOGIT - max) is exactly 0 in float32.
MASKED_LOGIT = -1e9

Cache = tuple[dict[str, jax.Array], ...]


@functools.lru_cache(maxsize=None)
def head_tables(vocab_sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(column index [P, max_vocab] int32 into the flat head, valid [P, max_vocab] bool)."""
  offsets = layers.token_offsets(vocab_sizes)
  width = max(vocab_sizes)
  ids = np.arange(width)
  valid = ids[None, :] < np.asarray(vocab_sizes)[:, None]
  index = np.where(valid, offsets[:, None] + ids[None, :], 0).astype(np.int32)
  return index, valid


class Decoder(nnx.Module):

  def __init__(self, config, spec: s2.TokenSpec, *, rngs: nnx.Rngs):
    d = int(config.d_model)
    self.vocab_sizes = tuple(int(v) for v in spec.vocab_sizes)
    self.num_positions = len(self.vocab_sizes)
    self.max_vocab_size = max(self.vocab_sizes)
    self.dropout_rate = float(config.dropout)
    self.dtype = jnp.dtype(config.compute_dtype)
    total_vocab = sum(self.vocab_sizes)
    self.start = layers.param(rngs, layers.normal_init(1.0), (d,), ("embed",))
    self.token_embedding = layers.param(rngs, layers.normal_init(1.0), (total_vocab, d),
                                        ("vocab", "embed"))
    self.positions = layers.Positions(config.positions, self.num_positions, d, rngs=rngs)
    self.blocks = nnx.List([
        layers.DecoderBlock(d, int(config.num_heads), int(config.ff_dim), norm=config.norm,
                            activation=config.activation, dropout_rate=self.dropout_rate,
                            attention_dropout=float(config.attention_dropout),
                            eps=float(config.layer_norm_eps), dtype=self.dtype, rngs=rngs)
        for _ in range(int(config.decoder_layers))])
    self.final_norm = (layers.LayerNorm(d, eps=float(config.layer_norm_eps), rngs=rngs)
                       if config.norm == "pre" else None)
    self.head_kernel = layers.param(rngs, layers.torch_linear_init(d), (d, total_vocab),
                                    ("embed", "vocab"))
    self.head_bias = layers.param(rngs, layers.torch_linear_init(d), (total_vocab,), ("vocab",))

  # Pieces shared by teacher forcing and decode_step
  # ----------------------------------------------------------------------------

  def _finish(self, h: jax.Array) -> jax.Array:
    return self.final_norm(h) if self.final_norm is not None else h

  def _head(self, h: jax.Array, index: jax.Array, valid: jax.Array, equation: str) -> jax.Array:
    """h float32 -> masked float32 logits, with the gathered per-position head columns."""
    kernel = jnp.take(self.head_kernel[...], index, axis=1)  # [d, ..., max_vocab]
    logits = jnp.einsum(equation, h.astype(jnp.float32), kernel) + self.head_bias[...][index]
    return jnp.where(valid, logits, MASKED_LOGIT)

  def valid_vocab_mask(self) -> np.ndarray:
    """[positions, max_vocab] bool: True where the id exists at that position."""
    return head_tables(self.vocab_sizes)[1]

  # Teacher forcing
  # ----------------------------------------------------------------------------

  def __call__(self, memory: jax.Array, tokens: jax.Array, *, deterministic: bool,
               rngs: layers.Rngs) -> jax.Array:
    """memory [B, S, d], tokens int [B, P] -> logits [B, P, max_vocab] float32 (masked)."""
    b, p = tokens.shape
    if p != self.num_positions:
      raise ValueError(f"tokens must be [batch, {self.num_positions}], got {tokens.shape}")
    offsets = jnp.asarray(layers.token_offsets(self.vocab_sizes))
    prev = jnp.take(self.token_embedding[...], tokens[:, :-1].astype(jnp.int32) + offsets[:-1],
                    axis=0)  # [B, P-1, d]
    start = jnp.broadcast_to(self.start[...], (b, 1, prev.shape[-1]))
    x = jnp.concatenate([start, prev], axis=1) + self.positions.first(p)  # [B, P, d]
    x = layers.dropout(x, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    kw = dict(deterministic=deterministic, rngs=rngs)
    if self.blocks and layers.CrossAttention.absorbed_is_cheaper(
        p, memory.shape[1], memory.shape[2], self.blocks[0].cross_attention.num_heads):
      # Few queries, long memory: attend to the memory directly (W_k, W_v
      # absorbed), skipping each layer's K/V projection of the memory.
      for block in self.blocks:
        x = block(x, memory=memory, **kw)
    else:
      memory_kv = layers.project_memory_kv([blk.cross_attention for blk in self.blocks], memory)
      for block, kv in zip(self.blocks, memory_kv):
        x = block(x, memory_kv=kv, **kw)
    index, valid = head_tables(self.vocab_sizes)
    return self._head(self._finish(x), jnp.asarray(index), jnp.asarray(valid),
                      "bpd,dpv->bpv")

  # Incremental decoding
  # ----------------------------------------------------------------------------

  def init_cache(self, memory: jax.Array, sequences_per_image: int = 1) -> Cache:
    """Cross-attention K/V from memory [B, S, d] (once per image) and zeroed
    self-attention buffers for B * sequences_per_image rows (image-major)."""
    if sequences_per_image < 1:
      raise ValueError(f"sequences_per_image must be >= 1, got {sequences_per_image}")
    rows = memory.shape[0] * sequences_per_image
    cache = []
    memory_kv = layers.project_memory_kv([blk.cross_attention for blk in self.blocks], memory)
    for block, (k, v) in zip(self.blocks, memory_kv):
      cache.append({"cross_k": k, "cross_v": v,
                    **block.self_attention.init_cache(rows, self.num_positions)})
    return tuple(cache)

  def decode_step(self, prev_token: jax.Array, position, cache: Cache
                  ) -> tuple[jax.Array, Cache]:
    """prev_token int [B] (ignored at position 0), position int or traced int32 scalar.

    Returns (logits [B, max_vocab] float32, masked; the updated cache).  No
    dropout: decoding is inference.
    """
    if len(cache) != len(self.blocks):
      raise ValueError(f"cache has {len(cache)} layers, the decoder {len(self.blocks)}")
    position = jnp.asarray(position, jnp.int32)
    offsets = jnp.asarray(layers.token_offsets(self.vocab_sizes))
    # Position 0 has no previous token: index any valid row and discard it.
    prev_offset = offsets[jnp.maximum(position - 1, 0)]
    row = jnp.where(position > 0, prev_token.astype(jnp.int32) + prev_offset, 0)
    emb = jnp.take(self.token_embedding[...], row, axis=0)  # [B, d]
    x = jnp.where(position > 0, emb, self.start[...][None, :])
    x = (x + self.positions.at(position))[:, None, :]  # [B, 1, d]
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode_step(x, position, layer_cache)
      new_cache.append(layer_cache)
    index, valid = head_tables(self.vocab_sizes)
    index = jnp.asarray(index)[position]  # [max_vocab]
    valid = jnp.asarray(valid)[position]
    logits = self._head(self._finish(x[:, 0]), index, valid, "bd,dv->bv")
    return logits, tuple(new_cache)
