"""The retrieval-augmented recipe: alignment -> embeddings -> index -> GeoToken -> evaluation.

  run_recipe(config, workdir)     (python -m geotoken_jax.train --config configs/earth.py:retrieval)

Stages, each skipped when its output is complete and resumable when it is not
(every stage's own mechanism: checkpoints, embedding shards, neighbour blocks,
prediction files), all under one workdir W:

  1. align     the alignment model (config.recipe.alignment, a full training
               config) trained in W/<retrieval.alignment_workdir>; none when
               recipe.alignment is the string "tiny_image[:S[:colour]]" (the
               Im2GPS tiny-image embedding, encoders.tiny_image: no parameters)
  2. embed     every split in config.recipe.splits embedded by it (or by the
               tiny-image embedding: one field, "tiny") into
               W/<retrieval.embeddings>/<split>/; a store is kept only if this
               embedder wrote it (an aligner's step and parameter checksum, a tiny
               image's size, colour and pixels: embed_action), else re-embedded
               (a retrained aligner leaves no stale store)
  3. index     each split searched in the gallery split (self and duplicates
               excluded) into W/<retrieval.neighbors>/<split>/; lists searched in
               other stores or with other settings than the config's are rebuilt
  4. train     the retrieval-augmented GeoToken (config itself) in W
  4b. rerank   with a `reranker` block: a learned reranker of its union pools fitted on
               reranker.fit_splits (geotoken_jax.reranking: cross-fitted out-of-fold figures
               on those splits, the saved reranker fitted on all of them) in W/reranker;
               evaluate.reranker_workdir names it for rule rerank
  5. evaluate  its strategies and the kNN rows on the test split (or every split
               of recipe.eval_splits); with recipe.baseline_workdir, that run's rows
               beside them in one table.  With recipe.choose_among (strategy strings)
               and recipe.choose_on (an evaluated split), the strategy with the best
               mean of acc@25/200/750/2500 km there is named before the table is read
               (choose_strategy; a reranker's rows on its fit splits are its out-of-fold
               figures) and its rows on the other splits head the table;
               W/reports/ then holds accuracy by top-neighbour-score bucket
               (report_by_score) and the chosen row minus each of recipe.compare_with
               (default knn:1) with paired bootstrap intervals on the other splits
               (compare_chosen), printed under the table

A model that reads no neighbours (a plain ViT evaluated with knn:K or kNN-LM
strategies) trains on the plain records: the gallery split gets no lists of its own.

A run stopped anywhere (preempted, killed) resumes with the same command.
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from geotoken_jax import comparison, data, embeddings, inference, metrics, plots, reranking, trainer
from geotoken_jax.decoding import strategies
from geotoken_jax.retrieval import neighbors, sources


def is_recipe(config) -> bool:
  return "recipe" in config and sources.enabled(config)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[recipe] {message}", flush=True)


def embed_action(directory, *, num_records: int, aligner: dict, dtype: str) -> tuple[str, str]:
  """What the embed stage does with a split's store, and why (for the log):

    "skip"       complete, written by this embedder (`aligner`: an Embedder's identity(); an
                 aligner's step and parameter checksum, not its folder: embeddings.aligner_identity
                 against RestoredModel.identity(); a tiny image's size, colour and pixels), with
                 this many records, in this dtype
    "resume"     the same, but incomplete (an interrupted run): its missing shards are written
    "overwrite"  anything else a store holds: a retrained aligner's embeddings are stale even
                 when the record count matches, and so is a store of another embedder (a tiny-image
                 store for an aligner, or one of another size), split size or dtype
    "embed"      no store yet
  """
  path = epath.Path(directory) / embeddings.MANIFEST
  if not path.exists():
    return "embed", "no store yet"
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return "overwrite", f"its manifest cannot be read ({type(e).__name__}: {e})"
  if manifest.get("format") != embeddings.FORMAT or manifest.get("version") != embeddings.VERSION:
    return "overwrite", f"not a {embeddings.FORMAT} version {embeddings.VERSION} store"
  stored = embeddings.aligner_identity(manifest)
  stale = embeddings.embedder_differences(stored, aligner)
  if stale:
    both_aligners = embeddings.embedder_kind(stored) == embeddings.embedder_kind(aligner) == embeddings.ALIGNER
    return "overwrite", f"written by another {'aligner' if both_aligners else 'embedder'} (" + "; ".join(stale) + ")"
  settings = manifest.get("settings") or {}
  if settings.get("num_records") != num_records:
    return "overwrite", f"it holds {settings.get('num_records')} records, the split has {num_records}"
  if settings.get("dtype") != dtype:
    return "overwrite", f"it is {settings.get('dtype')}, the recipe asks for {dtype}"
  if not manifest.get("complete"):
    return "resume", "incomplete: writing its missing shards"
  try:
    embeddings.open_embeddings(directory)
  except (FileNotFoundError, ValueError) as e:
    return "resume", f"shard files are missing ({e})"
  if embeddings.embedder_kind(aligner) != embeddings.ALIGNER:
    return "skip", f"written by this embedder ({json.dumps(aligner, sort_keys=True)})"
  return "skip", f"written by this aligner (step {aligner.get('step')}, parameters {aligner.get('params')})"


def _row_label(config, name: str) -> str:
  """A table row's label: oracle rows (evaluate.oracles: label-using upper bounds) and kNN rows are
  no method of the decoder; the decoder's rows say whether its model reads neighbours."""
  if name.startswith("oracle:"):
    return name
  if name.startswith("knn:"):
    tiny = sources.tiny_image_spec(config)
    return f"kNN ({tiny if tiny is not None else 'aligner embeddings'}) {name}"
  return f"{'retrieval GeoToken' if sources.model_reads_neighbors(config) else 'GeoToken'} {name}"


CHOICE_THRESHOLDS_KM = metrics.CHOICE_THRESHOLDS_KM


def choose_strategy(recipe, by_split: dict) -> tuple[str, str, dict] | None:
  """recipe.choose_among (strategy strings) ranked on recipe.choose_on (an evaluated split) by the
  mean of acc@25, 200, 750 and 2500 km, fixed before any test figure is read; ties go to the
  earlier entry.  -> (the chosen strategy's name, the split, {name: mean}), None without a choice."""
  among = [strategies.parse_strategy(text).name for text in recipe.get("choose_among", ())]
  if not among:
    return None
  choose_on = str(recipe.get("choose_on", ""))
  if choose_on not in by_split:
    raise ValueError(f"recipe.choose_on {choose_on!r} is not an evaluated split ({', '.join(by_split)}): add it "
                     "to recipe.eval_splits")
  results = by_split[choose_on]
  missing = [name for name in among if name not in results]
  if missing:
    raise ValueError(f"recipe.choose_among names strategies the evaluation did not run: {missing}; add them to "
                     "evaluate.strategies")
  scores = {name: float(sum(results[name][f"acc@{t:g}km"] for t in CHOICE_THRESHOLDS_KM) / len(CHOICE_THRESHOLDS_KM))
            for name in among}
  best = max(among, key=lambda name: (scores[name], -among.index(name)))
  return best, choose_on, scores


def report_by_score(config, workdir, output_dirs: dict, chosen: str, in_sample: tuple[str, ...] = ()) -> dict:
  """acc@25 and acc@200 km of the decoder (greedy), kNN (knn:1) and the chosen fusion, by bucket
  of the top neighbour's similarity, per evaluated split: W/reports/accuracy_by_score.json and a
  PNG per split and threshold (where retrieval is trusted, and where the decoder must speak).
  On the splits in `in_sample` (a reranker's fit splits, when it is the chosen strategy) the
  chosen row is left out: its prediction files there are in-sample."""
  reports = epath.Path(workdir) / "reports"
  reports.mkdir(parents=True, exist_ok=True)
  out = {}
  for split, output_dir in output_dirs.items():
    methods = {"GeoToken greedy": "greedy", "kNN knn:1": "knn:1"}
    if split not in in_sample:
      methods[f"chosen: {chosen}"] = chosen
    else:
      _log(f"report: {split} without the chosen {chosen} (fitted on {split}: its predictions there are in-sample)")
    distances = {}
    for label, name in methods.items():
      path = epath.Path(output_dir) / "predictions" / (inference.file_name(name) + ".jsonl")
      if not path.exists():
        continue
      rows = sorted(inference.read_predictions(path), key=lambda r: r["index"])
      distances[label] = np.asarray([r["error_km"] for r in rows], np.float64)
    lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, split))
    top = np.asarray(lists.scores[:, 0], np.float64)
    if not distances:
      _log(f"report: {split} skipped (no predictions of {', '.join(methods.values())} in {output_dir})")
      continue
    if any(d.shape != top.shape for d in distances.values()) or top.size < 5:
      _log(f"report: {split} skipped ({top.size} listed queries against "
           f"{sorted({d.size for d in distances.values()})} predictions; at least 5 needed)")
      continue
    top = np.where(np.isfinite(top), top, -1.0)  # a query without any neighbour: the lowest bucket
    out[split] = {}
    for threshold in (25.0, 200.0):
      table = metrics.accuracy_by_score(top, distances, threshold_km=threshold)
      out[split][f"acc@{threshold:g}km"] = table
      plots.accuracy_by_score_plot(table, reports / f"accuracy_by_score_{inference.file_name(split)}_"
                                   f"{threshold:g}km.png", threshold_km=threshold,
                                   title=f"{split}: acc@{threshold:g} km by top-1 neighbour similarity")
  (reports / "accuracy_by_score.json").write_text(json.dumps(out, indent=1))
  return out


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
  tiny = sources.tiny_image_spec(config)  # recipe.alignment = "tiny_image[:S[:colour]]": nothing to train
  _check_compare_with(config)

  # 1. The alignment model.
  if tiny is not None:
    _log(f"align: none ({tiny}: the tiny-image embedding has no parameters)")
  else:
    align_dir = sources.alignment_workdir(config, workdir)
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
  # A store is kept only when the aligner as it is now wrote it (embed_action): a retrained
  # aligner (a new step or other parameters) re-embeds every split, and the index stage then
  # rebuilds the lists searched in the old stores.
  # The tiny-image embedding reads the images as the GeoToken run's data pipeline gives them
  # (data.image_size, data.image_resize_mode(config)): the pixels its model sees.
  spec = inference.token_spec(config)
  splits = list(dict.fromkeys([str(config.retrieval.gallery), *recipe.splits]))
  dtype = str(recipe.get("embedding_dtype", "float16"))
  if tiny is not None:
    aligner, embedder = None, inference.tiny_image_embedder(tiny, config)
  else:
    aligner = inference.restore_model(str(align_dir))
    embedder = inference.AlignerEmbedder(aligner)
  identity = embedder.identity()
  refreshed = []
  for split in splits:
    output = sources.embeddings_dir(config, workdir, split)
    source = data.get_source(config.data, split, spec, resize=embedder.resize)
    action, why = embed_action(output, num_records=len(source), aligner=identity, dtype=dtype)
    if action == "skip":
      _log(f"embed: {split} done ({output}: {why})")
      continue
    _log(f"embed: {split} -> {output} ({'re-embedding: ' if action == 'overwrite' else ''}{why})")
    if action == "overwrite":
      refreshed.append(split)
    _timed(timings, f"embed_{split}", lambda: inference.run_embedding(  # noqa: B023
        None if tiny is not None else align_dir, output, split_label=split, source=source,  # noqa: B023
        dtype=dtype, embedder=embedder, config=config if tiny is not None else None,
        overwrite=action == "overwrite", batch_size=int(recipe.get("embed_batch_size", 256))))  # noqa: B023
  aligner = embedder = None  # its parameters leave the devices before the GeoToken model trains

  # 3. Neighbour lists: each split in the gallery.  Lists searched in other stores (re-embedded
  # above) or with other settings than the config's are rebuilt (the index job says which).
  # A model that reads no neighbours trains on the plain records: the gallery needs no lists.
  query_splits = [s for s in splits if s != str(config.retrieval.gallery) or sources.model_reads_neighbors(config)]
  _log(f"index: {', '.join(query_splits)} in {config.retrieval.gallery}")
  manifests = _timed(timings, "index", lambda: neighbors.run_index(
      sources.resolve(workdir, config.retrieval.embeddings), sources.resolve(workdir, config.retrieval.neighbors),
      gallery=str(config.retrieval.gallery), queries=query_splits,
      settings=neighbors.settings_from_config(config.retrieval), overwrite=True))
  index_stats = {split: m.get("stats", {}) for split, m in manifests.items()}
  _log("index statistics: " + json.dumps(index_stats))

  # 4. The retrieval-augmented GeoToken.
  if refreshed and ((workdir / "results.json").exists() or (workdir / "checkpoints").exists()):
    _log(f"warning: {', '.join(refreshed)} re-embedded, but {workdir} holds a GeoToken model trained on the "
         "previous embeddings: delete its checkpoints/ and results.json to train it on the new ones")
  if (workdir / "results.json").exists():
    _log(f"train: done ({workdir})")
  else:
    _log(f"train: {workdir}")
    out = _timed(timings, "train", lambda: trainer.train_and_evaluate(config, workdir))
    if out.get("preempted"):
      return out

  # 4b. The reranker of the decoder's union pools, fitted where the test regime holds.
  out_of_fold = {}
  if config.get("reranker") is not None:
    _log(f"rerank: {reranking.rerank_strategy(config)} fitted on {', '.join(config.reranker.fit_splits)}")
    summary = _timed(timings, "rerank", lambda: reranking.fit_reranker(config, workdir))
    out_of_fold = summary["out_of_fold"]
    _log("rerank out-of-fold: " + "; ".join(
        f"{split} " + "/".join(f"{row[f'acc@{t:g}km']:.1f}" for t in CHOICE_THRESHOLDS_KM)
        for split, row in out_of_fold.items()))

  # 5. Evaluation: every strategy of the config (decoder rows and kNN rows) on the test split.
  eval_splits = tuple(recipe.get("eval_splits", (config.test_split,)))
  baseline = str(recipe.get("baseline_workdir", ""))
  rows, by_split, output_dirs, differences = {}, {}, {}, {}
  for split in eval_splits:
    suffix = f" ({split})" if len(eval_splits) > 1 else ""
    _log(f"evaluate {split}: {config.evaluate.strategies}")
    evaluation = _timed(timings, f"evaluate_{split}", lambda: inference.run_evaluation(  # noqa: B023
        config, workdir, split=split, make_plots=False))
    by_split[split] = dict(evaluation["results"])
    output_dirs[split] = evaluation["output_dir"]
    labels = {}
    if split in out_of_fold:  # the reranker saw these rows: its honest figures are out-of-fold
      name = reranking.rerank_strategy(config)
      by_split[split][name] = out_of_fold[split]
      labels[name] = f"{_row_label(config, name)} (out-of-fold)"
    rows.update({labels.get(name, _row_label(config, name)) + suffix: row for name, row in by_split[split].items()})
    if baseline:
      _log(f"evaluate {split}: baseline {baseline}")
      base = _timed(timings, f"evaluate_baseline_{split}", lambda: inference.run_evaluation(  # noqa: B023
          None, baseline, split=split, strategy_text=str(recipe.get("baseline_strategies", "greedy")),
          make_plots=False))
      rows.update({f"GeoToken, no retrieval {name}{suffix}": row for name, row in base["results"].items()})
  chosen = choose_strategy(recipe, by_split)
  if chosen is not None:
    name, choose_on, scores = chosen
    _log(f"chosen on {choose_on} (mean of acc@{'/'.join(f'{t:g}' for t in CHOICE_THRESHOLDS_KM)} km): {name} "
         f"({scores[name]:.2f}; " + ", ".join(f"{n} {v:.2f}" for n, v in scores.items() if n != name) + ")")
    rows = {**{f"chosen on {choose_on}: {name}" + (f" ({split})" if len(eval_splits) > 1 else ""):
               by_split[split][name] for split in eval_splits if split != choose_on}, **rows}
    timings["chosen"] = {"strategy": name, "on": choose_on, "scores": scores}
    if jax.process_index() == 0:
      in_sample = tuple(out_of_fold) if name == (reranking.rerank_strategy(config) if out_of_fold else None) else ()
      report_by_score(config, workdir, output_dirs, name, in_sample)
      differences = compare_chosen(recipe, workdir, output_dirs, name, skip=(choose_on, *in_sample))
  table = metrics.format_table(rows)
  if jax.process_index() == 0:
    print(table, flush=True)
    for split, entry in differences.items():
      print(f"\nchosen minus its baselines on {split} (paired bootstrap 95 % intervals over the same images; "
            f"bold: the interval excludes 0):\n\n{entry['table']}", end="", flush=True)
    (workdir / "recipe.json").write_text(json.dumps(
        {"results": rows, "table": table, "timings": timings, "index": index_stats,
         "differences": differences}, indent=1, default=str))
  return {"results": rows, "table": table, "timings": timings, "index": index_stats, "differences": differences}


def _compare_with(recipe) -> list[str]:
  """recipe.compare_with as strategy names (default knn:1): the rows the chosen one must beat."""
  return [strategies.parse_strategy(text).name for text in recipe.get("compare_with", ("knn:1",))]


def _check_compare_with(config) -> None:
  """recipe.compare_with names evaluated strategies: said before any stage runs."""
  if not config.recipe.get("choose_among"):
    return
  evaluated = {s.name for s in strategies.parse_strategies(str(config.evaluate.strategies), inference.token_spec(config))}
  missing = [name for name in _compare_with(config.recipe) if name not in evaluated]
  if missing:
    raise ValueError(f"recipe.compare_with names strategies the evaluation does not run: {missing}; add them to "
                     "evaluate.strategies")


def compare_chosen(recipe, workdir, output_dirs: dict, chosen: str, skip: tuple[str, ...] = ()) -> dict:
  """The chosen strategy minus each of recipe.compare_with (default knn:1; the rows it must beat)
  on every evaluated split but `skip` (where it was chosen or fitted), with paired bootstrap
  intervals (comparison.differences_table): {split: {"table": Markdown, "differences": {...}}},
  also written to W/reports/differences_<split>.md."""
  others = [n for n in _compare_with(recipe) if n != chosen]
  out = {}
  for split, directory in output_dirs.items():
    if split in skip or not others:
      continue
    variants = comparison.load_evaluation(directory, [chosen, *others])
    table, diffs = comparison.differences_table(variants[chosen], [variants[n] for n in others])
    out[split] = {"table": table, "differences": diffs}
    reports = epath.Path(workdir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / f"differences_{split.replace(':', '-')}.md").write_text(table)
  return out
