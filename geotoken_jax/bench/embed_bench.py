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
  parser.add_argument("--batch", type=int, default=None, help="default 128 (32 with --compare)")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--compute_dtype", default=None, help="override: float32 or bfloat16")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak for the projection")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--compare", choices=("transformers",), default=None,
                      help="time the CLIP tower (--clip preset) against transformers on the same weights")
  parser.add_argument("--clip", default="vit_b32", help="--compare: a clip.clip_vision_config preset")
  parser.add_argument("--dtype", default="float32",
                      help="--compare: float32, bfloat16, or both comma-separated (one JSON line each)")
  parser.add_argument("--torch_setting", default="auto",
                      help="--compare: auto (the fastest of eager, sdpa, compile_eager, compile_sdpa) or one of them")


def run(args: argparse.Namespace) -> dict:
  if args.compare:
    return run_compare(args)
  if args.batch is None:
    args.batch = 128
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


# --compare transformers
# ------------------------------------------------------------------------------

_TORCH_SETTINGS = ("eager", "sdpa", "compile_eager", "compile_sdpa")
_PAUSE_S = 0.25  # between timed calls: lets the other side's spinning worker threads go idle


def _peer():
  try:
    import torch
    import transformers
  except ImportError as e:
    raise SystemExit(f"embed --compare transformers needs torch and transformers ({e}); install them "
                     "with: pip install -r requirements-test.txt") from e
  return torch, transformers


def _best_time(fn, steps: int) -> tuple[float, float]:
  """The best wall-clock and the best process CPU seconds (all threads) of `steps` calls."""
  wall = cpu = float("inf")
  for _ in range(steps):
    time.sleep(_PAUSE_S)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu


def run_compare(args: argparse.Namespace) -> dict:
  """Our CLIP tower vs transformers' CLIPVisionModelWithProjection: same weights, batch, CPU.

  A seeded random HF model with the --clip preset's architecture is saved with
  save_pretrained; our tower loads that model.safetensors (clip_config_from_weights
  reads its config.json).  Both embed the same random images: ours takes them as
  uint8 NHWC and normalizes on device (as in production), torch gets the same
  pixels CLIP-normalized on the host, float32 NCHW (normalizing is not timed on
  its side).  Torch runs under inference_mode with every CPU thread, in eval mode,
  in its fastest setting (--torch_setting auto: attention "eager" or "sdpa", each
  with and without torch.compile); bfloat16 is torch.autocast("cpu", bfloat16)
  there and compute_dtype bfloat16 here (float32 parameters, bfloat16 matmuls).
  Timing goes round robin (ours, then each torch setting) --steps times (at least 3),
  with a pause between calls, and keeps each one's best wall-clock time; the peer is
  the fastest setting.  transformers and torch are imported here only.  One JSON line
  per --dtype; the last is returned, the others printed.
  """
  import contextlib
  import json
  import os
  import tempfile

  from geotoken_jax.encoders import clip

  torch, transformers = _peer()
  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtype must be float32 and/or bfloat16, got {d!r}")
  settings = _TORCH_SETTINGS if args.torch_setting == "auto" else (args.torch_setting,)
  for s in settings:
    if s not in _TORCH_SETTINGS:
      raise SystemExit(f"--torch_setting must be auto or one of {_TORCH_SETTINGS}, got {s!r}")
  batch = args.batch or 32
  steps = max(args.steps, 3)
  threads = os.cpu_count()
  torch.set_num_threads(threads)

  preset = clip.clip_vision_config(args.clip)
  hf_config = transformers.CLIPVisionConfig(
      hidden_size=preset.width, intermediate_size=preset.mlp_dim, num_hidden_layers=preset.depth,
      num_attention_heads=preset.num_heads, image_size=preset.image_size, patch_size=preset.patch_size,
      hidden_act=preset.activation, layer_norm_eps=preset.eps, projection_dim=preset.projection_dim)
  torch.manual_seed(args.seed)
  reference = transformers.CLIPVisionModelWithProjection(hf_config).eval()
  size = preset.image_size
  images = np.random.default_rng(args.seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  mean, std = np.float32(clip.CLIP_MEAN), np.float32(clip.CLIP_STD)
  pixel_values = torch.from_numpy(
      np.ascontiguousarray(((images / np.float32(255) - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)))

  results = []
  with tempfile.TemporaryDirectory() as root:
    reference.save_pretrained(root)
    del reference
    weights = os.path.join(root, "model.safetensors")
    images_on_device = jax.device_put(images)
    for dtype in dtypes:
      # Ours: the loaded tower's jitted features (uint8 in, projected embedding out).
      config = clip.clip_config_from_weights(weights)
      config.compute_dtype = dtype
      tower = nnx.eval_shape(lambda: clip.CLIPVisionTower(config, rngs=nnx.Rngs(0)))  # noqa: B023
      clip.load_into(tower, weights)
      graphdef, state = nnx.split(tower)
      embed = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))  # noqa: B023
      ours_fn = lambda: jax.block_until_ready(embed(state, images_on_device))  # noqa: B023
      ours = np.asarray(ours_fn(), np.float32)

      def autocast(dtype=dtype):
        if dtype == "bfloat16":
          return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

      # Theirs: every setting, warmed up (torch.compile compiles here); one that fails is
      # reported and left out.
      candidates, failed = {}, {}
      for setting in settings:
        model = transformers.CLIPVisionModelWithProjection.from_pretrained(
            root, attn_implementation=setting.removeprefix("compile_")).eval()
        forward = torch.compile(model) if setting.startswith("compile_") else model

        def theirs_fn(forward=forward):
          with torch.inference_mode(), autocast():
            return forward(pixel_values=pixel_values).image_embeds

        try:
          outputs = theirs_fn().float().numpy()
        except Exception as e:  # noqa: BLE001  (torch.compile without a working toolchain, say)
          failed[setting] = f"{type(e).__name__}: {str(e)[:200]}"
          continue
        candidates[setting] = (theirs_fn, outputs)
      if not candidates:
        raise SystemExit(f"no torch setting ran: {failed}")

      # Round robin: ours, then each torch setting, `steps` times; each one's best.  The
      # fastest torch setting is the peer.
      load_before = os.getloadavg()[0]
      runs = {"ours": ours_fn, **{k: fn for k, (fn, _) in candidates.items()}}
      wall = dict.fromkeys(runs, float("inf"))
      cpu = dict.fromkeys(runs, float("inf"))
      for _ in range(steps):
        for name, fn in runs.items():
          w, c = _best_time(fn, 1)
          wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
      setting = min(candidates, key=wall.get)
      theirs = candidates[setting][1]
      ours_best, theirs_best = wall["ours"], wall[setting]
      result = {
          "bench": "embed_compare",
          "peer": "transformers.CLIPVisionModelWithProjection",
          "clip": args.clip,
          "dtype": dtype,
          "batch": batch,
          "images_per_s": batch / ours_best,
          "transformers_images_per_s": batch / theirs_best,
          "speedup_vs_transformers": theirs_best / ours_best,
          "seconds_per_batch": round(ours_best, 4),
          "transformers_seconds_per_batch": round(theirs_best, 4),
          # CPU seconds of this process (every thread) per batch: the work done, whatever else
          # runs on the machine (but a thread spinning while it waits counts too).
          "cpu_seconds_per_batch": round(cpu["ours"], 4),
          "transformers_cpu_seconds_per_batch": round(cpu[setting], 4),
          "max_abs_diff": float(np.max(np.abs(ours - theirs))),
          "max_abs_embedding": float(np.max(np.abs(theirs))),
          "ours": f"jit(CLIPVisionTower.features), compute_dtype {dtype}",
          "torch_setting": setting,
          "torch_settings_s_per_batch": {**{k: round(wall[k], 4) for k in candidates}, **failed},
          "speedup_vs_each_torch_setting": {k: round(wall[k] / ours_best, 3) for k in candidates},
          "inputs": "ours: uint8 NHWC, normalized on device (timed); transformers: the same pixels "
                    "CLIP-normalized on the host, float32 NCHW (normalization not timed)",
          "threads": threads,
          "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
          "timing": f"best of {steps}, round robin: ours, then each torch setting",
          "jax": jax.__version__,
          "torch": torch.__version__,
          "transformers": transformers.__version__,
          "backend": jax.default_backend(),
      }
      results.append(result)
      if dtype != dtypes[-1]:
        print(json.dumps(result), flush=True)
  return results[-1]
