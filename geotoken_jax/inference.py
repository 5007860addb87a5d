"""Inference: the one module that restores a model and runs decoding strategies.

  restore_model(workdir)      the run's config and TokenSpec (saved with the
                              checkpoint), its parameters on a mesh
  Predictor                   one jitted function per strategy set: encodes each
                              batch ONCE and runs every strategy group (greedy,
                              beams, sample pools, each with its selection rules)
                              on that memory; cell tries are arguments, not
                              constants baked into the program
  predict_batches             a source's padded, masked global batches through a
                              Predictor, gathered on the host
  validation_metrics          loss, token accuracy and one strategy's acc@km over
                              a source: the trainer's validation and final test
  run_evaluation              every strategy over a split or any source: the
                              predictions files (resumable), tables and plots
  predict_files               top-k cells of image files of any number, streamed
                              in batches, unreadable files reported, not fatal
  OnlineRetrieval             a retrieval-augmented run's neighbours for images the
                              index job never saw: the run's aligner embeds them,
                              its gallery is searched (retrieval.search), inside
                              evaluation and prediction

The trainer's periodic validation, its final test, the evaluation job and the
predict command all decode through Predictor, so they cannot disagree on one
checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import checkpoint, data, decoding, geocode, metrics, models, plots, s2, sharding
from geotoken_jax.data import images as images_lib
from geotoken_jax.decoding import strategies
from geotoken_jax.decoding.strategies import Strategy

# Batch fields that stay on the host (ids may be strings or int64).
HOST_ONLY_FIELDS = ("id",)

EVALUATE_DEFAULTS = ml_collections.ConfigDict({
    "strategies": "greedy,beam:5",
    "batch_size": 128,  # global images per decode batch
    "num_candidates": 5,
    "seed": 0,  # sampling keys: fold_in(key(seed), image index)
    "plot_max_points": 2000,
    # An alignment model's workdir, for gallery:K and the similarity / fused rules of a
    # GeoToken model ("" = none; an alignment model's own evaluation uses itself).
    "alignment_workdir": "",
    # gallery:K's locations: "train" (the training split's cells), "mp16_100k" (GeoCLIP's
    # 100K MP16 coordinates) or a CSV path with latitude / longitude columns.
    "gallery": "train",
    "gallery_limit": 0,  # > 0: an evenly spaced subset of this many gallery locations
    "fused_weight": 1.0,  # fused = log-probability + w * the alignment model's similarity logit
    # knn:K's pool log-probabilities: log-softmax(neighbour score / T) (scores are mean cosines).
    "knn_temperature": 0.05,
})


def evaluate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's `evaluate` block over EVALUATE_DEFAULTS."""
  merged = ml_collections.ConfigDict(EVALUATE_DEFAULTS.to_dict())
  if "evaluate" in config:
    merged.update(config.evaluate.to_dict())
  return merged


def token_spec(config) -> s2.TokenSpec:
  return s2.TokenSpec(int(config.tokens.level), int(config.tokens.group_size))


def file_name(strategy_name: str) -> str:
  """A strategy name as a file name: sample:30:0.7:medoid -> sample-30-0.7-medoid."""
  return re.sub(r"[^A-Za-z0-9._=-]+", "-", strategy_name.replace(":", "-"))


def device_fields(batch: Mapping[str, Any]) -> dict:
  """The numeric fields of a host batch (ids and text such as country codes stay on the host)."""
  return {k: v for k, v in batch.items()
          if k not in HOST_ONLY_FIELDS and np.asarray(v).dtype.kind in "biuf"}


# ---------------------------------------------------------------------------
# Restoring a model from a workdir.


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def load_run_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run was trained with: saved in its checkpoint (or WORKDIR/config.json)."""
  metadata = None
  if checkpoint_dir(workdir).exists():
    metadata = checkpoint.read_metadata(checkpoint_dir(workdir), step)
  if metadata and "config" in metadata:
    return ml_collections.ConfigDict(metadata["config"])
  for name, key in (("config.json", None), ("results.json", "config")):
    path = epath.Path(workdir) / name
    if path.exists():
      loaded = json.loads(path.read_text())
      return ml_collections.ConfigDict(loaded[key] if key else loaded)
  raise FileNotFoundError(f"{workdir} holds no checkpoint with its config and no config.json "
                          "(written by geotoken_jax.train); pass --config")


@dataclasses.dataclass
class RestoredModel:
  config: ml_collections.ConfigDict
  spec: s2.TokenSpec
  graphdef: nnx.GraphDef
  params: Any
  param_shardings: Any
  mesh: jax.sharding.Mesh
  step: int
  workdir: str = ""


def abstract_params(config, spec: s2.TokenSpec, mesh) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params carrying their shardings, param shardings) of the config's model."""
  build = lambda: models.build_model(config.model, spec, rngs=nnx.Rngs(config.seed))  # noqa: E731
  graphdef, abstract = nnx.split(nnx.eval_shape(build), nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  return graphdef, checkpoint.abstract_like(abstract, shardings), shardings


def restore_model(workdir, *, config: ml_collections.ConfigDict | None = None, step: int | None = None,
                  mesh: jax.sharding.Mesh | None = None, devices=None) -> RestoredModel:
  """The run's model with the parameters of its latest (or `step`) checkpoint.

  config: None reads the config saved with the run; pass one to override it (its
  model fields must match the checkpoint).  mesh: default the config's mesh
  over `devices` (default all).  A checkpoint that fails to restore is reported
  and the next older one is tried (see geotoken_jax.checkpoint).
  """
  config = load_run_config(workdir, step) if config is None else config
  spec = token_spec(config)
  mesh = mesh if mesh is not None else sharding.create_mesh(config.mesh, devices)
  graphdef, target, shardings = abstract_params(config, spec, mesh)
  params, step = checkpoint.restore_params(checkpoint_dir(workdir), target, step)
  return RestoredModel(config, spec, graphdef, params, shardings, mesh, step, str(workdir))


def restore_aligner(config, mesh, strategies_wanted: Sequence[Strategy], alignment_workdir: str | None = None
                    ) -> RestoredModel | None:
  """The alignment model a GeoToken model's strategies need (gallery:K, similarity, fused),
  from alignment_workdir (default evaluate.alignment_workdir) on the same mesh; None when
  no strategy needs one or the model is itself an alignment model."""
  if models.align.is_alignment(config.model) or not any(strategies.needs_alignment(s) for s in strategies_wanted):
    return None
  workdir = alignment_workdir or str(evaluate_config(config).alignment_workdir)
  if not workdir:
    names = [s.name for s in strategies_wanted if strategies.needs_alignment(s)]
    raise ValueError(f"{', '.join(names)} need an alignment model: pass --alignment_workdir (or set "
                     "evaluate.alignment_workdir) to a workdir trained with an alignment config, e.g. "
                     "configs/earth.py:align")
  if config.model.encoder == "features":
    raise ValueError("similarity / fused / gallery strategies embed the query image with the alignment model; "
                     "this model reads features, not images")
  aligner = restore_model(workdir, mesh=mesh)
  if not models.align.is_alignment(aligner.config.model):
    raise ValueError(f"{workdir} holds a {aligner.config.model.get('architecture', 'geotoken')} model, not an "
                     "alignment model")
  if image_size(aligner.config.model) != image_size(config.model):
    raise ValueError(f"the alignment model in {workdir} reads {image_size(aligner.config.model)} px images, this "
                     f"model {image_size(config.model)} px: they must see the same images")
  return aligner


# ---------------------------------------------------------------------------
# Tries.


def trie_key(strategy: Strategy, spec: s2.TokenSpec) -> str:
  return f"min{strategy.trie_min_count}_positions{strategy.trie_positions(spec)}"


def build_tries(config, spec: s2.TokenSpec, wanted: Sequence[Strategy], cache_dir=None,
                training_tokens=None) -> dict[str, decoding.CellTrie]:
  """The cell tries the strategies ask for, from the training split's token array (no
  image is read), cached on disk in cache_dir."""
  wanted = [s for s in wanted if s.trie_min_count]
  if not wanted:
    return {}
  tokens = data.training_tokens(config.data, spec) if training_tokens is None else training_tokens
  tries = {}
  for s in wanted:
    key = trie_key(s, spec)
    if key not in tries:
      tries[key] = decoding.cached_cell_trie(tokens, spec, min_count=s.trie_min_count,
                                             num_constrained=s.trie_positions(spec), cache_dir=cache_dir)
  return tries


# ---------------------------------------------------------------------------
# Galleries of locations (alignment models).


@dataclasses.dataclass
class Gallery:
  """Locations an alignment model ranks for gallery:K, with their S2 tokens and the
  model's normalized location embeddings (computed once per checkpoint, cached)."""
  name: str
  latlng: np.ndarray  # [G, 2] float32 degrees
  tokens: np.ndarray  # [G, P] int32
  features: np.ndarray | None = None  # [G, E] float32, unit norm

  def arrays(self) -> dict[str, np.ndarray]:
    if self.features is None:
      raise ValueError(f"gallery {self.name!r} has no location features yet (location_features)")
    return {"latlng": self.latlng, "tokens": self.tokens, "features": self.features}


def _csv_coordinates(path) -> np.ndarray:
  import csv  # pylint: disable=g-import-not-at-top

  lines = epath.Path(path).read_text().splitlines()
  reader = csv.DictReader(lines)
  names = {n.lower().strip(): n for n in reader.fieldnames or ()}
  lat = next((names[n] for n in ("lat", "latitude", "gps_lat") if n in names), None)
  lon = next((names[n] for n in ("lon", "lng", "longitude", "gps_lon", "gps_lng") if n in names), None)
  if lat is None or lon is None:
    raise ValueError(f"gallery CSV {path}: no latitude / longitude columns among {reader.fieldnames}")
  rows, bad = [], 0
  for row in reader:
    try:
      point = (float(row[lat]), float(row[lon]))
    except (TypeError, ValueError):
      bad += 1
      continue
    if np.isfinite(point).all() and abs(point[0]) <= 90 and abs(point[1]) <= 180:
      rows.append(point)
    else:
      bad += 1
  if bad:
    logging.warning("gallery CSV %s: %d rows without valid coordinates skipped", path, bad)
  if not rows:
    raise ValueError(f"gallery CSV {path} has no valid coordinates")
  return np.asarray(rows, np.float32)


def load_gallery(config, spec: s2.TokenSpec, name: str | None = None) -> Gallery:
  """The gallery named by `name` (default evaluate.gallery): "train" (the cell centres of
  the training split's tokens: no image read, no test location in it), "mp16_100k", or a
  CSV path."""
  eval_config = evaluate_config(config)
  name = name or str(eval_config.gallery)
  gallery = _load_gallery(config, spec, name)
  limit = int(eval_config.gallery_limit)
  if 0 < limit < len(gallery.latlng):
    keep = np.linspace(0, len(gallery.latlng) - 1, limit).round().astype(np.int64)
    gallery = Gallery(f"{name}[{limit}]", gallery.latlng[keep], gallery.tokens[keep])
  return gallery


def _load_gallery(config, spec: s2.TokenSpec, name: str) -> Gallery:
  if name == "train":  # one entry per distinct training cell (duplicates add nothing to a top-k)
    tokens = np.unique(data.training_tokens(config.data, spec), axis=0)
    return Gallery(name, s2.tokens_to_latlng(tokens, spec).astype(np.float32), tokens)
  if name == "mp16_100k":
    from geotoken_jax import package_data  # pylint: disable=g-import-not-at-top

    path = package_data.package_file("geoclip", "geoclip/model/gps_gallery/coordinates_100K.csv",
                                     install="pip install --no-deps geoclip", needed_for="the mp16_100k gallery")
    latlng = _csv_coordinates(path)
  else:
    latlng = _csv_coordinates(name)
  tokens = s2.latlng_to_tokens(latlng[:, 0].astype(np.float64), latlng[:, 1].astype(np.float64), spec)
  return Gallery(name, latlng, np.asarray(tokens, np.int32))


@functools.lru_cache(maxsize=8)
def _locate_fn(graphdef: nnx.GraphDef):
  """One compiled location embedding per model structure (not one per call)."""
  return jax.jit(lambda params, points: models.align.normalize(nnx.merge(graphdef, params).locate(points)))


def location_features(graphdef: nnx.GraphDef, params, mesh, latlng: np.ndarray, *, chunk: int = 8192
                      ) -> np.ndarray:
  """An alignment model's unit-norm location embeddings of [G, 2] coordinates: [G, E] float32,
  in chunks sharded over the mesh's batch axes."""
  divisor = sharding.global_batch_size_divisor(mesh)
  chunk = max(divisor, -(-chunk // divisor) * divisor)
  embed = _locate_fn(graphdef)
  out = []
  for start in range(0, len(latlng), chunk):
    points = np.zeros((chunk, 2), np.float32)
    part = latlng[start:start + chunk]
    points[:len(part)] = part
    placed = jax.device_put(points, sharding.batch_sharding(mesh))
    out.append(np.asarray(_gather(embed(params, placed)))[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@jax.jit
def _param_checksums(params):
  return jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), params)


def gallery_with_features(gallery: Gallery, aligner: "RestoredModel", cache_dir=None, identity: str = ""
                          ) -> Gallery:
  """The gallery with the aligner's location features, read from / written to cache_dir
  (keyed by the coordinates and the checkpoint's identity)."""
  # The key holds the coordinates, the run and a checksum of the parameters themselves, so a
  # retrained run in the same workdir never reads stale features.
  checksum = [float(x) for x in jax.tree.leaves(_param_checksums(aligner.params))]
  key = hashlib.sha256(gallery.latlng.tobytes() + f"{identity}|{aligner.step}|{checksum}".encode()).hexdigest()[:16]
  path = epath.Path(cache_dir) / f"gallery-{key}.npy" if cache_dir else None
  cached = path is not None and path.exists()
  if jax.process_count() > 1:  # every process takes the same branch (the computation is collective)
    cached = bool(multihost_utils.broadcast_one_to_all(np.int32(cached)))
  if cached:
    with path.open("rb") as f:
      features = np.load(f)
  else:
    features = location_features(aligner.graphdef, aligner.params, aligner.mesh, gallery.latlng)
    if path is not None and jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + ".tmp")
      with tmp.open("wb") as f:
        np.save(f, features)
      tmp.rename(path)
  return dataclasses.replace(gallery, features=features)


# ---------------------------------------------------------------------------
# The predictor.


@dataclasses.dataclass
class StrategyGroup:
  """Strategies that share one decoded pool (they differ only in the selection rule)."""
  pool: Strategy
  members: list[Strategy]


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

  Alignment models: when the model itself is one (`is_aligner`), its strategies are
  gallery:K over `gallery`; a GeoToken model with an `aligner` (a restored alignment
  model) also gets gallery:K and the similarity / fused rules, the candidates'
  locations embedded by the aligner inside the same program.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, param_shardings: Any, mesh, spec: s2.TokenSpec,
               wanted: Sequence[Strategy], *, num_candidates: int = 5, seed: int = 0,
               tries: Mapping[str, decoding.CellTrie] | None = None, loss_weights=None,
               is_aligner: bool = False, aligner: "RestoredModel | None" = None, gallery: Gallery | None = None,
               fused_weight: float = 1.0, knn_temperature: float = 0.05):
    self.mesh, self.spec = mesh, spec
    self.params = params
    self.strategies = list(wanted)
    self.groups = group_strategies(self.strategies)
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
    with_loss = loss_weights is not None
    weights = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)
    groups, k, fused_weight = self.groups, int(num_candidates), float(fused_weight)
    needs_query = bool(aligned)
    if not knn_temperature > 0:
      raise ValueError(f"evaluate.knn_temperature must be > 0, got {knn_temperature}")
    knn_temperature = float(knn_temperature)
    decoded = any(g.pool.kind in ("greedy", "beam", "sample") for g in groups)

    def predict(params, batch, tries, aligner_params, gallery_arrays):
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
          pool = strategies.decode_pool(model, memory, group.pool, keys, trie)
          if any(strategies.needs_alignment(m) for m in group.members):
            batch_size, n = pool["latlng"].shape[:2]
            located = align_model.locate(pool["latlng"].reshape(batch_size * n, 2)).reshape(batch_size, n, -1)
            pool["similarity"] = scale * jnp.einsum("be,bne->bn", models.align.normalize(query),
                                                    models.align.normalize(located))  # [batch, N]
        for member in group.members:
          chosen = strategies.choose(pool, member.rule, k, fused_weight)
          index = jnp.maximum(chosen["candidates"], 0)  # [batch, k]; -1 slots have probability 0
          out[member.name] = {
              "predicted": chosen["predicted"],  # [batch, 2]
              "chosen": chosen["chosen"],  # [batch]
              "candidate_tokens": jnp.take_along_axis(pool["tokens"], index[:, :, None], axis=1),
              "candidate_latlng": jnp.take_along_axis(pool["latlng"], index[:, :, None], axis=1),
              "candidate_prob": chosen["candidate_prob"],  # [batch, k]
          }
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
    self._fn = jax.jit(predict, in_shardings=(param_shardings, batch_sharding, trie_shardings,
                                              aligner_shardings, gallery_shardings),
                       out_shardings=batch_sharding)
    self._graphdef, self._is_aligner = graphdef, is_aligner

  @classmethod
  def from_restored(cls, restored: "RestoredModel", wanted: Sequence[Strategy], *, num_candidates: int = 5,
                    seed: int = 0, cache_dir=None, aligner: "RestoredModel | None" = None,
                    gallery: str | None = None, fused_weight: float | None = None) -> "Predictor":
    """A predictor for a restored model; an alignment model (restored or `aligner`) gets its
    gallery (evaluate.gallery, or `gallery`) embedded once and cached in cache_dir."""
    config = restored.config
    is_aligner = models.align.is_alignment(config.model)
    tries = build_tries(config, restored.spec, wanted, cache_dir=cache_dir)
    gallery_data = None
    if any(s.kind == "gallery" for s in wanted):
      gallery_data = load_gallery(config, restored.spec, gallery)
      gallery_data = gallery_with_features(gallery_data, restored if is_aligner else aligner, cache_dir,
                                           identity=str(getattr(aligner or restored, "workdir", "")))
    weight = float(evaluate_config(config).fused_weight if fused_weight is None else fused_weight)
    return cls(restored.graphdef, restored.params, restored.param_shardings, restored.mesh, restored.spec,
               wanted, num_candidates=num_candidates, seed=seed, tries=tries, is_aligner=is_aligner,
               aligner=aligner, gallery=gallery_data, fused_weight=weight,
               knn_temperature=float(evaluate_config(config).knn_temperature))

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
    return (self.params if params is None else params, dict(device_batch), self.tries, aligner_params,
            self._gallery_arrays)

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


def _gather(tree):
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


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
    local = next(batches)
    rows = (number * process_count + process_index) * batch_size + np.arange(batch_size)
    local["index"] = rows.astype(np.int32)
    if transform is not None:  # e.g. OnlineRetrieval: neighbours found now (every process in step)
      local = transform(local)
    device_batch = sharding.make_global_batch(device_fields(local), predictor.mesh)
    out = _gather(predictor(device_batch, params))
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


# ---------------------------------------------------------------------------
# Prediction files.


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


# ---------------------------------------------------------------------------
# The evaluation job.


def _progress(total: int, desc: str, initial: int):
  """A tqdm bar on process 0 (batches, images/s, ETA); on a non-terminal only for long runs."""
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True,
              disable=not sys.stderr.isatty() and total < 50, mininterval=5 if not sys.stderr.isatty() else 0.1)


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
                   devices=None, alignment_workdir: str | None = None) -> dict:
  """Evaluates every strategy on a split of the config's data (or on `source`, named
  `split_label`); returns {"step", "split", "output_dir", "results": {name: row}, "timings"}.

  config None: the run's saved config.  Resumable: predictions are appended batch
  by batch, and a rerun continues where the shortest file ends.
  """
  config = load_run_config(workdir, step) if config is None else config
  eval_config = evaluate_config(config)
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
  paths = {s.name: output_dir / "predictions" / (file_name(s.name) + ".jsonl") for s in wanted}
  if process_index == 0:
    _check_same_settings(output_dir, eval_config, alignment_workdir)
    (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
    (output_dir / "run.json").write_text(json.dumps(
        {"checkpoint_step": step, "split": split, "records": num_records, "limit": limit,
         "strategies": [s.name for s in wanted], "evaluate": eval_config.to_dict(),
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
    predictor = Predictor.from_restored(restored, wanted, num_candidates=int(eval_config.num_candidates),
                                        seed=int(eval_config.seed),
                                        cache_dir=epath.Path(workdir) / "cache" / "tries", aligner=aligner)
    bar = _progress(num_batches, f"{len(wanted)} strategies", first_batch)
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
    for s in wanted:
      rows = rows_of[s.name] = read_predictions(paths[s.name])
      if len(rows) != num_records:
        raise RuntimeError(f"{s.name}: {len(rows)} predictions for {num_records} images in {paths[s.name]}")
      if true_countries is None:  # the same truth for every strategy: once
        true_countries = truth_countries(rows)
      results[s.name] = score_predictions(rows, true_countries, skipped_before=prepared_rejected)
    if make_plots:
      write_plots(output_dir, rows_of, split=split, step=step, max_points=int(eval_config.plot_max_points))
    write_results(output_dir, results, split=split, step=step, timings=timings)
  return {"step": step, "split": split, "output_dir": str(output_dir), "results": results, "timings": timings}


# Settings that change predictions without changing the strategy names.
_RESUME_SETTINGS = ("alignment_workdir", "gallery", "gallery_limit", "fused_weight", "seed", "num_candidates")


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
  (output_dir / "results.md").write_text(header + table + "\n")
  (output_dir / "results.json").write_text(json.dumps(
      {"split": split, "checkpoint_step": step, "results": results, "decode_timings": timings,
       "table": table}, indent=1))
  return table


# ---------------------------------------------------------------------------
# Embeddings (alignment models).


def embed_function(restored: RestoredModel):
  """The jitted (global batch) -> {"image", "loc_head"[, "text_head"]: [B, D]} of an alignment model."""
  if not models.align.is_alignment(restored.config.model):
    raise ValueError(f"{restored.workdir or 'this run'} holds a GeoToken model; embeddings come from an "
                     "alignment model (trained with an alignment config, e.g. configs/earth.py:align)")
  graphdef, params = restored.graphdef, restored.params
  batch_sharding = sharding.batch_sharding(restored.mesh)
  fn = jax.jit(lambda p, batch: nnx.merge(graphdef, p).embed(batch),
               in_shardings=(restored.param_shardings, batch_sharding), out_shardings=batch_sharding)
  return lambda batch: fn(params, {"image": batch["image"]})


def run_embedding(workdir, output_dir, *, split: str | None = None, source=None, split_label: str | None = None,
                  step: int | None = None, batch_size: int | None = None, dtype: str = "float16",
                  fields: Sequence[str] | None = None, limit: int = 0, devices=None, overwrite: bool = False,
                  shard_rows: int = 65536) -> dict:
  """Every image of a split (or `source`) through the workdir's alignment model, stored by
  geotoken_jax.embeddings (sharded .npy arrays + manifest; resumable, multi-host).  Returns
  the manifest."""
  from geotoken_jax import embeddings  # pylint: disable=g-import-not-at-top

  restored = restore_model(workdir, step=step, devices=devices)
  config = restored.config
  if source is None:
    split = split or config.test_split
    source = data.get_source(config.data, split, restored.spec)
  else:
    split = split_label or split or "source"
  if limit:
    source = data.FirstRows(source, limit)
  global_batch = int(batch_size or evaluate_config(config).batch_size)
  identity = {"workdir": str(workdir), "step": restored.step, "split": split,
              "model": json.loads(config.model.to_json_best_effort()),
              "tokens": {"level": restored.spec.level, "group_size": restored.spec.group_size}}
  return embeddings.write_embeddings(embed_function(restored), source, output_dir, mesh=restored.mesh,
                                     global_batch_size=global_batch, dtype=dtype, fields=fields,
                                     manifest_extra=identity, shard_rows=shard_rows, overwrite=overwrite)


# ---------------------------------------------------------------------------
# Retrieval inside inference.


class OnlineRetrieval:
  """Neighbours for images the index job never saw (a folder, a split without lists):
  the run's aligner embeds each batch's images, the run's gallery is searched exactly
  (retrieval.search, sharded over the mesh), and the neighbour fields are attached
  (retrieval.join.attach) -- the same fields the stored lists give.  A callable on
  host batches (predict_batches' transform); every process calls it in step."""

  def __init__(self, config, workdir, spec: s2.TokenSpec, mesh):
    from geotoken_jax import retrieval  # pylint: disable=g-import-not-at-top
    from geotoken_jax.retrieval import neighbors, sources  # pylint: disable=g-import-not-at-top

    self.config, self.mesh = config, mesh
    self.aligner = restore_model(sources.alignment_workdir(config, workdir), mesh=mesh)
    self._embed = embed_function(self.aligner)
    self.gallery = sources.load_gallery(config, workdir, spec)
    self._rows = neighbors.SearchRows(self.gallery.store, self.gallery.fields)
    self.settings = neighbors.settings_from_config(config.retrieval)
    self.k = int(config.retrieval.k)
    self.image_size = image_size(self.aligner.config.model)
    if not models.align.is_alignment(config.model) and config.model.encoder != "features" and (
        image_size(config.model) != self.image_size):
      raise ValueError(f"the model reads {image_size(config.model)}px images and its aligner "
                       f"{self.image_size}px: online retrieval feeds one batch of images to both")
    self._search = retrieval.search
    self._gallery_ids = (neighbors.id_hashes(self.gallery.store.ids)
                         if self.settings["same_id"] and self.gallery.store.ids is not None else None)
    self._gallery_groups = neighbors.group_keys(self.settings["group"], self.gallery.latlng, self.gallery.store) \
        if str(self.settings["group"]).startswith("s2_cell") else None

  def __call__(self, local: dict) -> dict:
    from geotoken_jax.retrieval import join, neighbors  # pylint: disable=g-import-not-at-top
    from geotoken_jax.retrieval.search import Exclusion  # pylint: disable=g-import-not-at-top

    images = np.asarray(local["image"])
    if images.shape[1] != self.image_size:
      raise ValueError(f"the aligner reads {self.image_size}px images, this batch has {images.shape[1]}px: "
                       "set data.image_size to the aligner's")
    embedded = self._embed(sharding.make_global_batch({"image": images}, self.mesh))
    fields = self.gallery.fields
    host = {f: np.asarray(multihost_utils.process_allgather(embedded[f], tiled=True), np.float32)
            for f in fields}  # [global batch, dim]: every process searches every query
    # The index's leak rules apply here too (a test photo that is also in the gallery, a
    # near-duplicate): the same neighbours as stored lists would give.
    gather = lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))  # noqa: E731
    rules = {}
    if "latlng" in local and float(self.settings["duplicate_km"]) > 0:
      rules.update(query_latlng=gather(np.asarray(local["latlng"], np.float32)), gallery_latlng=self.gallery.latlng,
                   duplicate_km=float(self.settings["duplicate_km"]),
                   duplicate_similarity=float(self.settings["duplicate_similarity"]))
    if "id" in local and self._gallery_ids is not None:
      rules.update(query_ids=gather(neighbors.id_hashes(local["id"])), gallery_ids=self._gallery_ids)
    if "latlng" in local and self._gallery_groups is not None:
      latlng = gather(np.asarray(local["latlng"], np.float32))
      rules.update(query_groups=neighbors.group_keys(self.settings["group"], latlng),
                   gallery_groups=self._gallery_groups)
    exclusion = Exclusion(**rules) if rules else None
    result = self._search(neighbors.search_vectors([host[f] for f in fields]), self._rows, self.k, mesh=self.mesh,
                          chunk_rows=int(self.settings["chunk_rows"]), query_batch=int(self.settings["query_batch"]),
                          dtype=str(self.settings["dtype"]), margin=int(self.settings["margin"]), exclusion=exclusion)
    b = images.shape[0]
    mine = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
    query = join.stacked_fields([host[f][mine] for f in fields], self.gallery.feature_dim)
    return join.attach(local, query, result.indices[mine], result.scores[mine], self.gallery)


def uses_neighbors(config) -> bool:
  """Does the run's model (or its kNN strategies) read retrieved neighbours?"""
  from geotoken_jax.retrieval import sources  # pylint: disable=g-import-not-at-top

  return sources.enabled(config)


def evaluation_source(config, workdir, split: str, spec: s2.TokenSpec, mesh, source=None):
  """(source, transform) to evaluate `split` (or `source`) with: a retrieval run's split with
  stored neighbour lists reads them; any other images get OnlineRetrieval."""
  from geotoken_jax.retrieval import sources  # pylint: disable=g-import-not-at-top

  if source is not None:
    return source, (OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None)
  if uses_neighbors(config) and sources.has_lists(config, workdir, split):
    return sources.get_source(config, workdir, split, spec), None
  source = data.get_source(config.data, split, spec)
  return source, (OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None)


# ---------------------------------------------------------------------------
# Prediction on image files.


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(inputs: Iterable[str]) -> list[str]:
  """Files as given, folders expanded to their image files (recursively, sorted)."""
  def walk(folder: epath.Path) -> Iterator[epath.Path]:
    for child in sorted(folder.iterdir(), key=str):  # iterdir: rglob is refused on object stores
      if child.is_dir():
        yield from walk(child)
      elif child.suffix.lower() in IMAGE_SUFFIXES:
        yield child

  out = []
  for item in inputs:
    path = epath.Path(item)
    out.extend(str(p) for p in walk(path)) if path.is_dir() else out.append(str(item))
  return out


def s2_cell_token(cell_id: int) -> str:
  """s2geometry's S2CellId.ToToken(): hex digits, trailing zeros removed."""
  return f"{int(cell_id):016x}".rstrip("0") or "X"


@dataclasses.dataclass
class FilePrediction:
  path: str
  candidates: list[dict] | None  # None when the file could not be read
  error: str | None = None


def image_size(model_config) -> int:
  """The side of the square images the model reads."""
  if models.align.is_alignment(model_config):
    tower = model_config.image_tower
  else:
    tower = model_config.encoder
  return int(model_config.clip.image_size if tower == "clip" else model_config.vit.image_size)


def load_image_file(path: str, size: int) -> np.ndarray:
  """The evaluation view of an image file: uint8 [size, size, 3] (shorter side
  resized to `size`, centre crop; exactly what evaluation of prepared data does)."""
  try:
    return images_lib.decode_resized(epath.Path(path).read_bytes(), size)
  except Exception as e:  # PIL raises many types for bad files  pylint: disable=broad-except
    raise ValueError(f"{type(e).__name__}: {e}") from None


def predict_files(restored: RestoredModel, paths: Sequence[str], *, strategy_text: str = "beam:5",
                  top_k: int = 5, batch_size: int = 32, seed: int = 0, cache_dir=None,
                  alignment_workdir: str | None = None) -> Iterator[FilePrediction]:
  """Top-k candidate cells of every file, in order, streamed batch by batch.

  A file that cannot be read is yielded with its error (and no candidates); the
  others are predicted.  Only this process's devices are used.
  """
  config, spec = restored.config, restored.spec
  online = None
  if not models.align.is_alignment(config.model) and uses_neighbors(config):
    online = OnlineRetrieval(config, restored.workdir, spec, restored.mesh)  # embeds + searches each batch
  elif not models.align.is_alignment(config.model) and config.model.encoder == "features":
    raise ValueError(f"this model's encoder is {config.model.encoder!r} and its config has no retrieval "
                     "block: predicting from image files needs an image encoder or a retrieval-augmented run "
                     "(whose aligner and gallery give the features and neighbours)")
  strategy = strategies.parse_strategy(strategy_text).check(spec)
  aligner = restore_aligner(config, restored.mesh, [strategy], alignment_workdir)
  predictor = Predictor.from_restored(restored, [strategy], num_candidates=top_k, seed=seed, cache_dir=cache_dir,
                                      aligner=aligner)
  size = online.image_size if online is not None else image_size(config.model)
  divisor = sharding.global_batch_size_divisor(restored.mesh)
  batch_size = max(divisor, -(-int(batch_size) // divisor) * divisor)
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    pixels, readable, errors = [], [], {}
    for i, path in enumerate(chunk):
      try:
        pixels.append(load_image_file(path, size))
        readable.append(i)
      except ValueError as e:
        errors[i] = str(e)
    results: dict[int, list[dict]] = {}
    if readable:
      images = np.zeros((batch_size, size, size, 3), np.uint8)
      images[:len(pixels)] = np.stack(pixels)
      index = (start + np.arange(batch_size)).astype(np.int32)  # sampling keys by position in the list
      local = {"image": images, "index": index}
      if online is not None:
        local = online(local)
      device_batch = sharding.make_global_batch(device_fields(local), restored.mesh)
      out = jax.tree.map(np.asarray, predictor(device_batch)[strategy.name])
      for row, i in enumerate(readable):
        results[i] = _candidates(out, row, spec)
    for i, path in enumerate(chunk):
      yield FilePrediction(path, results.get(i), errors.get(i))


def _candidates(out: dict, row: int, spec: s2.TokenSpec) -> list[dict]:
  keep = out["candidate_prob"][row] > 0
  tokens = out["candidate_tokens"][row][keep]
  ids = s2.tokens_to_cell_ids(tokens, spec)
  vertices = s2.tokens_to_vertices(tokens, spec)  # [k, 4, 2]
  return [{"rank": r + 1, "lat": float(out["candidate_latlng"][row, j, 0]),
           "lon": float(out["candidate_latlng"][row, j, 1]),
           "probability": float(out["candidate_prob"][row, j]), "s2_token": s2_cell_token(ids[r]),
           "tokens": "-".join(str(int(t)) for t in tokens[r]), "level": spec.level,
           "vertices": vertices[r].tolist()}
          for r, j in enumerate(np.flatnonzero(keep))]


def geojson(predictions: Iterable[FilePrediction]) -> dict:
  """A FeatureCollection with one cell polygon per candidate ([lon, lat] rings, closed)."""
  features = []
  for p in predictions:
    for c in p.candidates or ():
      ring = [[lon, lat] for lat, lon in c["vertices"]]
      lons = [q[0] for q in ring]
      if max(lons) - min(lons) > 180:  # a cell astride the antimeridian: keep the ring contiguous
        ring = [[lon + 360 if lon < 0 else lon, lat] for lon, lat in ring]
      ring.append(ring[0])
      properties = {k: v for k, v in c.items() if k != "vertices"}
      features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"image": p.path, **properties}})
  return {"type": "FeatureCollection", "features": features}
