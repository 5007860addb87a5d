"""Real photos from prepared TFDS data sets (python -m geotoken_jax.data.prepare first).

  python -m geotoken_jax.train --config configs/photos.py:mp16 --workdir W \
      --config.data.data_dir=~/tensorflow_datasets
  python -m geotoken_jax.evaluate --config configs/photos.py:mp16 --workdir W --split yfcc4k:test

Variants:
  mp16    train on MP16 minus a held-out 1% (whole level-8 S2 cells), validate on
          that held-out slice, test on Im2GPS3k (evaluate --split yfcc4k:test for
          YFCC4k); training drops MP16 photos that are Im2GPS3k / YFCC4k test photos.
          (configs/paper.py, the retrieval recipe, holds out by id instead: its
          validation photos must sit among the gallery's like the test photos; see there)
  osv5m   train on OSV-5M train minus a held-out 1%, validate on it, test on OSV-5M test
  tiny    a seconds-long run for the tests: data set `geo_csv` with train / test splits,
          32 px images, a 1-layer ViT
  tiny_holdout  tiny, validating on a held-out slice of geo_csv:train instead of the test split
Splits map to "DATASET:SPLIT" in data.splits; "DATASET:SPLIT:holdout" / ":rest" are
the two sides of data.holdout's slice of a split:
  data.holdout = {"fraction", "by": "cell" | "id", "cell_level", "salt"}: a row is
    held out iff splitmix64(key ^ salt) < fraction * 2**64, key = its S2 cell id at
    cell_level ("cell": whole cells on one side) or the hash of its id ("id").
  data.leak_filter = ("DATASET:SPLIT", ...): training rows whose Flickr photo id is
    in those splits are dropped (each named split must be prepared; () = off).
See geotoken_jax/data/subsets.py.  Images are decoded and cropped in the input
pipeline (random resized crop + flip for training).
"""

import ml_collections

from geotoken_jax import models, sharding


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "mp16"
  if variant not in ("mp16", "osv5m", "tiny", "tiny_holdout"):
    raise ValueError(f"unknown variant {variant!r}: mp16, osv5m, tiny or tiny_holdout")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tokens = ml_collections.ConfigDict({"level": 20, "group_size": 2})
  splits = {
      "mp16": {"train": "mp16:train:rest", "validation": "mp16:train:holdout", "test": "im2gps3k:test"},
      "osv5m": {"train": "osv5m:train:rest", "validation": "osv5m:train:holdout", "test": "osv5m:test"},
      "tiny": {"train": "geo_csv:train", "validation": "geo_csv:test", "test": "geo_csv:test"},
      "tiny_holdout": {"train": "geo_csv:train:rest", "validation": "geo_csv:train:holdout",
                       "test": "geo_csv:test"},
  }[variant]
  # MP16 and the Flickr test sets come from the same YFCC100M pool: drop shared photos.
  # OSV-5M's ids are Mapillary ids and its test split is disjoint by construction.
  leak_filter = ("im2gps3k:test", "yfcc4k:test") if variant == "mp16" else ()
  config.data = ml_collections.ConfigDict({
      "name": splits["train"].split(":")[0], "data_dir": "~/tensorflow_datasets", "splits": splits,
      "image_size": 224, "augment": True,
      # grain worker processes decoding JPEGs; 0 reads in the training process (2-core machines)
      "worker_count": 16, "eval_limit": 0,
      # The held-out validation slice of "DATASET:SPLIT:holdout" / ":rest" (see above).
      "holdout": {"fraction": 0.01, "by": "cell", "cell_level": 8, "salt": 0},
      "leak_filter": leak_filter,
  })
  config.model = models.model_config("paper_modern")
  config.model.update(encoder="vit", encoder_layers=0, decoder_layers=6, vit=models.vit_config("vit_b16"))

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.sharding_rules = sharding.DEFAULT_RULES
  config.batch_size = 1024
  config.num_epochs = 10
  config.num_steps = 0
  config.stop_after_steps = 0
  config.optim = ml_collections.ConfigDict({
      "schedule": "warmup_cosine", "learning_rate": 3e-4, "warmup_steps": 2000, "end_factor": 0.01,
      "decay_rate": 0.9, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 0.05,
      "grad_clip_norm": 1.0, "grad_accum_steps": 1,
  })
  config.loss = ml_collections.ConfigDict({"position_weights": (2.0, 1.0)})
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.eval_batch_size = 512
  config.test_split = "test"
  config.checkpoint_every_steps = 2000
  config.max_checkpoints = 3
  config.evaluate = ml_collections.ConfigDict({
      "strategies": ("greedy,beam:5,sample:30:0.7:logprob,sample:30:0.7:vote,"
                     "sample:30:0.7:medoid,sample:30:0.7:mean"),
      "batch_size": 256, "num_candidates": 5, "seed": 0, "plot_max_points": 2000,
      # gallery:K / similarity / fused: an alignment model's workdir and the GPS gallery
      # (GeoCLIP's 100K MP16 coordinates by default here).
      "alignment_workdir": "", "gallery": "mp16_100k", "gallery_limit": 0, "fused_weight": 1.0,
      "oracles": False,  # label-using upper-bound rows (oracle:nearest_train); evaluate --oracles
  })

  if variant in ("tiny", "tiny_holdout"):
    config.data.update(image_size=32, worker_count=0)
    if variant == "tiny_holdout":  # a few dozen rows: hold out a quarter of them, by id
      config.data.holdout.update(fraction=0.25, by="id")
    config.model = models.model_config("earth_tiny")
    config.model.vit.update(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
    config.model.update(d_model=32, num_heads=2, ff_dim=64, decoder_layers=1)
    config.batch_size = 8
    config.num_steps = 4
    config.optim.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.eval_batch_size = 8
    config.checkpoint_every_steps = 2
    config.evaluate.update(strategies="greedy,sample:3:0.7:medoid", batch_size=8)
  return config
