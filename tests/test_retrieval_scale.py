"""Retrieval at MP16 scale, measured in bytes on a fake gs:// bucket (an in-memory fsspec
filesystem that counts every byte read): random row gathers read only the rows asked for (not
whole shards), the index job writes the gallery's search matrix once and never re-reads the
store's features for it, and online retrieval reads the gallery once, whatever the number of
images; each with the lists of a local store and of retrieval.search."""

from __future__ import annotations

import collections
import io
import types
from typing import ClassVar

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from geotoken_jax import embeddings, retrieval, s2, sharding
from geotoken_jax.inference import online_retrieval
from geotoken_jax.retrieval import exclusion, join, neighbors
from array_source import ArraySource

N = 300  # gallery records: 10 shards of 32 (the last one 12)
SHARD_ROWS = 32
DIMS = {"image": 12, "loc_head": 8}
SPEC = s2.TokenSpec(20, 2)
EXTRA = {"workdir": "/aligner", "step": 3, "params": "p0"}  # the stub aligner's identity
SETTINGS = {"fields": ("image", "loc_head"), "k": 5, "dtype": "float32", "chunk_rows": 64, "query_batch": 16,
            "margin": 4, "block_rows": 100, "duplicate_km": 1.0, "duplicate_similarity": 0.95, "group": ""}


class CountingGCS(MemoryFileSystem):
  """gs:// in memory; `reads` counts the bytes every read returned, per file."""
  store: ClassVar[dict] = {}
  pseudo_dirs: ClassVar[list] = [""]
  reads: ClassVar[collections.Counter] = collections.Counter()
  requests: ClassVar[collections.Counter] = collections.Counter()

  def cat_file(self, path, start=None, end=None, **kwargs):
    out = super().cat_file(path, start, end, **kwargs)
    CountingGCS.reads[self._strip_protocol(path)] += len(out)
    CountingGCS.requests[self._strip_protocol(path)] += 1
    return out

  def _open(self, path, mode="rb", **kwargs):
    f = super()._open(path, mode, **kwargs)
    if mode != "rb":
      return f
    name = self._strip_protocol(path)
    CountingGCS.requests[name] += 1

    class Counted(io.BytesIO):
      def read(self, size=-1):
        out = super().read(size)
        CountingGCS.reads[name] += len(out)
        return out

    return Counted(bytes(f.getbuffer()))


@pytest.fixture
def gcs(monkeypatch, tmp_path, serve_gs):
  monkeypatch.setenv("GEOTOKEN_MATRIX_CACHE", str(tmp_path / "matrix-cache"))  # not ~/.cache
  CountingGCS.store.clear()
  CountingGCS.pseudo_dirs[:] = [""]
  serve_gs(CountingGCS)
  CountingGCS.reads.clear()
  yield CountingGCS
  CountingGCS.store.clear()
  CountingGCS.reads.clear()


def bytes_read(prefix: str) -> int:
  """Bytes read from the .npy files under `prefix` (manifests aside)."""
  return sum(v for k, v in CountingGCS.reads.items() if k.startswith(prefix) and k.endswith(".npy"))


def file_sizes(prefix: str) -> dict[str, int]:
  return {k: len(v.getbuffer()) for k, v in CountingGCS.store.items() if k.startswith(prefix) and k.endswith(".npy")}


def records(n: int, seed: int, first_id: int = 1000) -> dict:
  rng = np.random.default_rng(seed)
  latlng = np.stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)], -1).astype(np.float32)
  out = {f"f_{f}": rng.normal(size=(n, d)).astype(np.float32) for f, d in DIMS.items()}
  out["f_image"][n // 2:n // 2 + 10] = out["f_image"][:10]  # exact ties: the lower row wins
  out["f_loc_head"][n // 2:n // 2 + 10] = out["f_loc_head"][:10]
  tokens = s2.latlng_to_tokens(latlng[:, 0].astype(np.float64), latlng[:, 1].astype(np.float64), SPEC)
  return {**out, "latlng": latlng, "tokens": tokens.astype(np.int32), "id": np.arange(n, dtype=np.int64) + first_id}


def write(arrays: dict, directory) -> embeddings.Embeddings:
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  fn = lambda b: {"image": b["f_image"], "loc_head": b["f_loc_head"]}
  embeddings.write_embeddings(fn, ArraySource(arrays), str(directory), mesh=mesh, global_batch_size=40,
                              dtype="float32", shard_rows=SHARD_ROWS, manifest_extra=EXTRA, progress=False)
  return embeddings.open_embeddings(str(directory))


def feature_bytes(store) -> int:
  """The bytes of the stored feature rows (all shards, headers aside)."""
  return store.num_records * sum(4 * d for d in store.dims.values())


# ---------------------------------------------------------------------------
# 1. Ranged reads.


def test_remote_gathers_read_the_rows_asked_not_whole_shards(gcs, tmp_path, monkeypatch):
  """A training epoch's gathers (what join.RetrievalSource reads per batch: the batch's own
  rows, its K neighbours' rows, their coordinates) over a 10-shard gs:// store read at most
  (K + 1) x the store's feature bytes (each row asked once per batch, nothing else), plus one
  header per file; whole-shard reads would cost (number of batches) x the store."""
  monkeypatch.setattr(embeddings, "RANGE_GAP_BYTES", 0)  # the fixture's rows are tiny: no coalescing
  arrays = records(N, seed=0)
  local, remote = write(arrays, tmp_path / "train"), write(arrays, "gs://bucket/emb/train")
  for name in ("image", "loc_head", "latlng", "tokens", "id", "index"):
    rows = np.random.default_rng(1).integers(0, N, (7, 3))
    for got, want in ((remote.rows(name, rows), local.rows(name, rows)), (remote.read(name, 5, 250),
                      local.read(name, 5, 250)), (remote.field(name), local.field(name))):
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(got, want)

  batch, k = 20, 4
  neighbours = np.random.default_rng(2).integers(0, N, (N, k))
  gcs.reads.clear()
  gathered = {f: np.zeros((N, k + 1, d), np.float32) for f, d in DIMS.items()}
  for rows in np.array_split(np.random.default_rng(3).permutation(N), N // batch):
    for f in DIMS:
      gathered[f][rows, 0] = remote.rows(f, rows)
      gathered[f][rows, 1:] = remote.rows(f, neighbours[rows])
    remote.rows("latlng", rows)
  for f in DIMS:  # the local store's rows
    np.testing.assert_array_equal(gathered[f][:, 0], local.field(f))
    np.testing.assert_array_equal(gathered[f][:, 1:], local.rows(f, neighbours))
  read = bytes_read("gs://bucket/emb/train/image/") + bytes_read("gs://bucket/emb/train/loc_head/")
  headers = 2 * 10 * embeddings._HEADER_BYTES  # pylint: disable=protected-access
  print(f"\nepoch of {N // batch} batches x {batch} rows, K={k}: {read} bytes of features read; store "
        f"{feature_bytes(remote)} bytes; re-reading whole shards every batch: >= {N // batch * feature_bytes(remote)}")
  assert read <= (k + 1) * feature_bytes(remote) + headers
  assert bytes_read("gs://bucket/emb/train/latlng/") <= N * 8 + 10 * embeddings._HEADER_BYTES  # pylint: disable=protected-access

  # Coalescing: rows within RANGE_GAP_BYTES of each other come in one request.
  monkeypatch.setattr(embeddings, "RANGE_GAP_BYTES", 3 * 4 * DIMS["image"])
  fresh = embeddings.open_embeddings("gs://bucket/emb/train")
  fresh.rows("image", [0])  # the header
  gcs.reads.clear()
  gcs.requests.clear()
  np.testing.assert_array_equal(fresh.rows("image", [1, 4, 9, 2]), local.rows("image", [1, 4, 9, 2]))
  assert sum(gcs.requests.values()) == 2  # rows 1-4 (row 3 read through) and row 9
  assert sum(gcs.reads.values()) == 5 * 4 * DIMS["image"]


# ---------------------------------------------------------------------------
# 2. The search matrix.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lists_with_the_search_matrix_equal_the_lists_without(gcs, tmp_path, dtype):
  arrays = records(N, seed=0)
  remote, local = write(arrays, "gs://bucket/emb/train"), write(arrays, tmp_path / "train")
  settings = dict(SETTINGS, dtype=dtype)
  neighbors.index_split(local, local, tmp_path / "plain", settings=settings, same_split=True, progress=False,
                        use_matrix=False)
  neighbors.index_split(remote, remote, "gs://bucket/lists/train", settings=settings, same_split=True,
                        progress=False)
  plain, with_matrix = neighbors.open_neighbors(tmp_path / "plain"), neighbors.open_neighbors("gs://bucket/lists/train")
  np.testing.assert_array_equal(np.asarray(with_matrix.indices), np.asarray(plain.indices))
  np.testing.assert_array_equal(np.asarray(with_matrix.scores), np.asarray(plain.scores))
  # Rows N/2 + i are copies of rows i < 10: equal scores, the lower row first (but for the copy itself).
  lists = np.asarray(plain.indices)
  for query in set(range(N)) - set(range(N // 2, N // 2 + 10)):
    for position in range(SETTINGS["k"] - 1):
      if lists[query, position] < 10:
        assert lists[query, position + 1] == lists[query, position] + N // 2, (query, lists[query])
  matrix = neighbors.search_matrix(remote, SETTINGS["fields"], dtype, progress=False)
  assert matrix.dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16)
  np.testing.assert_array_equal(
      np.asarray(matrix[:], np.float32),
      neighbors.search_vectors([arrays[f"f_{f}"] for f in DIMS]).astype(matrix.dtype).astype(np.float32))


def test_the_index_job_reads_the_store_features_once_for_the_matrix(gcs, tmp_path, monkeypatch):
  """The store's feature shards: read once, to write the matrix, then never (another split, a
  rerun with other settings).  The matrix: copied to the local cache once (each file read once),
  then passed over once per query block from the copy; without a cache, once per block from
  gs:// (ranged reads) plus the rescoring's (k + margin) candidates per query."""
  arrays = records(N, seed=0)
  store = write(arrays, "gs://bucket/emb/train")
  queries = {k: v[:40].copy() for k, v in records(40, seed=5, first_id=9000).items()}
  write(queries, "gs://bucket/emb/test")
  features = ("gs://bucket/emb/train/image/", "gs://bucket/emb/train/loc_head/")
  sizes = {**file_sizes(features[0]), **file_sizes(features[1])}
  gcs.reads.clear()
  first = neighbors.run_index("gs://bucket/emb", "gs://bucket/lists", gallery="train", queries=("train",),
                              settings=SETTINGS, progress=False)
  per_file = {k: v for k, v in gcs.reads.items() if k in sizes}
  assert set(per_file) == set(sizes)  # every feature shard read ...
  header = embeddings._HEADER_BYTES  # pylint: disable=protected-access
  assert all(per_file[k] <= size + header for k, size in sizes.items()), (per_file, sizes)  # ... once
  store_read = sum(per_file.values())
  matrix_prefix = str(neighbors.matrix_dir(store, SETTINGS["fields"], "float32")) + "/"
  matrix_size = sum(file_sizes(matrix_prefix).values())
  matrix_read = bytes_read(matrix_prefix)
  blocks = -(-N // SETTINGS["block_rows"])
  print(f"\nindex (train, {blocks} query blocks): store features {store_read} bytes read (files {sum(sizes.values())}); "
        f"matrix {matrix_read} bytes read (files {matrix_size}, copied to the local cache)")
  assert matrix_read == matrix_size  # each file downloaded whole, once

  # Later calls: another split, a rerun with other settings. The store's features stay unread.
  gcs.reads.clear()
  later = neighbors.run_index("gs://bucket/emb", "gs://bucket/lists", gallery="train", queries=("train", "test"),
                              settings=SETTINGS, progress=False)
  again = neighbors.run_index("gs://bucket/emb", "gs://bucket/lists", gallery="train", queries=("train",),
                              settings=dict(SETTINGS, k=6), progress=False, overwrite=True)
  assert sum(gcs.reads[k] for k in sizes) == 0
  assert bytes_read(matrix_prefix) == 0  # the local copies
  assert later["train"]["blocks"] == first["train"]["blocks"] and again["train"]["k"] == 6

  # Without the cache: byte ranges of gs://, one pass per query block plus the rescoring's rows.
  monkeypatch.setenv("GEOTOKEN_MATRIX_CACHE", "none")
  gcs.reads.clear()
  neighbors.run_index("gs://bucket/emb", "gs://bucket/lists", gallery="train", queries=("train",),
                      settings=dict(SETTINGS, k=7), progress=False, overwrite=True)
  ranged = bytes_read(matrix_prefix)
  rescoring = N * 2 * (7 + SETTINGS["margin"]) * 4 * sum(DIMS.values())
  print(f"index without a local copy: matrix {ranged} bytes read ({blocks} passes of {matrix_size} + the rescoring's "
        f"rows, coalesced)")
  assert sum(gcs.reads[k] for k in sizes) == 0
  assert ranged <= blocks * (matrix_size + 10 * embeddings._HEADER_BYTES) + rescoring  # pylint: disable=protected-access

  # The same lists as a local store's, searched without a matrix.
  local = write(arrays, tmp_path / "train")
  neighbors.index_split(local, local, tmp_path / "lists", settings=SETTINGS, same_split=True, progress=False,
                        use_matrix=False)
  np.testing.assert_array_equal(np.asarray(neighbors.open_neighbors("gs://bucket/lists/train").indices)[:, :5],
                                np.asarray(neighbors.open_neighbors(tmp_path / "lists").indices))

  # A changed store (re-embedded) gets its matrix rebuilt.
  changed = dict(arrays, f_image=arrays["f_image"] + 1.0)
  embeddings.write_embeddings(lambda b: {"image": b["f_image"], "loc_head": b["f_loc_head"]},
                              ArraySource(changed), "gs://bucket/emb/train", mesh=sharding.create_mesh(
                                  {"data": -1, "fsdp": 1}), global_batch_size=40, dtype="float32",
                              shard_rows=SHARD_ROWS, manifest_extra=EXTRA, progress=False, overwrite=True)
  rebuilt = neighbors.search_matrix(embeddings.open_embeddings("gs://bucket/emb/train"), SETTINGS["fields"],
                                    progress=False)
  np.testing.assert_array_equal(rebuilt[:], neighbors.search_vectors([changed["f_image"], changed["f_loc_head"]]))


# ---------------------------------------------------------------------------
# 3. Online retrieval.


def online_config(dtype: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0,
      "model": {"encoder": "features"},
      "retrieval": dict(SETTINGS, fields=list(SETTINGS["fields"]), dtype=dtype, k=4, search_k=5,
                        embeddings="gs://bucket/emb", neighbors="gs://bucket/lists", gallery="train",
                        alignment_workdir="/aligner", same_id=True),
  })


@pytest.fixture
def stub_aligner(monkeypatch):
  """The aligner's embeddings are the images' first pixels: image [B, 3, 3, 3] -> image [B, 12],
  loc_head [B, 8]."""
  aligner = types.SimpleNamespace(
      config=ml_collections.ConfigDict({"model": {"architecture": "align", "image_tower": "vit",
                                                  "vit": {"image_size": 3}}}),
      identity=lambda: dict(EXTRA))
  embed = jax.jit(lambda batch: {"image": batch["image"].reshape(batch["image"].shape[0], -1)[:, :12],
                                 "loc_head": batch["image"].reshape(batch["image"].shape[0], -1)[:, 12:20]})
  monkeypatch.setattr(online_retrieval, "restore_model", lambda *args, **kwargs: aligner)
  monkeypatch.setattr(online_retrieval, "embed_function", lambda restored: embed)


def images_of(n: int, arrays: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n images whose embeddings are gallery rows (every third, with the row's id: excluded) or new."""
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(n, 27)).astype(np.float32)
  ids = np.arange(n, dtype=np.int64) + 50_000
  copies = np.arange(0, n, 3)
  rows = rng.integers(0, N, copies.size)
  pixels[copies, :12], pixels[copies, 12:20] = arrays["f_image"][rows], arrays["f_loc_head"][rows]
  ids[copies] = arrays["id"][rows]
  return pixels.reshape(n, 3, 3, 3), ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_online_retrieval_reads_the_gallery_once_and_equals_search(gcs, stub_aligner, tmp_path, monkeypatch, dtype):
  monkeypatch.setattr(embeddings, "RANGE_GAP_BYTES", 0)  # the fixture's rows are tiny: no coalescing
  arrays = records(N, seed=0)
  store = write(arrays, "gs://bucket/emb/train")
  local = write(arrays, tmp_path / "train")  # the references read this copy (not counted)
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  config = online_config(dtype)
  neighbors.search_matrix(store, SETTINGS["fields"], dtype, progress=False)  # the index job's
  matrix_prefix = str(neighbors.matrix_dir(store, SETTINGS["fields"], dtype)) + "/"
  matrix_size = sum(file_sizes(matrix_prefix).values())
  features = ("gs://bucket/emb/train/image/", "gs://bucket/emb/train/loc_head/")
  batch, k, run_k = 8, 4, 4 + SETTINGS["margin"]
  row_bytes = 4 * sum(DIMS.values())
  settings = neighbors.settings_from_config(config.retrieval)
  reference = neighbors.SearchRows(local, SETTINGS["fields"])  # no matrix: what retrieval.search read before
  local_gallery = join.NeighborGallery(local, SETTINGS["fields"], SPEC)
  keys = exclusion.gallery_keys(settings, N, regime=exclusion.TEST, ids=arrays["id"])
  measured = {}
  for images in (8, 40):
    gcs.reads.clear()
    online = online_retrieval.OnlineRetrieval(config, "/run", SPEC, mesh)
    placed = bytes_read(matrix_prefix)
    pixels, ids = images_of(images, arrays, seed=images)
    extra = 0
    for start in range(0, images, batch):
      batch_in = {"image": pixels[start:start + batch], "index": np.arange(batch, dtype=np.int32),
                  "id": ids[start:start + batch]}
      got = online(batch_in)
      queries = neighbors.search_vectors([pixels[start:start + batch].reshape(batch, -1)[:, :12],
                                          pixels[start:start + batch].reshape(batch, -1)[:, 12:20]])
      rules = exclusion.query_exclusion(settings, keys, query_ids=batch_in["id"])
      want = retrieval.search(queries, reference, k, mesh=mesh, chunk_rows=SETTINGS["chunk_rows"],
                              dtype=dtype, margin=SETTINGS["margin"], exclusion=rules)
      before = sum(bytes_read(f) for f in features)
      indices, scores = online.device_gallery.search(queries, rules)  # (its reads are not the run's)
      extra += sum(bytes_read(f) for f in features) - before
      np.testing.assert_array_equal(indices, want.indices)
      np.testing.assert_array_equal(scores, want.scores)
      flat = pixels[start:start + batch].reshape(batch, -1)
      expected = join.attach(batch_in, join.stacked_fields([flat[:, :12], flat[:, 12:20]], 12), want.indices,
                             want.scores, local_gallery)
      for name in ("neighbor_tokens", "neighbor_scores", "neighbor_latlng", "neighbor_valid", "neighbor_features"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    same_id = np.isin(ids, arrays["id"])
    assert same_id.any()
    measured[images] = (placed, bytes_read(matrix_prefix), sum(bytes_read(f) for f in features) - extra)
    header = embeddings._HEADER_BYTES  # pylint: disable=protected-access
    # The matrix: read once, when placed; never again by a batch.
    assert matrix_size <= placed <= matrix_size + len(file_sizes(matrix_prefix)) * header
    assert bytes_read(matrix_prefix) == placed
    # The store's features: only the rows of the neighbours fed to the model (join.attach), and
    # for a bfloat16 matrix the candidates' float32 rows of the rescoring; never a pass.
    per_image = k + (run_k if dtype == "bfloat16" else 0)
    assert measured[images][2] <= images * per_image * row_bytes + 20 * header
  print(f"\nonline retrieval ({dtype}): matrix {matrix_size} bytes; (placed, matrix read, store features "
        f"read) for 8 images {measured[8]}, for 40 images {measured[40]}")
  assert measured[8][1] == measured[40][1]


def test_a_store_that_cannot_be_written_is_searched_without_a_matrix(tmp_path, monkeypatch):
  arrays = records(N, seed=0)
  store = write(arrays, tmp_path / "train")
  real = neighbors.runtime.write_atomic

  def read_only(path, payload):
    if "search=" in str(path):
      raise PermissionError(f"{path}: read-only")
    return real(path, payload)

  neighbors.index_split(store, store, tmp_path / "plain", settings=SETTINGS, same_split=True, progress=False,
                        use_matrix=False)
  monkeypatch.setattr(neighbors.runtime, "write_atomic", read_only)
  assert neighbors.search_matrix(store, SETTINGS["fields"], progress=False) is None
  neighbors.index_split(store, store, tmp_path / "lists", settings=SETTINGS, same_split=True, progress=False)
  np.testing.assert_array_equal(np.asarray(neighbors.open_neighbors(tmp_path / "lists").indices),
                                np.asarray(neighbors.open_neighbors(tmp_path / "plain").indices))
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  gallery = online_retrieval.DeviceGallery(store, SETTINGS["fields"], mesh, k=5, margin=4, chunk_rows=64,
                                           progress=False)
  queries = neighbors.search_vectors([arrays["f_image"][:16] + 0.1, arrays["f_loc_head"][:16]])
  want = retrieval.search(queries, neighbors.SearchRows(store, SETTINGS["fields"]), 5, mesh=mesh, chunk_rows=64,
                          dtype="float32", margin=4)
  indices, scores = gallery.search(queries)
  np.testing.assert_array_equal(indices, want.indices)
  np.testing.assert_array_equal(scores, want.scores)
