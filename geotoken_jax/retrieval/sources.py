"""Retrieval from a config: where a run's embeddings, neighbour lists and aligner live, and
the data sources that carry neighbours (what the trainer and the inference module call).

A run with retrieval has a `retrieval` block (configs/earth.py:retrieval, configs/paper.py):
  k                   neighbours the model reads (model.features.num_neighbors); 0 = off
  alignment_workdir   the alignment model whose embeddings are searched
  embeddings          folder of embedding stores, one per split: <embeddings>/<split>/
  neighbors           folder of neighbour lists, one per query split: <neighbors>/<split>/
  gallery             the split searched (train): its embeddings, tokens and coordinates
  fields              embedding fields searched and fed (image, loc_head[, text_head])
  search_k, dtype, chunk_rows, query_batch, margin, block_rows   the index job
  same_id, duplicate_km, duplicate_similarity, group             leak exclusion (neighbors)
  dropout, shuffle    training-time neighbour noise (join.RetrievalSource)
Relative paths are relative to the run's workdir, so one folder holds the whole
retrieval-augmented model: its checkpoints, its aligner, its gallery, its lists.
"""

from __future__ import annotations

from etils import epath

from geotoken_jax import data, embeddings, s2
from geotoken_jax.retrieval import join, neighbors


def enabled(config) -> bool:
  return "retrieval" in config and int(config.retrieval.get("k", 0)) > 0


def resolve(workdir, path: str) -> epath.Path:
  """A retrieval path: absolute (or gs://...) as given, relative to the workdir otherwise."""
  path = str(path)
  if not path:
    raise ValueError("empty retrieval path")
  if path.startswith("/") or "://" in path:
    return epath.Path(path)
  return epath.Path(workdir) / path


def embeddings_dir(config, workdir, split: str) -> epath.Path:
  return resolve(workdir, config.retrieval.embeddings) / neighbors.split_dir_name(split)


def neighbors_dir(config, workdir, split: str) -> epath.Path:
  return resolve(workdir, config.retrieval.neighbors) / neighbors.split_dir_name(split)


def alignment_workdir(config, workdir) -> epath.Path:
  return resolve(workdir, config.retrieval.alignment_workdir)


def load_neighbor_gallery(config, workdir, spec: s2.TokenSpec) -> join.NeighborGallery:
  store = embeddings.open_embeddings(embeddings_dir(config, workdir, config.retrieval.gallery))
  return join.NeighborGallery(store, tuple(config.retrieval.fields), spec)


def has_lists(config, workdir, split: str) -> bool:
  return (neighbors_dir(config, workdir, split) / neighbors.MANIFEST).exists()


def wrap_source(config, workdir, split: str, source, spec: s2.TokenSpec, *,
                gallery: join.NeighborGallery | None = None, training: bool = False,
                keep_image: bool = True) -> join.RetrievalSource:
  """`source` (the records of `split`) with their stored neighbour lists attached."""
  gallery = gallery or load_neighbor_gallery(config, workdir, spec)
  try:
    query_store = embeddings.open_embeddings(embeddings_dir(config, workdir, split))
    lists = neighbors.open_neighbors(neighbors_dir(config, workdir, split))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"split {split!r} has no neighbours yet ({e}). Build them with the recipe "
                            "(python -m geotoken_jax.recipe) or the embed and index commands") from None
  r = config.retrieval
  return join.RetrievalSource(source, query_store=query_store, neighbors=lists, gallery=gallery, k=int(r.k),
                              dropout=float(r.get("dropout", 0.0)) if training else 0.0,
                              shuffle=bool(r.get("shuffle", False)) if training else False,
                              seed=int(config.seed), keep_image=keep_image, name=split, training=training)


def get_source(config, workdir, split: str, spec: s2.TokenSpec, *, seed: int = 0, gallery=None):
  """data.get_source(config.data, split), with neighbours attached when the config retrieves."""
  source = data.get_source(config.data, split, spec, seed=seed)
  if not enabled(config):
    return source
  keep_image = str(config.model.get("encoder", "")) != "features"
  return wrap_source(config, workdir, split, source, spec, gallery=gallery, training=split == "train",
                     keep_image=keep_image)


def check_model(config, gallery: join.NeighborGallery | None = None) -> None:
  """The model reads what the retrieval block feeds (K, the fields and their width)."""
  model, r = config.model, config.retrieval
  if "architecture" in model and model.architecture == "align":
    raise ValueError("an alignment model does not read neighbours: remove the retrieval block")
  if str(model.encoder) != "features" and not bool(model.get("neighbor_memory", False)):
    raise ValueError("the config retrieves neighbours but its model reads none: use model.encoder "
                     "'features' or set model.neighbor_memory = True")
  if int(model.features.num_neighbors) != int(r.k):
    raise ValueError(f"retrieval.k ({r.k}) must equal model.features.num_neighbors "
                     f"({model.features.num_neighbors})")
  search_k = int(neighbors.settings_from_config(r)["k"])
  if int(r.k) > search_k:
    raise ValueError(f"retrieval.k ({r.k}) must be <= retrieval.search_k ({search_k}): the lists hold search_k")
  if str(model.encoder) == "features":
    if int(model.features.num_features) != len(tuple(r.fields)):
      raise ValueError(f"model.features.num_features ({model.features.num_features}) must equal the number of "
                       f"retrieval.fields {tuple(r.fields)}")
    if gallery is not None and int(model.features.feature_dim) != gallery.feature_dim:
      raise ValueError(f"model.features.feature_dim ({model.features.feature_dim}) must equal the widest "
                       f"retrieval field of the gallery ({gallery.feature_dim}: {gallery.store.dims})")
