"""Config-driven sweeps: expand a grid of overrides, freeze each variant, run, resume.

  parse_axes(grid=["KEY=V1,V2", ...], zip_=["KEY=V1,V2", ...])   the sweep's axes
  expand(config, axes)          the variants: (name, overrides, frozen config), checked
  expand_overrides(config, dicts)   the same for a config file's sweep() override dicts
  load_config_file("F.py[:ARG]")    get_config(ARG) and sweep(ARG) of a config file
  Sweep(directory)              the manifest DIR/sweep.json and each variant's folder
  run_variants(sweep, ...)      runs the unfinished variants (one after another or N at a
                                time), resuming interrupted ones; returns those left unfinished

Axes: every `grid` key is one axis of a Cartesian product; all `zip` keys together form one
more axis, their i-th values taken together (they must have the same number of values).  A
value list is "V1,V2,..." or a JSON list "[V1, V2]" (for values holding commas, e.g. tuples).
Values take the type of the config's current value: int, float (an int is accepted), bool
(true/false), str, or a tuple/list (a JSON list).  A key the config does not have, a value of
the wrong type, or two variants with the same overrides are refused by expand() before anything
is written, naming the key.

Freezing: each variant's whole config is written to DIR/<variant>/frozen_config.json when the
sweep is expanded; runs read that file (geotoken_jax/frozen_config.py), never the config file
again, so editing the config mid-sweep changes nothing already expanded.  Expanding again
into the same folder must give the same variants (else it is refused: use another folder).

States in sweep.json: pending, running (launched: an interrupted sweep finds it running and
resumes it), finished (exit status 0 and DIR/<variant>/run/results.json present), failed (exit
status != 0, kept with its status and log; run again with retry_failed).  Each launch is
recorded with the checkpoint step it started from (0: from scratch): a resumed variant shows
its checkpoint step, a finished one is never launched again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from etils import epath

from geotoken_jax import runtime

MANIFEST = "sweep.json"
FROZEN = "frozen_config.json"
RUN_DIR = "run"  # a variant's workdir: DIR/<variant>/run
LOG = "log.txt"
PENDING, RUNNING, FINISHED, FAILED = "pending", "running", "finished", "failed"
# A variant stopped by a signal (SIGTERM: the trainer checkpoints and exits 143; SIGINT, SIGKILL
# as seen through bash) was interrupted, not failed: it stays "running" and is resumed.
PREEMPTED_STATUSES = (143, 130, 137, -15, -2, -9)


@dataclasses.dataclass(frozen=True)
class Axis:
  keys: tuple[str, ...]  # one key, or the zipped keys
  values: tuple[tuple[str, ...], ...]  # per point of the axis: one raw value per key


def _split_values(text: str, key: str) -> list[str]:
  text = text.strip()
  if text.startswith("["):
    try:
      values = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{key}: the value list {text!r} is not a JSON list ({e})") from e
    if not isinstance(values, list):
      raise ValueError(f"{key}: {text!r} is not a list")
    return [json.dumps(v) if not isinstance(v, str) else v for v in values]
  return [v.strip() for v in text.split(",")]


def _key_values(item: str, flag: str) -> tuple[str, list[str]]:
  if "=" not in item:
    raise ValueError(f"--{flag} {item!r}: expected KEY=V1,V2,...")
  key, text = item.split("=", 1)
  key = key.strip()
  values = _split_values(text, key)
  if not key or not values or any(v == "" for v in values):
    raise ValueError(f"--{flag} {item!r}: expected KEY=V1,V2,... with non-empty values")
  return key, values


def parse_axes(grid: Sequence[str] = (), zip_: Sequence[str] = ()) -> list[Axis]:
  axes = []
  seen: set[str] = set()
  for item in grid:
    key, values = _key_values(item, "grid")
    if key in seen:
      raise ValueError(f"{key} is swept twice")
    seen.add(key)
    axes.append(Axis((key,), tuple((v,) for v in values)))
  if zip_:
    pairs = [_key_values(item, "zip") for item in zip_]
    lengths = {key: len(values) for key, values in pairs}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"zipped keys need the same number of values, got {lengths}")
    for key, _ in pairs:
      if key in seen:
        raise ValueError(f"{key} is swept twice")
      seen.add(key)
    axes.append(Axis(tuple(k for k, _ in pairs), tuple(zip(*(values for _, values in pairs)))))
  if not axes:
    raise ValueError("a sweep needs at least one --grid or --zip axis")
  return axes


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for i, part in enumerate(key.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
      where = ".".join(key.split(".")[:i]) or "the config"
      raise ValueError(f"unknown config key {key!r}: {where} has no {part!r} (its keys: {known})")
    node = node[part]
  return node


def typed_value(config: ml_collections.ConfigDict, key: str, raw: str) -> Any:
  """raw text -> a value of the type of config[key] (ValueError naming the key otherwise)."""
  current = _lookup(config, key)

  def fail(kind: str):
    return ValueError(f"{key}={raw!r}: expected {kind} (the config holds {current!r})")

  if isinstance(current, bool):
    if raw.lower() in ("true", "1"):
      return True
    if raw.lower() in ("false", "0"):
      return False
    raise fail("true or false")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise fail("an integer") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise fail("a number") from None
  if isinstance(current, (tuple, list)):
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      raise fail("a JSON list") from None
    if not isinstance(value, list):
      raise fail("a JSON list")
    return type(current)(value)
  if isinstance(current, str) or current is None:
    return raw
  raise ValueError(f"{key}: a {type(current).__name__} cannot be swept (sweep its fields instead)")


def variant_name(overrides: dict[str, Any]) -> str:
  """A folder name from the overrides: "num_steps=4__seed=1" (no commas: names are listed
  comma-separated elsewhere), other unsafe characters replaced by "_"."""
  text = "__".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items())
  return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


def expand(config: ml_collections.ConfigDict, axes: Sequence[Axis]) -> list[dict]:
  """[{"name", "overrides", "config"}]: one per point of the product of the axes, every value
  typed and applied to a copy of config (nothing written)."""
  points = []
  for point in itertools.product(*(axis.values for axis in axes)):
    overrides = {}
    for axis, raw_values in zip(axes, point):
      for key, raw in zip(axis.keys, raw_values):
        overrides[key] = typed_value(config, key, raw)
    points.append(overrides)
  return expand_overrides(config, points)


def _check_typed(config: ml_collections.ConfigDict, key: str, value: Any) -> Any:
  """A Python value (a config's sweep() function) checked against config[key]'s type."""
  current = _lookup(config, key)
  ok = (isinstance(value, bool) if isinstance(current, bool) else
        isinstance(value, int) and not isinstance(value, bool) if isinstance(current, int) else
        isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(current, float) else
        isinstance(value, (tuple, list)) if isinstance(current, (tuple, list)) else
        isinstance(value, str) if isinstance(current, str) else True)
  if not ok:
    raise ValueError(f"{key}={value!r}: expected a {type(current).__name__} (the config holds {current!r})")
  return float(value) if isinstance(current, float) else value


def expand_overrides(config: ml_collections.ConfigDict, points: Sequence[dict]) -> list[dict]:
  """expand() for explicit override dicts (a config file's sweep() function)."""
  variants, names = [], {}
  for point in points:
    overrides = {key: _check_typed(config, key, value) for key, value in dict(point).items()}
    if not overrides:
      raise ValueError("an empty override set (a variant equal to the config itself)")
    frozen = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
      parent, _, leaf = key.rpartition(".")
      node = _lookup(frozen, parent) if parent else frozen
      node[leaf] = value
    name = variant_name(overrides)
    if name in names:
      raise ValueError(f"two variants are the same: {names[name]} and {overrides} (repeated values)")
    names[name] = overrides
    variants.append({"name": name, "overrides": overrides, "config": frozen})
  return variants


class Sweep:
  """DIR/sweep.json and DIR/<variant>/{frozen_config.json, run/, log.txt}."""

  def __init__(self, directory):
    self.directory = epath.Path(directory)

  @property
  def manifest_path(self) -> epath.Path:
    return self.directory / MANIFEST

  def exists(self) -> bool:
    return self.manifest_path.exists()

  def read(self) -> dict:
    return json.loads(self.manifest_path.read_text())

  def write(self, manifest: dict) -> None:
    runtime.write_atomic(self.manifest_path, json.dumps(manifest, indent=1).encode())

  def variant_dir(self, name: str) -> epath.Path:
    return self.directory / name

  def create(self, variants: list[dict], *, source: str, axes: Sequence[Axis]) -> dict:
    """Writes the frozen configs and the manifest; a sweep already in the folder must have the
    same variants (its frozen configs are kept: the config file is not read again)."""
    spec = [{"name": v["name"], "overrides": v["overrides"]} for v in variants]
    if self.exists():
      manifest = self.read()
      old = [{"name": v["name"], "overrides": v["overrides"]} for v in manifest["variants"]]
      if old != json.loads(json.dumps(spec)):
        raise ValueError(f"{self.directory} holds another sweep ({len(old)} variants: "
                         f"{', '.join(v['name'] for v in old[:4])}...); use another --workdir")
      return manifest
    self.directory.mkdir(parents=True, exist_ok=True)
    for v in variants:
      folder = self.variant_dir(v["name"])
      folder.mkdir(parents=True, exist_ok=True)
      (folder / FROZEN).write_text(v["config"].to_json_best_effort(indent=1))
    manifest = {"source": source, "axes": [{"keys": list(a.keys), "values": [list(p) for p in a.values]} for a in axes],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "variants": [{**s, "state": PENDING, "launches": []} for s in spec]}
    self.write(manifest)
    return manifest


def frozen_config_path(sweep: Sweep, name: str) -> epath.Path:
  return sweep.variant_dir(name) / FROZEN


def checkpoint_step(workdir: epath.Path) -> int:
  """The newest step saved under workdir/checkpoints (0 when none): where a launch starts."""
  folder = workdir / "checkpoints"
  if not folder.exists():
    return 0
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
  return max(steps, default=0)


def variant_commands(sweep: Sweep, name: str, python: str = sys.executable) -> list[list[str]]:
  """The commands that train (or resume) one variant from its frozen config, then evaluate its
  strategies on the test split with per-image predictions (what `geotoken report` compares)."""
  loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "frozen_config.py")
  run = str(sweep.variant_dir(name) / RUN_DIR)
  return [[python, "-m", "geotoken_jax.train", "--config", f"{loader}:{frozen_config_path(sweep, name)}",
           "--workdir", run],
          [python, "-m", "geotoken_jax.evaluate", "--workdir", run]]


def shell_command(sweep: Sweep, name: str, python: str = sys.executable) -> str:
  """variant_commands as one shell line (the second runs only if the first succeeds)."""
  return " && ".join(shlex.join(command) for command in variant_commands(sweep, name, python))


def is_finished(sweep: Sweep, name: str) -> bool:
  """The variant's run wrote results.json with the frozen config (it trained and evaluated) and
  its evaluation wrote the test split's per-image predictions."""
  run = sweep.variant_dir(name) / RUN_DIR
  results = run / "results.json"
  if not results.exists():
    return False
  saved = json.loads(results.read_text()).get("config")
  frozen = json.loads(frozen_config_path(sweep, name).read_text())
  if saved is not None and saved != frozen:
    return False
  evaluations = run / "eval"
  return evaluations.exists() and any((d / "results.json").exists() for d in evaluations.iterdir())


def run_variants(sweep: Sweep, *, parallel: int = 1, retry_failed: bool = False,
                 command: Callable[[Sweep, str], str] = shell_command, env: dict | None = None,
                 log: Callable[[str], None] = print) -> list[dict]:
  """Launches every variant that is not finished (failed ones only with retry_failed), at most
  `parallel` at a time, updating sweep.json as they start and end.  Returns the variants left
  unfinished (name, state: failed, or running when interrupted; exit status; log path)."""
  if parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {parallel}")
  manifest = sweep.read()
  entries = {v["name"]: v for v in manifest["variants"]}
  for name, entry in entries.items():  # a finished run found on disk (e.g. the sweep died before recording it)
    if entry["state"] != FINISHED and is_finished(sweep, name):
      entry["state"] = FINISHED
  todo = [n for n, e in entries.items() if e["state"] in (PENDING, RUNNING) or (retry_failed and e["state"] == FAILED)]
  for name, entry in entries.items():
    if entry["state"] == FINISHED:
      log(f"[sweep] {name}: finished, skipped")
    elif entry["state"] == FAILED and not retry_failed:
      log(f"[sweep] {name}: failed before (exit status {entry['launches'][-1]['exit_status']}), skipped: "
          "--retry_failed runs it again")
  sweep.write(manifest)
  running: dict[str, tuple[subprocess.Popen, Any]] = {}
  queue = list(todo)
  while queue or running:
    while queue and len(running) < parallel:
      name = queue.pop(0)
      entry = entries[name]
      start = checkpoint_step(sweep.variant_dir(name) / RUN_DIR)
      entry["state"] = RUNNING
      entry["launches"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": start,
                                "exit_status": None})
      sweep.write(manifest)
      log(f"[sweep] {name}: " + (f"resuming from step {start}" if start else "starting"))
      log_file = open(sweep.variant_dir(name) / LOG, "a")  # pylint: disable=consider-using-with
      process = subprocess.Popen(["bash", "-c", command(sweep, name)], stdout=log_file, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})})
      running[name] = (process, log_file)
    time.sleep(0.2)
    for name in [n for n, (p, _) in running.items() if p.poll() is not None]:
      process, log_file = running.pop(name)
      log_file.close()
      entry = entries[name]
      entry["launches"][-1]["exit_status"] = process.returncode
      if process.returncode == 0 and is_finished(sweep, name):
        entry["state"] = FINISHED
      elif process.returncode in PREEMPTED_STATUSES:  # stopped to be resumed: the next run resumes it
        entry["state"] = RUNNING
      else:
        entry["state"] = FAILED
      sweep.write(manifest)
      log(f"[sweep] {name}: {entry['state']} (exit status {process.returncode})")
  return [{"name": n, "state": e["state"], "exit_status": e["launches"][-1]["exit_status"] if e["launches"] else None,
           "log": str(sweep.variant_dir(n) / LOG)} for n, e in entries.items() if e["state"] != FINISHED]


def load_config_file(spec: str) -> tuple[ml_collections.ConfigDict, list[dict] | None]:
  """(get_config(ARG), list(sweep(ARG)) or None) of "path/to/config.py[:ARG]"."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {spec!r}: no file {path}")
  module_spec = importlib.util.spec_from_file_location(f"sweep_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  points = None
  if hasattr(module, "sweep"):
    points = [dict(p) for p in (module.sweep(arg) if arg else module.sweep())]
  return config, points


def launch_script(sweep: Sweep, *, python: str = ".venv/bin/python") -> str:
  """A bash script that runs variant number $1 (or $SLURM_ARRAY_TASK_ID): for a SLURM array
  (sbatch --array=0-(N-1) launch/slurm.sbatch bash DIR/launch.sh) or one TPU pod slice per
  variant (launch/tpu_pod.sh bash DIR/launch.sh I)."""
  names = [v["name"] for v in sweep.read()["variants"]]
  lines = ["#!/usr/bin/env bash", "# One sweep variant per task: bash launch.sh INDEX (default $SLURM_ARRAY_TASK_ID).",
           "set -euo pipefail", 'i=${1:-${SLURM_ARRAY_TASK_ID:?give the variant index}}', "case $i in"]
  for i, name in enumerate(names):
    lines.append(f"  {i}) {shell_command(sweep, name, python=python)} ;;")
  lines += [f'  *) echo "variant index $i out of range 0..{len(names) - 1}" >&2; exit 2 ;;', "esac", ""]
  return "\n".join(lines)

