"""Beam search over fixed-length S2 token sequences, in one lax loop with a KV cache.

As in the paper: a beam's score is the sum of log-softmax(logits / T) over its
tokens, each step keeps the top `beam_size` of beam x vocab extensions, and
every hypothesis has the same length, so there is no length penalty and no end
token.  All beam_size sequences come back, best first.

The beams of an image share that image's cross-attention K/V (see the model's
init_cache(memory, beam_size)); only the per-sequence self-attention cache is
reordered after each step.  At the first step all beams hold the same empty
prefix: beams 1.. start with a score of DEAD_SCORE so the first top-k draws
distinct tokens from beam 0 only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from geotoken_jax.decoding.constraints import CellTrie
from geotoken_jax.decoding.types import Cache, TokensToLogits

# Score of a beam that does not exist yet: far below any real sequence's
# (a masked id costs ~1e9 per position), finite so no inf - inf NaNs.
DEAD_SCORE = -1e30


@struct.dataclass
class BeamState:
  tokens: jax.Array  # [batch, beam, positions] int32
  scores: jax.Array  # [batch, beam] float32, summed log-probabilities
  prev: jax.Array  # [batch * beam] int32, the last token of each beam
  node: jax.Array  # [batch * beam] int32, trie node (zeros without a constraint)
  cache: Cache  # per-sequence leaves lead with batch * beam


def check_beam_size(beam_size: int, vocab_sizes) -> int:
  """beam_size must be >= 1 and at most the number of distinct sequences."""
  if isinstance(beam_size, bool) or int(beam_size) != beam_size or beam_size < 1:
    raise ValueError(f"beam size must be an integer >= 1, got {beam_size!r}")
  total = math.prod(int(v) for v in vocab_sizes)
  if beam_size > total:
    raise ValueError(f"beam size {beam_size} exceeds the {total} possible sequences")
  return int(beam_size)


def reorder_rows(cache: Cache, rows: jax.Array, num_rows: int) -> Cache:
  """Gathers the per-sequence leaves (leading axis num_rows) of a cache by `rows`."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.shape[0] == num_rows else x, cache)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int, num_positions: int,
                beam_size: int, *, temperature: float = 1.0,
                constraint: CellTrie | None = None) -> tuple[jax.Array, jax.Array]:
  """Returns (tokens [batch, beam, positions] int32, scores [batch, beam] float32), best first.

  `cache` must hold batch * beam_size decoding rows (image-major); leaves that
  lead with batch_size (the memory's K/V) are shared by an image's beams.
  """
  if temperature <= 0:
    raise ValueError(f"beam search temperature must be > 0, got {temperature}")
  w = int(beam_size)
  rows = batch_size * w
  scores = jnp.where(jnp.arange(w) == 0, 0.0, DEAD_SCORE).astype(jnp.float32)
  state = BeamState(
      tokens=jnp.zeros((batch_size, w, num_positions), jnp.int32),
      scores=jnp.broadcast_to(scores, (batch_size, w)),
      prev=jnp.zeros((rows,), jnp.int32),
      node=(constraint.initial_state(rows) if constraint is not None else jnp.zeros((rows,), jnp.int32)),
      cache=cache)

  def step(position, state: BeamState) -> BeamState:
    logits, cache = tokens_to_logits(state.prev, position, state.cache)  # [rows, vocab]
    if constraint is not None:
      logits = constraint.mask_logits(logits, state.node, position)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    total = state.scores[:, :, None] + log_probs.reshape(batch_size, w, vocab)  # [batch, beam, vocab]
    scores, flat = jax.lax.top_k(total.reshape(batch_size, w * vocab), w)  # [batch, beam]
    parent = flat // vocab  # [batch, beam]
    token = (flat % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(state.tokens, parent[:, :, None], axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, :, None], position, axis=2)
    source_rows = (parent + jnp.arange(batch_size)[:, None] * w).reshape(rows)  # [rows]
    token = token.reshape(rows)
    node = jnp.take(state.node, source_rows)
    if constraint is not None:
      node = constraint.advance(node, token, position)
    if w > 1:  # with one beam the rows never move
      cache = reorder_rows(cache, source_rows, rows)
    return BeamState(tokens=tokens, scores=scores, prev=token, node=node, cache=cache)

  state = jax.lax.fori_loop(0, num_positions, step, state)
  return state.tokens, state.scores
