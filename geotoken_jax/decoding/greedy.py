"""Greedy decoding: argmax at each position, one lax loop, KV-cached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Cache = Any
TokensToLogits = Callable[[jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]


def greedy_decode(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                  num_positions: int) -> tuple[jax.Array, jax.Array]:
  """Returns tokens [batch, positions] int32 and their summed log-probabilities [batch].

  `tokens_to_logits(prev_token [batch], position, cache)` gives logits
  [batch, vocab] for `position` (invalid ids already masked by the model).
  """

  def step(position, carry):
    tokens, cache, prev, score = carry
    logits, cache = tokens_to_logits(prev, position, cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, vocab]
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [batch]
    score = score + jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1)
    return tokens, cache, token, score

  init = (jnp.zeros((batch_size, num_positions), jnp.int32), cache, jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size,), jnp.float32))
  tokens, _, _, score = jax.lax.fori_loop(0, num_positions, step, init)
  return tokens, score
