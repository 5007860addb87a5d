"""The data pipeline's "clip" resize mode is CLIP's own preprocessing, and the mode reaches every
source a CLIP run reads.

Truth: transformers' CLIPImageProcessor (its PIL backend, CLIPImageProcessorPil, the one that
resizes with PIL as the original CLIP does) on the JPEG files themselves; EarthSource's crops
(NumPy gathers from Blue Marble) for the default mode; PIL called directly for the training crop.
The images are real JPEG files (quality 90) of several sizes and aspect ratios, large enough that
the default mode's draft decoding would change them, prepared into a data set with the geo_csv
builder and read back through data.get_source, as training, evaluation and embedding read them.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import pathlib
import types

import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from geotoken_jax import data, models, s2
from geotoken_jax.data import earth, images, tfds_builders
from geotoken_jax.encoders import clip

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = s2.TokenSpec(level=10, group_size=2)
# (width, height): landscape, portrait, square at 224, very wide, large (draft would decode it
# at 1/2 or 1/4), smaller than both sizes (upsampled).
SYNTHETIC = ((640, 480), (333, 500), (224, 224), (1000, 300), (1600, 1200), (150, 200))
EARTH_UPSCALED = ((800, 600), (480, 720))  # earth crops upscaled, as photos
EARTH_PNG = 6  # 64x64 earth crops stored losslessly, for the default mode
SIZES = (224, 336)


def _clip_image_processor(size: int, **kwargs):
  kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kwargs)
  try:  # transformers >= 5: CLIPImageProcessor is the torchvision backend when torchvision is there
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  except ImportError:  # transformers 4: CLIPImageProcessor resizes with PIL
    return transformers.CLIPImageProcessor(**kw)
  return CLIPImageProcessorPil(**kw)


def _synthetic(width: int, height: int, seed: int) -> np.ndarray:
  """Gradients and a few shapes (edges for bicubic to ring on) plus noise, uint8 [H, W, 3]."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  base = np.stack([255 * x / width, 255 * y / height, 127.5 + 127.5 * np.sin((x + 2 * y) / 17.0)], -1)
  base[(x // 40 + y // 40) % 2 == 0] *= 0.6
  return np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A prepared geo_csv data set: {"data_dir", "files": {id: path of the JPEG}, "earth": {id:
  64x64 crop}}."""
  root = tmp_path_factory.mktemp("clip_preprocessing")
  manual, image_dir = root / "manual", root / "manual" / "images"
  image_dir.mkdir(parents=True)
  lat, lon = earth.load_coordinates()
  rows = earth.split_indices("test")[:len(SYNTHETIC) + len(EARTH_UPSCALED) + EARTH_PNG]
  crops = earth.crop_images(lat[rows], lon[rows], 64)
  files, earth_png, table = {}, {}, []
  for i, row in enumerate(rows.tolist()):
    if i < len(SYNTHETIC):
      name = f"synthetic_{SYNTHETIC[i][0]}x{SYNTHETIC[i][1]}.jpg"
      Image.fromarray(_synthetic(*SYNTHETIC[i], seed=i)).save(image_dir / name, format="JPEG", quality=90)
      files[name] = str(image_dir / name)
    elif i < len(SYNTHETIC) + len(EARTH_UPSCALED):
      size = EARTH_UPSCALED[i - len(SYNTHETIC)]
      name = f"earth_{row}_{size[0]}x{size[1]}.jpg"
      Image.fromarray(crops[i]).resize(size, Image.BICUBIC).save(image_dir / name, format="JPEG", quality=90)
      files[name] = str(image_dir / name)
    else:
      name = f"earth_{row}.png"
      Image.fromarray(crops[i]).save(image_dir / name, format="PNG")
      earth_png[name] = crops[i]
    table.append((name, float(lat[row]), float(lon[row])))
  with open(manual / "test.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["IMG_ID", "LAT", "LON"])
    writer.writerows(table)
  summaries = tfds_builders.prepare("geo_csv", str(manual), str(root / "data"), workers=1,
                                    csv_files={"test": "test.csv"}, image_dir="images")
  assert summaries["test"]["written"] == len(table) and summaries["test"]["rejected_total"] == 0
  return {"data_dir": str(root / "data"), "files": files, "earth": earth_png}


def _run_config(model_config, data_dir: str, image_size: int, **data_options) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"name": "geo_csv", "data_dir": data_dir, "image_size": image_size, **data_options},
      "model": model_config})


def _clip_model(image_size: int) -> ml_collections.ConfigDict:
  cfg = models.model_config("earth_tiny")
  cfg.encoder = "clip"
  cfg.clip = clip.clip_vision_config("vit_l14_336" if image_size == 336 else "vit_l14")
  return cfg


def _open(path: str) -> Image.Image:
  """A JPEG file decoded by PIL as it is (no draft): what a user hands CLIPImageProcessor."""
  with Image.open(path) as image:
    image.load()
    return image


def _read(config, split: str = "test") -> dict:
  """Every record of the split, through data.get_source in the run's resize mode."""
  source = data.get_source(config.data, split, SPEC, resize=data.image_resize_mode(config))
  batch = source.get_batch(np.arange(len(source)))
  return {str(name): image for name, image in zip(batch["id"], batch["image"])}


@pytest.mark.parametrize("size", SIZES)
def test_clip_mode_is_clip_image_processor(prepared, size):
  config = _run_config(_clip_model(size), prepared["data_dir"], size)
  assert data.image_resize_mode(config) == "clip"
  ours = _read(config)
  names = sorted(prepared["files"])
  pixels = np.stack([ours[name] for name in names])
  assert pixels.shape == (len(names), size, size, 3) and pixels.dtype == np.uint8
  files = [_open(prepared["files"][name]) for name in names]
  raw = _clip_image_processor(size, do_rescale=False, do_normalize=False)(
      files, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(pixels, raw)  # the same uint8 pixels: exact
  normalized = _clip_image_processor(size)(files, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  tower = nnx.eval_shape(lambda: clip.CLIPVisionTower(config.model.clip, rngs=nnx.Rngs(0)))
  fed = np.asarray(tower.pixels(pixels))  # what the tower computes on device: /255, mean / std
  one_step = 1.0 / (255.0 * max(clip.CLIP_STD))
  error = float(np.abs(fed - normalized).max())
  print(f"size {size}: max |tower.pixels(pipeline) - CLIPImageProcessor| = {error:.3g} "
        f"(one uint8 step is >= {one_step:.3g})")
  assert error <= 1e-5 < one_step  # float rounding only
  # clip.preprocess (images already decoded) is the same computation.
  for name, image in zip(names, files):
    np.testing.assert_array_equal(clip.preprocess(image, size), ours[name])


def test_default_mode_is_unchanged_for_other_models(prepared):
  """A ViT model's images: the earth crops come back pixel for pixel, and larger JPEGs are still
  decoded at a reduced scale (draft) and resampled bilinearly."""
  vit = models.model_config("earth_tiny")
  assert vit.encoder == "vit"
  config = _run_config(vit, prepared["data_dir"], 64)
  assert data.image_resize_mode(config) == "default"
  ours = _read(config)
  for name, crop in prepared["earth"].items():
    np.testing.assert_array_equal(ours[name], crop)
  for name, path in prepared["files"].items():
    with Image.open(path) as image:
      image.draft("RGB", (64, 64))
      image = image.convert("RGB")
      side = min(image.size)
      box = ((image.width - side) / 2, (image.height - side) / 2, (image.width + side) / 2,
             (image.height + side) / 2)
      expected = np.asarray(image.resize((64, 64), Image.BILINEAR, box=box))
    np.testing.assert_array_equal(ours[name], expected, err_msg=name)
  # Without a mode (no run config at hand) get_source decodes as before.
  source = data.get_source(config.data, "test", SPEC)
  assert source.resize == "default"


def test_default_and_clip_modes_differ(prepared):
  """The parity test above can fail: the default mode's pixels are not CLIP's."""
  path = prepared["files"]["synthetic_1600x1200.jpg"]
  raw = pathlib.Path(path).read_bytes()
  clip_pixels = images.decode_resized(raw, 224, mode="clip")
  assert np.abs(images.decode_resized(raw, 224).astype(int) - clip_pixels).max() > 8


def test_clip_training_crop_is_bicubic_at_full_resolution(prepared):
  raw = pathlib.Path(prepared["files"]["synthetic_640x480.jpg"]).read_bytes()
  scale, ratio = (0.35, 1.0), (3 / 4, 4 / 3)
  for seed in range(3):
    got = images.decode_resized(raw, 224, rng=np.random.default_rng(seed), mode="clip")
    with Image.open(io.BytesIO(raw)) as image:
      image = image.convert("RGB")
      box = images._random_box(image.width, image.height, np.random.default_rng(seed), scale, ratio)  # pylint: disable=protected-access
      expected = np.asarray(image.resize((224, 224), Image.BICUBIC, box=box))
    np.testing.assert_array_equal(got, expected)
    again = images.decode_resized(raw, 224, rng=np.random.default_rng(seed), mode="clip")
    np.testing.assert_array_equal(got, again)  # seeded: a resumed run sees the same pixels
  with pytest.raises(ValueError, match="resize mode"):
    images.decode_resized(raw, 224, mode="bicubic")


def _paper_config():
  spec = importlib.util.spec_from_file_location("paper_config", os.path.join(REPO, "configs", "paper.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("fixture")


def test_image_resize_mode_follows_the_image_tower():
  clip_model, vit = _clip_model(224), models.model_config("earth_tiny")
  assert data.image_resize_mode(_run_config(clip_model, "", 224)) == "clip"
  assert data.image_resize_mode(_run_config(vit, "", 224)) == "default"
  assert data.image_resize_mode(_run_config(models.model_config("paper"), "", 224)) == "default"  # features
  align_clip = models.align_config("geoclip")
  assert align_clip.image_tower == "clip"
  assert data.image_resize_mode(_run_config(align_clip, "", 224)) == "clip"
  assert data.image_resize_mode(_run_config(models.align_config("earth_align"), "", 224)) == "default"
  # The paper's recipe: a features model whose images only feed its CLIP aligner.
  paper = _paper_config()
  assert paper.model.encoder == "features" and paper.recipe.alignment.model.image_tower == "clip"
  assert data.image_resize_mode(paper) == "clip"
  assert data.image_resize_mode(paper.recipe.alignment) == "clip"
  # data.resize overrides; anything else is refused.
  assert data.image_resize_mode(_run_config(clip_model, "", 224, resize="default")) == "default"
  assert data.image_resize_mode(_run_config(vit, "", 224, resize="clip")) == "clip"
  assert data.image_resize_mode(_run_config(vit, "", 224, resize="auto")) == "default"
  with pytest.raises(ValueError, match="data.resize"):
    data.image_resize_mode(_run_config(vit, "", 224, resize="bicubic"))


def test_evaluation_and_embedding_read_in_the_runs_mode(prepared, monkeypatch):
  """The sources training / evaluation (retrieval.sources, inference.evaluation_source), the
  embed job and data.resize without a run config build are in the run's mode."""
  from geotoken_jax import inference
  from geotoken_jax.inference import embedding_job
  from geotoken_jax.retrieval import sources

  config = _run_config(_clip_model(224), prepared["data_dir"], 224)
  assert sources.get_source(config, "", "test", SPEC).resize == "clip"
  source, transform = inference.evaluation_source(config, "", "test", SPEC, mesh=None)
  assert source.resize == "clip" and transform is None
  assert data.get_source(_run_config(models.model_config("earth_tiny"), prepared["data_dir"], 224,
                                     resize="clip").data, "test", SPEC).resize == "clip"

  align = _run_config(models.align_config("geoclip"), prepared["data_dir"], 224)
  align.test_split = "test"

  class Built(Exception):
    pass

  def get_source(*args, **kwargs):
    raise Built(kwargs.get("resize"))

  monkeypatch.setattr(embedding_job, "restore_model",
                      lambda *a, **k: types.SimpleNamespace(config=align, spec=SPEC, step=0, mesh=None))
  monkeypatch.setattr(data, "get_source", get_source)
  with pytest.raises(Built, match="^clip$"):
    embedding_job.run_embedding("unused", "unused", split="test")
