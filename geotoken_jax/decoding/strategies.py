"""Inference strategies by name, and the function that runs one on a GeoTokenModel.

A strategy string (comma-separate several for the evaluation job):

  greedy[:RULE]                argmax per position (a RULE only with add_neighbors: a union pool)
  beam:W[:RULE]                beam search of width W; the prediction is chosen
                               from the W beams by RULE (default logprob = the best beam)
  sample:N:T[:RULE]            N samples per image at temperature T; RULE picks
                               one (logprob, vote, medoid, mean; default logprob)

  gallery:K[:RULE]             an alignment model's inference (GeoCLIP): the K gallery
                               locations most similar to the image; RULE picks one
                               (default logprob = the most similar; the pool's
                               log-probabilities are the softmax over the whole gallery)
  knn:K[:RULE]                 retrieval alone, no decoder: the image's K nearest
                               training images (the neighbours a retrieval-augmented
                               run attaches to every example); their coordinates are
                               the pool, log-probabilities the softmax of their
                               similarities / evaluate.knn_temperature; knn:1 is the
                               top neighbour's location (OSV-5M's kNN baseline)

Rules: logprob, vote, wvote (the vote weighted by probability), medoid, mean, and with an alignment model similarity (the
candidate most similar to the image) and fused (log-probability + w x similarity
logit; w is evaluate.fused_weight); on a union pool (add_neighbors=K) with a fitted
reranker (evaluate.reranker_workdir), rerank (the candidate it scores highest).

followed by optional key=value fields:
  top_k=K, top_p=P             sampling filters (sample only)
  temperature=T                beam scores use log-softmax(logits / T) (beam only)
  trie=M                       constrain decoding to cells with >= M training
                               examples (`trie` alone means M = 1)
  trie_level=L                 constrain only down to S2 level L (default: the
                               token spec's level)
  knn_lambda=L                 kNN-LM (greedy, beam and sample only; needs the batch's
                               retrieved neighbours): decode the sequence-level mixture
                               L p_kNN(y) + (1 - L) p_dec(y), L in [0, 1], where p_kNN puts
                               softmax(score / tau) of each neighbour on its token path
                               (geotoken_jax.decoding.knn_lm)
  knn_tau=T                    the neighbours' softmax temperature (default 0.05)
  knn_k=K                      use the first K neighbours (default 0 = all the batch carries)
  knn_gate=LO/HI               gate L by the top valid neighbour's score s1:
                               L x clip((s1 - LO) / (HI - LO), 0, 1) (LO == HI: a step)
  add_neighbors=K              union pool (greedy, beam and sample only; needs the batch's
                               neighbours): the decoded pool plus the paths of the batch's
                               first K retrieved neighbours, each scored under the pool's own
                               distribution (see union_pool), so every rule picks from both
e.g. "sample:30:0.7:medoid:top_p=0.95:trie=2:trie_level=10",
"beam:5:knn_lambda=0.3:knn_tau=0.1", "greedy:knn_lambda=0.5:knn_gate=0.6/0.9", "beam:5:wvote:add_neighbors=10".

A beam width above the number of sequences the trie allows (CellTrie.num_sequences,
static) is clamped to it with a warning, so the pool has min(W, allowed) beams.
Every pool carries `valid` [B, N]; the selection rules and the candidates ignore
invalid entries (see geotoken_jax.decoding.selection).

Samples with the same (N, T, top_k, top_p, trie, knn_*) give the same pool whatever
the rule (the keys depend on the seed and the image only), so the evaluation
job decodes each pool once and applies every rule asked of it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from geotoken_jax import s2
from geotoken_jax.decoding.beam import beam_search, check_beam_size
from geotoken_jax.decoding.constraints import CellTrie
from geotoken_jax.decoding.greedy import greedy_decode
from geotoken_jax.decoding.constraints import ALLOWED_LOGIT
from geotoken_jax.decoding.knn_lm import check_neighbors, first_neighbors, mix_neighbors, sequence_log_prob
from geotoken_jax.decoding.sampling import check_sampling, sample_sequences
from geotoken_jax.decoding.selection import (ALIGNMENT_RULES, SCORE_RULES, SELECTION_RULES, first_occurrence, select,
                                            top_candidates)
from geotoken_jax.s2 import jax_ops

KINDS = ("greedy", "beam", "sample", "gallery", "knn")
DEFAULT_KNN_TAU = 0.05
_KNN_LM_FIELDS = ("knn_lambda", "knn_tau", "knn_k", "knn_gate")


def _number(x: float) -> str:
  """A float as short as it round-trips (`:g` when that is exact)."""
  short = f"{x:g}"
  return short if float(short) == x else repr(float(x))


@dataclasses.dataclass(frozen=True)
class Strategy:
  kind: str
  beam_size: int = 1
  num_samples: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  rule: str = "logprob"
  trie_min_count: int = 0  # 0 = unconstrained
  trie_level: int = 0  # 0 = the spec's level
  knn_lambda: float | None = None  # kNN-LM mixture weight; None = plain decoding
  knn_tau: float = DEFAULT_KNN_TAU  # the neighbours' softmax temperature
  knn_k: int = 0  # the first K neighbours; 0 = all the batch carries
  knn_gate: tuple[float, float] | None = None  # (lo, hi): lambda gated by the top neighbour's score
  add_neighbors: int = 0  # union pool: + the first K neighbours' paths; 0 = the decoded pool alone

  @property
  def knn_lm(self) -> bool:
    """Does the strategy mix the decoder with the retrieved neighbours (knn_lambda set)?"""
    return self.knn_lambda is not None

  @property
  def pool_size(self) -> int:
    return {"greedy": 1, "beam": self.beam_size, "sample": self.num_samples,
            "gallery": self.num_samples, "knn": self.num_samples}[self.kind]

  @property
  def pool_key(self) -> "Strategy":
    """The strategy up to its selection rule: equal keys decode equal pools."""
    return dataclasses.replace(self, rule="logprob")

  @property
  def name(self) -> str:
    """Canonical spec string (parse(name) == self)."""
    if self.kind == "greedy":
      parts = ["greedy"] if self.rule == "logprob" else ["greedy", self.rule]
    elif self.kind in ("gallery", "knn"):
      parts = [self.kind, str(self.num_samples)]
      if self.rule != "logprob":
        parts.append(self.rule)
    elif self.kind == "beam":
      parts = ["beam", str(self.beam_size)]
      if self.rule != "logprob":
        parts.append(self.rule)
      if self.temperature != 1.0:
        parts.append(f"temperature={self.temperature:g}")
    else:
      parts = ["sample", str(self.num_samples), f"{self.temperature:g}", self.rule]
      if self.top_k:
        parts.append(f"top_k={self.top_k}")
      if self.top_p < 1.0:
        parts.append(f"top_p={self.top_p:g}")
    if self.knn_lambda is not None:
      parts.append(f"knn_lambda={_number(self.knn_lambda)}")
    if self.knn_tau != DEFAULT_KNN_TAU:
      parts.append(f"knn_tau={_number(self.knn_tau)}")
    if self.knn_k:
      parts.append(f"knn_k={self.knn_k}")
    if self.knn_gate is not None:
      parts.append(f"knn_gate={_number(self.knn_gate[0])}/{_number(self.knn_gate[1])}")
    if self.add_neighbors:
      parts.append(f"add_neighbors={self.add_neighbors}")
    if self.trie_min_count:
      parts.append(f"trie={self.trie_min_count}")
      if self.trie_level:
        parts.append(f"trie_level={self.trie_level}")
    return ":".join(parts)

  def check(self, spec: s2.TokenSpec) -> "Strategy":
    if self.kind not in KINDS:
      raise ValueError(f"unknown strategy {self.kind!r}; choose from {', '.join(KINDS)}")
    if self.rule not in SELECTION_RULES:
      raise ValueError(f"unknown selection rule {self.rule!r} in {self.name!r}; choose from "
                       f"{', '.join(SELECTION_RULES)}")
    if self.kind == "beam":
      check_beam_size(self.beam_size, spec.vocab_sizes)
      if not self.temperature > 0:
        raise ValueError(f"{self.name}: beam temperature must be > 0")
    if self.kind in ("gallery", "knn"):
      if self.num_samples < 1:
        raise ValueError(f"{self.name}: {self.kind} needs K >= 1 candidates")
      if self.trie_min_count or self.temperature != 1.0:
        raise ValueError(f"{self.name}: a {self.kind} strategy takes no trie or temperature")
    if self.kind == "knn" and self.rule in SCORE_RULES:
      raise ValueError(f"{self.name}: a kNN pool is ranked by its own similarities; use logprob, vote, "
                       "wvote, medoid or mean")
    if self.kind == "sample":
      if self.num_samples < 1:
        raise ValueError(f"{self.name}: the number of samples must be >= 1")
      check_sampling(self.temperature, self.top_k, self.top_p)
    self._check_knn_lm()
    self._check_add_neighbors()
    if self.rule == "rerank" and not self.add_neighbors:
      raise ValueError(f"{self.name}: rule rerank scores a union pool: add add_neighbors=K")
    if self.trie_level and not self.trie_min_count:
      raise ValueError(f"{self.kind}: trie_level needs trie (e.g. trie:trie_level={self.trie_level})")
    if self.trie_min_count < 0:
      raise ValueError(f"{self.name}: trie min count must be >= 1")
    if self.trie_level and (self.trie_level % spec.group_size or not 0 < self.trie_level <= spec.level):
      raise ValueError(f"{self.name}: trie_level must be a multiple of the group size "
                       f"{spec.group_size} in (0, {spec.level}]")
    return self

  def _check_knn_lm(self) -> None:
    knn_set = [f for f in _KNN_LM_FIELDS if getattr(self, f) != Strategy.__dataclass_fields__[f].default]
    if not knn_set:
      return
    if self.kind not in ("greedy", "beam", "sample"):
      raise ValueError(f"{self.name}: {', '.join(knn_set)} (kNN-LM) apply to greedy, beam and sample only; "
                       f"a {self.kind} strategy does not decode")
    if self.knn_lambda is None:
      raise ValueError(f"{self.name}: {', '.join(knn_set)} need knn_lambda (the kNN-LM mixture weight)")
    if not 0.0 <= self.knn_lambda <= 1.0:
      raise ValueError(f"{self.name}: knn_lambda must be in [0, 1], got {self.knn_lambda}")
    if not (math.isfinite(self.knn_tau) and self.knn_tau > 0):
      raise ValueError(f"{self.name}: knn_tau must be finite and > 0, got {self.knn_tau}")
    if isinstance(self.knn_k, bool) or int(self.knn_k) != self.knn_k or self.knn_k < 0:
      raise ValueError(f"{self.name}: knn_k must be an integer >= 0 (0 = every neighbour), got {self.knn_k!r}")
    if self.knn_gate is not None and (len(self.knn_gate) != 2 or not all(math.isfinite(g) for g in self.knn_gate)
                                      or self.knn_gate[0] > self.knn_gate[1]):
      raise ValueError(f"{self.name}: knn_gate must be LO/HI with finite LO <= HI, got {self.knn_gate}")

  def _check_add_neighbors(self) -> None:
    k = self.add_neighbors
    if self.kind == "greedy" and self.rule != "logprob" and not k:
      raise ValueError(f"{self.name}: greedy takes a selection rule only with add_neighbors (a union pool)")
    if isinstance(k, bool) or int(k) != k or k < 0:
      raise ValueError(f"{self.name}: add_neighbors must be an integer >= 1, got {k!r}")
    if not k:
      return
    if self.kind not in ("greedy", "beam", "sample"):
      raise ValueError(f"{self.name}: add_neighbors (union pool) applies to greedy, beam and sample only; "
                       f"a {self.kind} strategy does not decode")
    if self.knn_lm and self.trie_min_count:
      raise ValueError(f"{self.name}: add_neighbors with both knn_lambda and a trie is not supported (the "
                       "trie renormalizes the mixture per step, so the neighbours' paths have no closed-form "
                       "score)")

  def trie_positions(self, spec: s2.TokenSpec) -> int:
    """How many leading token positions the trie constrains."""
    level = self.trie_level or spec.level
    return 1 + level // spec.group_size


_POSITIONAL = {"greedy": ("rule",), "beam": ("beam_size", "rule"), "sample": ("num_samples", "temperature", "rule"),
               "gallery": ("num_samples", "rule"), "knn": ("num_samples", "rule")}
def _gate(text: str) -> tuple[float, float]:
  lo, slash, hi = text.partition("/")
  if not slash:
    raise ValueError(f"knn_gate takes LO/HI (e.g. knn_gate=0.6/0.9), got {text!r}")
  return (float(lo), float(hi))


_KEYWORDS = {"top_k": int, "top_p": float, "temperature": float, "trie": int, "trie_level": int,
             "rule": str, "knn_lambda": float, "knn_tau": float, "knn_k": int, "knn_gate": _gate,
             "add_neighbors": int}
_FIELD_TYPES = {"beam_size": int, "num_samples": int, "temperature": float, "rule": str}


def parse_strategy(text: str) -> Strategy:
  """One strategy string (see the module docstring) -> Strategy (unchecked against a spec)."""
  parts = [p.strip() for p in text.strip().split(":")]
  kind = parts[0]
  if kind not in KINDS:
    raise ValueError(f"unknown strategy {kind!r} in {text!r}; choose from {', '.join(KINDS)}")
  fields: dict[str, Any] = {}
  positional = list(_POSITIONAL[kind])
  try:
    for part in parts[1:]:
      if "=" in part or part == "trie":
        key, _, value = part.partition("=")
        if key not in _KEYWORDS:
          raise ValueError(f"unknown option {key!r}")
        if not value and key != "trie":
          raise ValueError(f"{key} needs a value ({key}=...)")
        value = _KEYWORDS[key](value) if value else 1
        fields[{"trie": "trie_min_count"}.get(key, key)] = value
      else:
        if not positional:
          raise ValueError(f"too many fields for {kind!r}")
        name = positional.pop(0)
        fields[name] = _FIELD_TYPES[name](part)
  except ValueError as e:
    raise ValueError(f"bad strategy {text!r}: {e}") from None
  if kind == "sample" and "num_samples" not in fields:
    raise ValueError(f"bad strategy {text!r}: sample needs N, e.g. sample:30:0.7")
  if kind in ("gallery", "knn") and "num_samples" not in fields:
    raise ValueError(f"bad strategy {text!r}: {kind} needs K, e.g. {kind}:5")
  if kind == "beam" and "beam_size" not in fields:
    raise ValueError(f"bad strategy {text!r}: beam needs a width, e.g. beam:5")
  if kind != "sample" and ("top_k" in fields or "top_p" in fields):
    raise ValueError(f"bad strategy {text!r}: top_k / top_p apply to sampling only")
  if kind == "greedy" and ("temperature" in fields or ("rule" in fields and "add_neighbors" not in fields)):
    raise ValueError(f"bad strategy {text!r}: greedy takes no temperature, and a rule only with add_neighbors "
                     "(a union pool)")
  knn_fields = [f for f in _KNN_LM_FIELDS if f in fields]
  if knn_fields and kind not in ("greedy", "beam", "sample"):
    raise ValueError(f"bad strategy {text!r}: {', '.join(knn_fields)} (kNN-LM) apply to greedy, beam and "
                     "sample only")
  if "add_neighbors" in fields:
    if kind not in ("greedy", "beam", "sample"):
      raise ValueError(f"bad strategy {text!r}: add_neighbors (union pool) applies to greedy, beam and sample "
                       "only")
    if fields["add_neighbors"] < 1:
      raise ValueError(f"bad strategy {text!r}: add_neighbors must be an integer >= 1")
  return Strategy(kind=kind, **fields)


def parse_strategies(text: str, spec: s2.TokenSpec) -> list[Strategy]:
  """"greedy,beam:5,..." -> checked strategies, duplicates removed (order kept)."""
  strategies = []
  for item in text.split(","):
    if item.strip():
      strategy = parse_strategy(item).check(spec)
      if strategy not in strategies:
        strategies.append(strategy)
  if not strategies:
    raise ValueError("no strategy given")
  return strategies


def image_keys(seed: int, image_index: jax.Array) -> jax.Array:
  """Per-image PRNG keys [batch] from a seed and the images' indices in the data set."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(image_index.astype(jnp.uint32))


def num_allowed_sequences(spec: s2.TokenSpec, constraint: CellTrie | None) -> int:
  """How many distinct full sequences decoding may produce (a Python int, static)."""
  if constraint is not None:
    return int(constraint.num_sequences)
  return math.prod(int(v) for v in spec.vocab_sizes)


def pool_width(strategy: Strategy, spec: s2.TokenSpec, constraint: CellTrie | None) -> int:
  """The number of sequences decode_pool returns per image: a beam width above the number
  of sequences the trie (or the vocabulary) allows is clamped to it, with a warning."""
  if strategy.kind != "beam":
    return strategy.pool_size
  allowed = num_allowed_sequences(spec, constraint)
  if strategy.beam_size > allowed:
    warnings.warn(f"{strategy.name}: beam width {strategy.beam_size} exceeds the {allowed} sequences "
                  f"the {'trie' if constraint is not None else 'vocabulary'} allows; using {allowed} beams",
                  stacklevel=3)
    return allowed
  return strategy.beam_size


def decode_pool(model, memory: jax.Array, strategy: Strategy, keys: jax.Array,
                constraint: CellTrie | None, neighbors: Mapping[str, jax.Array] | None = None
                ) -> dict[str, jax.Array]:
  """The strategy's pool for each image, a dict of:

    tokens    [B, N, P] int32
    log_prob  [B, N] float32
    latlng    [B, N, 2] float32 cell centres (degrees)
    valid     [B, N] bool: False for beams that never became real sequences (their other
              fields are meaningless); greedy and sampling pools are all valid

  N is 1 (greedy), the number of samples, or the beam width clamped to the number of
  sequences the trie allows (pool_width, which warns).  `constraint` is a traced
  argument of the caller's jitted function (only its static fields are read here).

  A kNN-LM strategy (knn_lambda set) reads `neighbors` (the batch's neighbor_tokens
  [B, K, P], neighbor_scores [B, K] and, if present, neighbor_valid [B, K]) and decodes the
  mixture with the neighbours (geotoken_jax.decoding.knn_lm); its log_prob is log p(y) of
  the mixture.  knn_lambda=0 decodes the model alone (the neighbours are not read).

  A union pool (add_neighbors=K) appends the first K neighbours' token paths, scored under the
  pool's own distribution by one teacher-forced pass: N + K entries (union_pool).
  """
  batch = memory.shape[0]
  positions = model.num_positions
  width = pool_width(strategy, model.spec, constraint)
  cache = model.init_cache(memory, width)
  step = model.decode_step
  if strategy.knn_lm:
    check_neighbors(neighbors, strategy.name)
    if strategy.knn_lambda > 0:
      step, cache = mix_neighbors(step, cache, neighbors, lam=strategy.knn_lambda, tau=strategy.knn_tau,
                                  sequences_per_image=width, vocab_size=model.max_vocab_size,
                                  k=strategy.knn_k, gate=strategy.knn_gate, what=strategy.name)
  if strategy.kind == "greedy":
    tokens, log_prob = greedy_decode(step, cache, batch, positions, constraint)
    tokens, log_prob = tokens[:, None], log_prob[:, None]
    valid = jnp.ones((batch, 1), jnp.bool_)
  elif strategy.kind == "beam":
    tokens, log_prob, valid = beam_search(step, cache, batch, positions, width,
                                          temperature=strategy.temperature, constraint=constraint,
                                          return_valid=True)
  else:
    # The sampler draws from logits where masked and filtered ids are -inf, so it can
    # never pick an id the model or the trie masked: every sample is valid.
    tokens, log_prob = sample_sequences(
        step, cache, keys, strategy.num_samples, positions,
        temperature=strategy.temperature, top_k=strategy.top_k, top_p=strategy.top_p,
        constraint=constraint)
    valid = jnp.ones(log_prob.shape, jnp.bool_)
  latlng = jax_ops.tokens_to_latlng(tokens.reshape(-1, positions), model.spec)
  pool = {"tokens": tokens, "log_prob": log_prob, "latlng": latlng.reshape(tokens.shape[:2] + (2,)),
          "valid": valid}
  if strategy.add_neighbors:
    pool = union_pool(model, memory, strategy, pool, constraint, neighbors)
  return pool


def path_log_prob(model, memory: jax.Array, paths: jax.Array, constraint: CellTrie | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """The decoder's untempered log p_dec(path) of given token paths, in ONE teacher-forced
  batched pass: memory [B, S, D] (repeated per path), paths [B, M, P] int ->
  (log_prob [B, M] float32, allowed [B, M] bool).  log_prob is the sum over positions of
  log_softmax(logits) at the path's token, under the trie's renormalized distribution when
  there is one (the distribution greedy, beam at temperature 1 and sampling score with);
  allowed is False where some token is masked (outside the position's vocabulary or the
  trie), and such a path's log_prob is meaningless (about MASKED_LOGIT)."""
  batch, m, positions = paths.shape
  flat = jnp.asarray(paths, jnp.int32).reshape(batch * m, positions)
  logits = model.decode(jnp.repeat(memory, m, axis=0), flat, deterministic=True).astype(jnp.float32)
  if constraint is not None:
    node = constraint.initial_state(batch * m)
    masked = []
    for t in range(positions):
      masked.append(constraint.mask_logits(logits[:, t], node, t))
      node = constraint.advance(node, flat[:, t], t)
    logits = jnp.stack(masked, axis=1)
  picked = jnp.take_along_axis(logits, flat[:, :, None], axis=-1)[..., 0]  # [R, P]
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), flat[:, :, None], axis=-1)[..., 0]
  return (jnp.sum(log_probs, axis=-1).reshape(batch, m),
          jnp.all(picked > ALLOWED_LOGIT, axis=-1).reshape(batch, m))


def union_pool(model, memory: jax.Array, strategy: Strategy, pool: Mapping[str, jax.Array],
               constraint: CellTrie | None, neighbors: Mapping[str, jax.Array] | None) -> dict[str, jax.Array]:
  """The decoded pool [B, N] plus the paths of the batch's first K = strategy.add_neighbors
  neighbours: tokens [B, N+K, P], log_prob [B, N+K], latlng [B, N+K, 2], valid [B, N+K]; the
  decoded candidates come first, in their order.

  Scores: every entry's log_prob is the log-probability of ONE distribution, the one the pool
  was drawn from, untempered and unfiltered: the decoder's p_dec (under the trie's
  renormalized distribution when there is one), or with knn_lambda the sequence mixture
  lambda p_kNN + (1 - lambda) p_dec (knn_lm.sequence_log_prob, the same neighbours, weights
  and gate as decoding).  Greedy and sampling pools already score so (sampling's log_prob is
  at temperature 1, before top-k / top-p), and so does beam search at temperature 1.  Beam
  search at temperature T != 1 ranks by log-softmax(logits / T); its beams are then rescored
  here untempered, in the same teacher-forced pass as the neighbours, so the union's scores
  are comparable (the beams' order is kept).  The neighbours' paths are scored by
  path_log_prob (one teacher-forced pass over B x K rows, or B x (N + K) when rescoring).

  latlng of a neighbour entry: the cell centre of its token path (as for decoded
  candidates), not the neighbour's own neighbor_latlng.

  Validity and duplicates: a neighbour entry is valid only if the neighbour is
  (neighbor_valid), its path has probability > 0 under the pool's distribution (every token
  allowed by the vocabulary and the trie; with lambda = 1, on a mixture neighbour's path), and
  its path is neither a valid decoded candidate nor an earlier valid neighbour entry.  So a
  path is never counted twice because it was both decoded and retrieved: vote, wvote and
  medoid (which count every valid entry, as sampling duplicates express frequency) see each
  retrieved path once, or only through its decoded copies; logprob, mean and the candidates
  merge identical sequences anyway.  The selection rules ignore invalid entries."""
  paths, _, nb_valid = first_neighbors(neighbors, int(strategy.add_neighbors), strategy.name,
                                       field="add_neighbors")
  spec = model.spec
  limits = jnp.asarray(spec.vocab_sizes, jnp.int32) - 1
  paths = jnp.clip(paths, 0, limits)  # [B, K, P]
  tokens, log_prob, valid = pool["tokens"], pool["log_prob"], pool["valid"]
  n = tokens.shape[1]
  rescore = strategy.kind == "beam" and strategy.temperature != 1.0
  scored = jnp.concatenate([jnp.clip(tokens, 0, limits), paths], axis=1) if rescore else paths
  log_dec, allowed = path_log_prob(model, memory, scored, constraint)
  if strategy.knn_lm and strategy.knn_lambda > 0:
    log_mix = sequence_log_prob(scored, log_dec, neighbors, lam=strategy.knn_lambda, tau=strategy.knn_tau,
                                k=strategy.knn_k, gate=strategy.knn_gate, what=strategy.name)
  else:
    log_mix = log_dec
  if rescore:
    log_prob = jnp.where(valid, log_mix[:, :n], log_prob)
    log_mix, allowed = log_mix[:, n:], allowed[:, n:]
  decoded = jnp.any(jnp.all(paths[:, :, None, :] == tokens[:, None, :, :], axis=-1) & valid[:, None, :],
                    axis=-1)  # [B, K]: the path is a valid decoded candidate
  usable = nb_valid & allowed & (log_mix > -jnp.inf) & ~decoded
  usable = first_occurrence(paths, usable)
  latlng = jax_ops.tokens_to_latlng(paths.reshape(-1, spec.num_positions), spec).reshape(paths.shape[:2] + (2,))
  return {"tokens": jnp.concatenate([tokens, paths], axis=1),
          "log_prob": jnp.concatenate([log_prob, jnp.where(usable, log_mix, -1e30)], axis=1),
          "latlng": jnp.concatenate([pool["latlng"], latlng.astype(pool["latlng"].dtype)], axis=1),
          "valid": jnp.concatenate([valid, usable], axis=1)}


def needs_alignment(strategy: Strategy) -> bool:
  """Does the strategy need an alignment model (a gallery, or a similarity-based rule)?"""
  return strategy.kind == "gallery" or strategy.rule in ALIGNMENT_RULES


def needs_reranker(strategy: Strategy) -> bool:
  """Does the strategy need a fitted reranker (rule rerank)?"""
  return strategy.rule == "rerank"


def needs_neighbors(strategy: Strategy) -> bool:
  """Does the strategy read the retrieved neighbours of the batch (knn:K, kNN-LM decoding:
  knn_lambda set, or a union pool: add_neighbors set)?"""
  return strategy.kind == "knn" or strategy.knn_lm or bool(strategy.add_neighbors)


def knn_pool(batch: Mapping[str, jax.Array], k: int, temperature: float) -> dict[str, jax.Array]:
  """The batch's first k retrieved neighbours as a pool: tokens [B, k, P], latlng [B, k, 2]
  (the neighbours' own coordinates), log_prob [B, k] = log-softmax(score / temperature)
  over the valid ones, valid [B, k]."""
  for key in ("neighbor_tokens", "neighbor_latlng", "neighbor_scores"):
    if key not in batch:
      raise ValueError(f"knn:K needs retrieved neighbours in the batch ({key} is missing): evaluate a "
                       "run trained with retrieval (a `retrieval` config block)")
  available = batch["neighbor_tokens"].shape[1]
  if k > available:
    raise ValueError(f"knn:{k} asks for more neighbours than the batch carries ({available}: retrieval.k)")
  valid = batch["neighbor_valid"][:, :k] if "neighbor_valid" in batch else jnp.ones(
      batch["neighbor_scores"][:, :k].shape, jnp.bool_)
  logits = jnp.where(valid, batch["neighbor_scores"][:, :k].astype(jnp.float32) / temperature, -jnp.inf)
  log_prob = jnp.where(valid, jax.nn.log_softmax(logits, axis=-1), -1e30)
  return {"tokens": batch["neighbor_tokens"][:, :k].astype(jnp.int32), "log_prob": log_prob,
          "latlng": batch["neighbor_latlng"][:, :k].astype(jnp.float32), "valid": valid}


def rule_scores(pool: Mapping[str, jax.Array], rule: str, fused_weight: float = 1.0) -> jax.Array | None:
  """[B, N] scores of a score rule from the pool's "similarity" (the alignment model's
  scaled cosine of each candidate); None for the other rules."""
  if rule not in SCORE_RULES:
    return None
  if rule == "rerank":
    if "rerank" not in pool:
      raise ValueError("rule 'rerank' needs the pool's reranker scores")
    return pool["rerank"]
  if "similarity" not in pool:
    raise ValueError(f"rule {rule!r} needs the pool's alignment similarities")
  if rule == "similarity":
    return pool["similarity"]
  return pool["log_prob"] + fused_weight * pool["similarity"]


def choose(pool: Mapping[str, jax.Array], rule: str, num_candidates: int, fused_weight: float = 1.0
           ) -> dict[str, jax.Array]:
  """Applies a selection rule and the top-k candidates to a pool (its invalid entries, if it
  has a "valid" field, are ignored): predicted [B, 2], chosen [B] (-1 for mean),
  candidates [B, k] (-1 = empty slot), candidate_prob [B, k].  Under a score rule the
  candidates are ranked, and their probabilities normalized, by that rule's score."""
  valid = pool.get("valid")
  scores = rule_scores(pool, rule, fused_weight)
  chosen = select(rule, pool["tokens"], pool["log_prob"], pool["latlng"], valid, scores)
  ranking = pool["log_prob"] if scores is None else scores
  index, probability = top_candidates(pool["tokens"], ranking, num_candidates, valid)
  return {"predicted": chosen.latlng, "chosen": chosen.index, "candidates": index,
          "candidate_prob": probability}
