"""`geotoken SUBCOMMAND [flags]`: one console script for every command.

  geotoken train     --config configs/earth.py --workdir W
  geotoken evaluate  --workdir W [--strategies ...] [--csv F --image_dir D]
  geotoken predict   --workdir W photos/ ...
  geotoken embed     --workdir ALIGN_W --split train --output DIR
  geotoken index     --embeddings ROOT --gallery train --queries train,test -k 32 --output DIR
  geotoken prepare   --dataset im2gps3k --manual_dir M --data_dir D
  geotoken tokenize  --input coords.csv --output tokens.npy
  geotoken report    W_OR_SWEEP_DIR [--split test] [--baseline knn:1]
  geotoken sweep     --config configs/earth.py:smoke --workdir DIR --grid seed=0,1 [--zip ...]
  geotoken bench     {s2,train,decode,prepare,embed} ...

Each is also `python -m geotoken_jax.MODULE` with the same flags.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, whether it parses absl flags through command_line.call)
COMMANDS = {
    "train": ("geotoken_jax.train", True),
    "evaluate": ("geotoken_jax.evaluate", True),
    "predict": ("geotoken_jax.predict", True),
    "embed": ("geotoken_jax.embed", True),
    "index": ("geotoken_jax.index", True),
    "rerank": ("geotoken_jax.rerank", True),
    "report": ("geotoken_jax.report", False),
    "sweep": ("geotoken_jax.sweep", False),
    "prepare": ("geotoken_jax.data.prepare", False),
    "tokenize": ("geotoken_jax.tokenize", False),
    "bench": ("geotoken_jax.bench.__main__", False),
}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
    print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help", "help") else sys.stdout)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "help"):
      print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
      return 2
    return 0
  name, rest = argv[0], argv[1:]
  module_name, absl_flags = COMMANDS[name]
  module = importlib.import_module(module_name)
  if absl_flags:
    from geotoken_jax import command_line  # pylint: disable=g-import-not-at-top

    return command_line.call(module.main, [f"geotoken {name}", *rest])
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
