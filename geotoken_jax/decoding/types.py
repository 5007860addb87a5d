"""The model-agnostic decoding interface (t5x style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# A KV cache: any pytree.  Leaves whose leading axis is the number of decoding
# rows (images x sequences per image) are per-sequence and get reordered by
# beam search; leaves that lead with the number of images (the memory's K/V)
# are shared by that image's sequences.
Cache = Any

# (prev_token int32 [rows], position int32 scalar, cache) -> (logits [rows, vocab] float32, cache).
# Ids that do not exist at `position` must already carry a very low logit.
TokensToLogits = Callable[[jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]
