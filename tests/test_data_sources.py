"""Sidecar index, the Source protocol, holdout slices and the leak filter.

Fixtures are built here in the layouts the builders read (MP16-Pro tar,
Im2GPS3k folder, YFCC100M info.txt, geo_csv), all prepared into ONE data_dir so
a config can name them together.  Truth comes from how the fixtures were built
(the photo ids planted in the file names), from s2geometry (tokens, cells), from
hashlib (id hashes) and from a pure-Python splitmix64, never from the code under
test.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import io
import logging
import os
import shutil
import tarfile
import types
import zipfile

import numpy as np
import pytest
import s2geometry
import tensorflow_datasets as tfds
from PIL import Image

from geotoken_jax import data, s2
from geotoken_jax.data import earth, pipeline, subsets, tfds_builders, tfds_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(level=20, group_size=2)
SIZE = 24
M64 = 2**64 - 1


# ----------------------------------------------------------------------------
# Independent truth.


def oracle_tokens(latlng, level=20, group=2) -> np.ndarray:
  rows = []
  for a, b in latlng:
    cell = s2geometry.S2CellId(s2geometry.S2LatLng.FromDegrees(float(a), float(b)))
    digits = [cell.child_position(k) for k in range(1, level + 1)]
    tokens = [cell.face()]
    for k in range(0, level, group):
      value = 0
      for d in digits[k:k + group]:
        value = 4 * value + d
      tokens.append(value)
    rows.append(tokens)
  return np.asarray(rows, np.int32).reshape(len(rows), 1 + level // group)


def oracle_cell(lat, lon, level) -> int:
  return s2geometry.S2CellId(s2geometry.S2LatLng.FromDegrees(float(lat), float(lon))).parent(level).id()


def oracle_hash(image_id: str) -> int:
  return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little")


def py_splitmix64(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
  return x ^ (x >> 31)


def oracle_held_out(row: dict, holdout: dict) -> bool:
  """The documented rule, recomputed with s2geometry / hashlib / Python ints."""
  if holdout["by"] == "cell":
    key = oracle_cell(row["lat"], row["lon"], holdout["cell_level"])
  else:
    key = oracle_hash(row["id"])
  return py_splitmix64(key ^ holdout["salt"]) < int(holdout["fraction"] * 2**64)


def jpeg(pixels) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def raw_records(dataset_dir: str, split: str) -> list[dict]:
  builder = tfds.builder_from_directory(dataset_dir)
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


# ----------------------------------------------------------------------------
# Fixtures: MP16 (tar) + Im2GPS3k + YFCC4k (info.txt) + geo_csv, one data_dir.

SECRET = "5c0d3f0b09"
# MP16 rows whose photos are also in the test sets (by construction):
SHARED_IM2GPS = (4, 17, 30)
SHARED_IM2GPS_REJECTED = 41  # its Im2GPS3k row has bad coordinates: not in that split
SHARED_YFCC = (8, 50)
MP16_MISSING, MP16_NAN = 22, 35


def mp16_pid(j: int) -> int:
  return 9_000_000_000 + 7 * j


def mp16_id(j: int) -> tuple[str, int]:
  """(id, its Flickr photo id or -1) in one of MP16's id styles."""
  pid = mp16_pid(j)
  if j % 10 == 9:
    return f"img_{j}.jpg", -1  # not a Flickr name
  style = j % 3
  if style == 0:
    return f"{j % 16:02x}/{j % 7:02x}/{pid}.jpg", pid  # MP16-Pro: two hash folders and the photo id
  if style == 1:
    return f"{pid}_{SECRET}.jpg", pid  # Flickr's ID_SECRET
  return f"{j % 5:02x}/{pid}_{SECRET}_o.jpg", pid  # original-size name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  data_dir = root / "data"
  lat, lon = earth.load_coordinates()
  picks = np.random.default_rng(7).choice(lat.size, 120, replace=False)
  base_lat, base_lon = lat[picks], lon[picks]
  crops = earth.crop_images(base_lat, base_lon, SIZE)
  jitter = np.random.default_rng(8).uniform(-0.002, 0.002, (60, 2))

  # MP16: 60 rows, 15 places x 4 nearby photos (so level-8 cells hold several rows).
  manual = root / "mp16"
  manual.mkdir()
  mp16 = []
  for j in range(60):
    place = j % 15
    image_id, pid = mp16_id(j)
    row = {"id": image_id, "pid": pid, "lat": float(base_lat[place] + jitter[j, 0]),
           "lon": float(base_lon[place] + jitter[j, 1]), "data": jpeg(crops[place]), "ok": True}
    if j == MP16_MISSING:
      row.update(data=None, ok=False)
    if j == MP16_NAN:
      row.update(lat=float("nan"), ok=False)
    mp16.append(row)
  with open(manual / "MP16_Pro_places365.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "LAT", "LON", "city"])
    for r in mp16:
      writer.writerow([r["id"], repr(r["lat"]), repr(r["lon"]), "x"])
  with tarfile.open(manual / "mp16.tar", "w") as tar:
    for r in mp16:
      if r["data"] is not None:
        info = tarfile.TarInfo(f"mp16/{r['id']}")
        info.size = len(r["data"])
        tar.addfile(info, io.BytesIO(r["data"]))
  tfds_builders.prepare("mp16", str(manual), str(data_dir), workers=1)

  # Im2GPS3k: 8 rows, 3 of them MP16 photos, and a 4th shared one rejected (lat 95).
  manual = root / "im2gps3k"
  (manual / "im2gps3ktest").mkdir(parents=True)
  im2gps = []
  shared = list(SHARED_IM2GPS) + [SHARED_IM2GPS_REJECTED]
  for k in range(8):
    pid = mp16_pid(shared[k]) if k < len(shared) else 7_000_000_000 + k
    row = {"id": f"{pid}_{SECRET}_{1000 + k}_2628689{k}@N00.jpg", "pid": pid, "lat": float(base_lat[60 + k]),
           "lon": float(base_lon[60 + k]), "data": jpeg(crops[60 + k]), "ok": True}
    if k == len(shared) - 1:
      row.update(lat=95.0, ok=False)
    im2gps.append(row)
  with open(manual / "im2gps3k_places365.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "AUTHOR", "LAT", "LON"])
    for r in im2gps:
      writer.writerow([r["id"], "someone", repr(r["lat"]), repr(r["lon"])])
      (manual / "im2gps3ktest" / r["id"]).write_bytes(r["data"])
  tfds_builders.prepare("im2gps3k", str(manual), str(data_dir), workers=1)

  # YFCC4k from info.txt: 6 rows, 2 of them MP16 photos; ids are bare photo ids.
  manual = root / "yfcc4k"
  (manual / "yfcc4k").mkdir(parents=True)
  yfcc = []
  for k in range(6):
    pid = mp16_pid(SHARED_YFCC[k]) if k < len(SHARED_YFCC) else 8_000_000_000 + k
    yfcc.append({"id": str(pid), "pid": pid, "lat": float(base_lat[70 + k]), "lon": float(base_lon[70 + k]),
                 "data": jpeg(crops[70 + k]), "ok": True})
  lines = []
  for j, r in enumerate(yfcc):
    cells = [r["id"], f"user{j}", "2010-01-01", "0", "Canon", "t", "", "", "", "u", "u", repr(r["lon"]),
             repr(r["lat"]), "16", "lic", "0"]
    lines.append("\t".join(cells))
    (manual / "yfcc4k" / f"{r['id']}.jpg").write_bytes(r["data"])
  (manual / "info.txt").write_text("\n".join(lines) + "\n")
  tfds_builders.prepare("yfcc4k", str(manual), str(data_dir), workers=1)

  # geo_csv train (for the tiny_holdout config): 40 rows at distinct places.
  manual = root / "geo_csv"
  (manual / "images").mkdir(parents=True)
  geo = []
  for k in range(40):
    geo.append({"id": f"photo_{k:03d}.jpg", "pid": -1, "lat": float(base_lat[76 + k]),
                "lon": float(base_lon[76 + k]), "data": jpeg(crops[76 + k]), "ok": True})
  for split, rows in (("train", geo), ("test", geo[:8])):
    with open(manual / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["IMG_ID", "LAT", "LON"])
      for r in rows:
        writer.writerow([r["id"], repr(r["lat"]), repr(r["lon"])])
  for r in geo:
    (manual / "images" / r["id"]).write_bytes(r["data"])
  tfds_builders.prepare("geo_csv", str(manual), str(data_dir), workers=1,
                        csv_files={"train": "train.csv", "test": "test.csv"}, image_dir="images")

  written = {name: [r for r in rows if r["ok"]] for name, rows in
             (("mp16", mp16), ("im2gps3k", im2gps), ("yfcc4k", yfcc), ("geo_csv", geo))}
  return types.SimpleNamespace(root=root, data=data_dir, rows={"mp16": mp16, "im2gps3k": im2gps, "yfcc4k": yfcc,
                                                               "geo_csv": geo}, written=written)


def ddir(world, name):
  return tfds_source.dataset_dir(str(world.data), name)


SPLIT_OF = {"mp16": "train", "im2gps3k": "test", "yfcc4k": "test", "geo_csv": "train"}


# ----------------------------------------------------------------------------
# 1. The sidecar index.


def test_fixture_is_what_it_claims(world):
  assert len(world.written["mp16"]) == 58 and len(world.written["im2gps3k"]) == 7
  assert sum(r["pid"] >= 0 for r in world.written["mp16"]) == 52  # 6 rows have non-Flickr names
  assert {mp16_id(j)[0].count("/") for j in range(60)} == {0, 1, 2}  # every id style present


@pytest.mark.parametrize("name", ["mp16", "im2gps3k", "yfcc4k", "geo_csv"])
def test_sidecar_equals_the_records_read_back(world, name):
  split = SPLIT_OF[name]
  path = os.path.join(ddir(world, name), f"index_{split}.npz")
  with open(path, "rb") as f:
    assert f.read(4) == b"PK\x03\x04"  # a zip of .npy files
  with np.load(path, allow_pickle=False) as npz:
    index = {k: npz[k] for k in npz.files}
  assert {k: index[k].dtype for k in tfds_builders.INDEX_KEYS} == {
      "tokens": np.int32, "latlng": np.float64, "id_hash": np.uint64, "photo_id": np.int64}
  records = raw_records(ddir(world, name), split)
  written = world.written[name]
  assert [r["id"].decode() for r in records] == [w["id"] for w in written]  # metadata order minus rejects
  n = len(records)
  assert index["tokens"].shape == (n, SPEC.num_positions) and index["latlng"].shape == (n, 2)
  np.testing.assert_array_equal(index["tokens"], np.stack([r["tokens"] for r in records]))
  np.testing.assert_array_equal(index["latlng"], [[r["latitude"], r["longitude"]] for r in records])
  latlng = [[w["lat"], w["lon"]] for w in written]
  np.testing.assert_array_equal(index["latlng"], latlng)  # exact float64
  np.testing.assert_array_equal(index["tokens"], oracle_tokens(latlng))
  np.testing.assert_array_equal(index["id_hash"], np.array([oracle_hash(w["id"]) for w in written], np.uint64))
  np.testing.assert_array_equal(index["photo_id"], [w["pid"] for w in written])  # the planted ids
  # TfdsSource serves the same arrays.
  source = tfds_source.TfdsSource(ddir(world, name), split, SPEC)
  got = source.index_arrays()
  for key in tfds_builders.INDEX_KEYS:
    np.testing.assert_array_equal(got[key], index[key], err_msg=key)


def test_photo_id_rule_on_each_data_sets_id_style():
  cases = {
      "3f/ab/1234567890.jpg": 1234567890,  # MP16-Pro
      "12345_abcdef.jpg": 12345,  # Flickr ID_SECRET
      "1000130297_5c0d3f0b09_1079_26286893@N00.jpg": 1000130297,  # Im2GPS3k
      "4000000123": 4000000123,  # YFCC100M info.txt photo id
      "4000000123.jpg": 4000000123,
      "a\\b\\77.png": 77,
      "earth_000123.png": -1, "5c0d3f0b09.jpg": -1, "123abc.jpg": -1, "": -1, "img_1.jpg": -1,
      "99999999999999999999.jpg": -1,  # beyond int64
  }
  assert {k: tfds_builders.photo_id(k) for k in cases} == cases
  np.testing.assert_array_equal(tfds_builders.photo_ids(list(cases)), list(cases.values()))


def test_osv5m_ids_are_not_flickr_photo_ids(tmp_path):
  lat, lon = earth.load_coordinates()
  manual = tmp_path / "manual"
  (manual / "images" / "test").mkdir(parents=True)
  crops = earth.crop_images(lat[:3], lon[:3], SIZE)
  with zipfile.ZipFile(manual / "images" / "test" / "00.zip", "w") as z:
    for k in range(3):
      z.writestr(f"{1000 + k}.jpg", jpeg(crops[k]))
  with open(manual / "test.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "latitude", "longitude", "country"])
    for k in range(3):
      writer.writerow([1000 + k, repr(float(lat[k])), repr(float(lon[k])), "fr"])
  tfds_builders.prepare("osv5m", str(manual), str(tmp_path / "data"), workers=1)
  index = tfds_source.TfdsSource(tfds_source.dataset_dir(str(tmp_path / "data"), "osv5m"), "test",
                                 SPEC).index_arrays()
  np.testing.assert_array_equal(index["photo_id"], [-1, -1, -1])  # numeric, but Mapillary ids
  np.testing.assert_array_equal(index["id_hash"], [oracle_hash(str(1000 + k)) for k in range(3)])


class _NoRecords:
  """A record reader that knows its length (metadata) and fails on any read."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitems__(self, indices):
    raise AssertionError("the record reader was used")

  def __getitem__(self, index):
    raise AssertionError("the record reader was used")


def test_all_tokens_reads_the_sidecar_not_the_records(world):
  written = world.written["mp16"]
  latlng = [[w["lat"], w["lon"]] for w in written]
  for spec in (SPEC, s2.TokenSpec(12, 3)):  # the stored spec, and another one (from the coordinates)
    source = tfds_source.TfdsSource(ddir(world, "mp16"), "train", spec)
    source._source = _NoRecords(len(source))  # pylint: disable=protected-access
    tokens = source.all_tokens()
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, oracle_tokens(latlng, spec.level, spec.group_size))
  # The reader does fail when used: the check above can catch a record read.
  source = tfds_source.TfdsSource(ddir(world, "mp16"), "train", SPEC)
  source._source = _NoRecords(len(source))  # pylint: disable=protected-access
  with pytest.raises(AssertionError, match="record reader"):
    source.get_batch(np.array([0]))


def test_data_prepared_before_sidecars_falls_back_then_prepare_backfills(world, tmp_path, monkeypatch):
  old = tmp_path / "old"
  shutil.copytree(world.data / "mp16", old / "mp16")
  dataset_dir = tfds_source.dataset_dir(str(old), "mp16")
  original = dict(np.load(os.path.join(dataset_dir, "index_train.npz"), allow_pickle=False))
  os.remove(os.path.join(dataset_dir, "index_train.npz"))
  source = tfds_source.TfdsSource(dataset_dir, "train", SPEC)
  assert not source.has_index
  np.testing.assert_array_equal(source.all_tokens(), original["tokens"])  # read from the records
  index = source.index_arrays()  # computed from the records, once
  for key in tfds_builders.INDEX_KEYS:
    np.testing.assert_array_equal(index[key], original[key], err_msg=key)
  source._source = _NoRecords(len(source))  # pylint: disable=protected-access
  assert source.index_arrays()["id_hash"] is index["id_hash"]  # kept: not computed again
  assert not os.path.exists(os.path.join(dataset_dir, "index_train.npz"))  # reading writes nothing
  # prepare() on the already prepared data writes the missing sidecar from the records.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("prepared again"))
  manual = world.root / "mp16"
  tfds_builders.prepare("mp16", str(manual), str(old), workers=1)
  with np.load(os.path.join(dataset_dir, "index_train.npz"), allow_pickle=False) as npz:
    for key in tfds_builders.INDEX_KEYS:
      np.testing.assert_array_equal(npz[key], original[key], err_msg=key)


def test_a_stale_sidecar_is_an_error(world, tmp_path):
  shutil.copytree(world.data / "im2gps3k", tmp_path / "im2gps3k")
  dataset_dir = tfds_source.dataset_dir(str(tmp_path), "im2gps3k")
  index = tfds_source.TfdsSource(dataset_dir, "test", SPEC).index_arrays()
  tfds_builders.write_index(dataset_dir, "test", {k: v[:-1] for k, v in index.items()}, SPEC)
  with pytest.raises(ValueError, match="stale sidecar"):
    tfds_source.TfdsSource(dataset_dir, "test", SPEC).all_tokens()


# ----------------------------------------------------------------------------
# 2. The Source protocol.


def test_every_source_satisfies_the_protocol(world):
  spec = SPEC
  tfds_one = tfds_source.TfdsSource(ddir(world, "im2gps3k"), "test", spec, image_size=SIZE)
  sources = [earth.EarthSource("test", spec, image_size=8), tfds_one, data.FirstRows(tfds_one, 3),
             subsets.Subset(tfds_one, [2, 0])]
  for source in sources:
    assert isinstance(source, data.Source), source
    inspect.signature(source.get_batch).bind(np.array([0]), positions=np.array([5]))
    batch = source.get_batch(np.array([0]), positions=np.array([5]))
    one = source[0]
    assert set(batch) == set(one)
    for key in batch:
      np.testing.assert_array_equal(batch[key][0], one[key], err_msg=key)
    assert not getattr(source, "augment", False)
  from geotoken_jax.data import source as source_module  # pylint: disable=g-import-not-at-top
  assert data.Source is source_module.Source  # re-exported
  assert not isinstance(object(), data.Source)
  assert not isinstance([1, 2], data.Source)  # no get_batch


# ----------------------------------------------------------------------------
# 3. Holdout slices and the leak filter.


def data_config(world, **kw):
  return {"name": "mp16", "data_dir": str(world.data), "image_size": SIZE, **kw}


@pytest.mark.parametrize("holdout", [
    {"fraction": 0.3, "by": "cell", "cell_level": 8, "salt": 0},
    {"fraction": 0.3, "by": "cell", "cell_level": 12, "salt": 5},
    {"fraction": 0.25, "by": "id", "cell_level": 8, "salt": 0},
    {"fraction": 0.5, "by": "id", "cell_level": 8, "salt": 123456789},
    {"fraction": 0.4, "by": "cell", "cell_level": 21, "salt": 0},  # finer than the stored tokens
])
def test_holdout_membership_is_the_rule_recomputed(world, holdout):
  config = data_config(world, holdout=holdout,
                       splits={"train": "mp16:train:rest", "validation": "mp16:train:holdout"})
  train = data.get_source(config, "train", SPEC)
  validation = data.get_source(config, "validation", SPEC)
  everything = data.get_source({**config, "splits": {}}, "train", SPEC)
  written = world.written["mp16"]
  expected = [oracle_held_out(w, holdout) for w in written]
  assert 0 < sum(expected) < len(written)  # both sides non-empty: the test can tell them apart
  held = [w["id"] for w, e in zip(written, expected) if e]
  rest = [w["id"] for w, e in zip(written, expected) if not e]
  assert len(validation) == len(held) and len(train) == len(rest)
  assert list(validation.get_batch(np.arange(len(validation)))["id"]) == held  # in record order
  assert list(train.get_batch(np.arange(len(train)))["id"]) == rest
  all_ids = list(everything.get_batch(np.arange(len(everything)))["id"])
  assert sorted(held + rest) == sorted(all_ids) and not set(held) & set(rest)
  assert isinstance(train, subsets.Subset) and train.rejected == 0 and train.leak_dropped == 0


def test_fit_slice_is_the_rule_recomputed_and_leaves_the_holdout_unchanged(world):
  holdout = {"fraction": 0.25, "by": "cell", "cell_level": 8, "salt": 7}
  with_fit = {**holdout, "fit_fraction": 0.3}
  written = world.written["mp16"]
  hashed = [py_splitmix64(oracle_cell(w["lat"], w["lon"], 8) ^ 7) for w in written]
  lo, hi = int(0.25 * 2**64), int(0.55 * 2**64)
  expected = {"holdout": [w["id"] for w, h in zip(written, hashed) if h < lo],
              "fit": [w["id"] for w, h in zip(written, hashed) if lo <= h < hi],
              "rest": [w["id"] for w, h in zip(written, hashed) if h >= hi]}
  assert all(expected.values())  # three non-empty parts: the test can tell them apart
  for part, ids in expected.items():
    source = data.get_source(data_config(world, holdout=with_fit, splits={"test": f"mp16:train:{part}"}),
                             "test", SPEC)
    assert list(source.get_batch(np.arange(len(source)))["id"]) == ids, part
  plain = data.get_source(data_config(world, holdout=holdout, splits={"test": "mp16:train:holdout"}), "test", SPEC)
  assert list(plain.get_batch(np.arange(len(plain)))["id"]) == expected["holdout"]  # fit_fraction moves no holdout row
  with pytest.raises(ValueError, match="fit_fraction"):
    data.get_source(data_config(world, holdout=holdout, splits={"test": "mp16:train:fit"}), "test", SPEC)
  with pytest.raises(ValueError, match="fit_fraction"):
    data.get_source(data_config(world, holdout={**holdout, "fit_fraction": 0.8}, splits={"test": "mp16:train:fit"}),
                    "test", SPEC)


def test_cell_holdout_keeps_cells_whole(world):
  holdout = {"fraction": 0.3, "by": "cell", "cell_level": 8, "salt": 0}
  config = data_config(world, holdout=holdout)
  cells = {}
  for part in ("holdout", "rest"):
    source = data.get_source({**config, "splits": {"test": f"mp16:train:{part}"}}, "test", SPEC)
    latlng = source.index_arrays()["latlng"]
    cells[part] = [oracle_cell(a, b, 8) for a, b in latlng]
  assert not set(cells["holdout"]) & set(cells["rest"])
  assert len(cells["holdout"]) > len(set(cells["holdout"]))  # cells with several rows, all held out together
  # Row mode splits at least one cell (with these rows): so the cell check above can fail.
  by_id = {"fraction": 0.5, "by": "id", "cell_level": 8, "salt": 0}
  split_cells = {}
  for part in ("holdout", "rest"):
    source = data.get_source({**data_config(world, holdout=by_id), "splits": {"test": f"mp16:train:{part}"}},
                             "test", SPEC)
    split_cells[part] = {oracle_cell(a, b, 8) for a, b in source.index_arrays()["latlng"]}
  assert split_cells["holdout"] & split_cells["rest"]


def test_holdout_config_is_checked(world):
  for bad, message in (({"fraction": 0}, "fraction"), ({"fraction": 1.0}, "fraction"), ({"by": "row"}, "by"),
                       ({"cell_level": 31}, "cell_level"), ({"fractoin": 0.1}, "unknown")):
    with pytest.raises(ValueError, match=message):
      data.get_source(data_config(world, holdout=bad, splits={"test": "mp16:train:holdout"}), "test", SPEC)
  with pytest.raises(ValueError, match="split part"):
    data.get_source(data_config(world, splits={"test": "mp16:train:heldout"}), "test", SPEC)


def test_subset_keeps_augmentation_semantics(world):
  config = data_config(world, holdout={"fraction": 0.3, "by": "id", "salt": 0}, augment=True,
                       splits={"train": "mp16:train:rest"})
  subset = data.get_source(config, "train", SPEC, seed=3)
  parent = data.get_source({**config, "splits": {}}, "train", SPEC, seed=3)
  assert subset.augment and parent.augment and len(subset) < len(parent)
  ids = list(parent.get_batch(np.arange(len(parent)))["id"])
  indices, positions = np.array([0, 3, 1, 3]), np.array([10, 11, 12, 13])
  got = subset.get_batch(indices, positions=positions)
  rows = np.array([ids.index(i) for i in got["id"]])
  want = parent.get_batch(rows, positions=positions)  # the parent's record, at the same stream position
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert not np.array_equal(got["image"][1], got["image"][3])  # one record, two positions, two crops
  # Through the training pipeline: a batch is the parent's rows at the stream's positions.
  batch = next(pipeline.train_iterator(subset, global_batch_size=4, seed=1))
  rows = np.array([ids.index(i) for i in batch["id"]])
  again = parent.get_batch(rows, positions=np.arange(4))
  for key in again:
    np.testing.assert_array_equal(batch[key], again[key], err_msg=key)


def expected_leaks(world, names) -> set[str]:
  """MP16 ids whose planted photo id is in the written rows of the named test splits."""
  test_pids = {r["pid"] for n in names for r in world.written[n.split(":")[0]] if r["pid"] >= 0}
  return {w["id"] for w in world.written["mp16"] if w["pid"] >= 0 and w["pid"] in test_pids}


@pytest.mark.parametrize("names", [("im2gps3k:test",), ("im2gps3k:test", "yfcc4k:test"), ("yfcc4k:test",)])
def test_leak_filter_drops_exactly_the_planted_shared_photos(world, names, caplog):
  leaks = expected_leaks(world, names)
  by_construction = {mp16_id(j)[0] for n in names for j in
                     {"im2gps3k:test": SHARED_IM2GPS, "yfcc4k:test": SHARED_YFCC}[n]}
  assert leaks == by_construction  # the rejected Im2GPS3k row (41) is not a leak
  assert mp16_id(SHARED_IM2GPS_REJECTED)[0] not in leaks
  with caplog.at_level(logging.INFO):
    source = data.get_source(data_config(world, leak_filter=names), "train", SPEC)
  ids = list(source.get_batch(np.arange(len(source)))["id"])
  assert ids == [w["id"] for w in world.written["mp16"] if w["id"] not in leaks]
  assert source.leak_dropped == len(leaks) > 0
  assert any(f"dropped {len(leaks)} of 58 training rows" in r.getMessage() for r in caplog.records)
  # Only the train role is filtered (the same split in another role is whole); training_tokens follows it.
  whole = data.get_source(data_config(world, leak_filter=names, splits={"validation": "mp16:train"}),
                          "validation", SPEC)
  assert len(whole) == 58 and getattr(whole, "leak_dropped", 0) == 0
  tokens = data.training_tokens(data_config(world, leak_filter=names), SPEC)
  kept = [[w["lat"], w["lon"]] for w in world.written["mp16"] if w["id"] not in leaks]
  np.testing.assert_array_equal(tokens, oracle_tokens(kept))


def test_leak_filter_with_holdout_and_without_ids(world, caplog):
  holdout = {"fraction": 0.3, "by": "cell", "cell_level": 8, "salt": 0}
  names = ("im2gps3k:test", "yfcc4k:test")
  config = data_config(world, holdout=holdout, leak_filter=names,
                       splits={"train": "mp16:train:rest", "validation": "mp16:train:holdout"})
  train = data.get_source(config, "train", SPEC)
  leaks = expected_leaks(world, names)
  rest = [w for w in world.written["mp16"] if not oracle_held_out(w, holdout)]
  assert list(train.get_batch(np.arange(len(train)))["id"]) == [w["id"] for w in rest if w["id"] not in leaks]
  assert train.leak_dropped == sum(w["id"] in leaks for w in rest)
  validation = data.get_source(config, "validation", SPEC)  # not filtered: a validation slice
  assert getattr(validation, "leak_dropped", 0) == 0
  assert len(validation) == sum(oracle_held_out(w, holdout) for w in world.written["mp16"])
  # geo_csv's ids carry no photo ids: nothing is dropped, and a line says so.
  with caplog.at_level(logging.INFO):
    source = data.get_source({"name": "geo_csv", "data_dir": str(world.data), "leak_filter": names},
                             "train", SPEC)
  assert source.leak_dropped == 0 and len(source) == 40
  assert any("no Flickr photo ids" in r.getMessage() for r in caplog.records)


def test_leak_filter_naming_an_unprepared_split_is_a_clear_error(world):
  for name in ("osv5m:test", "im2gps3k:validation"):
    with pytest.raises(ValueError, match=f"leak_filter names '{name}'.*not prepared"):
      data.get_source(data_config(world, leak_filter=("im2gps3k:test", name)), "train", SPEC)
  with pytest.raises(ValueError, match="DATASET:SPLIT"):
    data.get_source(data_config(world, leak_filter=("im2gps3k",)), "train", SPEC)


def photos_config(variant, data_dir):
  spec = importlib.util.spec_from_file_location("photos_config", os.path.join(REPO, "configs", "photos.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.data.data_dir = str(data_dir)
  return config


def test_mp16_config_validates_on_a_holdout_not_on_the_test_set(world):
  config = photos_config("mp16", world.data)
  assert config.data.splits.validation == "mp16:train:holdout" and config.data.splits.test == "im2gps3k:test"
  config.data.holdout.fraction = 0.3  # 58 rows: 1% would hold out nothing
  holdout = dict(config.data.holdout)
  train = data.get_source(config.data, "train", SPEC)
  validation = data.get_source(config.data, "validation", SPEC)
  test = data.get_source(config.data, "test", SPEC)
  leaks = expected_leaks(world, ("im2gps3k:test", "yfcc4k:test"))
  written = world.written["mp16"]
  assert list(validation.get_batch(np.arange(len(validation)))["id"]) == [
      w["id"] for w in written if oracle_held_out(w, holdout)]
  assert list(train.get_batch(np.arange(len(train)))["id"]) == [
      w["id"] for w in written if not oracle_held_out(w, holdout) and w["id"] not in leaks]
  assert train.augment and not validation.augment and train.leak_dropped > 0
  assert list(test.get_batch(np.arange(len(test)))["id"]) == [r["id"] for r in world.written["im2gps3k"]]


def test_tiny_holdout_config(world):
  config = photos_config("tiny_holdout", world.data)
  holdout = dict(config.data.holdout)
  assert holdout["by"] == "id"
  train = data.get_source(config.data, "train", SPEC)
  validation = data.get_source(config.data, "validation", SPEC)
  geo = world.written["geo_csv"]
  expected = [oracle_held_out(w, holdout) for w in geo]
  assert 0 < sum(expected) < len(geo)
  assert list(validation.get_batch(np.arange(len(validation)))["id"]) == [w["id"] for w, e in zip(geo, expected) if e]
  assert list(train.get_batch(np.arange(len(train)))["id"]) == [w["id"] for w, e in zip(geo, expected) if not e]
  # tiny is unchanged: the whole train split, validation on the test split.
  tiny = photos_config("tiny", world.data)
  assert len(data.get_source(tiny.data, "train", SPEC)) == 40
  assert len(data.get_source(tiny.data, "validation", SPEC)) == 8


# ----------------------------------------------------------------------------
# training_tokens.


def test_training_tokens_of_the_earth_benchmark():
  spec = s2.TokenSpec(level=10, group_size=2)
  tokens = data.training_tokens({"name": "earth"}, spec)
  lat, lon = earth.load_coordinates()
  rows = earth.split_indices("train")
  assert tokens.shape == (rows.size, spec.num_positions) and tokens.dtype == np.int32
  sample = np.random.default_rng(0).choice(rows.size, 400, replace=False)
  np.testing.assert_array_equal(tokens[sample], oracle_tokens(np.stack([lat[rows[sample]], lon[rows[sample]]], 1),
                                                              spec.level, spec.group_size))


def test_training_tokens_of_a_prepared_split_reads_no_record(world, monkeypatch):
  def no_reads(self, *args, **kwargs):
    raise AssertionError("a record was read")

  monkeypatch.setattr(tfds_source.TfdsSource, "get_batch", no_reads)
  monkeypatch.setattr(tfds_builders, "index_from_records", no_reads)
  tokens = data.training_tokens(data_config(world), SPEC)
  np.testing.assert_array_equal(tokens, oracle_tokens([[w["lat"], w["lon"]] for w in world.written["mp16"]]))


def test_subset_pickles_for_grain_workers_without_the_sidecar(world):
  import pickle  # pylint: disable=g-import-not-at-top

  config = data_config(world, holdout={"fraction": 0.3, "by": "cell", "cell_level": 8, "salt": 0},
                       augment=True, splits={"train": "mp16:train:rest"})
  subset = data.get_source(config, "train", SPEC, seed=2)
  assert subset.source._index is not None  # pylint: disable=protected-access  # loaded to pick the rows
  clone = pickle.loads(pickle.dumps(subset))
  assert clone.source._index is None  # pylint: disable=protected-access  # not shipped to workers
  indices, positions = np.arange(len(subset)), np.arange(len(subset)) + 100
  want, got = subset.get_batch(indices, positions=positions), clone.get_batch(indices, positions=positions)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_array_equal(clone.all_tokens(), subset.all_tokens())
