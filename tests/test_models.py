"""GeoToken model: cached decoding vs teacher forcing, masking, parameter parity, loss, dropout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd

from geotoken_jax import s2
from geotoken_jax import models
from geotoken_jax.nn import layers

SPEC = s2.TokenSpec(level=8, group_size=2)  # 5 positions, vocab (6, 16, 16, 16, 16)
BATCH = 3
NEIGHBORS = 2
FEATURE_DIM = 12
IMAGE = 16


def tiny_config(encoder: str, norm: str, **overrides):
  cfg = models.model_config("paper")
  cfg.update(encoder=encoder, norm=norm, d_model=16, num_heads=2, ff_dim=24, encoder_layers=2,
             decoder_layers=2)
  cfg.features.update(num_neighbors=NEIGHBORS, feature_dim=FEATURE_DIM)
  cfg.vit.update(image_size=IMAGE, patch_size=8, width=12, depth=1, num_heads=2, mlp_dim=20)
  cfg.update(**overrides)
  return cfg


def random_tokens(rng, shape, spec=SPEC):
  return (rng.random(shape + (spec.num_positions,)) * np.asarray(spec.vocab_sizes)).astype(np.int32)


def random_inputs(encoder: str, seed: int = 0, batch: int = BATCH):
  rng = np.random.default_rng(seed)
  tokens = random_tokens(rng, (batch,))
  if encoder == "vit":
    inputs = {"image": rng.integers(0, 256, (batch, IMAGE, IMAGE, 3)).astype(np.uint8)}
  else:
    inputs = {
        "query_features": rng.normal(size=(batch, 3, FEATURE_DIM)).astype(np.float32),
        "neighbor_features": rng.normal(size=(batch, NEIGHBORS, 3, FEATURE_DIM)).astype(np.float32),
        "neighbor_tokens": random_tokens(rng, (batch, NEIGHBORS)),
    }
  return inputs, tokens


@functools.lru_cache(maxsize=None)
def tiny_model(encoder: str, norm: str, compute_dtype: str = "float32"):
  cfg = tiny_config(encoder, norm, compute_dtype=compute_dtype)
  return models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))


def decode_loop_eager(model, inputs, tokens):
  memory = model.encode(inputs)
  cache = model.init_cache(memory)
  out = []
  for t in range(SPEC.num_positions):
    prev = tokens[:, t - 1] if t else np.full((tokens.shape[0],), -7, np.int32)  # ignored at 0
    logits, cache = model.decode_step(jnp.asarray(prev), t, cache)
    out.append(logits)
  return jnp.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_scan"))
def decode_loop_jit(graphdef, state, inputs, tokens, use_scan):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(model.encode(inputs))
  num_positions = tokens.shape[1]

  def step(t, cache):
    prev = tokens[:, jnp.maximum(t - 1, 0)]
    return model.decode_step(prev, t, cache)

  if use_scan:
    def body(cache, t):
      logits, cache = step(t, cache)
      return cache, logits
    _, logits = jax.lax.scan(body, cache, jnp.arange(num_positions, dtype=jnp.int32))
    return jnp.swapaxes(logits, 0, 1)

  def body(t, carry):
    cache, out = carry
    logits, cache = step(t, cache)
    return cache, jax.lax.dynamic_update_index_in_dim(out, logits, t, axis=1)

  out = jnp.zeros((tokens.shape[0], num_positions, model.max_vocab_size), jnp.float32)
  return jax.lax.fori_loop(0, num_positions, body, (cache, out))[1]


@pytest.mark.parametrize("encoder", ["features", "vit"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_decoding_matches_teacher_forcing(encoder, norm):
  model = tiny_model(encoder, norm)
  inputs, tokens = random_inputs(encoder)
  forced = model(inputs, tokens, deterministic=True)
  assert forced.shape == (BATCH, SPEC.num_positions, SPEC.max_vocab_size)
  assert forced.dtype == jnp.float32
  np.testing.assert_allclose(decode_loop_eager(model, inputs, tokens), forced, atol=2e-5, rtol=1e-5)
  graphdef, state = nnx.split(model)
  for use_scan in (False, True):
    looped = decode_loop_jit(graphdef, state, inputs, tokens, use_scan)
    np.testing.assert_allclose(looped, forced, atol=2e-5, rtol=1e-5)


def test_cache_layout_and_reordering():
  model = tiny_model("features", "post")
  inputs, tokens = random_inputs("features", seed=1)
  memory = model.encode(inputs)
  cache = model.init_cache(memory)
  s = model.memory_length()
  heads, kv = 2, 8
  assert len(cache) == 2
  assert {k: v.shape for k, v in cache[0].items()} == {
      "cross_k": (BATCH, heads, kv, s), "cross_v": (BATCH, heads, s, kv),
      "self_k": (BATCH, heads, kv, SPEC.num_positions),
      "self_v": (BATCH, heads, SPEC.num_positions, kv)}
  # Decode 2 positions, reorder the rows (with repeats, as beam search does),
  # continue with the reordered tokens: must equal decoding the reordered inputs.
  idx = np.array([2, 0, 0])
  split = 2
  for t in range(split):
    prev = tokens[:, t - 1] if t else np.zeros(BATCH, np.int32)
    _, cache = model.decode_step(jnp.asarray(prev), t, cache)
  cache = jax.tree.map(lambda x: x[idx], cache)
  reordered_inputs = {k: v[idx] for k, v in inputs.items()}
  reference = model(reordered_inputs, tokens[idx], deterministic=True)
  for t in range(split, SPEC.num_positions):
    logits, cache = model.decode_step(jnp.asarray(tokens[idx, t - 1]), t, cache)
    np.testing.assert_allclose(logits, reference[:, t], atol=2e-5, rtol=1e-5)


def test_masked_vocab_never_wins():
  model = tiny_model("vit", "pre")
  inputs, tokens = random_inputs("vit", seed=2)
  valid = model.valid_vocab_mask()
  assert valid.shape == (SPEC.num_positions, SPEC.max_vocab_size)
  assert valid[0].sum() == 6 and valid[0, :6].all()
  assert valid[1:].all()
  # Push every real logit far down (the head bias): masked ids must still lose.
  shifted = nnx.clone(model)
  bias = shifted.decoder.head_bias
  bias.set_value(bias.get_value() - 1e6)
  assert float(model.decoder.head_bias[...].max()) > -1e3  # the original is untouched
  for m in (model, shifted):
    logits = np.asarray(m(inputs, tokens, deterministic=True))
    assert np.all(logits[:, ~valid] == models.MASKED_LOGIT)
    assert np.all(valid[np.arange(SPEC.num_positions)[None], logits.argmax(-1)])
    assert logits[:, 0].argmax(-1).max() < 6
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    assert probs[:, ~valid].max() < 1e-30
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    step_logits, _ = m.decode_step(jnp.zeros(BATCH, jnp.int32), 0, m.init_cache(m.encode(inputs)))
    assert np.all(np.asarray(step_logits)[:, 6:] == models.MASKED_LOGIT)
    assert np.asarray(step_logits).argmax(-1).max() < 6


def torch_ref_param_count(d, layers_, heads, ff, neighbors, seq_len, group_size, feat=768, n_feats=3):
  """torch_ref.GeoToken's parameter count, written from its module list."""
  del heads, neighbors  # neither changes the count
  vocab = [6] + [4**group_size] * (seq_len - 1)
  linear = lambda i, o: i * o + o  # noqa: E731
  mha = linear(d, 3 * d) + linear(d, d)  # in_proj (fused) + out_proj
  ln = 2 * d
  enc_layer = mha + linear(d, ff) + linear(ff, d) + 2 * ln
  dec_layer = 2 * mha + linear(d, ff) + linear(ff, d) + 3 * ln
  return (n_feats * (linear(feat, d) + linear(d, d))  # feat_proj
          + 2 * d                                     # cls, start
          + 2 * sum(vocab) * d                        # tok_emb, neighbor_emb
          + layers_ * (enc_layer + dec_layer)
          + sum(linear(d, v) for v in vocab))         # one head per position


def abstract_param_count(cfg, spec):
  model = nnx.eval_shape(lambda: models.build_model(cfg, spec, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_paper_param_count_matches_torch_ref():
  cfg = models.model_config("paper")
  assert (cfg.encoder, cfg.norm, cfg.activation, cfg.positions) == (
      "features", "post", "relu", "sinusoidal")
  assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_heads, cfg.ff_dim,
          cfg.dropout, cfg.features.num_neighbors) == (512, 10, 10, 8, 1024, 0.1, 15)
  expected = torch_ref_param_count(512, 10, 8, 1024, 15, 11, 2)
  assert expected == 54_797_478  # torch_ref.py --what train reports this "params"
  assert abstract_param_count(cfg, s2.TokenSpec(level=20, group_size=2)) == expected
  # The formula tracks other sizes too (a cheap second point).
  small = tiny_config("features", "post", d_model=32, num_heads=4, ff_dim=40, encoder_layers=3,
                      decoder_layers=3)
  small.features.feature_dim = 768
  assert abstract_param_count(small, SPEC) == torch_ref_param_count(32, 3, 4, 40, NEIGHBORS, 5, 2)


def test_memory_length_and_order():
  model = tiny_model("features", "post")
  inputs, _ = random_inputs("features", seed=3)
  assert model.memory_length() == 1 + 3 + NEIGHBORS * (3 + SPEC.num_positions)
  paper = nnx.eval_shape(lambda: models.build_model(models.model_config("paper"), s2.TokenSpec(),
                                                    rngs=nnx.Rngs(0)))
  assert paper.memory_length() == 214
  enc = model.encoder
  x = np.asarray(enc.embed(**inputs))
  assert x.shape == (BATCH, model.memory_length(), 16)
  np.testing.assert_allclose(x[:, 0], np.broadcast_to(enc.cls[...], (BATCH, 16)))
  np.testing.assert_allclose(x[:, 1:4], enc.project(inputs["query_features"]), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(x[:, 1:4], axis=-1), 1.0, rtol=1e-5)
  offsets = layers.token_offsets(SPEC.vocab_sizes)
  block = 3 + SPEC.num_positions
  for k in range(NEIGHBORS):
    start = 4 + k * block
    np.testing.assert_allclose(x[:, start:start + 3], enc.project(inputs["neighbor_features"][:, k]),
                               atol=1e-6)
    rows = inputs["neighbor_tokens"][:, k] + offsets
    np.testing.assert_allclose(x[:, start + 3:start + block], enc.neighbor_embedding[...][rows])


def numpy_weighted_ce(logits, targets, weights):
  logits = logits.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]  # [B, P]
  per_pos = nll.mean(0)  # torch: F.cross_entropy (batch mean) per position
  return (weights * per_pos).sum() / weights.sum(), nll


def test_loss_matches_numpy_and_masks_rows():
  rng = np.random.default_rng(4)
  b, p, v = 7, SPEC.num_positions, SPEC.max_vocab_size
  logits = rng.normal(size=(b, p, v)).astype(np.float32) * 3
  targets = random_tokens(rng, (b,))
  weights = np.linspace(2.0, 1.0, p)
  loss, metrics = models.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  expected, _ = numpy_weighted_ce(logits, targets, weights)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  correct = logits.argmax(-1) == targets
  np.testing.assert_allclose(metrics["token_accuracy"], correct.mean(0), rtol=1e-6)
  np.testing.assert_allclose(metrics["sequence_accuracy"], correct.all(-1).mean(), rtol=1e-6)
  # Masked rows drop out entirely.
  mask = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  loss_m, metrics_m = models.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                                    mask=jnp.asarray(mask))
  expected_m, _ = numpy_weighted_ce(logits[mask], targets[mask], weights)
  np.testing.assert_allclose(float(loss_m), expected_m, rtol=1e-5)
  np.testing.assert_allclose(metrics_m["token_accuracy"], correct[mask].mean(0), rtol=1e-6)
  assert float(metrics_m["count"]) == mask.sum()
  # Custom weights, and sums that aggregate exactly across two halves.
  w = rng.random(p) + 0.5
  halves = [models.weighted_cross_entropy_sums(jnp.asarray(logits[s]), jnp.asarray(targets[s]),
                                               jnp.asarray(w), jnp.asarray(mask[s]))
            for s in (slice(0, 3), slice(3, None))]
  total = models.metrics_from_sums(jax.tree.map(lambda a, c: a + c, *halves))
  np.testing.assert_allclose(float(total["loss"]),
                             numpy_weighted_ce(logits[mask], targets[mask], w)[0], rtol=1e-5)
  # All rows masked: zero, not NaN.
  loss0, _ = models.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                           mask=jnp.zeros(b, bool))
  assert float(loss0) == 0.0
  # Masked-vocab logits as the model emits them give the CE over the real vocab.
  padded = logits.copy()
  padded[:, 0, 6:] = models.MASKED_LOGIT
  loss_p, _ = models.weighted_cross_entropy(jnp.asarray(padded), jnp.asarray(targets))
  _, nll = numpy_weighted_ce(logits, targets, weights)
  _, nll_face = numpy_weighted_ce(logits[:, :1, :6], targets[:, :1], np.ones(1))
  nll[:, 0] = nll_face[:, 0]
  np.testing.assert_allclose(float(loss_p), (weights * nll.mean(0)).sum() / weights.sum(),
                             rtol=1e-5)


def test_dropout_determinism():
  model = tiny_model("features", "pre")
  inputs, tokens = random_inputs("features", seed=5)
  a = model(inputs, tokens, deterministic=True)
  b = model(inputs, tokens, deterministic=True)
  np.testing.assert_array_equal(a, b)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  d1 = model(inputs, tokens, deterministic=False, rngs=nnx.Rngs(dropout=k1))
  d1_again = model(inputs, tokens, deterministic=False, rngs=nnx.Rngs(dropout=k1))
  d1_key = model(inputs, tokens, deterministic=False, rngs=k1)  # a bare key works too
  d2 = model(inputs, tokens, deterministic=False, rngs=nnx.Rngs(dropout=k2))
  np.testing.assert_array_equal(d1, d1_again)
  np.testing.assert_array_equal(d1, d1_key)
  assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-3
  assert np.abs(np.asarray(d1) - np.asarray(a)).max() > 1e-3
  with pytest.raises(ValueError, match="rngs"):
    model(inputs, tokens, deterministic=False)


def test_dropout_mask_statistics():
  x = jnp.ones((64, 1000))
  rngs = nnx.Rngs(dropout=jax.random.key(0))
  y1 = np.asarray(layers.dropout(x, 0.1, deterministic=False, rngs=rngs))
  y2 = np.asarray(layers.dropout(x, 0.1, deterministic=False, rngs=rngs))
  kept1, kept2 = y1 != 0, y2 != 0
  assert abs(kept1.mean() - 0.9) < 0.005 and abs(kept2.mean() - 0.9) < 0.005
  np.testing.assert_allclose(y1.mean(), 1.0, atol=0.02)  # inverted dropout keeps the mean
  np.testing.assert_allclose(y1[kept1], 1 / 0.9, rtol=1e-6)
  # Successive masks are (close to) independent.
  both = (~kept1 & ~kept2).mean()
  assert abs(both - 0.01) < 0.003
  assert np.array_equal(np.asarray(layers.dropout(x, 0.1, deterministic=True, rngs=None)), x)


def test_every_param_has_logical_axes():
  allowed = set(models.LOGICAL_AXES) | {None}
  for encoder, norm in [("features", "post"), ("vit", "pre")]:
    cfg = tiny_config(encoder, norm, positions="learned")
    model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None, path
      assert len(axes) == var.get_value().ndim, (path, axes, var.get_value().shape)
      assert set(axes) <= allowed, (path, axes)
      named = [a for a in axes if a is not None]
      assert len(named) == len(set(named)), (path, axes)
    # The specs map through logical rules and shard the state on an 8-device mesh.
    rules = (("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None),
             ("vocab", None), ("feature", None), ("patch", None), ("position", None))
    with spmd.logical_axis_rules(rules):
      specs = nnx.get_partition_spec(state)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    placed = jax.device_put(state, shardings)
    wi = placed["decoder"]["blocks"][0]["mlp"]["wi"]
    assert wi.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "model")


@pytest.mark.parametrize("encoder", ["features", "vit"])
def test_bfloat16_compute_close_to_float32(encoder):
  f32 = tiny_model(encoder, "pre")
  bf16 = tiny_model(encoder, "pre", "bfloat16")
  for a, b in zip(jax.tree.leaves(nnx.state(f32, nnx.Param)), jax.tree.leaves(nnx.state(bf16, nnx.Param))):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)  # same rngs: same float32 parameters
  inputs, tokens = random_inputs(encoder, seed=6)
  ref = f32(inputs, tokens, deterministic=True)
  out = bf16(inputs, tokens, deterministic=True)
  assert out.dtype == jnp.float32
  valid = f32.valid_vocab_mask()
  np.testing.assert_allclose(np.asarray(out)[:, valid], np.asarray(ref)[:, valid], atol=0.1)
  p_ref, p_out = jax.nn.softmax(ref, -1), jax.nn.softmax(out, -1)
  assert float(jnp.abs(p_ref - p_out).max()) < 0.03
  cache = bf16.init_cache(bf16.encode(inputs))
  assert cache[0]["cross_k"].dtype == jnp.bfloat16
  stepped = decode_loop_eager(bf16, inputs, tokens)
  np.testing.assert_allclose(np.asarray(stepped)[:, valid], np.asarray(out)[:, valid], atol=0.05)
  loss, _ = models.weighted_cross_entropy(out, tokens)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_vit_normalizes_uint8_and_gradients_flow():
  cfg = tiny_config("vit", "pre", dropout=0.1)
  model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(3))
  inputs, tokens = random_inputs("vit", seed=7)
  patches = np.asarray(model.encoder.patchify(jnp.asarray(inputs["image"])))
  img = inputs["image"].astype(np.float64) / 255.0
  img = (img - np.asarray(cfg.vit.mean)) / np.asarray(cfg.vit.std)
  np.testing.assert_allclose(patches[:, 1, :3], img[:, 0, 8, :], rtol=1e-5, atol=1e-5)
  assert model.memory_length() == (IMAGE // 8)**2
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params, key):
    m = nnx.merge(graphdef, params, rest)
    logits = m(inputs, tokens, deterministic=False, rngs=nnx.Rngs(dropout=key))
    return models.weighted_cross_entropy(logits, tokens)[0]

  grads = jax.grad(loss_fn)(params, jax.random.key(0))
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) == len(norms)


def test_presets_build():
  for preset in models.PRESETS:
    cfg = models.model_config(preset)
    model = nnx.eval_shape(lambda cfg=cfg: models.build_model(cfg, s2.TokenSpec(), rngs=nnx.Rngs(0)))
    assert model.num_positions == 11 and model.max_vocab_size == 16
  assert models.model_config("earth_tiny").vit.image_size == 64
  for name in ("vit_tiny", "vit_small64", "vit_s16", "vit_b16", "vit_l14"):
    assert models.vit_config(name).name == name
  with pytest.raises(ValueError):
    models.model_config("nope")
  bad = models.model_config("paper")
  bad.norm = "sandwich"
  with pytest.raises(ValueError, match="norm"):
    models.build_model(bad, s2.TokenSpec(), rngs=nnx.Rngs(0))


def test_layer_norm_custom_gradient_matches_autodiff():
  rng = np.random.default_rng(8)
  x, w = (jnp.asarray(rng.normal(size=(3, 5, 16)) * 3 + 1, jnp.float32) for _ in range(2))
  scale, bias = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))

  def reference(x, scale, bias):
    centred = x - x.mean(-1, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + 1e-5) * scale + bias

  np.testing.assert_allclose(layers.layer_norm(x, scale, bias, 1e-5), reference(x, scale, bias),
                             atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(layers.layer_norm(*a, 1e-5) * w), argnums=(0, 1, 2))(
      x, scale, bias)
  want = jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


def test_absorbed_cross_attention_equals_projected_kv():
  model = tiny_model("features", "post")
  inputs, _ = random_inputs("features", seed=9)
  memory = model.encode(inputs)
  x = jnp.asarray(np.random.default_rng(9).normal(size=(BATCH, SPEC.num_positions, 16)),
                  jnp.float32)
  cross = model.decoder.blocks[0].cross_attention
  # The features model's teacher forcing uses the absorbed form, decode_step the K/V cache.
  assert cross.absorbed_is_cheaper(SPEC.num_positions, memory.shape[1], 16, 2)
  absorbed = cross.attend_memory(x, memory, deterministic=True, rngs=None)
  projected = cross(x, *cross.project_kv(memory), deterministic=True, rngs=None)
  np.testing.assert_allclose(absorbed, projected, atol=1e-5, rtol=1e-5)
  block = model.decoder.blocks[1]
  np.testing.assert_allclose(
      block(x, memory=memory, deterministic=True, rngs=None),
      block(x, memory_kv=block.cross_attention.project_kv(memory), deterministic=True, rngs=None),
      atol=1e-5, rtol=1e-5)
