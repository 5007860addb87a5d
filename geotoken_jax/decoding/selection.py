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
  wvote    the same hierarchical vote, each candidate voting with its probability
           (softmax of the log-probabilities over the valid entries) instead of 1:
           a similarity-weighted vote for a kNN pool.
  medoid   the candidate with the least total great-circle distance to all the
           others (duplicates count as often as they were sampled).
  mean     the probability-weighted mean direction on the sphere: each DISTINCT
           sequence weighs its probability (duplicates are merged, not
           double-counted); the weighted sum of unit vectors, normalized.  Not a
           cell centre; index -1.  If the weighted vectors cancel (antipodal
           candidates) it falls back to `logprob`.
  similarity  the candidate whose location an alignment model finds most similar to
           the image: cos(image loc-head, location head(location encoder(candidate)))
           (G3's geo-verification).  Needs a score per candidate: `scores`.
  fused    log-probability + w * similarity logit (the alignment model's scaled
           cosine): the product of the decoder's and the alignment model's
           probabilities, the second raised to w.  `scores` holds the fused score.
  rerank   the candidate a learned reranker scores highest (models.reranker over
           decoding.rerank_features of a union pool).  `scores` holds its scores,
           optionally passed through snap_to_retrieved (below) first.
Ties in logprob / medoid / similarity / fused go to the earlier candidate.

Validity: every rule and top_candidates take an optional `valid` [batch, N]
bool (default all True).  Invalid entries (beams that never became real
sequences: score about DEAD_SCORE, tokens possibly outside the trie or the
vocabulary, coordinates possibly garbage) are ignored entirely: they are never
chosen, never vote, do not count in a medoid's distances or a mean, and are
never candidates.  A pool must hold at least one valid entry per image (beam
search's beam 0 always is, greedy and sampling pools are all valid); with none
the result is meaningless (index 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from geotoken_jax import metrics

SELECTION_RULES = ("logprob", "vote", "wvote", "medoid", "mean", "similarity", "fused", "rerank")
# Rules that rank candidates by a score computed outside the pool (an alignment model, a reranker).
SCORE_RULES = ("similarity", "fused", "rerank")
ALIGNMENT_RULES = ("similarity", "fused")


@struct.dataclass
class Selection:
  latlng: jax.Array  # [batch, 2] degrees
  index: jax.Array  # [batch] int32 into the pool, -1 when the point is not a candidate (mean)


def _pick(latlng: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(latlng, index[:, None, None], axis=1)[:, 0]


def _valid(valid: jax.Array | None, log_probs: jax.Array) -> jax.Array:
  return jnp.ones(log_probs.shape, jnp.bool_) if valid is None else jnp.asarray(valid, jnp.bool_)


def first_occurrence(tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """[batch, N] bool: True where the entry is valid and no earlier valid entry has the same
  sequence."""
  valid = _valid(valid, tokens[..., 0])
  same = jnp.all(tokens[:, :, None, :] == tokens[:, None, :, :], axis=-1)  # [batch, N, N]
  n = tokens.shape[1]
  earlier = jnp.tril(jnp.ones((n, n), jnp.bool_), k=-1)
  return valid & ~jnp.any(same & earlier & valid[:, None, :], axis=-1)


def select_logprob(tokens, log_probs, latlng, valid=None) -> Selection:
  del tokens
  valid = _valid(valid, log_probs)
  index = jnp.argmax(jnp.where(valid, log_probs, -jnp.inf), axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def select_vote(tokens, log_probs, latlng, valid=None) -> Selection:
  return _hierarchical_vote(tokens, log_probs, latlng, valid, weighted=False)


def select_wvote(tokens, log_probs, latlng, valid=None) -> Selection:
  return _hierarchical_vote(tokens, log_probs, latlng, valid, weighted=True)


def _hierarchical_vote(tokens, log_probs, latlng, valid, *, weighted: bool) -> Selection:
  positions = tokens.shape[2]
  alive = _valid(valid, log_probs)  # [batch, N]
  if weighted:  # each candidate's probability within the valid pool
    weight = jax.nn.softmax(jnp.where(alive, log_probs, -jnp.inf), axis=-1)
    weight = jnp.where(alive, weight, 0.0)
  else:
    weight = jnp.ones(log_probs.shape, jnp.float32)
  for p in range(positions):
    column = tokens[:, :, p]  # [batch, N]
    same = column[:, :, None] == column[:, None, :]  # [batch, N, N]
    votes = jnp.sum(jnp.where(same & alive[:, None, :], weight[:, None, :], 0.0), axis=-1)  # weight sharing n's token
    votes = jnp.where(alive, votes, -1.0)
    best = jnp.max(votes, axis=-1, keepdims=True)
    # Among the most voted tokens, the one of the most likely alive candidate.
    leader = jnp.argmax(jnp.where(alive & (votes == best), log_probs, -jnp.inf), axis=-1)  # [batch]
    winner = jnp.take_along_axis(column, leader[:, None], axis=1)  # [batch, 1]
    alive = alive & (column == winner)
  index = jnp.argmax(jnp.where(alive, log_probs, -jnp.inf), axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def select_medoid(tokens, log_probs, latlng, valid=None) -> Selection:
  del tokens
  valid = _valid(valid, log_probs)
  distances = metrics.haversine_km_jax(latlng[:, :, None, :], latlng[:, None, :, :])  # [batch, N, N]
  distances = jnp.where(valid[:, :, None] & valid[:, None, :], distances, 0.0)
  totals = jnp.where(valid, jnp.sum(distances, axis=-1), jnp.inf)
  index = jnp.argmin(totals, axis=-1).astype(jnp.int32)
  return Selection(_pick(latlng, index), index)


def unit_vectors(latlng: jax.Array) -> jax.Array:
  lat, lng = jnp.radians(latlng[..., 0]), jnp.radians(latlng[..., 1])
  return jnp.stack([jnp.cos(lat) * jnp.cos(lng), jnp.cos(lat) * jnp.sin(lng), jnp.sin(lat)], axis=-1)


def select_mean(tokens, log_probs, latlng, valid=None) -> Selection:
  valid = _valid(valid, log_probs)
  distinct = first_occurrence(tokens, valid)
  top = jnp.max(jnp.where(valid, log_probs, -jnp.inf), axis=-1, keepdims=True)
  weights = jnp.where(distinct, jnp.exp(jnp.where(distinct, log_probs - top, 0.0)), 0.0)
  vectors = jnp.where(distinct[..., None], weights[..., None] * unit_vectors(latlng), 0.0)
  total = jnp.sum(vectors, axis=1)  # [batch, 3]
  norm = jnp.linalg.norm(total, axis=-1)
  mean = jnp.stack([jnp.degrees(jnp.arcsin(jnp.clip(total[:, 2] / jnp.maximum(norm, 1e-30), -1, 1))),
                    jnp.degrees(jnp.arctan2(total[:, 1], total[:, 0]))], axis=-1)
  fallback = select_logprob(tokens, log_probs, latlng, valid)
  # Relative to the largest weight (1): a resultant this short is direction noise.
  cancelled = norm < 1e-6
  return Selection(jnp.where(cancelled[:, None], fallback.latlng, mean),
                   jnp.where(cancelled, fallback.index, -1).astype(jnp.int32))


_RULES = {"logprob": select_logprob, "vote": select_vote, "wvote": select_wvote, "medoid": select_medoid, "mean": select_mean}


def select(rule: str, tokens: jax.Array, log_probs: jax.Array, latlng: jax.Array,
           valid: jax.Array | None = None, scores: jax.Array | None = None) -> Selection:
  """tokens [batch, N, positions], log_probs [batch, N], latlng [batch, N, 2], valid [batch, N]
  bool (None = all valid) -> Selection; invalid entries are ignored.  The score rules
  (similarity, fused) take the best of `scores` [batch, N]."""
  if rule in SCORE_RULES:
    if scores is None:
      raise ValueError(f"selection rule {rule!r} needs a score per candidate (an alignment model's or a "
                       "reranker's)")
    return select_logprob(tokens, scores, latlng, valid)
  if rule not in _RULES:
    raise ValueError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")
  return _RULES[rule](tokens, log_probs, latlng, valid)


def snap_to_retrieved(scores: jax.Array, latlng: jax.Array, valid: jax.Array, neighbor_valid: jax.Array,
                      snap_km: float) -> jax.Array:
  """A union pool's scores [batch, N + K] (its last K entries the paths of the first K
  retrieved neighbours, latlng [batch, N + K, 2] their cell centres, valid [batch, N + K],
  neighbor_valid [batch, K]) with the choice moved onto a retrieved training location: if the
  top-scored valid entry lies within snap_km of a valid neighbour's path, the best-ranked
  such neighbour's entry swaps scores with it (the multiset of scores is kept, so the
  candidates' probabilities only change places).  When that neighbour's entry was dropped as
  a duplicate of another entry, the valid entry at its location (the duplicate) takes it.

  Why: a decoded cell a few km from a retrieved photo is the decoder's guess of fine digits
  it never saw for this cell; the photo's own location is the better bet, and with snap_km
  chosen on held-out pools it never does worse there.  snap_km <= 0 returns scores unchanged."""
  if snap_km <= 0:
    return scores
  k = neighbor_valid.shape[1]
  n = scores.shape[1] - k
  rows = jnp.arange(scores.shape[0])
  masked = jnp.where(valid, scores, -jnp.inf)
  chosen = jnp.argmax(masked, axis=-1)  # [batch]
  retrieved = latlng[:, n:, :]  # [batch, K, 2]
  to_chosen = metrics.haversine_km_jax(latlng[rows, chosen][:, None, :], retrieved)  # [batch, K]
  near = neighbor_valid & (to_chosen <= snap_km)
  snap = jnp.any(near, axis=-1)
  first = jnp.argmax(near, axis=-1)  # the best-ranked neighbour within reach
  to_target = metrics.haversine_km_jax(latlng, retrieved[rows, first][:, None, :])  # [batch, N + K]
  target = jnp.argmin(jnp.where(valid, to_target, jnp.inf), axis=-1)  # its entry, or its duplicate
  target = jnp.where(snap, target, chosen)
  top, displaced = scores[rows, chosen], scores[rows, target]
  entry = jnp.arange(scores.shape[1])[None, :]
  swapped = jnp.where(entry == target[:, None], top[:, None], scores)
  return jnp.where(entry == chosen[:, None], displaced[:, None], swapped)


def top_candidates(tokens: jax.Array, log_probs: jax.Array, k: int, valid: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """The k most likely DISTINCT valid sequences of each pool with probabilities normalized over
  the pool's distinct valid sequences: (index [batch, k] int32 into the pool, probability
  [batch, k] float32, descending).  Fewer than k distinct valid sequences: the rest have
  index -1 and probability 0."""
  n = tokens.shape[1]
  distinct = first_occurrence(tokens, valid)
  masked = jnp.where(distinct, log_probs, -jnp.inf)
  probs = jnp.where(distinct, jax.nn.softmax(masked, axis=-1), 0.0)
  k_eff = min(int(k), n)
  # A distinct valid entry's probability may underflow to 0 next to a far likelier one;
  # it is still a candidate (ranked before every duplicate or invalid entry, at -1).
  ranked, index = jax.lax.top_k(jnp.where(distinct, probs, -1.0), k_eff)
  filled = ranked >= 0
  index = jnp.where(filled, index, -1).astype(jnp.int32)
  top_p = jnp.where(filled, ranked, 0.0)
  if k_eff < k:
    pad = ((0, 0), (0, int(k) - k_eff))
    index = jnp.pad(index, pad, constant_values=-1)
    top_p = jnp.pad(top_p, pad)
  return index, top_p
