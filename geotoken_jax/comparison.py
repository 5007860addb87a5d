"""Comparing evaluated variants on the same images: one table, paired bootstrap intervals.

  load_evaluation(directory)        the strategies and oracle rows of one evaluation folder
  load_variants(root, split)        every strategy (and oracle row) of every evaluation of
                                    `split` under root (a workdir, or a folder of workdirs:
                                    a sweep), read from eval/<split>-step<N>/predictions
  compare(variants, baseline)       each variant's statistics and, against the baseline, the
                                    difference with a paired bootstrap confidence interval
  markdown_table / csv_text         the report's two forms
  seed_spread / spread_table        variants that differ only in their seed: the spread of
                                    each statistic over seeds (training noise)
  differences_table(variant, others) one variant minus several others (the recipe's check
                                    of its chosen row against the baselines it must beat)

Statistics (STATISTICS): acc@1/25/200/750/2500 km (%), median km, GeoGuessr score, country
accuracy (%, over the images whose true country is known), each computed from the per-image
rows exactly as metrics.accuracy_table does.

Paired bootstrap: the variants are joined by image id; two variants evaluated on different
images (other ids, or a different count) are refused, never silently intersected.  Each of
`num_samples` resamples draws n image positions with replacement (numpy default_rng(seed),
one [num_samples, n] draw shared by every statistic and variant), computes the statistic on
the variant and on the baseline over the same images, and keeps the difference; the interval is
the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of those differences (numpy's
linear interpolation).  An interval that excludes 0 is marked as a difference; one that holds
0 is not.  Image noise only: training noise (another seed of the same run) is not in it, so a
difference smaller than a seed sweep's spread is not a gain either.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from geotoken_jax import geocode, metrics
from geotoken_jax.inference.evaluation import file_name, read_predictions, truth_countries

STATISTICS = tuple(f"acc@{t:g}km" for t in metrics.THRESHOLDS_KM) + ("median_km", "geoguessr", "country_acc")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One evaluated strategy: its per-image rows, sorted by image id."""
  name: str
  ids: np.ndarray  # [n] int64
  error_km: np.ndarray  # [n] float64
  country_hit: np.ndarray  # [n] float64: 1 / 0, NaN where the true country is unknown
  source: str  # the predictions file


def variant_from_rows(name: str, rows: Sequence[Mapping], source: str = "") -> Variant:
  """A Variant from prediction rows ({"id", "error_km", "pred_lat", "pred_lon", "true_lat",
  "true_lon"[, "true_country"]}).  Rows without an error (images the evaluation skipped) are
  refused: a paired comparison needs every image scored by both sides."""
  skipped = [r.get("id") for r in rows if r.get("error_km") is None]
  if skipped:
    raise ValueError(f"{name}: {len(skipped)} image(s) without an error (skipped by the evaluation, e.g. ids "
                     f"{skipped[:5]}): a paired comparison needs every image scored")
  ids = np.asarray([int(r["id"]) for r in rows], np.int64)
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"{name}: repeated image ids in {source or 'its rows'}")
  order = np.argsort(ids, kind="stable")
  error = np.asarray([float(r["error_km"]) for r in rows], np.float64)
  predicted = np.asarray([[r["pred_lat"], r["pred_lon"]] for r in rows], np.float64).reshape(-1, 2)
  true_codes = truth_countries(list(rows))  # as the evaluation scores them (every row here has an error)
  predicted_codes = geocode.country_codes(predicted) if len(rows) else np.zeros(0, object)
  known = np.asarray([isinstance(c, str) and c != "" for c in true_codes])
  hit = np.where(known, (predicted_codes.astype(object) == true_codes.astype(object)).astype(np.float64), np.nan)
  return Variant(name, ids[order], error[order], hit[order], source)


def _statistic(name: str, error: np.ndarray, hit: np.ndarray) -> np.ndarray:
  """The statistic over the last axis (one value per leading index)."""
  if name.startswith("acc@"):
    threshold = float(name[4:-2])
    return 100.0 * np.mean(error <= threshold, axis=-1)
  if name == "median_km":
    return np.median(error, axis=-1)
  if name == "geoguessr":
    return np.mean(metrics.geoguessr_score(error), axis=-1)
  if name == "country_acc":
    known = ~np.isnan(hit)
    count = np.sum(known, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(count > 0, 100.0 * np.sum(np.where(known, hit, 0.0), axis=-1) / count, np.nan)
  raise ValueError(f"unknown statistic {name!r}; choose from {', '.join(STATISTICS)}")


def statistics(variant: Variant) -> dict[str, float]:
  return {name: float(_statistic(name, variant.error_km, variant.country_hit)) for name in STATISTICS} | {
      "images": int(variant.ids.size)}


def check_same_images(variants: Sequence[Variant]) -> None:
  """Refuses variants evaluated on different images (ids differ)."""
  first = variants[0]
  for other in variants[1:]:
    if other.ids.shape != first.ids.shape or not np.array_equal(other.ids, first.ids):
      only_a = np.setdiff1d(first.ids, other.ids).size
      only_b = np.setdiff1d(other.ids, first.ids).size
      raise ValueError(f"{other.name!r} and {first.name!r} were evaluated on different images ({other.ids.size} "
                       f"and {first.ids.size}; {only_b} only in the first, {only_a} only in the second): a paired "
                       "comparison needs the same images (the same split, --limit and data)")


def bootstrap_indices(n: int, num_samples: int, seed: int) -> np.ndarray:
  """[num_samples, n] image positions drawn with replacement (numpy default_rng(seed))."""
  if n < 1 or num_samples < 1:
    raise ValueError(f"a bootstrap needs images and samples, got n={n}, num_samples={num_samples}")
  return np.random.default_rng(seed).integers(0, n, size=(num_samples, n))


def paired_difference(variant: Variant, baseline: Variant, indices: np.ndarray, *,
                      confidence: float = 0.95) -> dict[str, dict[str, float]]:
  """{statistic: {"delta", "low", "high", "differs"}}: variant minus baseline on all images,
  and the percentile interval of the differences over the resamples `indices` [S, n]."""
  check_same_images([baseline, variant])
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  out = {}
  for name in STATISTICS:
    delta = float(_statistic(name, variant.error_km, variant.country_hit)
                  - _statistic(name, baseline.error_km, baseline.country_hit))
    resampled = (_statistic(name, variant.error_km[indices], variant.country_hit[indices])
                 - _statistic(name, baseline.error_km[indices], baseline.country_hit[indices]))  # [S]
    if math.isnan(delta):
      out[name] = {"delta": delta, "low": math.nan, "high": math.nan, "differs": False}
      continue
    low, high = np.percentile(resampled, [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)])
    out[name] = {"delta": delta, "low": float(low), "high": float(high), "differs": bool(low > 0.0 or high < 0.0)}
  return out


def compare(variants: Mapping[str, Variant], baseline: str, *, num_samples: int = 1000, seed: int = 0,
            confidence: float = 0.95) -> dict[str, dict]:
  """{variant name: {"statistics": {...}, "vs_baseline": paired_difference or None}} (the
  baseline's vs_baseline is None)."""
  if baseline not in variants:
    raise ValueError(f"baseline {baseline!r} is not among the variants: {', '.join(variants)}")
  check_same_images(list(variants.values()))
  base = variants[baseline]
  indices = bootstrap_indices(base.ids.size, num_samples, seed)
  return {name: {"statistics": statistics(v),
                 "vs_baseline": None if name == baseline else paired_difference(v, base, indices,
                                                                               confidence=confidence)}
          for name, v in variants.items()}


def _evaluation_dirs(root: epath.Path, split: str) -> list[epath.Path]:
  """Every <workdir>/eval/<split>-step<N> under root (the newest step of each workdir)."""
  pattern = re.compile(re.escape(file_name(split)) + r"-step(\d+)$")
  found: list[epath.Path] = []

  def walk(folder: epath.Path, depth: int) -> None:
    if depth > 6 or not folder.is_dir():
      return
    children = sorted(folder.iterdir(), key=str)
    if folder.name == "eval":
      steps = [(int(m.group(1)), c) for c in children if (m := pattern.match(c.name)) and (c / "run.json").exists()]
      if steps:
        found.append(max(steps, key=lambda s: s[0])[1])
      return
    for child in children:
      if child.is_dir() and child.name not in ("checkpoints", "embeddings", "neighbors", "cache", "tensorboard"):
        walk(child, depth + 1)

  walk(root, 0)
  return found


def load_evaluation(directory, names: Sequence[str] | None = None, prefix: str = "") -> dict[str, Variant]:
  """The strategies and oracle rows of one evaluation folder (eval/<split>-step<N>), or only
  `names` of them: {prefix + name: Variant}."""
  directory = epath.Path(directory)
  run = json.loads((directory / "run.json").read_text())
  listed = list(run.get("strategies", [])) + list(run.get("oracles", []))
  if names is not None:
    unknown = [n for n in names if n not in listed]
    if unknown:
      raise ValueError(f"{directory} holds no evaluation of {unknown}; it has {', '.join(listed)}")
    listed = list(names)
  out = {}
  for strategy in listed:
    path = directory / "predictions" / (file_name(strategy) + ".jsonl")
    if not path.exists():
      raise FileNotFoundError(f"{directory}: run.json lists {strategy} but {path.name} is missing (an "
                              "interrupted evaluation: rerun it)")
    rows = read_predictions(path)
    if len(rows) != int(run.get("records", len(rows))):
      raise ValueError(f"{path}: {len(rows)} predictions for {run.get('records')} images (an interrupted "
                       "evaluation: rerun it)")
    out[prefix + strategy] = variant_from_rows(prefix + strategy, rows, str(path))
  return out


def load_variants(root, split: str) -> dict[str, Variant]:
  """Every strategy and oracle row evaluated on `split` under root: {name: Variant}.  Names are
  the strategy names for one workdir, "<workdir relative to root>/<strategy>" for several."""
  root = epath.Path(root)
  directories = _evaluation_dirs(root, split)
  if not directories:
    raise FileNotFoundError(f"no evaluation of split {split!r} under {root} (expected "
                            f"<workdir>/eval/{file_name(split)}-step<N>/run.json)")
  several = len(directories) > 1
  out = {}
  for directory in directories:
    workdir = directory.parent.parent
    prefix = (str(workdir.relative_to(root)) if workdir != root else ".") + "/" if several else ""
    out.update(load_evaluation(directory, prefix=prefix))
  return out


def differences_table(variant: Variant, others: Sequence[Variant], *, num_samples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[str, dict]:
  """variant minus each of `others` on the same images, with paired bootstrap intervals (one
  shared draw): (a Markdown table, {other name: paired_difference})."""
  check_same_images([variant, *others])
  indices = bootstrap_indices(variant.ids.size, num_samples, seed)
  diffs = {o.name: paired_difference(variant, o, indices, confidence=confidence) for o in others}
  lines = ["| difference | " + " | ".join(STATISTICS) + " |", "|---" * (len(STATISTICS) + 1) + "|"]
  for name, diff in diffs.items():
    lines.append(f"| {variant.name} − {name} | " + " | ".join(_difference_cell(diff[k], k) for k in STATISTICS) + " |")
  return "\n".join(lines) + "\n", diffs


def _difference_cell(d: Mapping[str, float], name: str) -> str:
  digits = _digits(name)
  text = f"{d['delta']:+.{digits}f} [{_fmt(d['low'], digits)}, {_fmt(d['high'], digits)}]"
  return f"**{text}**" if d["differs"] else text


def _fmt(value: float, digits: int) -> str:
  return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _digits(name: str) -> int:
  return 0 if name == "geoguessr" else 1


def markdown_table(compared: Mapping[str, dict], baseline: str, *, confidence: float = 0.95) -> str:
  """Two Markdown tables: every variant's statistics, then each variant minus the baseline with
  its interval (a difference whose interval excludes 0 in bold; for median km lower is better)."""
  head = "| variant | images | " + " | ".join(STATISTICS) + " |"
  rule = "|---" * (len(STATISTICS) + 2) + "|"
  lines = [head, rule]
  for name, entry in compared.items():
    s = entry["statistics"]
    lines.append(f"| {name} | {s['images']} | " + " | ".join(_fmt(s[k], _digits(k)) for k in STATISTICS) + " |")
  lines += ["", f"Difference from **{baseline}**, paired bootstrap {100 * confidence:g} % interval "
            "(bold: the interval excludes 0):", "", "| variant | " + " | ".join(STATISTICS) + " |",
            "|---" * (len(STATISTICS) + 1) + "|"]
  for name, entry in compared.items():
    diff = entry["vs_baseline"]
    if diff is None:
      continue
    lines.append(f"| {name} | " + " | ".join(_difference_cell(diff[k], k) for k in STATISTICS) + " |")
  return "\n".join(lines) + "\n"


_SEED_PART = re.compile(r"(^|__)seed=-?\d+(?=__|/|$)")


def seed_group(name: str) -> str | None:
  """A sweep variant's name without its seed override (None when it has none):
  "seed=1__model.dropout=0.1/run/greedy" -> "model.dropout=0.1/run/greedy"."""
  head, slash, tail = name.partition("/")
  if not _SEED_PART.search(head):
    return None
  stripped = _SEED_PART.sub("", head).strip("_")
  return (stripped or "(seed only)") + slash + tail


def seed_spread(compared: Mapping[str, dict]) -> dict[str, dict]:
  """Variants that differ only in their seed override, grouped: {group: {"seeds": n,
  statistic: {"mean", "std", "min", "max"}}} for groups of 2 or more (training noise, beside
  the bootstrap's image noise: a difference inside this spread is not a gain)."""
  groups: dict[str, list[dict]] = {}
  for name, entry in compared.items():
    group = seed_group(name)
    if group is not None:
      groups.setdefault(group, []).append(entry["statistics"])
  out = {}
  for group, members in groups.items():
    if len(members) < 2:
      continue
    out[group] = {"seeds": len(members)}
    for k in STATISTICS:
      values = np.asarray([m[k] for m in members], np.float64)
      out[group][k] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
                       "min": float(np.min(values)), "max": float(np.max(values))}
  return out


def spread_table(spread: Mapping[str, dict]) -> str:
  """Markdown: each seed group's mean ± sample standard deviation (min–max) per statistic."""
  if not spread:
    return ""
  lines = ["| variant (over seeds) | seeds | " + " | ".join(STATISTICS) + " |", "|---" * (len(STATISTICS) + 2) + "|"]
  for group, entry in spread.items():
    cells = [f"{_fmt(entry[k]['mean'], _digits(k))} ± {_fmt(entry[k]['std'], _digits(k))} "
             f"({_fmt(entry[k]['min'], _digits(k))}–{_fmt(entry[k]['max'], _digits(k))})" for k in STATISTICS]
    lines.append(f"| {group} | {entry['seeds']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def csv_text(compared: Mapping[str, dict]) -> str:
  """One row per variant: each statistic, and its difference from the baseline with the interval."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  header = ["variant", "images"] + list(STATISTICS)
  header += [f"{k}_{part}" for k in STATISTICS for part in ("delta", "low", "high", "differs")]
  writer.writerow(header)
  for name, entry in compared.items():
    s, diff = entry["statistics"], entry["vs_baseline"]
    row = [name, s["images"]] + [s[k] for k in STATISTICS]
    for k in STATISTICS:
      row += ["", "", "", ""] if diff is None else [diff[k]["delta"], diff[k]["low"], diff[k]["high"],
                                                    int(diff[k]["differs"])]
    writer.writerow(row)
  return buffer.getvalue()
