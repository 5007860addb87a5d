"""A data source over in-memory arrays (the `Source` protocol: len, [index], get_batch), for tests
that need records with exactly the fields they give."""

from __future__ import annotations

import numpy as np


class ArraySource:
  """Records of `arrays` ({field: [N, ...]}; "latlng" gives N)."""

  def __init__(self, arrays):
    self.arrays = arrays

  def __len__(self):
    return len(self.arrays["latlng"])

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}

  def get_batch(self, indices, positions=None):
    del positions
    return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}
