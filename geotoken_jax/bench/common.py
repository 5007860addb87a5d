"""What several benchmarks share: the training-shaped config and random batches of the
train and decode benchmarks, and MP16's size for the projections."""

from __future__ import annotations

import ml_collections
import numpy as np

from geotoken_jax import models, s2, sharding

MP16_IMAGES = 4_720_000


def bench_config(preset: str, batch: int, compute_dtype: str | None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tokens = ml_collections.ConfigDict({"level": 20, "group_size": 2})
  config.model = models.model_config(preset)
  if compute_dtype:
    config.model.compute_dtype = compute_dtype
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.sharding_rules = sharding.DEFAULT_RULES
  config.batch_size = batch
  # The reference's optimizer: AdamW lr 5e-5, weight decay 1e-6, no clipping.
  config.optim = ml_collections.ConfigDict({
      "schedule": "constant", "learning_rate": 5e-5, "warmup_steps": 0, "end_factor": 1.0,
      "decay_rate": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-6,
      "grad_clip_norm": 0.0, "grad_accum_steps": 1,
  })
  config.loss = ml_collections.ConfigDict({"position_weights": (2.0, 1.0)})
  return config


def random_batch(model_config, spec: s2.TokenSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = lambda *shape: (rng.random(shape + (spec.num_positions,)) * np.array(spec.vocab_sizes)).astype(np.int32)
  out = {"tokens": tokens(batch)}
  if model_config.encoder == "features":
    k = model_config.features.num_neighbors
    dim = model_config.features.feature_dim
    out["query_features"] = rng.standard_normal((batch, 3, dim), np.float32)
    out["neighbor_features"] = rng.standard_normal((batch, k, 3, dim), np.float32)
    out["neighbor_tokens"] = tokens(batch, k)
  else:
    size = model_config.vit.image_size
    out["image"] = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
  return out
