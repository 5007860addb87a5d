"""Run a config-driven sweep: a grid (and zipped axes) of config overrides, each variant frozen,
run, resumable.

  python -m geotoken_jax.sweep --config configs/earth.py:smoke --workdir DIR \\
      --grid seed=0,1 --grid model.dropout=0.0,0.1 [--zip KEY=A,B --zip KEY2=C,D] \\
      [--parallel N] [--retry_failed] [--launch_script] [--dry_run]
  geotoken sweep ...

Without --grid / --zip, the config file's sweep(ARG) function gives the override dicts.
Everything is checked before anything is written (unknown keys, wrong types, repeated
variants).  Each variant trains in DIR/<variant>/run from DIR/<variant>/frozen_config.json;
DIR/sweep.json lists the variants and their states.  Rerunning the same command skips finished
variants, resumes interrupted ones from their checkpoints and lists failed ones (--retry_failed
runs them again); the exit status is 1 while any variant failed.  --launch_script writes
DIR/launch.sh (variant INDEX or $SLURM_ARRAY_TASK_ID) for a SLURM array or TPU pods instead of
running.  Compare the variants with `geotoken report DIR`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="geotoken sweep", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a config file, path.py[:ARG]")
  parser.add_argument("--workdir", required=True, help="the sweep's folder")
  parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (one axis of the product)")
  parser.add_argument("--zip", action="append", default=[], dest="zip_",
                      help="KEY=V1,V2,...: all --zip keys together form one axis (same lengths)")
  parser.add_argument("--parallel", type=int, default=1, help="variants run at once on this machine")
  parser.add_argument("--retry_failed", action="store_true", help="run failed variants again")
  parser.add_argument("--launch_script", action="store_true",
                      help="write DIR/launch.sh (one variant per SLURM array task or TPU pod) instead of running")
  parser.add_argument("--dry_run", action="store_true", help="list the variants, write nothing")
  args = parser.parse_args(argv)

  from geotoken_jax import sweeping  # pylint: disable=g-import-not-at-top

  try:
    config, points = sweeping.load_config_file(args.config)
    if args.grid or args.zip_:
      axes = sweeping.parse_axes(args.grid, args.zip_)
      variants = sweeping.expand(config, axes)
    elif points:
      axes = []
      variants = sweeping.expand_overrides(config, points)
    else:
      raise ValueError("no axes: give --grid / --zip, or a sweep() function in the config file")
    if args.dry_run:
      for v in variants:
        print(v["name"])
      return 0
    sweep = sweeping.Sweep(args.workdir)
    sweep.create(variants, source=args.config, axes=axes)
    if args.launch_script:
      path = sweep.directory / "launch.sh"
      path.write_text(sweeping.launch_script(sweep))
      n = len(variants)
      print(f"{path}: sbatch --array=0-{n - 1} launch/slurm.sbatch bash {path}  (or, per variant I, "
            f"launch/tpu_pod.sh bash {path} I)")
      return 0
    unfinished = sweeping.run_variants(sweep, parallel=args.parallel, retry_failed=args.retry_failed)
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep: error: {e}", file=sys.stderr)
    return 2
  if unfinished:
    for f in unfinished:
      what = "failed" if f["state"] == sweeping.FAILED else "was interrupted (rerun the command to resume it)"
      print(f"sweep: {f['name']} {what} (exit status {f['exit_status']}; log {f['log']})", file=sys.stderr)
    return 1
  print(f"sweep: {len(variants)} variants finished in {args.workdir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
