"""The predictor: one jitted function per strategy set, and running sources through it.

  Predictor            encodes each batch ONCE and runs every strategy group (greedy,
                       beams, sample pools, gallery:K, knn:K, each with its selection rules;
                       kNN-LM decoding over the batch's neighbours) on that memory; cell
                       tries are arguments, not constants baked into the program; with
                       oracles=True also each pool's best-of-pool oracle (label-aware)
  oracle_name          the output key of a pool's oracle: "oracle:" + the pool's name
  predict_batches      a source's padded, masked global batches through a Predictor,
                       gathered on the host
  validation_metrics   loss, token accuracy and one strategy's acc@km over a source: the
                       trainer's validation and final test
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import data, decoding, metrics, models, runtime, s2, sharding
from geotoken_jax.decoding import knn_lm, rerank_features, selection, strategies
from geotoken_jax.decoding.strategies import Strategy
from geotoken_jax.inference.location_gallery import (LocationGallery, gallery_with_features, load_location_gallery,
                                                     location_features)
from geotoken_jax.inference.restore import RestoredModel, evaluate_config
from geotoken_jax.inference.tries import build_tries, trie_key


@dataclasses.dataclass
class StrategyGroup:
  """Strategies that share one decoded pool (they differ only in the selection rule)."""
  pool: Strategy
  members: list[Strategy]


ORACLE_PREFIX = "oracle:"
FEATURES_PREFIX = "features:"  # Predictor(export_features=True): a union pool's reranker features


def oracle_name(strategy: Strategy) -> str:
  """The output key of the best-of-pool oracle of a strategy's pool: "oracle:" + the pool's
  name without its selection rule, e.g. oracle:beam:5, oracle:sample:30:0.7,
  oracle:sample:30:0.7:top_p=0.9:knn_lambda=0.5, oracle:knn:10, oracle:gallery:30."""
  pool = strategy.pool_key
  parts = pool.name.split(":")
  if pool.kind == "sample":  # sample:N:T:RULE[:...]: the rule is always written
    del parts[3]
  return ORACLE_PREFIX + ":".join(parts)


def _output(pool: Mapping[str, jax.Array], chosen: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """A strategy's (or an oracle's) output from its pool and its choice: the prediction and the
  top-k candidates' tokens, locations and probabilities."""
  index = jnp.maximum(chosen["candidates"], 0)  # [batch, k]; -1 slots have probability 0
  return {
      "predicted": chosen["predicted"],  # [batch, 2]
      "chosen": chosen["chosen"],  # [batch]
      "candidate_tokens": jnp.take_along_axis(pool["tokens"], index[:, :, None], axis=1),
      "candidate_latlng": jnp.take_along_axis(pool["latlng"], index[:, :, None], axis=1),
      "candidate_prob": chosen["candidate_prob"],  # [batch, k]
  }


def has_oracle(strategy: Strategy) -> bool:
  """Does the strategy's pool get a best-of-pool oracle?  Not a pool of one (greedy, knn:1,
  gallery:1): its oracle would be the strategy itself.  A union pool (add_neighbors=K) has
  pool_size + K entries."""
  return strategy.pool_size + strategy.add_neighbors > 1


def oracle_choice(pool: Mapping[str, jax.Array], truth: jax.Array, num_candidates: int) -> dict[str, jax.Array]:
  """The best-of-pool oracle (reads the labels; an upper bound for every selection rule, never a
  prediction): the valid pool entry nearest to the true location truth [B, 2] (first of equals),
  as predicted [B, 2], chosen [B], and the pool's logprob candidates.  A row whose truth is not a
  finite location falls back to the most likely entry."""
  valid = pool.get("valid")
  valid = jnp.ones(pool["log_prob"].shape, jnp.bool_) if valid is None else valid
  distance = metrics.haversine_km_jax(pool["latlng"].astype(jnp.float32),
                                      truth.astype(jnp.float32)[:, None, :])  # [B, N]
  usable = valid & jnp.isfinite(distance)
  nearest = jnp.argmin(jnp.where(usable, distance, jnp.inf), axis=-1).astype(jnp.int32)
  likeliest = jnp.argmax(jnp.where(valid, pool["log_prob"], -jnp.inf), axis=-1).astype(jnp.int32)
  index = jnp.where(jnp.any(usable, axis=-1), nearest, likeliest)
  candidates, probability = decoding.top_candidates(pool["tokens"], pool["log_prob"], num_candidates, valid)
  return {"predicted": jnp.take_along_axis(pool["latlng"], index[:, None, None], axis=1)[:, 0],
          "chosen": index, "candidates": candidates, "candidate_prob": probability}


def group_strategies(wanted: Sequence[Strategy]) -> list[StrategyGroup]:
  groups: dict[Strategy, StrategyGroup] = {}
  for s in wanted:
    groups.setdefault(s.pool_key, StrategyGroup(s.pool_key, [])).members.append(s)
  return list(groups.values())


class Predictor:
  """(params, global batch) -> every strategy's prediction and top-k candidates, per image.

  One jitted function: the encoder runs once per batch; each pool (greedy,
  beam:W, sample:N:T...) is decoded once from that memory and every selection
  rule asked of it is applied.  Tries are passed as arguments, so the compiled
  program does not grow with them.  With `loss_weights`, the teacher-forced loss
  and per-position token hits of the batch's own tokens come out too (validation).
  Output per strategy name: predicted [B, 2], chosen [B], candidate_tokens [B, k, P],
  candidate_latlng [B, k, 2], candidate_prob [B, k] (0 for empty slots).

  kNN-LM strategies (knn_lambda set) and union pools (add_neighbors=K: the decoded pool plus
  the first K neighbours' paths, scored by a teacher-forced pass, strategies.union_pool) read
  the batch's neighbor_tokens, neighbor_scores (and neighbor_valid if present); a batch without
  them is refused with the missing keys named.  A union pool goes through the same rules and
  oracle as any pool.  With `oracles=True` the batch must hold the true `latlng` [B, 2], and every pool
  group also gets an entry `oracle_name(pool)` (e.g. "oracle:sample:30:0.7", "oracle:knn:10")
  with the same fields: predicted = the valid pool entry nearest to the truth (label-aware:
  an upper bound for the selection rules, not a prediction), candidates as the logprob rule's.

  Rule rerank: a union pool's candidates get decoding.rerank_features and the scores of
  `reranker` (inference.reranker.RestoredReranker), snapped onto a retrieved location within
  its settings' snap_km (decoding.selection.snap_to_retrieved).  With export_features=True,
  every union pool group also returns FEATURES_PREFIX + its pool name: {"features" [B, M, F],
  "latlng" [B, M, 2], "valid" [B, M], "neighbor_valid" [B, K]} (with `feature_settings` {"tau", "support_km"} when no reranker
  gives them): the data a reranker is fitted on.

  Alignment models: when the model itself is one (`is_aligner`), its strategies are
  gallery:K over `gallery`; a GeoToken model with an `aligner` (a restored alignment
  model) also gets gallery:K and the similarity / fused rules, the candidates'
  locations embedded by the aligner inside the same program.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, param_shardings: Any, mesh, spec: s2.TokenSpec,
               wanted: Sequence[Strategy], *, num_candidates: int = 5, seed: int = 0,
               tries: Mapping[str, decoding.CellTrie] | None = None, loss_weights=None,
               is_aligner: bool = False, aligner: "RestoredModel | None" = None, gallery: LocationGallery | None = None,
               fused_weight: float = 1.0, knn_temperature: float = 0.05, oracles: bool = False,
               reranker=None, export_features: bool = False, feature_settings: Mapping | None = None):
    self.mesh, self.spec = mesh, spec
    self.params = params
    self.strategies = list(wanted)
    self.groups = group_strategies(self.strategies)
    self.oracles = bool(oracles)
    self.oracle_names = [oracle_name(g.pool) for g in self.groups if has_oracle(g.pool)] if self.oracles else []
    self.tries = dict(tries or {})
    self.aligner = aligner
    self.gallery = gallery
    missing = {trie_key(s, spec) for s in self.strategies if s.trie_min_count} - set(self.tries)
    if missing:
      raise ValueError(f"no trie given for {sorted(missing)}")
    aligned = [s.name for s in self.strategies if strategies.needs_alignment(s)]
    if aligned and not is_aligner and aligner is None:
      raise ValueError(f"{', '.join(aligned)} need an alignment model: set evaluate.alignment_workdir "
                       "(--alignment_workdir) to a workdir trained with an alignment config")
    if is_aligner and any(s.kind != "gallery" for s in self.strategies):
      raise ValueError("an alignment model predicts with gallery:K strategies only, got "
                       f"{[s.name for s in self.strategies if s.kind != 'gallery']}")
    if any(s.kind == "gallery" for s in self.strategies) and gallery is None:
      raise ValueError("gallery:K needs a gallery (evaluate.gallery)")
    reranked = [s.name for s in self.strategies if strategies.needs_reranker(s)]
    if reranked and reranker is None:
      raise ValueError(f"{', '.join(reranked)} need a fitted reranker: set evaluate.reranker_workdir (fitted by "
                       "python -m geotoken_jax.rerank, or the recipe's rerank stage)")
    self.reranker = reranker
    settings = dict(reranker.settings if reranker is not None else (feature_settings or {}))
    if (reranked or export_features) and not {"tau", "support_km"} <= set(settings):
      raise ValueError("reranker features need settings tau and support_km (a reranker's, or feature_settings)")
    feature_tau = float(settings.get("tau", 0.0))
    support_km = tuple(float(d) for d in settings.get("support_km", ()))
    snap_km = float(settings.get("snap_km", 0.0))  # selection.snap_to_retrieved, chosen when it was fitted
    self.feature_names = rerank_features.feature_names(support_km) if settings else ()
    if reranker is not None and tuple(reranker.settings.get("features", ())) != self.feature_names:
      raise ValueError(f"the reranker was fitted on features {reranker.settings.get('features')}, this predictor "
                       f"computes {self.feature_names}")
    with_loss = loss_weights is not None
    weights = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)
    groups, k, fused_weight = self.groups, int(num_candidates), float(fused_weight)
    needs_query = bool(aligned)
    if not knn_temperature > 0:
      raise ValueError(f"evaluate.knn_temperature must be > 0, got {knn_temperature}")
    knn_temperature = float(knn_temperature)
    decoded = any(g.pool.kind in ("greedy", "beam", "sample") for g in groups)
    with_oracles = self.oracles

    def predict(params, batch, tries, aligner_params, gallery_arrays, reranker_params):
      model = nnx.merge(graphdef, params)
      align_model = model if is_aligner else (
          nnx.merge(aligner.graphdef, aligner_params) if aligner is not None else None)
      out = {}
      query = align_model.embed(batch)["loc_head"] if needs_query or (is_aligner and with_loss) else None
      scale = align_model.logit_scale() if align_model is not None else None
      if is_aligner:
        if with_loss:  # image -> location InfoNCE of each row against the batch's locations
          cos = align_model.similarity(query, align_model.locate(batch["latlng"].astype(jnp.float32)))
          logits = scale * jnp.where(batch["mask"][None, :], cos, -jnp.inf) if "mask" in batch else scale * cos
          out["loss"] = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
      elif decoded or with_loss:
        memory = model.encode(batch, deterministic=True)  # once per image, for every strategy
        if with_loss:
          logits = model.decode(memory, batch["tokens"], deterministic=True)
          out["loss"], out["token_hits"] = models.per_row_losses(logits, batch["tokens"], weights)
        keys = strategies.image_keys(seed, batch["index"])
      for group in groups:
        if group.pool.kind == "gallery":
          pool = gallery_pool(query, scale, gallery_arrays, group.pool.num_samples)
        elif group.pool.kind == "knn":  # retrieval alone: the batch's own neighbours
          pool = strategies.knn_pool(batch, group.pool.num_samples, knn_temperature)
        else:
          trie = tries.get(trie_key(group.pool, spec)) if group.pool.trie_min_count else None
          neighbors = batch if strategies.needs_neighbors(group.pool) else None
          pool = strategies.decode_pool(model, memory, group.pool, keys, trie, neighbors)
          if any(strategies.needs_alignment(m) for m in group.members):
            batch_size, n = pool["latlng"].shape[:2]
            located = align_model.locate(pool["latlng"].reshape(batch_size * n, 2)).reshape(batch_size, n, -1)
            pool["similarity"] = scale * jnp.einsum("be,bne->bn", models.align.normalize(query),
                                                    models.align.normalize(located))  # [batch, N]
        wants_rerank = any(strategies.needs_reranker(m) for m in group.members)
        if group.pool.add_neighbors and (wants_rerank or export_features):
          num_decoded = pool["tokens"].shape[1] - group.pool.add_neighbors
          features = rerank_features.candidate_features(pool, batch, num_decoded=num_decoded, tau=feature_tau,
                                                        support_km=support_km)  # [batch, N + K, F]
          _, _, retrieved_valid = knn_lm.first_neighbors(batch, group.pool.add_neighbors, group.pool.name,
                                                         field="add_neighbors")  # [batch, K]
          if wants_rerank:
            scores = nnx.merge(reranker.graphdef, reranker_params)(features)  # [batch, N + K]
            pool["rerank"] = selection.snap_to_retrieved(scores, pool["latlng"], pool["valid"], retrieved_valid,
                                                         snap_km)
          if export_features:
            out[FEATURES_PREFIX + group.pool.name] = {"features": features, "latlng": pool["latlng"],
                                                      "valid": pool["valid"], "neighbor_valid": retrieved_valid}
        for member in group.members:
          out[member.name] = _output(pool, strategies.choose(pool, member.rule, k, fused_weight))
        if with_oracles and has_oracle(group.pool):  # label-aware: the pool's entry nearest to the truth
          out[oracle_name(group.pool)] = _output(pool, oracle_choice(pool, batch["latlng"], k))
      return out

    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    trie_shardings = jax.tree.map(lambda _: replicated, self.tries)
    aligner_shardings = aligner.param_shardings if aligner is not None else None
    self._gallery_arrays = None
    gallery_shardings = None
    if gallery is not None:
      gallery_shardings = {"latlng": replicated, "tokens": replicated, "features": replicated}
      if gallery.features is not None:  # placed once, not copied to the devices at every call
        self._gallery_arrays = jax.device_put(gallery.arrays(), gallery_shardings)
    reranker_shardings = jax.tree.map(lambda _: replicated, reranker.params) if reranker is not None else None
    self._fn = jax.jit(predict, in_shardings=(param_shardings, batch_sharding, trie_shardings,
                                              aligner_shardings, gallery_shardings, reranker_shardings),
                       out_shardings=batch_sharding)
    self._graphdef, self._is_aligner = graphdef, is_aligner

  @classmethod
  def from_restored(cls, restored: "RestoredModel", wanted: Sequence[Strategy], *, num_candidates: int = 5,
                    seed: int = 0, cache_dir=None, aligner: "RestoredModel | None" = None,
                    gallery: str | None = None, fused_weight: float | None = None,
                    oracles: bool = False, reranker=None, export_features: bool = False,
                    feature_settings: Mapping | None = None) -> "Predictor":
    """A predictor for a restored model; an alignment model (restored or `aligner`) gets its
    gallery (evaluate.gallery, or `gallery`) embedded once and cached in cache_dir."""
    config = restored.config
    is_aligner = models.align.is_alignment(config.model)
    tries = build_tries(config, restored.spec, wanted, cache_dir=cache_dir)
    gallery_data = None
    if any(s.kind == "gallery" for s in wanted):
      gallery_data = load_location_gallery(config, restored.spec, gallery)
      gallery_data = gallery_with_features(gallery_data, restored if is_aligner else aligner, cache_dir,
                                           identity=str(getattr(aligner or restored, "workdir", "")))
    weight = float(evaluate_config(config).fused_weight if fused_weight is None else fused_weight)
    return cls(restored.graphdef, restored.params, restored.param_shardings, restored.mesh, restored.spec,
               wanted, num_candidates=num_candidates, seed=seed, tries=tries, is_aligner=is_aligner,
               aligner=aligner, gallery=gallery_data, fused_weight=weight,
               knn_temperature=float(evaluate_config(config).knn_temperature), oracles=oracles,
               reranker=reranker, export_features=export_features, feature_settings=feature_settings)

  def refresh_gallery(self, params) -> None:
    """Re-embeds the gallery with `params` (an alignment model's own validation while it trains)."""
    if self.gallery is None or (self.aligner is not None and self._gallery_arrays is not None):
      return  # a separate aligner's features do not change
    source = self.aligner if self.aligner is not None else None
    graphdef, current = (source.graphdef, source.params) if source is not None else (self._graphdef, params)
    self.gallery = dataclasses.replace(self.gallery, features=location_features(graphdef, current, self.mesh,
                                                                                self.gallery.latlng))
    replicated = sharding.replicated(self.mesh)
    self._gallery_arrays = jax.device_put(self.gallery.arrays(), jax.tree.map(lambda _: replicated,
                                                                                self.gallery.arrays()))

  def _args(self, device_batch, params):
    aligner_params = self.aligner.params if self.aligner is not None else None
    if any(s.kind == "gallery" for s in self.strategies) and self._gallery_arrays is None:
      raise ValueError("the gallery has no location features: call refresh_gallery(params) first")
    mixed = [s.name for s in self.strategies if s.knn_lm or s.add_neighbors]
    if mixed:
      knn_lm.check_neighbors(device_batch, ", ".join(mixed))
    if self.oracles and "latlng" not in device_batch:
      raise ValueError("oracles=True reads the true locations: the batch has no `latlng` (predict unlabelled "
                       "images with oracles=False)")
    return (self.params if params is None else params, dict(device_batch), self.tries, aligner_params,
            self._gallery_arrays, self.reranker.params if self.reranker is not None else None)

  def __call__(self, device_batch: Mapping[str, jax.Array], params=None) -> dict:
    return self._fn(*self._args(device_batch, params))

  def lower(self, device_batch, params=None):
    """The jitted function lowered for a batch (for inspecting the compiled program)."""
    return self._fn.lower(*self._args(device_batch, params))


def gallery_pool(query: jax.Array, scale: jax.Array, gallery: Mapping[str, jax.Array], k: int
                 ) -> dict[str, jax.Array]:
  """The k gallery locations most similar to each image (GeoCLIP's inference) as a pool:
  tokens [B, k, P], log_prob [B, k] (log-softmax of the scaled cosine over the WHOLE
  gallery), latlng [B, k, 2], valid, similarity [B, k] (the scaled cosine)."""
  logits = scale * jnp.einsum("be,ge->bg", models.align.normalize(query), gallery["features"])  # [batch, G]
  k = min(int(k), logits.shape[1])
  top, index = jax.lax.top_k(logits, k)  # [batch, k]
  log_prob = top - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  return {"tokens": gallery["tokens"][index], "log_prob": log_prob, "latlng": gallery["latlng"][index],
          "valid": jnp.ones(index.shape, jnp.bool_), "similarity": top}


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


def predict_batches(predictor: Predictor, source, *, global_batch_size: int, start_batch: int = 0,
                    params=None, text_fields: Sequence[str] = ("id", "country"), transform=None
                    ) -> Iterator[tuple[int, dict, dict]]:
  """(batch number, gathered host fields, gathered predictions) for every global batch.

  Every process runs this in step (collectives); each loads only its rows.
  Gathered fields: latlng, index, mask (+ loss fields' inputs) and the text fields
  the source has.  Padding rows have mask False.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} must divide over {process_count} processes")
  batch_size = global_batch_size // process_count
  num_batches = data.num_eval_batches(len(source), batch_size=batch_size, process_count=process_count)
  batches = iter(data.eval_batches(source, batch_size=batch_size, process_index=process_index,
                                   process_count=process_count, start_batch=start_batch))
  for number in range(start_batch, num_batches):
    local = next(batches)  # its "index": the rows' numbers in the source
    if transform is not None:  # e.g. OnlineRetrieval: neighbours found now (every process in step)
      local = transform(local)
    device_batch = sharding.make_global_batch(runtime.device_fields(local), predictor.mesh)
    out = runtime.gather_tree(predictor(device_batch, params))
    gathered = {k: np.asarray(multihost_utils.process_allgather(np.asarray(local[k]), tiled=True))
                if process_count > 1 else np.asarray(local[k]) for k in ("latlng", "index", "mask")}
    for key in text_fields:
      if key in local:
        gathered[key] = _host_field(source, local, key, gathered["index"], process_count)
    yield number, gathered, out


def validation_metrics(predictor: Predictor, source, *, global_batch_size: int, strategy_name: str = "greedy",
                       params=None) -> dict:
  """acc@km table of one strategy plus the teacher-forced loss and per-position token
  accuracy (the predictor must have loss_weights) over a source; padding excluded."""
  loss_sum, hits_sum, distances, count = 0.0, 0.0, [], 0
  for _, gathered, out in predict_batches(predictor, source, global_batch_size=global_batch_size,
                                          params=params, text_fields=()):
    mask = gathered["mask"].astype(bool)
    loss_sum += float(out["loss"][mask].astype(np.float64).sum())
    if "token_hits" in out:  # a decoder's; an alignment model has none
      hits_sum = hits_sum + out["token_hits"][mask].sum(axis=0)
    distances.append(metrics.haversine_km(gathered["latlng"][mask].astype(np.float64),
                                          out[strategy_name]["predicted"][mask].astype(np.float64)))
    count += int(mask.sum())
  if not count:
    raise ValueError(f"validation saw no examples in {source!r}")
  result = metrics.accuracy_table(np.concatenate(distances))
  result["loss"] = loss_sum / count
  if np.ndim(hits_sum):
    result["token_accuracy"] = (np.asarray(hits_sum) / count).tolist()
  return result
