"""TFDS builders for the standard geolocalization data sets, writing ArrayRecord.

The TFDS `manual_dir` convention: the user downloads, the builder prepares.
Every record carries:
  image      RGB image bytes: an RGB JPEG or RGB PNG is kept byte for byte (so a
             lossless PNG stays lossless), anything else is converted:
             grayscale, CMYK, palette, alpha -> RGB JPEG
  latitude, longitude   float64 degrees
  tokens     int32 [P] S2 tokens (level / group size of the builder, default 20 / 2)
  id         the image id as in the metadata
  country    ISO-2 code when the metadata has one, else ""
  metadata   JSON text of the remaining metadata columns

Builders and the layout each expects in manual_dir (file names overridable):
  mp16       MP16_Pro_places365.csv (or MP16_Pro_filtered.csv, mp16_places365.csv)
             and the images as one uncompressed .tar (MP16-Pro) or a folder
             `images/`; split train
  im2gps3k   im2gps3k_places365.csv and the folder im2gps3ktest/ (or images/); split test
  yfcc4k     yfcc4k_places365.csv or info.txt (YFCC100M) and yfcc4k/ (or images/); split test
  osv5m      train.csv / test.csv (id, latitude, longitude, country, ...) and
             images/train/*.zip, images/test/*.zip; splits train, test
  geo_csv    any CSV + image folder: csv_files={split: file}, image_dir, column names

Validation: each row is written or rejected for exactly one reason, checked in
this order: duplicate_id (the first occurrence is kept, and decides: if it is
rejected for another reason, its repeats are still duplicates), bad_coordinates (NaN,
unparsable, |lat| > 90, |lon| > 180), missing_image, undecodable_image.  The
counts (and the first ids per reason) go to a JSON summary per split, next to
the prepared data.  Reading, decoding and re-encoding run in a process pool
over chunks of rows (`workers`, default: all cores) feeding TFDS's writer;
TensorFlow is not needed.

Sidecar index.  Next to each split's summary, `index_SPLIT.npz` (plain .npy
arrays in a zip, loadable with allow_pickle=False) holds one row per record,
in record order (records are written with disable_shuffling, so record order
is metadata order minus the rejected rows):
  tokens     int32 [N, P]   the stored tokens (the builder's level / group size,
                            also saved as the scalars token_level, token_group_size)
  latlng     float64 [N, 2] exact degrees
  id_hash    uint64 [N]     id_hash(id): the first 8 bytes of blake2b(id as UTF-8,
                            digest_size=8) read as a little-endian integer
  photo_id   int64 [N]      the Flickr photo id in the id (photo_ids), -1 if none
It lets training read every record's tokens (the decoding trie), hold out a
validation slice and filter test-set leaks without reading a single record.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from geotoken_jax import s2
from geotoken_jax.data import images as images_lib
from geotoken_jax.data import readers

REASONS = ("missing_image", "undecodable_image", "bad_coordinates", "duplicate_id")
EXAMPLE_IDS_PER_REASON = 10
SUMMARY_FILE = "prepare_summary_{split}.json"
INDEX_FILE = "index_{split}.npz"
INDEX_KEYS = ("tokens", "latlng", "id_hash", "photo_id")
_CHUNK = 256  # rows per worker task


class Report:
  """Counts of one split's preparation: rows read, written, rejected by reason."""

  def __init__(self, dataset: str, split: str):
    self.dataset, self.split = dataset, split
    self.rows = 0
    self.written = 0
    self.rejected = {r: 0 for r in REASONS}
    self.examples: dict[str, list[str]] = {r: [] for r in REASONS}
    self.start = time.perf_counter()
    self.seconds = 0.0
    self.index: dict[str, np.ndarray] | None = None  # the sidecar arrays, set when the split is done

  def reject(self, reason: str, image_id: str) -> None:
    self.rejected[reason] += 1
    if len(self.examples[reason]) < EXAMPLE_IDS_PER_REASON:
      self.examples[reason].append(str(image_id))

  def to_dict(self) -> dict[str, Any]:
    seconds = self.seconds or time.perf_counter() - self.start
    return {"dataset": self.dataset, "split": self.split, "rows": self.rows, "written": self.written,
            "rejected": dict(self.rejected), "rejected_total": sum(self.rejected.values()),
            "first_rejected_ids": {k: v for k, v in self.examples.items() if v},
            "seconds": round(seconds, 3), "rows_per_s": round(self.rows / max(seconds, 1e-9), 1)}


def row_checks(metadata: readers.Metadata) -> np.ndarray:
  """Per row: "" if it passes the metadata checks, else the reason (duplicate_id or bad_coordinates)."""
  reasons = np.full(len(metadata), "", dtype=object)
  _, first = np.unique(metadata.ids.astype(str), return_index=True)
  duplicate = np.ones(len(metadata), bool)
  duplicate[first] = False
  lat, lon = metadata.lat, metadata.lon
  bad = ~(np.isfinite(lat) & np.isfinite(lon)) | (np.abs(np.nan_to_num(lat)) > 90) | (np.abs(np.nan_to_num(lon)) > 180)
  reasons[bad] = "bad_coordinates"
  reasons[duplicate] = "duplicate_id"
  return reasons


# ----------------------------------------------------------------------------
# The sidecar index.

_MAX_INT64 = 2**63 - 1
# A Flickr file name starts with the photo id, alone or followed by "_":
#   MP16         3f/ab/1234567890.jpg   or   1234567890_0a1b2c3d4e.jpg
#   Im2GPS3k     1000130297_5c0d3f0b09_1079_26286893@N00.jpg  (id_secret_server_owner)
#   YFCC4k       1234567890.jpg, or info.txt's photo id column: 1234567890
_PHOTO_ID = re.compile(r"(\d+)(?:_|$)")


def id_hash(image_id: str) -> int:
  """A stable 64-bit hash of an id: blake2b(UTF-8 bytes, digest_size=8), little-endian."""
  return int.from_bytes(hashlib.blake2b(str(image_id).encode("utf-8"), digest_size=8).digest(), "little")


def id_hashes(ids) -> np.ndarray:
  """id_hash of each id, uint64 [N]."""
  return np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))


def photo_id(image_id: str) -> int:
  """The Flickr photo id an id names, else -1.

  The rule: take the file name (the part after the last "/" or "\\"), drop
  its extension (the last ".xxx"), and if what is left is digits alone or
  digits followed by "_" (Flickr's ID_SECRET[_SERVER_OWNER][_o] names), those
  leading digits are the photo id.  Anything else (letters first, a value
  beyond int64) gives -1.
  """
  name = re.split(r"[/\\]", str(image_id).strip())[-1]
  stem = os.path.splitext(name)[0]
  match = _PHOTO_ID.match(stem)
  if not match:
    return -1
  value = int(match.group(1))
  return value if value <= _MAX_INT64 else -1


def photo_ids(ids) -> np.ndarray:
  """photo_id of each id, int64 [N]."""
  return np.fromiter((photo_id(i) for i in ids), dtype=np.int64, count=len(ids))


def make_index(ids, lat, lon, tokens, *, flickr_ids: bool = True) -> dict[str, np.ndarray]:
  """The sidecar arrays of records with these ids, coordinates and tokens (in record order)."""
  n = len(ids)
  tokens = np.asarray(tokens, np.int32)
  return {
      "tokens": tokens.reshape(n, tokens.shape[-1] if tokens.ndim == 2 else 0),
      "latlng": np.stack([np.asarray(lat, np.float64), np.asarray(lon, np.float64)], axis=-1).reshape(n, 2),
      "id_hash": id_hashes(ids),
      "photo_id": photo_ids(ids) if flickr_ids else np.full(n, -1, np.int64),
  }


def index_path(dataset_dir: str, split: str) -> epath.Path:
  return epath.Path(dataset_dir) / INDEX_FILE.format(split=split)


def write_index(dataset_dir: str, split: str, index: Mapping[str, np.ndarray], spec: s2.TokenSpec) -> str:
  """Writes index_SPLIT.npz atomically (a temporary file renamed); returns its path."""
  missing = [k for k in INDEX_KEYS if k not in index]
  if missing:
    raise ValueError(f"index of {split!r} lacks {missing}")
  n = len(index["id_hash"])
  if any(len(index[k]) != n for k in INDEX_KEYS):
    raise ValueError(f"index of {split!r}: arrays of different lengths {[len(index[k]) for k in INDEX_KEYS]}")
  buffer = io.BytesIO()
  np.savez(buffer, tokens=np.asarray(index["tokens"], np.int32), latlng=np.asarray(index["latlng"], np.float64),
           id_hash=np.asarray(index["id_hash"], np.uint64), photo_id=np.asarray(index["photo_id"], np.int64),
           token_level=np.int64(spec.level), token_group_size=np.int64(spec.group_size))
  path = index_path(dataset_dir, split)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # atomic on a local disk: a reader sees the old file or the new one
  return os.fspath(path)


def load_index(dataset_dir: str, split: str) -> tuple[dict[str, np.ndarray], s2.TokenSpec] | None:
  """(the sidecar arrays, the TokenSpec of its tokens) of a split, or None if it has no sidecar."""
  path = index_path(dataset_dir, split)
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in INDEX_KEYS}
    spec = s2.TokenSpec(int(npz["token_level"]), int(npz["token_group_size"]))
  for array in arrays.values():
    array.flags.writeable = False  # shared by every caller
  return arrays, spec


def index_from_records(data_source, *, flickr_ids: bool = True, chunk: int = 4096) -> dict[str, np.ndarray]:
  """The sidecar arrays recomputed by reading every record (data prepared before sidecars)."""
  ids, lat, lon, tokens = [], [], [], []
  for start in range(0, len(data_source), chunk):
    for record in data_source.__getitems__(list(range(start, min(start + chunk, len(data_source))))):
      ids.append(record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"]))
      lat.append(float(record["latitude"]))
      lon.append(float(record["longitude"]))
      tokens.append(np.asarray(record["tokens"], np.int32))
  width = tokens[0].shape[-1] if tokens else 0
  return make_index(ids, lat, lon, np.stack(tokens) if tokens else np.zeros((0, width), np.int32),
                    flickr_ids=flickr_ids)


# Worker-process state, set once per worker by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(store, max_side: int) -> None:
  _WORKER["store"], _WORKER["max_side"] = store, max_side


def _load_chunk(ids: list[str]) -> list[tuple[str, bytes | None, str]]:
  """(reason or "", jpeg bytes or None, detail) for each id, in a worker."""
  store, max_side = _WORKER["store"], _WORKER["max_side"]
  out = []
  for image_id in ids:
    data = store.get(image_id)
    if data is None:
      out.append(("missing_image", None, ""))
      continue
    try:
      jpeg, _, _ = images_lib.normalize_image(data, max_side=max_side)
    except images_lib.UndecodableImage as e:
      out.append(("undecodable_image", None, str(e)))
      continue
    out.append(("", jpeg, ""))
  return out


def generate_examples(metadata: readers.Metadata, store, spec: s2.TokenSpec, report: Report, *,
                      workers: int | None = None, max_side: int = 0, country_column: str | None = None,
                      flickr_ids: bool = True) -> Iterator[tuple[str, dict]]:
  """Validated examples in metadata order; fills `report` (and, once the last
  example is out, report.index: the sidecar arrays of the written rows).  Keys
  are row numbers."""
  reasons = row_checks(metadata)
  report.rows = len(metadata)
  ok = reasons == ""
  tokens = np.zeros((len(metadata), spec.num_positions), np.int32)
  if ok.any():
    tokens[ok] = s2.latlng_to_tokens(metadata.lat[ok], metadata.lon[ok], spec)
  for i in np.flatnonzero(~ok):
    report.reject(reasons[i], metadata.ids[i])
  rows = np.flatnonzero(ok)
  chunks = [rows[i:i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
  extra_names = [n for n in metadata.extras if n != country_column]
  workers = workers or os.cpu_count() or 1

  def results():
    if workers == 1:
      _init_worker(store, max_side)
      for chunk in chunks:
        yield chunk, _load_chunk([str(metadata.ids[i]) for i in chunk])
      return
    context = multiprocessing.get_context("spawn")  # no fork after JAX / TFDS threads started
    with context.Pool(workers, initializer=_init_worker, initargs=(store, max_side)) as pool:
      loaded = pool.imap(_load_chunk, ([str(metadata.ids[i]) for i in chunk] for chunk in chunks))
      for chunk, out in zip(chunks, loaded):
        yield chunk, out

  written_rows = []
  for chunk, out in results():
    for i, (reason, jpeg, _) in zip(chunk, out):
      image_id = str(metadata.ids[i])
      if reason:
        report.reject(reason, image_id)
        continue
      report.written += 1
      written_rows.append(i)
      country = str(metadata.extras[country_column][i]) if country_column else ""
      yield f"{i:010d}", {
          "image": jpeg, "latitude": float(metadata.lat[i]), "longitude": float(metadata.lon[i]),
          "tokens": tokens[i], "id": image_id, "country": country.upper(),
          "metadata": json.dumps({n: str(metadata.extras[n][i]) for n in extra_names}, ensure_ascii=False),
      }
  written_rows = np.asarray(written_rows, np.int64)
  report.index = make_index([str(metadata.ids[i]) for i in written_rows], metadata.lat[written_rows],
                            metadata.lon[written_rows], tokens[written_rows], flickr_ids=flickr_ids)
  report.seconds = time.perf_counter() - report.start


# ----------------------------------------------------------------------------
# Builders.


def _first_existing(root: str, names) -> str | None:
  for name in names:
    path = os.path.join(root, name)
    if os.path.exists(path):
      return path
  return None


class GeoBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared features, options and split generation; subclasses describe a layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  COUNTRY_COLUMN: str | None = None
  ID_COLUMN, LAT_COLUMN, LON_COLUMN = "IMG_ID", "LAT", "LON"
  # Whether ids name Flickr photos (the sidecar's photo_id; see photo_id()).
  FLICKR_IDS = True

  def __init__(self, *, swap_latlon: bool = False, workers: int | None = None, max_side: int = 0,
               level: int = 20, group_size: int = 2, csv_files: Mapping[str, str] | None = None,
               image_dir: str | None = None, id_column: str | None = None, lat_column: str | None = None,
               lon_column: str | None = None, country_column: str | None = None, **kwargs):
    self.swap_latlon = swap_latlon
    self.workers = workers
    self.max_side = max_side
    self.spec = s2.TokenSpec(level, group_size)
    self.csv_files = dict(csv_files or {})
    self.image_dir = image_dir
    self.id_column = id_column or self.ID_COLUMN
    self.lat_column = lat_column or self.LAT_COLUMN
    self.lon_column = lon_column or self.LON_COLUMN
    self.country_column = country_column or self.COUNTRY_COLUMN
    self.reports: dict[str, Report] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            # Raw bytes: tf.train.Example keeps floats as float32, which would round the degrees.
            "latitude": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
            "longitude": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
            "tokens": tfds.features.Tensor(shape=(self.spec.num_positions,), dtype=np.int32),
            "id": tfds.features.Text(),
            "country": tfds.features.Text(),
            "metadata": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict({"token_level": self.spec.level,
                                         "token_group_size": self.spec.group_size}),
        disable_shuffling=True,  # records in metadata order; training shuffles in grain
    )

  # Subclasses: {split: (metadata, image store)} from the manual_dir.
  def layout(self, manual_dir: str) -> dict[str, tuple[readers.Metadata, Any]]:
    raise NotImplementedError

  def read_csv(self, path: str) -> readers.Metadata:
    return readers.read_csv(path, id_column=self.id_column, lat_column=self.lat_column,
                            lon_column=self.lon_column, swap_latlon=self.swap_latlon)

  def _csv(self, manual_dir: str, split: str, defaults) -> str:
    names = [self.csv_files[split]] if split in self.csv_files else list(defaults)
    path = _first_existing(manual_dir, names)
    if path is None:
      raise FileNotFoundError(f"{self.name}: none of {names} in {manual_dir}")
    return path

  def _folder(self, manual_dir: str, defaults) -> readers.FolderImages:
    names = [self.image_dir] if self.image_dir else list(defaults)
    path = _first_existing(manual_dir, names)
    if path is None:
      raise FileNotFoundError(f"{self.name}: no image folder {names} in {manual_dir}")
    return readers.FolderImages(path)

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(split, metadata, store)
            for split, (metadata, store) in self.layout(manual_dir).items()}

  def _generate_examples(self, split, metadata, store):
    report = self.reports[split] = Report(self.name, split)
    yield from generate_examples(metadata, store, self.spec, report, workers=self.workers,
                                 max_side=self.max_side, country_column=self.country_column
                                 if self.country_column in metadata.extras else None,
                                 flickr_ids=self.FLICKR_IDS)


class Mp16(GeoBuilder):
  """MP16 / MP16-Pro: 4.7 M Flickr photos (YFCC100M subset) with place-name columns."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put MP16_Pro_places365.csv (or MP16_Pro_filtered.csv) and the images "
                                  "(one uncompressed .tar, or a folder images/) in manual_dir.")
  COUNTRY_COLUMN = None  # MP16-Pro's country column holds names, not ISO codes: kept in metadata

  def layout(self, manual_dir):
    metadata = self.read_csv(self._csv(manual_dir, "train", ("MP16_Pro_places365.csv",
                                                             "MP16_Pro_filtered.csv", "mp16_places365.csv")))
    if self.image_dir:
      store = (readers.TarImages(os.path.join(manual_dir, self.image_dir))
               if self.image_dir.endswith(".tar") else self._folder(manual_dir, ()))
    else:
      tars = sorted(p for p in os.listdir(manual_dir) if p.endswith(".tar"))
      store = (readers.TarImages(os.path.join(manual_dir, tars[0])) if tars
               else self._folder(manual_dir, ("images", "mp16")))
    return {"train": (metadata, store)}


class Im2gps3k(GeoBuilder):
  """Im2GPS3k: 2,997 labelled test photos."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put im2gps3k_places365.csv and the folder im2gps3ktest/ in manual_dir."

  def layout(self, manual_dir):
    metadata = self.read_csv(self._csv(manual_dir, "test", ("im2gps3k_places365.csv",)))
    return {"test": (metadata, self._folder(manual_dir, ("im2gps3ktest", "images")))}


class Yfcc4k(GeoBuilder):
  """YFCC4k: 4,536 test photos."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put yfcc4k_places365.csv (or YFCC100M's info.txt) and the folder "
                                  "yfcc4k/ in manual_dir.")

  def layout(self, manual_dir):
    csv_path = _first_existing(manual_dir, [self.csv_files["test"]] if "test" in self.csv_files
                               else ["yfcc4k_places365.csv", "info.txt"])
    if csv_path is None:
      raise FileNotFoundError(f"yfcc4k: no yfcc4k_places365.csv or info.txt in {manual_dir}")
    metadata = (readers.read_yfcc_info(csv_path, swap_latlon=self.swap_latlon)
                if csv_path.endswith(".txt") else self.read_csv(csv_path))
    return {"test": (metadata, self._folder(manual_dir, ("yfcc4k", "images")))}


class Osv5m(GeoBuilder):
  """OSV-5M: street-view images in zip shards, with country / region / city columns."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train.csv, test.csv and images/{train,test}/*.zip in manual_dir."
  ID_COLUMN, LAT_COLUMN, LON_COLUMN = "id", "latitude", "longitude"
  COUNTRY_COLUMN = "country"
  FLICKR_IDS = False  # OSV-5M ids are Mapillary image ids: numeric, but not Flickr photo ids

  def layout(self, manual_dir):
    out = {}
    for split in ("train", "test"):
      path = _first_existing(manual_dir, [self.csv_files.get(split, f"{split}.csv")])
      if path is None:
        continue
      out[split] = (self.read_csv(path), readers.ZipShardImages(os.path.join(manual_dir, "images", split)))
    if not out:
      raise FileNotFoundError(f"osv5m: no train.csv or test.csv in {manual_dir}")
    return out


class GeoCsv(GeoBuilder):
  """Any CSV (id, latitude, longitude, extra columns) with an image folder."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass csv_files={split: file} and image_dir, relative to manual_dir."

  def layout(self, manual_dir):
    if not self.csv_files or not self.image_dir:
      raise ValueError("geo_csv needs csv_files={split: file} and image_dir")
    store = self._folder(manual_dir, ())
    return {split: (self.read_csv(os.path.join(manual_dir, name)), store)
            for split, name in self.csv_files.items()}


BUILDERS = {"mp16": Mp16, "im2gps3k": Im2gps3k, "yfcc4k": Yfcc4k, "osv5m": Osv5m, "geo_csv": GeoCsv}


def prepare(dataset: str, manual_dir: str, data_dir: str, **options) -> dict[str, dict]:
  """Prepares a data set; returns (and writes next to the data) one summary per split.

  Next to each summary goes the split's sidecar index (INDEX_FILE, see the
  module docstring).  A data set prepared before sidecars existed gets them
  now, from its records.

  With workers > 1 the images are read in spawned processes, which re-import
  the caller's main module: a script calling this must keep its entry point
  under `if __name__ == "__main__":` (the prepare CLI does).
  """
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(BUILDERS)}")
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir {manual_dir} does not exist")
  builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record", **options)
  out_dir = os.fspath(builder.data_dir)
  if builder.is_prepared():  # TFDS would skip it: report what the earlier run wrote
    summaries = load_summaries(out_dir)
    for split in builder.info.splits:
      if load_index(out_dir, split) is None:
        source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        write_index(out_dir, split, index_from_records(source, flickr_ids=builder.FLICKR_IDS), builder.spec)
    return summaries
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  summaries = {}
  for split, report in builder.reports.items():
    summary = report.to_dict()
    summary["data_dir"] = out_dir
    recorded = builder.info.splits[split].num_examples
    if report.index is None or len(report.index["id_hash"]) != report.written or recorded != report.written:
      raise RuntimeError(f"{dataset} {split}: {report.written} rows written, {recorded} records, sidecar of "
                         f"{None if report.index is None else len(report.index['id_hash'])} rows")
    write_index(out_dir, split, report.index, builder.spec)
    (epath.Path(out_dir) / SUMMARY_FILE.format(split=split)).write_text(json.dumps(summary, indent=1))
    summaries[split] = summary
  return summaries


def load_summaries(dataset_dir: str) -> dict[str, dict]:
  """The preparation summaries stored in a prepared data set's folder, by split."""
  out = {}
  for path in sorted(epath.Path(dataset_dir).iterdir(), key=lambda p: p.name):
    if path.name.startswith("prepare_summary_") and path.name.endswith(".json"):
      summary = json.loads(path.read_text())
      out[summary["split"]] = summary
  return out
