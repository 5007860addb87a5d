"""Decoding throughput: encoder + one strategy, the evaluation job's jitted decode.

Comparable with ../shared/bench/torch_ref.py --what {greedy,beam,sample}: random
inputs with a fixed seed, the same model dimensions (--preset paper), timing
from inputs to tokens (the encoder included; S2 centres and pool selection are
included here too, torch_ref leaves them out).

  python -m geotoken_jax.bench decode --preset paper --strategy beam --beam 5 --batch 16
  python -m geotoken_jax.bench decode --preset paper --strategy greedy --batch 16
  python -m geotoken_jax.bench decode --preset paper --strategy sample --samples 30 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from geotoken_jax import inference, models, s2, sharding
from geotoken_jax.bench.common import bench_config, random_batch
from geotoken_jax.decoding import strategies


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="paper", help="a models.model_config preset")
  parser.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="beam")
  parser.add_argument("--beam", type=int, default=5)
  parser.add_argument("--samples", type=int, default=30)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--rule", default="logprob", help="pool selection rule")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5, help="timed iterations")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--compute_dtype", default=None, help="override: float32 or bfloat16")
  parser.add_argument("--seed", type=int, default=0)


def strategy_of(args: argparse.Namespace) -> strategies.Strategy:
  if args.strategy == "greedy":
    return strategies.Strategy("greedy")
  if args.strategy == "beam":
    return strategies.Strategy("beam", beam_size=args.beam, rule=args.rule)
  return strategies.Strategy("sample", num_samples=args.samples, temperature=args.temperature,
                             rule=args.rule)


def run(args: argparse.Namespace) -> dict:
  config = bench_config(args.preset, args.batch, args.compute_dtype)
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  strategy = strategy_of(args).check(spec)
  mesh = sharding.create_mesh(config.mesh)
  model = models.build_model(config.model, spec, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  params = jax.device_put(params, shardings)
  batch = random_batch(config.model, spec, args.batch, args.seed)
  batch.pop("tokens")
  batch["index"] = np.arange(args.batch, dtype=np.int32)
  batch = sharding.make_global_batch(batch, mesh)
  # The evaluation job's own predictor (encoder once, the pool, the rule, top-5 candidates).
  predictor = inference.Predictor(graphdef, params, shardings, mesh, spec, [strategy], num_candidates=5,
                                  seed=args.seed)
  step = lambda params, batch: predictor(batch, params)  # noqa: E731

  for _ in range(args.warmup):
    jax.block_until_ready(step(params, batch))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(step(params, batch))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
      "bench": "decode",
      "strategy": strategy.name,
      "preset": args.preset,
      "batch": args.batch,
      "sequences_per_image": strategy.pool_size,
      "images_per_s": args.batch / median,
      "seconds_per_iter_median": median,
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "compute_dtype": config.model.compute_dtype,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "seconds_per_iter_all": [round(t, 5) for t in times],
  }
