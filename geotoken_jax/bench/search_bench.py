"""Exact top-k search throughput (retrieval.search) against faiss IndexFlatIP, and its memory plan.

  python -m geotoken_jax.bench search --gallery 100000 --queries 100000 --dims 256,768 --dtype float32
  python -m geotoken_jax.bench search --gallery 5000 --queries 2000 --no_faiss
  python -m geotoken_jax.bench search --plan --gallery 4720000 --queries 4720000 --dims 1536 --devices 8 \
      --chunk_rows 262144 --query_batch 16384 --dtype bfloat16

Random L2-normalized float32 queries and gallery (seeded), one set per dimension.
For each dimension, dtype and pre-filter (float32 only: none, and the bfloat16
pre-filter whose result is the float32 one): the JAX search time (after a
warm-up with the same query-batch and chunk shapes, so the compile is reported
separately) and faiss IndexFlatIP (its default OpenMP threads) on the same data,
timed back to back in this process, each --repeats times, the best kept (wall
clock; process CPU seconds alongside).  Each pair prints a JSON line with
queries/s, GFLOP/s (2·Q·G·D / s), speedup_vs_faiss, and the agreement with
faiss: recall_vs_faiss (|ours ∩ faiss| / k) and recall_vs_faiss_ties_excepted (a
faiss row we did not return counts as found when its float64 score, rounded to
float32, is not above our k-th score: a tie, or faiss's float32 rounding);
faiss_rows_better is the number of faiss rows strictly better than our k-th
(0 for an exact search); exact_vs_float64 checks --check_queries random queries
against a float64 brute force (indices and scores bit for bit).  The summary
adds an MP16 self-search (4.72 M x 4.72 M) projection on one H100 SXM at
--peak_tflops (989 dense bf16) x --mfu (0.4).

--plan prints `retrieval.search.plan_memory` (bytes per device of every
resident buffer) for the settings instead of searching.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from geotoken_jax.bench.common import MP16_IMAGES
from geotoken_jax.retrieval.search import plan_memory, search


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gallery", type=int, default=100_000, help="gallery rows")
  parser.add_argument("--queries", type=int, default=100_000)
  parser.add_argument("--dims", default="256,768", help="comma-separated embedding widths")
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--margin", type=int, default=16, help="extra candidates for the fp32 rescoring")
  parser.add_argument("--chunk_rows", type=int, default=131072)
  parser.add_argument("--query_batch", type=int, default=1024)
  parser.add_argument("--max_resident_queries", type=int, default=65536,
                      help="queries on the devices at a time (0: all)")
  parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
  parser.add_argument("--prefilter", default="none,bfloat16",
                      help="comma-separated, for dtype float32: none, bfloat16 (certified, the float32 result)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best is kept")
  parser.add_argument("--check_queries", type=int, default=200, help="queries checked against float64")
  parser.add_argument("--faiss", dest="faiss", action="store_true", default=True,
                      help="time faiss IndexFlatIP and compare (default)")
  parser.add_argument("--no_faiss", dest="faiss", action="store_false")
  parser.add_argument("--plan", action="store_true", help="print the device memory plan instead of searching")
  parser.add_argument("--devices", type=int, default=0, help="--plan: devices the chunks are sharded over "
                      "(0: this machine's)")
  parser.add_argument("--query_dtype", default="float32", help="--plan: the queries' stored type")
  parser.add_argument("--gallery_dtype", default="float32", help="--plan: the gallery's stored type")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak for the projection")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed matmul FLOPs utilization")
  parser.add_argument("--seed", type=int, default=0)


def _normalized(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
  x = rng.standard_normal((rows, dims), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def _agreement(queries: np.ndarray, gallery: np.ndarray, ours: np.ndarray, our_scores: np.ndarray,
               theirs: np.ndarray) -> dict:
  """Recall of ours against faiss's lists, raw and with ties (or faiss's rounding) excepted."""
  k = theirs.shape[1]
  hits = excused = better = 0
  for i, (a, b) in enumerate(zip(ours, theirs)):
    missing = np.setdiff1d(b[b >= 0], a[a >= 0])
    hits += k - missing.size
    if missing.size:
      exact = (gallery[missing].astype(np.float64) @ queries[i].astype(np.float64)).astype(np.float32)
      kth = our_scores[i][a >= 0][-1] if (a >= 0).any() else -np.inf
      excused += int(np.sum(exact <= kth))
      better += int(np.sum(exact > kth))
  return {"recall_vs_faiss": hits / theirs.size, "recall_vs_faiss_ties_excepted": (hits + excused) / theirs.size,
          "faiss_rows_better": better}


def _exact_check(queries: np.ndarray, gallery: np.ndarray, found, k: int, sample: np.ndarray) -> float:
  """Fraction of the sampled queries whose (indices, scores) equal the float64 brute force."""
  if not sample.size:
    return float("nan")
  scores = (queries[sample].astype(np.float64) @ gallery.astype(np.float64).T).astype(np.float32)  # [n, G]
  order = np.lexsort((np.broadcast_to(np.arange(gallery.shape[0]), scores.shape), -scores.astype(np.float64)),
                     axis=-1)[:, :k]
  same = (found.indices[sample] == order).all(axis=1) & (
      found.scores[sample] == np.take_along_axis(scores, order, axis=1)).all(axis=1)
  return float(same.mean())


def _timed(fn, repeats: int, cpu: list[float], wall: list[float]):
  out = None
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return out


def _plan(args: argparse.Namespace, dims: list[int], dtypes: list[str]) -> dict:
  devices = args.devices or jax.device_count()
  plans = [plan_memory(
      args.queries, args.gallery, d, k=args.k, margin=args.margin, chunk_rows=args.chunk_rows,
      query_batch=args.query_batch, dtype=dtype, devices=devices,
      max_resident_queries=args.max_resident_queries or None, query_dtype=args.query_dtype,
      gallery_dtype=args.gallery_dtype) for d in dims for dtype in dtypes]
  return {"bench": "search", "plan": True, "plans": plans}


def run(args: argparse.Namespace) -> dict:
  dims = [int(d) for d in args.dims.split(",") if d]
  dtypes = [d for d in args.dtype.split(",") if d]
  if args.plan:
    return _plan(args, dims, dtypes)
  prefilters = [None if p == "none" else p for p in args.prefilter.split(",") if p]
  if args.faiss:
    import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  flop_scale = 2.0 * args.queries * args.gallery
  results, projection = [], []
  for d in dims:
    queries, gallery = _normalized(rng, args.queries, d), _normalized(rng, args.gallery, d)
    sample = np.sort(rng.choice(args.queries, min(args.check_queries, args.queries), replace=False))
    options = dict(chunk_rows=args.chunk_rows, query_batch=args.query_batch, margin=args.margin,
                   max_resident_queries=args.max_resident_queries or None)
    variants = [(dtype, p) for dtype in dtypes for p in (prefilters if dtype == "float32" else [None])]
    truth = None
    for dtype, prefilter in variants:
      # Warm-up: the same (query batch, chunk) shapes as the timed run, so its compile is reused.
      layout = plan_memory(args.queries, args.gallery, d, k=args.k, margin=args.margin, chunk_rows=args.chunk_rows,
                           query_batch=args.query_batch, dtype=dtype, devices=jax.local_device_count())["layout"]
      start = time.perf_counter()
      search(queries[:layout["query_batch"]], gallery[:layout["chunk_rows_read"]], args.k, dtype=dtype,
             prefilter=prefilter, **options)
      compile_s = time.perf_counter() - start
      ours_cpu, ours_wall, faiss_cpu, faiss_wall = [], [], [], []
      found = None
      for _ in range(args.repeats):  # back to back: ours, then faiss, repeated
        found = _timed(lambda: search(queries, gallery, args.k, dtype=dtype, prefilter=prefilter, **options),
                       1, ours_cpu, ours_wall)
        if args.faiss:
          def faiss_search():
            index = faiss.IndexFlatIP(d)
            index.add(gallery)
            return index.search(queries, args.k)
          _, truth = _timed(faiss_search, 1, faiss_cpu, faiss_wall)
      seconds = min(ours_wall)
      row = {"dims": d, "dtype": dtype, "prefilter": prefilter or "none", "queries": args.queries,
             "gallery": args.gallery, "k": args.k, "compile_s": compile_s, "search_s": seconds,
             "search_cpu_s": min(ours_cpu), "queries_per_s": args.queries / seconds,
             "gflops_per_s": flop_scale * d / seconds / 1e9,
             "fallback_queries": found.fallback_queries, "uncertified_queries": found.uncertified_queries,
             "exact_vs_float64": _exact_check(queries, gallery, found, args.k, sample),
             "checked_queries": int(sample.size), "repeats": args.repeats, "search_s_all": ours_wall}
      if args.faiss:
        faiss_seconds = min(faiss_wall)
        row.update({"faiss_s": faiss_seconds, "faiss_cpu_s": min(faiss_cpu),
                    "faiss_queries_per_s": args.queries / faiss_seconds,
                    "faiss_gflops_per_s": flop_scale * d / faiss_seconds / 1e9,
                    "speedup_vs_faiss": faiss_seconds / seconds,
                    "cpu_speedup_vs_faiss": min(faiss_cpu) / min(ours_cpu), "faiss_s_all": faiss_wall,
                    **_agreement(queries, gallery, found.indices, found.scores, truth)})
      print(json.dumps(row), flush=True)
      results.append(row)
    flop = 2.0 * MP16_IMAGES**2 * d
    projection.append({"dims": d, "mp16_self_search_tflop": flop / 1e12,
                       "mp16_minutes_one_h100_projected": flop / (args.peak_tflops * 1e12 * args.mfu) / 60,
                       "mp16_gallery_gb_bf16": MP16_IMAGES * d * 2 / 1e9})
  return {
      "bench": "search",
      "gallery": args.gallery,
      "queries": args.queries,
      "k": args.k,
      "margin": args.margin,
      "chunk_rows": args.chunk_rows,
      "query_batch": args.query_batch,
      "max_resident_queries": args.max_resident_queries,
      "jax": results,
      "mp16_images": MP16_IMAGES,
      "mp16_projection": projection,
      "projection": f"{args.peak_tflops:g} TFLOP/s peak x MFU {args.mfu:g}",
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
  }
