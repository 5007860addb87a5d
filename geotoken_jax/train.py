"""python -m geotoken_jax.train --config configs/earth.py[:smoke] --workdir DIR [--config.FIELD=VALUE ...]

Trains GeoToken and evaluates it (geotoken_jax.trainer.train_and_evaluate); a config with
a `recipe` block (configs/earth.py:retrieval, configs/paper.py) runs the whole
retrieval-augmented recipe instead (geotoken_jax.recipe: align, embed, index, train, evaluate).
Exit status: 0 done, 143 preempted (checkpoint saved: rerun to resume),
1 stopped on non-finite losses, 2 a bad config or a refused resume.
Several processes (TPU pod workers, SLURM tasks, localhost) run the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from geotoken_jax import command_line as cl


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  if cl.CONFIG.value is None or not cl.WORKDIR.value:
    print("error: --config and --workdir are required", file=sys.stderr)
    return 2
  if not cl.FLAGS["verbosity"].present:
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cl.initialize_distributed()
  from geotoken_jax import checkpoint, recipe, trainer  # pylint: disable=g-import-not-at-top

  try:
    if recipe.is_recipe(cl.CONFIG.value):  # a retrieval recipe: align, embed, index, train, evaluate
      result = recipe.run_recipe(cl.CONFIG.value, cl.WORKDIR.value)
    else:
      result = trainer.train_and_evaluate(cl.CONFIG.value, cl.WORKDIR.value)
  except trainer.NonFiniteTrainingError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  except (ValueError, FileNotFoundError, checkpoint.CheckpointRestoreError) as e:  # config checks, refused resumes
    print(f"error: {e}", file=sys.stderr, flush=True)
    if cl.FLAGS.verbosity > 0:
      import traceback  # pylint: disable=g-import-not-at-top

      traceback.print_exc()
    return 2
  return trainer.PREEMPTED_EXIT_CODE if result.get("preempted") else 0


if __name__ == "__main__":
  cl.run(main)
