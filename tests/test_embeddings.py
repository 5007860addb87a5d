"""geotoken_jax.embeddings: the store's files are exact (any device or process count),
resumable, refuse changed settings, and the reader checks what it opens."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geotoken_jax import data, embeddings, runtime, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 53  # records: not a multiple of any batch below (padding), 5 shards of 12
SHARD_ROWS = 12  # not a multiple of the batches either: batches straddle shards
SIZE = 6  # image side
EXTRA = {"workdir": "/runs/a", "step": 7, "config": {"model": "stand-in", "dims": (16, 8)}}


class ArraySource:
  """A Source over in-memory arrays: image uint8, latlng, tokens and int or string ids."""

  def __init__(self, n: int = N, *, string_ids: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.arrays = {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "latlng": np.stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)], -1).astype(np.float32),
        "tokens": rng.integers(0, 4, (n, 5)).astype(np.int32),
        "id": (np.asarray([f"photo/{i}" + "x" * (i % 5) for i in range(n)], dtype=object) if string_ids
               else 1000 + 7 * np.arange(n, dtype=np.int64)),
    }
    self.string_ids = string_ids

  def __len__(self) -> int:
    return len(self.arrays["latlng"])

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self.arrays.items()}

  def get_batch(self, indices, positions=None) -> dict:
    del positions
    return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource({len(self)}, string_ids={self.string_ids})"


# Integer weights: the image field's dot products are sums of integers below 2^24,
# exact in float32 in any order, so every batch size and device count gives the
# same bits; the scaling by powers of two is exact too, + 0.1 and the float16
# cast round.
_W = np.random.default_rng(1).integers(-3, 4, (SIZE * SIZE * 3, 16)).astype(np.float32)
_SCALE = (2.0 ** (np.arange(8) - 4)).astype(np.float32)


@jax.jit
def embed(batch):
  pixels = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)  # [B, S*S*3]
  return {"image": pixels @ _W / 1024 + 0.1,  # [B, 16]
          "loc": batch["latlng"][:, np.arange(8) % 2] * _SCALE}  # [B, 8]


def mesh_of(count: int):
  return sharding.create_mesh({"data": -1}, jax.devices()[:count])


def write(out, source=None, *, devices=8, batch=8, **kwargs):
  kwargs = {"dtype": "float16", "shard_rows": SHARD_ROWS, "manifest_extra": EXTRA, "progress": False, **kwargs}
  return embeddings.write_embeddings(kwargs.pop("fn", embed), ArraySource() if source is None else source, str(out),
                                     mesh=mesh_of(devices), global_batch_size=batch, **kwargs)


def oracle(source, dtype) -> dict[str, np.ndarray]:
  """embed applied to one record at a time on one device, cast on the host."""
  mesh = mesh_of(1)
  rows = []
  for i in range(len(source)):
    batch = data.load_rows(source, np.array([i]))
    batch.update(index=np.array([i], np.int32), mask=np.array([True]))
    out = embed(sharding.make_global_batch(runtime.device_fields(batch), mesh))
    rows.append({k: np.asarray(v).astype(dtype) for k, v in out.items()})
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def files_of(directory) -> dict[str, bytes]:
  """Every shard file's bytes by relative path (the manifest and temporaries aside)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if name.endswith(".npy"):
        path = os.path.join(root, name)
        out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


def without_timings(manifest: dict) -> dict:
  return {k: v for k, v in manifest.items() if k != "timings"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted runs on 8 devices, batch 8: float16 with int ids, float32 with string ids."""
  root = tmp_path_factory.mktemp("embeddings")
  runs = {}
  for dtype, string_ids in (("float16", False), ("float32", True)):
    out = root / dtype
    manifest = write(out, ArraySource(string_ids=string_ids), dtype=dtype)
    runs[dtype] = (out, manifest, string_ids)
  return runs


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_one_device_equals_eight_and_the_row_oracle(reference, tmp_path, dtype):
  out8, manifest8, string_ids = reference[dtype]
  source = ArraySource(string_ids=string_ids)
  expected_files = files_of(out8)
  assert len(expected_files) == 5 * 6  # 5 shards of image, loc, latlng, index, tokens, id
  for devices, batch in ((1, 4), (8, 24)):
    out = tmp_path / f"{devices}-{batch}"
    manifest = write(out, source, devices=devices, batch=batch, dtype=dtype)
    assert files_of(out) == expected_files, (devices, batch)
    assert without_timings(manifest) == without_timings(manifest8)
    assert manifest["timings"][0]["images"] == N and manifest["timings"][0]["device_count"] == devices

  stored = embeddings.open_embeddings(out8, verify=True)
  assert stored.num_records == N and stored.fields == ("image", "loc")
  assert stored.dims == {"image": 16, "loc": 8}
  want = oracle(source, dtype)
  for name in ("image", "loc"):
    got = stored.field(name)
    assert got.dtype == np.dtype(dtype) and got.shape == (N, stored.dims[name])
    np.testing.assert_array_equal(got.view(np.uint8), want[name].view(np.uint8))  # bit for bit
  np.testing.assert_array_equal(stored.latlng, source.arrays["latlng"])
  np.testing.assert_array_equal(stored.tokens, source.arrays["tokens"])
  np.testing.assert_array_equal(stored.index, np.arange(N))
  assert stored.index.dtype == np.int64
  if string_ids:
    assert stored.ids.dtype.kind == "U" and stored.ids.tolist() == source.arrays["id"].tolist()
  else:
    assert stored.ids.dtype == np.int64 and stored.ids.tolist() == source.arrays["id"].tolist()
  # Shards: contiguous row ranges, memory-mapped; the manifest records the run.
  starts = [(start, len(array)) for start, array in stored.shards("image")]
  assert starts == [(0, 12), (12, 12), (24, 12), (36, 12), (48, 5)]
  assert all(isinstance(array, np.memmap) for _, array in stored.shards("loc"))
  assert manifest8["complete"] and manifest8["extra"] == json.loads(json.dumps(EXTRA))
  assert manifest8["nonfinite"] == {"image": 0, "loc": 0}
  assert manifest8["source"]["len"] == N and manifest8["timings"][0]["images_per_s"] > 0
  assert manifest8 == json.loads((out8 / "manifest.json").read_text())
  # rows(): a gather across shards, in the order asked, any index shape.
  picks = np.array([[52, 0], [13, 12]])
  np.testing.assert_array_equal(stored.rows("loc", picks), want["loc"][picks])
  assert stored.rows("id", [50, 3]).tolist() == source.arrays["id"][[50, 3]].tolist()
  with pytest.raises(IndexError, match="outside"):
    stored.rows("image", [N])


def test_two_processes_write_what_one_device_writes(reference, tmp_path):
  """2 localhost processes x 2 devices (jax.distributed, gloo): the same files, string ids included."""
  out8, manifest8, _ = reference["float32"]
  script = (
      "import sys; sys.path.insert(0, {tests!r})\n"
      "args = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
      "from geotoken_jax import distributed\n"
      "distributed.initialize(args['coordinator_address'], int(args['num_processes']), int(args['process_id']))\n"
      "import jax, test_embeddings as t\n"
      "assert jax.process_count() == 2 and jax.device_count() == 4\n"
      "m = t.write({out!r}, t.ArraySource(string_ids=True), devices=4, batch=8, dtype='float32')\n"
      "print('manifest', m['num_records'], m['complete'], jax.process_index())\n"
  ).format(tests=os.path.join(REPO, "tests"), out=str(tmp_path / "two"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", LOGDIR=str(tmp_path),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--", sys.executable, "-c", script],
                        env=env, capture_output=True, text=True, timeout=300)
  logs = "".join(open(tmp_path / f"process_{i}.log").read()[-2000:] for i in range(2)
                 if os.path.exists(tmp_path / f"process_{i}.log"))
  assert done.returncode == 0, logs + done.stderr[-2000:]
  assert "manifest 53 True 0" in logs and "manifest 53 True 1" in logs  # every process gets the manifest
  assert files_of(tmp_path / "two") == files_of(out8)
  two = json.loads((tmp_path / "two" / "manifest.json").read_text())
  assert without_timings(two) == without_timings(manifest8) and two["timings"][0]["process_count"] == 2


class Counted:
  """embed, counting calls; raises on call number `fail_at` (1-based)."""

  def __init__(self, fail_at: int | None = None):
    self.calls, self.fail_at = 0, fail_at

  def __call__(self, batch):
    self.calls += 1
    if self.calls == self.fail_at:
      raise RuntimeError("preempted")
    return embed(batch)


def test_interrupted_run_resumes_at_the_first_missing_shard(reference, tmp_path):
  expected = files_of(reference["float16"][0])
  out = tmp_path / "resumed"
  fn = Counted(fail_at=5)  # batches 0-3 done (rows 0-31): shards 0 and 1 (rows 0-23) complete
  with pytest.raises(RuntimeError, match="preempted"):
    write(out, fn=fn)
  manifest = json.loads((out / "manifest.json").read_text())
  assert not manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [[0, 12], [12, 24]]
  assert sorted(files_of(out)) == sorted(p for p in expected if p.endswith(("00000.npy", "00001.npy")))
  with pytest.raises(ValueError, match="incomplete"):
    embeddings.open_embeddings(out)
  stamps = {p: os.stat(out / p).st_mtime_ns for p in files_of(out)}

  fn = Counted()
  manifest = write(out, fn=fn)
  assert fn.calls == 4  # row 24 is in batch 3: batches 3-6, the complete shards are not recomputed
  assert files_of(out) == expected
  assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps
  assert manifest["complete"] and [t["images"] for t in manifest["timings"]] == [N - 24]
  assert without_timings(manifest) == without_timings(reference["float16"][1])

  # A shard file lost (written but never recorded, or deleted): redone from its first batch.
  os.remove(out / "loc" / "00003.npy")
  fn = Counted()
  write(out, fn=fn, batch=16)  # another batch size may resume: rows 36.. are in batch 2 of 16
  assert fn.calls == 2 and files_of(out) == expected
  # Nothing left: nothing computed.
  fn = Counted()
  assert write(out, fn=fn)["complete"] and fn.calls == 0


def test_changed_settings_are_refused(reference, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(reference["float16"][0], out)
  before = files_of(out)
  for change, pattern in (({"dtype": "float32"}, "dtype"), ({"manifest_extra": dict(EXTRA, step=8)}, "extra"),
                          ({"shard_rows": 10}, "shard_rows"), ({"fields": ["image"]}, "fields")):
    with pytest.raises(embeddings.SettingsMismatchError, match=f"{pattern}.*new output dir.*overwrite=True"):
      write(out, **change)
  with pytest.raises(ValueError, match="num_records: stored 53, now 40"):
    write(out, data.FirstRows(ArraySource(), 40))
  # A changed embed_fn output (a dim) under the same identity is caught at the first batch.
  (out / "image" / "00004.npy").unlink()
  with pytest.raises(ValueError, match="fields"):
    write(out, fn=lambda b: {"image": embed(b)["image"][:, :4], "loc": embed(b)["loc"]})
  assert files_of(out) == {k: v for k, v in before.items() if k != os.path.join("image", "00004.npy")}
  manifest = write(out, dtype="float32", overwrite=True)
  assert manifest["dtype"] == "float32" and embeddings.open_embeddings(out).field("image").dtype == np.float32


def test_open_embeddings_checks_the_files(reference, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(reference["float16"][0], out)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    embeddings.open_embeddings(tmp_path / "nowhere")
  path = out / "image" / "00002.npy"
  payload = bytearray(path.read_bytes())
  payload[-3] ^= 0x10  # one bit of one embedding
  path.write_bytes(bytes(payload))
  assert embeddings.open_embeddings(out).num_records == N  # without verify: only existence
  with pytest.raises(ValueError, match=r"sha256.*image/00002.npy"):
    embeddings.open_embeddings(out, verify=True)
  os.remove(out / "tokens" / "00001.npy")
  with pytest.raises(FileNotFoundError, match=r"missing.*tokens/00001.npy"):
    embeddings.open_embeddings(out)
  stored = embeddings.open_embeddings(reference["float16"][0])
  with pytest.raises(KeyError, match="no array 'text'"):
    stored.field("text")


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="no records"):
    write(tmp_path / "a", ArraySource(0))
  bad_fns = [(lambda b: {"image": embed(b)["image"][:-1]}, r"shape \(7, 16\).*global batch 8"),
             (lambda b: {"image": embed(b)["image"][:, 0]}, r"shape \(8,\).*\[global batch 8, dim\]"),
             (lambda b: {"image": embed(b)["image"].astype(jnp.int32)}, "floating point"),
             (lambda b: {"latlng": embed(b)["loc"]}, "reserved"),
             (lambda b: embed(b)["image"], "dict")]
  for fn, pattern in bad_fns:
    with pytest.raises(ValueError, match=pattern):
      write(tmp_path / "b", fn=fn, overwrite=True)
  with pytest.raises(ValueError, match="no field"):
    write(tmp_path / "c", fields=["image", "text"])
  with pytest.raises(ValueError, match="dtype"):
    write(tmp_path / "d", dtype="bfloat16")
  with pytest.raises(ValueError, match="multiple of the mesh's 8"):
    write(tmp_path / "e", batch=12)


def test_nonfinite_embeddings_are_counted_and_warned(tmp_path, caplog):
  def fn(batch):
    out = embed(batch)
    row = batch["index"][:, None]
    image = jnp.where(row % 5 == 0, jnp.nan, out["image"])
    return {"image": jnp.where(row % 7 == 3, 1e6, image), "loc": out["loc"]}  # 1e6: inf in float16

  big_rows = np.arange(N) % 7 == 3
  nan_rows = (np.arange(N) % 5 == 0) & ~big_rows
  with caplog.at_level(logging.WARNING):
    manifest = write(tmp_path / "f16", fn=fn)
  assert manifest["nonfinite"] == {"image": int((nan_rows | big_rows).sum()), "loc": 0}
  assert "hold NaN or inf in field 'image'" in caplog.text
  manifest = write(tmp_path / "f32", fn=fn, dtype="float32")
  assert manifest["nonfinite"] == {"image": int(nan_rows.sum()), "loc": 0}
  stored = embeddings.open_embeddings(tmp_path / "f16").field("image")
  assert np.isnan(stored[nan_rows]).all() and np.isinf(stored[big_rows]).all()
