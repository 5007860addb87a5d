"""Prediction on image files: the top-k cells of any number of files, streamed in batches
(unreadable files reported, not fatal), and the GeoJSON of the candidate cells."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from etils import epath

from geotoken_jax import models, runtime, s2, sharding
from geotoken_jax.data import images as images_lib
from geotoken_jax.decoding import strategies
from geotoken_jax.inference.online_retrieval import OnlineRetrieval, image_resize_mode, uses_neighbors
from geotoken_jax.inference.predictor import Predictor
from geotoken_jax.inference.restore import RestoredModel, image_size, restore_aligner


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(inputs: Iterable[str]) -> list[str]:
  """Files as given, folders expanded to their image files (recursively, sorted)."""
  def walk(folder: epath.Path) -> Iterator[epath.Path]:
    for child in sorted(folder.iterdir(), key=str):  # iterdir: rglob is refused on object stores
      if child.is_dir():
        yield from walk(child)
      elif child.suffix.lower() in IMAGE_SUFFIXES:
        yield child

  out = []
  for item in inputs:
    path = epath.Path(item)
    out.extend(str(p) for p in walk(path)) if path.is_dir() else out.append(str(item))
  return out


def s2_cell_token(cell_id: int) -> str:
  """s2geometry's S2CellId.ToToken(): hex digits, trailing zeros removed."""
  return f"{int(cell_id):016x}".rstrip("0") or "X"


@dataclasses.dataclass
class FilePrediction:
  path: str
  candidates: list[dict] | None  # None when the file could not be read
  error: str | None = None


def load_image_file(path: str, size: int, mode: str = "default") -> np.ndarray:
  """The evaluation view of an image file: uint8 [size, size, 3] (shorter side
  resized to `size`, centre crop, by resize `mode` (data.image_resize_mode);
  exactly what evaluation of prepared data does)."""
  try:
    return images_lib.decode_resized(epath.Path(path).read_bytes(), size, mode=mode)
  except Exception as e:  # PIL raises many types for bad files  pylint: disable=broad-except
    raise ValueError(f"{type(e).__name__}: {e}") from None


def predict_files(restored: RestoredModel, paths: Sequence[str], *, strategy_text: str = "beam:5",
                  top_k: int = 5, batch_size: int = 32, seed: int = 0, cache_dir=None,
                  alignment_workdir: str | None = None) -> Iterator[FilePrediction]:
  """Top-k candidate cells of every file, in order, streamed batch by batch.

  A file that cannot be read is yielded with its error (and no candidates); the
  others are predicted.  Only this process's devices are used.
  """
  config, spec = restored.config, restored.spec
  online = None
  if not models.align.is_alignment(config.model) and uses_neighbors(config):
    online = OnlineRetrieval(config, restored.workdir, spec, restored.mesh)  # embeds + searches each batch
  elif not models.align.is_alignment(config.model) and config.model.encoder == "features":
    raise ValueError(f"this model's encoder is {config.model.encoder!r} and its config has no retrieval "
                     "block: predicting from image files needs an image encoder or a retrieval-augmented run "
                     "(whose aligner and gallery give the features and neighbours)")
  strategy = strategies.parse_strategy(strategy_text).check(spec)
  aligner = restore_aligner(config, restored.mesh, [strategy], alignment_workdir)
  predictor = Predictor.from_restored(restored, [strategy], num_candidates=top_k, seed=seed, cache_dir=cache_dir,
                                      aligner=aligner)
  size = online.image_size if online is not None else image_size(config.model)
  mode = image_resize_mode(config, online)
  divisor = sharding.global_batch_size_divisor(restored.mesh)
  batch_size = max(divisor, -(-int(batch_size) // divisor) * divisor)
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    pixels, readable, errors = [], [], {}
    for i, path in enumerate(chunk):
      try:
        pixels.append(load_image_file(path, size, mode))
        readable.append(i)
      except ValueError as e:
        errors[i] = str(e)
    results: dict[int, list[dict]] = {}
    if readable:
      images = np.zeros((batch_size, size, size, 3), np.uint8)
      images[:len(pixels)] = np.stack(pixels)
      index = (start + np.arange(batch_size)).astype(np.int32)  # sampling keys by position in the list
      local = {"image": images, "index": index}
      if online is not None:
        local = online(local)
      device_batch = sharding.make_global_batch(runtime.device_fields(local), restored.mesh)
      out = jax.tree.map(np.asarray, predictor(device_batch)[strategy.name])
      for row, i in enumerate(readable):
        results[i] = _candidates(out, row, spec)
    for i, path in enumerate(chunk):
      yield FilePrediction(path, results.get(i), errors.get(i))


def _candidates(out: dict, row: int, spec: s2.TokenSpec) -> list[dict]:
  keep = out["candidate_prob"][row] > 0
  tokens = out["candidate_tokens"][row][keep]
  ids = s2.tokens_to_cell_ids(tokens, spec)
  vertices = s2.tokens_to_vertices(tokens, spec)  # [k, 4, 2]
  return [{"rank": r + 1, "lat": float(out["candidate_latlng"][row, j, 0]),
           "lon": float(out["candidate_latlng"][row, j, 1]),
           "probability": float(out["candidate_prob"][row, j]), "s2_token": s2_cell_token(ids[r]),
           "tokens": "-".join(str(int(t)) for t in tokens[r]), "level": spec.level,
           "vertices": vertices[r].tolist()}
          for r, j in enumerate(np.flatnonzero(keep))]


def geojson(predictions: Iterable[FilePrediction]) -> dict:
  """A FeatureCollection with one cell polygon per candidate ([lon, lat] rings, closed)."""
  features = []
  for p in predictions:
    for c in p.candidates or ():
      ring = [[lon, lat] for lat, lon in c["vertices"]]
      lons = [q[0] for q in ring]
      if max(lons) - min(lons) > 180:  # a cell astride the antimeridian: keep the ring contiguous
        ring = [[lon + 360 if lon < 0 else lon, lat] for lon, lat in ring]
      ring.append(ring[0])
      properties = {k: v for k, v in c.items() if k != "vertices"}
      features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"image": p.path, **properties}})
  return {"type": "FeatureCollection", "features": features}
