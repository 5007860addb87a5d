"""Data: the built-in "earth" benchmark and the grain input pipeline.

`earth`       EarthSource (Blue Marble crops of MP16 locations with their S2
              tokens), the cell-blocked splits and the Im2GPS3k-layout export.
`pipeline`    train_iterator (infinite, shuffled, identical global batches on
              any process count, checkpointable) and eval_batches (one padded,
              masked pass).
`get_source`  the source a config's `data` block names (what the trainer calls),
              with holdout slices ("DATASET:SPLIT:holdout" / ":rest") and the
              training leak filter (`subsets`).
`training_tokens`  every training record's tokens without decoding an image
              (what the decoding trie is built from).
`training_locations`  every training record's (lat, lon) in float64, without decoding
              an image (the evaluation's nearest-training-location oracle).
`image_resize_mode`  how a run's images are decoded and resized: "clip" (exactly
              CLIP's own preprocessing) when the images feed a CLIP tower, else
              "default"; data.resize overrides it.
`Source`      the protocol every source satisfies (`source`).
"""

from __future__ import annotations

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data import earth, images, subsets, tfds_source
from geotoken_jax.data.earth import (
    SPLITS,
    EarthSource,
    crop_images,
    load_coordinates,
    split_indices,
)
from geotoken_jax.data.pipeline import (
    TrainIterator,
    eval_batches,
    load_rows,
    num_eval_batches,
    train_iterator,
)
from geotoken_jax.data.source import Source
from geotoken_jax.data.subsets import Subset

TFDS_DATASETS = ("mp16", "im2gps3k", "yfcc4k", "osv5m", "geo_csv")
DATASETS = ("earth",) + TFDS_DATASETS


def resolve_split(data_config, split: str) -> tuple[str, str]:
  """(data set, its split) for one of our splits.

  data_config.splits maps train / validation / test to "DATASET:SPLIT" or
  "SPLIT" (of data_config.name); a split given as "DATASET:SPLIT" is used as is.
  A split may carry a holdout part: "DATASET:SPLIT:holdout" / "DATASET:SPLIT:rest"
  (or "SPLIT:holdout" of data_config.name) -> (DATASET, "SPLIT:holdout").
  """
  mapped = str(dict(data_config.get("splits") or {}).get(split, split))
  parts = mapped.split(":")
  if len(parts) == 1:
    return data_config["name"], mapped
  if len(parts) == 2 and parts[1] in subsets.HOLDOUT_PARTS and parts[0] not in DATASETS:
    return data_config["name"], mapped
  return parts[0], ":".join(parts[1:])


RESIZE_SETTINGS = ("auto",) + images.RESIZE_MODES


def _resize_setting(data_config) -> str:
  value = str((data_config or {}).get("resize", None) or "auto")
  if value not in RESIZE_SETTINGS:
    raise ValueError(f"data.resize must be one of {RESIZE_SETTINGS}, got {value!r}")
  return value


def _image_tower(model_config) -> str:
  """The kind of network that reads the images: "clip", "vit" or "features" (none)."""
  if model_config is None:
    return ""
  if model_config.get("architecture", "geotoken") == "align":
    return str(model_config.get("image_tower", ""))
  return str(model_config.get("encoder", ""))


def image_resize_mode(config) -> str:
  """How a run's images are decoded and resized (data.images.RESIZE_MODES), derived here
  only: every source a run's images are read from (training, evaluation, embedding,
  labelled folders, image files) takes it.

  config.data.resize "default" or "clip" is used as is.  "auto" (or absent) is
  "clip" when the images feed a CLIP tower: model.encoder "clip", an alignment
  model (model.architecture "align") with image_tower "clip", or a model that
  reads neighbour features (encoder "features") whose recipe's alignment model
  (recipe.alignment) has a CLIP image tower; else "default" (a recipe whose
  alignment is the tiny-image embedding, "tiny_image[:S[:colour]]", included).  "clip" decodes
  exactly as transformers' CLIPImageProcessor (full-resolution decode, bicubic,
  its size rounding and centre crop) and trains on bicubic random resized crops;
  "default" decodes JPEGs at a reduced scale (draft) and resamples bilinearly.
  A features model whose aligner is only named by retrieval.alignment_workdir
  needs data.resize set to the aligner's mode (or the aligner's config passed
  to callers that have it, see inference).
  """
  setting = _resize_setting(config.get("data"))
  if setting != "auto":
    return setting
  model = config.get("model")
  tower = _image_tower(model)
  if tower == "clip":
    return "clip"
  recipe = config.get("recipe") if tower == "features" else None
  if recipe is not None and recipe.get("alignment") is not None and not isinstance(recipe["alignment"], str):
    return image_resize_mode(recipe["alignment"])
  return "default"  # also under a tiny-image "alignment" (a string: no network reads the images)


def _tfds_source(data_config, dataset: str, split: str, spec: s2.TokenSpec, **kwargs):
  if not data_config.get("data_dir"):
    raise ValueError(f"data set {dataset!r} needs data.data_dir (where it was prepared)")
  return tfds_source.TfdsSource(tfds_source.dataset_dir(data_config["data_dir"], dataset), split, spec,
                                image_size=data_config.get("image_size", 224), **kwargs)


def _leak_ids(data_config, spec: s2.TokenSpec) -> dict[str, np.ndarray]:
  """Photo ids of the splits data.leak_filter names, by name."""
  out = {}
  for name in subsets.parse_leak_filter(data_config.get("leak_filter")):
    dataset, _, split = name.partition(":")
    if dataset not in TFDS_DATASETS:
      raise ValueError(f"data.leak_filter names {name!r}: only prepared data sets "
                       f"({', '.join(TFDS_DATASETS)}) carry photo ids")
    try:
      source = _tfds_source(data_config, dataset, split, spec)
    except (FileNotFoundError, ValueError) as e:
      raise ValueError(f"data.leak_filter names {name!r}, which is not prepared in data.data_dir="
                       f"{data_config.get('data_dir')!r} ({e}). Prepare it, or remove it from "
                       "data.leak_filter.") from None
    out[name] = source.index_arrays()["photo_id"]
  return out


def get_source(data_config, split: str, spec: s2.TokenSpec, *, seed: int = 0, resize: str | None = None):
  """The random-access source for `split` of the data set a config names.

  data_config is a mapping (dict or ml_collections.ConfigDict) with "name":
  "earth" (optional "image_size", default 64) or a prepared TFDS data set
  (TFDS_DATASETS; "data_dir", "image_size", "augment" for the train split,
  optional "splits" mapping, see resolve_split).  An optional "eval_limit"
  keeps only the first records of the evaluation splits, "train_limit" of the
  train split (fixture-sized runs of the retrieval recipe).

  A split "SPLIT:holdout" / "SPLIT:rest" is a Subset of SPLIT chosen by
  data.holdout (see subsets).  For the train split, data.leak_filter (a tuple
  of "DATASET:SPLIT") drops the rows whose Flickr photo id is in those splits;
  the subset's leak_dropped says how many.

  `resize` is the image decoding mode, image_resize_mode(run config): callers
  with the run's config pass it (the model decides "auto").  None: data.resize
  when it names a mode, else "default" (the data block alone cannot see the
  model).  The earth benchmark's images are crops of an array, not decoded
  files: the mode does not apply to them.
  """
  if resize is None:
    resize = _resize_setting(data_config)
    resize = "default" if resize == "auto" else resize
  elif resize not in images.RESIZE_MODES:
    raise ValueError(f"resize must be one of {images.RESIZE_MODES}, got {resize!r}")
  dataset, dataset_split = resolve_split(data_config, split)
  base_split, part = subsets.split_part(dataset_split)
  if dataset == "earth":
    source = EarthSource(base_split, spec,
                         image_size=data_config.get("image_size", earth.DEFAULT_IMAGE_SIZE))
  elif dataset in TFDS_DATASETS:
    source = _tfds_source(data_config, dataset, base_split, spec,
                          augment=split == "train" and bool(data_config.get("augment", False)), seed=seed,
                          resize=resize)
  else:
    raise ValueError(f"unknown data set {dataset!r}; available: {', '.join(DATASETS)}")
  holdout = data_config.get("holdout")
  holdout = dict(holdout) if holdout is not None else None
  leak_ids = _leak_ids(data_config, spec) if split == "train" else None
  if part is not None or leak_ids:
    source = subsets.apply(source, source.index_arrays(), part=part, holdout=holdout, leak_ids=leak_ids,
                           name=f"{dataset}:{dataset_split}" + (" leak-filtered" if leak_ids else ""))
  limit = data_config.get("train_limit" if split == "train" else "eval_limit", 0)
  if limit:
    source = FirstRows(source, limit)
  return source


def training_tokens(data_config, spec: s2.TokenSpec) -> np.ndarray:
  """int32 [N, P]: the S2 tokens (at `spec`) of every record of the config's train
  split (after its holdout part and leak filter), without decoding any image: the
  earth benchmark's from its coordinates, a prepared data set's from its sidecar
  index (or its records, for data prepared before sidecars)."""
  return np.asarray(get_source(data_config, "train", spec).all_tokens(), np.int32)


def training_locations(data_config, spec: s2.TokenSpec) -> np.ndarray:
  """float64 [N, 2]: the (lat, lon) of every record of the config's train split (after its
  holdout part and leak filter: the records a model trains on), without decoding any image
  (the sources' index arrays: the earth benchmark's coordinates, a prepared set's sidecar)."""
  return np.asarray(get_source(data_config, "train", spec).index_arrays()["latlng"], np.float64).reshape(-1, 2)


class FirstRows:
  """The first `limit` records of a source (for quick evaluations; the table's
  image count says how many were used)."""

  def __init__(self, source, limit: int):
    if limit < 1:
      raise ValueError(f"limit must be >= 1, got {limit}")
    self._source = source
    self._length = min(limit, len(source))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if not -self._length <= index < self._length:
      raise IndexError(f"index {index} out of range for {self._length} records")
    return self._source[index % self._length]

  @property
  def augment(self) -> bool:
    return bool(getattr(self._source, "augment", False))

  def all_tokens(self) -> np.ndarray:
    return np.asarray(self._source.all_tokens())[:self._length]

  def index_arrays(self) -> dict[str, np.ndarray]:
    return {key: np.asarray(value)[:self._length] for key, value in self._source.index_arrays().items()}

  def get_batch(self, indices, positions=None) -> dict:
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= self._length):
      raise IndexError(f"indices out of range for {self._length} records")
    return load_rows(self._source, indices, positions=positions)

  def __repr__(self) -> str:
    return f"FirstRows({self._source!r}, limit={self._length})"
