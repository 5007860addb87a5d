"""Plots of geolocation errors: error CDFs and prediction-vs-truth world maps.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot,
no global backend switch, no display needed) and written as PNG files of a
fixed pixel size: figsize * DPI, never cropped ("tight" bounding boxes would
make the size depend on the labels).

  error_cdf   fraction of images with error <= d against d (km, log axis from
              0.1 km to 20,000 km), one curve per method, dotted verticals at
              the accuracy thresholds.  The curve is the exact empirical CDF,
              drawn as a right-continuous step function; errors below 0.1 km
              are counted in the curve's value at its left edge.
  world_map   truth (green dots) and predictions (red crosses) over NASA Blue
              Marble (equirectangular), a thin line joining each pair.  Lines
              are straight in (lon, lat), not great circles; a pair whose
              shorter way crosses the antimeridian is drawn as two pieces that
              leave one map edge and enter at the other, so no line streaks
              across the map.
"""

from __future__ import annotations

import io

from collections.abc import Mapping

import numpy as np

from geotoken_jax.data.earth import blue_marble
from geotoken_jax.metrics import THRESHOLDS_KM

DPI = 100
CDF_FIGSIZE = (8.0, 5.0)  # inches: 800 x 500 px
MAP_FIGSIZE = (14.0, 7.5)  # inches: 1400 x 750 px
CDF_RANGE_KM = (0.1, 20_000.0)
_MAP_DOWNSAMPLE = 3  # Blue Marble 5400 x 2700 -> 1800 x 900 before drawing


def _figure(figsize):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=figsize, dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> str:
  """PNG bytes written through etils.epath: `path` may be local or a gs:// / s3:// URL."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return str(path)


# ----------------------------------------------------------------------------
# Error CDF.


def _check_distances(name: str, distances) -> np.ndarray:
  d = np.asarray(distances, np.float64)
  if d.ndim != 1:
    raise ValueError(f"{name!r}: expected a 1-D array of distances in km, got shape {d.shape}")
  if d.size == 0:
    raise ValueError(f"{name!r}: no distances to plot")
  if not np.isfinite(d).all():
    raise ValueError(f"{name!r}: {int((~np.isfinite(d)).sum())} NaN or infinite distances")
  if (d < 0).any():
    raise ValueError(f"{name!r}: {int((d < 0).sum())} negative distances")
  return d


def empirical_cdf(distances_km, x_range_km=CDF_RANGE_KM) -> tuple[np.ndarray, np.ndarray]:
  """(x km, fraction of distances <= x) at every jump of the CDF inside x_range_km.

  x starts at x_range_km[0], holds every distinct distance strictly inside the
  range, and ends at x_range_km[1]; drawn with drawstyle "steps-post" it is
  the exact empirical CDF restricted to the range.
  """
  d = np.sort(_check_distances("distances", distances_km))
  lo, hi = x_range_km
  inside = np.unique(d[(d > lo) & (d < hi)])
  x = np.concatenate([[lo], inside, [hi]])
  y = np.searchsorted(d, x, side="right") / d.size
  return x, y


def error_cdf_figure(distances_by_name: Mapping[str, np.ndarray], *, title: str | None = None,
                     thresholds_km=THRESHOLDS_KM):
  """The CDF figure (matplotlib Figure); error_cdf saves it."""
  if not isinstance(distances_by_name, Mapping) or not distances_by_name:
    raise ValueError("distances_by_name must be a non-empty dict {name: 1-D distances in km}")
  curves = {str(name): _check_distances(str(name), d) for name, d in distances_by_name.items()}
  fig = _figure(CDF_FIGSIZE)
  ax = fig.add_subplot(1, 1, 1)
  for t in thresholds_km:
    ax.axvline(t, color="0.55", linestyle=":", linewidth=1.0, zorder=1)
    ax.text(t, 1.01, f"{t:g} km", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
            fontsize=8, color="0.35")
  for name, d in curves.items():
    x, y = empirical_cdf(d)
    ax.plot(x, y, drawstyle="steps-post", linewidth=1.6, zorder=2,
            label=f"{name} (n={d.size}, median {np.median(d):,.1f} km)")
  ax.set_xscale("log")
  ax.set_xlim(*CDF_RANGE_KM)
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel("great-circle error (km, log scale)")
  ax.set_ylabel("fraction of images with error <= x")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  if title:
    ax.set_title(title, pad=16)
  fig.subplots_adjust(left=0.09, right=0.97, bottom=0.11, top=0.88)
  return fig


def error_cdf(distances_by_name: Mapping[str, np.ndarray], path, *, title: str | None = None) -> str:
  """Writes the error CDF of each named set of distances (km) as a PNG; returns path."""
  return _save(error_cdf_figure(distances_by_name, title=title), path)


def accuracy_by_score_plot(by_score: Mapping, path, *, threshold_km: float = 25.0, title: str | None = None,
                           score_name: str = "top-1 neighbour score") -> str:
  """Writes metrics.accuracy_by_score's result as a PNG (one line per method, the buckets on the
  x axis labelled by their score ranges); returns path."""
  names = [name for name in by_score if name not in ("edges", "counts")]
  if not names:
    raise ValueError("accuracy_by_score_plot needs at least one method")
  edges, counts = by_score["edges"], by_score["counts"]
  fig = _figure(CDF_FIGSIZE)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(counts))
  for name in names:
    ax.plot(x, by_score[name], marker="o", linewidth=1.6, label=name)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{edges[i]:.2f}-{edges[i + 1]:.2f}\n(n={counts[i]})" for i in x], fontsize=8)
  ax.set_xlabel(f"{score_name} (equal-count buckets)")
  ax.set_ylabel(f"acc@{threshold_km:g} km %")
  ax.set_ylim(0.0, 100.0)
  ax.grid(True, alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  if title:
    ax.set_title(title)
  fig.subplots_adjust(left=0.09, right=0.97, bottom=0.16, top=0.92)
  return _save(fig, path)


# ----------------------------------------------------------------------------
# World map.


def _check_points(name: str, latlng) -> np.ndarray:
  arr = np.asarray(latlng, np.float64)
  if arr.ndim != 2 or arr.shape[1] != 2:
    raise ValueError(f"{name}: expected an [N, 2] array of (lat, lon) degrees, got shape {arr.shape}")
  if not np.isfinite(arr).all():
    raise ValueError(f"{name}: {int((~np.isfinite(arr).all(axis=1)).sum())} rows with NaN or infinite values")
  if (np.abs(arr[:, 0]) > 90).any():
    raise ValueError(f"{name}: {int((np.abs(arr[:, 0]) > 90).sum())} rows with |latitude| > 90 "
                     "(is the array (lon, lat) instead of (lat, lon)?)")
  return arr


def _wrap_lon(lon: np.ndarray) -> np.ndarray:
  """Longitudes into [-180, 180); 180 stays 180."""
  return np.where(lon == 180.0, 180.0, (lon + 180.0) % 360.0 - 180.0)


def map_segments(truth, predicted) -> np.ndarray:
  """[M, 2, 2] line segments ((lon, lat), (lon, lat)) joining each truth to its prediction.

  A pair whose shorter way in longitude crosses the antimeridian becomes two
  segments meeting the map edges at the interpolated latitude, so every
  segment has |delta lon| <= 180.
  """
  lat1, lon1 = truth[:, 0], _wrap_lon(truth[:, 1])
  lat2, lon2 = predicted[:, 0], _wrap_lon(predicted[:, 1])
  dlon = lon2 - lon1
  cross = np.abs(dlon) > 180.0
  straight = np.stack([np.stack([lon1, lat1], -1), np.stack([lon2, lat2], -1)], axis=1)[~cross]
  if not cross.any():
    return straight
  lat1, lon1, lat2, lon2, dlon = lat1[cross], lon1[cross], lat2[cross], lon2[cross], dlon[cross]
  # The shorter way: unwrap lon2 by 360 towards lon1, then cut at the edge it passes.
  lon2u = np.where(dlon > 0, lon2 - 360.0, lon2 + 360.0)
  edge = np.where(lon2u < lon1, -180.0, 180.0)
  t = (edge - lon1) / (lon2u - lon1)
  lat_c = lat1 + t * (lat2 - lat1)
  first = np.stack([np.stack([lon1, lat1], -1), np.stack([edge, lat_c], -1)], axis=1)
  second = np.stack([np.stack([-edge, lat_c], -1), np.stack([lon2, lat2], -1)], axis=1)
  return np.concatenate([straight, first, second], axis=0)


def _background() -> np.ndarray:
  image = blue_marble()  # uint8 [2700, 5400, 3], lat +90 top, lon -180 left
  k = _MAP_DOWNSAMPLE
  h, w = image.shape[0] // k * k, image.shape[1] // k * k
  small = image[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))
  return np.round(small).astype(np.uint8)


def world_map_figure(truth, predicted, *, title: str | None = None, max_points: int = 2000, seed: int = 0,
                     background: np.ndarray | None = None):
  """The map figure (matplotlib Figure); world_map saves it.

  background: optional uint8 [H, W, 3] equirectangular image (defaults to Blue Marble).
  """
  truth = _check_points("truth", truth)
  predicted = _check_points("predicted", predicted)
  if truth.shape != predicted.shape:
    raise ValueError(f"truth {truth.shape} and predicted {predicted.shape} must have the same shape")
  if truth.shape[0] == 0:
    raise ValueError("no points to plot")
  if int(max_points) < 1:
    raise ValueError(f"max_points must be >= 1, got {max_points}")
  n = truth.shape[0]
  note = f"{n:,} images"
  if n > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(n, size=int(max_points), replace=False))
    truth, predicted = truth[keep], predicted[keep]
    note = f"random {int(max_points):,} of {n:,} images, seed {seed}"
  if background is None:
    background = _background()
  background = np.asarray(background)
  if background.ndim != 3 or background.shape[2] not in (3, 4):
    raise ValueError(f"background must be an [H, W, 3] image, got shape {background.shape}")

  from matplotlib.collections import LineCollection  # pylint: disable=g-import-not-at-top

  fig = _figure(MAP_FIGSIZE)
  ax = fig.add_axes((0.03, 0.06, 0.94, 0.86))
  ax.imshow(background, extent=(-180, 180, -90, 90), origin="upper", interpolation="bilinear", zorder=0)
  ax.add_collection(LineCollection(map_segments(truth, predicted), colors="#ffe066", linewidths=0.5,
                                   alpha=0.6, zorder=1, label="error"))
  ax.scatter(_wrap_lon(truth[:, 1]), truth[:, 0], s=7, c="#2ecc40", edgecolors="none", zorder=2,
             label="truth")
  ax.scatter(_wrap_lon(predicted[:, 1]), predicted[:, 0], s=9, c="#ff4136", marker="x", linewidths=0.8,
             zorder=3, label="prediction")
  ax.set_xlim(-180, 180)
  ax.set_ylim(-90, 90)
  ax.set_aspect("equal")
  ax.set_xticks(range(-180, 181, 60))
  ax.set_yticks(range(-90, 91, 30))
  ax.tick_params(labelsize=8)
  ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
  ax.set_title(f"{title}: {note}" if title else note, fontsize=11)
  return fig


def world_map(truth, predicted, path, *, title: str | None = None, max_points: int = 2000,
              seed: int = 0) -> str:
  """Writes predictions vs truth ([N, 2] (lat, lon) degrees) over Blue Marble as a PNG; returns path."""
  return _save(world_map_figure(truth, predicted, title=title, max_points=max_points, seed=seed), path)
