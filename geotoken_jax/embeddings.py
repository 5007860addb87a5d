"""Embedding stores: every record of a source through an embedding function, on disk.

  write_embeddings   a source's records through `embed_fn` (sharded over a mesh,
                     every process in step), stored as .npy shards; resumable
  open_embeddings    the stored arrays, memory-mapped shard by shard, or read by
                     byte ranges from gs:// (what retrieval reads its gallery from)

Layout of an output directory (local or gs://, written through etils.epath):

  manifest.json            format version, settings, fields and their dims, the
                           shards (row ranges, files, sha256), non-finite counts,
                           the caller's model identity (`extra`: inference.run_embedding
                           records the aligner's workdir, step and parameter checksum;
                           a tiny-image store {"embedding": "tiny_image", size, colour,
                           image_size, resize}: aligner_identity), timings
  <name>/<shard:05d>.npy   rows [shard * shard_rows, (shard + 1) * shard_rows) of
                           one array, np.save format (np.load(mmap_mode="r")):
    <field>                an embedding, float16 or float32 [n, dim]
    latlng                 float32 [n, 2]
    index                  int64 [n]: the record's row in the source
    tokens                 int32 [n, P] (when the source has tokens)
    id                     int64 [n] when the source's ids are integers, else
                           fixed-width unicode [n] ('<U{w}', w the longest id of
                           the shard): plain arrays, no pickle, memory-mappable

Shards are cut from the record order, not from the batches, so the files are
identical whatever the batch size, device count or process count (given an
embed_fn whose rows do not depend on the batch).  A shard's files are written
under a temporary name and renamed when complete; the manifest, rewritten
(atomically) after every shard, lists the complete ones: a rerun skips them and
restarts at the first batch holding a row of the first missing shard.

Multi-host: every process loads its rows of each batch and runs embed_fn in
step; the embeddings and host fields are all-gathered and process 0 alone
writes.  That is simple (one writer, one manifest, no merge) and cheap: MP16's
4.7M images with three 768-d float16 fields are ~4.7 KB a row, ~22 GB in all;
at a few thousand images/s of ViT-L inference that is ~15 MB/s reaching process
0, far below a host's network or a bucket's write bandwidth.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from geotoken_jax import data, runtime, sharding

FORMAT = "geotoken-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
# Per-record columns stored beside the embedding fields (names no field may take).
COLUMNS = ("latlng", "index", "tokens", "id")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class SettingsMismatchError(ValueError):
  """An output directory holds embeddings written with other settings."""


# ---------------------------------------------------------------------------
# The writer's identity.

# What a store records of the model that wrote it (inference.run_embedding's manifest_extra,
# from RestoredModel.identity()): its workdir, checkpoint step and a digest of its parameters.
ALIGNER_KEYS = ("workdir", "step", "params")
# What decides whether a store is stale: the aligner's content, not its folder (a moved or
# copied workdir, e.g. to gs://, holds the same aligner).
ALIGNER_CONTENT_KEYS = ("step", "params")


# A store written by something else than an aligner says so: extra["embedding"] names the
# embedder (an aligner's stores carry no such key).  Per embedder, the keys of its identity and
# those that decide the vectors (compared to decide whether a store is stale or usable).
ALIGNER = "aligner"
IDENTITY_KEYS = {ALIGNER: ALIGNER_KEYS,
                 "tiny_image": ("embedding", "size", "colour", "image_size", "resize")}
CONTENT_KEYS = {ALIGNER: ALIGNER_CONTENT_KEYS,
                "tiny_image": ("embedding", "size", "colour", "image_size", "resize")}


def embedder_kind(identity: Mapping[str, Any]) -> str:
  """"aligner" or the embedding an identity (or a manifest's `extra`) names, e.g. "tiny_image"."""
  return str(identity.get("embedding") or ALIGNER)


def aligner_identity(manifest: Mapping[str, Any]) -> dict:
  """The identity of the embedder a store's manifest records: {"workdir", "step", "params"} of an
  aligner (None where it records none: "params" is missing from stores written before parameter
  checksums), or the identity keys of another embedder (IDENTITY_KEYS, e.g. a tiny-image store's
  {"embedding": "tiny_image", "size", "colour", "image_size", "resize"})."""
  extra = manifest.get("extra") or {}
  kind = embedder_kind(extra)
  keys = IDENTITY_KEYS.get(kind) or tuple(k for k in extra if k not in ("workdir", "split", "tokens", "model"))
  return {key: extra.get(key) for key in keys}


def differing_keys(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """The content keys whose values differ between two embedder identities: ["embedding"] alone
  when they name different embedders (an aligner and a tiny-image embedding), else those of
  CONTENT_KEYS of their kind (a value the store does not record differs from any)."""
  kind = embedder_kind(current)
  if embedder_kind(stored) != kind:
    return ["embedding"]
  keys = CONTENT_KEYS.get(kind) or sorted((set(stored) | set(current)) - {"workdir"})
  return [key for key in keys if stored.get(key) is None or stored.get(key) != current.get(key)]


def embedder_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """differing_keys as "KEY: STORED -> CURRENT" (e.g. "params: '0123…' -> 'fedc…'", "embedding:
  'aligner' -> 'tiny_image'"); empty when the same embedder (whatever its folder) wrote both."""
  out = []
  for key in differing_keys(stored, current):
    old, new = (embedder_kind(stored), embedder_kind(current)) if key == "embedding" else (stored.get(key),
                                                                                          current.get(key))
    out.append(f"{key}: {'(not recorded)' if old is None else repr(old)} -> {new!r}")
  return out


def aligner_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                        keys: Sequence[str] = ALIGNER_KEYS) -> list[str]:
  """Each of `keys` whose values differ, as "KEY: STORED -> CURRENT" (a value the store does not
  record differs from any; workdirs compare as absolute paths)."""
  out = []
  for key in keys:
    old, new = stored.get(key), current.get(key)
    if key == "workdir" and old is not None and new is not None:
      old, new = _normal_path(old), _normal_path(new)
    if old is None or old != new:
      out.append(f"{key}: {'(not recorded)' if stored.get(key) is None else repr(stored.get(key))} -> "
                 f"{current.get(key)!r}")
  return out


def _normal_path(path) -> str:
  path = str(path)
  return path if "://" in path else os.path.normpath(os.path.abspath(path))


# ---------------------------------------------------------------------------
# Ids.


def _id_column(values: np.ndarray) -> np.ndarray:
  """Ids as stored: int64 when the source's are integers, else fixed-width unicode."""
  values = np.asarray(values)
  if values.dtype.kind in "iu":
    return values.astype(np.int64)
  if values.dtype.kind in "USO":
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()], dtype=str)
  raise ValueError(f"source ids must be integers or strings, got {values.dtype}")


def _id_kind(array: np.ndarray) -> str:
  return "int64" if array.dtype.kind == "i" else "unicode"


# ---------------------------------------------------------------------------
# The batches.


def _check_outputs(out: Any, global_batch: int, fields: Sequence[str] | None) -> list[str]:
  """The names of the fields to store; a clear error for a malformed embed_fn output."""
  if not isinstance(out, Mapping) or not out:
    raise ValueError(f"embed_fn must return a dict of [batch, dim] arrays, got {type(out).__name__}")
  names = list(fields) if fields is not None else sorted(out)
  missing = [n for n in names if n not in out]
  if missing:
    raise ValueError(f"embed_fn returned no field {missing}; it returned {sorted(out)}")
  for name in names:
    if name in COLUMNS or not _NAME.fullmatch(name):
      raise ValueError(f"field name {name!r} is reserved or not a file name (reserved: {COLUMNS})")
    x = out[name]
    shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if len(shape) != 2 or shape[0] != global_batch:
      raise ValueError(f"embed_fn's field {name!r} has shape {shape}: expected [global batch {global_batch}, dim]")
    if dtype.kind != "f":
      raise ValueError(f"embed_fn's field {name!r} is {dtype}: embeddings must be floating point")
  return names


def embedded_batches(embed_fn: Callable[[dict], Mapping[str, jax.Array]], source, mesh, *,
                     global_batch_size: int, start_batch: int = 0, fields: Sequence[str] | None = None
                     ) -> Iterator[tuple[np.ndarray, dict, dict]]:
  """(global rows [G], gathered host fields, gathered embeddings) for every global batch.

  The row arithmetic of inference.predictor.predict_batches: process p loads rows
  (number * P + p) * B + arange(B) of batch `number`, so the global batch holds
  rows number * G + arange(G) in order; rows >= len(source) are padding (the last
  record repeated).  Every process runs this in step (collectives).  Host
  fields: latlng, and tokens / id when the source has them.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  batch_size = global_batch_size // process_count
  num_batches = data.num_eval_batches(len(source), batch_size=batch_size, process_count=process_count)
  batches = iter(data.eval_batches(source, batch_size=batch_size, process_index=process_index,
                                   process_count=process_count, start_batch=start_batch))
  for number in range(start_batch, num_batches):
    local = next(batches)  # its "index": the rows' numbers in the source
    if "latlng" not in local:
      raise ValueError(f"the records of {source!r} have no latlng")
    out = embed_fn(sharding.make_global_batch(runtime.device_fields(local), mesh))
    names = _check_outputs(out, global_batch_size, fields)
    embedded = {name: runtime.allgather(out[name]) for name in names}
    host = {"latlng": runtime.allgather(np.asarray(local["latlng"], np.float32))}
    if "tokens" in local:
      host["tokens"] = runtime.allgather(np.asarray(local["tokens"], np.int32))
    if "id" in local:
      ids = np.asarray(local["id"])
      host["id"] = (runtime.allgather_text(ids) if ids.dtype.kind in "USO" and process_count > 1
                    else runtime.allgather(ids))
    yield number * global_batch_size + np.arange(global_batch_size), host, embedded


# ---------------------------------------------------------------------------
# Writing.


def _settings(num_records: int, dtype: str, shard_rows: int, fields, extra) -> dict:
  return {"num_records": num_records, "dtype": dtype, "shard_rows": shard_rows,
          "fields": None if fields is None else list(fields), "extra": extra}


def _read_existing(output_dir: epath.Path, overwrite: bool) -> dict:
  """Process 0: {"manifest": the directory's manifest or None} with its shards cut to
  the complete prefix whose files exist; or {"error": why}. Overwrite deletes."""
  path = output_dir / MANIFEST
  try:
    if not path.exists():
      return {"manifest": None}
    manifest = json.loads(path.read_text())
    if overwrite:
      for name in list(manifest.get("fields") or {}) + list(manifest.get("columns") or {}):
        if (output_dir / name).exists():
          (output_dir / name).rmtree()
      path.unlink()
      return {"manifest": None}
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      return {"error": f"{path} is not a {FORMAT} version {VERSION} manifest: use a new output dir "
                       "or pass overwrite=True"}
    complete = []
    for number, shard in enumerate(manifest["shards"]):
      if shard["shard"] != number or not all((output_dir / f["path"]).exists() for f in shard["files"].values()):
        break
      complete.append(shard)
    manifest["shards"] = complete
    return {"manifest": manifest}
  except (OSError, ValueError, KeyError, TypeError) as e:
    return {"error": f"cannot read {path} ({type(e).__name__}: {e}): use a new output dir or pass overwrite=True"}


def _check_resume(manifest: dict, settings: dict, output_dir) -> None:
  old = manifest["settings"]
  keys = [k for k in ("num_records", "dtype", "shard_rows", "extra") if old.get(k) != settings[k]]
  if settings["fields"] is not None and manifest.get("fields") and list(manifest["fields"]) != settings["fields"]:
    keys.append("fields")
  if keys:
    diffs = "; ".join(f"{k}: stored {old.get(k) if k != 'fields' else list(manifest['fields'])!r}, "
                      f"now {settings[k]!r}" for k in keys)
    raise SettingsMismatchError(f"{output_dir} holds embeddings written with other settings ({diffs}): "
                                "use a new output dir, or pass overwrite=True to replace them")


def _check_layout(manifest: dict, fields: dict, columns: dict, output_dir) -> None:
  """The first batch's fields and columns against those the stored shards have."""
  for what, now in (("fields", fields), ("columns", columns)):
    stored = manifest.get(what)
    if stored and stored != now:
      raise SettingsMismatchError(f"{output_dir} holds embeddings with {what} {stored}, embed_fn and the source "
                                  f"now give {now}: use a new output dir, or pass overwrite=True")


def _shard_bounds(shard: int, shard_rows: int, num_records: int) -> tuple[int, int]:
  return shard * shard_rows, min((shard + 1) * shard_rows, num_records)


def write_embeddings(embed_fn: Callable[[dict], Mapping[str, jax.Array]], source, output_dir, *,
                     mesh: jax.sharding.Mesh, global_batch_size: int, dtype: str = "float16",
                     fields: Sequence[str] | None = None, manifest_extra: Mapping[str, Any] | None = None,
                     shard_rows: int = 65536, overwrite: bool = False, progress: bool = True) -> dict:
  """Every record of `source` through `embed_fn`, stored in `output_dir` (see the module
  docstring); returns the manifest (on every process).

  embed_fn(device batch) -> {field: [G, dim] float array}: the batch is global
  and sharded over the mesh's batch axes (sharding.make_global_batch of the
  numeric fields, with "index" the record row and "mask" False on padding).
  fields: the outputs to store (default all).  dtype: "float16" or "float32"
  (cast on the host).  manifest_extra: the caller's model identity (workdir,
  step, config): a rerun with another one is refused.  Resumable: complete
  shards are kept; other settings are refused unless overwrite=True.
  Non-finite values are stored as they are, counted in the manifest
  ("nonfinite": records per field) and warned about.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  num_records = len(source)
  if num_records < 1:
    raise ValueError(f"{source!r} has no records: nothing to embed")
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  divisor = sharding.global_batch_size_divisor(mesh)
  if global_batch_size < 1 or global_batch_size % divisor or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the mesh's "
                     f"{divisor} batch devices and of the {process_count} processes")
  if shard_rows < 1:
    raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
  if fields is not None:
    fields = list(fields)
    if not fields or len(set(fields)) != len(fields):
      raise ValueError(f"fields must be distinct names, got {fields}")
  output_dir = epath.Path(output_dir)
  settings = _settings(num_records, dtype, int(shard_rows), fields, runtime.jsonable(dict(manifest_extra or {})))

  existing = _read_existing(output_dir, overwrite) if process_index == 0 else None
  existing = runtime.broadcast_json(existing)  # every process decides alike (no one waits on a failed one)
  if "error" in existing:
    raise SettingsMismatchError(existing["error"])
  manifest = existing["manifest"]
  if manifest is not None:
    _check_resume(manifest, settings, output_dir)
  else:
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "settings": settings,
                "num_records": num_records, "shard_rows": int(shard_rows), "dtype": dtype,
                "fields": {}, "columns": {}, "shards": [], "nonfinite": {},
                "source": {"len": num_records, "name": getattr(source, "name", None),
                           "repr": repr(source)[:1000]},
                "extra": settings["extra"], "timings": []}
  num_shards = math.ceil(num_records / shard_rows)
  next_shard = len(manifest["shards"])
  # Process 0 writes; every write is followed by runtime.fail_together, so a failed write (a
  # full disk, a lost bucket permission) raises on every process instead of leaving the others
  # waiting in the next batch's collective.
  writing = f"writing embeddings to {output_dir}"
  if next_shard == num_shards:  # nothing left to compute
    if not manifest["complete"]:
      runtime.on_process_0(lambda: runtime.write_atomic(
          output_dir / MANIFEST, json.dumps(dict(manifest, complete=True), indent=1).encode()), writing)
    return dict(manifest, complete=True)

  def start_manifest():
    output_dir.mkdir(parents=True, exist_ok=True)
    runtime.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1).encode())

  runtime.on_process_0(start_manifest, writing)

  start_row = next_shard * shard_rows
  start_batch = start_row // global_batch_size
  num_batches = data.num_eval_batches(num_records, batch_size=global_batch_size // process_count,
                                      process_count=process_count)
  bar = runtime.progress(num_batches, "embeddings", start_batch) if progress else None
  pending: dict[str, list[np.ndarray]] = {}
  pending_rows, computed, first_batch = 0, 0, True

  def absorb(rows, host, embedded, keep):
    """Process 0: buffers a batch's kept rows and writes every shard they complete."""
    nonlocal pending, pending_rows, next_shard
    with np.errstate(over="ignore"):  # float16 overflow: counted as non-finite in _write_shard
      columns = {k: v[keep].astype(dtype) for k, v in embedded.items()}
    columns.update({"latlng": host["latlng"][keep], "index": rows[keep].astype(np.int64)})
    if "tokens" in host:
      columns["tokens"] = host["tokens"][keep]
    if "id" in host:
      columns["id"] = host["id"][keep]
    for k, v in columns.items():
      pending.setdefault(k, []).append(v)
    pending_rows += int(keep.sum())
    # Cut every shard the buffered rows complete (a batch may straddle shards).
    while next_shard < num_shards:
      first, end = _shard_bounds(next_shard, shard_rows, num_records)
      if pending_rows < end - first:
        break
      parts = {k: np.concatenate(v) for k, v in pending.items()}
      taken = end - first
      _write_shard(output_dir, manifest, next_shard, first, {k: v[:taken] for k, v in parts.items()})
      pending = {k: [v[taken:]] for k, v in parts.items()}
      pending_rows -= taken
      next_shard += 1

  start = time.perf_counter()
  try:
    for rows, host, embedded in embedded_batches(embed_fn, source, mesh, global_batch_size=global_batch_size,
                                                 start_batch=start_batch, fields=fields):
      if first_batch:
        layout_fields = {k: {"dim": int(v.shape[1]), "dtype": dtype} for k, v in embedded.items()}
        layout_columns = {"latlng": {"dtype": "float32", "shape": [2]}, "index": {"dtype": "int64", "shape": []}}
        if "tokens" in host:
          layout_columns["tokens"] = {"dtype": "int32", "shape": [int(host["tokens"].shape[1])]}
        if "id" in host:
          layout_columns["id"] = {"dtype": _id_kind(_id_column(host["id"][:1])), "shape": []}
        _check_layout(manifest, layout_fields, layout_columns, output_dir)
        manifest["fields"], manifest["columns"] = layout_fields, layout_columns
        first_batch = False
      keep = (rows >= start_row) & (rows < num_records)  # padding and rows of complete shards dropped
      computed += int(keep.sum())
      runtime.on_process_0(functools.partial(absorb, rows, host, embedded, keep), writing)
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - start

  def finish():
    if next_shard != num_shards or pending_rows:
      raise RuntimeError(f"internal error: {next_shard} of {num_shards} shards written, {pending_rows} rows left")
    manifest["complete"] = True
    manifest["timings"].append({"images": computed, "seconds": seconds, "images_per_s": computed / max(seconds, 1e-9),
                                "first_batch": start_batch, "global_batch_size": global_batch_size,
                                "process_count": process_count, "device_count": int(mesh.size)})
    runtime.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    for name, count in manifest["nonfinite"].items():
      if count:
        logging.warning("embeddings %s: %d of %d records hold NaN or inf in field %r (stored as they are; "
                        "float16 overflows past 65504): see manifest.json nonfinite", output_dir, count,
                        num_records, name)
    if progress:
      print(f"embedded {computed} images in {seconds:.1f} s: {computed / max(seconds, 1e-9):.1f} images/s "
            f"-> {output_dir}")

  runtime.on_process_0(finish, writing)
  return runtime.broadcast_json(manifest if process_index == 0 else None)


def _write_shard(output_dir: epath.Path, manifest: dict, shard: int, first: int, columns: dict) -> None:
  """Writes one shard's files (each atomically), then records it in the manifest."""
  files, nonfinite = {}, {}
  for name, values in columns.items():
    if name == "id":
      values = _id_column(values)
      if _id_kind(values) != manifest["columns"]["id"]["dtype"]:
        raise ValueError(f"ids of shard {shard} are {values.dtype}, earlier ones {manifest['columns']['id']['dtype']}")
    if name in manifest["fields"]:
      nonfinite[name] = int((~np.isfinite(values)).any(axis=1).sum())
    payload = runtime.npy_bytes(values)
    relative = f"{name}/{shard:05d}.npy"
    (output_dir / name).mkdir(parents=True, exist_ok=True)
    runtime.write_atomic(output_dir / relative, payload)
    files[name] = {"path": relative, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
  rows = len(next(iter(columns.values())))
  manifest["shards"].append({"shard": shard, "rows": [first, first + rows], "files": files, "nonfinite": nonfinite})
  manifest["nonfinite"] = {k: sum(s["nonfinite"].get(k, 0) for s in manifest["shards"]) for k in manifest["fields"]}
  runtime.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1).encode())


# ---------------------------------------------------------------------------
# Reading.


# Remote files (gs://, any fsspec URL) are never downloaded whole for a gather: a shard's .npy
# header is read once (its first bytes give the data offset, dtype and shape), then only the
# byte ranges of the rows asked for, nearby rows coalesced into one range (gaps of up to
# RANGE_GAP_BYTES), every range of one read issued in one fsspec cat_ranges call (concurrent
# requests on gcsfs).  A contiguous read (a slice, a full scan) is one range per shard.  Only
# the headers are kept, so a read costs the bytes of its rows plus the coalesced gaps whatever
# the shard size.  Local files are memory-mapped.

RANGE_GAP_BYTES = 1 << 16  # a gap up to this is read through rather than split into two requests
_HEADER_BYTES = 256  # the first read of a remote file: holds this module's .npy headers (128 bytes)


def is_remote(path) -> bool:
  return "://" in str(path)


def _fsspec_of(path) -> tuple[Any, str] | None:
  """(fsspec filesystem, its path) of a remote URL; None where fsspec cannot serve it (then
  epath's open + seek + read is used)."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.core.url_to_fs(str(path))
  except (ImportError, ValueError):
    return None


class _RangeReader:
  """Byte ranges of remote files, batched per filesystem."""

  def __init__(self):
    self._requests: list[tuple[Any, epath.Path, int, int, bool]] = []

  def add(self, handle, path: epath.Path, start: int, stop: int, *, exact: bool = True) -> int:
    """Queues bytes [start, stop) of `path` (handle: its _fsspec_of); exact=False allows a shorter
    file."""
    self._requests.append((handle, path, int(start), int(stop), exact))
    return len(self._requests) - 1

  @property
  def pending(self) -> int:
    return len(self._requests)

  def run(self) -> list[bytes]:
    out: list[bytes | None] = [None] * len(self._requests)
    groups: dict[int, list[int]] = {}
    for i, (handle, *_) in enumerate(self._requests):
      groups.setdefault(id(handle[0]) if handle is not None else 0, []).append(i)
    for members in groups.values():
      handle = self._requests[members[0]][0]
      if handle is not None:
        fs = handle[0]
        paths = [self._requests[i][0][1] for i in members]
        got = fs.cat_ranges(paths, [self._requests[i][2] for i in members], [self._requests[i][3] for i in members],
                            on_error="raise")
      else:
        got = []
        for i in members:
          _, path, start, stop, _ = self._requests[i]
          with path.open("rb") as f:
            f.seek(start)
            got.append(f.read(stop - start))
      for i, payload in zip(members, got):
        if isinstance(payload, BaseException):
          raise payload
        _, path, start, stop, exact = self._requests[i]
        if exact and len(payload) != stop - start:
          raise OSError(f"{path}: read {len(payload)} bytes of [{start}, {stop}): the file is shorter than "
                        "its header says (truncated or replaced?)")
        out[i] = bytes(payload)
    self._requests = []
    return out  # type: ignore[return-value]


def _parse_npy_header(prefix: bytes, path) -> tuple[int, int]:
  """(header length, bytes needed) from the first bytes of a .npy file."""
  if prefix[:6] != b"\x93NUMPY" or len(prefix) < 10:
    raise ValueError(f"{path} is not a .npy file")
  major = prefix[6]
  if major == 1:
    return 10, 10 + int.from_bytes(prefix[8:10], "little")
  if major in (2, 3) and len(prefix) >= 12:
    return 12, 12 + int.from_bytes(prefix[8:12], "little")
  raise ValueError(f"{path}: unsupported .npy version {major}")


def cached_copy(path, cache_dir, sha256: str) -> str:
  """A local copy of remote file `path` in `cache_dir`, named by its sha256 (so a replaced file
  is never mistaken for its copy): downloaded whole and checked the first time, reused after."""
  target = os.path.join(os.fspath(cache_dir), f"{sha256}.npy")
  if os.path.exists(target):
    return target
  payload = epath.Path(path).read_bytes()
  if hashlib.sha256(payload).hexdigest() != sha256:
    raise ValueError(f"{path} does not match its sha256 in the manifest (corrupted or replaced)")
  os.makedirs(os.fspath(cache_dir), exist_ok=True)
  temporary = f"{target}.{os.getpid()}.{time.time_ns()}.tmp"
  with open(temporary, "wb") as f:
    f.write(payload)
  os.replace(temporary, target)
  return target


class NpyRows:
  """The rows of one .npy file (C order, no objects): memory-mapped when local, read by byte
  ranges when remote, or -- given a cache_dir and the file's sha256 -- downloaded once into the
  cache and memory-mapped there (for files read whole many times).  `[a:b]` reads a contiguous
  block; `take(rows)` gathers; `array()` is the whole file (the memmap itself when local)."""

  def __init__(self, path, *, cache_dir=None, sha256: str | None = None):
    self.path = epath.Path(path)
    self.remote = is_remote(self.path)
    self._cache = (None if cache_dir is None else os.fspath(cache_dir), sha256)
    local = os.fspath(self.path) if not self.remote else None
    if self.remote and cache_dir is not None and sha256:
      local, self.remote = cached_copy(self.path, cache_dir, sha256), False
    if not self.remote:
      self._mmap = np.load(local, mmap_mode="r", allow_pickle=False)
      self.offset, self.dtype, self.shape = int(self._mmap.offset), self._mmap.dtype, tuple(self._mmap.shape)
    else:
      self._mmap = None
      self._handle = _fsspec_of(self.path)
      reader = _RangeReader()
      reader.add(self._handle, self.path, 0, _HEADER_BYTES, exact=False)
      prefix = reader.run()[0]
      _, end = _parse_npy_header(prefix, self.path)
      if len(prefix) < end:
        reader.add(self._handle, self.path, len(prefix), end)
        prefix += reader.run()[0]
      header = io.BytesIO(prefix[:end])
      version = np.lib.format.read_magic(header)
      read_header = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read_header(header)
      if fortran or dtype.hasobject or not shape:
        raise ValueError(f"{self.path}: a C-order array of rows without objects is expected, got "
                         f"{dtype} {shape}{' (Fortran order)' if fortran else ''}")
      self.offset, self.dtype, self.shape = end, np.dtype(dtype), tuple(int(s) for s in shape)
    self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

  def __getstate__(self) -> dict:
    return {"path": str(self.path), "cache_dir": self._cache[0], "sha256": self._cache[1]}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"], cache_dir=state["cache_dir"], sha256=state["sha256"])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _rows(self, payload: bytes, count: int) -> np.ndarray:
    return np.frombuffer(payload, self.dtype, count=count * math.prod(self.shape[1:])).reshape(
        (count,) + self.shape[1:])

  def array(self) -> np.ndarray:
    return self._mmap if self._mmap is not None else self.read(0, len(self))

  def read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) (clipped to the file)."""
    start, stop = max(0, int(start)), min(len(self), int(stop))
    stop = max(start, stop)
    if self._mmap is not None:
      return self._mmap[start:stop]
    if stop == start:
      return np.zeros((0,) + self.shape[1:], self.dtype)
    reader = _RangeReader()
    finish = self.plan(np.arange(start, stop), reader)
    return finish(reader.run())

  def plan(self, rows: np.ndarray, reader: _RangeReader):
    """Queues the ranges of sorted unique local `rows` [m]; returns finish(payloads) -> [m, ...]."""
    breaks = np.flatnonzero((np.diff(rows) - 1) * self.row_bytes > RANGE_GAP_BYTES) + 1
    runs = np.split(rows, breaks)
    slots = [reader.add(self._handle, self.path, self.offset + int(run[0]) * self.row_bytes,
                        self.offset + (int(run[-1]) + 1) * self.row_bytes) for run in runs]

    def finish(payloads: list[bytes]) -> np.ndarray:
      parts = []
      for slot, run in zip(slots, runs):
        block = self._rows(payloads[slot], int(run[-1] - run[0]) + 1)
        parts.append(block if len(run) == len(block) else block[run - run[0]])  # sorted unique: all or some
      return np.concatenate(parts) if len(parts) > 1 else parts[0]
    return finish

  def take(self, rows) -> np.ndarray:
    """Rows at local `rows` (any shape of integers in [0, len)) -> [*rows.shape, ...]."""
    rows = np.asarray(rows, np.int64)
    if self._mmap is not None:
      return np.asarray(self._mmap[rows.reshape(-1)]).reshape(rows.shape + self.shape[1:])
    unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
    if not unique.size:
      return np.zeros(rows.shape + self.shape[1:], self.dtype)
    reader = _RangeReader()
    finish = self.plan(unique, reader)
    return finish(reader.run())[inverse].reshape(rows.shape + self.shape[1:])

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      return self.read(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
    if isinstance(key, (int, np.integer)):
      return self.take(np.asarray([key]))[0]
    return self.take(key)


def gather_rows(files: Callable[[int], NpyRows], starts: np.ndarray, indices) -> np.ndarray:
  """Rows at global `indices` (any shape, in range) of a row split over files (file n holds rows
  [starts[n], starts[n + 1])): memmap gathers locally; for remote files every range of every
  file read in one batch."""
  indices = np.asarray(indices)
  flat = indices.reshape(-1).astype(np.int64)
  shard_of = np.searchsorted(starts, flat, side="right") - 1
  numbers = [int(n) for n in np.unique(shard_of)]
  if not numbers:
    first = files(0)
    return np.zeros(indices.shape + first.shape[1:], first.dtype)
  opened = {n: files(n) for n in numbers}
  dtype = np.result_type(*[f.dtype for f in opened.values()])  # unicode ids: the widest shard
  tail = next(iter(opened.values())).shape[1:]
  out = np.empty((flat.size,) + tail, dtype)
  reader, pending = _RangeReader(), []
  for n, file in opened.items():
    chosen = np.flatnonzero(shard_of == n)
    local = flat[chosen] - starts[n]
    if not file.remote:
      out[chosen] = file.take(local)
      continue
    unique, inverse = np.unique(local, return_inverse=True)
    pending.append((chosen, inverse, file.plan(unique, reader)))
  if pending:
    payloads = reader.run()
    for chosen, inverse, finish in pending:
      out[chosen] = finish(payloads)[inverse]
  return out.reshape(indices.shape + tail)


def read_rows(files: Callable[[int], NpyRows], starts: np.ndarray, num_rows: int, start: int,
              stop: int) -> np.ndarray:
  """Rows [start, stop) of a row split over files: one range per file touched (remote ones read
  in one batch)."""
  start, stop = max(0, int(start)), min(int(num_rows), int(stop))
  if stop <= start:
    first = files(0)
    return np.zeros((0,) + first.shape[1:], first.dtype)
  ends = list(starts[1:]) + [num_rows]
  first = int(np.searchsorted(starts, start, side="right")) - 1
  last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
  reader, parts = _RangeReader(), []
  for n in range(first, last + 1):
    file, lo = files(n), int(starts[n])
    a, b = max(start, lo) - lo, min(stop, int(ends[n])) - lo
    parts.append(file.read(a, b) if not file.remote else file.plan(np.arange(a, b), reader))
  if reader.pending:
    payloads = reader.run()
    parts = [p(payloads) if callable(p) else p for p in parts]
  if len(parts) == 1:
    return parts[0]
  dtype = np.result_type(*[p.dtype for p in parts])
  return np.concatenate([np.asarray(p, dtype) for p in parts])


class Embeddings:
  """A written embedding store (see open_embeddings).

  num_records, fields (embedding field names), dims ({field: dim}), columns
  ({name: dtype, shape}), manifest.  Arrays by name (a field or a column):
  shards(name) yields (first row, shard array); field(name) is the whole array;
  rows(name, indices) gathers records.
  """

  def __init__(self, directory: epath.Path, manifest: dict):
    self.directory = directory
    self.manifest = manifest
    self.num_records = int(manifest["num_records"])
    self.fields = tuple(manifest["fields"])
    self.dims = {k: int(v["dim"]) for k, v in manifest["fields"].items()}
    self.columns = dict(manifest["columns"])
    self._starts = np.asarray([s["rows"][0] for s in manifest["shards"]], np.int64)
    self._files: dict[tuple[str, int], NpyRows] = {}  # opened shards (headers / memmaps)

  # Pickled (e.g. into grain worker processes) as its directory and manifest: the shards are
  # memory-mapped again, lazily, where it is unpickled (a memmap pickles its whole contents).
  def __getstate__(self) -> dict:
    return {"directory": str(self.directory), "manifest": self.manifest}

  def __setstate__(self, state: dict) -> None:
    self.__init__(epath.Path(state["directory"]), state["manifest"])

  def __repr__(self) -> str:
    return f"Embeddings({str(self.directory)!r}, records={self.num_records}, dims={self.dims})"

  def _check_name(self, name: str) -> None:
    if name not in self.dims and name not in self.columns:
      raise KeyError(f"{self.directory} has no array {name!r}; fields {list(self.fields)}, "
                     f"columns {list(self.columns)}")

  def _file(self, name: str, number: int) -> NpyRows:
    """Shard `number` of array `name`, opened (a memmap, or a remote file's header) and checked
    against the manifest; kept (headers and memmaps only, never rows)."""
    key = (name, number)
    if key in self._files:
      return self._files[key]
    shard = self.manifest["shards"][number]
    path = self.directory / shard["files"][name]["path"]
    file = NpyRows(path)
    rows = shard["rows"][1] - shard["rows"][0]
    if name in self.dims:
      expected = ((rows, self.dims[name]), np.dtype(self.manifest["fields"][name]["dtype"]))
      ok = (file.shape, file.dtype) == expected
    else:
      ok = file.shape[0] == rows
    if not ok:
      raise ValueError(f"{path} holds {file.dtype} {file.shape}, the manifest says {rows} rows"
                       + (f" of {expected[1]} [{self.dims[name]}]" if name in self.dims else ""))
    self._files[key] = file
    return file

  def _shard(self, name: str, number: int) -> np.ndarray:
    """Shard `number`'s whole array: the memmap (local) or its bytes read (remote)."""
    return self._file(name, number).array()

  def shards(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, array) of every shard in order: for chunked readers (memory-mapped locally,
    one ranged read per shard remotely)."""
    self._check_name(name)
    for number, first in enumerate(self._starts):
      yield int(first), self._shard(name, number)

  def field(self, name: str) -> np.ndarray:
    """Every record's array: the memmap itself for one shard, else a concatenation in memory."""
    parts = [array for _, array in self.shards(name)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def read(self, name: str, start: int, stop: int) -> np.ndarray:
    """Records [start, stop) (clipped to the store) of array `name`: one contiguous read per shard."""
    self._check_name(name)
    return read_rows(functools.partial(self._file, name), self._starts, self.num_records, start, stop)

  def rows(self, name: str, indices) -> np.ndarray:
    """The arrays of records `indices` (any shape of row numbers in [0, num_records)).  Remote
    shards: only the rows' byte ranges are read (module docstring), all in one batch."""
    self._check_name(name)
    indices = np.asarray(indices)
    if indices.size and indices.dtype.kind not in "iu":
      raise TypeError(f"row indices must be integers, got {indices.dtype}")
    flat = indices.reshape(-1).astype(np.int64)
    bad = (flat < 0) | (flat >= self.num_records)
    if bad.any():
      raise IndexError(f"rows {flat[bad][:10].tolist()} outside [0, {self.num_records})")
    out = gather_rows(functools.partial(self._file, name), self._starts, flat)
    return out.reshape(indices.shape + out.shape[1:])

  @property
  def latlng(self) -> np.ndarray:
    return self.field("latlng")

  @property
  def index(self) -> np.ndarray:
    return self.field("index")

  @property
  def ids(self) -> np.ndarray | None:
    return self.field("id") if "id" in self.columns else None

  @property
  def tokens(self) -> np.ndarray | None:
    return self.field("tokens") if "tokens" in self.columns else None


def open_embeddings(output_dir, *, verify: bool = False) -> Embeddings:
  """The store write_embeddings wrote in `output_dir`: the manifest read, every
  shard file checked to exist (and its sha256 with verify=True)."""
  directory = epath.Path(output_dir)
  path = directory / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: no embeddings were written in {directory}")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"{path} is not a {FORMAT} version {VERSION} manifest")
  if not manifest["complete"]:
    done = manifest["shards"][-1]["rows"][1] if manifest["shards"] else 0
    raise ValueError(f"{directory} is incomplete ({done} of {manifest['num_records']} records): "
                     "rerun write_embeddings with the same settings to finish it")
  missing, corrupt = [], []
  for shard in manifest["shards"]:
    for entry in shard["files"].values():
      file = directory / entry["path"]
      if not file.exists():
        missing.append(entry["path"])
      elif verify and runtime.file_sha256(file) != entry["sha256"]:
        corrupt.append(entry["path"])
  if missing:
    raise FileNotFoundError(f"{directory}: {len(missing)} shard file(s) listed in the manifest are missing: "
                            f"{missing[:10]}")
  if corrupt:
    raise ValueError(f"{directory}: {len(corrupt)} shard file(s) do not match their sha256 in the manifest "
                     f"(corrupted or replaced): {corrupt[:10]}")
  return Embeddings(directory, manifest)
