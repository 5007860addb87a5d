"""CLIP vision tower: parity with transformers (torch CPU) in both key layouts, loader errors,
config inference, preprocessing against CLIPImageProcessor, the GeoToken "clip" encoder.

Parity is max absolute error <= 1e-5 in float32 on a small random CLIPVisionModelWithProjection
whose LayerNorm scales / offsets and biases are randomized too (ones / zeros would hide a mix-up).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

from geotoken_jax import models, s2
from geotoken_jax.encoders import clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

ATOL = 1e-5
BATCH = 2


def tiny_hf_model():
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
      image_size=28, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
      projection_dim=32)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # LayerNorm scales and offsets, every bias, the class embedding
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + 0.3 * torch.randn_like(p))
  return model


def openai_layout(hf: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """The same weights under OpenAI / open_clip names, with text-tower keys to ignore."""
  v = lambda k: hf["vision_model." + k]  # noqa: E731
  out = {"visual.conv1.weight": v("embeddings.patch_embedding.weight"),
         "visual.class_embedding": v("embeddings.class_embedding"),
         "visual.positional_embedding": v("embeddings.position_embedding.weight"),
         "visual.proj": np.ascontiguousarray(hf["visual_projection.weight"].T),
         "positional_embedding": np.zeros((7, 16), np.float32),  # text tower
         "transformer.resblocks.0.attn.in_proj_weight": np.zeros((48, 16), np.float32),
         "logit_scale": np.zeros((), np.float32)}
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for suffix in ("weight", "bias"):
      out[f"visual.{ours}.{suffix}"] = v(f"{theirs}.{suffix}")
  for i in range(depth):
    src, dst = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for suffix in ("weight", "bias"):
      out[dst + f"attn.in_proj_{suffix}"] = np.concatenate(
          [v(src + f"self_attn.{x}_proj.{suffix}") for x in "qkv"])
      for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                           ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                           ("mlp.c_proj", "mlp.fc2")):
        out[dst + f"{ours}.{suffix}"] = v(src + f"{theirs}.{suffix}")
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Reference outputs and one safetensors file per layout variant, all from one torch model."""
  root = tmp_path_factory.mktemp("clip")
  model = tiny_hf_model()
  model.save_pretrained(root / "hf")
  torch.manual_seed(1)
  pixels = torch.randn(BATCH, 3, 28, 28)  # already normalized, NCHW
  with torch.no_grad():
    out = model(pixel_values=pixels, output_hidden_states=True)
  ref = {"hidden_states": [h.numpy() for h in out.hidden_states],
         "last_hidden_state": out.last_hidden_state.numpy(),
         "pooled": model.vision_model(pixel_values=pixels).pooler_output.detach().numpy(),
         "embedding": out.image_embeds.numpy(),
         "pixels": pixels.numpy().transpose(0, 2, 3, 1)}  # NHWC, the same floats
  hf = load_file(str(root / "hf" / "model.safetensors"))
  paths = {"hf": str(root / "hf" / "model.safetensors")}

  def save(name, tensors):
    os.makedirs(root / name)
    paths[name] = str(root / name / "weights.safetensors")
    save_file({k: np.ascontiguousarray(a) for k, a in tensors.items()}, paths[name])

  save("clipmodel", {**hf, "text_model.embeddings.token_embedding.weight":
                     np.ones((10, 8), np.float32), "text_projection.weight":
                     np.ones((32, 8), np.float32), "logit_scale": np.ones((), np.float32)})
  save("noprefix", {k.removeprefix("vision_model."): a for k, a in hf.items()})
  save("openai", openai_layout(hf, depth=2))
  save("openai_module", {"module." + k: a for k, a in openai_layout(hf, depth=2).items()})
  save("no_projection", {k: a for k, a in hf.items() if not k.startswith("visual_projection")})
  bad = dict(hf)
  del bad["vision_model.encoder.layers.1.mlp.fc2.bias"]
  bad["vision_model.encoder.layers.0.extra.weight"] = np.ones((3,), np.float32)
  bad["vision_model.post_layernorm.weight"] = np.ones((32,), np.float32)
  save("bad", bad)
  return ref, paths


def tiny_config(weights: str = ""):
  c = clip.clip_vision_config("tiny")
  c.weights = weights
  return c


def abstract(build):
  """nnx.eval_shape: the constructor runs, but no random init (whose eager compiles take
  seconds per shape on a loaded CPU); the tests then set every parameter."""
  return nnx.eval_shape(build)


def loaded_tower(path, config=None):
  tower = abstract(lambda: clip.CLIPVisionTower(config or tiny_config(), rngs=nnx.Rngs(0)))
  clip.load_into(tower, path)
  return tower


def assert_parity(tower, ref):
  out = tower(ref["pixels"], output_hidden_states=True)
  assert len(out["hidden_states"]) == len(ref["hidden_states"]) == 3
  for ours, theirs in zip(out["hidden_states"], ref["hidden_states"]):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
  for key in ("last_hidden_state", "pooled", "embedding"):
    np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("variant", ["hf", "clipmodel", "noprefix", "openai", "openai_module"])
def test_parity_with_transformers(files, variant):
  ref, paths = files
  tower = loaded_tower(paths[variant])
  assert_parity(tower, ref)
  np.testing.assert_allclose(tower.features(ref["pixels"]), ref["embedding"], rtol=0, atol=ATOL)


def test_loader_keys_are_the_param_state(files):
  _, paths = files
  tower = abstract(lambda: clip.CLIPVisionTower(tiny_config(), rngs=nnx.Rngs(0)))
  params = dict(nnx.to_flat_state(nnx.state(tower, nnx.Param)))
  for variant in ("hf", "openai"):
    weights = clip.load_clip_vision_weights(paths[variant], tiny_config())
    assert set(weights) == set(params)
    for path, array in weights.items():
      assert array.dtype == np.float32 and array.shape == params[path].shape, path


def test_uint8_images_are_normalized_on_device(files):
  _, paths = files
  tower = loaded_tower(paths["hf"])
  images = np.random.default_rng(0).integers(0, 256, (BATCH, 28, 28, 3), dtype=np.uint8)
  normalized = (images / np.float32(255) - np.float32(clip.CLIP_MEAN)) / np.float32(clip.CLIP_STD)
  np.testing.assert_allclose(tower.pixels(images), normalized, rtol=0, atol=1e-5)
  np.testing.assert_allclose(tower.features(images), tower.features(normalized.astype(np.float32)),
                             rtol=0, atol=1e-5)


def test_no_projection(files):
  ref, paths = files
  with pytest.raises(ValueError, match="projection_dim = 0"):
    clip.load_clip_vision_weights(paths["no_projection"], tiny_config())
  config = tiny_config()
  config.projection_dim = 0
  out = loaded_tower(paths["no_projection"], config)(ref["pixels"])
  np.testing.assert_allclose(out["pooled"], ref["pooled"], rtol=0, atol=ATOL)
  np.testing.assert_array_equal(out["embedding"], out["pooled"])


def test_bad_file_lists_every_problem(files):
  _, paths = files
  with pytest.raises(ValueError) as error:
    clip.load_clip_vision_weights(paths["bad"], tiny_config())
  message = str(error.value)
  assert paths["bad"] in message
  assert "missing: vision_model.encoder.layers.1.mlp.fc2.bias (expected shape (64,))" in message
  assert "unexpected: vision_model.encoder.layers.0.extra.weight" in message
  assert ("wrong shape: vision_model.post_layernorm.weight: expected shape (64,), found (32,)"
          in message)
  config = tiny_config()
  config.depth, config.mlp_dim = 3, 128
  with pytest.raises(ValueError) as error:
    clip.load_clip_vision_weights(paths["openai"], config)
  message = str(error.value)
  assert "missing: visual.transformer.resblocks.2.attn.in_proj_weight" in message
  assert ("wrong shape: visual.transformer.resblocks.0.mlp.c_fc.weight: expected shape "
          "(128, 64), found (256, 64)") in message
  assert "positional_embedding" not in message  # text-tower keys are not the tower's


def test_config_from_weights(files):
  _, paths = files
  expected = clip.clip_vision_config("tiny")
  fields = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim",
            "projection_dim", "eps", "activation")
  from_hf = clip.clip_config_from_weights(paths["hf"])  # heads from the config.json beside it
  from_openai = clip.clip_config_from_weights(paths["openai"], num_heads=4)
  for c in (from_hf, from_openai):
    assert {f: c[f] for f in fields} == {f: expected[f] for f in fields}
  assert from_openai.weights == paths["openai"]
  assert clip.clip_config_from_weights(paths["openai"]).num_heads == 1  # width // 64
  assert clip.clip_config_from_weights(paths["no_projection"], num_heads=4).projection_dim == 0


@pytest.mark.parametrize("size", [(37, 23), (19, 50)])  # (width, height), both orientations
def test_preprocess_matches_clip_image_processor(size):
  from PIL import Image
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  image = np.random.default_rng(sum(size)).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
  ours = clip.preprocess(Image.fromarray(image), 28)
  assert ours.shape == (28, 28, 3) and ours.dtype == np.uint8
  np.testing.assert_array_equal(clip.preprocess(image, 28), ours)
  kw = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
  raw = CLIPImageProcessorPil(do_rescale=False, do_normalize=False, **kw)(
      image, return_tensors="np")["pixel_values"][0]
  np.testing.assert_array_equal(ours, raw.transpose(1, 2, 0))
  normalized = CLIPImageProcessorPil(**kw)(image, return_tensors="np")["pixel_values"]
  tower = abstract(lambda: clip.CLIPVisionTower(tiny_config(), rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(tower.pixels(ours[None]), normalized.transpose(0, 2, 3, 1),
                             rtol=0, atol=1e-5)


def test_geotoken_clip_encoder(files):
  ref, paths = files
  spec = s2.TokenSpec(level=8, group_size=2)
  cfg = models.model_config("earth_tiny")
  cfg.update(encoder="clip", d_model=16, num_heads=2, ff_dim=24, decoder_layers=1)
  cfg.clip = tiny_config(paths["hf"])
  model = abstract(lambda: models.build_model(cfg, spec, rngs=nnx.Rngs(0)))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  leaves = clip.pretrained_leaves(cfg)
  assert leaves and all(path[:2] == ("encoder", "tower") for path in leaves)
  rng = np.random.default_rng(0)
  for path, param in params.items():
    if path in leaves:
      assert param.shape == leaves[path].shape, path
      param.set_value(leaves[path])
    else:  # the decoder and the memory projection
      param.set_value(rng.normal(0.0, 0.2, param.shape).astype(np.float32))
  assert model.input_keys == ("image",) and model.memory_length() == 5
  images = rng.integers(0, 256, (BATCH, 28, 28, 3), dtype=np.uint8)
  tokens = (rng.random((BATCH, spec.num_positions)) * np.asarray(spec.vocab_sizes)).astype(np.int32)
  logits = model({"image": images}, tokens, deterministic=True)
  assert logits.shape == (BATCH, spec.num_positions, model.max_vocab_size)
  memory = model.encode({"image": images})
  assert memory.shape == (BATCH, 5, 16)
  cache = model.init_cache(memory)
  for t in range(2):
    step_logits, cache = model.decode_step(tokens[:, max(t - 1, 0)], t, cache)
    np.testing.assert_allclose(step_logits, logits[:, t], rtol=0, atol=1e-4)
  assert np.isfinite(np.asarray(logits)).all()
  out = model.encoder.tower(ref["pixels"])
  np.testing.assert_allclose(out["embedding"], ref["embedding"], rtol=0, atol=ATOL)
  cfg.clip.weights = ""
  assert clip.pretrained_leaves(cfg) == {}


def test_bfloat16_and_float16_files(files, tmp_path):
  """numpy has no bfloat16: those tensors are read by hand; the values are the rounded weights."""
  import ml_dtypes
  from safetensors.torch import save_file as save_torch

  _, paths = files
  hf = load_file(paths["hf"])
  reference = clip.load_clip_vision_weights(paths["hf"], tiny_config())
  for dtype, np_dtype in ((torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)):
    path = str(tmp_path / f"{dtype}.safetensors")
    save_torch({k: torch.from_numpy(a).to(dtype) for k, a in hf.items()}, path)
    loaded = clip.load_clip_vision_weights(path, tiny_config())
    for key, array in reference.items():
      np.testing.assert_array_equal(loaded[key], array.astype(np_dtype).astype(np.float32))
