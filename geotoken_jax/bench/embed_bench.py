"""Embedding throughput of an alignment model's image side (the embedding job's function).

  python -m geotoken_jax.bench embed --preset earth_align --batch 128
  python -m geotoken_jax.bench embed --preset g3 --batch 8 --compute_dtype bfloat16

Random weights (the throughput does not depend on them) and random uint8 images
at the tower's size; the timed function is inference.embed_function's jit (image
tower + heads).  Prints images/s, the compiled FLOPs per image (XLA's cost
analysis) and the time to embed MP16 (4.72 M images) projected for one H100 SXM
from those FLOPs at the peak and MFU given (--peak_tflops 989 dense bf16, --mfu 0.4).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from geotoken_jax import inference, models, s2, sharding
from geotoken_jax.bench.common import MP16_IMAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="earth_align", help="a models.align_config preset "
                      "(earth_align: the earth ViT; geoclip / g3: CLIP ViT-L/14 at 224 px)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--compute_dtype", default=None, help="override: float32 or bfloat16")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak for the projection")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
  parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
  model_config = models.align_config(args.preset)
  model_config.location.weights = ""  # the location side is not timed: no weights needed
  model_config.image_mlp_weights = ""
  if args.compute_dtype:
    model_config.compute_dtype = args.compute_dtype
    model_config.clip.compute_dtype = args.compute_dtype
  config = ml_collections.ConfigDict(dict(model=model_config, seed=args.seed, tokens={"level": 20, "group_size": 2},
                                          sharding_rules=sharding.DEFAULT_RULES, mesh={"data": -1}))
  spec = s2.TokenSpec(20, 2)
  mesh = sharding.create_mesh(config.mesh)
  graphdef, _, shardings = inference.abstract_params(config, spec, mesh)
  params = jax.jit(lambda: nnx.state(models.build_model(model_config, spec, rngs=nnx.Rngs(args.seed)), nnx.Param),
                   out_shardings=shardings)()
  restored = inference.RestoredModel(config, spec, graphdef, params, shardings, mesh, 0, "bench")
  embed = inference.embed_function(restored)
  size = inference.image_size(model_config)
  images = np.random.default_rng(args.seed).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
  batch = sharding.make_global_batch({"image": images}, mesh)
  lowered = jax.jit(lambda p, b: nnx.merge(graphdef, p).embed(b)).lower(params, {"image": batch["image"]})
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_image = float(cost.get("flops", 0.0)) / args.batch

  for _ in range(args.warmup):
    jax.block_until_ready(embed(batch))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(embed(batch))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  h100_seconds = MP16_IMAGES * flops_per_image / (args.peak_tflops * 1e12 * args.mfu)
  return {
      "bench": "embed",
      "preset": args.preset,
      "image_size": size,
      "batch": args.batch,
      "images_per_s": args.batch / median,
      "seconds_per_iter_median": median,
      "image_tower_params": int(sum(x.size for x in jax.tree.leaves(params["image_tower"]))),
      "gflops_per_image": flops_per_image / 1e9,
      "mp16_images": MP16_IMAGES,
      "mp16_hours_this_machine": MP16_IMAGES / (args.batch / median) / 3600,
      "mp16_minutes_one_h100_projected": h100_seconds / 60,
      "projection": f"{args.peak_tflops:g} TFLOP/s peak x MFU {args.mfu:g}",
      "compute_dtype": model_config.compute_dtype if model_config.image_tower == "vit"
                       else model_config.clip.compute_dtype,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "seconds_per_iter_all": [round(t, 4) for t in times],
  }
