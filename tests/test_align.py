"""Geo-alignment: InfoNCE against float64 NumPy, the GPS queue against a list, frozen
parameters, gallery:K and the similarity / fused rules against brute force, and the
alignment task through the trainer (resume, frozen encoder) and the evaluation job."""

import collections
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from geotoken_jax import inference, models, optim, s2, sharding
from geotoken_jax.decoding import strategies
from geotoken_jax.models import align

SPEC = s2.TokenSpec(20, 2)


def _normalize64(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _info_nce64(a, b, scale, extra, extra_valid, mask):
  a, b, extra = _normalize64(a), _normalize64(b), _normalize64(extra)
  rows = np.flatnonzero(mask)
  forward, backward = [], []
  for i in rows:
    candidates = [scale * a[i] @ b[j] for j in rows] + [scale * a[i] @ extra[q] for q in np.flatnonzero(extra_valid)]
    forward.append(np.log(np.sum(np.exp(candidates))) - scale * a[i] @ b[i])
    column = [scale * a[j] @ b[i] for j in rows]
    backward.append(np.log(np.sum(np.exp(column))) - scale * a[i] @ b[i])
  return 0.5 * (np.sum(forward) + np.sum(backward)) / len(rows)


def test_info_nce_matches_float64_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  extra = rng.normal(size=(4, 5))
  extra_valid = np.array([True, False, True, True])
  mask = np.array([True, True, False, True, True, True])
  for scale in (1.0, 14.3):
    loss, _ = align.info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.float32(scale),
                             extra_b=jnp.asarray(extra, jnp.float32), extra_valid=jnp.asarray(extra_valid),
                             mask=jnp.asarray(mask))
    expected = _info_nce64(a, b, scale, extra, extra_valid, mask)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # Without the queue and the mask: the plain symmetric CLIP loss.
  loss, aux = align.info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.float32(2.0))
  expected = _info_nce64(a, b, 2.0, extra, np.zeros(4, bool), np.ones(6, bool))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  hits = np.argmax(_normalize64(a) @ _normalize64(b).T, axis=1) == np.arange(6)
  assert float(aux["accuracy"]) == pytest.approx(hits.mean())


def test_queue_is_first_in_first_out():
  size = 7
  queue = align.init_queue(size, encoded_dim=3)
  oracle = collections.deque(maxlen=size)  # newest at the left
  rng = np.random.default_rng(1)
  push = jax.jit(align.push_queue)
  for batch, masked in ((3, ()), (4, (1,)), (2, ()), (5, (0, 4)), (9, (2,)), (1, ())):
    latlng = rng.uniform(-80, 80, size=(batch, 2)).astype(np.float32)
    mask = np.ones(batch, bool)
    mask[list(masked)] = False
    encoded = np.concatenate([latlng, latlng[:, :1] * 2], axis=1)  # stands in for encoder outputs
    queue = push(queue, jnp.asarray(latlng), jnp.asarray(mask), jnp.asarray(encoded))
    for row in latlng[mask][::-1]:  # the batch's first row ends up newest-but-(n-1): batch order kept
      oracle.appendleft(tuple(row))
    filled = np.asarray(queue["filled"])
    assert filled.sum() == len(oracle)
    assert filled[:len(oracle)].all()
    np.testing.assert_array_equal(np.asarray(queue["latlng"])[:len(oracle)], np.asarray(list(oracle), np.float32))
    stored = np.asarray(queue["encoded"])[:len(oracle)]
    np.testing.assert_array_equal(stored[:, :2], np.asarray(list(oracle), np.float32))
    np.testing.assert_array_equal(stored[:, 2], stored[:, 0] * 2)


def test_frozen_parameters_get_no_update():
  params = {"location": {"fourier_matrix": jnp.ones((4, 2)), "w": jnp.ones((3,))}, "head": {"w": jnp.ones((3,))}}
  config = ml_collections.ConfigDict(dict(schedule="constant", learning_rate=0.1, b1=0.9, b2=0.99, eps=1e-8,
                                          weight_decay=0.1, grad_clip_norm=1.0))
  frozen = lambda path: models.frozen(path, None, ("location/w",))  # noqa: E731
  optimizer, _ = optim.make_optimizer(config, 10, 10, is_frozen=frozen)
  state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["location"]["fourier_matrix"], params["location"]["fourier_matrix"])
  np.testing.assert_array_equal(new["location"]["w"], params["location"]["w"])
  assert np.all(np.asarray(new["head"]["w"]) < 1.0)


def _tiny_align_config():
  cfg = models.align_config("earth_align")
  cfg.vit.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  cfg.update(feature_dim=24, embed_dim=16, loc_head=(20,), location_head=(12,), queue_size=8)
  cfg.location.update(weights="", hidden=32, depth=1, out_dim=12, num_fourier=8)
  return cfg


def _restored(model_config, seed, mesh):
  config = ml_collections.ConfigDict(dict(model=model_config, seed=seed, sharding_rules=sharding.DEFAULT_RULES,
                                          tokens={"level": 20, "group_size": 2}))
  graphdef, abstract, shardings = inference.abstract_params(config, SPEC, mesh)
  params = jax.jit(lambda: nnx.state(models.build_model(model_config, SPEC, rngs=nnx.Rngs(seed)), nnx.Param),
                   out_shardings=shardings)()
  return inference.RestoredModel(config, SPEC, graphdef, params, shardings, mesh, 0)


def _jitted(model):
  """Jitted embed / locate of a model (eager NNX calls dispatch op by op: slow)."""
  graphdef, state = nnx.split(model)
  embed = jax.jit(lambda st, images: nnx.merge(graphdef, st).embed({"image": images}))
  locate = jax.jit(lambda st, points: nnx.merge(graphdef, st).locate(points))
  return (lambda images: embed(state, jnp.asarray(images))), (lambda points: locate(state, jnp.asarray(points)))


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_gallery_strategy_is_the_brute_force_top_k():
  mesh = sharding.create_mesh({"data": -1}, jax.devices()[:2])
  aligner = _restored(_tiny_align_config(), 3, mesh)
  rng = np.random.default_rng(2)
  latlng = np.stack([rng.uniform(-90, 90, 300), rng.uniform(-180, 180, 300)], -1).astype(np.float32)
  gallery = inference.LocationGallery("test", latlng,
                                      np.asarray(s2.latlng_to_tokens(latlng[:, 0], latlng[:, 1], SPEC), np.int32))
  gallery = inference.gallery_with_features(gallery, aligner)
  wanted = strategies.parse_strategies("gallery:4,gallery:6:medoid", SPEC)
  predictor = inference.Predictor(aligner.graphdef, aligner.params, aligner.param_shardings, mesh, SPEC, wanted,
                                  num_candidates=4, is_aligner=True, gallery=gallery)
  images = _images(8, 16)
  batch = sharding.make_global_batch({"image": images, "index": np.arange(8, dtype=np.int32)}, mesh)
  out = jax.tree.map(np.asarray, predictor(batch))

  model = nnx.merge(aligner.graphdef, aligner.params)
  embed, locate = _jitted(model)
  query = _normalize64(embed(images)["loc_head"])
  locations = _normalize64(locate(latlng))
  logits = float(model.logit_scale()) * query @ locations.T  # [8, 300] float64
  order = np.argsort(-logits, axis=1, kind="stable")
  np.testing.assert_allclose(out["gallery:4"]["predicted"], latlng[order[:, 0]], atol=0)
  np.testing.assert_array_equal(out["gallery:4"]["candidate_latlng"], latlng[order[:, :4]])
  probability = np.exp(logits - logits.max(1, keepdims=True))
  top = np.take_along_axis(probability, order[:, :4], 1)
  # float32 on device vs float64 here, with logits up to 14 (the initial logit scale): ~1e-4.
  np.testing.assert_allclose(out["gallery:4"]["candidate_prob"], top / top.sum(1, keepdims=True), atol=2e-4)
  # medoid of the 6 most similar locations
  for i in range(8):
    pool = latlng[order[i, :6]].astype(np.float64)
    lat, lon = np.radians(pool[:, 0]), np.radians(pool[:, 1])
    cos = (np.sin(lat)[:, None] * np.sin(lat)[None] + np.cos(lat)[:, None] * np.cos(lat)[None]
           * np.cos(lon[:, None] - lon[None]))
    medoid = np.argmin(np.arccos(np.clip(cos, -1, 1)).sum(1))
    np.testing.assert_array_equal(out["gallery:6:medoid"]["predicted"][i], pool[medoid].astype(np.float32))


def test_similarity_and_fused_rules_pick_the_brute_force_best():
  mesh = sharding.create_mesh({"data": -1}, jax.devices()[:1])
  aligner = _restored(_tiny_align_config(), 5, mesh)
  geotoken = models.model_config("earth_tiny")
  geotoken.vit.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  geotoken.update(d_model=32, num_heads=2, ff_dim=64, decoder_layers=1)
  decoder = _restored(geotoken, 7, mesh)
  weight = 0.5
  wanted = strategies.parse_strategies("sample:8:1.5:logprob,sample:8:1.5:similarity,sample:8:1.5:fused", SPEC)
  predictor = inference.Predictor(decoder.graphdef, decoder.params, decoder.param_shardings, mesh, SPEC, wanted,
                                  num_candidates=8, aligner=aligner, fused_weight=weight)
  images = _images(4, 16, seed=3)
  batch = sharding.make_global_batch({"image": images, "index": np.arange(4, dtype=np.int32)}, mesh)
  out = jax.tree.map(np.asarray, predictor(batch))

  # The pool, with its log-probabilities, from the candidates of the logprob rule (all
  # distinct samples ranked by log-probability).
  model = nnx.merge(aligner.graphdef, aligner.params)
  embed, locate = _jitted(model)
  query = _normalize64(embed(images)["loc_head"])
  scale = float(model.logit_scale())
  base = out["sample:8:1.5:logprob"]
  for i in range(4):
    keep = base["candidate_prob"][i] > 0
    points = base["candidate_latlng"][i][keep]
    cos = _normalize64(locate(points)) @ query[i]
    log_prob = np.log(base["candidate_prob"][i][keep])  # up to a per-image constant
    np.testing.assert_array_equal(out["sample:8:1.5:similarity"]["predicted"][i], points[np.argmax(cos)])
    np.testing.assert_array_equal(out["sample:8:1.5:fused"]["predicted"][i],
                                  points[np.argmax(log_prob + weight * scale * cos)])
  with pytest.raises(ValueError, match="need an alignment model"):
    inference.Predictor(decoder.graphdef, decoder.params, decoder.param_shardings, mesh, SPEC, wanted[1:])


def _align_train_args(workdir, *extra):
  return ["train", "--config=configs/earth.py:align_smoke", f"--workdir={workdir}", "--config.num_steps=4",
          "--config.checkpoint_every_steps=2", "--config.data.eval_limit=16", *extra]


@pytest.fixture(scope="module")
def align_runs(tmp_path_factory):
  from geotoken_jax import command_line, train  # pylint: disable=g-import-not-at-top

  straight = tmp_path_factory.mktemp("align_straight")
  assert command_line.call(train.main, _align_train_args(straight)) == 0
  resumed = tmp_path_factory.mktemp("align_resumed")
  assert command_line.call(train.main, _align_train_args(resumed, "--config.stop_after_steps=2")) == 143
  assert command_line.call(train.main, _align_train_args(resumed)) == 0
  return straight, resumed


def test_alignment_training_resumes_exactly_and_keeps_the_encoder_frozen(align_runs):
  straight, resumed = (inference.restore_model(w) for w in align_runs)
  assert straight.step == resumed.step == 4
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
  # The location encoder was frozen (optim.frozen): it still holds its initialization.
  fresh = nnx.state(models.build_model(straight.config.model, SPEC, rngs=nnx.Rngs(straight.config.seed)), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, fresh["location"], straight.params["location"])
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), fresh["loc_head"],
                       straight.params["loc_head"])
  assert all(jax.tree.leaves(moved))


def test_alignment_model_evaluates_with_gallery_strategies(align_runs, tmp_path):
  result = inference.run_evaluation(None, align_runs[0], output_dir=tmp_path / "eval", make_plots=False)
  assert set(result["results"]) == {"gallery:1", "gallery:5:medoid"}
  for row in result["results"].values():
    assert row["images"] == 16
  # The trainer's final test row (its own validation path) equals the evaluation job's.
  trained = json.loads((align_runs[0] / "results.json").read_text())["test"]
  for key in ("acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km"):
    assert trained[key] == pytest.approx(result["results"]["gallery:1"][key], abs=1e-3), key
  rows = inference.read_predictions(tmp_path / "eval" / "predictions" / "gallery-1.jsonl")
  gallery = inference.load_location_gallery(inference.load_run_config(align_runs[0]), SPEC)
  # Every prediction is a gallery location.
  points = {tuple(p) for p in gallery.latlng.tolist()}
  assert all((np.float32(r["pred_lat"]).item(), np.float32(r["pred_lon"]).item()) in points for r in rows)


def test_embed_command_stores_what_the_model_computes(align_runs, tmp_path):
  from geotoken_jax import command_line, data, embed, embeddings  # pylint: disable=g-import-not-at-top

  workdir = align_runs[0]
  output = tmp_path / "emb"
  argv = ["embed", f"--workdir={workdir}", "--split=test", f"--output={output}", "--dtype=float32", "--limit=14",
          "--shard_rows=5", "--batch_size=8"]
  assert command_line.call(embed.main, argv) == 0
  stored = embeddings.open_embeddings(output, verify=True)
  assert stored.num_records == 14 and set(stored.fields) == {"image", "loc_head"}
  restored = inference.restore_model(workdir)
  source = data.get_source(restored.config.data, "test", SPEC)
  rows = data.load_rows(source, np.arange(14))
  model = nnx.merge(restored.graphdef, restored.params)
  expected = _jitted(model)[0](rows["image"])
  for name in ("image", "loc_head"):
    np.testing.assert_allclose(stored.field(name), np.asarray(expected[name]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(stored.latlng, rows["latlng"])
  np.testing.assert_array_equal(stored.tokens, rows["tokens"])
  assert stored.manifest["extra"]["step"] == restored.step
  # A rerun finds everything done; other settings in the same output are refused.
  assert command_line.call(embed.main, argv) == 0
  assert command_line.call(embed.main, [a if a != "--dtype=float32" else "--dtype=float16" for a in argv]) == 2


def test_text_head_adds_its_own_symmetric_term():
  cfg = _tiny_align_config()
  cfg.update(text_dim=6, queue_size=0)
  model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(4)
  batch = {"image": jnp.asarray(_images(5, 16, seed=4)),
           "latlng": jnp.asarray(rng.uniform(-60, 60, (5, 2)), jnp.float32),
           "text_features": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)}
  graphdef, state = nnx.split(model)
  loss, aux = jax.jit(lambda st, b: align.contrastive_loss(nnx.merge(graphdef, st), b, None))(state, batch)
  embedded = jax.jit(lambda st, b: nnx.merge(graphdef, st).embed(b))(state, batch)
  gps = _info_nce64(embedded["loc_head"], _jitted(model)[1](batch["latlng"]), float(model.logit_scale()),
                    np.ones((1, cfg.embed_dim)), np.zeros(1, bool), np.ones(5, bool))
  text_scale = float(jnp.exp(model.text_logit_scale[...]))
  text = _info_nce64(embedded["text_head"], batch["text_features"], text_scale, np.ones((1, 6)), np.zeros(1, bool),
                     np.ones(5, bool))
  np.testing.assert_allclose(float(aux["gps_loss"]), gps, rtol=1e-5)
  np.testing.assert_allclose(float(aux["text_loss"]), text, rtol=1e-5)
  np.testing.assert_allclose(float(loss), gps + text, rtol=1e-5)
  with pytest.raises(ValueError, match="text_features"):
    align.contrastive_loss(model, {k: v for k, v in batch.items() if k != "text_features"}, None)


def test_info_nce_gradients_are_finite_with_masked_rows_and_an_empty_queue():
  rng = np.random.default_rng(5)
  a, b = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  queue = align.init_queue(3)  # nothing filled yet
  mask = jnp.asarray([True, False, True, True])
  grads = jax.grad(lambda a, b, s: align.info_nce(a, b, jnp.exp(s), extra_b=queue["latlng"] @ jnp.ones((2, 3)),
                                                  extra_valid=queue["filled"], mask=mask)[0],
                   argnums=(0, 1, 2))(a, b, jnp.float32(2.0))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_array_equal(np.asarray(grads[0])[1], 0.0)  # a masked row takes no part
  # Past the clamp (log 100) the scale still gets a gradient (straight-through), so it can come back.
  grad = jax.grad(lambda s: align.info_nce(a, b, jnp.exp(align.clamp_log_scale(s)))[0])(jnp.float32(6.0))
  assert float(grad) != 0.0


def test_load_pretrained_places_weights_and_names_bad_ones(monkeypatch):
  from geotoken_jax import trainer  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh({"data": -1}, jax.devices()[:2])
  restored = _restored(_tiny_align_config(), 0, mesh)
  kernel = np.arange(24 * 20, dtype=np.float32).reshape(24, 20)
  config = restored.config
  monkeypatch.setattr(models, "pretrained_leaves", lambda _: {("loc_head", "layers", 0, "kernel"): kernel})
  state = trainer.load_pretrained({"params": restored.params}, config)
  placed = state["params"]["loc_head"]["layers"][0]["kernel"][...]
  np.testing.assert_array_equal(np.asarray(placed), kernel)
  assert placed.sharding == restored.params["loc_head"]["layers"][0]["kernel"][...].sharding
  monkeypatch.setattr(models, "pretrained_leaves", lambda _: {("loc_head", "layers", 0, "kernel"): kernel[:3]})
  with pytest.raises(ValueError, match="loc_head/layers/0/kernel has shape"):
    trainer.load_pretrained({"params": restored.params}, config)
  monkeypatch.setattr(models, "pretrained_leaves", lambda _: {("no_such", "kernel"): kernel})
  with pytest.raises(ValueError, match="no_such/kernel"):
    trainer.load_pretrained({"params": restored.params}, config)


def test_a_queue_of_encoder_outputs_gives_the_same_loss_as_re_encoding():
  model = models.build_model(_tiny_align_config(), SPEC, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(6)
  batch = {"image": jnp.asarray(_images(4, 16, seed=6)),
           "latlng": jnp.asarray(rng.uniform(-60, 60, (4, 2)), jnp.float32)}
  past = jnp.asarray(rng.uniform(-60, 60, (5, 2)), jnp.float32)
  raw = align.push_queue(align.init_queue(8), past)
  stored = align.push_queue(align.init_queue(8, encoded_dim=12), past, encoded=model.location(past))
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda st, b, q: align.contrastive_loss(nnx.merge(graphdef, st), b, q)[0])
  loss_raw, loss_stored = loss(state, batch, raw), loss(state, batch, stored)
  # The stored outputs come from an eager call, the re-encoded ones from inside the jitted loss:
  # float32 rounding of the σ = 256 capsule's large phases differs between the two programs
  # (measured up to 2e-6 relative); a wrong queue entry would move the loss by far more.
  np.testing.assert_allclose(float(loss_stored), float(loss_raw), rtol=2e-5)


def test_multi_positive_info_nce_matches_float64_numpy():
  rng = np.random.default_rng(11)
  a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  positive = np.eye(6, dtype=bool) | (rng.random((6, 6)) < 0.3)
  mask = np.asarray([True, True, False, True, True, True])
  got = float(align.multi_positive_info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                            jnp.asarray(positive), 0.1, jnp.asarray(mask)))
  an, bn, rows = _normalize64(a), _normalize64(b), np.flatnonzero(mask)
  terms = []
  for i in rows:  # a -> b, then b -> a, each over the unmasked rows only
    f = np.asarray([an[i] @ bn[j] / 0.1 for j in rows])
    terms.append(np.log(np.exp(f).sum()) - np.log(np.exp(f[positive[i, rows]]).sum()))
    g = np.asarray([an[j] @ bn[i] / 0.1 for j in rows])
    terms.append(np.log(np.exp(g).sum()) - np.log(np.exp(g[positive[rows, i]]).sum()))
  np.testing.assert_allclose(got, np.sum(terms) / (2 * len(rows)), rtol=1e-5)


def test_the_place_term_uses_shifted_views_and_nearby_images_as_positives():
  images = jnp.asarray(_images(3, 16, seed=9))
  shifted = np.asarray(align.shifted_views(images, jax.random.key(0), 3))
  for i in range(3):  # each view is its image rolled by one (dy, dx) within the bound
    found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
             if np.array_equal(np.roll(np.asarray(images[i]), (dy, dx), axis=(0, 1)), shifted[i])]
    assert found, i
  cfg = _tiny_align_config()
  cfg.update(queue_size=0)
  model = models.build_model(cfg, SPEC, rngs=nnx.Rngs(0))
  # Two photos 10 km apart and one far away: with a 25 km radius the first two are positives.
  batch = {"image": images, "latlng": jnp.asarray([[10.0, 20.0], [10.09, 20.0], [-40.0, 100.0]], jnp.float32)}
  place = {"weight": 0.5, "max_shift": 3, "radius_km": 25.0, "temperature": 0.1}
  key = jax.random.key(1)
  positive = jnp.asarray([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  graphdef, state = nnx.split(model)

  @jax.jit  # one program: eager module calls would dominate the test's time
  def losses(state, batch, key):
    model = nnx.merge(graphdef, state)
    loss, aux = align.contrastive_loss(model, batch, None, key, place)
    plain, _ = align.contrastive_loss(model, batch, None)
    features = model.image_features(batch["image"])
    views = model.image_features(align.shifted_views(batch["image"], key, 3))
    return loss, aux["place_loss"], plain, align.multi_positive_info_nce(features, views, positive, 0.1)

  loss, term, plain, want = (float(x) for x in losses(state, batch, key))
  np.testing.assert_allclose(term, want, rtol=1e-5)
  np.testing.assert_allclose(loss, plain + 0.5 * want, rtol=1e-5)
  with pytest.raises(ValueError, match="key"):
    align.contrastive_loss(model, batch, None, None, place)
