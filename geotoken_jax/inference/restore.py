"""Restoring a run: its config (saved with the checkpoint), TokenSpec, parameters on a mesh,
and the alignment model its strategies need.

  load_run_config(workdir)    the config the run was trained with
  restore_model(workdir)      RestoredModel: config, spec, graphdef, params on a mesh, step
  restore_aligner(...)        the alignment model of gallery:K / similarity / fused strategies
  evaluate_config(config)     the config's `evaluate` block over EVALUATE_DEFAULTS
  token_spec, image_size      what a config's tokens and model read
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from geotoken_jax import checkpoint, models, s2, sharding
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
