"""Precompute S2 token sequences for a CSV of photo coordinates.

  python -m geotoken_jax.tokenize --input coords.csv --output tokens.npy \
      --level 20 --group 2

Reads IMG_ID, LAT, LON (names overridable), writes an integer array
[rows, positions] in CSV row order (the smallest unsigned dtype that holds the
vocabulary: uint8 up to g = 4), and prints one JSON line.  Any row with a
missing, unparsable, NaN or out-of-range coordinate stops the run with an error
that names the offending IMG_IDs: nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

import numpy as np

from geotoken_jax import s2


class CsvError(ValueError):
  pass


def read_coordinates(path: str, id_column: str = "IMG_ID", lat_column: str = "LAT",
                     lon_column: str = "LON", delimiter: str = ","):
  """Reads (ids, lat, lon) from a CSV; raises CsvError naming bad rows."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
      raise CsvError(f"{path}: empty file (expected a header with {id_column}, {lat_column}, {lon_column})")
    header = [name.strip().lstrip("\ufeff") for name in header]
    missing = [c for c in (id_column, lat_column, lon_column) if c not in header]
    if missing:
      raise CsvError(f"{path}: column(s) {missing} not in header {header}")
    columns = [header.index(c) for c in (id_column, lat_column, lon_column)]
    width = max(columns) + 1
    ids, lat_text, lon_text, short_lines = [], [], [], []
    for row in reader:
      if not row:  # a blank line is not a record
        continue
      if len(row) < width:
        short_lines.append(reader.line_num)
        continue
      ids.append(row[columns[0]])
      lat_text.append(row[columns[1]])
      lon_text.append(row[columns[2]])
  if short_lines:
    raise CsvError(f"{path}: {len(short_lines)} row(s) with fewer than {width} fields, "
                   f"at lines {short_lines[:10]}")
  if not ids:
    raise CsvError(f"{path}: no data rows after the header")
  lat = _parse_floats(lat_text, ids, lat_column, path)
  lon = _parse_floats(lon_text, ids, lon_column, path)
  return ids, lat, lon


def _parse_floats(texts: list[str], ids: list[str], column: str, path: str) -> np.ndarray:
  try:
    return np.array(texts, dtype=np.float64)
  except ValueError:
    pass
  # Slow path, only to name the offenders.
  bad = []
  for row_id, text in zip(ids, texts):
    try:
      float(text)
    except ValueError:
      bad.append(f"{row_id} ({text!r})")
  raise CsvError(f"{path}: {len(bad)} row(s) with an unparsable {column}: {', '.join(bad[:10])}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="CSV with an id, a latitude and a longitude column")
  parser.add_argument("--output", required=True, help="where to write the [rows, positions] .npy array")
  parser.add_argument("--level", type=int, default=20, help="S2 level (0-30)")
  parser.add_argument("--group", type=int, default=2, help="child digits per token (must divide --level)")
  parser.add_argument("--id_column", default="IMG_ID")
  parser.add_argument("--lat_column", default="LAT")
  parser.add_argument("--lon_column", default="LON")
  parser.add_argument("--delimiter", default=",")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  try:
    spec = s2.TokenSpec(level=args.level, group_size=args.group)
    ids, lat, lon = read_coordinates(args.input, args.id_column, args.lat_column, args.lon_column,
                                     args.delimiter)
    tokens = s2.latlng_to_tokens(lat, lon, spec, ids=ids)
  except (ValueError, OSError) as e:
    print(f"tokenize: error: {e}", file=sys.stderr)
    return 2
  np.save(args.output, tokens.astype(spec.token_dtype))
  print(json.dumps({
      "rows": int(tokens.shape[0]),
      "positions": spec.num_positions,
      "seconds": round(time.perf_counter() - start, 4),
      "level": spec.level,
      "group": spec.group_size,
      "vocab_sizes": list(spec.vocab_sizes),
      "dtype": str(spec.token_dtype),
      "output": args.output,
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main())
