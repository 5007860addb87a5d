"""Retrieval from a config: where a run's embeddings, neighbour lists and aligner live, and
the data sources that carry neighbours (what the trainer and the inference module call).

A run with retrieval has a `retrieval` block (configs/earth.py:retrieval, configs/paper.py):
  k                   neighbours the model reads (model.features.num_neighbors); 0 = off
  alignment_workdir   the alignment model whose embeddings are searched (unused when the
                      recipe's alignment is "tiny_image[:S[:colour]]": tiny_image_spec)
  embeddings          folder of embedding stores, one per split: <embeddings>/<split>/
  neighbors           folder of neighbour lists, one per query split: <neighbors>/<split>/
  gallery             the split searched (train): its embeddings, tokens and coordinates
  fields              embedding fields searched and fed (image, loc_head[, text_head]; a
                      tiny-image store's one field: tiny)
  search_k, dtype, chunk_rows, query_batch, margin, block_rows   the index job
  same_id, duplicate_km, duplicate_similarity, group             leak exclusion (neighbors)
  dropout, shuffle    training-time neighbour noise (join.RetrievalSource)
Relative paths are relative to the run's workdir, so one folder holds the whole
retrieval-augmented model: its checkpoints, its aligner, its gallery, its lists.

What is refused (each error names what differs, both values and the fix):
  lists searched with other result settings than the retrieval block (join.RESULT_SETTINGS:
    fields, search_k, dtype, margin, same_id, duplicate_km, duplicate_similarity, group),
    or in other embeddings than the stores hold now (checksums)        wrap_source
  a store a run needs, or its lists, missing or incomplete; a split's store written by
    another embedder (aligner: step, parameter checksum; tiny image: size, colour, pixels)
    than the gallery's                                                  check_inputs (the
                                                                          trainer, before step 1)
  a gallery written by another embedder than the one online retrieval embeds queries with
                                                                        check_gallery_aligner
"""

from __future__ import annotations

import json

from etils import epath

from geotoken_jax import data, embeddings, s2
from geotoken_jax.encoders import tiny_image
from geotoken_jax.models import geotoken
from geotoken_jax.retrieval import join, neighbors


class MissingInputsError(FileNotFoundError):
  """Embedding stores or neighbour lists a run reads are missing or incomplete."""


class AlignerMismatchError(ValueError):
  """Embeddings written by another aligner than the one they are compared with."""


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


def model_reads_neighbors(config) -> bool:
  """Does the run's model read neighbours (a features encoder, a ViT with neighbour memory)?  A
  model that does not still gets each evaluation split's lists, for its kNN and kNN-LM strategies,
  but trains on the plain records: the gallery needs no lists of its own then."""
  return "neighbor_tokens" in geotoken.input_keys(config.model)


def reads_features(config) -> bool:
  """Does the run's model read embedding features (join.FEATURE_FIELDS)?  The feature encoder
  does; an image encoder with a neighbour memory reads the neighbours' tokens and scores only
  (models.geotoken.input_keys), so its batches carry no features."""
  return bool(set(join.FEATURE_FIELDS) & set(geotoken.input_keys(config.model)))


# ---------------------------------------------------------------------------
# What a run reads, checked before it starts.


def _manifest_problem(directory, what: str) -> str | None:
  path = epath.Path(directory) / neighbors.MANIFEST
  if not path.exists():
    return f"{what}: {directory} (no {neighbors.MANIFEST})"
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return f"{what}: {path} cannot be read ({type(e).__name__}: {e})"
  if not manifest.get("complete"):
    return f"{what}: {directory} is incomplete (an interrupted run: rerun it to finish)"
  return None


def missing_inputs(config, workdir, splits) -> list[str]:
  """One line per embedding store (the gallery's and each split's) and neighbour list set (each
  split's) that a run reading `splits` needs and that is missing or incomplete."""
  gallery = str(config.retrieval.gallery)
  problems = [_manifest_problem(embeddings_dir(config, workdir, split), f"embeddings of {split!r}")
              for split in dict.fromkeys([gallery, *splits])]
  problems += [_manifest_problem(neighbors_dir(config, workdir, split), f"neighbour lists of {split!r}")
               for split in dict.fromkeys(splits)]
  return [p for p in problems if p]


def check_inputs(config, workdir, splits) -> None:
  """Every store and list set a run reading `splits` needs exists and is complete (naming each
  that is not), and every split's store was written by the gallery's aligner (step, parameter
  checksum).  Settings and checksums are checked as each split's source is built (wrap_source)."""
  problems = missing_inputs(config, workdir, splits)
  if problems:
    raise MissingInputsError(
        f"this run reads embeddings and neighbour lists of {list(dict.fromkeys(splits))} "
        f"(gallery {str(config.retrieval.gallery)!r}) that are missing or incomplete:\n  - "
        + "\n  - ".join(problems)
        + "\nBuild them first: the recipe (python -m geotoken_jax.train --config with a `recipe` block, e.g. "
        "configs/paper.py) runs the embed and index stages; or python -m geotoken_jax.embed for each store "
        "and python -m geotoken_jax.index --config CONFIG --workdir WORKDIR")
  gallery = str(config.retrieval.gallery)
  reference = embeddings.aligner_identity(embeddings.open_embeddings(embeddings_dir(config, workdir, gallery)).manifest)
  for split in dict.fromkeys(splits):
    if split == gallery:
      continue
    directory = embeddings_dir(config, workdir, split)
    other = embeddings.aligner_identity(embeddings.open_embeddings(directory).manifest)
    differing = []
    for key in embeddings.differing_keys(reference, other):
      a, b = ((embeddings.embedder_kind(reference), embeddings.embedder_kind(other)) if key == "embedding"
              else (reference.get(key), other.get(key)))
      if a != b:
        differing.append(f"{key}: gallery {a!r}, {split} {b!r}")
    if differing:
      raise AlignerMismatchError(
          f"the embeddings of {split!r} ({directory}) were written by another embedder than the gallery's "
          f"({'; '.join(differing)}): its queries would be searched in another embedding space. Re-embed with "
          "one aligner: rerun the recipe (it re-embeds stores another aligner wrote), or "
          "python -m geotoken_jax.embed --overwrite, then the index job")


def check_gallery_aligner(store, identity: dict) -> None:
  """Refuses a gallery store written by another embedder than `identity` (the identity() of the
  embedder of the queries: an aligner's step and parameter checksum, RestoredModel.identity(); a
  tiny-image embedding's size, colour and input pixels)."""
  stored = embeddings.aligner_identity(store.manifest)
  differing = embeddings.embedder_differences(stored, identity)
  if differing:
    kind = embeddings.embedder_kind(identity)
    who = (f"another aligner than {identity.get('workdir')} holds now"
           if kind == embeddings.ALIGNER == embeddings.embedder_kind(stored)
           else f"another embedder than the queries' ({kind})")
    raise AlignerMismatchError(
        f"the gallery {store.directory} was embedded by {who} ({'; '.join(differing)}): queries embedded by it "
        "would be searched in another embedding space. Re-embed the gallery and rebuild the lists: rerun the "
        "recipe (it re-embeds stores another embedder wrote), or python -m geotoken_jax.embed --overwrite and "
        "python -m geotoken_jax.index --overwrite")


def tiny_image_spec(config) -> tiny_image.TinyImageSpec | None:
  """The tiny-image embedding a config's recipe names (recipe.alignment = "tiny_image[:S[:colour]]"
  instead of an alignment training config), else None (an aligner embeds)."""
  recipe = config.get("recipe")
  alignment = recipe.get("alignment") if recipe is not None else None
  return tiny_image.parse(alignment) if tiny_image.is_tiny_image(alignment) else None


def trains_aligner(config) -> bool:
  """Does the config's recipe train the aligner its stores are embedded with?"""
  return "recipe" in config and config.recipe.get("alignment") is not None and tiny_image_spec(config) is None


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
  # Lists whose settings differ from the config's are refused (join.check_list_settings), and
  # the batches carry features only for a model that reads them.
  return join.RetrievalSource(source, query_store=query_store, neighbors=lists, gallery=gallery, k=int(r.k),
                              dropout=float(r.get("dropout", 0.0)) if training else 0.0,
                              shuffle=bool(r.get("shuffle", False)) if training else False,
                              seed=int(config.seed), keep_image=keep_image, name=split, training=training,
                              features=reads_features(config), settings=neighbors.settings_from_config(r))


def get_source(config, workdir, split: str, spec: s2.TokenSpec, *, seed: int = 0, gallery=None,
               to_train: bool = False):
  """data.get_source(config.data, split), with neighbours attached when the config retrieves;
  `to_train` (the trainer's training records): only when the model reads them, since neighbours
  that serve the evaluation strategies alone (knn:K, kNN-LM) have no lists for the gallery."""
  source = data.get_source(config.data, split, spec, seed=seed, resize=data.image_resize_mode(config))
  if not enabled(config) or (to_train and not model_reads_neighbors(config)):
    return source
  keep_image = str(config.model.get("encoder", "")) != "features"
  return wrap_source(config, workdir, split, source, spec, gallery=gallery, training=split == "train",
                     keep_image=keep_image)


def check_model(config, gallery: join.NeighborGallery | None = None, *, strategies_read_neighbors: bool = False
                ) -> None:
  """The model reads what the retrieval block feeds (K, the fields and their width), or reads none
  and `strategies_read_neighbors` (its evaluation strategies do: knn:K, kNN-LM)."""
  model, r = config.model, config.retrieval
  if "architecture" in model and model.architecture == "align":
    raise ValueError("an alignment model does not read neighbours: remove the retrieval block")
  if not model_reads_neighbors(config):
    # Neighbours that only the evaluation strategies read (knn:K, kNN-LM): the model reads none.
    if not strategies_read_neighbors:
      raise ValueError("the config retrieves neighbours but its model reads none and no evaluation strategy "
                       "uses them: use model.encoder 'features', set model.neighbor_memory = True, or evaluate "
                       "knn:K / kNN-LM strategies (knn_lambda=...)")
    return
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
