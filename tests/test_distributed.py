"""geotoken_jax.distributed: which GPUs a SLURM task drives, and what initialize() asks JAX for."""

import jax
import pytest

from geotoken_jax import distributed


def slurm(localid, ntasks, tasks_per_node, nodes=1, **extra):
  env = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_NTASKS": str(ntasks),
         "SLURM_PROCID": str(localid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": "0",
         "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}
  env.update(extra)
  return env


@pytest.mark.parametrize("env, expected", [
    # One task per GPU, bound (--gpus-per-task=1): each task sees its own GPU as device 0.
    (slurm(3, 32, "8(x4)", 4, CUDA_VISIBLE_DEVICES="3", SLURM_GPUS_PER_TASK="1"), [0]),
    (slurm(5, 8, "8", CUDA_VISIBLE_DEVICES="5"), [0]),
    # One task per GPU, every task sees the node's 8 GPUs: the task's own one.
    (slurm(5, 16, "8(x2)", 2, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), [5]),
    (slurm(2, 4, "4", SLURM_STEP_GPUS="4,5,6,7"), [2]),
    # One task per node with 8 GPUs: all of them (JAX's default would be [0]).
    (slurm(0, 4, "1(x4)", 4, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), list(range(8))),
    (slurm(0, 2, "1(x2)", 2, SLURM_JOB_GPUS="0,1,2,3"), [0, 1, 2, 3]),
    # --gpus-per-task=4, 2 tasks a node, each bound to its 4 GPUs.
    (slurm(1, 4, "2(x2)", 2, CUDA_VISIBLE_DEVICES="4,5,6,7", SLURM_GPUS_PER_TASK="4"), [0, 1, 2, 3]),
    # --gpus-per-task=2 with 2 tasks a node: 2 GPUs seen == 2 tasks, but each task owns both.
    (slurm(1, 2, "2", CUDA_VISIBLE_DEVICES="2,3", SLURM_GPUS_PER_TASK="gpu:2"), [0, 1]),
    # Tasks per node from SLURM_NTASKS_PER_NODE / NTASKS / NNODES when the step's list is absent.
    ({**{k: v for k, v in slurm(1, 2, "x").items() if k != "SLURM_STEP_TASKS_PER_NODE"},
      "SLURM_NTASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, [1]),
    # Uneven layout, this node runs 1 task: all its GPUs.
    (slurm(0, 3, "2,1", 2, SLURM_NODEID="1", CUDA_VISIBLE_DEVICES="0,1"), [0, 1]),
    # No GPU allocated by SLURM: JAX's default with several tasks a node, no restriction with one.
    (slurm(3, 8, "8"), [3]),
    (slurm(0, 2, "1(x2)", 2), None),
    (slurm(0, 2, "1(x2)", 2, CUDA_VISIBLE_DEVICES=""), None),
])
def test_slurm_local_device_ids(env, expected):
  assert distributed.slurm_local_device_ids(env) == expected


def test_slurm_local_device_ids_refuses_ambiguous_layouts():
  with pytest.raises(ValueError, match="--local_device_ids"):  # 2 tasks sharing 8 GPUs
    distributed.slurm_local_device_ids(slurm(1, 2, "2", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"))
  with pytest.raises(ValueError, match="SLURM_LOCALID"):
    distributed.slurm_local_device_ids({"CUDA_VISIBLE_DEVICES": "0"})


def test_slurm_coordinator_address_matches_jax(monkeypatch):
  from jax._src.clusters import slurm_cluster  # noqa: PLC0415

  for nodes in ("node001", "node001,host2", "node[001-0015],host2", "node[001,007-015],host2", "a-b[3-4]"):
    env = {"SLURM_JOB_ID": "987654", "SLURM_STEP_NODELIST": nodes}
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    assert distributed.slurm_coordinator_address(env) == \
        slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  assert distributed.slurm_coordinator_address({**env, "JAX_COORDINATOR_PORT": "1234"}) == "a-b3:1234"


@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda env: bool(env.get("TPU_WORKER_HOSTNAMES")))
  return recorded


def test_initialize_explicit_arguments(calls):
  assert distributed.initialize("127.0.0.1:1234", 2, 1, env={})
  assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                    "local_device_ids": None}]
  assert distributed.initialize("10.0.0.1:99", 4, 0, ["0", "1"], env={})
  assert calls[-1]["local_device_ids"] == [0, 1]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_initialize_single_process_does_nothing(calls):
  assert not distributed.initialize(env={})
  assert not distributed.initialize(num_processes=1, env={})
  assert not distributed.initialize(env=slurm(0, 1, "1", CUDA_VISIBLE_DEVICES="0,1,2,3"))
  assert calls == []


def test_initialize_slurm_one_task_per_node_drives_every_gpu(calls):
  env = slurm(0, 4, "1(x4)", 4, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_PROCID="2")
  assert distributed.initialize(env=env)
  assert calls == [{"coordinator_address": "gpu007:61497", "num_processes": 4, "process_id": 2,
                    "local_device_ids": list(range(8)), "cluster_detection_method": "deactivate"}]


def test_initialize_slurm_one_task_per_gpu_and_overrides(calls):
  env = slurm(3, 16, "8(x2)", 2, CUDA_VISIBLE_DEVICES="3", SLURM_PROCID="11")
  distributed.initialize(env=env)
  assert calls[-1]["local_device_ids"] == [0] and calls[-1]["process_id"] == 11
  distributed.initialize(local_device_ids=[0, 1], env=env)  # --local_device_ids wins
  assert calls[-1]["local_device_ids"] == [0, 1]
  distributed.initialize(env={**env, "JAX_LOCAL_DEVICE_IDS": "2"})
  assert calls[-1]["local_device_ids"] == [2]
  distributed.initialize("host:1", env=env)  # explicit coordinator, the rest from SLURM
  assert calls[-1]["coordinator_address"] == "host:1" and calls[-1]["num_processes"] == 16
  # No GPU information and one task a node: no restriction, and JAX must not pick [SLURM_LOCALID].
  distributed.initialize(env=slurm(0, 2, "1(x2)", 2))
  assert calls[-1]["local_device_ids"] is None and calls[-1]["cluster_detection_method"] == "deactivate"


def test_initialize_tpu_pod_uses_jax_detection(calls):
  assert distributed.initialize(env={"TPU_WORKER_HOSTNAMES": "a,b"})
  assert calls == [{"local_device_ids": None}]
