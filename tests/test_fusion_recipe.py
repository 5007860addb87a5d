"""The earth fusion recipe (configs/earth.py:fusion_smoke): a decoder that reads no neighbours
trains on the plain records (the gallery gets no lists of its own), tiny-image kNN and kNN-LM rows
on two regimes (the cell-blocked test split and the interleaved train:holdout slice, removed from
training and from the gallery), the learned reranker fitted on validation and the train:fit slice
(its validation row out-of-fold), and the strategy chosen on validation by the recipe's rule."""

from __future__ import annotations

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from geotoken_jax import data, embeddings, inference, metrics, recipe, reranking, s2
from geotoken_jax.decoding import selection
from geotoken_jax.inference.reranker import restore_reranker
from geotoken_jax.retrieval import neighbors, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(20, 2)


def load_config(variant):
  spec = importlib.util.spec_from_file_location("config_earth_fusion", os.path.join(REPO, "configs", "earth.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
  config = load_config("fusion_smoke")
  config.num_steps = 4
  config.checkpoint_every_steps = 4
  workdir = tmp_path_factory.mktemp("fusion")
  return config, workdir, recipe.run_recipe(config, str(workdir))


def test_the_decoder_trains_without_lists_and_the_gallery_is_not_self_searched(fusion_run):
  config, workdir, out = fusion_run
  assert not sources.model_reads_neighbors(config)
  assert "align" not in out["timings"]
  assert not (sources.neighbors_dir(config, workdir, "train") / neighbors.MANIFEST).exists()
  for split in ("validation", "test", "train:holdout"):
    assert (sources.neighbors_dir(config, workdir, split) / neighbors.MANIFEST).exists(), split


def test_the_interleaved_slices_are_out_of_training_and_out_of_the_gallery(fusion_run):
  config, workdir, _ = fusion_run
  train = data.get_source(config.data, "train", SPEC)  # train:rest
  held = data.get_source(config.data, "train:holdout", SPEC)
  fit = data.get_source(config.data, "train:fit", SPEC)  # where the reranker is fitted
  assert len(held) > 0 and len(train) > 0 and len(fit) > 0
  # Whole level-13 cells: no held-out or fit record shares a cell with a training (gallery) record
  # or with each other.
  def cells(source):
    latlng = np.asarray(source.get_batch(np.arange(len(source)))["latlng"], np.float64)
    return set(s2.latlng_to_cell_ids(latlng[:, 0], latlng[:, 1], 13).tolist())

  assert not cells(train) & cells(held) and not cells(train) & cells(fit) and not cells(fit) & cells(held)
  gallery = embeddings.open_embeddings(sources.embeddings_dir(config, workdir, "train"))
  assert gallery.num_records == len(train)


def test_the_chosen_row_is_the_validation_argmax_and_carries_the_test_figures(fusion_run):
  config, _, out = fusion_run
  results = out["results"]
  among = list(config.recipe.choose_among)
  mean = lambda row: np.mean([row[f"acc@{t}km"] for t in (25, 200, 750, 2500)])  # noqa: E731
  rerank = reranking.rerank_strategy(config)
  assert rerank in among
  scores = [mean(results[f"GeoToken {name}{' (out-of-fold)' if name == rerank else ''} (validation)"])
            for name in among]
  chosen = among[int(np.argmax(scores))]  # the first of equal means
  assert out["timings"]["chosen"]["strategy"] == chosen
  for split in ("test", "train:holdout"):
    assert results[f"chosen on validation: {chosen} ({split})"] == results[f"GeoToken {chosen} ({split})"]
  assert "chosen on validation: " + chosen + " (validation)" not in results
  for split in ("validation", "test", "train:holdout"):
    for label in ("kNN (tiny_image:16) knn:1", "GeoToken greedy", "oracle:nearest_train", "oracle:beam:3"):
      assert f"{label} ({split})" in results, (label, split)
    assert f"oracle:greedy ({split})" not in results and f"oracle:knn:1 ({split})" not in results  # pools of one
    # The nearest training location bounds every method.
    for name, row in results.items():
      if name.endswith(f"({split})") and not name.startswith("oracle:"):
        assert row["acc@25km"] <= results[f"oracle:nearest_train ({split})"]["acc@25km"] + 1e-9, name


def test_the_chosen_row_is_compared_with_its_baselines_on_the_same_images(fusion_run):
  config, workdir, out = fusion_run
  chosen = out["timings"]["chosen"]["strategy"]
  # Not on validation (where it was chosen, and the reranker fitted), on both test regimes.
  assert set(out["differences"]) == {"test", "train:holdout"}
  others = [n for n in config.recipe.compare_with if n != chosen]
  for split, entry in out["differences"].items():
    assert set(entry["differences"]) == set(others)
    assert (workdir / "reports" / f"differences_{split.replace(':', '-')}.md").read_text() == entry["table"]
    for other in others:  # the point estimate is the difference of the table's rows
      for stat in ("acc@25km", "acc@200km", "geoguessr"):
        delta = entry["differences"][other][stat]
        want = out["results"][f"GeoToken {chosen} ({split})"][stat] - out["results"][
            recipe._row_label(config, other) + f" ({split})"][stat]  # pylint: disable=protected-access
        assert delta["delta"] == pytest.approx(want, abs=1e-9), (split, other, stat)
        assert delta["low"] <= delta["delta"] <= delta["high"]
  bad = load_config("fusion_smoke")
  bad.recipe.compare_with = ("beam:7",)
  with pytest.raises(ValueError, match="compare_with names strategies the evaluation does not run"):
    recipe.run_recipe(bad, str(workdir / "never"))
  assert not (workdir / "never").exists()


def test_a_choice_among_strategies_not_evaluated_is_an_error():
  with pytest.raises(ValueError, match="did not run"):
    recipe.choose_strategy({"choose_among": ("greedy:knn_lambda=0.5",), "choose_on": "validation"},
                           {"validation": {"greedy": {}}})
  with pytest.raises(ValueError, match="not an evaluated split"):
    recipe.choose_strategy({"choose_among": ("greedy",), "choose_on": "validation"}, {"test": {"greedy": {}}})


def test_accuracy_by_score_buckets_by_rank():
  rng = np.random.default_rng(3)
  scores = rng.choice([0.1, 0.5, 0.5, 0.9], 103)  # ties across bucket edges
  distances = {"a": rng.uniform(0, 60, 103), "b": rng.uniform(0, 30, 103)}
  got = metrics.accuracy_by_score(scores, distances, threshold_km=25.0, buckets=4)
  order = sorted(range(103), key=lambda i: (scores[i], i))
  sizes = [26, 26, 26, 25]
  assert got["counts"] == sizes
  start = 0
  for b, size in enumerate(sizes):
    members = order[start:start + size]
    for name, d in distances.items():
      assert got[name][b] == pytest.approx(100.0 * sum(d[i] <= 25.0 for i in members) / size)
    assert got["edges"][b + 1] == scores[members[-1]]
    start += size
  with pytest.raises(ValueError, match="distances for"):
    metrics.accuracy_by_score(scores, {"a": np.zeros(5)})


def test_the_report_by_score_recounts_the_table(fusion_run):
  _, workdir, out = fusion_run
  report = json.loads((workdir / "reports" / "accuracy_by_score.json").read_text())
  for split in ("validation", "test", "train:holdout"):
    table = report[split]["acc@25km"]
    for label, row in (("kNN knn:1", f"kNN (tiny_image:16) knn:1 ({split})"), ("GeoToken greedy", f"GeoToken greedy ({split})")):
      mean = np.dot(table[label], table["counts"]) / np.sum(table["counts"])
      assert mean == pytest.approx(out["results"][row]["acc@25km"]), (split, label)
    assert (workdir / "reports" / f"accuracy_by_score_{split.replace(':', '-')}_25km.png").exists()


def test_the_reranker_row_is_out_of_fold_on_validation_and_the_predictor_scores_as_it_was_fitted(fusion_run):
  config, workdir, out = fusion_run
  name = reranking.rerank_strategy(config)
  directory = reranking.directory(config, workdir)
  saved = json.loads((directory / "reranker.json").read_text())
  out_of_fold = saved["fit"]["summary"]["out_of_fold"]
  assert set(out_of_fold) == {"validation", "train:fit"}
  assert out["results"][f"GeoToken {name} (out-of-fold) (validation)"] == out_of_fold["validation"]
  assert f"GeoToken {name} (validation)" not in out["results"]  # the in-sample row is never shown
  # The evaluation's rule rerank (features and scores inside the jitted predictor) picks what the
  # restored reranker picks from the pools it was fitted on (validation's, cached by the fit).
  # Snapped onto a retrieved location within the radius chosen on the out-of-fold scores.
  snap_km = saved["snap_km"]
  assert snap_km == saved["fit"]["summary"]["snap_km"] in [float(r) for r in reranking.reranker_config(config).snap_km]
  pools = dict(np.load(directory / "pools" / "validation.npz"))
  scores = np.asarray(selection.snap_to_retrieved(
      jnp.asarray(reranking.scores_of(restore_reranker(directory).model(), pools["features"])),
      jnp.asarray(pools["latlng"]), jnp.asarray(pools["valid"]), jnp.asarray(pools["neighbor_valid"]), snap_km))
  index = np.argmax(np.where(pools["valid"], scores, -np.inf), axis=1)
  expected = pools["latlng"][np.arange(len(index)), index]
  rows = sorted(inference.read_predictions(next((workdir / "eval").glob("validation-step*")) / "predictions" /
                                           (inference.file_name(name) + ".jsonl")), key=lambda r: r["index"])
  assert [r["index"] for r in rows] == sorted(pools["index"].tolist())
  order = np.argsort(pools["index"])
  got = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in rows])
  np.testing.assert_allclose(got, expected[order], atol=1e-4)


def test_the_rerank_command_keeps_a_reranker_fitted_with_the_same_settings(fusion_run, capsys):
  from geotoken_jax import command_line
  from geotoken_jax import rerank as rerank_command
  _, workdir, _ = fusion_run
  saved = json.loads((workdir / "reranker" / "reranker.json").read_text())
  capsys.readouterr()
  assert command_line.call(rerank_command.main, ["rerank", "--workdir", str(workdir)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["out_of_fold"] == json.loads(json.dumps(saved["fit"]["summary"]["out_of_fold"]))
  assert printed["strategy"].startswith("sample:4:0.7:rerank:")
  assert command_line.call(rerank_command.main, ["rerank"]) == 2
  assert "--workdir" in capsys.readouterr().err
