"""The trainer: sharded steps, checkpoints across meshes, resume, multi-process, preemption."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from geotoken_jax import checkpoint, optim, s2, sharding, trainer
from geotoken_jax.bench.train_bench import random_batch

from conftest import compile_cache_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def earth_config(variant="smoke"):
  spec = importlib.util.spec_from_file_location("earth_config", os.path.join(REPO, "configs", "earth.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _step_config(dropout=0.1):
  config = earth_config()
  config.model.dropout = dropout
  config.optim.schedule = "constant"  # a nonzero first step
  # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 it turns float32
  # noise in mathematically zero gradients (attention's key bias) into +-lr;
  # a larger eps keeps the comparison about sharding, not noise amplification.
  config.optim.eps = 1e-6
  return config


def _one_step(config, mesh, batch):
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  setup, state = trainer.create_train_state(config, spec, mesh, total_steps=100, steps_per_epoch=10)
  step = trainer.make_train_step(setup, config, mesh)
  state, metrics = step(state, sharding.make_global_batch(batch, mesh))
  return setup, jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-5, atol=5e-6):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_step_on_8_devices_data4_fsdp2_equals_1_device():
  assert jax.device_count() == 8
  config = _step_config()
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  batch = random_batch(config.model, spec, 16, seed=3)
  one = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  eight = sharding.create_mesh({"data": 4, "fsdp": 2})
  _, state1, metrics1 = _one_step(config, one, batch)
  setup8, state8, metrics8 = _one_step(config, eight, batch)
  # The 8-device run really shards parameters over fsdp.
  specs = [s.spec for s in jax.tree.leaves(setup8.state_shardings["params"])]
  assert sum("fsdp" in spec for spec in specs) > len(specs) // 3
  np.testing.assert_allclose(metrics1["loss"], metrics8["loss"], rtol=1e-5)
  assert metrics1["grad_norm"] > 0
  _assert_trees_close(state1["params"], state8["params"])
  _assert_trees_close(state1["opt_state"], state8["opt_state"], atol=1e-7)
  # And the step did change the parameters.
  fresh = trainer.create_train_state(config, spec, one, 100, 10)[1]
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(state1["params"]))]
  assert max(moved) > 1e-4


def test_gradient_accumulation_equals_one_big_batch():
  config = _step_config(dropout=0.0)
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  batch = random_batch(config.model, spec, 16, seed=5)
  mesh = sharding.create_mesh({"data": 2}, devices=jax.devices()[:2])
  _, state1, metrics1 = _one_step(config, mesh, batch)
  config.optim.grad_accum_steps = 4
  _, state4, metrics4 = _one_step(config, mesh, batch)
  np.testing.assert_allclose(metrics1["loss"], metrics4["loss"], rtol=1e-5)
  _assert_trees_close(state1["params"], state4["params"])


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  config = _step_config()
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  mesh_a = sharding.create_mesh({"data": 4, "fsdp": 2})
  mesh_b = sharding.create_mesh({"data": 2, "fsdp": 4})
  setup_a, state_a = trainer.create_train_state(config, spec, mesh_a, 100, 10)
  state_a, _ = trainer.make_train_step(setup_a, config, mesh_a)(
      state_a, sharding.make_global_batch(random_batch(config.model, spec, 16, seed=1), mesh_a))
  saver = checkpoint.Checkpointer(str(tmp_path), save_every_steps=1)
  assert saver.save(1, state_a)
  saver.close()

  setup_b, template_b = trainer.create_train_state(config, spec, mesh_b, 100, 10)
  restored, _, _ = checkpoint.Checkpointer(str(tmp_path)).restore(
      checkpoint.abstract_like(template_b, setup_b.state_shardings))
  expected = jax.device_get(state_a)
  for (path, x), y, want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected),
                                jax.tree.leaves(setup_b.state_shardings)):
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))
    assert x.sharding.is_equivalent_to(want, x.ndim), jax.tree_util.keystr(path)
  assert any("fsdp" in s.spec and mesh_b.shape["fsdp"] == 4 for s in jax.tree.leaves(setup_b.state_shardings))


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _final_params(config, workdir):
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  mesh = sharding.create_mesh(config.mesh)
  setup, template = trainer.create_train_state(config, spec, mesh, 100, 10)
  restored, _, _ = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore(
      checkpoint.abstract_like(template, setup.state_shardings))
  return jax.device_get(restored)


def test_smoke_config_trains_end_to_end_and_loss_falls(tmp_path):
  config = earth_config()
  results = trainer.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert sorted(losses) == list(range(1, config.num_steps + 1))
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(26, 31)])
  assert last < first - 0.05, (first, last)
  test = results["test"]
  assert test["images"] == config.data.eval_limit
  assert set(test) >= {"acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km", "loss"}
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["test"]["images"] == config.data.eval_limit and "| GeoToken greedy" in saved["table"]
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [10, 20, 30]


def smoke_run_config():
  """The config of conftest's `trained_smoke_run` (8 steps, uninterrupted): the tests that
  compare against that run train with it."""
  config = earth_config()
  config.num_steps = 8
  config.checkpoint_every_steps = 2
  config.model.dropout = 0.1  # dropout keys must follow the step, not the process's history
  return config


@pytest.mark.xdist_group("trained_smoke_run")
def test_stopping_and_resuming_equals_an_uninterrupted_run(tmp_path, trained_smoke_run):
  config = smoke_run_config()  # trained_smoke_run is its uninterrupted run
  config.stop_after_steps = 4
  assert trainer.train_and_evaluate(config, str(tmp_path / "resumed")) == {"preempted": True, "step": 4}
  config.stop_after_steps = 0
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))  # picks up at step 4
  straight, resumed = _train_losses(trained_smoke_run), _train_losses(tmp_path / "resumed")
  assert straight == resumed
  a, b = _final_params(config, trained_smoke_run), _final_params(config, tmp_path / "resumed")
  assert int(a["step"]) == int(b["step"]) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _train_command(workdir, *overrides):
  return [sys.executable, "-m", "geotoken_jax.train", "--config", os.path.join(REPO, "configs/earth.py:smoke"),
          "--workdir", str(workdir), "--config.num_steps=6", *overrides]


def _env(devices, compile_cache=False):
  """compile_cache: the session's compilation cache (conftest), for runs of one process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if compile_cache:
    env.update(compile_cache_env())
  return env


def test_two_processes_train_the_same_steps_as_one_and_resume_on_one(tmp_path):
  """Steps 1-3 on 2 processes x 2 devices, then 4-6 resumed from their checkpoint on 1
  process x 4 devices: the same losses and results as 6 steps on 1 process."""
  single = subprocess.run(_train_command(tmp_path / "one"), env=_env(4, compile_cache=True), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--",
                          *_train_command(tmp_path / "two", "--config.stop_after_steps=3")],
                         env=dict(_env(2), LOGDIR=str(tmp_path)), capture_output=True, text=True, timeout=600)
  assert multi.returncode == 143, multi.stdout[-3000:] + multi.stderr[-3000:]
  assert "2 process(es)" in multi.stdout and "mesh {'data': 4, 'fsdp': 1}" in multi.stdout
  # The data iterator's state is one global JSON item, not one file per process.
  iterator_dir = tmp_path / "two" / "checkpoints" / "3" / "data_iterator"
  names = sorted(p.name for p in iterator_dir.iterdir())
  assert "state.json" in names and not [n for n in names if n.startswith("process_")], names
  assert json.loads((iterator_dir / "state.json").read_text())["next_batch"] == 3
  # The same programs as the first run's: compiled once (the session's compilation cache).
  resumed = subprocess.run(_train_command(tmp_path / "two"), env=_env(4, compile_cache=True), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "1 process(es)" in resumed.stdout and "6 steps from 3" in resumed.stdout
  one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)
  test_one = json.load(open(tmp_path / "one" / "results.json"))["test"]
  test_two = json.load(open(tmp_path / "two" / "results.json"))["test"]
  assert test_one["images"] == test_two["images"] == 64
  np.testing.assert_allclose(test_two["median_km"], test_one["median_km"], rtol=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  process = subprocess.Popen(_train_command(tmp_path, "--config.num_steps=100000"), env=_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
  line = [l for l in stdout.splitlines() if l.startswith("preempted at step")]
  assert line, stdout[-2000:]
  step = int(line[0].split()[3].rstrip(":"))
  assert step >= 3 and str(step) in os.listdir(tmp_path / "checkpoints")


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  """JAX's preemption sync point: process 1 gets SIGTERM, both save the same step and exit 143."""
  import socket  # noqa: PLC0415

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      _train_command(tmp_path, "--config.num_steps=100000", f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}"),
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  metrics_file = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [143, 143], [o[1][-2000:] for o in outputs]
  line = [l for l in outputs[0][0].splitlines() if l.startswith("preempted at step")]
  assert line, outputs[0][0][-2000:]
  step = int(line[0].split()[3].rstrip(":"))
  assert step >= 3 and str(step) in os.listdir(tmp_path / "checkpoints")
  assert max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == step


def test_learning_rate_schedules():
  config = earth_config().optim
  config.update(schedule="step_decay", learning_rate=5e-5, decay_rate=0.9, warmup_steps=0)
  _, schedule = optim.make_optimizer(config, total_steps=1000, steps_per_epoch=100)
  np.testing.assert_allclose([schedule(s) for s in (0, 99, 100, 250)], [5e-5, 5e-5, 4.5e-5, 5e-5 * 0.81],
                             rtol=1e-6)
  config.update(schedule="warmup_cosine", warmup_steps=10, learning_rate=1e-3, end_factor=0.01)
  _, schedule = optim.make_optimizer(config, total_steps=110, steps_per_epoch=100)
  np.testing.assert_allclose([schedule(0), schedule(10), schedule(110)], [0.0, 1e-3, 1e-5], rtol=1e-5, atol=1e-9)
  with pytest.raises(ValueError, match="unknown schedule"):
    config.schedule = "bogus"
    optim.make_optimizer(config, 10, 10)


def test_mesh_and_rules_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.create_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.create_mesh({"model": 2})
  mesh = sharding.create_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), (192, 768), mesh, sharding.DEFAULT_RULES) == \
      jax.sharding.PartitionSpec("fsdp", None)
  # Not divisible: replicated rather than an error.
  assert sharding.logical_to_mesh_spec(("embed",), (7,), mesh, sharding.DEFAULT_RULES) == \
      jax.sharding.PartitionSpec(None)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_mesh_spec(("bogus",), (8,), mesh, sharding.DEFAULT_RULES)
