"""The NumPy S2 codec against the official s2geometry bindings (and s2sphere)."""

import numpy as np
import pytest
import s2geometry

from geotoken_jax import s2
from geotoken_jax.bench.s2_bench import s2geometry_cell_ids, s2sphere_cell_ids
from tests.conftest import angle_diff_deg


@pytest.fixture(scope="module")
def leaf_oracle(sphere_points_1m):
  """s2geometry's leaf cells of the 1 M uniform points."""
  lat, lng = sphere_points_1m
  return s2geometry_cell_ids(lat, lng, 30)


@pytest.mark.parametrize("level", [10, 20, 30])
def test_one_million_uniform_points_match_s2geometry(sphere_points_1m, leaf_oracle, level):
  lat, lng = sphere_points_1m
  expected = leaf_oracle if level == 30 else np.array(
      [s2geometry.S2CellId(int(i)).parent(level).id() for i in leaf_oracle.tolist()], np.uint64)
  ours = s2.latlng_to_cell_ids(lat, lng, level)
  assert ours.dtype == np.uint64 and ours.shape == lat.shape
  mismatches = np.flatnonzero(ours != expected)
  assert mismatches.size == 0, f"{mismatches.size} mismatches, first at rows {mismatches[:5]}"


@pytest.mark.parametrize("level", [10, 20, 30])
def test_uniform_points_match_s2sphere(sphere_points_1m, level):
  lat, lng = (a[:100_000] for a in sphere_points_1m)
  np.testing.assert_array_equal(s2.latlng_to_cell_ids(lat, lng, level), s2sphere_cell_ids(lat, lng, level))


def test_all_levels_and_thread_counts_agree_with_parent(sphere_points_1m):
  lat, lng = (a[:50_000] for a in sphere_points_1m)
  leaf = s2.latlng_to_cell_ids(lat, lng, 30, num_threads=1)
  for level in range(31):
    ids = s2.latlng_to_cell_ids(lat, lng, level, num_threads=3)
    np.testing.assert_array_equal(ids, s2.cell_ids_parent(leaf, level))
    assert (s2.cell_ids_level(ids) == level).all()


def _with_ulp_neighbours(lat, lng, steps=3):
  """Each point and its neighbours 1..steps float64 ULPs away in lat and in lon."""
  lat, lng = np.asarray(lat, np.float64), np.asarray(lng, np.float64)
  out_lat, out_lng = [lat], [lng]
  for direction in (np.inf, -np.inf):
    a, b = lat, lng
    for _ in range(steps):
      a, b = np.nextafter(a, direction), np.nextafter(b, direction)
      out_lat += [a, lat]
      out_lng += [lng, b]
  lat, lng = np.concatenate(out_lat), np.concatenate(out_lng)
  keep = np.abs(lat) <= 90
  return lat[keep], lng[keep]


def _edge_case_points():
  corner_lat = np.degrees(np.arctan(1 / np.sqrt(2)))  # cube corners
  lat, lng = [], []
  # Poles, at many longitudes.
  for pole in (90.0, -90.0, 89.99999999, -89.99999999):
    for lon in (0.0, 45.0, 90.0, 135.0, 180.0, -180.0, -45.0, -90.0, 123.456):
      lat.append(pole)
      lng.append(lon)
  # The antimeridian and just past it (normalized to the other side).
  for la in (0.0, 45.0, -45.0, 12.3456, corner_lat, -corner_lat, 89.0, -89.0):
    for lon in (180.0, -180.0, 179.9999999999, -179.9999999999, 180.0000001, -180.0000001, 540.0,
                -540.0, 360.0, -360.0, 719.99):
      lat.append(la)
      lng.append(lon)
  # Face boundaries: the planes |x| = |y|, |x| = |z|, |y| = |z|, and the corners.
  for lon in np.arange(-180.0, 180.0, 45.0):
    for la in np.linspace(-45.0, 45.0, 31):
      lat.append(la)
      lng.append(lon)
  for lon in np.arange(-180.0, 180.0, 7.5):
    for la in (45.0, -45.0, corner_lat, -corner_lat):
      lat.append(la)
      lng.append(lon)
  return _with_ulp_neighbours(lat, lng)


def _s2geometry_ids_of_normalized(lat, lng, level):
  return s2geometry_cell_ids(lat, s2.normalize_longitude(lng), level)


@pytest.mark.parametrize("level", [1, 10, 20, 30])
def test_edge_cases_match_s2geometry(level):
  lat, lng = _edge_case_points()
  np.testing.assert_array_equal(s2.latlng_to_cell_ids(lat, lng, level),
                                _s2geometry_ids_of_normalized(lat, lng, level))


def test_poles_and_antimeridian_facts():
  ids = s2.latlng_to_cell_ids([90.0, -90.0, 0.0, 0.0], [0.0, 0.0, 180.0, -180.0], 20)
  assert s2.cell_ids_face(ids[:2]).tolist() == [2, 5]
  # +180 and -180 stay distinct cells (S2 does not identify them) a few metres apart.
  assert ids[2] != ids[3]
  centres = np.stack(s2.cell_centers(ids[2:]), -1)
  assert angle_diff_deg(centres[0, 1], centres[1, 1]) < 1e-4


def test_points_on_level20_cell_edges_match_s2geometry(sphere_points_1m):
  """Vertices and edge midpoints of random level-20 cells, each +-1..3 ULPs."""
  lat, lng = (a[:300] for a in sphere_points_1m)
  cells20 = [s2geometry.S2Cell(s2geometry.S2CellId(s2geometry.S2LatLng.FromDegrees(a, b)).parent(20))
             for a, b in zip(lat.tolist(), lng.tolist())]
  vertices = np.array([[(v.x(), v.y(), v.z()) for v in (cell.GetVertex(k) for k in range(4))]
                       for cell in cells20])  # [cell, 4, 3]
  on_edges = []
  for t in (0.0, 0.5, 0.25):  # vertices, midpoints and quarter points of each edge
    on_edges.append(vertices + t * (np.roll(vertices, -1, axis=1) - vertices))
  x, y, z = np.concatenate(on_edges).reshape(-1, 3).T
  on_edges = np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))
  elat, elng = _with_ulp_neighbours(*on_edges)
  for level in (20, 30):
    ours = s2.latlng_to_cell_ids(elat, elng, level)
    np.testing.assert_array_equal(ours, s2geometry_cell_ids(elat, elng, level))
  # The points really straddle edges: they fall in several cells around each source cell.
  assert np.unique(s2.latlng_to_cell_ids(elat, elng, 20)).size > 2 * len(cells20)


def test_regular_grid_matches_s2geometry():
  """Round-number coordinates produce exact ties between components."""
  lat, lng = np.meshgrid(np.arange(-90.0, 90.01, 1.5), np.arange(-180.0, 180.01, 1.5), indexing="ij")
  lat, lng = lat.ravel(), lng.ravel()
  np.testing.assert_array_equal(s2.latlng_to_cell_ids(lat, lng, 30), s2geometry_cell_ids(lat, lng, 30))


def test_longitude_normalization():
  lng = np.array([190.0, -190.0, 180.0, -180.0, 540.0, -540.0, 360.0, 359.5, -0.0, 720.25])
  np.testing.assert_array_equal(
      s2.normalize_longitude(lng), [-170.0, 170.0, 180.0, -180.0, -180.0, -180.0, 0.0, -0.5, -0.0, 0.25])
  lat = np.full(lng.shape, 33.0)
  np.testing.assert_array_equal(s2.latlng_to_cell_ids(lat, lng, 20),
                                s2.latlng_to_cell_ids(lat, s2.normalize_longitude(lng), 20))
  # And it is what S2LatLng::Normalized() does, up to rounding.
  for lon in (190.0, -190.0, 540.5, 1000.0):
    expected = s2geometry.S2LatLng.FromDegrees(10.0, lon).Normalized().lng().degrees()
    assert abs(float(s2.normalize_longitude(lon)) - expected) < 1e-9


@pytest.mark.parametrize("lat,lng,expected", [
    ([10.0, np.nan, 20.0], [0.0, 0.0, 0.0], "row(s) with NaN or infinite coordinates: 1 "),
    ([10.0, 0.0, 20.0], [0.0, np.inf, 0.0], "row(s) with NaN or infinite coordinates: 1 "),
    ([10.0, 90.5, -91.0], [0.0, 0.0, 0.0], "2 row(s) with |latitude| > 90: 1 (lat=90.5, lon=0.0), 2 "),
])
def test_bad_coordinates_raise_naming_rows(lat, lng, expected):
  with pytest.raises(ValueError, match=None) as info:
    s2.latlng_to_cell_ids(lat, lng)
  assert expected in str(info.value)


def test_bad_coordinates_named_by_id_and_counted():
  lat = np.zeros(30)
  lat[5:25] = 95.0
  with pytest.raises(ValueError) as info:
    s2.latlng_to_cell_ids(lat, np.zeros(30), ids=[f"img{k}.jpg" for k in range(30)])
  message = str(info.value)
  assert "20 row(s) with |latitude| > 90: img5.jpg (lat=95.0, lon=0.0)" in message
  assert "and 10 more" in message and "img4.jpg" not in message


def test_shape_and_level_checks():
  with pytest.raises(ValueError, match="shape"):
    s2.latlng_to_cell_ids(np.zeros(3), np.zeros(4))
  for level in (-1, 31, 2.5):
    with pytest.raises(ValueError, match="level"):
      s2.latlng_to_cell_ids([0.0], [0.0], level)
  coarse = s2.latlng_to_cell_ids([0.0], [0.0], 5)
  with pytest.raises(ValueError, match="coarser than level 6"):
    s2.cell_ids_parent(coarse, 6)
  with pytest.raises(ValueError, match="invalid S2 cell id"):
    s2.cell_centers(np.array([0, 7 << 61 | 1], np.uint64))


def test_any_shape_is_kept(sphere_points_1m):
  lat, lng = (a[:24].reshape(2, 3, 4) for a in sphere_points_1m)
  ids = s2.latlng_to_cell_ids(lat, lng, 17)
  assert ids.shape == (2, 3, 4)
  np.testing.assert_array_equal(ids.ravel(), s2.latlng_to_cell_ids(lat.ravel(), lng.ravel(), 17))


def test_validity_and_child_positions_match_s2geometry(sphere_points_1m):
  lat, lng = (a[:2000] for a in sphere_points_1m)
  leaf = s2.latlng_to_cell_ids(lat, lng)
  digits = s2.child_positions(leaf, 30)
  for row in range(0, 2000, 97):
    cell = s2geometry.S2CellId(int(leaf[row]))
    assert digits[row].tolist() == [cell.child_position(k) for k in range(1, 31)]
  rng = np.random.default_rng(0)
  junk = rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 5000, dtype=np.uint64)
  expected = [s2geometry.S2CellId(int(i)).is_valid() for i in junk.tolist()]
  np.testing.assert_array_equal(s2.cell_ids_are_valid(junk), expected)


def _cells_at_every_level(lat, lng):
  leaf = s2.latlng_to_cell_ids(lat, lng)
  return np.concatenate([s2.cell_ids_parent(leaf, level) for level in range(31)])


def test_centres_match_s2geometry_to_1e_9_degrees(sphere_points_1m):
  lat, lng = (a[:1000] for a in sphere_points_1m)
  ids = _cells_at_every_level(lat, lng)
  ours_lat, ours_lng = s2.cell_centers(ids)
  expected = np.array([(ll.lat().degrees(), ll.lng().degrees())
                       for ll in (s2geometry.S2CellId(int(i)).ToLatLng() for i in ids.tolist())])
  assert np.abs(ours_lat - expected[:, 0]).max() <= 1e-9
  assert angle_diff_deg(ours_lng, expected[:, 1]).max() <= 1e-9
  # Face cells exactly, including face 3 at +180 (S2 maps -0 to +0).
  faces = np.array([s2geometry.S2CellId.FromFacePosLevel(f, 0, 0).id() for f in range(6)], np.uint64)
  np.testing.assert_array_equal(np.stack(s2.cell_centers(faces), -1),
                                [[0, 0], [0, 90], [90, 0], [0, 180], [0, -90], [-90, 0]])


def test_vertices_match_s2geometry(sphere_points_1m):
  lat, lng = (a[:300] for a in sphere_points_1m)
  ids = _cells_at_every_level(lat, lng)
  ours = s2.cell_vertices_xyz(ids)
  ours_ll = s2.cell_vertices(ids)
  expected, expected_ll = [], []
  for cell in (s2geometry.S2Cell(s2geometry.S2CellId(int(i))) for i in ids.tolist()):
    vertices = [cell.GetVertex(k) for k in range(4)]
    expected.append([(v.x(), v.y(), v.z()) for v in vertices])
    expected_ll.append([(ll.lat().degrees(), ll.lng().degrees())
                        for ll in (s2geometry.S2LatLng(v) for v in vertices)])
  expected, expected_ll = np.array(expected), np.array(expected_ll)
  assert ours.shape == (ids.size, 4, 3) and ours_ll.shape == (ids.size, 4, 2)
  assert np.abs(ours - expected).max() <= 1e-15
  assert np.abs(ours_ll[..., 0] - expected_ll[..., 0]).max() <= 1e-9
  assert angle_diff_deg(ours_ll[..., 1], expected_ll[..., 1]).max() <= 1e-9
