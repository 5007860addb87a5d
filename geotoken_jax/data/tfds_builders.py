"""TFDS builders for the standard geolocalization data sets, writing ArrayRecord.

The TFDS `manual_dir` convention: the user downloads, the builder prepares.
Every record carries:
  image      JPEG bytes (RGB; an RGB JPEG is kept byte for byte, anything else
             is converted: grayscale, CMYK, palette, alpha -> RGB JPEG)
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
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from geotoken_jax import s2
from geotoken_jax.data import images as images_lib
from geotoken_jax.data import readers

REASONS = ("missing_image", "undecodable_image", "bad_coordinates", "duplicate_id")
EXAMPLE_IDS_PER_REASON = 10
SUMMARY_FILE = "prepare_summary_{split}.json"
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
                      workers: int | None = None, max_side: int = 0, country_column: str | None = None
                      ) -> Iterator[tuple[str, dict]]:
  """Validated examples in metadata order; fills `report`.  Keys are row numbers."""
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

  for chunk, out in results():
    for i, (reason, jpeg, _) in zip(chunk, out):
      image_id = str(metadata.ids[i])
      if reason:
        report.reject(reason, image_id)
        continue
      report.written += 1
      country = str(metadata.extras[country_column][i]) if country_column else ""
      yield f"{i:010d}", {
          "image": jpeg, "latitude": float(metadata.lat[i]), "longitude": float(metadata.lon[i]),
          "tokens": tokens[i], "id": image_id, "country": country.upper(),
          "metadata": json.dumps({n: str(metadata.extras[n][i]) for n in extra_names}, ensure_ascii=False),
      }
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
                                 if self.country_column in metadata.extras else None)


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

  With workers > 1 the images are read in spawned processes, which re-import
  the caller's main module: a script calling this must keep its entry point
  under `if __name__ == "__main__":` (the prepare CLI does).
  """
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(BUILDERS)}")
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir {manual_dir} does not exist")
  builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record", **options)
  if builder.is_prepared():  # TFDS would skip it: report what the earlier run wrote
    return load_summaries(os.fspath(builder.data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  summaries = {}
  for split, report in builder.reports.items():
    summary = report.to_dict()
    summary["data_dir"] = os.fspath(builder.data_dir)
    with open(os.path.join(os.fspath(builder.data_dir), SUMMARY_FILE.format(split=split)), "w") as f:
      json.dump(summary, f, indent=1)
    summaries[split] = summary
  return summaries


def load_summaries(dataset_dir: str) -> dict[str, dict]:
  """The preparation summaries stored in a prepared data set's folder, by split."""
  out = {}
  for name in sorted(os.listdir(dataset_dir)):
    if name.startswith("prepare_summary_") and name.endswith(".json"):
      with open(os.path.join(dataset_dir, name)) as f:
        summary = json.load(f)
      out[summary["split"]] = summary
  return out
