"""Training throughput of the real train step (the trainer's jitted, donated step).

Random inputs with a fixed seed, like ../shared/bench/torch_ref.py --what train:
the paper preset takes CLIP-sized features of the query and K neighbours; ViT
presets take uint8 images. Reports images/s, the model FLOPs per image (XLA's
cost analysis of the compiled step), the achieved FLOP/s, and this machine's
float32 matmul FLOP/s as the roofline to read them against.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geotoken_jax import models, s2, sharding


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="paper", help="a models.model_config preset")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--compute_dtype", default=None, help="override: float32 or bfloat16")
  parser.add_argument("--seed", type=int, default=0)


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


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
  """This machine's float32 GEMM rate through XLA (the roofline for the numbers above)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def run(args: argparse.Namespace) -> dict:
  from geotoken_jax import trainer  # pylint: disable=g-import-not-at-top

  config = bench_config(args.preset, args.batch, args.compute_dtype)
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  mesh = sharding.create_mesh(config.mesh)
  setup, state = trainer.create_train_state(config, spec, mesh, total_steps=1000, steps_per_epoch=1000)
  step = trainer.make_train_step(setup, config, mesh)
  batch = sharding.make_global_batch(random_batch(config.model, spec, args.batch, args.seed), mesh)

  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_step = float(cost.get("flops", float("nan"))) if cost else float("nan")

  for _ in range(args.warmup):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, out = step(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return {
      "bench": "train",
      "preset": args.preset,
      "batch": args.batch,
      "images_per_s": args.batch / median,
      "seconds_per_step_median": median,
      "model_flops_per_image": flops_per_step / args.batch,
      "achieved_flops_per_s": flops_per_step / median,
      "matmul_flops_per_s": matmul_flops_per_s(),
      "params": int(n_params),
      "compute_dtype": config.model.compute_dtype,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "loss": float(out["loss"]),
      "seconds_per_step_all": [round(t, 5) for t in times],
  }
