import os
import sys

# Tests run on the CPU; a few multi-device tests need fake devices, and the
# flag must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from geotoken_jax.bench.s2_bench import uniform_sphere_points  # noqa: E402


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
  resume tests compare against.  Read-only; its users share the xdist_group "trained_smoke_run",
  so that one worker trains it once."""
  from geotoken_jax import trainer  # pylint: disable=g-import-not-at-top
  from test_train import smoke_run_config  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("trained_smoke_run")
  trainer.train_and_evaluate(smoke_run_config(), str(path))
  return path
