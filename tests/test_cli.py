"""The tokenize command and the s2 benchmark, run as a user runs them."""

import json
import subprocess
import sys

import numpy as np
import pytest

from geotoken_jax import s2


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def _write_csv(path, header, rows):
  path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
  return path


def test_tokenize_writes_tokens_in_row_order(tmp_path, sphere_points_1m):
  lat, lng = (a[:2000] for a in sphere_points_1m)
  lng = lng.copy()
  lng[:10] += 360.0  # out-of-range longitudes are normalized, not rejected
  rows = [(f"{k:02d}/ab/{k}.jpg", repr(a), repr(b)) for k, (a, b) in enumerate(zip(lat.tolist(), lng.tolist()))]
  csv_path = _write_csv(tmp_path / "coords.csv", ["IMG_ID", "AUTHOR", "LAT", "LON"],
                        [(i, "someone", a, b) for i, a, b in rows])
  out = tmp_path / "tokens.npy"
  result = _run("geotoken_jax.tokenize", "--input", str(csv_path), "--output", str(out),
                "--level", "20", "--group", "2")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["rows"] == 2000 and summary["positions"] == 11 and summary["seconds"] >= 0
  tokens = np.load(out)
  assert tokens.dtype == np.uint8 and tokens.shape == (2000, 11)
  np.testing.assert_array_equal(tokens, s2.latlng_to_tokens(lat, lng, s2.TokenSpec(20, 2)))


def test_tokenize_column_overrides_and_other_specs(tmp_path):
  csv_path = _write_csv(tmp_path / "c.csv", ["id", "latitude", "longitude"],
                        [("a", 48.8566, 2.3522), ("b", -33.8688, 151.2093)])
  out = tmp_path / "t.npy"
  result = _run("geotoken_jax.tokenize", "--input", str(csv_path), "--output", str(out), "--level", "30",
                "--group", "5", "--id_column", "id", "--lat_column", "latitude", "--lon_column", "longitude")
  assert result.returncode == 0, result.stderr
  spec = s2.TokenSpec(30, 5)
  np.testing.assert_array_equal(np.load(out),
                                s2.latlng_to_tokens([48.8566, -33.8688], [2.3522, 151.2093], spec))
  assert np.load(out).dtype == np.uint16


@pytest.mark.parametrize("header,rows,message", [
    (["IMG_ID", "LAT", "LON"], [("ok", 1, 2), ("north", 91, 0), ("gap", "nan", 0)],
     ["gap (lat=nan", "north (lat=91.0"]),
    (["IMG_ID", "LAT", "LON"], [("ok", 1, 2), ("typo", "1.2.3", 0)], ["unparsable LAT: typo ('1.2.3')"]),
    (["IMG_ID", "LAT", "LON"], [("ok", 1, 2), ("short", 3)], ["fewer than 3 fields, at lines [3]"]),
    (["IMG_ID", "LAT", "LON"], [], ["no data rows"]),
    (["IMG_ID", "LATITUDE", "LON"], [("ok", 1, 2)], ["['LAT'] not in header"]),
])
def test_tokenize_bad_input_names_the_rows(tmp_path, header, rows, message):
  csv_path = _write_csv(tmp_path / "bad.csv", header, rows)
  result = _run("geotoken_jax.tokenize", "--input", str(csv_path), "--output", str(tmp_path / "t.npy"))
  assert result.returncode == 2
  for fragment in message:
    assert fragment in result.stderr
  assert not (tmp_path / "t.npy").exists()


def test_tokenize_rejects_level_not_divisible_by_group(tmp_path):
  csv_path = _write_csv(tmp_path / "c.csv", ["IMG_ID", "LAT", "LON"], [("a", 1, 2)])
  result = _run("geotoken_jax.tokenize", "--input", str(csv_path), "--output", str(tmp_path / "t.npy"),
                "--level", "20", "--group", "3")
  assert result.returncode == 2 and "divisible" in result.stderr


def test_s2_benchmark_prints_one_json_line():
  result = _run("geotoken_jax.bench", "s2", "--n", "50000", "--loop_n", "2000", "--repeats", "1")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report["checked_points"] == 50000
  assert report["mismatches_vs_s2geometry"] == 0 and report["mismatches_vs_s2sphere"] == 0
  for key in ("encode_points_per_s", "s2geometry_loop_points_per_s", "s2sphere_loop_points_per_s",
              "speedup_vs_s2geometry"):
    assert report[key] > 0


def test_geotoken_console_script_dispatches_to_every_command(capsys):
  from geotoken_jax import cli  # noqa: PLC0415

  assert cli.main(["--help"]) == 0
  assert "geotoken evaluate" in capsys.readouterr().out
  assert cli.main(["nope"]) == 2
  assert "unknown command 'nope'" in capsys.readouterr().err
  # absl commands parse their flags; a missing --workdir is a usage error, not a traceback.
  assert cli.main(["evaluate"]) == 2
  assert "--workdir is required" in capsys.readouterr().err
  assert cli.main(["predict", "--workdir", "/nonexistent"]) == 2
  assert cli.main(["train", "--bogus_flag=1"]) == 2
  assert "bogus_flag" in capsys.readouterr().err
  # argparse commands get their arguments.
  with pytest.raises(SystemExit):
    cli.main(["tokenize", "--help"])
  assert "--input" in capsys.readouterr().out
  # The script is installed with the package.
  import importlib.metadata  # noqa: PLC0415

  scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
  assert scripts.get("geotoken") == "geotoken_jax.cli:main"
