"""kNN-LM on the S2 tree: decoding that mixes the decoder with the image's retrieved neighbours.

No training.  Each image has K retrieved neighbours with full token paths
path_k [P], similarity scores s_k and a validity flag.  Their distribution over
whole sequences is

  p_kNN(y) = sum_k w_k [y == path_k],   w = softmax(s / tau) over the valid neighbours,

and the distribution decoded is the sequence-level mixture

  p(y) = lambda p_kNN(y) + (1 - lambda) p_dec(y).

Autoregressively, with the prefix masses p_kNN(y<t) = sum of w_k over the
neighbours whose first t tokens are y<t, and p_dec(y<t) = prod_{s<t} p_dec(y_s | y<s):

  p(v | y<t) = lambda_t p_kNN(v | y<t) + (1 - lambda_t) p_dec(v | y<t),
  lambda_t   = lambda p_kNN(y<t) / (lambda p_kNN(y<t) + (1 - lambda) p_dec(y<t)),

the posterior weight of the kNN component given the prefix.  The product of these
conditionals telescopes to p(y) exactly.  Everything is computed in log space:

  log p(v | y<t) = logaddexp(log lambda + log sum_{k matches y<t, path_k[t] = v} w_k,
                             log(1 - lambda) + log p_dec(y<t) + log p_dec(v | y<t))
                   - (the same logaddexp summed over v)

and once no neighbour matches the prefix (p_kNN(y<t) = 0) lambda_t = 0 and the row
decodes with the decoder alone.

`mix_neighbors(tokens_to_logits, cache, ...)` returns another tokens_to_logits and
its cache: the cache is (model cache, KnnLMState), so greedy_decode, beam_search and
sample_sequences run it unchanged inside their jax.lax loops.  The state's per-row
leaves (the neighbours still matching each row's prefix, with their log weights;
the row's running log p_dec(y<t); the decoder's previous log-probabilities, to add
log p_dec(prev) at the next call) lead with the number of decoding rows, so beam
search reorders them with the model's self-attention cache; the per-image leaves
(the neighbours' paths, log lambda, log(1 - lambda)) lead with the number of images
and are shared by the image's rows (beam search keeps them, see beam.reorder_rows).

Output.  A row whose lambda_t is 0 (lambda = 0, no valid neighbour, or no neighbour
matching its prefix) gets the model's logits back unchanged (bit-identical decoding);
a mixed row gets the log of the mixed distribution, with ids the model masked left
as they were and ids of zero mixture probability (lambda = 1, off every neighbour's
path) at MASKED_LOGIT.  A trie constraint then masks and renormalizes as usual, and
beam or sampling temperatures apply to the mixed distribution.  The decoders' scores
(beam scores, a pool's log_prob) are then log p(y) of the mixture.

Caveat: lambda = 1 is pure retrieval; with a trie that excludes a neighbour's cell,
such a row has no allowed continuation (a dead end the decoder alone never has).

lambda per image: a fixed lambda, or gated by the retrieval score (gated_lambda):
lambda(s1) = lambda * clip((s1 - lo) / (hi - lo), 0, 1) for the top valid
neighbour's score s1 (lo == hi: a step at hi).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from geotoken_jax.decoding.constraints import ALLOWED_LOGIT, MASKED_LOGIT
from geotoken_jax.decoding.types import Cache, TokensToLogits

NEIGHBOR_KEYS = ("neighbor_tokens", "neighbor_scores")  # required; neighbor_valid is optional


@struct.dataclass
class KnnLMState:
  # Per image (leading axis = images): shared by an image's rows.
  paths: jax.Array  # [B, K, P] int32, the neighbours' token paths
  log_lambda: jax.Array  # [B] float32, log lambda (-inf for lambda = 0)
  log_one_minus: jax.Array  # [B] float32, log(1 - lambda) (-inf for lambda = 1)
  # Per row (leading axis = images x sequences): reordered by beam search.
  log_weights: jax.Array  # [R, K] float32, log w_k of the neighbours matching the row's prefix, else -inf
  log_prefix_dec: jax.Array  # [R] float32, log p_dec(y<t) of the row's prefix (without its last token)
  prev_log_probs: jax.Array  # [R, vocab] float32, log p_dec(. | y<t-1) of the previous step


def neighbor_log_weights(scores: jax.Array, valid: jax.Array, tau: float) -> jax.Array:
  """log softmax(scores / tau) over the valid neighbours [B, K]; -inf for invalid ones (all
  -inf when an image has none)."""
  scaled = jnp.where(valid, scores.astype(jnp.float32) / tau, -jnp.inf)
  total = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
  return jnp.where(valid, scaled - total, -jnp.inf)


def gated_lambda(scores: jax.Array, valid: jax.Array, lam: float,
                 gate: tuple[float, float] | None = None) -> jax.Array:
  """lambda per image [B] float32: `lam`, or with gate = (lo, hi) lam x clip((s1 - lo) / (hi - lo),
  0, 1) for the top valid score s1 (lo == hi: lam where s1 >= hi, else 0).  0 without a valid
  neighbour."""
  any_valid = jnp.any(valid, axis=-1)
  lam = jnp.float32(lam)
  if gate is None:
    return jnp.where(any_valid, lam, 0.0).astype(jnp.float32)
  lo, hi = float(gate[0]), float(gate[1])
  top = jnp.max(jnp.where(valid, scores.astype(jnp.float32), -jnp.inf), axis=-1)
  if hi > lo:
    ramp = jnp.clip((top - lo) / (hi - lo), 0.0, 1.0)
  else:
    ramp = (top >= hi).astype(jnp.float32)
  return jnp.where(any_valid, lam * ramp, 0.0).astype(jnp.float32)


def init_state(neighbor_tokens: jax.Array, neighbor_scores: jax.Array, neighbor_valid: jax.Array | None,
               lam: jax.Array, *, tau: float, sequences_per_image: int, vocab_size: int) -> KnnLMState:
  """The kNN-LM state for B images x sequences_per_image rows (image-major).  lam: [B] (or a
  scalar) mixture weights in [0, 1]."""
  paths = jnp.asarray(neighbor_tokens).astype(jnp.int32)
  batch, k, _ = paths.shape
  valid = jnp.ones((batch, k), jnp.bool_) if neighbor_valid is None else jnp.asarray(neighbor_valid, jnp.bool_)
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (batch,))
  n = int(sequences_per_image)
  rows = batch * n
  log_weights = jnp.repeat(neighbor_log_weights(neighbor_scores, valid, tau), n, axis=0)  # [R, K]
  return KnnLMState(paths=paths, log_lambda=jnp.log(lam), log_one_minus=jnp.log1p(-lam),
                    log_weights=log_weights, log_prefix_dec=jnp.zeros((rows,), jnp.float32),
                    prev_log_probs=jnp.zeros((rows, int(vocab_size)), jnp.float32))


def knn_lm_logits(tokens_to_logits: TokensToLogits) -> TokensToLogits:
  """tokens_to_logits over the cache (model cache, KnnLMState) giving the mixture's log
  conditionals (see the module docstring)."""

  def wrapped(prev: jax.Array, position, cache: Cache):
    model_cache, state = cache
    logits, model_cache = tokens_to_logits(prev, position, model_cache)
    logits = logits.astype(jnp.float32)
    rows, vocab = logits.shape
    batch, k, _ = state.paths.shape
    n = rows // batch
    position = jnp.asarray(position, jnp.int32)
    started = position > 0
    # Absorb the previous token: keep the neighbours whose path has it, add log p_dec(prev).
    last = jax.lax.dynamic_index_in_dim(state.paths, jnp.maximum(position - 1, 0), axis=2,
                                        keepdims=False)  # [B, K]
    match = (last[:, None, :] == prev.reshape(batch, n)[:, :, None]).reshape(rows, k)
    log_weights = jnp.where(started & ~match, -jnp.inf, state.log_weights)  # [R, K]
    prev_log_prob = jnp.take_along_axis(state.prev_log_probs, prev[:, None].astype(jnp.int32), axis=1)[:, 0]
    log_prefix_dec = state.log_prefix_dec + jnp.where(started, prev_log_prob, 0.0)  # [R]
    dec_log_probs = jax.nn.log_softmax(logits, axis=-1)  # [R, vocab]
    # log sum_{matching k, path_k[t] = v} w_k: the kNN joint mass of (prefix, v).
    column = jax.lax.dynamic_index_in_dim(state.paths, position, axis=2, keepdims=False)  # [B, K]
    hits = column[:, None, :, None] == jnp.arange(vocab, dtype=jnp.int32)  # [B, 1, K, vocab]
    knn_joint = jax.nn.logsumexp(jnp.where(hits, log_weights.reshape(batch, n, k, 1), -jnp.inf),
                                 axis=2).reshape(rows, vocab)
    log_lambda = jnp.repeat(state.log_lambda, n)  # [R]
    log_one_minus = jnp.repeat(state.log_one_minus, n)
    joint = jnp.logaddexp(log_lambda[:, None] + knn_joint,
                          (log_one_minus + log_prefix_dec)[:, None] + dec_log_probs)  # log p(y<t, v)
    mixed = joint - jax.nn.logsumexp(joint, axis=-1, keepdims=True)  # log p(v | y<t)
    allowed = logits > ALLOWED_LOGIT
    mixed = jnp.where(allowed, jnp.where(mixed > -jnp.inf, mixed, MASKED_LOGIT), logits)
    # lambda_t > 0 iff lambda > 0 and some neighbour matches the prefix.
    mixing = log_lambda + jax.nn.logsumexp(log_weights, axis=-1) > -jnp.inf  # [R]
    out = jnp.where(mixing[:, None], mixed, logits)
    state = state.replace(log_weights=log_weights, log_prefix_dec=log_prefix_dec, prev_log_probs=dec_log_probs)
    return out, (model_cache, state)

  return wrapped


def check_neighbors(neighbors: Mapping[str, jax.Array] | None, what: str) -> None:
  """Raises a ValueError naming the neighbour keys `neighbors` lacks."""
  missing = [key for key in NEIGHBOR_KEYS if neighbors is None or key not in neighbors]
  if missing:
    raise ValueError(f"{what} reads the retrieved neighbours (kNN-LM or add_neighbors) but the batch has no "
                     f"{', '.join(missing)}: evaluate a run with a `retrieval` block (neighbours in the "
                     "batch) or attach neighbours with online retrieval")


def first_neighbors(neighbors: Mapping[str, jax.Array] | None, k: int = 0, what: str = "kNN-LM",
                    field: str = "knn_k") -> tuple[jax.Array, jax.Array, jax.Array]:
  """(neighbor_tokens [B, k, P] int32, neighbor_scores [B, k], neighbor_valid [B, k] bool) of the
  first k (0 = all) of the batch's neighbours; valid defaults to all True.  `field`: the strategy
  field that asked for k (named when the batch carries fewer)."""
  check_neighbors(neighbors, what)
  tokens, scores = neighbors["neighbor_tokens"], neighbors["neighbor_scores"]
  valid = neighbors.get("neighbor_valid")
  available = tokens.shape[1]
  if k:
    if k > available:
      raise ValueError(f"{what}: {field}={k} asks for more neighbours than the batch carries ({available}: "
                       "retrieval.k)")
    tokens, scores = tokens[:, :k], scores[:, :k]
    valid = None if valid is None else valid[:, :k]
  valid = jnp.ones(scores.shape, jnp.bool_) if valid is None else jnp.asarray(valid, jnp.bool_)
  return jnp.asarray(tokens).astype(jnp.int32), scores, valid


def sequence_log_prob(paths: jax.Array, log_p_dec: jax.Array, neighbors: Mapping[str, jax.Array], *,
                      lam: float, tau: float, k: int = 0, gate: tuple[float, float] | None = None,
                      what: str = "kNN-LM") -> jax.Array:
  """The exact log-probability of whole sequences under the mixture, log p(y) =
  logaddexp(log lambda + log p_kNN(y), log(1 - lambda) + log p_dec(y)) with
  p_kNN(y) = sum_k w_k [y == path_k] over the same neighbours, weights and (gated) lambda
  as mix_neighbors.  paths [B, M, P] int, log_p_dec [B, M] (the decoder's log p_dec(y),
  untempered) -> [B, M] float32 (-inf where p(y) = 0: lambda = 1 off every neighbour's path).
  Without a trie this equals the product of the conditionals that mix_neighbors decodes."""
  tokens, scores, valid = first_neighbors(neighbors, k, what)
  lam_b = gated_lambda(scores, valid, lam, gate)  # [B]
  log_w = neighbor_log_weights(scores, valid, tau)  # [B, K]
  same = jnp.all(jnp.asarray(paths, jnp.int32)[:, :, None, :] == tokens[:, None, :, :], axis=-1)  # [B, M, K]
  log_knn = jax.nn.logsumexp(jnp.where(same, log_w[:, None, :], -jnp.inf), axis=-1)  # [B, M]
  return jnp.logaddexp(jnp.log(lam_b)[:, None] + log_knn,
                       jnp.log1p(-lam_b)[:, None] + jnp.asarray(log_p_dec, jnp.float32))


def mix_neighbors(tokens_to_logits: TokensToLogits, cache: Cache, neighbors: Mapping[str, jax.Array], *,
                  lam: float, tau: float, sequences_per_image: int, vocab_size: int, k: int = 0,
                  gate: tuple[float, float] | None = None, what: str = "kNN-LM"
                  ) -> tuple[TokensToLogits, Cache]:
  """(tokens_to_logits, cache) of the kNN-LM mixture over the first k (0 = all) of the batch's
  neighbours: `neighbors` holds neighbor_tokens [B, K, P], neighbor_scores [B, K] and optionally
  neighbor_valid [B, K] (default all valid).  lam in [0, 1], optionally gated (gated_lambda);
  tau > 0 the softmax temperature of the neighbour weights."""
  tokens, scores, valid = first_neighbors(neighbors, k, what)
  lam_per_image = gated_lambda(scores, valid, lam, gate)
  state = init_state(tokens, scores, valid, lam_per_image, tau=tau, sequences_per_image=sequences_per_image,
                     vocab_size=vocab_size)
  return knn_lm_logits(tokens_to_logits), (cache, state)
