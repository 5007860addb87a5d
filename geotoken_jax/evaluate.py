"""Evaluate a trained GeoToken run under several inference strategies.

  python -m geotoken_jax.evaluate --workdir W [--strategies greedy,beam:5,sample:30:0.7:medoid]
      [--split test | --split yfcc4k:test] [--step N] [--output_dir O] [--limit N]
  python -m geotoken_jax.evaluate --workdir W --csv FILE --image_dir DIR
      [--id_column C --lat_column C --lon_column C] [--output_dir O]

The model, its config and TokenSpec come from the workdir (saved with the
checkpoint); --config FILE replaces the config, --data_dir the data folder.
--csv/--image_dir evaluates any labelled folder: it is prepared on the fly
(validated, as by `prepare`) into a cache keyed by the CSV's content and the
image files' names, sizes and times, and its rejected rows are reported as
`skipped`.  Writes under O (default WORKDIR/eval/SPLIT-stepSTEP): results.md /
results.json (one row per strategy), predictions/STRATEGY.jsonl, plots/.
Resumable; see geotoken_jax.inference.run_evaluation.  --oracles adds the
label-using upper bounds to the table (not methods): `oracle:nearest_train` (the
training split's location nearest to each image's true location) and
`oracle:POOL` (each strategy pool's entry nearest to it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from geotoken_jax import command_line as cl

_PLOTS = flags.DEFINE_bool("plots", True, "write the CDF and world-map plots")
_ORACLES = flags.DEFINE_bool("oracles", None, "also the label-using upper-bound rows oracle:... (oracle:nearest_train: "
                             "each image at the training location nearest to its true location; oracle:POOL: each "
                             "pool's entry nearest to it); default the config's evaluate.oracles")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  if not cl.WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    return 2
  if bool(cl.CSV.value) != bool(cl.IMAGE_DIR.value):
    print("error: --csv and --image_dir go together", file=sys.stderr)
    return 2
  if cl.CSV.value and cl.SPLIT.value:
    print("error: give --split or --csv/--image_dir, not both", file=sys.stderr)
    return 2
  cl.quiet_logs()
  cl.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax import checkpoint, inference, metrics  # pylint: disable=g-import-not-at-top

  workdir = cl.WORKDIR.value
  try:
    config = cl.CONFIG.value if cl.CONFIG.value is not None else inference.load_run_config(workdir, cl.STEP.value)
    if cl.DATA_DIR.value or cl.SEED.value is not None:
      config = ml_collections.ConfigDict(config.to_dict())
      if cl.DATA_DIR.value:
        config.data.data_dir = cl.DATA_DIR.value
      if cl.SEED.value is not None:
        config.evaluate.seed = cl.SEED.value
    source, label = cl.folder_source(config, workdir) if cl.CSV.value else (None, None)
    result = inference.run_evaluation(config, workdir, strategy_text=cl.STRATEGIES.value, split=cl.SPLIT.value,
                                      source=source, split_label=label, step=cl.STEP.value,
                                      output_dir=cl.OUTPUT_DIR.value, limit=cl.LIMIT.value, make_plots=_PLOTS.value,
                                      alignment_workdir=cl.ALIGNMENT_WORKDIR.value, oracles=_ORACLES.value)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointRestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(metrics.format_table(result["results"]))
    print(f"written to {result['output_dir']}", flush=True)
  return 0


if __name__ == "__main__":
  cl.run(main)
