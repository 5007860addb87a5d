"""The evaluation job, the predict command and the decode benchmark, end to end on the earth data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from geotoken_jax import checkpoint, command_line, data, evaluate, inference, metrics, predict, s2, sharding, trainer
from geotoken_jax.bench import __main__ as bench_main
from geotoken_jax import decoding
from geotoken_jax.decoding import build_cell_trie

from test_train import REPO, earth_config

STRATEGIES = "greedy,beam:1,beam:3,sample:4:0.7:medoid,sample:4:0.7:vote,sample:4:0.7:mean,greedy:trie=3:trie_level=6"
LIMIT = 40  # images: 2.5 global batches of 16, so the last batch is padded


def config():
  cfg = earth_config()
  cfg.evaluate.batch_size = 16
  cfg.evaluate.num_candidates = 3
  return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with config.json and a checkpoint (the smoke model's initial parameters)."""
  path = tmp_path_factory.mktemp("eval_workdir")
  cfg = config()
  spec = s2.TokenSpec(cfg.tokens.level, cfg.tokens.group_size)
  mesh = sharding.create_mesh(cfg.mesh)
  _, state = trainer.create_train_state(cfg, spec, mesh, total_steps=10, steps_per_epoch=10)
  ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
  ckpt.save(7, state, force=True)
  ckpt.close()
  (path / "config.json").write_text(cfg.to_json_best_effort())
  return path


@pytest.fixture(scope="module")
def evaluated(workdir):
  out = str(workdir / "eval_out")
  result = inference.run_evaluation(config(), str(workdir), strategy_text=STRATEGIES, limit=LIMIT,
                                   output_dir=out)
  return result


def _rows(result, name):
  return inference.read_predictions(os.path.join(result["output_dir"], "predictions",
                                                inference.file_name(name) + ".jsonl"))


def test_every_strategy_writes_all_images(evaluated):
  assert evaluated["step"] == 7
  names = [s.strip() for s in STRATEGIES.split(",")]
  assert list(evaluated["results"]) == names
  source = data.FirstRows(data.get_source(config().data, "test", s2.TokenSpec()), LIMIT)
  truth = data.load_rows(source, np.arange(len(source)))
  for name in names:
    rows = _rows(evaluated, name)
    assert [r["index"] for r in rows] == list(range(len(source)))
    assert [r["id"] for r in rows] == truth["id"].tolist()
    np.testing.assert_allclose([[r["true_lat"], r["true_lon"]] for r in rows], truth["latlng"], atol=1e-5)
    # Errors against an independent float64 great-circle formula (atan2 / Vincenty form).
    a = np.radians([[r["true_lat"], r["true_lon"]] for r in rows])
    b = np.radians([[r["pred_lat"], r["pred_lon"]] for r in rows])
    dlon = b[:, 1] - a[:, 1]
    num = np.hypot(np.cos(b[:, 0]) * np.sin(dlon),
                   np.cos(a[:, 0]) * np.sin(b[:, 0]) - np.sin(a[:, 0]) * np.cos(b[:, 0]) * np.cos(dlon))
    den = np.sin(a[:, 0]) * np.sin(b[:, 0]) + np.cos(a[:, 0]) * np.cos(b[:, 0]) * np.cos(dlon)
    np.testing.assert_allclose([r["error_km"] for r in rows], 6371.0 * np.arctan2(num, den), atol=1e-6)
    for r in rows:
      probs = [c["prob"] for c in r["candidates"]]
      assert 1 <= len(probs) <= 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    row = evaluated["results"][name]
    assert row["images"] == row["evaluated"] == LIMIT and row["skipped"] == 0
    expected = metrics.accuracy_table(np.asarray([r["error_km"] for r in rows]))
    for key in ("acc@25km", "acc@2500km", "median_km", "geoguessr"):
      assert row[key] == pytest.approx(expected[key])
    assert 0 <= row["country_acc"] <= 100


def test_strategies_agree_where_they_must(evaluated):
  greedy, beam1 = _rows(evaluated, "greedy"), _rows(evaluated, "beam:1")
  assert [r["candidates"][0]["tokens"] for r in greedy] == [r["candidates"][0]["tokens"] for r in beam1]
  beam3 = _rows(evaluated, "beam:3")
  # The best beam is the prediction (rule logprob) and the first candidate.
  for r in beam3:
    assert r["chosen"] == 0
    assert (r["pred_lat"], r["pred_lon"]) == (r["candidates"][0]["lat"], r["candidates"][0]["lon"])
  # The three rules share one pool: the same candidates, different choices allowed.
  pools = [_rows(evaluated, f"sample:4:0.7:{rule}") for rule in ("medoid", "vote", "mean")]
  assert pools[0][5]["candidates"] == pools[1][5]["candidates"] == pools[2][5]["candidates"]
  assert all(r["chosen"] == -1 for r in pools[2])  # the mean is not a candidate


def test_constrained_strategy_stays_in_the_trie(evaluated):
  spec = s2.TokenSpec()
  train_tokens = data.get_source(config().data, "train", spec).tokens
  trie = build_cell_trie(train_tokens, spec, min_count=3, num_constrained=4)  # level 6 = 4 positions
  allowed = {tuple(s) for s in trie.allowed_sequences()}
  for r in _rows(evaluated, "greedy:trie=3:trie_level=6"):
    tokens = tuple(int(t) for t in r["candidates"][0]["tokens"].split("-"))
    assert tokens[:4] in allowed


def test_outputs_tables_and_plots(evaluated):
  out = evaluated["output_dir"]
  md = open(os.path.join(out, "results.md")).read()
  for name in evaluated["results"]:
    assert f"| {name} |" in md
    assert os.path.getsize(os.path.join(out, "plots", f"cdf_{inference.file_name(name)}.png")) > 1000
    assert os.path.getsize(os.path.join(out, "plots", f"map_{inference.file_name(name)}.png")) > 1000
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["checkpoint_step"] == 7 and set(saved["results"]) == set(evaluated["results"])
  with Image.open(os.path.join(out, "plots", "cdf.png")) as image:
    assert image.size[0] > 100


def test_rerun_resumes_and_reproduces(evaluated, workdir):
  out = evaluated["output_dir"]
  path = os.path.join(out, "predictions", inference.file_name("sample:4:0.7:vote") + ".jsonl")
  original = open(path).read()
  lines = original.splitlines(keepends=True)
  # Interrupted mid-batch: 21 complete rows and half a line.
  with open(path, "w") as f:
    f.writelines(lines[:21])
    f.write(lines[21][:30])
  others = {name: open(os.path.join(out, "predictions", inference.file_name(name) + ".jsonl")).read()
            for name in STRATEGIES.split(",") if name != "sample:4:0.7:vote"}
  again = inference.run_evaluation(config(), str(workdir), strategy_text=STRATEGIES, limit=LIMIT, output_dir=out)
  # Every strategy restarts at batch 21 // 16 = 1 (one predictor decodes them together);
  # every file comes back identical.
  assert list(again["timings"]) == ["all_strategies"]
  assert again["timings"]["all_strategies"]["images"] == LIMIT - 16
  assert open(path).read() == original
  for name, text in others.items():
    assert open(os.path.join(out, "predictions", inference.file_name(name) + ".jsonl")).read() == text, name
  assert again["results"] == evaluated["results"]
  # Everything done: nothing is decoded.
  assert inference.run_evaluation(config(), str(workdir), strategy_text=STRATEGIES, limit=LIMIT,
                                 output_dir=out, make_plots=False)["timings"] == {}


def test_one_device_equals_eight(evaluated, workdir):
  cfg = config()
  cfg.mesh = {"data": 1, "fsdp": 1}
  cfg.evaluate.batch_size = 8
  out = str(workdir / "eval_one_device")
  import jax  # noqa: PLC0415

  one = inference.run_evaluation(cfg, str(workdir), strategy_text="beam:3,sample:4:0.7:medoid", limit=LIMIT,
                                output_dir=out, make_plots=False, devices=jax.devices()[:1])
  assert jax.device_count() == 8
  for name in ("beam:3", "sample:4:0.7:medoid"):
    a, b = _rows(one, name), _rows(evaluated, name)
    assert [r["candidates"][0]["tokens"] for r in a] == [r["candidates"][0]["tokens"] for r in b]
    np.testing.assert_allclose([r["error_km"] for r in a], [r["error_km"] for r in b], rtol=1e-5)


def test_bad_arguments(workdir):
  with pytest.raises(ValueError, match="unknown strategy"):
    inference.run_evaluation(config(), str(workdir), strategy_text="nope:3", limit=LIMIT)
  with pytest.raises(FileNotFoundError, match="step 99"):
    inference.run_evaluation(config(), str(workdir), strategy_text="greedy", step=99, limit=LIMIT)
  cfg = config()
  cfg.evaluate.batch_size = 12
  with pytest.raises(ValueError, match="evaluate.batch_size 12 must be a positive multiple"):
    inference.run_evaluation(cfg, str(workdir), strategy_text="greedy", limit=LIMIT)


def _predict(*argv):
  return command_line.call(predict.main, ["predict", *argv])


def test_predict_command(workdir, tmp_path, capsys):
  images = []
  for i, (lat, lon) in enumerate([(48.85, 2.35), (-33.9, 151.2)]):
    path = tmp_path / f"photo{i}.png"
    crop = data.crop_images(np.array([lat]), np.array([lon]), 96)[0]  # larger than the model's 64
    Image.fromarray(crop).convert("RGBA").save(path)  # alpha: predict converts to RGB
    images.append(str(path))
  geojson_path = tmp_path / "out.geojson"
  assert _predict(*images, "--workdir", str(workdir), "--strategy", "beam:4", "--top_k", "3",
                  "--geojson", str(geojson_path)) == 0
  printed = capsys.readouterr().out
  assert printed.count("lat ") == 6 and "checkpoint step 7" in printed
  features = json.load(open(geojson_path))["features"]
  assert len(features) == 6
  spec = s2.TokenSpec()
  for f in features:
    props = f["properties"]
    tokens = np.asarray([int(t) for t in props["tokens"].split("-")])
    cell = int(s2.tokens_to_cell_ids(tokens[None], spec)[0])
    assert props["s2_token"] == inference.s2_cell_token(cell)
    ring = np.asarray(f["geometry"]["coordinates"][0])
    assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
    # The centre lies inside the cell's bounding box.
    assert ring[:, 0].min() <= props["lon"] <= ring[:, 0].max()
    assert ring[:, 1].min() <= props["lat"] <= ring[:, 1].max()
  # s2_cell_token agrees with s2geometry's ToToken.
  import s2geometry  # noqa: PLC0415

  ll = s2geometry.S2LatLng.FromDegrees(48.85, 2.35)
  cell = s2geometry.S2CellId(ll).parent(20)
  assert inference.s2_cell_token(cell.id()) == cell.ToToken()


def test_predict_streams_a_folder_and_survives_unreadable_files(workdir, tmp_path, capsys):
  """7 readable crops and 2 broken files in a folder, batches of 3: the broken ones are
  reported, the rest predicted exactly as evaluation predicts them (same preprocessing)."""
  folder = tmp_path / "photos"
  (folder / "sub").mkdir(parents=True)
  lat, lon = data.load_coordinates()
  rows = data.split_indices("test")[:7]
  crops = data.crop_images(lat[rows], lon[rows], 64)
  names = []
  for i, crop in enumerate(crops):
    name = f"{i:02d}.png" if i % 2 else f"sub/{i:02d}.png"
    Image.fromarray(crop).save(folder / name)
    names.append(str(folder / name))
  (folder / "03_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  (folder / "sub" / "99_text.png").write_text("not an image")
  (folder / "notes.txt").write_text("ignored: not an image suffix")
  out = tmp_path / "preds.jsonl"
  status = _predict(str(folder), "--workdir", str(workdir), "--strategy", "greedy", "--top_k", "1",
                    "--batch_size", "3", "--output", str(out))
  captured = capsys.readouterr()
  assert status == 1
  assert "03_truncated.jpg" in captured.err and "99_text.png" in captured.err
  assert "2 of 9 image(s) could not be read" in captured.err
  written = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted(r["image"] for r in written) == sorted(names)
  # The same images through the evaluation path (EarthSource crops, greedy).
  restored = inference.restore_model(str(workdir), devices=jax.devices()[:1])
  strategy = decoding.strategies.parse_strategies("greedy", restored.spec)
  predictor = inference.Predictor.from_restored(restored, strategy, num_candidates=1)
  batch = {"image": crops, "index": np.arange(7, dtype=np.int32)}
  expected = jax.device_get(predictor(sharding.make_global_batch(batch, restored.mesh))["greedy"])
  by_name = {r["image"]: r for r in written}
  for i, name in enumerate(names):
    assert by_name[name]["candidates"][0]["tokens"] == "-".join(str(int(t)) for t in expected["candidate_tokens"][i, 0])
  # CSV output: one line per candidate with a header.
  csv_out = tmp_path / "preds.csv"
  assert _predict(*names[:2], "--workdir", str(workdir), "--top_k", "2", "--output", str(csv_out)) == 0
  lines = csv_out.read_text().splitlines()
  assert lines[0].startswith("image,rank,lat,lon,probability") and len(lines) == 1 + 4
  capsys.readouterr()
  assert _predict("--workdir", str(workdir)) == 2


def test_decode_benchmark_prints_json(capsys):
  for argv in (["decode", "--preset", "earth_tiny", "--strategy", "beam", "--beam", "2", "--batch", "8"],
               ["decode", "--preset", "earth_tiny", "--strategy", "sample", "--samples", "3", "--batch", "8",
                "--rule", "medoid"]):
    assert bench_main.main(argv + ["--steps", "1", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "decode" and result["images_per_s"] > 0


def _evaluate_command(workdir, out):
  """The evaluation job as a command: a beam and a sample pool on 18 images (2 batches of 8 and a padded one)."""
  return [sys.executable, "-m", "geotoken_jax.evaluate", "--config", os.path.join(REPO, "configs/earth.py:smoke"),
          "--workdir", str(workdir), "--strategies", "beam:2,sample:3:0.7:vote", "--limit", "18",
          "--output_dir", str(out), "--noplots", "--config.evaluate.batch_size=8"]


def _command_env(**overrides):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
              **overrides)


@pytest.fixture(scope="module")
def evaluated_by_the_command(workdir):
  """python -m geotoken_jax.evaluate in 1 process x 4 devices (one run, two tests: the command
  line itself, and the 1-process result the 2-process run must reproduce)."""
  out = workdir / "command_one_process"
  done = subprocess.run(_evaluate_command(workdir, out),
                        env=_command_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                        capture_output=True, text=True, timeout=600)
  return done, out


def test_evaluate_cli(evaluated_by_the_command):
  done, out = evaluated_by_the_command
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| beam:2 |" in done.stdout and os.path.exists(out / "results.md")


def test_two_processes_evaluate_like_one(workdir, tmp_path, evaluated_by_the_command):
  """2 localhost processes x 2 devices (jax.distributed, gloo) write the predictions of 1 process."""
  single, one_dir = evaluated_by_the_command
  assert single.returncode == 0, single.stderr[-3000:]
  multi = subprocess.run(["bash", os.path.join(REPO, "launch/local.sh"), "2", "2", "--",
                          *_evaluate_command(workdir, tmp_path / "two")],
                         env=_command_env(LOGDIR=str(tmp_path), XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                         capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
  for name in ("beam-2", "sample-3-0.7-vote"):
    one = inference.read_predictions(str(one_dir / "predictions" / f"{name}.jsonl"))
    two = inference.read_predictions(str(tmp_path / "two" / "predictions" / f"{name}.jsonl"))
    assert len(one) == len(two) == 18  # 18 = 2 batches of 8 and a padded one
    assert [r["id"] for r in one] == [r["id"] for r in two]
    assert [r["candidates"][0]["tokens"] for r in one] == [r["candidates"][0]["tokens"] for r in two]
    np.testing.assert_allclose([r["error_km"] for r in one], [r["error_km"] for r in two], rtol=1e-5)


def test_evaluate_a_labelled_folder_like_the_split(workdir, tmp_path, capsys):
  """The earth test split exported as CSV + PNG files, evaluated with --csv/--image_dir, gives
  the table --split test gives; rejected rows of the folder are the `skipped` column."""
  from geotoken_jax.data import earth  # noqa: PLC0415

  export_dir = tmp_path / "export"
  assert earth.main(["export", "--split", "test", "--output", str(export_dir), "--limit", "24",
                     "--format", "png"]) == 0
  strategies = "greedy,beam:3,sample:4:0.7:medoid"
  common = ["evaluate", "--workdir", str(workdir), "--strategies", strategies, "--noplots"]
  assert command_line.call(evaluate.main, [*common, "--split", "test", "--limit", "24",
                                           "--output_dir", str(tmp_path / "split")]) == 0
  csv_path = next(export_dir.glob("*.csv"))
  image_dir = next(p for p in export_dir.iterdir() if p.is_dir())
  assert command_line.call(evaluate.main, [*common, "--csv", str(csv_path), "--image_dir", str(image_dir),
                                           "--output_dir", str(tmp_path / "folder")]) == 0
  split = json.load(open(tmp_path / "split" / "results.json"))["results"]
  folder = json.load(open(tmp_path / "folder" / "results.json"))["results"]
  assert split == folder and split["greedy"]["images"] == 24
  for name in ("greedy", "beam-3", "sample-4-0.7-medoid"):
    a = inference.read_predictions(tmp_path / "split" / "predictions" / f"{name}.jsonl")
    b = inference.read_predictions(tmp_path / "folder" / "predictions" / f"{name}.jsonl")
    assert [r["candidates"] for r in a] == [r["candidates"] for r in b]
  # Two bad rows (a missing image, a latitude of 95): 24 evaluated, 2 skipped.
  lines = csv_path.read_text().splitlines()
  lines += ["missing.png,10.0,10.0", lines[1].split(",")[0].replace(".", "_copy.") + ",95.0,10.0"]
  bad_csv = tmp_path / "with_bad_rows.csv"
  bad_csv.write_text("\n".join(lines) + "\n")
  capsys.readouterr()
  assert command_line.call(evaluate.main, [*common, "--strategies", "greedy", "--csv", str(bad_csv),
                                           "--image_dir", str(image_dir),
                                           "--output_dir", str(tmp_path / "bad")]) == 0
  row = json.load(open(tmp_path / "bad" / "results.json"))["results"]["greedy"]
  assert (row["images"], row["skipped"]) == (24, 2)
  assert row["acc@2500km"] == split["greedy"]["acc@2500km"]


def test_predictor_program_does_not_grow_with_the_trie(workdir):
  """The evaluation path passes tries as arguments: a trie 100x larger leaves the compiled
  program's size unchanged (a trie baked in as a constant would add its bytes)."""
  restored = inference.restore_model(str(workdir), devices=jax.devices()[:1])
  spec = restored.spec
  wanted = decoding.strategies.parse_strategies("greedy:trie=1,beam:3:trie=1", spec)
  lat, lon = data.load_coordinates()
  sizes, texts = [], []
  for n in (50, 20000):
    tokens = s2.latlng_to_tokens(lat[:n], lon[:n], spec)
    tries = inference.build_tries(restored.config, spec, wanted, training_tokens=tokens)
    sizes.append(sum(t.children.size for t in tries.values()) * 4)
    predictor = inference.Predictor(restored.graphdef, restored.params, restored.param_shardings, restored.mesh,
                                    spec, wanted, tries=tries)
    batch = {"image": np.zeros((2, 64, 64, 3), np.uint8), "index": np.arange(2, dtype=np.int32)}
    texts.append(predictor.lower(sharding.make_global_batch(batch, restored.mesh)).compile().as_text())
  assert sizes[1] > 100 * sizes[0] and sizes[1] > 1_000_000
  assert abs(len(texts[1]) - len(texts[0])) < 2048
