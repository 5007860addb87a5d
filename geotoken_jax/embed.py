"""Embed every image of a split or a labelled folder with a trained alignment model.

  python -m geotoken_jax.embed --workdir W --split train --output DIR [--dtype float16]
  python -m geotoken_jax.embed --workdir W --csv FILE --image_dir DIR --output DIR

Writes DIR/manifest.json and DIR/<field>/<shard>.npy for the fields "image",
"loc_head" (and "text_head"), plus latlng, index, tokens and id per record
(see geotoken_jax.embeddings): memory-mappable, sharded over the mesh, every
process in step, resumable (a rerun continues at the first incomplete shard;
a different model or setting is refused unless --overwrite).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from geotoken_jax import command_line as cl

_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "stored embedding dtype")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65536, "records per stored shard")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an output written with other settings")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  if not cl.WORKDIR.value or not cl.OUTPUT.value:
    print("error: --workdir and --output are required", file=sys.stderr)
    return 2
  if bool(cl.CSV.value) != bool(cl.IMAGE_DIR.value) or (cl.CSV.value and cl.SPLIT.value):
    print("error: give --split, or --csv with --image_dir", file=sys.stderr)
    return 2
  cl.quiet_logs()
  cl.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax import checkpoint, embeddings, inference  # pylint: disable=g-import-not-at-top

  try:
    config = inference.load_run_config(cl.WORKDIR.value, cl.STEP.value)
    if cl.DATA_DIR.value:
      config.data.data_dir = cl.DATA_DIR.value
    source, label = cl.folder_source(config, cl.WORKDIR.value) if cl.CSV.value else (None, None)
    manifest = inference.run_embedding(cl.WORKDIR.value, cl.OUTPUT.value, split=cl.SPLIT.value, source=source,
                                       split_label=label, step=cl.STEP.value, batch_size=cl.BATCH_SIZE.value,
                                       dtype=_DTYPE.value, limit=cl.LIMIT.value, overwrite=_OVERWRITE.value,
                                       shard_rows=_SHARD_ROWS.value)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointRestoreError, embeddings.SettingsMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    summary = {"output": cl.OUTPUT.value, "records": manifest["num_records"],
               "fields": {k: v["dim"] for k, v in manifest["fields"].items()},
               "timings": manifest.get("timings", [])[-1:]}
    print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  cl.run(main)
