"""Beam search on a batch-sharded cache: the beams are reordered and ranked per image (and
sampling's top-k is a sort), so the compiled program has no cross-device collective, and
results equal one device's.

Needs the 8 fake CPU devices that tests/conftest.py asks for (XLA_FLAGS set before JAX starts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geotoken_jax import sharding
from geotoken_jax.decoding import beam, strategies
from test_decoding import images, tiny  # pylint: disable=wrong-import-order

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

COLLECTIVES = ("all-gather(", "all-to-all(", "collective-permute(", "all-reduce(", "reduce-scatter(")


def old_flat_reorder(cache, parent, batch_size, beam_size):
  """The previous reorder_rows: one gather over the flat image x beam axis."""
  rows = (parent + jnp.arange(batch_size)[:, None] * beam_size).reshape(-1)
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.shape[0] == batch_size * beam_size else x, cache)


def collectives(text):
  return [line.strip()[:160] for line in text.splitlines() if any(c in line for c in COLLECTIVES)]


def beam_pool_program(name="beam:5:vote", batch=16):
  """(jitted decode_pool over a batch-sharded memory, its sharded args, one-device result)."""
  model = tiny()
  graphdef, state = nnx.split(model)
  memory = model.encode(images(batch=batch, seed=21))
  keys = strategies.image_keys(0, jnp.arange(batch))
  strategy = strategies.parse_strategy(name)

  def fn(state, memory, keys):
    return strategies.decode_pool(nnx.merge(graphdef, state), memory, strategy, keys, None)

  mesh = sharding.create_mesh({"data": 8, "fsdp": 1})
  batch_sharded, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  args = (jax.device_put(state, replicated), jax.device_put(memory, batch_sharded),
          jax.device_put(keys, batch_sharded))
  sharded = jax.jit(fn, in_shardings=(replicated, batch_sharded, batch_sharded), out_shardings=batch_sharded)
  return sharded, args, jax.jit(fn)(state, memory, keys)


@pytest.mark.parametrize("name", ["beam:5:vote", "sample:7:0.8:top_k=3:top_p=0.9"])
def test_sharded_decoding_has_no_collective_and_equal_results(name):
  sharded, args, one = beam_pool_program(name)
  text = sharded.lower(*args).compile().as_text()
  assert "while" in text  # the decoding loop is in this program
  assert collectives(text) == []
  eight = sharded(*args)
  assert len(eight["tokens"].sharding.device_set) == 8
  for key in ("tokens", "valid"):
    np.testing.assert_array_equal(np.asarray(one[key]), np.asarray(eight[key]))
  np.testing.assert_allclose(np.asarray(one["log_prob"]), np.asarray(eight["log_prob"]), rtol=1e-5, atol=1e-5)


def test_flat_reorder_or_top_k_would_all_gather(monkeypatch):
  """The same program with the previous flat gather, or with lax.top_k, all-gathers (so the
  test above can fail); results are the same either way."""
  _, args, one = beam_pool_program()
  monkeypatch.setattr(beam, "reorder_rows", old_flat_reorder)
  sharded, _, _ = beam_pool_program()
  found = collectives(sharded.lower(*args).compile().as_text())
  assert any("all-gather(" in line for line in found), found
  np.testing.assert_array_equal(np.asarray(one["tokens"]), np.asarray(sharded(*args)["tokens"]))
  monkeypatch.undo()
  monkeypatch.setattr(beam, "top_k_per_row", jax.lax.top_k)
  sharded, _, _ = beam_pool_program()
  found = collectives(sharded.lower(*args).compile().as_text())
  assert any("all-gather(" in line for line in found), found
  np.testing.assert_array_equal(np.asarray(one["tokens"]), np.asarray(sharded(*args)["tokens"]))


def test_top_k_per_row_equals_lax_top_k():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-3, 3, (50, 40)).astype(np.float32))  # many ties
  x = x.at[:, 5].set(-1e30)
  for k in (1, 4, 40):
    expected, got = jax.lax.top_k(x, k), beam.top_k_per_row(x, k)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_reorder_rows_matches_flat_gather():
  rng = np.random.default_rng(1)
  batch, width = 3, 4
  cache = {"self": jnp.asarray(rng.normal(size=(batch * width, 2, 5))), "cross": jnp.ones((batch, 7)),
           "scalar": jnp.asarray(1.0)}
  parent = jnp.asarray(rng.integers(0, width, (batch, width)), jnp.int32)
  got = beam.reorder_rows(cache, parent, batch, width)
  expected = old_flat_reorder({k: v for k, v in cache.items() if k != "scalar"}, parent, batch, width)
  np.testing.assert_array_equal(got["self"], expected["self"])
  np.testing.assert_array_equal(got["cross"], cache["cross"])
  assert got["scalar"] is cache["scalar"]
