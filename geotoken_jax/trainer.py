"""The trainer: train_and_evaluate(config, workdir), from a 2-core CPU to a pod.

Read top to bottom: check the config against the mesh (before anything
compiles), build the data and the model state (sharded by the config's
logical-axis rules), restore the newest checkpoint that restores (refusing a
resume whose batch size, tokens, model or data differ), then loop: one jitted,
donated train step per global batch; a step whose loss or gradients are not
finite is skipped and counted, and too many in a row stop the run; periodic
validation through geotoken_jax.inference (the evaluation job's path);
asynchronous checkpoints that also hold the data iterator and the run's config;
a preemption saves and exits.  At the end the test split is evaluated and the
table printed and written to WORKDIR/results.json.

Paths go through etils.epath: a `gs://` workdir is used as the URL it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import checkpoint, data, inference, metrics, models, optim, runtime, s2, sharding, summary
from geotoken_jax.decoding import strategies
from geotoken_jax.retrieval import sources as retrieval_sources

PREEMPTED_EXIT_CODE = 143


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class ConfigMismatchError(ValueError):
  """A resume whose config differs from the checkpoint's in a field that must not change."""


# ---------------------------------------------------------------------------
# Config checks (before any compilation).


def _strategies_read_neighbors(config) -> bool:
  """Do the run's validation or evaluation strategies read retrieved neighbours (knn:K, kNN-LM)?"""
  spec = inference.token_spec(config)
  texts = [validation_strategy(config), str(config.get("evaluate", {}).get("strategies", ""))]
  return any(strategies.needs_neighbors(s) for text in texts if text.strip()
             for s in strategies.parse_strategies(text, spec))


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Fails fast, naming the field, on settings the run cannot honour."""
  devices = sharding.global_batch_size_divisor(mesh)
  processes = jax.process_count()
  accum = int(config.optim.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"optim.grad_accum_steps must be >= 1, got {accum}")
  if config.batch_size < 1 or config.batch_size % (devices * accum) or config.batch_size % processes:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of the mesh's {devices} batch devices "
                     f"x optim.grad_accum_steps {accum} (= {devices * accum}) and of the {processes} processes: "
                     "each microbatch is cut from every device's own rows")
  if config.eval_batch_size < 1 or config.eval_batch_size % devices or config.eval_batch_size % processes:
    raise ValueError(f"eval_batch_size {config.eval_batch_size} must be a multiple of the mesh's {devices} "
                     f"batch devices and of the {processes} processes")
  inference.check_evaluation(config, mesh)  # evaluate.batch_size, evaluate.strategies
  wanted = strategies.parse_strategies(validation_strategy(config), inference.token_spec(config))
  if models.align.is_alignment(config.model):
    if any(s.kind != "gallery" for s in wanted):
      raise ValueError(f"validation_strategy {validation_strategy(config)!r}: an alignment model validates with "
                       "gallery:K")
    if accum > 1:
      raise ValueError("optim.grad_accum_steps must be 1 for an alignment model: InfoNCE over a microbatch "
                       "has fewer negatives, a different objective (raise batch_size or use more devices)")
  elif any(strategies.needs_alignment(s) for s in wanted):
    raise ValueError(f"validation_strategy {validation_strategy(config)!r} needs an alignment model; the trainer "
                     "validates without one: use a decoder strategy (greedy, beam:W, sample:N:T:RULE)")
  if retrieval_sources.enabled(config):
    retrieval_sources.check_model(config, strategies_read_neighbors=_strategies_read_neighbors(config))
  elif not models.align.is_alignment(config.model) and config.model.encoder == "features":
    raise ValueError("model.encoder 'features' reads retrieved neighbours: add a `retrieval` block "
                     "(configs/earth.py:retrieval, configs/paper.py) naming the embeddings and neighbour lists")
  elif any(strategies.needs_neighbors(s) for s in wanted):
    raise ValueError(f"validation_strategy {validation_strategy(config)!r} reads retrieved neighbours: "
                     "only a run with a `retrieval` block has them")
  if int(config.get("max_consecutive_nonfinite", 1)) < 1:
    raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {config.max_consecutive_nonfinite}")
  if int(config.get("preemption_check_every_steps", 1)) < 1:
    raise ValueError("preemption_check_every_steps must be >= 1")


def validation_strategy(config) -> str:
  return str(config.get("validation_strategy", "greedy"))


# Fields a resumed run must share with its checkpoint: they fix the data stream,
# the parameters' shapes or what the tokens mean.
RESUME_FIELDS = ("batch_size", "seed", "tokens", "model", "optim.frozen", "data.name", "data.splits", "data.image_size",
                 "data.holdout", "data.leak_filter")


def _field(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def check_resume(saved_config: dict | None, config: ml_collections.ConfigDict, step: int) -> None:
  """Refuses to resume a checkpoint written with different batch size, tokens, model or data."""
  if not saved_config:
    return
  current = json.loads(config.to_json_best_effort())
  for name in RESUME_FIELDS:
    old, new = _field(saved_config, name), _field(current, name)
    if old != new:
      differing = name
      if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        differing = ", ".join(f"{name}.{k}" for k in keys)
        old = {k: old.get(k) for k in keys}
        new = {k: new.get(k) for k in keys}
      raise ConfigMismatchError(
          f"cannot resume: the checkpoint of step {step} was trained with {differing} = {old!r}, this run "
          f"asks for {new!r}. Rerun with the checkpoint's value (e.g. --config.{differing.split(', ')[0]}=...) "
          "or start a new --workdir.")


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
  graphdef, abstract, param_shardings = inference.abstract_params(config, spec, mesh)  # what evaluation restores
  frozen = [optim.parameter_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
            if is_frozen(config, optim.parameter_path(p))]
  # Only a model with frozen parameters gets the masked optimizer (its state has another structure).
  optimizer, schedule = optim.make_optimizer(config.optim, total_steps, steps_per_epoch,
                                             is_frozen=(lambda path: is_frozen(config, path)) if frozen else None)

  def init():
    params = nnx.state(build(rngs=nnx.Rngs(config.seed)), nnx.Param)
    params = jax.lax.with_sharding_constraint(params, param_shardings)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
             # Steps skipped for a non-finite loss or gradient: in a row, and in all.
             "nonfinite": {"consecutive": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.int32)}}
    # Past GPS, extra negatives (none with queue_size 0: orbax cannot save empty arrays).
    if models.align.is_alignment(config.model) and int(config.model.queue_size) > 0:
      encoded_dim = int(config.model.location.out_dim) if frozen_location_encoder(config, abstract) else 0
      state["queue"] = models.align.init_queue(int(config.model.queue_size), encoded_dim)
    return state

  # XLA propagates the parameters' shardings into the optimizer state (Adam's
  # moments mirror the parameters); the steps then pin what it chose.
  state = jax.jit(init)()
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  state_shardings["params"] = param_shardings
  return TrainSetup(graphdef, optimizer, schedule, state_shardings, spec), state


def frozen_location_encoder(config: ml_collections.ConfigDict, params) -> bool:
  """Is every parameter of an alignment model's location encoder frozen?"""
  paths = [optim.parameter_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  location = [p for p in paths if p[0] == "location"]
  return bool(location) and all(is_frozen(config, p) for p in location)


def is_frozen(config: ml_collections.ConfigDict, path: tuple) -> bool:
  """A parameter the optimizer leaves alone (and the step does not differentiate)."""
  return models.frozen(path, config.model, tuple(config.optim.get("frozen", ())))


def _init_from_leaves(config: ml_collections.ConfigDict) -> dict:
  """{path: array} of the parameters of the run config.init_from names (a workdir; its newest
  checkpoint): a retrieval model fine-tuned from a non-retrieval one keeps every parameter they
  share (the new ones, e.g. the neighbour memory, start fresh)."""
  source = str(config.get("init_from", "") or "")
  if not source:
    return {}
  restored = inference.restore_model(source)
  flat = jax.tree_util.tree_flatten_with_path(restored.params)[0]
  # Replicated or fully addressable parameters (one process, or a model small enough to replicate).
  return {optim.parameter_path(path): np.asarray(jax.device_get(value)) for path, value in flat}


def load_pretrained(state: dict, config: ml_collections.ConfigDict) -> dict:
  """Places the pretrained weights the model config names (CLIP tower, GeoCLIP location
  encoder, ...) into the freshly initialized, sharded parameters; every loaded array must
  match a parameter's path and shape."""
  # Process 0 converts any weights first (once), the others then read them; a failure on any
  # process (a bad weights path on one host) raises on all of them instead of a hang.
  what = "loading the pretrained weights the model config names"
  leaves = runtime.on_process_0(lambda: models.pretrained_leaves(config.model), what)
  error = None
  if jax.process_index() != 0:
    try:
      leaves = models.pretrained_leaves(config.model)
    except Exception as e:  # noqa: BLE001 -- raised on every process by fail_together
      error = e
  runtime.fail_together(error, what)
  leaves = {**leaves, **_init_from_leaves(config)}
  if not leaves:
    return state
  used = set()

  def place(key_path, value):
    path = optim.parameter_path(key_path)
    if path not in leaves:
      return value
    array = np.asarray(leaves[path], np.float32)
    if array.shape != value.shape:
      raise ValueError(f"pretrained weight {'/'.join(map(str, path))} has shape {array.shape}, the model's "
                       f"parameter {value.shape}")
    used.add(path)
    # Each process fills its own shards from its copy (no cross-host equality check of the array).
    return jax.make_array_from_callback(array.shape, value.sharding, lambda index: array[index])

  state = dict(state, params=jax.tree_util.tree_map_with_path(place, state["params"]))
  unused = sorted("/".join(map(str, p)) for p in set(leaves) - used)
  if unused:
    raise ValueError(f"pretrained weights with no parameter of that path in the model: {unused[:10]}")
  if jax.process_index() == 0:
    print(f"loaded {len(used)} pretrained arrays ({sum(np.size(leaves[p]) for p in used) / 1e6:.2f} M values)",
          flush=True)
  return state


def _position_weights(config: ml_collections.ConfigDict, spec: s2.TokenSpec) -> jax.Array:
  first, last = config.loss.position_weights
  return jnp.linspace(first, last, spec.num_positions, dtype=jnp.float32)


def make_train_step(setup: TrainSetup, config: ml_collections.ConfigDict, mesh) -> Callable:
  """The jitted step: (state, global batch) -> (state, metrics); state donated.

  A step whose loss or gradient norm is not finite leaves parameters and
  optimizer state as they were and counts itself in state["nonfinite"].
  """
  weights = _position_weights(config, setup.spec)
  accum = int(config.optim.grad_accum_steps)
  base_key = jax.random.key(config.seed)
  alignment = models.align.is_alignment(config.model)
  place = models.align.place_settings(config.model) if alignment else None

  def loss_fn(params, micro, key, queue):
    # Frozen parameters get no gradient, so XLA drops the backward pass through them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if is_frozen(config, optim.parameter_path(path)) else x, params)
    model = nnx.merge(setup.graphdef, params)
    if alignment:
      return models.align.contrastive_loss(model, micro, queue, key, place)
    # The model picks its inputs from the batch (image, or features + neighbours).
    logits = model(micro, micro["tokens"], deterministic=False,
                   rngs=nnx.Rngs(dropout=key))  # [batch, positions, vocab]
    loss, aux = models.weighted_cross_entropy(logits, micro["tokens"], weights)
    return loss, aux

  def step(state, batch):
    # The dropout key depends only on the step: identical on any mesh and after a resume.
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    queue = state.get("queue")
    if accum == 1:
      (loss, aux), grads = grad_fn(state["params"], batch, key, queue)
    else:
      # Microbatches cut from each device's own rows (no all-gather of the batch).
      micro = sharding.split_microbatches(batch, accum, mesh)  # leaves [accum, batch / accum, ...]

      def accumulate(carry, inputs):
        index, microbatch = inputs
        (loss, aux), grads = grad_fn(state["params"], microbatch, jax.random.fold_in(key, index), queue)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state["params"], jax.tree.map(lambda x: x[0], micro), key, queue)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    consecutive = jnp.where(finite, 0, state["nonfinite"]["consecutive"] + 1)
    new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "nonfinite": {"consecutive": consecutive,
                               "total": state["nonfinite"]["total"] + (~finite).astype(jnp.int32)}}
    if queue is not None:  # this batch's GPS become negatives of the next steps
      encoded = None
      if "encoded" in queue:  # the frozen encoder's outputs, stored with them
        location = nnx.merge(setup.graphdef, state["params"]).location
        encoded = location(batch["latlng"].astype(jnp.float32))
      new_state["queue"] = keep(models.align.push_queue(queue, batch["latlng"], batch.get("mask"), encoded), queue)
    step_metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": setup.schedule(state["step"]),
                    "skipped": (~finite).astype(jnp.int32), "skipped_in_a_row": consecutive,
                    "skipped_total": new_state["nonfinite"]["total"], **aux}
    return new_state, step_metrics

  return jax.jit(step, in_shardings=(setup.state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(setup.state_shardings, sharding.replicated(mesh)), donate_argnums=0)


# ---------------------------------------------------------------------------
# Preemption.


class Preemption:
  """Has the job been asked to stop?  Every process learns it at the same step.

  One process: a SIGTERM handler sets a flag, read every step.  Several
  processes: JAX's preemption sync point (the coordination service agrees on a
  step in the background, no collective here) when jax.distributed runs it;
  otherwise the SIGTERM flags are all-gathered every `check_every_steps` steps,
  never after every step.
  """

  def __init__(self, check_every_steps: int = 10):
    self._flag = threading.Event()
    self._every = int(check_every_steps)
    self._sync_point = False
    if jax.process_count() > 1:
      # jax.distributed.initialize starts the preemption sync manager unless
      # jax_enable_preemption_service is off; its notifier then owns SIGTERM.
      from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

      state = getattr(jax_distributed, "global_state", None)
      self._sync_point = getattr(state, "preemption_sync_manager", None) is not None
    if not self._sync_point and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  @property
  def mode(self) -> str:
    return "sync_point" if self._sync_point else ("signal" if jax.process_count() == 1 else "gather")

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    if self._sync_point:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if step % self._every:
      return False
    return bool(multihost_utils.process_allgather(np.int32(self._flag.is_set())).any())


# ---------------------------------------------------------------------------
# The loop.


def run_metadata(config: ml_collections.ConfigDict, spec: s2.TokenSpec) -> dict:
  """What a checkpoint carries besides arrays: evaluate / predict rebuild the run from it."""
  return {"config": json.loads(config.to_json_best_effort()),
          "token_spec": {"level": spec.level, "group_size": spec.group_size},
          "process_count": jax.process_count(), "device_count": jax.device_count()}


def _restore(checkpointer, state, setup, train_iter, config):
  """(state, train_iter) from the newest checkpoint that restores, after the resume check."""
  abstract = checkpoint.abstract_like(state, setup.state_shardings)
  latest = checkpointer.latest_step
  metadata = checkpointer.read_metadata()  # the newest readable one (a corrupt one is skipped)
  check_resume((metadata or {}).get("config"), config, latest)
  del state  # free the fresh initialization before restoring
  state, train_iter, step = checkpointer.restore(abstract, train_iter)
  if step != latest and jax.process_index() == 0:
    print(f"checkpoint {latest} could not be restored (see the warning above); resumed from step {step}",
          flush=True)
  return state, train_iter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains (resuming from workdir if it holds a checkpoint), then evaluates the test split.

  Returns {"step", "validation", "test"}; {"preempted": True, "step"} when the run
  was stopped to be resumed.  Raises NonFiniteTrainingError after
  config.max_consecutive_nonfinite skipped steps in a row.
  """
  workdir = epath.Path(workdir)
  spec = inference.token_spec(config)
  mesh = sharding.create_mesh(config.mesh)
  check_config(config, mesh)
  process_index, process_count = jax.process_index(), jax.process_count()
  if process_index == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  # A retrieval run's examples carry their neighbours (read from the gallery once).  Every store
  # and list set it reads (train, validation, test) is checked now, before the first step, not
  # when training ends: present and complete, one aligner (sources.check_inputs), searched with
  # the config's settings in the stores as they are (as each split's source is built).
  gallery, eval_sources = None, {}
  if retrieval_sources.enabled(config):
    eval_splits = tuple(dict.fromkeys(("validation", str(config.test_split))))
    needs_train_lists = retrieval_sources.model_reads_neighbors(config)
    retrieval_sources.check_inputs(config, workdir, ("train", *eval_splits) if needs_train_lists else eval_splits)
    gallery = retrieval_sources.load_neighbor_gallery(config, workdir, spec)
    retrieval_sources.check_model(config, gallery, strategies_read_neighbors=_strategies_read_neighbors(config))
    eval_sources = {split: retrieval_sources.get_source(config, workdir, split, spec, gallery=gallery)
                    for split in eval_splits}
  train_source = retrieval_sources.get_source(config, workdir, "train", spec, seed=config.seed, gallery=gallery,
                                              to_train=True)
  steps_per_epoch = max(len(train_source) // config.batch_size, 1)
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  train_iter = data.train_iterator(train_source, global_batch_size=config.batch_size, seed=config.seed,
                                   process_index=process_index, process_count=process_count,
                                   worker_count=config.data.worker_count)

  setup, state = create_train_state(config, spec, mesh, total_steps, steps_per_epoch)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.max_checkpoints,
                                         save_every_steps=config.checkpoint_every_steps)
  if checkpointer.latest_step is not None:
    state, train_iter = _restore(checkpointer, state, setup, train_iter, config)
  else:
    state = load_pretrained(state, config)
  start_step = int(jax.device_get(state["step"]))
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  if process_index == 0:
    print(f"{n_params / 1e6:.2f} M parameters | mesh {dict(mesh.shape)} | {process_count} process(es) "
          f"| {len(train_source)} training images | {total_steps} steps from {start_step}", flush=True)

  metadata = run_metadata(config, spec)
  train_step = make_train_step(setup, config, mesh)
  alignment = models.align.is_alignment(config.model)
  wanted = strategies.parse_strategies(validation_strategy(config), spec)
  predictor = inference.Predictor(
      setup.graphdef, None, setup.state_shardings["params"], mesh, spec, wanted,
      loss_weights=_position_weights(config, spec), is_aligner=alignment,
      knn_temperature=float(inference.evaluate_config(config).knn_temperature),
      gallery=inference.load_location_gallery(config, spec) if any(s.kind == "gallery" for s in wanted) else None)

  def run_eval(split: str, params, refresh: bool = True) -> dict:
    if refresh:  # an alignment model's gallery, embedded with these parameters
      predictor.refresh_gallery(params)
    source = (eval_sources[split] if split in eval_sources
              else retrieval_sources.get_source(config, workdir, split, spec, gallery=gallery))
    return inference.validation_metrics(predictor, source, global_batch_size=config.eval_batch_size,
                                        strategy_name=validation_strategy(config), params=params)

  progress = summary.Progress(workdir, total_steps, start_step, config.batch_size)
  preemption = Preemption(int(config.get("preemption_check_every_steps", 10)))
  max_skips = int(config.get("max_consecutive_nonfinite", 20))
  step = start_step
  pending = None  # the previous step's metrics: read one step late, so the host never stalls the device
  try:
    while step < total_steps:
      local_batch = next(train_iter)
      batch = sharding.make_global_batch(runtime.device_fields(local_batch), mesh)
      with jax.transfer_guard("disallow"):  # no hidden host<->device copies in the hot loop
        state, step_metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        _check_skips(pending, max_skips, checkpointer, workdir)
      pending = (step, step_metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        progress.log(step, "train", jax.device_get(step_metrics))
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or step == total_steps:
        _check_skips(pending, max_skips, checkpointer, workdir)
        checkpointer.save(step, state, train_iter, metadata=metadata, force=True)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
        progress.log(step, "validation", run_eval("validation", state["params"]))
      # A time slice ends (stop_after_steps) exactly like a preemption.
      if preemption.requested(step) or step == config.get("stop_after_steps", 0):
        _check_skips(pending, max_skips, checkpointer, workdir)
        checkpointer.save(step, state, train_iter, metadata=metadata, force=True)
        checkpointer.close()
        progress.close()
        if process_index == 0:
          print(f"preempted at step {step}: checkpoint saved; rerun the same command to resume", flush=True)
        return {"preempted": True, "step": step}
    if pending is not None:
      _check_skips(pending, max_skips, checkpointer, workdir)
  except NonFiniteTrainingError:
    checkpointer.close()
    progress.close()
    raise

  checkpointer.close()
  results = {"step": step, "validation": run_eval("validation", state["params"]),
             "test": run_eval(config.test_split, state["params"], refresh=False)}
  progress.log(step, "test", results["test"])
  progress.close()
  if process_index == 0:
    model_name = "GeoAlign" if alignment else "GeoToken"
    table = metrics.format_table({f"{model_name} {validation_strategy(config)} ({config.test_split})": results["test"]})
    print(table, flush=True)
    (workdir / "results.json").write_text(json.dumps({**results, "table": table, "config": config.to_dict()},
                                                     indent=1, default=str))
  return results


def _check_skips(pending, max_skips: int, checkpointer, workdir) -> None:
  step, step_metrics = pending
  in_a_row = int(jax.device_get(step_metrics["skipped_in_a_row"]))
  if in_a_row >= max_skips:
    checkpointer.wait()
    good = checkpointer.latest_step
    where = (f"the last good checkpoint is step {good} in {workdir / 'checkpoints'}" if good is not None
             else "no checkpoint was saved")
    raise NonFiniteTrainingError(
        f"step {step}: the last {in_a_row} steps (from step {step - in_a_row + 1}) had a non-finite loss or "
        f"gradient and were skipped (max_consecutive_nonfinite = {max_skips}); {where}. Lower "
        "optim.learning_rate, check the data, then rerun to resume from that checkpoint.")
