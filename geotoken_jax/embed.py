"""Embed every image of a split or a labelled folder with a trained alignment model, or with
the tiny-image embedding (no model).

  python -m geotoken_jax.embed --workdir W --split train --output DIR [--dtype float16]
  python -m geotoken_jax.embed --workdir W --csv FILE --image_dir DIR --output DIR
  python -m geotoken_jax.embed --embedding tiny_image[:S[:colour]] --config configs/earth.py \
      --split train --output DIR          (or --workdir of any run: its saved config's data)

Writes DIR/manifest.json and DIR/<field>/<shard>.npy for the fields "image",
"loc_head" (and "text_head") of an aligner, or "tiny" of the tiny-image
embedding (geotoken_jax.encoders.tiny_image: the config's images, area-averaged
to S x S, grey unless :colour, mean-centred, L2-normalized), plus latlng, index,
tokens and id per record (see geotoken_jax.embeddings): memory-mappable, sharded
over the mesh, every process in step, resumable (a rerun continues at the first
incomplete shard; a different embedder or setting is refused unless --overwrite).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from geotoken_jax import command_line as cl

_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "stored embedding dtype")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65536, "records per stored shard")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an output written with other settings")
_EMBEDDING = flags.DEFINE_string("embedding", "", "what embeds: empty = the alignment model in --workdir; "
                                 "tiny_image[:SIZE[:colour]] = the tiny-image embedding (default 16, grey) of the "
                                 "--config's (or --workdir's run's) images")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  tiny = bool(_EMBEDDING.value)
  if not cl.OUTPUT.value or not (cl.WORKDIR.value or (tiny and cl.CONFIG.value is not None)):
    print("error: --output and --workdir (or, with --embedding tiny_image, --config) are required", file=sys.stderr)
    return 2
  if bool(cl.CSV.value) != bool(cl.IMAGE_DIR.value) or (cl.CSV.value and cl.SPLIT.value):
    print("error: give --split, or --csv with --image_dir", file=sys.stderr)
    return 2
  cl.quiet_logs()
  cl.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax import checkpoint, embeddings, inference  # pylint: disable=g-import-not-at-top

  try:
    if tiny and cl.CONFIG.value is not None:
      config = ml_collections.ConfigDict(cl.CONFIG.value.to_dict())
    else:
      config = inference.load_run_config(cl.WORKDIR.value, cl.STEP.value)
    if cl.DATA_DIR.value:
      config.data.data_dir = cl.DATA_DIR.value
    embedder = inference.tiny_image_embedder(_EMBEDDING.value, config) if tiny else None
    # Labelled folders are prepared into WORKDIR/cache/folders (--cache_dir), without a workdir
    # into ~/.cache/geotoken/cache/folders.
    cache_home = cl.WORKDIR.value or os.path.join(os.path.expanduser("~"), ".cache", "geotoken")
    source, label = cl.folder_source(config, cache_home) if cl.CSV.value else (None, None)
    manifest = inference.run_embedding(None if tiny else cl.WORKDIR.value, cl.OUTPUT.value, split=cl.SPLIT.value,
                                       source=source, split_label=label, step=cl.STEP.value,
                                       batch_size=cl.BATCH_SIZE.value, dtype=_DTYPE.value, limit=cl.LIMIT.value,
                                       overwrite=_OVERWRITE.value, shard_rows=_SHARD_ROWS.value, embedder=embedder,
                                       config=config if tiny else None)
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
