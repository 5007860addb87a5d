"""Compare evaluated variants on the same images: one table with paired bootstrap intervals.

  python -m geotoken_jax.report DIR [--split test] [--baseline NAME] [--num_bootstrap 1000]
                                    [--seed 0] [--confidence 0.95] [--only NAME,NAME] [--output OUT]
  geotoken report DIR ...

DIR is a workdir or a folder of workdirs (a sweep): every strategy and oracle row of every
evaluation of the split under it (W/eval/<split>-step<N>, the newest step) is a variant.
Prints the Markdown table (each variant's acc@1/25/200/750/2500 km, median km, GeoGuessr,
country accuracy; then each minus the baseline with its paired bootstrap interval) and writes
OUT/report_<split>.md, .csv, .json and an accuracy-by-threshold plot (OUT default DIR/report).
Variants evaluated on different images are refused (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="geotoken report", description=__doc__.split("\n\n")[0])
  parser.add_argument("root", help="a workdir, or a folder of workdirs (a sweep)")
  parser.add_argument("--split", default="test", help="the evaluated split (default test)")
  parser.add_argument("--baseline", default=None, help="the variant the others are compared with "
                      "(default: knn:1 when present, else the first)")
  parser.add_argument("--only", default=None, help="comma-separated variant names to keep (default: all)")
  parser.add_argument("--num_bootstrap", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--confidence", type=float, default=0.95)
  parser.add_argument("--output", default=None, help="where the report goes (default ROOT/report)")
  args = parser.parse_args(argv)

  from etils import epath  # pylint: disable=g-import-not-at-top

  from geotoken_jax import comparison, plots  # pylint: disable=g-import-not-at-top

  try:
    variants = comparison.load_variants(args.root, args.split)
    if args.only:
      wanted = [name.strip() for name in args.only.split(",") if name.strip()]
      missing = [name for name in wanted if name not in variants]
      if missing:
        raise ValueError(f"--only names unknown variant(s) {missing}; variants: {', '.join(variants)}")
      variants = {name: variants[name] for name in wanted}
    baseline = args.baseline or next((name for name in variants if name.split("/")[-1] == "knn:1"),
                                     next(iter(variants)))
    compared = comparison.compare(variants, baseline, num_samples=args.num_bootstrap, seed=args.seed,
                                  confidence=args.confidence)
  except (ValueError, FileNotFoundError) as e:
    print(f"report: error: {e}", file=sys.stderr)
    return 2
  table = comparison.markdown_table(compared, baseline, confidence=args.confidence)
  spread = comparison.seed_spread(compared)
  if spread:  # training noise: the same variant over seeds
    table += ("\nSpread over training seeds (mean ± standard deviation, min–max): a difference inside it is "
              "not a gain.\n\n" + comparison.spread_table(spread))
  out = epath.Path(args.output) if args.output else epath.Path(args.root) / "report"
  out.mkdir(parents=True, exist_ok=True)
  stem = "report_" + args.split.replace(":", "-")
  (out / f"{stem}.md").write_text(table)
  (out / f"{stem}.csv").write_text(comparison.csv_text(compared))
  (out / f"{stem}.json").write_text(json.dumps(
      {"split": args.split, "baseline": baseline, "num_bootstrap": args.num_bootstrap, "seed": args.seed,
       "confidence": args.confidence, "variants": compared, "seed_spread": spread}, indent=1, default=float))
  plots.error_cdf({name: v.error_km for name, v in variants.items()}, str(out / f"{stem}_accuracy_by_threshold.png"),
                  title=f"accuracy by threshold ({args.split})")
  print(table, end="", flush=True)
  print(f"written: {out}/{stem}.md, .csv, .json, _accuracy_by_threshold.png", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
