"""Exact top-k search throughput (retrieval.search) against faiss IndexFlatIP.

  python -m geotoken_jax.bench search --gallery 100000 --queries 100000 --dims 256,768
  python -m geotoken_jax.bench search --gallery 5000 --queries 2000 --no_faiss

Random L2-normalized float32 queries and gallery (seeded), one set per dimension.
For each dimension and dtype: the JAX search time (after a warm-up on a small
slice with the same query-batch and chunk shapes, so the compile is reported
separately), queries/s and achieved GFLOP/s (2·Q·G·D / s); faiss IndexFlatIP on
the same data (its default OpenMP threads): time, queries/s, and the recall of
the JAX top-k against faiss's.  Also projected: an MP16 self-search (4.72 M x
4.72 M) on one H100 SXM at --peak_tflops (989 dense bf16) x --mfu (0.4), and the
gallery's size in bfloat16.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from geotoken_jax.bench.common import MP16_IMAGES
from geotoken_jax.retrieval.search import search


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gallery", type=int, default=100_000, help="gallery rows")
  parser.add_argument("--queries", type=int, default=100_000)
  parser.add_argument("--dims", default="256,768", help="comma-separated embedding widths")
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--margin", type=int, default=16, help="extra candidates for the fp32 rescoring")
  parser.add_argument("--chunk_rows", type=int, default=32768)
  parser.add_argument("--query_batch", type=int, default=4096)
  parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
  parser.add_argument("--faiss", dest="faiss", action="store_true", default=True,
                      help="time faiss IndexFlatIP and compare (default)")
  parser.add_argument("--no_faiss", dest="faiss", action="store_false")
  parser.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator peak for the projection")
  parser.add_argument("--mfu", type=float, default=0.4, help="assumed matmul FLOPs utilization")
  parser.add_argument("--seed", type=int, default=0)


def _normalized(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
  x = rng.standard_normal((rows, dims), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean over queries of |found ∩ truth| / k."""
  hits = sum(len(np.intersect1d(a[a >= 0], b[b >= 0])) for a, b in zip(found, truth))
  return hits / truth.size


def run(args: argparse.Namespace) -> dict:
  dims = [int(d) for d in args.dims.split(",") if d]
  dtypes = [d for d in args.dtype.split(",") if d]
  if args.faiss:
    import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  flop_scale = 2.0 * args.queries * args.gallery
  results, faiss_results, projection = [], [], []
  for d in dims:
    queries, gallery = _normalized(rng, args.queries, d), _normalized(rng, args.gallery, d)
    options = dict(chunk_rows=args.chunk_rows, query_batch=args.query_batch, margin=args.margin)
    truth = None
    if args.faiss:
      index = faiss.IndexFlatIP(d)
      start = time.perf_counter()
      index.add(gallery)
      _, truth = index.search(queries, args.k)
      seconds = time.perf_counter() - start
      faiss_results.append({"dims": d, "seconds": seconds, "queries_per_s": args.queries / seconds,
                            "gflops_per_s": flop_scale * d / seconds / 1e9})
      del index
    for dtype in dtypes:
      # Warm-up: the same (query batch, chunk) shapes as the timed run, so its compile is reused.
      start = time.perf_counter()
      search(queries[:args.query_batch], gallery[:args.chunk_rows], args.k, dtype=dtype, **options)
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
      found = search(queries, gallery, args.k, dtype=dtype, **options)
      seconds = time.perf_counter() - start
      row = {"dims": d, "dtype": dtype, "compile_s": compile_s, "search_s": seconds,
             "queries_per_s": args.queries / seconds, "gflops_per_s": flop_scale * d / seconds / 1e9}
      if truth is not None:
        row["recall_vs_faiss"] = _recall(found.indices, truth)
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
      "jax": results,
      "faiss": faiss_results,
      "mp16_images": MP16_IMAGES,
      "mp16_projection": projection,
      "projection": f"{args.peak_tflops:g} TFLOP/s peak x MFU {args.mfu:g}",
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
  }
