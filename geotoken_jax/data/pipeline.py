"""grain input pipelines: shuffled training batches and padded, masked eval passes.

Training (`train_iterator`).  All processes agree on one infinite stream of
record indices: epoch e is a permutation of 0..N-1 drawn from (seed, e), and the
epochs are concatenated.  Global batch k is stream positions [kG, (k+1)G) for
global batch size G; process p of P takes its consecutive slice
[kG + pB, kG + (p+1)B) with B = G / P and loads only those rows.  So the global
batch sequence does not depend on P: a run on 2 processes trains exactly the
steps of a run on 1.  Nothing is dropped: every record appears once per epoch,
and when N is not a multiple of G the batch that straddles an epoch boundary
holds the tail of epoch e followed by the head of epoch e + 1 (a record can
then appear twice in one batch, once per epoch).  The iterator's state is the
next global batch number, so a checkpoint resumes the same stream whatever the
process or worker count of the resumed run.

Evaluation (`eval_batches`).  One pass in record order.  Its batch_size is PER
PROCESS (B; the global eval batch is G = B * P): global batch k is records
[kG, (k+1)G), process p taking [kG + pB, kG + (p+1)B).  The last batch is padded
to full size with copies of the final record, marked by "mask" False and id -1,
and every process yields the same number of batches (fully masked ones if
needed) so that collectives in the eval step never wait on a process that ran
out of data.

Sources are random-access (`len`, `[index]`); one with a vectorized
`get_batch(indices)` (EarthSource) is read a whole batch at a time.  Batches are
dicts of NumPy arrays; images stay uint8 (normalization happens on device).
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

# Reading happens in the process's own memory; two threads overlap one batch's
# gather with the training step without filling memory with batches read ahead.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_process(process_index: int, process_count: int) -> None:
  process_count = _check_int("process_count", process_count, 1)
  process_index = _check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index {process_index} must be < process_count {process_count}")


def _process_batch_size(batch_size: int, process_index: int, process_count: int,
                        name: str) -> int:
  """Checks the process arguments; returns the per-process batch size."""
  batch_size = _check_int(name, batch_size, 1)
  _check_process(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(f"{name} ({batch_size}) must be divisible by process_count ({process_count}): "
                     f"each process loads an equal slice of every global batch")
  return batch_size // process_count


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed (what grain takes) mixed from any integer seed.

  grain seeds epoch e with shuffle_seed + e; mixing keeps seeds s and s + 1 from
  sharing epochs.
  """
  x = np.array([seed % 2**64], np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # splitmix64
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x ^= x >> np.uint64(31)
  return int(x[0] & np.uint64(0xFFFFFFFF))


def load_rows(source, rows: np.ndarray, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Records `rows` of a source stacked along a new leading axis.  A source whose
  get_batch takes `positions` (training stream positions) seeds augmentation with them."""
  rows = np.asarray(rows, np.int64)
  get_batch = getattr(source, "get_batch", None)
  if get_batch is not None:
    if positions is not None and getattr(source, "augment", False):
      return get_batch(rows, positions=positions)
    return get_batch(rows)
  records = [source[int(row)] for row in rows]
  return {key: np.stack([np.asarray(record[key]) for record in records]) for key in records[0]}


def _stack_rows(rows) -> np.ndarray:
  return np.asarray(rows, np.int64)  # [B, 2]: (stream position, record index)


def _with_position(position: int, row: int) -> tuple[int, int]:
  return position, row


class _LoadRows:
  """(position, index) batch -> record batch; a class (not a closure) so workers can unpickle it."""

  def __init__(self, source):
    self.source = source

  def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return load_rows(self.source, rows[:, 1], positions=rows[:, 0])


def _allow_unparsed_absl_flags() -> None:
  """Lets grain's worker processes start in programs that do not use absl.app.

  With JAX loaded, grain 0.2.18 reads an absl flag when it starts workers and
  raises UnparsedFlagAccessError if flags were never parsed (google/grain#1355);
  marking them parsed keeps every flag at its default.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator(grain.DatasetIterator):
  """A grain DatasetIterator over one process's training batches.

  Its state is the next GLOBAL batch number plus what fixes the stream (seed,
  global batch size, record count), so a checkpoint resumes the same stream on
  any process count or worker count; restoring a state from a different stream
  raises instead of silently training on other batches.
  """

  def __init__(self, batches: grain.MapDataset, worker_count: int, stream: dict[str, int]):
    super().__init__()
    self._batches = batches  # batch k of this process, for k = 0, 1, ...
    self._worker_count = worker_count
    self._stream = stream
    self._next_batch = 0
    self._iterator = None  # opened lazily, so set_state before next() starts workers once

  def _open(self) -> grain.DatasetIterator:
    ds = self._batches.slice(slice(self._next_batch, None)).to_iter_dataset(_READ_OPTIONS)
    if self._worker_count > 0:
      _allow_unparsed_absl_flags()
      # grain gives worker w the batches w, w + W, ... and interleaves them back in order.
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._iterator is None:
      self._iterator = self._open()
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_batch": self._next_batch, **self._stream}

  def set_state(self, state: dict[str, Any]) -> None:
    mismatched = {key: (state.get(key), value) for key, value in self._stream.items()
                  if state.get(key) != value}
    if mismatched:
      raise ValueError("the iterator state belongs to another training stream; "
                       + ", ".join(f"{key}: state {got} != {want}"
                                   for key, (got, want) in mismatched.items()))
    self._close_iterator()
    self._next_batch = _check_int("next_batch", state["next_batch"], 0)

  def start_prefetch(self) -> None:
    if self._iterator is None:
      self._iterator = self._open()
    self._iterator.start_prefetch()

  def _close_iterator(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self) -> None:
    self._close_iterator()
    super().close()

  def __str__(self) -> str:
    return f"TrainIterator(next_batch={self._next_batch}, workers={self._worker_count}, {self._stream})"


def train_iterator(source, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0) -> TrainIterator:
  """Infinite per-process training batches; see the module docstring for the order.

  Returns a grain DatasetIterator of dicts whose arrays have leading dimension
  global_batch_size // process_count.  `get_state()` / `set_state()` save and
  restore the position as {"next_batch", "seed", "global_batch_size",
  "num_records"} (JSON-friendly ints).  worker_count > 0 reads batches in that
  many grain worker processes; the batches are the same.
  """
  batch_size = _process_batch_size(global_batch_size, process_index, process_count,
                                   "global_batch_size")
  worker_count = _check_int("worker_count", worker_count, 0)
  seed = _check_int("seed", seed, -(2**63))
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"cannot train on an empty source: {source!r}")
  # Stream position -> record index: a fresh permutation per epoch, forever.
  ds = grain.MapDataset.range(num_records).shuffle(seed=_shuffle_seed(seed)).repeat()
  ds = ds.map_with_index(_with_position)  # the position seeds per-example augmentation
  # Chunk j of B positions; global batch k is chunks kP .. kP + P - 1, in process order.
  ds = ds.batch(batch_size, batch_fn=_stack_rows)
  ds = ds.slice(slice(process_index, None, process_count))
  ds = ds.map(_LoadRows(source))
  stream = {"seed": seed, "global_batch_size": int(global_batch_size), "num_records": num_records}
  return TrainIterator(ds, worker_count, stream)


def num_eval_batches(num_records: int, *, batch_size: int, process_count: int = 1) -> int:
  """How many batches eval_batches yields on every process (batch_size per process)."""
  return math.ceil(num_records / (batch_size * process_count))


class _EvalBatch:
  """Eval batch number -> this process's padded, masked slice of it."""

  def __init__(self, source, num_records: int, batch_size: int, process_index: int,
               process_count: int):
    self.source = source
    self.num_records = num_records
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count

  def __call__(self, batch_number: int) -> dict[str, np.ndarray]:
    start = (batch_number * self.process_count + self.process_index) * self.batch_size
    positions = start + np.arange(self.batch_size)  # [B]
    mask = positions < self.num_records
    # Padding repeats the last record, so every row is valid model input.
    batch = load_rows(self.source, np.minimum(positions, self.num_records - 1))
    if "id" in batch:
      batch["id"] = np.where(mask, batch["id"], np.asarray(-1, batch["id"].dtype))
    batch["mask"] = mask
    batch["index"] = positions.astype(np.int32)  # the rows' numbers in the source (padding past its end)
    return batch


def eval_batches(source, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1, start_batch: int = 0) -> grain.IterDataset:
  """One in-order pass over a source as per-process batches with a "mask" field.

  batch_size is the PER-PROCESS batch size (unlike train_iterator's
  global_batch_size): the global eval batch is batch_size * process_count rows.
  Every process yields num_eval_batches(len(source), batch_size=batch_size,
  process_count=process_count) batches; rows past the end are padding with
  "mask" False (and "id" -1 when the source has ids).  "index" [B] int32 holds
  each row's number in the source: (batch * process_count + process_index) *
  batch_size + arange(batch_size), so a global batch holds consecutive rows.  The result is a grain
  IterDataset: iterate it as often as needed.  start_batch skips the first
  batches (a resumed evaluation).
  """
  batch_size = _check_int("batch_size", batch_size, 1)
  _check_process(process_index, process_count)
  num_records = len(source)
  count = num_eval_batches(num_records, batch_size=batch_size, process_count=process_count)
  start_batch = _check_int("start_batch", start_batch, 0)
  ds = grain.MapDataset.range(min(start_batch, count), count).map(
      _EvalBatch(source, num_records, batch_size, process_index, process_count))
  return ds.to_iter_dataset(_READ_OPTIONS)
