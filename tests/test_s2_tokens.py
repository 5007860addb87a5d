"""Token sequences: spec checks, s2geometry child positions, round trips, JAX centres."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import s2geometry

from geotoken_jax import s2
from geotoken_jax.s2 import jax_ops
from tests.conftest import haversine_m

ALL_SPECS = [s2.TokenSpec(level, g) for level in range(0, 31) for g in range(1, 31)
             if level % g == 0 and (level or g == 1)]


def test_paper_spec():
  spec = s2.TokenSpec(level=20, group_size=2)
  assert spec.num_positions == 11
  assert spec.vocab_sizes == (6,) + (16,) * 10
  assert spec.token_dtype == np.uint8
  assert [spec.level_of_prefix(p) for p in (1, 2, 11)] == [0, 2, 20]
  assert s2.TokenSpec(30, 5).token_dtype == np.uint16
  assert spec.array_dtype == np.int32 and s2.TokenSpec(30, 15).array_dtype == np.int32
  assert s2.TokenSpec(16, 16).array_dtype == np.int64


@pytest.mark.parametrize("level,group,error", [
    (20, 3, "divisible"), (31, 1, r"\[0, 30\]"), (-2, 1, r"\[0, 30\]"), (20, 0, ">= 1"),
])
def test_spec_rejects_bad_values(level, group, error):
  with pytest.raises(ValueError, match=error):
    s2.TokenSpec(level, group)


def test_spec_rejects_non_integers():
  with pytest.raises(TypeError):
    s2.TokenSpec(20.0, 2)
  with pytest.raises(TypeError):
    s2.TokenSpec(20, True)


def _oracle_tokens(leaf_ids: np.ndarray, spec: s2.TokenSpec) -> np.ndarray:
  """Tokens built from s2geometry's face() and child_position(k), one id at a time."""
  rows = []
  for i in leaf_ids.tolist():
    cell = s2geometry.S2CellId(i)
    digits = [cell.child_position(k) for k in range(1, spec.level + 1)]
    groups = [digits[m:m + spec.group_size] for m in range(0, spec.level, spec.group_size)]
    rows.append([cell.face()] + [int("".join(map(str, group)), 4) for group in groups])
  return np.array(rows)


@pytest.mark.parametrize("spec", [s2.TokenSpec(20, 2), s2.TokenSpec(20, 1), s2.TokenSpec(30, 3),
                                  s2.TokenSpec(30, 30),
                                  s2.TokenSpec(12, 4), s2.TokenSpec(0, 1)], ids=str)
def test_tokens_are_s2geometry_child_positions(sphere_points_1m, spec):
  lat, lng = (a[:3000] for a in sphere_points_1m)
  tokens = s2.latlng_to_tokens(lat, lng, spec)
  assert tokens.shape == (3000, spec.num_positions) and tokens.dtype == spec.array_dtype
  leaf = s2.latlng_to_cell_ids(lat, lng)
  np.testing.assert_array_equal(tokens, _oracle_tokens(leaf, spec))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_round_trips_for_every_group_size(sphere_points_1m, spec):
  lat, lng = (a[:20_000] for a in sphere_points_1m)
  ids = s2.latlng_to_cell_ids(lat, lng, spec.level)
  tokens = s2.cell_ids_to_tokens(ids, spec)
  np.testing.assert_array_equal(s2.tokens_to_cell_ids(tokens, spec), ids)
  # Finer ids give the same tokens as their parents.
  np.testing.assert_array_equal(s2.cell_ids_to_tokens(s2.latlng_to_cell_ids(lat, lng), spec), tokens)
  # Every token sequence (uniform over the vocab) is a valid cell and comes back unchanged.
  rng = np.random.default_rng(spec.level * 31 + spec.group_size)
  random_tokens = rng.integers(0, spec.vocab_sizes, size=(5000, spec.num_positions))
  random_ids = s2.tokens_to_cell_ids(random_tokens, spec)
  assert s2.cell_ids_are_valid(random_ids).all()
  assert (s2.cell_ids_level(random_ids) == spec.level).all()
  np.testing.assert_array_equal(s2.cell_ids_to_tokens(random_ids, spec), random_tokens)


def test_prefixes_name_the_enclosing_cells(sphere_points_1m):
  spec = s2.TokenSpec(20, 2)
  lat, lng = (a[:5000] for a in sphere_points_1m)
  leaf = s2.latlng_to_cell_ids(lat, lng)
  tokens = s2.latlng_to_tokens(lat, lng, spec)
  for p in range(1, spec.num_positions + 1):
    np.testing.assert_array_equal(s2.tokens_to_cell_ids(tokens[:, :p], spec),
                                  s2.cell_ids_parent(leaf, spec.level_of_prefix(p)))


def test_bad_tokens_raise():
  spec = s2.TokenSpec(20, 2)
  good = np.zeros((4, 11), np.int64)
  for position, value in ((0, 6), (3, 16), (5, -1)):
    bad = good.copy()
    bad[2, position] = value
    with pytest.raises(ValueError, match=r"outside the per-position vocab .* rows \[2\]"):
      s2.tokens_to_cell_ids(bad, spec)
  with pytest.raises(ValueError, match="1..11 positions"):
    s2.tokens_to_cell_ids(np.zeros((4, 12), np.int64), spec)
  with pytest.raises(ValueError, match="integers"):
    s2.tokens_to_cell_ids(good.astype(np.float32), spec)


def test_numpy_centres_and_vertices_of_tokens(sphere_points_1m):
  spec = s2.TokenSpec(20, 2)
  lat, lng = (a[:500] for a in sphere_points_1m)
  tokens = s2.latlng_to_tokens(lat, lng, spec)
  centres = s2.tokens_to_latlng(tokens, spec)
  expected = np.array([(ll.lat().degrees(), ll.lng().degrees()) for ll in (
      s2geometry.S2CellId(s2geometry.S2LatLng.FromDegrees(a, b)).parent(20).ToLatLng()
      for a, b in zip(lat.tolist(), lng.tolist()))])
  assert np.abs(centres - expected).max() <= 1e-9
  # A level-20 centre is within 7.2 m of every point of its cell.
  assert haversine_m(centres, np.stack([lat, lng], -1)).max() < 7.2
  vertices = s2.tokens_to_vertices(tokens, spec)
  np.testing.assert_array_equal(vertices, s2.cell_vertices(s2.tokens_to_cell_ids(tokens, spec)))


@pytest.fixture(scope="module")
def paper_tokens(sphere_points_1m):
  spec = s2.TokenSpec(20, 2)
  lat, lng = (a[:300_000] for a in sphere_points_1m)
  return spec, s2.latlng_to_tokens(lat, lng, spec)


def test_jax_centres_within_2m_at_level_20(paper_tokens):
  spec, tokens = paper_tokens
  ours = np.asarray(jax_ops.tokens_to_latlng(jnp.asarray(tokens), spec))
  assert ours.dtype == np.float32 and ours.shape == (tokens.shape[0], 2)
  error_m = haversine_m(ours.astype(np.float64), s2.tokens_to_latlng(tokens, spec))
  assert error_m.max() < 2.0, error_m.max()


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 7])
def test_jax_centres_of_prefixes(paper_tokens, num_tokens):
  spec, tokens = paper_tokens
  prefix = tokens[:50_000, :num_tokens]
  ours = np.asarray(jax_ops.tokens_to_latlng(jnp.asarray(prefix), spec)).astype(np.float64)
  assert haversine_m(ours, s2.tokens_to_latlng(prefix, spec)).max() < 2.0


def test_jax_centres_inside_jit_with_batch_and_beam_axes(paper_tokens):
  spec, tokens = paper_tokens
  beams = jnp.asarray(tokens[:24].reshape(4, 6, spec.num_positions))  # [batch, beam, positions]

  @jax.jit
  def mean_latitude(t):
    return jax_ops.tokens_to_latlng(t, spec)[..., 0].mean(axis=-1)  # [batch]

  expected = s2.tokens_to_latlng(tokens[:24], spec)[:, 0].reshape(4, 6).mean(-1)
  np.testing.assert_allclose(np.asarray(mean_latitude(beams)), expected, atol=1e-4)


def test_jax_centres_every_group_size(sphere_points_1m):
  lat, lng = (a[:20_000] for a in sphere_points_1m)
  for spec in (s2.TokenSpec(20, 1), s2.TokenSpec(20, 4), s2.TokenSpec(18, 3), s2.TokenSpec(0, 1)):
    tokens = s2.latlng_to_tokens(lat, lng, spec)
    ours = np.asarray(jax_ops.tokens_to_latlng(jnp.asarray(tokens), spec)).astype(np.float64)
    assert haversine_m(ours, s2.tokens_to_latlng(tokens, spec)).max() < 2.0, spec


def test_jax_refuses_tokens_wider_than_int32():
  with pytest.raises(ValueError, match="int32"):
    jax_ops.tokens_to_latlng(jnp.zeros((2, 2), jnp.int32), s2.TokenSpec(16, 16))
