"""Checkpoints: the one module that talks to orbax.

One orbax CheckpointManager per workdir holds, per step, the train state
(parameters, optimizer state, step; sharded jax.Arrays) and each process's
grain iterator state, so a restored run continues on the same next batch.
Saves are asynchronous; restores target abstract arrays that carry the *new*
run's shardings, so a checkpoint written on one mesh loads onto another.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the given shardings, for restoring onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every_steps: int = 1000,
               async_save: bool = True):
    self._save_every_steps = save_every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(), _DATA: grain.checkpoint.CheckpointHandler()})

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of save_every_steps (or `force`); returns whether it did."""
    if not (force or (self._save_every_steps and step % self._save_every_steps == 0)):
      return False
    if step == self._manager.latest_step():  # e.g. a preemption right after a periodic save
      return False
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None):
    """Restores (state, data_iterator) at `step` (default: latest) onto abstract_state's shardings."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE], (restored[_DATA] if data_iterator is not None else None)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Only the parameters of a checkpoint (no optimizer state, no data iterator), for
  evaluation and prediction: (params placed on abstract_params' shardings, step).

  A read-only manager restores the "params" subtree alone (orbax partial restore),
  so Adam's moments are never read into memory.
  """
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_handlers={_STATE: ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; "
                              f"steps: {sorted(manager.all_steps())}")
    item = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)}))
    return restored[_STATE]["params"], step
  finally:
    manager.close()
