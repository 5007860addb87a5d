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
Lists searched in other embeddings than the stores hold now (checksums) are refused.
"""

from __future__ import annotations

import numpy as np

from geotoken_jax import s2
from geotoken_jax.data import pipeline
from geotoken_jax.retrieval.neighbors import check_fields, store_identity

NEIGHBOR_FIELDS = ("query_features", "neighbor_features", "neighbor_tokens", "neighbor_scores",
                   "neighbor_latlng", "neighbor_valid")
_LATLNG_TOLERANCE = 1e-3  # degrees: float16/32 storage of the same coordinates


class NeighborGallery:
  """What neighbours are read from: an embedding store, its fields and every row's tokens."""

  def __init__(self, store, fields, spec: s2.TokenSpec):
    self.store = store
    self.fields = check_fields(store, fields)
    self.feature_dim = max(store.dims[f] for f in self.fields)
    self.latlng = np.asarray(store.latlng, np.float32)  # [G, 2]
    tokens = store.tokens
    # Stored tokens were made with the aligner's token spec: used only when it is this one
    # (else recomputed from the stored float32 coordinates).
    written = (store.manifest.get("extra") or {}).get("tokens")
    same_spec = written is not None and (int(written["level"]), int(written["group_size"])) == (
        spec.level, spec.group_size)
    if tokens is None or not same_spec or tokens.shape[1] != spec.num_positions:
      latlng = self.latlng.astype(np.float64)
      recomputed = s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], spec)
      # A store that does not say its spec: its tokens (from float64 coordinates) are kept when
      # they are this spec's (all but the float32-rounding cases at the finest level agree).
      agree = tokens is not None and tokens.shape == recomputed.shape and written is None and (
          np.mean(np.all(tokens == recomputed, axis=1)) >= 0.99)
      tokens = tokens if agree else recomputed
    self.tokens = np.asarray(tokens, np.int32)  # [G, P]

  def __len__(self) -> int:
    return self.store.num_records

  def features(self, rows: np.ndarray) -> np.ndarray:
    """float32 [..., F, D] of gallery rows (any shape)."""
    return stacked_fields([self.store.rows(f, rows) for f in self.fields], self.feature_dim)


def stacked_fields(parts, feature_dim: int) -> np.ndarray:
  """[..., d_f] per field -> float32 [..., F, feature_dim]: each L2-normalized, zero-padded."""
  out = []
  for x in parts:
    x = np.asarray(x, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    pad = feature_dim - x.shape[-1]
    out.append(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x)
  return np.stack(out, axis=-2)


def attach(batch: dict, query_features: np.ndarray, indices: np.ndarray, scores: np.ndarray,
           gallery: NeighborGallery) -> dict:
  """Adds the NEIGHBOR_FIELDS to a batch from query features [B, F, D] and neighbour lists
  indices / scores [B, K] (-1 / -inf: no neighbour)."""
  valid = indices >= 0
  rows = np.where(valid, indices, 0)
  batch = dict(batch)
  batch["query_features"] = query_features.astype(np.float32)
  batch["neighbor_features"] = np.where(valid[..., None, None], gallery.features(rows), 0.0).astype(np.float32)
  batch["neighbor_tokens"] = np.where(valid[..., None], gallery.tokens[rows], 0).astype(np.int32)
  batch["neighbor_scores"] = np.where(valid, scores, 0.0).astype(np.float32)
  batch["neighbor_latlng"] = np.where(valid[..., None], gallery.latlng[rows], 0.0).astype(np.float32)
  batch["neighbor_valid"] = valid
  return batch


class RetrievalSource:
  """A source whose records carry their neighbours (module docstring)."""

  def __init__(self, source, *, query_store, neighbors, gallery: NeighborGallery, k: int, dropout: float = 0.0,
               shuffle: bool = False, seed: int = 0, keep_image: bool = True, name: str = "",
               training: bool = False):
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
    self._source, self._query_store, self._neighbors, self._gallery = source, query_store, neighbors, gallery
    self.k, self.dropout, self.shuffle, self.seed = int(k), float(dropout), bool(shuffle), int(seed)
    self.keep_image = keep_image
    self.name = name
    # Training a feature model needs no pixels: tokens and coordinates come from the source's
    # index (no JPEG decoded per example); evaluation reads whole records (ids, countries).
    self._metadata = None
    if training and not keep_image and hasattr(source, "index_arrays"):
      index = source.index_arrays()
      self._metadata = {"tokens": np.asarray(index["tokens"], np.int32),
                        "latlng": np.asarray(index["latlng"], np.float32)}
    self.rejected = int(getattr(source, "rejected", 0))

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
    if self._metadata is not None:
      batch = {key: value[indices] for key, value in self._metadata.items()}
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
    query = stacked_fields([self._query_store.rows(f, indices) for f in gallery.fields], gallery.feature_dim)
    nb, sc = self._lists(indices, positions)
    return attach(batch, query, nb, sc, gallery)

  def __getitem__(self, index: int) -> dict:
    index = int(index) + (len(self) if int(index) < 0 else 0)
    return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}
