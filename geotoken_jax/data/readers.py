"""Readers for the layouts geolocalization data arrives in: metadata tables and image stores.

Metadata (`Metadata`: ids, latitudes, longitudes and extra text columns, in
file order, nothing dropped; validation happens in `prepare`):
  read_csv          IMG_ID,LAT,LON[,extra...] (column names configurable): Im2GPS3k,
                    YFCC4k, MP16 / MP16-Pro, OSV-5M (id,latitude,longitude,country,...)
  read_yfcc_info    YFCC100M metadata `info.txt` (tab-separated; column 1 photo id,
                    12 longitude, 13 latitude, counting from 1)

Image stores (`get(id) -> bytes | None`, None = missing; picklable, so worker
processes can read in parallel):
  FolderImages      a folder: ROOT/ID, or ROOT/ID.jpg / .jpeg / .png
  TarImages         members of one uncompressed tar (MP16-Pro's ~370 GB archive),
                    read with pread at offsets from an index of member offsets that
                    is built once (one pass over the headers) and cached as .npz
  ZipShardImages    OSV-5M's images/SPLIT/NN.zip shards holding ID.jpg

Old Im2GPS3k CSVs have their LAT and LON headers swapped.  read_csv refuses a
file whose LAT column holds values beyond +-90 (in at least 1% of its rows)
while every LON value fits in +-90, unless swap_latlon=True says to read them
the other way round.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import tarfile
import threading
import zipfile

import numpy as np

_SWAP_MIN_FRACTION = 0.01


@dataclasses.dataclass
class Metadata:
  ids: np.ndarray  # [N] str
  lat: np.ndarray  # [N] float64, NaN where unparsable
  lon: np.ndarray  # [N] float64
  extras: dict[str, np.ndarray]  # column -> [N] str
  path: str

  def __len__(self) -> int:
    return int(self.ids.size)


def _to_float(values: list[str]) -> np.ndarray:
  out = np.full(len(values), np.nan)
  for i, v in enumerate(values):
    try:
      out[i] = float(v)
    except (TypeError, ValueError):
      pass  # unparsable: NaN, rejected later as bad_coordinates
  return out


def check_swapped(lat: np.ndarray, lon: np.ndarray, path: str, *, lat_name: str = "LAT",
                  lon_name: str = "LON") -> None:
  """Raises if the latitude column looks like longitudes and vice versa."""
  finite = np.isfinite(lat) & np.isfinite(lon)
  beyond = int((np.abs(lat[finite]) > 90).sum())
  if beyond and beyond >= _SWAP_MIN_FRACTION * finite.sum() and not (np.abs(lon[finite]) > 90).any():
    raise ValueError(
        f"{path}: the {lat_name} and {lon_name} columns look swapped: {beyond} of {int(finite.sum())} "
        f"{lat_name} values are beyond +-90 while every {lon_name} value is within +-90 (old Im2GPS3k "
        f"CSVs have these headers swapped). Pass swap_latlon=True (--swap_latlon) to read "
        f"{lat_name} as longitude and {lon_name} as latitude.")


def read_csv(path: str, *, id_column: str = "IMG_ID", lat_column: str = "LAT", lon_column: str = "LON",
             swap_latlon: bool = False, delimiter: str = ",") -> Metadata:
  """All rows of a metadata CSV; every other column is kept as an extra (text)."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
      raise ValueError(f"{path} is empty: expected a header with {id_column}, {lat_column}, {lon_column}")
    header = [h.strip() for h in header]
    missing = [c for c in (id_column, lat_column, lon_column) if c not in header]
    if missing:
      raise ValueError(f"{path} has no column(s) {missing}; its columns are {header}. "
                       "Name them with id_column / lat_column / lon_column.")
    rows = [row for row in reader if row and any(cell.strip() for cell in row)]
  if not rows:
    raise ValueError(f"{path} has a header but no rows")
  columns = {name: [row[i].strip() if i < len(row) else "" for row in rows] for i, name in enumerate(header)}
  lat, lon = _to_float(columns[lat_column]), _to_float(columns[lon_column])
  if swap_latlon:
    lat, lon = lon, lat
  else:
    check_swapped(lat, lon, path, lat_name=lat_column, lon_name=lon_column)
  extras = {name: np.asarray(values, dtype=object) for name, values in columns.items()
            if name not in (id_column, lat_column, lon_column)}
  return Metadata(np.asarray(columns[id_column], dtype=object), lat, lon, extras, path)


# YFCC100M dataset file columns (1-based in the reference notes): 1 photo id, 12 lon, 13 lat.
_YFCC_ID, _YFCC_LON, _YFCC_LAT = 0, 11, 12


def read_yfcc_info(path: str, *, swap_latlon: bool = False) -> Metadata:
  """YFCC100M-style `info.txt`: tab-separated, no header."""
  ids, lats, lons = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      cells = line.rstrip("\n").split("\t")
      ids.append(cells[_YFCC_ID].strip())
      lons.append(cells[_YFCC_LON] if len(cells) > _YFCC_LON else "")
      lats.append(cells[_YFCC_LAT] if len(cells) > _YFCC_LAT else "")
  if not ids:
    raise ValueError(f"{path} has no rows")
  lat, lon = _to_float(lats), _to_float(lons)
  if swap_latlon:
    lat, lon = lon, lat
  else:
    check_swapped(lat, lon, path, lat_name="latitude (column 13)", lon_name="longitude (column 12)")
  return Metadata(np.asarray(ids, dtype=object), lat, lon, {}, path)


# ----------------------------------------------------------------------------
# Image stores.


class FolderImages:
  """Images in a folder tree: ROOT/ID, else ROOT/ID + one of the extensions."""

  EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root} does not exist")
    self.root = root

  def get(self, image_id: str) -> bytes | None:
    base = os.path.join(self.root, image_id)
    for ext in self.EXTENSIONS:
      path = base + ext
      if os.path.isfile(path):
        with open(path, "rb") as f:
          return f.read()
    return None

  def __repr__(self) -> str:
    return f"FolderImages({self.root!r})"


class TarImages:
  """Members of an uncompressed tar, read by offset (no extraction, no pickle).

  An id is looked up as a member name relative to any ancestor folder of the
  members' common folder (or the tar's root).  The index (member names, data
  offsets, sizes; plus the tar's size and mtime to detect a changed file) is
  built on first use and cached as `index_path` (default: TAR.index.npz).
  """

  def __init__(self, tar_path: str, index_path: str | None = None):
    if not os.path.isfile(tar_path):
      raise FileNotFoundError(f"tar file {tar_path} does not exist")
    self.tar_path = tar_path
    self.index_path = index_path or tar_path + ".index.npz"
    self._lookup: dict[str, int] | None = None
    self._prefixes: tuple[str, ...] = ("",)
    self._offsets = self._sizes = None
    self._fd: dict[int, int] = {}

  def __getstate__(self):
    return {"tar_path": self.tar_path, "index_path": self.index_path}

  def __setstate__(self, state):
    self.__init__(state["tar_path"], state["index_path"])

  def build_index(self) -> str:
    """Scans the tar's headers once and writes the index; returns its path."""
    stat = os.stat(self.tar_path)
    names, offsets, sizes = [], [], []
    try:
      with tarfile.open(self.tar_path, mode="r:") as tar:  # "r:" refuses compressed tars
        for member in tar:
          if member.isfile():
            names.append(member.name)
            offsets.append(member.offset_data)
            sizes.append(member.size)
    except tarfile.ReadError as e:
      raise ValueError(f"{self.tar_path} is not an uncompressed tar ({e}); images must be "
                       "readable at offsets, so decompress it first") from None
    tmp = self.index_path + ".tmp.npz"
    np.savez(tmp, names=np.asarray(names, dtype=str),
             offsets=np.asarray(offsets, np.int64), sizes=np.asarray(sizes, np.int64),
             tar_size=np.int64(stat.st_size), tar_mtime=np.float64(stat.st_mtime))
    os.replace(tmp, self.index_path)
    return self.index_path

  def _load(self) -> None:
    stat = os.stat(self.tar_path)
    fresh = False
    if os.path.exists(self.index_path):
      with np.load(self.index_path) as index:
        fresh = int(index["tar_size"]) == stat.st_size and float(index["tar_mtime"]) == stat.st_mtime
    if not fresh:
      self.build_index()
    with np.load(self.index_path) as index:
      names = index["names"]
      self._offsets, self._sizes = index["offsets"], index["sizes"]
    self._lookup = {str(n): i for i, n in enumerate(names)}
    # Ids are relative to some folder of the tar (MP16-Pro: its top folder;
    # a subset tar may nest deeper): try the id under every ancestor of the
    # members' common folder, deepest first, then as given.
    common = os.path.commonpath(list({os.path.dirname(n) for n in self._lookup})) if self._lookup else ""
    prefixes = []
    while common:
      prefixes.append(common + "/")
      common = os.path.dirname(common)
    self._prefixes = tuple(prefixes) + ("",)

  def __len__(self) -> int:
    if self._lookup is None:
      self._load()
    return len(self._lookup)

  def get(self, image_id: str) -> bytes | None:
    if self._lookup is None:
      self._load()
    i = next((self._lookup[p + image_id] for p in self._prefixes if p + image_id in self._lookup), None)
    if i is None:
      return None
    pid = os.getpid()  # one descriptor per process; pread needs no seek, so threads share it
    fd = self._fd.get(pid)
    if fd is None:
      fd = self._fd[pid] = os.open(self.tar_path, os.O_RDONLY)
    return os.pread(fd, int(self._sizes[i]), int(self._offsets[i]))

  def __repr__(self) -> str:
    return f"TarImages({self.tar_path!r})"


class ZipShardImages:
  """OSV-5M: ID.jpg members of the zip shards in a folder (images/SPLIT/*.zip)."""

  def __init__(self, root: str, pattern: str = "*.zip"):
    self.root = root
    self.paths = sorted(glob.glob(os.path.join(root, pattern)))
    if not self.paths:
      raise FileNotFoundError(f"no zip shards matching {pattern} in {root}")
    self._lookup: dict[str, tuple[int, str]] | None = None
    self._local = threading.local()

  def __getstate__(self):
    return {"root": self.root, "paths": self.paths}

  def __setstate__(self, state):
    self.root, self.paths = state["root"], state["paths"]
    self._lookup, self._local = None, threading.local()

  def _load(self) -> None:
    lookup = {}
    for shard, path in enumerate(self.paths):
      with zipfile.ZipFile(path) as z:
        for name in z.namelist():
          if not name.endswith("/"):
            lookup.setdefault(os.path.splitext(os.path.basename(name))[0], (shard, name))
    self._lookup = lookup

  def get(self, image_id: str) -> bytes | None:
    if self._lookup is None:
      self._load()
    found = self._lookup.get(os.path.splitext(image_id)[0])
    if found is None:
      return None
    shard, name = found
    handles = getattr(self._local, "handles", None)
    if handles is None or getattr(self._local, "pid", None) != os.getpid():
      handles = self._local.handles = {}
      self._local.pid = os.getpid()
    if shard not in handles:
      handles[shard] = zipfile.ZipFile(self.paths[shard])
    return handles[shard].read(name)

  def __repr__(self) -> str:
    return f"ZipShardImages({self.root!r}, {len(self.paths)} shards)"
