"""Vectorized S2 cell geometry in NumPy, bit-exact with the C++ S2 library.

Every function here works on whole arrays: there is no Python loop over points.
The arithmetic follows s2geometry (C++, 0.14) operation by operation -- same
formulas, same evaluation order, the quadratic projection, the same Hilbert
lookup tables -- so that cell ids agree bit for bit with `S2CellId(S2LatLng)`.
The only transcendental functions on the encode path are sin and cos, which
NumPy evaluates exactly as the C library does on the platforms we test.

Conventions:
  * latitude / longitude are float64 degrees; cell ids are uint64.
  * "level" is 0 (a cube face) to 30 (a leaf, about 1 cm).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

MAX_LEVEL = 30
NUM_FACES = 6
_POS_BITS = 2 * MAX_LEVEL + 1  # 61
_LIMIT_IJ = 1 << MAX_LEVEL
_MAX_SITI = 1 << (MAX_LEVEL + 1)
# S2 itself decodes 4 levels per table step; we use 8 (the same map applied two
# blocks at a time), which halves the number of gathers per point.
_LOOKUP_BITS = 8
_SWAP_MASK = 1
_INVERT_MASK = 2

# Hilbert curve tables (s2coords.h).  POS_TO_IJ[orientation][pos] is the (i, j)
# quadrant (as 2*i_bit + j_bit) of child `pos`; POS_TO_ORIENTATION[pos] is how
# the child's orientation differs from its parent's.
POS_TO_IJ = np.array([[0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 0, 1], [3, 1, 0, 2]], np.int64)
POS_TO_ORIENTATION = np.array([_SWAP_MASK, 0, 0, _INVERT_MASK | _SWAP_MASK], np.int64)


def _build_lookup_tables(lookup_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """The Hilbert lookup tables of s2cell_id.cc for blocks of 2^b x 2^b cells.

  LOOKUP_POS[(i << (b + 2)) + (j << 2) + orientation] = (pos << 2) + new_orientation
  LOOKUP_IJ[(pos << 2) + orientation] = (i << (b + 2)) + (j << 2) + new_orientation
  """
  size = 1 << (2 * lookup_bits + 2)
  lookup_pos = np.full(size, -1, np.int32)
  lookup_ij = np.full(size, -1, np.int32)
  for orig in range(4):
    # Breadth-first over the levels of the block: (i, j, pos, orientation) per cell.
    i = np.zeros(1, np.int64)
    j = np.zeros(1, np.int64)
    pos = np.zeros(1, np.int64)
    orientation = np.full(1, orig, np.int64)
    for _ in range(lookup_bits):
      child = np.arange(4)[None, :]
      r = POS_TO_IJ[orientation[:, None], child]
      i = ((i[:, None] << 1) + (r >> 1)).ravel()
      j = ((j[:, None] << 1) + (r & 1)).ravel()
      pos = ((pos[:, None] << 2) + child).ravel()
      orientation = (orientation[:, None] ^ POS_TO_ORIENTATION[child]).ravel()
    ij = (i << lookup_bits) + j
    lookup_pos[(ij << 2) + orig] = (pos << 2) + orientation
    lookup_ij[(pos << 2) + orig] = (ij << 2) + orientation
  assert (lookup_pos >= 0).all() and (lookup_ij >= 0).all()
  return lookup_pos, lookup_ij


LOOKUP_POS, LOOKUP_IJ = _build_lookup_tables(_LOOKUP_BITS)


# ----------------------------------------------------------------------------
# Input validation.


def _offending_rows_message(what: str, rows: np.ndarray, lat, lng, ids=None) -> str:
  shown = rows[:10]
  labels = [str(ids[r]) if ids is not None else str(int(r)) for r in shown]
  pairs = ", ".join(f"{label} (lat={float(lat[r])}, lon={float(lng[r])})" for label, r in zip(labels, shown))
  more = f" and {rows.size - shown.size} more" if rows.size > shown.size else ""
  return f"{rows.size} row(s) with {what}: {pairs}{more}"


def validate_latlng(lat, lng, ids=None) -> tuple[np.ndarray, np.ndarray]:
  """Checks coordinates and returns them as float64 arrays of one shape.

  Raises ValueError naming the offending rows (by index, or by `ids[row]` when
  ids are given) for NaN / infinite values and |lat| > 90.
  """
  lat = np.asarray(lat, np.float64)
  lng = np.asarray(lng, np.float64)
  if lat.shape != lng.shape:
    raise ValueError(f"latitude shape {lat.shape} != longitude shape {lng.shape}")
  flat_lat, flat_lng = lat.ravel(), lng.ravel()
  problems = []
  bad = np.flatnonzero(~np.isfinite(flat_lat) | ~np.isfinite(flat_lng))
  if bad.size:
    problems.append(_offending_rows_message("NaN or infinite coordinates", bad, flat_lat, flat_lng, ids))
  with np.errstate(invalid="ignore"):
    out_of_range = np.flatnonzero(np.abs(flat_lat) > 90.0)
  if out_of_range.size:
    problems.append(_offending_rows_message("|latitude| > 90", out_of_range, flat_lat, flat_lng, ids))
  if problems:
    raise ValueError("invalid coordinates: " + "; ".join(problems))
  return lat, lng


def normalize_longitude(lng) -> np.ndarray:
  """Maps longitudes outside [-180, 180] into that range (190 -> -170).

  Values already inside [-180, 180] are returned unchanged, so that +180 and
  -180 stay distinct (S2 puts them in different leaf cells).
  """
  lng = np.asarray(lng, np.float64)
  outside = np.abs(lng) > 180.0
  if not outside.any():
    return lng
  wrapped = lng - 360.0 * np.floor((lng + 180.0) / 360.0)
  return np.where(outside, wrapped, lng)


# ----------------------------------------------------------------------------
# Coordinate transforms (s2coords.h), all elementwise on float64 arrays.


def st_to_uv(s: np.ndarray) -> np.ndarray:
  """S2::STtoUV, the inverse of uv_to_st."""
  return np.where(s >= 0.5, (1 / 3.0) * (4 * s * s - 1), (1 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


def face_uv_to_xyz(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """S2::FaceUVtoXYZ (not unit length); returns [..., 3]."""
  one = np.ones_like(u)
  x = np.choose(face, [one, -u, -u, -one, v, v])
  y = np.choose(face, [u, one, -v, -v, -one, u])
  z = np.choose(face, [v, v, one, -u, -u, -one])
  return np.stack([x, y, z], axis=-1)


def normalize_xyz(xyz: np.ndarray) -> np.ndarray:
  """Vector3::Normalize: multiply by the reciprocal of the norm."""
  x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
  norm = np.sqrt(x * x + y * y + z * z)
  return xyz * (1.0 / norm)[..., None]


def xyz_to_latlng(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """S2LatLng(point) in degrees; the point need not be unit length."""
  x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
  # S2LatLng::Latitude / Longitude add 0.0 to turn -0 into +0 (face 3's
  # centre is at longitude +180, not -180).
  lat = np.arctan2(z + 0.0, np.sqrt(x * x + y * y))
  lng = np.arctan2(y + 0.0, x + 0.0)
  return (180.0 / np.pi) * lat, (180.0 / np.pi) * lng


# ----------------------------------------------------------------------------
# Cell ids.


def lsb_for_level(level: int) -> np.uint64:
  return np.uint64(1) << np.uint64(2 * (MAX_LEVEL - level))


def _check_level(level: int) -> int:
  if not isinstance(level, (int, np.integer)) or not 0 <= level <= MAX_LEVEL:
    raise ValueError(f"S2 level must be an integer in [0, {MAX_LEVEL}], got {level!r}")
  return int(level)


def cell_ids_parent(ids: np.ndarray, level: int) -> np.ndarray:
  """S2CellId::parent(level) for ids at `level` or finer."""
  level = _check_level(level)
  ids = np.asarray(ids, np.uint64)
  new_lsb = lsb_for_level(level)
  too_coarse = cell_ids_level(ids) < level
  if too_coarse.any():
    rows = np.flatnonzero(too_coarse.ravel())[:10].tolist()
    raise ValueError(f"{too_coarse.sum()} cell id(s) are coarser than level {level} (rows {rows})")
  return (ids & (~new_lsb + np.uint64(1))) | new_lsb


def _encode_block(lat: np.ndarray, lng: np.ndarray, level: int, out: np.ndarray) -> None:
  """Leaf cell ids of one block of validated points, truncated to `level`.

  S2CellId(S2LatLng::FromDegrees(lat, lng)) step by step: ToPoint, XYZtoFaceUV,
  UVtoST, STtoIJ, FromFaceIJ, then parent(level).  Kept in one function so the
  temporaries of a block stay in cache.
  """
  # S2LatLng::ToPoint (S1Angle::Degrees multiplies by M_PI / 180).
  phi = lat * (np.pi / 180.0)
  theta = lng * (np.pi / 180.0)
  cosphi = np.cos(phi)
  x = np.cos(theta)
  x *= cosphi
  y = np.sin(theta)
  y *= cosphi
  z = np.sin(phi)
  # GetFace: Vector3::LargestAbsComponent with its exact tie-breaking, then the sign.
  ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
  x_gt_y = ax > ay
  on_x = x_gt_y & (ax > az)
  on_y = ~x_gt_y & (ay > az)
  component = np.where(on_x, x, np.where(on_y, y, z))
  face = (2 - 2 * on_x.astype(np.int8) - on_y) + 3 * (component < 0)
  # ValidFaceXYZtoUV; the numerator is selected up to sign (negation is exact).
  u_num = np.choose(face, [y, -x, -x, z, z, -y])
  v_num = np.choose(face, [z, z, -y, y, -x, -x])
  ij = []
  for num in (u_num, v_num):
    uv = num / component
    # UVtoST: for u < 0, 1 - 3u == 1 + 3|u| exactly, so one sqrt serves both branches.
    half_root = 0.5 * np.sqrt(1 + 3 * np.abs(uv))
    st = np.where(uv >= 0, half_root, 1 - half_root)
    # STtoIJ: floor, then clamp to [0, 2^30 - 1] (st >= 0, so truncation is floor).
    coord = (_LIMIT_IJ * st).astype(np.int32)
    np.minimum(coord, _LIMIT_IJ - 1, out=coord)
    ij.append(coord)
  i, j = ij
  # FromFaceIJ, skipping the table steps that only reach below `level`.
  n = face.astype(np.int64) << (_POS_BITS - 1)
  bits = (face & _SWAP_MASK).astype(np.int32)
  mask = (1 << _LOOKUP_BITS) - 1
  for k in range(MAX_LEVEL // _LOOKUP_BITS, (MAX_LEVEL - level) // _LOOKUP_BITS - 1, -1):
    shift = k * _LOOKUP_BITS
    bits += (((i >> shift) & mask) << (_LOOKUP_BITS + 2)) + (((j >> shift) & mask) << 2)
    bits = LOOKUP_POS[bits]
    n |= (bits >> 2).astype(np.int64) << (2 * shift)
    bits &= _SWAP_MASK | _INVERT_MASK
  # parent(level): n * 2 + 1 is the leaf id; keep the bits above the new lsb.
  new_lsb = lsb_for_level(level)
  np.bitwise_or(n.view(np.uint64) * np.uint64(2) & (~new_lsb + np.uint64(1)), new_lsb, out=out)


_BLOCK = 1 << 15  # points per block: a block's temporaries fit in L2.


def latlng_to_cell_ids(lat, lng, level: int = MAX_LEVEL, ids=None,
                       num_threads: int | None = None) -> np.ndarray:
  """S2CellId(S2LatLng::FromDegrees(lat, lng)).parent(level), vectorized.

  Longitudes outside [-180, 180] are normalized first (190 -> -170).
  NaN / infinite values or |lat| > 90 raise a ValueError naming the rows
  (by `ids[row]` when `ids` is given).  Blocks of points run on
  `num_threads` threads (default: all cores); NumPy releases the GIL.
  """
  level = _check_level(level)
  lat, lng = validate_latlng(lat, lng, ids)
  shape = lat.shape
  lat = np.ascontiguousarray(lat.ravel())
  lng = np.ascontiguousarray(normalize_longitude(lng).ravel())
  out = np.empty(lat.size, np.uint64)
  starts = range(0, lat.size, _BLOCK)

  def encode(start: int) -> None:
    stop = start + _BLOCK
    _encode_block(lat[start:stop], lng[start:stop], level, out[start:stop])

  num_threads = min(num_threads or os.cpu_count() or 1, len(starts))
  if num_threads <= 1:
    for start in starts:
      encode(start)
  else:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      list(pool.map(encode, starts))
  return out.reshape(shape)


def cell_ids_face(ids: np.ndarray) -> np.ndarray:
  return (np.asarray(ids, np.uint64) >> np.uint64(_POS_BITS)).astype(np.int64)


def _lsb(ids: np.ndarray) -> np.ndarray:
  return ids & (~ids + np.uint64(1))


def cell_ids_level(ids: np.ndarray) -> np.ndarray:
  """S2CellId::level(); requires ids with a nonzero lowest set bit."""
  ids = np.asarray(ids, np.uint64)
  # The lowest set bit is an exact power of two, so its float64 log2 is exact.
  with np.errstate(divide="ignore"):
    trailing_zeros = np.log2(_lsb(ids).astype(np.float64)).astype(np.int64)
  return MAX_LEVEL - (trailing_zeros >> 1)


def cell_ids_are_valid(ids: np.ndarray) -> np.ndarray:
  """S2CellId::is_valid(): face < 6 and the lowest set bit at an even position."""
  ids = np.asarray(ids, np.uint64)
  return (cell_ids_face(ids) < NUM_FACES) & ((_lsb(ids) & np.uint64(0x1555555555555555)) != 0)


def check_cell_ids(ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.dtype != np.uint64:
    if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
      raise ValueError(f"cell ids must be non-negative integers (uint64), got dtype {ids.dtype}")
    ids = ids.astype(np.uint64)
  invalid = ~cell_ids_are_valid(ids)
  if invalid.any():
    rows = np.flatnonzero(invalid.ravel())
    raise ValueError(f"{rows.size} invalid S2 cell id(s) at rows {rows[:10].tolist()}: "
                     f"{ids.ravel()[rows[:10]].tolist()}")
  return ids


def child_positions(ids: np.ndarray, level: int) -> np.ndarray:
  """Digits [..., level]: S2CellId::child_position(k) for k = 1..level."""
  level = _check_level(level)
  ids = np.asarray(ids, np.uint64)
  shifts = (_POS_BITS - 2 * np.arange(1, level + 1)).astype(np.uint64)
  return ((ids[..., None] >> shifts) & np.uint64(3)).astype(np.int64)


def cell_ids_to_face_ij_orientation(ids: np.ndarray):
  """S2CellId::ToFaceIJOrientation: (face, i, j, orientation) arrays."""
  ids = np.asarray(ids, np.uint64)
  face = cell_ids_face(ids)
  bits = face & _SWAP_MASK
  i = np.zeros(ids.shape, np.int64)
  j = np.zeros(ids.shape, np.int64)
  top = MAX_LEVEL // _LOOKUP_BITS
  for k in range(top, -1, -1):
    nbits = MAX_LEVEL - top * _LOOKUP_BITS if k == top else _LOOKUP_BITS
    chunk = (ids >> np.uint64(k * 2 * _LOOKUP_BITS + 1)) & np.uint64((1 << (2 * nbits)) - 1)
    bits = LOOKUP_IJ[bits + (chunk.astype(np.int64) << 2)].astype(np.int64)
    i += (bits >> (_LOOKUP_BITS + 2)) << (k * _LOOKUP_BITS)
    j += ((bits >> 2) & ((1 << _LOOKUP_BITS) - 1)) << (k * _LOOKUP_BITS)
    bits &= _SWAP_MASK | _INVERT_MASK
  # Below a non-leaf cell the decode walked its sentinel digit (2) and then
  # zero digits, each of which swaps the orientation; an odd count of them
  # (lsb at a bit index divisible by 4) is undone here, as in s2cell_id.cc.
  odd = (_lsb(ids) & np.uint64(0x1111111111111110)) != 0
  orientation = bits ^ odd.astype(np.int64)
  return face, i, j, orientation


def cell_centers(ids) -> tuple[np.ndarray, np.ndarray]:
  """S2CellId::ToLatLng() in degrees: the centre of each cell (float64)."""
  ids = check_cell_ids(ids)
  face, i, j, _ = cell_ids_to_face_ij_orientation(ids)
  # GetCenterSiTi: offset the decoded leaf to the cell centre in (si, ti).
  is_leaf = (ids & np.uint64(1)) != 0
  odd_bit = ((i ^ (ids >> np.uint64(2)).astype(np.int64)) & 1) != 0
  delta = np.where(is_leaf, 1, np.where(odd_bit, 2, 0))
  si = 2 * i + delta
  ti = 2 * j + delta
  u = st_to_uv((1.0 / _MAX_SITI) * si)
  v = st_to_uv((1.0 / _MAX_SITI) * ti)
  return xyz_to_latlng(face_uv_to_xyz(face, u, v))


def cell_vertices_xyz(ids) -> np.ndarray:
  """S2Cell(id).GetVertex(k) for k = 0..3: unit vectors [..., 4, 3].

  Vertices run counter-clockwise: (u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi),
  (u_lo, v_hi), as in S2Cell.
  """
  ids = check_cell_ids(ids)
  face, i, j, _ = cell_ids_to_face_ij_orientation(ids)
  cell_size = np.int64(1) << (MAX_LEVEL - cell_ids_level(ids))
  bounds = []
  for ij in (i, j):  # S2CellId::IJLevelToBoundUV
    lo = ij & -cell_size
    bounds.append((st_to_uv((1.0 / _LIMIT_IJ) * lo), st_to_uv((1.0 / _LIMIT_IJ) * (lo + cell_size))))
  (u_lo, u_hi), (v_lo, v_hi) = bounds
  u = np.stack([u_lo, u_hi, u_hi, u_lo], axis=-1)
  v = np.stack([v_lo, v_lo, v_hi, v_hi], axis=-1)
  return normalize_xyz(face_uv_to_xyz(face[..., None], u, v))


def cell_vertices(ids) -> np.ndarray:
  """The four vertices of each cell as [..., 4, 2] (lat, lon) degrees."""
  lat, lng = xyz_to_latlng(cell_vertices_xyz(ids))
  return np.stack([lat, lng], axis=-1)
