"""Data preparation throughput: an MP16-Pro-like tar of Flickr-sized JPEGs through the mp16 builder.

  python -m geotoken_jax.bench prepare --images 2000 [--workers 0] [--size 500x375] [--max_side 0]

Builds (outside the timing) a CSV in MP16-Pro's columns and one uncompressed
tar of JPEGs cut from Blue Marble at MP16 photo locations (Flickr's "medium"
size, 500 px on the long side, about what MP16 holds), then times
`tfds_builders.prepare("mp16", ...)`: the tar index, reading, full decode for
validation (re-encoding only when --max_side asks to shrink), S2 tokens and
TFDS's ArrayRecord writer.  Reports images/s and the projection for MP16's
4,723,695 images at that rate.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

MP16_IMAGES = 4_723_695


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
  parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the JPEGs")
  parser.add_argument("--max_side", type=int, default=0, help="as prepare --max_side (0 = keep bytes)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", default=None, help="keep the fixture and output in this folder")


def build_fixture(root: str, n: int, width: int, height: int, seed: int) -> None:
  from geotoken_jax.data import earth  # pylint: disable=g-import-not-at-top

  lat, lon = earth.load_coordinates()
  rows = np.random.default_rng(seed).choice(lat.size, n, replace=False)
  side = max(width, height)
  with tarfile.open(os.path.join(root, "mp16_images.tar"), "w") as tar, \
      open(os.path.join(root, "MP16_Pro_places365.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "LAT", "LON", "city", "country"])
    for start in range(0, n, 64):
      chunk = rows[start:start + 64]
      crops = earth.crop_images(lat[chunk], lon[chunk], side)
      for row, crop in zip(chunk, crops):
        image_id = f"{row % 256:02x}/{row // 256 % 256:02x}/{row}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(crop[:height, :width]).save(buffer, format="JPEG", quality=90)
        info = tarfile.TarInfo(f"mp16/{image_id}")
        info.size = buffer.tell()
        buffer.seek(0)
        tar.addfile(info, buffer)
        writer.writerow([image_id, f"{lat[row]:.6f}", f"{lon[row]:.6f}", "", ""])


def run(args: argparse.Namespace) -> dict:
  from geotoken_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

  width, height = (int(v) for v in args.size.lower().split("x"))
  root = args.keep or tempfile.mkdtemp(prefix="prepare_bench_")
  manual, out = os.path.join(root, "manual"), os.path.join(root, "data")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(manual, exist_ok=True)
  start = time.perf_counter()
  build_fixture(manual, args.images, width, height, args.seed)
  fixture_seconds = time.perf_counter() - start
  tar_bytes = os.path.getsize(os.path.join(manual, "mp16_images.tar"))
  try:
    start = time.perf_counter()
    summary = tfds_builders.prepare("mp16", manual, out, workers=args.workers or None,
                                    max_side=args.max_side)["train"]
    seconds = time.perf_counter() - start
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  rate = summary["written"] / seconds
  return {
      "bench": "prepare",
      "images": args.images,
      "written": summary["written"],
      "rejected": summary["rejected_total"],
      "image_size": args.size,
      "mean_jpeg_kb": round(tar_bytes / args.images / 1024, 1),
      "workers": args.workers or os.cpu_count(),
      "max_side": args.max_side,
      "seconds": round(seconds, 3),
      "images_per_s": round(rate, 1),
      "projected_mp16_hours": round(MP16_IMAGES / rate / 3600, 2),
      "fixture_seconds": round(fixture_seconds, 2),
      "cpus": os.cpu_count(),
  }
