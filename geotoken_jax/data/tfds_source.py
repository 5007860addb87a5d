"""A prepared TFDS data set (ArrayRecord) as a random-access source for grain.

Reads with tfds's data source API and no TensorFlow: records come back with
the image still encoded (SkipDecoding), and the image is decoded here with
PIL: a deterministic centre crop for evaluation, or a random resized crop
and flip for training, drawn from (seed, stream position) so a resumed run
sees the same augmentation; `resize` picks how (images.RESIZE_MODES: "clip"
is exactly CLIP's preprocessing, see data.image_resize_mode).  Tokens are read from the record when the
record's S2 level / group size match the run's TokenSpec, else computed from
latitude and longitude on the fly.

Whole-split arrays (every record's tokens, coordinates, id hash and Flickr
photo id) come from the sidecar index written at preparation
(tfds_builders.INDEX_FILE) without reading a record; data prepared before
sidecars existed falls back to reading the records.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from geotoken_jax import s2
from geotoken_jax.data import images as images_lib
from geotoken_jax.data import tfds_builders


def dataset_dir(data_dir: str, name: str) -> str:
  """DATA_DIR/NAME/VERSION of the newest prepared version (DATA_DIR may be a URL)."""
  data_dir = os.fspath(data_dir)
  root = epath.Path(os.path.expanduser(data_dir) if "://" not in data_dir else data_dir) / name
  versions = sorted((v.name for v in (root.iterdir() if root.is_dir() else [])
                     if (v / "dataset_info.json").exists()),
                    key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
  if not versions:
    raise FileNotFoundError(f"no prepared data set {name!r} in {data_dir}; run "
                            f"python -m geotoken_jax.data.prepare --dataset {name} --manual_dir ... "
                            f"--data_dir {data_dir}")
  return os.fspath(root / versions[-1])


class TfdsSource:
  """Records of one split: {"image" uint8 [S, S, 3], "tokens" int32 [P], "latlng" float32 [2],
  "id" str, "country" str}."""

  def __init__(self, path: str, split: str, spec: s2.TokenSpec, *, image_size: int = 224,
               augment: bool = False, flip: bool = True, seed: int = 0, resize: str = "default"):
    self.path, self.split, self.spec = path, split, spec
    self.image_size = int(image_size)
    if resize not in images_lib.RESIZE_MODES:
      raise ValueError(f"resize must be one of {images_lib.RESIZE_MODES}, got {resize!r}")
    self.resize = resize
    self.augment, self.flip, self.seed = bool(augment), bool(flip), int(seed)
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
      raise ValueError(f"{path} has no split {split!r}; splits: {sorted(builder.info.splits)}")
    self._source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    meta = builder.info.metadata or {}
    self._tokens_match = (meta.get("token_level") == spec.level and meta.get("token_group_size") == spec.group_size)
    # The TokenSpec of the tokens stored in the records (and in the sidecar).
    self.stored_spec = s2.TokenSpec(int(meta.get("token_level", 20)), int(meta.get("token_group_size", 2)))
    builder_class = tfds_builders.BUILDERS.get(builder.info.name)
    self._flickr_ids = builder_class.FLICKR_IDS if builder_class else True
    self.summary = tfds_builders.load_summaries(path).get(split)
    self._index: dict[str, np.ndarray] | None = None  # the sidecar, loaded on first use
    self._index_spec: s2.TokenSpec | None = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_index"] = state["_index_spec"] = None  # large; a worker loads it again if it needs it
    return state

  @property
  def rejected(self) -> int:
    """Rows of the original metadata rejected at preparation (0 if no summary)."""
    return int(self.summary["rejected_total"]) if self.summary else 0

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    resize = "" if self.resize == "default" else f", resize={self.resize!r}"
    return f"TfdsSource({self.path!r}, split={self.split!r}, records={len(self)}{resize})"

  @property
  def has_index(self) -> bool:
    """Whether the split has its sidecar index (prepared by this version or later)."""
    return self._index is not None or tfds_builders.index_path(self.path, self.split).exists()

  def _load_index(self, *, compute: bool) -> bool:
    if self._index is not None:
      return True
    loaded = tfds_builders.load_index(self.path, self.split)
    if loaded is None:
      if not compute:
        return False
      loaded = tfds_builders.index_from_records(self._source, flickr_ids=self._flickr_ids), self.stored_spec
    index, spec = loaded
    if len(index["id_hash"]) != len(self):
      raise ValueError(f"{tfds_builders.index_path(self.path, self.split)} has {len(index['id_hash'])} rows but "
                       f"the split has {len(self)} records: a stale sidecar; delete it and run prepare again "
                       "(it rebuilds a missing sidecar from the records)")
    self._index, self._index_spec = index, spec
    return True

  def index_arrays(self) -> dict[str, np.ndarray]:
    """The split's sidecar: {"tokens" int32 [N, P] (at the STORED TokenSpec, see
    stored_spec), "latlng" float64 [N, 2], "id_hash" uint64 [N], "photo_id"
    int64 [N]} in record order (read-only arrays).  Without a sidecar file
    (data prepared before sidecars) it is computed from the records once and
    kept in memory."""
    self._load_index(compute=True)
    return dict(self._index)

  def all_tokens(self, chunk: int = 8192) -> np.ndarray:
    """Tokens of every record [N, P] at the run's TokenSpec without decoding any image
    (for the cell trie): from the sidecar when there is one (no record is read),
    else from the records."""
    if self._load_index(compute=False):
      if self._index_spec == self.spec:
        return self._index["tokens"]
      latlng = self._index["latlng"]
      return s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], self.spec).astype(np.int32)
    out = []
    for start in range(0, len(self), chunk):
      records = self._source.__getitems__(list(range(start, min(start + chunk, len(self)))))
      if self._tokens_match:
        out.append(np.stack([np.asarray(r["tokens"], np.int32) for r in records]))
      else:
        lat = np.asarray([r["latitude"] for r in records])
        lon = np.asarray([r["longitude"] for r in records])
        out.append(s2.latlng_to_tokens(lat, lon, self.spec).astype(np.int32))
    return np.concatenate(out) if out else np.zeros((0, self.spec.num_positions), np.int32)

  def get_batch(self, indices, positions=None) -> dict[str, np.ndarray]:
    """Records at `indices`; `positions` (stream positions) seed the training augmentation."""
    indices = np.asarray(indices, np.int64)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"indices out of range for {n} records of {self!r}")
    records = self._source.__getitems__([int(i) for i in indices])
    image = np.empty((len(records), self.image_size, self.image_size, 3), np.uint8)
    for j, record in enumerate(records):
      rng = None
      if self.augment:
        key = int(positions[j]) if positions is not None else int(indices[j])
        rng = np.random.default_rng([self.seed, key])
      image[j] = images_lib.decode_resized(record["image"], self.image_size, rng=rng, flip=self.flip,
                                           mode=self.resize)
    latlng = np.asarray([[r["latitude"], r["longitude"]] for r in records], np.float64).reshape(-1, 2)
    if self._tokens_match:
      tokens = np.stack([np.asarray(r["tokens"], np.int32) for r in records]) if records else \
          np.zeros((0, self.spec.num_positions), np.int32)
    else:
      tokens = s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], self.spec).astype(np.int32)
    return {
        "image": image,
        "tokens": tokens,
        "latlng": latlng.astype(np.float32),
        "id": np.asarray([r["id"].decode() for r in records], dtype=object),
        "country": np.asarray([r["country"].decode() for r in records], dtype=object),
    }

  def __getitem__(self, index) -> dict:
    index = int(index)
    if index < 0:
      index += len(self)
    return {k: v[0] for k, v in self.get_batch(np.array([index])).items()}
