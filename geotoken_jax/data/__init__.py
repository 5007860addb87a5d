"""Data: the built-in "earth" benchmark and the grain input pipeline.

`earth`       EarthSource (Blue Marble crops of MP16 locations with their S2
              tokens), the cell-blocked splits and the Im2GPS3k-layout export.
`pipeline`    train_iterator (infinite, shuffled, identical global batches on
              any process count, checkpointable) and eval_batches (one padded,
              masked pass).
`get_source`  the source a config's `data` block names (what the trainer calls).
"""

from __future__ import annotations

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data import earth
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

TFDS_DATASETS = ("mp16", "im2gps3k", "yfcc4k", "osv5m", "geo_csv")
DATASETS = ("earth",) + TFDS_DATASETS


def resolve_split(data_config, split: str) -> tuple[str, str]:
  """(data set, its split) for one of our splits.

  data_config.splits maps train / validation / test to "DATASET:SPLIT" or
  "SPLIT" (of data_config.name); a split given as "DATASET:SPLIT" is used as is.
  """
  mapped = dict(data_config.get("splits") or {}).get(split, split)
  dataset, sep, name = str(mapped).partition(":")
  return (dataset, name) if sep else (data_config["name"], dataset)


def get_source(data_config, split: str, spec: s2.TokenSpec, *, seed: int = 0):
  """The random-access source for `split` of the data set a config names.

  data_config is a mapping (dict or ml_collections.ConfigDict) with "name":
  "earth" (optional "image_size", default 64) or a prepared TFDS data set
  (TFDS_DATASETS; "data_dir", "image_size", "augment" for the train split,
  optional "splits" mapping, see resolve_split).  An optional "eval_limit"
  keeps only the first records of the evaluation splits.
  """
  dataset, dataset_split = resolve_split(data_config, split)
  if dataset == "earth":
    source = EarthSource(dataset_split, spec,
                         image_size=data_config.get("image_size", earth.DEFAULT_IMAGE_SIZE))
  elif dataset in TFDS_DATASETS:
    from geotoken_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    if not data_config.get("data_dir"):
      raise ValueError(f"data set {dataset!r} needs data.data_dir (where it was prepared)")
    source = tfds_source.TfdsSource(
        tfds_source.dataset_dir(data_config["data_dir"], dataset), dataset_split, spec,
        image_size=data_config.get("image_size", 224),
        augment=split == "train" and bool(data_config.get("augment", False)), seed=seed)
  else:
    raise ValueError(f"unknown data set {dataset!r}; available: {', '.join(DATASETS)}")
  limit = data_config.get("eval_limit", 0)
  if split != "train" and limit:
    source = FirstRows(source, limit)
  return source


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

  def get_batch(self, indices) -> dict:
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= self._length):
      raise IndexError(f"indices out of range for {self._length} records")
    return load_rows(self._source, indices)

  def __repr__(self) -> str:
    return f"FirstRows({self._source!r}, limit={self._length})"
