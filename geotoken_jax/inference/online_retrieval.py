"""Retrieval inside inference: neighbours for images the index job never saw.

  OnlineRetrieval      the run's aligner embeds each batch, its neighbour gallery is searched
                       (retrieval.search), the neighbour fields attached (retrieval.join)
  uses_neighbors       does the run read retrieved neighbours?
  evaluation_source    (source, transform) to evaluate a split with: stored neighbour lists
                       when the split has them, else OnlineRetrieval
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from geotoken_jax import data, models, retrieval, s2, sharding
from geotoken_jax.inference.embedding_job import embed_function
from geotoken_jax.inference.restore import image_size, restore_model
from geotoken_jax.retrieval import exclusion, join, neighbors, sources


class OnlineRetrieval:
  """Neighbours for images the index job never saw (a folder, a split without lists):
  the run's aligner embeds each batch's images, the run's gallery is searched exactly
  (retrieval.search, sharded over the mesh), and the neighbour fields are attached
  (retrieval.join.attach) -- the same fields the stored lists give.  A callable on
  host batches (predict_batches' transform); every process calls it in step."""

  def __init__(self, config, workdir, spec: s2.TokenSpec, mesh):
    self.config, self.mesh = config, mesh
    self.aligner = restore_model(sources.alignment_workdir(config, workdir), mesh=mesh)
    self._embed = embed_function(self.aligner)
    self.gallery = sources.load_neighbor_gallery(config, workdir, spec)
    self._rows = neighbors.SearchRows(self.gallery.store, self.gallery.fields)
    self.settings = neighbors.settings_from_config(config.retrieval)
    self.k = int(config.retrieval.k)
    self.image_size = image_size(self.aligner.config.model)
    if not models.align.is_alignment(config.model) and config.model.encoder != "features" and (
        image_size(config.model) != self.image_size):
      raise ValueError(f"the model reads {image_size(config.model)}px images and its aligner "
                       f"{self.image_size}px: online retrieval feeds one batch of images to both")
    self._search = retrieval.search
    # Test-time rules: label-free (the same id only); never the query's coordinates.
    self._gallery_keys = exclusion.gallery_keys(self.settings, len(self.gallery), regime=exclusion.TEST,
                                                ids=self.gallery.store.ids)

  def __call__(self, local: dict) -> dict:
    images = np.asarray(local["image"])
    if images.shape[1] != self.image_size:
      raise ValueError(f"the aligner reads {self.image_size}px images, this batch has {images.shape[1]}px: "
                       "set data.image_size to the aligner's")
    embedded = self._embed(sharding.make_global_batch({"image": images}, self.mesh))
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
    result = self._search(neighbors.search_vectors([host[f] for f in fields]), self._rows, self.k, mesh=self.mesh,
                          chunk_rows=int(self.settings["chunk_rows"]), query_batch=int(self.settings["query_batch"]),
                          dtype=str(self.settings["dtype"]), margin=int(self.settings["margin"]), exclusion=rules)
    b = images.shape[0]
    mine = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
    query = join.stacked_fields([host[f][mine] for f in fields], self.gallery.feature_dim)
    return join.attach(local, query, result.indices[mine], result.scores[mine], self.gallery)


def uses_neighbors(config) -> bool:
  """Does the run's model (or its kNN strategies) read retrieved neighbours?"""
  return sources.enabled(config)


def evaluation_source(config, workdir, split: str, spec: s2.TokenSpec, mesh, source=None):
  """(source, transform) to evaluate `split` (or `source`) with: a retrieval run's split with
  stored neighbour lists reads them; any other images get OnlineRetrieval."""
  if source is not None:
    return source, (OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None)
  if uses_neighbors(config) and sources.has_lists(config, workdir, split):
    return sources.get_source(config, workdir, split, spec), None
  source = data.get_source(config.data, split, spec)
  return source, (OnlineRetrieval(config, workdir, spec, mesh) if uses_neighbors(config) else None)
