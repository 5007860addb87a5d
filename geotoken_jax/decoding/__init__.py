"""Decoding S2 token sequences from a model, as in language models.

Model-agnostic (t5x style): strategies drive a `tokens_to_logits(prev_token,
position, cache) -> (logits, cache)` function inside jax.lax loops.
"""

from geotoken_jax.decoding.greedy import greedy_decode
