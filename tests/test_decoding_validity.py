"""Dead beams: validity through beam search, decode_pool's width clamp, every selection rule and
the top candidates ignoring invalid entries, and sampling never drawing a masked id.

Brute-force oracles: tiny models whose every sequence is enumerated (teacher forcing, float64,
renormalized over the ids the model and the trie allow).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geotoken_jax import decoding, models, s2
from geotoken_jax.decoding import strategies
from geotoken_jax.decoding.selection import SCORE_RULES, SELECTION_RULES, select, top_candidates

# Rules that read only the pool (the score rules need an alignment model's similarities).
POOL_RULES = tuple(r for r in SELECTION_RULES if r not in SCORE_RULES)
from geotoken_jax.s2 import jax_ops

SPEC = s2.TokenSpec(level=2, group_size=1)  # 3 positions, vocab (6, 4, 4): 96 sequences
SPEC16 = s2.TokenSpec(level=2, group_size=2)  # 2 positions, vocab (6, 16): ids 6..15 masked at position 0
IMAGE = 16
TRIE3 = [(1, 0), (1, 5), (4, 9)]  # the only cells of a 3-sequence trie on SPEC16


@functools.lru_cache(maxsize=None)
def tiny(spec: s2.TokenSpec, sharpness: float = 3.0):
  cfg = models.model_config("paper")
  cfg.update(encoder="vit", norm="pre", d_model=16, num_heads=2, ff_dim=24, decoder_layers=2)
  cfg.vit.update(image_size=IMAGE, patch_size=8, width=12, depth=1, num_heads=2, mlp_dim=20)
  model = models.build_model(cfg, spec, rngs=nnx.Rngs(1))
  kernel = model.decoder.head_kernel
  kernel.set_value(kernel.get_value() * sharpness)
  return model


@functools.lru_cache(maxsize=None)
def jitted(fn, *static_argnums):
  """fn compiled once per static arguments and input shapes: an eager call compiles each of its
  primitives again for every new shape, which costs far more than the computation here."""
  return jax.jit(fn, static_argnums=static_argnums)


def teacher_forced(model, inputs, tokens):
  """model(inputs, tokens, deterministic=True), compiled as one program."""
  graphdef, state = nnx.split(model)
  return jitted(_teacher_forced, 0)(graphdef, state, inputs, tokens)


def _teacher_forced(graphdef, state, inputs, tokens):
  return nnx.merge(graphdef, state)(inputs, tokens, deterministic=True)


def images(batch, seed=0):
  return {"image": np.random.default_rng(seed).integers(0, 256, (batch, IMAGE, IMAGE, 3)).astype(np.uint8)}


def all_sequences(spec):
  return np.asarray(list(itertools.product(*(range(v) for v in spec.vocab_sizes))), np.int32)


def trie3():
  tokens = np.asarray([t for t in TRIE3 for _ in range(5)], np.int32)
  return decoding.build_cell_trie(tokens, SPEC16, min_count=2)


def allowed_prefixes(trie, spec):
  """Every allowed prefix (tuples of every length) under the trie (None = all)."""
  if trie is None:
    return None
  full = [tuple(int(t) for t in s) for s in trie.allowed_sequences()]
  return {s[:n] for s in full for n in range(trie.num_constrained + 1)}, trie.num_constrained


def masked_per_position(model, spec, inputs, trie=None, temperature=1.0):
  """[batch, S, P] float64 log-probabilities of each sequence's token at each position under
  the masked, renormalized distribution (-inf where the token is not allowed)."""
  seqs_all = all_sequences(spec)
  batch, n, p_total = inputs["image"].shape[0], len(seqs_all), spec.num_positions
  seqs = np.tile(seqs_all, (batch, 1))
  rep = {"image": np.repeat(inputs["image"], n, axis=0)}
  logits = np.asarray(teacher_forced(model, rep, jnp.asarray(seqs)), np.float64) / temperature
  logits = logits.reshape(batch, n, p_total, -1)
  prefixes = allowed_prefixes(trie, spec)
  allowed = np.zeros(logits.shape, bool)
  for i, seq in enumerate(seqs_all):
    for p in range(p_total):
      for t in range(spec.vocab_sizes[p]):
        ok = True
        if prefixes is not None and p < prefixes[1]:
          ok = tuple(int(x) for x in seq[:p]) + (t,) in prefixes[0]
        allowed[:, i, p, t] = ok
  logits = np.where(allowed, logits, -np.inf)
  with np.errstate(invalid="ignore"):  # rows past a disallowed prefix: all -inf, never read
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return np.take_along_axis(log_probs, np.broadcast_to(seqs_all[None, :, :, None], (batch, n, p_total, 1)),
                            axis=-1)[..., 0]


def reference_beam(per_pos, spec, width):
  """Beam search by enumeration: per position, the best `width` allowed prefixes among the
  extensions of the kept ones.  Fewer allowed extensions than the width keep them all."""
  seqs = all_sequences(spec)
  out = []
  for image in per_pos:
    kept = [()]
    for p in range(spec.num_positions):
      cands = {}
      for i, seq in enumerate(seqs):
        prefix = tuple(int(x) for x in seq[:p + 1])
        if prefix[:-1] in kept and prefix not in cands and np.isfinite(image[i, p]):
          cands[prefix] = image[i, :p + 1].sum()
      kept = sorted(cands, key=lambda k: -cands[k])[:width]
    out.append([(k, cands[k]) for k in kept])
  return out


def run_beam(model, inputs, width, constraint=None, temperature=1.0):
  memory = model.encode(inputs)
  fn = jax.jit(lambda memory, trie: decoding.beam_search(
      model.decode_step, model.init_cache(memory, width), memory.shape[0], model.num_positions, width,
      temperature=temperature, constraint=trie, return_valid=True))
  return tuple(np.asarray(x) for x in fn(memory, constraint))


# ---------------------------------------------------------------------------
# Beam search.


@pytest.mark.parametrize("spec,width", [(SPEC, 8), (SPEC, 7), (SPEC16, 8), (SPEC16, 96)])
def test_beam_wider_than_first_vocab_without_trie(spec, width):
  """Width above the first position's 6 faces (dead beams after step 0), no trie: every beam
  ends valid and equals the enumeration (on SPEC16, ids 6..15 are masked by the model)."""
  model, inputs = tiny(spec), images(3, seed=2)
  tokens, scores, valid = run_beam(model, inputs, width)
  assert valid.all()
  assert (tokens < np.asarray(spec.vocab_sizes)).all() and (tokens[..., 0] < 6).all()
  expected = reference_beam(masked_per_position(model, spec, inputs), spec, width)
  for b in range(3):
    np.testing.assert_array_equal(tokens[b], [k for k, _ in expected[b]])
    np.testing.assert_allclose(scores[b], [s for _, s in expected[b]], atol=1e-4)
  # The plain call keeps its (tokens, scores) return.
  plain = jax.jit(lambda inputs: decoding.beam_search(
      model.decode_step, model.init_cache(model.encode(inputs), width), 3, spec.num_positions, width))(inputs)
  assert len(plain) == 2
  np.testing.assert_array_equal(plain[0], tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_beam_with_few_allowed_sequences_marks_dead_beams(temperature):
  """A trie allowing 3 sequences, width 8 (no clamp here): exactly the 3 sequences are valid,
  first, with the enumeration's scores; the 5 others are invalid with DEAD_SCORE."""
  model, inputs, trie = tiny(SPEC16), images(4, seed=3), trie3()
  assert trie.num_sequences == 3
  tokens, scores, valid = run_beam(model, inputs, 8, trie, temperature)
  expected = reference_beam(masked_per_position(model, SPEC16, inputs, trie, temperature), SPEC16, 8)
  for b in range(4):
    assert valid[b].tolist() == [True] * 3 + [False] * 5
    assert [tuple(t) for t in tokens[b, :3]] == [k for k, _ in expected[b]]
    assert {tuple(t) for t in tokens[b, :3]} == set(TRIE3)
    np.testing.assert_allclose(scores[b, :3], [s for _, s in expected[b]], atol=1e-4)
    assert (scores[b, 3:] == decoding.DEAD_SCORE).all()
    # The invalid beams really are outside the trie: that is why they must be masked.
    assert not {tuple(t) for t in tokens[b, 3:]} & set(TRIE3)


def test_beam_trie_prunes_like_enumeration():
  """A trie constraining only the face (2 faces x 16 = 32 sequences): widths 5 and 40."""
  model, inputs = tiny(SPEC16), images(3, seed=4)
  tokens = np.asarray([(1, 3), (1, 7), (4, 0), (4, 2)] * 3, np.int32)
  trie = decoding.build_cell_trie(tokens, SPEC16, num_constrained=1)
  assert trie.num_sequences == 32
  per_pos = masked_per_position(model, SPEC16, inputs, trie)
  for width in (5, 40):
    got_tokens, got_scores, valid = run_beam(model, inputs, width, trie)
    expected = reference_beam(per_pos, SPEC16, width)
    for b in range(3):
      n = len(expected[b])
      assert n == min(width, 32) and valid[b].tolist() == [True] * n + [False] * (width - n)
      np.testing.assert_array_equal(got_tokens[b, :n], [k for k, _ in expected[b]])
      np.testing.assert_allclose(got_scores[b, :n], [s for _, s in expected[b]], atol=1e-4)


# ---------------------------------------------------------------------------
# decode_pool: the clamp, and every rule on the clamped pool.


def decode(model, inputs, text, trie):
  memory = model.encode(inputs)
  keys = strategies.image_keys(0, jnp.arange(memory.shape[0]))
  strategy = strategies.parse_strategy(text).check(model.spec)
  fn = jax.jit(lambda memory, keys, trie: strategies.decode_pool(model, memory, strategy, keys, trie))
  return strategy, {k: np.asarray(v) for k, v in fn(memory, keys, trie).items()}


def test_decode_pool_clamps_beam_width_to_the_trie():
  model, inputs, trie = tiny(SPEC16), images(4, seed=5), trie3()
  with pytest.warns(UserWarning, match=r"beam:8:trie=2.*width 8.*3 sequences"):
    _, pool = decode(model, inputs, "beam:8:trie=2", trie)
  assert set(pool) == {"tokens", "log_prob", "latlng", "valid"}
  assert pool["tokens"].shape == (4, 3, 2) and pool["valid"].shape == (4, 3) and pool["valid"].all()
  expected = reference_beam(masked_per_position(model, SPEC16, inputs, trie), SPEC16, 3)
  centres = {t: np.asarray(jax_ops.tokens_to_latlng(jnp.asarray([t]), SPEC16))[0] for t in TRIE3}
  for b in range(4):
    assert [tuple(t) for t in pool["tokens"][b]] == [k for k, _ in expected[b]]
    np.testing.assert_allclose(pool["log_prob"][b], [s for _, s in expected[b]], atol=1e-4)
    assert (pool["tokens"][b, :, 0] < 6).all()
  for rule in POOL_RULES:
    chosen = {k: np.asarray(v) for k, v in jitted(strategies.choose, 1, 2)(pool, rule, 5).items()}
    for b in range(4):
      cells = {tuple(t) for t in pool["tokens"][b]}
      assert cells == set(TRIE3)
      if rule == "mean":
        assert chosen["chosen"][b] == -1
      else:
        assert 0 <= chosen["chosen"][b] < 3
        np.testing.assert_allclose(chosen["predicted"][b], centres[tuple(pool["tokens"][b, chosen["chosen"][b]])],
                                   atol=1e-4)
      assert sorted(chosen["candidates"][b][:3].tolist()) == [0, 1, 2]
      assert chosen["candidates"][b][3:].tolist() == [-1, -1]
      np.testing.assert_allclose(chosen["candidate_prob"][b].sum(), 1.0, rtol=1e-5)
  # No warning when the width fits, and none without a trie below the vocabulary's size.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    decode(model, inputs, "beam:3:trie=2", trie)
    decode(model, inputs, "beam:8", None)


def test_decode_pool_beam_8_without_trie_on_six_faces():
  model, inputs = tiny(SPEC16), images(3, seed=6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, pool = decode(model, inputs, "beam:8", None)
  assert pool["valid"].all() and pool["tokens"].shape == (3, 8, 2)
  assert (pool["tokens"][..., 0] < 6).all()
  expected = reference_beam(masked_per_position(model, SPEC16, inputs), SPEC16, 8)
  for b in range(3):
    assert [tuple(t) for t in pool["tokens"][b]] == [k for k, _ in expected[b]]


@pytest.mark.parametrize("text", ["greedy:trie=2", "sample:40:1.5:trie=2", "sample:40:1e-9:trie=2",
                                  "sample:40:30:trie=2:top_k=2", "sample:40:3:trie=2:top_p=0.5"])
def test_greedy_and_sample_pools_are_valid_and_in_the_trie(text):
  model, inputs, trie = tiny(SPEC16, 1.0), images(3, seed=7), trie3()
  _, pool = decode(model, inputs, text, trie)
  assert pool["valid"].all() and pool["valid"].shape == pool["log_prob"].shape
  assert {tuple(t) for t in pool["tokens"].reshape(-1, 2)} <= set(TRIE3)
  assert np.isfinite(pool["log_prob"]).all() and pool["log_prob"].max() <= 1e-6


# ---------------------------------------------------------------------------
# Sampling never draws a masked id.


def test_sampler_never_draws_a_masked_id_at_any_temperature():
  masked = decoding.MASKED_LOGIT
  logits = jnp.asarray([[-10.0, -20.0, masked, masked, -15.0]] * 2000, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(jax.random.categorical))
  for temperature, allowed in ((1e-12, {0}), (1e-3, {0}), (1.0, {0, 1, 4}), (1e6, {0, 1, 4})):
    drawn = np.asarray(draw(keys, decoding.filtered_sampling_logits(logits, temperature=temperature)))
    assert set(drawn.tolist()) <= allowed, temperature
  # Why it matters: with MASKED_LOGIT for the removed ids, a tiny temperature scales the real
  # logits below them and the draw lands on a masked id.
  old = np.asarray(draw(keys, decoding.filter_logits(logits, temperature=1e-12)))
  assert set(old.tolist()) <= {2, 3}
  # Filters with the -inf form keep the same ids as filter_logits.
  rng = np.random.default_rng(0)
  logits = jnp.asarray(np.where(rng.random((50, 9)) < 0.3, masked, rng.normal(size=(50, 9)) * 3), jnp.float32)
  logits = logits.at[:, 0].set(1.0)
  for kw in ({"top_k": 3}, {"top_p": 0.7}, {"top_k": 2, "top_p": 0.9}, {}):
    a = np.asarray(decoding.filter_logits(logits, temperature=0.7, **kw)) > -1e8
    b = np.isfinite(np.asarray(decoding.filtered_sampling_logits(logits, temperature=0.7, **kw)))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Selection rules and candidates with invalid entries, against compressed pools.


def random_pools(seed, batch=40, n=9):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 3, (batch, n, 3)).astype(np.int32)  # small alphabet: duplicates
  log_probs = rng.normal(-3, 1.5, (batch, n)).astype(np.float32)
  latlng = np.stack([rng.uniform(-80, 80, (batch, n)), rng.uniform(-180, 180, (batch, n))], -1).astype(np.float32)
  valid = rng.random((batch, n)) < 0.5
  valid[np.arange(batch), rng.integers(0, n, batch)] = True  # at least one valid per image
  # Invalid entries look like what a dead beam leaves behind, and would win if counted:
  # the highest scores, garbage or NaN coordinates, many copies of one sequence (votes).
  log_probs = np.where(valid, log_probs, 0.0).astype(np.float32)
  tokens = np.where(valid[..., None], tokens, np.asarray([7, 7, 7], np.int32))
  garbage = np.where(rng.random((batch, n, 1)) < 0.5, np.nan, 1e6).astype(np.float32)
  latlng = np.where(valid[..., None], latlng, garbage)
  return tokens, log_probs, latlng, valid


@pytest.mark.parametrize("rule", SELECTION_RULES)
def test_rules_ignore_invalid_entries(rule):
  tokens, log_probs, latlng, valid = random_pools(seed=SELECTION_RULES.index(rule))
  # The score rules rank by a per-candidate score (an alignment model's): random here, and
  # highest on invalid entries so that ignoring validity would show.
  scores = np.random.default_rng(7).normal(size=log_probs.shape).astype(np.float32) + np.where(valid, 0, 10)
  scores = jnp.asarray(scores) if rule in SCORE_RULES else None
  got = select(rule, jnp.asarray(tokens), jnp.asarray(log_probs), jnp.asarray(latlng), jnp.asarray(valid), scores)
  index, point = np.asarray(got.index), np.asarray(got.latlng)
  assert np.isfinite(point).all()
  for b in range(tokens.shape[0]):
    keep = np.flatnonzero(valid[b])
    # The reference pools come in many sizes: compiled once per size rather than op by op.
    ref = jitted(select, 0)(rule, jnp.asarray(tokens[b:b + 1, keep]), jnp.asarray(log_probs[b:b + 1, keep]),
                            jnp.asarray(latlng[b:b + 1, keep]), None, None if scores is None else scores[b:b + 1, keep])
    ref_index = int(ref.index[0])
    assert index[b] == (keep[ref_index] if ref_index >= 0 else -1)
    np.testing.assert_allclose(point[b], np.asarray(ref.latlng[0]), atol=1e-3)
  # Unmasked, the same pools go wrong (so masking is what the test checks).
  bad = select(rule, jnp.asarray(tokens), jnp.asarray(log_probs), jnp.asarray(latlng), None, scores)
  bad_index, bad_point = np.asarray(bad.index), np.asarray(bad.latlng)
  picked_invalid = (bad_index >= 0) & ~valid[np.arange(len(bad_index)), np.maximum(bad_index, 0)]
  assert picked_invalid.any() or not np.isfinite(bad_point).all()


def test_top_candidates_ignore_invalid_entries():
  tokens, log_probs, latlng, valid = random_pools(seed=3)
  index, prob = (np.asarray(x) for x in top_candidates(jnp.asarray(tokens), jnp.asarray(log_probs), 6,
                                                        jnp.asarray(valid)))
  top_jit = jitted(top_candidates, 2)  # the reference pools come in many sizes: one program per size
  for b in range(tokens.shape[0]):
    keep = np.flatnonzero(valid[b])
    ref_index, ref_prob = (np.asarray(x[0]) for x in top_jit(
        jnp.asarray(tokens[b:b + 1, keep]), jnp.asarray(log_probs[b:b + 1, keep]), 6))
    np.testing.assert_array_equal(index[b], np.where(ref_index >= 0, keep[np.maximum(ref_index, 0)], -1))
    np.testing.assert_allclose(prob[b], ref_prob, atol=1e-6)
    listed = index[b][index[b] >= 0]
    assert valid[b, listed].all()
    # Distinct valid sequences, float64 brute force.
    seen = {}
    for i in keep:
      seen.setdefault(tuple(tokens[b, i]), log_probs[b, i])
    p = np.exp(np.asarray(list(seen.values()), np.float64))
    np.testing.assert_allclose(np.sort(prob[b][prob[b] > 0])[::-1], np.sort(p / p.sum())[::-1][:6], rtol=1e-5)


def test_choose_uses_the_pool_validity():
  tokens, log_probs, latlng, valid = random_pools(seed=4, batch=6)
  pool = {"tokens": jnp.asarray(tokens), "log_prob": jnp.asarray(log_probs), "latlng": jnp.asarray(latlng),
          "valid": jnp.asarray(valid)}
  for rule in POOL_RULES:
    out = strategies.choose(pool, rule, 4)
    expected = select(rule, pool["tokens"], pool["log_prob"], pool["latlng"], pool["valid"])
    np.testing.assert_array_equal(out["chosen"], expected.index)
    index, _ = top_candidates(pool["tokens"], pool["log_prob"], 4, pool["valid"])
    np.testing.assert_array_equal(out["candidates"], index)
