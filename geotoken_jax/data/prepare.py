"""Prepare a geolocalization data set (TFDS builder -> ArrayRecord) and report what was kept.

  python -m geotoken_jax.data.prepare --dataset im2gps3k --manual_dir ~/data/im2gps3k \
      --data_dir ~/tensorflow_datasets [--swap_latlon] [--workers N] [--max_side 512]
  python -m geotoken_jax.data.prepare --dataset geo_csv --manual_dir DIR --data_dir OUT \
      --csv test=photos.csv --image_dir photos --id_column name --lat_column lat --lon_column lng

The last line printed is a JSON summary per split: rows read, written, rejected
{missing_image, undecodable_image, bad_coordinates, duplicate_id} with the first
offending ids; it is also written next to the data
(DATA_DIR/NAME/VERSION/prepare_summary_SPLIT.json), where the evaluation job
finds the number of rejected images.  Beside it, index_SPLIT.npz holds every
record's tokens, coordinates, id hash and Flickr photo id in record order (for
the decoding trie, holdout slices and the leak filter, without reading the
records); running prepare again on data prepared before sidecars existed adds
them.  See geotoken_jax.data.tfds_builders.
"""

from __future__ import annotations

import argparse
import json
import sys

from geotoken_jax.data import tfds_builders


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m geotoken_jax.data.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=sorted(tfds_builders.BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="the downloaded files")
  parser.add_argument("--data_dir", required=True, help="where TFDS writes the prepared data")
  parser.add_argument("--swap_latlon", action="store_true",
                      help="the CSV's latitude and longitude headers are swapped (old Im2GPS3k copies)")
  parser.add_argument("--workers", type=int, default=0, help="processes reading images (0 = all cores)")
  parser.add_argument("--max_side", type=int, default=0, help="downscale images larger than this (0 = keep)")
  parser.add_argument("--level", type=int, default=20, help="S2 level of the stored tokens")
  parser.add_argument("--group_size", type=int, default=2, help="S2 digits per token")
  parser.add_argument("--csv", action="append", default=[], metavar="SPLIT=FILE",
                      help="metadata file of a split, relative to manual_dir (repeatable)")
  parser.add_argument("--image_dir", default=None, help="image folder (or .tar for mp16) in manual_dir")
  parser.add_argument("--id_column", default=None)
  parser.add_argument("--lat_column", default=None)
  parser.add_argument("--lon_column", default=None)
  parser.add_argument("--country_column", default=None, help="a column of ISO-2 country codes")
  args = parser.parse_args(argv)
  csv_files = {}
  for item in args.csv:
    split, sep, name = item.partition("=")
    if not sep or not split or not name:
      parser.error(f"--csv takes SPLIT=FILE, got {item!r}")
    csv_files[split] = name
  try:
    summaries = tfds_builders.prepare(
        args.dataset, args.manual_dir, args.data_dir, swap_latlon=args.swap_latlon,
        workers=args.workers or None, max_side=args.max_side, level=args.level,
        group_size=args.group_size, csv_files=csv_files, image_dir=args.image_dir,
        id_column=args.id_column, lat_column=args.lat_column, lon_column=args.lon_column,
        country_column=args.country_column)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summaries))
  return 0


if __name__ == "__main__":
  sys.exit(main())
