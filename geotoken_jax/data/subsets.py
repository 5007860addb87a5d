"""Row subsets of a source: a held-out validation slice of a training split and
a filter of training rows that leak test photos.

Holdout.  MP16 and OSV-5M have no validation split of their own, and validating
on the test set tunes on it.  `data.holdout` carves a stable slice out of a
training split instead; `data.splits` addresses it as "DATASET:SPLIT:holdout"
(the held-out rows) and "DATASET:SPLIT:rest" (all the others):

  data.holdout = {"fraction": 0.01, "by": "cell", "cell_level": 8, "salt": 0}

With fit_fraction > 0 a second disjoint slice, "DATASET:SPLIT:fit", is carved the same way
(the keys hashed just above the holdout's), and "rest" is neither: a slice of held-out
places to fit post-hoc parts on (a reranker) in the regime of the holdout, whose own rows
then stay unseen by every stage.

A row's key is its S2 cell id at `cell_level` (by="cell": whole cells go to one
side, as in the earth benchmark, so validation measures places never trained
on; level 8 cells are ~30-40 km across) or the sidecar's id_hash (by="id": a
row split).  The rule, exactly:

  held out  <=>  splitmix64(key XOR salt) < floor(fraction * 2**64)
  fit       <=>  floor(fraction * 2**64) <= splitmix64(key XOR salt) < floor((fraction + fit_fraction) * 2**64)

with splitmix64 the finalizer of earth._splitmix64 (uint64 wrapping
arithmetic).  The cell ids come from the sidecar's tokens (or its coordinates
when cell_level is finer than the stored tokens), the ids' hashes from its
id_hash column: no record is read.  The two sides are disjoint and together are
the split; each keeps record order.

Leak filter.  `data.leak_filter = ("im2gps3k:test", "yfcc4k:test")` drops from
the train split every row whose Flickr photo id (the sidecar's photo_id, >= 0)
is one of those splits' photo ids (MP16 and the Flickr test sets come from the
same YFCC100M pool).  It needs photo ids on both sides; a side without any is
logged and skips the check.  A named split that is not prepared is an error.
The count is the subset's `leak_dropped` and a logged line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data.pipeline import load_rows

HOLDOUT_PARTS = ("holdout", "fit", "rest")
HOLDOUT_DEFAULTS = {"fraction": 0.01, "by": "cell", "cell_level": 8, "salt": 0, "fit_fraction": 0.0}
HOLDOUT_MODES = ("cell", "id")


class Subset:
  """The records `rows` of a parent source, in that order: record i is the
  parent's record rows[i].  get_batch keeps the parent's augmentation: stream
  `positions` are passed on unchanged, so the pixels at a position depend on
  (seed, position) exactly as in the parent.

  `rejected` is 0: the parent's prepare-time rejections belong to the whole
  split, not to a slice of it.  `leak_dropped` counts the rows a leak filter
  removed (0 if none).
  """

  rejected = 0

  def __init__(self, source, rows, *, name: str = "subset", leak_dropped: int = 0):
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
      raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64)
    n = len(source)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
      raise IndexError(f"rows outside [0, {n}) of {source!r}")
    rows.flags.writeable = False
    self.source = source
    self.rows = rows
    self.name = name
    self.leak_dropped = int(leak_dropped)

  @property
  def augment(self) -> bool:
    return bool(getattr(self.source, "augment", False))

  def __len__(self) -> int:
    return int(self.rows.size)

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {self.name}, records={len(self)})"

  def _parent_rows(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"indices out of range for {len(self)} records of {self!r}")
    return self.rows[indices]

  def get_batch(self, indices, positions=None) -> dict[str, np.ndarray]:
    """Records at `indices` of the subset; `positions` seed the parent's augmentation."""
    return load_rows(self.source, self._parent_rows(indices), positions=positions)

  def __getitem__(self, index) -> dict:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"Subset indices are integers, got {index!r}")
    index = int(index)
    if index < 0:
      index += len(self)
    return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}

  def all_tokens(self) -> np.ndarray:
    """Tokens of the subset's records [N, P] (the parent's all_tokens, no image read)."""
    return np.asarray(self.source.all_tokens())[self.rows]

  def index_arrays(self) -> dict[str, np.ndarray]:
    """The parent's sidecar arrays at the subset's rows."""
    return {k: v[self.rows] for k, v in self.source.index_arrays().items()}

  @property
  def stored_spec(self):
    return index_spec(self.source)


def index_spec(source) -> s2.TokenSpec:
  """The TokenSpec of the tokens in source.index_arrays()."""
  spec = getattr(source, "stored_spec", None)
  return spec if spec is not None else source.spec


# ----------------------------------------------------------------------------
# Holdout.


def holdout_config(config: Mapping | None) -> dict:
  """data.holdout with defaults filled in, checked."""
  config = dict(config or {})
  unknown = sorted(set(config) - set(HOLDOUT_DEFAULTS))
  if unknown:
    raise ValueError(f"data.holdout has unknown key(s) {unknown}; keys: {', '.join(HOLDOUT_DEFAULTS)}")
  out = {**HOLDOUT_DEFAULTS, **config}
  fraction = out["fraction"]
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ValueError(f"data.holdout.fraction must be a number in (0, 1), got {fraction!r}")
  fit_fraction = out["fit_fraction"]
  if (isinstance(fit_fraction, bool) or not isinstance(fit_fraction, (int, float))
      or not 0 <= fit_fraction < 1 - fraction):
    raise ValueError(f"data.holdout.fit_fraction must be a number in [0, 1 - fraction), got {fit_fraction!r}")
  if out["by"] not in HOLDOUT_MODES:
    raise ValueError(f"data.holdout.by must be one of {HOLDOUT_MODES}, got {out['by']!r}")
  level = out["cell_level"]
  if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= s2.MAX_LEVEL:
    raise ValueError(f"data.holdout.cell_level must be an integer in [0, {s2.MAX_LEVEL}], got {level!r}")
  salt = out["salt"]
  if isinstance(salt, bool) or not isinstance(salt, (int, np.integer)) or not 0 <= salt < 2**64:
    raise ValueError(f"data.holdout.salt must be an integer in [0, 2**64), got {salt!r}")
  return {"fraction": float(fraction), "by": out["by"], "cell_level": int(level), "salt": int(salt),
          "fit_fraction": float(fit_fraction)}


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer on uint64 (wrapping), as earth's split rule."""
  x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def cell_ids_of_index(index: Mapping[str, np.ndarray], spec: s2.TokenSpec, level: int) -> np.ndarray:
  """S2 cell ids (uint64) at `level` of every row: from the tokens (at `spec`)
  when level <= spec.level, else from the coordinates."""
  if level <= spec.level:
    tokens = np.asarray(index["tokens"])
    if tokens.shape[0] == 0:
      return np.zeros(0, np.uint64)
    return s2.cell_ids_parent(s2.tokens_to_cell_ids(tokens, spec), level)
  latlng = np.asarray(index["latlng"], np.float64)
  return s2.latlng_to_cell_ids(latlng[:, 0], latlng[:, 1], level)


def _threshold(fraction: float) -> np.uint64:
  return np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def holdout_parts(index: Mapping[str, np.ndarray], spec: s2.TokenSpec, config: Mapping | None) -> np.ndarray:
  """uint8 [N]: 0 rest, 1 holdout, 2 fit (see the module docstring for the rule)."""
  config = holdout_config(config)
  if config["by"] == "cell":
    keys = cell_ids_of_index(index, spec, config["cell_level"])
  else:
    keys = np.asarray(index["id_hash"], np.uint64)
  hashed = splitmix64(keys ^ np.uint64(config["salt"]))
  parts = np.zeros(hashed.shape, np.uint8)
  parts[hashed < _threshold(config["fraction"])] = 1
  if config["fit_fraction"] > 0:
    fit = (hashed >= _threshold(config["fraction"])) & (
        hashed < _threshold(config["fraction"] + config["fit_fraction"]))
    parts[fit] = 2
  return parts


def holdout_mask(index: Mapping[str, np.ndarray], spec: s2.TokenSpec, config: Mapping | None) -> np.ndarray:
  """bool [N]: True for the held-out rows (see the module docstring for the rule)."""
  return holdout_parts(index, spec, config) == 1


def split_part(name: str) -> tuple[str, str | None]:
  """"train:holdout" -> ("train", "holdout"); "train" -> ("train", None)."""
  base, sep, part = name.rpartition(":")
  if sep and part in HOLDOUT_PARTS:
    return base, part
  if sep:
    raise ValueError(f"unknown split part {part!r} in {name!r}: use SPLIT, SPLIT:holdout, SPLIT:fit or SPLIT:rest")
  return name, None


# ----------------------------------------------------------------------------
# Leak filter.


def leak_filter_rows(train_photo_ids: np.ndarray, others: Mapping[str, np.ndarray], *,
                     log: logging.Logger | None = None) -> tuple[np.ndarray, int]:
  """(rows kept, rows dropped) of a training split given the photo ids of other splits.

  A training row is dropped when its photo id is >= 0 and among the other
  splits' photo ids (>= 0).  A side with no photo id at all is logged and
  checks nothing.
  """
  log = log or logging.getLogger(__name__)
  train_photo_ids = np.asarray(train_photo_ids, np.int64)
  keep = np.ones(train_photo_ids.size, bool)
  if not (train_photo_ids >= 0).any():
    log.warning("leak filter: the training rows carry no Flickr photo ids; nothing can be checked "
                "against %s", ", ".join(others))
    return np.flatnonzero(keep), 0
  per_split = []
  for name, ids in others.items():
    ids = np.asarray(ids, np.int64)
    ids = np.unique(ids[ids >= 0])
    if not ids.size:
      log.warning("leak filter: %s has no Flickr photo ids; it is not checked", name)
      continue
    hit = keep & np.isin(train_photo_ids, ids) & (train_photo_ids >= 0)
    per_split.append(f"{name}: {int(hit.sum())} of its {ids.size} ids")
    keep &= ~hit
  dropped = int((~keep).sum())
  (log.warning if dropped else log.info)(
      "leak filter: dropped %d of %d training rows whose Flickr photo id is in a test split (%s)",
      dropped, train_photo_ids.size, "; ".join(per_split) or "no split checked")
  return np.flatnonzero(keep), dropped


def parse_leak_filter(value) -> tuple[str, ...]:
  """data.leak_filter as a tuple of "DATASET:SPLIT" names (a string may list them with commas)."""
  if not value:
    return ()
  if isinstance(value, str):
    value = [v for v in value.split(",")]
  names = tuple(str(v).strip() for v in value if str(v).strip())
  for name in names:
    dataset, sep, split = name.partition(":")
    if not sep or not dataset or not split or ":" in split:
      raise ValueError(f"data.leak_filter entries are DATASET:SPLIT, got {name!r}")
  return names


def apply(source, index: Mapping[str, np.ndarray], *, part: str | None, holdout: Mapping | None,
          leak_ids: Mapping[str, np.ndarray] | None, name: str):
  """`source` restricted to a holdout part and / or with leaked rows dropped
  (a Subset), or `source` itself when neither applies."""
  if part is None and not leak_ids:
    return source
  n = len(source)
  rows = np.arange(n, dtype=np.int64)
  if part is not None:
    config = holdout_config(holdout)
    if part == "fit" and not config["fit_fraction"] > 0:
      raise ValueError(f"{name}: the fit part needs data.holdout.fit_fraction > 0")
    parts = holdout_parts(index, index_spec(source), config)
    rows = np.flatnonzero(parts == {"rest": 0, "holdout": 1, "fit": 2}[part])
  dropped = 0
  if leak_ids:
    kept, dropped = leak_filter_rows(np.asarray(index["photo_id"])[rows], leak_ids)
    rows = rows[kept]
  return Subset(source, rows, name=name, leak_dropped=dropped)
