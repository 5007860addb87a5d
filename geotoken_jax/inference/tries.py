"""The cell tries of constrained decoding, built from the training split's tokens (cached)."""

from __future__ import annotations

from collections.abc import Sequence

from geotoken_jax import data, decoding, s2
from geotoken_jax.decoding.strategies import Strategy


def trie_key(strategy: Strategy, spec: s2.TokenSpec) -> str:
  return f"min{strategy.trie_min_count}_positions{strategy.trie_positions(spec)}"


def build_tries(config, spec: s2.TokenSpec, wanted: Sequence[Strategy], cache_dir=None,
                training_tokens=None) -> dict[str, decoding.CellTrie]:
  """The cell tries the strategies ask for, from the training split's token array (no
  image is read), cached on disk in cache_dir."""
  wanted = [s for s in wanted if s.trie_min_count]
  if not wanted:
    return {}
  tokens = data.training_tokens(config.data, spec) if training_tokens is None else training_tokens
  tries = {}
  for s in wanted:
    key = trie_key(s, spec)
    if key not in tries:
      tries[key] = decoding.cached_cell_trie(tokens, spec, min_count=s.trie_min_count,
                                             num_constrained=s.trie_positions(spec), cache_dir=cache_dir)
  return tries
