"""The retrieval-augmented recipe: alignment -> embeddings -> index -> GeoToken -> evaluation.

  run_recipe(config, workdir)     (python -m geotoken_jax.train --config configs/earth.py:retrieval)

Stages, each skipped when its output is complete and resumable when it is not
(every stage's own mechanism: checkpoints, embedding shards, neighbour blocks,
prediction files), all under one workdir W:

  1. align     the alignment model (config.recipe.alignment, a full training
               config) trained in W/<retrieval.alignment_workdir>
  2. embed     every split in config.recipe.splits embedded by it into
               W/<retrieval.embeddings>/<split>/
  3. index     each split searched in the gallery split (self and duplicates
               excluded) into W/<retrieval.neighbors>/<split>/
  4. train     the retrieval-augmented GeoToken (config itself) in W
  5. evaluate  its strategies and the kNN rows on the test split; with
               recipe.baseline_workdir, that run's rows beside them in one table

A run stopped anywhere (preempted, killed) resumes with the same command.
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections
from etils import epath

from geotoken_jax import data, embeddings, inference, metrics, trainer
from geotoken_jax.retrieval import neighbors, sources


def is_recipe(config) -> bool:
  return "recipe" in config and sources.enabled(config)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[recipe] {message}", flush=True)


def _complete_store(directory, num_records: int) -> bool:
  """A finished embedding store of this many records (a changed aligner is caught later: the
  index and the neighbour join compare the stores' checksums)."""
  try:
    return embeddings.open_embeddings(directory).num_records == num_records
  except (FileNotFoundError, ValueError):
    return False


def _timed(timings: dict, name: str, fn):
  start = time.perf_counter()
  out = fn()
  timings[name] = round(time.perf_counter() - start, 1)
  return out


def run_recipe(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs the stages (module docstring); returns {"results", "table", "timings"} or
  {"preempted": True} when the training stage stopped to be resumed."""
  workdir = epath.Path(workdir)
  recipe = config.recipe
  timings: dict = {}
  align_dir = sources.alignment_workdir(config, workdir)

  # 1. The alignment model.
  if (align_dir / "results.json").exists():
    _log(f"align: done ({align_dir})")
  else:
    _log(f"align: training in {align_dir}")
    out = _timed(timings, "align", lambda: trainer.train_and_evaluate(recipe.alignment, align_dir))
    if out.get("preempted"):
      return out

  # 2. Embeddings of every split (the gallery first).
  # The records are this config's (its data block, limits included), so rows match the
  # sources the GeoToken run reads.
  spec = inference.token_spec(config)
  splits = list(dict.fromkeys([str(config.retrieval.gallery), *recipe.splits]))
  for split in splits:
    output = sources.embeddings_dir(config, workdir, split)
    if _complete_store(output, len(data.get_source(config.data, split, spec))):
      _log(f"embed: {split} done ({output})")
      continue
    _log(f"embed: {split} -> {output}")
    _timed(timings, f"embed_{split}", lambda: inference.run_embedding(  # noqa: B023
        align_dir, output, source=data.get_source(config.data, split, spec), split_label=split,  # noqa: B023
        dtype=str(recipe.get("embedding_dtype", "float16")), batch_size=int(recipe.get("embed_batch_size", 256))))

  # 3. Neighbour lists: each split in the gallery.
  _log(f"index: {', '.join(splits)} in {config.retrieval.gallery}")
  manifests = _timed(timings, "index", lambda: neighbors.run_index(
      sources.resolve(workdir, config.retrieval.embeddings), sources.resolve(workdir, config.retrieval.neighbors),
      gallery=str(config.retrieval.gallery), queries=splits,
      settings=neighbors.settings_from_config(config.retrieval)))
  index_stats = {split: m.get("stats", {}) for split, m in manifests.items()}
  _log("index statistics: " + json.dumps(index_stats))

  # 4. The retrieval-augmented GeoToken.
  if (workdir / "results.json").exists():
    _log(f"train: done ({workdir})")
  else:
    _log(f"train: {workdir}")
    out = _timed(timings, "train", lambda: trainer.train_and_evaluate(config, workdir))
    if out.get("preempted"):
      return out

  # 5. Evaluation: every strategy of the config (decoder rows and kNN rows) on the test split.
  eval_splits = tuple(recipe.get("eval_splits", (config.test_split,)))
  baseline = str(recipe.get("baseline_workdir", ""))
  rows = {}
  for split in eval_splits:
    suffix = f" ({split})" if len(eval_splits) > 1 else ""
    _log(f"evaluate {split}: {config.evaluate.strategies}")
    evaluation = _timed(timings, f"evaluate_{split}", lambda: inference.run_evaluation(  # noqa: B023
        config, workdir, split=split, make_plots=False))
    rows.update({f"retrieval GeoToken {name}{suffix}": row for name, row in evaluation["results"].items()})
    if baseline:
      _log(f"evaluate {split}: baseline {baseline}")
      base = _timed(timings, f"evaluate_baseline_{split}", lambda: inference.run_evaluation(  # noqa: B023
          None, baseline, split=split, strategy_text=str(recipe.get("baseline_strategies", "greedy")),
          make_plots=False))
      rows.update({f"GeoToken, no retrieval {name}{suffix}": row for name, row in base["results"].items()})
  table = metrics.format_table(rows)
  if jax.process_index() == 0:
    print(table, flush=True)
    (workdir / "recipe.json").write_text(json.dumps(
        {"results": rows, "table": table, "timings": timings, "index": index_stats}, indent=1, default=str))
  return {"results": rows, "table": table, "timings": timings, "index": index_stats}
