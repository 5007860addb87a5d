"""Decoding: beam search, sampling, the cell trie, pool selection, against brute-force oracles."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from geotoken_jax import decoding, models, s2, sharding
from geotoken_jax.decoding import strategies
from geotoken_jax.decoding.selection import select

SPEC = s2.TokenSpec(level=2, group_size=1)  # 3 positions, vocab (6, 4, 4): 96 sequences
BATCH = 4
IMAGE = 16


@functools.lru_cache(maxsize=None)
def tiny(sharpness: float = 3.0):
  """A tiny random ViT model whose output head is scaled so distributions are not flat."""
  cfg = models.model_config("paper")
  cfg.update(encoder="vit", norm="pre", d_model=16, num_heads=2, ff_dim=24, decoder_layers=2)
  cfg.vit.update(image_size=IMAGE, patch_size=8, width=12, depth=1, num_heads=2, mlp_dim=20)
  model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))
  kernel = model.decoder.head_kernel
  kernel.set_value(kernel.get_value() * sharpness)
  return model


def images(batch=BATCH, seed=0):
  return {"image": np.random.default_rng(seed).integers(0, 256, (batch, IMAGE, IMAGE, 3)).astype(np.uint8)}


ALL_SEQUENCES = np.asarray(list(itertools.product(*(range(v) for v in SPEC.vocab_sizes))), np.int32)


def sequence_log_probs(model, inputs, temperature=1.0):
  """Teacher-forced float64 log-probabilities of all 96 sequences per image: [batch, 96]
  and per-position conditionals (for the beam oracle)."""
  batch = inputs["image"].shape[0]
  seqs = np.tile(ALL_SEQUENCES, (batch, 1))
  rep = {"image": np.repeat(inputs["image"], len(ALL_SEQUENCES), axis=0)}
  logits = np.asarray(model(rep, jnp.asarray(seqs), deterministic=True), np.float64) / temperature
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  per_pos = np.take_along_axis(log_probs, seqs[:, :, None], axis=-1)[:, :, 0]  # [batch*96, P]
  return per_pos.reshape(batch, len(ALL_SEQUENCES), -1)


def reference_beam(per_pos, width):
  """Beam search by enumeration (float64): per position, the top `width` prefixes of the
  extensions of the kept prefixes, scored with teacher-forced conditionals."""
  out = []
  for image in per_pos:  # [96, P]
    kept = [()]
    for p in range(SPEC.num_positions):
      cands = {}
      for i, seq in enumerate(ALL_SEQUENCES):
        prefix = tuple(seq[:p + 1])
        if prefix[:-1] in kept and prefix not in cands:
          cands[prefix] = image[i, :p + 1].sum()
      kept = sorted(cands, key=lambda k: -cands[k])[:width]
    out.append([(k, cands[k]) for k in kept])
  return out


def run_beam(model, inputs, width, **kw):
  memory = model.encode(inputs)
  return decoding.beam_search(model.decode_step, model.init_cache(memory, width), memory.shape[0],
                              SPEC.num_positions, width, **kw)


@pytest.mark.parametrize("width", [1, 2, 5, 8, 24, 96])
def test_beam_equals_enumeration(width):
  model = tiny()
  inputs = images()
  tokens, scores, valid = jax.jit(lambda x: run_beam(model, x, width, return_valid=True))(inputs)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert np.asarray(valid).all()  # 8 > the 6 faces: beams dead after step 0 come alive
  per_pos = sequence_log_probs(model, inputs)
  expected = reference_beam(per_pos, width)
  for b in range(BATCH):
    np.testing.assert_array_equal(tokens[b], np.asarray([k for k, _ in expected[b]]))
    np.testing.assert_allclose(scores[b], [s for _, s in expected[b]], atol=1e-4)
    assert np.all(np.diff(scores[b]) <= 0)
  if width >= math.prod(SPEC.vocab_sizes[:-1]):
    # Wide enough that nothing is pruned before the last position: the W best of all 96.
    totals = per_pos.sum(-1)
    for b in range(BATCH):
      best = np.argsort(-totals[b], kind="stable")[:width]
      np.testing.assert_allclose(scores[b], totals[b, best], atol=1e-4)
      assert {tuple(s) for s in tokens[b]} == {tuple(ALL_SEQUENCES[i]) for i in best}


def test_beam_temperature_scores():
  model = tiny()
  inputs = images(seed=3)
  tokens, scores = run_beam(model, inputs, 96, temperature=2.0)
  per_pos = sequence_log_probs(model, inputs, temperature=2.0)
  index = {tuple(s): i for i, s in enumerate(ALL_SEQUENCES)}
  for b in range(BATCH):
    expected = [per_pos[b, index[tuple(s)]].sum() for s in np.asarray(tokens[b])]
    np.testing.assert_allclose(scores[b], expected, atol=1e-4)


def test_beam_width_one_is_greedy():
  model = tiny()
  inputs = images(batch=6, seed=1)
  memory = model.encode(inputs)
  greedy_tokens, greedy_scores = decoding.greedy_decode(model.decode_step, model.init_cache(memory),
                                                        6, SPEC.num_positions)
  beam_tokens, beam_scores = run_beam(model, inputs, 1)
  np.testing.assert_array_equal(beam_tokens[:, 0], greedy_tokens)
  np.testing.assert_allclose(beam_scores[:, 0], greedy_scores, rtol=1e-6)


def test_beam_size_checks():
  with pytest.raises(ValueError, match="exceeds the 96"):
    decoding.check_beam_size(97, SPEC.vocab_sizes)
  with pytest.raises(ValueError, match=">= 1"):
    decoding.check_beam_size(0, SPEC.vocab_sizes)


def _decode_all(model, inputs, keys):
  """Greedy, beam 5, 7 samples (top-p) on one set of images: the 8-vs-1-device comparison."""
  memory = model.encode(inputs)
  out = {}
  for name in ("greedy", "beam:5", "sample:7:0.8:logprob:top_p=0.9"):
    pool = strategies.decode_pool(model, memory, strategies.parse_strategy(name), keys, None)
    out[name] = pool
  return out


def test_eight_devices_equal_one():
  assert jax.device_count() == 8
  model = tiny()
  graphdef, state = nnx.split(model)
  inputs = images(batch=16, seed=5)
  keys = strategies.image_keys(0, jnp.arange(16))

  def fn(state, inputs, keys):
    return _decode_all(nnx.merge(graphdef, state), inputs, keys)

  one = jax.jit(fn)(state, inputs, keys)
  mesh = sharding.create_mesh({"data": 8, "fsdp": 1})
  batch_sharded = sharding.batch_sharding(mesh)
  inputs8 = jax.device_put(inputs, batch_sharded)
  keys8 = jax.device_put(keys, batch_sharded)
  eight = jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch_sharded, batch_sharded))(
      jax.device_put(state, sharding.replicated(mesh)), inputs8, keys8)
  for name in one:
    assert len(eight[name]["tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one[name]["tokens"]), np.asarray(eight[name]["tokens"]))
    assert np.asarray(one[name]["valid"]).all() and np.asarray(eight[name]["valid"]).all()
    np.testing.assert_allclose(np.asarray(one[name]["log_prob"]), np.asarray(eight[name]["log_prob"]),
                               rtol=1e-5, atol=1e-5)


def sample(model, inputs, n, keys, **kw):
  memory = model.encode(inputs)
  return decoding.sample_sequences(model.decode_step, model.init_cache(memory, n), keys, n,
                                   SPEC.num_positions, **kw)


def test_sample_frequencies_match_model_probabilities():
  model = tiny(sharpness=1.5)
  inputs = images(batch=1, seed=7)
  n = 20000
  tokens, log_prob = jax.jit(functools.partial(sample, model, n=n, temperature=1.0))(
      inputs, keys=strategies.image_keys(123, jnp.arange(1)))
  tokens, log_prob = np.asarray(tokens[0]), np.asarray(log_prob[0])
  probs = np.exp(sequence_log_probs(model, inputs)[0].sum(-1))  # [96]
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  index = (tokens * np.asarray([16, 4, 1])).sum(-1)
  counts = np.bincount(index, minlength=96)
  # Returned log-probabilities are the model's.
  np.testing.assert_allclose(np.exp(log_prob), probs[index], rtol=1e-4)
  # Chi-square goodness of fit, pooling categories with expected count < 5.
  expected = probs * n
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
  assert p_value > 1e-3, p_value
  # A wrong distribution (temperature 2) is rejected by the same test.
  hot = np.exp(sequence_log_probs(model, inputs, temperature=2.0)[0].sum(-1)) * n
  assert stats.chisquare(counts, hot * n / hot.sum()).pvalue < 1e-6


def test_sampling_is_reproducible_and_per_image():
  model = tiny()
  inputs = images(batch=4, seed=8)
  keys = strategies.image_keys(5, jnp.arange(4))
  a, _ = sample(model, inputs, 6, keys, temperature=1.0)
  b, _ = sample(model, inputs, 6, keys, temperature=1.0)
  np.testing.assert_array_equal(a, b)
  # The same image at another batch position with the same key gets the same pool.
  perm = np.array([2, 0, 3, 1])
  c, _ = sample(model, {"image": inputs["image"][perm]}, 6, keys[perm], temperature=1.0)
  np.testing.assert_array_equal(np.asarray(a)[perm], c)
  d, _ = sample(model, inputs, 6, strategies.image_keys(6, jnp.arange(4)), temperature=1.0)
  assert not np.array_equal(a, d)


def test_temperature_zero_and_top_k_one_are_greedy():
  model = tiny()
  inputs = images(batch=3, seed=9)
  memory = model.encode(inputs)
  greedy, _ = decoding.greedy_decode(model.decode_step, model.init_cache(memory), 3, SPEC.num_positions)
  keys = strategies.image_keys(0, jnp.arange(3))
  for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 1}, {"temperature": 1.0, "top_p": 1e-6}):
    tokens, _ = sample(model, inputs, 5, keys, **kw)
    np.testing.assert_array_equal(tokens, np.repeat(np.asarray(greedy)[:, None], 5, axis=1))


@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (3, 1.0), (0, 0.6), (0, 0.9), (3, 0.8), (10, 1.0)])
def test_top_k_top_p_emit_only_allowed_tokens(top_k, top_p):
  model = tiny(sharpness=1.0)
  inputs = images(batch=2, seed=10)
  tokens, _ = sample(model, inputs, 300, strategies.image_keys(1, jnp.arange(2)), temperature=1.3,
                     top_k=top_k, top_p=top_p)
  tokens = np.asarray(tokens).reshape(-1, SPEC.num_positions)
  assert np.all(tokens < np.asarray(SPEC.vocab_sizes))  # never a masked id
  # Each token is in the filtered set of its own conditional distribution (teacher forcing).
  rep = {"image": np.repeat(inputs["image"], 300, axis=0)}
  logits = np.asarray(model(rep, jnp.asarray(tokens), deterministic=True), np.float64) / 1.3
  for p in range(SPEC.num_positions):
    v = SPEC.vocab_sizes[p]
    row = logits[:, p, :v]
    order = np.argsort(-row, axis=1, kind="stable")
    probs = np.exp(row - row.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    mass_before = np.cumsum(sorted_probs, axis=1) - sorted_probs
    allowed = np.zeros_like(row, bool)
    for r in range(row.shape[0]):
      keep = mass_before[r] < top_p - 1e-6
      keep[0] = True
      if top_k:
        keep[top_k:] = False
      allowed[r, order[r, keep]] = True
    assert allowed[np.arange(len(tokens)), tokens[:, p]].all()


def test_filter_logits_masks():
  logits = jnp.asarray([[3.0, 1.0, 2.0, models.MASKED_LOGIT], [0.0, 0.0, 0.0, 0.0]])
  out = np.asarray(decoding.filter_logits(logits, temperature=1.0, top_k=2))
  assert (out[0] > -1e8).tolist() == [True, False, True, False]
  assert (out[1] > -1e8).all()  # ties at the k-th value are kept
  out = np.asarray(decoding.filter_logits(logits, temperature=0.5, top_p=0.5))
  assert (out[0] > -1e8).tolist() == [True, False, False, False]
  np.testing.assert_allclose(out[0, 0], 6.0)
  for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
    with pytest.raises(ValueError):
      decoding.filter_logits(logits, **{"temperature": 1.0, **bad})


# ---------------------------------------------------------------------------
# The cell trie.


def training_tokens(n=400, seed=11):
  rng = np.random.default_rng(seed)
  # Clustered "training photos": few faces and first digits, so the trie prunes a lot.
  tokens = np.stack([rng.choice([1, 4], n), rng.choice([0, 3], n, p=[0.8, 0.2]), rng.integers(0, 4, n)], 1)
  return tokens.astype(np.int32)


@pytest.mark.parametrize("min_count,num_constrained", [(1, 3), (30, 3), (50, 2), (1, 1)])
def test_trie_matches_counts(min_count, num_constrained):
  tokens = training_tokens()
  trie = decoding.build_cell_trie(tokens, SPEC, min_count=min_count, num_constrained=num_constrained)
  prefixes, counts = np.unique(tokens[:, :num_constrained], axis=0, return_counts=True)
  expected = {tuple(p) for p in prefixes[counts >= min_count]}
  assert {tuple(s) for s in trie.allowed_sequences()} == expected


def test_trie_errors():
  with pytest.raises(ValueError, match="holds"):
    decoding.build_cell_trie(training_tokens(), SPEC, min_count=10_000)
  with pytest.raises(ValueError, match="min_count"):
    decoding.build_cell_trie(training_tokens(), SPEC, min_count=0)
  with pytest.raises(ValueError, match="num_constrained"):
    decoding.build_cell_trie(training_tokens(), SPEC, num_constrained=4)


@pytest.mark.parametrize("num_constrained", [3, 2])
def test_constrained_decoding_stays_in_trie(num_constrained):
  model = tiny(sharpness=1.0)
  inputs = images(batch=5, seed=12)
  trie = decoding.build_cell_trie(training_tokens(), SPEC, min_count=20, num_constrained=num_constrained)
  allowed = {tuple(s) for s in trie.allowed_sequences()}
  memory = model.encode(inputs)
  outputs = [decoding.greedy_decode(model.decode_step, model.init_cache(memory), 5, SPEC.num_positions,
                                    trie)[0][:, None]]
  beam_tokens, beam_scores, beam_valid = decoding.beam_search(
      model.decode_step, model.init_cache(memory, 3), 5, SPEC.num_positions, 3, constraint=trie,
      return_valid=True)
  assert np.asarray(beam_valid).all()
  outputs.append(beam_tokens)
  sampled, log_prob = decoding.sample_sequences(
      model.decode_step, model.init_cache(memory, 200), strategies.image_keys(0, jnp.arange(5)), 200,
      SPEC.num_positions, temperature=1.5, constraint=trie)
  outputs.append(sampled)
  assert np.isfinite(np.asarray(log_prob)).all() and np.asarray(log_prob).max() <= 0
  for tokens in outputs:
    for seq in np.asarray(tokens).reshape(-1, SPEC.num_positions):
      assert tuple(seq[:num_constrained]) in allowed
  # With enough allowed sequences every beam is live (a real, finite score).
  assert len(allowed) * (4 if num_constrained == 2 else 1) >= 3
  assert np.asarray(beam_scores).min() > -1e8
  # Unconstrained, the same model leaves the trie (so the test can fail).
  free, _ = decoding.sample_sequences(
      model.decode_step, model.init_cache(memory, 200), strategies.image_keys(0, jnp.arange(5)), 200,
      SPEC.num_positions, temperature=1.5)
  assert any(tuple(s[:num_constrained]) not in allowed
             for s in np.asarray(free).reshape(-1, SPEC.num_positions))


# ---------------------------------------------------------------------------
# Selection rules on hand-built pools.


def pool(rows):
  """rows: (tokens, log_prob, (lat, lon)) -> batched arrays with one image."""
  tokens = jnp.asarray([[r[0] for r in rows]], jnp.int32)
  log_probs = jnp.asarray([[r[1] for r in rows]], jnp.float32)
  latlng = jnp.asarray([[r[2] for r in rows]], jnp.float32)
  return tokens, log_probs, latlng


def test_select_logprob_and_ties():
  t, lp, ll = pool([((0, 0, 0), -3.0, (0, 0)), ((1, 0, 0), -1.0, (1, 1)), ((2, 0, 0), -1.0, (2, 2))])
  chosen = select("logprob", t, lp, ll)
  assert int(chosen.index[0]) == 1
  np.testing.assert_allclose(chosen.latlng[0], (1, 1))


def test_select_vote_is_hierarchical():
  # Face 1 has 3 votes against face 0's 2 (even though face 0 holds the single most
  # likely sample); inside face 1, digit 2 wins 2-1; then the likelier of the two.
  rows = [((0, 0, 0), -0.1, (10, 10)), ((0, 0, 0), -0.1, (10, 10)),
          ((1, 2, 0), -2.0, (20, 20)), ((1, 2, 3), -1.5, (21, 21)), ((1, 3, 0), -0.5, (30, 30))]
  chosen = select("vote", *pool(rows))
  assert int(chosen.index[0]) == 3
  # A tie in votes goes to the token of the most likely candidate.
  rows = [((0, 1, 0), -2.0, (0, 0)), ((2, 1, 0), -1.0, (5, 5))]
  assert int(select("vote", *pool(rows)).index[0]) == 1


def test_select_medoid():
  # Three points near (0, 0) and one far away: the middle of the cluster wins.
  rows = [((0, 0, 0), -9.0, (0.0, 0.0)), ((0, 0, 1), -1.0, (0.0, 1.0)), ((0, 0, 2), -9.0, (0.0, 2.0)),
          ((5, 0, 0), -0.5, (-60.0, 120.0))]
  chosen = select("medoid", *pool(rows))
  assert int(chosen.index[0]) == 1
  # Brute force on random pools.
  rng = np.random.default_rng(0)
  latlng = np.stack([rng.uniform(-80, 80, (3, 9)), rng.uniform(-180, 180, (3, 9))], -1)
  got = select("medoid", jnp.zeros((3, 9, 3), jnp.int32), jnp.zeros((3, 9)), jnp.asarray(latlng, jnp.float32))
  for b in range(3):
    totals = [sum(_haversine64(latlng[b, i], latlng[b, j]) for j in range(9)) for i in range(9)]
    assert int(got.index[b]) == int(np.argmin(totals))


def _haversine64(a, b):
  a, b = np.radians(a), np.radians(b)
  h = np.sin((b[0] - a[0]) / 2) ** 2 + np.cos(a[0]) * np.cos(b[0]) * np.sin((b[1] - a[1]) / 2) ** 2
  return 2 * 6371.0 * np.arcsin(np.sqrt(h))


def test_select_mean_merges_duplicates():
  # Two distinct cells on the equator at lon 0 and 90 with equal probability: the
  # mean is lon 45 even though the first was sampled three times.
  lp = math.log(0.25)
  rows = [((0, 0, 0), lp, (0.0, 0.0))] * 3 + [((1, 0, 0), lp, (0.0, 90.0))]
  chosen = select("mean", *pool(rows))
  assert int(chosen.index[0]) == -1
  np.testing.assert_allclose(chosen.latlng[0], (0.0, 45.0), atol=1e-4)
  # Probability-weighted: p = 0.75 vs 0.25 at lon 0 / 90 -> atan2(0.25, 0.75).
  rows = [((0, 0, 0), math.log(0.75), (0.0, 0.0)), ((1, 0, 0), math.log(0.25), (0.0, 90.0))]
  np.testing.assert_allclose(select("mean", *pool(rows)).latlng[0],
                             (0.0, math.degrees(math.atan2(0.25, 0.75))), atol=1e-4)
  # Near the poles and across the antimeridian, against a float64 mean of unit vectors.
  rows = [((0, 0, 0), -1.0, (80.0, 179.0)), ((0, 1, 0), -2.0, (70.0, -170.0)), ((0, 2, 0), -0.5, (85.0, 10.0))]
  w = np.exp([-1.0, -2.0, -0.5])
  pts = np.radians([[80.0, 179.0], [70.0, -170.0], [85.0, 10.0]])
  xyz = np.stack([np.cos(pts[:, 0]) * np.cos(pts[:, 1]), np.cos(pts[:, 0]) * np.sin(pts[:, 1]),
                  np.sin(pts[:, 0])], 1)
  m = (w[:, None] * xyz).sum(0)
  expected = (np.degrees(np.arcsin(m[2] / np.linalg.norm(m))), np.degrees(np.arctan2(m[1], m[0])))
  np.testing.assert_allclose(select("mean", *pool(rows)).latlng[0], expected, atol=1e-3)
  # Antipodal, equally likely: falls back to the most likely (the first).
  rows = [((0, 0, 0), -1.0, (0.0, 0.0)), ((1, 0, 0), -1.0, (0.0, 180.0))]
  assert int(select("mean", *pool(rows)).index[0]) == 0


def test_top_candidates_merge_duplicates_and_normalize():
  rows = [((0, 0, 0), math.log(0.1), (0, 0)), ((1, 0, 0), math.log(0.3), (0, 0)),
          ((0, 0, 0), math.log(0.1), (0, 0)), ((2, 0, 0), math.log(0.1), (0, 0))]
  t, lp, _ = pool(rows)
  index, prob = decoding.top_candidates(t, lp, 5)
  assert np.asarray(index[0]).tolist()[:3] == [1, 0, 3] and np.asarray(index[0]).tolist()[3:] == [-1, -1]
  np.testing.assert_allclose(prob[0], [0.6, 0.2, 0.2, 0, 0], atol=1e-6)


def test_unknown_rule():
  with pytest.raises(ValueError, match="unknown selection rule"):
    select("best", *pool([((0, 0, 0), 0.0, (0, 0))]))


# ---------------------------------------------------------------------------
# Strategy strings.


@pytest.mark.parametrize("text", ["greedy", "beam:5", "beam:3:vote:temperature=0.5", "sample:30:0.7:medoid",
                                  "sample:8:1:mean:top_k=5:top_p=0.9:trie=3:trie_level=10", "greedy:trie"])
def test_strategy_round_trip(text):
  spec = s2.TokenSpec()
  strategy = strategies.parse_strategy(text).check(spec)
  assert strategies.parse_strategy(strategy.name) == strategy


@pytest.mark.parametrize("text,match", [
    ("beam", "needs a width"), ("beam:0", ">= 1"), ("sample:30:0.7:best", "unknown selection"),
    ("nucleus:3", "unknown strategy"), ("greedy:top_k=3", "sampling only"), ("sample:x", "bad strategy"),
    ("sample:4:1:logprob:extra", "too many"), ("sample:4:1:trie:trie_level=7", "multiple of"), ("sample:4:1:trie_level=4", "needs trie"),
    ("beam:5:what=1", "unknown option")])
def test_strategy_errors(text, match):
  with pytest.raises(ValueError, match=match):
    strategies.parse_strategies(text, s2.TokenSpec())
