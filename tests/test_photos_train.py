"""The trainer and the evaluation job on a prepared TFDS data set named in the config."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from geotoken_jax import inference, trainer
from geotoken_jax.data import earth, tfds_builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photos_config(data_dir):
  spec = importlib.util.spec_from_file_location("photos_config", os.path.join(REPO, "configs", "photos.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """geo_csv with 40 train and 16 test rows; 2 test rows are bad (a missing image, NaN)."""
  root = tmp_path_factory.mktemp("photos")
  manual = root / "manual"
  (manual / "pics").mkdir(parents=True)
  lat, lon = earth.load_coordinates()
  rows = np.random.default_rng(0).choice(lat.size, 56, replace=False)
  crops = earth.crop_images(lat[rows], lon[rows], 40)
  for split, part in (("train", slice(0, 40)), ("test", slice(40, 56))):
    with open(manual / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["name", "y", "x", "cc"])
      for row, crop in zip(rows[part], crops[part]):
        Image.fromarray(crop).save(manual / "pics" / f"p{row}.jpg", quality=92)
        writer.writerow([f"p{row}.jpg", lat[row], lon[row], "ZZ"])
      if split == "test":
        writer.writerow(["absent.jpg", 10.0, 10.0, "ZZ"])
        writer.writerow([f"p{rows[40]}b.jpg", "nan", 10.0, "ZZ"])
  summaries = tfds_builders.prepare(
      "geo_csv", str(manual), str(root / "data"), workers=1, csv_files={"train": "train.csv", "test": "test.csv"},
      image_dir="pics", id_column="name", lat_column="y", lon_column="x", country_column="cc")
  return root, summaries


def test_train_and_evaluate_on_a_prepared_dataset(prepared, tmp_path):
  root, summaries = prepared
  assert summaries["train"]["written"] == 40 and summaries["test"]["written"] == 16
  assert summaries["test"]["rejected"] == {"missing_image": 1, "undecodable_image": 0, "bad_coordinates": 1,
                                           "duplicate_id": 0}
  config = photos_config(root / "data")
  workdir = tmp_path / "run"
  result = trainer.train_and_evaluate(config, str(workdir))
  assert result["step"] == 4 and result["test"]["images"] == 16
  saved = json.load(open(workdir / "results.json"))
  assert saved["config"]["data"]["name"] == "geo_csv"

  out = inference.run_evaluation(config, str(workdir), output_dir=str(tmp_path / "eval"), make_plots=False)
  for name, row in out["results"].items():
    # 16 evaluated, and the 2 rows rejected at preparation are reported as skipped.
    assert row["evaluated"] == 16 and row["skipped"] == 2, name
    # True countries come from the data's country column ("ZZ" matches no prediction).
    assert row["country_acc"] == 0.0 and row["country_unknown"] == 0
  rows = inference.read_predictions(os.path.join(out["output_dir"], "predictions", "greedy.jsonl"))
  assert all(r["true_country"] == "ZZ" for r in rows)
  with open(root / "manual" / "test.csv") as f:
    written_ids = [r["name"] for r in csv.DictReader(f)][:16]  # the 2 bad rows come last
  assert [r["id"] for r in rows] == written_ids


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = photos_config(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no prepared data set 'geo_csv'"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
