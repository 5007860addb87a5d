"""The flags every geotoken command shares (absl), defined once, and how commands run.

Commands (train, evaluate, predict) are thin: they read these flags and call
the library (geotoken_jax.trainer, geotoken_jax.inference), which never reads a
flag.  `geotoken SUBCOMMAND ...` (geotoken_jax.cli) and `python -m
geotoken_jax.SUBCOMMAND ...` run the same code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

FLAGS = flags.FLAGS

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/NAME.py[:ARG]; any field overridable as --config.FIELD=VALUE "
    "(evaluate / predict: optional, default the config saved with the run)", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "the run's folder (local, gs://, s3://): checkpoints, "
                              "TensorBoard events, results")
STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest that restores)")
STRATEGIES = flags.DEFINE_string("strategies", None, "comma-separated inference strategies, e.g. "
                                 "greedy,beam:5,sample:30:0.7:medoid (default: the config's)")
SPLIT = flags.DEFINE_string("split", None, "split to read (default: the config's test_split); DATASET:SPLIT for a "
                            "prepared data set, e.g. yfcc4k:test")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "global images per batch (predict: 32; embed: the config's "
                                  "evaluate.batch_size)")
OUTPUT = flags.DEFINE_string("output", None, "predict: the predictions file (.jsonl or .csv); embed: the embedding "
                             "directory (local or a URL)")
LIMIT = flags.DEFINE_integer("limit", 0, "only the first N images (0 = all)")
ALIGNMENT_WORKDIR = flags.DEFINE_string("alignment_workdir", None, "an alignment model's workdir for gallery:K "
                                        "and the similarity / fused rules (default evaluate.alignment_workdir)")
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where results go (local or a URL)")
SEED = flags.DEFINE_integer("seed", None, "sampling seed (default: the config's evaluate.seed)")

# Labelled images in a folder (evaluate) -- the same column flags as `prepare`.
CSV = flags.DEFINE_string("csv", None, "a CSV with id, latitude, longitude columns (Im2GPS3k layout "
                          "IMG_ID,LAT,LON by default)")
IMAGE_DIR = flags.DEFINE_string("image_dir", None, "the folder holding the CSV's images")
ID_COLUMN = flags.DEFINE_string("id_column", None, "the CSV's id column (file name under --image_dir)")
LAT_COLUMN = flags.DEFINE_string("lat_column", None, "the CSV's latitude column")
LON_COLUMN = flags.DEFINE_string("lon_column", None, "the CSV's longitude column")
COUNTRY_COLUMN = flags.DEFINE_string("country_column", None, "a column of ISO-2 country codes")
SWAP_LATLON = flags.DEFINE_bool("swap_latlon", False, "the CSV's latitude and longitude headers are swapped")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "where prepared folders are cached "
                                "(default WORKDIR/cache/folders)")
DATA_DIR = flags.DEFINE_string("data_dir", None, "overrides data.data_dir (where data sets were prepared)")

# Multi-process jobs: explicit (localhost, SLURM scripts) or from the cluster's environment.
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")
LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "accelerators this process drives, e.g. 0,1 "
                                     "(default: from the cluster environment)")


def initialize_distributed() -> None:
  """jax.distributed from the flags or the cluster environment (geotoken_jax.distributed)."""
  from geotoken_jax import distributed  # pylint: disable=g-import-not-at-top

  ids = [int(i) for i in LOCAL_DEVICE_IDS.value] if LOCAL_DEVICE_IDS.value else None
  distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                         process_id=PROCESS_ID.value, local_device_ids=ids)


def quiet_logs() -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every save at INFO, read-only managers at WARNING


def call(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
  """Parses `argv` (argv[0] = program name) into the flags, then runs main(positional args).

  For tests and the `geotoken` script: flags from an earlier call are reset first.
  """
  FLAGS.unparse_flags()
  for name in [n for n in FLAGS if n.startswith("config.")]:
    delattr(FLAGS, name)  # the previous call's --config.FIELD override flags
  # ml_collections reads the --config.FIELD overrides from sys.argv itself.
  saved, sys.argv = sys.argv, list(argv)
  try:
    remaining = FLAGS(list(argv))
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    sys.argv = saved
  verbosity = logging.get_verbosity()
  try:
    return int(main(remaining) or 0)
  finally:
    logging.set_verbosity(verbosity)  # a command's quiet_logs() must not outlive it


def run(main: Callable[[Sequence[str]], int]) -> None:
  """The `python -m` entry point: absl's app.run, exiting with main's status."""
  app.run(lambda argv: sys.exit(main(argv)))


def folder_source(config, workdir: str):
  """The --csv/--image_dir folder, prepared once into the cache (keyed by the CSV's bytes and
  the images' names, sizes and times), as a source; and its name (csv-STEM)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from geotoken_jax import data, inference  # pylint: disable=g-import-not-at-top
  from geotoken_jax.data import folder_cache, tfds_source  # pylint: disable=g-import-not-at-top

  spec = inference.token_spec(config)
  cache_root = CACHE_DIR.value or str(epath.Path(workdir) / "cache" / "folders")
  options = dict(id_column=ID_COLUMN.value, lat_column=LAT_COLUMN.value, lon_column=LON_COLUMN.value,
                 country_column=COUNTRY_COLUMN.value, swap_latlon=SWAP_LATLON.value,
                 level=spec.level, group_size=spec.group_size)
  # Process 0 prepares; the others wait, then find it in the cache.
  if jax.process_index() == 0:
    prepared = folder_cache.prepare_folder(CSV.value, IMAGE_DIR.value, cache_root, **options)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("geotoken folder prepared")
    if jax.process_index() != 0:
      prepared = folder_cache.prepare_folder(CSV.value, IMAGE_DIR.value, cache_root, **options)
  source = tfds_source.TfdsSource(tfds_source.dataset_dir(prepared.data_dir, prepared.dataset), prepared.split,
                                  spec, image_size=config.data.get("image_size", 224),
                                  resize=data.image_resize_mode(config))
  return source, f"csv-{epath.Path(CSV.value).stem}"
