"""The nearest-training-location oracle: metrics.nearest_locations against a float64 haversine
brute force (ties, duplicates, poles, the antimeridian, points a few centimetres apart), and the
evaluation's oracle rows (inference.evaluation.nearest_train_rows) scored like any strategy.
The evaluation job's wiring (evaluate.oracles) runs in tests/test_tiny_image.py's recipe."""

from __future__ import annotations

import numpy as np
import pytest

from geotoken_jax import metrics, s2
from geotoken_jax.inference import evaluation

SPEC = s2.TokenSpec(20, 2)


def haversine_brute_force(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 haversine from every query to every gallery point (written out here, R = 6371 km):
  (argmin: the first of equal minima, min)."""
  a, b = np.radians(queries)[:, None, :], np.radians(gallery)[None, :, :]
  h = (np.sin((b[..., 0] - a[..., 0]) / 2) ** 2
       + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin((b[..., 1] - a[..., 1]) / 2) ** 2)
  d = 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
  return d.argmin(axis=1), d.min(axis=1)


def sphere(n: int, rng) -> np.ndarray:
  xyz = rng.normal(size=(n, 3))
  xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
  return np.degrees(np.stack([np.arcsin(xyz[:, 2]), np.arctan2(xyz[:, 1], xyz[:, 0])], -1))


def test_nearest_locations_is_the_float64_haversine_brute_force():
  rng = np.random.default_rng(0)
  gallery = sphere(3000, rng)
  gallery[100:110] = gallery[5]  # duplicates: ties go to the lower row
  gallery[200] = [90.0, 0.0]
  gallery[201] = [-89.9999, 179.9999]
  gallery[300] = [10.0, 179.99999]
  gallery[301] = [10.0, -179.99999]  # across the antimeridian from 300: 2.2 m apart
  # Centimetres: 5 cm then 3 cm from a query, the nearer one in the higher row.  Unit-vector
  # inner products round both to 1.0 (an argmax over them would pick the 5 cm row).
  close = sphere(20, rng)
  for j, (lat, lon) in enumerate(close):
    gallery[1000 + 2 * j] = [lat + 4.5e-7, lon]
    gallery[1001 + 2 * j] = [lat - 2.7e-7, lon]
  queries = np.concatenate([
      close,
      sphere(400, rng),
      gallery[[5, 200, 201, 300]],  # on gallery points (a duplicated one)
      gallery[rng.integers(0, 3000, 50)] + rng.normal(scale=1e-7, size=(50, 2)),  # centimetres off
      [[90.0, 123.0], [-90.0, 0.0], [10.0, 180.0], [0.0, 0.0]],
  ])
  want_index, want_distance = haversine_brute_force(queries, gallery)
  for max_entries in (1 << 22, 5000):  # one chunk, and a query or two per chunk
    index, distance = metrics.nearest_locations(queries, gallery, max_entries=max_entries)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(distance, want_distance, rtol=1e-12, atol=1e-12)
  assert (index[:20] == 1001 + 2 * np.arange(20)).all()
  assert index[420] == 5 and distance[420] == 0.0
  np.testing.assert_allclose(distance, metrics.haversine_km(queries, gallery[index]), rtol=0, atol=0)


def test_nearest_locations_refuses_empty_and_non_finite_input():
  with pytest.raises(ValueError, match="empty"):
    metrics.nearest_locations(np.zeros((2, 2)), np.zeros((0, 2)))
  with pytest.raises(ValueError, match="finite"):
    metrics.nearest_locations(np.asarray([[np.nan, 0.0]]), np.zeros((3, 2)))


def test_the_oracle_rows_predict_the_nearest_training_location_and_score_like_a_strategy():
  rng = np.random.default_rng(1)
  train = sphere(500, rng)
  truth = sphere(30, rng)
  rows = [{"true_country": "", "id": int(i), "index": int(i), "true_lat": float(lat), "true_lon": float(lon),
           "pred_lat": 0.0, "pred_lon": 0.0, "error_km": 1.0, "chosen": 0, "candidates": []}
          for i, (lat, lon) in enumerate(truth)]
  rows[7].update(true_lat=None, true_lon=None, error_km=None)  # an unlabelled image: no oracle prediction
  oracle = evaluation.nearest_train_rows(rows, train, SPEC)
  labelled = [i for i in range(30) if i != 7]
  want_index, want_distance = haversine_brute_force(truth[labelled], train)
  assert [r["train_row"] for r in oracle if r["error_km"] is not None] == want_index.tolist()
  np.testing.assert_allclose([r["error_km"] for r in oracle if r["error_km"] is not None], want_distance,
                             rtol=1e-12)
  np.testing.assert_array_equal([[r["pred_lat"], r["pred_lon"]] for r in oracle if r["error_km"] is not None],
                                train[want_index])
  assert oracle[7]["pred_lat"] is None and oracle[7]["error_km"] is None and oracle[7]["id"] == 7
  assert [r["id"] for r in oracle] == list(range(30))
  tokens = s2.latlng_to_tokens(train[want_index[:1], 0], train[want_index[:1], 1], SPEC)[0]
  assert oracle[0]["candidates"][0]["tokens"] == "-".join(str(int(t)) for t in tokens)
  # The same metrics as any strategy's rows: the acc@km of the brute-force distances.
  row = evaluation.score_predictions(oracle, np.full(29, "", dtype=object))
  assert row["evaluated"] == 29 and row["skipped"] == 1
  for threshold in metrics.THRESHOLDS_KM:
    assert row[f"acc@{threshold:g}km"] == pytest.approx(100.0 * np.mean(want_distance <= threshold))
  assert row["median_km"] == pytest.approx(np.median(want_distance))
