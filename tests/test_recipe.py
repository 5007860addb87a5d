"""The paper's recipe (configs/paper.py:fixture) end to end on fixture-sized data: a prepared
geo_csv data set, a tiny random CLIP written by transformers, every stage (align, embed, index,
train, evaluate), a rerun that skips them, and predictions for a folder of new images (embedded
and searched inside inference)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from geotoken_jax import data, embeddings, inference, recipe
from geotoken_jax.data import earth, tfds_builders
from geotoken_jax.retrieval import neighbors, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paper_config(variant: str):
  spec = importlib.util.spec_from_file_location("paper_config", os.path.join(REPO, "configs", "paper.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tiny_clip(path) -> str:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14,
                                         hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
  transformers.CLIPVisionModelWithProjection(config).eval().save_pretrained(path)
  return os.path.join(path, "model.safetensors")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("paper")
  manual = root / "manual"
  (manual / "pics").mkdir(parents=True)
  lat, lon = earth.load_coordinates()
  rows = np.random.default_rng(0).choice(lat.size, 64, replace=False)
  crops = earth.crop_images(lat[rows], lon[rows], 40)
  for split, part in (("train", slice(0, 48)), ("test", slice(48, 60))):
    with open(manual / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["name", "y", "x", "cc"])
      for row, crop in zip(rows[part], crops[part]):
        Image.fromarray(crop).save(manual / "pics" / f"p{row}.jpg", quality=92)
        writer.writerow([f"p{row}.jpg", lat[row], lon[row], "ZZ"])
  tfds_builders.prepare("geo_csv", str(manual), str(root / "data"), workers=1,
                        csv_files={"train": "train.csv", "test": "test.csv"}, image_dir="pics", id_column="name",
                        lat_column="y", lon_column="x", country_column="cc")
  config = paper_config("fixture")
  config.data.data_dir = str(root / "data")
  config.recipe.alignment.data.data_dir = str(root / "data")
  config.recipe.alignment.model.clip.weights = tiny_clip(str(root / "clip"))
  workdir = root / "run"
  out = recipe.run_recipe(config, str(workdir))
  new_images = root / "new"
  new_images.mkdir()
  for i, crop in enumerate(crops[60:]):  # never prepared, embedded or indexed
    Image.fromarray(crop).save(new_images / f"new{i}.jpg", quality=92)
  return config, workdir, out, new_images, rows[60:]


def test_every_stage_runs_and_the_table_has_decoder_and_knn_rows(recipe_run):
  config, workdir, out, _, _ = recipe_run
  assert set(out["timings"]) >= {"align", "embed_train", "embed_test", "index", "train", "evaluate_test"}
  for split in ("train", "validation", "test"):
    lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, split))
    assert lists.indices.shape == (48 if split == "train" else 12, config.retrieval.search_k)
  train_lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, "train"))
  assert not (train_lists.indices == np.arange(48)[:, None]).any()  # never itself
  assert out["index"]["train"]["excluded_in_top_k"]["same_id"] == 48  # each photo was its own rank 0
  names = set(out["results"])
  for strategy in ("greedy", "beam:3", "knn:1", "knn:4:wvote"):
    label = f"kNN (aligner embeddings) {strategy}" if strategy.startswith("knn:") else f"retrieval GeoToken {strategy}"
    row = out["results"][label]
    assert row["evaluated"] == 12, strategy
  saved = json.loads((workdir / "recipe.json").read_text())
  assert set(saved["results"]) == names


def test_knn_1_is_the_top_neighbours_location(recipe_run):
  config, workdir, out, _, _ = recipe_run
  lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, "test"))
  gallery = sources.load_neighbor_gallery(config, workdir, inference.token_spec(config))
  rows = inference.read_predictions(workdir / "eval" / "test-step4" / "predictions" / "knn-1.jsonl")
  predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in rows])
  np.testing.assert_allclose(predicted, gallery.latlng[lists.indices[:, 0]], atol=1e-4)


def test_a_rerun_skips_every_finished_stage(recipe_run):
  config, workdir, out, _, _ = recipe_run
  again = recipe.run_recipe(config, str(workdir))
  assert "align" not in again["timings"] and "train" not in again["timings"]
  # The stores were written by the aligner as it is (workdir, step, parameter checksum): kept.
  assert not [name for name in again["timings"] if name.startswith("embed_")]
  assert again["results"] == out["results"]


def test_the_retrieval_model_predicts_on_a_folder_of_new_images(recipe_run):
  config, workdir, _, folder, _ = recipe_run
  restored = inference.restore_model(str(workdir))
  paths = inference.list_images([str(folder)])
  for strategy in ("greedy", "knn:1"):
    predictions = list(inference.predict_files(restored, paths, strategy_text=strategy, top_k=2, batch_size=8))
    assert len(predictions) == 4 and all(p.error is None and p.candidates for p in predictions), strategy
  # The neighbours found online for test images equal their stored lists: the same search,
  # inside inference.
  online = inference.OnlineRetrieval(config, str(workdir), restored.spec, restored.mesh)
  batch = sources.get_source(config, str(workdir), "test", restored.spec).get_batch(np.arange(8))
  images = data.get_source(config.data, "test", restored.spec,  # the aligner's (CLIP) resize mode
                           resize=data.image_resize_mode(config)).get_batch(np.arange(8))["image"]
  lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, "test"))
  found = online({"image": images, "index": np.arange(8, dtype=np.int32)})
  np.testing.assert_array_equal(found["neighbor_tokens"], batch["neighbor_tokens"])
  np.testing.assert_allclose(found["neighbor_scores"], lists.scores[:8, :config.retrieval.k], atol=2e-3)
  # Test time reads no label: a labelled batch (evaluate) gets what an unlabelled one (predict)
  # gets, whatever its labels, even under label rules that would delete every neighbour.
  labelled = config.copy_and_resolve_references()
  labelled.retrieval.update(group="s2_cell:0", duplicate_km=20_000.0, duplicate_similarity=-1.0)
  strict = inference.OnlineRetrieval(labelled, str(workdir), restored.spec, restored.mesh)
  truth = data.get_source(config.data, "test", restored.spec).get_batch(np.arange(8))["latlng"]
  for latlng in (truth, truth[np.random.default_rng(0).permutation(8)]):
    again = strict({"image": images, "index": np.arange(8, dtype=np.int32), "latlng": latlng})
    for field in ("neighbor_tokens", "neighbor_scores"):
      np.testing.assert_array_equal(again[field], found[field])


def test_a_retrained_aligner_re_embeds_every_store_and_rebuilds_the_lists(recipe_run, tmp_path, monkeypatch, capsys):
  """Same record counts, other parameters: every store is re-embedded (the log says why), the
  lists are rebuilt in the new stores, and online retrieval refuses the old aligner against them."""
  config, workdir, _, _, _ = recipe_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)  # the fixture's workdir stays as it is for the other tests
  for split in ("train", "validation", "test"):  # as if embedded here (a moved aligner re-embeds too)
    path = sources.embeddings_dir(config, run, split) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["extra"]["workdir"] = str(sources.alignment_workdir(config, run))
    path.write_text(json.dumps(manifest))
  before = {}
  for split in ("train", "validation", "test"):
    old = embeddings.open_embeddings(sources.embeddings_dir(config, run, split))
    before[split] = (old.num_records, embeddings.aligner_identity(old.manifest)["params"], np.array(old.field("image")))
  restore_model = inference.restore_model
  retrained = {}

  def restore_retrained(path, **kwargs):  # the aligner as if trained further: every parameter moved
    model = restore_model(path, **kwargs)
    model = dataclasses.replace(model, params=jax.tree.map(lambda x: x * 1.01, model.params))
    retrained.update(model.identity())
    return model

  monkeypatch.setattr(recipe.inference, "restore_model", restore_retrained)
  out = recipe.run_recipe(config, str(run))
  log = capsys.readouterr().out
  assert {"embed_train", "embed_validation", "embed_test"} <= set(out["timings"])
  assert "re-embedding: written by another aligner (params: " in log and "holds a GeoToken model" in log
  for split, (records, params, image) in before.items():
    store = embeddings.open_embeddings(sources.embeddings_dir(config, run, split))
    assert store.num_records == records  # the same count: a count check alone would have kept it
    assert embeddings.aligner_identity(store.manifest)["params"] == retrained["params"] != params
    assert not np.array_equal(store.field("image"), image)
    lists = neighbors.open_neighbors(sources.neighbors_dir(config, run, split))
    assert lists.query_identity["checksum"] == neighbors.store_identity(store)["checksum"]
  assert log.count("rebuilding the lists") == 3
  # The unchanged aligner (restored by online retrieval itself) against the new gallery: refused.
  restored = restore_model(str(run))
  with pytest.raises(sources.AlignerMismatchError, match="params: "):
    inference.OnlineRetrieval(config, str(run), restored.spec, restored.mesh)
