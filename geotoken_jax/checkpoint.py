"""Checkpoints: the one module that talks to orbax.

One orbax CheckpointManager per checkpoint folder (local, gs://, s3://: every
path is an `etils.epath.Path`, never turned into a local one) holds, per step:

  <directory>/<step>/state/                 the train state (parameters, optimizer
                                            state, step; sharded jax.Arrays, written
                                            by every process: orbax's PyTree / OCDBT)
  <directory>/<step>/data_iterator/state.json
                                            the data iterator's get_state(): one
                                            global JSON state, written once (primary
                                            host), so a run resumes on any number of
                                            processes
  <directory>/<step>/metadata/metadata.json the run's metadata (config, TokenSpec, ...),
                                            JSON, written once; read without arrays
                                            by read_metadata()

Saves are asynchronous and refuse a non-finite state.  Restores target abstract
arrays that carry the *new* run's shardings, so a checkpoint written on one mesh
loads onto another; a checkpoint that fails to restore is reported (step and
reason) and the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE = "state"
DATA_ITERATOR = "data_iterator"
METADATA = "metadata"
_DATA_FILE = "state.json"
_METADATA_FILE = "metadata.json"


class NonFiniteStateError(FloatingPointError):
  """The state to save holds a NaN or an infinity: the checkpoint is not written."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint could be restored; `failures` maps each step tried to its reason."""

  def __init__(self, directory, failures: Mapping[int, str], *, explicit: bool = False):
    self.failures = dict(failures)
    if explicit:
      (step, reason), = self.failures.items()
      super().__init__(f"checkpoint step {step} in {directory} could not be restored: {reason}")
    else:
      lines = "\n".join(f"  step {step}: {reason}" for step, reason in self.failures.items())
      super().__init__(f"no checkpoint in {directory} could be restored:\n{lines}")


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the given shardings, for restoring onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def as_path(directory) -> epath.Path:
  """An epath.Path for a local folder or a URL (gs://, s3://, ...).

  Only a local path (no scheme) is made absolute; a URL is passed on as it is.
  """
  path = epath.Path(directory)
  if "://" not in str(directory) and "://" not in str(path):
    path = path.resolve()
  return path


# ---------------------------------------------------------------------------
# Restore failures, agreed on by every process.


@dataclasses.dataclass(frozen=True)
class _Failed:
  """What a guarded handler returns instead of raising (see _guarded)."""
  error: BaseException


def _guarded(handler_cls):
  """`handler_cls` whose restore returns _Failed(error) instead of raising.

  Orbax ends every restore with a cross-process barrier; a process whose shard
  fails to read must still reach it, or the others would wait forever.  The
  processes then agree (_all_ok) on whether the step restored.
  """

  class Guarded(handler_cls):
    def restore(self, *args, **kwargs):  # pylint: disable=signature-differs
      try:
        return super().restore(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        return _Failed(e)

  Guarded.__name__ = Guarded.__qualname__ = f"Guarded{handler_cls.__name__}"
  return Guarded


def _own_args(base):
  """A subclass of orbax args `base`, so that registering it with a guarded handler
  leaves orbax's global registry (base -> its handler) untouched."""
  return dataclasses.dataclass(type(f"Guarded{base.__name__}", (base,), {}))


_GuardedStandard = _guarded(ocp.StandardCheckpointHandler)
_GuardedPyTree = _guarded(ocp.PyTreeCheckpointHandler)
_GuardedJson = _guarded(ocp.JsonCheckpointHandler)
_StandardSave, _StandardRestore = _own_args(ocp.args.StandardSave), _own_args(ocp.args.StandardRestore)
_PyTreeSave, _PyTreeRestore = _own_args(ocp.args.PyTreeSave), _own_args(ocp.args.PyTreeRestore)
_JsonSave, _JsonRestore = _own_args(ocp.args.JsonSave), _own_args(ocp.args.JsonRestore)
for _handler, _save, _restore in ((_GuardedStandard, _StandardSave, _StandardRestore),
                                  (_GuardedPyTree, _PyTreeSave, _PyTreeRestore),
                                  (_GuardedJson, _JsonSave, _JsonRestore)):
  ocp.args.register_with_handler(_handler, for_save=True)(_save)
  ocp.args.register_with_handler(_handler, for_restore=True)(_restore)


def _reason(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text if len(text) <= 600 else text[:600] + " ..."


def _all_ok(ok: bool) -> bool:
  """Whether every process succeeded (the same answer on every process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _restore_with_fallback(directory, steps: list[int], step: int | None,
                           restore_one: Callable[[int], Any]) -> tuple[Any, int, dict[int, str]]:
  """(restore_one(s), s, failures) for `step`, or the newest step of `steps` that restores.

  An explicit `step` that fails raises; with step None each failure is logged
  as a warning and the next older step is tried.
  """
  if step is not None:
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; steps: {sorted(steps)}")
    try:
      return restore_one(step), step, {}
    except Exception as e:
      raise CheckpointRestoreError(directory, {step: _reason(e)}, explicit=True) from e
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  failures = {}
  for s in sorted(steps, reverse=True):
    try:
      return restore_one(s), s, failures
    except Exception as e:  # pylint: disable=broad-except
      failures[s] = _reason(e)
      logging.warning("checkpoint step %d in %s could not be restored (%s); trying the next older one",
                      s, directory, failures[s])
  raise CheckpointRestoreError(directory, failures)


def _check_restored(restored: Mapping[str, Any]) -> None:
  """Raises the first item's error (on every process if any process failed)."""
  errors = [(name, v.error) for name, v in restored.items() if isinstance(v, _Failed)]
  if not _all_ok(not errors):
    if errors:
      name, error = errors[0]
      raise RuntimeError(f"item {name!r}: {_reason(error)}") from error
    raise RuntimeError("another process could not restore its part of this checkpoint")


# ---------------------------------------------------------------------------
# Non-finite states.


@functools.lru_cache(maxsize=None)
def _finite_fn(out_sharding):
  return jax.jit(lambda leaves: jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]),
                 out_shardings=out_sharding)


def _replicated(arrays) -> jax.sharding.Sharding:
  for x in arrays:
    if isinstance(x.sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
  devices = np.array(sorted(arrays[0].sharding.device_set, key=lambda d: d.id))
  return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec())


def first_nonfinite_leaf(tree: Any) -> str | None:
  """The path of the first floating leaf of `tree` with a NaN or inf, or None.

  jax.Arrays are checked by one jitted reduction per device set, replicated to
  every device, so every process gets the same answer (sharded, multi-process
  arrays included); host arrays are checked on the host.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  finite: dict[int, bool] = {}
  groups: dict[frozenset, list[int]] = {}
  for i, (_, x) in enumerate(flat):
    dtype = getattr(x, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
      continue
    if isinstance(x, jax.Array):
      groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    else:
      finite[i] = bool(np.all(np.isfinite(np.asarray(x))))
  for indices in groups.values():
    arrays = [flat[i][1] for i in indices]
    result = _finite_fn(_replicated(arrays))(arrays)
    values = np.asarray(result.addressable_data(0))
    finite.update(zip(indices, values.tolist()))
  bad = [i for i, ok in finite.items() if not ok]
  return jax.tree_util.keystr(flat[min(bad)][0]) if bad else None


# ---------------------------------------------------------------------------
# The checkpointer.


def _item_handlers(state_handler) -> dict[str, Any]:
  return {STATE: state_handler,
          DATA_ITERATOR: _GuardedJson(filename=_DATA_FILE),
          METADATA: _GuardedJson(filename=_METADATA_FILE)}


def _json_ready(value: Any, what: str) -> Any:
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f"the {what} must be JSON-serializable: {e}") from e


class Checkpointer:
  """Saves and restores (train state, data iterator, metadata) in `directory`."""

  def __init__(self, directory, *, max_to_keep: int = 3, save_every_steps: int = 1000,
               async_save: bool = True):
    self._directory = as_path(directory)
    self._save_every_steps = save_every_steps
    self._unrestorable: dict[int, str] = {}  # steps restore() skipped, replaced on the next save
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_handlers=_item_handlers(_GuardedStandard()))

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *, metadata: dict | None = None,
           force: bool = False) -> bool:
    """Saves when `step` is a multiple of save_every_steps (or `force`); returns whether it did.

    Call it on every process.  Raises NonFiniteStateError (nothing written) if a
    floating leaf of `state` holds a NaN or inf.  `data_iterator`: any object
    with get_state() -> JSON; `metadata`: a JSON dict (the run's config, ...).
    """
    step = int(step)
    if not (force or (self._save_every_steps and step % self._save_every_steps == 0)):
      return False
    self._drop_unrestorable()
    if step in self._manager.all_steps():  # e.g. a preemption right after a periodic save
      return False
    bad = first_nonfinite_leaf(state)
    if bad is not None:
      raise NonFiniteStateError(f"refusing to save checkpoint step {step} in {self._directory}: "
                                f"state{bad} holds a NaN or an infinity")
    items = {STATE: _StandardSave(state)}
    if data_iterator is not None:
      items[DATA_ITERATOR] = _JsonSave(_json_ready(data_iterator.get_state(), "data iterator state"))
    if metadata is not None:
      items[METADATA] = _JsonSave(_json_ready(dict(metadata), "checkpoint metadata"))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _drop_unrestorable(self) -> None:
    """Deletes the steps restore() had to skip, before the resumed run saves over them.

    The run resumed from an older step and recomputes the same steps, so nothing
    is lost; left in place they would be `latest_step` and block saving their step.
    """
    while self._unrestorable:
      step, reason = self._unrestorable.popitem()
      if step in self._manager.all_steps():
        logging.warning("deleting checkpoint step %d in %s, which could not be restored (%s)",
                        step, self._directory, reason)
        self._manager.delete(step)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: int | None = None) -> tuple[Any, Any, int]:
    """(state, data_iterator, step) from `step`, by default the newest checkpoint that restores.

    The state lands on abstract_state's shardings; `data_iterator` (any object
    with get_state / set_state) is set to the checkpoint's state, and is left as
    it was if that fails.  With step None a checkpoint that fails to restore is
    logged (step, reason) and the next older one is tried; CheckpointRestoreError
    lists every step's reason if none restores.  An explicit step that fails raises.
    """
    self._manager.reload()

    def restore_one(s: int):
      items = {STATE: _StandardRestore(abstract_state)}
      if data_iterator is not None:
        items[DATA_ITERATOR] = _JsonRestore()
      restored = self._manager.restore(s, args=ocp.args.Composite(**items))
      _check_restored({name: restored[name] for name in items})
      if data_iterator is not None:
        _set_iterator_state(data_iterator, restored[DATA_ITERATOR])
      return restored[STATE]

    state, step, failures = _restore_with_fallback(self._directory, list(self._manager.all_steps()), step,
                                                   restore_one)
    self._unrestorable.update({s: r for s, r in failures.items() if s > step})
    return state, data_iterator, step

  def read_metadata(self, step: int | None = None) -> dict | None:
    """The metadata saved with `step` (default: the newest step holding readable metadata)."""
    self._manager.reload()
    return _read_metadata(self._manager, self._directory, step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _set_iterator_state(data_iterator: Any, state: Any) -> None:
  """set_state(state), or back to the iterator's previous state if that fails."""
  before = data_iterator.get_state()
  try:
    data_iterator.set_state(state)
  except Exception as e:
    try:
      data_iterator.set_state(before)
    except Exception:  # pylint: disable=broad-except
      logging.exception("could not put the data iterator back to its previous state")
    raise RuntimeError(f"the data iterator refused the checkpoint's state: {_reason(e)}") from e


# ---------------------------------------------------------------------------
# Read-only access for evaluation and prediction.


def _read_only_manager(directory: epath.Path, state_handler) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_handlers=_item_handlers(state_handler),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def _read_metadata(manager: ocp.CheckpointManager, directory, step: int | None) -> dict | None:
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and int(step) not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; steps: {sorted(steps)}")
  for s in ([int(step)] if step is not None else steps):
    try:
      restored = manager.restore(s, args=ocp.args.Composite(**{METADATA: _JsonRestore()}))
    except KeyError:  # saved without metadata
      continue
    value = restored[METADATA]
    if isinstance(value, _Failed):
      if step is not None:
        raise CheckpointRestoreError(directory, {s: _reason(value.error)}, explicit=True) from value.error
      logging.warning("the metadata of checkpoint step %d in %s could not be read (%s); trying the next "
                      "older one", s, directory, _reason(value.error))
      continue
    return dict(value)
  return None


def read_metadata(directory, step: int | None = None) -> dict | None:
  """The metadata saved with checkpoint `step` in `directory` (no arrays are read).

  step None: the newest step holding readable metadata.  None when there is no
  checkpoint or it was saved without metadata.
  """
  directory = as_path(directory)
  manager = _read_only_manager(directory, _GuardedPyTree())
  try:
    return _read_metadata(manager, directory, step)
  finally:
    manager.close()


def restore_params(directory, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Only the parameters of a checkpoint (no optimizer state, no data iterator), for
  evaluation and prediction: (params placed on abstract_params' shardings, step).

  A read-only manager restores the "params" subtree alone (orbax partial restore),
  so Adam's moments are never read into memory.  step None: the newest checkpoint
  that restores (failures are logged and the next older one is tried); an
  explicit step that fails raises.
  """
  directory = as_path(directory)
  manager = _read_only_manager(directory, _GuardedPyTree())
  try:
    item = {"params": abstract_params}

    def restore_one(s: int):
      restored = manager.restore(s, args=ocp.args.Composite(**{STATE: _PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)}))
      _check_restored({STATE: restored[STATE]})
      return restored[STATE]["params"]

    params, step, _ = _restore_with_fallback(directory, list(manager.all_steps()), step, restore_one)
    return params, step
  finally:
    manager.close()
