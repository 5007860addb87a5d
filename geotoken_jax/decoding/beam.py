"""Beam search over fixed-length S2 token sequences, in one lax loop with a KV cache.

As in the paper: a beam's score is the sum of log-softmax(logits / T) over its
tokens, each step keeps the top `beam_size` of beam x vocab extensions, and
every hypothesis has the same length, so there is no length penalty and no end
token.  All beam_size sequences come back, best first.

The beams of an image share that image's cross-attention K/V (see the model's
init_cache(memory, beam_size)); only the per-sequence self-attention cache is
reordered after each step, within each image ([batch, beam, ...] gathers along
the beam axis), and the top-k is a per-image sort, so a step over a
batch-sharded cache needs no communication (no all-gather).  At the first
step all beams hold the same empty prefix: beams 1.. start invalid, with a
score of DEAD_SCORE, so the first top-k draws distinct tokens from beam 0 only.

Validity.  When fewer sequences are allowed than the width (a trie with few
cells, or a width above the first position's vocabulary), some beams can never
become real sequences.  Validity is tracked explicitly: an extension is valid
iff its parent is valid and its token was allowed (its logit, after the
model's and the constraint's masking, is above MASKED_LOGIT / 2).  Invalid
extensions are scored DEAD_SCORE, below every valid one, so valid beams always
come first and beam 0 is always valid (every allowed prefix has an allowed
continuation).  If the width is at most the number of allowed sequences, every
beam is valid at the end (a step keeps min(width, valid extensions) valid
beams, and that count never decreases).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from geotoken_jax.decoding.constraints import ALLOWED_LOGIT, CellTrie
from geotoken_jax.decoding.types import Cache, TokensToLogits

# Score of a beam that is not valid: far below any real sequence's, finite so
# no inf - inf NaNs.
DEAD_SCORE = -1e30


@struct.dataclass
class BeamState:
  tokens: jax.Array  # [batch, beam, positions] int32
  scores: jax.Array  # [batch, beam] float32, summed log-probabilities (DEAD_SCORE if not valid)
  valid: jax.Array  # [batch, beam] bool
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


def top_k_per_row(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k over the last axis of x [rows, n] (same values, same order: ties go to
  the lower index), as a stable sort: the SPMD partitioner keeps a sort local to each
  shard of a batch-sharded x, while its TopK op all-gathers the rows first."""
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  negated, index = jax.lax.sort((-x, index), dimension=x.ndim - 1, num_keys=2)
  return -negated[..., :k], index[..., :k]


def reorder_rows(cache: Cache, parent: jax.Array, batch_size: int, beam_size: int) -> Cache:
  """Gathers the per-sequence leaves (leading axis batch * beam, image-major) of a cache:
  the new beam j of image b is the old beam parent[b, j] of image b.

  The gather is per image (take_along_axis on [batch, beam, ...]), never across
  the flat batch x beam axis, so on a batch-sharded cache it stays local to
  each shard (a flat gather compiles to an all-gather of the cache each step).
  Leaves that lead with anything else (the memory's K/V, per image) are kept.
  """
  rows = batch_size * beam_size

  def gather(x):
    if x.ndim == 0 or x.shape[0] != rows:
      return x
    grouped = x.reshape((batch_size, beam_size) + x.shape[1:])
    index = parent.reshape((batch_size, beam_size) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(grouped, index, axis=1).reshape(x.shape)

  return jax.tree.map(gather, cache)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int, num_positions: int,
                beam_size: int, *, temperature: float = 1.0, constraint: CellTrie | None = None,
                return_valid: bool = False):
  """Returns (tokens [batch, beam, positions] int32, scores [batch, beam] float32), best first;
  with return_valid=True, also valid [batch, beam] bool.

  `cache` must hold batch * beam_size decoding rows (image-major); leaves that
  lead with batch_size (the memory's K/V) are shared by an image's beams.  A
  beam that is not valid (see the module docstring) has score DEAD_SCORE and
  meaningless tokens (possibly ids outside the vocabulary or the trie); valid
  beams come first, and beam 0 is always valid.
  """
  if temperature <= 0:
    raise ValueError(f"beam search temperature must be > 0, got {temperature}")
  w = int(beam_size)
  rows = batch_size * w
  first = jnp.arange(w) == 0
  state = BeamState(
      tokens=jnp.zeros((batch_size, w, num_positions), jnp.int32),
      scores=jnp.broadcast_to(jnp.where(first, 0.0, DEAD_SCORE).astype(jnp.float32), (batch_size, w)),
      valid=jnp.broadcast_to(first, (batch_size, w)),
      prev=jnp.zeros((rows,), jnp.int32),
      node=(constraint.initial_state(rows) if constraint is not None else jnp.zeros((rows,), jnp.int32)),
      cache=cache)

  def per_image(x):  # [rows] -> [batch, beam]
    return x.reshape(batch_size, w)

  def step(position, state: BeamState) -> BeamState:
    logits, cache = tokens_to_logits(state.prev, position, state.cache)  # [rows, vocab]
    if constraint is not None:
      logits = constraint.mask_logits(logits, state.node, position)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1).reshape(batch_size, w, vocab)
    allowed = (logits > ALLOWED_LOGIT).reshape(batch_size, w, vocab)
    extension_valid = state.valid[:, :, None] & allowed  # [batch, beam, vocab]
    total = jnp.where(extension_valid, state.scores[:, :, None] + log_probs, DEAD_SCORE)
    scores, flat = top_k_per_row(total.reshape(batch_size, w * vocab), w)  # [batch, beam]
    valid = jnp.take_along_axis(extension_valid.reshape(batch_size, w * vocab), flat, axis=1)
    parent = flat // vocab  # [batch, beam]
    token = (flat % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(state.tokens, parent[:, :, None], axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, :, None], position, axis=2)
    node = jnp.take_along_axis(per_image(state.node), parent, axis=1).reshape(rows)
    token = token.reshape(rows)
    if constraint is not None:
      node = constraint.advance(node, token, position)
    if w > 1:  # with one beam the rows never move
      cache = reorder_rows(cache, parent, batch_size, w)
    return BeamState(tokens=tokens, scores=scores, valid=valid, prev=token, node=node, cache=cache)

  state = jax.lax.fori_loop(0, num_positions, step, state)
  if return_valid:
    return state.tokens, state.scores, state.valid
  return state.tokens, state.scores
