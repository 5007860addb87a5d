"""GeoCLIP's pretrained weights: converted once from the `geoclip` wheel's torch files.

The wheel ships torch pickles (geoclip/model/weights/*.pth, torch's zip
format).  `convert` reads them once with a restricted unpickler, no torch
(`read_torch_file`: only plain tensors, storages and OrderedDict are allowed,
any other global is refused, so a file cannot run code), and writes
safetensors with torch's key names kept, plus `geoclip_weights.json`
(sources, sha256s, shapes); at run time the loaders here read the
safetensors with numpy only: no torch, no unpickling.

  python -m geotoken_jax.encoders.geoclip_weights --output DIR
  paths = ensure_converted()            # converts into default_weights_dir() once

Torch key layout (geoclip.LocationEncoder):
  LocEnc{i}.capsule.0.b                 B [256, 2] (rff.GaussianEncoding; sigma is not stored)
  LocEnc{i}.capsule.{1,3,5}.{weight,bias}   Linear 512->1024->1024->1024 (ReLU between)
  LocEnc{i}.head.0.{weight,bias}        Linear 1024->512
Image MLP (ImageEncoder.mlp = Sequential(Linear(768,768), ReLU, Linear(768,512))):
  {0,2}.{weight,bias}
Logit scale: a bare 0-d tensor, stored here under the key "logit_scale".
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

LOCATION_FILE = "location_encoder.safetensors"
IMAGE_MLP_FILE = "image_mlp.safetensors"
LOGIT_SCALE_FILE = "logit_scale.safetensors"
METADATA_FILE = "geoclip_weights.json"

# output name -> (source file under geoclip/model/weights, output file)
_SOURCES = {
    "location_encoder": ("location_encoder_weights.pth", LOCATION_FILE),
    "image_mlp": ("image_encoder_mlp_weights.pth", IMAGE_MLP_FILE),
    "logit_scale": ("logit_scale_weights.pth", LOGIT_SCALE_FILE),
}
GALLERY_FILE = os.path.join("gps_gallery", "coordinates_100K.csv")
LOGIT_SCALE_KEY = "logit_scale"
IMAGE_MLP_DIMS = (768, 768, 512)
WEIGHTS_DIR_ENV = "GEOTOKEN_WEIGHTS_DIR"


# Reading torch's zip serialization without torch
# ------------------------------------------------------------------------------
# A torch.save file (torch >= 1.6) is a zip archive holding <name>/data.pkl (the
# pickled object: tensors reduce to torch._utils._rebuild_tensor_v2 over
# persistent-id storages), <name>/data/<key> (each storage's raw bytes),
# <name>/version and maybe <name>/byteorder.  The unpickler below resolves only
# the few globals a state dict of plain tensors needs, to numpy stand-ins.

# torch.<Name>Storage -> numpy dtype name (bfloat16 comes from ml_dtypes)
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_STRIDED = "torch.strided"  # the only layout a dense tensor has


class _StorageType:
  """Stands in for a torch.<Name>Storage class in the pickle's persistent ids."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    if _STORAGE_DTYPES[self.name] == "bfloat16":
      import ml_dtypes  # noqa: PLC0415 (a jax dependency)
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[self.name])

  def __repr__(self):
    return f"torch.{self.name}"


def _as_strided(storage, storage_offset, size, stride) -> np.ndarray:
  """A contiguous copy of the tensor view (offset, size, stride in elements) of storage."""
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError(f"tensor storage is not a loaded storage: {type(storage)}")
  try:
    offset = int(storage_offset)
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  except (TypeError, ValueError) as e:
    raise pickle.UnpicklingError(f"bad tensor geometry {storage_offset!r} {size!r} "
                                 f"{stride!r}") from e
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset}, size {size}, "
                                 f"stride {stride}")
  if 0 in size:
    return np.empty(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # never let as_strided read past the storage
    raise pickle.UnpicklingError(f"tensor (offset {offset}, size {size}, stride {stride}) "
                                 f"reaches past its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
  return view.copy()


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _as_strided(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd / python state: not weights
  return _as_strided(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


def _get_layout(name):
  if name != _STRIDED:
    raise pickle.UnpicklingError(f"tensor layout {name!r} is not supported (only {_STRIDED})")
  return _STRIDED


# (module, name) -> what the pickle gets for that global; nothing else resolves.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch", "strided"): _STRIDED,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _TorchZipUnpickler(pickle.Unpickler):
  """Unpickles a torch zip archive's data.pkl to numpy, resolving only _ALLOWED_GLOBALS."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise pickle.UnpicklingError(
          f"{self._path}: refusing global {module}.{name}: only plain tensors, storages "
          "and OrderedDict may be loaded (this file is not a plain torch state dict, or "
          "it tries to run code)") from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key in self._storages:  # tensors sharing a storage share the loaded array
      storage = self._storages[key]
      if storage.dtype != storage_type.dtype:
        raise pickle.UnpicklingError(f"{self._path}: storage {key} is read as both "
                                     f"{storage.dtype} and {storage_type.dtype}")
      return storage
    dtype = storage_type.dtype
    member = f"{self._prefix}data/{key}"
    try:
      raw = self._archive.read(member)
    except KeyError:
      raise pickle.UnpicklingError(f"{self._path}: no storage record {member}") from None
    nbytes = numel * dtype.itemsize
    if len(raw) < nbytes:
      raise pickle.UnpicklingError(f"{self._path}: storage record {member} has {len(raw)} "
                                   f"bytes, {storage_type} of {numel} needs {nbytes}")
    storage = np.frombuffer(raw, dtype=dtype, count=numel)
    if self._byteorder != sys.byteorder and dtype.itemsize > 1:
      # Swap each scalar's bytes (a complex's two parts separately), via unsigned ints
      # so ml_dtypes' bfloat16 needs no byteswap of its own.
      parts = 2 if dtype.kind == "c" else 1
      as_uint = np.dtype(f"u{dtype.itemsize // parts}")
      storage = storage.view(as_uint).byteswap().view(dtype)
    self._storages[key] = storage
    return storage


def read_torch_file(path) -> dict[str, np.ndarray] | np.ndarray:
  """Reads a torch.save file (zip format) without torch: a state dict, or a bare tensor.

  Tensors come back as contiguous numpy arrays (torch's dtypes; bfloat16 as
  ml_dtypes.bfloat16).  Only the globals a file of plain tensors needs are
  resolved: any other raises pickle.UnpicklingError naming it, before anything
  runs.  The legacy pre-1.6 format (not a zip) raises ValueError.
  """
  path = Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a torch zip archive: the legacy torch serialization format "
                     "(torch < 1.6, or _use_new_zipfile_serialization=False) is not supported; "
                     "re-save it with torch.save on torch >= 1.6")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <name>/data.pkl record in the torch zip archive, "
                       f"found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"  # torch's default when the record is absent
    if prefix + "byteorder" in archive.namelist():
      byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace")
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    with archive.open(pickles[0]) as f:
      loaded = _TorchZipUnpickler(f, archive, prefix, byteorder, path).load()
  if isinstance(loaded, np.ndarray):
    return loaded
  if isinstance(loaded, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                      for k, v in loaded.items()):
    return dict(loaded)
  raise ValueError(f"{path}: expected a state dict of tensors or a tensor, got "
                   f"{type(loaded).__name__}")


# Finding and converting the torch files
# ------------------------------------------------------------------------------


def geoclip_model_dir(geoclip_dir=None) -> Path:
  """The installed geoclip package's `model/` folder, found without importing geoclip.

  (Importing it pulls in pandas, geopy, transformers.)  `geoclip_dir` may be the
  package folder or its `model/` folder.
  """
  if geoclip_dir is None:
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError("the `geoclip` package is not installed: pass geoclip_dir, or "
                              "`pip install --no-deps geoclip` (only its weight files are read)")
    geoclip_dir = next(iter(spec.submodule_search_locations))
  root = Path(geoclip_dir)
  model_dir = root if (root / "weights").is_dir() else root / "model"
  missing = [str(model_dir / "weights" / src) for src, _ in _SOURCES.values()
             if not (model_dir / "weights" / src).is_file()]
  if missing:
    raise FileNotFoundError(f"geoclip weight files not found: {missing}")
  return model_dir


def sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
  """write(tmp_path), then rename: a crash never leaves a half file that looks converted."""
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)


def convert(output_dir, geoclip_dir=None) -> dict[str, Path]:
  """Converts geoclip's three .pth files to safetensors in output_dir (no torch: read_torch_file).

  Returns {"location_encoder", "image_mlp", "logit_scale", "metadata": path}.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  model_dir = geoclip_model_dir(geoclip_dir)
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  paths, files = {}, {}
  for name, (source_name, output_name) in _SOURCES.items():
    source = model_dir / "weights" / source_name
    loaded = read_torch_file(source)
    if isinstance(loaded, np.ndarray):  # the logit scale is a bare tensor
      loaded = {LOGIT_SCALE_KEY: loaded}
    arrays = {k: np.ascontiguousarray(v) for k, v in loaded.items()}
    out = output_dir / output_name
    _write_atomic(out, lambda p, a=arrays: save_file(a, str(p)))
    paths[name] = out
    files[name] = {
        "source": str(source), "source_sha256": sha256(source),
        "output": output_name, "output_sha256": sha256(out),
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
    }
  gallery = model_dir / GALLERY_FILE
  metadata = {
      "geoclip_model_dir": str(model_dir),
      "geoclip_version": _geoclip_version(),
      "files": files,
      # Not copied: read it from the wheel (LAT,LON header, degrees).
      "gps_gallery": {"path": str(gallery), "exists": gallery.is_file(),
                      "sha256": sha256(gallery) if gallery.is_file() else None},
  }
  meta_path = output_dir / METADATA_FILE
  _write_atomic(meta_path, lambda p: p.write_text(json.dumps(metadata, indent=2) + "\n"))
  paths["metadata"] = meta_path
  return paths


def _geoclip_version() -> str | None:
  from importlib import metadata  # noqa: PLC0415
  try:
    return metadata.version("geoclip")
  except metadata.PackageNotFoundError:
    return None


def default_weights_dir() -> Path:
  """$GEOTOKEN_WEIGHTS_DIR/geoclip, else $XDG_CACHE_HOME (~/.cache)/geotoken_jax/geoclip."""
  root = os.environ.get(WEIGHTS_DIR_ENV)
  if root:
    return Path(root).expanduser() / "geoclip"
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return Path(cache).expanduser() / "geotoken_jax" / "geoclip"


def converted_paths(output_dir=None) -> dict[str, Path]:
  """Where convert() puts each file in output_dir (default_weights_dir() by default)."""
  d = Path(output_dir) if output_dir is not None else default_weights_dir()
  paths = {name: d / out for name, (_, out) in _SOURCES.items()}
  paths["metadata"] = d / METADATA_FILE
  return paths


def ensure_converted(output_dir=None, geoclip_dir=None) -> dict[str, Path]:
  """The converted files' paths, converting once if any is missing (no torch needed)."""
  paths = converted_paths(output_dir)
  if all(p.is_file() for p in paths.values()):
    return paths
  return convert(paths["metadata"].parent, geoclip_dir)


# Loading the safetensors (numpy only)
# ------------------------------------------------------------------------------


def _read(path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no weights file {path}: run `python -m "
                            "geotoken_jax.encoders.geoclip_weights --output DIR` first")
  return load_file(str(path))


def _map_keys(path, tensors: dict[str, np.ndarray],
              plan: dict[str, tuple[tuple, tuple, bool]]) -> dict[tuple, np.ndarray]:
  """plan: torch key -> (param path, expected param shape, transpose).  All problems at once."""
  missing = sorted(set(plan) - set(tensors))
  unexpected = sorted(set(tensors) - set(plan))
  misshaped = []
  leaves = {}
  for key, (param_path, shape, transpose) in plan.items():
    if key not in tensors:
      continue
    value = np.asarray(tensors[key])
    value = value.T if transpose else value
    if value.shape != tuple(shape):
      stored = tensors[key].shape
      misshaped.append(f"{key}: stored {tuple(stored)}, expected "
                       f"{tuple(shape[::-1]) if transpose else tuple(shape)} for "
                       f"{'/'.join(map(str, param_path))}")
      continue
    leaves[param_path] = np.ascontiguousarray(value, dtype=np.float32)
  if missing or unexpected or misshaped:
    lines = [f"weights file {path} does not match the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
      lines.append(f"  wrong shapes ({len(misshaped)}):")
      lines.extend(f"    {m}" for m in misshaped)
    raise ValueError("\n".join(lines))
  return leaves


def location_encoder_plan(config) -> dict[str, tuple[tuple, tuple, bool]]:
  """torch key -> (LocationEncoder param path, shape, transpose) for a config."""
  f, h, depth, o = (int(config[k]) for k in ("num_fourier", "hidden", "depth", "out_dim"))
  dims = (2 * f,) + (h,) * depth + (o,)
  plan = {}
  for i in range(len(config.sigmas)):
    plan[f"LocEnc{i}.capsule.0.b"] = (("capsules", i, "fourier_matrix"), (f, 2), False)
    # capsule.0 is the RFF layer, then Linear / ReLU pairs: Linears at 1, 3, 5, ...;
    # the last Linear is the head.
    torch_linears = [f"LocEnc{i}.capsule.{2 * j + 1}" for j in range(depth)] + [f"LocEnc{i}.head.0"]
    for j, (name, (a, b)) in enumerate(zip(torch_linears, zip(dims[:-1], dims[1:]))):
      layer = ("capsules", i, "mlp", "layers", j)
      plan[f"{name}.weight"] = (layer + ("kernel",), (a, b), True)
      plan[f"{name}.bias"] = (layer + ("bias",), (b,), False)
  return plan


def load_location_encoder_weights(path, config) -> dict[tuple, np.ndarray]:
  """{LocationEncoder param path: float32 array} from a converted location_encoder.safetensors.

  Raises ValueError listing every missing / unexpected / mis-shaped key, and
  when a capsule's B is far from its configured sigma (capsules out of order).
  """
  leaves = _map_keys(path, _read(path), location_encoder_plan(config))
  for i, sigma in enumerate(config.sigmas):
    std = float(np.std(leaves[("capsules", i, "fourier_matrix")]))
    if not sigma / 1.5 < std < sigma * 1.5:  # 512 draws: the std estimate is within ~5%
      raise ValueError(f"weights file {path}: capsule {i}'s B has std {std:.4g} but the config's "
                       f"sigma is {sigma} (config.sigmas {tuple(config.sigmas)} in the wrong "
                       "order or for other weights?)")
  return leaves


def load_image_mlp_weights(path) -> dict[tuple, np.ndarray]:
  """{MLPHead(IMAGE_MLP_DIMS) param path: array} from a converted image_mlp.safetensors.

  Torch: Sequential(Linear 768->768, ReLU, Linear 768->512): keys {0,2}.{weight,bias}.
  """
  dims = IMAGE_MLP_DIMS
  plan = {}
  for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
    plan[f"{2 * j}.weight"] = (("layers", j, "kernel"), (a, b), True)
    plan[f"{2 * j}.bias"] = (("layers", j, "bias"), (b,), False)
  return _map_keys(path, _read(path), plan)


def load_logit_scale(path) -> float:
  """GeoCLIP's trained logit scale as stored: log-space (logits = exp(value) * cosine)."""
  tensors = _read(path)
  if set(tensors) != {LOGIT_SCALE_KEY} or np.asarray(tensors[LOGIT_SCALE_KEY]).size != 1:
    raise ValueError(f"weights file {path}: expected one scalar {LOGIT_SCALE_KEY!r}, "
                     f"got {{{', '.join(f'{k}: {v.shape}' for k, v in tensors.items())}}}")
  return float(np.asarray(tensors[LOGIT_SCALE_KEY]).reshape(()))


# Command line
# ------------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m geotoken_jax.encoders.geoclip_weights",
      description="Convert the geoclip wheel's torch weights to safetensors (no torch needed).")
  parser.add_argument("--output", default=None,
                      help=f"output folder (default: {default_weights_dir()})")
  parser.add_argument("--geoclip_dir", default=None,
                      help="the geoclip package folder (default: the installed one)")
  args = parser.parse_args(argv)
  paths = convert(args.output if args.output else default_weights_dir(), args.geoclip_dir)
  for name, path in paths.items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
