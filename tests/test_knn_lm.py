"""kNN-LM on the S2 tree (geotoken_jax.decoding.knn_lm) against brute-force enumeration, its strategy
strings, and the predictor's best-of-pool oracle."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from geotoken_jax import decoding, inference, metrics, models, s2, sharding
from geotoken_jax.decoding import knn_lm, strategies
from geotoken_jax.decoding.constraints import MASKED_LOGIT

# ---------------------------------------------------------------------------
# A toy decoder over 3 positions, vocabulary 4 (id 3 does not exist at position 0): 48
# sequences.  Its logits depend on the image and the whole prefix (a code carried per row in
# the cache, so beam search must reorder it), through a random table.

V, P = 4, 3
TOY_VALID = np.array([[True, True, True, False], [True] * 4, [True] * 4])
TOY_SEQUENCES = np.asarray([s for s in itertools.product(range(V), repeat=P) if TOY_VALID[0, s[0]]], np.int32)
CODES = (V + 1) ** (P - 1)


def toy_table(batch, seed, sharpness=2.0):
  return np.random.default_rng(seed).normal(size=(batch, CODES, V)).astype(np.float32) * sharpness


def toy_step(table):
  table, valid = jnp.asarray(table), jnp.asarray(TOY_VALID)

  def step(prev, position, cache):
    code = jnp.where(position > 0, cache["code"] * (V + 1) + prev + 1, 0)
    logits = jnp.where(valid[position], table[cache["image"], code], MASKED_LOGIT)
    return logits, {"code": code, "image": cache["image"]}

  return step


def toy_cache(batch, n):
  return {"code": jnp.zeros((batch * n,), jnp.int32), "image": jnp.repeat(jnp.arange(batch, dtype=jnp.int32), n)}


def toy_decoder_log_probs(table):
  """float64 log p_dec of every toy sequence [B, 48], and the conditionals [B, 48, P]."""
  table = np.asarray(table, np.float64)
  out = np.zeros((table.shape[0], len(TOY_SEQUENCES), P))
  for b in range(table.shape[0]):
    for i, seq in enumerate(TOY_SEQUENCES):
      code = 0
      for t in range(P):
        if t:
          code = code * (V + 1) + seq[t - 1] + 1
        logits = np.where(TOY_VALID[t], table[b, code], -np.inf)
        out[b, i, t] = logits[seq[t]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
  return out.sum(-1), out


# Neighbours of two images: shared prefixes, a duplicated path, invalid entries.
PATHS = np.array([[[0, 1, 2], [0, 1, 3], [0, 2, 0], [2, 3, 1]],
                  [[1, 0, 0], [1, 0, 0], [2, 2, 2], [0, 3, 3]]], np.int32)
VALID = np.array([[True, True, True, False], [True, False, True, True]])
SCORES = np.array([[0.9, 0.7, 0.8, 0.95], [0.6, 0.99, 0.5, 0.55]], np.float32)


def knn_probs(paths, scores, valid, tau):
  """float64 p_kNN of every toy sequence [B, 48]."""
  out = np.zeros((paths.shape[0], len(TOY_SEQUENCES)))
  for b in range(paths.shape[0]):
    logits = np.where(valid[b], scores[b].astype(np.float64) / tau, -np.inf)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    for k in np.flatnonzero(valid[b]):
      out[b, np.flatnonzero((TOY_SEQUENCES == paths[b, k]).all(-1))] += w[k]
  return out


def neighbors(paths=PATHS, scores=SCORES, valid=VALID):
  return {"neighbor_tokens": jnp.asarray(paths), "neighbor_scores": jnp.asarray(scores),
          "neighbor_valid": jnp.asarray(valid)}


def wrapped(table, n, lam, tau, **kw):
  batch = table.shape[0]
  return knn_lm.mix_neighbors(toy_step(table), toy_cache(batch, n), neighbors(), lam=lam, tau=tau,
                              sequences_per_image=n, vocab_size=V, **kw)


@functools.partial(jax.jit, static_argnames=("lam", "tau"))
def teacher_forced(table, lam, tau):
  """Sum over positions of log_softmax(wrapped logits) at every toy sequence: [B, 48]."""
  batch, n = table.shape[0], len(TOY_SEQUENCES)
  step, cache = wrapped(table, n, lam, tau)
  seqs = jnp.tile(jnp.asarray(TOY_SEQUENCES), (batch, 1))
  total = jnp.zeros((batch * n,), jnp.float32)
  prev = jnp.zeros((batch * n,), jnp.int32)
  for t in range(P):
    logits, cache = step(prev, jnp.int32(t), cache)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    total = total + jnp.take_along_axis(log_probs, seqs[:, t:t + 1], axis=1)[:, 0]
    prev = seqs[:, t]
  return total.reshape(batch, n)


@pytest.mark.parametrize("lam,tau", [(0.0, 0.1), (0.3, 0.1), (0.7, 0.05), (0.5, 1.0), (1.0, 0.2)])
def test_product_of_steps_is_the_sequence_mixture(lam, tau):
  table = toy_table(2, seed=int(lam * 10 + tau * 100))
  log_dec, _ = toy_decoder_log_probs(table)
  expected = lam * knn_probs(PATHS, SCORES, VALID, tau) + (1 - lam) * np.exp(log_dec)
  got = np.exp(np.asarray(teacher_forced(jnp.asarray(table), lam, tau), np.float64))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  if lam == 1.0:  # pure retrieval: exactly zero off the neighbours' paths
    assert (got[expected == 0] == 0).all()


def test_gated_lambda():
  scores = jnp.asarray([[0.2, 0.9], [0.5, 0.1], [0.7, 0.65], [0.95, 0.99]], jnp.float32)
  valid = jnp.asarray([[True, False], [True, True], [False, False], [True, True]])
  got = np.asarray(knn_lm.gated_lambda(scores, valid, 0.8, (0.4, 0.6)))
  # s1 = 0.2, 0.5, none, 0.99: ramp 0, 0.5, (no neighbour) 0, 1
  np.testing.assert_allclose(got, [0.0, 0.4, 0.0, 0.8], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(knn_lm.gated_lambda(scores, valid, 0.8, (0.5, 0.5))), [0, 0.8, 0, 0.8])
  np.testing.assert_allclose(np.asarray(knn_lm.gated_lambda(scores, valid, 0.3)), [0.3, 0.3, 0, 0.3])


# ---------------------------------------------------------------------------
# Beam search on the mixture against enumeration.


def reference_mixture_beam(log_cond, knn, lam, width):
  """Beam search by enumeration (float64) of the mixture: a prefix scores log p_mix(prefix) =
  log(lam p_kNN(prefix) + (1 - lam) p_dec(prefix)) (the telescoped product of its conditionals)."""
  kept = [()]
  for t in range(P):
    scores = {}
    for i, seq in enumerate(TOY_SEQUENCES):
      prefix = tuple(seq[:t + 1])
      if prefix[:-1] in kept and prefix not in scores:
        same = (TOY_SEQUENCES[:, :t + 1] == seq[:t + 1]).all(-1)
        p_knn = knn[same].sum()
        p_dec = np.exp(log_cond[i, :t + 1].sum())
        scores[prefix] = np.log(lam * p_knn + (1 - lam) * p_dec)
    kept = sorted(scores, key=lambda k: -scores[k])[:width]
  return kept, [scores[k] for k in kept]


@pytest.mark.parametrize("width", [1, 2, 5, 12])
def test_beam_equals_enumeration_of_the_mixture(width):
  lam, tau = 0.6, 0.1
  table = toy_table(2, seed=40 + width)
  step, cache = wrapped(table, width, lam, tau)
  tokens, scores, valid = jax.jit(lambda c: decoding.beam_search(step, c, 2, P, width, return_valid=True))(cache)
  assert np.asarray(valid).all()
  _, log_cond = toy_decoder_log_probs(table)
  knn = knn_probs(PATHS, SCORES, VALID, tau)
  for b in range(2):
    expected_tokens, expected_scores = reference_mixture_beam(log_cond[b], knn[b], lam, width)
    np.testing.assert_array_equal(np.asarray(tokens[b]), np.asarray(expected_tokens))
    np.testing.assert_allclose(np.asarray(scores[b]), expected_scores, rtol=1e-5, atol=1e-5)
  if width == 12:  # nothing pruned before the last position: the 12 best of all 48
    totals = np.log(lam * knn + (1 - lam) * np.exp(toy_decoder_log_probs(table)[0]))
    for b in range(2):
      best = np.argsort(-totals[b], kind="stable")[:width]
      assert {tuple(s) for s in np.asarray(tokens[b])} == {tuple(TOY_SEQUENCES[i]) for i in best}


# ---------------------------------------------------------------------------
# lambda = 0 is plain decoding (bit for bit); lambda = 1 with one neighbour is that neighbour.


def toy_decode_all(step, cache_of, batch, keys):
  greedy = decoding.greedy_decode(step, cache_of(1), batch, P)
  beam = decoding.beam_search(step, cache_of(5), batch, P, 5)
  sampled = decoding.sample_sequences(step, cache_of(16), keys, 16, P, temperature=0.9)
  return {"greedy": greedy, "beam": beam, "sample": sampled}


def test_lambda_zero_is_bit_identical_on_the_toy():
  """lambda = 0 given at run time, a closed gate, and no valid neighbour: greedy, beam and sampling
  give the plain decoder's tokens and scores bit for bit (lambda = 0.5 does not)."""
  table = toy_table(2, seed=5)
  keys = strategies.image_keys(3, jnp.arange(2))
  cases = {"lambda_zero": (0.0, None, VALID), "gate_closed": (0.9, (2.0, 3.0), VALID),  # every score < 2
           "no_valid_neighbour": (0.9, None, np.zeros_like(VALID)), "control": (0.5, None, VALID)}
  step = knn_lm.knn_lm_logits(toy_step(table))

  def mixed_cache(lam, gate, valid):
    def cache_of(n):
      return knn_lm.mix_neighbors(toy_step(table), toy_cache(2, n), neighbors(valid=valid), lam=lam, tau=0.1,
                                  sequences_per_image=n, vocab_size=V, gate=gate)[1]
    return cache_of

  def run():
    out = {"plain": toy_decode_all(toy_step(table), lambda n: toy_cache(2, n), 2, keys)}
    for case, (lam, gate, valid) in cases.items():
      out[case] = toy_decode_all(step, mixed_cache(lam, gate, valid), 2, keys)
    return out

  out = jax.tree.map(np.asarray, jax.jit(run)())
  for case in cases:
    same = [np.array_equal(a, b) for name in out["plain"] for a, b in zip(out["plain"][name], out[case][name])]
    assert all(same) == (case != "control"), (case, same)


SPEC = s2.TokenSpec(level=2, group_size=1)  # 3 positions, vocab (6, 4, 4): 96 sequences
ALL_SEQUENCES = np.asarray(list(itertools.product(*(range(v) for v in SPEC.vocab_sizes))), np.int32)
IMAGE = 16


def tiny_config():
  cfg = models.model_config("paper")
  cfg.update(encoder="vit", norm="pre", d_model=16, num_heads=2, ff_dim=24, decoder_layers=2)
  cfg.vit.update(image_size=IMAGE, patch_size=8, width=12, depth=1, num_heads=2, mlp_dim=20)
  return cfg


@functools.cache
def restored():
  """A tiny random GeoToken model (ViT encoder) on one device: graphdef, params, shardings, mesh."""
  mesh = sharding.create_mesh({"data": -1}, jax.devices()[:1])
  cfg = tiny_config()
  config = ml_collections.ConfigDict({"model": cfg, "seed": 0, "sharding_rules": sharding.DEFAULT_RULES,
                                      "tokens": {"level": 2, "group_size": 1}})
  graphdef, abstract, shardings = inference.abstract_params(config, SPEC, mesh)
  # Random parameters drawn in NumPy: no initializer to compile (the test only needs some model).
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.4, a.shape), a.dtype), abstract)
  return graphdef, jax.device_put(params, shardings), shardings, mesh


def images(batch, seed):
  return np.random.default_rng(seed).integers(0, 256, (batch, IMAGE, IMAGE, 3)).astype(np.uint8)


def real_neighbors(batch, k, seed, valid=None):
  rng = np.random.default_rng(seed)
  tokens = ALL_SEQUENCES[rng.choice(len(ALL_SEQUENCES), (batch, k), replace=batch * k > 96)]
  latlng = np.asarray(s2.tokens_to_latlng(tokens.reshape(-1, SPEC.num_positions), SPEC), np.float32)
  return {"neighbor_tokens": tokens.astype(np.int32), "neighbor_latlng": latlng.reshape(batch, k, 2),
          "neighbor_scores": np.sort(rng.uniform(0.3, 0.9, (batch, k)), axis=1)[:, ::-1].astype(np.float32),
          "neighbor_valid": np.ones((batch, k), bool) if valid is None else valid}


def decode_pools(names, inputs, nb, trie=None, also=None):
  """{name: pool} of the small real model on `inputs`; with `also(model, memory)`, (pools, its
  result), computed in the same jitted program."""
  graphdef, state, _, _ = restored()
  keys = strategies.image_keys(7, jnp.arange(inputs.shape[0]))

  @jax.jit
  def fn(state, inputs, nb, keys, trie):
    model = nnx.merge(graphdef, state)
    memory = model.encode({"image": inputs})
    pools = {name: strategies.decode_pool(model, memory, strategies.parse_strategy(name).check(SPEC), keys, trie,
                                          nb) for name in names}
    return pools if also is None else (pools, also(model, memory))

  return jax.tree.map(np.asarray, fn(state, inputs, nb, keys, trie))


def test_lambda_zero_is_bit_identical_on_a_geotoken_model():
  """Image 0's gate is open (lambda 0.5), image 1's is closed (lambda 0): image 1 decodes exactly as
  without neighbours, image 0 does not."""
  inputs = images(2, seed=1)
  nb = real_neighbors(2, 4, seed=2)
  nb["neighbor_scores"] = np.array([[0.9, 0.8, 0.7, 0.6], [0.4, 0.3, 0.2, 0.1]], np.float32)
  plain_names = ["greedy", "beam:5", "sample:12:0.8:logprob"]
  mixed_names = [f"{n}:knn_lambda=0.5:knn_gate=0.5/0.5" for n in plain_names]
  out = decode_pools(plain_names + mixed_names, inputs, nb)
  for plain, mixed in zip(plain_names, mixed_names):
    for field in ("tokens", "log_prob", "valid"):
      np.testing.assert_array_equal(out[plain][field][1], out[mixed][field][1])
    assert not np.array_equal(out[plain]["log_prob"][0], out[mixed]["log_prob"][0])


def test_lambda_one_with_one_neighbour_returns_its_path():
  inputs = images(3, seed=4)
  valid = np.array([[False, True, False], [True, False, False], [False, False, True]])
  nb = real_neighbors(3, 3, seed=5, valid=valid)
  path = nb["neighbor_tokens"][valid]  # [3, P]: each image's one valid neighbour
  names = ["greedy:knn_lambda=1", "beam:4:knn_lambda=1", "sample:16:0.5:logprob:top_k=2:knn_lambda=1:knn_tau=3"]
  out = decode_pools(names + ["greedy:knn_lambda=1:knn_k=1", "greedy"], inputs, nb)
  for name in names:
    tokens, log_prob, ok = out[name]["tokens"], out[name]["log_prob"], out[name]["valid"]
    np.testing.assert_array_equal(tokens[:, 0], path, err_msg=name)
    np.testing.assert_allclose(log_prob[:, 0], 0.0, atol=1e-5, err_msg=name)  # p_mix(path) = 1
    if name.startswith("sample"):
      np.testing.assert_array_equal(tokens, np.broadcast_to(path[:, None], tokens.shape))
    if name.startswith("beam:4"):  # nothing else has any probability
      assert ok[:, 0].all() and not ok[:, 1:].any()
  # knn_k=1 keeps the first neighbour only: image 1's (valid), the others have none (lambda 0).
  np.testing.assert_array_equal(out["greedy:knn_lambda=1:knn_k=1"]["tokens"][1, 0], path[1])
  np.testing.assert_array_equal(out["greedy:knn_lambda=1:knn_k=1"]["tokens"][[0, 2]], out["greedy"]["tokens"][[0, 2]])
  assert not np.array_equal(out["greedy"]["tokens"][:, 0], path)


def test_mixture_under_a_trie_stays_in_the_trie():
  rng = np.random.default_rng(11)
  train = np.stack([rng.choice([1, 4], 400), rng.choice([0, 3], 400, p=[0.8, 0.2]), rng.integers(0, 4, 400)], 1)
  trie = decoding.build_cell_trie(train.astype(np.int32), SPEC, min_count=20)
  allowed = {tuple(s) for s in trie.allowed_sequences()}
  nb = real_neighbors(3, 4, seed=6)  # paths mostly outside the trie
  names = ["beam:3:knn_lambda=0.7", "sample:20:1.5:logprob:knn_lambda=0.7"]
  out = decode_pools(names, images(3, seed=6), nb, trie)
  for name in names:
    assert out[name]["valid"].all()
    assert np.isfinite(out[name]["log_prob"]).all() and out[name]["log_prob"].max() <= 1e-6
    assert all(tuple(s) in allowed for s in out[name]["tokens"].reshape(-1, SPEC.num_positions)), name


def test_missing_neighbours_are_named():
  with pytest.raises(ValueError, match="neighbor_scores"):
    decode_pools(["greedy:knn_lambda=0.5"], images(2, 0), {"neighbor_tokens": np.zeros((2, 3, 3), np.int32)})
  with pytest.raises(ValueError, match="knn_k=5 asks for more"):
    decode_pools(["greedy:knn_lambda=0.5:knn_k=5"], images(2, 0), real_neighbors(2, 3, seed=0))


# ---------------------------------------------------------------------------
# Strategy strings.


@pytest.mark.parametrize("text", [
    "greedy:knn_lambda=0.5", "greedy:knn_lambda=0.5:knn_tau=0.05", "beam:5:knn_lambda=0.3:knn_tau=0.1",
    "sample:30:0.7:medoid:knn_lambda=0.5", "sample:8:1:vote:top_p=0.9:knn_lambda=1:knn_k=3:knn_gate=0.6/0.9:trie=2",
    "greedy:knn_lambda=0.123456789:knn_tau=0.0333333333", "beam:3:knn_gate=-0.1/0.25:knn_lambda=0",
    "greedy:knn_lambda=0.4:knn_gate=0.7/0.7"])
def test_strategy_round_trip(text):
  strategy = strategies.parse_strategy(text).check(SPEC)
  assert strategies.parse_strategy(strategy.name) == strategy
  assert strategy.knn_lm and strategies.needs_neighbors(strategy)
  assert strategy.pool_key.knn_lambda == strategy.knn_lambda  # the mixture is part of the pool
  assert strategies.parse_strategy(text).pool_key != strategies.parse_strategy(text.split(":knn")[0]).pool_key


def test_knn_lm_fields_in_names():
  assert strategies.parse_strategy("sample:30:0.7:medoid:knn_tau=0.1:knn_lambda=0.5").name == (
      "sample:30:0.7:medoid:knn_lambda=0.5:knn_tau=0.1")
  assert strategies.parse_strategy("beam:5:knn_lambda=0.3").name == "beam:5:knn_lambda=0.3"
  assert not strategies.needs_neighbors(strategies.parse_strategy("beam:5"))


@pytest.mark.parametrize("text,match", [
    ("greedy:knn_lambda=1.5", r"knn_lambda must be in \[0, 1\]"), ("greedy:knn_lambda=-0.1", r"in \[0, 1\]"),
    ("greedy:knn_lambda=nan", r"in \[0, 1\]"), ("beam:5:knn_lambda=0.5:knn_tau=0", "knn_tau must be finite and > 0"),
    ("beam:5:knn_lambda=0.5:knn_tau=-1", "knn_tau must be"), ("sample:4:1:knn_lambda=0.5:knn_tau=inf", "knn_tau"),
    ("knn:10:knn_lambda=0.5", "apply to greedy, beam and sample only"),
    ("gallery:5:knn_lambda=0.5", "apply to greedy, beam and sample only"),
    ("knn:10:knn_tau=0.1", "apply to greedy, beam and sample only"),
    ("greedy:knn_tau=0.1", "need knn_lambda"), ("greedy:knn_gate=0.1/0.2", "need knn_lambda"),
    ("greedy:knn_lambda=0.5:knn_k=-1", "knn_k must be an integer >= 0"),
    ("greedy:knn_lambda=0.5:knn_gate=0.9/0.1", "LO <= HI"), ("greedy:knn_lambda=0.5:knn_gate=0.5", "LO/HI"),
    ("greedy:knn_lambda=", "needs a value"), ("greedy:knn_lambda=x", "bad strategy")])
def test_strategy_errors(text, match):
  with pytest.raises(ValueError, match=match):
    strategies.parse_strategies(text, SPEC)


@pytest.mark.parametrize("fields,match", [
    ({"kind": "knn", "num_samples": 3, "knn_lambda": 0.5}, "apply to greedy, beam and sample only"),
    ({"kind": "gallery", "num_samples": 3, "knn_k": 2}, "apply to greedy, beam and sample only"),
    ({"kind": "greedy", "knn_lambda": 0.5, "knn_gate": (1.0, float("inf"))}, "LO <= HI"),
    ({"kind": "greedy", "knn_lambda": 0.5, "knn_k": 1.5}, "knn_k must be an integer")])
def test_strategy_check_catches_direct_construction(fields, match):
  with pytest.raises(ValueError, match=match):
    strategies.Strategy(**fields).check(SPEC)


# ---------------------------------------------------------------------------
# The predictor: kNN-LM strategies and the best-of-pool oracle.


def _haversine64(a, b):
  return metrics.haversine_km(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_predictor_oracle_is_the_nearest_pool_entry():
  graphdef, params, shardings, mesh = restored()
  names = ("beam:4,beam:4:medoid,knn:3,knn:3:medoid,sample:10:1.5:medoid:knn_lambda=0.5,"
           "sample:10:1.5:vote:knn_lambda=0.5")
  wanted = strategies.parse_strategies(names, SPEC)
  predictor = inference.Predictor(graphdef, params, shardings, mesh, SPEC, wanted, num_candidates=10, oracles=True)
  expected_names = ["oracle:beam:4", "oracle:knn:3", "oracle:sample:10:1.5:knn_lambda=0.5"]
  assert predictor.oracle_names == expected_names
  batch_size = 6
  rng = np.random.default_rng(9)
  truth = np.stack([rng.uniform(-60, 60, batch_size), rng.uniform(-180, 180, batch_size)], -1).astype(np.float32)
  truth[-1] = np.nan  # an unusable label: the oracle falls back to the most likely entry
  nb = real_neighbors(batch_size, 3, seed=10, valid=np.array([[True, True, False]] * 3 + [[True] * 3] * 3))
  host = {"image": images(batch_size, seed=8), "index": np.arange(batch_size, dtype=np.int32), "latlng": truth, **nb}
  out = jax.tree.map(np.asarray, predictor(sharding.make_global_batch(host, mesh)))
  assert set(expected_names) <= set(out)

  members = {"oracle:beam:4": ["beam:4", "beam:4:medoid"], "oracle:knn:3": ["knn:3", "knn:3:medoid"],
             "oracle:sample:10:1.5:knn_lambda=0.5": ["sample:10:1.5:medoid:knn_lambda=0.5",
                                                     "sample:10:1.5:vote:knn_lambda=0.5"]}
  for oracle, rows in members.items():
    got = out[oracle]
    assert set(got) == set(out[rows[0]])  # the same per-strategy fields
    np.testing.assert_array_equal(got["predicted"][-1], got["candidate_latlng"][-1, 0])  # the most likely
    distance = _haversine64(truth[:-1], got["predicted"][:-1])
    for i in range(batch_size - 1):
      # The pool's distinct valid entries: every candidate with probability > 0 (10 >= N).
      pool = got["candidate_latlng"][i][got["candidate_prob"][i] > 0]
      np.testing.assert_array_equal(got["candidate_latlng"][i], out[rows[0]]["candidate_latlng"][i])
      d = _haversine64(np.broadcast_to(truth[i], pool.shape), pool)
      np.testing.assert_array_equal(got["predicted"][i], pool[np.argmin(d)])
      assert distance[i] <= d.min() + 1e-9
    for row in rows:  # no selection rule that picks a pool entry beats the oracle
      assert (distance <= _haversine64(truth[:-1], out[row]["predicted"][:-1]) + 1e-9).all(), row
  # knn:3 by brute force on the batch's own neighbours.
  d = _haversine64(np.repeat(truth[:-1, None], 3, 1), nb["neighbor_latlng"][:-1])
  d = np.where(nb["neighbor_valid"][:-1], d, np.inf)
  np.testing.assert_array_equal(out["oracle:knn:3"]["predicted"][:-1],
                                nb["neighbor_latlng"][np.arange(batch_size - 1), np.argmin(d, 1)])
  # The oracle is not a strategy and beats the medoid somewhere (so the test can fail).
  assert (_haversine64(truth[:-1], out["oracle:sample:10:1.5:knn_lambda=0.5"]["predicted"][:-1])
          < _haversine64(truth[:-1], out["sample:10:1.5:medoid:knn_lambda=0.5"]["predicted"][:-1]) - 1e-6).any()


def test_predictor_checks_its_inputs():
  graphdef, params, shardings, mesh = restored()
  plain = {"image": images(2, seed=1), "index": np.arange(2, dtype=np.int32)}
  wanted = strategies.parse_strategies("greedy,beam:3:knn_lambda=0.5", SPEC)
  predictor = inference.Predictor(graphdef, params, shardings, mesh, SPEC, wanted)
  with pytest.raises(ValueError, match="beam:3:knn_lambda=0.5 reads the retrieved neighbours .* no neighbor_tokens, neighbor_scores"):
    predictor(sharding.make_global_batch(plain, mesh))
  oracle = inference.Predictor(graphdef, params, shardings, mesh, SPEC, wanted[:1], oracles=True)
  with pytest.raises(ValueError, match="no `latlng`"):
    oracle(sharding.make_global_batch(plain, mesh))
  # Without oracles, no label is read and no oracle row comes out.
  plain_predictor = inference.Predictor(graphdef, params, shardings, mesh, SPEC, wanted[:1])
  out = plain_predictor(sharding.make_global_batch(plain, mesh))
  assert set(out) == {"greedy"}
