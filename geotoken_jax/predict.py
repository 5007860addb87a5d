"""Predict where photos were taken: the top-k S2 cells of each image.

  python -m geotoken_jax.predict --workdir W photo.jpg folder/ ... [--file_list paths.txt]
      [--strategy beam:5] [--top_k 5] [--batch_size 32] [--output preds.jsonl|preds.csv]
      [--geojson cells.geojson] [--step N] [--config FILE]

Inputs are files and folders (their images, recursively) of any number, read in
batches with exactly the evaluation preprocessing (shorter side resized,
centre crop).  A file that cannot be read is reported on stderr and skipped;
the others are predicted, and the exit status is 1 when any failed.  For each
image the top-k distinct cells of the strategy's pool are printed with their
centre, probability (normalized over the pool's distinct cells), S2 cell token
(s2geometry's ToToken()) and GeoToken tokens; --output writes them as JSONL
(one line per image) or CSV (one line per candidate); --geojson as polygons.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence

from absl import flags
from etils import epath

from geotoken_jax import command_line as cl

_STRATEGY = flags.DEFINE_string("strategy", "beam:5", "e.g. beam:5, greedy, sample:30:0.7:medoid")
_TOP_K = flags.DEFINE_integer("top_k", 5, "candidate cells per image")
_FILE_LIST = flags.DEFINE_string("file_list", None, "a text file with one image path per line")
_GEOJSON = flags.DEFINE_string("geojson", None, "write the candidate cells as GeoJSON here")

_CSV_FIELDS = ("image", "rank", "lat", "lon", "probability", "s2_token", "tokens", "level")


def main(argv: Sequence[str]) -> int:
  inputs = list(argv[1:])
  if _FILE_LIST.value:
    inputs += [line.strip() for line in epath.Path(_FILE_LIST.value).read_text().splitlines() if line.strip()]
  if not cl.WORKDIR.value or not inputs:
    print("error: give --workdir and image files, folders or --file_list", file=sys.stderr)
    return 2
  if _TOP_K.value < 1 or (cl.BATCH_SIZE.value or 32) < 1:
    print("error: --top_k and --batch_size must be >= 1", file=sys.stderr)
    return 2
  if cl.OUTPUT.value and not cl.OUTPUT.value.endswith((".jsonl", ".csv")):
    print("error: --output must end in .jsonl or .csv", file=sys.stderr)
    return 2
  cl.quiet_logs()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax import checkpoint, inference  # pylint: disable=g-import-not-at-top

  try:
    restored = inference.restore_model(cl.WORKDIR.value, config=cl.CONFIG.value, step=cl.STEP.value,
                                       devices=jax.local_devices())
    paths = inference.list_images(inputs)
    if not paths:
      print(f"error: no image files in {inputs}", file=sys.stderr)
      return 2
    predictions = inference.predict_files(
        restored, paths, strategy_text=_STRATEGY.value, top_k=_TOP_K.value, batch_size=(cl.BATCH_SIZE.value or 32),
        seed=cl.SEED.value or 0, cache_dir=epath.Path(cl.WORKDIR.value) / "cache" / "tries",
        alignment_workdir=cl.ALIGNMENT_WORKDIR.value)
    print(f"checkpoint step {restored.step}, strategy {_STRATEGY.value}, {len(paths)} image(s)", flush=True)
    failed, kept = [], []
    out_file = epath.Path(cl.OUTPUT.value).open("w") if cl.OUTPUT.value else None
    writer = None
    if out_file is not None and cl.OUTPUT.value.endswith(".csv"):
      writer = csv.DictWriter(out_file, fieldnames=_CSV_FIELDS)
      writer.writeheader()
    try:
      for p in predictions:
        if p.candidates is None:
          failed.append(p.path)
          print(f"error: cannot read image {p.path}: {p.error}", file=sys.stderr, flush=True)
          continue
        print(p.path)
        for c in p.candidates:
          print(f"  {c['rank']}. lat {c['lat']:9.4f}  lon {c['lon']:10.4f}  p {c['probability']:.3f}  "
                f"s2 {c['s2_token']}  tokens {c['tokens']}")
        if writer is not None:
          writer.writerows({"image": p.path, **{k: c[k] for k in _CSV_FIELDS[1:]}} for c in p.candidates)
        elif out_file is not None:
          out_file.write(json.dumps({"image": p.path, "candidates": [
              {k: v for k, v in c.items() if k != "vertices"} for c in p.candidates]}) + "\n")
        if _GEOJSON.value:
          kept.append(p)
    finally:
      if out_file is not None:
        out_file.close()
  except (ValueError, FileNotFoundError, checkpoint.CheckpointRestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if _GEOJSON.value:
    epath.Path(_GEOJSON.value).write_text(json.dumps(inference.geojson(kept)))
    print(f"wrote {_GEOJSON.value}")
  if failed:
    print(f"{len(failed)} of {len(paths)} image(s) could not be read; the others were predicted",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  cl.run(main)
