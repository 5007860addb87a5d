"""Retrieval end to end below the model: the index job's lists against a float64 brute force with
the leak rules applied, resumption, the neighbour join, training-time neighbour noise, the kNN
strategies and the neighbour memory of the image encoders."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from geotoken_jax import embeddings, models, s2, sharding
from geotoken_jax.decoding import selection, strategies
from geotoken_jax.retrieval import exclusion, join, neighbors, sources
from array_source import ArraySource

N = 60
DIMS = {"image": 12, "loc_head": 8}
SPEC = s2.TokenSpec(20, 2)


def planted_gallery(seed: int = 0) -> dict:
  """N rows; rows 50..59 are near-copies of rows 0..9 at (almost) the same place; row 49 has
  row 48's id (a re-upload)."""
  rng = np.random.default_rng(seed)
  lat, lon = rng.uniform(-60, 60, N), rng.uniform(-170, 170, N)
  feats = {f: rng.normal(size=(N, d)).astype(np.float32) for f, d in DIMS.items()}
  for f in feats:
    feats[f][50:] = feats[f][:10] + 0.01 * rng.normal(size=(10, DIMS[f])).astype(np.float32)
  lat[50:], lon[50:] = lat[:10] + 1e-4, lon[:10] - 1e-4
  ids = np.arange(N, dtype=np.int64) + 1000
  ids[49] = ids[48]
  latlng = np.stack([lat, lon], -1).astype(np.float32)
  tokens = s2.latlng_to_tokens(latlng[:, 0].astype(np.float64), latlng[:, 1].astype(np.float64), SPEC)
  return {"f_image": feats["image"], "f_loc_head": feats["loc_head"], "latlng": latlng,
          "tokens": tokens.astype(np.int32), "id": ids}


def write_store(arrays: dict, directory) -> embeddings.Embeddings:
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  fn = lambda b: {"image": b["f_image"], "loc_head": b["f_loc_head"]}  # noqa: E731
  embeddings.write_embeddings(fn, ArraySource(arrays), str(directory), mesh=mesh, global_batch_size=8,
                              dtype="float32", shard_rows=16, progress=False)
  return embeddings.open_embeddings(str(directory))


def brute_force(query: dict, gallery: dict, k: int, *, same_split: bool, duplicate_km=1.0,
                duplicate_similarity=0.95, group_level=None):
  """float64 lists with the leak rules applied (the oracle of the index job)."""
  def vectors(a):
    parts = [a[f"f_{f}"].astype(np.float64) for f in DIMS]
    return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], 1) / math.sqrt(len(parts))
  scores = vectors(query) @ vectors(gallery).T  # [Q, G]
  q, g = np.radians(query["latlng"].astype(np.float64)), np.radians(gallery["latlng"].astype(np.float64))
  a = (np.sin((q[:, None, 0] - g[None, :, 0]) / 2) ** 2
       + np.cos(q[:, None, 0]) * np.cos(g[None, :, 0]) * np.sin((q[:, None, 1] - g[None, :, 1]) / 2) ** 2)
  km = 2 * 6371.0088 * np.arcsin(np.sqrt(np.clip(a, 0, 1)))
  excluded = query["id"][:, None] == gallery["id"][None, :]
  excluded |= (km <= duplicate_km) & (scores >= duplicate_similarity)
  if group_level is not None:
    cell = lambda x: s2.latlng_to_cell_ids(x[:, 0].astype(np.float64), x[:, 1].astype(np.float64), group_level)  # noqa: E731
    excluded |= cell(query["latlng"])[:, None] == cell(gallery["latlng"])[None, :]
  masked = np.where(excluded, -np.inf, scores)
  order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(masked, order, 1), excluded, scores


SETTINGS = dict(fields=("image", "loc_head"), k=5, dtype="float32", chunk_rows=16, query_batch=8, margin=4,
                block_rows=25, duplicate_km=1.0, duplicate_similarity=0.95, group="")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp("retrieval")
  arrays = planted_gallery()
  return root, arrays, write_store(arrays, root / "embeddings" / "train")


def test_self_search_never_returns_the_query_or_its_planted_duplicates(store, tmp_path):
  root, arrays, gallery = store
  manifest = neighbors.index_split(gallery, gallery, tmp_path / "train", settings=SETTINGS, same_split=True,
                                   progress=False)
  lists = neighbors.open_neighbors(tmp_path / "train")
  want, want_scores, excluded, scores = brute_force(arrays, arrays, 5, same_split=True)
  np.testing.assert_array_equal(lists.indices, want)
  np.testing.assert_allclose(lists.scores, want_scores, atol=1e-5)
  rows = np.arange(N)
  assert not (lists.indices == rows[:, None]).any()  # never itself
  planted = {i: i + 50 for i in range(10)} | {i + 50: i for i in range(10)} | {48: 49, 49: 48}
  for query, twin in planted.items():
    assert twin not in lists.indices[query], (query, twin)
  # Statistics: every query's unfiltered rank 0 is itself (same id), and the duplicates
  # that would have ranked in its top 5 are counted.
  stats = manifest["stats"]
  assert stats["queries"] == N and stats["excluded_in_top_k"]["same_id"] >= N
  kth = want_scores[:, -1:]
  near_dup = excluded & (scores >= kth) & ~(arrays["id"][:, None] == arrays["id"][None, :])
  assert stats["excluded_in_top_k"]["near_duplicate"] == int(near_dup.sum())
  assert len(manifest["blocks"]) == 3  # 60 queries in blocks of 25


def test_lists_of_another_split_read_no_label(store, tmp_path):
  """Validation / test lists are built as test time runs: the same-id rule only. The settings'
  label rules (near-duplicate by place, s2_cell group) are training-list rules; here they would
  delete every neighbour within 20,000 km, and permuting the queries' labels changes nothing."""
  root, arrays, gallery = store
  query_arrays = {k: v[:20].copy() for k, v in planted_gallery(seed=3).items()}
  query_arrays["id"] = np.arange(20, dtype=np.int64) + 5000
  query_arrays["id"][3] = arrays["id"][7]  # a test photo that is also in the gallery: excluded by id
  query_arrays["latlng"][:10] = arrays["latlng"][:10]  # on gallery rows' coordinates
  settings = dict(SETTINGS, group="s2_cell:4", duplicate_km=20_000.0, duplicate_similarity=-1.0)
  manifests = []
  for name, permutation in (("test", np.arange(20)), ("permuted", np.random.default_rng(5).permutation(20))):
    labelled = dict(query_arrays, latlng=query_arrays["latlng"][permutation],
                    tokens=query_arrays["tokens"][permutation])
    queries = write_store(labelled, tmp_path / f"emb_{name}")
    manifests.append(neighbors.index_split(queries, gallery, tmp_path / name, settings=settings, same_split=False,
                                           progress=False))
  lists, permuted = neighbors.open_neighbors(tmp_path / "test"), neighbors.open_neighbors(tmp_path / "permuted")
  want, want_scores, _, _ = brute_force(query_arrays, arrays, 5, same_split=False, duplicate_km=-1.0)
  np.testing.assert_array_equal(lists.indices, want)
  np.testing.assert_allclose(lists.scores, want_scores, atol=1e-5)
  np.testing.assert_array_equal(permuted.indices, lists.indices)
  np.testing.assert_array_equal(permuted.scores, lists.scores)
  assert 7 not in lists.indices[3] and manifests[0]["stats"]["excluded_in_top_k"]["same_id"] >= 1
  assert manifests[0]["stats"]["excluded_in_top_k"]["near_duplicate"] == 0
  assert manifests[0]["stats"]["excluded_in_top_k"]["same_group"] == 0
  assert manifests[0]["identity"]["regime"] == "test"


def test_training_lists_apply_the_group_rule(store, tmp_path):
  """The group rule emulates a cell-blocked test split when building training lists."""
  _, arrays, gallery = store
  neighbors.index_split(gallery, gallery, tmp_path / "train", settings=dict(SETTINGS, group="s2_cell:4"),
                        same_split=True, progress=False)
  lists = neighbors.open_neighbors(tmp_path / "train")
  want, want_scores, _, _ = brute_force(arrays, arrays, 5, same_split=True, group_level=4)
  np.testing.assert_array_equal(lists.indices, want)
  np.testing.assert_allclose(lists.scores, want_scores, atol=1e-5)
  assert lists.manifest["identity"]["regime"] == "training"


def test_test_time_rules_refuse_a_label_and_unknown_groups():
  keys = exclusion.gallery_keys(neighbors.DEFAULT_SETTINGS, 3, regime=exclusion.TEST, ids=np.arange(3))
  assert keys.latlng is None and keys.groups is None
  with pytest.raises(ValueError, match="must not read the query's coordinates"):
    exclusion.query_exclusion(neighbors.DEFAULT_SETTINGS, keys, query_ids=np.arange(2),
                              query_latlng=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="unknown group rule 'column:author'"):
    exclusion.group_level("column:author")


def test_index_resumes_at_the_first_missing_block_and_refuses_other_settings(store, tmp_path):
  _, _, gallery = store
  out = tmp_path / "train"
  neighbors.index_split(gallery, gallery, out, settings=SETTINGS, same_split=True, progress=False)
  full = np.array(neighbors.open_neighbors(out).indices)
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["blocks"], manifest["complete"] = manifest["blocks"][:1], False  # as if killed after block 0
  (out / "manifest.json").write_text(json.dumps(manifest))
  (out / "indices" / "00001.npy").unlink()
  with pytest.raises(ValueError, match="incomplete"):
    neighbors.open_neighbors(out)
  again = neighbors.index_split(gallery, gallery, out, settings=SETTINGS, same_split=True, progress=False)
  assert again["complete"] and [b["rows"] for b in again["blocks"]] == [[0, 25], [25, 50], [50, 60]]
  np.testing.assert_array_equal(neighbors.open_neighbors(out).indices, full)
  with pytest.raises(ValueError, match="other embeddings or settings"):
    neighbors.index_split(gallery, gallery, out, settings=dict(SETTINGS, k=6), same_split=True, progress=False)


@pytest.fixture(scope="module")
def lists(store, tmp_path_factory):
  _, _, gallery = store
  out = tmp_path_factory.mktemp("lists") / "train"
  neighbors.index_split(gallery, gallery, out, settings=dict(SETTINGS, k=8), same_split=True, progress=False)
  return neighbors.open_neighbors(out)


def test_join_gives_each_example_its_neighbours_tokens_and_features(store, lists):
  _, arrays, gallery_store = store
  gallery = join.NeighborGallery(gallery_store, ("image", "loc_head"), SPEC)
  source = join.RetrievalSource(ArraySource(arrays), query_store=gallery_store, neighbors=lists, gallery=gallery,
                                k=5)
  rows = np.array([3, 17, 52, 0])
  batch = source.get_batch(rows)
  want = lists.indices[rows, :5]
  np.testing.assert_array_equal(batch["neighbor_tokens"], arrays["tokens"][want])
  np.testing.assert_array_equal(batch["neighbor_latlng"], arrays["latlng"][want])
  np.testing.assert_allclose(batch["neighbor_scores"], lists.scores[rows, :5])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  width = max(DIMS.values())
  padded = lambda x: np.pad(unit(x), [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])  # noqa: E731
  np.testing.assert_allclose(batch["neighbor_features"][:, :, 0], padded(arrays["f_image"][want]), atol=1e-6)
  np.testing.assert_allclose(batch["neighbor_features"][:, :, 1], padded(arrays["f_loc_head"][want]), atol=1e-6)
  np.testing.assert_allclose(batch["query_features"][:, 1], padded(arrays["f_loc_head"][rows]), atol=1e-6)
  assert batch["neighbor_features"].shape == (4, 5, 2, width) and batch["neighbor_valid"].all()
  # Records that are not the embeddings' rows (another order) are refused.
  shuffled = {k: v[::-1].copy() for k, v in arrays.items()}
  wrong = join.RetrievalSource(ArraySource(shuffled), query_store=gallery_store, neighbors=lists, gallery=gallery,
                               k=5)
  with pytest.raises(ValueError, match="another split or order"):
    wrong.get_batch(rows)
  with pytest.raises(ValueError, match="8"):
    join.RetrievalSource(ArraySource(arrays), query_store=gallery_store, neighbors=lists, gallery=gallery, k=9)


def test_lists_searched_in_other_embeddings_are_refused(store, lists, tmp_path):
  _, arrays, gallery_store = store
  changed = dict(arrays, f_image=arrays["f_image"] + 1.0)  # re-embedded by another aligner
  other = write_store(changed, tmp_path / "other")
  gallery = join.NeighborGallery(other, ("image", "loc_head"), SPEC)
  with pytest.raises(ValueError, match="other gallery embeddings"):
    join.RetrievalSource(ArraySource(changed), query_store=other, neighbors=lists, gallery=gallery, k=5)


def test_neighbour_dropout_and_shuffle_are_seeded_by_position(store, lists):
  _, arrays, gallery_store = store
  gallery = join.NeighborGallery(gallery_store, ("image", "loc_head"), SPEC)
  make = lambda **kw: join.RetrievalSource(ArraySource(arrays), query_store=gallery_store,  # noqa: E731
                                           neighbors=lists, gallery=gallery, k=4, seed=1, **kw)
  rows, positions = np.arange(40), np.arange(40) + 1000
  noisy = make(dropout=0.5, shuffle=True)
  a = noisy.get_batch(rows, positions)["neighbor_tokens"]
  np.testing.assert_array_equal(a, noisy.get_batch(rows, positions)["neighbor_tokens"])  # resumable
  assert not np.array_equal(a, noisy.get_batch(rows, positions + 1)["neighbor_tokens"])
  # Dropout takes replacements from deeper in each list (ranks 4..7), never outside it.
  dropped = make(dropout=0.5)
  picked = dropped._lists(rows, positions)[0]
  assert all(set(picked[r]) <= set(lists.indices[r]) for r in range(40))
  assert (picked != lists.indices[rows, :4]).any()
  # Shuffle alone permutes the top 4; evaluation (no positions) reads the lists as they are.
  shuffled = make(shuffle=True)._lists(rows, positions)[0]
  np.testing.assert_array_equal(np.sort(shuffled, 1), np.sort(lists.indices[rows, :4], 1))
  np.testing.assert_array_equal(noisy._lists(rows, None)[0], lists.indices[rows, :4])


def test_knn_strategies_read_the_batch_neighbours():
  spec = s2.TokenSpec(4, 2)
  rng = np.random.default_rng(0)
  latlng = rng.uniform(-50, 50, (3, 6, 2)).astype(np.float32)
  tokens = s2.latlng_to_tokens(latlng[..., 0].reshape(-1).astype(np.float64),
                               latlng[..., 1].reshape(-1).astype(np.float64), spec).reshape(3, 6, -1)
  scores = np.sort(rng.uniform(0.2, 0.9, (3, 6)), axis=1)[:, ::-1].astype(np.float32)
  batch = {"neighbor_tokens": jnp.asarray(tokens), "neighbor_latlng": jnp.asarray(latlng),
           "neighbor_scores": jnp.asarray(scores), "neighbor_valid": jnp.ones((3, 6), bool)}
  one = strategies.choose(strategies.knn_pool(batch, 1, 0.05), "logprob", 1)
  np.testing.assert_array_equal(np.asarray(one["predicted"]), latlng[:, 0])
  pool = strategies.knn_pool(batch, 6, 0.1)
  np.testing.assert_allclose(np.exp(np.asarray(pool["log_prob"])).sum(1), 1.0, rtol=1e-5)
  # knn:6:medoid is the neighbour with the least total distance to the others (numpy oracle).
  from geotoken_jax import metrics  # pylint: disable=g-import-not-at-top
  d = metrics.haversine_km(latlng[:, :, None].astype(np.float64), latlng[:, None].astype(np.float64))
  medoid = strategies.choose(pool, "medoid", 1)
  np.testing.assert_array_equal(np.asarray(medoid["chosen"]), d.sum(-1).argmin(1))
  with pytest.raises(ValueError, match="more neighbours"):
    strategies.knn_pool(batch, 7, 0.1)
  assert strategies.parse_strategy("knn:10:wvote").name == "knn:10:wvote"
  with pytest.raises(ValueError, match="knn needs K"):
    strategies.parse_strategy("knn")


def test_weighted_vote_counts_probability_not_heads():
  # Two weak candidates share face 1, one strong candidate is on face 2: vote picks face 1,
  # wvote (0.6 > 0.2 + 0.2) picks the strong one.
  tokens = jnp.asarray([[[1, 0], [1, 3], [2, 1]]])
  log_probs = jnp.log(jnp.asarray([[0.2, 0.2, 0.6]]))
  latlng = jnp.asarray([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])
  assert int(selection.select("vote", tokens, log_probs, latlng).index[0]) in (0, 1)
  assert int(selection.select("wvote", tokens, log_probs, latlng).index[0]) == 2


def test_neighbor_memory_appends_the_neighbours_to_the_image_tokens():
  cfg = models.model_config("earth_tiny")
  cfg.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16, patch_size=8)
  cfg.update(d_model=32, num_heads=2, ff_dim=64, decoder_layers=1, neighbor_memory=True)
  cfg.features.num_neighbors = 3
  model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))
  assert model.memory_length() == 4 + 3 * SPEC.num_positions and model.uses_neighbors
  rng = np.random.default_rng(0)
  inputs = {"image": jnp.asarray(rng.integers(0, 255, (2, 16, 16, 3)), jnp.uint8),
            "neighbor_tokens": jnp.zeros((2, 3, SPEC.num_positions), jnp.int32),
            "neighbor_scores": jnp.full((2, 3), 0.5)}
  tokens = jnp.zeros((2, SPEC.num_positions), jnp.int32)
  memory = model.encode(inputs)
  assert memory.shape == (2, 4 + 3 * SPEC.num_positions, 32)
  base = model(inputs, tokens, deterministic=True)
  moved = model({**inputs, "neighbor_tokens": inputs["neighbor_tokens"].at[:, 0, 0].set(3)}, tokens,
                deterministic=True)
  assert not np.allclose(base, moved)  # the decoder reads the neighbours
  with pytest.raises(ValueError, match="neighbours"):
    model.encode({"image": inputs["image"]})


def test_config_checks_name_the_mismatch():
  config = ml_collections.ConfigDict({"model": models.model_config("paper"), "retrieval": {
      "k": 10, "search_k": 20, "fields": ("image", "loc_head")}})
  with pytest.raises(ValueError, match="num_neighbors"):
    sources.check_model(config)
  config.model.features.num_neighbors = 10
  with pytest.raises(ValueError, match="num_features"):
    sources.check_model(config)
  config.model.features.num_features = 2
  sources.check_model(config)
  config.model.encoder = "vit"
  with pytest.raises(ValueError, match="reads none"):
    sources.check_model(config)
  sources.check_model(config, strategies_read_neighbors=True)  # neighbours for knn:K / kNN-LM only
