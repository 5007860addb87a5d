"""geotoken_jax.comparison and the report command: statistics as the evaluation computes them,
paired bootstrap intervals against a float64 loop, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geotoken_jax import comparison, geocode, metrics
from geotoken_jax import report as report_command
from geotoken_jax.inference.evaluation import file_name


def _rows(ids, rng, spread_deg):
  truth = np.stack([rng.uniform(-60, 70, len(ids)), rng.uniform(-170, 170, len(ids))], axis=1)
  pred = np.clip(truth + rng.normal(0, spread_deg, truth.shape), [-89, -179], [89, 179])
  error = metrics.haversine_km(pred, truth)
  return [{"id": int(i), "index": j, "true_lat": float(t[0]), "true_lon": float(t[1]), "pred_lat": float(p[0]),
           "pred_lon": float(p[1]), "error_km": float(e)} for j, (i, t, p, e) in enumerate(zip(ids, truth, pred, error))]


def _write_evaluation(workdir, split, variants, step=100):
  directory = workdir / "eval" / f"{split}-step{step}"
  (directory / "predictions").mkdir(parents=True)
  records = len(next(iter(variants.values())))
  (directory / "run.json").write_text(json.dumps({"split": split, "records": records, "strategies": list(variants),
                                                  "oracles": []}))
  for name, rows in variants.items():
    text = "".join(json.dumps(r) + "\n" for r in rows[::-1])  # any order: joined by id
    (directory / "predictions" / (file_name(name) + ".jsonl")).write_text(text)


def _percentile(values, q):
  """numpy's default (linear) percentile, by hand."""
  v = sorted(values)
  position = (len(v) - 1) * q / 100.0
  lo = int(np.floor(position))
  hi = min(lo + 1, len(v) - 1)
  return v[lo] + (v[hi] - v[lo]) * (position - lo)


def _oracle_statistic(name, errors, hits):
  errors = [float(e) for e in errors]
  if name.startswith("acc@"):
    t = float(name[4:-2])
    return 100.0 * sum(e <= t for e in errors) / len(errors)
  if name == "median_km":
    s = sorted(errors)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
  if name == "geoguessr":
    return sum(5000.0 * np.exp(-e / 1492.7) for e in errors) / len(errors)
  known = [h for h in hits if not np.isnan(h)]
  return 100.0 * sum(known) / len(known)


def test_statistics_are_the_evaluation_table_and_intervals_match_a_float64_loop():
  rng = np.random.default_rng(0)
  ids = rng.permutation(400) + 1000
  base_rows = _rows(ids, rng, 2.0)
  base = comparison.variant_from_rows("base", base_rows)
  better = comparison.variant_from_rows("better", _rows(ids, rng, 1.0))
  # The statistics are accuracy_table's on the same rows (countries reverse-geocoded as the evaluation does).
  order = np.argsort(ids)
  truth = np.asarray([[r["true_lat"], r["true_lon"]] for r in base_rows])[order]
  pred = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in base_rows])[order]
  table = metrics.accuracy_table(metrics.haversine_km(pred, truth), predicted_countries=geocode.country_codes(pred),
                                 true_countries=geocode.country_codes(truth))
  stats = comparison.statistics(base)
  for name in comparison.STATISTICS:
    assert stats[name] == pytest.approx(table[name], rel=1e-12), name
  samples, seed = 200, 7
  compared = comparison.compare({"base": base, "better": better}, "base", num_samples=samples, seed=seed)
  assert compared["base"]["vs_baseline"] is None
  got = compared["better"]["vs_baseline"]
  draws = np.random.default_rng(seed).integers(0, len(ids), size=(samples, len(ids)))
  for name in comparison.STATISTICS:
    deltas = [_oracle_statistic(name, better.error_km[d], better.country_hit[d])
              - _oracle_statistic(name, base.error_km[d], base.country_hit[d]) for d in draws]
    full = (_oracle_statistic(name, better.error_km, better.country_hit)
            - _oracle_statistic(name, base.error_km, base.country_hit))
    assert got[name]["delta"] == pytest.approx(full, rel=1e-9, abs=1e-9), name
    assert got[name]["low"] == pytest.approx(_percentile(deltas, 2.5), rel=1e-9, abs=1e-9), name
    assert got[name]["high"] == pytest.approx(_percentile(deltas, 97.5), rel=1e-9, abs=1e-9), name
  # Half the spread: a real gain at 200 km, told apart; a variant against itself is not.
  assert got["acc@200km"]["differs"] and got["acc@200km"]["delta"] > 0
  same = comparison.compare({"base": base, "copy": base}, "base", num_samples=50)["copy"]["vs_baseline"]
  assert not any(d["differs"] for d in same.values())


def test_variants_on_other_images_or_with_skipped_images_are_refused():
  rng = np.random.default_rng(1)
  a = comparison.variant_from_rows("a", _rows(np.arange(50), rng, 1.0))
  b = comparison.variant_from_rows("b", _rows(np.arange(1, 51), rng, 1.0))
  with pytest.raises(ValueError, match="different images"):
    comparison.compare({"a": a, "b": b}, "a")
  rows = _rows(np.arange(5), rng, 1.0)
  rows[2]["error_km"] = None
  with pytest.raises(ValueError, match="without an error"):
    comparison.variant_from_rows("skips", rows)


def test_the_report_command_reads_a_sweep_folder_and_refuses_mismatched_images(tmp_path, capsys):
  rng = np.random.default_rng(2)
  ids = np.arange(120)
  _write_evaluation(tmp_path / "g1", "test", {"knn:1": _rows(ids, rng, 3.0), "greedy": _rows(ids, rng, 1.0)})
  _write_evaluation(tmp_path / "g2", "test", {"greedy": _rows(ids, rng, 0.5)})
  _write_evaluation(tmp_path / "g2", "validation", {"greedy": _rows(ids[:10], rng, 0.5)})  # another split
  assert report_command.main([str(tmp_path), "--num_bootstrap", "100"]) == 0
  printed = capsys.readouterr().out
  assert "Difference from **g1/knn:1**" in printed  # knn:1 is the default baseline
  assert "| g2/greedy | 120 |" in printed
  saved = json.loads((tmp_path / "report" / "report_test.json").read_text())
  assert set(saved["variants"]) == {"g1/knn:1", "g1/greedy", "g2/greedy"}
  assert (tmp_path / "report" / "report_test.csv").read_text().count("\n") == 4
  assert (tmp_path / "report" / "report_test_accuracy_by_threshold.png").exists()
  _write_evaluation(tmp_path / "g3", "test", {"greedy": _rows(ids + 1, rng, 0.5)})
  assert report_command.main([str(tmp_path)]) == 2
  assert "different images" in capsys.readouterr().err
  assert report_command.main([str(tmp_path / "g1"), "--split", "train"]) == 2
  assert "no evaluation of split 'train'" in capsys.readouterr().err


def test_variants_differing_only_in_seed_report_their_spread(tmp_path, capsys):
  rng = np.random.default_rng(3)
  ids = np.arange(80)
  spreads = {"seed=0__model.dropout=0.1": 1.0, "seed=1__model.dropout=0.1": 2.0, "seed=2__model.dropout=0.1": 4.0,
             "seed=0__model.dropout=0.0": 1.5}
  for name, spread in spreads.items():
    _write_evaluation(tmp_path / name / "run", "test", {"greedy": _rows(ids, rng, spread)})
  assert report_command.main([str(tmp_path), "--num_bootstrap", "20"]) == 0
  assert "Spread over training seeds" in capsys.readouterr().out
  saved = json.loads((tmp_path / "report" / "report_test.json").read_text())
  group = saved["seed_spread"]["model.dropout=0.1/run/greedy"]  # the 0.0 variant has one seed: no group
  assert set(saved["seed_spread"]) == {"model.dropout=0.1/run/greedy"} and group["seeds"] == 3
  values = [saved["variants"][f"seed={s}__model.dropout=0.1/run/greedy"]["statistics"]["acc@200km"] for s in range(3)]
  assert group["acc@200km"]["mean"] == pytest.approx(np.mean(values))
  assert group["acc@200km"]["std"] == pytest.approx(np.std(values, ddof=1))
  assert (group["acc@200km"]["min"], group["acc@200km"]["max"]) == (min(values), max(values))
