"""geotoken_jax.checkpoint: URLs, the global data-iterator item, metadata, fallback
past unrestorable checkpoints, refusal of non-finite states, 2 real processes."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from geotoken_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = jax.sharding.PartitionSpec


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def _state(value: float, mesh):
  """A small train-state-like tree: sharded, replicated and integer leaves."""
  w = np.arange(32, dtype=np.float32).reshape(8, 4) + value
  return {"params": {"w": jax.device_put(w, jax.sharding.NamedSharding(mesh, P("data", "fsdp"))),
                     "b": jax.device_put(np.full((4,), value, np.float32), jax.sharding.NamedSharding(mesh, P()))},
          "opt": {"mu": jax.device_put(np.full((8, 4), -value, np.float32),
                                       jax.sharding.NamedSharding(mesh, P(None, "fsdp")))},
          "step": jax.device_put(np.int32(value), jax.sharding.NamedSharding(mesh, P()))}


def _abstract(mesh):
  template = _state(0.0, mesh)
  return checkpoint.abstract_like(template, jax.tree.map(lambda x: x.sharding, template))


class Iterator:
  """Any object with get_state / set_state; refuses states of another stream."""

  def __init__(self, seed=0, position=0):
    self.seed, self.position = seed, position

  def get_state(self):
    return {"next_batch": self.position, "seed": self.seed}

  def set_state(self, state):
    if state["seed"] != self.seed:
      raise ValueError(f"seed {state['seed']} != {self.seed}")
    self.position = state["next_batch"]


def _assert_state_equal(restored, expected):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), jax.tree_util.keystr(path)


def _save_three(directory, mesh):
  saver = checkpoint.Checkpointer(directory, save_every_steps=10, max_to_keep=5)
  for step in (10, 20, 30):
    assert saver.save(step, _state(step, mesh), Iterator(position=step + 1),
                      metadata={"config": {"batch_size": 16, "at": step}, "token_spec": {"level": 9}})
  saver.close()
  return saver


def _truncate(folder, only_chunks=False):
  """Halves every file tensorstore / orbax wrote under `folder` (or only the array chunks)."""
  touched = []
  for root, _, files in os.walk(folder):
    for name in files:
      if only_chunks and os.path.basename(root) != "d":
        continue
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
      touched.append(path)
  assert touched
  return touched


# ---------------------------------------------------------------------------


def test_save_restore_round_trip_with_iterator_and_metadata(tmp_path):
  mesh = _mesh()
  _save_three(tmp_path / "ck", mesh)
  step_dir = tmp_path / "ck" / "30"
  # The layout: one global JSON for the iterator, one for the metadata; no per-process iterator files.
  assert json.loads((step_dir / "data_iterator" / "state.json").read_text()) == {"next_batch": 31, "seed": 0}
  assert json.loads((step_dir / "metadata" / "metadata.json").read_text())["config"]["at"] == 30
  assert not list((step_dir / "data_iterator").glob("process_*"))
  assert (step_dir / "state").is_dir()

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  assert ckpt.all_steps() == [10, 20, 30] and ckpt.latest_step == 30
  iterator = Iterator()
  state, returned, step = ckpt.restore(_abstract(mesh), iterator)
  assert step == 30 and returned is iterator and iterator.position == 31
  _assert_state_equal(state, _state(30, mesh))
  state, _, step = ckpt.restore(_abstract(mesh), Iterator(), step=20)
  assert step == 20
  _assert_state_equal(state, _state(20, mesh))
  # Metadata, from the checkpointer and read-only from the folder (no arrays).
  assert ckpt.read_metadata() == {"config": {"batch_size": 16, "at": 30}, "token_spec": {"level": 9}}
  assert ckpt.read_metadata(10)["config"]["at"] == 10
  assert checkpoint.read_metadata(tmp_path / "ck")["config"]["at"] == 30
  assert checkpoint.read_metadata(str(tmp_path / "ck"), 20)["config"]["at"] == 20
  with pytest.raises(FileNotFoundError, match="step 25"):
    checkpoint.read_metadata(tmp_path / "ck", 25)
  ckpt.close()
  (tmp_path / "empty").mkdir()
  assert checkpoint.read_metadata(tmp_path / "empty") is None


def test_save_policy_and_saving_without_iterator_or_metadata(tmp_path):
  mesh = _mesh()
  ckpt = checkpoint.Checkpointer(tmp_path, save_every_steps=5, async_save=False)
  assert not ckpt.save(3, _state(3, mesh))
  assert ckpt.save(3, _state(3, mesh), force=True)
  assert ckpt.save(5, _state(5, mesh))
  assert not ckpt.save(5, _state(5, mesh), force=True)  # already there (a preemption right after a save)
  assert ckpt.all_steps() == [3, 5]
  assert ckpt.read_metadata() is None and checkpoint.read_metadata(tmp_path, 5) is None
  state, iterator, step = ckpt.restore(_abstract(mesh))
  assert step == 5 and iterator is None
  _assert_state_equal(state, _state(5, mesh))
  # Asking for the iterator of a checkpoint saved without one: no silent fresh iterator.
  with pytest.raises(checkpoint.CheckpointRestoreError, match="data_iterator"):
    ckpt.restore(_abstract(mesh), Iterator(), step=5)
  with pytest.raises(TypeError, match="JSON"):
    ckpt.save(10, _state(10, mesh), metadata={"bad": object()})
  ckpt.close()


@pytest.mark.parametrize("only_chunks", [False, True], ids=["every_file", "array_chunks"])
def test_unrestorable_latest_falls_back_to_the_previous_step(tmp_path, caplog, only_chunks):
  mesh = _mesh()
  directory = tmp_path / "ck"
  _save_three(directory, mesh)
  _truncate(directory / "30" / "state", only_chunks=only_chunks)

  ckpt = checkpoint.Checkpointer(directory, save_every_steps=10)
  iterator = Iterator(position=7)
  with caplog.at_level(logging.WARNING):
    state, _, step = ckpt.restore(_abstract(mesh), iterator)
  assert step == 20
  _assert_state_equal(state, _state(20, mesh))
  assert iterator.position == 21
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 30" in w and "could not be restored" in w for w in warnings), warnings

  # An explicit step that fails raises, naming it; the iterator stays where it was.
  iterator = Iterator(position=7)
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 30") as info:
    ckpt.restore(_abstract(mesh), iterator, step=30)
  assert list(info.value.failures) == [30] and iterator.position == 7
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 30"):
    checkpoint.restore_params(directory, _abstract(mesh)["params"], step=30)

  # restore_params falls back the same way.
  params, step = checkpoint.restore_params(str(directory), _abstract(mesh)["params"])
  assert step == 20
  _assert_state_equal(params, _state(20, mesh)["params"])

  # The resumed run saves step 30 again: the unrestorable one is replaced.
  assert ckpt.save(30, _state(31, mesh), Iterator(position=99), force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [10, 20, 30]
  state, _, step = ckpt.restore(_abstract(mesh), Iterator())
  assert step == 30
  _assert_state_equal(state, _state(31, mesh))
  ckpt.close()


def test_no_step_restores_lists_every_step_and_reason(tmp_path):
  mesh = _mesh()
  directory = tmp_path / "ck"
  _save_three(directory, mesh)
  for step in (10, 20, 30):
    _truncate(directory / str(step) / "state", only_chunks=True)
  iterator = Iterator(position=5)
  with pytest.raises(checkpoint.CheckpointRestoreError) as info:
    checkpoint.Checkpointer(directory).restore(_abstract(mesh), iterator)
  assert sorted(info.value.failures) == [10, 20, 30]
  assert all(f"step {s}:" in str(info.value) for s in (10, 20, 30))
  assert iterator.position == 5
  with pytest.raises(FileNotFoundError):
    checkpoint.Checkpointer(tmp_path / "nothing").restore(_abstract(mesh))


def test_iterator_refusing_a_state_is_left_unchanged_and_older_steps_are_tried(tmp_path, caplog):
  mesh = _mesh()
  directory = tmp_path / "ck"
  _save_three(directory, mesh)
  (directory / "30" / "data_iterator" / "state.json").write_text('{"next_batch": 31, "seed": 5}')
  (directory / "20" / "data_iterator" / "state.json").write_text('{"next_batch": 21, "se')  # corrupt JSON
  iterator = Iterator(position=3)
  with caplog.at_level(logging.WARNING):
    state, _, step = checkpoint.Checkpointer(directory).restore(_abstract(mesh), iterator)
  assert step == 10 and iterator.position == 11
  _assert_state_equal(state, _state(10, mesh))
  text = " ".join(r.getMessage() for r in caplog.records)
  assert "step 30" in text and "seed 5 != 0" in text and "step 20" in text

  iterator = Iterator(position=3)
  with pytest.raises(checkpoint.CheckpointRestoreError, match="seed 5 != 0"):
    checkpoint.Checkpointer(directory).restore(_abstract(mesh), iterator, step=30)
  assert iterator.position == 3


def test_corrupt_metadata_is_skipped_or_raised(tmp_path, caplog):
  mesh = _mesh()
  directory = tmp_path / "ck"
  _save_three(directory, mesh)
  (directory / "30" / "metadata" / "metadata.json").write_text("{not json")
  with caplog.at_level(logging.WARNING):
    assert checkpoint.read_metadata(directory)["config"]["at"] == 20
  assert any("step 30" in r.getMessage() for r in caplog.records)
  with pytest.raises(checkpoint.CheckpointRestoreError, match="step 30"):
    checkpoint.read_metadata(directory, 30)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_never_saved(tmp_path, bad):
  mesh = _mesh()
  ckpt = checkpoint.Checkpointer(tmp_path, save_every_steps=1)
  state = _state(1, mesh)
  mu = np.array(state["opt"]["mu"])
  mu[5, 3] = bad
  state["opt"]["mu"] = jax.device_put(mu, state["opt"]["mu"].sharding)
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"\['opt'\]\['mu'\]"):
    ckpt.save(1, state, Iterator(), metadata={"a": 1})
  ckpt.wait()
  assert ckpt.all_steps() == [] and not list(epath.Path(tmp_path).glob("1*"))
  # bf16 and host leaves too; integer leaves are not checked.
  assert checkpoint.first_nonfinite_leaf({"a": jnp.ones(3, jnp.bfloat16), "b": np.int32(7)}) is None
  assert checkpoint.first_nonfinite_leaf({"a": jnp.ones(3), "b": np.array([1.0, bad])}) == "['b']"
  assert checkpoint.first_nonfinite_leaf(
      {"x": jnp.array([1.0, bad], jnp.bfloat16), "y": jnp.array([bad])}) == "['x']"
  assert ckpt.save(1, _state(1, mesh), force=True)
  ckpt.close()


def test_urls_reach_orbax_unchanged(monkeypatch, tmp_path):
  seen = []

  class Stop(Exception):
    pass

  def spy(self, directory, *args, **kwargs):
    seen.append(directory)
    raise Stop

  monkeypatch.setattr(ocp.CheckpointManager, "__init__", spy)
  url = "gs://bucket/run/checkpoints"
  with pytest.raises(Stop):
    checkpoint.Checkpointer(url)
  with pytest.raises(Stop):
    checkpoint.Checkpointer(epath.Path("s3://bucket/run") / "checkpoints")
  with pytest.raises(Stop):
    checkpoint.read_metadata(url)
  with pytest.raises(Stop):
    checkpoint.restore_params(url, {})
  monkeypatch.chdir(tmp_path)
  with pytest.raises(Stop):
    checkpoint.Checkpointer("relative/ck")
  assert [str(p) for p in seen] == [url, "s3://bucket/run/checkpoints", url, url,
                                    str(epath.Path(tmp_path).resolve() / "relative" / "ck")]
  assert all(isinstance(p, epath.Path) for p in seen)


_TWO_PROCESSES = textwrap.dedent("""
    import os, sys, logging
    import numpy as np
    from geotoken_jax import distributed
    directory, port, pid, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    assert distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import jax
    from geotoken_jax import checkpoint
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4), ("data",))
    N = 4096
    def state(v):
      sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      w = np.arange(N, dtype=np.float32) + v  # large enough not to be inlined in OCDBT's index
      return {"w": jax.make_array_from_callback((N,), sh, lambda i: w[i])}
    def total(x):  # a psum over the 2 processes (gloo)
      return float(jax.jit(lambda a: a.sum(), out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))(x).addressable_data(0))
    class It:
      def __init__(self): self.n = -1
      def get_state(self): return {"n": self.n}
      def set_state(self, s): self.n = s["n"]
    ckpt = checkpoint.Checkpointer(directory, save_every_steps=1)
    if phase == "save":
      assert total(state(0)["w"]) == N * (N - 1) / 2
      for step in (1, 2):
        it = It(); it.n = step
        assert ckpt.save(step, state(step), it, metadata={"step": step})
      bad = state(3)
      w = np.ones(N, np.float32); w[N - 5] = np.nan  # on process 1's shard only
      bad["w"] = jax.make_array_from_callback((N,), bad["w"].sharding, lambda i: w[i])
      try:
        ckpt.save(3, bad, It())
        raise SystemExit("saved a NaN")
      except checkpoint.NonFiniteStateError as e:
        print("refused:", e)
    else:
      abstract = {"w": jax.ShapeDtypeStruct((N,), np.float32, sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data")))}
      it = It()
      restored, _, step = ckpt.restore(abstract, it)
      print("restored", step, it.n, total(restored["w"]))
    ckpt.close()
""")


def _run_two(script, directory, phase):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, str(script), str(directory), str(port), str(i), phase], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  return [o[0] for o in outs], [o[1] for o in outs]


def test_two_processes_save_refuse_nan_and_fall_back_together(tmp_path):
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESSES)
  directory = tmp_path / "ck"
  outs, _ = _run_two(script, directory, "save")
  assert all("refused:" in o and "['w']" in o for o in outs), outs
  assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["1", "2"]
  assert json.loads((directory / "2" / "data_iterator" / "state.json").read_text()) == {"n": 2}
  # Break the array chunks process 1 wrote (and alone reads back): process 0 restores
  # step 2 fine, process 1 cannot; both must agree on step 1.
  assert (directory / "2" / "state" / "ocdbt.process_0").is_dir()
  _truncate(directory / "2" / "state" / "ocdbt.process_1", only_chunks=True)
  outs, errs = _run_two(script, directory, "restore")
  assert all("restored 1 1 8390656.0" in o for o in outs), outs
  assert "step 2" in errs[0] and "another process could not restore" in errs[0], errs[0][-2000:]
  assert "step 2" in errs[1] and "item 'state'" in errs[1], errs[1][-2000:]
