"""Exact maximum-inner-product top-k search of queries against a large gallery.

`search(queries, gallery, k)` returns, for every query, the k gallery rows with
the largest inner product q . g (best first, ties broken by the lower row).
No normalization is done: callers L2-normalize both sides for cosine similarity.

Design (one pass over the gallery per batch of queries):

* The gallery is never loaded whole.  It is read one chunk of `chunk_rows` rows
  at a time through `gallery[a:b]` (an np.memmap, an np.ndarray or a
  `ConcatRows` over memory-mapped shards), so host memory is bounded by
  chunk_rows, not by the gallery size.  Each chunk is padded to a multiple of
  the number of mesh devices and placed with `jax.make_array_from_callback`,
  its rows sharded over ALL mesh axes: on several processes each host reads
  only the rows its own devices hold.  The query batch is replicated.
* One jitted `jax.shard_map` per chunk: every device computes `q @ gᵀ` for its
  rows in `dtype` (bfloat16 or float32, accumulated in float32), applies the
  exclusion rules, takes a local `lax.top_k` of k + margin, attaches global row
  numbers, all-gathers the candidates over the device axes and takes a second
  top_k; the chunk's candidates are then merged with the running ones (running
  first: `lax.top_k` is stable, so on ties lower rows win).  Padding rows score
  -inf with row -1 and never win.  The chunk and query-batch shapes are fixed
  (the last ones are padded), so the step compiles once per shape and is cached
  across calls (`_chunk_step`).
* Excluded rows (see `Exclusion`) are kept out of the kept list (score -inf
  there) and tracked in a second running top-(k + margin) with their reason
  codes, so that what the filter removed from the unfiltered top-k is reported
  exactly (`SearchResult.excluded_in_top_k`, `rank0_reason`).
* After the last chunk the k + margin candidates of both lists are rescored on
  the host in float32 (the float64 inner product rounded to float32) from the
  original gallery rows, their exclusion reasons are recomputed on the host
  with those scores and float64 great-circle distances, and everything is
  ordered by (-score, row) with np.lexsort.  With dtype "float32" (matmul at
  HIGHEST precision) the result equals brute force exactly, ties broken by the
  lower row.  With "bfloat16" it is exact whenever each query's true top-k lies
  within its bfloat16 top-(k + margin) (kept and excluded lists alike); the
  returned scores are always the float32 ones.

Multi-host: every process calls `search` in step with the same arguments and
gets the same (replicated) numpy results.  `mesh=None` uses a mesh over this
process's local devices only (each process then searches everything by
itself); pass a global mesh (`sharding.create_mesh`) to split the reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
_RESCORE_ELEMENTS = 1 << 22  # gathered gallery values per host rescoring block (float64: 32 MiB)


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


def _gather_rows(gallery, rows: np.ndarray) -> np.ndarray:
  """Gallery rows at the sorted unique `rows` [U] -> [U, D]."""
  if isinstance(gallery, np.ndarray) or not hasattr(gallery, "take"):
    return np.asarray(gallery[rows])  # fancy indexing (np.ndarray.take would flatten)
  return np.asarray(gallery.take(rows))


def _rescore(queries: np.ndarray, gallery, rows: np.ndarray) -> np.ndarray:
  """float32 scores of queries [B, D] against gallery rows [B, C] (-1: none -> -inf), from the
  float64 inner product, in blocks of queries so the gathered rows stay small."""
  scores = np.full(rows.shape, -np.inf, np.float32)  # [B, C]
  block = max(1, _RESCORE_ELEMENTS // max(1, rows.shape[1] * queries.shape[1]))
  for a in range(0, rows.shape[0], block):
    r = rows[a:a + block]  # [b, C]
    valid = r >= 0
    unique, inverse = np.unique(r[valid], return_inverse=True)
    if not unique.size:
      continue
    g = _gather_rows(gallery, unique).astype(np.float64)  # [U, D]
    q = np.asarray(queries[a:a + block], np.float64)  # [b, D]
    query_of = np.broadcast_to(np.arange(r.shape[0])[:, None], r.shape)[valid]  # [V]
    block_scores = np.einsum("vd,vd->v", q[query_of], g[inverse])  # [V]
    scores[a:a + block][valid] = block_scores.astype(np.float32)
  return scores


def _order(scores: np.ndarray, rows: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
  """Per query, argsort by (first ascending, -score, row): [B, C] positions."""
  keys = [rows, -scores.astype(np.float64)]
  if first is not None:
    keys.append(first)
  return np.lexsort(keys, axis=-1)


# ----------------------------------------------------------------------------- device step


def _topk_rows(scores: jax.Array, rows: jax.Array, k: int, *extra: jax.Array):
  """top_k along axis 1 of scores [B, C]; rows (and extra) [B, C] follow; -inf slots get row -1."""
  values, position = lax.top_k(scores, k)  # [B, k]
  picked = [jnp.take_along_axis(x, position, axis=1) for x in (rows, *extra)]
  picked[0] = jnp.where(values == -jnp.inf, -1, picked[0])
  return (values, *picked)


@functools.lru_cache(maxsize=32)
def _chunk_step(mesh: Mesh, run_k: int, dtype: str, rules: tuple[str, ...]):
  """The jitted step: (queries [B, D], chunk [C, D], rows [C], query / gallery rule arrays,
  running lists) -> updated running lists.  One compile per (B, C, D) shape."""
  axes = tuple(mesh.axis_names)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()
  compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  precision = lax.Precision.HIGHEST if dtype == "float32" else lax.Precision.DEFAULT
  excluding = bool(rules)

  def body(q, g, rows, qx, gx, dup, kept, excluded):
    s = lax.dot_general(q.astype(compute), g.astype(compute), (((1,), (1,)), ((), ())),
                        precision=precision, preferred_element_type=jnp.float32)  # [B, c] local rows
    valid = (rows >= 0)[None, :]  # [1, c]
    rows_b = jnp.broadcast_to(rows[None, :], s.shape)  # [B, c] global row numbers
    local_k = min(run_k, s.shape[1])
    if excluding:
      reason = jnp.zeros(s.shape, jnp.int32)  # [B, c]
      if "groups" in rules:
        same = (qx["groups"][:, None, 0] == gx["groups"][None, :, 0]) & (
            qx["groups"][:, None, 1] == gx["groups"][None, :, 1])
        reason = jnp.where(same & qx["group_valid"][:, None] & gx["group_valid"][None, :], SAME_GROUP, reason)
      if "latlng" in rules:
        chord2 = sum((qx["xyz"][:, None, i] - gx["xyz"][None, :, i]) ** 2 for i in range(3))  # [B, c]
        near = (chord2 <= dup[0]) & (s >= dup[1])
        reason = jnp.where(near, NEAR_DUPLICATE, reason)
      if "ids" in rules:
        same = (qx["ids"][:, None, 0] == gx["ids"][None, :, 0]) & (qx["ids"][:, None, 1] == gx["ids"][None, :, 1])
        reason = jnp.where(same, SAME_ID, reason)
      kept_scores = jnp.where(valid & (reason == KEPT), s, -jnp.inf)
      excluded_scores = jnp.where(valid & (reason != KEPT), s, -jnp.inf)
    else:
      kept_scores = jnp.where(valid, s, -jnp.inf)

    def chunk_candidates(scores, *extra):
      local = _topk_rows(scores, rows_b, local_k, *extra)  # [B, local_k] each
      gathered = [lax.all_gather(x, axes, axis=1, tiled=True) for x in local]  # [B, devices * local_k]
      return _topk_rows(gathered[0], gathered[1], min(run_k, gathered[0].shape[1]), *gathered[2:])

    def merge(running, candidates):
      # Running first: on ties the earlier (lower) rows stay ahead.
      joined = [jnp.concatenate([a, b], axis=1) for a, b in zip(running, candidates)]
      return _topk_rows(joined[0], joined[1], run_k, *joined[2:])

    kept = merge(kept, chunk_candidates(kept_scores))
    if excluding:
      excluded = merge(excluded, chunk_candidates(excluded_scores, reason))
    return kept, excluded

  qx_spec = {"ids": rep, "groups": rep, "group_valid": rep, "xyz": rep}
  gx_spec = {"ids": rows_spec, "groups": rows_spec, "group_valid": rows_spec, "xyz": rows_spec}
  mapped = jax.shard_map(body, mesh=mesh,
                         in_specs=(rep, rows_spec, rows_spec, qx_spec, gx_spec, rep, rep, rep),
                         out_specs=(rep, rep),
                         # all_gather's output is the same on every device, but the varying-axes check
                         # cannot infer that (lax has no invariant all_gather): checked by the tests.
                         check_vma=False)

  def step(q, g, rows, qx, gx, dup, kept, excluded):
    return mapped(q, g, rows, {k: qx.get(k) for k in qx_spec}, {k: gx.get(k) for k in gx_spec},
                  dup, kept, excluded)

  return jax.jit(step)


def _put(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...], read) -> jax.Array:
  """A global array from `read(lo, hi)` -> rows [lo, hi) of it (numpy); each process reads only
  the rows of its own devices."""
  def callback(index):
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


# ----------------------------------------------------------------------------- search


def search(queries, gallery, k: int, *, mesh: Mesh | None = None, chunk_rows: int = 65536,
           query_batch: int = 1024, dtype: str = "bfloat16", margin: int = 16,
           exclusion: Exclusion | None = None, progress: bool = False) -> SearchResult:
  """Top-k gallery rows by inner product for every query (exact; see the module docstring).

  Args:
    queries: [Q, D] float16 / float32 array-like (np.ndarray, np.memmap).
    gallery: [G, D]: anything with `.shape` and `gallery[a:b]` -> np array (np.memmap,
      np.ndarray, ConcatRows); read chunk by chunk, never whole.
    k: neighbours per query; k > G is allowed (the extra slots are -1 / -inf).
    mesh: devices to shard each chunk's rows over (all its axes); None: every local device.
    chunk_rows: gallery rows read and searched at a time.
    query_batch: queries searched at a time.
    dtype: "bfloat16" or "float32": the device matmul's input type (accumulation is float32).
    margin: extra candidates kept per query for the float32 rescoring.
    exclusion: rows each query may not retrieve (Exclusion), or None.
    progress: a tqdm bar over query batches x chunks.
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
  if not isinstance(margin, (int, np.integer)) or margin < 0:
    raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
  if query_batch < 1:
    raise ValueError(f"query_batch must be >= 1, got {query_batch}")
  rules = _check_exclusion(exclusion, num_queries, num_rows)
  k, run_k = int(k), int(k) + int(margin)
  if num_queries == 0:
    return SearchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                        np.zeros((0, len(REASONS)), np.int32), np.zeros((0,), np.int8))

  if mesh is None:
    mesh = sharding.create_mesh({sharding.MESH_AXES[0]: -1}, jax.local_devices())
  axes = tuple(mesh.axis_names)
  devices = math.prod(mesh.shape[a] for a in axes)
  rows_spec, rep = PartitionSpec(axes), PartitionSpec()
  chunk_real = min(chunk_rows, num_rows)  # gallery rows per chunk (the stride)
  chunk = -(-chunk_real // devices) * devices  # [C] padded to a multiple of the devices
  num_chunks = -(-num_rows // chunk_real)
  batch = min(query_batch, num_queries)

  names = tuple(sorted(r for r in ("ids", "groups", "latlng") if f"query_{r}" in rules))
  step = _chunk_step(mesh, run_k, dtype, names)
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

  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=-(-num_queries // batch) * num_chunks, desc="search", unit="chunk")

  out_indices = np.full((num_queries, k), -1, np.int64)
  out_scores = np.full((num_queries, k), -np.inf, np.float32)
  out_excluded = np.zeros((num_queries, len(REASONS)), np.int32)
  out_rank0 = np.zeros((num_queries,), np.int8)
  empty_run = (np.full((batch, run_k), -np.inf, np.float32), np.full((batch, run_k), -1, np.int32))

  def chunk_arrays(c: int):
    start = c * chunk_real
    stop = min(start + chunk_real, num_rows)
    g = _put(mesh, rows_spec, (chunk, dims), _padded_reader(gallery, start, stop, host_dtype))
    row_numbers = np.arange(start, stop, dtype=np.int32)
    rows = _put(mesh, rows_spec, (chunk,), _padded_reader(row_numbers, 0, stop - start, np.int32, fill=-1))
    gx = {name: _put(mesh, PartitionSpec(axes, *([None] * (a.ndim - 1))), (chunk,) + a.shape[1:],
                     _padded_reader(a, start, stop, a.dtype)) for name, a in gallery_rules.items()}
    return g, rows, gx

  # Chunks outside, query batches inside: the gallery is read and sent to the devices once per
  # call (it is the big side), while every query batch's running top-k stays on the devices.
  starts = list(range(0, num_queries, batch))
  placed, states = [], []
  for q0 in starts:
    q1 = min(q0 + batch, num_queries)
    q = _put(mesh, rep, (batch, dims), _padded_reader(queries, q0, q1, query_dtype))
    qx = {name: _put(mesh, rep, (batch,) + a.shape[1:],
                     _padded_reader(a, q0, q1, a.dtype)) for name, a in query_rules.items()}
    kept = tuple(_put(mesh, rep, x.shape, functools.partial(lambda x, lo, hi: x[lo:hi], x)) for x in empty_run)
    excluded = kept + (_put(mesh, rep, (batch, run_k), lambda lo, hi: np.zeros((hi - lo, run_k), np.int32)),)
    placed.append((q, qx))
    states.append((kept, excluded))
  for c in range(num_chunks):
    g, rows, gx = chunk_arrays(c)
    for i, (q, qx) in enumerate(placed):
      states[i] = step(q, g, rows, qx, gx, dup, *states[i])
      if bar is not None:
        bar.update(1)
  for q0, (kept, excluded) in zip(starts, states):
    q1 = min(q0 + batch, num_queries)
    query_host = np.asarray(queries[q0:q1])  # [b, D]: rescored from this
    _finish(query_host, q0, gallery, rules, exclusion, k,
            [np.asarray(x.addressable_data(0))[:q1 - q0] for x in kept],
            [np.asarray(x.addressable_data(0))[:q1 - q0] for x in excluded] if names else None,
            out_indices, out_scores, out_excluded, out_rank0)
  if bar is not None:
    bar.close()
  return SearchResult(out_indices, out_scores, out_excluded, out_rank0)



def _finish(query_host: np.ndarray, q0: int, gallery, rules: dict[str, np.ndarray], exclusion: Exclusion | None,
            k: int, kept: list[np.ndarray], excluded: list[np.ndarray] | None, out_indices: np.ndarray,
            out_scores: np.ndarray, out_excluded: np.ndarray, out_rank0: np.ndarray) -> None:
  """Host side of one query batch: fp32 rescoring, exact reasons, ordering, outputs [q0, q0 + b)."""
  rows = kept[1].astype(np.int64)  # [b, run_k]
  if excluded is not None:
    rows = np.concatenate([rows, excluded[1].astype(np.int64)], axis=1)  # [b, 2 run_k]
  b = rows.shape[0]
  scores = _rescore(query_host, gallery, rows)  # [b, C]
  valid = rows >= 0
  if excluded is not None:
    reason = _host_reasons(rules, exclusion, np.arange(q0, q0 + b), np.where(valid, rows, 0), scores)
    reason[~valid] = 0
  else:
    reason = np.zeros(rows.shape, np.int8)
  sort_rows = np.where(valid, rows, np.iinfo(np.int64).max)  # invalid slots last
  # Kept rows first, each group by (-score, row).
  order = _order(scores, sort_rows, first=(reason != KEPT) | ~valid)[:, :k]  # [b, <=k]
  picked_rows = np.take_along_axis(rows, order, axis=1)
  picked_ok = np.take_along_axis(valid & (reason == KEPT), order, axis=1)
  width = order.shape[1]
  out_indices[q0:q0 + b, :width] = np.where(picked_ok, picked_rows, -1)
  out_scores[q0:q0 + b, :width] = np.where(picked_ok, np.take_along_axis(scores, order, axis=1), -np.inf)
  if excluded is not None:
    unfiltered = _order(scores, sort_rows, first=~valid)[:, :k]  # [b, <=k]: the unfiltered top-k
    top_reason = np.where(np.take_along_axis(valid, unfiltered, axis=1),
                          np.take_along_axis(reason, unfiltered, axis=1), 0)  # [b, <=k]
    for code in range(1, len(REASONS) + 1):
      out_excluded[q0:q0 + b, code - 1] = np.sum(top_reason == code, axis=1)
    out_rank0[q0:q0 + b] = top_reason[:, 0]
