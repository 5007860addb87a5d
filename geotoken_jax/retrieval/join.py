"""Neighbours in the input pipeline: every example carries its K retrieved neighbours.

A RetrievalSource wraps a data source (same records, same order) and adds, per
record, from the query split's embeddings, its neighbour lists (the index job's
files) and the gallery's embeddings (memory-mapped):

  query_features     float32 [F, D]     the record's own fields (L2-normalized, each
                                        zero-padded to D = the widest field)
  neighbor_features  float32 [K, F, D]  the K neighbours' fields, the same way
  neighbor_tokens    int32 [K, P]       the neighbours' S2 tokens
  neighbor_scores    float32 [K]        their search scores (mean cosine over the fields)
  neighbor_latlng    float32 [K, 2]     their coordinates (the kNN strategies' answers)
  neighbor_valid     bool [K]           False where the list held fewer than K rows

The record's own coordinates are checked against the embeddings' at every batch:
a neighbour file built for another split, order or limit is refused instead of
silently feeding the wrong features.  Training options (seeded by the stream
position, so a resumed run sees the same lists): `dropout` replaces each of the K
neighbours with probability p by one from deeper in its list (ranks K .. K_stored - 1;
a list with nothing deeper keeps its own) -- retrieval noise the model must learn to
distrust; `shuffle` permutes the K (the model cannot rely on rank order).  A list
shorter than K (a gallery smaller than K plus the excluded rows; the index statistics
count them) fills the rest with token 0, zero features and score 0, neighbor_valid False.
Lists searched in other embeddings than the stores hold now (checksums) are refused, and so
are lists whose result settings (RESULT_SETTINGS: fields, k, dtype, margin and the leak
rules) differ from the run's (check_list_settings): the error names the field, both values
and the fix.  `features=False` (a model that reads no features: an image encoder with a
neighbour memory) leaves out query_features and neighbor_features, the bulk of a batch.

Pickled (into grain worker processes) as directories and manifests: the stores and lists
memory-map their files again, lazily, in the worker, and the gallery reads its tokens and
coordinates from the store's shards row by row, so no array of the gallery's size travels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data import pipeline
from geotoken_jax.retrieval.neighbors import check_fields, store_identity

NEIGHBOR_FIELDS = ("query_features", "neighbor_features", "neighbor_tokens", "neighbor_scores",
                   "neighbor_latlng", "neighbor_valid")
FEATURE_FIELDS = ("query_features", "neighbor_features")  # what only the feature encoder reads
_LATLNG_TOLERANCE = 1e-3  # degrees: float16/32 storage of the same coordinates

# The index settings that decide what a list holds ({setting: the config's retrieval field});
# chunk_rows, query_batch and block_rows change only speed and memory.
RESULT_SETTINGS = {"fields": "fields", "k": "search_k", "dtype": "dtype", "margin": "margin", "same_id": "same_id",
                   "duplicate_km": "duplicate_km", "duplicate_similarity": "duplicate_similarity",
                   "group": "group"}


class ListSettingsError(ValueError):
  """Neighbour lists searched with other settings than the run's retrieval block."""


def _plain(value):
  """A setting as JSON reads it back (tuples -> lists, 1 == 1.0)."""
  return json.loads(json.dumps(list(value) if isinstance(value, tuple) else value))


def check_list_settings(lists, settings: Mapping[str, Any]) -> None:
  """Refuses lists whose result settings differ from `settings` (neighbors.settings_from_config
  of the run's retrieval block), naming every differing field and both values."""
  stored = (lists.manifest.get("identity") or {}).get("settings") or {}
  differing = [f"{key} = {_plain(stored.get(key))!r} (the config's retrieval.{name} is {_plain(settings[key])!r})"
               for key, name in RESULT_SETTINGS.items() if _plain(stored.get(key)) != _plain(settings[key])]
  if differing:
    raise ListSettingsError(
        f"the neighbour lists in {lists.directory} were searched with " + "; ".join(differing)
        + ". Training lists, test lists and online retrieval must share these settings: rebuild the lists "
        "with the config's (rerun the recipe, which rebuilds lists searched with other settings, or "
        "python -m geotoken_jax.index --config CONFIG --workdir WORKDIR --overwrite), or set the config's "
        "retrieval block to the lists' values.")


class NeighborGallery:
  """What neighbours are read from: an embedding store, its fields, and every row's tokens and
  coordinates, read from the store's memory-mapped shards for the rows asked (tokens_of,
  latlng_of; `tokens` / `latlng` load every row, once, for callers that want them all)."""

  def __init__(self, store, fields, spec: s2.TokenSpec):
    self.store = store
    self.fields = check_fields(store, fields)
    self.spec = spec
    # Stored tokens were made with the aligner's token spec: read only when it is this one
    # (else computed from the stored float32 coordinates of the rows read).
    self._stored_tokens = self._reads_stored_tokens(store, spec)
    self._setup()

  def _setup(self) -> None:
    self.feature_dim = max(self.store.dims[f] for f in self.fields)
    self._latlng = self._tokens = None  # every row's, loaded on first use of .latlng / .tokens

  @staticmethod
  def _reads_stored_tokens(store, spec: s2.TokenSpec) -> bool:
    if "tokens" not in store.columns or list(store.columns["tokens"]["shape"]) != [spec.num_positions]:
      return False
    written = (store.manifest.get("extra") or {}).get("tokens")
    if written is not None:
      return (int(written["level"]), int(written["group_size"])) == (spec.level, spec.group_size)
    # A store that does not say its spec: its tokens (from float64 coordinates) are kept when
    # they are this spec's (all but the float32-rounding cases at the finest level agree).
    latlng = np.asarray(store.latlng, np.float64)
    recomputed = s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], spec)
    return bool(np.mean(np.all(np.asarray(store.tokens) == recomputed, axis=1)) >= 0.99)

  # Pickled as the store (its directory and manifest) and what was decided about its tokens.
  def __getstate__(self) -> dict:
    return {"store": self.store, "fields": self.fields, "spec": self.spec, "stored_tokens": self._stored_tokens}

  def __setstate__(self, state: dict) -> None:
    self.store, self.fields, self.spec = state["store"], tuple(state["fields"]), state["spec"]
    self._stored_tokens = bool(state["stored_tokens"])
    self._setup()

  def __len__(self) -> int:
    return self.store.num_records

  def features(self, rows: np.ndarray) -> np.ndarray:
    """float32 [..., F, D] of gallery rows (any shape)."""
    return stacked_fields([self.store.rows(f, rows) for f in self.fields], self.feature_dim)

  def latlng_of(self, rows: np.ndarray) -> np.ndarray:
    """float32 [..., 2] coordinates of gallery rows (any shape)."""
    if self._latlng is not None:
      return self._latlng[np.asarray(rows, np.int64)]
    return np.asarray(self.store.rows("latlng", np.asarray(rows, np.int64)), np.float32)

  def tokens_of(self, rows: np.ndarray) -> np.ndarray:
    """int32 [..., P] S2 tokens (this run's spec) of gallery rows (any shape)."""
    rows = np.asarray(rows, np.int64)
    if self._tokens is not None:
      return self._tokens[rows]
    if self._stored_tokens:
      return np.asarray(self.store.rows("tokens", rows), np.int32)
    latlng = self.latlng_of(rows.reshape(-1)).astype(np.float64)
    if not latlng.size:
      return np.zeros(rows.shape + (self.spec.num_positions,), np.int32)
    tokens = s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], self.spec)
    return np.asarray(tokens, np.int32).reshape(rows.shape + (self.spec.num_positions,))

  @property
  def latlng(self) -> np.ndarray:
    """float32 [G, 2]: every row's coordinates (loaded once)."""
    if self._latlng is None:
      self._latlng = np.asarray(self.store.latlng, np.float32)
    return self._latlng

  @property
  def tokens(self) -> np.ndarray:
    """int32 [G, P]: every row's tokens (loaded or computed once)."""
    if self._tokens is None:
      self._tokens = self.tokens_of(np.arange(len(self)))
    return self._tokens


def stacked_fields(parts, feature_dim: int) -> np.ndarray:
  """[..., d_f] per field -> float32 [..., F, feature_dim]: each L2-normalized, zero-padded."""
  out = []
  for x in parts:
    x = np.asarray(x, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    pad = feature_dim - x.shape[-1]
    out.append(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x)
  return np.stack(out, axis=-2)


def attach(batch: dict, query_features: np.ndarray | None, indices: np.ndarray, scores: np.ndarray,
           gallery: NeighborGallery, *, features: bool = True) -> dict:
  """Adds the NEIGHBOR_FIELDS to a batch from query features [B, F, D] and neighbour lists
  indices / scores [B, K] (-1 / -inf: no neighbour); features=False: all but FEATURE_FIELDS
  (query_features may then be None)."""
  valid = indices >= 0
  rows = np.where(valid, indices, 0)
  batch = dict(batch)
  if features:
    batch["query_features"] = query_features.astype(np.float32)
    batch["neighbor_features"] = np.where(valid[..., None, None], gallery.features(rows), 0.0).astype(np.float32)
  batch["neighbor_tokens"] = np.where(valid[..., None], gallery.tokens_of(rows), 0).astype(np.int32)
  batch["neighbor_scores"] = np.where(valid, scores, 0.0).astype(np.float32)
  batch["neighbor_latlng"] = np.where(valid[..., None], gallery.latlng_of(rows), 0.0).astype(np.float32)
  batch["neighbor_valid"] = valid
  return batch


class RetrievalSource:
  """A source whose records carry their neighbours (module docstring)."""

  def __init__(self, source, *, query_store, neighbors, gallery: NeighborGallery, k: int, dropout: float = 0.0,
               shuffle: bool = False, seed: int = 0, keep_image: bool = True, name: str = "",
               training: bool = False, features: bool = True, settings: Mapping[str, Any] | None = None):
    n = len(source)
    # A source may be a prefix of the split (eval_limit, --limit): rows are matched by
    # number and every batch's coordinates are checked against the embeddings'.
    if query_store.num_records != neighbors.num_queries or n > query_store.num_records:
      raise ValueError(f"{name or source!r}: {n} records, but its embeddings hold {query_store.num_records} and "
                       f"its neighbour lists {neighbors.num_queries}: they were built for another split or "
                       "limit; rerun the embed and index stages for it")
    if not 1 <= k <= neighbors.k:
      raise ValueError(f"{k} neighbours asked, the lists of {neighbors.directory} hold {neighbors.k}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"neighbour dropout must be in [0, 1), got {dropout}")
    for side, store in (("gallery", gallery.store), ("query", query_store)):
      if neighbors.manifest["identity"][side]["checksum"] != store_identity(store)["checksum"]:
        raise ValueError(f"{neighbors.directory} was searched with other {side} embeddings than "
                         f"{store.directory} holds now (re-embedded?): rerun the index stage")
    if settings is not None:
      check_list_settings(neighbors, settings)
    self._source, self._query_store, self._neighbors, self._gallery = source, query_store, neighbors, gallery
    self.k, self.dropout, self.shuffle, self.seed = int(k), float(dropout), bool(shuffle), int(seed)
    self.keep_image = keep_image
    self.features = bool(features)
    self.name = name
    # Training a feature model needs no pixels: tokens and coordinates come from the source's
    # index (no JPEG decoded per example; loaded on first use, in each worker); evaluation
    # reads whole records (ids, countries).
    self._use_metadata = training and not keep_image and hasattr(source, "index_arrays")
    self._metadata = None
    self.rejected = int(getattr(source, "rejected", 0))

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_metadata"] = None  # the index's arrays, [N] rows: loaded again where they are used
    return state

  def _metadata_arrays(self) -> dict | None:
    if self._use_metadata and self._metadata is None:
      index = self._source.index_arrays()
      self._metadata = {"tokens": np.asarray(index["tokens"], np.int32),
                        "latlng": np.asarray(index["latlng"], np.float32)}
    return self._metadata

  @property
  def augment(self) -> bool:
    return bool(getattr(self._source, "augment", False)) or self.dropout > 0 or self.shuffle

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f"RetrievalSource({self._source!r}, k={self.k}, dropout={self.dropout}, shuffle={self.shuffle})"

  def all_tokens(self) -> np.ndarray:
    return self._source.all_tokens()

  def index_arrays(self):
    return self._source.index_arrays()

  def _lists(self, indices: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    stored = self._neighbors.rows("indices", indices)  # [B, K_stored]
    scores = self._neighbors.rows("scores", indices).astype(np.float32)
    if positions is None or not (self.dropout or self.shuffle):
      return stored[:, :self.k], scores[:, :self.k]
    out_i = np.empty((indices.size, self.k), np.int64)
    out_s = np.empty((indices.size, self.k), np.float32)
    for row, position in enumerate(np.asarray(positions)):
      rng = np.random.default_rng([self.seed, int(position), 0x6E6E])
      order = np.arange(self.k)
      if self.dropout:  # valid slots only, replaced by valid deeper ranks (a short list keeps its own)
        dropped = np.flatnonzero((rng.random(self.k) < self.dropout) & (stored[row, :self.k] >= 0))
        deeper = np.arange(self.k, stored.shape[1])
        deeper = deeper[stored[row, deeper] >= 0]
        take = rng.permutation(deeper)[:dropped.size]
        order[dropped[:take.size]] = take
      picked_i, picked_s = stored[row, order].copy(), scores[row, order].copy()
      if self.shuffle:
        perm = rng.permutation(self.k)
        picked_i, picked_s = picked_i[perm], picked_s[perm]
      out_i[row], out_s[row] = picked_i, picked_s
    return out_i, out_s

  def get_batch(self, indices, positions=None) -> dict:
    indices = np.asarray(indices, np.int64)
    metadata = self._metadata_arrays()
    if metadata is not None:
      batch = {key: value[indices] for key, value in metadata.items()}
    else:
      batch = pipeline.load_rows(self._source, indices, positions=positions)
    if not self.keep_image:
      batch.pop("image", None)
    stored = np.asarray(self._query_store.rows("latlng", indices), np.float32)
    if "latlng" in batch:
      off = np.abs(np.asarray(batch["latlng"], np.float32) - stored).max(initial=0.0)
      if not off <= _LATLNG_TOLERANCE:
        raise ValueError(f"{self.name or self._source!r}: records {indices[:5].tolist()}... lie up to {off:.4f} deg "
                         f"from their rows in {self._query_store.directory}: the embeddings belong to another "
                         "split or order; rerun the embed and index stages")
    gallery = self._gallery
    query = (stacked_fields([self._query_store.rows(f, indices) for f in gallery.fields], gallery.feature_dim)
             if self.features else None)
    nb, sc = self._lists(indices, positions)
    return attach(batch, query, nb, sc, gallery, features=self.features)

  def __getitem__(self, index: int) -> dict:
    index = int(index) + (len(self) if int(index) < 0 else 0)
    return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}
