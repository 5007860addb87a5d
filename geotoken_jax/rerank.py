"""Fit (or refit) the learned reranker of a trained run's union pools, where the test regime holds.

  python -m geotoken_jax.rerank --workdir W [--config CONFIG]

The config (default: the run's saved one) needs a `reranker` block (geotoken_jax.reranking:
pool, fit_splits, ...); the fit splits need neighbour lists in W (the recipe's index stage).
Writes W/<reranker.directory> (reranker.json, params/, pools/) and prints the out-of-fold
figures per fit split as JSON.  A reranker already fitted with the same settings is kept; delete
its folder (pools/ may stay: they are the decoder's, reused) to refit.  Evaluate it with the rule
rerank: `evaluate --workdir W --strategies sample:30:0.7:rerank:add_neighbors=10
--config.evaluate.reranker_workdir=reranker` (or the config's evaluate.reranker_workdir).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from geotoken_jax import command_line as cl


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  if not cl.WORKDIR.value:
    print("error: --workdir is required (a trained run's folder)", file=sys.stderr)
    return 2
  cl.quiet_logs()
  cl.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax import inference, reranking  # pylint: disable=g-import-not-at-top

  try:
    config = cl.CONFIG.value if cl.CONFIG.value is not None else inference.load_run_config(cl.WORKDIR.value)
    if config.get("reranker") is None:
      raise ValueError("the config has no reranker block (pool, fit_splits, ...: geotoken_jax.reranking.DEFAULTS)")
    summary = reranking.fit_reranker(config, cl.WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(json.dumps({"strategy": reranking.rerank_strategy(config), **summary}, default=float), flush=True)
  return 0


if __name__ == "__main__":
  cl.run(main)
