"""Union pools (strategy field add_neighbors=K): the decoded pool plus the retrieved neighbours'
paths, scored by one teacher-forced pass (geotoken_jax.decoding.strategies.union_pool)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geotoken_jax import decoding, inference, sharding
from geotoken_jax.decoding import knn_lm, strategies
from test_knn_lm import (ALL_SEQUENCES, PATHS, SCORES, SPEC, TOY_SEQUENCES, VALID, decode_pools, images, knn_probs,  # pylint: disable=wrong-import-order
                         neighbors, real_neighbors, restored, teacher_forced, toy_decoder_log_probs, toy_table)

P = SPEC.num_positions


def stepwise_log_prob(model, memory, paths, trie=None):
  """The oracle: log p_dec(path) by the KV-cached decode_step, token by token [B, M]."""
  batch, m, _ = paths.shape
  flat = jnp.asarray(paths, jnp.int32).reshape(batch * m, P)
  cache = model.init_cache(memory, m)
  prev = jnp.zeros((batch * m,), jnp.int32)
  node = jnp.zeros((batch * m,), jnp.int32)
  total = jnp.zeros((batch * m,), jnp.float32)
  for t in range(P):
    logits, cache = model.decode_step(prev, jnp.int32(t), cache)
    if trie is not None:
      logits = trie.mask_logits(logits, node, t)
      node = trie.advance(node, flat[:, t], t)
    total = total + jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), flat[:, t:t + 1], 1)[:, 0]
    prev = flat[:, t]
  return total.reshape(batch, m)


def run_model(fn, *args):
  graphdef, state, _, _ = restored()

  @jax.jit
  def go(state, inputs, *args):
    model = nnx.merge(graphdef, state)
    return fn(model, model.encode({"image": inputs}), *args)

  return go


def test_sequence_log_prob_is_the_toy_mixture():
  """knn_lm.sequence_log_prob (closed form) = the product of the decoded mixture's conditionals =
  brute-force lambda p_kNN + (1 - lambda) p_dec, on the toy decoder."""
  table = toy_table(2, seed=21)
  log_dec, _ = toy_decoder_log_probs(table)
  seqs = np.broadcast_to(TOY_SEQUENCES, (2,) + TOY_SEQUENCES.shape)
  for lam, tau in [(0.3, 0.1), (1.0, 0.2), (0.0, 0.1)]:
    got = np.asarray(knn_lm.sequence_log_prob(jnp.asarray(seqs), jnp.asarray(log_dec, jnp.float32), neighbors(),
                                              lam=lam, tau=tau), np.float64)
    expected = lam * knn_probs(PATHS, SCORES, VALID, tau) + (1 - lam) * np.exp(log_dec)
    np.testing.assert_allclose(np.exp(got), expected, rtol=2e-5, atol=1e-7)
    stepwise = np.asarray(teacher_forced(jnp.asarray(table), lam, tau))
    # Where p(y) = 0 (lambda = 1 off the neighbours) the closed form is -inf, the decoded steps ~MASKED_LOGIT.
    np.testing.assert_array_equal(np.isneginf(got), expected == 0)
    np.testing.assert_allclose(got[expected > 0], stepwise[expected > 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_trie", [False, True])
def test_teacher_forced_equals_kv_cached_steps(with_trie):
  trie = None
  if with_trie:
    rng = np.random.default_rng(11)
    train = np.stack([rng.choice([1, 4], 400), rng.choice([0, 3], 400), rng.integers(0, 4, 400)], 1)
    trie = decoding.build_cell_trie(train.astype(np.int32), SPEC, min_count=5)
  paths = ALL_SEQUENCES[np.random.default_rng(0).choice(len(ALL_SEQUENCES), (3, 7))]
  fn = run_model(lambda model, memory, paths, trie: (strategies.path_log_prob(model, memory, paths, trie),
                                                      stepwise_log_prob(model, memory, paths, trie)))
  _, state, _, _ = restored()
  (got, allowed), expected = jax.tree.map(np.asarray, fn(state, images(3, seed=2), jnp.asarray(paths), trie))
  if trie is None:
    assert allowed.all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0.5  # the paths' scores differ (a wrong gather would show)
  else:
    inside = {tuple(s) for s in trie.allowed_sequences()}
    np.testing.assert_array_equal(allowed, [[tuple(s) in inside for s in row] for row in paths])
    assert allowed.any() and not allowed.all()
    np.testing.assert_allclose(got[allowed], expected[allowed], rtol=1e-5, atol=1e-5)


def decode(names, inputs, nb, trie=None):
  """The pools and log p_dec of all 96 sequences [B, 96] (the step-by-step oracle), in one program."""
  def all_sequences(model, memory):
    every = jnp.broadcast_to(jnp.asarray(ALL_SEQUENCES), (memory.shape[0],) + ALL_SEQUENCES.shape)
    return stepwise_log_prob(model, memory, every)

  return decode_pools(names, inputs, nb, trie, also=all_sequences)


def index_of(path):
  return int(np.flatnonzero((ALL_SEQUENCES == path).all(-1))[0])


def test_union_scores_neighbours_under_the_pools_distribution():
  """Plain and kNN-LM union pools: each valid neighbour entry scores log p_dec(path) (oracle) or the
  brute-force mixture; the decoded candidates keep their scores; a beam at temperature 2 is rescored
  untempered; duplicates and invalid neighbours are invalid entries."""
  batch, k = 3, 5
  nb = real_neighbors(batch, k, seed=12, valid=np.array([[True, True, False, True, True]] * batch))
  nb["neighbor_tokens"][:, 4] = nb["neighbor_tokens"][:, 0]  # a duplicated neighbour path
  lam, tau = 0.4, 0.1
  names = ["greedy", "greedy:add_neighbors=5", f"greedy:knn_lambda={lam}:knn_tau={tau}",
           f"greedy:knn_lambda={lam}:knn_tau={tau}:add_neighbors=5", "beam:3:temperature=2",
           "beam:3:temperature=2:add_neighbors=5"]
  pools, log_dec = decode(names, images(batch, seed=3), nb)
  w = np.exp(np.where(nb["neighbor_valid"], nb["neighbor_scores"].astype(np.float64) / tau, -np.inf))
  w /= w.sum(1, keepdims=True)
  for b in range(batch):
    p_knn = np.zeros(len(ALL_SEQUENCES))
    for j in np.flatnonzero(nb["neighbor_valid"][b]):
      p_knn[index_of(nb["neighbor_tokens"][b, j])] += w[b, j]
    mixture = np.log(lam * p_knn + (1 - lam) * np.exp(log_dec[b].astype(np.float64)))
    for name, plain, score in [("greedy:add_neighbors=5", "greedy", log_dec[b]),
                               (f"greedy:knn_lambda={lam}:knn_tau={tau}:add_neighbors=5",
                                f"greedy:knn_lambda={lam}:knn_tau={tau}", mixture),
                               ("beam:3:temperature=2:add_neighbors=5", "beam:3:temperature=2", log_dec[b])]:
      pool, n = pools[name], pools[plain]["tokens"].shape[1]
      assert pool["tokens"].shape == (batch, n + k, P) and pool["valid"].shape == (batch, n + k)
      np.testing.assert_array_equal(pool["tokens"][:, :n], pools[plain]["tokens"])
      np.testing.assert_array_equal(pool["tokens"][:, n:], nb["neighbor_tokens"])
      decoded = {tuple(s) for s, ok in zip(pool["tokens"][b, :n], pool["valid"][b, :n]) if ok}
      seen = set()
      for j in range(k):
        path = tuple(nb["neighbor_tokens"][b, j])
        expected_valid = bool(nb["neighbor_valid"][b, j]) and path not in decoded and path not in seen
        assert pool["valid"][b, n + j] == expected_valid, (name, b, j)
        if expected_valid:
          seen.add(path)
          np.testing.assert_allclose(pool["log_prob"][b, n + j], score[index_of(path)], rtol=1e-5, atol=1e-5)
      # Every valid decoded entry: the same distribution (beams rescored untempered).
      for i in np.flatnonzero(pool["valid"][b, :n]):
        np.testing.assert_allclose(pool["log_prob"][b, i], score[index_of(pool["tokens"][b, i])], rtol=1e-5,
                                   atol=1e-5)
  # The tempered beam scores are not the untempered ones (so the rescoring is needed and tested).
  assert not np.allclose(pools["beam:3:temperature=2"]["log_prob"], pools["beam:3:temperature=2:add_neighbors=5"][
      "log_prob"][:, :3], atol=1e-3)
  assert not pools["greedy:add_neighbors=5"]["valid"][:, 1 + 4].any()  # the duplicate of neighbour 0
  assert not pools["greedy:add_neighbors=5"]["valid"][:, 1 + 2].any()  # the invalid neighbour


def test_predictor_picks_the_argmax_of_the_union():
  """greedy:add_neighbors=K with rule logprob = the brute-force argmax over {greedy path} + the valid
  neighbours' paths; an invalid neighbour is never chosen, by any rule, even the likeliest path."""
  graphdef, params, shardings, mesh = restored()
  batch, k = 8, 3
  inputs = images(batch, seed=30)
  _, log_dec = decode(["greedy"], inputs, real_neighbors(batch, 1, seed=0))
  best = ALL_SEQUENCES[np.argmax(log_dec, axis=1)]  # each image's most likely sequence
  nb = real_neighbors(batch, k, seed=31)
  nb["neighbor_tokens"][:, 1] = nb["neighbor_tokens"][:, 2] = best  # twice: the first copy is never valid
  nb["neighbor_valid"][:, 1] = False
  nb["neighbor_valid"][1::2, 2] = False  # odd images: the likeliest path only as invalid neighbours
  wanted = strategies.parse_strategies("greedy,greedy:add_neighbors=3,greedy:vote:add_neighbors=3,"
                                       "greedy:wvote:add_neighbors=3,greedy:medoid:add_neighbors=3", SPEC)
  assert [s.rule for s in wanted[1:]] == ["logprob", "vote", "wvote", "medoid"]
  predictor = inference.Predictor(graphdef, params, shardings, mesh, SPEC, wanted, num_candidates=4, oracles=True)
  host = {"image": inputs, "index": np.arange(batch, dtype=np.int32), "latlng": nb["neighbor_latlng"][:, 2], **nb}
  out = jax.tree.map(np.asarray, predictor(sharding.make_global_batch(host, mesh)))
  assert "oracle:greedy:add_neighbors=3" in out
  greedy_paths = out["greedy"]["candidate_tokens"][:, 0]
  moved = 0
  for b in range(batch):
    entries = [greedy_paths[b]] + [nb["neighbor_tokens"][b, j] for j in range(k)]
    ok = [True]  # a neighbour entry: a valid neighbour whose path no earlier valid entry has
    for j in range(1, k + 1):
      ok.append(bool(nb["neighbor_valid"][b, j - 1]) and
                tuple(entries[j]) not in {tuple(e) for e, o in zip(entries[:j], ok) if o})
    scores = [log_dec[b, index_of(e)] if o else -np.inf for e, o in zip(entries, ok)]
    chosen = int(np.argmax(scores))
    assert out["greedy:add_neighbors=3"]["chosen"][b] == chosen, b
    moved += chosen > 0
    for name in ("greedy:add_neighbors=3", "greedy:vote:add_neighbors=3", "greedy:wvote:add_neighbors=3",
                 "greedy:medoid:add_neighbors=3", "oracle:greedy:add_neighbors=3"):
      assert ok[out[name]["chosen"][b]], (name, b)  # never an invalid or duplicate entry
      probs = out[name]["candidate_prob"][b]
      assert (probs > 0).sum() == len({tuple(e) for e, o in zip(entries, ok) if o}), name
  # Image 0's likeliest path (a valid neighbour, after an invalid copy) beats greedy: the test can fail.
  assert moved > 0 and out["greedy:add_neighbors=3"]["chosen"][0] == 3
  for name in ("greedy:add_neighbors=3", "greedy:vote:add_neighbors=3", "greedy:wvote:add_neighbors=3",
               "greedy:medoid:add_neighbors=3", "oracle:greedy:add_neighbors=3"):
    assert (out[name]["chosen"] != 2).all() and (out[name]["chosen"][1::2] != 3).all(), name


def test_add_neighbors_needs_enough_neighbours():
  with pytest.raises(ValueError, match="add_neighbors=4 asks for more"):
    decode(["greedy:add_neighbors=4"], images(2, 0), real_neighbors(2, 3, seed=0))
  with pytest.raises(ValueError, match="neighbor_tokens"):
    decode(["beam:2:add_neighbors=1"], images(2, 0), {"neighbor_scores": np.zeros((2, 3), np.float32)})


@pytest.mark.parametrize("text", [
    "greedy:add_neighbors=3", "beam:5:wvote:add_neighbors=10", "beam:4:temperature=2:add_neighbors=1",
    "sample:30:0.7:vote:top_p=0.9:add_neighbors=5:trie=2", "greedy:knn_lambda=0.5:knn_k=3:add_neighbors=4",
    "sample:8:1:medoid:knn_lambda=0.3:add_neighbors=2"])
def test_strategy_round_trip(text):
  strategy = strategies.parse_strategy(text).check(SPEC)
  assert strategies.parse_strategy(strategy.name) == strategy
  assert strategy.add_neighbors >= 1 and strategies.needs_neighbors(strategy)
  plain = strategies.parse_strategy(text.replace(f":add_neighbors={strategy.add_neighbors}", ""))
  assert plain.add_neighbors == 0 and strategy.pool_key != plain.pool_key
  assert strategy.pool_key.add_neighbors == strategy.add_neighbors
  assert strategy.pool_size == plain.pool_size  # the decoder's width is unchanged
  assert inference.predictor.has_oracle(strategy)


@pytest.mark.parametrize("text,match", [
    ("knn:5:add_neighbors=2", "greedy, beam and sample only"), ("gallery:5:add_neighbors=2", "greedy, beam and sample only"),
    ("greedy:add_neighbors=0", "add_neighbors must be an integer >= 1"), ("greedy:add_neighbors=-1", ">= 1"),
    ("greedy:add_neighbors=x", "bad strategy"), ("greedy:add_neighbors=", "needs a value"),
    ("beam:3:knn_lambda=0.5:trie=2:add_neighbors=2", "not supported")])
def test_strategy_errors(text, match):
  with pytest.raises(ValueError, match=match):
    strategies.parse_strategies(text, SPEC)


@pytest.mark.parametrize("fields,match", [
    ({"kind": "knn", "num_samples": 3, "add_neighbors": 2}, "greedy, beam and sample only"),
    ({"kind": "greedy", "add_neighbors": -1}, "integer >= 1"), ({"kind": "greedy", "add_neighbors": 1.5}, "integer")])
def test_strategy_check_catches_direct_construction(fields, match):
  with pytest.raises(ValueError, match=match):
    strategies.Strategy(**fields).check(SPEC)


def test_sample_union_under_a_trie():
  """sample:N:T with a trie: the samples' own scores and the neighbours' are the trie's renormalized,
  untempered log-probabilities (the oracle: decode_step with the trie's mask); neighbours off the trie
  are invalid entries."""
  rng = np.random.default_rng(11)
  train = np.stack([rng.choice([1, 4], 400), rng.choice([0, 3], 400), rng.integers(0, 4, 400)], 1)
  trie = decoding.build_cell_trie(train.astype(np.int32), SPEC, min_count=5)
  inside = {tuple(s) for s in trie.allowed_sequences()}
  batch, k = 2, 6
  nb = real_neighbors(batch, k, seed=40)
  nb["neighbor_tokens"][:, :2] = np.asarray(sorted(inside)[:2])  # two neighbours inside the trie
  name = "sample:6:1.7:wvote:trie=5:add_neighbors=6"
  graphdef, state, _, _ = restored()
  keys = strategies.image_keys(7, jnp.arange(batch))

  @jax.jit
  def fn(state, inputs, nb, trie):
    model = nnx.merge(graphdef, state)
    memory = model.encode({"image": inputs})
    pool = strategies.decode_pool(model, memory, strategies.parse_strategy(name).check(SPEC), keys, trie, nb)
    return pool, stepwise_log_prob(model, memory, pool["tokens"], trie)

  pool, oracle = jax.tree.map(np.asarray, fn(state, images(batch, seed=41), nb, trie))
  n = 6
  for b in range(batch):
    own = {tuple(s) for s in pool["tokens"][b, :n]}
    for j in range(k):
      path = tuple(nb["neighbor_tokens"][b, j])
      expected = path in inside and path not in own and path not in {tuple(nb["neighbor_tokens"][b, i]) for i in range(j)}
      assert pool["valid"][b, n + j] == expected, (b, j)
  assert pool["valid"][:, n:].any() and not pool["valid"][:, n:].all()
  np.testing.assert_allclose(pool["log_prob"][pool["valid"]], oracle[pool["valid"]], rtol=1e-5, atol=1e-5)
