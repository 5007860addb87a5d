"""What a cluster run hits first: non-finite losses, corrupt checkpoints, changed configs,
bad configs, URL workdirs, and how gradient accumulation and meshes are laid out."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from geotoken_jax import checkpoint, command_line, data, sharding, train, trainer
from geotoken_jax.bench.train_bench import random_batch

from test_train import REPO, _assert_trees_close, _final_params, _step_config, earth_config, smoke_run_config


class _PoisonedTokens:
  """A source whose token ids lie outside the vocabulary: JAX gathers NaN for them."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def get_batch(self, indices):
    batch = dict(self._source.get_batch(indices))
    batch["tokens"] = np.full_like(batch["tokens"], 99)
    return batch


def _poison_training_data(monkeypatch):
  real = data.get_source

  def get_source(data_config, split, spec, **kwargs):
    source = real(data_config, split, spec, **kwargs)
    return _PoisonedTokens(source) if split == "train" else source

  monkeypatch.setattr(data, "get_source", get_source)


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.asarray(x).dtype.kind == "f")


def test_non_finite_steps_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch, capsys):
  config = earth_config()
  config.num_steps = 20
  config.checkpoint_every_steps = 2
  config.max_consecutive_nonfinite = 3
  config.stop_after_steps = 4
  assert trainer.train_and_evaluate(config, str(tmp_path)) == {"preempted": True, "step": 4}
  clean = _final_params(config, tmp_path)

  # From step 5 every batch's loss is NaN: steps 5, 6, 7 are skipped, then the run stops.
  _poison_training_data(monkeypatch)
  config.stop_after_steps = 0
  with pytest.raises(trainer.NonFiniteTrainingError,
                     match=r"step 7: the last 3 steps \(from step 5\).*last good checkpoint is step 6"):
    trainer.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  skipped = {r["step"]: r["skipped_total"] for r in rows if r["kind"] == "train"}
  assert [skipped[s] for s in (4, 5, 6, 7)] == [0, 1, 2, 3]
  assert all(np.isnan(r["loss"]) for r in rows if r["kind"] == "train" and r["step"] > 4)
  # What is on disk is finite, and step 6 holds step 4's parameters (its updates were skipped).
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 4, 6]
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  setup, template = trainer.create_train_state(config, trainer.inference.token_spec(config),
                                               sharding.create_mesh(config.mesh), 100, 10)
  for step in (2, 4, 6):
    state, _, _ = ckpt.restore(checkpoint.abstract_like(template, setup.state_shardings), step=step)
    assert _all_finite(state), step
    if step == 6:
      for x, y in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(clean["params"])):
        np.testing.assert_array_equal(x, y)
      assert int(state["nonfinite"]["total"]) == 2
  ckpt.close()

  # The command line: the same stop is exit status 1 with the message on stderr.
  capsys.readouterr()
  status = command_line.call(train.main, ["train", "--config", os.path.join(REPO, "configs/earth.py:smoke"),
                                          "--workdir", str(tmp_path), "--config.num_steps=20",
                                          "--config.checkpoint_every_steps=2",
                                          "--config.max_consecutive_nonfinite=2"])
  assert status == 1
  assert "non-finite loss or gradient" in capsys.readouterr().err


@pytest.mark.xdist_group("trained_smoke_run")
def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys, trained_smoke_run):
  config = smoke_run_config()  # 8 steps, a checkpoint every 2: trained_smoke_run is its uninterrupted run
  config.stop_after_steps = 6
  trainer.train_and_evaluate(config, str(tmp_path / "broken"))
  # A crash during a copy: every array file of step 6 cut to half its size.
  truncated = 0
  for root, _, files in os.walk(tmp_path / "broken" / "checkpoints" / "6" / "state"):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 64 and not name.endswith((".json", "_METADATA")):
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        truncated += 1
  assert truncated
  capsys.readouterr()
  config.stop_after_steps = 0
  trainer.train_and_evaluate(config, str(tmp_path / "broken"))
  printed = capsys.readouterr().out
  assert "checkpoint 6 could not be restored" in printed and "resumed from step 4" in printed
  assert "8 steps from 4" in printed
  # Steps 5..8 retrained from step 4: the same parameters as the uninterrupted run.
  a, b = _final_params(config, trained_smoke_run), _final_params(config, tmp_path / "broken")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.xdist_group("trained_smoke_run")
def test_resume_with_a_changed_config_names_the_field(tmp_path, trained_smoke_run):
  workdir = tmp_path / "run"
  shutil.copytree(trained_smoke_run, workdir)  # smoke_run_config's 8 steps, checkpoints 4, 6 and 8
  changed = smoke_run_config()
  changed.batch_size = 32
  with pytest.raises(trainer.ConfigMismatchError, match=r"batch_size = 16.*asks for 32"):
    trainer.train_and_evaluate(changed, str(workdir))
  changed = smoke_run_config()
  changed.model.decoder_layers = 2
  with pytest.raises(trainer.ConfigMismatchError, match=r"model\.decoder_layers"):
    trainer.train_and_evaluate(changed, str(workdir))
  changed = smoke_run_config()
  changed.tokens.level = 10
  with pytest.raises(trainer.ConfigMismatchError, match=r"tokens\.level"):
    trainer.train_and_evaluate(changed, str(workdir))
  # Fields that may change (the learning rate, the number of steps) resume.
  config = smoke_run_config()
  config.num_steps = 10
  config.optim.learning_rate = 5e-4
  assert trainer.train_and_evaluate(config, str(workdir))["step"] == 10


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 12, r"batch_size 12 must be a multiple of the mesh's 8 batch devices"),
    ("optim.grad_accum_steps", 4, r"x optim.grad_accum_steps 4 \(= 32\)"),
    ("eval_batch_size", 20, r"eval_batch_size 20 must be a multiple"),
    ("evaluate.batch_size", 4, r"evaluate.batch_size 4 must be a positive multiple"),
    ("evaluate.strategies", "greedy,beam:0", r"beam size must be an integer >= 1"),
    ("evaluate.strategies", "greedy,nucleus:3", r"unknown strategy 'nucleus'"),
    ("validation_strategy", "sample:0:0.7", r"number of samples must be >= 1"),
])
def test_bad_configs_fail_before_compiling(tmp_path, monkeypatch, field, value, message):
  config = earth_config()
  target = config
  *parents, leaf = field.split(".")
  for p in parents:
    target = target[p]
  target[leaf] = value

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")

  monkeypatch.setattr(trainer, "create_train_state", no_compile)
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_accumulation_cuts_microbatches_from_each_devices_rows():
  """The compiled step over 8 batch devices holds no all-gather: no device sees another's rows."""
  config = _step_config(dropout=0.0)
  config.optim.grad_accum_steps = 4
  spec = trainer.inference.token_spec(config)
  mesh = sharding.create_mesh({"data": 8})
  setup, state = trainer.create_train_state(config, spec, mesh, 100, 10)
  batch = sharding.make_global_batch(random_batch(config.model, spec, 64, seed=5), mesh)
  step = trainer.make_train_step(setup, config, mesh)
  hlo = step.lower(state, batch).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert "all-reduce" in hlo  # the gradients are still summed over devices
  # And the result is one big batch's step on one device.
  one = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  config_one = _step_config(dropout=0.0)
  setup1, state1 = trainer.create_train_state(config_one, spec, one, 100, 10)
  state1, metrics1 = trainer.make_train_step(setup1, config_one, one)(
      state1, sharding.make_global_batch(random_batch(config.model, spec, 64, seed=5), one))
  state8, metrics8 = step(state, batch)
  np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
  _assert_trees_close(jax.device_get(state8["params"]), jax.device_get(state1["params"]), rtol=2e-4, atol=2e-5)


def test_meshes_come_from_jax_make_mesh_with_dcn_axes():
  mesh = sharding.create_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=r"mesh.dcn \{'data': 2\} needs 2 processes"):
    sharding.create_mesh({"data": -1, "dcn": {"data": 2}})
  with pytest.raises(ValueError, match="unknown mesh.dcn axes"):
    sharding.create_mesh({"data": -1, "dcn": {"model": 2}})


@pytest.fixture
def memory_gs(serve_gs):
  """gs:// and gcs:// served by an in-memory fsspec filesystem (no network)."""
  MemoryFileSystem.store.clear()
  serve_gs(MemoryFileSystem)
  yield MemoryFileSystem.store  # {"gs://bucket/path": file}
  MemoryFileSystem.store.clear()


class _RecordingCheckpointer:
  """Stands in for orbax (whose arrays go through TensorStore's own gs driver, i.e. the
  network): records the directory it is given."""
  directories = []

  def __init__(self, directory, **kwargs):
    del kwargs
    self.directories.append(directory)
    self.latest_step = None

  def read_metadata(self, step=None):
    return None

  def save(self, *args, **kwargs):
    return True

  def wait(self):
    pass

  def close(self):
    pass


def test_a_gs_workdir_stays_a_url_end_to_end(memory_gs, monkeypatch):
  seen_logdirs = []
  import tensorboardX  # noqa: PLC0415

  real_writer = tensorboardX.SummaryWriter

  def writer(logdir, *args, **kwargs):
    seen_logdirs.append(logdir)
    return real_writer(logdir, *args, **kwargs)

  monkeypatch.setattr(trainer.summary.tensorboardX, "SummaryWriter", writer)
  monkeypatch.setattr(trainer.checkpoint, "Checkpointer", _RecordingCheckpointer)
  config = earth_config()
  config.num_steps = 3
  config.log_every_steps = 1
  cwd = os.getcwd()
  results = trainer.train_and_evaluate(config, "gs://bucket/runs/r1")
  assert results["test"]["images"] == 64
  assert [str(d) for d in _RecordingCheckpointer.directories] == ["gs://bucket/runs/r1/checkpoints"]
  assert seen_logdirs == ["gs://bucket/runs/r1/tensorboard"]
  # Nothing landed on the local disk under a mangled name.
  assert not os.path.exists(os.path.join(cwd, "gs:")) and not os.path.exists(os.path.join(cwd, "bucket"))
  files = {p.split("gs://bucket/runs/r1/")[-1] for p in memory_gs}
  assert {"config.json", "metrics.jsonl", "results.json"} <= files
  assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
  read = lambda name: memory_gs[f"gs://bucket/runs/r1/{name}"].getvalue().decode()  # noqa: E731
  rows = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
  assert json.loads(read("results.json"))["test"]["images"] == 64
