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

The gallery is searched from its search matrix (search_matrix): the search vectors
in the search dtype, written once beside the store (process 0 reads each store shard
once; the others wait on a broadcast) and reused by every later split, rerun and by
online retrieval, so a query block costs one pass over the matrix and no
re-normalization.  A store on gs:// is read by byte ranges (embeddings.NpyRows); a
matrix on gs:// is copied once to the local disk (matrix_cache_dir), since every
query block passes over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
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
  """A store's search vectors as a row view (what search() reads the gallery from); never the
  whole store.  With a search matrix (search_matrix): slices (search's chunks) read the matrix,
  pre-normalized, in its dtype; gathers (search's float32 rescoring) read it too when it is
  float32, and the store's fields, normalized, when it is bfloat16 (so the returned scores stay
  the float32 ones).  Without one, both read the store's fields and normalize them."""

  def __init__(self, store, fields: Sequence[str], matrix: SearchMatrix | None = None):
    self.store = store
    self.fields = check_fields(store, fields)
    self.shape = (store.num_records, sum(store.dims[f] for f in self.fields))
    if matrix is not None and (tuple(matrix.fields) != self.fields or tuple(matrix.shape) != self.shape):
      raise ValueError(f"the search matrix {matrix.directory} holds {matrix.fields} {matrix.shape}, not "
                       f"{self.fields} {self.shape}")
    self.matrix = matrix
    self.dtype = matrix.dtype if matrix is not None else np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def take(self, indices) -> np.ndarray:
    """float32 search vectors of rows `indices` (any shape)."""
    if self.matrix is not None and self.matrix.dtype == np.float32:
      return self.matrix.take(indices)
    indices = np.asarray(indices, np.int64)
    flat = indices.reshape(-1)
    rows = search_vectors([self.store.rows(f, flat) for f in self.fields])
    return rows.reshape(indices.shape + (self.shape[1],))

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      if self.matrix is not None:
        return self.matrix[start:stop:step]
      if step == 1:
        return search_vectors([self.store.read(f, start, max(start, stop)) for f in self.fields])
      return self.take(np.arange(start, stop, step))
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
# The search matrix: a store's search vectors, written once beside it.
#
#   <store>/search=<field>+<field>=<dtype>/manifest.json   identity (fields, dtype, dims, rows,
#                                                          the store's checksum), shards
#   <store>/search=<field>+<field>=<dtype>/<shard:05d>.npy  rows of store shard `shard`: float32, or
#                                                          bfloat16 stored as its uint16 bits
# ('=' and '+' are in no field's name.)  A store with other content (its checksum), other fields
# or another dtype gets it rebuilt; a complete one is read as it is.  The index job reads its
# chunks from it (no re-normalization per query block) and online retrieval places it on the
# devices once.

MATRIX_FORMAT = "geotoken-search-matrix"
MATRIX_VERSION = 1
MATRIX_DTYPES = ("bfloat16", "float32")


def matrix_dir(store, fields: Sequence[str], dtype: str) -> epath.Path:
  """Where a store's search matrix of `fields` in `dtype` lives (inside the store's folder)."""
  return epath.Path(store.directory) / f"search={'+'.join(fields)}={dtype}"


def _matrix_identity(store, fields: Sequence[str], dtype: str) -> dict:
  return {"fields": list(fields), "dtype": dtype, "dims": [store.dims[f] for f in fields],
          "rows": store.num_records, "store": store_identity(store)["checksum"]}


class SearchMatrix:
  """A written search matrix [G, D] (float32 or bfloat16) as a row view: `[a:b]` and `take(rows)`
  read only the rows asked for (memory-mapped, or by byte ranges from gs://).  cache_dir: a
  remote matrix's shards are downloaded once into it and memory-mapped there (the index job,
  which passes over the matrix once per query block)."""

  def __init__(self, directory, manifest: dict, cache_dir=None):
    self.directory = epath.Path(directory)
    self.manifest = manifest
    self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    identity = manifest["identity"]
    self.fields = tuple(identity["fields"])
    self.dtype = np.dtype(ml_dtypes.bfloat16) if identity["dtype"] == "bfloat16" else np.dtype(np.float32)
    self._stored = np.dtype(np.uint16) if identity["dtype"] == "bfloat16" else np.dtype(np.float32)
    self.shape = (int(identity["rows"]), int(sum(identity["dims"])))
    self._starts = np.asarray([s["rows"][0] for s in manifest["shards"]], np.int64)
    self._files: dict[int, embeddings_lib.NpyRows] = {}

  def __getstate__(self) -> dict:
    return {"directory": str(self.directory), "manifest": self.manifest, "cache_dir": self.cache_dir}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["directory"], state["manifest"], state.get("cache_dir"))

  def __repr__(self) -> str:
    return f"SearchMatrix({str(self.directory)!r}, shape={self.shape}, dtype={self.dtype})"

  @property
  def ndim(self) -> int:
    return 2

  @property
  def nbytes(self) -> int:
    return self.shape[0] * self.shape[1] * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def _file(self, number: int) -> embeddings_lib.NpyRows:
    if number not in self._files:
      shard = self.manifest["shards"][number]
      file = embeddings_lib.NpyRows(self.directory / shard["path"], cache_dir=self.cache_dir, sha256=shard["sha256"])
      expected = ((shard["rows"][1] - shard["rows"][0], self.shape[1]), self._stored)
      if (file.shape, file.dtype) != expected:
        raise ValueError(f"{file.path} holds {file.dtype} {file.shape}, its manifest says {expected[1]} {expected[0]}")
      self._files[number] = file
    return self._files[number]

  def take(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.size and indices.dtype.kind not in "iu":
      raise TypeError(f"row indices must be integers, got {indices.dtype}")
    flat = indices.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
      raise IndexError(f"rows outside [0, {self.shape[0]}) of {self.directory}")
    out = embeddings_lib.gather_rows(self._file, self._starts, flat).view(self.dtype)
    return out.reshape(indices.shape + (self.shape[1],))

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      if step != 1:
        return self.take(np.arange(start, stop, step))
      return embeddings_lib.read_rows(self._file, self._starts, self.shape[0], start, stop).view(self.dtype)
    if isinstance(key, (int, np.integer)):
      return self.take(np.asarray([key]))[0]
    return self.take(key)


def matrix_cache_dir() -> str | None:
  """Where the index job keeps local copies of remote search matrices: $GEOTOKEN_MATRIX_CACHE
  ("" or "none": no copies, byte-range reads) or ~/.cache/geotoken/search-matrix.  Files are
  named by their sha256, so a rebuilt matrix never reads a stale copy (old ones may be deleted)."""
  value = os.environ.get("GEOTOKEN_MATRIX_CACHE")
  if value is None:
    return os.path.join(os.path.expanduser("~"), ".cache", "geotoken", "search-matrix")
  return None if value.strip().lower() in ("", "none", "0", "off") else value


def _usable_cache(directory: epath.Path, manifest: dict, cache_dir) -> str | None:
  """cache_dir when the matrix is remote and the disk holds the copies it lacks, else None."""
  if cache_dir is None or not embeddings_lib.is_remote(directory):
    return None
  cache_dir = os.fspath(cache_dir)
  missing = sum(int(s["bytes"]) for s in manifest["shards"]
                if not os.path.exists(os.path.join(cache_dir, f"{s['sha256']}.npy")))
  try:
    os.makedirs(cache_dir, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
  except OSError as e:
    logging.warning("search matrix %s: no local copy (%s); reading it by byte ranges", directory, e)
    return None
  if missing and free < missing * 1.05 + (1 << 30):
    logging.warning("search matrix %s: %d bytes to copy, %d free in %s; reading it by byte ranges instead",
                    directory, missing, free, cache_dir)
    return None
  return cache_dir


def search_matrix(store, fields: Sequence[str], dtype: str = "float32", *, progress: bool = True,
                  cache_dir=None) -> SearchMatrix | None:
  """The store's search matrix of `fields` in `dtype`: the one written beside the store when it
  matches (fields, dtype, the store's checksum), else written now, resuming a partial one.
  Every process calls it in step: process 0 checks and writes (reading each store shard once),
  the others wait on the broadcast of its manifest.  cache_dir: keep local copies of a remote
  matrix's shards there (SearchMatrix), when the disk has room.  None (with a warning) where
  the store's folder cannot be written (a read-only bucket): callers then normalize the store's
  rows as they read them (SearchRows without a matrix)."""
  fields = check_fields(store, fields)
  if dtype not in MATRIX_DTYPES:
    raise ValueError(f"the search dtype must be one of {MATRIX_DTYPES}, got {dtype!r}")
  directory = matrix_dir(store, fields, dtype)
  identity = _matrix_identity(store, fields, dtype)

  def build() -> dict:
    try:
      return write()
    except OSError as e:  # e.g. a read-only bucket or folder
      return {"unwritable": f"{type(e).__name__}: {e}"}

  def write() -> dict:
    path = directory / MANIFEST
    manifest = None
    if path.exists():
      try:
        manifest = json.loads(path.read_text())
      except (OSError, ValueError):
        manifest = None
      if not (isinstance(manifest, dict) and manifest.get("format") == MATRIX_FORMAT
              and manifest.get("version") == MATRIX_VERSION and manifest.get("identity") == identity):
        manifest = None
        directory.rmtree()  # another store's (re-embedded), other fields or dtype
      else:
        complete = []
        for number, shard in enumerate(manifest["shards"]):
          if shard.get("shard") != number or not (directory / shard["path"]).exists():
            break
          complete.append(shard)
        manifest["complete"] = manifest["complete"] and len(complete) == len(manifest["shards"])
        manifest["shards"] = complete
    if manifest is not None and manifest["complete"]:
      return manifest
    if manifest is None:
      directory.mkdir(parents=True, exist_ok=True)
      manifest = {"format": MATRIX_FORMAT, "version": MATRIX_VERSION, "identity": identity, "shards": [],
                  "complete": False}
    store_shards = store.manifest["shards"]
    if progress:
      print(f"[search matrix] writing {directory} ({store.num_records} rows, {sum(identity['dims'])} x {dtype})",
            flush=True)
    for number in range(len(manifest["shards"]), len(store_shards)):
      first, end = store_shards[number]["rows"]
      block = search_vectors([store.read(f, first, end) for f in fields])  # one read of each field's shard
      if dtype == "bfloat16":
        block = block.astype(ml_dtypes.bfloat16).view(np.uint16)
      payload = runtime.npy_bytes(block)
      relative = f"{number:05d}.npy"
      runtime.write_atomic(directory / relative, payload)
      manifest["shards"].append({"shard": number, "rows": [int(first), int(end)], "path": relative,
                                 "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
      runtime.write_atomic(path, json.dumps(manifest, indent=1).encode())
    manifest["complete"] = True
    runtime.write_atomic(path, json.dumps(manifest, indent=1).encode())
    return manifest

  manifest = runtime.broadcast_json(runtime.on_process_0(build, f"writing the search matrix {directory}"))
  if "unwritable" in manifest:
    logging.warning("cannot write the search matrix %s (%s): searching without it (every pass normalizes the "
                    "store's rows again)", directory, manifest["unwritable"])
    return None
  return SearchMatrix(directory, manifest, _usable_cache(directory, manifest, cache_dir))


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


def identity_differences(old: dict | None, new: dict) -> list[str]:
  """What differs between two list identities (the comparable parts), e.g. "group: '' -> 's2_cell:6'",
  "gallery embeddings (checksum ... -> ...)"."""
  old, new = _comparable(old) or {}, _comparable(new) or {}
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if key == "settings":
      a, b = a or {}, b or {}
      out += [f"{name}: {a.get(name)!r} -> {b.get(name)!r}" for name in sorted(set(a) | set(b))
              if a.get(name) != b.get(name)]
    elif key in ("query", "gallery") and a != b:
      out.append(f"{key} embeddings (checksum {(a or {}).get('checksum')} -> {(b or {}).get('checksum')})")
    elif a != b:
      out.append(f"{key}: {a!r} -> {b!r}")
  return out


def index_split(query_store, gallery_store, output_dir, *, settings: Mapping[str, Any], same_split: bool,
                mesh=None, progress: bool = True, overwrite: bool = False, use_matrix: bool = True) -> dict:
  """Searches every record of query_store in gallery_store; writes output_dir; returns the manifest.

  use_matrix: search the gallery's search matrix (search_matrix: written once beside the store,
  reused by later calls) rather than normalizing its fields again for every query block; the
  lists are the same.  A self-search (the query store is the gallery's) with a float32 matrix
  reads its queries from the matrix too.
  """
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
      differences = identity_differences(manifest.get("identity"), json.loads(json.dumps(identity)))
      if not differences:
        return manifest
      if not overwrite:
        raise ValueError(f"{output_dir} holds neighbours searched with other embeddings or settings "
                         f"({'; '.join(differences)}); pass overwrite=True (--overwrite) or choose another output")
      print(f"[index] {output_dir}: rebuilding the lists, searched with other embeddings or settings "
            f"({'; '.join(differences)})", flush=True)
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
  # A remote matrix is copied to the local disk once (matrix_cache_dir): every query block passes
  # over it, and the rescoring gathers rows from it.
  matrix = (search_matrix(gallery_store, fields, str(settings["dtype"]), progress=progress,
                          cache_dir=matrix_cache_dir()) if use_matrix else None)
  gallery = SearchRows(gallery_store, fields, matrix)
  # A self-search's queries are the gallery's rows: read from a float32 matrix, exact as it is.
  queries_from_matrix = (matrix is not None and matrix.dtype == np.float32
                         and identity["query"]["checksum"] == identity["gallery"]["checksum"]
                         and query_store.num_records == gallery_store.num_records)
  keys = exclusion_lib.gallery_keys(settings, gallery_store.num_records, regime=regime, ids=gallery_store.ids,
                                    latlng=gallery_store.latlng if regime == exclusion_lib.TRAINING else None)
  num_blocks = math.ceil(num_queries / block_rows)
  start_time, searched = time.perf_counter(), 0
  for block in range(len(manifest["blocks"]), num_blocks):
    rows = np.arange(block * block_rows, min((block + 1) * block_rows, num_queries))
    first, end = int(rows[0]), int(rows[-1]) + 1
    queries = (matrix[first:end] if queries_from_matrix
               else search_vectors([query_store.read(f, first, end) for f in fields]))
    exclusion = exclusion_lib.query_exclusion(
        settings, keys, query_rows=rows,
        query_ids=query_store.read("id", first, end) if "id" in query_store.columns else None,
        query_latlng=query_store.read("latlng", first, end) if regime == exclusion_lib.TRAINING else None)
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
              overwrite: bool = False, use_matrix: bool = True) -> dict:
  """Every query split against the gallery split; returns {split: manifest}.  The gallery's
  search matrix is written by the first split that searches and read by the others."""
  root = epath.Path(embeddings_root)
  gallery_store = embeddings_lib.open_embeddings(root / split_dir_name(gallery))
  out = {}
  for split in queries:
    query_store = gallery_store if split == gallery else embeddings_lib.open_embeddings(root / split_dir_name(split))
    out[split] = index_split(query_store, gallery_store, epath.Path(output_root) / split_dir_name(split),
                             settings=settings or {}, same_split=split == gallery, mesh=mesh, progress=progress,
                             overwrite=overwrite, use_matrix=use_matrix)
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

  # Pickled (e.g. into grain worker processes) as its directory and manifest: the blocks are
  # memory-mapped again, lazily, where it is unpickled (a memmap pickles its whole contents).
  def __getstate__(self) -> dict:
    return {"directory": str(self.directory), "manifest": self.manifest}

  def __setstate__(self, state: dict) -> None:
    self.__init__(epath.Path(state["directory"]), state["manifest"])

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
