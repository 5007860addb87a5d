"""Device meshes and shardings: the one module that decides where arrays live.

Parameters carry logical axis names ("embed", "mlp", ...; see
geotoken_jax.models); the config's rules map each logical name to a mesh axis
(MaxText style), so the same model shards as pure data parallelism, FSDP or
both by changing `config.mesh` and `config.sharding_rules` only.

The batch is split over every mesh axis that holds data: ("data", "fsdp").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# FSDP: shard the model width of every large matrix over "fsdp"; the rest is
# replicated. Dimensions that do not divide evenly stay replicated.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("feature", None),
    ("patch", None),
    ("position", None),
)


def _axis_sizes(sizes: Mapping[str, int], what: str) -> list[int]:
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown {what} axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  out = [int(sizes.get(name, 1)) for name in MESH_AXES]
  if any(s == 0 or s < -1 for s in out):
    raise ValueError(f"{what} sizes must be >= 1 (or one -1), got {dict(zip(MESH_AXES, out))}")
  return out


def create_mesh(axis_sizes: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices (or `devices`) with axes MESH_AXES.

  axis_sizes maps each axis to its size within a slice / process group (ICI);
  one size may be -1 (the rest).  An optional "dcn" entry maps axes to their
  parallelism ACROSS slices (TPU multislice) or processes (GPU clusters), e.g.
  {"data": -1, "fsdp": 8, "dcn": {"data": 4}}: then the mesh comes from
  mesh_utils.create_hybrid_device_mesh and each axis has size ici * dcn.
  Otherwise jax.make_mesh lays the devices out for the platform's topology.
  """
  devices = list(jax.devices() if devices is None else devices)
  axis_sizes = dict(axis_sizes)
  dcn = dict(axis_sizes.pop("dcn", None) or {})
  sizes = _axis_sizes(axis_sizes, "mesh")
  dcn_sizes = _axis_sizes(dcn, "mesh.dcn")
  if -1 in dcn_sizes:
    raise ValueError(f"mesh.dcn sizes must be explicit, got {dcn}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  num_dcn = math.prod(dcn_sizes)
  if len(devices) % num_dcn:
    raise ValueError(f"{len(devices)} devices do not split into {num_dcn} DCN groups (mesh.dcn {dcn})")
  per_group = len(devices) // num_dcn
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_group % known:
      raise ValueError(f"{per_group} devices per group do not split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = per_group // known
  if math.prod(sizes) != per_group:
    total = {a: s * d for a, s, d in zip(MESH_AXES, sizes, dcn_sizes)}
    raise ValueError(f"mesh {total} needs {math.prod(sizes) * num_dcn} devices, there are {len(devices)}")
  # Devices in process order, so that on platforms without a topology (CPU)
  # each process's devices hold consecutive batch rows, which
  # make_array_from_process_local_data expects (checked below).
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if num_dcn > 1:
    granule = "slices" if devices[0].platform == "tpu" else "processes"
    try:
      array = mesh_utils.create_hybrid_device_mesh(sizes, dcn_sizes, devices,
                                                   process_is_granule=granule == "processes")
    except ValueError as e:
      raise ValueError(f"mesh.dcn {dcn} needs {num_dcn} {granule}: {e}") from None
    mesh = Mesh(array, MESH_AXES)
  else:
    # Auto axes: shardings propagate as with a plain Mesh (jax.make_mesh defaults to Explicit).
    mesh = jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  _check_process_rows(mesh)
  return mesh


def _check_process_rows(mesh: Mesh) -> None:
  """Every process must own one contiguous block of batch rows."""
  if jax.process_count() == 1:
    return
  rows = global_batch_size_divisor(mesh)
  owned: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((rows,)).items():
    owned.setdefault(device.process_index, set()).update(range(*index[0].indices(rows)))
  for process, held in owned.items():
    if max(held) - min(held) + 1 != len(held):
      raise ValueError(f"process {process} holds non-contiguous batch rows {sorted(held)} on mesh "
                       f"{dict(mesh.shape)}; reorder the mesh axes (put the DCN / process axis first)")


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, str | None]]) -> PartitionSpec:
  """Maps a parameter's logical axis names to a PartitionSpec on `mesh`."""
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    mesh_axis = rule_map.get(name) if name is not None else None
    if name is not None and name not in rule_map:
      raise ValueError(f"no sharding rule for logical axis {name!r}; rules: {list(rules)}")
    if mesh_axis is not None and (mesh_axis in used or size % mesh.shape[mesh_axis]):
      if mesh_axis not in used:
        logging.debug("replicating axis %s of size %d: not divisible by mesh axis %s (%d)", name, size,
                      mesh_axis, mesh.shape[mesh_axis])
      mesh_axis = None
    if mesh_axis is not None:
      used.add(mesh_axis)
    spec.append(mesh_axis)
  return PartitionSpec(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> nnx.State:
  """The state with each variable's value replaced by its NamedSharding.

  Same tree structure as the state (usable as jit in/out shardings and for
  orbax restore targets). Variables without logical annotations are replicated.
  """

  def sharding_of(variable):
    value = variable.get_value()
    logical = variable.get_metadata().get("out_sharding")
    if not logical or len(logical) != np.ndim(value):
      spec = PartitionSpec()
    else:
      spec = logical_to_mesh_spec(logical, value.shape, mesh, rules)
    return variable.copy(NamedSharding(mesh, spec))

  return jax.tree.map(sharding_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every data-holding mesh axis."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch_size_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def split_microbatches(batch: Mapping[str, jax.Array], num_microbatches: int, mesh: Mesh) -> dict:
  """[G, ...] global batch -> [A, G / A, ...] microbatches cut from each device's own rows.

  Microbatch m takes rows m, A + m, 2A + m, ...: a device holding a contiguous
  block of G / D rows (D batch devices, G / D divisible by A) holds its share of
  every microbatch, so the split moves no data (no all-gather of the batch); the
  sharding constraint pins that layout for XLA.  Call it inside jit.
  """
  spec = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))

  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)

  return {k: split(v) for k, v in batch.items()}


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
