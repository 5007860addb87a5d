"""python -m geotoken_jax.bench {s2,train,decode,prepare,embed} [flags]: one JSON line per run."""

from __future__ import annotations

import argparse
import json
import sys

from geotoken_jax.bench import decode_bench, embed_bench, prepare_bench, s2_bench, search_bench, train_bench

_BENCHMARKS = {"s2": s2_bench, "train": train_bench, "decode": decode_bench, "prepare": prepare_bench,
               "embed": embed_bench, "search": search_bench}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m geotoken_jax.bench")
  subparsers = parser.add_subparsers(dest="benchmark", required=True)
  for name, module in _BENCHMARKS.items():
    module.add_arguments(subparsers.add_parser(name, help=module.__doc__.splitlines()[0]))
  args = parser.parse_args(argv)
  result = _BENCHMARKS[args.benchmark].run(args)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
