"""Embeddings of an alignment model: its jitted embedding function, and a split's images
through it into an embedding store (geotoken_jax.embeddings)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
from flax import nnx

from geotoken_jax import data, embeddings, models, sharding
from geotoken_jax.inference.restore import RestoredModel, evaluate_config, restore_model


def embed_function(restored: RestoredModel):
  """The jitted (global batch) -> {"image", "loc_head"[, "text_head"]: [B, D]} of an alignment model."""
  if not models.align.is_alignment(restored.config.model):
    raise ValueError(f"{restored.workdir or 'this run'} holds a GeoToken model; embeddings come from an "
                     "alignment model (trained with an alignment config, e.g. configs/earth.py:align)")
  graphdef, params = restored.graphdef, restored.params
  batch_sharding = sharding.batch_sharding(restored.mesh)
  fn = jax.jit(lambda p, batch: nnx.merge(graphdef, p).embed(batch),
               in_shardings=(restored.param_shardings, batch_sharding), out_shardings=batch_sharding)
  return lambda batch: fn(params, {"image": batch["image"]})


def run_embedding(workdir, output_dir, *, split: str | None = None, source=None, split_label: str | None = None,
                  step: int | None = None, batch_size: int | None = None, dtype: str = "float16",
                  fields: Sequence[str] | None = None, limit: int = 0, devices=None, overwrite: bool = False,
                  shard_rows: int = 65536, restored: RestoredModel | None = None) -> dict:
  """Every image of a split (or `source`) through the workdir's alignment model, stored by
  geotoken_jax.embeddings (sharded .npy arrays + manifest; resumable, multi-host).  Returns
  the manifest.  The manifest's `extra` names the aligner (RestoredModel.identity(): workdir,
  step, parameter checksum; embeddings.aligner_identity reads it): resuming a store another
  aligner started is refused (embeddings.SettingsMismatchError) unless overwrite.
  `restored`: the workdir's model already restored (the recipe's), else it is restored here."""
  restored = restored if restored is not None else restore_model(workdir, step=step, devices=devices)
  config = restored.config
  if source is None:
    split = split or config.test_split
    source = data.get_source(config.data, split, restored.spec, resize=data.image_resize_mode(config))
  else:
    split = split_label or split or "source"
  if limit:
    source = data.FirstRows(source, limit)
  global_batch = int(batch_size or evaluate_config(config).batch_size)
  identity = {**restored.identity(), "workdir": str(workdir), "split": split,
              "model": json.loads(config.model.to_json_best_effort()),
              "tokens": {"level": restored.spec.level, "group_size": restored.spec.group_size}}
  return embeddings.write_embeddings(embed_function(restored), source, output_dir, mesh=restored.mesh,
                                     global_batch_size=global_batch, dtype=dtype, fields=fields,
                                     manifest_extra=identity, shard_rows=shard_rows, overwrite=overwrite)
