"""jax.distributed for every way this project is launched.

`initialize()` is called once, before anything touches a JAX backend, by every
command (geotoken_jax.command_line.initialize_distributed):

* explicit arguments (`--coordinator_address --num_processes --process_id
  [--local_device_ids]`: launch/local.sh, the multi-process tests, hand-written
  job scripts) win over anything in the environment;
* SLURM (`srun`, launch/slurm.sbatch): the coordinator, process count and id
  come from the SLURM variables, as in JAX's own SLURM detection, but the
  GPUs each process drives are computed here (`slurm_local_device_ids`), since
  JAX's default is wrong for one process per node (see there).  A job of one
  task (SLURM_NTASKS=1) is a single process and initializes nothing;
* Cloud TPU pod slices (launch/tpu_pod.sh) and JAX_COORDINATOR_ADDRESS: JAX's
  own detection, with no argument (JAX never restricts local devices on TPU).

Anything else is a single process: nothing is initialized.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import jax
from absl import logging

# What JAX's SlurmCluster.is_env_present requires (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_NO_GPUS = ("", "NoDevFiles", "none", "None")


def _int_list(value: str, name: str) -> list[int]:
  try:
    return [int(x) for x in value.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{name}={value!r} is not a comma-separated list of integers") from None


def _visible_gpus(env: Mapping[str, str]) -> list[str] | None:
  """The GPUs this task sees: CUDA_VISIBLE_DEVICES (what CUDA enumerates), else the
  GPUs SLURM gave the step / job on this node; None when nothing says."""
  for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
    if name in env:
      value = env[name].strip()
      return [] if value in _NO_GPUS else [g.strip() for g in value.split(",") if g.strip()]
  return None


def _expand_tasks_per_node(value: str) -> list[int]:
  """SLURM's compressed per-node task counts: '8(x2),4' -> [8, 8, 4]."""
  counts = []
  for part in value.split(","):
    match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not match:
      raise ValueError(f"cannot parse SLURM tasks per node {value!r}")
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  """How many tasks of this job step run on this node, or None if the environment does not say."""
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if name in env:
      counts = _expand_tasks_per_node(env[name])
      node = int(env.get("SLURM_NODEID", "0"))
      if len(counts) == 1:
        return counts[0]
      if node < len(counts):
        return counts[node]
  if "SLURM_NTASKS_PER_NODE" in env:
    return int(env["SLURM_NTASKS_PER_NODE"])
  ntasks, nnodes = env.get("SLURM_NTASKS"), env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES"))
  if ntasks and nnodes and int(ntasks) % int(nnodes) == 0:
    return int(ntasks) // int(nnodes)
  return None


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The local device ids (indices among the GPUs this task sees) a SLURM task drives.

  JAX's SLURM detection (jax 0.10.2, jax/_src/clusters/cluster.py,
  ClusterEnv.auto_detect_unset_distributed_params) sets `local_device_ids =
  [SLURM_LOCALID]` whenever it is not given ("Defaults to single process per
  device if local_process_id is available"; SlurmCluster.get_local_process_id
  returns int(SLURM_LOCALID)), and jax/_src/distributed.py turns that into
  jax_cuda_visible_devices.  That is right for one task per GPU when every task
  sees all the node's GPUs, and wrong otherwise: one task per node with 8 GPUs
  drives GPU 0 only, and a task bound to its own GPU (CUDA_VISIBLE_DEVICES=3,
  SLURM_LOCALID=3) asks for a device index that does not exist.  Here:

  * the GPUs this task sees are CUDA_VISIBLE_DEVICES (else SLURM_STEP_GPUS, else
    SLURM_JOB_GPUS); local device ids index into that list;
  * exactly one GPU -> [0];
  * `--gpus-per-task=n` (SLURM_GPUS_PER_TASK=n) and n GPUs seen -> all of them;
  * one task on this node -> all n GPUs it sees: list(range(n));
  * as many GPUs seen as tasks on the node (and more than one) -> the tasks share
    the node's GPUs, one each: [SLURM_LOCALID];
  * no GPU information: [SLURM_LOCALID] with several tasks on the node (JAX's
    default: one task per GPU), None (no restriction) with one; no GPU at all
    (CUDA_VISIBLE_DEVICES empty): None;
  * anything else (e.g. 2 tasks sharing 8 GPUs) is ambiguous: ValueError, pass
    --local_device_ids.

  Returns None when the process should drive every device it sees.
  """
  if "SLURM_LOCALID" not in env:
    raise ValueError("not a SLURM task: SLURM_LOCALID is not set")
  local_id = int(env["SLURM_LOCALID"])
  tasks = _tasks_on_this_node(env)
  gpus = _visible_gpus(env)
  if gpus is None:  # SLURM did not allocate GPUs (a CPU job, or GPUs outside SLURM's gres)
    return [local_id] if tasks is not None and tasks > 1 else None
  n = len(gpus)
  if n == 0:
    return None
  if n == 1:
    return [0]
  per_task = env.get("SLURM_GPUS_PER_TASK", "").split(":")[-1]  # '2' or 'a100:2'
  if per_task.isdigit() and int(per_task) == n:
    return list(range(n))
  if tasks == 1:
    return list(range(n))
  if tasks == n:
    if local_id >= n:
      raise ValueError(f"SLURM_LOCALID={local_id} but the task sees only {n} GPUs ({','.join(gpus)})")
    return [local_id]
  raise ValueError(
      f"cannot tell which of the {n} GPUs it sees ({','.join(gpus)}) SLURM task {local_id} should drive "
      f"({tasks if tasks is not None else 'an unknown number of'} tasks on this node): run one task per "
      "GPU (--ntasks-per-node=G --gpus-per-task=1) or one task per node, or pass --local_device_ids")


def slurm_coordinator_address(env: Mapping[str, str]) -> str:
  """The coordinator JAX's SLURM detection picks (jax/_src/clusters/slurm_cluster.py,
  SlurmCluster.get_coordinator_address): the first host of SLURM_STEP_NODELIST, port
  JAX_COORDINATOR_PORT or SLURM_JOB_ID % 4096 + 61440.  Same result, from `env`."""
  port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
  nodes = env["SLURM_STEP_NODELIST"]
  match = re.match(r"([^,\[]*)(?:\[([^,\-\]]+))?", nodes)
  host = match.group(1) + (match.group(2) or "")
  return f"{host}:{port}"


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
  if any(env.get(name) for name in _TPU_VARS):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def _initialize(**kwargs) -> None:
  # Cross-process collectives for the CPU backend (localhost runs, CPU SLURM jobs);
  # GPU and TPU backends bring their own. jax 0.10 defaults to gloo, older ones to none.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, env: Mapping[str, str] | None = None) -> bool:
  """Starts jax.distributed from explicit arguments or the cluster environment.

  Must run before any JAX computation.  Returns whether this is a multi-process
  run (jax.distributed initialized, now or before); a single process is left alone.
  `env` defaults to os.environ.
  """
  env = os.environ if env is None else env
  ids = None if local_device_ids is None else [int(i) for i in local_device_ids]
  if jax.distributed.is_initialized():
    return True
  slurm = all(v in env for v in _SLURM_VARS)
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit and not slurm:
    if num_processes == 1 and not coordinator_address:
      return False
    _initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                local_device_ids=ids)
    return True
  if slurm:
    num = int(env["SLURM_NTASKS"]) if num_processes is None else int(num_processes)
    if num <= 1 and not coordinator_address:
      return False
    if ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
      ids = _int_list(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
    if ids is None:
      ids = slurm_local_device_ids(env)
    # Every argument given and JAX's detection off, so that JAX does not put back its
    # [SLURM_LOCALID] default where ids is None (drive every visible device).
    _initialize(coordinator_address=(coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
                                     or slurm_coordinator_address(env)),
                num_processes=num, process_id=int(env["SLURM_PROCID"]) if process_id is None else int(process_id),
                local_device_ids=ids, cluster_detection_method="deactivate")
    return True
  if env.get("JAX_COORDINATOR_ADDRESS") or _on_tpu_vm(env):
    _initialize(local_device_ids=ids)
    return True
  return False
