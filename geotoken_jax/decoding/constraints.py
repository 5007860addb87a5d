"""Constrained decoding: a trie of the S2 cells that hold training data.

Decoding may wander into cells where no training photo was ever taken (open
ocean, ice).  `CellTrie` masks the logits so that decoding only enters cells
that contain at least `min_count` training examples: a prefix of length p + 1
(a cell at level `spec.level_of_prefix(p + 1)`) is allowed when it is an
ancestor-or-self of a cell at the trie's deepest constrained level that holds
>= min_count examples.  Counts only grow towards the root, so every allowed
prefix itself holds >= min_count examples, and every allowed prefix has an
allowed continuation (no dead ends).  Below `num_constrained` positions the
decoder is free, so a coarse constraint (say level 10) can steer a level-20
decoder without memorizing the training coordinates.

Representation (fits jit, gathers only): node 0 is the root (empty prefix);
`children[node, token]` is the node of prefix + token, or -1 if that cell has
too few examples.  Each decoding row carries its node id; nodes of the last
constrained position have no row (nothing below them is constrained).

A trie is a pytree: `children` is its only leaf and everything else is static
Python (computed at build time), so it is passed to jitted functions as an
ARGUMENT and nothing needs its concrete values under tracing.  Closing over a
trie instead would bake `children` into the compiled program as a constant
(MP16's trie would put ~1 GB into every compile).  Tries differing in their
static fields compile separately.

`cached_cell_trie` builds a trie from a token array once and keeps it on disk
as an .npz (no pickle), keyed by the tokens' content and the build options.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import struct

from geotoken_jax import runtime, s2

MASKED_LOGIT = -1e9  # the model's value for ids outside a position's vocabulary
ALLOWED_LOGIT = MASKED_LOGIT / 2  # logits above this are real, allowed ids

_CACHE_FORMAT = 1  # bump when the stored layout or the build changes


@struct.dataclass
class CellTrie:
  children: jax.Array  # [nodes, max_vocab] int32, -1 = not allowed (the only pytree leaf)
  num_constrained: int = struct.field(pytree_node=False)  # positions 0 .. num_constrained-1
  # How many distinct full token sequences (spec.num_positions long) the trie
  # allows: allowed constrained prefixes x the product of the vocabulary sizes
  # of the unconstrained positions.  A Python int (may be huge); static.
  num_sequences: int = struct.field(pytree_node=False)

  @property
  def num_nodes(self) -> int:
    return int(self.children.shape[0])  # a shape: fine under tracing

  def initial_state(self, rows: int) -> jax.Array:
    """Every row starts at the root: node ids [rows] int32."""
    return jnp.zeros((rows,), jnp.int32)

  def mask_logits(self, logits: jax.Array, node: jax.Array, position) -> jax.Array:
    """logits [rows, vocab]: ids leading to cells without data get MASKED_LOGIT."""
    allowed = jnp.take(self.children, node, axis=0) >= 0  # [rows, vocab]
    allowed = allowed | (position >= self.num_constrained)
    return jnp.where(allowed, logits, MASKED_LOGIT)

  def advance(self, node: jax.Array, token: jax.Array, position) -> jax.Array:
    """The node after appending token [rows] at `position` (unchanged below the trie)."""
    child = jnp.take_along_axis(jnp.take(self.children, node, axis=0), token[:, None], axis=1)[:, 0]
    # A row that took a masked id (only a beam that is not valid) parks at the
    # root; beam search marks it invalid and keeps it below every valid beam.
    child = jnp.maximum(child, 0)
    return jnp.where(position < self.num_constrained - 1, child, node)

  def allowed_sequences(self) -> np.ndarray:
    """Every allowed token prefix of length num_constrained, [n, num_constrained] (for tests;
    needs concrete values, not for use under jit)."""
    children = np.asarray(self.children)
    prefixes = [((), 0)]
    for _ in range(self.num_constrained):
      prefixes = [(seq + (t,), int(children[node, t])) for seq, node in prefixes
                  for t in np.flatnonzero(children[node] >= 0)]
    return np.asarray([seq for seq, _ in prefixes], np.int64).reshape(-1, self.num_constrained)


def _check_options(spec: s2.TokenSpec, min_count, num_constrained) -> int:
  p_total = spec.num_positions
  num_constrained = p_total if num_constrained is None else int(num_constrained)
  if not 1 <= num_constrained <= p_total:
    raise ValueError(f"num_constrained must be in [1, {p_total}], got {num_constrained}")
  if isinstance(min_count, bool) or int(min_count) != min_count or min_count < 1:
    raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
  return num_constrained


def count_sequences(num_prefixes: int, spec: s2.TokenSpec, num_constrained: int) -> int:
  """Full sequences allowed by num_prefixes constrained prefixes (Python int, exact)."""
  return int(num_prefixes) * math.prod(int(v) for v in spec.vocab_sizes[num_constrained:])


def build_cell_trie(tokens, spec: s2.TokenSpec, *, min_count: int = 1,
                    num_constrained: int | None = None) -> CellTrie:
  """The trie of cells with >= min_count of the training examples' token rows.

  tokens: int [N, positions] (e.g. s2.latlng_to_tokens of the training
  coordinates).  num_constrained: how many leading positions are constrained
  (default all; position p decides the cell at level spec.level_of_prefix(p + 1)).
  """
  tokens = np.asarray(tokens)
  p_total = spec.num_positions
  num_constrained = _check_options(spec, min_count, num_constrained)
  if tokens.ndim != 2 or tokens.shape[1] != p_total:
    raise ValueError(f"tokens must be [N, {p_total}], got shape {tokens.shape}")
  if tokens.shape[0] == 0:
    raise ValueError("no training tokens to build a trie from")
  tokens = s2.tokens.check_tokens(tokens, spec)
  prefixes = tokens[:, :num_constrained].astype(np.int64)
  # Leaves: the deepest constrained cells with enough examples.
  leaves, counts = np.unique(prefixes, axis=0, return_counts=True)
  leaves = leaves[counts >= min_count]
  if leaves.shape[0] == 0:
    raise ValueError(f"no cell at level {spec.level_of_prefix(num_constrained)} holds "
                     f">= {min_count} of the {tokens.shape[0]} training examples")
  # Node ids level by level: the distinct prefixes of length 1 .. num_constrained-1
  # (length-0 = the root, node 0).  Rows are only needed for prefixes that have children.
  width = spec.max_vocab_size
  node_of_prefix = [np.zeros(leaves.shape[0], np.int64)]  # length 0: every leaf under the root
  next_node = 1
  for length in range(1, num_constrained):
    _, inverse = np.unique(leaves[:, :length], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    node_of_prefix.append(next_node + inverse)
    next_node += int(inverse.max()) + 1
  if next_node > np.iinfo(np.int32).max:
    raise ValueError(f"trie of {next_node} nodes is too large; raise min_count or lower the level")
  children = np.full((next_node, width), -1, np.int32)
  for length in range(num_constrained):
    parent = node_of_prefix[length]
    # The child of the last constrained position is a leaf: mark it allowed with 0.
    child = node_of_prefix[length + 1] if length + 1 < num_constrained else np.zeros_like(parent)
    children[parent, leaves[:, length]] = child
  return CellTrie(children=jnp.asarray(children), num_constrained=num_constrained,
                  num_sequences=count_sequences(leaves.shape[0], spec, num_constrained))


# ---------------------------------------------------------------------------
# The on-disk cache.


def trie_cache_key(tokens, spec: s2.TokenSpec, *, min_count: int, num_constrained: int | None) -> str:
  """sha256 over the tokens' bytes, shape and dtype, the build options and the spec."""
  tokens = np.ascontiguousarray(np.asarray(tokens))
  num_constrained = _check_options(spec, min_count, num_constrained)
  header = json.dumps({"format": _CACHE_FORMAT, "shape": list(tokens.shape), "dtype": tokens.dtype.str,
                       "min_count": int(min_count), "num_constrained": num_constrained,
                       "level": int(spec.level), "group_size": int(spec.group_size)}, sort_keys=True)
  digest = hashlib.sha256(header.encode())
  digest.update(memoryview(tokens.reshape(-1)).cast("B"))
  return digest.hexdigest()


def save_cell_trie(trie: CellTrie, path) -> None:
  """Writes a trie as an .npz (no pickle), atomically (runtime.write_atomic: a temporary file
  in the same folder, then a rename over the target), so a reader never sees a partial file
  and concurrent writers of the same key leave one whole file."""
  path = epath.Path(path)
  buffer = io.BytesIO()
  np.savez(buffer, children=np.asarray(trie.children, np.int32),
           num_constrained=np.asarray(trie.num_constrained, np.int64),
           num_sequences=np.asarray(str(int(trie.num_sequences))),  # may exceed int64
           format=np.asarray(_CACHE_FORMAT, np.int64))
  path.parent.mkdir(parents=True, exist_ok=True)
  runtime.write_atomic(path, buffer.getvalue())


def load_cell_trie(path) -> CellTrie:
  """Reads a trie written by save_cell_trie."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as stored:
    if int(stored["format"]) != _CACHE_FORMAT:
      raise ValueError(f"{path}: trie cache format {int(stored['format'])}, expected {_CACHE_FORMAT}")
    children = np.asarray(stored["children"], np.int32)
    return CellTrie(children=jnp.asarray(children), num_constrained=int(stored["num_constrained"]),
                    num_sequences=int(str(stored["num_sequences"])))


def cached_cell_trie(tokens, spec: s2.TokenSpec, *, min_count: int = 1, num_constrained: int | None = None,
                     cache_dir=None) -> CellTrie:
  """build_cell_trie, cached in cache_dir (any etils.epath path; None = no cache).

  The file (trie-KEY.npz) is keyed by trie_cache_key: the tokens' bytes, shape
  and dtype, min_count, num_constrained and the spec.  A second call with the
  same arguments loads it instead of building; an unreadable file is rebuilt.
  """
  if cache_dir is None:
    return build_cell_trie(tokens, spec, min_count=min_count, num_constrained=num_constrained)
  tokens = np.asarray(tokens)
  key = trie_cache_key(tokens, spec, min_count=min_count, num_constrained=num_constrained)
  path = epath.Path(cache_dir) / f"trie-{key[:40]}.npz"
  expected_constrained = _check_options(spec, min_count, num_constrained)
  if path.exists():
    try:
      trie = load_cell_trie(path)
      if (trie.num_constrained == expected_constrained and trie.children.ndim == 2
          and trie.children.shape[1] == spec.max_vocab_size):
        return trie
      logging.warning("trie cache %s does not match its key; rebuilding", path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not read the trie cache %s (%s); rebuilding", path, e)
  trie = build_cell_trie(tokens, spec, min_count=min_count, num_constrained=num_constrained)
  save_cell_trie(trie, path)
  return trie
