"""A fitted reranker on disk, and the pools it is fitted on.

  fingerprint                        what identifies a fitted reranker (its settings file)
  save_reranker / restore_reranker   DIR/reranker.json (settings: the feature names, tau,
                                     support radii, hidden sizes, the pool strategy, how it
                                     was fitted) + DIR/params (an orbax checkpoint of the
                                     model's state, standardization included)
  collect_pool_features              a split through the Predictor with export_features:
                                     each image's union-pool features, candidate locations,
                                     validity and true location (host arrays)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from geotoken_jax import sharding
from geotoken_jax.checkpoint import as_path
from geotoken_jax.decoding.strategies import Strategy
from geotoken_jax.inference.predictor import FEATURES_PREFIX, predict_batches
from geotoken_jax.models.reranker import Reranker

SETTINGS_FILE = "reranker.json"
PARAMS_DIR = "params"
# What collect_pool_features returns (the first four from the predictor, then the labels).
POOL_ARRAYS = ("features", "latlng", "valid", "neighbor_valid", "truth", "index")


@dataclasses.dataclass
class RestoredReranker:
  graphdef: nnx.GraphDef
  params: Any  # nnx.State (standardization + weights)
  settings: dict
  directory: str

  def model(self) -> Reranker:
    return nnx.merge(self.graphdef, self.params)


def build_reranker(settings: dict, seed: int = 0) -> Reranker:
  return Reranker(len(settings["features"]), tuple(settings["hidden"]), rngs=nnx.Rngs(seed))


def save_reranker(directory, model: Reranker, settings: dict) -> None:
  """Writes the model's state and its settings (process 0 writes the JSON; orbax coordinates
  the checkpoint)."""
  directory = as_path(directory)  # orbax wants an absolute path (or a URL)
  directory.mkdir(parents=True, exist_ok=True)
  state = nnx.state(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, state, force=True)
  if jax.process_index() == 0:
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, default=float))


def fingerprint(directory) -> str:
  """sha256 of the saved settings (features, snap radius, how and on what it was fitted, its
  out-of-fold figures): what an evaluation records, so predictions of a refitted reranker are
  never mixed with the old ones."""
  return hashlib.sha256((epath.Path(directory) / SETTINGS_FILE).read_bytes()).hexdigest()


def is_fitted(directory) -> bool:
  directory = epath.Path(directory)
  return (directory / SETTINGS_FILE).exists() and (directory / PARAMS_DIR).exists()


def restore_reranker(directory, mesh=None) -> RestoredReranker:
  """The reranker saved in `directory`, its state replicated over `mesh` (default: all devices)."""
  directory = as_path(directory)
  if not is_fitted(directory):
    raise FileNotFoundError(f"no fitted reranker in {directory} (expected {SETTINGS_FILE} and {PARAMS_DIR}/): fit "
                            "one with python -m geotoken_jax.rerank or the recipe's rerank stage")
  settings = json.loads((directory / SETTINGS_FILE).read_text())
  abstract = nnx.eval_shape(lambda: build_reranker(settings))
  graphdef, abstract_state = nnx.split(abstract)
  mesh = mesh or sharding.create_mesh({"data": -1})
  replicated = sharding.replicated(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(directory / PARAMS_DIR, target)
  return RestoredReranker(graphdef, state, settings, str(directory))


def collect_pool_features(predictor, source, pool: Strategy, *, global_batch_size: int, transform=None) -> dict:
  """Every image of `source` through a Predictor built with export_features=True: host arrays
  features [n, M, F] float32, latlng [n, M, 2] (candidate cell centres), valid [n, M] bool,
  neighbor_valid [n, K] bool (the pool's retrieved entries' neighbours), truth [n, 2] float64,
  index [n] (the rows' numbers in the source); padding rows dropped."""
  key = FEATURES_PREFIX + pool.name
  parts: dict[str, list] = {name: [] for name in POOL_ARRAYS}
  for _, gathered, out in predict_batches(predictor, source, global_batch_size=global_batch_size, text_fields=(),
                                          transform=transform):
    if key not in out:
      raise ValueError(f"the predictor exports no features of {pool.name} (a union pool, export_features=True)")
    mask = gathered["mask"].astype(bool)
    for name in POOL_ARRAYS[:4]:
      parts[name].append(np.asarray(out[key][name])[mask])
    parts["truth"].append(np.asarray(gathered["latlng"], np.float64)[mask])
    parts["index"].append(np.asarray(gathered["index"])[mask])
  return {name: np.concatenate(values) for name, values in parts.items()}
