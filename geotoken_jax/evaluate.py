"""Evaluate a trained GeoToken checkpoint under several inference strategies.

  python -m geotoken_jax.evaluate --config configs/earth.py --workdir workdirs/earth \
      --strategies greedy,beam:5,sample:30:0.7:logprob,sample:30:0.7:vote,sample:30:0.7:medoid \
      [--split test] [--step N] [--output_dir DIR] [--limit N]

Loads the parameters of the latest (or --step) checkpoint in WORKDIR/checkpoints
onto the config's mesh, then for every strategy (see geotoken_jax.decoding.strategies)
runs one sharded, jitted decode over the split and writes, under
WORKDIR/eval/SPLIT-stepSTEP (or --output_dir):

  results.md / results.json   one row per strategy: acc% @ 1/25/200/750/2500 km,
                              median / mean km, GeoGuessr score, country accuracy,
                              images evaluated and skipped
  predictions/NAME.jsonl      per image: id, truth, prediction, error, countries,
                              top-k candidate cells with normalized probabilities
  plots/cdf.png, plots/cdf_NAME.png, plots/map_NAME.png
                              error CDFs and predictions vs truth over Blue Marble

Strategies that share a pool (sample:30:0.7 with different selection rules)
decode it once.  Resumable: predictions are appended batch by batch, and a
rerun continues each strategy where its file ends (a finished strategy is
only re-scored), so a preempted evaluation loses at most one batch.
Images whose true coordinates are invalid are written, counted as skipped and
left out of the metrics; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import checkpoint, data, geocode, metrics, models, plots, s2, sharding
from geotoken_jax import train  # noqa: F401  (its --config / --workdir / distributed flags)
from geotoken_jax.decoding import CellTrie, build_cell_trie, strategies
from geotoken_jax.decoding.strategies import Strategy

_STRATEGIES = flags.DEFINE_string("strategies", None, "comma-separated strategies (default: the "
                                  "config's evaluate.strategies)")
_SPLIT = flags.DEFINE_string("split", None, "split to evaluate (default: the config's test_split)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "default WORKDIR/eval/SPLIT-stepSTEP")
_LIMIT = flags.DEFINE_integer("limit", 0, "evaluate only the first N images (0 = all)")
_PLOTS = flags.DEFINE_bool("plots", True, "write the CDF and world-map plots")

DEFAULTS = ml_collections.ConfigDict({
    "strategies": "greedy,beam:5",
    "batch_size": 128,  # global images per decode batch
    "num_candidates": 5,
    "seed": 0,  # sampling keys: fold_in(key(seed), image index)
    "plot_max_points": 2000,
})


def evaluate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's `evaluate` block over DEFAULTS."""
  merged = ml_collections.ConfigDict(DEFAULTS.to_dict())
  if "evaluate" in config:
    merged.update(config.evaluate.to_dict())
  return merged


def file_name(strategy_name: str) -> str:
  """A strategy name as a file name: sample:30:0.7:medoid -> sample-30-0.7-medoid."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", strategy_name.replace(":", "-"))


# ---------------------------------------------------------------------------
# Model and parameters.


def load_params(config, workdir: str, spec: s2.TokenSpec, mesh, step: int | None = None):
  """(graphdef, params on the config's param shardings, checkpoint step)."""
  build = lambda: models.build_model(config.model, spec, rngs=nnx.Rngs(config.seed))  # noqa: E731
  graphdef, abstract = nnx.split(nnx.eval_shape(build), nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  target = checkpoint.abstract_like(abstract, shardings)
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target, step)
  return graphdef, params, shardings, step


def training_tokens(source) -> np.ndarray:
  """The S2 tokens of every record of a source (for the cell trie)."""
  if hasattr(source, "all_tokens"):
    return source.all_tokens()
  if hasattr(source, "tokens"):
    return np.asarray(source.tokens)
  chunks = [data.load_rows(source, np.arange(i, min(i + 4096, len(source))))["tokens"]
            for i in range(0, len(source), 4096)]
  return np.concatenate(chunks)


def build_tries(config, spec, wanted: Sequence[Strategy]) -> dict[tuple[int, int], CellTrie]:
  keys = sorted({(s.trie_min_count, s.trie_positions(spec)) for s in wanted if s.trie_min_count})
  if not keys:
    return {}
  tokens = training_tokens(data.get_source(config.data, "train", spec))
  return {(m, n): build_cell_trie(tokens, spec, min_count=m, num_constrained=n) for m, n in keys}


def make_decode_fn(graphdef, spec: s2.TokenSpec, pool_strategy: Strategy, rules: Sequence[str],
                   num_candidates: int, seed: int, trie: CellTrie | None):
  """(params, batch) -> per rule: prediction and top-k candidates (tokens, centres, probabilities)."""

  def fn(params, batch):
    model = nnx.merge(graphdef, params)
    memory = model.encode(batch, deterministic=True)  # once per image
    keys = strategies.image_keys(seed, batch["index"])
    pool = strategies.decode_pool(model, memory, pool_strategy, keys, trie)
    out = {}
    for rule in rules:
      chosen = strategies.choose(pool, rule, num_candidates)
      index = jnp.maximum(chosen["candidates"], 0)  # [batch, k]; -1 slots have probability 0
      out[rule] = {
          "predicted": chosen["predicted"],  # [batch, 2]
          "chosen": chosen["chosen"],  # [batch]
          "candidate_tokens": jnp.take_along_axis(pool["tokens"], index[:, :, None], axis=1),
          "candidate_latlng": jnp.take_along_axis(pool["latlng"], index[:, :, None], axis=1),
          "candidate_prob": chosen["candidate_prob"],  # [batch, k]
      }
    return out

  return fn


# ---------------------------------------------------------------------------
# Prediction files.


def _complete_rows(path: str) -> int:
  """Rows of a JSONL file, after truncating a partly written last line."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb+") as f:
    content = f.read()
    end = content.rfind(b"\n") + 1
    if end != len(content):
      f.truncate(end)
  return content[:end].count(b"\n")


def _truncate_rows(path: str, rows: int) -> None:
  with open(path, "rb") as f:
    lines = f.readlines()[:rows]
  with open(path, "wb") as f:
    f.writelines(lines)


def _token_string(tokens: np.ndarray) -> str:
  return "-".join(str(int(t)) for t in tokens)


def _json_id(value):
  return value.item() if isinstance(value, np.generic) else value


def prediction_rows(batch: dict, out: dict, mask: np.ndarray) -> list[dict]:
  """JSON rows for one gathered batch and one rule (masked padding rows dropped)."""
  rows = []
  truth = batch["latlng"].astype(np.float64)
  predicted = out["predicted"].astype(np.float64)
  valid_truth = np.isfinite(truth).all(-1) & (np.abs(truth[:, 0]) <= 90) & (np.abs(truth[:, 1]) <= 180)
  error = np.where(valid_truth, metrics.haversine_km(np.where(valid_truth[:, None], truth, 0), predicted),
                   np.nan)
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
        "true_lat": float(truth[i, 0]) if valid_truth[i] else None,
        "true_lon": float(truth[i, 1]) if valid_truth[i] else None,
        "pred_lat": float(predicted[i, 0]), "pred_lon": float(predicted[i, 1]),
        "error_km": float(error[i]) if valid_truth[i] else None,
        "chosen": int(out["chosen"][i]),
        "candidates": candidates,
    })
  return rows


def _host_field(source, local: dict, key: str, index: np.ndarray, process_count: int) -> np.ndarray:
  """A field of every row of the global batch on this process (numeric: all-gathered;
  text: this process's rows, the others' read from the source)."""
  values = np.asarray(local[key])
  if process_count == 1:
    return values
  if values.dtype.kind in "biuf":
    return np.asarray(multihost_utils.process_allgather(values, tiled=True))
  rows = np.minimum(index, len(source) - 1)
  return np.asarray(data.load_rows(source, rows)[key])


def read_predictions(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class _Group:
  """Strategies that share one decoded pool."""
  pool: Strategy
  members: list[Strategy]


def _groups(wanted: Sequence[Strategy]) -> list[_Group]:
  groups: dict[Strategy, _Group] = {}
  for s in wanted:
    groups.setdefault(s.pool_key, _Group(s.pool_key, [])).members.append(s)
  return list(groups.values())


def _progress(total: int, desc: str, initial: int):
  """A tqdm bar on process 0 (batches, images/s, ETA); on a non-terminal only for long runs."""
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True,
              disable=not sys.stderr.isatty() and total < 50, mininterval=5 if not sys.stderr.isatty() else 0.1)


def run_evaluation(config: ml_collections.ConfigDict, workdir: str, *, strategy_text: str | None = None,
                   split: str | None = None, step: int | None = None, output_dir: str | None = None,
                   limit: int = 0, make_plots: bool = True, devices=None) -> dict:
  """Evaluates every strategy; returns {"step", "split", "output_dir", "results": {name: row},
  "timings"}.  The mesh is the config's over `devices` (default: all)."""
  eval_config = evaluate_config(config)
  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  wanted = strategies.parse_strategies(strategy_text or eval_config.strategies, spec)
  split = split or config.test_split
  mesh = sharding.create_mesh(config.mesh, devices)
  process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = int(eval_config.batch_size)
  if global_batch % sharding.global_batch_size_divisor(mesh) or global_batch % process_count:
    raise ValueError(f"evaluate.batch_size {global_batch} must divide over "
                     f"{sharding.global_batch_size_divisor(mesh)} devices and {process_count} processes")

  graphdef, params, param_shardings, step = load_params(config, workdir, spec, mesh, step)
  source = data.get_source(config.data, split, spec)
  if limit:
    source = data.FirstRows(source, limit)
  num_records = len(source)
  # Images rejected when the data set was prepared (missing, undecodable, ...)
  # are reported as skipped, so images + skipped is the metadata's row count.
  prepared_rejected = 0 if limit else int(getattr(source, "rejected", 0))
  output_dir = output_dir or os.path.join(workdir, "eval", f"{file_name(split)}-step{step}")
  if process_index == 0:
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
    with open(os.path.join(output_dir, "run.json"), "w") as f:
      json.dump({"checkpoint_step": step, "split": split, "records": num_records, "limit": limit,
                 "strategies": [s.name for s in wanted], "evaluate": eval_config.to_dict()}, f, indent=1)
  tries = build_tries(config, spec, wanted)
  batch_size = global_batch // process_count
  num_batches = data.num_eval_batches(num_records, batch_size=batch_size, process_count=process_count)
  batch_sharding = sharding.batch_sharding(mesh)
  timings = {}

  for group in _groups(wanted):
    paths = {s.rule: os.path.join(output_dir, "predictions", file_name(s.name) + ".jsonl")
             for s in group.members}
    # Resume: every member restarts at the first batch that the shortest of
    # their files does not hold in full (rows past it are cut off).
    done = 0
    if process_index == 0:
      done = min(_complete_rows(p) for p in paths.values())
      if done > num_records:
        raise ValueError(f"{output_dir} holds {done} predictions for a split of {num_records}: "
                         "a different --limit? use another --output_dir")
      done = done if done == num_records else done // global_batch * global_batch
      for p in paths.values():
        if os.path.exists(p):
          _truncate_rows(p, done)
    done = int(multihost_utils.broadcast_one_to_all(np.int32(done))) if process_count > 1 else done
    first_batch = num_batches if done == num_records else done // global_batch
    if first_batch >= num_batches:
      continue
    trie = tries.get((group.pool.trie_min_count, group.pool.trie_positions(spec))) \
        if group.pool.trie_min_count else None
    fn = make_decode_fn(graphdef, spec, group.pool, [s.rule for s in group.members],
                        int(eval_config.num_candidates), int(eval_config.seed), trie)
    decode = jax.jit(fn, in_shardings=(param_shardings, batch_sharding))
    batches = iter(data.eval_batches(source, batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, start_batch=first_batch))
    bar = _progress(num_batches, group.pool.name, first_batch)
    files = {rule: open(p, "a") for rule, p in paths.items()} if process_index == 0 else {}
    start, images = time.perf_counter(), 0
    try:
      for number in range(first_batch, num_batches):
        local = next(batches)
        rows = (number * process_count + process_index) * batch_size + np.arange(batch_size)
        local["index"] = rows.astype(np.int32)
        device_batch = sharding.make_global_batch(train._device_fields(local), mesh)  # pylint: disable=protected-access
        out = decode(params, device_batch)
        out = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out)
        gathered = {k: np.asarray(multihost_utils.process_allgather(local[k], tiled=True))
                    for k in ("latlng", "index", "mask")}
        # Text fields (string ids, country codes) cannot be all-gathered: only
        # process 0 writes, and it reads its missing rows from the source.
        for key in ("id", "country"):
          if key in local:
            gathered[key] = _host_field(source, local, key, gathered["index"], process_count)
        images += int(gathered["mask"].sum())
        if process_index == 0:
          for rule, f in files.items():
            for row in prediction_rows(gathered, out[rule], gathered["mask"].astype(bool)):
              f.write(json.dumps(row) + "\n")
            f.flush()
        if bar is not None:
          bar.update(1)
    finally:
      for f in files.values():
        f.close()
      if bar is not None:
        bar.close()
    timings[group.pool.name] = {"images": images, "seconds": time.perf_counter() - start}

  results = {}
  if process_index == 0:
    true_countries = None
    for s in wanted:
      rows = read_predictions(os.path.join(output_dir, "predictions", file_name(s.name) + ".jsonl"))
      if len(rows) != num_records:
        raise RuntimeError(f"{s.name}: {len(rows)} predictions for {num_records} images")
      if true_countries is None:  # the same truth for every strategy: once
        true_countries = truth_countries(rows)
      results[s.name] = score_predictions(rows, true_countries, skipped_before=prepared_rejected)
      if make_plots:
        distances = np.asarray([r["error_km"] for r in rows if r["error_km"] is not None])
        plots.error_cdf({s.name: distances}, os.path.join(output_dir, "plots", f"cdf_{file_name(s.name)}.png"),
                        title=f"{s.name} ({split}, step {step})")
        truth = np.asarray([[r["true_lat"], r["true_lon"]] for r in rows if r["error_km"] is not None])
        predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in rows if r["error_km"] is not None])
        plots.world_map(truth.reshape(-1, 2), predicted.reshape(-1, 2),
                        os.path.join(output_dir, "plots", f"map_{file_name(s.name)}.png"),
                        title=f"{s.name}: prediction vs truth ({split}, step {step})",
                        max_points=int(eval_config.plot_max_points))
    if make_plots:
      all_distances = {}
      for s in wanted:
        rows = read_predictions(os.path.join(output_dir, "predictions", file_name(s.name) + ".jsonl"))
        all_distances[s.name] = np.asarray([r["error_km"] for r in rows if r["error_km"] is not None])
      plots.error_cdf(all_distances, os.path.join(output_dir, "plots", "cdf.png"),
                      title=f"error CDF ({split}, step {step})")
    write_results(output_dir, results, split=split, step=step, timings=timings)
  return {"step": step, "split": split, "output_dir": output_dir, "results": results, "timings": timings}


def write_results(output_dir: str, results: dict, *, split: str, step: int, timings: dict) -> str:
  table = metrics.format_table(results)
  header = (f"# GeoToken evaluation: split `{split}`, checkpoint step {step}\n\n"
            "Haversine error on a 6371 km sphere; a hit is distance <= threshold. GeoGuessr = mean of "
            "5000 exp(-d / 1492.7 km). Countries: offline nearest-place reverse geocoding "
            "(geotoken_jax.geocode) of prediction and truth.\n\n")
  with open(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(header + table + "\n")
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump({"split": split, "checkpoint_step": step, "results": results, "decode_timings": timings,
               "table": table}, f, indent=1)
  return table


def main(argv: list[str]) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
  train.initialize_distributed()
  config = train._CONFIG.value  # pylint: disable=protected-access
  result = run_evaluation(config, train._WORKDIR.value, strategy_text=_STRATEGIES.value,  # pylint: disable=protected-access
                          split=_SPLIT.value, step=_STEP.value, output_dir=_OUTPUT_DIR.value,
                          limit=_LIMIT.value, make_plots=_PLOTS.value)
  if jax.process_index() == 0:
    print(metrics.format_table(result["results"]))
    print(f"written to {result['output_dir']}", flush=True)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: sys.exit(main(argv)))
