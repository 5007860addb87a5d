"""Leak rules: what a query may not retrieve, built in one place for the index job and for
retrieval at test time (evaluation, prediction: inference.online_retrieval).

Two regimes, because a rule may read the query's label only while building training lists:

  TRAINING  the query is a record of the gallery split (training lists).  Every rule the
            settings name: the same id (or, with no ids stored, the same row: itself),
            a near-duplicate by place (within `duplicate_km` of the query's coordinates AND
            mean cosine >= `duplicate_similarity`: a re-upload, a burst of shots), and the
            same group (`group` = "s2_cell:L": the query's S2 cell at level L).  These rules
            emulate the test regime (a test photo is never in the gallery, and on a
            cell-blocked benchmark its cell is unseen); they read the query's coordinates,
            which a training record has.
  TEST      anything else: validation and test lists, evaluate, predict, online retrieval.
            Label-free rules only: the same id (a photo that is also in the gallery, by its
            id; a Flickr id in the data's leak filter is dropped from training before this).
            The query's coordinates are never read, so `evaluate` (labelled) and `predict`
            (unlabelled) give the same image the same neighbours, and permuting a split's
            labels changes no list.

`gallery_keys` computes the gallery side once per gallery; `query_exclusion` builds the
search.Exclusion of one block of queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data import tfds_builders
from geotoken_jax.retrieval.search import Exclusion

TRAINING, TEST = "training", "test"
REGIMES = (TRAINING, TEST)


def id_hashes(ids: np.ndarray) -> np.ndarray:
  """int64 [N]: integer ids as they are, text ids by the records' stable id hash (63 bits)."""
  ids = np.asarray(ids)
  if ids.dtype.kind in "iu":
    return ids.astype(np.int64)
  return np.asarray([tfds_builders.id_hash(v) >> 1 for v in ids.reshape(-1)], np.int64)


def group_level(rule: str) -> int | None:
  """The S2 level of a group rule ("" -> None, "s2_cell:L" -> L); anything else is an error."""
  if not rule:
    return None
  kind, _, arg = str(rule).partition(":")
  if kind != "s2_cell":
    raise ValueError(f"unknown group rule {rule!r}: use '' or 's2_cell:LEVEL' (the S2 cell of the "
                     "coordinates at LEVEL; a training-list rule)")
  try:
    return int(arg)
  except ValueError:
    raise ValueError(f"group {rule!r}: the S2 level must be an integer, e.g. s2_cell:6") from None


def group_keys(rule: str, latlng: np.ndarray) -> np.ndarray | None:
  """int64 [N]: every record's group under `rule` (None when the rule is off)."""
  level = group_level(rule)
  if level is None:
    return None
  latlng = np.asarray(latlng, np.float64)
  return s2.latlng_to_cell_ids(latlng[:, 0], latlng[:, 1], level).astype(np.int64)


def _check_regime(regime: str) -> None:
  if regime not in REGIMES:
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


@dataclasses.dataclass(frozen=True)
class GalleryKeys:
  """The gallery side of the rules of one regime, computed once per gallery."""
  regime: str
  num_rows: int
  ids: np.ndarray | None = None     # int64 [G] id hashes (same id)
  latlng: np.ndarray | None = None  # float32 [G, 2] (near-duplicate; training regime only)
  groups: np.ndarray | None = None  # int64 [G] (same group; training regime only)


def gallery_keys(settings: Mapping[str, Any], num_rows: int, *, regime: str, ids=None,
                 latlng=None) -> GalleryKeys:
  """The gallery arrays the rules of `regime` need: `ids` [G] (None when the store has none),
  `latlng` [G, 2] (read in the training regime only)."""
  _check_regime(regime)
  hashed = id_hashes(ids) if settings["same_id"] and ids is not None else None
  if regime == TEST:
    return GalleryKeys(regime, num_rows, ids=hashed)
  latlng = np.asarray(latlng, np.float32)
  duplicate = float(settings["duplicate_km"]) > 0
  return GalleryKeys(regime, num_rows, ids=hashed, latlng=latlng if duplicate else None,
                     groups=group_keys(settings["group"], latlng))


def query_exclusion(settings: Mapping[str, Any], gallery: GalleryKeys, *, query_ids=None, query_rows=None,
                    query_latlng=None) -> Exclusion | None:
  """The search.Exclusion of a block of queries, or None when no rule applies.

  query_ids    [Q] the queries' ids (any kind; hashed like the gallery's), or None
  query_rows   [Q] int, training regime: the queries' rows in the gallery (the same-row rule
               when the store has no ids)
  query_latlng [Q, 2] training regime only: the test regime never reads a query's label, and
               passing one there is an error (so no caller can leak it by accident)
  """
  fields: dict[str, Any] = {}
  if gallery.regime == TEST and query_latlng is not None:
    raise ValueError("test-time retrieval must not read the query's coordinates (its label): "
                     "pass query_latlng only when building training lists")
  if settings["same_id"]:
    if gallery.ids is not None and query_ids is not None:
      fields.update(query_ids=id_hashes(query_ids), gallery_ids=gallery.ids)
    elif gallery.regime == TRAINING and query_rows is not None:  # no ids stored: a record is itself by its row
      fields.update(query_ids=np.asarray(query_rows, np.int64), gallery_ids=np.arange(gallery.num_rows))
  if gallery.regime == TRAINING and (gallery.latlng is not None or gallery.groups is not None):
    if query_latlng is None:
      raise ValueError("the training regime's near-duplicate and group rules need the queries' coordinates")
    query_latlng = np.asarray(query_latlng, np.float32)
    if gallery.latlng is not None:
      fields.update(query_latlng=query_latlng, gallery_latlng=gallery.latlng,
                    duplicate_km=float(settings["duplicate_km"]),
                    duplicate_similarity=float(settings["duplicate_similarity"]))
    if gallery.groups is not None:
      fields.update(query_groups=group_keys(settings["group"], query_latlng), gallery_groups=gallery.groups)
  return Exclusion(**fields) if fields else None
