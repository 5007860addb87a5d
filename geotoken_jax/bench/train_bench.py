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
import numpy as np

from geotoken_jax import s2, sharding
from geotoken_jax.bench.common import bench_config, random_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="paper", help="a models.model_config preset")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--compute_dtype", default=None, help="override: float32 or bfloat16")
  parser.add_argument("--seed", type=int, default=0)


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
