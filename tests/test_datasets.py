"""Real data sets: TFDS builders -> ArrayRecord -> TfdsSource -> grain, with bad inputs.

Every fixture is built here from the built-in earth imagery (32 px Blue Marble
crops at MP16 locations) in the layout a builder reads: Im2GPS3k (CSV + folder),
MP16-Pro (CSV + one uncompressed tar), OSV-5M (CSVs + zip shards), YFCC4k
(YFCC100M info.txt + folder) and geo_csv (custom column names).  Bad rows are
mixed in on purpose.  The expected summaries and records are derived from how
the fixtures were built; tokens come from s2geometry (the C++ S2 library) and
pixels from PIL / NumPy, never from numbers copied from a run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import types
import zipfile

import numpy as np
import pytest
import s2geometry
import tensorflow_datasets as tfds
from PIL import Image

from geotoken_jax import s2
from geotoken_jax.data import earth, get_source, pipeline, readers, tfds_builders, tfds_source
from geotoken_jax.data import prepare as prepare_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(level=20, group_size=2)
SIZE = 32  # fixture image side
KEPT, CONVERTED = "kept", "converted"  # outcomes of written rows; the others are REASONS
WRITTEN = (KEPT, CONVERTED)


# ----------------------------------------------------------------------------
# Independent truth.


def oracle_tokens(lat, lon) -> np.ndarray:
  """Tokens from s2geometry: face, then child positions 1..20 in pairs (base 4)."""
  rows = []
  for a, b in zip(lat, lon):
    cell = s2geometry.S2CellId(s2geometry.S2LatLng.FromDegrees(float(a), float(b)))
    digits = [cell.child_position(k) for k in range(1, SPEC.level + 1)]
    rows.append([cell.face()] + [4 * digits[k] + digits[k + 1] for k in range(0, SPEC.level, 2)])
  return np.asarray(rows, np.int32)


def pil_pixels(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt, **kwargs)
  return out.getvalue()


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  return encode(Image.fromarray(pixels), "JPEG", quality=quality)


def palette_truth(data: bytes) -> np.ndarray:
  """RGB of a palette PNG by table lookup; its transparent index (if any) -> white."""
  with Image.open(io.BytesIO(data)) as image:
    assert image.mode == "P"
    index = np.asarray(image)
    table = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
    out = table[index]
    if "transparency" in image.info:
      out[index == image.info["transparency"]] = 255
  return out


def assert_close(got: np.ndarray, truth: np.ndarray, what: str) -> None:
  """Equal up to the loss of encoding the truth as a quality-95 JPEG (what conversion does)."""
  assert got.shape == truth.shape and got.dtype == np.uint8, what
  diff = np.abs(got.astype(np.int16) - truth)
  jpeg_loss = np.abs(pil_pixels(encode(Image.fromarray(truth), "JPEG", quality=95)).astype(np.int16) - truth)
  assert diff.mean() <= jpeg_loss.mean() + 0.5 and diff.max() <= jpeg_loss.max() + 4, (
      what, diff.mean(), diff.max(), jpeg_loss.mean(), jpeg_loss.max())
  assert diff.mean() < 4, (what, diff.mean())


def expected_summary(entries) -> dict:
  """rows / written / rejected / first_rejected_ids as the fixture's entries dictate."""
  reasons = tfds_builders.REASONS
  rejected = {r: sum(e["expect"] == r for e in entries) for r in reasons}
  first = {r: [e["id"] for e in entries if e["expect"] == r][:tfds_builders.EXAMPLE_IDS_PER_REASON]
           for r in reasons}
  return {"rows": len(entries), "written": sum(e["expect"] in WRITTEN for e in entries),
          "rejected": rejected, "rejected_total": sum(rejected.values()),
          "first_rejected_ids": {r: ids for r, ids in first.items() if ids}}


def raw_records(data_dir, name: str, split: str) -> list[dict]:
  """Every record of a prepared split, image still encoded, via the TFDS data source."""
  builder = tfds.builder_from_directory(tfds_source.dataset_dir(str(data_dir), name))
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def check_records(records: list[dict], entries: list[dict], *, country=None) -> None:
  """The records are the written entries in order, with exact coordinates and oracle tokens."""
  written = [e for e in entries if e["expect"] in WRITTEN]
  assert [r["id"].decode() for r in records] == [e["id"] for e in written]
  lat = np.array([float(e["lat"]) for e in written])
  lon = np.array([float(e["lon"]) for e in written])
  np.testing.assert_array_equal([r["latitude"] for r in records], lat)
  np.testing.assert_array_equal([r["longitude"] for r in records], lon)
  np.testing.assert_array_equal(np.stack([r["tokens"] for r in records]), oracle_tokens(lat, lon))
  for record, entry in zip(records, written):
    if entry["expect"] == KEPT:  # an RGB JPEG: byte for byte
      assert record["image"] == entry["data"], entry["id"]
    else:
      assert record["image"] != entry["data"], entry["id"]
      with Image.open(io.BytesIO(record["image"])) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE)), entry["id"]
    assert json.loads(record["metadata"]) == entry.get("metadata", {}), entry["id"]
    want_country = entry.get("country", "") if country is None else country
    assert record["country"].decode() == want_country, entry["id"]


# ----------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def pool():
  """128 distinct MP16 locations with their 32 px crops."""
  lat, lon = earth.load_coordinates()
  rows = np.random.default_rng(2024).choice(lat.size, 128, replace=False)
  return lat[rows], lon[rows], earth.crop_images(lat[rows], lon[rows], SIZE)


def good_entry(image_id: str, lat: float, lon: float, crop: np.ndarray, **extra) -> dict:
  return {"id": image_id, "lat": repr(float(lat)), "lon": repr(float(lon)), "data": jpeg(crop),
          "expect": KEPT, **extra}


def messy_entries(pool) -> list[dict]:
  """Im2GPS3k rows: 16 plain RGB JPEGs interleaved with every kind of awkward input."""
  lat, lon, crops = pool
  goods = [good_entry(f"g{k}.jpg", lat[k], lon[k], crops[k]) for k in range(16)]

  def special(k, image_id, data, expect, truth=None, lat_text=None, lon_text=None, file=None):
    return {"id": image_id, "lat": repr(float(lat[k])) if lat_text is None else lat_text,
            "lon": repr(float(lon[k])) if lon_text is None else lon_text, "data": data,
            "expect": expect, "truth": truth, "file": file}

  crop = crops[16]
  cmyk = encode(Image.fromarray(crops[17]).convert("CMYK"), "JPEG", quality=95)
  alpha = np.tile(np.linspace(0, 255, SIZE).round().astype(np.uint8), (SIZE, 1))  # 0 left .. 255 right
  rgba = encode(Image.fromarray(np.dstack([crops[18], alpha]), "RGBA"), "PNG")
  a = alpha[..., None] / 255.0
  rgba_truth = np.round(crops[18] * a + 255 * (1 - a)).astype(np.uint8)  # composited on white
  gray_pixels = crops[19].mean(-1).round().astype(np.uint8)
  gray = encode(Image.fromarray(gray_pixels, "L"), "JPEG", quality=95)
  palette_image = Image.fromarray(crops[20]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  palette = encode(palette_image, "PNG")
  palette_t_image = Image.fromarray(crops[21]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  transparent = int(np.bincount(np.asarray(palette_t_image).ravel()).argmax())  # the most used colour
  palette_t = encode(palette_t_image, "PNG", transparency=transparent)
  rgb_png = encode(Image.fromarray(crops[22]), "PNG")
  truncated = jpeg(crops[23])
  truncated = truncated[:len(truncated) // 2]
  specials = [
      special(17, "cmyk.jpg", cmyk, CONVERTED, pil_pixels(cmyk)),
      special(18, "alpha.png", rgba, CONVERTED, rgba_truth),
      special(19, "gray.jpg", gray, CONVERTED, np.repeat(gray_pixels[..., None], 3, -1)),
      special(20, "palette.png", palette, CONVERTED, palette_truth(palette)),
      special(23, "truncated.jpg", truncated, "undecodable_image"),
      special(24, "absent.jpg", None, "missing_image"),
      special(21, "palette_t.png", palette_t, CONVERTED, palette_truth(palette_t)),
      special(25, "nan.jpg", jpeg(crops[25]), "bad_coordinates", lat_text="nan"),
      # The first occurrence of g1.jpg is kept; this one (other coordinates) is dropped.
      special(26, "g1.jpg", None, "duplicate_id", lat_text=repr(float(lat[26]))),
      special(27, "lat95.jpg", jpeg(crops[27]), "bad_coordinates", lat_text="95.0"),
      special(28, "lon200.jpg", jpeg(crops[28]), "bad_coordinates", lon_text="200"),
      # An RGB PNG is lossless: kept byte for byte, like an RGB JPEG.
      special(22, "rgb.png", rgb_png, KEPT, crops[22]),
      special(29, "text.jpg", jpeg(crops[29]), "bad_coordinates", lat_text="north"),
      special(30, "garbage.jpg", b"this is not an image\n" * 4, "undecodable_image"),
      # A duplicate is reported as duplicate_id even when its coordinates are bad too.
      special(31, "g2.jpg", None, "duplicate_id", lat_text="95"),
      special(32, "blank.jpg", jpeg(crops[32]), "bad_coordinates", lat_text="", lon_text=""),
      # The id names no file, the folder holds bare.jpg: found by extension.
      special(16, "bare", jpeg(crop), KEPT, file="bare.jpg"),
      # On the boundary: |lat| = 90 and lon = -180 are valid.
      special(33, "pole.jpg", jpeg(crops[33]), KEPT, lat_text="90.0", lon_text="-180.0"),
  ]
  entries = []
  for k, good in enumerate(goods):
    entries.append(good)
    if k < len(specials):
      entries.append(specials[k])
  entries += specials[len(goods):]
  for k, entry in enumerate(entries):
    entry["metadata"] = {"S3_Label": str(k % 7), "city": "São Paulo" if k % 3 else ""}
  return entries


def write_folder_layout(manual, folder: str, csv_name: str, entries, header=("IMG_ID", "LAT", "LON"),
                        swap=False) -> None:
  (manual / folder).mkdir(parents=True)
  extra_names = list(entries[0].get("metadata", {}))
  with open(manual / csv_name, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(list(header) + extra_names)
    for e in entries:
      coords = [e["lon"], e["lat"]] if swap else [e["lat"], e["lon"]]
      writer.writerow([e["id"]] + coords + [e["metadata"][n] for n in extra_names])
      if e["data"] is not None:
        (manual / folder / (e.get("file") or e["id"])).write_bytes(e["data"])


@pytest.fixture(scope="module")
def messy(tmp_path_factory, pool):
  """The Im2GPS3k layout with every awkward input, prepared with one worker."""
  root = tmp_path_factory.mktemp("im2gps3k")
  entries = messy_entries(pool)
  write_folder_layout(root / "manual", "im2gps3ktest", "im2gps3k_places365.csv", entries)
  by_id = {e["id"]: e for e in entries if e["expect"] != "duplicate_id"}
  with pytest.raises(OSError), Image.open(io.BytesIO(by_id["truncated.jpg"]["data"])) as image:
    image.load()  # the fixture is what it claims to be: PIL cannot decode the truncated file ...
  for name, mode in (("cmyk.jpg", "CMYK"), ("alpha.png", "RGBA"), ("gray.jpg", "L"), ("palette.png", "P"),
                     ("palette_t.png", "P"), ("rgb.png", "RGB")):
    with Image.open(io.BytesIO(by_id[name]["data"])) as image:
      assert image.mode == mode, name  # ... and the others have the modes named
  with Image.open(io.BytesIO(by_id["palette_t.png"]["data"])) as image:
    assert (np.asarray(image) == image.info["transparency"]).mean() > 0.1  # many transparent pixels
  summaries = tfds_builders.prepare("im2gps3k", str(root / "manual"), str(root / "data"), workers=1)
  return types.SimpleNamespace(root=root, manual=root / "manual", data=root / "data", entries=entries,
                               summaries=summaries)


# ----------------------------------------------------------------------------
# Im2GPS3k layout: validation, summary, records, conversions.


def test_fixture_covers_every_rejection_reason(messy):
  counts = {r: sum(e["expect"] == r for e in messy.entries) for r in tfds_builders.REASONS}
  assert counts == {"missing_image": 1, "undecodable_image": 2, "bad_coordinates": 5, "duplicate_id": 2}
  assert sum(e["expect"] == CONVERTED for e in messy.entries) == 5


def test_summary_counts_are_exact(messy):
  assert set(messy.summaries) == {"test"}
  summary = messy.summaries["test"]
  expected = expected_summary(messy.entries)
  assert expected["rows"] == 34 and expected["written"] == 24  # as built above
  assert {k: summary[k] for k in expected} == expected
  assert summary["dataset"] == "im2gps3k" and summary["split"] == "test"
  dataset_dir = tfds_source.dataset_dir(str(messy.data), "im2gps3k")
  assert summary["data_dir"] == dataset_dir
  with open(os.path.join(dataset_dir, "prepare_summary_test.json")) as f:
    assert json.load(f) == summary
  # A second prepare finds the data prepared and reports the stored summary.
  assert tfds_builders.prepare("im2gps3k", str(messy.manual), str(messy.data), workers=1) == messy.summaries
  source = tfds_source.TfdsSource(dataset_dir, "test", SPEC, image_size=SIZE)
  assert len(source) == expected["written"] and source.rejected == expected["rejected_total"]


def test_records_equal_what_was_written(messy):
  records = raw_records(messy.data, "im2gps3k", "test")
  check_records(records, messy.entries, country="")
  # Of the two g1.jpg rows, the first (its own coordinates) is the one written.
  first, second = [e for e in messy.entries if e["id"] == "g1.jpg"]
  (g1,) = [r for r in records if r["id"] == b"g1.jpg"]
  assert g1["latitude"] == float(first["lat"]) != float(second["lat"])


def test_converted_images_are_rgb_and_close_to_pil(messy):
  written = [e for e in messy.entries if e["expect"] in WRITTEN]
  records = raw_records(messy.data, "im2gps3k", "test")
  converted = 0
  for record, entry in zip(records, written):
    if entry["expect"] != CONVERTED:
      continue
    converted += 1
    got = pil_pixels(record["image"])
    assert_close(got, entry["truth"], entry["id"])
  assert converted == 5
  # Alpha is composited on white, not dropped: far from the raw RGB where transparent.
  entry = next(e for e in written if e["id"] == "alpha.png")
  got = pil_pixels(records[written.index(entry)]["image"])
  with Image.open(io.BytesIO(entry["data"])) as image:
    raw_rgb = np.asarray(image)[..., :3]
  left = slice(0, SIZE // 4)  # alpha < 64 there
  assert np.abs(got[:, left].astype(int) - raw_rgb[:, left]).mean() > 60
  assert (got[:, 0] >= 250).all()  # alpha 0: white


def test_tfds_source_gives_the_written_pixels_tokens_and_coordinates(messy):
  source = get_source({"name": "im2gps3k", "data_dir": str(messy.data), "image_size": SIZE}, "test", SPEC)
  assert isinstance(source, tfds_source.TfdsSource) and not source.augment
  written = [e for e in messy.entries if e["expect"] in WRITTEN]
  batch = source.get_batch(np.arange(len(source)))
  assert list(batch["id"]) == [e["id"] for e in written]
  lat = np.array([float(e["lat"]) for e in written])
  lon = np.array([float(e["lon"]) for e in written])
  np.testing.assert_array_equal(batch["latlng"], np.stack([lat, lon], 1).astype(np.float32))
  np.testing.assert_array_equal(batch["tokens"], oracle_tokens(lat, lon))
  assert batch["tokens"].dtype == np.int32 and batch["image"].dtype == np.uint8
  for image, entry in zip(batch["image"], written):
    if entry["expect"] == KEPT:  # a 32 px image at image_size 32: the source's own pixels
      np.testing.assert_array_equal(image, pil_pixels(entry["data"]), err_msg=entry["id"])
    else:
      assert_close(image, entry["truth"], entry["id"])
  one = source[3]
  np.testing.assert_array_equal(one["image"], batch["image"][3])
  assert one["id"] == written[3]["id"]


def test_two_workers_write_the_same_records(messy, tmp_path, monkeypatch):
  # Chunks of 4 rows: the pool's results must come back in order across many tasks.
  monkeypatch.setattr(tfds_builders, "_CHUNK", 4)
  summaries = tfds_builders.prepare("im2gps3k", str(messy.manual), str(tmp_path / "data"), workers=2)
  keys = ("rows", "written", "rejected", "rejected_total", "first_rejected_ids")
  assert {k: summaries["test"][k] for k in keys} == {k: messy.summaries["test"][k] for k in keys}
  one, two = raw_records(messy.data, "im2gps3k", "test"), raw_records(tmp_path / "data", "im2gps3k", "test")
  assert len(one) == len(two) == messy.summaries["test"]["written"]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------
# MP16-Pro: CSV + one uncompressed tar with a cached offset index.


@pytest.fixture(scope="module")
def mp16(tmp_path_factory, pool):
  root = tmp_path_factory.mktemp("mp16")
  manual = root / "manual"
  manual.mkdir()
  lat, lon, crops = pool
  entries = []
  for j, k in enumerate(range(40, 52)):
    image_id = f"{j % 3:02x}/{j % 2:02x}/{7000 + k}.jpg"  # MP16 ids: two hash folders and a photo id
    entries.append(good_entry(image_id, lat[k], lon[k], crops[k],
                              metadata={"city": f"city{j}", "country": "Brazil"}))
  entries.insert(5, {**good_entry("0f/0f/1.jpg", lat[52], lon[52], crops[52]), "data": None,
                     "expect": "missing_image", "metadata": {"city": "", "country": ""}})
  with open(manual / "MP16_Pro_places365.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "LAT", "LON", "city", "country"])
    for e in entries:
      writer.writerow([e["id"], e["lat"], e["lon"], e["metadata"]["city"], e["metadata"]["country"]])
  tar_path = manual / "mp-16-images.tar"
  with tarfile.open(tar_path, "w") as tar:  # uncompressed, everything under one top folder
    for e in entries:
      if e["data"] is not None:
        info = tarfile.TarInfo(f"mp16/{e['id']}")
        info.size = len(e["data"])
        tar.addfile(info, io.BytesIO(e["data"]))
  assert not os.path.exists(str(tar_path) + ".index.npz")
  summaries = tfds_builders.prepare("mp16", str(manual), str(root / "data"), workers=1)
  return types.SimpleNamespace(root=root, manual=manual, tar=str(tar_path), data=root / "data",
                               entries=entries, summaries=summaries)


def test_mp16_tar_layout(mp16):
  summary = mp16.summaries["train"]
  expected = expected_summary(mp16.entries)
  assert expected["written"] == 12 and expected["rejected_total"] == 1
  assert {k: summary[k] for k in expected} == expected
  # MP16-Pro's country column holds names, so it stays in the metadata, not in "country".
  check_records(raw_records(mp16.data, "mp16", "train"), mp16.entries, country="")


def test_mp16_tar_index_is_an_npz_cached_and_reused(mp16, monkeypatch):
  index_path = mp16.tar + ".index.npz"
  assert os.path.isfile(index_path)  # written by the preparation
  with open(index_path, "rb") as f:
    assert f.read(4) == b"PK\x03\x04"  # a zip of .npy arrays, not a pickle
  with np.load(index_path, allow_pickle=False) as index:  # loads without pickle
    assert all(index[name].dtype != object for name in index.files)
    names = sorted(str(n) for n in index["names"])
  assert names == sorted("mp16/" + e["id"] for e in mp16.entries if e["data"] is not None)
  before = os.stat(index_path).st_mtime_ns

  def no_rebuild(self):
    raise AssertionError("the cached index should have been reused")

  with monkeypatch.context() as m:
    m.setattr(readers.TarImages, "build_index", no_rebuild)
    store = readers.TarImages(mp16.tar)
    for e in mp16.entries:
      assert store.get(e["id"]) == e["data"]
    assert len(store) == 12
  assert os.stat(index_path).st_mtime_ns == before
  # A changed tar (new mtime) makes the index stale: rebuilt.
  stat = os.stat(mp16.tar)
  os.utime(mp16.tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  rebuilt = []
  original = readers.TarImages.build_index
  monkeypatch.setattr(readers.TarImages, "build_index", lambda self: rebuilt.append(1) or original(self))
  store = readers.TarImages(mp16.tar)
  assert store.get(mp16.entries[0]["id"]) == mp16.entries[0]["data"] and rebuilt == [1]


def test_compressed_tar_is_refused(tmp_path):
  path = tmp_path / "images.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("a.jpg")
    info.size = 3
    tar.addfile(info, io.BytesIO(b"abc"))
  with pytest.raises(ValueError, match="uncompressed"):
    readers.TarImages(str(path)).get("a.jpg")


@pytest.mark.parametrize("members", [
    ("mp16/00/01/1.jpg", "mp16/00/02/2.jpg"),  # a subset tar: every member under mp16/00/
    ("00/01/1.jpg", "00/02/2.jpg"),  # no top folder at all
    ("mp16/00/01/1.jpg",),  # a single member
])
def test_tar_ids_resolve_under_any_ancestor_of_the_common_folder(tmp_path, members):
  path = tmp_path / "images.tar"
  with tarfile.open(path, "w") as tar:
    for name in members:
      info = tarfile.TarInfo(name)
      info.size = len(name)
      tar.addfile(info, io.BytesIO(name.encode()))
  store = readers.TarImages(str(path))
  for name in members:
    relative = name.split("00/", 1)[1]  # "01/1.jpg": the id below the deepest common folder
    for image_id in {name, "00/" + relative, relative}:
      assert store.get(image_id) == name.encode(), image_id
  assert store.get("03/3.jpg") is None and store.get("mp16/03/3.jpg") is None and store.get("") is None


# ----------------------------------------------------------------------------
# OSV-5M: train.csv / test.csv and images/SPLIT/NN.zip shards.


@pytest.fixture(scope="module")
def osv5m(tmp_path_factory, pool):
  root = tmp_path_factory.mktemp("osv5m")
  manual = root / "manual"
  lat, lon, crops = pool
  countries = ["FR", "JP", "BR", "us"]
  splits = {"train": range(60, 85), "test": range(85, 95)}
  entries = {}
  for split, ks in splits.items():
    rows = []
    for j, k in enumerate(ks):
      country = countries[j % 4]
      rows.append(good_entry(str(480000 + 37 * k), lat[k], lon[k], crops[k], country=country.upper(),
                             metadata={"region": f"r{j}", "city": f"c{j}"}, raw_country=country))
    if split == "train":  # 25 rows, one of them without an image: 24 written (3 batches of 8)
      rows[7]["data"], rows[7]["expect"] = None, "missing_image"
    entries[split] = rows
    (manual / "images" / split).mkdir(parents=True)
    present = [e for e in rows if e["data"] is not None]
    half = len(present) // 2
    for shard, (part, prefix) in enumerate(((present[:half], ""), (present[half:], "01/"))):
      with zipfile.ZipFile(manual / "images" / split / f"{shard:02d}.zip", "w") as z:
        for e in part:
          z.writestr(f"{prefix}{e['id']}.jpg", e["data"])
    with open(manual / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["id", "latitude", "longitude", "country", "region", "city"])
      for e in rows:
        writer.writerow([e["id"], e["lat"], e["lon"], e["raw_country"], e["metadata"]["region"],
                         e["metadata"]["city"]])
  summaries = tfds_builders.prepare("osv5m", str(manual), str(root / "data"), workers=1)
  return types.SimpleNamespace(root=root, data=root / "data", entries=entries, summaries=summaries)


def test_osv5m_zip_shards(osv5m):
  assert set(osv5m.summaries) == {"train", "test"}
  assert len(os.listdir(osv5m.root / "manual" / "images" / "train")) == 2
  for split in ("train", "test"):
    expected = expected_summary(osv5m.entries[split])
    assert {k: osv5m.summaries[split][k] for k in expected} == expected
    check_records(raw_records(osv5m.data, "osv5m", split), osv5m.entries[split])
  assert osv5m.summaries["train"]["written"] == 24 and osv5m.summaries["test"]["written"] == 10
  assert osv5m.summaries["train"]["first_rejected_ids"] == {"missing_image": [osv5m.entries["train"][7]["id"]]}


# ----------------------------------------------------------------------------
# YFCC4k from YFCC100M's info.txt.


def test_yfcc4k_info_txt(tmp_path, pool):
  manual = tmp_path / "manual"
  (manual / "yfcc4k").mkdir(parents=True)
  lat, lon, crops = pool
  entries = [good_entry(str(4_000_000_000 + 13 * k), lat[k], lon[k], crops[k]) for k in range(100, 110)]
  entries.insert(3, {**good_entry("4100000001", 0, 0, crops[110]), "expect": "bad_coordinates"})
  entries.insert(6, {**good_entry("4100000002", lat[111], lon[111], crops[111]), "data": None,
                     "expect": "missing_image"})
  lines = []
  for j, e in enumerate(entries):
    # 1-based columns: 1 photo id, 2-11 other fields, 12 longitude, 13 latitude, then more.
    cells = [e["id"], f"user{j}", "2010-01-01 00:00:00.0", "1262304000", "Canon", f"title {j}", "",
             "tag1,tag2", "", f"http://example.com/{j}", "http://example.com/p.jpg", e["lon"], e["lat"],
             "16", "license", "0"]
    if e["expect"] == "bad_coordinates":
      cells = cells[:12]  # the row ends before column 13: no latitude
    lines.append("\t".join(cells))
    if e["data"] is not None:
      (manual / "yfcc4k" / f"{e['id']}.jpg").write_bytes(e["data"])
  (manual / "info.txt").write_text("\n".join(lines) + "\n")
  summaries = tfds_builders.prepare("yfcc4k", str(manual), str(tmp_path / "data"), workers=1)
  expected = expected_summary(entries)
  assert expected["written"] == 10
  assert {k: summaries["test"][k] for k in expected} == expected
  check_records(raw_records(tmp_path / "data", "yfcc4k", "test"), entries, country="")


# ----------------------------------------------------------------------------
# The CLI: geo_csv with custom columns, swapped headers, empty files.


def run_cli(argv, capsys) -> tuple[int, str, str]:
  code = prepare_cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_cli_geo_csv_custom_columns(tmp_path, pool, capsys):
  manual = tmp_path / "manual"
  (manual / "pics").mkdir(parents=True)
  lat, lon, crops = pool
  entries = [good_entry(f"p{k}", lat[k], lon[k], crops[k], country="DE", metadata={"note": f"n{k}"})
             for k in range(112, 120)]
  entries[4] = {**entries[4], "lat": "-91", "expect": "bad_coordinates"}
  with open(manual / "photos.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["note", "x", "name", "cc", "y"])  # any order, any names
    for e in entries:
      writer.writerow([e["metadata"]["note"], e["lon"], e["id"], "de", e["lat"]])
      (manual / "pics" / f"{e['id']}.jpg").write_bytes(e["data"])
  code, out, _ = run_cli(["--dataset", "geo_csv", "--manual_dir", manual, "--data_dir", tmp_path / "data",
                          "--csv", "test=photos.csv", "--image_dir", "pics", "--id_column", "name",
                          "--lat_column", "y", "--lon_column", "x", "--country_column", "cc",
                          "--workers", "1"], capsys)
  assert code == 0
  summaries = json.loads(out.strip().splitlines()[-1])  # the last line is the JSON summary
  expected = expected_summary(entries)
  assert expected["written"] == 7
  assert {k: summaries["test"][k] for k in expected} == expected
  with open(os.path.join(tfds_source.dataset_dir(str(tmp_path / "data"), "geo_csv"),
                         "prepare_summary_test.json")) as f:
    assert json.load(f) == summaries["test"]
  check_records(raw_records(tmp_path / "data", "geo_csv", "test"), entries)


def test_cli_swapped_headers_refused_then_accepted(tmp_path, pool, capsys):
  lat, lon, crops = pool
  far = [k for k in range(lat.size) if abs(lon[k]) > 90][:6]  # longitudes that cannot be latitudes
  near = [k for k in range(lat.size) if abs(lon[k]) <= 90][:4]
  assert len(far) == 6 and len(near) == 4
  entries = [good_entry(f"s{k}.jpg", lat[k], lon[k], crops[k], metadata={}) for k in far[:3] + near + far[3:]]
  manual = tmp_path / "manual"
  write_folder_layout(manual, "im2gps3ktest", "im2gps3k_places365.csv", entries, swap=True)
  args = ["--dataset", "im2gps3k", "--manual_dir", manual, "--data_dir", tmp_path / "data", "--workers", "1"]
  # As a real process: exit code 2 and a message that says what is wrong and what to do.
  result = subprocess.run([sys.executable, "-m", "geotoken_jax.data.prepare"] + [str(a) for a in args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr
  assert "swapped" in result.stderr and "--swap_latlon" in result.stderr
  assert "6 of 10" in result.stderr  # 6 LAT values beyond +-90
  with pytest.raises(ValueError, match="swapped"):
    tfds_builders.prepare("im2gps3k", str(manual), str(tmp_path / "data"), workers=1)
  code, out, err = run_cli(args + ["--swap_latlon"], capsys)
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])["test"]
  assert summary["written"] == 10 and summary["rejected_total"] == 0
  check_records(raw_records(tmp_path / "data", "im2gps3k", "test"), entries, country="")


@pytest.mark.parametrize("content,message", [("", "empty"), ("IMG_ID,LAT,LON\n", "no rows"),
                                             ("IMG_ID,LAT,LON\n\n \n", "no rows"),
                                             ("IMG_ID,LATITUDE,LON\na.jpg,1,2\n", "no column")])
def test_empty_header_only_and_misnamed_csv_are_errors(tmp_path, content, message, capsys):
  (tmp_path / "manual" / "im2gps3ktest").mkdir(parents=True)
  (tmp_path / "manual" / "im2gps3k_places365.csv").write_text(content)
  with pytest.raises(ValueError, match=message):
    tfds_builders.prepare("im2gps3k", str(tmp_path / "manual"), str(tmp_path / "data"), workers=1)
  code, out, err = run_cli(["--dataset", "im2gps3k", "--manual_dir", tmp_path / "manual",
                            "--data_dir", tmp_path / "data", "--workers", "1"], capsys)
  assert code == 2 and message in err and "error:" in err


def test_empty_yfcc_info_is_an_error(tmp_path):
  (tmp_path / "info.txt").write_text("\n\n")
  with pytest.raises(ValueError, match="no rows"):
    readers.read_yfcc_info(str(tmp_path / "info.txt"))


# ----------------------------------------------------------------------------
# grain over a TfdsSource: resume, augmentation, processes.


def osv5m_train(osv5m, seed=3, image_size=16):
  return get_source({"name": "osv5m", "data_dir": str(osv5m.data), "image_size": image_size, "augment": True},
                    "train", SPEC, seed=seed)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_training_resumes_mid_epoch_to_the_same_next_batch(osv5m):
  source = osv5m_train(osv5m)
  assert source.augment and len(source) == 24
  uninterrupted = take(pipeline.train_iterator(source, global_batch_size=8, seed=5), 6)
  for k in (2, 4):  # mid epoch 0 (3 batches of 8 per epoch) and mid epoch 1
    it = pipeline.train_iterator(osv5m_train(osv5m), global_batch_size=8, seed=5)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["next_batch"] == k
    resumed = pipeline.train_iterator(osv5m_train(osv5m), global_batch_size=8, seed=5)
    resumed.set_state(state)
    for expected, got in zip(uninterrupted[k:], take(resumed, 2)):
      assert_batches_equal(got, expected)


def test_augmentation_is_fixed_by_seed_and_stream_position(osv5m):
  source = osv5m_train(osv5m, seed=3)
  batches = take(pipeline.train_iterator(source, global_batch_size=8, seed=5), 6)
  ids = list(source.get_batch(np.arange(len(source)))["id"])
  eval_view = get_source({"name": "osv5m", "data_dir": str(osv5m.data), "image_size": 16}, "train", SPEC)
  for k, batch in enumerate(batches):
    rows = np.array([ids.index(i) for i in batch["id"]])
    positions = k * 8 + np.arange(8)
    # The image at stream position p is the record's augmentation seeded by (seed, p) ...
    again = osv5m_train(osv5m, seed=3).get_batch(rows, positions=positions)
    assert_batches_equal(batch, again)
    # ... and is an augmentation: not the evaluation view of the record.
    assert not np.array_equal(batch["image"], eval_view.get_batch(rows)["image"])
  # Epochs 0 and 1 see every record; at its two positions a record gets two different crops.
  first = {i: img for b in batches[:3] for i, img in zip(b["id"], b["image"])}
  second = {i: img for b in batches[3:] for i, img in zip(b["id"], b["image"])}
  assert first.keys() == second.keys() == set(ids)
  assert sum(not np.array_equal(first[i], second[i]) for i in ids) >= 20
  # Another augmentation seed: other crops of the same stream.
  other = take(pipeline.train_iterator(osv5m_train(osv5m, seed=4), global_batch_size=8, seed=5), 1)[0]
  np.testing.assert_array_equal(other["id"], batches[0]["id"])
  assert not np.array_equal(other["image"], batches[0]["image"])


def test_two_processes_train_on_disjoint_halves_covering_the_epoch(osv5m):
  ids = [e["id"] for e in osv5m.entries["train"] if e["expect"] in WRITTEN]
  single = take(pipeline.train_iterator(osv5m_train(osv5m), global_batch_size=8, seed=9), 3)
  halves = [take(pipeline.train_iterator(osv5m_train(osv5m), global_batch_size=8, seed=9, process_index=p,
                                         process_count=2), 3) for p in range(2)]
  seen = [[i for b in halves[p] for i in b["id"]] for p in range(2)]
  assert all(b["image"].shape == (4, 16, 16, 3) for half in halves for b in half)
  assert len(seen[0]) == len(seen[1]) == 12
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(ids)  # 3 global batches of 8 = one epoch of 24, once each
  for k in range(3):  # and the 2 processes together train exactly the 1-process batches
    for key in single[k]:
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), single[k][key])


def test_two_processes_evaluate_disjoint_shards_covering_the_split(messy):
  written = [e["id"] for e in messy.entries if e["expect"] in WRITTEN]  # 24 records
  source = get_source({"name": "im2gps3k", "data_dir": str(messy.data), "image_size": SIZE}, "test", SPEC)
  per_process = [list(pipeline.eval_batches(source, batch_size=5, process_index=p, process_count=2))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(24 / 10)
  shards = [[i for b in batches for i in b["id"][b["mask"]]] for batches in per_process]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(written) and len(shards[0] + shards[1]) == len(written)
  in_order = [i for pair in zip(*per_process) for b in pair for i in b["id"][b["mask"]]]
  assert in_order == written
  everything = source.get_batch(np.arange(len(source)))
  for p, batches in enumerate(per_process):
    for k, batch in enumerate(batches):
      rows = np.minimum((k * 2 + p) * 5 + np.arange(5), len(source) - 1)
      np.testing.assert_array_equal(batch["image"], everything["image"][rows])
      np.testing.assert_array_equal(batch["tokens"], everything["tokens"][rows])
      assert list(batch["id"][~batch["mask"]]) == [-1] * int((~batch["mask"]).sum())
  assert int(sum((~b["mask"]).sum() for batches in per_process for b in batches)) == 30 - 24
