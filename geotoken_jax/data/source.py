"""What the input pipeline needs from a data source: the `Source` protocol.

A source is a random-access table of records, each a dict of NumPy values
("image" uint8 [S, S, 3], "tokens" int32 [P], "latlng" float32 [2], "id", and
for prepared data sets "country").  The grain pipeline (`pipeline.load_rows`)
reads whole batches through `get_batch`.

Required:
  __len__()                          number of records
  __getitem__(index)                 one record (a negative index counts from the end)
  get_batch(indices, positions=None) records at `indices` stacked on a new
                                     leading axis; `positions` are the training
                                     stream positions of those rows, which seed
                                     the augmentation of a source with
                                     augment=True (so a resumed run sees the same
                                     pixels) and are ignored otherwise.

Optional attributes, read with getattr and a default:
  augment     bool; True when get_batch applies the training augmentation,
              seeded by `positions` (default False)
  rejected    int; metadata rows dropped when the data set was prepared
              (missing / undecodable images, bad coordinates, duplicate ids),
              reported by the evaluation as `skipped` (default 0)
  leak_dropped  int; training rows a leak filter removed (subsets only)

Optional methods: all_tokens() -> int32 [N, P] (every record's tokens without
decoding an image) and index_arrays() -> the sidecar dict (tokens, latlng,
id_hash, photo_id); holdout slices and leak filters need index_arrays.

Implementations: EarthSource, TfdsSource, FirstRows, Subset.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Source(Protocol):
  """A random-access data source (see the module docstring).  isinstance checks
  that the three methods exist; tests also check that get_batch takes positions."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ...

  def get_batch(self, indices, positions=None) -> dict[str, np.ndarray]:
    ...
