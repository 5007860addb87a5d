"""The learned reranker: its Plackett-Luce loss against the permutation likelihood computed by
brute force, its candidate features against a loop over candidates in float64, a planted ranking
rule it must learn, and the rule / strategy errors."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from geotoken_jax import reranking, s2
from geotoken_jax.decoding import rerank_features, selection, strategies
from geotoken_jax.inference.reranker import build_reranker, restore_reranker, save_reranker
from geotoken_jax.models.reranker import plackett_luce_loss


def pl_oracle(scores, distance, valid, top):
  """-log P(order by distance) under Plackett-Luce, row by row in float64 (mean over rows)."""
  total = 0.0
  for s, d, v in zip(scores, distance, valid):
    items = sorted([i for i in range(len(s)) if v[i]], key=lambda i: (d[i], i))
    nll = 0.0
    for place, i in enumerate(items):
      if top and place >= top:
        break
      rest = items[place:]
      nll += math.log(sum(math.exp(float(s[j])) for j in rest)) - float(s[i])
    total += nll
  return total / len(scores)


@pytest.mark.parametrize("top", [0, 1, 3])
def test_plackett_luce_is_the_permutation_likelihood(top):
  rng = np.random.default_rng(top)
  scores = rng.normal(size=(6, 7)).astype(np.float32) * 2
  distance = rng.choice([1.0, 5.0, 20.0, 300.0, 4000.0], size=(6, 7))  # ties: pool order breaks them
  valid = rng.random((6, 7)) < 0.7
  valid[:, 0] = True
  valid[5] = False  # a row without candidates contributes 0
  got = float(plackett_luce_loss(jnp.asarray(scores), jnp.asarray(distance), jnp.asarray(valid), top))
  assert got == pytest.approx(pl_oracle(scores, distance, valid, top), rel=1e-5, abs=1e-5)


def _haversine(a, b):
  lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
  h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
  return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def features_oracle(pool, nb, num_decoded, tau, support):
  """decoding.rerank_features' documented features, one candidate at a time."""
  out = []
  for b in range(pool["log_prob"].shape[0]):
    valid, lp, ll = pool["valid"][b], pool["log_prob"][b], pool["latlng"][b]
    m = len(lp)
    k = m - num_decoded
    s, nv, nl = nb["neighbor_scores"][b, :k], nb["neighbor_valid"][b, :k], nb["neighbor_latlng"][b, :k]
    good = sorted([float(s[j]) for j in range(k) if nv[j]], reverse=True)
    s1 = good[0] if good else 0.0
    s2 = good[1] if len(good) > 1 else s1
    mean = sum(good) / max(len(good), 1)
    z = sum(math.exp(float(s[j]) / tau) for j in range(k) if nv[j])
    w = [math.exp(float(s[j]) / tau) / z if nv[j] else 0.0 for j in range(k)]
    best = max(float(lp[i]) for i in range(m) if valid[i])
    dec = [i for i in range(num_decoded) if valid[i]]
    rows = []
    for i in range(m):
      row = [min(max(float(lp[i]) - best if valid[i] else -30.0, -30.0), 0.0) / 10, float(i >= num_decoded),
             (float(s[i - num_decoded]) - s1 if nv[i - num_decoded] else -1.0) if i >= num_decoded else 0.0,
             (i - num_decoded) / k if i >= num_decoded else 0.0, s1, s1 - s2, mean]
      for d in support:
        near = [j for j in range(k) if nv[j] and _haversine(ll[i], nl[j]) <= d]
        row += [sum(w[j] for j in near), max([float(s[j]) - s1 for j in near], default=-1.0),
                sum(_haversine(ll[i], ll[j]) <= d for j in dec) / max(len(dec), 1)]
      rows.append(row)
    out.append(rows)
  return np.asarray(out)


def test_candidate_features_match_a_loop_in_float64():
  rng = np.random.default_rng(0)
  batch, n, k = 3, 4, 3
  centre = rng.uniform(-40, 40, (batch, 1, 2))
  decoded = centre + rng.normal(0, 1.5, (batch, n, 2))  # a few hundred km apart: every radius matters
  retrieved = centre + rng.normal(0, 1.5, (batch, k, 2))
  pool = {"latlng": np.concatenate([decoded, retrieved + 1e-3], axis=1).astype(np.float32),
          "log_prob": rng.normal(-5, 3, (batch, n + k)).astype(np.float32),
          "valid": rng.random((batch, n + k)) < 0.8}
  pool["valid"][:, 0] = True
  nb = {"neighbor_latlng": np.concatenate([retrieved, rng.normal(0, 1, (batch, 2, 2))], axis=1).astype(np.float32),
        "neighbor_scores": rng.uniform(0.5, 1.0, (batch, k + 2)).astype(np.float32),
        "neighbor_valid": rng.random((batch, k + 2)) < 0.8,
        "neighbor_tokens": np.zeros((batch, k + 2, 11), np.int32)}
  nb["neighbor_valid"][0] = False  # an image without a valid neighbour
  support = (25.0, 200.0, 750.0)
  got = rerank_features.candidate_features({k_: jnp.asarray(v) for k_, v in pool.items()},
                                           {k_: jnp.asarray(v) for k_, v in nb.items()},
                                           num_decoded=n, tau=0.05, support_km=support)
  want = features_oracle(pool, nb, n, 0.05, support)
  assert got.shape == (batch, n + k, len(rerank_features.feature_names(support)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)


def test_a_planted_rule_is_learned_and_ranks_the_nearest_candidate_first():
  # Distance falls with feature 0 and rises with feature 1; the others are noise.
  rng = np.random.default_rng(1)
  features = rng.normal(size=(600, 8, 5)).astype(np.float32)
  distance = np.exp(3 - 1.5 * features[..., 0] + features[..., 1] + 0.1 * rng.normal(size=(600, 8)))
  valid = rng.random((600, 8)) < 0.9
  valid[:, 0] = True
  settings = {"features": [f"f{i}" for i in range(5)], "hidden": [16], "tau": 0.02, "support_km": []}
  rc = reranking.reranker_config({}).copy_and_resolve_references()
  rc.update(steps=300, batch_size=128, hidden=(16,))
  model = reranking.fit(features[:400], distance[:400], valid[:400], settings, rc)
  held = slice(400, 600)
  picked = reranking.chosen_distance(reranking.scores_of(model, features[held]), distance[held], valid[held])
  nearest = np.min(np.where(valid[held], distance[held], np.inf), axis=1)
  random_pick = distance[held][:, 0]
  assert np.mean(picked == nearest) > 0.6  # of 8 candidates, chance is ~1/7
  assert np.median(picked) < 0.5 * np.median(random_pick)


def test_folds_keep_cells_whole():
  rng = np.random.default_rng(2)
  truth = np.concatenate([rng.uniform(-60, 60, (200, 1)), rng.uniform(-180, 180, (200, 1))], axis=1)
  truth = np.repeat(truth, 3, axis=0) + rng.normal(0, 1e-4, (600, 2))  # three photos per place
  folds = reranking.folds_of(truth, 6, 2)
  cells = s2.latlng_to_cell_ids(truth[:, 0], truth[:, 1], 6)
  for cell in np.unique(cells):
    assert len(set(folds[cells == cell])) == 1
  assert 0.3 < folds.mean() < 0.7


def test_rule_rerank_needs_a_union_pool_and_a_reranker():
  spec = strategies.parse_strategy("sample:4:0.7:rerank:add_neighbors=2")
  assert spec.name == "sample:4:0.7:rerank:add_neighbors=2" and strategies.needs_reranker(spec)
  with pytest.raises(ValueError, match="add_neighbors"):
    strategies.parse_strategy("beam:3:rerank").check(s2.TokenSpec(20, 2))
  with pytest.raises(ValueError, match="unknown key"):
    reranking.reranker_config({"reranker": {"poool": "x"}})
  with pytest.raises(ValueError, match="union pool"):
    reranking.reranker_config({"reranker": {"pool": "sample:4:0.7"}})


def test_a_saved_reranker_restores_from_a_relative_path_and_scores_the_same(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # orbax refuses relative paths: the reranker's folder is resolved first
  settings = {"features": ["a", "b", "c"], "hidden": [4], "tau": 0.02, "support_km": []}
  model = build_reranker(settings, seed=3)
  model.mean[...] = jnp.asarray([1.0, 2.0, 3.0])
  save_reranker("out/reranker", model, settings)
  restored = restore_reranker("out/reranker")
  x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(restored.model()(jnp.asarray(x))), np.asarray(model(jnp.asarray(x))))
  assert restored.settings["features"] == ["a", "b", "c"]
  with pytest.raises(FileNotFoundError, match="no fitted reranker"):
    restore_reranker("elsewhere")


def snap_oracle(scores, latlng, valid, neighbor_valid, snap_km):
  """selection.snap_to_retrieved as a loop in float64 over images and entries."""
  out = np.array(scores, np.float64)
  k = neighbor_valid.shape[1]
  n = scores.shape[1] - k
  for b in range(scores.shape[0]):
    entries = [m for m in range(scores.shape[1]) if valid[b, m]]
    chosen = max(entries, key=lambda m: (scores[b, m], -m))
    if snap_km <= 0:
      continue
    reach = [j for j in range(k) if neighbor_valid[b, j] and _haversine(latlng[b, chosen], latlng[b, n + j]) <= snap_km]
    if not reach:
      continue
    place = latlng[b, n + reach[0]]
    target = min(entries, key=lambda m: (_haversine(latlng[b, m], place), m))
    out[b, chosen], out[b, target] = scores[b, target], scores[b, chosen]
  return out


@pytest.mark.parametrize("snap_km", [0.0, 30.0, 400.0])
def test_snapping_moves_the_choice_onto_the_best_ranked_neighbour_in_reach(snap_km):
  rng = np.random.default_rng(3)
  batch, n, k = 64, 5, 4
  centre = rng.uniform([-60, -170], [60, 170], (batch, 1, 2))
  latlng = (centre + rng.normal(0, 1.5, (batch, n + k, 2))).astype(np.float32)  # within ~a few hundred km
  dup = rng.random(batch) < 0.3  # a retrieved path that was also decoded: its entry is invalid, the copy valid
  latlng[dup, n] = latlng[dup, 1]
  valid = rng.random((batch, n + k)) < 0.85
  valid[:, 0] = True
  valid[dup, n], valid[dup, 1] = False, True
  neighbor_valid = rng.random((batch, k)) < 0.8
  scores = rng.normal(size=(batch, n + k)).astype(np.float32)
  got = np.asarray(selection.snap_to_retrieved(jnp.asarray(scores), jnp.asarray(latlng), jnp.asarray(valid),
                                               jnp.asarray(neighbor_valid), snap_km))
  want = snap_oracle(scores, latlng.astype(np.float64), valid, neighbor_valid, snap_km)
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(scores, axis=1))  # scores swap, none invented
  if snap_km == 0:
    np.testing.assert_array_equal(got, scores)
  if snap_km == 30.0:  # the radius bites: some choices move and some stay
    moved = np.argmax(np.where(valid, got, -np.inf), 1) != np.argmax(np.where(valid, scores, -np.inf), 1)
    assert 0 < moved.sum() < batch


def test_an_evaluation_predicts_rerank_rows_again_after_a_refit(tmp_path):
  from geotoken_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  from geotoken_jax.inference.reranker import fingerprint  # pylint: disable=g-import-not-at-top
  fitted = tmp_path / "reranker"
  fitted.mkdir()
  (fitted / "reranker.json").write_text('{"snap_km": 0}')
  first = fingerprint(fitted)
  (fitted / "reranker.json").write_text('{"snap_km": 200}')
  second = fingerprint(fitted)
  assert first != second
  out = tmp_path / "eval"
  (out / "predictions").mkdir(parents=True)
  paths = {name: out / "predictions" / f"{name}.jsonl" for name in ("greedy", "rerank_pool")}
  for p in paths.values():
    p.write_text("{}\n")
  (out / "run.json").write_text(json.dumps({"reranker": first}))
  evaluation._drop_stale_reranked(out, ["rerank_pool"], first, paths)  # the same fit: kept
  assert all(p.exists() for p in paths.values())
  evaluation._drop_stale_reranked(out, ["rerank_pool"], second, paths)  # refitted: predicted again
  assert paths["greedy"].exists() and not paths["rerank_pool"].exists()
