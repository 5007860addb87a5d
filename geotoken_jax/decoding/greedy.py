"""Greedy decoding: argmax at each position, one lax loop, KV-cached."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geotoken_jax.decoding.constraints import CellTrie
from geotoken_jax.decoding.types import Cache, TokensToLogits


def greedy_decode(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                  num_positions: int, constraint: CellTrie | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Returns tokens [batch, positions] int32 and their summed log-probabilities [batch].

  `tokens_to_logits(prev_token [batch], position, cache)` gives logits
  [batch, vocab] for `position` (invalid ids already masked by the model).
  With a constraint, log-probabilities are those of the masked (renormalized)
  distribution.
  """
  node0 = constraint.initial_state(batch_size) if constraint is not None else jnp.zeros((batch_size,),
                                                                                        jnp.int32)

  def step(position, carry):
    tokens, cache, prev, score, node = carry
    logits, cache = tokens_to_logits(prev, position, cache)  # [batch, vocab]
    if constraint is not None:
      logits = constraint.mask_logits(logits, node, position)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, vocab]
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [batch]
    score = score + jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1)
    if constraint is not None:
      node = constraint.advance(node, token, position)
    return tokens, cache, token, score, node

  init = (jnp.zeros((batch_size, num_positions), jnp.int32), cache, jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size,), jnp.float32), node0)
  tokens, _, _, score, _ = jax.lax.fori_loop(0, num_positions, step, init)
  return tokens, score
