"""GeoCLIP's location encoder in NNX: a map projection, then random Fourier feature capsules.

  cfg = location_encoder_config(weights=str(paths["location_encoder"]))
  enc = LocationEncoder(cfg, rngs=nnx.Rngs(0))       # then place pretrained_leaves(cfg, ...)
  feats = enc(latlng)                                # [N, 2] degrees -> [N, 512] float32

Per capsule i (sigma_i = 1, 16, 256): v = projection(lat, lng) [N, 2];
  gamma(v) = [cos(2 pi v B_i^T), sin(2 pi v B_i^T)]   (B_i [256, 2] ~ N(0, sigma_i^2), fixed)
  capsule_i(v) = MLP 512 -> 1024 -> 1024 -> 1024 -> 512 (ReLU after each hidden layer)
and the output is the sum of the capsules (un-normalized), as `geoclip.LocationEncoder`.

Parameter paths (nnx.to_flat_state keys):
  ("capsules", i, "fourier_matrix")                  B_i [num_fourier, 2]
  ("capsules", i, "mlp", "layers", j, "kernel")      [in, out], j = 0 .. depth
  ("capsules", i, "mlp", "layers", j, "bias")        [out]
B is an nnx.Param (the project splits models by nnx.Param only) but it is a
fixed random projection, never trained: the optimizer freezes every parameter
whose name is in LOCATION_FROZEN_NAMES, and the forward pass stops its
gradient so none is computed.

Precision: the finest capsule's phases 2 pi v B^T reach ~1600 rad (|B| up to
~4 sigma = 1000, |v| <= 1), where one float32 ulp is ~1e-4 rad, so the
projection and phases are computed in `rff_dtype` (float32, or float64 under
JAX x64 for references) whatever the matmul `compute_dtype`, in torch's
operation order.  Even so, float32 end to end is ill-conditioned: half an ulp
of v moves those phases by ~4e-4 rad, so float32 outputs (GeoCLIP's own
included) sit ~3e-4 to 1e-3 (relative, per row) from the float64 result, and
XLA's and torch's sin / asin / cos round differently by an ulp.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from geotoken_jax.encoders import geoclip_weights
from geotoken_jax.nn import heads, layers

# The optimizer freezes parameters with these names (the RFF matrices B).
LOCATION_FROZEN_NAMES = ("fourier_matrix",)

PROJECTIONS = ("equal_earth", "mercator")

# Equal Earth (Savric, Patterson & Jenny 2018) as GeoCLIP writes it.
A1 = 1.340264
A2 = -0.081106
A3 = 0.000893
A4 = 0.003796
# GeoCLIP's scale: (x, y) * SF / 180 puts x in [-1, 1] (x(lng=180) = 1 on the unit sphere
# times SF / 180 = 2.70663 * 0.369463 = 1.0000) and y in [-0.4867, 0.4867].
SF = 66.50336

# G3 divides EPSG:3857 metres by this (pi * 6378137, to 1e-15): both axes land in [-1, 1].
MERCATOR_HALF_EXTENT = 20037508.3427892
_MERCATOR_RADIUS = 6378137.0
# The latitude where Web Mercator's northing equals its half extent: atan(sinh(pi)).
MERCATOR_MAX_LAT = 85.0511287798066


def _xp(x):
  """numpy for numpy inputs (float64 references), jax.numpy otherwise."""
  return np if isinstance(x, (np.ndarray, np.generic, float, int)) else jnp


def _as_float(x, xp):
  x = xp.asarray(x)
  if not xp.issubdtype(x.dtype, xp.floating):
    x = x.astype(np.float64 if xp is np else jnp.float32)
  return x


def equal_earth(latlng, xp=None):
  """[..., 2] (lat, lng) degrees -> [..., 2] (x, y) * SF / 180, as GeoCLIP.

  On the unit sphere this is PROJ's `+proj=eqearth +R=1` times SF / 180.
  The operations follow torch's `equal_earth_projection` one for one (same
  constants, same order) so float32 results round like GeoCLIP's; numpy
  inputs stay numpy (float64 references).
  """
  xp = _xp(latlng) if xp is None else xp
  latlng = _as_float(latlng, xp)
  lat = xp.deg2rad(latlng[..., 0])
  lng = xp.deg2rad(latlng[..., 1])
  sqrt3 = xp.sqrt(xp.asarray(3.0, latlng.dtype))
  theta = xp.arcsin((sqrt3 / 2) * xp.sin(lat))
  denominator = 3 * (9 * A4 * theta**8 + 7 * A3 * theta**6 + 3 * A2 * theta**2 + A1)
  x = (2 * sqrt3 * lng * xp.cos(theta)) / denominator
  y = A4 * theta**9 + A3 * theta**7 + A2 * theta**3 + A1 * theta
  return (xp.stack((x, y), axis=-1) * SF) / 180


def web_mercator(latlng, clamp: bool = True, xp=None):
  """[..., 2] (lat, lng) degrees -> [..., 2] (northing, easting) / MERCATOR_HALF_EXTENT.

  G3's order and scale (EPSG:3857 metres, northing first); both in [-1, 1]
  once |lat| <= MERCATOR_MAX_LAT.  Northing diverges at the poles: `clamp`
  clips |lat| to MERCATOR_MAX_LAT first (G3 does not; its poles are inf).
  """
  xp = _xp(latlng) if xp is None else xp
  latlng = _as_float(latlng, xp)
  lat = latlng[..., 0]
  if clamp:
    lat = xp.clip(lat, -MERCATOR_MAX_LAT, MERCATOR_MAX_LAT)
  scale = _MERCATOR_RADIUS / MERCATOR_HALF_EXTENT
  northing = xp.arcsinh(xp.tan(xp.deg2rad(lat))) * scale  # = ln tan(pi/4 + lat/2)
  easting = xp.deg2rad(latlng[..., 1]) * scale
  return xp.stack((northing, easting), axis=-1)


def project(latlng, projection: str, xp=None):
  """The encoder's input projection by name ("equal_earth" or "mercator")."""
  if projection == "equal_earth":
    return equal_earth(latlng, xp=xp)
  if projection == "mercator":
    return web_mercator(latlng, clamp=True, xp=xp)
  raise ValueError(f"unknown projection {projection!r}; known: {PROJECTIONS}")


def location_encoder_config(projection: str = "equal_earth",
                            sigmas: Sequence[float] = (1.0, 16.0, 256.0),
                            num_fourier: int = 256, hidden: int = 1024, depth: int = 3,
                            out_dim: int = 512, weights: str = "",
                            compute_dtype: str = "float32",
                            rff_dtype: str = "float32") -> ml_collections.ConfigDict:
  """GeoCLIP's encoder by default.

  projection     "equal_earth" (GeoCLIP) or "mercator" (G3: Web Mercator, clamped)
  sigmas         one capsule per sigma (std of its B); must match the weights' capsules
  num_fourier    rows of each B: gamma is 2 * num_fourier wide
  hidden, depth  each capsule's hidden width and number of hidden (ReLU) layers
  out_dim        each capsule's (and the sum's) output width
  weights        "" (random init) or a converted `location_encoder.safetensors`
                 (geoclip_weights.convert / ensure_converted)
  compute_dtype  MLP matmul dtype ("float32" or "bfloat16")
  rff_dtype      projection and phase dtype: "float32", or "float64" (needs JAX x64;
                 for float64 references)
  """
  return ml_collections.ConfigDict(dict(
      projection=projection, sigmas=tuple(float(s) for s in sigmas),
      num_fourier=int(num_fourier), hidden=int(hidden), depth=int(depth), out_dim=int(out_dim),
      weights=str(weights), compute_dtype=compute_dtype, rff_dtype=rff_dtype))


def _check_config(config) -> None:
  if config.projection not in PROJECTIONS:
    raise ValueError(f"location encoder projection must be one of {PROJECTIONS}, "
                     f"got {config.projection!r}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"location encoder compute_dtype must be float32 or bfloat16, "
                     f"got {config.compute_dtype!r}")
  if config.rff_dtype not in ("float32", "float64"):
    raise ValueError(f"location encoder rff_dtype must be float32 or float64, "
                     f"got {config.rff_dtype!r}")
  if not config.sigmas or min(config.sigmas) <= 0:
    raise ValueError(f"location encoder sigmas must be positive, got {config.sigmas}")
  for field in ("num_fourier", "hidden", "out_dim"):
    if int(config[field]) < 1:
      raise ValueError(f"location encoder {field} must be >= 1, got {config[field]}")
  if int(config.depth) < 0:
    raise ValueError(f"location encoder depth must be >= 0, got {config.depth}")


def fourier_features(v: jax.Array, b: jax.Array) -> jax.Array:
  """gamma(v) = [cos(2 pi v b^T), sin(2 pi v b^T)]: v [..., 2], b [F, 2] -> [..., 2F].

  cos first, as the `rff` package; 2 pi multiplies v before the product, as it does.
  """
  phase = jnp.matmul(2 * np.pi * v, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


class RFFCapsule(nnx.Module):
  """One capsule: Gaussian Fourier features of a fixed B, then Linear-ReLU-...-Linear."""

  def __init__(self, sigma: float, *, num_fourier: int, hidden: int, depth: int, out_dim: int,
               dtype, rngs: nnx.Rngs):
    # Fixed random projection, N(0, sigma^2) like rff.sample_b; frozen by name.
    self.fourier_matrix = layers.param(rngs, layers.normal_init(float(sigma)), (num_fourier, 2),
                                       (None, None))
    # GeoCLIP's capsule (3 x Linear + ReLU) and its head (Linear) are one MLPHead.
    self.mlp = heads.MLPHead((2 * num_fourier,) + (hidden,) * depth + (out_dim,), dtype=dtype,
                             rngs=rngs)

  def __call__(self, v: jax.Array) -> jax.Array:
    """v [N, 2] projected coordinates (rff dtype) -> [N, out_dim] float32."""
    b = jax.lax.stop_gradient(self.fourier_matrix[...]).astype(v.dtype)
    # The features are in [-1, 1]: rounding them to the compute dtype is harmless.
    return self.mlp(fourier_features(v, b).astype(jnp.float32)).astype(jnp.float32)


class LocationEncoder(nnx.Module):
  """latlng [N, 2] degrees -> [N, out_dim] float32: the sum of the RFF capsules."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    _check_config(config)
    self.projection = str(config.projection)
    self.sigmas = tuple(float(s) for s in config.sigmas)
    self.out_dim = int(config.out_dim)
    self.dtype = jnp.dtype(config.compute_dtype)
    self.rff_dtype = jnp.dtype(config.rff_dtype)
    self.capsules = nnx.List([
        RFFCapsule(s, num_fourier=int(config.num_fourier), hidden=int(config.hidden),
                   depth=int(config.depth), out_dim=self.out_dim, dtype=self.dtype, rngs=rngs)
        for s in self.sigmas])

  def _rff_dtype(self) -> jnp.dtype:
    if self.rff_dtype == jnp.float64 and not jax.config.jax_enable_x64:
      raise ValueError("rff_dtype float64 needs JAX x64 (with jax.enable_x64(True): ...)")
    return self.rff_dtype

  def project(self, latlng: jax.Array) -> jax.Array:
    """[N, 2] degrees -> [N, 2] projected, in the rff dtype."""
    return project(jnp.asarray(latlng, self._rff_dtype()), self.projection, xp=jnp)

  def encode_projected(self, v: jax.Array) -> jax.Array:
    """Capsules on already projected v [N, 2] -> [N, out_dim] float32."""
    v = jnp.asarray(v, self._rff_dtype())
    out = self.capsules[0](v)
    for capsule in self.capsules[1:]:  # torch's order: ((c0 + c1) + c2)
      out = out + capsule(v)
    return out

  def __call__(self, latlng: jax.Array) -> jax.Array:
    return self.encode_projected(self.project(latlng))


def pretrained_leaves(location_config, prefix: str | Sequence = ()) -> dict[tuple, np.ndarray]:
  """{prefix + param path: array} from config.weights, or {} when it is "".

  The trainer places these into its initialized (sharded) parameters; paths
  match nnx.to_flat_state(nnx.state(LocationEncoder(config), nnx.Param)).
  """
  if not location_config.weights:
    return {}
  prefix = (prefix,) if isinstance(prefix, str) else tuple(prefix)
  leaves = geoclip_weights.load_location_encoder_weights(location_config.weights, location_config)
  return {prefix + key: value for key, value in leaves.items()}


def param_count(config) -> int:
  """Number of parameter scalars (fourier matrices included)."""
  f, h, d, o = (int(config[k]) for k in ("num_fourier", "hidden", "depth", "out_dim"))
  dims = (2 * f,) + (h,) * d + (o,)
  per_capsule = f * 2 + sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
  return per_capsule * len(config.sigmas)


__all__ = [
    "LOCATION_FROZEN_NAMES", "LocationEncoder", "RFFCapsule", "equal_earth", "fourier_features",
    "location_encoder_config", "pretrained_leaves", "project", "web_mercator",
]
