"""A learned reranker of candidate locations and its listwise loss.

  Reranker              an MLP scoring each candidate from its features [B, M, F] -> [B, M];
                        the features are standardized by constants fitted once on the
                        training pools (kept in the model's state, checkpointed with it)
  plackett_luce_loss    the listwise Plackett-Luce (ListMLE) loss of scores given the order
                        of the candidates by true distance, nearest first (GeoRanker's loss)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_EXCLUDED = -1e9  # an invalid candidate's score inside the loss: finite, so no NaN gradient


class Standardization(nnx.Variable):
  """Feature mean and scale: fitted once from data, never by the optimizer."""


class Reranker(nnx.Module):
  def __init__(self, num_features: int, hidden: Sequence[int] = (64, 64), *, rngs: nnx.Rngs):
    self.mean = Standardization(jnp.zeros((num_features,), jnp.float32))
    self.scale = Standardization(jnp.ones((num_features,), jnp.float32))
    widths = [int(num_features), *[int(h) for h in hidden]]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.out = nnx.Linear(widths[-1], 1, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    """features [B, M, F] -> scores [B, M] float32 (higher: nearer to the truth)."""
    x = (features.astype(jnp.float32) - self.mean[...]) / self.scale[...]
    for layer in self.layers:
      x = nnx.gelu(layer(x))
    return self.out(x)[..., 0]


def plackett_luce_loss(scores: jax.Array, distance_km: jax.Array, valid: jax.Array, top: int = 0) -> jax.Array:
  """Mean over rows of the Plackett-Luce negative log-likelihood of the candidates' order by
  true distance (nearest first; ties keep pool order): sum over the first `top` places i
  (0 = all) of logsumexp(scores of the valid candidates not yet placed) - score of place i.
  scores, distance_km [B, M], valid [B, M] bool; invalid candidates are neither placed nor
  competitors; a row without valid candidates contributes 0."""
  valid = jnp.asarray(valid, jnp.bool_)
  order = jnp.argsort(jnp.where(valid, distance_km, jnp.inf), axis=-1, stable=True)  # [B, M]
  placed = jnp.take_along_axis(jnp.where(valid, scores.astype(jnp.float32), _EXCLUDED), order, axis=-1)
  placed_valid = jnp.take_along_axis(valid, order, axis=-1)
  remaining = jax.lax.cumlogsumexp(placed, axis=1, reverse=True)  # [B, M]: log-sum over places >= i
  terms = jnp.where(placed_valid, remaining - placed, 0.0)
  if top:
    terms = terms[:, :int(top)]
  return jnp.mean(jnp.sum(terms, axis=-1))
