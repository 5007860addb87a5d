"""The paper's retrieval-augmented recipe on MP16 (geotoken_jax.recipe), as one command:

  python -m geotoken_jax.train --config configs/paper.py --workdir W \\
      --config.data.data_dir=~/tensorflow_datasets \\
      --config.recipe.alignment.model.clip.weights=/path/to/clip-vit-large-patch14/model.safetensors

Stages (each skipped when done, each resumable), all under W:
  1. align     G3's alignment heads on a frozen CLIP ViT-L/14 (user-supplied weights; nothing is
               downloaded): image -> loc_head 768 -> 768 -> 768, GeoCLIP's location encoder
               (Web Mercator; its weights ship in the geoclip wheel) -> 512 -> 768, InfoNCE
  2. embed     MP16 (train, held-out validation), Im2GPS3k and YFCC4k: image (CLIP, 768) and
               loc_head (768) per photo, float16
  3. index     each split's 32 nearest MP16 photos (exact, bf16 products, fp32 rescoring);
               MP16 queries never get themselves, a photo with their id, or a near-duplicate
               (within 1 km and mean cosine >= 0.95)
  4. train     the paper preset (post-LN, ReLU, sinusoidal, d 512, 10 + 10 layers, K = 15) on
               the query's and its neighbours' two features and the neighbours' S2 tokens
  5. evaluate  Im2GPS3k (the test split) and YFCC4k with the paper's strategies and the kNN rows

Variants: "" (the above), "fixture" (every stage at fixture size: a prepared geo_csv data set
as every split, a tiny random CLIP the test writes, a small random location encoder; what
tests/test_recipe.py runs).

Validation: an id-hashed 1% of MP16's train split (data.holdout by "id"), not configs/photos.py's
held-out level-8 cells, for the aligner and the GeoToken model alike.  Validation should measure
what the test measures: Im2GPS3k and YFCC4k photos are interleaved with MP16 (their places are
all over the gallery), and the training lists carry no group rule (retrieval.group = ""), so a
training photo's neighbours may come from its own cell too.  Whole held-out cells would hide
every same-cell neighbour from validation queries only: a harder, other task than both training
and test, and a poor signal for choosing checkpoints.  An id holdout interleaves validation
photos with the gallery like the test sets; its lists are built as the test lists are
(another split than the gallery: label-free, regime "test"; geotoken_jax.retrieval.exclusion).
Both runs hold out the same photos, so the aligner never trained on a validation photo.

Differences from the paper, on purpose: two features per photo, not three (the text-aligned
head needs MP16-Pro's captions, which no builder here writes yet: model.text_dim = 0); the
neighbour lists exclude duplicates explicitly instead of dropping rank 0.
"""

import importlib.util
import os

import ml_collections

from geotoken_jax import models


def _photos():
  """configs/photos.py, loaded by path (config files are not a package)."""
  spec = importlib.util.spec_from_file_location("geotoken_configs_photos",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "mp16"
  if variant not in ("mp16", "fixture"):
    raise ValueError(f"unknown variant {variant!r}: mp16 or fixture")
  photos = _photos()
  config = photos.get_config("mp16" if variant == "mp16" else "tiny")
  k = 15

  alignment = photos.get_config("mp16" if variant == "mp16" else "tiny")
  alignment.model = models.align_config("g3")
  alignment.model.text_dim = 0  # no captions: see the module docstring
  alignment.data.update(image_size=224, augment=False)
  # Validation: an id-hashed (interleaved) holdout of MP16's train split, the same photos for the
  # aligner and the GeoToken run (module docstring).
  for run in (config, alignment):
    run.data.holdout.update(by="id")
  alignment.batch_size = 4096  # InfoNCE wants large batches; the CLIP tower is frozen
  alignment.num_epochs = 1
  alignment.optim.update(learning_rate=3e-5, warmup_steps=500, weight_decay=0.0)
  alignment.validation_strategy = "gallery:1"
  alignment.evaluate.update(strategies="gallery:1", gallery="mp16_100k")
  config.recipe = ml_collections.ConfigDict({
      "alignment": alignment,
      "splits": ("train", "validation", "test", "yfcc4k:test"),
      "eval_splits": ("test", "yfcc4k:test"),
      "embedding_dtype": "float16",
      "embed_batch_size": 1024,
      "baseline_workdir": "",
      "baseline_strategies": "greedy",
  })
  config.retrieval = ml_collections.ConfigDict({
      "k": k, "alignment_workdir": "align", "embeddings": "embeddings", "neighbors": "neighbors",
      "gallery": "train", "fields": ("image", "loc_head"),
      # 8 GPUs: 32,768 gallery rows per device per step, [16384, 32768] fp32 scores (2 GB) each;
      # blocks of 1 M queries read the 14.5 GB gallery 5 times in all.
      "search_k": 32, "dtype": "bfloat16", "chunk_rows": 262144, "query_batch": 16384, "margin": 16,
      "block_rows": 1048576, "same_id": True, "duplicate_km": 1.0, "duplicate_similarity": 0.95, "group": "",
      "dropout": 0.0, "shuffle": False,
  })
  config.data.update(image_size=224, augment=False)  # the images only feed the aligner
  config.model = models.model_config("paper")
  config.model.features.update(num_neighbors=k, num_features=2, feature_dim=768)
  config.batch_size = 256
  config.num_epochs = 10
  config.optim.update(learning_rate=1e-4, warmup_steps=2000, weight_decay=0.01)
  config.evaluate.update(strategies=("greedy,beam:5,sample:30:0.7:logprob,sample:30:0.7:vote,sample:30:0.7:medoid,"
                                     f"knn:1,knn:{k}:medoid,knn:{k}:wvote"))

  if variant == "fixture":  # seconds per stage; tests set data.data_dir and the CLIP weights
    alignment.model.clip = ml_collections.ConfigDict(alignment.model.clip.to_dict())
    alignment.model.clip.update(name="tiny", image_size=28, patch_size=14, width=64, depth=2, num_heads=4,
                                mlp_dim=128, projection_dim=32)
    alignment.model.update(feature_dim=32, embed_dim=32, loc_head=(32,), location_head=(32,))
    alignment.model.location.update(weights="", hidden=32, depth=1, num_fourier=16)
    alignment.data.update(image_size=28)
    alignment.update(batch_size=8, num_steps=4, eval_batch_size=8, checkpoint_every_steps=2)
    alignment.optim.warmup_steps = 1
    alignment.evaluate.update(gallery="train", batch_size=8)
    config.data.update(image_size=28)
    config.recipe.update(splits=("train", "validation", "test"), eval_splits=("test",), embed_batch_size=8)
    config.retrieval.update(k=4, search_k=8, dtype="float32", chunk_rows=16, query_batch=8, block_rows=16)
    config.model.update(d_model=32, num_heads=2, ff_dim=64, encoder_layers=1, decoder_layers=1)
    config.model.features.update(num_neighbors=4, feature_dim=32)
    config.update(batch_size=8, num_steps=4, eval_batch_size=8, checkpoint_every_steps=2)
    config.evaluate.update(strategies="greedy,beam:3,knn:1,knn:4:wvote", batch_size=8)
  return config
