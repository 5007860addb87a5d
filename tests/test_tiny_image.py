"""The tiny-image baseline (Im2GPS): the embedding against a NumPy float64 reference, its stores'
identity (written by the embed job and the `embed` command, refused by every identity check when
another embedder is expected), and the earth recipe with recipe.alignment = "tiny_image:16"
(configs/earth.py:retrieval_tiny_smoke): no align stage, knn:1 = a brute-force nearest neighbour
over tiny images, online retrieval with the tiny-image embedder, the nearest-train oracle row."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

from geotoken_jax import command_line, data, embeddings, inference, metrics, recipe, s2, sharding
from geotoken_jax.encoders import tiny_image
from geotoken_jax.inference import evaluation
from geotoken_jax.retrieval import join, neighbors, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(20, 2)


def load_config(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def reference(images: np.ndarray, size: int, colour: bool) -> np.ndarray:
  """float64 tiny images: BT.601 grey (or RGB), area average by replication (along an axis of H
  pixels each input pixel repeated lcm(H, size) / H times, then means over blocks of
  lcm(H, size) / size: exactly the overlap-weighted average, for any H and size), mean-centred,
  L2-normalized."""
  x = np.asarray(images, np.float64)
  x = x if colour else (x @ np.asarray([0.299, 0.587, 0.114]))[..., None]
  b, h, w, c = x.shape
  ly, lx = math.lcm(h, size), math.lcm(w, size)
  x = np.repeat(np.repeat(x, ly // h, axis=1), lx // w, axis=2)  # [B, lcm(H, size), lcm(W, size), C]
  x = x.reshape(b, size, ly // size, size, lx // size, c).mean(axis=(2, 4))  # [B, size, size, C]
  v = x.reshape(b, -1)
  v = v - v.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(v, axis=1, keepdims=True)
  return np.where(norm > 0, v / np.where(norm > 0, norm, 1), 0)


def one_device():
  return sharding.create_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1])


# ---------------------------------------------------------------------------
# The embedding.


@pytest.mark.parametrize("shape,size", [((64, 64), 16), ((50, 50), 16), ((40, 56), 12), ((7, 9), 16)])
@pytest.mark.parametrize("colour", [False, True])
def test_the_embedding_is_the_float64_reference(shape, size, colour):
  rng = np.random.default_rng(size + shape[0])
  images = rng.integers(0, 256, (5, *shape, 3), dtype=np.uint8)
  images[0] = 77  # a constant image: zero after centring, stays zero
  spec = tiny_image.TinyImageSpec(size, colour)
  got = np.asarray(tiny_image.embed(images, spec))
  assert got.dtype == np.float32 and got.shape == (5, spec.dim)
  np.testing.assert_allclose(got, reference(images, size, colour), rtol=0, atol=3e-6)
  assert not got[0].any()
  np.testing.assert_allclose(np.linalg.norm(got[1:].astype(np.float64), axis=1), 1.0, atol=1e-6)


def test_specs_parse_and_name_themselves():
  assert tiny_image.parse("tiny_image") == tiny_image.TinyImageSpec(16, False)
  assert tiny_image.parse("tiny_image:8:colour") == tiny_image.TinyImageSpec(8, True)
  assert tiny_image.parse("tiny_image:32:grey") == tiny_image.TinyImageSpec(32, False)
  assert str(tiny_image.TinyImageSpec(8, True)) == "tiny_image:8:colour"
  for bad in ("tiny_image:x", "tiny_image:16:sepia", "tiny_image:0", "clip"):
    with pytest.raises(ValueError):
      tiny_image.parse(bad)


# ---------------------------------------------------------------------------
# Stores and their identity.


class ImageRecords:
  def __init__(self, n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.arrays = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                   "latlng": np.stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)], -1).astype(np.float32),
                   "id": np.arange(n, dtype=np.int64) + 1000 * seed}

  def __len__(self):
    return len(self.arrays["id"])

  def get_batch(self, indices, positions=None):
    del positions
    return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


def small_config(image_size: int = 24) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"seed": 0, "tokens": {"level": 20, "group_size": 2},
                                    "data": {"image_size": image_size}, "mesh": {"data": -1, "fsdp": 1}})


def embed_store(directory, records, text: str, config, **kwargs) -> dict:
  embedder = inference.tiny_image_embedder(text, config, mesh=one_device())
  return inference.run_embedding(None, str(directory), source=records, split_label="train", config=config,
                                 embedder=embedder, batch_size=8, dtype="float32", shard_rows=16, **kwargs)


def test_the_embed_job_writes_the_identity_and_other_embedders_are_refused(tmp_path):
  config = small_config()
  records = ImageRecords(20, 24)
  manifest = embed_store(tmp_path / "tiny", records, "tiny_image:8", config)
  want = {"embedding": "tiny_image", "size": 8, "colour": False, "image_size": 24, "resize": "default"}
  assert {k: manifest["extra"][k] for k in want} == want
  store = embeddings.open_embeddings(tmp_path / "tiny")
  assert store.fields == ("tiny",) and embeddings.aligner_identity(store.manifest) == want
  np.testing.assert_allclose(store.field("tiny"), reference(records.arrays["image"], 8, False), atol=3e-6)

  aligner = {"workdir": "/runs/align", "step": 300, "params": "0123456789abcdef"}
  colour = dict(want, colour=True)
  # The recipe's decision: kept for this embedder only.
  act = lambda identity: recipe.embed_action(tmp_path / "tiny", num_records=20, aligner=identity,  # noqa: E731
                                             dtype="float32")
  assert act(want)[0] == "skip"
  for other, word in ((aligner, "embedding: 'tiny_image' -> 'aligner'"), (colour, "colour: False -> True"),
                      (dict(want, size=16), "size: 8 -> 16"), (dict(want, resize="clip"), "resize: 'default'")):
    action, why = act(other)
    assert action == "overwrite" and "another embedder" in why and word in why, (other, why)
  # Online retrieval's check, both ways: a tiny-image gallery for aligner queries, and back.
  sources.check_gallery_aligner(store, want)
  for other, word in ((aligner, "embedding: 'tiny_image' -> 'aligner'"), (colour, "colour: False -> True")):
    with pytest.raises(sources.AlignerMismatchError, match=word):
      sources.check_gallery_aligner(store, other)
  embeddings.write_embeddings(lambda b: {"image": b["image"].reshape(b["image"].shape[0], -1)[:, :6] * 1.0},
                              records, str(tmp_path / "aligned"), mesh=one_device(), global_batch_size=8,
                              dtype="float32", shard_rows=16, progress=False, manifest_extra=aligner)
  with pytest.raises(sources.AlignerMismatchError, match="embedding: 'aligner' -> 'tiny_image'"):
    sources.check_gallery_aligner(embeddings.open_embeddings(tmp_path / "aligned"), want)
  # Resuming the store with another embedder is refused (unless overwrite).
  with pytest.raises(embeddings.SettingsMismatchError, match="extra"):
    embed_store(tmp_path / "tiny", records, "tiny_image:8:colour", config)
  # The trainer's check: a split of another embedder than the gallery's.
  embed_store(tmp_path / "run" / "embeddings" / "train", records, "tiny_image:8", config)
  clip_pixels = small_config()
  clip_pixels.data.resize = "clip"  # decoded otherwise: the same dims, another embedder
  embed_store(tmp_path / "run" / "embeddings" / "test", ImageRecords(8, 24, seed=1), "tiny_image:8", clip_pixels)
  settings = dict(neighbors.DEFAULT_SETTINGS, fields=("tiny",), k=4, chunk_rows=16, query_batch=8, block_rows=16)
  neighbors.run_index(tmp_path / "run" / "embeddings", tmp_path / "run" / "neighbors", gallery="train",
                      queries=["train", "test"], settings=settings, progress=False, mesh=one_device())
  run_config = ml_collections.ConfigDict({"retrieval": {
      "k": 4, "embeddings": "embeddings", "neighbors": "neighbors", "gallery": "train", "fields": ("tiny",),
      "search_k": 4, "group": ""}})
  with pytest.raises(sources.AlignerMismatchError, match="'test'.*resize: gallery 'default', test 'clip'"):
    sources.check_inputs(run_config, tmp_path / "run", ["train", "test"])
  # Lists searched on the tiny field are refused for a config that retrieves on the aligner's fields.
  lists = neighbors.open_neighbors(tmp_path / "run" / "neighbors" / "train")
  join.check_list_settings(lists, neighbors.settings_from_config(run_config.retrieval))
  run_config.retrieval.fields = ("image", "loc_head")
  with pytest.raises(join.ListSettingsError, match="fields"):
    join.check_list_settings(lists, neighbors.settings_from_config(run_config.retrieval))


def test_the_embed_command_writes_a_tiny_image_store(tmp_path):
  from geotoken_jax import embed  # pylint: disable=g-import-not-at-top
  output = tmp_path / "store"
  status = command_line.call(embed.main, ["embed", "--embedding=tiny_image:8:colour", f"--config={REPO}/configs/earth.py:smoke",
                                 "--split=test", "--limit=16", "--batch_size=8", "--dtype=float32",
                                 f"--output={output}"])
  assert status == 0
  store = embeddings.open_embeddings(output)
  assert embeddings.aligner_identity(store.manifest) == {"embedding": "tiny_image", "size": 8, "colour": True,
                                                        "image_size": 64, "resize": "default"}
  config = load_config("earth", "smoke")
  images = data.get_source(config.data, "test", SPEC, resize="default").get_batch(np.arange(16))["image"]
  np.testing.assert_allclose(store.field("tiny"), reference(images, 8, True), atol=3e-6)
  # Another embedder: no mixing into this store without --overwrite.
  assert command_line.call(embed.main, ["embed", "--embedding=tiny_image:16", f"--config={REPO}/configs/earth.py:smoke",
                               "--split=test", "--limit=16", "--batch_size=8", "--dtype=float32",
                               f"--output={output}"]) == 2


# ---------------------------------------------------------------------------
# The earth recipe over tiny images.


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
  config = load_config("earth", "retrieval_tiny_smoke")
  config.recipe.embedding_dtype = "float32"  # the stored vectors are the float32 embedding itself
  config.num_steps = 2
  config.checkpoint_every_steps = 2
  config.evaluate.update(strategies="knn:1,knn:10:vote", oracles=True)
  config.validation_strategy = "knn:1"  # the trainer's final test: no decoder to compile
  workdir = tmp_path_factory.mktemp("tiny_recipe")
  out = recipe.run_recipe(config, str(workdir))
  return config, workdir, out


def test_the_tiny_image_recipe_has_no_align_stage_and_knn_1_is_the_brute_force_neighbour(tiny_recipe):
  config, workdir, out = tiny_recipe
  assert not [name for name in out["timings"] if name == "align"]
  assert not sources.alignment_workdir(config, workdir).exists()
  assert {"embed_train", "embed_test", "index", "train", "evaluate_test"} <= set(out["timings"])
  gallery = embeddings.open_embeddings(sources.embeddings_dir(config, workdir, "train"))
  assert embeddings.aligner_identity(gallery.manifest) == {"embedding": "tiny_image", "size": 16, "colour": False,
                                                          "image_size": 64, "resize": "default"}
  # The oracle: tiny images of both splits in float64, nearest by cosine.
  train = data.get_source(config.data, "train", SPEC)
  test = data.get_source(config.data, "test", SPEC)
  g = reference(train.get_batch(np.arange(len(train)))["image"], 16, False)
  train_latlng = np.asarray(train.get_batch(np.arange(len(train)))["latlng"], np.float64)
  test_batch = test.get_batch(np.arange(len(test)))
  q = reference(test_batch["image"], 16, False)
  scores = q @ g.T
  best = scores.argmax(axis=1)
  rows = inference.read_predictions(workdir / "eval" / "test-step2" / "predictions" / "knn-1.jsonl")
  assert len(rows) == len(test) == 64
  predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in rows])
  differ = np.flatnonzero(np.abs(predicted - train_latlng[best]).max(axis=1) > 1e-4)
  for i in differ:  # only a tie (to float32 rounding) may name another row
    chosen = np.flatnonzero(np.abs(train_latlng - predicted[i]).max(axis=1) < 1e-4)
    assert np.isclose(scores[i, chosen].max(), scores[i, best[i]], rtol=0, atol=1e-6), i
  assert len(differ) <= 2
  # The recipe's table: the knn:1 row (labelled by its embedding) and the oracle row, unprefixed.
  assert "kNN (tiny_image:16) knn:1" in out["results"] and "oracle:nearest_train" in out["results"]
  assert out["results"]["kNN (tiny_image:16) knn:1"]["evaluated"] == 64


def test_the_oracle_rows_of_the_evaluation(tiny_recipe):
  """oracle:nearest_train is the nearest training location (float64 haversine brute force);
  oracle:knn:10 (the predictor's best-of-pool oracle) the listed neighbour nearest to the truth."""
  config, workdir, out = tiny_recipe
  predictions = workdir / "eval" / "test-step2" / "predictions"
  rows = inference.read_predictions(predictions / "oracle-nearest_train.jsonl")
  train = data.training_locations(config.data, SPEC)
  truth = np.asarray([[r["true_lat"], r["true_lon"]] for r in rows])
  distances = metrics.haversine_km(truth[:, None, :], train[None, :, :])  # [64, 2000] float64
  np.testing.assert_allclose([r["error_km"] for r in rows], distances.min(axis=1), rtol=1e-12, atol=1e-9)
  np.testing.assert_array_equal([r["train_row"] for r in rows], distances.argmin(axis=1))
  assert out["results"]["oracle:nearest_train"] == evaluation.score_predictions(rows)
  results = json.loads((workdir / "eval" / "test-step2" / "results.json").read_text())["results"]
  assert set(results) == {"knn:1", "knn:10:vote", "oracle:knn:10", "oracle:nearest_train"}  # no oracle of a pool of one
  assert set(out["results"]) == {"kNN (tiny_image:16) knn:1", "kNN (tiny_image:16) knn:10:vote",
                                 "oracle:knn:10", "oracle:nearest_train"}
  # The best-of-pool oracle over the 10 stored neighbours (chosen in float32 on the devices).
  lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, "test"))
  listed = metrics.haversine_km(truth[:, None, :], train[np.asarray(lists.indices[:, :10])])  # [64, 10]
  best = np.asarray([r["error_km"] for r in inference.read_predictions(predictions / "oracle-knn-10.jsonl")])
  np.testing.assert_allclose(best, listed.min(axis=1), rtol=1e-4, atol=1e-2)
  knn_1 = np.asarray([r["error_km"] for r in inference.read_predictions(predictions / "knn-1.jsonl")])
  assert not (predictions / "oracle-knn-1.jsonl").exists()  # a pool of one has no oracle row
  # (the pools' locations are the stores' float32 coordinates: centimetres off the float64 ones)
  assert (distances.min(axis=1) <= best + 1e-3).all() and (best <= knn_1 + 1e-3).all()


def test_online_retrieval_embeds_queries_with_the_tiny_image_embedder(tiny_recipe):
  config, workdir, _ = tiny_recipe
  restored = inference.restore_model(str(workdir))
  online = inference.OnlineRetrieval(config, str(workdir), restored.spec, restored.mesh)
  assert isinstance(online.embedder, inference.TinyImageEmbedder) and online.aligner is None
  images = data.get_source(config.data, "test", restored.spec).get_batch(np.arange(16))["image"]
  found = online({"image": images, "index": np.arange(16, dtype=np.int32)})
  lists = neighbors.open_neighbors(sources.neighbors_dir(config, workdir, "test"))
  np.testing.assert_array_equal(found["neighbor_tokens"],
                                sources.get_source(config, str(workdir), "test", restored.spec).get_batch(
                                    np.arange(16))["neighbor_tokens"])
  np.testing.assert_allclose(found["neighbor_scores"], lists.scores[:16, :config.retrieval.k], atol=1e-6)
  # A run reading the stores without the recipe block (e.g. another run's, by absolute paths)
  # still embeds its queries with the gallery's tiny-image embedding, not an aligner.
  plain = ml_collections.ConfigDict(config.to_dict())
  del plain["recipe"]
  assert isinstance(inference.OnlineRetrieval(plain, str(workdir), restored.spec, restored.mesh).embedder,
                    inference.TinyImageEmbedder)
  # Other pixels than the gallery's (another image size): refused.
  other = ml_collections.ConfigDict(config.to_dict())
  other.data.image_size = 32
  with pytest.raises(sources.AlignerMismatchError, match="image_size: 64 -> 32"):
    inference.OnlineRetrieval(other, str(workdir), restored.spec, restored.mesh)
