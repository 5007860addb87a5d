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

import jax
import numpy as np
from flax import nnx
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


def create_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices with axes MESH_AXES; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"there are {len(devices)}")
  # Devices in process order, so each process's devices hold consecutive
  # batch rows (what make_array_from_process_local_data expects).
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


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


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
