"""Optimizer and learning-rate schedules from the config (optax)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """`warmup_cosine` (modern default) or `step_decay` (the paper: x decay_rate per epoch)."""
  name = config.schedule
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps, config.warmup_steps + 1), end_value=config.learning_rate * config.end_factor)
  if name == "step_decay":
    decay = optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch,
                                    decay_rate=config.decay_rate, staircase=True)
    if config.warmup_steps:
      warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
      return optax.join_schedules([warmup, decay], [config.warmup_steps])
    return decay
  if name == "constant":
    return optax.constant_schedule(config.learning_rate)
  raise ValueError(f"unknown schedule {name!r}: use warmup_cosine, step_decay or constant")


def parameter_path(key_path) -> tuple:
  """A jax tree key path of an nnx.State leaf -> the parameter's path, e.g. ('location',
  'capsules', 0, 'fourier_matrix') (the Variable's trailing 'value' dropped)."""
  path = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in key_path)
  return path[:-1] if path and path[-1] == "value" else path


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int,
                   is_frozen: Callable[[tuple], bool] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with optional global-norm clipping.  Parameters for which is_frozen(path) is
  True get no update and no optimizer state (optax.set_to_zero); the gradient clipping
  sees only the trained ones."""
  schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  optimizer = optax.chain(*parts)
  if is_frozen is not None:
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "frozen" if is_frozen(parameter_path(path)) else "trained", params)
    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
  return optimizer, schedule
