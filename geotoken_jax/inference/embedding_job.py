"""Embedders and the embedding job: a split's images through an embedder into an embedding store
(geotoken_jax.embeddings).

  Embedder             what embeds images: identity() (what a store records of it), a jitted
                       call (global batch) -> {field: [B, D]}, the images it reads (image_size,
                       resize: data.image_resize_mode) and its mesh
  AlignerEmbedder      a restored alignment model ("image", "loc_head"[, "text_head"])
  TinyImageEmbedder    the tiny-image embedding (encoders.tiny_image: "tiny"), no model
  tiny_image_embedder  the tiny-image embedder of a run's images (its data block)
  embed_function       an alignment model's jitted embedding function
  run_embedding        the embedding job
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Protocol

import jax
import ml_collections
from flax import nnx

from geotoken_jax import data, embeddings, models, sharding
from geotoken_jax.encoders import tiny_image
from geotoken_jax.inference.restore import (RestoredModel, evaluate_config, image_size, load_run_config,
                                            restore_model, token_spec)


class Embedder(Protocol):
  """Anything whose embeddings a store holds and retrieval searches."""
  mesh: jax.sharding.Mesh
  image_size: int  # the side of the square images it reads
  resize: str  # how they are decoded (data.image_resize_mode)

  def identity(self) -> dict:
    """What a store records of it (manifest `extra`, embeddings.aligner_identity reads it back)."""

  def describe(self) -> dict:
    """More of the manifest's `extra`: descriptive, never compared."""

  def __call__(self, batch: dict) -> dict:
    """(global batch with "image" uint8 [B, H, W, 3]) -> {field: [B, D]} (jitted)."""


def _check_alignment(restored: RestoredModel) -> None:
  if not models.align.is_alignment(restored.config.model):
    raise ValueError(f"{getattr(restored, 'workdir', '') or 'this run'} holds a GeoToken model; embeddings come "
                     "from an alignment model (trained with an alignment config, e.g. configs/earth.py:align) or "
                     "the tiny-image embedding (embed --embedding tiny_image)")


def embed_function(restored: RestoredModel):
  """The jitted (global batch) -> {"image", "loc_head"[, "text_head"]: [B, D]} of an alignment model."""
  _check_alignment(restored)
  graphdef, params = restored.graphdef, restored.params
  batch_sharding = sharding.batch_sharding(restored.mesh)
  fn = jax.jit(lambda p, batch: nnx.merge(graphdef, p).embed(batch),
               in_shardings=(restored.param_shardings, batch_sharding), out_shardings=batch_sharding)
  return lambda batch: fn(params, {"image": batch["image"]})


class AlignerEmbedder:
  """A restored alignment model as an Embedder; embed_fn: its embed_function (default built on
  the first call); mesh: default the restored model's."""

  def __init__(self, restored: RestoredModel, embed_fn=None, mesh=None):
    if embed_fn is None:
      _check_alignment(restored)
    self.restored = restored
    self.mesh = mesh if mesh is not None else restored.mesh
    self._embed = embed_fn

  @property
  def image_size(self) -> int:
    return image_size(self.restored.config.model)

  @property
  def resize(self) -> str:
    return data.image_resize_mode(self.restored.config)

  def identity(self) -> dict:
    return self.restored.identity()

  def describe(self) -> dict:
    return {"workdir": str(self.restored.workdir),
            "model": json.loads(self.restored.config.model.to_json_best_effort())}

  def __call__(self, batch: dict) -> dict:
    if self._embed is None:
      self._embed = embed_function(self.restored)
    return self._embed(batch)


@functools.lru_cache(maxsize=8)
def _tiny_image_function(spec: tiny_image.TinyImageSpec):
  return jax.jit(lambda images: {tiny_image.FIELD: tiny_image.embed(images, spec)})


class TinyImageEmbedder:
  """The tiny-image embedding (geotoken_jax.encoders.tiny_image) as an Embedder: one field,
  "tiny" [B, spec.dim]; no parameters.  image_size and resize: the pixels it is given (those of
  the run's data pipeline), part of its identity, so a store of other pixels is refused."""

  def __init__(self, spec: tiny_image.TinyImageSpec, *, image_size: int, resize: str, mesh: jax.sharding.Mesh):
    self.spec, self.image_size, self.resize, self.mesh = spec, int(image_size), str(resize), mesh

  def identity(self) -> dict:
    return tiny_image.identity(self.spec, self.image_size, self.resize)

  def describe(self) -> dict:
    return {"spec": str(self.spec)}

  def __call__(self, batch: dict) -> dict:
    images = batch["image"]
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"the tiny-image embedder was set up for {self.image_size}px images, this batch has "
                       f"{tuple(images.shape[1:3])}")
    return _tiny_image_function(self.spec)(images)


def tiny_image_embedder(spec: tiny_image.TinyImageSpec | str, config: ml_collections.ConfigDict, mesh=None,
                        devices=None) -> TinyImageEmbedder:
  """The tiny-image embedder of a run's images: data.image_size, decoded as data.image_resize_mode
  (the same pixels the run's model sees); mesh: default the config's over `devices`."""
  spec = tiny_image.parse(spec) if isinstance(spec, str) else spec
  mesh = mesh if mesh is not None else sharding.create_mesh(config.mesh, devices)
  return TinyImageEmbedder(spec, image_size=int(config.data.get("image_size", 224)),
                           resize=data.image_resize_mode(config), mesh=mesh)


def run_embedding(workdir, output_dir, *, split: str | None = None, source=None, split_label: str | None = None,
                  step: int | None = None, batch_size: int | None = None, dtype: str = "float16",
                  fields: Sequence[str] | None = None, limit: int = 0, devices=None, overwrite: bool = False,
                  shard_rows: int = 65536, restored: RestoredModel | None = None, embedder: Embedder | None = None,
                  config: ml_collections.ConfigDict | None = None) -> dict:
  """Every image of a split (or `source`) through an embedder, stored by geotoken_jax.embeddings
  (sharded .npy arrays + manifest; resumable, multi-host).  Returns the manifest.

  The embedder: `embedder` (e.g. tiny_image_embedder), else the workdir's alignment model
  (`restored`, or restored here).  `config`: whose data block and token spec the records come
  from (default the aligner's saved config; a tiny-image embedder needs it, or a `workdir`
  holding a run's config).  The manifest's `extra` names the embedder (its identity(): an
  aligner's workdir, step and parameter checksum; a tiny-image embedding's size, colour and
  input pixels; embeddings.aligner_identity reads it): resuming a store another embedder
  started is refused (embeddings.SettingsMismatchError) unless overwrite."""
  if embedder is None:
    restored = restored if restored is not None else restore_model(workdir, step=step, devices=devices)
    embedder = AlignerEmbedder(restored)
  if config is None:
    if isinstance(embedder, AlignerEmbedder):
      config = embedder.restored.config
    elif workdir:
      config = load_run_config(workdir, step)  # the run's saved config: its data block
    else:
      raise ValueError("run_embedding: a tiny-image embedder needs `config` (the data it reads)")
  spec = embedder.restored.spec if isinstance(embedder, AlignerEmbedder) else token_spec(config)
  if source is None:
    split = split or config.test_split
    source = data.get_source(config.data, split, spec, resize=embedder.resize)
  else:
    split = split_label or split or "source"
  if limit:
    source = data.FirstRows(source, limit)
  global_batch = int(batch_size or evaluate_config(config).batch_size)
  identity = {**embedder.describe(), **embedder.identity(), "split": split,
              "tokens": {"level": spec.level, "group_size": spec.group_size}}
  if isinstance(embedder, AlignerEmbedder) and workdir:
    identity["workdir"] = str(workdir)
  return embeddings.write_embeddings(embedder, source, output_dir, mesh=embedder.mesh,
                                     global_batch_size=global_batch, dtype=dtype, fields=fields,
                                     manifest_extra=identity, shard_rows=shard_rows, overwrite=overwrite)
