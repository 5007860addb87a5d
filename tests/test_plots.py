"""Plots: PNG files of the expected size, exact CDF data, antimeridian-safe map lines."""

import numpy as np
import pytest
from PIL import Image

from geotoken_jax import plots


def _png_size(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    return image.format, image.size


def _distances(seed=0, n=400):
  rng = np.random.default_rng(seed)
  d = rng.lognormal(4.0, 2.5, n)
  # Zeros, repeats, values below and above the plotted range, exact thresholds.
  d[:10] = 0.0
  d[10:20] = 25.0
  d[20:25] = [0.05, 0.1, 20_000.0, 20_015.0, 2500.0]
  return np.minimum(d, 20_015.0)


def test_error_cdf_writes_png(tmp_path):
  path = tmp_path / "cdf.png"
  out = plots.error_cdf({"greedy": _distances(0), "beam": _distances(1)}, path, title="test split")
  assert out == str(path)
  w, h = plots.CDF_FIGSIZE
  assert _png_size(path) == ("PNG", (round(w * plots.DPI), round(h * plots.DPI)))
  one = plots.error_cdf({"greedy": _distances(0)}, tmp_path / "one.png")
  assert _png_size(one)[1] == _png_size(path)[1]


def test_error_cdf_curves_are_the_empirical_cdf():
  data = {"greedy": _distances(0), "beam": _distances(1, 57)}
  fig = plots.error_cdf_figure(data)
  ax = fig.axes[0]
  assert ax.get_xscale() == "log" and ax.get_xlim() == pytest.approx(plots.CDF_RANGE_KM)
  curves = {line.get_label().split(" (")[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}
  assert sorted(curves) == ["beam", "greedy"]
  for name, d in data.items():
    line = curves[name]
    assert line.get_drawstyle() == "steps-post"
    x, y = np.asarray(line.get_xdata(), np.float64), np.asarray(line.get_ydata(), np.float64)
    # Brute force: fraction of distances <= x at every plotted x.
    np.testing.assert_allclose(y, (d[None, :] <= x[:, None]).mean(axis=1), rtol=0, atol=1e-15)
    assert x[0] == plots.CDF_RANGE_KM[0] and x[-1] == plots.CDF_RANGE_KM[1]
    assert np.all(np.diff(x) > 0)
    # Every jump inside the range is a plotted x, so steps-post draws the exact CDF.
    inside = d[(d > plots.CDF_RANGE_KM[0]) & (d < plots.CDF_RANGE_KM[1])]
    assert set(np.unique(inside)) <= set(x)
    assert f"n={d.size}" in line.get_label()
  # Dotted verticals at the thresholds.
  verticals = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
  assert verticals == list(plots.THRESHOLDS_KM)


def test_empirical_cdf_small_example():
  x, y = plots.empirical_cdf([0.0, 5.0, 5.0, 30_000.0])
  assert x.tolist() == [0.1, 5.0, 20_000.0]
  assert y.tolist() == [0.25, 0.75, 0.75]


def test_error_cdf_bad_input(tmp_path):
  with pytest.raises(ValueError, match="1-D"):
    plots.error_cdf({"a": np.zeros((3, 2))}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="non-empty dict"):
    plots.error_cdf({}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="NaN"):
    plots.error_cdf({"a": [1.0, np.nan]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="no distances"):
    plots.error_cdf({"a": []}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="negative"):
    plots.error_cdf({"a": [-1.0]}, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def _pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  truth = np.stack([rng.uniform(-70, 70, n), rng.uniform(-180, 180, n)], -1)
  predicted = np.stack([np.clip(truth[:, 0] + rng.normal(0, 10, n), -90, 90),
                        truth[:, 1] + rng.normal(0, 40, n)], -1)
  return truth, predicted


def test_world_map_writes_png(tmp_path):
  truth, predicted = _pairs(50)
  path = plots.world_map(truth, predicted, tmp_path / "map.png", title="greedy", max_points=20, seed=3)
  w, h = plots.MAP_FIGSIZE
  assert _png_size(path) == ("PNG", (round(w * plots.DPI), round(h * plots.DPI)))
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.std() > 20  # the Blue Marble background was drawn


def test_world_map_subsamples_deterministically():
  truth, predicted = _pairs(50)
  background = np.zeros((90, 180, 3), np.uint8)
  figs = [plots.world_map_figure(truth, predicted, title="beam", max_points=20, seed=s, background=background)
          for s in (3, 3, 4)]
  offsets = []
  for fig in figs:
    ax = fig.axes[0]
    assert "random 20 of 50 images, seed" in ax.get_title() and ax.get_title().startswith("beam")
    (truth_points, predicted_points) = [c.get_offsets() for c in ax.collections[1:]]
    assert len(truth_points) == len(predicted_points) == 20
    offsets.append(np.asarray(truth_points))
  np.testing.assert_array_equal(offsets[0], offsets[1])
  assert not np.array_equal(offsets[0], offsets[2])
  # Each plotted truth is one of the inputs, as (lon, lat).
  inputs = {(round(lon, 9), round(lat, 9)) for lat, lon in truth}
  assert {(round(x, 9), round(y, 9)) for x, y in offsets[0]} <= inputs
  small = plots.world_map_figure(truth[:5], predicted[:5], background=background)
  assert small.axes[0].get_title() == "5 images"


def test_map_segments_split_at_the_antimeridian():
  truth = np.array([[10.0, 170.0], [0.0, -175.0], [5.0, 10.0], [-20.0, 179.0]])
  predicted = np.array([[20.0, -170.0], [10.0, 175.0], [6.0, 12.0], [-20.0, 541.0]])  # 541 = -179
  segments = plots.map_segments(truth, predicted)
  assert segments.shape == (7, 2, 2)
  assert np.all(np.abs(segments[:, 1, 0] - segments[:, 0, 0]) <= 180.0)
  as_set = {tuple(np.round(s.ravel(), 9)) for s in segments}
  assert (10.0, 5.0, 12.0, 6.0) in as_set                      # no crossing: one piece
  assert (170.0, 10.0, 180.0, 15.0) in as_set                  # east to the edge at the midpoint latitude
  assert (-180.0, 15.0, -170.0, 20.0) in as_set                # and in from the other edge
  assert (-175.0, 0.0, -180.0, 5.0) in as_set and (180.0, 5.0, 175.0, 10.0) in as_set
  assert (179.0, -20.0, 180.0, -20.0) in as_set and (-180.0, -20.0, -179.0, -20.0) in as_set


def test_world_map_bad_input(tmp_path):
  truth, predicted = _pairs(5)
  with pytest.raises(ValueError, match=r"\[N, 2\]"):
    plots.world_map(truth[:, :1], predicted, tmp_path / "m.png")
  with pytest.raises(ValueError, match="same shape"):
    plots.world_map(truth, predicted[:4], tmp_path / "m.png")
  swapped = truth.copy()
  swapped[0] = [120.0, 45.0]  # (lon, lat) by mistake
  with pytest.raises(ValueError, match="latitude"):
    plots.world_map(swapped, predicted, tmp_path / "m.png")
  bad = predicted.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    plots.world_map(truth, bad, tmp_path / "m.png")
  with pytest.raises(ValueError, match="no points"):
    plots.world_map(np.zeros((0, 2)), np.zeros((0, 2)), tmp_path / "m.png")
  with pytest.raises(ValueError, match="max_points"):
    plots.world_map(truth, predicted, tmp_path / "m.png", max_points=0)
  assert not (tmp_path / "m.png").exists()
