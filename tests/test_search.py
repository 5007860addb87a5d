"""Exact top-k search (geotoken_jax.retrieval.search) against brute force and faiss."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import faiss
import jax
import numpy as np
import pytest

from geotoken_jax import sharding
from geotoken_jax.retrieval import ConcatRows, Exclusion, search

search_module = sys.modules["geotoken_jax.retrieval.search"]  # the package's `search` is the function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normalized(rng, n, d):
  x = rng.standard_normal((n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _haversine_km(a, b):
  a, b = np.radians(a), np.radians(b)
  h = (np.sin((b[..., 0] - a[..., 0]) / 2) ** 2
       + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin((b[..., 1] - a[..., 1]) / 2) ** 2)
  return 2 * 6371.0088 * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


def brute_force(queries, gallery, k, exclusion=None):
  """Float64 products rounded to float32, stable order (-score, row): (indices, scores, excluded, rank0)."""
  scores = (np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T).astype(np.float32)  # [Q, G]
  q, g = scores.shape
  reason = np.zeros((q, g), np.int8)
  if exclusion is not None:
    if exclusion.query_groups is not None:
      qg = exclusion.query_groups[:, None]
      reason[(qg != -1) & (qg == exclusion.gallery_groups[None, :])] = 3
    if exclusion.query_latlng is not None:
      km = _haversine_km(exclusion.query_latlng[:, None].astype(np.float64),
                         exclusion.gallery_latlng[None].astype(np.float64))
      reason[(km <= exclusion.duplicate_km) & (scores >= exclusion.duplicate_similarity)] = 2
    if exclusion.query_ids is not None:
      reason[exclusion.query_ids[:, None] == exclusion.gallery_ids[None, :]] = 1
  rows = np.broadcast_to(np.arange(g), (q, g))
  kept = np.lexsort((rows, -scores.astype(np.float64), reason > 0), axis=-1)[:, :k]
  ok = np.take_along_axis(reason, kept, 1) == 0
  indices = np.full((q, k), -1, np.int64)
  best = np.full((q, k), -np.inf, np.float32)
  indices[:, :kept.shape[1]] = np.where(ok, kept, -1)
  best[:, :kept.shape[1]] = np.where(ok, np.take_along_axis(scores, kept, 1), -np.inf)
  unfiltered = np.lexsort((rows, -scores.astype(np.float64)), axis=-1)[:, :k]
  top_reason = np.take_along_axis(reason, unfiltered, 1)
  excluded = np.stack([np.sum(top_reason == c, axis=1) for c in (1, 2, 3)], axis=1)
  return indices, best, excluded, top_reason[:, 0]


def _assert_matches(result, expected, k):
  indices, scores, excluded, rank0 = expected
  assert result.indices.shape == (len(indices), k) and result.indices.dtype == np.int64
  assert result.scores.dtype == np.float32
  np.testing.assert_array_equal(result.indices, indices)
  np.testing.assert_array_equal(np.isinf(result.scores), np.isinf(scores))
  np.testing.assert_allclose(result.scores, scores, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(result.excluded_in_top_k, excluded)
  np.testing.assert_array_equal(result.rank0_reason, rank0)


@pytest.mark.parametrize("q, g, d, k, chunk_rows, query_batch, margin, mesh_shape", [
    (37, 1000, 16, 5, 300, 16, 2, None),      # G not a multiple of chunk_rows, last query batch padded
    (10, 50, 8, 20, 7, 10, 16, None),         # k > chunk_rows (and k + margin > chunk_rows)
    (5, 12, 4, 20, 5, 3, 0, None),            # k > G: slots past G are -1 / -inf; no margin
    (9, 64, 8, 3, 64, 4, 4, {"data": 4, "fsdp": 2}),  # rows sharded over both mesh axes
])
def test_float32_equals_brute_force(q, g, d, k, chunk_rows, query_batch, margin, mesh_shape):
  rng = np.random.default_rng(q * 1000 + g)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  gallery = rng.standard_normal((g, d)).astype(np.float32)
  mesh = sharding.create_mesh(mesh_shape) if mesh_shape else None
  result = search(queries, gallery, k, mesh=mesh, chunk_rows=chunk_rows, query_batch=query_batch,
                  dtype="float32", margin=margin)
  _assert_matches(result, brute_force(queries, gallery, k), k)
  if k > g:
    assert (result.indices[:, g:] == -1).all() and (result.indices[:, :g] >= 0).all()
    assert result.stats()["queries_with_fewer_than_k"] == q


def test_equals_faiss_flat_ip():
  rng = np.random.default_rng(1)
  queries, gallery = _normalized(rng, 50, 32), _normalized(rng, 2000, 32)
  index = faiss.IndexFlatIP(32)
  index.add(gallery)
  faiss_scores, faiss_indices = index.search(queries, 10)
  result = search(queries, gallery, 10, chunk_rows=512, query_batch=32, dtype="float32")
  np.testing.assert_allclose(result.scores, faiss_scores, atol=1e-5)
  # Identical wherever faiss's score is apart from its neighbours' (no near-tie to order differently).
  gaps = np.diff(faiss_scores, axis=1)
  untied = np.ones_like(faiss_scores, bool)
  untied[:, 1:] &= -gaps > 1e-5
  untied[:, :-1] &= -gaps > 1e-5
  assert untied.mean() > 0.9
  np.testing.assert_array_equal(result.indices[untied], faiss_indices[untied])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ties_put_lower_rows_first(dtype):
  """Identical gallery rows (across chunks and devices) come back in row order, as in the stable brute force."""
  rng = np.random.default_rng(2)
  base = _normalized(rng, 4, 16)
  gallery = base[rng.integers(0, 4, 90)]  # ~22 copies of each row, spread over all chunks
  queries = np.concatenate([base, _normalized(rng, 3, 16)])
  result = search(queries, gallery, 12, chunk_rows=17, query_batch=8, dtype=dtype, margin=3)
  expected = brute_force(queries, gallery, 12)
  _assert_matches(result, expected, 12)
  assert (np.diff(result.indices[:4], axis=1) > 0).all()  # each query's copies, in increasing rows


def test_bfloat16_with_margin_has_full_recall_and_float32_scores():
  rng = np.random.default_rng(3)
  queries, gallery = _normalized(rng, 64, 64), _normalized(rng, 3000, 64)
  result = search(queries, gallery, 10, chunk_rows=1000, query_batch=64, dtype="bfloat16", margin=16)
  indices, scores, _, _ = brute_force(queries, gallery, 10)
  np.testing.assert_array_equal(result.indices, indices)  # recall 1.0, same order
  np.testing.assert_allclose(result.scores, scores, rtol=0, atol=2e-7)  # rescored: not bfloat16 products


def _planted_gallery(seed=4):
  """Queries that are gallery rows, with planted same-id / near-duplicate / same-group rows."""
  rng = np.random.default_rng(seed)
  base_rows, q, d = 400, 24, 32
  gallery = [_normalized(rng, base_rows, d)]
  ids = [rng.integers(-2**62, 2**62, base_rows)]
  groups = [np.where(rng.random(base_rows) < 0.5, -1, rng.integers(0, 40, base_rows))]
  latlng = [np.stack([rng.uniform(-80, 80, base_rows), rng.uniform(-180, 180, base_rows)], 1)]
  query_rows = rng.choice(base_rows, q, replace=False)
  qv, qid, qgroup, qll = gallery[0][query_rows], ids[0][query_rows], groups[0][query_rows], latlng[0][query_rows]
  qgroup = qgroup.copy()
  qgroup[:4] = -1  # a query without a group matches nothing (even other -1 rows)

  def plant(vectors, new_ids, new_groups, new_latlng):
    vectors = vectors + 0.0
    gallery.append((vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32))
    ids.append(new_ids), groups.append(new_groups), latlng.append(new_latlng)

  noise = lambda scale: scale * rng.standard_normal((q, d))  # noqa: E731
  fresh_ids = lambda: rng.integers(-2**62, 2**62, q)  # noqa: E731
  no_group = np.full(q, -1)
  plant(qv + noise(0.01), qid, no_group, qll + 40)                 # re-upload: same id, elsewhere
  plant(qv + noise(0.01), fresh_ids(), no_group, qll + 1e-4)       # near duplicate: ~10 m away, score ~1
  plant(qv + noise(0.01), fresh_ids(), qgroup, qll + 30)           # same group (author), far away
  plant(qv + noise(0.15), fresh_ids(), no_group, qll + 1e-4)       # same place, score ~0.8 < 0.9: kept
  plant(qv + noise(0.01), fresh_ids(), no_group, qll + 20)         # similar, far away: kept
  plant(qv + noise(0.01), qid ^ (1 << 40), no_group, qll + 35)     # id differs in the high half: kept
  plant(qv + noise(0.01), qid ^ 1, no_group, qll + 36)             # id differs in the low half: kept
  exclusion = Exclusion(query_ids=qid, gallery_ids=np.concatenate(ids), query_groups=qgroup,
                        gallery_groups=np.concatenate(groups), query_latlng=qll.astype(np.float32),
                        gallery_latlng=np.concatenate(latlng).astype(np.float32), duplicate_km=1.0,
                        duplicate_similarity=0.9)
  return qv, np.concatenate(gallery), exclusion, query_rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exclusion_matches_brute_force(dtype):
  queries, gallery, exclusion, query_rows = _planted_gallery()
  k = 8
  result = search(queries, gallery, k, chunk_rows=150, query_batch=16, dtype=dtype, exclusion=exclusion)
  expected = brute_force(queries, gallery, k, exclusion)
  _assert_matches(result, expected, k)
  q, base = len(queries), len(gallery) - 7 * len(queries)
  returned = set(map(tuple, np.stack([np.repeat(np.arange(q), k), result.indices.ravel()], 1).tolist()))
  for i in range(q):
    assert (i, query_rows[i]) not in returned  # the query itself
    for block in (0, 1, 2):  # the planted re-upload, near duplicate, same-group row
      assert (i, base + block * q + i) not in returned or (block == 2 and exclusion.query_groups[i] == -1)
    for block in (3, 4, 5, 6):  # less similar at the same place, similar elsewhere, near-equal ids
      assert (i, base + block * q + i) in returned
  np.testing.assert_array_equal(result.rank0_reason, 1)  # rank 0 unfiltered: the query itself (score 1)
  assert (result.excluded_in_top_k[:, 0] == 2).all() and (result.excluded_in_top_k[:, 1] == 1).all()
  np.testing.assert_array_equal(result.excluded_in_top_k[:, 2], exclusion.query_groups != -1)
  stats = result.stats()
  assert stats["rank0_excluded_fraction"] == {"same_id": 1.0, "near_duplicate": 0.0, "same_group": 0.0}
  assert stats["excluded_in_top_k"]["same_id"] == 2 * q and stats["queries_with_fewer_than_k"] == 0


def test_exclusion_reasons_with_fewer_rows_than_k():
  """Every row excluded for some queries: kept slots -1, reasons counted over the whole (short) list."""
  rng = np.random.default_rng(5)
  queries, gallery = _normalized(rng, 6, 8), _normalized(rng, 9, 8)
  exclusion = Exclusion(query_groups=np.array([7, 7, -1, 3, 3, 8]), gallery_groups=np.array([7] * 5 + [3] * 4))
  result = search(queries, gallery, 12, chunk_rows=4, dtype="float32", exclusion=exclusion)
  _assert_matches(result, brute_force(queries, gallery, 12, exclusion), 12)
  assert (result.indices[:2] == -1).sum() == 2 * (12 - 4)


def test_device_side_exclusion_without_margin():
  """Most of the best rows are excluded and margin is 0: the device lists alone must hold the answer."""
  rng = np.random.default_rng(9)
  queries, gallery = _normalized(rng, 5, 8), _normalized(rng, 200, 8)
  gallery_ids = (np.arange(200) << 32) | 5  # equal low halves: ids must be compared in full
  exclusion = Exclusion(query_ids=gallery_ids[[3, 50, 7, 199, 0]], gallery_ids=gallery_ids,
                        query_groups=np.array([0, 1, 0, -1, 1]), gallery_groups=np.arange(200) % 3 - 1,
                        query_latlng=np.zeros((5, 2), np.float32),
                        gallery_latlng=np.stack([np.linspace(-60, 60, 200), np.zeros(200)], 1).astype(np.float32),
                        duplicate_km=3000.0, duplicate_similarity=0.5)
  result = search(queries, gallery, 5, chunk_rows=16, query_batch=4, dtype="float32", margin=0,
                  exclusion=exclusion)
  expected = brute_force(queries, gallery, 5, exclusion)
  assert (expected[2].sum(axis=1) >= 1).all() and expected[2].sum() >= 10  # rows removed from every top-5
  _assert_matches(result, expected, 5)


EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from geotoken_jax.retrieval import Exclusion, search
    assert jax.device_count() == 8, jax.devices()
    data = np.load(sys.argv[1], allow_pickle=True).item()
    exclusion = Exclusion(**data["exclusion"])
    out = {}
    for dtype in ("float32", "bfloat16"):
      r = search(data["queries"], data["gallery"], 7, chunk_rows=101, query_batch=10, dtype=dtype,
                 exclusion=exclusion)
      out[dtype] = [r.indices, r.scores, r.excluded_in_top_k, r.rank0_reason]
    np.save(sys.argv[2], out, allow_pickle=True)
""")


def test_eight_devices_equal_one(tmp_path):
  queries, gallery, exclusion, _ = _planted_gallery(seed=6)
  fields = ("query_ids", "gallery_ids", "query_groups", "gallery_groups", "query_latlng", "gallery_latlng",
            "duplicate_km", "duplicate_similarity")
  np.save(tmp_path / "in.npy", {"queries": queries, "gallery": gallery,
                                "exclusion": {f: getattr(exclusion, f) for f in fields}}, allow_pickle=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  eight = np.load(tmp_path / "out.npy", allow_pickle=True).item()
  one_device = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  for dtype in ("float32", "bfloat16"):
    r = search(queries, gallery, 7, mesh=one_device, chunk_rows=101, query_batch=10, dtype=dtype,
               exclusion=exclusion)
    for a, b in zip([r.indices, r.scores, r.excluded_in_top_k, r.rank0_reason], eight[dtype]):
      np.testing.assert_array_equal(a, b)


TWO_PROCESSES = textwrap.dedent("""
    import argparse
    import numpy as np
    import jax
    from geotoken_jax import distributed, sharding
    from geotoken_jax.retrieval import Exclusion, search
    parser = argparse.ArgumentParser()
    for flag in ("coordinator_address", "num_processes", "process_id", "data"):
      parser.add_argument("--" + flag)
    args = parser.parse_args()
    distributed.initialize(args.coordinator_address, int(args.num_processes), int(args.process_id))
    data = np.load(args.data, allow_pickle=True).item()

    class Recording:
      def __init__(self, x):
        self.x, self.shape, self.read = x, x.shape, np.zeros(len(x), int)
      def __getitem__(self, key):
        a, b, _ = key.indices(self.shape[0])
        self.read[a:b] += 1
        return self.x[key]
      def take(self, rows):
        return self.x[rows]

    gallery = Recording(data["gallery"])
    exclusion = Exclusion(query_groups=data["query_groups"], gallery_groups=data["gallery_groups"])
    r = search(data["queries"], gallery, 7, mesh=sharding.create_mesh({"data": -1}), chunk_rows=64,
               query_batch=16, dtype="float32", exclusion=exclusion)
    np.save(args.data + f".{jax.process_index()}.npy", {"indices": r.indices, "scores": r.scores,
            "excluded": r.excluded_in_top_k, "rank0": r.rank0_reason, "read": gallery.read}, allow_pickle=True)
""")


def test_two_processes_each_read_their_rows_and_agree(tmp_path):
  """2 localhost processes x 2 devices, one global mesh: each reads about half the gallery rows, both
  return the brute-force result."""
  rng = np.random.default_rng(10)
  data = {"queries": rng.standard_normal((30, 16)).astype(np.float32),
          "gallery": rng.standard_normal((500, 16)).astype(np.float32),
          "query_groups": np.arange(30) % 5, "gallery_groups": np.arange(500) % 7 - 1}
  np.save(tmp_path / "data.npy", data, allow_pickle=True)
  (tmp_path / "run.py").write_text(TWO_PROCESSES)
  env = dict(os.environ, JAX_PLATFORMS="cpu", LOGDIR=str(tmp_path), XLA_FLAGS="",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--", sys.executable,
                         str(tmp_path / "run.py"), "--data", str(tmp_path / "data.npy")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  exclusion = Exclusion(query_groups=data["query_groups"], gallery_groups=data["gallery_groups"])
  indices, scores, excluded, rank0 = brute_force(data["queries"], data["gallery"], 7, exclusion)
  reads = []
  for process in (0, 1):
    out = np.load(tmp_path / f"data.npy.{process}.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(out["indices"], indices)
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-6)
    np.testing.assert_array_equal(out["excluded"], excluded)
    np.testing.assert_array_equal(out["rank0"], rank0)
    reads.append(out["read"])
  # The gallery is read once (chunks outside, 2 query batches inside); per chunk of 64 rows
  # (16 per device) each process reads its own 32.
  np.testing.assert_array_equal(reads[0] + reads[1], 1)
  assert 0.4 < (reads[0] > 0).mean() < 0.6


def test_concat_rows_slices_and_takes_across_shards():
  rng = np.random.default_rng(7)
  shards = [rng.standard_normal((n, 3)).astype(np.float32) for n in (3, 0, 5, 1, 4)]
  whole = np.concatenate(shards)
  rows = ConcatRows(shards)
  assert rows.shape == (13, 3) and len(rows) == 13 and rows.dtype == np.float32 and rows.ndim == 2
  for a in range(-2, 15):
    for b in range(a, 16):
      np.testing.assert_array_equal(rows[a:b], whole[a:b])
  np.testing.assert_array_equal(rows[::3], whole[::3])
  np.testing.assert_array_equal(rows[10:2:-2], whole[10:2:-2])
  np.testing.assert_array_equal(rows[5], whole[5])
  np.testing.assert_array_equal(rows[4:9, 1], whole[4:9, 1])
  index = np.array([[12, 0, 3], [8, 8, -1]])  # unsorted, repeated, negative; every shard border
  np.testing.assert_array_equal(rows.take(index), whole[index])
  np.testing.assert_array_equal(rows[np.array([2, 3, 7, 8, 9])], whole[[2, 3, 7, 8, 9]])
  with pytest.raises(IndexError):
    rows.take([13])
  with pytest.raises(ValueError, match="same width"):
    ConcatRows([np.zeros((2, 3)), np.zeros((2, 4))])
  queries = rng.standard_normal((4, 3)).astype(np.float32)
  result = search(queries, rows, 5, chunk_rows=4, dtype="float32")
  _assert_matches(result, brute_force(queries, whole, 5), 5)


def test_float16_memmaps_and_no_queries(tmp_path):
  rng = np.random.default_rng(11)
  gallery = np.lib.format.open_memmap(tmp_path / "g.npy", "w+", np.float16, (300, 24))
  gallery[:] = rng.standard_normal((300, 24))
  queries = np.lib.format.open_memmap(tmp_path / "q.npy", "w+", np.float16, (13, 24))
  queries[:] = rng.standard_normal((13, 24))
  gallery = np.load(tmp_path / "g.npy", mmap_mode="r")
  result = search(np.load(tmp_path / "q.npy", mmap_mode="r"), gallery, 6, chunk_rows=128, dtype="float32")
  _assert_matches(result, brute_force(queries, gallery, 6), 6)
  empty = search(np.zeros((0, 24), np.float32), gallery, 6, dtype="float32")
  assert empty.indices.shape == (0, 6) and empty.stats()["queries"] == 0


class _RecordingGallery:
  """A gallery that records the row slices read from it (and allows only slices and take)."""

  def __init__(self, array):
    self.array, self.shape, self.dtype, self.slices = array, array.shape, array.dtype, []

  def __getitem__(self, key):
    assert isinstance(key, slice) and key.step in (None, 1), key
    start, stop, _ = key.indices(self.shape[0])
    self.slices.append((start, stop))
    return self.array[key]

  def take(self, indices):
    return self.array[indices]


def test_reads_the_gallery_in_chunks_and_compiles_once():
  rng = np.random.default_rng(8)
  queries, array = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((250, 8)).astype(np.float32)
  gallery = _RecordingGallery(array)
  search_module._chunk_step.cache_clear()
  result = search(queries, gallery, 4, chunk_rows=60, query_batch=8, dtype="float32", margin=1,
                  progress=True)
  _assert_matches(result, brute_force(queries, array, 4), 4)
  sizes = [b - a for a, b in gallery.slices]
  assert 0 < max(sizes) <= 60
  # Every row read once for all 3 query batches (chunks outside, query batches inside).
  counts = np.zeros(250, int)
  for a, b in gallery.slices:
    counts[a:b] += 1
  np.testing.assert_array_equal(counts, 1)
  # One step function, compiled once for 5 chunks x 3 query batches (the last of each padded).
  assert search_module._chunk_step.cache_info().currsize == 1
  (step,) = [search_module._chunk_step(*key) for key in _cached_keys()]
  assert step._cache_size() == 1


def _cached_keys():
  # lru_cache hides its keys; the one entry is recovered by calling with the arguments search used.
  mesh = sharding.create_mesh({"data": -1}, jax.local_devices())
  hits = search_module._chunk_step.cache_info().hits
  key = (mesh, 5, "float32", ())
  search_module._chunk_step(*key)
  assert search_module._chunk_step.cache_info().hits == hits + 1
  return [key]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(margin=-1), "margin must be"),
    (dict(chunk_rows=0), "chunk_rows must be"),
    (dict(gallery=np.zeros((5, 3), np.float32)), "dims"),
    (dict(gallery=np.zeros((0, 4), np.float32)), "empty"),
    (dict(exclusion=Exclusion(query_ids=np.arange(3))), "gallery_ids"),
    (dict(exclusion=Exclusion(query_ids=np.arange(2), gallery_ids=np.arange(5))), "query_ids must have shape"),
    (dict(exclusion=Exclusion(query_latlng=np.zeros((3, 2)), gallery_latlng=np.zeros((5, 3)))),
     "gallery_latlng must have shape"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(queries=np.zeros((3, 4), np.float32), gallery=np.zeros((5, 4), np.float32), k=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    search(args.pop("queries"), args.pop("gallery"), **args)


# ----------------------------------------------------------------------------- block-max selection


def _stable_top(values, count):
  """numpy oracle of a stable top-k along axis 1: (values, positions), ties to the lower position."""
  order = np.argsort(-values, axis=1, kind="stable")[:, :count]
  return np.take_along_axis(values, order, axis=1), order


@pytest.mark.parametrize("batch, cols, count, levels", [
    (6, 4096, 64, -8),     # a few large distinct scores over ties at 8 levels (blocks of unequal maxima)
    (7, 4096, 16, 3),      # heavy ties: 3 distinct values
    (5, 4096, 16, 50),
    (4, 2048, 5, 2),       # count not a power of two
    (6, 1536, 32, 1000),   # cols not a power of two: the block width is the largest dividing one
    (3, 1000, 2000, 4),    # count > cols: everything, in order
])
def test_select_top_equals_a_stable_top_k_with_ties(batch, cols, count, levels):
  rng = np.random.default_rng(cols + count)
  scores = rng.integers(0, abs(levels), (batch, cols)).astype(np.float32)
  if levels < 0:
    scores += (rng.random((batch, cols)) < 0.01) * rng.integers(8, 1000, (batch, cols))
  scores[rng.random((batch, cols)) < 0.2] = -np.inf
  scores[0] = -np.inf  # a query with nothing valid
  if cols >= 16 * min(count, cols):
    assert search_module._block_width(cols, min(count, cols)) > 1  # the block path is the one tested
  values, positions = jax.jit(lambda s: search_module._select_top(s, count))(scores)
  expected_values, expected_positions = _stable_top(scores, min(count, cols))
  np.testing.assert_array_equal(np.asarray(values), expected_values)
  np.testing.assert_array_equal(np.asarray(positions), expected_positions)


def test_select_top_breaks_ties_by_position_across_blocks():
  """Tied scores in blocks of different maxima: the lower position first, whatever its block's max."""
  scores = np.zeros((2, 4096), np.float32)
  scores[:, 16 * 10] = 9  # block 10: the best score...
  scores[:, 16 * 10 + 5] = 5  # ...and a 5
  scores[:, 16 * 3] = 7  # block 3: the second best, and a 5 at a lower position than block 10's
  scores[:, 16 * 3 + 9] = 5
  scores[1, 16 * 200 + 1] = 5  # and one in a block with nothing better
  values, positions = jax.jit(lambda s: search_module._select_top(s, 5))(scores)
  expected_values, expected_positions = _stable_top(scores, 5)
  np.testing.assert_array_equal(np.asarray(values), expected_values)
  np.testing.assert_array_equal(np.asarray(positions), expected_positions)
  assert expected_positions[0, 2] == 16 * 3 + 9 and expected_positions[0, 3] == 16 * 10 + 5


def test_select_top_applies_the_mask_in_both_passes():
  """A masked copy never materialized: the mask and a per-column array must reach the block
  maxima and the chosen blocks alike (here a -inf bias on every third column)."""
  rng = np.random.default_rng(12)
  scores = rng.integers(0, 4, (9, 2048)).astype(np.float32)
  bias = np.where(np.arange(2048) % 3 == 0, -np.inf, 0.0).astype(np.float32)
  masked = lambda s, cols: s + cols[0]  # noqa: E731
  values, positions = jax.jit(lambda s, b: search_module._select_top(s, 24, masked, [b]))(scores, bias)
  expected_values, expected_positions = _stable_top(scores + bias, 24)
  np.testing.assert_array_equal(np.asarray(values), expected_values)
  np.testing.assert_array_equal(np.asarray(positions), expected_positions)
  assert (np.asarray(positions) % 3 != 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_selection_in_search_with_duplicated_rows(dtype):
  """Chunks wide enough for the block pre-selection, on one device: many exact ties across blocks,
  chunks and the padding, against the brute force."""
  rng = np.random.default_rng(13)
  base = _normalized(rng, 40, 16)
  gallery = base[rng.integers(0, 40, 3000)]  # ~75 copies of each row
  queries = np.concatenate([base[:6], _normalized(rng, 5, 16)])
  one = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  _, chunk, _ = search_module._chunk_layout(3000, 1300, 1, 9 + 7)
  assert search_module._block_width(chunk, 16) > 1
  result = search(queries, gallery, 9, mesh=one, chunk_rows=1300, query_batch=8, dtype=dtype, margin=7)
  _assert_matches(result, brute_force(queries, gallery, 9), 9)
  assert (np.diff(result.indices[:6], axis=1) > 0).all()  # each query's copies, in increasing rows


# ----------------------------------------------------------------------------- exact float32 results


def _near_ties(seed, q=12, groups=150, copies=4, d=48):
  """Groups of `copies` gallery rows equal up to ~1e-7 (a few float32 ulps): their scores are
  within float32 rounding of each other, so a float32 matmul's order is not the float64 one."""
  rng = np.random.default_rng(seed)
  base = _normalized(rng, groups, d).astype(np.float64)
  gallery = np.repeat(base, copies, axis=0) + 3e-8 * rng.standard_normal((groups * copies, d))
  gallery = gallery[rng.permutation(len(gallery))]
  queries = base[rng.integers(0, groups, q)] + 0.3 * rng.standard_normal((q, d)) / np.sqrt(d)
  return queries.astype(np.float32), gallery.astype(np.float32)


def _dense_top(seed, q=5, rows=40, d=32, spacing=1e-4):
  """Per query, `rows` gallery rows scoring 1 - spacing, 1 - 2 spacing, ...: apart in float32,
  within bfloat16 rounding of each other."""
  rng = np.random.default_rng(seed)
  queries = _normalized(rng, q, d).astype(np.float64)
  out = []
  for query in queries:
    u = rng.standard_normal((rows, d))
    u -= (u @ query)[:, None] * query[None]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = 1 - spacing * (1 + rng.permutation(rows))
    out.append(cos[:, None] * query[None] + np.sqrt(1 - cos**2)[:, None] * u)
  return queries.astype(np.float32), np.concatenate(out).astype(np.float32)


def test_float32_results_equal_the_float64_oracle_bit_for_bit():
  """Indices AND scores exactly the float64 brute force rounded to float32, where float32 matmul
  rounding reorders candidates (the bounded rescoring must catch every such near tie)."""
  queries, gallery = _near_ties(14)
  for mesh in (None, sharding.create_mesh({"data": 1}, jax.devices()[:1])):
    result = search(queries, gallery, 10, mesh=mesh, chunk_rows=256, query_batch=8, dtype="float32", margin=6)
    indices, scores, _, _ = brute_force(queries, gallery, 10)
    np.testing.assert_array_equal(result.indices, indices)
    np.testing.assert_array_equal(result.scores, scores)
  # The device's own float32 scores would not do: they order some of these rows differently.
  device = queries @ gallery.T
  assert (np.argsort(-device, axis=1, kind="stable")[:, :10] != indices).any()


# ----------------------------------------------------------------------------- bfloat16 pre-filter


@pytest.mark.parametrize("with_exclusion", [False, True])
def test_bfloat16_prefilter_equals_float32(with_exclusion):
  queries, gallery, exclusion, _ = _planted_gallery(seed=15)
  # Scores bfloat16 cannot separate (float32 can): those queries must fall back to float32.
  tie_queries, tie_gallery = _dense_top(16)
  queries = np.concatenate([queries, tie_queries])
  offset = len(gallery)
  gallery = np.concatenate([gallery, tie_gallery])
  if with_exclusion:
    n, extra = len(tie_queries), len(tie_gallery)
    exclusion = Exclusion(
        query_ids=np.concatenate([exclusion.query_ids, np.arange(n) + 10**12]),
        gallery_ids=np.concatenate([exclusion.gallery_ids, np.arange(extra) + 10**13]),
        query_latlng=np.concatenate([exclusion.query_latlng, np.zeros((n, 2), np.float32)]),
        gallery_latlng=np.concatenate([exclusion.gallery_latlng, np.full((extra, 2), 80, np.float32)]),
        duplicate_km=exclusion.duplicate_km, duplicate_similarity=exclusion.duplicate_similarity)
  else:
    exclusion = None
  options = dict(chunk_rows=300, query_batch=16, margin=4, exclusion=exclusion)
  plain = search(queries, gallery, 8, dtype="float32", **options)
  fast = search(queries, gallery, 8, dtype="float32", prefilter="bfloat16", **options)
  for a, b in zip([plain.indices, plain.scores, plain.excluded_in_top_k, plain.rank0_reason],
                  [fast.indices, fast.scores, fast.excluded_in_top_k, fast.rank0_reason]):
    np.testing.assert_array_equal(a, b)
  _assert_matches(fast, brute_force(queries, gallery, 8, exclusion), 8)
  assert fast.fallback_queries >= len(tie_queries) and fast.stats()["fallback_queries"] == fast.fallback_queries
  assert fast.fallback_queries < len(queries)
  assert (fast.indices[-len(tie_queries):] >= offset).all()
  # Without the pre-filter's fallback, bfloat16 says which queries it could not prove exact.
  bf16 = search(queries, gallery, 8, dtype="bfloat16", **options)
  assert bf16.uncertified_queries >= len(tie_queries)


def test_prefilter_needs_float32():
  with pytest.raises(ValueError, match="prefilter"):
    search(np.zeros((2, 4), np.float32), np.ones((5, 4), np.float32), 2, dtype="bfloat16", prefilter="bfloat16")


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nonfinite_gallery_rows_are_never_returned_and_are_counted(dtype):
  rng = np.random.default_rng(17)
  queries, gallery = _normalized(rng, 20, 24), _normalized(rng, 700, 24)
  bad = np.array([0, 5, 99, 100, 350, 699])
  gallery[bad[:2]] = 3 * queries[:2]  # would be rank 0 for queries 0 and 1...
  gallery[bad[:2], 3] = np.nan  # ...but hold a NaN
  gallery[bad[2], :] = np.inf
  gallery[bad[3], 7] = -np.inf
  gallery[bad[4], 0] = np.inf  # +inf * a positive query value: an infinite score without the mask
  gallery[bad[5], :] = np.nan
  queries[:, 0] = np.abs(queries[:, 0])
  finite = np.setdiff1d(np.arange(700), bad)
  expected = brute_force(queries, gallery[finite], 12)
  expected = (np.where(expected[0] >= 0, finite[np.maximum(expected[0], 0)], -1),) + expected[1:]
  for mesh in (None, sharding.create_mesh({"data": 1}, jax.devices()[:1])):
    result = search(queries, gallery, 12, mesh=mesh, chunk_rows=256, query_batch=8, dtype=dtype)
    _assert_matches(result, expected, 12)
    assert not np.isin(result.indices, bad).any() and np.isfinite(result.scores).all()
    assert result.nonfinite_gallery_rows == len(bad) and result.stats()["nonfinite_gallery_rows"] == len(bad)
  clean = search(queries, gallery[finite], 3, dtype=dtype)
  assert clean.nonfinite_gallery_rows == 0 and clean.stats()["nonfinite_gallery_rows"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nonfinite_rows_beyond_the_margin_with_negative_scores(dtype):
  """More non-finite rows per chunk than the margin, and every finite score negative: a non-finite row
  must neither score (0 once zeroed) nor take a candidate slot (NaN)."""
  rng = np.random.default_rng(19)
  queries = np.abs(_normalized(rng, 10, 16))
  gallery = -np.abs(_normalized(rng, 300, 16))  # every inner product < 0
  bad = np.sort(rng.choice(300, 40, replace=False))
  gallery[bad[::2], rng.integers(0, 16, len(bad[::2]))] = np.nan
  gallery[bad[1::2], rng.integers(0, 16, len(bad[1::2]))] = -np.inf
  finite = np.setdiff1d(np.arange(300), bad)
  expected = brute_force(queries, gallery[finite], 12)
  expected = (finite[expected[0]],) + expected[1:]
  one = sharding.create_mesh({"data": 1}, jax.devices()[:1])
  assert search_module._block_width(search_module._chunk_layout(300, 300, 1, 16)[1], 16) > 1
  for mesh, chunk_rows in ((None, 100), (one, 100), (one, 300)):  # the last: the block pre-selection
    result = search(queries, gallery, 12, mesh=mesh, chunk_rows=chunk_rows, query_batch=8, dtype=dtype, margin=4)
    _assert_matches(result, expected, 12)
    assert result.nonfinite_gallery_rows == 40


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_query_is_an_error_naming_its_row(value):
  queries = np.ones((70000, 4), np.float32)  # the bad row is in the second validation block
  queries[66000, 2] = value
  with pytest.raises(ValueError, match="queries row 66000 has a non-finite value"):
    search(queries, np.ones((5, 4), np.float32), 2)


# ----------------------------------------------------------------------------- memory


def test_resident_query_blocks_reread_the_gallery_and_agree():
  rng = np.random.default_rng(18)
  queries, array = rng.standard_normal((45, 8)).astype(np.float32), rng.standard_normal((250, 8)).astype(np.float32)
  gallery = _RecordingGallery(array)
  result = search(queries, gallery, 4, chunk_rows=60, query_batch=8, dtype="float32", max_resident_queries=16)
  _assert_matches(result, brute_force(queries, array, 4), 4)
  counts = np.zeros(250, int)
  for a, b in gallery.slices:
    counts[a:b] += 1
  np.testing.assert_array_equal(counts, 3)  # 6 batches of 8, 2 resident at a time: 3 passes
  plan = search_module.plan_memory(45, 250, 8, k=4, margin=16, chunk_rows=60, query_batch=8, dtype="float32",
                                   devices=8, max_resident_queries=16)
  assert plan["layout"]["gallery_passes"] == 3 and plan["layout"]["resident_batches"] == 2


@pytest.mark.parametrize("devices, batch, rows, dims, k, margin, dtype, rules, query_dtype, gallery_dtype", [
    (1, 256, 4096, 64, 10, 16, "float32", (), "float32", "float32"),
    (1, 512, 20000, 128, 16, 16, "bfloat16", (), "float32", "float32"),
    (8, 128, 16384, 32, 5, 3, "float32", ("groups", "ids", "latlng"), "float32", "float16"),
    (8, 1024, 65536, 96, 16, 16, "bfloat16", ("ids",), "float32", "float32"),
    (1, 64, 3000, 16, 20, 16, "float32", ("ids", "latlng"), "float16", "float16"),  # small: a plain top_k
    (2, 2048, 131072, 64, 32, 16, "bfloat16", (), "float32", "bfloat16"),
])
def test_plan_bounds_the_compiled_step(devices, batch, rows, dims, k, margin, dtype, rules, query_dtype,
                                       gallery_dtype):
  """The planner's step bytes (arguments + temporaries) bound XLA's own figures for the compiled
  step, and overestimate them by at most 2x; the arguments match exactly."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  plan = search_module.plan_memory(batch, rows, dims, k=k, margin=margin, chunk_rows=rows, query_batch=batch,
                                   dtype=dtype, devices=devices, query_dtype=query_dtype,
                                   gallery_dtype=gallery_dtype, rules=rules)
  layout = plan["layout"]
  mesh = sharding.create_mesh({"data": devices}, jax.devices()[:devices])
  as_dtype = lambda name: ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)  # noqa: E731
  shapes = search_module._step_shapes(mesh, layout["query_batch"], layout["chunk_rows_padded"], dims, k + margin,
                                      tuple(sorted(rules)), as_dtype(query_dtype), as_dtype(gallery_dtype))
  step = search_module._chunk_step(mesh, k + margin, dtype, tuple(sorted(rules)))
  compiled = step.lower(*shapes).compile().memory_analysis()
  assert plan["step_argument_bytes"] == compiled.argument_size_in_bytes
  measured = compiled.argument_size_in_bytes + compiled.temp_size_in_bytes
  assert measured <= plan["step_bytes"] <= 2 * measured, (plan["step_bytes"], measured)
  assert plan["total_bytes_per_device"] >= plan["step_temp_bytes"] + plan["bytes_per_device"]["gallery_chunks"]


def test_plan_command_prints_the_mp16_plan(capsys, monkeypatch):
  from geotoken_jax.bench import __main__ as bench_main  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # --devices, not this machine's
  bench_main.main(["search", "--plan", "--gallery", "4720000", "--queries", "4720000", "--dims", "1536",
                   "--devices", "8", "--chunk_rows", "262144", "--query_batch", "16384", "--dtype", "bfloat16"])
  import json  # pylint: disable=g-import-not-at-top
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  plan = lines[-1]["plans"][0]
  assert plan["settings"]["devices"] == 8 and plan["settings"]["dims"] == 1536
  per_device = plan["bytes_per_device"]
  layout = plan["layout"]
  assert per_device["step_scores"] == layout["query_batch"] * layout["chunk_rows_per_device"] * 4
  assert layout["query_batch"] <= 16384 and layout["chunk_rows_read"] <= 262144
  assert layout["chunk_rows_per_device"] * 8 >= 262144 // 2
  assert 2 < plan["total_gib_per_device"] < 16
