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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from geotoken_jax import s2

MASKED_LOGIT = -1e9  # the model's value for ids outside a position's vocabulary


@struct.dataclass
class CellTrie:
  children: jax.Array  # [nodes, max_vocab] int32, -1 = not allowed
  num_constrained: int = struct.field(pytree_node=False)  # positions 0 .. num_constrained-1

  @property
  def num_nodes(self) -> int:
    return int(self.children.shape[0])

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
    # A row that took a masked id (only a beam that is already dead) parks at
    # the root; its score keeps it below every live beam.
    child = jnp.maximum(child, 0)
    return jnp.where(position < self.num_constrained - 1, child, node)

  def allowed_sequences(self) -> np.ndarray:
    """Every allowed token prefix of length num_constrained, [n, num_constrained] (for tests)."""
    children = np.asarray(self.children)
    prefixes = [((), 0)]
    for _ in range(self.num_constrained):
      prefixes = [(seq + (t,), int(children[node, t])) for seq, node in prefixes
                  for t in np.flatnonzero(children[node] >= 0)]
    return np.asarray([seq for seq, _ in prefixes], np.int64).reshape(-1, self.num_constrained)


def build_cell_trie(tokens, spec: s2.TokenSpec, *, min_count: int = 1,
                    num_constrained: int | None = None) -> CellTrie:
  """The trie of cells with >= min_count of the training examples' token rows.

  tokens: int [N, positions] (e.g. s2.latlng_to_tokens of the training
  coordinates).  num_constrained: how many leading positions are constrained
  (default all; position p decides the cell at level spec.level_of_prefix(p + 1)).
  """
  tokens = np.asarray(tokens)
  p_total = spec.num_positions
  num_constrained = p_total if num_constrained is None else int(num_constrained)
  if not 1 <= num_constrained <= p_total:
    raise ValueError(f"num_constrained must be in [1, {p_total}], got {num_constrained}")
  if isinstance(min_count, bool) or int(min_count) != min_count or min_count < 1:
    raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
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
  first_node = [0]
  next_node = 1
  for length in range(1, num_constrained):
    _, inverse = np.unique(leaves[:, :length], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    node_of_prefix.append(next_node + inverse)
    first_node.append(next_node)
    next_node += int(inverse.max()) + 1
  children = np.full((next_node, width), -1, np.int64)
  for length in range(num_constrained):
    parent = node_of_prefix[length]
    # The child of the last constrained position is a leaf: mark it allowed with 0.
    child = node_of_prefix[length + 1] if length + 1 < num_constrained else np.zeros_like(parent)
    children[parent, leaves[:, length]] = child
  if next_node > np.iinfo(np.int32).max:
    raise ValueError(f"trie of {next_node} nodes is too large; raise min_count or lower the level")
  return CellTrie(children=jnp.asarray(children.astype(np.int32)), num_constrained=num_constrained)
