"""S2 encode throughput against the per-point loops of s2geometry and s2sphere.

Points are drawn uniformly on the sphere.  Ours is timed on all n points (best
of --repeats); the per-point Python loops -- what the reference's precompute
script does -- are timed on a subset, and s2geometry's cell ids for *all*
checked points are compared with ours.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from geotoken_jax import s2


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--n", type=int, default=1_000_000, help="points to encode")
  parser.add_argument("--level", type=int, default=20)
  parser.add_argument("--group", type=int, default=2)
  parser.add_argument("--threads", type=int, default=0, help="encoder threads (0: all cores)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loop_n", type=int, default=100_000,
                      help="points for timing the s2geometry / s2sphere per-point loops")
  parser.add_argument("--check_n", type=int, default=-1,
                      help="points compared with s2geometry (-1: all n)")
  parser.add_argument("--seed", type=int, default=0)


def uniform_sphere_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
  lng = rng.uniform(-180.0, 180.0, n)
  return lat, lng


def _best_seconds(fn, repeats: int) -> float:
  fn()  # warm up: page-in, thread pool start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def s2geometry_cell_ids(lat: np.ndarray, lng: np.ndarray, level: int) -> np.ndarray:
  import s2geometry  # pylint: disable=g-import-not-at-top

  cell_id, from_degrees = s2geometry.S2CellId, s2geometry.S2LatLng.FromDegrees
  return np.array([cell_id(from_degrees(a, b)).parent(level).id()
                   for a, b in zip(lat.tolist(), lng.tolist())], np.uint64)


def s2sphere_cell_ids(lat: np.ndarray, lng: np.ndarray, level: int) -> np.ndarray:
  import s2sphere  # pylint: disable=g-import-not-at-top

  from_lat_lng, from_degrees = s2sphere.CellId.from_lat_lng, s2sphere.LatLng.from_degrees
  return np.array([from_lat_lng(from_degrees(a, b)).parent(level).id()
                   for a, b in zip(lat.tolist(), lng.tolist())], np.uint64)


def run(args: argparse.Namespace) -> dict:
  spec = s2.TokenSpec(args.level, args.group)
  threads = args.threads or os.cpu_count() or 1
  lat, lng = uniform_sphere_points(args.n, args.seed)

  encode_s = _best_seconds(lambda: s2.latlng_to_cell_ids(lat, lng, spec.level, num_threads=threads),
                           args.repeats)
  encode_1thread_s = _best_seconds(
      lambda: s2.latlng_to_cell_ids(lat, lng, spec.level, num_threads=1), args.repeats)
  tokens_s = _best_seconds(lambda: s2.latlng_to_tokens(lat, lng, spec, num_threads=threads),
                           args.repeats)
  tokens = s2.latlng_to_tokens(lat, lng, spec, num_threads=threads)
  decode_s = _best_seconds(lambda: s2.tokens_to_latlng(tokens, spec), args.repeats)

  loop_n = min(args.loop_n, args.n)
  start = time.perf_counter()
  s2geometry_cell_ids(lat[:loop_n], lng[:loop_n], spec.level)
  s2geometry_s = (time.perf_counter() - start) / loop_n
  start = time.perf_counter()
  s2sphere_ids = s2sphere_cell_ids(lat[:loop_n], lng[:loop_n], spec.level)
  s2sphere_s = (time.perf_counter() - start) / loop_n

  ours = s2.latlng_to_cell_ids(lat, lng, spec.level, num_threads=threads)
  check_n = args.n if args.check_n < 0 else min(args.check_n, args.n)
  oracle = s2geometry_cell_ids(lat[:check_n], lng[:check_n], spec.level)
  encode_rate = args.n / encode_s
  return {
      "bench": "s2",
      "n": args.n,
      "level": spec.level,
      "group": spec.group_size,
      "threads": threads,
      "encode_points_per_s": round(encode_rate),
      "encode_points_per_s_1_thread": round(args.n / encode_1thread_s),
      "tokens_points_per_s": round(args.n / tokens_s),
      "decode_centres_points_per_s": round(args.n / decode_s),
      "s2geometry_loop_points_per_s": round(1 / s2geometry_s),
      "s2sphere_loop_points_per_s": round(1 / s2sphere_s),
      "loop_points": loop_n,
      "speedup_vs_s2geometry": round(encode_rate * s2geometry_s, 1),
      "speedup_vs_s2sphere": round(encode_rate * s2sphere_s, 1),
      "checked_points": check_n,
      "mismatches_vs_s2geometry": int((ours[:check_n] != oracle).sum()),
      "mismatches_vs_s2sphere": int((ours[:loop_n] != s2sphere_ids).sum()),
  }
