"""geoclip_weights.read_torch_file (torch's zip format without torch) against torch.load."""

import collections
import io
import json
import os
import pickle
import pickletools
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from geotoken_jax.encoders import geoclip_weights as gw

torch = pytest.importorskip("torch")  # the oracle only


def _weights_dir():
  try:
    return gw.geoclip_model_dir() / "weights"
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _numpy_dtype(dtype):
  if dtype == torch.bfloat16:
    return np.dtype(ml_dtypes.bfloat16)
  return torch.empty(0, dtype=dtype).numpy().dtype


def _bits(t):
  """A torch tensor's values as a contiguous numpy array of its bit patterns."""
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(np.uint16)
  return t.numpy()


def _assert_same(got, want, name="tensor"):
  assert isinstance(got, np.ndarray), name
  assert got.shape == tuple(want.shape), name
  assert got.dtype == _numpy_dtype(want.dtype), name
  assert got.flags.c_contiguous and got.flags.writeable, name
  if want.dtype == torch.bfloat16:
    np.testing.assert_array_equal(got.view(np.uint16), _bits(want), err_msg=name)
  else:
    assert got.tobytes() == _bits(want).tobytes(), name  # bit for bit (NaNs, -0.0 too)


def _assert_same_file(path):
  got = gw.read_torch_file(path)
  want = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(want, torch.Tensor):
    _assert_same(got, want)
    return
  assert isinstance(got, dict)
  assert list(got) == list(want)
  for key in want:
    _assert_same(got[key], want[key], key)


def _rewrite_zip(path, out, replace):
  """Copies torch zip `path` to `out`, record name -> bytes from replace(name, data)."""
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
    for info in src.infolist():
      dst.writestr(info.filename, replace(info.filename, src.read(info.filename)))


def _data_pkl(path):
  with zipfile.ZipFile(path) as z:
    return next(n for n in z.namelist() if n.endswith("/data.pkl"))


# 1. The shipped files
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [src for src, _ in gw._SOURCES.values()])
def test_shipped_files_equal_torch_load(source):
  _assert_same_file(_weights_dir() / source)


# 2. What torch writes: views, offsets, shared storage, dtypes, 0-d
# ------------------------------------------------------------------------------


def test_views_dtypes_and_scalars_equal_torch(tmp_path):
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(4, 5, generator=gen)
  x[0, 0], x[0, 1], x[0, 2] = float("nan"), -0.0, float("inf")
  b = torch.randn(6, 7, generator=gen).to(torch.bfloat16)
  tensors = {
      "t": x.t(), "v": x[1:, 2:], "same": x, "row": x[2], "col": x[:, 3], "step": x[::2, ::3],
      "scalar_view": x[1, 2],  # 0-d with a storage offset
      "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),  # stride 0
      "empty": torch.zeros(0, 3),
      "float64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
      "float16": torch.randn(5, 3, generator=gen).half()[:, 1:],
      "bfloat16": b, "bfloat16_t": b.t(), "bfloat16_slice": b[2:, 1::2],
      "int64": torch.tensor([[-(2**62), -1, 0], [1, 2**40, 2**63 - 1]]).t(),
      "int32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4)[1:],
      "int16": torch.arange(-5, 5, dtype=torch.int16), "int8": torch.arange(-5, 5, dtype=torch.int8),
      "uint8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([[True, False, True], [False, False, True]]).t(),
      "complex64": torch.randn(3, 2, generator=gen, dtype=torch.complex64),
      "scalar": torch.tensor(2.5, dtype=torch.float64),
      "scalar_int": torch.tensor(7),
  }
  path = tmp_path / "views.pt"
  torch.save(tensors, path)
  with zipfile.ZipFile(path) as z:  # t, v, same, ... really share one storage record
    assert sum(n.split("/")[-2] == "data" for n in z.namelist()) < len(tensors)
  _assert_same_file(path)
  got = gw.read_torch_file(path)
  np.testing.assert_array_equal(got["t"], got["same"].T)
  np.testing.assert_array_equal(got["v"], got["same"][1:, 2:])


def test_bare_scalar_and_parameters(tmp_path):
  torch.save(torch.tensor(3.6810348), tmp_path / "scalar.pt")
  got = gw.read_torch_file(tmp_path / "scalar.pt")
  assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == np.float32
  _assert_same_file(tmp_path / "scalar.pt")
  torch.save(torch.arange(10.0)[7], tmp_path / "scalar_view.pt")  # a bare 0-d view
  _assert_same_file(tmp_path / "scalar_view.pt")
  torch.save(torch.nn.Linear(3, 2).state_dict(keep_vars=True), tmp_path / "params.pt")
  data = zipfile.ZipFile(tmp_path / "params.pt").read(_data_pkl(tmp_path / "params.pt"))
  assert b"_rebuild_parameter" in data
  _assert_same_file(tmp_path / "params.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.complex64, torch.bool])
def test_big_endian_files(tmp_path, dtype):
  """A file whose byteorder record says big: bytes swapped per scalar, as torch.load does."""
  gen = torch.Generator().manual_seed(1)
  t = (torch.randn(3, 4, generator=gen) * 100).to(dtype) if dtype != torch.complex64 else \
      torch.randn(3, 4, generator=gen, dtype=dtype)
  src, big = tmp_path / "little.pt", tmp_path / "big.pt"
  torch.save({"a": t, "b": t[1:, ::2]}, src)
  itemsize = _numpy_dtype(dtype).itemsize // (2 if dtype.is_complex else 1)

  def swap(name, data):
    if name.endswith("/byteorder"):
      return b"big"
    if name.split("/")[-2] == "data" and itemsize > 1:
      return np.frombuffer(data, f"u{itemsize}").byteswap().tobytes()
    return data

  with zipfile.ZipFile(src) as z:
    assert any(n.endswith("/byteorder") for n in z.namelist())
  _rewrite_zip(src, big, swap)
  _assert_same_file(big)  # torch agrees on the big-endian file
  got = gw.read_torch_file(big)
  _assert_same(got["a"], t)
  _assert_same(got["b"], t[1:, ::2])


def test_no_byteorder_record_means_little(tmp_path):
  src, out = tmp_path / "a.pt", tmp_path / "b.pt"
  torch.save({"a": torch.arange(6.0).reshape(2, 3)}, src)
  with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as w:
    for n in z.namelist():
      if not n.endswith("/byteorder"):
        w.writestr(n, z.read(n))
  _assert_same_file(out)


def test_legacy_format_refused(tmp_path):
  path = tmp_path / "legacy.pt"
  torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match="legacy torch serialization format"):
    gw.read_torch_file(path)


# 3. Refusing anything but plain tensors
# ------------------------------------------------------------------------------


class _Evil:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
def test_os_system_refused_and_not_run(tmp_path, protocol):
  path, evil = tmp_path / "ok.pt", tmp_path / "evil.pt"
  marker = tmp_path / "pwned"
  torch.save({"a": torch.zeros(2)}, path)
  payload = pickle.dumps({"a": _Evil(f"echo pwned > {marker}")}, protocol=protocol)
  names = {arg for op, arg, _ in pickletools.genops(payload) if isinstance(arg, str)}
  assert {"posix", "system"} <= names or "posix system" in names  # really references it
  name = _data_pkl(path)
  _rewrite_zip(path, evil, lambda n, data: payload if n == name else data)
  with pytest.raises(pickle.UnpicklingError, match=r"refusing global (posix|os)\.system"):
    gw.read_torch_file(evil)
  assert not marker.exists()


@pytest.mark.parametrize("obj", [
    {"a": eval}, {"a": collections.Counter()}, {"a": np.zeros(2)},
    {"a": torch.zeros(2).to_sparse()}])
def test_other_globals_refused(tmp_path, obj):
  path = tmp_path / "x.pt"
  torch.save(obj, path)
  with pytest.raises(pickle.UnpicklingError, match="refusing global"):
    gw.read_torch_file(path)


class _Storage:
  """Pickled as a persistent id: a torch storage record."""

  def __init__(self, key, numel, storage_type="FloatStorage"):
    self.pid = ("storage", getattr(torch, storage_type), key, "cpu", numel)


class _CraftPickler(pickle.Pickler):
  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, _Storage) else None


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2, self.args)


def _craft(tmp_path, obj):
  """A torch zip whose data.pkl is obj; storage record "0" holds 4 float32s [0, 1, 2, 3]."""
  path, out = tmp_path / "base.pt", tmp_path / "crafted.pt"
  torch.save({"a": torch.arange(4.0)}, path)
  buf = io.BytesIO()
  _CraftPickler(buf, protocol=2).dump(obj)
  name = _data_pkl(path)
  _rewrite_zip(path, out, lambda n, data: buf.getvalue() if n == name else data)
  return out


def test_crafted_tensor_geometry_checked(tmp_path):
  ok = _craft(tmp_path, {"a": _Tensor(_Storage("0", 4), 1, (2,), (2,))})
  np.testing.assert_array_equal(gw.read_torch_file(ok)["a"], [1.0, 3.0])
  for offset, size, stride in [(0, (5,), (1,)), (3, (2,), (1,)), (0, (2, 2), (3, 1)),
                               (-1, (1,), (1,)), (0, (2,), (-1,))]:
    bad = _craft(tmp_path, {"a": _Tensor(_Storage("0", 4), offset, size, stride)})
    with pytest.raises(pickle.UnpicklingError, match="past its storage|bad tensor geometry"):
      gw.read_torch_file(bad)
  short = _craft(tmp_path, {"a": _Tensor(_Storage("0", 8), 0, (8,), (1,))})
  with pytest.raises(pickle.UnpicklingError, match="has 16 bytes"):
    gw.read_torch_file(short)
  missing = _craft(tmp_path, {"a": _Tensor(_Storage("9", 4), 0, (4,), (1,))})
  with pytest.raises(pickle.UnpicklingError, match="no storage record"):
    gw.read_torch_file(missing)


def test_not_a_state_dict_refused(tmp_path):
  path = _craft(tmp_path, {"a": [1, 2]})
  with pytest.raises(ValueError, match="expected a state dict"):
    gw.read_torch_file(path)


# 4. convert() without torch, same files as with torch
# ------------------------------------------------------------------------------


def test_convert_without_torch_matches_torch_conversion(tmp_path, monkeypatch):
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415
  model_dir = _weights_dir().parent
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    paths = gw.convert(tmp_path / "out", model_dir)
  metadata = json.loads(paths["metadata"].read_text())
  assert set(metadata) == {"geoclip_model_dir", "geoclip_version", "files", "gps_gallery"}
  for name, (source_name, output_name) in gw._SOURCES.items():
    source = model_dir / "weights" / source_name
    assert paths[name] == tmp_path / "out" / output_name
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(loaded, torch.Tensor):
      loaded = {gw.LOGIT_SCALE_KEY: loaded}
    got = load_file(str(paths[name]))
    assert set(got) == set(loaded)
    for key, value in loaded.items():
      # (np.ascontiguousarray makes the 0-d logit scale shape (1,), as it always did)
      _assert_same(got[key].reshape(tuple(value.shape)), value, key)
    # The torch-based converter's file, byte for byte.
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in loaded.items()}
    save_file(arrays, str(tmp_path / output_name))
    assert paths[name].read_bytes() == (tmp_path / output_name).read_bytes()
    entry = metadata["files"][name]
    assert set(entry) == {"source", "source_sha256", "output", "output_sha256", "shapes",
                          "dtypes"}
    assert entry["output_sha256"] == gw.sha256(tmp_path / output_name)
    assert entry["shapes"] == {k: list(v.shape) for k, v in arrays.items()}
    assert entry["dtypes"] == {k: str(v.dtype) for k, v in arrays.items()}
