"""A labelled image folder (CSV + images) prepared on the fly, once, into a cache.

  prepared = prepare_folder("photos.csv", "photos/", "WORKDIR/cache/folders")
  TfdsSource(dataset_dir(prepared.data_dir, prepared.dataset), prepared.split, spec)

The folder is prepared with the `geo_csv` builder (the same validation and
rejection counts as `python -m geotoken_jax.data.prepare`) into
cache_root/<key>/, a TFDS data_dir.  The key is a SHA-256 over:
  - the CSV file's bytes,
  - every file under image_dir (recursively): its relative name ("/"-separated),
    size and mtime_ns, sorted by name,
  - the column options (id / lat / lon / country columns, swap_latlon), the
    token spec (level, group size), max_side and a format version.
So a second call with nothing changed reuses the cache without preparing, and
editing the CSV or adding, removing, replacing or touching an image makes a new
key.  `workers` does not change the result and is not in the key.

Atomic: the builder writes into a fresh temporary folder in cache_root
(".tmp-<key>-<random>"), which is renamed to <key> only once preparation and
its summary are complete; a folder that is not complete is never reused (an
interrupted run leaves at most a temporary folder, removed on the way out, or
by a later call once it is a day old).  When two processes race, the first
rename wins and the other's copy is discarded.

Paths: the CSV and image_dir are read locally (the readers use the OS); the
cache root goes through etils.epath.  The Im2GPS3k layout (IMG_ID, LAT, LON)
needs no column options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid

from etils import epath

from geotoken_jax.data import tfds_builders

DATASET = "geo_csv"
SPLIT = "test"
MARKER = "folder.json"  # written last inside the temporary folder, before the rename
_FORMAT_VERSION = 1  # bump when preparation changes what it writes
_STALE_TMP_SECONDS = 24 * 3600


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
  data_dir: str  # pass as data.data_dir (a TFDS data_dir)
  dataset: str  # "geo_csv"
  split: str  # the split holding the folder's images
  summary: dict  # the preparation summary: rows, written, rejected {reason: count}, ...
  key: str  # the cache key (the folder name under cache_root)
  reused: bool  # True when the cache already held it


def _image_listing(image_dir: str) -> list[tuple[str, int, int]]:
  """Sorted (relative name, size, mtime_ns) of every file under image_dir."""
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"image folder {image_dir} does not exist")
  out = []
  for root, dirs, files in os.walk(image_dir):
    dirs.sort()
    for name in files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out.append((os.path.relpath(path, image_dir).replace(os.sep, "/"), stat.st_size, stat.st_mtime_ns))
  out.sort()
  return out


def cache_key(csv_path: str, image_dir: str, options: dict) -> str:
  """The cache key of a CSV, an image folder and the preparation options (hex)."""
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"CSV {csv_path} does not exist")
  digest = hashlib.sha256()
  digest.update(f"geotoken folder cache v{_FORMAT_VERSION}\n".encode())
  with open(csv_path, "rb") as f:
    csv_digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
      csv_digest.update(block)
  digest.update(b"csv " + csv_digest.digest() + b"\n")
  listing = hashlib.sha256()
  for name, size, mtime_ns in _image_listing(image_dir):
    listing.update(json.dumps([name, size, mtime_ns]).encode() + b"\n")
  digest.update(b"images " + listing.digest() + b"\n")
  digest.update(b"options " + json.dumps(options, sort_keys=True).encode() + b"\n")
  return digest.hexdigest()[:32]


def _clean_stale(cache_root: epath.Path) -> None:
  now = time.time()
  for path in cache_root.glob(".tmp-*"):
    try:
      if now - path.stat().mtime > _STALE_TMP_SECONDS:
        path.rmtree()
    except OSError:
      pass  # another process removed it, or it is not ours to remove


def _load(final: epath.Path, key: str) -> PreparedFolder | None:
  marker = final / MARKER
  if not marker.exists():
    return None
  info = json.loads(marker.read_text())
  return PreparedFolder(data_dir=os.fspath(final), dataset=info["dataset"], split=info["split"],
                        summary=info["summary"], key=key, reused=True)


def prepare_folder(csv_path, image_dir, cache_root, *, id_column=None, lat_column=None, lon_column=None,
                   country_column=None, swap_latlon=False, level=20, group_size=2, workers=None,
                   max_side=0) -> PreparedFolder:
  """Prepares (or finds in the cache) a labelled folder; see the module docstring."""
  csv_path, image_dir = os.path.abspath(os.fspath(csv_path)), os.path.abspath(os.fspath(image_dir))
  options = {"id_column": id_column, "lat_column": lat_column, "lon_column": lon_column,
             "country_column": country_column, "swap_latlon": bool(swap_latlon), "level": int(level),
             "group_size": int(group_size), "max_side": int(max_side)}
  key = cache_key(csv_path, image_dir, options)
  root = epath.Path(cache_root)
  final = root / key
  found = _load(final, key)
  if found is not None:
    return found
  root.mkdir(parents=True, exist_ok=True)
  _clean_stale(root)
  tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    summaries = tfds_builders.prepare(
        DATASET, os.path.dirname(csv_path), os.fspath(tmp), csv_files={SPLIT: csv_path}, image_dir=image_dir,
        workers=workers, **options)
    summary = dict(summaries[SPLIT])
    # The summary names the folder it was written to: name the final one.
    written_dir = epath.Path(summary["data_dir"])
    relative = os.path.relpath(os.fspath(written_dir), os.fspath(tmp))
    summary["data_dir"] = os.fspath(final / relative)
    (written_dir / tfds_builders.SUMMARY_FILE.format(split=SPLIT)).write_text(json.dumps(summary, indent=1))
    (tmp / MARKER).write_text(json.dumps({
        "dataset": DATASET, "split": SPLIT, "summary": summary, "csv": csv_path, "image_dir": image_dir,
        "options": options}, indent=1))
    if final.exists():  # an incomplete leftover (no marker), or a process that won the race
      if _load(final, key) is None:
        final.rmtree()
    if not final.exists():
      try:
        tmp.rename(final)
      except OSError:
        if _load(final, key) is None:  # not a lost race: a real failure
          raise
  finally:
    if tmp.exists():
      tmp.rmtree()
  found = _load(final, key)
  if found is None:
    raise RuntimeError(f"{final} was not written")
  return dataclasses.replace(found, reused=False)
