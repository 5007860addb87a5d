"""Predict where photos were taken: the top-k S2 cells of each image.

  python -m geotoken_jax.predict --workdir workdirs/earth photo1.jpg photo2.png \
      [--strategy beam:5] [--top_k 5] [--geojson out.geojson] [--step N] [--config FILE]

The model is rebuilt from WORKDIR/config.json (written by the trainer) unless
--config is given, and its parameters come from the latest (or --step)
checkpoint.  Each image is converted to RGB, its shorter side resized to the
model's input size and centre-cropped.  For each image the top-k distinct
cells of the strategy's pool (beams or samples) are printed with their centre,
probability (normalized over the pool's distinct cells), S2 cell token (the hex
form s2geometry's ToToken() gives) and GeoToken token sequence; --geojson writes
the cells as polygons with those properties.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from geotoken_jax import s2, sharding
from geotoken_jax.decoding import strategies


def load_config(workdir: str, config_path: str | None = None) -> ml_collections.ConfigDict:
  """The training config: --config FILE[:ARG] or WORKDIR/config.json (or results.json)."""
  if config_path:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    path, _, arg = config_path.partition(":")
    module = config_flags.config_flags._LoadConfigModule("config", path)  # pylint: disable=protected-access
    return module.get_config(arg) if arg else module.get_config()
  for name, key in (("config.json", None), ("results.json", "config")):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        loaded = json.load(f)
      return ml_collections.ConfigDict(loaded[key] if key else loaded)
  raise FileNotFoundError(f"{workdir} has no config.json (written by geotoken_jax.train); pass --config")


def s2_cell_token(cell_id: int) -> str:
  """s2geometry's S2CellId.ToToken(): hex digits, trailing zeros removed."""
  return f"{int(cell_id):016x}".rstrip("0") or "X"


def load_image(path: str, size: int) -> np.ndarray:
  """RGB uint8 [size, size, 3]: shorter side resized to `size`, centre crop."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      scale = size / min(image.size)
      resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None
  left = (resized.width - size) // 2
  top = (resized.height - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)


def predict(config, workdir: str, images: np.ndarray, *, strategy_text: str = "beam:5", top_k: int = 5,
            step: int | None = None, seed: int = 0) -> tuple[list[list[dict]], int]:
  """images uint8 [N, S, S, 3] -> per image its top-k candidates (dicts), and the checkpoint step."""
  from geotoken_jax import evaluate  # pylint: disable=g-import-not-at-top

  spec = s2.TokenSpec(config.tokens.level, config.tokens.group_size)
  strategy = strategies.parse_strategy(strategy_text).check(spec)
  mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  config = ml_collections.ConfigDict(config.to_dict())
  graphdef, params, _, step = evaluate.load_params(config, workdir, spec, mesh, step)
  tries = evaluate.build_tries(config, spec, [strategy])
  trie = tries.get((strategy.trie_min_count, strategy.trie_positions(spec))) if tries else None
  fn = jax.jit(evaluate.make_decode_fn(graphdef, spec, strategy.pool_key, [strategy.rule], top_k, seed, trie))
  out = fn(params, {"image": jnp.asarray(images), "index": jnp.arange(len(images), dtype=jnp.int32)})
  out = jax.tree.map(np.asarray, out[strategy.rule])
  results = []
  for i in range(len(images)):
    keep = out["candidate_prob"][i] > 0
    tokens = out["candidate_tokens"][i][keep]
    ids = s2.tokens_to_cell_ids(tokens, spec)
    vertices = s2.tokens_to_vertices(tokens, spec)  # [k, 4, 2]
    results.append([{
        "rank": r + 1, "lat": float(out["candidate_latlng"][i, j, 0]), "lon": float(out["candidate_latlng"][i, j, 1]),
        "probability": float(out["candidate_prob"][i, j]), "s2_token": s2_cell_token(ids[r]),
        "tokens": "-".join(str(int(t)) for t in tokens[r]), "level": spec.level,
        "vertices": vertices[r].tolist()} for r, j in enumerate(np.flatnonzero(keep))])
  return results, step


def geojson(paths: list[str], results: list[list[dict]]) -> dict:
  """A FeatureCollection with one cell polygon per candidate ([lon, lat] rings, closed)."""
  features = []
  for path, candidates in zip(paths, results):
    for c in candidates:
      ring = [[lon, lat] for lat, lon in c["vertices"]]
      lons = [p[0] for p in ring]
      if max(lons) - min(lons) > 180:  # a cell astride the antimeridian: keep the ring contiguous
        ring = [[lon + 360 if lon < 0 else lon, lat] for lon, lat in ring]
      ring.append(ring[0])
      properties = {k: v for k, v in c.items() if k != "vertices"}
      features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"image": path, **properties}})
  return {"type": "FeatureCollection", "features": features}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m geotoken_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("images", nargs="+", help="image files")
  parser.add_argument("--workdir", required=True, help="the training workdir (checkpoints, config.json)")
  parser.add_argument("--config", default=None, help="configs/NAME.py[:ARG] instead of WORKDIR/config.json")
  parser.add_argument("--strategy", default="beam:5", help="e.g. beam:5, greedy, sample:30:0.7:medoid")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--geojson", default=None, help="write the candidate cells as GeoJSON here")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
  if args.top_k < 1:
    parser.error("--top_k must be >= 1")
  config = load_config(args.workdir, args.config)
  if config.model.encoder != "vit":
    parser.error(f"this model's encoder is {config.model.encoder!r}: predict takes images, so it needs "
                 "a ViT model (the feature encoder needs precomputed CLIP features and neighbours)")
  size = int(config.model.vit.image_size)
  try:
    images = np.stack([load_image(p, size) for p in args.images])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results, step = predict(config, args.workdir, images, strategy_text=args.strategy, top_k=args.top_k,
                          step=args.step, seed=args.seed)
  print(f"checkpoint step {step}, strategy {args.strategy}")
  for path, candidates in zip(args.images, results):
    print(path)
    for c in candidates:
      print(f"  {c['rank']}. lat {c['lat']:9.4f}  lon {c['lon']:10.4f}  p {c['probability']:.3f}  "
            f"s2 {c['s2_token']}  tokens {c['tokens']}")
  if args.geojson:
    with open(args.geojson, "w") as f:
      json.dump(geojson(args.images, results), f)
    print(f"wrote {args.geojson}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
