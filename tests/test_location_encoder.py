"""GeoCLIP's location encoder and weights: parity with geoclip's own torch modules and PROJ.

Oracles: geoclip's torch `LocationEncoder` (loaded from the wheel's files
without importing `geoclip/__init__.py`, which needs pandas / geopy /
torchvision), the `mlp` Sequential from geoclip's ImageEncoder source, and
pyproj for the projections.

Relative error: per row, max|a - b| / max|b|, then the max over rows.

Float32 end to end: a 1-ulp change in the projected v (6e-8) moves the
sigma = 256 capsule's phases 2 pi v B^T (|B| up to ~1000) by ~4e-4 rad, so
even correctly rounded float32 v gives ~3e-4 relative error against float64,
and geoclip's own float32 output is ~6e-4 from its float64 one.  XLA's and
torch's sin / asin / cos / pow differ by 1 ulp on many inputs, so no float32
implementation can match geoclip's float32 output to 1e-5.  Hence: 1e-5
against geoclip in float64 (both sides), 1e-5 in float32 given the same
projected v, and float32 end to end no less accurate than geoclip itself.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geotoken_jax.encoders import geoclip_weights as gw
from geotoken_jax.encoders import location
from geotoken_jax.nn import heads

torch = pytest.importorskip("torch")
pyproj = pytest.importorskip("pyproj")
if importlib.util.find_spec("geoclip") is None:
  pytest.skip("the geoclip wheel is not installed", allow_module_level=True)

_ORACLE = "_geoclip_oracle"  # geoclip's model files under a private package name


def load_geoclip_module(name: str):
  """geoclip.model.<name> from the wheel's files, with stub parent packages (no pandas)."""
  model_dir = gw.geoclip_model_dir()
  for pkg, path in ((_ORACLE, model_dir.parent), (f"{_ORACLE}.model", model_dir)):
    if pkg not in sys.modules:
      module = types.ModuleType(pkg)
      module.__path__ = [str(path)]
      sys.modules[pkg] = module
  misc = types.ModuleType(f"{_ORACLE}.model.misc")  # the real one imports pandas
  misc.file_dir = str(model_dir)
  sys.modules.setdefault(misc.__name__, misc)
  return importlib.import_module(f"{_ORACLE}.model.{name}")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float((np.abs(a - b).max(-1) / np.abs(b).max(-1)).max())


def sample_points(n_random: int = 8000, n_gallery: int = 2000) -> np.ndarray:
  """[N, 2] (lat, lng) float64: uniform on the sphere, edge cases, the gallery's first rows."""
  rng = np.random.default_rng(7)
  lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n_random)))
  lng = rng.uniform(-180, 180, n_random)
  edges = [(90, 0), (-90, 0), (90, 180), (-90, -180), (0, 180), (0, -180), (0, 0),
           (45, 180), (-45, -180), (89.999, 179.999), (-89.999, -179.999)]
  gallery = np.loadtxt(gw.geoclip_model_dir() / gw.GALLERY_FILE, delimiter=",", skiprows=1,
                       max_rows=n_gallery)
  return np.concatenate([np.stack([lat, lng], 1), np.asarray(edges, np.float64), gallery])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return gw.convert(tmp_path_factory.mktemp("geoclip_weights"))


@pytest.fixture(scope="module")
def geoclip_le():
  return load_geoclip_module("location_encoder")


@pytest.fixture(scope="module")
def torch_encoders(geoclip_le):
  """geoclip's LocationEncoder with the shipped weights, as geoclip loads them (f32, f64)."""
  model = geoclip_le.LocationEncoder().eval()  # from_pretrained=True: torch.load of the .pth
  return model, geoclip_le.LocationEncoder().double().eval()


@pytest.fixture(scope="module")
def points():
  # float32-representable, so one float64 reference serves the float32 test too.
  return sample_points().astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def reference(torch_encoders, geoclip_le, points):
  """geoclip's outputs at `points`: float32 end to end, and float64 on the exact projection."""
  model32, model64 = torch_encoders
  v = location.equal_earth(points)  # float64 numpy, == PROJ to 1e-9 (test below)
  with torch.inference_mode():
    ll32 = torch.from_numpy(points.astype(np.float32))
    return dict(
        v64=v,
        # geoclip's float64 projection uses a float32 sqrt(3) (torch.tensor(3.0)): 3e-8 off.
        v64_geoclip=geoclip_le.equal_earth_projection(torch.from_numpy(points)).numpy(),
        out64=sum(getattr(model64, f"LocEnc{i}")(torch.from_numpy(v)).numpy() for i in range(3)),
        v32=geoclip_le.equal_earth_projection(ll32).numpy(),
        out32=model32(ll32).numpy())


def build_encoder(converted, **overrides):
  cfg = location.location_encoder_config(weights=str(converted["location_encoder"]), **overrides)
  enc = location.LocationEncoder(cfg, rngs=nnx.Rngs(0))
  nnx.update(enc, nnx.from_flat_state(location.pretrained_leaves(cfg)))
  return enc


# The encoder against geoclip
# ------------------------------------------------------------------------------


def test_matches_geoclip_in_float64(converted, reference, points):
  """JAX (x64: projection and phases in float64) vs geoclip's torch module in float64."""
  assert len(points) >= 10_000
  assert np.abs(reference["v64_geoclip"] - reference["v64"]).max() < 1e-7
  with jax.enable_x64(True):
    enc = build_encoder(converted, rff_dtype="float64")
    got = np.asarray(jax.jit(lambda x: enc(x))(points))
  assert got.shape == (len(points), 512) and np.isfinite(got).all()
  err = rel_err(got, reference["out64"])
  print(f"float64 max rel err {err:.3g}")
  assert err <= 1e-5


def test_matches_geoclip_in_float32(converted, reference, points):
  """Float32: 1e-5 given the same projected v; end to end, no less accurate than geoclip."""
  enc = build_encoder(converted)
  ll32 = points.astype(np.float32)
  geoclip32, truth = reference["out32"], reference["out64"]
  got_same_v = np.asarray(jax.jit(enc.encode_projected)(reference["v32"]))
  err_same_v = rel_err(got_same_v, geoclip32)
  v_jax = np.asarray(jax.jit(enc.project)(ll32))
  got = np.asarray(jax.jit(lambda x: enc(x))(ll32))
  assert got.dtype == np.float32
  err_jax, err_geoclip = rel_err(got, truth), rel_err(geoclip32, truth)
  v_err = np.abs(v_jax - reference["v32"]).max()
  print(f"same v {err_same_v:.3g}; vs float64: jax {err_jax:.3g}, geoclip {err_geoclip:.3g}; "
        f"jax vs geoclip {rel_err(got, geoclip32):.3g}; projection {v_err:.3g}")
  assert err_same_v <= 1e-5
  assert v_err <= 8 * 2.0**-24  # a few ulps of |v| <= 1
  assert err_jax <= 1.25 * err_geoclip


def test_param_paths_and_frozen_matrix():
  cfg = location.location_encoder_config(sigmas=(1.0, 4.0), num_fourier=4, hidden=8, depth=2,
                                         out_dim=6)
  enc = location.LocationEncoder(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(enc, nnx.Param)
  keys = {k for k, _ in nnx.to_flat_state(state)}
  assert keys == {p[0] for p in gw.location_encoder_plan(cfg).values()}
  assert ("capsules", 1, "fourier_matrix") in keys
  assert ("capsules", 0, "mlp", "layers", 2, "kernel") in keys
  assert isinstance(enc.capsules[0].fourier_matrix, nnx.Param)
  assert location.LOCATION_FROZEN_NAMES == ("fourier_matrix",)
  std = float(np.std(np.asarray(enc.capsules[1].fourier_matrix[...])))
  assert 2.0 < std < 8.0  # N(0, 4^2)
  x = jnp.asarray([[10.0, 20.0], [-30.0, 100.0]])
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(enc)
  assert not np.any(np.asarray(grads["capsules"][0]["fourier_matrix"][...]))
  assert np.any(np.asarray(grads["capsules"][0]["mlp"]["layers"][0]["kernel"][...]))
  assert location.pretrained_leaves(cfg) == {}
  assert location.param_count(cfg) == sum(np.size(v) for _, v in nnx.to_flat_state(state))
  cfg.rff_dtype = "float64"
  with pytest.raises(ValueError, match="x64"):
    location.LocationEncoder(cfg, rngs=nnx.Rngs(0))(x)


def test_pretrained_leaves_prefix_and_mercator(converted):
  cfg = location.location_encoder_config(projection="mercator",
                                         weights=str(converted["location_encoder"]))
  leaves = location.pretrained_leaves(cfg, ("model", "location"))
  enc = location.LocationEncoder(cfg, rngs=nnx.Rngs(0))
  keys = {k for k, _ in nnx.to_flat_state(nnx.state(enc, nnx.Param))}
  assert {k[2:] for k in leaves} == keys and all(k[:2] == ("model", "location") for k in leaves)
  assert set(location.pretrained_leaves(cfg, "enc")) == {("enc",) + k for k in keys}


# Projections
# ------------------------------------------------------------------------------


def random_latlng(n, seed):
  rng = np.random.default_rng(seed)
  return np.stack([np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], 1)


def test_equal_earth_against_proj():
  """PROJ's eqearth on the unit sphere, in units of R, times SF / 180 is GeoCLIP's (x, y).

  Both take radians: PROJ's x = lam cos(th) / (sqrt(3)/2 (A1 + 3 A2 th^2 + 7 A3 th^6 + 9 A4 th^8))
  is GeoCLIP's 2 sqrt(3) lam cos(th) / (3 (...)); no degree factor enters.
  """
  ll = np.concatenate([random_latlng(2000, 1), [[90, 0], [-90, 0], [0, 180], [0, -180]]])
  x, y = pyproj.Proj("+proj=eqearth +R=1")(ll[:, 1], ll[:, 0])
  expected = np.stack([x, y], 1) * location.SF / 180
  got = location.equal_earth(ll)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
  np.testing.assert_allclose(location.equal_earth(np.zeros(2)), [0, 0], atol=1e-15)
  assert abs(location.equal_earth(np.array([0.0, 180.0]))[0] - 1) < 1e-5
  assert abs(location.equal_earth(np.array([90.0, 0.0]))[1] - 0.4867) < 1e-4
  got32 = np.asarray(jax.jit(location.equal_earth)(ll.astype(np.float32)))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-6)


def test_web_mercator_against_proj():
  ll = random_latlng(2000, 2)
  ll[:, 0] = np.clip(ll[:, 0], -85, 85)
  east, north = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(
      ll[:, 1], ll[:, 0])
  expected = np.stack([north, east], 1) / 20037508.34  # G3's (northing, easting)
  np.testing.assert_allclose(location.web_mercator(ll), expected, rtol=0, atol=1e-9)
  got32 = np.asarray(jax.jit(location.web_mercator)(ll.astype(np.float32)))
  np.testing.assert_allclose(got32, expected, rtol=0, atol=2e-6)
  # The clamp: |lat| > MERCATOR_MAX_LAT maps onto the square's edge.
  poles = np.array([[90.0, 30.0], [-90.0, -30.0], [89.0, 0.0]])
  clamped = location.web_mercator(poles)
  np.testing.assert_allclose(clamped[:, 0], [1, -1, 1], atol=1e-9)
  np.testing.assert_allclose(clamped[:, 1], [30 / 180, -30 / 180, 0], atol=1e-12)
  with np.errstate(all="ignore"):
    assert np.abs(location.web_mercator(poles, clamp=False)[:2, 0]).min() > 10
  edge = np.array([[location.MERCATOR_MAX_LAT, 180.0]])
  _, north_edge = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(
      edge[:, 1], edge[:, 0])
  np.testing.assert_allclose(north_edge / location.MERCATOR_HALF_EXTENT, 1, atol=1e-12)


# Converter and loaders
# ------------------------------------------------------------------------------


def test_converter_outputs_and_metadata(converted):
  for name in ("location_encoder", "image_mlp", "logit_scale", "metadata"):
    assert converted[name].is_file()
  meta = json.loads(converted["metadata"].read_text())
  for name, entry in meta["files"].items():
    assert gw.sha256(entry["source"]) == entry["source_sha256"]
    assert gw.sha256(converted[name]) == entry["output_sha256"]
    assert converted[name].name == entry["output"]
  shapes = meta["files"]["location_encoder"]["shapes"]
  assert shapes["LocEnc2.capsule.0.b"] == [256, 2]
  assert shapes["LocEnc0.head.0.weight"] == [512, 1024]
  assert len(shapes) == 27
  assert meta["gps_gallery"]["path"].endswith("coordinates_100K.csv")
  assert meta["gps_gallery"]["exists"]
  raw = torch.load(gw.geoclip_model_dir() / "weights" / "logit_scale_weights.pth",
                   map_location="cpu", weights_only=True)
  assert gw.load_logit_scale(converted["logit_scale"]) == float(raw)


def test_loader_errors(converted, tmp_path):
  cfg = location.location_encoder_config(out_dim=256)
  with pytest.raises(ValueError, match=r"LocEnc0\.head\.0\.weight") as info:
    gw.load_location_encoder_weights(converted["location_encoder"], cfg)
  message = str(info.value)
  assert str(converted["location_encoder"]) in message
  assert all(f"LocEnc{i}.head.0.{p}" in message for i in range(3) for p in ("weight", "bias"))

  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(converted["location_encoder"]))
  del tensors["LocEnc1.capsule.3.bias"]
  tensors["LocEnc3.capsule.0.b"] = np.zeros((256, 2), np.float32)
  bad = tmp_path / "bad.safetensors"
  save_file(tensors, str(bad))
  with pytest.raises(ValueError) as info:
    gw.load_location_encoder_weights(bad, location.location_encoder_config())
  message = str(info.value)
  assert "missing keys (1): LocEnc1.capsule.3.bias" in message
  assert "unexpected keys (1): LocEnc3.capsule.0.b" in message and str(bad) in message

  with pytest.raises(ValueError, match="capsule 0's B has std"):
    gw.load_location_encoder_weights(converted["location_encoder"],
                                     location.location_encoder_config(sigmas=(256.0, 16.0, 1.0)))
  with pytest.raises(FileNotFoundError, match="geoclip_weights"):
    gw.load_image_mlp_weights(tmp_path / "absent.safetensors")


def test_image_mlp_matches_geoclip(converted):
  """MLPHead((768, 768, 512)) vs the Sequential built from geoclip's ImageEncoder source."""
  source = (gw.geoclip_model_dir() / "image_encoder.py").read_text()
  calls = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
           and any(isinstance(t, ast.Attribute) and t.attr == "mlp" for t in node.targets)]
  assert len(calls) == 1
  mlp = eval(compile(ast.Expression(calls[0]), "image_encoder.py", "eval"),  # noqa: S307
             {"nn": torch.nn}).eval()
  weights = gw.geoclip_model_dir() / "weights" / "image_encoder_mlp_weights.pth"
  mlp.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
  head = heads.MLPHead(gw.IMAGE_MLP_DIMS, rngs=nnx.Rngs(0))
  leaves = gw.load_image_mlp_weights(converted["image_mlp"])
  assert set(leaves) == {k for k, _ in nnx.to_flat_state(nnx.state(head, nnx.Param))}
  nnx.update(head, nnx.from_flat_state(leaves))
  x = np.random.default_rng(3).normal(size=(256, 768)).astype(np.float32)
  with torch.no_grad():
    expected = mlp(torch.from_numpy(x)).numpy()
  got = np.asarray(jax.jit(lambda a: head(a))(x))
  err = rel_err(got, expected)
  print(f"image mlp max rel err {err:.3g}")
  assert err <= 1e-5


def test_ensure_converted_and_cli(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(gw.WEIGHTS_DIR_ENV, str(tmp_path / "root"))
  assert gw.default_weights_dir() == tmp_path / "root" / "geoclip"
  paths = gw.ensure_converted()
  assert all(p.is_file() and p.parent == tmp_path / "root" / "geoclip" for p in paths.values())
  stamp = paths["location_encoder"].stat().st_mtime_ns
  assert gw.ensure_converted() == paths
  assert paths["location_encoder"].stat().st_mtime_ns == stamp  # not converted twice
  assert gw.main(["--output", str(tmp_path / "cli")]) == 0
  out = capsys.readouterr().out
  assert f"location_encoder: {tmp_path / 'cli' / gw.LOCATION_FILE}" in out
  assert os.path.isfile(tmp_path / "cli" / gw.METADATA_FILE)


def test_ensure_converted_without_torch(tmp_path, monkeypatch):
  """The converter reads the wheel's .pth files without torch (run time never needs it)."""
  with_torch = gw.ensure_converted(tmp_path / "with")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  without = gw.ensure_converted(tmp_path / "without")
  for name, path in with_torch.items():
    assert without[name].read_bytes() == path.read_bytes(), name
