"""S2 cells as token sequences: the cube face, then grouped Hilbert child digits.

A location at level L with group size g is 1 + L/g tokens:
  token 0        the cube face, vocab 6;
  token m (>=1)  the child positions (S2CellId::child_position) of levels
                 (m-1)g+1 .. mg, most significant first, as one base-4 number
                 with vocab 4^g.
Because child positions are the Hilbert-curve digits of the cell id, token m is
literally a 2g-bit field of the id: no geometry is needed in either direction.

A prefix of p tokens names the enclosing cell at level (p-1)g, so decoding can
stop after any position and still return a location.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from geotoken_jax.s2 import cells

_POS_BITS = 2 * cells.MAX_LEVEL + 1  # 61


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """Level and digit grouping of a token sequence (hashable: a static jit arg)."""

  level: int = 20
  group_size: int = 2

  def __post_init__(self):
    for name in ("level", "group_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"TokenSpec.{name} must be an int, got {value!r}")
    if not 0 <= self.level <= cells.MAX_LEVEL:
      raise ValueError(f"TokenSpec.level must be in [0, {cells.MAX_LEVEL}], got {self.level}")
    if self.group_size < 1:
      raise ValueError(f"TokenSpec.group_size must be >= 1, got {self.group_size}")
    if self.level % self.group_size:
      raise ValueError(f"TokenSpec.level ({self.level}) must be divisible by group_size "
                       f"({self.group_size}): each token holds group_size whole levels")

  @property
  def num_positions(self) -> int:
    return 1 + self.level // self.group_size

  @property
  def digit_vocab_size(self) -> int:
    return 4**self.group_size

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    """Per-position vocabulary: (6, 4^g, ..., 4^g)."""
    return (cells.NUM_FACES,) + (self.digit_vocab_size,) * (self.num_positions - 1)

  @property
  def max_vocab_size(self) -> int:
    return max(self.vocab_sizes)

  def level_of_prefix(self, num_tokens: int) -> int:
    """The S2 level named by the first `num_tokens` tokens."""
    if not 1 <= num_tokens <= self.num_positions:
      raise ValueError(f"a prefix has 1..{self.num_positions} tokens, got {num_tokens}")
    return (num_tokens - 1) * self.group_size

  @property
  def array_dtype(self) -> np.dtype:
    """int32 (what JAX uses) unless a token can exceed it (group_size > 15)."""
    return np.dtype(np.int32 if self.max_vocab_size <= 2**31 else np.int64)

  @property
  def token_dtype(self) -> np.dtype:
    """The smallest unsigned integer type that holds every token (for storage)."""
    return np.min_scalar_type(self.max_vocab_size - 1)


def _token_shifts(spec: TokenSpec, num_tokens: int) -> np.ndarray:
  """Bit offset of each grouped-digit token m = 1..num_tokens-1 inside a cell id."""
  m = np.arange(1, num_tokens)
  return (_POS_BITS - 2 * spec.group_size * m).astype(np.uint64)


def cell_ids_to_tokens(ids, spec: TokenSpec) -> np.ndarray:
  """Cell ids (any level >= spec.level) -> tokens [..., spec.num_positions].

  The array is int32 (int64 only when group_size > 15 makes the vocab exceed it).
  """
  ids = cells.cell_ids_parent(cells.check_cell_ids(ids), spec.level)
  return _tokens_of_valid_ids(ids, spec)


def _tokens_of_valid_ids(ids: np.ndarray, spec: TokenSpec) -> np.ndarray:
  """cell_ids_to_tokens for ids already checked and at exactly spec.level."""
  tokens = np.empty(ids.shape + (spec.num_positions,), spec.array_dtype)
  tokens[..., 0] = cells.cell_ids_face(ids)
  digit_mask = np.uint64(spec.digit_vocab_size - 1)
  tokens[..., 1:] = (ids[..., None] >> _token_shifts(spec, spec.num_positions)) & digit_mask
  return tokens


def check_tokens(tokens, spec: TokenSpec) -> np.ndarray:
  """Returns tokens as int64 after checking the length and per-position range."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
  if tokens.ndim < 1 or not 1 <= tokens.shape[-1] <= spec.num_positions:
    raise ValueError(f"tokens need a last axis of 1..{spec.num_positions} positions for {spec}, "
                     f"got shape {tokens.shape}")
  tokens = tokens.astype(np.int64)
  vocab = np.asarray(spec.vocab_sizes[:tokens.shape[-1]])
  bad = (tokens < 0) | (tokens >= vocab)
  if bad.any():
    rows = np.unique(np.nonzero(bad.reshape(-1, tokens.shape[-1]))[0])
    raise ValueError(f"{rows.size} token sequence(s) hold values outside the per-position vocab "
                     f"{spec.vocab_sizes[:tokens.shape[-1]]}: rows {rows[:10].tolist()}")
  return tokens


def tokens_to_cell_ids(tokens, spec: TokenSpec) -> np.ndarray:
  """Tokens [..., p] (a full sequence or a prefix) -> cell ids at level (p-1)g."""
  tokens = check_tokens(tokens, spec)
  num_tokens = tokens.shape[-1]
  level = spec.level_of_prefix(num_tokens)
  ids = tokens[..., 0].astype(np.uint64) << np.uint64(_POS_BITS)
  digits = tokens[..., 1:].astype(np.uint64) << _token_shifts(spec, num_tokens)
  ids |= np.bitwise_or.reduce(digits, axis=-1)
  return ids | cells.lsb_for_level(level)


def latlng_to_tokens(lat, lng, spec: TokenSpec, ids=None, num_threads: int | None = None) -> np.ndarray:
  """Latitude / longitude in degrees -> tokens [..., spec.num_positions]."""
  cell_ids = cells.latlng_to_cell_ids(lat, lng, spec.level, ids=ids, num_threads=num_threads)
  return _tokens_of_valid_ids(cell_ids, spec)


def tokens_to_latlng(tokens, spec: TokenSpec) -> np.ndarray:
  """Tokens (full or prefix) -> cell centres [..., 2] as float64 (lat, lon) degrees."""
  lat, lng = cells.cell_centers(tokens_to_cell_ids(tokens, spec))
  return np.stack([lat, lng], axis=-1)


def tokens_to_vertices(tokens, spec: TokenSpec) -> np.ndarray:
  """Tokens (full or prefix) -> cell vertices [..., 4, 2] (lat, lon) degrees."""
  return cells.cell_vertices(tokens_to_cell_ids(tokens, spec))
