"""Exact nearest-neighbour lists of embedded splits in a gallery split.

  python -m geotoken_jax.index --embeddings ROOT --gallery train --queries train,validation,test \\
      -k 32 --output NEIGHBORS [--fields image,loc_head] [--dtype float32|bfloat16] [--group s2_cell:6]
  python -m geotoken_jax.index --config configs/earth.py:retrieval --workdir W   (settings and paths
      from the config's retrieval block, relative to W)

ROOT/<split>/ are embedding stores (python -m geotoken_jax.embed).  Writes NEIGHBORS/<split>/
(indices and scores per query, memory-mappable, a manifest with the leak statistics: how often
the unfiltered rank 0 was the query itself or a duplicate).  Sharded over every device of every
process (run the same command on each); resumable block by block.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from geotoken_jax import command_line as cl

_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "folder of embedding stores, one per split")
_GALLERY = flags.DEFINE_string("gallery", None, "the split searched (default: retrieval.gallery or train)")
_QUERIES = flags.DEFINE_list("queries", None, "query splits (default: the config's recipe.splits, else the "
                              "gallery split itself)")
_K = flags.DEFINE_integer("k", None, "neighbours kept per query (default: retrieval.search_k or 32)")
_FIELDS = flags.DEFINE_list("fields", None, "embedding fields searched (default image,loc_head)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "product dtype (bfloat16: fp32 rescoring)")
_GROUP = flags.DEFINE_string("group", None, "exclude the query's group: s2_cell:LEVEL or column:NAME")
_DUPLICATE_KM = flags.DEFINE_float("duplicate_km", None, "near-duplicate distance (km; 0: rule off)")
_DUPLICATE_SIMILARITY = flags.DEFINE_float("duplicate_similarity", None, "near-duplicate minimum score")
_CHUNK_ROWS = flags.DEFINE_integer("chunk_rows", None, "gallery rows per device step (bounds memory)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace lists searched with other settings")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {list(argv[1:])}", file=sys.stderr)
    return 2
  config = cl.CONFIG.value
  if config is not None and "retrieval" not in config:
    print("error: the config has no retrieval block", file=sys.stderr)
    return 2
  if config is not None and not cl.WORKDIR.value:
    print("error: --config needs --workdir (the config's retrieval paths are relative to it)", file=sys.stderr)
    return 2
  if config is None and not (_EMBEDDINGS.value and cl.OUTPUT.value):
    print("error: give --embeddings and --output (or --config with --workdir)", file=sys.stderr)
    return 2
  cl.quiet_logs()
  cl.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from geotoken_jax.retrieval import neighbors, sources  # pylint: disable=g-import-not-at-top

  settings = neighbors.settings_from_config(config.retrieval) if config is not None else dict(
      neighbors.DEFAULT_SETTINGS)
  for key, flag in (("k", _K), ("dtype", _DTYPE), ("group", _GROUP), ("duplicate_km", _DUPLICATE_KM),
                    ("duplicate_similarity", _DUPLICATE_SIMILARITY), ("chunk_rows", _CHUNK_ROWS)):
    if flag.value is not None:
      settings[key] = flag.value
  if _FIELDS.value:
    settings["fields"] = tuple(_FIELDS.value)
  if config is not None:
    embeddings_root = _EMBEDDINGS.value or str(sources.resolve(cl.WORKDIR.value, config.retrieval.embeddings))
    output_root = cl.OUTPUT.value or str(sources.resolve(cl.WORKDIR.value, config.retrieval.neighbors))
    gallery = _GALLERY.value or str(config.retrieval.gallery)
  else:
    embeddings_root, output_root, gallery = _EMBEDDINGS.value, cl.OUTPUT.value, _GALLERY.value or "train"
  default_queries = list(config.recipe.splits) if config is not None and "recipe" in config else [gallery]
  queries = _QUERIES.value or default_queries
  try:
    manifests = neighbors.run_index(embeddings_root, output_root, gallery=gallery, queries=queries,
                                    settings=settings, overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    for split, manifest in manifests.items():
      print(json.dumps({"split": split, "output": f"{output_root}/{split}", "queries": manifest["num_queries"],
                        "k": manifest["k"], "stats": manifest.get("stats", {}),
                        "timings": manifest.get("timings", [])[-1:]}), flush=True)
  return 0


if __name__ == "__main__":
  cl.run(main)
