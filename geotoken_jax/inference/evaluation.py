"""The evaluation job: every strategy over a split (or any source) -> prediction files
(resumable), the results table and plots.

  run_evaluation       the job (what `geotoken evaluate` and the recipe run)
  nearest_train_rows   the nearest-training-location oracle (evaluate.oracles, --oracles)
  check_evaluation     the evaluate block's settings, checked before anything compiles
  prediction_rows, read_predictions, score_predictions, truth_countries   the JSONL rows
  write_plots, write_results                                              the outputs
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from geotoken_jax import data, geocode, metrics, plots, runtime, s2, sharding
from geotoken_jax.decoding import strategies
from geotoken_jax.decoding.strategies import Strategy
from geotoken_jax.inference.online_retrieval import evaluation_source
from geotoken_jax.inference.predictor import (ORACLE_PREFIX, Predictor, group_strategies, has_oracle, oracle_name,
                                              predict_batches)
from geotoken_jax.inference.reranker import fingerprint as reranker_fingerprint
from geotoken_jax.inference.reranker import restore_reranker
from geotoken_jax.inference.restore import (evaluate_config, load_run_config, restore_aligner, restore_model,
                                            token_spec)


def file_name(strategy_name: str) -> str:
  """A strategy name as a file name: sample:30:0.7:medoid -> sample-30-0.7-medoid."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", strategy_name.replace(":", "-"))


def _complete_rows(path: epath.Path) -> int:
  """Rows of a JSONL file, after cutting off a partly written last line."""
  if not path.exists():
    return 0
  content = path.read_bytes()
  end = content.rfind(b"\n") + 1
  if end != len(content):
    path.write_bytes(content[:end])
  return content[:end].count(b"\n")


def _truncate_rows(path: epath.Path, rows: int) -> None:
  lines = path.read_bytes().splitlines(keepends=True)
  if len(lines) != rows:
    path.write_bytes(b"".join(lines[:rows]))


def _token_string(tokens: np.ndarray) -> str:
  return "-".join(str(int(t)) for t in tokens)


def _json_id(value):
  return value.item() if isinstance(value, np.generic) else value


def valid_truth(latlng: np.ndarray) -> np.ndarray:
  truth = np.asarray(latlng, np.float64)
  return np.isfinite(truth).all(-1) & (np.abs(truth[:, 0]) <= 90) & (np.abs(truth[:, 1]) <= 180)


def prediction_rows(batch: dict, out: dict, mask: np.ndarray) -> list[dict]:
  """JSON rows for one gathered batch and one strategy (masked padding rows dropped)."""
  rows = []
  truth = batch["latlng"].astype(np.float64)
  predicted = out["predicted"].astype(np.float64)
  valid = valid_truth(truth)
  error = np.where(valid, metrics.haversine_km(np.where(valid[:, None], truth, 0), predicted), np.nan)
  for i in np.flatnonzero(mask):
    candidates = [{"lat": float(out["candidate_latlng"][i, j, 0]), "lon": float(out["candidate_latlng"][i, j, 1]),
                   "prob": float(out["candidate_prob"][i, j]),
                   "tokens": _token_string(out["candidate_tokens"][i, j])}
                  for j in range(out["candidate_prob"].shape[1]) if out["candidate_prob"][i, j] > 0]
    extra = {"true_country": str(batch["country"][i])} if "country" in batch else {}
    rows.append({
        **extra,
        "id": _json_id(batch["id"][i]) if "id" in batch else int(batch["index"][i]),
        "index": int(batch["index"][i]),
        "true_lat": float(truth[i, 0]) if valid[i] else None,
        "true_lon": float(truth[i, 1]) if valid[i] else None,
        "pred_lat": float(predicted[i, 0]), "pred_lon": float(predicted[i, 1]),
        "error_km": float(error[i]) if valid[i] else None,
        "chosen": int(out["chosen"][i]),
        "candidates": candidates,
    })
  return rows


# Oracle rows read the true location: upper bounds that say what a method could reach, never a
# method.  Opt-in (evaluate.oracles, --oracles); their names start with ORACLE_PREFIX "oracle:".
NEAREST_TRAIN = ORACLE_PREFIX + "nearest_train"


def nearest_train_rows(rows: list[dict], train_latlng: np.ndarray, spec: s2.TokenSpec) -> list[dict]:
  """The nearest-training-location oracle's prediction rows for the images of `rows` (any
  strategy's: their truth): each labelled image predicted at the training location nearest to
  its true location (metrics.nearest_locations: exact, float64 haversine; ties to the lower
  training row, named in `train_row`); an unlabelled image gets no prediction."""
  labelled = [i for i, r in enumerate(rows) if r["error_km"] is not None]
  truth = np.asarray([[rows[i]["true_lat"], rows[i]["true_lon"]] for i in labelled], np.float64).reshape(-1, 2)
  nearest, distance = (metrics.nearest_locations(truth, train_latlng) if labelled
                       else (np.zeros(0, np.int64), np.zeros(0)))
  predicted = np.asarray(train_latlng, np.float64)[nearest].reshape(-1, 2)
  tokens = s2.latlng_to_tokens(predicted[:, 0], predicted[:, 1], spec) if labelled else None
  found = {i: j for j, i in enumerate(labelled)}
  out = []
  for i, r in enumerate(rows):
    row = {k: r[k] for k in ("true_country", "id", "index", "true_lat", "true_lon") if k in r}
    j = found.get(i)
    if j is None:
      row.update(pred_lat=None, pred_lon=None, error_km=None, chosen=0, candidates=[])
    else:
      lat, lon = float(predicted[j, 0]), float(predicted[j, 1])
      row.update(pred_lat=lat, pred_lon=lon, error_km=float(distance[j]), chosen=0, train_row=int(nearest[j]),
                 candidates=[{"lat": lat, "lon": lon, "prob": 1.0, "tokens": _token_string(tokens[j])}])
    out.append(row)
  return out


def read_predictions(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def truth_countries(rows: list[dict]) -> np.ndarray:
  """ISO-2 codes of the evaluated rows' true locations: the data's own when it has
  them (OSV-5M), else reverse-geocoded (rows without a code stay unknown: "")."""
  evaluated = [r for r in rows if r["error_km"] is not None]
  truth = np.asarray([[r["true_lat"], r["true_lon"]] for r in evaluated], np.float64).reshape(-1, 2)
  if any(r.get("true_country") for r in evaluated):
    return np.asarray([r.get("true_country") or "" for r in evaluated], dtype=object)
  return geocode.country_codes(truth) if len(truth) else np.zeros(0, "<U2")


def score_predictions(rows: list[dict], true_countries: np.ndarray | None = None, *,
                      skipped_before: int = 0) -> dict:
  """The results row of one strategy from its prediction rows; `skipped_before` counts
  images rejected before evaluation (at data preparation); accuracies are over the
  evaluated images and `skipped` is reported beside them."""
  evaluated = [r for r in rows if r["error_km"] is not None]
  distances = np.asarray([r["error_km"] for r in evaluated], np.float64)
  predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in evaluated], np.float64).reshape(-1, 2)
  if true_countries is None:
    true_countries = truth_countries(rows)
  predicted_countries = geocode.country_codes(predicted) if len(predicted) else np.zeros(0, "<U2")
  return metrics.accuracy_table(distances, skipped=len(rows) - len(evaluated) + skipped_before,
                                predicted_countries=predicted_countries, true_countries=true_countries)


def check_evaluation(config, mesh, strategy_text: str | None = None) -> list[Strategy]:
  """Checks the evaluation settings before anything is compiled; returns the strategies."""
  eval_config = evaluate_config(config)
  spec = token_spec(config)
  wanted = strategies.parse_strategies(strategy_text or eval_config.strategies, spec)
  global_batch = int(eval_config.batch_size)
  divisor = sharding.global_batch_size_divisor(mesh)
  if global_batch < 1 or global_batch % divisor or global_batch % jax.process_count():
    raise ValueError(f"evaluate.batch_size {global_batch} must be a positive multiple of the mesh's "
                     f"{divisor} batch devices and of the {jax.process_count()} processes")
  if int(eval_config.num_candidates) < 1:
    raise ValueError(f"evaluate.num_candidates must be >= 1, got {eval_config.num_candidates}")
  return wanted


def run_evaluation(config: ml_collections.ConfigDict | None, workdir, *, strategy_text: str | None = None,
                   split: str | None = None, source=None, split_label: str | None = None,
                   step: int | None = None, output_dir=None, limit: int = 0, make_plots: bool = True,
                   devices=None, alignment_workdir: str | None = None, oracles: bool | None = None) -> dict:
  """Evaluates every strategy on a split of the config's data (or on `source`, named
  `split_label`); returns {"step", "split", "output_dir", "results": {name: row}, "timings"}.

  config None: the run's saved config.  Resumable: predictions are appended batch
  by batch, and a rerun continues where the shortest file ends.
  oracles (default evaluate.oracles): also the label-using upper-bound rows, named
  "oracle:...": each pool's best-of-pool oracle ("oracle:<pool>", e.g. oracle:sample:30:0.7,
  oracle:knn:10: the pool entry nearest to the truth, from Predictor(oracles=True), written and
  resumed like a strategy) and "oracle:nearest_train" (each image at the training split's
  location nearest to its true location: nearest_train_rows, computed from the truth after
  the strategies).
  """
  config = load_run_config(workdir, step) if config is None else config
  eval_config = evaluate_config(config)
  oracles = bool(eval_config.get("oracles", False)) if oracles is None else bool(oracles)
  mesh = sharding.create_mesh(config.mesh, devices)
  wanted = check_evaluation(config, mesh, strategy_text)
  process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = int(eval_config.batch_size)
  restored = restore_model(workdir, config=config, step=step, mesh=mesh)
  spec, step = restored.spec, restored.step
  if source is None:
    split = split or config.test_split
  else:
    split = split_label or split or "source"
  source, transform = evaluation_source(config, workdir, split, spec, mesh, source)
  if limit:
    source = data.FirstRows(source, limit)
  num_records = len(source)
  # Images rejected when the data set was prepared (missing, undecodable, ...)
  # are reported as skipped, so images + skipped is the metadata's row count.
  prepared_rejected = 0 if limit else int(getattr(source, "rejected", 0))
  output_dir = epath.Path(output_dir or epath.Path(workdir) / "eval" / f"{file_name(split)}-step{step}")
  # With oracles, the predictor also returns each pool's best-of-pool oracle (oracle:<pool>),
  # written and resumed like the strategies.
  pool_oracles = list(dict.fromkeys(oracle_name(g.pool) for g in group_strategies(wanted)
                                    if has_oracle(g.pool))) if oracles else []
  names = [s.name for s in wanted] + pool_oracles
  paths = {name: output_dir / "predictions" / (file_name(name) + ".jsonl") for name in names}
  reranked = [s.name for s in wanted if strategies.needs_reranker(s)]
  reranker_id = reranker_fingerprint(reranker_dir(workdir, eval_config)) if reranked else None
  if process_index == 0:
    _check_same_settings(output_dir, eval_config, alignment_workdir)
    _drop_stale_reranked(output_dir, reranked, reranker_id, paths)
    (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
    (output_dir / "run.json").write_text(json.dumps(
        {"checkpoint_step": step, "split": split, "records": num_records, "limit": limit,
         "strategies": [s.name for s in wanted], "oracles": pool_oracles + ([NEAREST_TRAIN] if oracles else []),
         "evaluate": eval_config.to_dict(), "reranker": reranker_id,
         "alignment_workdir": alignment_workdir or str(eval_config.alignment_workdir)}, indent=1))

  # Resume: every strategy restarts at the first batch that the shortest file
  # does not hold in full (rows past it are cut off).
  done = 0
  if process_index == 0:
    done = min(_complete_rows(p) for p in paths.values())
    if done > num_records:
      raise ValueError(f"{output_dir} holds {done} predictions for a split of {num_records}: "
                       "a different --limit? use another --output_dir")
    done = done if done == num_records else done // global_batch * global_batch
    for p in paths.values():
      if p.exists():
        _truncate_rows(p, done)
  done = int(multihost_utils.broadcast_one_to_all(np.int32(done))) if process_count > 1 else done
  num_batches = data.num_eval_batches(num_records, batch_size=global_batch // process_count,
                                      process_count=process_count)
  first_batch = num_batches if done == num_records else done // global_batch
  timings = {}
  if first_batch < num_batches:
    aligner = restore_aligner(config, mesh, wanted, alignment_workdir)
    reranker = None
    if any(strategies.needs_reranker(s) for s in wanted):
      reranker = restore_reranker(reranker_dir(workdir, eval_config), mesh)
    predictor = Predictor.from_restored(restored, wanted, num_candidates=int(eval_config.num_candidates),
                                        seed=int(eval_config.seed),
                                        cache_dir=epath.Path(workdir) / "cache" / "tries", aligner=aligner,
                                        oracles=oracles, reranker=reranker)
    if list(predictor.oracle_names) != pool_oracles:
      raise RuntimeError(f"the predictor's oracles {predictor.oracle_names} are not {pool_oracles}")
    bar = runtime.progress(num_batches, f"{len(wanted)} strategies", first_batch)
    files = {name: p.open("a") for name, p in paths.items()} if process_index == 0 else {}
    start, images = time.perf_counter(), 0
    try:
      for _, gathered, out in predict_batches(predictor, source, global_batch_size=global_batch,
                                              start_batch=first_batch, transform=transform):
        images += int(gathered["mask"].sum())
        for name, f in files.items():
          for row in prediction_rows(gathered, out[name], gathered["mask"].astype(bool)):
            f.write(json.dumps(row) + "\n")
          f.flush()
        if bar is not None:
          bar.update(1)
    finally:
      for f in files.values():
        f.close()
      if bar is not None:
        bar.close()
    timings["all_strategies"] = {"images": images, "seconds": time.perf_counter() - start}

  results = {}
  if process_index == 0:
    rows_of = {}
    true_countries = None
    for name in names:
      rows = rows_of[name] = read_predictions(paths[name])
      if len(rows) != num_records:
        raise RuntimeError(f"{name}: {len(rows)} predictions for {num_records} images in {paths[name]}")
      if true_countries is None:  # the same truth for every strategy: once
        true_countries = truth_countries(rows)
      results[name] = score_predictions(rows, true_countries, skipped_before=prepared_rejected)
    if oracles:  # from the truth of the rows above and the training split's locations
      rows = rows_of[NEAREST_TRAIN] = nearest_train_rows(rows_of[wanted[0].name],
                                                          data.training_locations(config.data, spec), spec)
      runtime.write_atomic(output_dir / "predictions" / (file_name(NEAREST_TRAIN) + ".jsonl"),
                           "".join(json.dumps(row) + "\n" for row in rows).encode())
      results[NEAREST_TRAIN] = score_predictions(rows, true_countries, skipped_before=prepared_rejected)
    if make_plots:
      write_plots(output_dir, rows_of, split=split, step=step, max_points=int(eval_config.plot_max_points))
    write_results(output_dir, results, split=split, step=step, timings=timings)
  return {"step": step, "split": split, "output_dir": str(output_dir), "results": results, "timings": timings}


def reranker_dir(workdir, eval_config) -> epath.Path:
  """evaluate.reranker_workdir, relative to the evaluated run's workdir unless absolute."""
  text = str(eval_config.get("reranker_workdir", "") or "")
  if not text:
    raise ValueError("rule rerank needs a fitted reranker: set evaluate.reranker_workdir (the recipe's rerank "
                     "stage fits one into W/reranker)")
  path = epath.Path(text)
  return path if path.is_absolute() or "://" in text else epath.Path(workdir) / text


# Settings that change predictions without changing the strategy names.
_RESUME_SETTINGS = ("alignment_workdir", "gallery", "gallery_limit", "fused_weight", "seed", "num_candidates",
                    "reranker_workdir")


def _check_same_settings(output_dir, eval_config, alignment_workdir) -> None:
  """A resumed evaluation must not append predictions made with other settings."""
  path = epath.Path(output_dir) / "run.json"
  if not path.exists():
    return
  old = json.loads(path.read_text()).get("evaluate", {})
  new = dict(eval_config.to_dict(), alignment_workdir=alignment_workdir or str(eval_config.alignment_workdir))
  old = dict(old, alignment_workdir=json.loads(path.read_text()).get("alignment_workdir", old.get("alignment_workdir", "")))
  changed = [k for k in _RESUME_SETTINGS if k in old and old[k] != new.get(k)]
  if changed:
    details = ", ".join(f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in changed)
    raise ValueError(f"{output_dir} holds predictions made with other settings ({details}); use another "
                     "--output_dir")


def _drop_stale_reranked(output_dir, reranked: list[str], reranker_id: str | None, paths) -> None:
  """Predictions of rule rerank made by another fit of the reranker (a refit under the same
  strategy name) are removed, with a warning, so the resumed evaluation recomputes them."""
  path = epath.Path(output_dir) / "run.json"
  if not reranked or not path.exists():
    return
  old_id = json.loads(path.read_text()).get("reranker")
  stale = [name for name in reranked if paths[name].exists()] if old_id != reranker_id else []
  if stale:
    logging.warning("%s: the reranker was refitted since %s were predicted (%s -> %s): predicting them again",
                    output_dir, ", ".join(stale), (old_id or "unrecorded")[:12], reranker_id[:12])
    for name in stale:
      paths[name].unlink()


def write_plots(output_dir: epath.Path, rows_of: Mapping[str, list[dict]], *, split: str, step: int,
                max_points: int) -> None:
  all_distances = {}
  for name, rows in rows_of.items():
    evaluated = [r for r in rows if r["error_km"] is not None]
    all_distances[name] = np.asarray([r["error_km"] for r in evaluated], np.float64)
    if not evaluated:  # nothing to draw: say so in the log, not with a crash
      logging.warning("%s: no evaluated image, no plots", name)
      continue
    plots.error_cdf({name: all_distances[name]}, str(output_dir / "plots" / f"cdf_{file_name(name)}.png"),
                    title=f"{name} ({split}, step {step})")
    truth = np.asarray([[r["true_lat"], r["true_lon"]] for r in evaluated])
    predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in evaluated])
    plots.world_map(truth, predicted, str(output_dir / "plots" / f"map_{file_name(name)}.png"),
                    title=f"{name}: prediction vs truth ({split}, step {step})", max_points=max_points)
  if any(len(d) for d in all_distances.values()):
    plots.error_cdf({k: v for k, v in all_distances.items() if len(v)}, str(output_dir / "plots" / "cdf.png"),
                    title=f"error CDF ({split}, step {step})")


def write_results(output_dir, results: dict, *, split: str, step: int, timings: dict) -> str:
  output_dir = epath.Path(output_dir)
  table = metrics.format_table(results)
  header = (f"# GeoToken evaluation: split `{split}`, checkpoint step {step}\n\n"
            "Haversine error on a 6371 km sphere; a hit is distance <= threshold. GeoGuessr = mean of "
            "5000 exp(-d / 1492.7 km). Countries: offline nearest-place reverse geocoding "
            "(geotoken_jax.geocode) of prediction and truth.\n\n")
  if any(name.startswith(ORACLE_PREFIX) for name in results):
    header += ("Rows named `oracle:...` read the true location: upper bounds, not methods "
               "(`oracle:nearest_train`: the training location nearest to the truth; `oracle:POOL`: the "
               "entry of a strategy's pool nearest to the truth).\n\n")
  (output_dir / "results.md").write_text(header + table + "\n")
  (output_dir / "results.json").write_text(json.dumps(
      {"split": split, "checkpoint_step": step, "results": results, "decode_timings": timings,
       "table": table}, indent=1))
  return table
