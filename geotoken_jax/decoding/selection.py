"""Choosing one location from a pool of decoded sequences, and top-k candidates.

A pool is, per image, N token sequences [batch, N, positions] with their
model log-probabilities [batch, N] and cell centres [batch, N, 2] (lat, lon
degrees).  A pool of samples may hold the same sequence several times (that
is how sampling expresses probability); a beam's sequences are distinct.
Every rule is vectorized over the batch and jit-able.

Rules (`select(rule, ...)`):
  logprob  the sequence with the highest log-probability.
  vote     hierarchical vote: position by position, keep the candidates whose
           token is the most frequent among those still kept (a tie goes to the
           token of the most likely kept candidate); the survivor with the
           highest log-probability.  The coarse cells are decided by the
           majority, like a vote over countries, then regions, ...
  medoid   the candidate with the least total great-circle distance to all the
           others (duplicates count as often as they were sampled).
  mean     the probability-weighted mean direction on the sphere: each DISTINCT
           sequence weighs its probability (duplicates are merged, not
           double-counted); the weighted sum of unit vectors, normalized.  Not a
           cell centre; index -1.  If the weighted vectors cancel (antipodal
           candidates) it falls back to `logprob`.
Ties in logprob / medoid go to the earlier candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from geotoken_jax import metrics

SELECTION_RULES = ("logprob", "vote", "medoid", "mean")


@struct.dataclass
class Selection:
  latlng: jax.Array  # [batch, 2] degrees
  index: jax.Array  # [batch] int32 into the pool, -1 when the point is not a candidate (mean)


def _pick(latlng: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(latlng, index[:, None, None], axis=1)[:, 0]


def first_occurrence(tokens: jax.Array) -> jax.Array:
  """[batch, N] bool: True where no earlier candidate has the same sequence."""
  same = jnp.all(tokens[:, :, None, :] == tokens[:, None, :, :], axis=-1)  # [batch, N, N]
  n = tokens.shape[1]
  earlier = jnp.tril(jnp.ones((n, n), jnp.bool_), k=-1)
  return ~jnp.any(same & earlier, axis=-1)


def select_logprob(tokens, log_probs, latlng) -> Selection:
  del tokens
  index = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def select_vote(tokens, log_probs, latlng) -> Selection:
  _, n, positions = tokens.shape
  alive = jnp.ones(log_probs.shape, jnp.bool_)  # [batch, N]
  for p in range(positions):
    column = tokens[:, :, p]  # [batch, N]
    same = column[:, :, None] == column[:, None, :]  # [batch, N, N]
    votes = jnp.sum(same & alive[:, None, :], axis=-1)  # alive candidates sharing n's token
    votes = jnp.where(alive, votes, -1)
    best = jnp.max(votes, axis=-1, keepdims=True)
    # Among the most voted tokens, the one of the most likely alive candidate.
    leader = jnp.argmax(jnp.where(votes == best, log_probs, -jnp.inf), axis=-1)  # [batch]
    winner = jnp.take_along_axis(column, leader[:, None], axis=1)  # [batch, 1]
    alive = alive & (column == winner)
  del n
  index = jnp.argmax(jnp.where(alive, log_probs, -jnp.inf), axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def select_medoid(tokens, log_probs, latlng) -> Selection:
  del tokens, log_probs
  distances = metrics.haversine_km_jax(latlng[:, :, None, :], latlng[:, None, :, :])  # [batch, N, N]
  index = jnp.argmin(jnp.sum(distances, axis=-1), axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def unit_vectors(latlng: jax.Array) -> jax.Array:
  lat, lng = jnp.radians(latlng[..., 0]), jnp.radians(latlng[..., 1])
  return jnp.stack([jnp.cos(lat) * jnp.cos(lng), jnp.cos(lat) * jnp.sin(lng), jnp.sin(lat)], axis=-1)


def select_mean(tokens, log_probs, latlng) -> Selection:
  distinct = first_occurrence(tokens)
  weights = jnp.where(distinct, jnp.exp(log_probs - jnp.max(log_probs, axis=-1, keepdims=True)), 0.0)
  total = jnp.sum(weights[..., None] * unit_vectors(latlng), axis=1)  # [batch, 3]
  norm = jnp.linalg.norm(total, axis=-1)
  mean = jnp.stack([jnp.degrees(jnp.arcsin(jnp.clip(total[:, 2] / jnp.maximum(norm, 1e-30), -1, 1))),
                    jnp.degrees(jnp.arctan2(total[:, 1], total[:, 0]))], axis=-1)
  fallback = select_logprob(tokens, log_probs, latlng)
  # Relative to the largest weight (1): a resultant this short is direction noise.
  cancelled = norm < 1e-6
  return Selection(jnp.where(cancelled[:, None], fallback.latlng, mean),
                   jnp.where(cancelled, fallback.index, -1).astype(jnp.int32))


_RULES = {"logprob": select_logprob, "vote": select_vote, "medoid": select_medoid, "mean": select_mean}


def select(rule: str, tokens: jax.Array, log_probs: jax.Array, latlng: jax.Array) -> Selection:
  """tokens [batch, N, positions], log_probs [batch, N], latlng [batch, N, 2] -> Selection."""
  if rule not in _RULES:
    raise ValueError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")
  return _RULES[rule](tokens, log_probs, latlng)


def top_candidates(tokens: jax.Array, log_probs: jax.Array, k: int
                   ) -> tuple[jax.Array, jax.Array]:
  """The k most likely DISTINCT sequences of each pool with probabilities normalized over
  the pool's distinct sequences: (index [batch, k] int32 into the pool, probability
  [batch, k] float32, descending).  Fewer than k distinct sequences: the rest have
  index -1 and probability 0."""
  n = tokens.shape[1]
  distinct = first_occurrence(tokens)
  masked = jnp.where(distinct, log_probs, -jnp.inf)
  probs = jnp.where(distinct, jax.nn.softmax(masked, axis=-1), 0.0)
  k_eff = min(int(k), n)
  top_p, index = jax.lax.top_k(probs, k_eff)
  index = jnp.where(top_p > 0, index, -1).astype(jnp.int32)
  if k_eff < k:
    pad = ((0, 0), (0, int(k) - k_eff))
    index = jnp.pad(index, pad, constant_values=-1)
    top_p = jnp.pad(top_p, pad)
  return index, top_p
