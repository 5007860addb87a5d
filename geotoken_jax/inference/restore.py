"""Restoring a run: its config (saved with the checkpoint), TokenSpec, parameters on a mesh,
and the alignment model its strategies need.

  load_run_config(workdir)    the config the run was trained with
  restore_model(workdir)      RestoredModel: config, spec, graphdef, params on a mesh, step
  restore_aligner(...)        the alignment model of gallery:K / similarity / fused strategies
  evaluate_config(config)     the config's `evaluate` block over EVALUATE_DEFAULTS
  token_spec, image_size      what a config's tokens and model read
  params_checksum(params)     a stable digest of parameter values (what an embedding store
                              records of the aligner that wrote it)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from geotoken_jax import checkpoint, models, optim, s2, sharding
from geotoken_jax.decoding import strategies
from geotoken_jax.decoding.strategies import Strategy


EVALUATE_DEFAULTS = ml_collections.ConfigDict({
    "strategies": "greedy,beam:5",
    "batch_size": 128,  # global images per decode batch
    "num_candidates": 5,
    "seed": 0,  # sampling keys: fold_in(key(seed), image index)
    "plot_max_points": 2000,
    # An alignment model's workdir, for gallery:K and the similarity / fused rules of a
    # GeoToken model ("" = none; an alignment model's own evaluation uses itself).
    "alignment_workdir": "",
    # gallery:K's locations: "train" (the training split's cells), "mp16_100k" (GeoCLIP's
    # 100K MP16 coordinates) or a CSV path with latitude / longitude columns.
    "gallery": "train",
    "gallery_limit": 0,  # > 0: an evenly spaced subset of this many gallery locations
    "fused_weight": 1.0,  # fused = log-probability + w * the alignment model's similarity logit
    # knn:K's pool log-probabilities: log-softmax(neighbour score / T) (scores are mean cosines).
    "knn_temperature": 0.05,
    # Also the label-using upper-bound rows "oracle:..." (oracle:nearest_train: each image at the
    # training location nearest to its true location); evaluate --oracles.
    "oracles": False,
    # A fitted reranker (rule rerank, on union pools): its directory, absolute or relative to
    # the evaluated run's workdir ("" = none).
    "reranker_workdir": "",
})


def evaluate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config's `evaluate` block over EVALUATE_DEFAULTS."""
  merged = ml_collections.ConfigDict(EVALUATE_DEFAULTS.to_dict())
  if "evaluate" in config:
    merged.update(config.evaluate.to_dict())
  return merged


def token_spec(config) -> s2.TokenSpec:
  return s2.TokenSpec(int(config.tokens.level), int(config.tokens.group_size))


# ---------------------------------------------------------------------------
# Restoring a model from a workdir.


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def load_run_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run was trained with: saved in its checkpoint (or WORKDIR/config.json)."""
  metadata = None
  if checkpoint_dir(workdir).exists():
    metadata = checkpoint.read_metadata(checkpoint_dir(workdir), step)
  if metadata and "config" in metadata:
    return ml_collections.ConfigDict(metadata["config"])
  for name, key in (("config.json", None), ("results.json", "config")):
    path = epath.Path(workdir) / name
    if path.exists():
      loaded = json.loads(path.read_text())
      return ml_collections.ConfigDict(loaded[key] if key else loaded)
  raise FileNotFoundError(f"{workdir} holds no checkpoint with its config and no config.json "
                          "(written by geotoken_jax.train); pass --config")


@dataclasses.dataclass
class RestoredModel:
  config: ml_collections.ConfigDict
  spec: s2.TokenSpec
  graphdef: nnx.GraphDef
  params: Any
  param_shardings: Any
  mesh: jax.sharding.Mesh
  step: int
  workdir: str = ""

  def identity(self) -> dict:
    """What names these parameters: {"workdir", "step", "params": params_checksum} (what
    run_embedding records in a store's manifest; embeddings.aligner_identity reads it back)."""
    return {"workdir": self.workdir, "step": int(self.step), "params": params_checksum(self.params)}


def abstract_params(config, spec: s2.TokenSpec, mesh) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params carrying their shardings, param shardings) of the config's model."""
  build = lambda: models.build_model(config.model, spec, rngs=nnx.Rngs(config.seed))  # noqa: E731
  graphdef, abstract = nnx.split(nnx.eval_shape(build), nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  return graphdef, checkpoint.abstract_like(abstract, shardings), shardings


def restore_model(workdir, *, config: ml_collections.ConfigDict | None = None, step: int | None = None,
                  mesh: jax.sharding.Mesh | None = None, devices=None) -> RestoredModel:
  """The run's model with the parameters of its latest (or `step`) checkpoint.

  config: None reads the config saved with the run; pass one to override it (its
  model fields must match the checkpoint).  mesh: default the config's mesh
  over `devices` (default all).  A checkpoint that fails to restore is reported
  and the next older one is tried (see geotoken_jax.checkpoint).
  """
  config = load_run_config(workdir, step) if config is None else config
  spec = token_spec(config)
  mesh = mesh if mesh is not None else sharding.create_mesh(config.mesh, devices)
  graphdef, target, shardings = abstract_params(config, spec, mesh)
  params, step = checkpoint.restore_params(checkpoint_dir(workdir), target, step)
  return RestoredModel(config, spec, graphdef, params, shardings, mesh, step, str(workdir))


def restore_aligner(config, mesh, strategies_wanted: Sequence[Strategy], alignment_workdir: str | None = None
                    ) -> RestoredModel | None:
  """The alignment model a GeoToken model's strategies need (gallery:K, similarity, fused),
  from alignment_workdir (default evaluate.alignment_workdir) on the same mesh; None when
  no strategy needs one or the model is itself an alignment model."""
  if models.align.is_alignment(config.model) or not any(strategies.needs_alignment(s) for s in strategies_wanted):
    return None
  workdir = alignment_workdir or str(evaluate_config(config).alignment_workdir)
  if not workdir:
    names = [s.name for s in strategies_wanted if strategies.needs_alignment(s)]
    raise ValueError(f"{', '.join(names)} need an alignment model: pass --alignment_workdir (or set "
                     "evaluate.alignment_workdir) to a workdir trained with an alignment config, e.g. "
                     "configs/earth.py:align")
  if config.model.encoder == "features":
    raise ValueError("similarity / fused / gallery strategies embed the query image with the alignment model; "
                     "this model reads features, not images")
  aligner = restore_model(workdir, mesh=mesh)
  if not models.align.is_alignment(aligner.config.model):
    raise ValueError(f"{workdir} holds a {aligner.config.model.get('architecture', 'geotoken')} model, not an "
                     "alignment model")
  if image_size(aligner.config.model) != image_size(config.model):
    raise ValueError(f"the alignment model in {workdir} reads {image_size(aligner.config.model)} px images, this "
                     f"model {image_size(config.model)} px: they must see the same images")
  return aligner


def image_size(model_config) -> int:
  """The side of the square images the model reads."""
  if models.align.is_alignment(model_config):
    tower = model_config.image_tower
  else:
    tower = model_config.encoder
  return int(model_config.clip.image_size if tower == "clip" else model_config.vit.image_size)


# ---------------------------------------------------------------------------
# A digest of parameter values.


def _fmix32(h):
  """murmur3's 32-bit finalizer (uint32 arithmetic wraps)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_words(x) -> jax.Array:
  """uint32 words holding every bit of x (1-, 2- and 4-byte dtypes: one word per element)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:
    raise ValueError(f"params_checksum: unsupported dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_hashes(leaves):
  """[L, 2] uint32: per leaf, two sums over its elements of fmix32(bits ^ fmix32(position-key)):
  wrapping integer sums, exact in any order (so any sharding or device count gives the same)."""
  out = []
  for x in leaves:
    words = _leaf_words(x)
    position, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):  # the row-major element number, without a reshape
      position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= words.shape[axis]
    key = position * jnp.uint32(0x9E3779B9)
    out.append(jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(key + jnp.uint32(seed))), dtype=jnp.uint32)
                          for seed in (0x632BE5AB, 0x85157AF5)]))
  return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def params_checksum(params) -> str:
  """A stable digest of a parameter tree's values (16 hex digits): sha256 over its leaves in
  path order, each as path, dtype, shape and two 32-bit hashes of its bits (_leaf_hashes).

  Computed where the parameters live (reductions on the devices, 8 bytes a leaf to the host:
  cheap for a ViT-L); the integer sums are exact whatever the reduction order, so the digest
  is the same on 1 device or 8, under any sharding, on any process.  Any changed bit of any
  parameter changes it (up to 2^-64 collisions)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  named = sorted((("/".join(map(str, optim.parameter_path(path))), leaf) for path, leaf in flat), key=lambda t: t[0])
  leaves = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for _, leaf in named]
  hashes = _leaf_hashes(leaves)
  if jax.process_count() > 1 and not hashes.is_fully_addressable:
    hashes = multihost_utils.process_allgather(hashes, tiled=True)
  hashes = np.asarray(hashes, np.uint32)
  digest = hashlib.sha256()
  for (name, leaf), (a, b) in zip(named, hashes, strict=True):
    digest.update(f"{name}|{np.dtype(leaf.dtype).name}|{tuple(leaf.shape)}|{int(a):08x}{int(b):08x};".encode())
  return digest.hexdigest()[:16]
