import os
import shutil
import sys
import tempfile

# Tests run on the CPU; a few multi-device tests need fake devices, and the
# flag must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from geotoken_jax.bench.s2_bench import uniform_sphere_points  # noqa: E402

# One persistent compilation cache per test session, on disk and shared by the xdist workers:
# the smoke model's programs (init, train step, predictor) are the same in many tests, and
# each compile of them takes seconds on 2 CPU cores.  This process and its workers use it, and
# the one-process commands a test starts with compile_cache_env() (runs of several processes
# compile on their own); it is deleted when the session ends.  The tests run the same programs
# either way.  GEOTOKEN_TEST_COMPILE_CACHE=0 turns it off.
_COMPILE_CACHE_KEY = "geotoken_jax_compile_cache"


def pytest_configure(config):
  if os.environ.get("GEOTOKEN_TEST_COMPILE_CACHE", "1") == "0":
    return
  workerinput = getattr(config, "workerinput", None)
  if workerinput is not None:  # an xdist worker: the controller's directory
    path = workerinput.get(_COMPILE_CACHE_KEY)
  else:
    path = tempfile.mkdtemp(prefix="geotoken-jax-compile-cache-")
    config.stash[_compile_cache_dir] = path
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # A size bound turns on the cache's file lock: two workers never read a half-written entry.
  jax.config.update("jax_compilation_cache_max_size", 16 << 30)


_compile_cache_dir = pytest.StashKey[str]()


def compile_cache_env() -> dict:
  """Environment variables that give a one-process subprocess (a command a test runs) the
  session's compilation cache; {} when it is off.  Runs of several processes (jax.distributed)
  compile on their own."""
  import jax  # pylint: disable=g-import-not-at-top
  path = jax.config.jax_compilation_cache_dir
  if not path:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": path,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(jax.config.jax_persistent_cache_min_compile_time_secs),
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(jax.config.jax_compilation_cache_max_size)}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # pytest-xdist, in the controller: each worker gets the directory
  path = node.config.stash.get(_compile_cache_dir, None)
  if path:
    node.workerinput[_COMPILE_CACHE_KEY] = path


def pytest_unconfigure(config):
  path = config.stash.get(_compile_cache_dir, None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve_gs(monkeypatch):
  """serve_gs(filesystem_class) serves gs:// and gcs:// from an in-memory fsspec filesystem for one test.

  etils.epath caches one filesystem per protocol for the whole process: without clearing that cache
  a test writes through the fake bucket of an earlier test on the same worker while fsspec reads
  through its own (what failed under pytest-xdist)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  clear_epath_cache = backend._FileSystemSpecBackend._get_filesystem.cache_clear  # pylint: disable=protected-access
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access

  def serve(filesystem_class):
    for protocol in ("gs", "gcs"):
      monkeypatch.setitem(registry, protocol, filesystem_class)
    clear_epath_cache()

  yield serve
  clear_epath_cache()


@pytest.fixture(scope="session")
def sphere_points_1m():
  """1,000,000 points drawn uniformly on the sphere: (lat, lng) degrees."""
  return uniform_sphere_points(1_000_000, seed=20251101)


def angle_diff_deg(a, b):
  """|a - b| for longitudes, folding the +-180 seam."""
  d = np.abs(np.asarray(a) - np.asarray(b)) % 360.0
  return np.minimum(d, 360.0 - d)


def haversine_m(a, b):
  """Float64 great-circle distance in metres between [..., 2] (lat, lon) arrays."""
  a = np.radians(np.asarray(a, np.float64))
  b = np.radians(np.asarray(b, np.float64))
  h = (np.sin((b[..., 0] - a[..., 0]) / 2) ** 2
       + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin((b[..., 1] - a[..., 1]) / 2) ** 2)
  return 2 * 6_371_008.8 * np.arcsin(np.sqrt(np.minimum(h, 1.0)))


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory):
  """configs/earth.py:smoke trained for 8 steps (test_train.smoke_run_config: dropout 0.1, a
  checkpoint every 2 steps, 4, 6 and 8 kept), once per session: the uninterrupted run that the
  resume tests compare against.  Read-only (copy it to resume it); its users are in test_train.py
  and test_trainer_failures.py, which _SAME_WORKER sends to one worker (and they carry the
  xdist_group "trained_smoke_run" for --dist loadgroup), so that one worker trains it once."""
  from geotoken_jax import trainer  # pylint: disable=g-import-not-at-top
  from test_train import smoke_run_config  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("trained_smoke_run")
  trainer.train_and_evaluate(smoke_run_config(), str(path))
  return path


# pytest-xdist (--dist loadfile, pyproject's addopts): a file's tests run on one worker, and the
# workers take files most expensive first (a worker takes the next file when it is nearly done
# with its last, so a long file taken last would leave the other worker idle meanwhile).  A
# file's cost: its tests' seconds in the last run that ran them (pytest's cache, .pytest_cache),
# else _FILE_SECONDS (rough seconds on one worker of a 2-core machine), else it goes first (a
# new file may be long).  Files that share a session fixture go to one worker, which builds the
# fixture once.
_FILE_SECONDS = {f"tests/{name}": seconds for name, seconds in {
    "test_train.py": 250, "test_evaluate.py": 136, "test_trainer_failures.py": 102, "test_align.py": 98,
    "test_decoding.py": 95, "test_models.py": 64, "test_recipe.py": 60, "test_decoding_validity.py": 59,
    "test_fusion_recipe.py": 43, "test_knn_lm.py": 40, "test_tiny_image.py": 36, "test_location_encoder.py": 33,
    "test_union_pool.py": 31, "test_search.py": 29, "test_photos_train.py": 24, "test_s2_cells.py": 20,
    "test_retrieval.py": 18, "test_decoding_sharding.py": 17, "test_reranker.py": 13,
    "test_retrieval_identity.py": 13, "test_multihost_failures.py": 12, "test_clip.py": 11,
    "test_retrieval_scale.py": 9, "test_checkpoint.py": 9, "test_s2_tokens.py": 9, "test_embeddings.py": 7,
}.items()}
_SAME_WORKER = {
    "tests/test_trainer_failures.py": "tests/test_train.py",  # trained_smoke_run
}
_SECONDS_KEY = "geotoken_jax/test_seconds"  # {nodeid: seconds (setup + call + teardown)}
_MEASURED = {}  # this session's, in the process that reports (the xdist controller, or the only one)


def _file_costs(nodeids, learned):
  """{file: seconds} for the collected nodeids: learned seconds where every test has some,
  else _FILE_SECONDS, else infinity (first)."""
  by_file = {}
  for nodeid in nodeids:
    by_file.setdefault(nodeid.split("::", 1)[0], []).append(nodeid)
  costs = {}
  for path, ids in by_file.items():
    if all(i in learned for i in ids):
      costs[path] = sum(learned[i] for i in ids)
    else:
      costs[path] = _FILE_SECONDS.get(path, float("inf"))
  return costs


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=g-import-not-at-top

  class HeaviestFilesFirst(LoadFileScheduling):

    def _split_scope(self, nodeid):
      path = super()._split_scope(nodeid)
      return _SAME_WORKER.get(path, path)

    def _assign_work_unit(self, node):
      if not getattr(self, "_ordered", False):  # the first assignment: the queue is complete
        cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
        learned = cache.get(_SECONDS_KEY, {}) if cache is not None else {}
        costs = _file_costs([n for tests in self.workqueue.values() for n in tests], learned)
        scope_cost = {}
        for path, seconds in costs.items():
          scope = _SAME_WORKER.get(path, path)
          scope_cost[scope] = scope_cost.get(scope, 0.0) + seconds
        for scope in sorted(self.workqueue, key=scope_cost.get, reverse=True):
          self.workqueue.move_to_end(scope)
        self._ordered = True
      super()._assign_work_unit(node)

  return HeaviestFilesFirst(config, log)


def pytest_runtest_logreport(report):
  if report.when in ("setup", "call", "teardown"):
    _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
  cache = getattr(session.config, "cache", None)  # None under -p no:cacheprovider
  if hasattr(session.config, "workerinput") or cache is None or not _MEASURED:
    return
  learned = dict(cache.get(_SECONDS_KEY, {}))
  learned.update({nodeid: round(seconds, 2) for nodeid, seconds in _MEASURED.items()})
  cache.set(_SECONDS_KEY, learned)
