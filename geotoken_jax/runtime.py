"""Small process-level helpers the library's jobs share; imports no other geotoken_jax module.

  write_atomic, npy_bytes, file_sha256   files a reader never sees half written
  jsonable                               a value as it reads back from JSON
  broadcast_json                         process 0's JSON-able value on every process
  fail_together, on_process_0            a failure on one process raises on every process
                                         (none waits in a collective for one that raised)
  allgather, allgather_text, gather_tree every process's rows of a batch, on every process
  device_fields                          the fields of a host batch that go to the devices
  progress                               a tqdm bar on process 0

The embedding store (embeddings), the index job (retrieval.neighbors), the inference
package and the trie cache (decoding.constraints) write and gather through these.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

# Batch fields that stay on the host (ids may be strings or int64).
HOST_ONLY_FIELDS = ("id",)


# ---------------------------------------------------------------------------
# Files.


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)  # C order: the same bytes on any run
  return buffer.getvalue()


def write_atomic(path, payload: bytes) -> None:
  """Write under a temporary name in the same folder, then rename: a reader never sees half a
  file, and concurrent writers of the same path leave one whole file."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(payload)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def jsonable(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples -> lists, ConfigDicts -> dicts), so that
  the model identity compares equal across runs."""
  def default(obj):
    if hasattr(obj, "to_dict"):
      return obj.to_dict()
    if isinstance(obj, np.generic):
      return obj.item()
    raise TypeError(f"manifest_extra holds {type(obj).__name__} {obj!r}, which JSON cannot store")

  return json.loads(json.dumps(value, default=default))


# ---------------------------------------------------------------------------
# Collectives (every process calls them in step).


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-able value on every process."""
  if jax.process_count() == 1:
    return value
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if payload is None else payload.size)))
  buffer = np.zeros(size, np.uint8)
  if payload is not None:
    buffer[:] = payload
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


class ProcessFailure(RuntimeError):
  """Raised on every process when one process of a multi-process job failed (the message is
  that process's)."""


def fail_together(error: BaseException | None, what: str) -> None:
  """Every process calls it in step, with the exception it caught (or None).  If any process
  holds one, every process raises ProcessFailure with the first failing process's message;
  on one process the exception itself is re-raised.  Without this, a process that raises
  leaves the others waiting in their next collective forever."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))  # [P]
  if not failed.any():
    return
  first = int(np.argmax(failed))
  message = f"{what} failed on process {first}"
  if error is not None and jax.process_index() == first:
    message += f": {type(error).__name__}: {error}"
  mine = np.frombuffer(message.encode(), np.uint8)
  width = int(np.max(multihost_utils.process_allgather(np.int32(mine.size))))
  buffer = np.zeros((1, width), np.uint8)
  buffer[0, :mine.size] = mine
  messages = np.asarray(multihost_utils.process_allgather(buffer, tiled=True))  # [P, width]
  raise ProcessFailure(bytes(messages[first]).rstrip(b"\0").decode()) from error


def on_process_0(fn: Callable[[], Any], what: str) -> Any:
  """fn() on process 0 only (a write, a conversion, a check), then fail_together: its result on
  process 0 (None elsewhere), or its failure raised on every process."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised on every process by fail_together
      error = e
  fail_together(error, what)
  return result


def allgather(x) -> np.ndarray:
  """Every process's rows of a batch array (a global jax.Array or this process's
  host rows), concatenated in process order, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_text(values: np.ndarray) -> np.ndarray:
  """String ids of every process's rows: UTF-8 bytes padded to the longest, gathered.
  (Reading the other processes' rows from the source would decode their images.)"""
  encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values]
  width = max([1] + [len(e) for e in encoded])
  width = int(np.max(multihost_utils.process_allgather(np.int32(width))))
  buffer = np.zeros((len(encoded), width), np.uint8)
  for row, e in enumerate(encoded):
    buffer[row, :len(e)] = np.frombuffer(e, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer, tiled=True))  # [G, width]
  return np.asarray([bytes(row).rstrip(b"\0").decode() for row in gathered], dtype=object)


def gather_tree(tree):
  """Every leaf of a tree of global batch arrays, all-gathered to host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


# ---------------------------------------------------------------------------
# Batches and progress.


def device_fields(batch: Mapping[str, Any]) -> dict:
  """The numeric fields of a host batch (ids and text such as country codes stay on the host)."""
  return {k: v for k, v in batch.items()
          if k not in HOST_ONLY_FIELDS and np.asarray(v).dtype.kind in "biuf"}


def progress(total: int, desc: str, initial: int):
  """A tqdm bar on process 0 (batches, images/s, ETA); on a non-terminal only for long runs."""
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True,
              disable=not sys.stderr.isatty() and total < 50, mininterval=5 if not sys.stderr.isatty() else 0.1)
