"""Retrieval inside inference: neighbours for images the index job never saw.

  OnlineRetrieval      the run's query embedder (its aligner, or the tiny-image embedding when
                       the gallery was made by it) embeds each batch, its neighbour gallery is searched
                       (DeviceGallery: resident on the devices, retrieval.search's results),
                       the neighbour fields attached (retrieval.join)
  DeviceGallery        a gallery's search matrix placed on the mesh once, searched exactly
  uses_neighbors       does the run read retrieved neighbours?
  evaluation_source    (source, transform) to evaluate a split with: stored neighbour lists
                       when the split has them, else OnlineRetrieval
  image_resize_mode    data.image_resize_mode of the network the images feed (the query
                       embedder's for a features model that retrieves online)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geotoken_jax import data, embeddings, models, s2, sharding
from geotoken_jax.encoders import tiny_image
from geotoken_jax.inference.embedding_job import AlignerEmbedder, TinyImageEmbedder, embed_function
from geotoken_jax.inference.restore import image_size, restore_model
from geotoken_jax.retrieval import exclusion, join, neighbors, sources


def _split_ids(ids: np.ndarray) -> np.ndarray:
  """int64 [N] -> uint32 [N, 2] (high, low): JAX runs without x64, so ids are compared in halves."""
  x = np.ascontiguousarray(ids, np.int64).view(np.uint64)
  return np.stack([(x >> np.uint64(32)).astype(np.uint32), (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)], -1)


def _top(values: jax.Array, rows: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """top_k along axis 1 (stable: on ties the earlier column wins); -inf slots get row -1."""
  values, position = lax.top_k(values, k)
  return values, jnp.where(values == -jnp.inf, -1, jnp.take_along_axis(rows, position, axis=1))


@functools.lru_cache(maxsize=16)
def _resident_search(mesh: Mesh, run_k: int, chunk: int, dtype: str, with_ids: bool, gather: bool):
  """The jitted pass over a resident gallery: (queries [B, D], gallery [R, D], rows [R], query id
  halves [B, 2], gallery id halves [R, 2]) -> (scores, rows) [B, run_k] of the best rows the
  same-id rule keeps, and with `gather` their gallery rows [B, run_k, D] as float32."""
  axes = tuple(mesh.axis_names)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()
  compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  precision = lax.Precision.HIGHEST if dtype == "float32" else lax.Precision.DEFAULT

  def body(q, g, rows, qids, gids):
    n = g.shape[0] // chunk
    q = q.astype(compute)

    def step(running, x):
      g_c, rows_c, ids_c = x  # [chunk, D], [chunk], [chunk, 2]: this device's rows, in row order
      s = lax.dot_general(q, g_c.astype(compute), (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)  # [B, chunk]
      keep = (rows_c >= 0)[None, :]
      if with_ids:
        keep = keep & ~((qids[:, None, 0] == ids_c[None, :, 0]) & (qids[:, None, 1] == ids_c[None, :, 1]))
      s = jnp.where(keep, s, -jnp.inf)
      candidates = _top(s, jnp.broadcast_to(rows_c[None, :], s.shape), min(run_k, chunk))
      # Running first: on ties the earlier (lower) rows stay ahead.
      return _top(*(jnp.concatenate([a, b], axis=1) for a, b in zip(running, candidates)), run_k), None

    start = (jnp.full((q.shape[0], run_k), -jnp.inf, jnp.float32), jnp.full((q.shape[0], run_k), -1, jnp.int32))
    ids = gids if with_ids else jnp.zeros((g.shape[0], 2), jnp.uint32)
    (values, found), _ = lax.scan(step, start, (g.reshape(n, chunk, -1), rows.reshape(n, chunk),
                                                ids.reshape(n, chunk, 2)))
    # Devices hold consecutive row ranges in mesh order: gathered, the columns stay in row order.
    values, found = _top(lax.all_gather(values, axes, axis=1, tiled=True),
                         lax.all_gather(found, axes, axis=1, tiled=True), run_k)
    if not gather:
      return values, found, jnp.zeros((), jnp.float32)
    # The winners' rows from the device holding each (zeros elsewhere, summed: exact).
    local = found - rows[0]
    safe = jnp.clip(local, 0, g.shape[0] - 1)
    mine = (found >= 0) & (local >= 0) & (local < g.shape[0]) & (rows[safe] == found)
    picked = jnp.where(mine[..., None], g[safe].astype(jnp.float32), 0.0)
    return values, found, lax.psum(picked, axes)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=(rep, PartitionSpec(axes, None), rows_spec, rep,
                                                    PartitionSpec(axes, None)),
                         out_specs=(rep, rep, rep),
                         # all_gather's output is the same on every device; the varying-axes check
                         # cannot infer that (as in retrieval.search).
                         check_vma=False)
  return jax.jit(mapped)


class DeviceGallery:
  """A gallery's search vectors resident on the mesh's devices, searched exactly batch after
  batch with no gallery read per batch.

  At construction the gallery's search matrix (neighbors.search_matrix: written beside the
  store once, by the index job or here) is placed once, its rows split over all mesh axes
  (jax.make_array_from_callback: each process reads only its own devices' rows), with the row
  numbers and the id hashes of the same-id rule.  search() is one jitted pass over the resident
  rows: per device a scan over chunks of its rows (scores in the search dtype accumulated in
  float32; excluded and padding rows -inf; a running top-(k + margin), ties to the lower row),
  the devices' candidates all-gathered and cut to k + margin; their float32 vectors (gathered
  from the devices for a float32 matrix, read from the store for a bfloat16 one) are rescored
  on the host (float64 inner products rounded to float32) and ordered by (-score, row):
  retrieval.search's lists and scores.  A store whose folder cannot be written (no matrix) is
  placed from its fields, normalized as they are read (still once).
  """

  def __init__(self, store, fields, mesh: Mesh, *, k: int, dtype: str = "float32", margin: int = 16,
               chunk_rows: int = 65536, ids: np.ndarray | None = None, progress: bool = True):
    self.matrix = neighbors.search_matrix(store, fields, dtype, progress=progress)  # None: a read-only store
    self.rows = neighbors.SearchRows(store, fields, self.matrix)  # float32 vectors of a bfloat16 matrix's rows
    self.mesh, self.dtype = mesh, dtype
    self.k, self.run_k = int(k), int(k) + int(margin)
    self.placed_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    num_rows, dims = self.rows.shape
    axes = tuple(mesh.axis_names)
    devices = math.prod(mesh.shape[a] for a in axes)
    per_device = -(-num_rows // devices)
    self.chunk = max(1, min(per_device, -(-int(chunk_rows) // devices)))
    per_device = -(-per_device // self.chunk) * self.chunk
    self.padded = per_device * devices
    self.num_rows = num_rows
    source = self.matrix if self.matrix is not None else self.rows

    def rows_of(index) -> tuple[int, int]:
      lo, hi, _ = index[0].indices(self.padded)
      return lo, hi

    def vectors(index):
      lo, hi = rows_of(index)
      part = np.asarray(source[lo:min(hi, num_rows)]).astype(self.placed_dtype, copy=False)
      return np.concatenate([part, np.zeros((hi - lo - len(part), dims), part.dtype)]) if len(part) < hi - lo else part

    def row_numbers(index):
      lo, hi = rows_of(index)
      rows = np.arange(lo, hi, dtype=np.int64)
      return np.where(rows < num_rows, rows, -1).astype(np.int32)

    self.vectors = jax.make_array_from_callback((self.padded, dims), NamedSharding(mesh, PartitionSpec(axes, None)),
                                                vectors)
    self.row_numbers = jax.make_array_from_callback((self.padded,), NamedSharding(mesh, PartitionSpec(axes)),
                                                    row_numbers)
    self.ids, self._no_ids = None, None
    if ids is not None:
      halves = _split_ids(np.asarray(ids, np.int64))

      def id_halves(index):
        lo, hi = rows_of(index)
        part = halves[lo:min(hi, num_rows)]
        return np.concatenate([part, np.zeros((hi - lo - len(part), 2), np.uint32)])

      self.ids = jax.make_array_from_callback((self.padded, 2), NamedSharding(mesh, PartitionSpec(axes, None)),
                                              id_halves)

  def _replicated(self, array: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, PartitionSpec()),
                                        lambda index: array[index])

  def search(self, queries: np.ndarray, exclusion_rules=None) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [B, k] best first, -1: none; scores float32 [B, k], -inf: none) of float32
    search vectors `queries` [B, D] (the same on every process), under the test regime's
    exclusion (exclusion.query_exclusion: the same id only), as retrieval.search gives them."""
    queries = np.ascontiguousarray(queries, np.float32)
    with_ids = exclusion_rules is not None and exclusion_rules.query_ids is not None
    if exclusion_rules is not None:
      others = [f for f in ("query_groups", "query_latlng") if getattr(exclusion_rules, f) is not None]
      if others or (with_ids and self.ids is None):
        raise ValueError(f"online retrieval applies the same-id rule only (the test regime), got {others or 'ids'}")
    gather = self.placed_dtype == np.float32  # the exact rows are on the devices
    step = _resident_search(self.mesh, self.run_k, self.chunk, self.dtype, with_ids, gather)
    qids = _split_ids(exclusion_rules.query_ids) if with_ids else np.zeros((len(queries), 2), np.uint32)
    if with_ids:
      gallery_ids = self.ids
    else:  # the step's signature wants one; built once
      if self._no_ids is None:
        self._no_ids = jax.make_array_from_callback(
            (self.padded, 2), NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names), None)),
            lambda index: np.zeros((index[0].indices(self.padded)[1] - index[0].indices(self.padded)[0], 2),
                                   np.uint32))
      gallery_ids = self._no_ids
    _, found, vectors = step(self._replicated(queries), self.vectors, self.row_numbers, self._replicated(qids),
                             gallery_ids)
    found = np.asarray(found.addressable_data(0)).astype(np.int64)  # [B, run_k]
    valid = found >= 0
    query_of = np.nonzero(valid)[0]
    if gather:
      rows = np.asarray(vectors.addressable_data(0))[valid].astype(np.float64)  # [V, D]
    else:
      unique, inverse = np.unique(found[valid], return_inverse=True)
      rows = np.asarray(self.rows.take(unique), np.float64)[inverse]
    scores = np.full(found.shape, -np.inf, np.float32)
    scores[valid] = np.einsum("vd,vd->v", queries.astype(np.float64)[query_of], rows).astype(np.float32)
    order = np.lexsort([np.where(valid, found, np.iinfo(np.int64).max), -scores.astype(np.float64), ~valid],
                       axis=-1)[:, :self.k]
    picked, ok = np.take_along_axis(found, order, axis=1), np.take_along_axis(valid, order, axis=1)
    indices = np.full((len(queries), self.k), -1, np.int64)
    out_scores = np.full((len(queries), self.k), -np.inf, np.float32)
    width = order.shape[1]
    indices[:, :width] = np.where(ok, picked, -1)
    out_scores[:, :width] = np.where(ok, np.take_along_axis(scores, order, axis=1), -np.inf)
    return indices, out_scores


class OnlineRetrieval:
  """Neighbours for images the index job never saw (a folder, a split without lists):
  the run's query embedder (its aligner; the tiny-image embedding for a gallery of tiny
  images) embeds each batch's images, the run's gallery is searched exactly
  (DeviceGallery: its search matrix resident on the mesh, read once; retrieval.search's
  lists), and the neighbour fields are attached
  (retrieval.join.attach) -- the same fields the stored lists give.  A callable on
  host batches (predict_batches' transform); every process calls it in step.  A gallery
  embedded by another embedder than the queries' (an aligner's step and parameter checksum;
  a tiny image's size, colour and pixels) is refused: its rows would live in another
  embedding space than the queries'."""

  def __init__(self, config, workdir, spec: s2.TokenSpec, mesh):
    self.config, self.mesh = config, mesh
    self.gallery = sources.load_neighbor_gallery(config, workdir, spec)
    self.aligner = None  # the restored alignment model, when an aligner embeds the queries
    self.embedder = self._query_embedder(config, workdir, mesh)
    sources.check_gallery_aligner(self.gallery.store, self.embedder.identity())
    self.features = sources.reads_features(config)  # a neighbour-memory model reads none
    self.settings = neighbors.settings_from_config(config.retrieval)
    self.k = int(config.retrieval.k)
    self.image_size = self.embedder.image_size
    if not models.align.is_alignment(config.model) and config.model.encoder != "features" and (
        image_size(config.model) != self.image_size):
      raise ValueError(f"the model reads {image_size(config.model)}px images and its query embedder "
                       f"{self.image_size}px: online retrieval feeds one batch of images to both")
    # Test-time rules: label-free (the same id only); never the query's coordinates.
    self._gallery_keys = exclusion.gallery_keys(self.settings, len(self.gallery), regime=exclusion.TEST,
                                                ids=self.gallery.store.ids)
    # The gallery's search matrix, placed on the devices once and searched by every batch.
    self.device_gallery = DeviceGallery(
        self.gallery.store, self.gallery.fields, mesh, k=self.k, dtype=str(self.settings["dtype"]),
        margin=int(self.settings["margin"]), chunk_rows=int(self.settings["chunk_rows"]), ids=self._gallery_keys.ids)

  def _query_embedder(self, config, workdir, mesh):
    """What embeds the queries: the tiny-image embedding when the config's recipe names it, or when
    the gallery was written by it and the config trains no aligner (a run reading another run's
    tiny-image stores); else the aligner restored from retrieval.alignment_workdir.  Either way its
    identity must be the gallery's (checked by the caller)."""
    spec = sources.tiny_image_spec(config)
    stored = embeddings.aligner_identity(self.gallery.store.manifest)
    if (spec is None and embeddings.embedder_kind(stored) == tiny_image.NAME and not sources.trains_aligner(config)
        and stored.get("size") is not None):
      spec = tiny_image.TinyImageSpec(int(stored["size"]), bool(stored.get("colour")))
    if spec is not None:  # the run's own pixels: data.image_size, decoded as the run decodes them
      return TinyImageEmbedder(spec, image_size=int(config.data.get("image_size", 224)),
                               resize=data.image_resize_mode(config), mesh=mesh)
    self.aligner = restore_model(sources.alignment_workdir(config, workdir), mesh=mesh)
    return AlignerEmbedder(self.aligner, embed_function(self.aligner), mesh=mesh)

  def __call__(self, local: dict) -> dict:
    images = np.asarray(local["image"])
    if images.shape[1] != self.image_size:
      raise ValueError(f"the query embedder reads {self.image_size}px images, this batch has {images.shape[1]}px: "
                       "set data.image_size to the embedder's")
    embedded = self.embedder(sharding.make_global_batch({"image": images}, self.mesh))
    fields = self.gallery.fields
    host = {f: np.asarray(multihost_utils.process_allgather(embedded[f], tiled=True), np.float32)
            for f in fields}  # [global batch, dim]: every process searches every query
    # The test regime's rules, as the index job applies them to validation / test lists: a
    # photo that is also in the gallery (by id) is excluded; the batch's coordinates, when it
    # has any, are never read, so evaluate and predict give an image the same neighbours.
    query_ids = None
    if "id" in local and self._gallery_keys.ids is not None:
      query_ids = np.asarray(multihost_utils.process_allgather(exclusion.id_hashes(local["id"]), tiled=True))
    rules = exclusion.query_exclusion(self.settings, self._gallery_keys, query_ids=query_ids)
    indices, scores = self.device_gallery.search(neighbors.search_vectors([host[f] for f in fields]), rules)
    b = images.shape[0]
    mine = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
    query = (join.stacked_fields([host[f][mine] for f in fields], self.gallery.feature_dim)
             if self.features else None)
    return join.attach(local, query, indices[mine], scores[mine], self.gallery,
                       features=self.features)


def uses_neighbors(config) -> bool:
  """Does the run's model (or its kNN strategies) read retrieved neighbours?"""
  return sources.enabled(config)


def image_resize_mode(config, online: OnlineRetrieval | None = None) -> str:
  """How to decode the images of a run (data.image_resize_mode): a features model reads no
  image, so when it embeds them online, its query embedder's mode (the aligner's; the run's
  own for the tiny-image embedding), unless the run's data.resize names one."""
  if (online is not None and str(config.model.get("encoder", "")) == "features"
      and str(config.data.get("resize") or "auto") == "auto"):
    return online.embedder.resize
  return data.image_resize_mode(config)


def evaluation_source(config, workdir, split: str, spec: s2.TokenSpec, mesh, source=None):
  """(source, transform) to evaluate `split` (or `source`) with: a retrieval run's split with
  stored neighbour lists reads them; any other images get OnlineRetrieval."""
  if source is not None:
    return source, (OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None)
  if uses_neighbors(config) and sources.has_lists(config, workdir, split):
    return sources.get_source(config, workdir, split, spec), None
  online = OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None
  return data.get_source(config.data, split, spec, resize=image_resize_mode(config, online)), online
