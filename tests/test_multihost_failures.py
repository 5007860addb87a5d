"""A failure on one process of a multi-process job raises on every process (runtime.fail_together):
2 localhost processes (jax.distributed, gloo), a write failure injected on process 0 only; both
exit non-zero within a bounded time with the same message, instead of process 1 waiting in a
collective forever."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from geotoken_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
from geotoken_jax import distributed
distributed.initialize(args['coordinator_address'], int(args['num_processes']), int(args['process_id']))
import jax
from geotoken_jax import runtime
import test_embeddings as t
assert jax.process_count() == 2
real_write, writes = runtime.write_atomic, []

def failing_write(path, payload):
  if "/" + {job!r} + "/" in str(path):
    writes.append(str(path))
    if len(writes) > {after}:
      raise OSError("disk full (injected on process 0)")
  real_write(path, payload)

if jax.process_index() == 0:
  runtime.write_atomic = failing_write
try:
  if {job!r} == "embeddings":
    t.write({out!r} + "/embeddings", t.ArraySource(), devices=4, batch=8, dtype="float32")
  else:
    from geotoken_jax.retrieval import neighbors
    store = t.write({out!r} + "/store", t.ArraySource(), devices=4, batch=8, dtype="float32")
    from geotoken_jax import embeddings
    store = embeddings.open_embeddings({out!r} + "/store")
    neighbors.index_split(store, store, {out!r} + "/neighbors", settings=dict(fields=("image",), k=3,
                          dtype="float32", chunk_rows=16, query_batch=8, block_rows=16, duplicate_km=0.0),
                          same_split=True, progress=False)
except runtime.ProcessFailure as e:
  print("FAILED:", e, flush=True)
  raise
print("finished without a failure", flush=True)
"""


@pytest.mark.parametrize("job, after", [("embeddings", 2), ("neighbors", 2)])
def test_a_write_failing_on_process_0_stops_both_processes(tmp_path, job, after):
  script = SCRIPT.format(tests=os.path.join(REPO, "tests"), out=str(tmp_path), job=job, after=after)
  env = dict(os.environ, JAX_PLATFORMS="cpu", LOGDIR=str(tmp_path),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--", sys.executable, "-c", script],
                        env=env, capture_output=True, text=True, timeout=240)  # a hang ends here, failing
  logs = [open(tmp_path / f"process_{i}.log").read() for i in range(2)]
  assert done.returncode != 0, logs
  messages = [[line for line in log.splitlines() if line.startswith("FAILED:")] for log in logs]
  assert all(len(m) == 1 for m in messages), logs
  assert messages[0] == messages[1], messages
  want = f"writing {'embeddings' if job == 'embeddings' else 'neighbour lists'} to"
  assert want in messages[0][0] and "failed on process 0: OSError: disk full (injected" in messages[0][0]


def test_on_one_process_the_error_itself_is_raised():
  with pytest.raises(KeyError, match="missing"):
    runtime.on_process_0(lambda: {}["missing"], "a lookup")
  assert runtime.on_process_0(lambda: np.int32(3), "a value") == 3
  runtime.fail_together(None, "nothing")
