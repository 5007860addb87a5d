"""Label-free features of every candidate of a union pool, for a learned reranker (rule `rerank`).

A union pool (strategies.union_pool, add_neighbors=K) holds N decoded candidates followed by
the paths of the first K retrieved neighbours, every entry scored by the decoder.  Each entry
gets, from the image's pool and neighbours only (never its label):

  log_prob            its log-probability minus the pool's best (clipped at -30), / 10
  is_neighbor         1 for a retrieved entry, 0 for a decoded one
  neighbor_score      a retrieved entry's similarity minus the top one's (0 for decoded)
  neighbor_rank       a retrieved entry's rank / K (0 for decoded)
  top_score, top_gap, mean_score   the image's: s1, s1 - s2, the mean valid similarity
  for each support radius d (SUPPORT_KM):
    nb_weight@d       the softmax(score / tau) mass of the valid neighbours within d km of it
    nb_best@d         the best similarity among them minus s1 (-1 when none)
    decoded@d         the fraction of the valid decoded candidates within d km of it

Distances are great-circle, between the entry's cell centre and the neighbours' own
coordinates (neighbor_latlng) or the decoded candidates' cell centres.  So a decoded sample
that lands next to a strong neighbour, or a neighbour the decoder's samples crowd around,
can be told from a lone guess.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from geotoken_jax import metrics
from geotoken_jax.decoding.knn_lm import first_neighbors

SUPPORT_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
_BASE = ("log_prob", "is_neighbor", "neighbor_score", "neighbor_rank", "top_score", "top_gap", "mean_score")


def feature_names(support_km=SUPPORT_KM) -> tuple[str, ...]:
  per_radius = tuple(f"{kind}@{d:g}" for d in support_km for kind in ("nb_weight", "nb_best", "decoded"))
  return _BASE + per_radius


def candidate_features(pool: Mapping[str, jax.Array], neighbors: Mapping[str, jax.Array], *, num_decoded: int,
                       tau: float, support_km=SUPPORT_KM) -> jax.Array:
  """pool (tokens [B, M, P], log_prob [B, M], latlng [B, M, 2], valid [B, M]; its last M - N
  entries the first M - N neighbours' paths, N = num_decoded) and the batch's neighbours
  (neighbor_latlng, neighbor_scores, neighbor_valid) -> features [B, M, F] float32 in the
  order of feature_names(support_km).  Invalid entries get features too (the caller masks
  them)."""
  log_prob, latlng = pool["log_prob"].astype(jnp.float32), pool["latlng"].astype(jnp.float32)
  valid = pool.get("valid")
  valid = jnp.ones(log_prob.shape, jnp.bool_) if valid is None else jnp.asarray(valid, jnp.bool_)
  batch, m = log_prob.shape
  k = m - int(num_decoded)
  if k < 1:
    raise ValueError(f"reranker features need a union pool (add_neighbors=K): {m} entries, {num_decoded} decoded")
  if "neighbor_latlng" not in neighbors:
    raise ValueError("reranker features need the batch's neighbor_latlng")
  _, scores, nb_valid = first_neighbors(neighbors, k, "rerank", field="add_neighbors")
  scores = scores.astype(jnp.float32)
  nb_latlng = neighbors["neighbor_latlng"][:, :k].astype(jnp.float32)  # [B, K, 2]
  masked = jnp.where(nb_valid, scores, -jnp.inf)
  top2 = jax.lax.top_k(masked, min(2, k))[0]
  any_valid = jnp.any(nb_valid, axis=-1)
  s1 = jnp.where(any_valid, top2[:, 0], 0.0)  # [B]
  s2 = jnp.where(jnp.isfinite(top2[:, -1]), top2[:, -1], s1) if k > 1 else s1
  count = jnp.maximum(jnp.sum(nb_valid, axis=-1), 1)
  mean = jnp.sum(jnp.where(nb_valid, scores, 0.0), axis=-1) / count

  best = jnp.max(jnp.where(valid, log_prob, -jnp.inf), axis=-1, keepdims=True)
  rel_lp = jnp.clip(jnp.where(valid, log_prob - best, -30.0), -30.0, 0.0) / 10.0
  is_nb = (jnp.arange(m) >= num_decoded)[None, :].astype(jnp.float32) * jnp.ones((batch, 1))
  own = jnp.concatenate([jnp.zeros((batch, num_decoded)), jnp.where(nb_valid, scores - s1[:, None], -1.0)], axis=1)
  rank = jnp.concatenate([jnp.zeros((batch, num_decoded)), jnp.broadcast_to(jnp.arange(k) / k, (batch, k))], axis=1)
  per_query = jnp.stack([s1, s1 - s2, mean], axis=-1)[:, None, :] * jnp.ones((1, m, 1))

  weight = jax.nn.softmax(jnp.where(nb_valid, scores / tau, -jnp.inf), axis=-1)
  weight = jnp.where(nb_valid, weight, 0.0)  # [B, K]
  to_nb = metrics.haversine_km_jax(latlng[:, :, None, :], nb_latlng[:, None, :, :])  # [B, M, K]
  decoded_valid = valid[:, :num_decoded]
  to_dec = metrics.haversine_km_jax(latlng[:, :, None, :], latlng[:, None, :num_decoded, :])  # [B, M, N]
  n_dec = jnp.maximum(jnp.sum(decoded_valid, axis=-1), 1)[:, None]
  columns = [rel_lp, is_nb, own, rank]
  columns += [per_query[..., i] for i in range(3)]
  for d in support_km:
    near = (to_nb <= d) & nb_valid[:, None, :]
    columns.append(jnp.sum(jnp.where(near, weight[:, None, :], 0.0), axis=-1))
    columns.append(jnp.max(jnp.where(near, scores[:, None, :] - s1[:, None, None], -1.0), axis=-1))
    columns.append(jnp.sum((to_dec <= d) & decoded_valid[:, None, :], axis=-1) / n_dec)
  return jnp.stack(columns, axis=-1).astype(jnp.float32)
