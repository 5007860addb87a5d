"""Exact maximum-inner-product top-k search of queries against a large gallery.

`search(queries, gallery, k)` returns, for every query, the k gallery rows with
the largest inner product q . g (best first, ties broken by the lower row).
No normalization is done: callers L2-normalize both sides for cosine similarity.

Design (query blocks outside, gallery chunks inside, query batches innermost):

* The gallery is never loaded whole.  It is read one chunk at a time through
  `gallery[a:b]` (an np.memmap, an np.ndarray or a `ConcatRows` over
  memory-mapped shards), so host memory is bounded by `chunk_rows`, not by the
  gallery size.  Chunks are balanced (ceil(G / ceil(G / chunk_rows)) rows) and
  padded to a multiple of the devices times the selection's block width,
  placed with `jax.make_array_from_callback`, their rows sharded over ALL mesh
  axes: on several processes each host reads only the rows its own devices
  hold.  Once per chunk (`_prepare_chunk`) rows holding a NaN or an infinity
  are zeroed and given a -inf bias (never returned; counted in
  `SearchResult.nonfinite_gallery_rows`), padding rows too, and the largest row
  norms are taken for the error bound below.  At most two chunks, and
  `_IN_FLIGHT` steps, are on the devices at a time.
* Queries are validated (a non-finite value is a ValueError naming its row) and
  placed `max_resident_queries` at a time (replicated, in their stored type: the
  float32 rescoring needs them unrounded), in balanced batches of at most
  `query_batch`; the gallery is read once per block of resident queries, so
  `max_resident_queries` trades device memory against gallery passes
  (`plan_memory` gives the bytes of every resident buffer).
* One jitted `jax.shard_map` step per (chunk, query batch): every device
  computes `q @ gᵀ` for its rows in `dtype` (bfloat16, or float32 at HIGHEST
  precision; accumulated in float32), adds the bias, applies the exclusion
  rules, and selects its exact top-(k + margin) with a block-max pre-selection
  (`_select_top`: the top-(k + margin) blocks of consecutive rows by their
  maxima hold the top-(k + margin) scores, ties included; the masks are fused
  into that one pass over the scores, and a `lax.top_k` runs over the chosen
  blocks only), attaches global row numbers, all-gathers the candidates over
  the device axes and takes a second top_k; the chunk's candidates are then
  merged with the running ones (running first: `lax.top_k` is stable, so on
  ties lower rows win).  The step compiles once per shape and is cached across
  calls (`_chunk_step`).
* Excluded rows (see `Exclusion`) are kept out of the kept list (score -inf
  there) and tracked in a second running top-(k + margin) with their reason
  codes, so that what the filter removed from the unfiltered top-k is reported
  exactly (`SearchResult.excluded_in_top_k`, `rank0_reason`).
* After the last chunk of a block the host finishes its queries (overlapped
  with the next block's device work; on several processes over a shared mesh,
  each process finishes its share of the queries and the results are
  all-gathered).  Every device score is within a proven bound E of the exact
  inner product (`_error_bound`; float32: 2 (D + 2) 2⁻²⁴ |q| max|g|; bfloat16
  adds the inputs' rounding, about 2⁻⁸ |q| max|g|), so only the candidates that
  can still reach the top k are rescored from the original rows (float32, from
  the float64 inner product): the device's top k, then every candidate whose
  device score + E reaches the k-th of those exact scores.  Exclusion reasons
  are recomputed with exact scores and float64 great-circle distances, and
  everything is ordered by (-score, row).  The result equals the brute force
  (float64 products rounded to float32, ties to the lower row) whenever each
  query's true top-k lies within its device top-(k + margin) (kept and
  excluded lists alike): with float32 always, short of more than `margin`
  rows within float32 rounding of the k-th; with bfloat16 when the margin
  covers its rounding.  A query whose list the bound cannot prove complete is
  counted in `SearchResult.uncertified_queries`.  The returned scores are
  always the rescored float32 ones.
* `prefilter="bfloat16"` (dtype "float32" only): the device pass runs in
  bfloat16 (faster wherever bfloat16 matmuls are), and every query it cannot
  certify is searched again in float32 (`SearchResult.fallback_queries`): the
  result is the float32 one.

Multi-host: every process calls `search` in step with the same arguments and
gets the same (replicated) numpy results.  `mesh=None` uses a mesh over this
process's local devices only (each process then searches everything by
itself); pass a global mesh (`sharding.create_mesh`) to split the reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geotoken_jax import sharding

KEPT, SAME_ID, NEAR_DUPLICATE, SAME_GROUP = 0, 1, 2, 3
REASONS = ("same_id", "near_duplicate", "same_group")  # reason code r is REASONS[r - 1]
EARTH_RADIUS_KM = 6371.0088
_DTYPES = ("bfloat16", "float32")
_PREFILTERS = (None, "bfloat16")
_RESCORE_ELEMENTS = 1 << 22  # gathered gallery values per host rescoring block
_VALIDATE_ROWS = 1 << 16  # query rows checked for non-finite values at a time
_IN_FLIGHT = 4  # device steps dispatched ahead of the host (XLA:CPU's collectives stall with many more)
_UNIT = 2.0**-24  # float32 unit roundoff
_BF16_UNIT = 2.0**-9  # bfloat16 unit roundoff (round to nearest even)


@dataclasses.dataclass(frozen=True)
class Exclusion:
  """What each query may not retrieve. Every field optional (None = that rule is off).

  Row-aligned arrays: query_* have one row per query, gallery_* one per gallery
  row.  A rule needs both its query_* and gallery_* arrays.  When several rules
  exclude a row, its reason is the lowest code.
  """
  # "same_id" (1): a gallery row with the query's id (the query itself, or a re-upload).
  query_ids: np.ndarray | None = None       # int64 [Q] an id hash
  gallery_ids: np.ndarray | None = None     # int64 [G]
  # "same_group" (3): e.g. the same author, or the same region block; -1 = no group (never matches).
  query_groups: np.ndarray | None = None    # int64 [Q]
  gallery_groups: np.ndarray | None = None  # int64 [G]
  # "near_duplicate" (2): great-circle distance <= duplicate_km AND score >= duplicate_similarity.
  query_latlng: np.ndarray | None = None    # float32 [Q, 2] degrees
  gallery_latlng: np.ndarray | None = None  # float32 [G, 2] degrees
  duplicate_km: float = 0.0
  duplicate_similarity: float = 1.0


@dataclasses.dataclass
class SearchResult:
  """Top-k per query after exclusion, plus what the exclusion removed."""
  indices: np.ndarray  # int64 [Q, k] gallery rows, best first; -1 where fewer than k rows are allowed
  scores: np.ndarray  # float32 [Q, k] fp32-rescored inner products; -inf where indices is -1
  excluded_in_top_k: np.ndarray  # int32 [Q, 3] per reason: excluded rows within the unfiltered top-k
  rank0_reason: np.ndarray  # int8 [Q] reason code of the unfiltered rank-0 row (0 = it was kept)
  # Gallery rows holding a NaN or an infinity: never returned (scored -inf on the device).
  nonfinite_gallery_rows: int = 0
  # Queries whose exactness the error bound could not prove (bfloat16: possibly inexact; float32:
  # more than `margin` candidates within float32 rounding of the k-th, e.g. duplicated rows).
  uncertified_queries: int = 0
  # prefilter="bfloat16": queries searched again in float32 because the bound could not certify them.
  fallback_queries: int = 0

  def stats(self) -> dict[str, Any]:
    """JSON-friendly summary."""
    queries, k = self.indices.shape
    denominator = max(queries, 1)
    return {
        "queries": int(queries),
        "k": int(k),
        "rank0_excluded_fraction": {name: float(np.sum(self.rank0_reason == code)) / denominator
                                    for code, name in enumerate(REASONS, 1)},
        "excluded_in_top_k": {name: int(self.excluded_in_top_k[:, code - 1].sum())
                              for code, name in enumerate(REASONS, 1)},
        "queries_with_fewer_than_k": int(np.sum(np.any(self.indices < 0, axis=1))),
        "nonfinite_gallery_rows": int(self.nonfinite_gallery_rows),
        "uncertified_queries": int(self.uncertified_queries),
        "fallback_queries": int(self.fallback_queries),
    }


class ConcatRows:
  """A read-only row view over a list of 2-D arrays (e.g. memory-mapped shards).

  Slicing and `take` read only the rows asked for, shard by shard; the arrays
  are never concatenated whole.
  """

  def __init__(self, arrays: Sequence[Any]):
    arrays = list(arrays)
    if not arrays:
      raise ValueError("ConcatRows needs at least one array")
    for i, a in enumerate(arrays):
      if len(a.shape) != 2:
        raise ValueError(f"ConcatRows arrays must be 2-D [rows, dims]; array {i} has shape {a.shape}")
      if a.shape[1] != arrays[0].shape[1]:
        raise ValueError(f"ConcatRows arrays must have the same width; array {i} has {a.shape[1]} "
                         f"columns, array 0 has {arrays[0].shape[1]}")
    self._arrays = arrays
    self._starts = np.cumsum([0] + [a.shape[0] for a in arrays])  # [shards + 1]
    self.dtype = np.result_type(*[a.dtype for a in arrays])
    self.shape = (int(self._starts[-1]), int(arrays[0].shape[1]))

  @property
  def ndim(self) -> int:
    return 2

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, tuple):
      rows, *rest = key
      return self[rows][(slice(None), *rest)]
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      if step != 1:
        return self.take(np.arange(start, stop, step))
      return self._read(start, max(start, stop))
    if isinstance(key, (int, np.integer)):
      return self.take(np.asarray([key]))[0]
    return self.take(key)

  def _read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop), contiguous."""
    parts = []
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    for s in range(max(first, 0), len(self._arrays)):
      lo, hi = self._starts[s], self._starts[s + 1]
      if lo >= stop:
        break
      a, b = max(start, lo) - lo, min(stop, hi) - lo
      if b > a:
        parts.append(np.asarray(self._arrays[s][a:b], self.dtype))
    if not parts:
      return np.zeros((0, self.shape[1]), self.dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def take(self, indices) -> np.ndarray:
    """Rows at `indices` (any shape; negative counts from the end) -> [*indices.shape, D]."""
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
      raise IndexError(f"ConcatRows.take needs integer row indices, got dtype {indices.dtype}")
    flat = indices.reshape(-1).astype(np.int64)
    n = self.shape[0]
    if flat.size and (flat.min() < -n or flat.max() >= n):
      raise IndexError(f"row index out of range for ConcatRows of {n} rows")
    flat = np.where(flat < 0, flat + n, flat)
    out = np.empty((flat.size, self.shape[1]), self.dtype)
    shard = np.searchsorted(self._starts, flat, side="right") - 1  # [n_indices]
    for s in np.unique(shard):
      where = np.flatnonzero(shard == s)
      local = flat[where] - self._starts[s]
      order = np.argsort(local, kind="stable")  # read each shard in row order (memmap friendly)
      out[where[order]] = self._arrays[s][local[order]]
    return out.reshape(indices.shape + (self.shape[1],))


# ----------------------------------------------------------------------------- validation


def _check_exclusion(exclusion: Exclusion | None, num_queries: int, num_rows: int) -> dict[str, np.ndarray]:
  """The active rules' arrays, validated: {"query_ids": [Q] int64, ...}; {} when nothing is excluded."""
  if exclusion is None:
    return {}
  if not isinstance(exclusion, Exclusion):
    raise ValueError(f"exclusion must be a search.Exclusion or None, got {type(exclusion).__name__}")
  out = {}
  for rule, width, kind in (("ids", None, "i"), ("groups", None, "i"), ("latlng", 2, "f")):
    q, g = getattr(exclusion, f"query_{rule}"), getattr(exclusion, f"gallery_{rule}")
    if (q is None) != (g is None):
      given = f"query_{rule}" if g is None else f"gallery_{rule}"
      raise ValueError(f"exclusion.{given} is set but its counterpart is None: set both query_{rule} and "
                       f"gallery_{rule}, or neither")
    if q is None:
      continue
    for name, array, rows in ((f"query_{rule}", q, num_queries), (f"gallery_{rule}", g, num_rows)):
      array = np.asarray(array)
      shape = (rows,) if width is None else (rows, width)
      if array.shape != shape:
        raise ValueError(f"exclusion.{name} must have shape {shape} (one row per "
                         f"{'query' if name.startswith('query') else 'gallery row'}), got {array.shape}")
      if kind == "i" and array.dtype.kind not in "iu":
        raise ValueError(f"exclusion.{name} must hold integers (int64 hashes), got dtype {array.dtype}")
      out[name] = array.astype(np.int64) if kind == "i" else array.astype(np.float64)
  if "query_latlng" in out:
    if not (exclusion.duplicate_km >= 0):
      raise ValueError(f"exclusion.duplicate_km must be >= 0, got {exclusion.duplicate_km}")
    if not np.isfinite(exclusion.duplicate_similarity):
      raise ValueError(f"exclusion.duplicate_similarity must be finite, got {exclusion.duplicate_similarity}")
  return out


def _check_queries_finite(queries, num_queries: int) -> None:
  """ValueError naming the first query row with a NaN or an infinity (read in blocks)."""
  for a in range(0, num_queries, _VALIDATE_ROWS):
    block = np.asarray(queries[a:a + _VALIDATE_ROWS])
    if block.dtype.kind == "f" or block.dtype == ml_dtypes.bfloat16:
      bad = ~np.isfinite(block.astype(np.float32, copy=False)).all(axis=1)
      if bad.any():
        row = a + int(np.argmax(bad))
        raise ValueError(f"queries row {row} has a non-finite value (NaN or inf): "
                         f"{np.asarray(queries[row:row + 1])[0][:8]}...; fix or drop that query")


# ----------------------------------------------------------------------------- layout


def _target_width(cols: int, run_k: int) -> int:
  """The block width `_select_top` aims at for `cols` scores per query: the power of two nearest
  sqrt(cols / run_k) from below (cols / w block maxima and run_k * w candidates then cost about
  the same), or 1 (a plain top_k) when the scores are too few to gain."""
  if cols < 16 * run_k:
    return 1
  return 1 << max(0, int(math.floor(math.log2(math.sqrt(cols / run_k)))))


def _block_width(cols: int, run_k: int) -> int:
  """Block width of `_select_top`: the largest power of two dividing cols, up to the target
  (`_chunk_layout` pads the chunks so that the target divides them)."""
  target, width = _target_width(cols, run_k), 1
  while width * 2 <= target and cols % (width * 2) == 0:
    width *= 2
  return width


def _chunk_layout(num_rows: int, chunk_rows: int, devices: int, run_k: int) -> tuple[int, int, int]:
  """(rows read per chunk, padded chunk rows on the devices, number of chunks): balanced chunks of
  at most chunk_rows rows, padded to a multiple of devices x the block width of the selection."""
  count = -(-num_rows // min(chunk_rows, num_rows))
  stride = -(-num_rows // count)
  per_device = -(-stride // devices)
  width = _target_width(per_device, run_k)
  per_device = -(-per_device // width) * width
  return stride, per_device * devices, count


def _batch_layout(num_queries: int, query_batch: int, max_resident_queries: int | None) -> tuple[int, int]:
  """(query batch B, resident batches per block): balanced batches of at most query_batch
  queries (a multiple of 8 where that stays within query_batch)."""
  count = -(-num_queries // min(query_batch, num_queries))
  batch = -(-num_queries // count)
  if -(-batch // 8) * 8 <= query_batch:
    batch = -(-batch // 8) * 8
  resident = count if max_resident_queries is None else max(1, min(count, max_resident_queries // batch))
  return batch, resident


# ----------------------------------------------------------------------------- host-side helpers


def _split64(x: np.ndarray) -> np.ndarray:
  """int64 [N] -> uint32 [N, 2] (high, low): JAX runs without x64, so ids are compared in halves."""
  x = np.ascontiguousarray(x, np.int64).view(np.uint64)
  return np.stack([(x >> np.uint64(32)).astype(np.uint32), (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)], -1)


def _unit_xyz(latlng_deg: np.ndarray) -> np.ndarray:
  """[N, 2] degrees -> float32 [N, 3] points on the unit sphere."""
  lat, lng = np.radians(latlng_deg[:, 0]), np.radians(latlng_deg[:, 1])
  return np.stack([np.cos(lat) * np.cos(lng), np.cos(lat) * np.sin(lng), np.sin(lat)], -1).astype(np.float32)


def _haversine_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Float64 great-circle distance in km between [..., 2] degree arrays (broadcasting)."""
  a, b = np.radians(a), np.radians(b)
  h = (np.sin((b[..., 0] - a[..., 0]) / 2) ** 2
       + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin((b[..., 1] - a[..., 1]) / 2) ** 2)
  return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


def _take_rows(gallery, rows: np.ndarray) -> np.ndarray:
  """Gallery rows at the sorted `rows` [U] -> [U, D] (float16 / float32 / float64 kept; else float32)."""
  if isinstance(gallery, np.ndarray):
    out = np.take(gallery, rows, axis=0)
  else:
    unique, inverse = np.unique(rows, return_inverse=True)  # a memmap / ConcatRows reads each row once
    out = np.asarray(gallery.take(unique) if hasattr(gallery, "take") else gallery[unique])[inverse]
  return out if out.dtype in (np.float16, np.float32, np.float64) else out.astype(np.float32)


def _rescore(queries: np.ndarray, gallery, rows: np.ndarray, need: np.ndarray) -> np.ndarray:
  """float32 scores (the float64 inner product, rounded) of queries [b, D] against gallery rows
  [b, C] where need [b, C]; NaN elsewhere.  Pairs go in gallery-row order, in blocks (on a few
  threads for an in-memory gallery: numpy releases the GIL in the gathers and products)."""
  out = np.full(rows.shape, np.nan, np.float32)
  query_of, slot = np.nonzero(need)
  if not query_of.size:
    return out
  picked = rows[query_of, slot]
  order = np.argsort(picked, kind="stable")
  step = max(1, _RESCORE_ELEMENTS // max(1, queries.shape[1]))

  def block(a):
    sel = order[a:a + step]
    g = _take_rows(gallery, picked[sel])  # [n, D]
    q = queries[query_of[sel]]  # [n, D]
    out[query_of[sel], slot[sel]] = np.einsum("nd,nd->n", q, g, dtype=np.float64).astype(np.float32)

  starts = range(0, order.size, step)
  threads = min(len(starts), 4, os.cpu_count() or 1) if isinstance(gallery, np.ndarray) else 1
  if threads > 1:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(block, starts))
  else:
    for a in starts:
      block(a)
  return out


def _kth_largest(values: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
  """Per row, the k-th largest of values [b, C] where mask (-inf if fewer than k) -> float64 [b]."""
  v = np.where(mask, values.astype(np.float64), -np.inf)
  if k > v.shape[1]:
    return np.full(v.shape[0], -np.inf)
  return -np.partition(-v, k - 1, axis=1)[:, k - 1]


def _order(scores: np.ndarray, rows: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
  """Per query, argsort by (first ascending, -score, row): [B, C] positions."""
  keys = [rows, -scores.astype(np.float64)]
  if first is not None:
    keys.append(first)
  return np.lexsort(keys, axis=-1)


def _error_bound(dtype: str, dims: int, queries: np.ndarray, gallery_norms: np.ndarray,
                 store_unit: float = 0.0) -> np.ndarray:
  """Per query of queries [b, D], a bound on |device score - exact inner product| for every finite
  gallery row, from gallery_norms = the largest |g|, |bf16(g)| and |g - bf16(g)| over the rows.

  float32 (any summation order, FMA or not, or a bf16x6-style emulation): the products and the sum
  add at most (D + 2) float32 roundings of sum |q_i g_i| <= |q| |g| (Cauchy-Schwarz); doubled for
  margin: gamma = 2 (D + 2) 2^-24.  bfloat16: with q = a + alpha, g = b + beta (a, b the bfloat16
  roundings; their products are exact in float32), q.g - a.b = a.beta + alpha.b + alpha.beta, so
  |s - q.g| <= gamma |a| |b| + |a| |beta| + |alpha| |b| + |alpha| |beta|.  store_unit: the rows
  searched are a rounding (to that unit) of the rows rescored: + store_unit |q| |g|.  The gallery
  norms carry their own margin (float32 sums on the device); the result a relative one for the
  float64 arithmetic here, and a tiny absolute term covers values flushed to zero."""
  gamma = 2.0 * (dims + 2) * _UNIT
  q = np.asarray(queries, np.float32)
  norm = lambda x: np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))  # noqa: E731
  q_norm = norm(q)
  if dtype == "float32":
    bound = gamma * q_norm * gallery_norms[0]
  else:
    a = q.astype(ml_dtypes.bfloat16).astype(np.float32)
    a_norm, alpha_norm = norm(a), norm(q - a)  # q - a is exact in float32
    b_norm, beta_norm = gallery_norms[1], gallery_norms[2]
    bound = (gamma * a_norm * b_norm + a_norm * beta_norm + alpha_norm * b_norm + alpha_norm * beta_norm)
  if store_unit:
    bound = bound + store_unit * (1 + store_unit) * q_norm * gallery_norms[0]
  return bound * (1 + 1e-4) + dims * 1e-37


def _host_reasons(rules: dict[str, np.ndarray], exclusion: Exclusion | None, query_rows: np.ndarray,
                  rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Reason codes of candidate `rows` [B, C] (valid, >= 0) for queries `query_rows` [B] -> int8 [B, C]."""
  reason = np.zeros(rows.shape, np.int8)
  if "query_groups" in rules:
    qg = rules["query_groups"][query_rows][:, None]  # [B, 1]
    reason[(qg != -1) & (qg == rules["gallery_groups"][rows])] = SAME_GROUP
  if "query_latlng" in rules:
    km = _haversine_km(rules["query_latlng"][query_rows][:, None], rules["gallery_latlng"][rows])  # [B, C]
    reason[(km <= exclusion.duplicate_km) & (scores >= exclusion.duplicate_similarity)] = NEAR_DUPLICATE
  if "query_ids" in rules:
    reason[rules["query_ids"][query_rows][:, None] == rules["gallery_ids"][rows]] = SAME_ID
  return reason


# ----------------------------------------------------------------------------- device step


def _block_max(blocks: jax.Array, library: bool) -> jax.Array:
  """max over the last axis of [B, n, w].  library: jnp.max, which XLA:CPU hands to a library kernel
  that fuses a simple producer (a broadcast add) and runs fast, but would first materialize a
  complex one (the exclusion masks); otherwise a reduction spelled as a select, which XLA fuses with
  any producer (one pass, nothing materialized, slower per score)."""
  if library:
    return jnp.max(blocks, axis=2)
  return lax.reduce(blocks, jnp.array(-jnp.inf, blocks.dtype), lambda a, b: jnp.where(a >= b, a, b), (2,))


def _select_top(scores: jax.Array, count: int, masked=None, columns: Sequence[jax.Array] = (),
                library_max: bool = True):
  """Exactly lax.top_k(masked(scores) [B, C], count) -> (values, positions) [B, count], ties to the
  lower position, through a block-max pre-selection when C is large.

  masked(s, cols) -> values (elementwise; None: the scores as they are) sees the scores in blocks of
  w consecutive positions, [B, n, w] (or the chosen blocks, [B, count, w]), and each of `columns`
  ([C, ...] per-column arrays) laid out the same way ([1, n, w, ...] / [B, count, w, ...]): it is
  applied inside the block-max pass and again on the chosen blocks only, never materialized over
  all of [B, C] (see `_block_max` for library_max).

  Exact: the count-th largest block maximum T is <= the count-th largest score (count blocks each
  hold a score >= T), so every top score lies in a block whose maximum is >= T: all blocks above T
  are among the count chosen, and the chosen blocks at T are the lowest-numbered ones (top_k is
  stable), which hold T's lowest positions (blocks are consecutive positions: a lower block has
  only lower positions).  The chosen blocks are gathered in position order, so the final stable
  top_k breaks ties exactly as one top_k over all C would."""
  batch, cols = scores.shape
  count = min(count, cols)
  width = _block_width(cols, count)
  apply = (lambda s, _: s) if masked is None else masked
  if width == 1:
    values = apply(scores[:, :, None], [c[None, :, None] for c in columns])[:, :, 0]
    return lax.top_k(values, count)
  blocks = scores.reshape(batch, cols // width, width)
  column_blocks = [c.reshape((1, cols // width, width) + c.shape[1:]) for c in columns]
  maxima = _block_max(apply(blocks, column_blocks), library_max)  # [B, n]
  _, chosen = lax.top_k(maxima, count)  # [B, count] block numbers
  chosen = jnp.sort(chosen, axis=1)
  candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1)  # [B, count, w]
  candidate_columns = [c[0][chosen] for c in column_blocks]  # [B, count, w, ...]
  values, at = lax.top_k(apply(candidates, candidate_columns).reshape(batch, count * width), count)
  positions = jnp.take_along_axis(chosen, at // width, axis=1) * width + at % width
  return values, positions


def _topk_rows(scores: jax.Array, rows: jax.Array, k: int, *extra: jax.Array):
  """top_k along axis 1 of scores [B, C]; rows (and extra) [B, C] follow; -inf slots get row -1."""
  values, position = lax.top_k(scores, k)  # [B, k]
  picked = [jnp.take_along_axis(x, position, axis=1) for x in (rows, *extra)]
  picked[0] = jnp.where(values == -jnp.inf, -1, picked[0])
  return (values, *picked)


@functools.lru_cache(maxsize=32)
def _chunk_step(mesh: Mesh, run_k: int, dtype: str, rules: tuple[str, ...]):
  """The jitted step: (queries [B, D], chunk [C, D], rows [C], query / gallery rule arrays,
  running lists, gallery statistics) -> updated lists and statistics.  One compile per
  (B, C, D) shape."""
  axes = tuple(mesh.axis_names)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()
  compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  precision = lax.Precision.HIGHEST if dtype == "float32" else lax.Precision.DEFAULT
  excluding = bool(rules)

  def body(q, g, bias, rows, qx, gx, dup, kept, excluded):
    s = lax.dot_general(q.astype(compute), g.astype(compute), (((1,), (1,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)  # [B, c] local rows
    names = tuple(n for n in sorted(gx) if gx[n] is not None)
    # Padding and non-finite rows (zeroed by _prepare_chunk): bias -inf, added to their scores.
    columns = [bias] + [gx[n] for n in names]

    def reasons(s, cols):
      """Reason codes of scores s [B, ...] against gallery columns cols (shaped like s, + tail)."""
      g_side = dict(zip(names, cols[1:]))
      q_side = {n: a.reshape((a.shape[0],) + (1,) * (s.ndim - 1) + a.shape[1:])
                for n, a in qx.items() if a is not None}
      reason = jnp.zeros(s.shape, jnp.int32)
      if "groups" in rules:
        same = (q_side["groups"][..., 0] == g_side["groups"][..., 0]) & (
            q_side["groups"][..., 1] == g_side["groups"][..., 1])
        reason = jnp.where(same & q_side["group_valid"] & g_side["group_valid"], SAME_GROUP, reason)
      if "latlng" in rules:
        chord2 = sum((q_side["xyz"][..., i] - g_side["xyz"][..., i]) ** 2 for i in range(3))
        reason = jnp.where((chord2 <= dup[0]) & (s >= dup[1]), NEAR_DUPLICATE, reason)
      if "ids" in rules:
        same = (q_side["ids"][..., 0] == g_side["ids"][..., 0]) & (q_side["ids"][..., 1] == g_side["ids"][..., 1])
        reason = jnp.where(same, SAME_ID, reason)
      return reason

    def masked(want_kept):
      def values(s, cols):
        v = s + cols[0]
        if excluding:
          v = jnp.where((reasons(s, cols) == KEPT) == want_kept, v, -jnp.inf)
        return v
      return values

    def chunk_candidates(want_kept):
      # Excluding, the masks are fused into a generic reduction (a library one would materialize them).
      values, positions = _select_top(s, run_k, masked(want_kept), columns, library_max=not excluding)
      # A NaN score (only from an inner product overflowing float32) never enters the lists.
      values = jnp.where(jnp.isnan(values), -jnp.inf, values)
      local = [values, jnp.where(values == -jnp.inf, -1, jnp.take(rows, positions))]
      if not want_kept:
        local.append(reasons(values, [c[positions] for c in columns]))
      gathered = [lax.all_gather(x, axes, axis=1, tiled=True) for x in local]  # [B, devices * r]
      return _topk_rows(gathered[0], gathered[1], min(run_k, gathered[0].shape[1]), *gathered[2:])

    def merge(running, candidates):
      # Running first: on ties the earlier (lower) rows stay ahead.
      joined = [jnp.concatenate([a, b], axis=1) for a, b in zip(running, candidates)]
      return _topk_rows(joined[0], joined[1], run_k, *joined[2:])

    kept = merge(kept, chunk_candidates(True))
    if excluding:
      excluded = merge(excluded, chunk_candidates(False))
    return kept, excluded

  qx_spec = {"ids": rep, "groups": rep, "group_valid": rep, "xyz": rep}
  gx_spec = {"ids": rows_spec, "groups": rows_spec, "group_valid": rows_spec, "xyz": rows_spec}
  mapped = jax.shard_map(body, mesh=mesh,
                         in_specs=(rep, rows_spec, rows_spec, rows_spec, qx_spec, gx_spec, rep, rep, rep),
                         out_specs=(rep, rep),
                         # all_gather's output is the same on every device, but the varying-axes check
                         # cannot infer that (lax has no invariant all_gather): checked by the tests.
                         check_vma=False)

  def step(q, g, bias, rows, qx, gx, dup, kept, excluded):
    return mapped(q, g, bias, rows, {k: qx.get(k) for k in qx_spec}, {k: gx.get(k) for k in gx_spec},
                  dup, kept, excluded)

  return jax.jit(step)


@functools.lru_cache(maxsize=8)
def _prepare_chunk(mesh: Mesh):
  """Once per chunk: (chunk [C, D], rows [C]) -> (chunk with its non-finite rows zeroed, bias [C]
  float32: 0, or -inf for padding and non-finite rows, the number of non-finite rows, the largest
  squared norms of a finite row g, of bf16(g) and of g - bf16(g) [3])."""
  axes = tuple(mesh.axis_names)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()

  def body(g, rows):
    finite = jnp.all(jnp.isfinite(g), axis=1)  # [c]: a NaN / inf anywhere in a row drops the row
    real = rows >= 0
    ok = real & finite
    # Zeroed, so that their scores are 0, not NaN: the bias's -inf then sticks.
    g = jnp.where(finite[:, None], g, jnp.zeros((), g.dtype))
    g32 = g.astype(jnp.float32)
    rounded = g32.astype(jnp.bfloat16).astype(jnp.float32)
    norms2 = jnp.stack([jnp.sum(x * x, axis=1) for x in (g32, rounded, g32 - rounded)], axis=1)  # [c, 3]
    norms2 = jnp.max(jnp.where(ok[:, None], norms2, 0.0), axis=0)  # |g|², |bf16(g)|², |g - bf16(g)|²
    bias = jnp.where(ok, 0.0, -jnp.inf).astype(jnp.float32)
    return (g, bias, lax.psum(jnp.sum(real & ~finite, dtype=jnp.int32), axes), lax.pmax(norms2, axes))

  mapped = jax.shard_map(body, mesh=mesh, in_specs=(rows_spec, rows_spec),
                         out_specs=(rows_spec, rows_spec, rep, rep))
  return jax.jit(mapped, donate_argnums=(0,))


def _put(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...], read) -> jax.Array:
  """A global array from `read(lo, hi)` -> rows [lo, hi) of it (numpy); each process reads only
  the rows of its own devices."""
  def callback(index):
    if not shape:  # a scalar
      return read(0, 0)
    rows = index[0] if index else slice(None)
    lo, hi, _ = rows.indices(shape[0])
    return read(lo, hi)
  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), callback)


def _transfer_dtype(dtype) -> np.dtype:
  """The type rows are sent to the device in: their own if a float the device casts cheaply."""
  dtype = np.dtype(dtype)
  return dtype if dtype in (np.float16, np.float32, ml_dtypes.bfloat16) else np.dtype(np.float32)


def _padded_reader(source, start: int, stop: int, dtype, fill=0):
  """read(lo, hi) for rows [start, stop) of `source` laid out from row 0, padded with `fill` past stop."""
  def read(lo, hi):
    real_hi = max(lo, min(hi, stop - start))
    part = np.asarray(source[start + lo:start + real_hi], dtype)
    if real_hi == hi:
      return part
    pad = np.full((hi - real_hi,) + part.shape[1:], fill, dtype)
    return np.concatenate([part, pad])
  return read


def _rule_specs(names: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Per-row device rule arrays: name -> (trailing shape, dtype)."""
  out = {}
  if "ids" in names:
    out["ids"] = ((2,), np.uint32)
  if "groups" in names:
    out["groups"] = ((2,), np.uint32)
    out["group_valid"] = ((), np.bool_)
  if "latlng" in names:
    out["xyz"] = ((3,), np.float32)
  return out


def _step_shapes(mesh: Mesh, batch: int, chunk: int, dims: int, run_k: int, names: tuple[str, ...],
                 query_dtype, gallery_dtype) -> tuple:
  """jax.ShapeDtypeStruct arguments of the step (for lowering it without data: plan tests)."""
  axes = tuple(mesh.axis_names)
  rep = NamedSharding(mesh, PartitionSpec())
  spec = lambda shape, dtype, rows=False: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(axes, *([None] * (len(shape) - 1))))
      if rows else rep)
  rules = _rule_specs(names)
  qx = {n: spec((batch,) + tail, dt) for n, (tail, dt) in rules.items()}
  gx = {n: spec((chunk,) + tail, dt, rows=True) for n, (tail, dt) in rules.items()}
  kept = (spec((batch, run_k), jnp.float32), spec((batch, run_k), jnp.int32))
  excluded = kept + (spec((batch, run_k), jnp.int32),) if names else ()
  return (spec((batch, dims), query_dtype), spec((chunk, dims), gallery_dtype, rows=True),
          spec((chunk,), jnp.float32, rows=True), spec((chunk,), jnp.int32, rows=True), qx, gx,
          spec((2,), jnp.float32), kept, excluded)


# ----------------------------------------------------------------------------- memory plan


def plan_memory(num_queries: int, num_rows: int, dims: int, *, k: int, margin: int = 16,
                chunk_rows: int = 65536, query_batch: int = 1024, dtype: str = "bfloat16", devices: int = 1,
                max_resident_queries: int | None = 65536, query_dtype: str = "float32",
                gallery_dtype: str = "float32", rules: Sequence[str] = ()) -> dict[str, Any]:
  """Device memory of `search` with these settings: bytes per device of every resident buffer.

  rules: the active exclusion rules among "ids", "groups", "latlng".  An upper bound: the step's
  temporaries are counted as if none were fused or reused (XLA reuses some; the tests check the
  compiled step against `step_bytes`)."""
  run_k = int(k) + int(margin)
  names = tuple(sorted(rules))
  stride, chunk, num_chunks = _chunk_layout(num_rows, chunk_rows, devices, run_k)
  batch, resident = _batch_layout(num_queries, query_batch, max_resident_queries)
  batches = -(-num_queries // batch)
  local = chunk // devices
  r = min(run_k, local)
  width = _block_width(local, r)
  size = lambda name: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name).itemsize  # noqa: E731
  q_size, g_size, c_size = size(query_dtype), size(gallery_dtype), size(dtype)
  rule_bytes = sum(int(np.prod(tail, dtype=np.int64)) * np.dtype(dt).itemsize
                   for tail, dt in _rule_specs(names).values())
  lists = 2 if names else 1
  list_bytes = batch * run_k * (8 + (12 if names else 0))  # kept (score, row) [+ excluded (score, row, reason)]
  chunk_bytes = local * (dims * g_size + 8 + rule_bytes)  # rows, their int32 numbers and float32 bias
  arguments = {
      "query_batch": batch * (dims * q_size + rule_bytes),
      "gallery_chunk": chunk_bytes,
      "running_lists": list_bytes,
      "thresholds": 8 if "latlng" in names else 0,  # the near-duplicate thresholds (pruned when unused)
  }
  fields = 3 if names else 2  # per excluded list: score, row, reason
  temps = {
      "scores": batch * local * 4,  # the one [B, C / devices] float32 matmul output; masks are fused
      "query_cast": batch * dims * c_size if dtype != query_dtype else 0,
      "chunk_cast": local * dims * c_size if dtype != gallery_dtype else 0,
      # Block maxima and the chosen blocks' scores per list (a masked copy of the scores without blocks).
      "selection": lists * batch * ((local // width) * 4 + r * width * 8 + r * 8 if width > 1 else local * 4 + r * 8),
      "candidates": lists * batch * (devices * r + 4 * run_k) * 4 * fields,
  }
  resident_bytes = {
      "resident_queries": resident * batch * (dims * q_size + rule_bytes),
      "running_lists": resident * list_bytes,
      "gallery_chunks": 2 * chunk_bytes,  # the one being searched and the next (read ahead)
  }
  step_arguments, step_temps = sum(arguments.values()), sum(temps.values())
  total = sum(resident_bytes.values()) + step_temps
  return {
      "bytes_per_device": {**resident_bytes, **{f"step_{n}": v for n, v in temps.items()}},
      "total_bytes_per_device": int(total),
      "total_gib_per_device": total / 2**30,
      "step_argument_bytes": int(step_arguments),
      "step_temp_bytes": int(step_temps),
      "step_bytes": int(step_arguments + step_temps),
      "layout": {"chunk_rows_read": stride, "chunk_rows_padded": chunk, "chunk_rows_per_device": local,
                 "chunks": num_chunks, "query_batch": batch, "query_batches": batches,
                 "resident_batches": resident, "gallery_passes": -(-batches // resident),
                 "selection_block_width": width, "run_k": run_k},
      "settings": {"num_queries": num_queries, "num_rows": num_rows, "dims": dims, "k": k, "margin": margin,
                   "chunk_rows": chunk_rows, "query_batch": query_batch, "dtype": dtype, "devices": devices,
                   "max_resident_queries": max_resident_queries, "query_dtype": query_dtype,
                   "gallery_dtype": gallery_dtype, "rules": list(names)},
  }


# ----------------------------------------------------------------------------- search


def search(queries, gallery, k: int, *, mesh: Mesh | None = None, chunk_rows: int = 65536,
           query_batch: int = 1024, dtype: str = "bfloat16", margin: int = 16,
           exclusion: Exclusion | None = None, progress: bool = False,
           max_resident_queries: int | None = 65536, prefilter: str | None = None) -> SearchResult:
  """Top-k gallery rows by inner product for every query (exact; see the module docstring).

  Args:
    queries: [Q, D] float16 / float32 array-like (np.ndarray, np.memmap); every value finite.
    gallery: [G, D]: anything with `.shape` and `gallery[a:b]` -> np array (np.memmap,
      np.ndarray, ConcatRows); read chunk by chunk, never whole.  The candidates are rescored from
      `gallery.take(rows)` where it has one: other row views may slice a float16 / bfloat16
      rounding of what they take (neighbors.SearchRows does), nothing coarser.  Rows holding a NaN
      or an infinity are never returned (counted in `nonfinite_gallery_rows`); inner products
      must stay within float32's range.
    k: neighbours per query; k > G is allowed (the extra slots are -1 / -inf).
    mesh: devices to shard each chunk's rows over (all its axes); None: every local device.
    chunk_rows: gallery rows read and searched at a time.
    query_batch: queries searched at a time.
    dtype: "bfloat16" or "float32": the device matmul's input type (accumulation is float32).
    margin: extra candidates kept per query for the float32 rescoring.
    exclusion: rows each query may not retrieve (Exclusion), or None.
    progress: a tqdm bar over query batches x chunks.
    max_resident_queries: queries on the devices at a time (rounded down to whole batches, at least
      one); the gallery is read once per such block.  None: all of them (one gallery pass).
    prefilter: None, or "bfloat16" with dtype "float32": search in bfloat16, certify each query's
      top-k with the error bound and search the others again in float32 (same result as float32).
  """
  if not hasattr(queries, "shape"):
    queries = np.asarray(queries)
  if len(queries.shape) != 2:
    raise ValueError(f"queries must be 2-D [queries, dims], got shape {tuple(queries.shape)}")
  if not hasattr(gallery, "shape") or len(gallery.shape) != 2:
    raise ValueError("gallery must be 2-D [rows, dims] with .shape and row slicing (np.memmap, np.ndarray, "
                     f"ConcatRows), got {type(gallery).__name__} of shape {getattr(gallery, 'shape', None)}")
  num_queries, dims = map(int, queries.shape)
  num_rows = int(gallery.shape[0])
  if int(gallery.shape[1]) != dims:
    raise ValueError(f"queries have {dims} dims but gallery rows have {gallery.shape[1]}: embed both with the "
                     "same model / head")
  if num_rows == 0:
    raise ValueError("gallery is empty (0 rows): there is nothing to search")
  if num_rows >= 2**31 - 1:
    raise ValueError(f"gallery has {num_rows} rows; row numbers are int32 on the device, split it below 2**31")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  if prefilter not in _PREFILTERS:
    raise ValueError(f"prefilter must be one of {_PREFILTERS}, got {prefilter!r}")
  if prefilter is not None and dtype != "float32":
    raise ValueError(f"prefilter={prefilter!r} certifies float32 results: it needs dtype='float32', got {dtype!r}")
  if not isinstance(margin, (int, np.integer)) or margin < 0:
    raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
  if query_batch < 1:
    raise ValueError(f"query_batch must be >= 1, got {query_batch}")
  if max_resident_queries is not None and max_resident_queries < 1:
    raise ValueError(f"max_resident_queries must be >= 1 or None, got {max_resident_queries}")
  rules = _check_exclusion(exclusion, num_queries, num_rows)
  k, run_k = int(k), int(k) + int(margin)
  if num_queries == 0:
    return SearchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                        np.zeros((0, len(REASONS)), np.int32), np.zeros((0,), np.int8))
  _check_queries_finite(queries, num_queries)

  if mesh is None:
    mesh = sharding.create_mesh({sharding.MESH_AXES[0]: -1}, jax.local_devices())
  axes = tuple(mesh.axis_names)
  devices = math.prod(mesh.shape[a] for a in axes)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()
  chunk_real, chunk, num_chunks = _chunk_layout(num_rows, chunk_rows, devices, run_k)
  batch, resident = _batch_layout(num_queries, query_batch, max_resident_queries)
  device_dtype = "bfloat16" if prefilter == "bfloat16" else dtype

  names = tuple(sorted(r for r in ("ids", "groups", "latlng") if f"query_{r}" in rules))
  step = _chunk_step(mesh, run_k, device_dtype, names)
  # Rows travel in their stored type (float16 / bfloat16 / float32; anything else as float32) and
  # are cast to `dtype` on the device: converting on the host costs more than the transfer.
  host_dtype = _transfer_dtype(getattr(gallery, "dtype", np.float32))
  query_dtype = _transfer_dtype(getattr(queries, "dtype", np.float32))
  if "latlng" in names:
    chord = 2 * math.sin(min(exclusion.duplicate_km / EARTH_RADIUS_KM, math.pi) / 2)
    # The device's pre-filter (float32 geometry, `dtype` scores); the host's float64 check of the
    # candidates decides.
    dup_host = np.array([chord * chord * (1 + 1e-4) + 1e-12, exclusion.duplicate_similarity], np.float32)
  else:
    dup_host = np.zeros(2, np.float32)
  dup = _put(mesh, rep, (2,), lambda lo, hi: dup_host[lo:hi])  # [chord² threshold, similarity threshold]

  # Per-row rule arrays in their device form (small, [G] / [Q]); chunks of them travel with the gallery.
  def device_rule_arrays(side: str) -> dict[str, np.ndarray]:
    out = {}
    if "ids" in names:
      out["ids"] = _split64(rules[f"{side}_ids"])  # uint32 [N, 2]
    if "groups" in names:
      out["groups"] = _split64(rules[f"{side}_groups"])
      out["group_valid"] = rules[f"{side}_groups"] != -1  # bool [N]
    if "latlng" in names:
      out["xyz"] = _unit_xyz(rules[f"{side}_latlng"])  # float32 [N, 3]
    return out

  query_rules, gallery_rules = device_rule_arrays("query"), device_rule_arrays("gallery")

  starts = list(range(0, num_queries, batch))
  blocks = [starts[i:i + resident] for i in range(0, len(starts), resident)]
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(starts) * num_chunks, desc="search", unit="chunk")

  out = _Outputs(num_queries, k)
  # np.ndarray / np.memmap / ConcatRows: the rows searched (slices) are the rows rescored (take).  Other
  # row views may slice a float16 / bfloat16 copy of what they take (neighbors.SearchRows does).
  store_unit = 0.0 if isinstance(gallery, (np.ndarray, ConcatRows)) else {
      np.dtype(np.float16): 2.0**-11, np.dtype(ml_dtypes.bfloat16): 2.0**-9}.get(np.dtype(host_dtype), 0.0)
  finisher = _Finisher(queries, gallery, rules, exclusion, k, run_k, device_dtype, dims, names, mesh, out,
                       store_unit)

  def chunk_arrays(c: int):
    start = c * chunk_real
    stop = min(start + chunk_real, num_rows)
    g = _put(mesh, rows_spec, (chunk, dims), _padded_reader(gallery, start, stop, host_dtype))
    row_numbers = np.arange(start, stop, dtype=np.int32)
    rows = _put(mesh, rows_spec, (chunk,), _padded_reader(row_numbers, 0, stop - start, np.int32, fill=-1))
    gx = {name: _put(mesh, PartitionSpec(axes, *([None] * (a.ndim - 1))), (chunk,) + a.shape[1:],
                     _padded_reader(a, start, stop, a.dtype)) for name, a in gallery_rules.items()}
    return g, rows, gx

  def initial_state():
    lists = lambda n: tuple(_put(mesh, rep, (batch, run_k), functools.partial(  # noqa: E731
        lambda fill, dt, lo, hi: np.full((hi - lo, run_k), fill, dt), fill, dt))
        for fill, dt in ((-np.inf, np.float32), (-1, np.int32), (0, np.int32))[:n])
    return lists(2), lists(3) if names else ()

  prepare = _prepare_chunk(mesh)
  gallery_stats = []  # per chunk (first pass): (non-finite rows, largest squared row norm), on device
  pending = None  # the previous block's device results, finished while this block's steps run
  in_flight = collections.deque()  # outputs of the steps not yet known to be done
  for block in blocks:
    placed, states = [], []
    for q0 in block:
      q1 = min(q0 + batch, num_queries)
      q = _put(mesh, rep, (batch, dims), _padded_reader(queries, q0, q1, query_dtype))
      qx = {name: _put(mesh, rep, (batch,) + a.shape[1:],
                       _padded_reader(a, q0, q1, a.dtype)) for name, a in query_rules.items()}
      placed.append((q, qx))
      states.append(initial_state())
    previous_chunk = None
    for c in range(num_chunks):
      g, rows, gx = chunk_arrays(c)
      g, bias, nonfinite, norms2 = prepare(g, rows)
      if len(gallery_stats) < num_chunks:
        gallery_stats.append((nonfinite, norms2))
      for i, (q, qx) in enumerate(placed):
        states[i] = step(q, g, bias, rows, qx, gx, dup, *states[i])
        in_flight.append(states[i][0][0])
        if len(in_flight) > _IN_FLIGHT:
          jax.block_until_ready(in_flight.popleft())
        if bar is not None:
          bar.update(1)
      if previous_chunk is not None:  # at most two chunks on the devices: wait for the older one
        jax.block_until_ready(previous_chunk)
      previous_chunk = states[-1][0][0]  # the output of its last step
      if c == 0 and pending is not None:
        finisher.finish(*pending)
        pending = None
    if finisher.gallery_norms is None:
      fetch = lambda x: np.asarray(x.addressable_data(0))  # noqa: E731
      finisher.nonfinite_rows = int(sum(int(fetch(n)) for n, _ in gallery_stats))
      norms2 = np.max([np.asarray(fetch(m), np.float64) for _, m in gallery_stats], axis=0)
      # float32 sums of squares (relative error <= D u): a margin.
      finisher.gallery_norms = np.sqrt(norms2) * (1 + 2 * dims * _UNIT)
    pending = (block, [(min(q0 + batch, num_queries), s) for q0, s in zip(block, states)])
  finisher.finish(*pending)
  if bar is not None:
    bar.close()

  result = out.result(finisher.nonfinite_rows)
  uncertified = np.flatnonzero(finisher.uncertified)
  if prefilter is None:
    result.uncertified_queries = int(uncertified.size)
    return result
  # bfloat16 pre-filter: the queries it could not certify, searched again in float32.
  result.fallback_queries = int(uncertified.size)
  if uncertified.size:
    sub_exclusion = None
    if exclusion is not None:
      sub_exclusion = dataclasses.replace(exclusion, **{
          f"query_{r}": np.asarray(getattr(exclusion, f"query_{r}"))[uncertified]
          for r in ("ids", "groups", "latlng") if getattr(exclusion, f"query_{r}") is not None})
    fallback_batch = min(batch, 1 << max(3, int(uncertified.size - 1).bit_length()))
    again = search(np.asarray(queries[uncertified]) if isinstance(queries, np.ndarray)
                   else np.stack([np.asarray(queries[int(i)]) for i in uncertified]),
                   gallery, k, mesh=mesh, chunk_rows=chunk_rows, query_batch=fallback_batch, dtype="float32",
                   margin=margin, exclusion=sub_exclusion, max_resident_queries=max_resident_queries)
    result.indices[uncertified] = again.indices
    result.scores[uncertified] = again.scores
    result.excluded_in_top_k[uncertified] = again.excluded_in_top_k
    result.rank0_reason[uncertified] = again.rank0_reason
    result.uncertified_queries = again.uncertified_queries
  return result


class _Outputs:
  """The result arrays, filled block by block."""

  def __init__(self, num_queries: int, k: int):
    self.indices = np.full((num_queries, k), -1, np.int64)
    self.scores = np.full((num_queries, k), -np.inf, np.float32)
    self.excluded = np.zeros((num_queries, len(REASONS)), np.int32)
    self.rank0 = np.zeros((num_queries,), np.int8)

  def result(self, nonfinite_rows: int) -> SearchResult:
    return SearchResult(self.indices, self.scores, self.excluded, self.rank0,
                        nonfinite_gallery_rows=int(nonfinite_rows))


class _Finisher:
  """Host side of each block of queries: bounded fp32 rescoring, exact reasons, ordering, outputs,
  certification.  With a mesh spanning several processes, each process finishes a share of the
  block's queries and the shares are all-gathered."""

  def __init__(self, queries, gallery, rules, exclusion, k, run_k, dtype, dims, names, mesh, out: _Outputs,
               store_unit: float):
    self.queries, self.gallery, self.rules, self.exclusion = queries, gallery, rules, exclusion
    self.store_unit = store_unit
    self.k, self.run_k, self.dtype, self.dims, self.names, self.out = k, run_k, dtype, dims, names, out
    self.uncertified = np.zeros(out.indices.shape[0], bool)
    self.nonfinite_rows = 0
    self.gallery_norms = None  # largest |g|, |bf16(g)|, |g - bf16(g)| of the finite gallery rows
    processes = {d.process_index for d in mesh.devices.flat}
    self.shared = len(processes) > 1
    self.processes = sorted(processes)

  def finish(self, block: list[int], batches: list[tuple[int, Any]]) -> None:
    fetch = lambda x: np.asarray(x.addressable_data(0))  # noqa: E731  (replicated: every process has it)
    q0, q1 = block[0], batches[-1][0]
    kept = [np.concatenate([fetch(s[0][i]) for _, s in batches])[:q1 - q0] for i in range(2)]
    excluded = ([np.concatenate([fetch(s[1][i]) for _, s in batches])[:q1 - q0] for i in range(3)]
                if self.names else None)
    lo, hi = q0, q1
    if self.shared:
      share = -(-(q1 - q0) // len(self.processes))
      position = self.processes.index(jax.process_index())
      lo, hi = q0 + min(position * share, q1 - q0), q0 + min((position + 1) * share, q1 - q0)
    local = slice(lo - q0, hi - q0)
    results = self._finish(lo, hi, [x[local] for x in kept],
                           [x[local] for x in excluded] if excluded is not None else None)
    if self.shared:
      results = self._all_gather(results, q1 - q0, share)
      lo, hi = q0, q1
    indices, scores, excluded_counts, rank0, uncertified = results
    self.out.indices[lo:hi] = indices
    self.out.scores[lo:hi] = scores
    self.out.excluded[lo:hi] = excluded_counts
    self.out.rank0[lo:hi] = rank0
    self.uncertified[lo:hi] = uncertified

  def _all_gather(self, results, total: int, share: int):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    indices, scores, excluded, rank0, uncertified = results
    n = indices.shape[0]
    pad = lambda x, fill: np.concatenate([x, np.full((share - n,) + x.shape[1:], fill, x.dtype)])  # noqa: E731
    packed = np.concatenate([pad(indices.astype(np.int32), -1), pad(excluded.astype(np.int32), 0),
                             pad(rank0.astype(np.int32)[:, None], 0),
                             pad(uncertified.astype(np.int32)[:, None], 0)], axis=1)  # [share, k + 5]
    every = np.asarray(multihost_utils.process_allgather(packed)).reshape(-1, packed.shape[1])[:total]
    every_scores = np.asarray(multihost_utils.process_allgather(pad(scores, -np.inf))).reshape(
        -1, scores.shape[1])[:total]
    k = indices.shape[1]
    return (every[:, :k].astype(np.int64), every_scores, every[:, k:k + 3], every[:, k + 3].astype(np.int8),
            every[:, k + 4].astype(bool))

  def _finish(self, q0: int, q1: int, kept: list[np.ndarray], excluded: list[np.ndarray] | None):
    k, b = self.k, q1 - q0
    query_host = np.asarray(self.queries[q0:q1])  # [b, D]: rescored from this
    if query_host.dtype not in (np.float16, np.float32, np.float64):
      query_host = query_host.astype(np.float32)
    fast = kept[0]
    rows = kept[1].astype(np.int64)  # [b, run_k]
    full = [np.all(kept[1] >= 0, axis=1)]
    minimum = [kept[0][:, -1].astype(np.float64)]
    if excluded is not None:
      fast = np.concatenate([fast, excluded[0]], axis=1)
      rows = np.concatenate([rows, excluded[1].astype(np.int64)], axis=1)  # [b, 2 run_k]
      full.append(np.all(excluded[1] >= 0, axis=1))
      minimum.append(excluded[0][:, -1].astype(np.float64))
    valid = rows >= 0
    safe_rows = np.where(valid, rows, 0)
    bound = _error_bound(self.dtype, self.dims, query_host, self.gallery_norms, self.store_unit)[:, None]  # [b, 1]
    fast = fast.astype(np.float64)
    exact = np.full(rows.shape, np.nan, np.float32)
    query_rows = np.arange(q0, q1)

    def rescore(need):
      need = need & valid & np.isnan(exact)
      if need.any():
        fresh = _rescore(query_host, self.gallery, rows, need)
        exact[need] = fresh[need]

    if excluded is not None:
      # Reasons that do not depend on the score; near duplicates near the similarity threshold need
      # the exact score.
      reason = _host_reasons({n: a for n, a in self.rules.items() if "latlng" not in n}, self.exclusion,
                             query_rows, safe_rows, fast)
      near = np.zeros(rows.shape, bool)
      if "query_latlng" in self.rules:
        km = _haversine_km(self.rules["query_latlng"][query_rows][:, None], self.rules["gallery_latlng"][safe_rows])
        near = valid & (km <= self.exclusion.duplicate_km)
        similarity = self.exclusion.duplicate_similarity
        rescore(near & (np.abs(fast - similarity) <= bound))
    else:
      reason = np.zeros(rows.shape, np.int8)

    def scores_now():
      return np.where(np.isnan(exact), fast, exact)

    def reasons_now():
      r = reason.copy()
      if excluded is not None and "query_latlng" in self.rules:
        r[near & (scores_now() >= self.exclusion.duplicate_similarity) & (reason != SAME_ID)] = NEAR_DUPLICATE
      return np.where(valid, r, 0)

    # Only candidates whose device score is within E of the k-th exact score can reach the top k.
    # The exact scores of the device's top k give a lower bound L of the k-th exact score; a
    # candidate with device score + E < L has k rows above it.  Kept rows, and unfiltered.
    masks = lambda: [valid & (reasons_now() == KEPT)] + ([valid] if excluded is not None else [])  # noqa: E731
    for mask in masks():
      rescore(mask & (fast >= _kth_largest(fast, mask, k)[:, None]))
    for mask in masks():
      lower = _kth_largest(np.where(np.isnan(exact), -np.inf, exact), mask, k)[:, None]
      rescore(mask & (fast + bound >= lower))
    scores = scores_now()
    reasons = reasons_now()
    kept_mask = valid & (reasons == KEPT)

    # Certified when no row outside the lists can reach the top k: every such row's device score is
    # at most the smallest device score of a full list, so its exact one is below that + E.
    threshold = np.full(b, -np.inf)
    for is_full, low in zip(full, minimum):
      threshold = np.where(is_full, np.maximum(threshold, low), threshold)
    threshold = threshold + bound[:, 0]
    certified = _kth_largest(scores, kept_mask, k) > threshold
    if excluded is not None:
      certified &= _kth_largest(scores, valid, k) > threshold
    certified |= np.isneginf(threshold)

    scores32 = np.where(valid, scores, -np.inf).astype(np.float32)
    sort_rows = np.where(valid, rows, np.iinfo(np.int64).max)  # invalid slots last
    # Kept rows first, each group by (-score, row).
    order = _order(scores32, sort_rows, first=~kept_mask)[:, :k]  # [b, <=k]
    width = order.shape[1]
    indices = np.full((b, k), -1, np.int64)
    best = np.full((b, k), -np.inf, np.float32)
    picked_ok = np.take_along_axis(kept_mask, order, axis=1)
    indices[:, :width] = np.where(picked_ok, np.take_along_axis(rows, order, axis=1), -1)
    best[:, :width] = np.where(picked_ok, np.take_along_axis(scores32, order, axis=1), -np.inf)
    excluded_counts = np.zeros((b, len(REASONS)), np.int32)
    rank0 = np.zeros(b, np.int8)
    if excluded is not None:
      unfiltered = _order(scores32, sort_rows, first=~valid)[:, :k]  # [b, <=k]: the unfiltered top-k
      top_reason = np.where(np.take_along_axis(valid, unfiltered, axis=1),
                            np.take_along_axis(reasons, unfiltered, axis=1), 0)  # [b, <=k]
      for code in range(1, len(REASONS) + 1):
        excluded_counts[:, code - 1] = np.sum(top_reason == code, axis=1)
      rank0 = top_reason[:, 0].astype(np.int8)
    return indices, best, excluded_counts, rank0, ~certified
