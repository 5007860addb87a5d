"""Identities end to end and the lean retrieval pipeline: the aligner's parameter checksum, the
recipe's embed decision, lists whose settings differ from the config refused by name, every
store and list a run reads checked before its first step, retrieval sources that pickle as
directories (what grain workers receive) and batches that carry only what the model reads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geotoken_jax import embeddings, models, recipe, s2, sharding, trainer
from geotoken_jax.data import pipeline
from geotoken_jax.inference import restore
from geotoken_jax.models import geotoken
from geotoken_jax.retrieval import join, neighbors, sources
from array_source import ArraySource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(20, 2)
DIMS = {"image": 12, "loc_head": 8}
SETTINGS = dict(neighbors.DEFAULT_SETTINGS, fields=("image", "loc_head"), k=6, chunk_rows=16, query_batch=8,
                block_rows=25, duplicate_km=1.0, duplicate_similarity=0.95, group="")


def load_config(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# ---------------------------------------------------------------------------
# Stores and lists of planted records.


def planted(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  latlng = np.stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)], -1).astype(np.float32)
  tokens = s2.latlng_to_tokens(latlng[:, 0].astype(np.float64), latlng[:, 1].astype(np.float64), SPEC)
  return {"f_image": rng.normal(size=(n, DIMS["image"])).astype(np.float32),
          "f_loc_head": rng.normal(size=(n, DIMS["loc_head"])).astype(np.float32),
          "latlng": latlng, "tokens": tokens.astype(np.int32), "id": np.arange(n, dtype=np.int64) + 10_000 * seed}


class PlantedSource:
  """The records of planted(n, seed), rebuilt from (n, seed) when unpickled: a data source that
  pickles small, as the prepared data sets' do (they reopen their files)."""

  def __init__(self, n: int, seed: int = 0):
    self.n, self.seed = n, seed
    self.arrays = planted(n, seed)

  def __getstate__(self):
    return {"n": self.n, "seed": self.seed}

  def __setstate__(self, state):
    self.__init__(state["n"], state["seed"])

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}

  def get_batch(self, indices, positions=None):
    del positions
    return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}

  def index_arrays(self):
    return {"tokens": self.arrays["tokens"], "latlng": self.arrays["latlng"].astype(np.float64)}


def one_device():
  """Writes and searches here run on one device (the 8-device paths have their own tests): no
  collectives to wait on a loaded 2-core machine."""
  return sharding.create_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1])


def write_store(arrays: dict, directory, *, extra=None, shard_rows: int = 16) -> embeddings.Embeddings:
  fn = lambda b: {"image": b["f_image"], "loc_head": b["f_loc_head"]}  # noqa: E731
  embeddings.write_embeddings(fn, ArraySource(arrays),
                              str(directory), mesh=one_device(), global_batch_size=64, dtype="float32",
                              shard_rows=shard_rows, progress=False, manifest_extra=extra)
  return embeddings.open_embeddings(str(directory))


def retrieval_config(model: str = "features", **retrieval) -> ml_collections.ConfigDict:
  """A config whose retrieval block reads WORKDIR/embeddings/<split> and WORKDIR/neighbors/<split>."""
  if model == "features":
    cfg = models.model_config("paper")
    cfg.update(d_model=32, num_heads=2, ff_dim=64, encoder_layers=1, decoder_layers=1)
    cfg.features.update(num_neighbors=4, num_features=2, feature_dim=max(DIMS.values()))
  else:  # an image encoder with a neighbour memory
    cfg = models.model_config("earth_tiny")
    cfg.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16, patch_size=8)
    cfg.update(d_model=32, num_heads=2, ff_dim=64, decoder_layers=1, neighbor_memory=True)
    cfg.features.num_neighbors = 4
  block = {"k": 4, "alignment_workdir": "align", "embeddings": "embeddings", "neighbors": "neighbors",
           "gallery": "train", "fields": ("image", "loc_head"), "search_k": SETTINGS["k"], "dtype": "float32",
           "chunk_rows": 16, "query_batch": 8, "margin": 16, "block_rows": 25, "same_id": True,
           "duplicate_km": 1.0, "duplicate_similarity": 0.95, "group": "", "dropout": 0.0, "shuffle": False}
  block.update(retrieval)
  return ml_collections.ConfigDict({"seed": 0, "model": cfg, "retrieval": block})


def build_run(workdir, *, splits=("train", "test"), index_settings=None, extra=None) -> dict:
  """Stores for every split and lists for each (searched with index_settings, default the config's)."""
  arrays = {"train": planted(60, 0), "validation": planted(20, 1), "test": planted(20, 2)}
  for split in dict.fromkeys(["train", *splits]):
    write_store(arrays[split], workdir / "embeddings" / split, extra=extra)
  neighbors.run_index(workdir / "embeddings", workdir / "neighbors", gallery="train", queries=list(splits),
                      settings=index_settings or SETTINGS, progress=False, mesh=one_device())
  return arrays


# ---------------------------------------------------------------------------
# 1a. The aligner's identity: a parameter checksum, and the recipe's decision.


def checksum_oracle(params) -> str:
  """params_checksum in NumPy on the host (the same definition, computed element by element in
  uint64 and reduced mod 2^32)."""
  def fmix(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)

  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  named = sorted(("/".join(str(getattr(k, "key", k)) for k in path), np.asarray(leaf)) for path, leaf in flat)
  for name, leaf in named:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[leaf.dtype.itemsize]
    words = leaf.reshape(-1).view(unsigned).astype(np.uint64)
    key = (np.arange(words.size, dtype=np.uint64) * 0x9E3779B9) & 0xFFFFFFFF
    sums = [int(fmix(words ^ fmix((key + seed) & 0xFFFFFFFF)).sum() % 2**32) for seed in (0x632BE5AB, 0x85157AF5)]
    digest.update(f"{name}|{leaf.dtype.name}|{leaf.shape}|{sums[0]:08x}{sums[1]:08x};".encode())
  return digest.hexdigest()[:16]


def test_params_checksum_is_the_oracles_on_one_device_and_eight_and_any_bit_changes_it():
  rng = np.random.default_rng(0)
  params = {"head": {"kernel": rng.normal(size=(64, 24)).astype(np.float32),
                     "bias": rng.normal(size=(24,)).astype(np.float32)},
            "half": np.asarray(rng.normal(size=(16, 8)), jnp.bfloat16), "count": np.int32(7)}
  want = checksum_oracle(params)
  assert restore.params_checksum(jax.tree.map(jnp.asarray, params)) == want
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  specs = {"head": {"kernel": PartitionSpec("data", "fsdp"), "bias": PartitionSpec("fsdp")},
           "half": PartitionSpec(None, "data"), "count": PartitionSpec()}
  sharded = jax.tree.map(lambda x, p: jax.device_put(x, NamedSharding(mesh, p)), params, specs)
  assert restore.params_checksum(sharded) == want
  # One ulp of one parameter, a swap of two values, a renamed leaf: each another checksum.
  bumped = jax.tree.map(np.array, params)
  bumped["head"]["kernel"][5, 3] = np.nextafter(bumped["head"]["kernel"][5, 3], np.float32(np.inf))
  swapped = jax.tree.map(np.array, params)
  swapped["head"]["bias"][[0, 1]] = swapped["head"]["bias"][[1, 0]]
  renamed = {"head2": params["head"], "half": params["half"], "count": params["count"]}
  got = {restore.params_checksum(p) for p in (params, bumped, swapped, renamed)}
  assert len(got) == 4


def test_embed_action_reembeds_a_store_of_another_aligner_even_with_the_same_record_count(tmp_path):
  aligner = {"workdir": str(tmp_path / "align"), "step": 300, "params": "0123456789abcdef"}
  arrays = planted(20)
  act = lambda d, **kw: recipe.embed_action(  # noqa: E731
      d, **{"num_records": 20, "aligner": aligner, "dtype": "float32", **kw})
  assert act(tmp_path / "none")[0] == "embed"
  write_store(arrays, tmp_path / "same", extra=dict(aligner, split="train"))
  assert act(tmp_path / "same")[0] == "skip"
  # The oracle: every store another aligner wrote (or one that does not say) is overwritten.
  cases = {"params": dict(aligner, params="fedcba9876543210"), "step": dict(aligner, step=200),
           "(not recorded)": {k: v for k, v in aligner.items() if k != "params"}}
  for word, extra in cases.items():
    write_store(arrays, tmp_path / word.strip("()").replace(" ", "_"), extra=extra)
    action, why = act(tmp_path / word.strip("()").replace(" ", "_"))
    assert action == "overwrite" and "another aligner" in why and word in why, (word, why)
  # A moved or copied aligner workdir holds the same aligner: its stores are kept.
  write_store(arrays, tmp_path / "moved", extra=dict(aligner, workdir=str(tmp_path / "elsewhere"), split="train"))
  assert act(tmp_path / "moved")[0] == "skip"
  assert act(tmp_path / "same", num_records=21) == ("overwrite", "it holds 20 records, the split has 21")
  assert act(tmp_path / "same", dtype="float16")[0] == "overwrite"
  manifest = json.loads((tmp_path / "same" / "manifest.json").read_text())
  manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]
  (tmp_path / "same" / "manifest.json").write_text(json.dumps(manifest))
  assert act(tmp_path / "same")[0] == "resume"


def test_online_retrieval_refuses_a_gallery_of_another_aligner(tmp_path):
  identity = {"workdir": "/runs/align", "step": 300, "params": "0123456789abcdef"}
  store = write_store(planted(20), tmp_path / "gallery", extra=dict(identity, split="train"))
  sources.check_gallery_aligner(store, dict(identity, workdir="/moved/align"))  # content, not folders
  for key, value in (("params", "fedcba9876543210"), ("step", 301)):
    with pytest.raises(sources.AlignerMismatchError, match=rf"{key}: .* -> {value!r}"):
      sources.check_gallery_aligner(store, dict(identity, **{key: value}))


# ---------------------------------------------------------------------------
# 1b. Lists searched with other settings than the config's, refused by name.


@pytest.mark.parametrize("field,stored,configured", [("group", "s2_cell:4", ""), ("duplicate_km", 5.0, 1.0),
                                                     ("search_k", 8, 6)])
def test_lists_whose_settings_differ_from_the_config_are_refused_by_name(tmp_path, field, stored, configured):
  setting = "k" if field == "search_k" else field
  build_run(tmp_path, splits=("train",), index_settings=dict(SETTINGS, **{setting: stored}))
  config = retrieval_config(**{field: configured})
  source = PlantedSource(60)
  with pytest.raises(join.ListSettingsError) as error:
    sources.wrap_source(config, tmp_path, "train", source, SPEC, training=True)
  message = str(error.value)
  assert f"{setting} = {stored!r} (the config's retrieval.{field} is {configured!r})" in message
  assert "--overwrite" in message and "recipe" in message
  # The config with the lists' value reads them; performance-only settings may differ.
  config = retrieval_config(**{field: stored}, chunk_rows=1024, query_batch=64, block_rows=7)
  batch = sources.wrap_source(config, tmp_path, "train", source, SPEC, training=True).get_batch(np.arange(4))
  assert batch["neighbor_tokens"].shape == (4, 4, SPEC.num_positions)


# ---------------------------------------------------------------------------
# 1c. Every store and list set a run reads, checked before the first training step.


def earth_retrieval_config():
  config = load_config("earth", "retrieval_smoke")
  config.retrieval.update(fields=("image", "loc_head"), search_k=SETTINGS["k"], k=4, chunk_rows=16, query_batch=8,
                          block_rows=25, group="")
  config.model.features.update(num_neighbors=4, feature_dim=max(DIMS.values()))
  return config


def test_a_missing_test_list_is_refused_before_the_first_training_step(tmp_path, monkeypatch):
  build_run(tmp_path, splits=("train", "validation"))
  write_store(planted(20, 2), tmp_path / "embeddings" / "test")  # embedded, never indexed

  def reached(*args, **kwargs):
    raise AssertionError("training started")

  monkeypatch.setattr(trainer, "create_train_state", reached)
  monkeypatch.setattr(trainer.data, "train_iterator", reached)
  config = earth_retrieval_config()
  with pytest.raises(sources.MissingInputsError) as error:
    trainer.train_and_evaluate(config, tmp_path)
  message = str(error.value)
  assert f"neighbour lists of 'test': {tmp_path / 'neighbors' / 'test'}" in message
  assert "validation" not in message.split("missing or incomplete")[1]  # only what is missing is named
  assert not (tmp_path / "checkpoints").exists()
  # Everything missing is named at once.
  assert sorted(p.split(":")[0] for p in sources.missing_inputs(config, tmp_path / "empty", ["train", "test"])) == [
      "embeddings of 'test'", "embeddings of 'train'", "neighbour lists of 'test'", "neighbour lists of 'train'"]


def test_a_split_embedded_by_another_aligner_than_the_gallery_is_refused(tmp_path):
  identity = {"workdir": "/runs/align", "step": 300, "params": "0123456789abcdef"}
  write_store(planted(60, 0), tmp_path / "embeddings" / "train", extra=identity)
  write_store(planted(20, 2), tmp_path / "embeddings" / "test", extra=dict(identity, params="fedcba9876543210"))
  neighbors.run_index(tmp_path / "embeddings", tmp_path / "neighbors", gallery="train", queries=["train", "test"],
                      settings=SETTINGS, progress=False, mesh=one_device())
  with pytest.raises(sources.AlignerMismatchError, match="'test'.*params: gallery '0123456789abcdef', test"):
    sources.check_inputs(retrieval_config(), tmp_path, ["train", "test"])


# ---------------------------------------------------------------------------
# 2a. What grain workers receive: directories and manifests, never the arrays.


def retrieval_source(workdir, n: int, **kwargs) -> join.RetrievalSource:
  store = write_store(planted(n), workdir / "embeddings" / "train", shard_rows=65536)
  neighbors.index_split(store, store, workdir / "neighbors" / "train", mesh=one_device(), progress=False,
                        settings=dict(SETTINGS, block_rows=65536, chunk_rows=2048, query_batch=2048), same_split=True)
  lists = neighbors.open_neighbors(workdir / "neighbors" / "train")
  gallery = join.NeighborGallery(store, ("image", "loc_head"), SPEC)
  return join.RetrievalSource(PlantedSource(n), query_store=store, neighbors=lists, gallery=gallery, k=4,
                              dropout=0.3, shuffle=True, seed=1, **kwargs)


def store_bytes(directory) -> int:
  return sum(f.stat().st_size for f in directory.rglob("*.npy"))


def test_a_retrieval_source_pickles_as_directories_and_gives_the_same_batches(tmp_path):
  small = retrieval_source(tmp_path / "small", 60)
  large = retrieval_source(tmp_path / "large", 6000, training=True, keep_image=False)
  rows, positions = np.arange(0, 60, 3), np.arange(20) + 500
  sizes = {}
  for name, source in (("small", small), ("large", large)):
    source.get_batch(rows, positions)  # memory-maps every file, loads the index arrays
    _ = source._gallery.tokens, source._gallery.latlng  # noqa: F841 (whole-gallery arrays, once)
    payload = pickle.dumps(pipeline._LoadRows(source))  # what grain sends each worker
    sizes[name] = len(payload)
    again = pickle.loads(payload).source
    assert not again._query_store._files and again._metadata is None and again._gallery._tokens is None
    want, got = source.get_batch(rows, positions), again.get_batch(rows, positions)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # 100x the records, 100x the bytes on disk: the same pickle, a few kB.
  assert store_bytes(tmp_path / "large") > 100 * store_bytes(tmp_path / "small") / 2
  assert abs(sizes["large"] - sizes["small"]) < 256 and sizes["large"] < 16_000, sizes


def test_grain_workers_read_the_same_retrieval_batches(tmp_path):
  source = retrieval_source(tmp_path, 60)
  take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
  want = take(pipeline.train_iterator(source, global_batch_size=8, seed=3), 3)
  it = pipeline.train_iterator(source, global_batch_size=8, seed=3, worker_count=1)
  try:
    got = take(it, 3)
  finally:
    it.close()
  for a, b in zip(want, got, strict=True):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------
# 2b. Batches carry what the model reads.


@pytest.mark.parametrize("model", ["features", "vit"])
def test_batches_carry_the_neighbour_fields_the_model_reads(tmp_path, model):
  build_run(tmp_path, splits=("train",))
  config = retrieval_config(model)
  built = models.build_model(config.model, SPEC, rngs=nnx.Rngs(0))
  assert geotoken.input_keys(config.model) == built.input_keys  # the config's keys are the model's
  batch = sources.wrap_source(config, tmp_path, "train", PlantedSource(60), SPEC).get_batch(np.arange(5))
  sent = set(batch) & set(join.NEIGHBOR_FIELDS)
  if model == "features":
    assert sent == set(join.NEIGHBOR_FIELDS)
  else:  # ViT + neighbour memory: the tokens and scores it reads, and what the kNN strategies read
    assert sent == {"neighbor_tokens", "neighbor_scores", "neighbor_latlng", "neighbor_valid"}
  assert set(built.input_keys) - {"image"} <= set(batch)


# ---------------------------------------------------------------------------
# 2c. The paper config validates as it tests.


def test_the_paper_config_validates_on_an_interleaved_id_holdout():
  config = load_config("paper", "mp16")
  assert config.data.splits.validation == "mp16:train:holdout" and config.data.holdout.by == "id"
  # The aligner trains on the same rest: no validation photo was seen by the model that embeds it.
  assert config.recipe.alignment.data.holdout.to_dict() == config.data.holdout.to_dict()
  assert config.retrieval.group == ""  # the training lists hold no group rule: nothing is cell-blocked
  assert "validation" in config.recipe.splits and config.retrieval.gallery != "validation"  # regime "test"
  assert math.isclose(config.data.holdout.fraction, 0.01)
