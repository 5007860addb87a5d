"""Geolocation metrics: great-circle error, accuracy within thresholds, GeoGuessr score.

Conventions (see shared/reference/geotoken.md, "Metrics conventions"):

  distance    haversine great-circle distance on a sphere of radius
              EARTH_RADIUS_KM = 6371 km (GeoToken's code).  GeoCLIP, G3 and
              GeoRanker use the WGS84 geodesic instead; the two differ by up
              to ~0.5%, which can move a borderline image across a threshold.
  hit         a prediction is a hit at threshold t when distance <= t
              (GeoToken's code).  PIGEON and OSV-5M use <; the two differ only
              for distances exactly equal to a threshold.
  thresholds  THRESHOLDS_KM = 1 / 25 / 200 / 750 / 2500 km
              (street / city / region / country / continent).
  GeoGuessr   5000 * exp(-d / 1492.7 km) per image, averaged (PIGEON, OSV-5M).
  country     accuracy of ISO 3166-1 alpha-2 codes (see geotoken_jax.geocode):
              the percentage of rows whose predicted code equals the true one,
              over the rows whose true country is known; rows with an
              unknown true country ("", None or NaN) are left out of the
              denominator and counted as `country_unknown`.  "NA" is Namibia,
              not a missing value.
  counts      every table says how many images it was computed on (`images`,
              equal to `evaluated`) and how many were skipped before it
              (`skipped`, e.g. missing or unreadable images): several
              published loaders drop images silently.

accuracy_table keys (percentages are 0-100):
  acc@{t:g}km, median_km, mean_km, geoguessr, images, evaluated, skipped,
  and, when country arrays are given, country_acc and country_unknown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
# A strategy (and a reranker's snap radius) is chosen by its mean accuracy at these radii.
CHOICE_THRESHOLDS_KM = (25, 200, 750, 2500)
GEOGUESSR_MAX_SCORE = 5000.0
GEOGUESSR_SCALE_KM = 1492.7


def haversine_km(a, b, xp=np):
  """Distance in km between [..., 2] (lat, lon) degree arrays; xp = numpy or jax.numpy."""
  a = xp.radians(a)
  b = xp.radians(b)
  half_dlat = (b[..., 0] - a[..., 0]) / 2
  half_dlon = (b[..., 1] - a[..., 1]) / 2
  h = xp.sin(half_dlat)**2 + xp.cos(a[..., 0]) * xp.cos(b[..., 0]) * xp.sin(half_dlon)**2
  return 2 * EARTH_RADIUS_KM * xp.arcsin(xp.sqrt(xp.clip(h, 0.0, 1.0)))


def haversine_km_jax(a, b):
  return haversine_km(a, b, xp=jnp)


def unit_vectors(latlng) -> np.ndarray:
  """float64 [N, 3] points on the unit sphere of [N, 2] (lat, lon) degrees."""
  x = np.radians(np.asarray(latlng, np.float64).reshape(-1, 2))
  cos_lat = np.cos(x[:, 0])
  return np.stack([cos_lat * np.cos(x[:, 1]), cos_lat * np.sin(x[:, 1]), np.sin(x[:, 0])], axis=-1)


def nearest_locations(queries, gallery, *, max_entries: int = 1 << 22, margin: float = 1e-12
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(index int64 [Q], distance_km float64 [Q]): for each query location, the gallery location
  nearest to it on the great circle (haversine_km; ties to the lower gallery row), exactly.

  Float64 brute force in chunks of queries (max_entries scores at a time): unit-vector inner
  products (a BLAS matmul) shortlist every gallery row within `margin` of the best one (the
  products' rounding error is ~1e-15, so the nearest row is always shortlisted), and the
  shortlist is ranked by haversine_km itself, so the result is the float64 haversine argmin."""
  queries = np.asarray(queries, np.float64).reshape(-1, 2)
  gallery = np.asarray(gallery, np.float64).reshape(-1, 2)
  if not len(gallery):
    raise ValueError("nearest_locations: the gallery is empty")
  if not (np.isfinite(queries).all() and np.isfinite(gallery).all()):
    raise ValueError("nearest_locations: locations must be finite")
  uq, ug = unit_vectors(queries), unit_vectors(gallery)
  index = np.zeros(len(queries), np.int64)
  distance = np.zeros(len(queries), np.float64)
  chunk = max(1, int(max_entries) // len(gallery))
  for start in range(0, len(queries), chunk):
    stop = min(start + chunk, len(queries))
    dots = uq[start:stop] @ ug.T  # [c, G]
    rows, cols = np.nonzero(dots >= dots.max(axis=1, keepdims=True) - margin)
    d = haversine_km(queries[start + rows], gallery[cols])
    order = np.lexsort((cols, d, rows))  # by query, then distance, then gallery row
    first = order[np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]]
    index[start + rows[first]] = cols[first]
    distance[start + rows[first]] = d[first]
  return index, distance


def _check_distances(distances_km) -> np.ndarray:
  d = np.asarray(distances_km, np.float64)
  nan = np.isnan(d)
  if nan.any():
    raise ValueError(f"{int(nan.sum())} NaN distances (first at index {int(np.flatnonzero(nan.ravel())[0])}): "
                     "a prediction or a label is invalid")
  negative = d < 0
  if negative.any():
    raise ValueError(f"{int(negative.sum())} negative distances (first {float(d[negative].ravel()[0])}): "
                     "distances must be >= 0 km")
  return d


def geoguessr_score(distance_km):
  """GeoGuessr-style score 5000 * exp(-d / 1492.7 km), elementwise (float64).

  Scalars give a NumPy float64 scalar; arrays an array of the same shape.
  NaN or negative distances raise ValueError.
  """
  d = _check_distances(distance_km)
  return GEOGUESSR_MAX_SCORE * np.exp(-d / GEOGUESSR_SCALE_KM)


def _unknown_country(codes: np.ndarray) -> np.ndarray:
  """True where a country code is missing: None, NaN or an empty / blank string."""
  out = np.zeros(codes.shape, bool)
  for i, code in enumerate(codes):
    if code is None or (isinstance(code, float) and math.isnan(code)):
      out[i] = True
    else:
      out[i] = not str(code).strip()
  return out


def _normalize_countries(codes, name: str, n: int) -> np.ndarray:
  arr = np.asarray(codes, dtype=object)
  if arr.ndim != 1 or arr.shape[0] != n:
    raise ValueError(f"{name} must be a 1-D sequence with one code per distance ({n}), got shape {arr.shape}")
  return arr


def country_accuracy(predicted_countries, true_countries) -> tuple[float, int, int]:
  """(accuracy %, rows compared, rows with an unknown true country).

  Codes are compared after stripping whitespace and upper-casing.  A row whose
  true code is unknown ("", None, NaN) is excluded; a row whose predicted code
  is unknown but whose true code is known counts as a miss.  The accuracy is
  NaN when no row has a known true country.
  """
  true = np.asarray(true_countries, dtype=object)
  if true.ndim != 1:
    raise ValueError(f"true_countries must be 1-D, got shape {true.shape}")
  pred = _normalize_countries(predicted_countries, "predicted_countries", true.shape[0])
  unknown = _unknown_country(true)
  pred_unknown = _unknown_country(pred)
  known = np.flatnonzero(~unknown)
  hits = sum(1 for i in known
             if not pred_unknown[i] and str(pred[i]).strip().upper() == str(true[i]).strip().upper())
  accuracy = 100.0 * hits / known.size if known.size else float("nan")
  return accuracy, int(known.size), int(unknown.sum())


def accuracy_table(distances_km: np.ndarray, thresholds_km: Sequence[float] = THRESHOLDS_KM, *,
                   skipped: int = 0, predicted_countries=None, true_countries=None) -> dict:
  """One table row: acc% at each threshold (hit: d <= t), median / mean km, GeoGuessr, counts.

  Args:
    distances_km: 1-D great-circle errors in km, one per evaluated image.
    thresholds_km: the accuracy thresholds.
    skipped: images of the split that were not evaluated (missing, unreadable);
      recorded as is so that the table shows them.
    predicted_countries, true_countries: optional 1-D ISO 3166-1 alpha-2 codes,
      one per distance; with both, the row gets `country_acc` (%) and
      `country_unknown` (rows whose true country is unknown, left out of it).

  Empty input gives NaN statistics and zero counts; NaN or negative distances
  raise ValueError.
  """
  d = _check_distances(distances_km)
  if d.ndim != 1:
    raise ValueError(f"expected a 1-D array of distances, got shape {d.shape}")
  skipped = int(skipped)
  if skipped < 0:
    raise ValueError(f"skipped must be >= 0, got {skipped}")
  if (predicted_countries is None) != (true_countries is None):
    raise ValueError("country accuracy needs both predicted_countries and true_countries")
  row = {f"acc@{t:g}km": (100.0 * float(np.mean(d <= t)) if d.size else float("nan")) for t in thresholds_km}
  row["median_km"] = float(np.median(d)) if d.size else float("nan")
  row["mean_km"] = float(np.mean(d)) if d.size else float("nan")
  row["geoguessr"] = float(np.mean(geoguessr_score(d))) if d.size else float("nan")
  row["images"] = int(d.size)
  row["evaluated"] = int(d.size)
  row["skipped"] = skipped
  if true_countries is not None:
    true = _normalize_countries(true_countries, "true_countries", d.size)
    accuracy, _, unknown = country_accuracy(predicted_countries, true)
    row["country_acc"] = accuracy
    row["country_unknown"] = unknown
  return row


def _cell(row: Mapping, key: str, fmt: str) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  value = float(value)
  return "n/a" if math.isnan(value) else format(value, fmt)


def format_table(rows: Mapping[str, Mapping], thresholds_km: Sequence[float] = THRESHOLDS_KM) -> str:
  """Markdown table, one row per method / strategy.

  Columns: acc@ each threshold (%), median km, GeoGuessr score, country acc %
  (only if some row has `country_acc`), images evaluated, skipped (only if
  some row has `skipped`).  Rows missing a column (e.g. made by an older
  accuracy_table) show "-"; NaN values show "n/a".
  """
  with_country = any("country_acc" in row for row in rows.values())
  with_skipped = any("skipped" in row for row in rows.values())
  header = ["method"] + [f"acc@{t:g} km %" for t in thresholds_km] + ["median km", "GeoGuessr"]
  header += ["country acc %"] if with_country else []
  header += ["images"] + (["skipped"] if with_skipped else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in rows.items():
    cells = [str(name)] + [_cell(row, f"acc@{t:g}km", ".1f") for t in thresholds_km]
    cells += [_cell(row, "median_km", ".1f"), _cell(row, "geoguessr", ".0f")]
    if with_country:
      cells.append(_cell(row, "country_acc", ".1f"))
    images = row.get("evaluated", row.get("images"))
    cells.append("-" if images is None else str(int(images)))
    if with_skipped:
      skipped = row.get("skipped")
      cells.append("-" if skipped is None else str(int(skipped)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def accuracy_by_score(scores, distances_by_name: Mapping[str, np.ndarray], *, threshold_km: float = 25.0,
                      buckets: int = 5) -> dict:
  """acc@threshold_km (%) of each method in equal-count buckets of a per-image score (e.g. the top
  neighbour's similarity), lowest scores first: where retrieval is trustworthy and where the decoder
  should speak.  Bucket edges are the score's quantiles; images are split by rank (ties by image
  order), so every bucket holds len // buckets or one more.  -> {"edges": [buckets + 1],
  "counts": [buckets], name: [buckets]}."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not np.isfinite(scores).all():
    raise ValueError("scores must be a 1-D array of finite numbers")
  if buckets < 1 or scores.size < buckets:
    raise ValueError(f"need at least {buckets} images for {buckets} buckets, got {scores.size}")
  order = np.argsort(scores, kind="stable")
  parts = np.array_split(order, buckets)
  out = {"edges": [float(scores[order[0]])] + [float(scores[p[-1]]) for p in parts],
         "counts": [int(p.size) for p in parts]}
  for name, d in distances_by_name.items():
    d = np.asarray(d, np.float64)
    if d.shape != scores.shape:
      raise ValueError(f"{name}: {d.shape[0] if d.ndim else 0} distances for {scores.size} scores")
    out[str(name)] = [100.0 * float(np.mean(d[p] <= threshold_km)) for p in parts]
  return out
