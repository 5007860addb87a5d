"""The location gallery of an alignment model: the locations gallery:K ranks (the training
split's cells, GeoCLIP's 100K MP16 coordinates or a CSV), their S2 tokens and the model's
location embeddings of them (computed once per checkpoint, cached).

(Not the neighbour gallery of retrieval: retrieval.join.NeighborGallery.)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import data, models, package_data, runtime, s2, sharding
from geotoken_jax.inference.restore import RestoredModel, evaluate_config


@dataclasses.dataclass
class LocationGallery:
  """Locations an alignment model ranks for gallery:K, with their S2 tokens and the
  model's normalized location embeddings (computed once per checkpoint, cached)."""
  name: str
  latlng: np.ndarray  # [G, 2] float32 degrees
  tokens: np.ndarray  # [G, P] int32
  features: np.ndarray | None = None  # [G, E] float32, unit norm

  def arrays(self) -> dict[str, np.ndarray]:
    if self.features is None:
      raise ValueError(f"gallery {self.name!r} has no location features yet (location_features)")
    return {"latlng": self.latlng, "tokens": self.tokens, "features": self.features}


def _csv_coordinates(path) -> np.ndarray:
  lines = epath.Path(path).read_text().splitlines()
  reader = csv.DictReader(lines)
  names = {n.lower().strip(): n for n in reader.fieldnames or ()}
  lat = next((names[n] for n in ("lat", "latitude", "gps_lat") if n in names), None)
  lon = next((names[n] for n in ("lon", "lng", "longitude", "gps_lon", "gps_lng") if n in names), None)
  if lat is None or lon is None:
    raise ValueError(f"gallery CSV {path}: no latitude / longitude columns among {reader.fieldnames}")
  rows, bad = [], 0
  for row in reader:
    try:
      point = (float(row[lat]), float(row[lon]))
    except (TypeError, ValueError):
      bad += 1
      continue
    if np.isfinite(point).all() and abs(point[0]) <= 90 and abs(point[1]) <= 180:
      rows.append(point)
    else:
      bad += 1
  if bad:
    logging.warning("gallery CSV %s: %d rows without valid coordinates skipped", path, bad)
  if not rows:
    raise ValueError(f"gallery CSV {path} has no valid coordinates")
  return np.asarray(rows, np.float32)


def load_location_gallery(config, spec: s2.TokenSpec, name: str | None = None) -> LocationGallery:
  """The gallery named by `name` (default evaluate.gallery): "train" (the cell centres of
  the training split's tokens: no image read, no test location in it), "mp16_100k", or a
  CSV path."""
  eval_config = evaluate_config(config)
  name = name or str(eval_config.gallery)
  gallery = _load_location_gallery(config, spec, name)
  limit = int(eval_config.gallery_limit)
  if 0 < limit < len(gallery.latlng):
    keep = np.linspace(0, len(gallery.latlng) - 1, limit).round().astype(np.int64)
    gallery = LocationGallery(f"{name}[{limit}]", gallery.latlng[keep], gallery.tokens[keep])
  return gallery


def _load_location_gallery(config, spec: s2.TokenSpec, name: str) -> LocationGallery:
  if name == "train":  # one entry per distinct training cell (duplicates add nothing to a top-k)
    tokens = np.unique(data.training_tokens(config.data, spec), axis=0)
    return LocationGallery(name, s2.tokens_to_latlng(tokens, spec).astype(np.float32), tokens)
  if name == "mp16_100k":
    path = package_data.package_file("geoclip", "geoclip/model/gps_gallery/coordinates_100K.csv",
                                     install="pip install --no-deps geoclip", needed_for="the mp16_100k gallery")
    latlng = _csv_coordinates(path)
  else:
    latlng = _csv_coordinates(name)
  tokens = s2.latlng_to_tokens(latlng[:, 0].astype(np.float64), latlng[:, 1].astype(np.float64), spec)
  return LocationGallery(name, latlng, np.asarray(tokens, np.int32))


@functools.lru_cache(maxsize=8)
def _locate_fn(graphdef: nnx.GraphDef):
  """One compiled location embedding per model structure (not one per call)."""
  return jax.jit(lambda params, points: models.align.normalize(nnx.merge(graphdef, params).locate(points)))


def location_features(graphdef: nnx.GraphDef, params, mesh, latlng: np.ndarray, *, chunk: int = 8192
                      ) -> np.ndarray:
  """An alignment model's unit-norm location embeddings of [G, 2] coordinates: [G, E] float32,
  in chunks sharded over the mesh's batch axes."""
  divisor = sharding.global_batch_size_divisor(mesh)
  chunk = max(divisor, -(-chunk // divisor) * divisor)
  embed = _locate_fn(graphdef)
  out = []
  for start in range(0, len(latlng), chunk):
    points = np.zeros((chunk, 2), np.float32)
    part = latlng[start:start + chunk]
    points[:len(part)] = part
    placed = jax.device_put(points, sharding.batch_sharding(mesh))
    out.append(np.asarray(runtime.gather_tree(embed(params, placed)))[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@jax.jit
def _param_checksums(params):
  return jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), params)


def gallery_with_features(gallery: LocationGallery, aligner: "RestoredModel", cache_dir=None, identity: str = ""
                          ) -> LocationGallery:
  """The gallery with the aligner's location features, read from / written to cache_dir
  (keyed by the coordinates and the checkpoint's identity)."""
  # The key holds the coordinates, the run and a checksum of the parameters themselves, so a
  # retrained run in the same workdir never reads stale features.
  checksum = [float(x) for x in jax.tree.leaves(_param_checksums(aligner.params))]
  key = hashlib.sha256(gallery.latlng.tobytes() + f"{identity}|{aligner.step}|{checksum}".encode()).hexdigest()[:16]
  path = epath.Path(cache_dir) / f"gallery-{key}.npy" if cache_dir else None
  cached = path is not None and path.exists()
  if jax.process_count() > 1:  # every process takes the same branch (the computation is collective)
    cached = bool(multihost_utils.broadcast_one_to_all(np.int32(cached)))
  if cached:
    with path.open("rb") as f:
      features = np.load(f)
  else:
    features = location_features(aligner.graphdef, aligner.params, aligner.mesh, gallery.latlng)
    if path is not None and jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      runtime.write_atomic(path, runtime.npy_bytes(features))
  return dataclasses.replace(gallery, features=features)
