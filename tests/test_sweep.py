"""geotoken_jax.sweeping and the sweep command: checked expansion, frozen configs, resume after
a kill, failed variants, launch scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from geotoken_jax import sweeping
from geotoken_jax import sweep as sweep_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE_CONFIG = f'''
import importlib.util
_spec = importlib.util.spec_from_file_location("earth", {os.path.join(REPO, "configs", "earth.py")!r})
_earth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_earth)


def get_config(arg=None):
  config = _earth.get_config("smoke")
  config.num_steps = 6
  config.checkpoint_every_steps = 2
  config.evaluate.strategies = "greedy"
  return config


def sweep(arg=None):
  return [{{"seed": 3}}, {{"seed": 4, "model.dropout": 0.2}}]
'''


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "smoke_sweep.py"
  path.write_text(SMOKE_CONFIG)
  return str(path)


def test_bad_axes_fail_before_any_folder_is_written(config_file, tmp_path, capsys):
  out = tmp_path / "sweep"
  cases = [(["--grid", "seed=0,1", "--grid", "model.dropoutt=0.0,0.1"], "unknown config key 'model.dropoutt'"),
           (["--grid", "seed=0,0.5"], "seed='0.5': expected an integer"),
           (["--grid", "seed=1,1"], "two variants are the same"),
           (["--zip", "seed=0,1", "--zip", "model.dropout=0.1"], "same number of values"),
           (["--grid", "seed=0", "--zip", "seed=1"], "seed is swept twice")]
  for flags, message in cases:
    assert sweep_command.main(["--config", config_file, "--workdir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_expansion_types_values_and_zips_axes_and_reads_a_sweep_function(config_file):
  config, points = sweeping.load_config_file(config_file)
  axes = sweeping.parse_axes(["seed=0,1"], ["model.dropout=0.0,0.5", "optim.learning_rate=[0.001, 0.01]"])
  variants = sweeping.expand(config, axes)
  assert [v["overrides"] for v in variants] == [
      {"seed": s, "model.dropout": d, "optim.learning_rate": lr} for s in (0, 1) for d, lr in ((0.0, 0.001),
                                                                                            (0.5, 0.01))]
  assert variants[3]["config"].model.dropout == 0.5 and variants[3]["config"].seed == 1
  assert config.seed == 0 and config.model.dropout != 0.5  # the source config is untouched
  assert len({v["name"] for v in variants}) == 4 and all("," not in v["name"] for v in variants)
  from_function = sweeping.expand_overrides(config, points)
  assert [v["overrides"] for v in from_function] == [{"seed": 3}, {"seed": 4, "model.dropout": 0.2}]
  with pytest.raises(ValueError, match="expected a int"):
    sweeping.expand_overrides(config, [{"seed": "3"}])


def test_failed_variants_are_kept_listed_and_retried_on_request(config_file, tmp_path):
  config, _ = sweeping.load_config_file(config_file)
  variants = sweeping.expand(config, sweeping.parse_axes(["seed=0,1"]))
  sweep = sweeping.Sweep(tmp_path / "s")
  sweep.create(variants, source=config_file, axes=[])
  bad = variants[1]["name"]

  def command(s, name):  # a stand-in for training: the first variant "finishes", the second fails
    run = s.variant_dir(name) / sweeping.RUN_DIR
    if name == bad:
      return "exit 3"
    return (f"mkdir -p {run}/eval/test-step6 && echo '{{}}' > {run}/eval/test-step6/results.json && "
            f"echo '{{}}' > {run}/results.json")

  lines = []
  unfinished = sweeping.run_variants(sweep, command=command, log=lines.append)
  assert [(u["name"], u["state"], u["exit_status"]) for u in unfinished] == [(bad, "failed", 3)]
  unfinished = sweeping.run_variants(sweep, command=command, log=lines.append)  # the failed one is not rerun
  states = {v["name"]: (v["state"], len(v["launches"])) for v in sweep.read()["variants"]}
  assert states == {variants[0]["name"]: ("finished", 1), bad: ("failed", 1)}
  assert any("--retry_failed" in line for line in lines)
  sweeping.run_variants(sweep, command=command, retry_failed=True, log=lines.append)
  assert {v["name"]: len(v["launches"]) for v in sweep.read()["variants"]} == {variants[0]["name"]: 1, bad: 2}
  # Another sweep in the same folder is refused.
  with pytest.raises(ValueError, match="holds another sweep"):
    sweep.create(sweeping.expand(config, sweeping.parse_axes(["seed=5,6"])), source=config_file, axes=[])


def test_the_launch_script_runs_one_variant_per_index(config_file, tmp_path, capsys):
  out = tmp_path / "s"
  assert sweep_command.main(["--config", config_file, "--workdir", str(out), "--grid", "seed=0,1",
                             "--launch_script"]) == 0
  assert "sbatch --array=0-1" in capsys.readouterr().out
  script = (out / "launch.sh").read_text()
  frozen = [json.loads((out / name / sweeping.FROZEN).read_text())["seed"] for name in ("seed=0", "seed=1")]
  assert frozen == [0, 1]
  for i, name in enumerate(("seed=0", "seed=1")):
    assert f"  {i}) " in script and str(out / name / sweeping.FROZEN) in script.split(f"  {i}) ")[1].split(";;")[0]
  assert subprocess.run(["bash", str(out / "launch.sh"), "7"], capture_output=True).returncode == 2


def _wait_for(predicate, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f"timed out waiting for {what}")


def test_a_2x2_smoke_sweep_killed_in_its_second_variant_resumes_with_the_same_command(config_file, tmp_path):
  out = tmp_path / "grid"
  command = [sys.executable, "-m", "geotoken_jax.sweep", "--config", config_file, "--workdir", str(out),
             "--grid", "seed=0,1", "--grid", "model.dropout=0.0,0.1"]
  # One compilation cache for the nine processes (variants differing in seed share their programs).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jit"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
  second = out / "seed=0__model.dropout=0.1" / sweeping.RUN_DIR
  try:
    # Killed (the whole process group: the sweep and its training run) once the second variant has
    # saved a checkpoint and before it finishes.
    _wait_for(lambda: sweeping.checkpoint_step(second) >= 2, 300, "the second variant's first checkpoint")
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  first = out / "seed=0__model.dropout=0.0" / sweeping.RUN_DIR
  first_results = (first / "results.json").read_text()
  assert not (second / "results.json").exists()
  # The same command again: four finished variants.
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "seed=0__model.dropout=0.0: finished, skipped" in rerun.stdout
  manifest = json.loads((out / sweeping.MANIFEST).read_text())
  launches = {v["name"]: [launch["from_step"] for launch in v["launches"]] for v in manifest["variants"]}
  assert all(v["state"] == "finished" for v in manifest["variants"])
  assert launches["seed=0__model.dropout=0.0"] == [0]  # not retrained
  resumed = launches["seed=0__model.dropout=0.1"]
  assert len(resumed) == 2 and resumed[0] == 0 and resumed[1] >= 2  # resumed from its checkpoint
  assert launches["seed=1__model.dropout=0.0"] == [0] and launches["seed=1__model.dropout=0.1"] == [0]
  assert (first / "results.json").read_text() == first_results
  for name in launches:
    assert json.loads((out / name / sweeping.RUN_DIR / "results.json").read_text())["config"] == json.loads(
        (out / name / sweeping.FROZEN).read_text())
