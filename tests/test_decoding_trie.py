"""The cell trie as a jit argument (the compiled program does not grow with it), its static
num_sequences, and its on-disk cache."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from geotoken_jax import decoding, s2
from geotoken_jax.decoding import constraints, strategies

SPEC = s2.TokenSpec(level=2, group_size=1)  # 3 positions, vocab (6, 4, 4)
BIG_SPEC = s2.TokenSpec(level=6, group_size=2)  # 4 positions, vocab (6, 16, 16, 16)


def random_tokens(spec, n, seed=0):
  rng = np.random.default_rng(seed)
  return s2.latlng_to_tokens(rng.uniform(-90, 90, n), rng.uniform(-180, 180, n), spec)


# ---------------------------------------------------------------------------
# num_sequences.


@pytest.mark.parametrize("min_count,num_constrained", [(1, 3), (3, 3), (2, 2), (1, 1), (5, 1)])
def test_num_sequences_counts_allowed_full_sequences(min_count, num_constrained):
  rng = np.random.default_rng(1)
  tokens = np.stack([rng.choice([0, 2, 5], 200), rng.integers(0, 4, 200), rng.integers(0, 2, 200)], 1)
  trie = decoding.build_cell_trie(tokens.astype(np.int32), SPEC, min_count=min_count,
                                  num_constrained=num_constrained)
  prefixes = {tuple(s) for s in trie.allowed_sequences()}
  everything = itertools.product(*(range(v) for v in SPEC.vocab_sizes))
  assert trie.num_sequences == sum(1 for s in everything if s[:num_constrained] in prefixes)
  assert isinstance(trie.num_sequences, int)


def test_num_sequences_is_exact_for_deep_specs():
  spec = s2.TokenSpec(level=30, group_size=1)  # 31 positions
  tokens = random_tokens(spec, 50)
  trie = decoding.build_cell_trie(tokens, spec, num_constrained=1)
  faces = len(np.unique(tokens[:, 0]))
  assert trie.num_sequences == faces * 4**30
  assert decoding.build_cell_trie(tokens, spec).num_sequences == len(np.unique(tokens, axis=0))


def test_trie_static_fields_are_not_leaves():
  trie = decoding.build_cell_trie(random_tokens(SPEC, 100), SPEC)
  leaves, treedef = jax.tree.flatten(trie)
  assert len(leaves) == 1 and leaves[0] is trie.children
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.num_sequences == trie.num_sequences and rebuilt.num_constrained == trie.num_constrained

  @jax.jit
  def inside(trie):  # static fields are Python ints under tracing; children is abstract
    assert isinstance(trie.num_sequences, int) and isinstance(trie.children, jax.core.Tracer)
    return trie.children.sum() + trie.num_nodes

  inside(trie)


# ---------------------------------------------------------------------------
# The trie is an argument: the compiled program does not grow with it.


def toy_decoder(spec):
  """A model-agnostic tokens_to_logits (fixed random bigram table + a per-row cache)."""
  p, v = spec.num_positions, spec.max_vocab_size
  table = jnp.asarray(np.random.default_rng(0).normal(size=(p, v, v)), jnp.float32)
  vocab = jnp.asarray(spec.vocab_sizes)

  def tokens_to_logits(prev, position, cache):
    logits = table[position][prev] + cache["h"]
    logits = jnp.where(jnp.arange(v) < vocab[position], logits, decoding.MASKED_LOGIT)
    return logits, {"h": cache["h"] * 0.5 + logits.clip(-5, 5)}

  return tokens_to_logits


def beam_fn(spec, batch, width):
  t2l = toy_decoder(spec)
  return lambda trie, cache: decoding.beam_search(t2l, cache, batch, spec.num_positions, width,
                                                  constraint=trie, return_valid=True)


def sample_fn(spec, batch, num):
  t2l = toy_decoder(spec)
  return lambda trie, cache, keys: decoding.sample_sequences(t2l, cache, keys, num, spec.num_positions,
                                                             temperature=1.0, top_p=0.9, constraint=trie)


def test_trie_argument_does_not_grow_the_program():
  big = decoding.build_cell_trie(random_tokens(BIG_SPEC, 50_000), BIG_SPEC)
  small = decoding.build_cell_trie(random_tokens(BIG_SPEC, 1), BIG_SPEC)
  assert big.children.size >= 100 * small.children.size
  batch, width = 4, 5
  cache = {"h": jnp.zeros((batch * width, BIG_SPEC.max_vocab_size))}
  keys = strategies.image_keys(0, jnp.arange(batch))
  cases = {"beam": (beam_fn(BIG_SPEC, batch, width), (cache,)),
           "sample": (sample_fn(BIG_SPEC, batch, width), (cache, keys))}
  for name, (fn, args) in cases.items():
    sizes = {}
    for label, trie in (("big", big), ("small", small)):
      lowered = jax.jit(fn).lower(trie, *args)
      closure = jax.jit(lambda *a, trie=trie: fn(trie, *a)).lower(*args)  # the old style
      sizes[label] = (len(lowered.as_text()), len(lowered.compile().as_text()), len(closure.as_text()))
      # And it runs: every decoded (valid) sequence is in the trie.
      out = jax.jit(fn)(trie, *args)
      tokens = np.asarray(out[0]).reshape(-1, BIG_SPEC.num_positions)
      valid = np.asarray(out[2]).reshape(-1) if name == "beam" else np.ones(len(tokens), bool)
      assert valid.sum() == min(len(valid), trie.num_sequences * batch) or name != "beam"
      allowed = {tuple(s) for s in trie.allowed_sequences()}
      assert all(tuple(s) in allowed for s in tokens[valid].tolist())
    (lowered_big, compiled_big, closure_big), (lowered_small, compiled_small, closure_small) = (
        sizes["big"], sizes["small"])
    assert abs(lowered_big - lowered_small) < 2048, (name, sizes)
    assert abs(compiled_big - compiled_small) < 2048, (name, sizes)
    # Closed over, the trie is a constant of the program: it grows by the table's size.
    assert closure_big - closure_small > 50 * 1024, (name, sizes)


def test_beam_with_trie_argument_keeps_valid_beams_in_the_trie():
  trie = decoding.build_cell_trie(random_tokens(BIG_SPEC, 300, seed=2), BIG_SPEC, min_count=1)
  allowed = {tuple(s) for s in trie.allowed_sequences()}
  batch, width = 3, 7
  cache = {"h": jnp.zeros((batch * width, BIG_SPEC.max_vocab_size))}
  tokens, scores, valid = (np.asarray(x) for x in jax.jit(beam_fn(BIG_SPEC, batch, width))(trie, cache))
  assert valid.all() and (scores > -1e8).all()
  assert all(tuple(s) in allowed for s in tokens.reshape(-1, BIG_SPEC.num_positions).tolist())


# ---------------------------------------------------------------------------
# The on-disk cache.


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a.children), np.asarray(b.children))
  assert (a.num_constrained, a.num_sequences) == (b.num_constrained, b.num_sequences)


def test_cached_trie_builds_once_then_loads(tmp_path, monkeypatch):
  tokens = random_tokens(SPEC, 500)
  cache_dir = str(tmp_path / "tries")  # a path string, as from epath
  first = decoding.cached_cell_trie(tokens, SPEC, min_count=2, num_constrained=2, cache_dir=cache_dir)
  _same(first, decoding.build_cell_trie(tokens, SPEC, min_count=2, num_constrained=2))
  files = sorted(os.listdir(cache_dir))
  assert len(files) == 1 and files[0].endswith(".npz")
  with np.load(os.path.join(cache_dir, files[0]), allow_pickle=False) as stored:  # no pickle inside
    assert {"children", "num_constrained", "num_sequences"} <= set(stored.files)

  def no_build(*args, **kwargs):
    raise AssertionError("build_cell_trie called although the trie is cached")

  monkeypatch.setattr(constraints, "build_cell_trie", no_build)
  again = decoding.cached_cell_trie(tokens.copy(), SPEC, min_count=2, num_constrained=2,
                                    cache_dir=epath.Path(cache_dir))
  _same(first, again)
  # Any change of the key builds: other options, tokens, dtype, spec.
  for kwargs in ({"min_count": 3, "num_constrained": 2}, {"min_count": 2, "num_constrained": 3}):
    with pytest.raises(AssertionError, match="although"):
      decoding.cached_cell_trie(tokens, SPEC, cache_dir=cache_dir, **kwargs)
  other = tokens.copy()
  other[0, 2] = (other[0, 2] + 1) % 4
  for changed in (other, tokens.astype(np.int64)):
    with pytest.raises(AssertionError, match="although"):
      decoding.cached_cell_trie(changed, SPEC, min_count=2, num_constrained=2, cache_dir=cache_dir)
  keys = {decoding.trie_cache_key(tokens, SPEC, min_count=2, num_constrained=2),
          decoding.trie_cache_key(tokens.astype(np.int64), SPEC, min_count=2, num_constrained=2),
          decoding.trie_cache_key(tokens, SPEC, min_count=2, num_constrained=None),
          decoding.trie_cache_key(tokens[:, :2], s2.TokenSpec(level=1, group_size=1), min_count=2,
                                  num_constrained=2)}
  assert len(keys) == 4
  # num_constrained=None and the explicit default are the same trie.
  assert (decoding.trie_cache_key(tokens, SPEC, min_count=1, num_constrained=None)
          == decoding.trie_cache_key(tokens, SPEC, min_count=1, num_constrained=3))
  assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]  # temporaries renamed away


def test_cached_trie_round_trips_huge_counts_and_rebuilds_bad_files(tmp_path):
  spec = s2.TokenSpec(level=30, group_size=1)
  tokens = random_tokens(spec, 20)
  trie = decoding.cached_cell_trie(tokens, spec, min_count=1, num_constrained=1, cache_dir=tmp_path)
  assert trie.num_sequences == len(np.unique(tokens[:, 0])) * 4**30
  (path,) = tmp_path.iterdir()
  _same(trie, decoding.load_cell_trie(path))
  path.write_bytes(b"not a zip file")
  rebuilt = decoding.cached_cell_trie(tokens, spec, min_count=1, num_constrained=1, cache_dir=tmp_path)
  _same(trie, rebuilt)
  _same(trie, decoding.load_cell_trie(path))  # rewritten


def test_cached_trie_without_cache_dir_builds(tmp_path):
  tokens = random_tokens(SPEC, 50)
  _same(decoding.cached_cell_trie(tokens, SPEC, min_count=1, num_constrained=3, cache_dir=None),
        decoding.build_cell_trie(tokens, SPEC))
  with pytest.raises(ValueError, match="min_count"):
    decoding.cached_cell_trie(tokens, SPEC, min_count=0, num_constrained=3, cache_dir=tmp_path)
  assert not list(tmp_path.iterdir())


def test_save_is_atomic(tmp_path, monkeypatch):
  """A write that fails midway leaves neither a partial trie file nor a temporary."""
  trie = decoding.build_cell_trie(random_tokens(SPEC, 50), SPEC)
  target = tmp_path / "trie-x.npz"

  def failing_replace(self, dst):
    raise OSError("disk gone")

  monkeypatch.setattr(type(epath.Path(tmp_path)), "replace", failing_replace)
  with pytest.raises(OSError):
    decoding.save_cell_trie(trie, target)
  assert not list(tmp_path.iterdir())
