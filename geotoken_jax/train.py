"""Train GeoToken and evaluate it: one command from a 2-core CPU to a pod.

  python -m geotoken_jax.train --config configs/earth.py[:smoke] --workdir DIR \
      [--config.batch_size=256 ...]

Read top to bottom: build the mesh, the data, the model state (sharded by the
config's logical-axis rules), restore the latest checkpoint if the workdir has
one, then loop: one jitted, donated train step per global batch; periodic
validation (loss, per-level token accuracy, greedy-decoded acc@km); asynchronous
checkpoints that also hold the data iterator; SIGTERM saves and exits. At the
end the test split is evaluated and the paper's table printed and written to
DIR/results.json.

Several processes (TPU pod workers, SLURM tasks, or localhost processes) run the
same command; jax.distributed is initialized from --coordinator_address /
--num_processes / --process_id or from the cluster environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from geotoken_jax import checkpoint, data, metrics, models, optim, s2, sharding
from geotoken_jax.decoding import greedy_decode
from geotoken_jax.s2 import jax_ops

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and results")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")

# Batch fields that stay on the host (ids may be strings or int64).
_HOST_ONLY_FIELDS = ("id",)


# ---------------------------------------------------------------------------
# State and steps.


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the steps close over: the model's structure, the optimizer, shardings."""

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  spec: s2.TokenSpec


def create_train_state(config: ml_collections.ConfigDict, spec: s2.TokenSpec, mesh: jax.sharding.Mesh,
                       total_steps: int, steps_per_epoch: int) -> tuple[TrainSetup, dict]:
  """Initializes parameters and optimizer state directly in their shardings."""
  build = functools.partial(models.build_model, config.model, spec)
  abstract_model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  param_shardings = sharding.state_shardings(abstract_params, mesh, config.sharding_rules)
  optimizer, schedule = optim.make_optimizer(config.optim, total_steps, steps_per_epoch)

  def init():
    params = nnx.state(build(rngs=nnx.Rngs(config.seed)), nnx.Param)
    params = jax.lax.with_sharding_constraint(params, param_shardings)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  # XLA propagates the parameters' shardings into the optimizer state (Adam's
  # moments mirror the parameters); the steps then pin what it chose.
  state = jax.jit(init)()
  state_shardings = {
      "step": state["step"].sharding,
      "params": param_shardings,
      "opt_state": jax.tree.map(lambda x: x.sharding, state["opt_state"]),
  }
  return TrainSetup(graphdef, optimizer, schedule, state_shardings, spec), state


def _position_weights(config: ml_collections.ConfigDict, spec: s2.TokenSpec) -> jax.Array:
  first, last = config.loss.position_weights
  return jnp.linspace(first, last, spec.num_positions, dtype=jnp.float32)


def make_train_step(setup: TrainSetup, config: ml_collections.ConfigDict, mesh) -> Callable:
  """The jitted step: (state, global batch) -> (state, metrics); state donated."""
  weights = _position_weights(config, setup.spec)
  accum = config.optim.grad_accum_steps
  base_key = jax.random.key(config.seed)

  def loss_fn(params, micro, key):
    model = nnx.merge(setup.graphdef, params)
    # The model picks its inputs from the batch (image, or features + neighbours).
    logits = model(micro, micro["tokens"], deterministic=False,
                   rngs=nnx.Rngs(dropout=key))  # [batch, positions, vocab]
    loss, aux = models.weighted_cross_entropy(logits, micro["tokens"], weights)
    return loss, aux

  def step(state, batch):
    # The dropout key depends only on the step: identical on any mesh and after a resume.
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, aux), grads = grad_fn(state["params"], batch, key)
    else:
      # Gradient accumulation: a lax.scan over microbatches of the global batch.
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def accumulate(carry, inputs):
        index, microbatch = inputs
        (loss, aux), grads = grad_fn(state["params"], microbatch, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state["params"], jax.tree.map(lambda x: x[0], micro), key)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": setup.schedule(state["step"]), **aux}
    return new_state, step_metrics

  return jax.jit(step, in_shardings=(setup.state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(setup.state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(setup: TrainSetup, config: ml_collections.ConfigDict, mesh) -> Callable:
  """(params, batch) -> per-row teacher-forced loss, token hits, greedy prediction and error."""
  weights = _position_weights(config, setup.spec)
  spec = setup.spec

  def step(params, batch):
    model = nnx.merge(setup.graphdef, params)
    memory = model.encode(batch, deterministic=True)  # once, for the loss and for decoding
    logits = model.decode(memory, batch["tokens"], deterministic=True)
    row_loss, row_hits = models.per_row_losses(logits, batch["tokens"], weights)
    tokens, log_prob = greedy_decode(model.decode_step, model.init_cache(memory), memory.shape[0],
                                     spec.num_positions)
    predicted = jax_ops.tokens_to_latlng(tokens, spec)  # [batch, 2]
    return {"loss": row_loss, "token_hits": row_hits, "tokens": tokens, "log_prob": log_prob,
            "predicted": predicted, "distance_km": metrics.haversine_km_jax(predicted, batch["latlng"])}

  param_shardings = setup.state_shardings["params"]
  return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def evaluate(eval_step: Callable, params, batches: Iterable[dict], mesh) -> dict:
  """Runs eval_step over every batch; returns the split's metrics (masked rows excluded)."""
  loss_sum, hits_sum, distances, count = 0.0, 0.0, [], 0
  for local_batch in batches:
    mask = np.asarray(local_batch["mask"], bool)
    device_batch = sharding.make_global_batch(_device_fields(local_batch), mesh)
    out = eval_step(params, device_batch)
    out = {k: np.asarray(multihost_utils.process_allgather(out[k], tiled=True))
           for k in ("loss", "token_hits", "distance_km")}
    full_mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    loss_sum += float(out["loss"][full_mask].sum())
    hits_sum = hits_sum + out["token_hits"][full_mask].sum(axis=0)
    distances.append(out["distance_km"][full_mask])
    count += int(full_mask.sum())
  if not count:
    raise ValueError("evaluation saw no examples")
  result = metrics.accuracy_table(np.concatenate(distances))
  result["loss"] = loss_sum / count
  result["token_accuracy"] = (np.asarray(hits_sum) / count).tolist()
  return result


def _device_fields(batch: dict) -> dict:
  """The numeric fields (ids and text such as country codes stay on the host)."""
  return {k: v for k, v in batch.items()
          if k not in _HOST_ONLY_FIELDS and np.asarray(v).dtype.kind in "biuf"}


# ---------------------------------------------------------------------------
# The loop.


class _Preemption:
  """SIGTERM sets a flag; every process learns of it at the same step."""

  def __init__(self):
    self._flag = threading.Event()
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def requested(self) -> bool:
    local = np.int32(self._flag.is_set())
    if jax.process_count() == 1:
      return bool(local)
    return bool(multihost_utils.process_allgather(local).any())


class _Progress:
  """Console line with steps/s and ETA; TensorBoard scalars; metrics.jsonl."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, batch_size: int):
    self._main = jax.process_index() == 0
    self._total, self._batch = total_steps, batch_size
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._writer = None
    if self._main:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def log(self, step: int, kind: str, values: dict) -> None:
    if not self._main:
      return
    scalars = _flatten_scalars(values)
    for name, value in scalars.items():
      self._writer.add_scalar(f"{kind}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")
    self._jsonl.flush()
    if kind == "train":
      now = time.perf_counter()
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      self._last_time, self._last_step = now, step
      eta = (self._total - step) / rate if rate > 0 else float("inf")
      print(f"step {step}/{self._total} | loss {scalars['loss']:.4f} | {rate:.2f} steps/s "
            f"| {rate * self._batch:.0f} img/s | ETA {_format_seconds(eta)}", flush=True)
    else:
      shown = {k: round(v, 3) for k, v in scalars.items() if k.startswith(("acc@", "median", "loss"))}
      print(f"step {step} | {kind} | {shown}", flush=True)

  def close(self) -> None:
    if self._main:
      self._writer.close()
      self._jsonl.close()


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir if it holds a checkpoint), then evaluates the test split."""
  os.makedirs(workdir, exist_ok=True)
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  mesh = sharding.create_mesh(config.mesh)
  process_index, process_count = jax.process_index(), jax.process_count()
  if config.batch_size % sharding.global_batch_size_divisor(mesh):
    raise ValueError(f"batch_size {config.batch_size} must divide over the batch mesh axes "
                     f"({sharding.global_batch_size_divisor(mesh)} devices)")

  if process_index == 0:  # evaluate / predict rebuild the model from the workdir alone
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  train_source = data.get_source(config.data, "train", spec, seed=config.seed)
  steps_per_epoch = max(len(train_source) // config.batch_size, 1)
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  train_iter = data.train_iterator(train_source, global_batch_size=config.batch_size, seed=config.seed,
                                   process_index=process_index, process_count=process_count,
                                   worker_count=config.data.worker_count)

  setup, state = create_train_state(config, spec, mesh, total_steps, steps_per_epoch)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.max_checkpoints,
                                         save_every_steps=config.checkpoint_every_steps)
  if checkpointer.latest_step is not None:
    abstract = checkpoint.abstract_like(state, setup.state_shardings)
    del state  # free the fresh initialization before restoring
    state, train_iter = checkpointer.restore(abstract, train_iter)
    logging.info("resumed from step %d", checkpointer.latest_step)
  start_step = int(jax.device_get(state["step"]))
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  if process_index == 0:
    print(f"{n_params / 1e6:.2f} M parameters | mesh {dict(mesh.shape)} | {process_count} process(es) "
          f"| {len(train_source)} training images | {total_steps} steps from {start_step}", flush=True)

  train_step = make_train_step(setup, config, mesh)
  eval_step = make_eval_step(setup, config, mesh)

  def run_eval(split: str) -> dict:
    source = data.get_source(config.data, split, spec)
    batches = data.eval_batches(source, batch_size=config.eval_batch_size // process_count,
                                process_index=process_index, process_count=process_count)
    return evaluate(eval_step, state["params"], batches, mesh)

  progress = _Progress(workdir, total_steps, start_step, config.batch_size)
  preemption = _Preemption()
  step = start_step
  step_metrics = None
  while step < total_steps:
    local_batch = next(train_iter)
    batch = sharding.make_global_batch(_device_fields(local_batch), mesh)
    with jax.transfer_guard("disallow"):  # no hidden host<->device copies in the hot loop
      state, step_metrics = train_step(state, batch)
    step += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      progress.log(step, "train", jax.device_get(step_metrics))
    checkpointer.save(step, state, train_iter, force=step == total_steps)
    if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
      progress.log(step, "validation", run_eval("validation"))
    # A time slice ends (stop_after_steps) exactly like a preemption.
    if preemption.requested() or step == config.get("stop_after_steps", 0):
      checkpointer.save(step, state, train_iter, force=True)
      checkpointer.close()
      progress.close()
      print(f"preempted at step {step}: checkpoint saved; rerun the same command to resume", flush=True)
      return {"preempted": True, "step": step}

  checkpointer.close()
  results = {"step": step, "validation": run_eval("validation"), "test": run_eval(config.test_split)}
  progress.log(step, "test", results["test"])
  progress.close()
  if process_index == 0:
    table = metrics.format_table({f"GeoToken greedy ({config.test_split})": results["test"]})
    print(table, flush=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({**results, "table": table, "config": config.to_dict()}, f, indent=1, default=str)
  return results


def initialize_distributed() -> None:
  """jax.distributed from flags (localhost tests, SLURM, ...) or the environment (TPU pods)."""
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    # Cross-process collectives for the CPU backend (GPU/TPU bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS")):
    if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
      jax.distributed.initialize()


def main(argv: list[str]) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  initialize_distributed()
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  return 143 if result.get("preempted") else 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(main(argv)))
