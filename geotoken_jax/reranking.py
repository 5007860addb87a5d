"""Fitting a learned reranker of union pools where the test regime holds (rule `rerank`).

  fit_reranker(config, workdir)    the recipe's rerank stage

The pool is a trained decoder's union pool (config.reranker.pool, e.g.
"sample:30:0.7:add_neighbors=10": 30 samples plus the paths of the first 10 retrieved
neighbours, every entry scored by the decoder).  Each candidate is described by
decoding.rerank_features (its log-probability, whether and how well it was retrieved, how much
neighbour and decoder mass lies within 1 / 25 / 200 / 750 / 2500 km of it: no label) and scored
by models.reranker.Reranker, trained with the listwise Plackett-Luce loss of the candidates'
order by true distance (nearest first), the decoder frozen.

Where it is fitted: on splits the decoder never trained on and whose neighbour lists were
searched as at test time (config.reranker.fit_splits, e.g. the cell-blocked validation split
and an interleaved "train:fit" slice of whole level-13 cells, data.holdout.fit_fraction): one
reranker for both regimes, the image's own retrieval scores telling them apart.

Honest validation figures: the fit splits' rows are cross-fitted (config.reranker.folds groups
by the S2 cell at fold_level of the true location: a fold's reranker never saw a photo of a
held-out fold's cells), and those out-of-fold figures are what the recipe chooses by.  The
reranker saved for the other splits is fitted on all fit rows.

Snapping (decoding.selection.snap_to_retrieved): a choice within snap_km of a retrieved
neighbour's location moves onto that location.  The radius is chosen among config.reranker.snap_km
on the same out-of-fold scores (the best mean of acc@25/200/750/2500 over the fit rows) and
saved with the reranker; the out-of-fold figures are the snapped ones.

Outputs in W/<reranker.directory>: reranker.json (settings, feature names, out-of-fold
figures per fit split), params/ (orbax), pools/<split>.npz (the collected pools: a rerun
refits without decoding again).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from geotoken_jax import geocode, metrics, s2, sharding
from geotoken_jax.data.subsets import splitmix64
from geotoken_jax.decoding import rerank_features, strategies
from geotoken_jax.decoding.selection import snap_to_retrieved
from geotoken_jax.inference.online_retrieval import evaluation_source
from geotoken_jax.inference.predictor import Predictor
from geotoken_jax.inference.reranker import (POOL_ARRAYS, build_reranker, collect_pool_features, is_fitted,
                                             save_reranker)
from geotoken_jax.inference.restore import evaluate_config, restore_model, token_spec
from geotoken_jax.models.reranker import plackett_luce_loss

DEFAULTS = ml_collections.ConfigDict({
    "pool": "sample:30:0.7:add_neighbors=10",
    "fit_splits": ("validation",),
    "directory": "reranker",
    "hidden": (32,),  # (64, 64) and 3000 steps overfit: out-of-fold validation mean 74.5-75.8 against 78.6
    "tau": 0.02,  # the neighbours' softmax temperature inside the features
    "support_km": rerank_features.SUPPORT_KM,
    "steps": 1000,
    "batch_size": 512,  # images per step
    "learning_rate": 3e-3,
    "weight_decay": 1e-4,
    "top": 0,  # Plackett-Luce places: 0 = the whole order (top 5: out-of-fold validation mean 77.4 against 78.6)
    "folds": 2,
    # selection.snap_to_retrieved radii tried on the out-of-fold scores; the best mean of
    # acc@25/200/750/2500 over the fit rows is kept (ties: the smaller).  (0,) = never snap.
    "snap_km": (0.0, 25.0, 100.0, 200.0, 750.0),
    "fold_level": 6,
    "seed": 0,
})


def reranker_config(config) -> ml_collections.ConfigDict:
  """config.reranker over DEFAULTS, checked."""
  out = ml_collections.ConfigDict(DEFAULTS.to_dict())
  given = config.get("reranker") or {}
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.reranker has unknown key(s) {unknown}; keys: {', '.join(DEFAULTS)}")
  out.update(dict(given))
  pool = strategies.parse_strategy(str(out.pool))
  if not pool.add_neighbors or pool.rule != "logprob":
    raise ValueError(f"reranker.pool must be a union pool without a rule (e.g. sample:30:0.7:add_neighbors=10), "
                     f"got {out.pool!r}")
  if int(out.folds) < 2:
    raise ValueError(f"reranker.folds must be >= 2 (the out-of-fold figures), got {out.folds}")
  if not out.fit_splits:
    raise ValueError("reranker.fit_splits is empty")
  if not out.snap_km or min(float(r) for r in out.snap_km) < 0:
    raise ValueError(f"reranker.snap_km must list radii >= 0 (0 = never snap), got {out.snap_km}")
  return out


def rerank_strategy(config) -> str:
  """The strategy string that evaluates the fitted reranker: the pool with rule rerank."""
  pool = strategies.parse_strategy(str(reranker_config(config).pool))
  return dataclasses.replace(pool, rule="rerank").name


def directory(config, workdir) -> epath.Path:
  return epath.Path(workdir) / str(reranker_config(config).directory)


def _settings(rc, pool_name: str) -> dict:
  support = tuple(float(d) for d in rc.support_km)
  return {"features": list(rerank_features.feature_names(support)), "tau": float(rc.tau), "support_km": list(support),
          "hidden": [int(h) for h in rc.hidden], "pool": pool_name}


def collect(config, workdir, split: str, rc) -> dict:
  """The split's union pools and their features (cached as pools/<split>.npz)."""
  cache = directory(config, workdir) / "pools" / f"{split.replace(':', '-')}.npz"
  pool = strategies.parse_strategy(str(rc.pool)).check(token_spec(config))
  if cache.exists():
    with cache.open("rb") as f:
      arrays = dict(np.load(f))
    if str(arrays.pop("pool")) == pool.name and set(POOL_ARRAYS) <= set(arrays):
      return arrays
  mesh = sharding.create_mesh(config.mesh)
  restored = restore_model(workdir, config=config, mesh=mesh)
  eval_config = evaluate_config(config)
  predictor = Predictor.from_restored(restored, [pool], seed=int(eval_config.seed),
                                      cache_dir=epath.Path(workdir) / "cache" / "tries", export_features=True,
                                      feature_settings=_settings(rc, pool.name))
  source, transform = evaluation_source(config, workdir, split, restored.spec, mesh)
  arrays = collect_pool_features(predictor, source, pool, global_batch_size=int(eval_config.batch_size),
                                 transform=transform)
  if jax.process_index() == 0:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
      np.savez(f, pool=np.asarray(pool.name), **arrays)
  return arrays


def distances_km(arrays: dict) -> np.ndarray:
  """[n, M] great-circle km from every candidate to its image's true location (float64)."""
  return metrics.haversine_km(arrays["latlng"].astype(np.float64), arrays["truth"][:, None, :])


def folds_of(truth: np.ndarray, level: int, folds: int) -> np.ndarray:
  """[n] fold of each image: splitmix64 of the S2 cell at `level` of its true location, mod folds."""
  cells = s2.latlng_to_cell_ids(truth[:, 0], truth[:, 1], level)
  return (splitmix64(cells) % np.uint64(folds)).astype(np.int64)


def fit(features: np.ndarray, distance: np.ndarray, valid: np.ndarray, settings: dict, rc):
  """A Reranker fitted on pools [n, M, F] / [n, M] / [n, M] (standardization from their valid
  candidates; AdamW on minibatches of images)."""
  model = build_reranker(settings, seed=int(rc.seed))
  rows = features[valid]
  model.mean[...] = jnp.asarray(rows.mean(axis=0), jnp.float32)
  model.scale[...] = jnp.asarray(np.maximum(rows.std(axis=0), 1e-3), jnp.float32)
  optimizer = nnx.Optimizer(model, optax.adamw(float(rc.learning_rate), weight_decay=float(rc.weight_decay)),
                            wrt=nnx.Param)
  top = int(rc.top)

  @nnx.jit
  def step(model, optimizer, x, d, v):
    def loss_fn(model):
      return plackett_luce_loss(model(x), d, v, top)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(int(rc.seed))
  n = features.shape[0]
  batch = min(int(rc.batch_size), n)
  distance = np.where(np.isfinite(distance), distance, 1e9).astype(np.float32)
  for _ in range(int(rc.steps)):
    pick = rng.choice(n, batch, replace=False)
    step(model, optimizer, jnp.asarray(features[pick]), jnp.asarray(distance[pick]), jnp.asarray(valid[pick]))
  return model


def scores_of(model, features: np.ndarray, chunk: int = 2048) -> np.ndarray:
  apply = nnx.jit(lambda m, x: m(x))
  return np.concatenate([np.asarray(apply(model, jnp.asarray(features[i:i + chunk])))
                         for i in range(0, features.shape[0], chunk)])


def chosen_index(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """[n] the valid candidate with the highest score (first of equals)."""
  return np.argmax(np.where(valid, scores, -np.inf), axis=1)


def chosen_distance(scores: np.ndarray, distance: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """[n] km of the valid candidate with the highest score (first of equals)."""
  return distance[np.arange(distance.shape[0]), chosen_index(scores, valid)]


def fit_reranker(config, workdir) -> dict:
  """Collects the fit splits' pools, reports out-of-fold figures, fits and saves the reranker
  (module docstring).  -> {"out_of_fold": {split: acc table}, "directory", "fit_rows", "seconds"}.
  A reranker already fitted with the same settings is kept (its figures returned)."""
  rc = reranker_config(config)
  out_dir = directory(config, workdir)
  pool_name = strategies.parse_strategy(str(rc.pool)).name
  settings = _settings(rc, pool_name)
  fit_settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rc.to_dict().items()}
  if is_fitted(out_dir):
    saved = json.loads((out_dir / "reranker.json").read_text())
    if saved.get("fit", {}).get("settings") == fit_settings:
      return saved["fit"]["summary"]
  start = time.perf_counter()
  splits = [str(s) for s in rc.fit_splits]
  pools = {split: collect(config, workdir, split, rc) for split in splits}
  features = np.concatenate([pools[s]["features"] for s in splits])
  valid = np.concatenate([pools[s]["valid"] for s in splits]).astype(bool)
  distance = np.concatenate([distances_km(pools[s]) for s in splits])
  truth = np.concatenate([pools[s]["truth"] for s in splits])
  latlng = np.concatenate([pools[s]["latlng"] for s in splits]).astype(np.float64)
  which = np.concatenate([np.full(len(pools[s]["truth"]), i) for i, s in enumerate(splits)])
  labelled = np.isfinite(truth).all(axis=1)
  if not labelled.all():  # an unlabelled image cannot be fitted on or scored: counted, said
    print(f"[rerank] {int((~labelled).sum())} fit images without a true location left out", flush=True)
  folds = np.where(labelled, folds_of(np.where(labelled[:, None], truth, 0.0), int(rc.fold_level), int(rc.folds)), -1)
  oof = np.full(valid.shape, -np.inf, np.float32)
  for fold in range(int(rc.folds)):
    train, held = labelled & (folds != fold), labelled & (folds == fold)
    if not train.any() or not held.any():
      raise ValueError(f"reranker fold {fold} has {int(train.sum())} training and {int(held.sum())} held-out images: "
                       "more fit images or fewer folds")
    model = fit(features[train], distance[train], valid[train], settings, rc)
    oof[held] = scores_of(model, features[held])
  neighbor_valid = np.concatenate([pools[s]["neighbor_valid"] for s in splits]).astype(bool)
  snap_means, snapped = {}, {}
  for radius in sorted({float(r) for r in rc.snap_km}):  # every radius on the same out-of-fold scores
    scores = np.asarray(snap_to_retrieved(jnp.asarray(oof[labelled]), jnp.asarray(latlng[labelled], jnp.float32),
                                          jnp.asarray(valid[labelled]), jnp.asarray(neighbor_valid[labelled]),
                                          radius))
    snapped[radius] = chosen_index(scores, valid[labelled])
    km = distance[labelled][np.arange(snapped[radius].size), snapped[radius]]
    snap_means[radius] = float(np.mean([100.0 * np.mean(km <= t) for t in metrics.CHOICE_THRESHOLDS_KM]))
  snap_km = max(snap_means, key=lambda r: (snap_means[r], -r))
  chosen_all = np.full(len(truth), -1)
  chosen_all[labelled] = snapped[snap_km]
  summary = {"out_of_fold": {}, "directory": str(out_dir), "fit_rows": {s: int(len(pools[s]["truth"])) for s in splits},
             "snap_km": snap_km, "snap_mean_by_km": {f"{r:g}": round(m, 3) for r, m in snap_means.items()}}
  for i, split in enumerate(splits):
    rows = (which == i) & labelled
    index = chosen_all[rows]
    km = distance[rows][np.arange(index.size), index]
    chosen = latlng[rows][np.arange(index.size), index]
    # The countries as the evaluation job scores them (reverse-geocoded, offline).
    summary["out_of_fold"][split] = metrics.accuracy_table(
        km, skipped=int(((which == i) & ~labelled).sum()), predicted_countries=geocode.country_codes(chosen),
        true_countries=geocode.country_codes(truth[rows]))
  model = fit(features[labelled], distance[labelled], valid[labelled], settings, rc)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  save_reranker(out_dir, model, {**settings, "snap_km": snap_km, "fit": {"settings": fit_settings, "summary": summary}})
  return summary
