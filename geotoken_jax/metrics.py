"""Geolocation metrics: great-circle error and accuracy within distance thresholds.

Conventions (see ../shared/reference/geotoken.md): haversine on a sphere of
radius 6371 km; a prediction is a hit at threshold t when its distance <= t
(GeoToken's code; PIGEON and OSV-5M use <). Every table reports how many images
it was computed on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)


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


def accuracy_table(distances_km: np.ndarray, thresholds_km: Sequence[float] = THRESHOLDS_KM) -> dict:
  """The paper's row: acc% at each threshold, median and mean km, and the count."""
  d = np.asarray(distances_km, np.float64)
  if d.ndim != 1:
    raise ValueError(f"expected a 1-D array of distances, got shape {d.shape}")
  if np.isnan(d).any():
    raise ValueError(f"{int(np.isnan(d).sum())} NaN distances: a prediction or a label is invalid")
  row = {f"acc@{t:g}km": (100.0 * float(np.mean(d <= t)) if d.size else float("nan")) for t in thresholds_km}
  row["median_km"] = float(np.median(d)) if d.size else float("nan")
  row["mean_km"] = float(np.mean(d)) if d.size else float("nan")
  row["images"] = int(d.size)
  return row


def format_table(rows: dict[str, dict], thresholds_km: Sequence[float] = THRESHOLDS_KM) -> str:
  """Markdown table, one row per method / strategy."""
  header = ["method"] + [f"acc@{t:g} km %" for t in thresholds_km] + ["median km", "images"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in rows.items():
    cells = [name] + [f"{row[f'acc@{t:g}km']:.1f}" for t in thresholds_km]
    cells += [f"{row['median_km']:.1f}", str(row["images"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
