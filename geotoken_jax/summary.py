"""Run logs through the filesystem layer: TensorBoard events and metrics.jsonl on any epath.

Workdirs may be `gs://`, `s3://` or local.  Object stores cannot append, so a
remote file is kept in memory and rewritten whole on each flush (event and
metrics files hold scalars: kilobytes); a local file is appended to.
tensorboardX writes through an epath-backed writer for every remote scheme.
"""

from __future__ import annotations

import io
import json
import time

import jax
import numpy as np
import tensorboardX
from etils import epath
from tensorboardX import record_writer

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


def is_local(path) -> bool:
  return "://" not in str(path)


class _RewrittenFile:
  """A file on an object store opened for appending: buffered, rewritten on flush."""

  def __init__(self, path):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    if self._path.exists():  # a resumed run appends to its own log
      self._buffer.write(self._path.read_bytes())
    self.closed = False

  def write(self, data) -> None:
    self._buffer.write(data.encode() if isinstance(data, str) else data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


def open_append(path):
  """A file object appending to `path` (local or remote); write(str | bytes), flush(), close()."""
  path = epath.Path(path)
  if is_local(path):
    return open(path, "ab")
  return _RewrittenFile(path)


class _EpathWriterFactory:
  """tensorboardX writer factory for remote schemes, through etils.epath."""

  def open(self, path):
    return _RewrittenFile(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in REMOTE_SCHEMES:
  record_writer.register_writer_factory(_scheme, _EpathWriterFactory())


def _flatten_scalars(values: dict) -> dict[str, float]:
  out = {}
  for name, value in values.items():
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
      out[name] = float(array)
    else:
      out.update({f"{name}/{i}": float(v) for i, v in enumerate(array.ravel())})
  return out


def _format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes}m{seconds:02d}s"


class Progress:
  """Console line with steps/s and ETA; TensorBoard scalars; WORKDIR/metrics.jsonl (process 0)."""

  def __init__(self, workdir, total_steps: int, start_step: int, batch_size: int):
    self._main = jax.process_index() == 0
    self._total, self._batch = total_steps, batch_size
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._writer = None
    if self._main:
      workdir = epath.Path(workdir)
      # The URL itself, never a local rendering of it.
      self._writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = open_append(workdir / "metrics.jsonl")

  def log(self, step: int, kind: str, values: dict) -> None:
    if not self._main:
      return
    scalars = _flatten_scalars(values)
    for name, value in scalars.items():
      self._writer.add_scalar(f"{kind}/{name}", value, step)
    self._jsonl.write((json.dumps({"step": step, "kind": kind, **scalars}) + "\n").encode())
    self._jsonl.flush()
    if kind == "train":
      now = time.perf_counter()
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      self._last_time, self._last_step = now, step
      eta = (self._total - step) / rate if rate > 0 else float("inf")
      skipped = f" | {int(scalars['skipped_total'])} skipped" if scalars.get("skipped_total") else ""
      print(f"step {step}/{self._total} | loss {scalars['loss']:.4f} | {rate:.2f} steps/s "
            f"| {rate * self._batch:.0f} img/s | ETA {_format_seconds(eta)}{skipped}", flush=True)
    else:
      shown = {k: round(v, 3) for k, v in scalars.items() if k.startswith(("acc@", "median", "loss"))}
      print(f"step {step} | {kind} | {shown}", flush=True)

  def close(self) -> None:
    if self._main:
      self._writer.close()
      self._jsonl.close()
