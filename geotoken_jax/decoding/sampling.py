"""Ancestral sampling of N sequences per image: temperature, top-k, top-p; seeded.

Randomness is per image: the caller passes one key per image (e.g. derived
from a seed and the image's index in the data set), sample n at position p
draws with fold_in(fold_in(key, n), p).  So a pool does not depend on the batch
size, the batch an image falls in, or the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geotoken_jax.decoding.constraints import ALLOWED_LOGIT, MASKED_LOGIT, CellTrie
from geotoken_jax.decoding.types import Cache, TokensToLogits

_VALID = ALLOWED_LOGIT  # logits above this are real ids


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def _filter(logits: jax.Array, temperature: float, top_k: int, top_p: float
            ) -> tuple[jax.Array, jax.Array]:
  """(logits / temperature [rows, vocab] with -inf for ids that are not real, keep [rows, vocab]
  bool: the real ids that survive top-k and top-p)."""
  logits = logits.astype(jnp.float32)
  keep = logits > _VALID
  # -inf (not MASKED_LOGIT) for masked ids: at a tiny temperature a real id's
  # scaled logit can fall below MASKED_LOGIT, and must still beat every masked id.
  scaled = jnp.where(keep, logits / temperature, -jnp.inf)
  if top_k and top_k < logits.shape[-1]:
    # The k-th largest value by a sort (lax.top_k would all-gather a batch-sharded batch).
    vocab = logits.shape[-1]
    kth = jnp.sort(scaled, axis=-1)[:, vocab - int(top_k):vocab - int(top_k) + 1]  # [rows, 1]
    keep = keep & (scaled >= kth)
  if top_p < 1.0:
    ordered = jnp.sort(jnp.where(keep, scaled, -jnp.inf), axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely ids
    kept = before < top_p  # the first id always (before = 0)
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    keep = keep & (scaled >= threshold)
  return scaled, keep


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """The sampling distribution's logits [rows, vocab]: / temperature, then top-k, then top-p.

  Removed ids (and ids the model masked) get MASKED_LOGIT.  top_k keeps the k
  largest (ties at the k-th value are all kept); top_p keeps the smallest set
  of most likely ids whose probability reaches top_p (always at least one).
  temperature must be > 0 here (0 is greedy, handled by the caller).  (The
  sampler itself draws from filtered_sampling_logits, where removed ids are
  -inf, so it never picks one whatever the temperature.)
  """
  check_sampling(temperature, top_k, top_p)
  scaled, keep = _filter(logits, temperature, top_k, top_p)
  return jnp.where(keep, scaled, MASKED_LOGIT)


def filtered_sampling_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0) -> jax.Array:
  """As filter_logits, but removed and masked ids get -inf: jax.random.categorical on these
  can only pick an id that is real (logit > MASKED_LOGIT / 2) and kept by the filters."""
  check_sampling(temperature, top_k, top_p)
  scaled, keep = _filter(logits, temperature, top_k, top_p)
  return jnp.where(keep, scaled, -jnp.inf)


def sample_sequences(tokens_to_logits: TokensToLogits, cache: Cache, image_keys: jax.Array,
                     num_samples: int, num_positions: int, *, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, constraint: CellTrie | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """N sequences per image.

  image_keys: typed PRNG keys [batch].  `cache` holds batch * num_samples rows
  (image-major).  Returns tokens [batch, samples, positions] int32 and the
  model's log-probability of each sequence [batch, samples] float32 (at
  temperature 1, before top-k/top-p; under the constraint's renormalized
  distribution when there is one), the score that pool selection and the
  candidates' probabilities use.  temperature 0 is greedy (all samples equal).
  """
  check_sampling(temperature, top_k, top_p)
  batch_size = image_keys.shape[0]
  n = int(num_samples)
  rows = batch_size * n
  row_keys = jax.vmap(jax.random.fold_in)(jnp.repeat(image_keys, n),
                                          jnp.tile(jnp.arange(n, dtype=jnp.uint32), batch_size))
  node0 = constraint.initial_state(rows) if constraint is not None else jnp.zeros((rows,), jnp.int32)

  def step(position, carry):
    tokens, cache, prev, log_prob, node = carry
    logits, cache = tokens_to_logits(prev, position, cache)  # [rows, vocab]
    if constraint is not None:
      logits = constraint.mask_logits(logits, node, position)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      sampling_logits = filtered_sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, position)
      token = jax.vmap(jax.random.categorical)(keys, sampling_logits).astype(jnp.int32)
    model_log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_prob = log_prob + jnp.take_along_axis(model_log_probs, token[:, None], axis=-1)[:, 0]
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1)
    if constraint is not None:
      node = constraint.advance(node, token, position)
    return tokens, cache, token, log_prob, node

  init = (jnp.zeros((rows, num_positions), jnp.int32), cache, jnp.zeros((rows,), jnp.int32),
          jnp.zeros((rows,), jnp.float32), node0)
  tokens, _, _, log_prob, _ = jax.lax.fori_loop(0, num_positions, step, init)
  return tokens.reshape(batch_size, n, num_positions), log_prob.reshape(batch_size, n)
