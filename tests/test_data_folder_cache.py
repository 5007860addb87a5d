"""Lossless PNG export / storage, exact decoding at the stored size, and the
on-the-fly folder preparation cache.  Truth: EarthSource's crops (NumPy
gathers from Blue Marble), PIL decodes of the files written, NumPy slicing,
and what the fixtures were built to contain.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from geotoken_jax import s2
from geotoken_jax.data import earth, folder_cache, images, readers, tfds_builders, tfds_source

SPEC = s2.TokenSpec(level=20, group_size=2)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt, **kwargs)
  return out.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


# ----------------------------------------------------------------------------
# 4. Lossless export and storage.


def test_normalize_image_keeps_rgb_png_and_jpeg_converts_the_rest():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  png = encode(Image.fromarray(rgb), "PNG")
  out, width, height = images.normalize_image(png)
  assert out == png and (width, height) == (30, 20)  # byte for byte
  jpg = encode(Image.fromarray(rgb), "JPEG", quality=90)
  assert images.normalize_image(jpg)[0] == jpg
  for mode in ("L", "RGBA", "P", "LA"):
    other = encode(Image.fromarray(rgb).convert(mode), "PNG")
    out, _, _ = images.normalize_image(other)
    with Image.open(io.BytesIO(out)) as image:
      assert (image.format, image.mode) == ("JPEG", "RGB"), mode
  # An RGB PNG over max_side is resized, hence re-encoded (JPEG).
  out, width, height = images.normalize_image(png, max_side=15)
  assert (width, height) == (15, 10) and out[:2] == b"\xff\xd8"
  # Another RGB format (BMP) is converted too.
  assert images.normalize_image(encode(Image.fromarray(rgb), "BMP"))[0][:2] == b"\xff\xd8"


@pytest.mark.parametrize("shape", [(64, 64), (64, 80), (81, 64), (65, 64)])
def test_decode_resized_does_not_resample_at_the_stored_size(shape):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  h, w = shape
  top, left = (h - 64) // 2, (w - 64) // 2
  truth = pixels[top:top + 64, left:left + 64]  # the integer centre square
  for data in (encode(Image.fromarray(pixels), "PNG"), encode(Image.fromarray(pixels), "JPEG", quality=95)):
    decoded = pixels_of(data)[top:top + 64, left:left + 64]
    np.testing.assert_array_equal(images.decode_resized(data, 64), decoded)
  np.testing.assert_array_equal(images.decode_resized(encode(Image.fromarray(pixels), "PNG"), 64), truth)
  # At another size it still resizes (and noise is not preserved by bilinear resampling).
  assert images.decode_resized(encode(Image.fromarray(pixels), "PNG"), 32).shape == (32, 32, 3)


def test_export_cli_formats(tmp_path, capsys):
  ids = earth.split_indices("test")[:5]
  lat, lon = earth.load_coordinates()
  crops = earth.crop_images(lat[ids], lon[ids], 16)
  for fmt, args in (("jpg", []), ("png", ["--format", "png"])):
    out = tmp_path / fmt
    assert earth.main(["export", "--split", "test", "--output", str(out), "--limit", "5", "--image_size", "16"]
                      + args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 5 and summary["format"] == fmt
    with open(out / "test.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    assert [r["IMG_ID"] for r in rows] == [f"earth_{i:06d}.{fmt}" for i in ids]
    for r, crop in zip(rows, crops):
      with Image.open(out / "images" / r["IMG_ID"]) as image:
        assert image.format == {"jpg": "JPEG", "png": "PNG"}[fmt] and image.mode == "RGB"
        got = np.asarray(image)
      if fmt == "png":
        np.testing.assert_array_equal(got, crop)  # lossless
      else:
        assert 0 < np.abs(got.astype(int) - crop).mean() < 6  # JPEG: close, not exact
  with pytest.raises(SystemExit):
    earth.main(["export", "--split", "test", "--output", str(tmp_path / "x"), "--format", "gif"])


def test_prepared_png_export_reads_back_pixel_identical_to_earth_source(tmp_path):
  limit = 150
  earth.export("test", str(tmp_path / "export"), limit=limit, image_format="png")
  summaries = tfds_builders.prepare("geo_csv", str(tmp_path / "export"), str(tmp_path / "data"), workers=1,
                                    csv_files={"test": "test.csv"}, image_dir="images")
  assert summaries["test"]["written"] == limit and summaries["test"]["rejected_total"] == 0
  source = tfds_source.TfdsSource(tfds_source.dataset_dir(str(tmp_path / "data"), "geo_csv"), "test", SPEC,
                                  image_size=64)
  batch = source.get_batch(np.arange(len(source)))
  truth = earth.EarthSource("test", SPEC, image_size=64).get_batch(np.arange(limit))
  assert list(batch["id"]) == [earth.image_name(i, "png") for i in truth["id"]]  # the same records
  np.testing.assert_array_equal(batch["image"], truth["image"])  # pixel for pixel
  np.testing.assert_array_equal(batch["tokens"], truth["tokens"])
  np.testing.assert_array_equal(batch["latlng"], truth["latlng"])
  # The JPEG export (the default) is close but not identical: the PNG path is what makes it exact.
  earth.export("test", str(tmp_path / "jpg"), limit=10)
  tfds_builders.prepare("geo_csv", str(tmp_path / "jpg"), str(tmp_path / "jdata"), workers=1,
                        csv_files={"test": "test.csv"}, image_dir="images")
  jpg = tfds_source.TfdsSource(tfds_source.dataset_dir(str(tmp_path / "jdata"), "geo_csv"), "test", SPEC,
                               image_size=64).get_batch(np.arange(10))
  assert not np.array_equal(jpg["image"], truth["image"][:10])


# ----------------------------------------------------------------------------
# 5. prepare_folder: a labelled folder prepared once, cached.


@pytest.fixture
def folder(tmp_path):
  """An Im2GPS3k-layout folder: 12 rows, one missing image, one NaN latitude, one duplicate id."""
  ids = earth.split_indices("validation")[:12]
  lat, lon = earth.load_coordinates()
  crops = earth.crop_images(lat[ids], lon[ids], 16)
  image_dir = tmp_path / "photos" / "im2gps3ktest"
  image_dir.mkdir(parents=True)
  rows = []
  for k, i in enumerate(ids):
    name = f"{1000 + k}_{'ab' * 5}_1_1@N00.jpg"
    rows.append([name, repr(float(lat[i])), repr(float(lon[i]))])
    if k != 3:
      (image_dir / name).write_bytes(encode(Image.fromarray(crops[k]), "JPEG", quality=90))
  rows[5][1] = "nan"
  rows.append(list(rows[0]))  # a duplicate id
  csv_path = tmp_path / "photos" / "im2gps3k_places365.csv"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "AUTHOR", "LAT", "LON"])
    for r in rows:
      writer.writerow([r[0], "someone", r[1], r[2]])
  return csv_path, image_dir, tmp_path / "cache", rows


def test_prepare_folder_prepares_once_and_reuses(folder, monkeypatch):
  csv_path, image_dir, cache, rows = folder
  prepared = folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1)  # no column flags
  assert not prepared.reused and prepared.dataset == "geo_csv"
  assert prepared.summary["rows"] == 13 and prepared.summary["written"] == 10
  assert prepared.summary["rejected"] == {"missing_image": 1, "undecodable_image": 0, "bad_coordinates": 1,
                                          "duplicate_id": 1}
  assert os.listdir(cache) == [prepared.key]  # nothing else left behind
  dataset_dir = tfds_source.dataset_dir(prepared.data_dir, prepared.dataset)
  assert prepared.summary["data_dir"] == dataset_dir  # names the final folder, not the temporary one
  source = tfds_source.TfdsSource(dataset_dir, prepared.split, SPEC, image_size=16)
  assert source.rejected == 3 and source.summary == prepared.summary
  kept = [r for k, r in enumerate(rows[:12]) if k not in (3, 5)]
  batch = source.get_batch(np.arange(len(source)))
  assert list(batch["id"]) == [r[0] for r in kept]
  for image, r in zip(batch["image"], kept):
    np.testing.assert_array_equal(image, pixels_of((image_dir / r[0]).read_bytes()))
  np.testing.assert_array_equal(source.index_arrays()["photo_id"], [int(r[0].split("_")[0]) for r in kept])

  monkeypatch.setattr(tfds_builders, "prepare", lambda *a, **k: pytest.fail("prepared again"))
  again = folder_cache.prepare_folder(str(csv_path), str(image_dir), str(cache), workers=4)  # workers: not in key
  assert again.reused and again.key == prepared.key and again.data_dir == prepared.data_dir
  assert again.summary == prepared.summary


def test_any_change_makes_a_new_key(folder):
  csv_path, image_dir, cache, _ = folder
  first = folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1)
  keys = {first.key}

  def check_new(**kw):
    prepared = folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1, **kw)
    assert not prepared.reused and prepared.key not in keys
    keys.add(prepared.key)
    return prepared

  name = sorted(os.listdir(image_dir))[0]
  stat = os.stat(image_dir / name)
  os.utime(image_dir / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # touched: same bytes, new time
  check_new()
  (image_dir / "extra.jpg").write_bytes((image_dir / name).read_bytes())  # an image added (not in the CSV)
  check_new()
  missing = next(r for r in csv.reader(open(csv_path)) if r[0].startswith("1003_"))[0]
  (image_dir / missing).write_bytes((image_dir / name).read_bytes())  # the missing image appears
  prepared = check_new()
  assert prepared.summary["rejected"]["missing_image"] == 0 and prepared.summary["written"] == 11
  csv_path.write_text(csv_path.read_text().replace("someone", "someone else"))  # the CSV edited
  check_new()
  check_new(level=10, group_size=2)  # another token spec
  check_new(max_side=8)
  with pytest.raises(ValueError, match="no column"):
    folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1, id_column="name")
  assert len(keys) == 7 and sorted(p for p in os.listdir(cache)) == sorted(keys)


def test_an_interrupted_preparation_is_never_reused(folder, monkeypatch):
  csv_path, image_dir, cache, _ = folder
  calls = []
  original_get = readers.FolderImages.get

  def failing_get(self, image_id):
    calls.append(image_id)
    if len(calls) == 6:
      raise KeyboardInterrupt("interrupted")
    return original_get(self, image_id)

  with monkeypatch.context() as m:
    m.setattr(readers.FolderImages, "get", failing_get)
    with pytest.raises(KeyboardInterrupt):
      folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1)
  assert len(calls) == 6 and os.listdir(cache) == []  # no cache entry, no temporary folder left
  # A leftover folder under the key without the completion marker (say, a crash during an
  # older version's copy) is not reused either: prepared again and replaced.
  key = folder_cache.cache_key(os.path.abspath(csv_path), os.path.abspath(image_dir), {
      "id_column": None, "lat_column": None, "lon_column": None, "country_column": None,
      "swap_latlon": False, "level": 20, "group_size": 2, "max_side": 0})
  (cache / key / "geo_csv").mkdir(parents=True)
  prepared_calls = []
  original = tfds_builders.prepare
  monkeypatch.setattr(tfds_builders, "prepare", lambda *a, **k: prepared_calls.append(1) or original(*a, **k))
  prepared = folder_cache.prepare_folder(csv_path, image_dir, cache, workers=1)
  assert prepared_calls == [1] and prepared.key == key and prepared.summary["written"] == 10
  assert os.listdir(cache) == [key]
  assert len(tfds_source.TfdsSource(tfds_source.dataset_dir(prepared.data_dir, "geo_csv"), "test", SPEC)) == 10


def test_custom_columns_and_swapped_headers(tmp_path):
  ids = earth.split_indices("test")[:4]
  lat, lon = earth.load_coordinates()
  crops = earth.crop_images(lat[ids], lon[ids], 16)
  (tmp_path / "img").mkdir()
  with open(tmp_path / "c.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "y", "x", "cc"])
    for k, i in enumerate(ids):
      writer.writerow([f"p{k}", repr(float(lat[i])), repr(float(lon[i])), "de"])
      (tmp_path / "img" / f"p{k}.png").write_bytes(encode(Image.fromarray(crops[k]), "PNG"))
  prepared = folder_cache.prepare_folder(tmp_path / "c.csv", tmp_path / "img", tmp_path / "cache", id_column="name",
                                         lat_column="y", lon_column="x", country_column="cc", workers=1)
  source = tfds_source.TfdsSource(tfds_source.dataset_dir(prepared.data_dir, "geo_csv"), "test", SPEC,
                                  image_size=16)
  batch = source.get_batch(np.arange(4))
  np.testing.assert_array_equal(batch["image"], crops)  # PNG kept: exact
  assert list(batch["country"]) == ["DE"] * 4
  np.testing.assert_array_equal(batch["latlng"], np.stack([lat[ids], lon[ids]], 1).astype(np.float32))
