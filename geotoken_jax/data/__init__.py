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

DATASETS = ("earth",)


def get_source(data_config, split: str, spec: s2.TokenSpec):
  """The random-access source for `split` of the data set a config names.

  data_config is a mapping (dict or ml_collections.ConfigDict) with "name" and,
  for "earth", an optional "image_size" (default 64). An optional "eval_limit"
  keeps only the first records of the evaluation splits.
  """
  name = data_config["name"]
  if name == "earth":
    source = EarthSource(split, spec, image_size=data_config.get("image_size", earth.DEFAULT_IMAGE_SIZE))
  else:
    raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
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
