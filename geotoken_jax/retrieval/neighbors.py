"""Neighbour lists: the index job (embeddings -> search -> files) and reading them back.

  run_index(embeddings_root, gallery="train", queries=("train", "validation", "test"),
            output_root, settings)

Inputs are embedding stores (geotoken_jax.embeddings) under EMBEDDINGS_ROOT/<split>/.
A record's search vector is the concatenation of its chosen fields (default
"image" and "loc_head"), each L2-normalized, divided by sqrt(#fields): the score
is the MEAN cosine over the fields (G3 / GeoToken search the sum of three cosines
with faiss IndexFlatIP; the mean only rescales it, so thresholds read the same
whatever the number of fields).

Leaks (retrieval.exclusion builds the rules, excluded inside the search so K
neighbours still come back).  Training lists (the query split IS the gallery
split) must never give a query itself or a duplicate of itself, else training
teaches the model to copy rank 0: a gallery row with the query's id (or row), a
row within `duplicate_km` with score >= `duplicate_similarity`, a row in the
query's `group` ("s2_cell:L": the earth benchmark's held-out splits are whole
level-6 cells).  Every other list (validation, test) is built as test time
runs: label-free, the same id only, never the query's coordinates; the manifest
records the regime.  Per split the manifest counts how often the unfiltered
rank 0 was excluded, and why.

Output per query split, OUTPUT_ROOT/<split>/:
  manifest.json              settings, gallery identity, blocks, statistics
  indices/<block:05d>.npy    int64 [n, K] gallery rows, best first (-1: none)
  scores/<block:05d>.npy     float32 [n, K] mean cosines (-inf: none)
Blocks of `block_rows` queries are written atomically and listed in the
manifest as they complete: a rerun skips complete splits and blocks.  Every
process runs the search in step; process 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from geotoken_jax import embeddings as embeddings_lib
from geotoken_jax import runtime, sharding
from geotoken_jax.retrieval import exclusion as exclusion_lib
from geotoken_jax.retrieval.search import ConcatRows, search as exact_search

FORMAT = "geotoken-neighbors"
VERSION = 1
MANIFEST = "manifest.json"

PERFORMANCE_SETTINGS = ("chunk_rows", "query_batch")
DEFAULT_SETTINGS = dict(
    fields=("image", "loc_head"), k=32, dtype="float32", chunk_rows=65536, query_batch=1024, margin=16,
    block_rows=65536, same_id=True, duplicate_km=1.0, duplicate_similarity=0.95, group="")


def settings_from_config(retrieval_config) -> dict:
  """The index settings a config's `retrieval` block names (the rest: defaults)."""
  out = dict(DEFAULT_SETTINGS)
  for key in out:
    name = "search_k" if key == "k" else key  # the config's k is how many the model reads
    if name in retrieval_config:
      value = retrieval_config[name]
      out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out


# ---------------------------------------------------------------------------
# Search vectors from an embedding store.


def split_dir_name(split: str) -> str:
  """A split's folder name under the embeddings / neighbours roots ("yfcc4k:test" -> "yfcc4k-test")."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", split)


def search_vectors(parts: Sequence[np.ndarray]) -> np.ndarray:
  """float32 [n, sum(dims)]: each field L2-normalized, concatenated, divided by sqrt(#fields)."""
  out = []
  for x in parts:
    x = np.asarray(x, np.float32)
    out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
  return np.concatenate(out, axis=1) / np.float32(math.sqrt(len(out)))


def check_fields(store, fields: Sequence[str]) -> tuple[str, ...]:
  fields = tuple(fields)
  if not fields:
    raise ValueError("retrieval needs at least one embedding field (e.g. image, loc_head)")
  missing = [f for f in fields if f not in store.fields]
  if missing:
    raise ValueError(f"{store.directory} has no field(s) {missing}; it has {list(store.fields)}")
  return fields


class SearchRows:
  """A store's search vectors as a row view (what search() reads the gallery from): slices
  and row gathers are read from the memory-mapped shards, never the whole store."""

  def __init__(self, store, fields: Sequence[str]):
    self.store = store
    self.fields = check_fields(store, fields)
    self.shape = (store.num_records, sum(store.dims[f] for f in self.fields))
    self.dtype = np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def take(self, indices) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    flat = indices.reshape(-1)
    rows = search_vectors([self.store.rows(f, flat) for f in self.fields])
    return rows.reshape(indices.shape + (self.shape[1],))

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      return self.take(np.arange(*key.indices(self.shape[0])))
    return self.take(key)


def store_identity(store) -> dict:
  """What names an embedding store's content: record count, dims and its shards' checksums."""
  digest = hashlib.sha256()
  for shard in store.manifest["shards"]:
    for name in sorted(shard["files"]):
      digest.update(str(shard["files"][name].get("sha256", "")).encode())
  return {"directory": str(store.directory), "records": store.num_records, "dims": store.dims,
          "checksum": digest.hexdigest()[:16]}


# ---------------------------------------------------------------------------
# The index job.


def _comparable(identity: dict | None) -> dict | None:
  """An identity without the performance-only settings (older manifests stored them) and the
  stores' folders."""
  if identity is None:
    return None
  settings = {k: v for k, v in identity.get("settings", {}).items() if k not in PERFORMANCE_SETTINGS}
  # Stores are named by their content (checksums), not their folder: a moved workdir still matches.
  stores = {side: {k: v for k, v in identity.get(side, {}).items() if k != "directory"}
            for side in ("query", "gallery")}
  return {**identity, **stores, "settings": settings}


def index_split(query_store, gallery_store, output_dir, *, settings: Mapping[str, Any], same_split: bool,
                mesh=None, progress: bool = True, overwrite: bool = False) -> dict:
  """Searches every record of query_store in gallery_store; writes output_dir; returns the manifest."""
  settings = {**DEFAULT_SETTINGS, **dict(settings)}
  settings["fields"] = tuple(settings["fields"])
  fields = check_fields(gallery_store, settings["fields"])
  check_fields(query_store, fields)
  if any(query_store.dims[f] != gallery_store.dims[f] for f in fields):
    raise ValueError(f"query and gallery dims differ: {query_store.dims} vs {gallery_store.dims}")
  output_dir = epath.Path(output_dir)
  k, block_rows = int(settings["k"]), int(settings["block_rows"])
  if k < 1 or block_rows < 1:
    raise ValueError(f"k and block_rows must be >= 1, got {k}, {block_rows}")
  # chunk_rows and query_batch change memory and speed, not results: a run may resume with others.
  result_settings = {k: v for k, v in settings.items() if k not in PERFORMANCE_SETTINGS}
  # The regime decides which leak rules apply (retrieval.exclusion): training lists may read
  # the query's coordinates, every other list may not.
  regime = exclusion_lib.TRAINING if same_split else exclusion_lib.TEST
  exclusion_lib.group_level(settings["group"])  # an unknown rule fails before anything is written
  identity = {"query": store_identity(query_store), "gallery": store_identity(gallery_store),
              "same_split": bool(same_split), "regime": regime,
              "settings": {**result_settings, "fields": list(fields)}}
  num_queries = query_store.num_records
  # Process 0 reads and writes; runtime.on_process_0 / fail_together raise its failures on every
  # process, so none waits in a collective for a process that already raised.
  writing = f"writing neighbour lists to {output_dir}"

  def open_manifest():
    path = output_dir / MANIFEST
    if path.exists():
      manifest = json.loads(path.read_text())
      if _comparable(manifest.get("identity")) == _comparable(json.loads(json.dumps(identity))):
        return manifest
      if not overwrite:
        raise ValueError(f"{output_dir} holds neighbours searched with other embeddings or settings; "
                         "pass overwrite=True (--overwrite) or choose another output")
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("indices", "scores"):
      (output_dir / name).mkdir(exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "identity": identity, "num_queries": num_queries,
                "k": k, "block_rows": block_rows, "blocks": [], "complete": False, "timings": []}
    runtime.write_atomic(path, json.dumps(manifest, indent=1).encode())
    return manifest

  manifest = runtime.broadcast_json(runtime.on_process_0(open_manifest, writing))
  if manifest["complete"]:
    manifest["stats"] = combine_stats([b["stats"] for b in manifest["blocks"]])
    return manifest

  if mesh is None:  # every device of every process: each host reads only its rows of each chunk
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  gallery = SearchRows(gallery_store, fields)
  keys = exclusion_lib.gallery_keys(settings, gallery_store.num_records, regime=regime, ids=gallery_store.ids,
                                    latlng=gallery_store.latlng if regime == exclusion_lib.TRAINING else None)
  num_blocks = math.ceil(num_queries / block_rows)
  start_time, searched = time.perf_counter(), 0
  for block in range(len(manifest["blocks"]), num_blocks):
    rows = np.arange(block * block_rows, min((block + 1) * block_rows, num_queries))
    queries = search_vectors([query_store.rows(f, rows) for f in fields])
    exclusion = exclusion_lib.query_exclusion(
        settings, keys, query_rows=rows,
        query_ids=query_store.rows("id", rows) if query_store.ids is not None else None,
        query_latlng=query_store.rows("latlng", rows) if regime == exclusion_lib.TRAINING else None)
    result = exact_search(queries, gallery, k, mesh=mesh, chunk_rows=int(settings["chunk_rows"]),
                               query_batch=int(settings["query_batch"]), dtype=str(settings["dtype"]),
                               margin=int(settings["margin"]), exclusion=exclusion, progress=progress)
    searched += rows.size

    def write_block(block=block, rows=rows, result=result):
      entry = {"rows": [int(rows[0]), int(rows[-1]) + 1], "stats": result.stats(),
               "files": {name: f"{name}/{block:05d}.npy" for name in ("indices", "scores")}}
      for name, array in (("indices", result.indices.astype(np.int64)), ("scores", result.scores.astype(np.float32))):
        runtime.write_atomic(output_dir / entry["files"][name], runtime.npy_bytes(array))
      manifest["blocks"].append(entry)
      manifest["complete"] = len(manifest["blocks"]) == num_blocks
      if manifest["complete"]:
        manifest["stats"] = combine_stats([b["stats"] for b in manifest["blocks"]])
      runtime.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1).encode())

    runtime.on_process_0(write_block, writing)
  seconds = time.perf_counter() - start_time

  def write_timings():
    manifest["timings"].append({"queries": searched, "seconds": seconds,
                                "queries_per_second": searched / max(seconds, 1e-9)})
    runtime.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1).encode())

  runtime.on_process_0(write_timings, writing)
  return runtime.broadcast_json(manifest)


def combine_stats(blocks: Sequence[dict]) -> dict:
  """The split's statistics from its blocks' SearchResult.stats(): counts summed, the fractions
  of queries whose unfiltered rank 0 was excluded (per reason) weighted by block size."""
  total = sum(int(b["queries"]) for b in blocks)
  out = {"queries": total, "k": int(blocks[0]["k"]) if blocks else 0}
  if not blocks:
    return out
  out["rank0_excluded_fraction"] = {
      reason: sum(float(b["rank0_excluded_fraction"][reason]) * int(b["queries"]) for b in blocks) / max(total, 1)
      for reason in blocks[0]["rank0_excluded_fraction"]}
  out["excluded_in_top_k"] = {reason: sum(int(b["excluded_in_top_k"][reason]) for b in blocks)
                              for reason in blocks[0]["excluded_in_top_k"]}
  out["queries_with_fewer_than_k"] = sum(int(b["queries_with_fewer_than_k"]) for b in blocks)
  return out


def run_index(embeddings_root, output_root, *, gallery: str = "train", queries: Sequence[str] = ("train",),
              settings: Mapping[str, Any] | None = None, mesh=None, progress: bool = True,
              overwrite: bool = False) -> dict:
  """Every query split against the gallery split; returns {split: manifest}."""
  root = epath.Path(embeddings_root)
  gallery_store = embeddings_lib.open_embeddings(root / split_dir_name(gallery))
  out = {}
  for split in queries:
    query_store = gallery_store if split == gallery else embeddings_lib.open_embeddings(root / split_dir_name(split))
    out[split] = index_split(query_store, gallery_store, epath.Path(output_root) / split_dir_name(split),
                             settings=settings or {}, same_split=split == gallery, mesh=mesh, progress=progress,
                             overwrite=overwrite)
  return out


# ---------------------------------------------------------------------------
# Reading neighbour lists back.


class Neighbors:
  """A complete neighbour file set: indices [Q, K] int64 and scores [Q, K] float32 (memory-mapped
  per block), the manifest and its statistics."""

  def __init__(self, directory: epath.Path, manifest: dict):
    self.directory = directory
    self.manifest = manifest
    self.num_queries = int(manifest["num_queries"])
    self.k = int(manifest["k"])
    self.stats = manifest.get("stats", {})

  def _load(self, name: str):
    """The blocks memory-mapped (local) or read (remote), as one row view (never concatenated)."""
    parts = []
    for block in self.manifest["blocks"]:
      path = self.directory / block["files"][name]
      local = str(path).startswith("/")
      parts.append(np.load(str(path), mmap_mode="r") if local else np.load(path.open("rb")))
    return parts[0] if len(parts) == 1 else ConcatRows(parts)

  def rows(self, name: str, indices) -> np.ndarray:
    """indices / scores of queries `indices` [n] -> [n, K]."""
    array = self.indices if name == "indices" else self.scores
    indices = np.asarray(indices, np.int64)
    return np.asarray(array[indices]) if isinstance(array, np.ndarray) else array.take(indices)

  @property
  def indices(self) -> np.ndarray:
    if not hasattr(self, "_indices"):
      self._indices = self._load("indices")
    return self._indices

  @property
  def scores(self) -> np.ndarray:
    if not hasattr(self, "_scores"):
      self._scores = self._load("scores")
    return self._scores

  @property
  def gallery_identity(self) -> dict:
    return self.manifest["identity"]["gallery"]

  @property
  def query_identity(self) -> dict:
    return self.manifest["identity"]["query"]


def open_neighbors(directory) -> Neighbors:
  directory = epath.Path(directory)
  path = directory / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: run the index job (python -m geotoken_jax.index) first")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"{path} is not a {FORMAT} version {VERSION} manifest")
  if not manifest["complete"]:
    done = manifest["blocks"][-1]["rows"][1] if manifest["blocks"] else 0
    raise ValueError(f"{directory} is incomplete ({done} of {manifest['num_queries']} queries): rerun the "
                     "index job with the same settings to finish it")
  return Neighbors(directory, manifest)
