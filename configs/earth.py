"""The built-in benchmark: Blue Marble crops at the 100K MP16 photo locations.

  python -m geotoken_jax.train --config configs/earth.py --workdir /tmp/earth
  python -m geotoken_jax.train --config configs/earth.py:smoke --workdir /tmp/smoke

`earth` trains in about 15 minutes on a 2-core CPU; `smoke` is the seconds-long
variant the tests run.
"""

import ml_collections

from geotoken_jax import models, sharding


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke", "align", "align_smoke", "align_place", "retrieval", "retrieval_smoke", "retrieval_vit",
                     "retrieval_tiny", "retrieval_tiny_smoke", "fusion", "fusion_smoke"):
    raise ValueError(f"unknown variant {variant!r}: use configs/earth.py[:smoke|:align|:align_smoke|:align_place|"
                     ":retrieval|:retrieval_smoke|:retrieval_vit|:retrieval_tiny|:retrieval_tiny_smoke|:fusion|"
                     ":fusion_smoke]")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tokens = ml_collections.ConfigDict({"level": 20, "group_size": 2})
  # data_dir: where `prepare` wrote data sets, for evaluating this model on them
  # (evaluate --split yfcc4k:test --data_dir D); the earth data itself needs none.
  config.data = ml_collections.ConfigDict({"name": "earth", "image_size": 64, "worker_count": 0,
                                           "data_dir": ""})
  # earth_tiny narrowed to width 128 (3x faster on 2 CPU cores than width 192):
  # 64 patch tokens of 8x8 px, 4 encoder + 3 decoder layers, 2 heads.
  config.model = models.model_config("earth_tiny")
  config.model.vit.update(width=128, num_heads=2, mlp_dim=512)
  config.model.update(d_model=128, num_heads=2, ff_dim=512, decoder_layers=3)

  # Sizes within a slice / process group; add "dcn": {"data": N} for N slices or
  # processes joined over the data-centre network (geotoken_jax.sharding.create_mesh).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.sharding_rules = sharding.DEFAULT_RULES

  config.batch_size = 128  # global
  config.num_epochs = 2
  config.num_steps = 0  # > 0 overrides num_epochs
  config.stop_after_steps = 0  # > 0: save and exit there, as if preempted (time-sliced jobs)
  config.optim = ml_collections.ConfigDict({
      "schedule": "warmup_cosine", "learning_rate": 1e-3, "warmup_steps": 200, "end_factor": 0.01,
      "decay_rate": 0.9, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 1e-4,
      "grad_clip_norm": 1.0, "grad_accum_steps": 1,
  })
  config.loss = ml_collections.ConfigDict({"position_weights": (2.0, 1.0)})  # linspace(2, 1, P)

  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.eval_batch_size = 256
  config.test_split = "test"
  config.checkpoint_every_steps = 500
  config.max_checkpoints = 3
  # A step with a non-finite loss or gradient is skipped and counted; this many
  # in a row stop the run (exit status 1) naming the last good checkpoint.
  config.max_consecutive_nonfinite = 20
  # Several processes: how often the SIGTERM flags are all-gathered when JAX's
  # preemption sync point is not available (one process checks every step).
  config.preemption_check_every_steps = 10
  config.validation_strategy = "greedy"  # the trainer's validation / test row

  # python -m geotoken_jax.evaluate: the paper's strategies (greedy, beam, a pool
  # of 30 samples at T = 0.7 under each selection rule; the pool is decoded once).
  config.evaluate = ml_collections.ConfigDict({
      "strategies": ("greedy,beam:5,sample:30:0.7:logprob,sample:30:0.7:vote,"
                     "sample:30:0.7:medoid,sample:30:0.7:mean"),
      "batch_size": 128,  # global images per decode batch
      "num_candidates": 5,  # top-k cells per image in the predictions file
      "seed": 0,
      "plot_max_points": 2000,
      # An alignment model (configs/earth.py:align) for gallery:K and the similarity / fused
      # rules, e.g. --config.evaluate.alignment_workdir=workdirs/earth_align (or --alignment_workdir).
      "alignment_workdir": "",
      "gallery": "train",  # gallery:K's locations: train (the training cells), mp16_100k or a CSV
      "gallery_limit": 0,
      "fused_weight": 0.3,  # fused = log-probability + w * similarity logit (0.3: best of 0.1 / 0.3 / 1 on validation)
      # Label-using upper-bound rows (oracle:nearest_train: the training location nearest to the
      # truth), beside the strategies; evaluate --oracles turns them on too.
      "oracles": False,
  })

  if variant.startswith("align"):
    _align(config, smoke=variant == "align_smoke")
  if variant == "align_place":  # + the place-recognition term (models.align.place_loss): same place = positive
    config.model.update(place_weight=1.0, place_max_shift=8, place_radius_km=25.0, place_temperature=0.1)
  if variant.startswith("retrieval"):
    model = config.model
    _retrieval(config, smoke=variant.endswith("_smoke"), tiny=variant.startswith("retrieval_tiny"))
    if variant == "retrieval_vit":  # the ViT of the default variant + the neighbours as extra memory
      config.model = model
      config.model.update(neighbor_memory=True)
      config.model.features.num_neighbors = config.retrieval.k
      # Fine-tuned from a trained non-retrieval run when init_from names its workdir
      # (e.g. --config.init_from=workdirs/earth): the shared parameters start there.
      config.init_from = ""
      config.num_epochs = 1
      config.optim.update(learning_rate=3e-4, warmup_steps=50)
  if variant in ("smoke", "fusion_smoke"):
    config.model.vit.depth = 1
    config.model.decoder_layers = 1
    config.data.eval_limit = 64
    config.batch_size = 16
    config.num_steps = 30
    config.optim.warmup_steps = 5
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.eval_batch_size = 32
    config.checkpoint_every_steps = 10
    config.evaluate.update(strategies="greedy,beam:3,sample:4:0.7:medoid,sample:4:0.7:vote",
                           batch_size=32)
  if variant.startswith("fusion"):  # after the smoke sizes: its own strategies and lengths
    _fusion(config, smoke=variant == "fusion_smoke")
  return config


def _align(config: ml_collections.ConfigDict, smoke: bool) -> None:
  """The geo-alignment model of the earth benchmark (GeoCLIP-style, trained from scratch on
  the image side): a tiny ViT + MLP head against GeoCLIP's pretrained location encoder
  (frozen; its weights ship in the geoclip wheel and are converted to safetensors on first
  use) + a trainable head, symmetric InfoNCE with a queue of 1024 past GPS.  ~5 minutes on
  2 CPU cores.  Evaluated with gallery:K over the training split's locations.
  """
  config.model = models.align_config("earth_align")
  config.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=1e-4,
                      frozen=("location/.*",))  # GeoCLIP's encoder stays as shipped
  config.num_epochs = 1
  config.num_steps = 300
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 0  # the gallery (the training split's ~90K cells) is re-embedded per validation
  config.validation_strategy = "gallery:1"
  config.evaluate.update(strategies="gallery:1,gallery:30:medoid,gallery:30:vote", gallery="train")
  if smoke:  # seconds: a small random location encoder (frozen too), no weights to convert
    config.model.vit.depth = 1
    config.model.location.update(weights="", hidden=32, depth=1, num_fourier=16)
    config.model.location_head = (32,)
    config.model.queue_size = 32
    config.data.eval_limit = 64
    config.batch_size = 16
    config.num_steps = 12
    config.optim.warmup_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 6
    config.eval_batch_size = 32
    config.evaluate.update(strategies="gallery:1,gallery:5:medoid", batch_size=32, gallery_limit=500)


def _recipe_block(alignment, splits, *, embed_batch_size: int, **extra) -> ml_collections.ConfigDict:
  """config.recipe (geotoken_jax.recipe): the aligner (a training config, or "tiny_image:S"), the
  splits embedded and searched, and any further recipe field."""
  return ml_collections.ConfigDict({
      "alignment": alignment, "splits": tuple(splits), "embedding_dtype": "float16",
      "embed_batch_size": embed_batch_size,
      # A non-retrieval GeoToken run (e.g. workdirs/earth) evaluated into the same table.
      "baseline_workdir": "", "baseline_strategies": "greedy", **extra})


def _retrieval_block(fields, *, k: int, dropout: float) -> ml_collections.ConfigDict:
  """config.retrieval: K neighbours per example from the training split, searched over `fields`
  (mean cosine), 2K listed; leak rules; training-time neighbour dropout."""
  return ml_collections.ConfigDict({
      "k": k, "alignment_workdir": "align", "embeddings": "embeddings", "neighbors": "neighbors",
      "gallery": "train", "fields": tuple(fields),
      "search_k": 2 * k, "dtype": "float32", "chunk_rows": 32768, "query_batch": 1024, "margin": 16,
      "block_rows": 65536, "same_id": True, "duplicate_km": 1.0, "duplicate_similarity": 0.95,
      "group": "s2_cell:6",  # the held-out splits are whole level-6 cells: so are training lists
      "dropout": dropout, "shuffle": False,
  })


def _retrieval(config: ml_collections.ConfigDict, smoke: bool, tiny: bool = False) -> None:
  """The retrieval-augmented GeoToken of the earth benchmark, as one recipe (geotoken_jax.recipe):
  the alignment model (the :align variant) -> embeddings of every split -> each split's
  neighbours in the training split (self, duplicates and the query's own level-6 cell
  excluded: the held-out splits are whole level-6 cells) -> the paper's feature encoder over
  the query's and K neighbours' (image, loc_head) embeddings and the neighbours' S2 tokens ->
  evaluation beside the kNN rows.  Everything lives in the one workdir.

  tiny (:retrieval_tiny): the Im2GPS baseline instead of an aligner -- recipe.alignment is
  "tiny_image:16" (16 x 16 grey, area-averaged from the 64 px images, mean-centred,
  L2-normalized; no align stage), the stores hold one field, "tiny" (256-d), and the kNN rows
  are kNN over tiny images.
  """
  config.recipe = _recipe_block("tiny_image:16" if tiny else get_config("align_smoke" if smoke else "align"),
                                ("train", "validation", "test"), embed_batch_size=256)
  k = 10
  config.retrieval = _retrieval_block(("image", "loc_head"), k=k, dropout=0.1)
  config.model = models.model_config("paper_modern")
  config.model.update(d_model=128, num_heads=4, ff_dim=512, encoder_layers=2, decoder_layers=3, dropout=0.0)
  config.model.features.update(num_neighbors=k, num_features=2, feature_dim=256)
  if tiny:  # one field, "tiny": 16 x 16 grey = 256-d
    config.retrieval.fields = ("tiny",)
    config.model.features.update(num_features=1, feature_dim=256)
  config.num_epochs = 2
  config.optim.update(learning_rate=1e-3, warmup_steps=100)
  config.eval_every_steps = 0
  config.evaluate.update(strategies=("greedy,beam:5,sample:30:0.7:medoid,sample:30:0.7:vote,"
                                     f"knn:1,knn:{k}:medoid,knn:{k}:vote,knn:{k}:wvote"))
  if smoke:  # a fixture-sized run of every stage (tests): 2,000 training rows
    if not tiny:
      config.recipe.alignment.data.train_limit = 2000
    config.data.train_limit = 2000
    config.data.eval_limit = 64
    config.retrieval.update(group="", chunk_rows=512, query_batch=256, block_rows=1024)
    config.model.update(d_model=32, num_heads=2, ff_dim=64, encoder_layers=1, decoder_layers=1)
    config.batch_size = 16
    config.num_steps = 12
    config.optim.warmup_steps = 2
    config.log_every_steps = 4
    config.checkpoint_every_steps = 6
    config.eval_batch_size = 32
    config.evaluate.update(strategies=f"greedy,beam:3,knn:1,knn:{k}:medoid,knn:{k}:wvote", batch_size=32)


# kNN-LM settings tried on validation by the fusion variant (decoding.knn_lm): lambda x tau, and
# lambda gated by the top neighbour's score (0 below LO, lambda from HI on).
FUSION_GRID = tuple(f"greedy:knn_lambda={lam:g}:knn_tau={tau:g}" for lam in (0.3, 0.5, 0.7)
                    for tau in (0.01, 0.02, 0.05)) + (
    "greedy:knn_lambda=0.7:knn_tau=0.02:knn_gate=0.5/0.8",
    "greedy:knn_lambda=0.9:knn_tau=0.02:knn_gate=0.6/0.9",
    "greedy:knn_lambda=0.9:knn_tau=0.02:knn_gate=0.7/0.95",
    "sample:30:0.7:medoid:knn_lambda=0.5:knn_tau=0.02:add_neighbors=10",
    "sample:30:0.7:rerank:knn_lambda=0.5:knn_tau=0.02:add_neighbors=10",
)
# The union pool the fusion variant's reranker scores: 30 kNN-LM samples + the 10 neighbours' paths.
FUSION_RERANK_POOL = "sample:30:0.7:knn_lambda=0.5:knn_tau=0.02:add_neighbors=10"


def _fusion(config: ml_collections.ConfigDict, smoke: bool) -> None:
  """Retrieval and the decoder together, no fusion training: the default variant's ViT decoder
  (it reads no neighbours: it trains on the plain records) and tiny-image kNN (the
  Im2GPS baseline: 16 x 16 grey, no training), fused at decoding time by kNN-LM on the S2 tree
  (decoding.knn_lm: p = lambda p_kNN + (1 - lambda) p_dec over whole token sequences).

  Two regimes: the cell-blocked test split (whole level-6 cells never trained on) and an
  interleaved one, "train:holdout": 2 % of the training split's level-13 cells (~1 km), removed
  from training and from the gallery (data.splits maps train to train:rest).  Another 2 % of
  the level-13 cells, "train:fit", is removed the same way: with the cell-blocked validation
  split, where the learned reranker (rule rerank, geotoken_jax.reranking) of the union pool
  FUSION_RERANK_POOL is fitted, its validation row out-of-fold (2 folds of level-6 cells).  Neighbour lists at
  test time use no label (the index job's test regime: same id only).  lambda and tau are chosen
  on the validation split (cell-blocked, like test) among FUSION_GRID by the mean of acc@25, 200,
  750 and 2500 km (recipe.choose_among): the table's "chosen on validation" rows."""
  config.data.holdout = ml_collections.ConfigDict({"fraction": 0.02, "by": "cell", "cell_level": 13, "salt": 0,
                                                   "fit_fraction": 0.02})
  config.data.splits = ml_collections.ConfigDict({"train": "train:rest"})
  config.recipe = _recipe_block("tiny_image:16", ("train", "validation", "test", "train:holdout", "train:fit"),
                                embed_batch_size=512, eval_splits=("validation", "test", "train:holdout"))
  config.reranker = ml_collections.ConfigDict({"pool": FUSION_RERANK_POOL, "fit_splits": ("validation", "train:fit"),
                                               "directory": "reranker"})
  config.evaluate.reranker_workdir = "reranker"
  k = 10
  config.retrieval = _retrieval_block(("tiny",), k=k, dropout=0.0)
  config.recipe.choose_among = FUSION_GRID
  config.recipe.choose_on = "validation"
  # The rows the chosen one must beat: its differences from them, with paired bootstrap intervals.
  config.recipe.compare_with = ("knn:1", "greedy", "beam:5", "sample:30:0.7:medoid")
  config.evaluate.update(oracles=True, strategies=",".join(
      ["greedy", "beam:5", "sample:30:0.7:medoid", "knn:1", f"knn:{k}:wvote", *FUSION_GRID]))
  if smoke:  # seconds: 2,000 training rows, 64 per evaluation split
    config.data.train_limit = 2000
    config.data.eval_limit = 64
    config.data.holdout.update(fraction=0.2, fit_fraction=0.2)
    config.retrieval.update(chunk_rows=512, query_batch=256, block_rows=1024)
    config.reranker.update(pool="sample:4:0.7:knn_lambda=0.5:knn_tau=0.02:add_neighbors=10", steps=30, batch_size=32,
                           hidden=(16,))
    config.recipe.choose_among = FUSION_GRID[:1] + ("greedy:knn_lambda=0.9:knn_tau=0.02:knn_gate=0.7/0.95",
                                                    "sample:4:0.7:rerank:knn_lambda=0.5:knn_tau=0.02:add_neighbors=10")
    config.evaluate.update(strategies=",".join(["greedy", "beam:3", "knn:1", *config.recipe.choose_among]))
    config.recipe.compare_with = ("knn:1", "greedy", "beam:3")
