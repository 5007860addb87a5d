"""Generic Flax NNX building blocks, below the encoders and the models.

  layers     parameters with logical sharding axes, initializers, LayerNorm, attention
             with a KV cache, MLP, pre- / post-LN encoder and decoder blocks
  heads      small MLP heads: Dense, MLPHead (G3's loc / text heads, GeoCLIP's image MLP)

Layering (a lower package never imports a higher one):
  geotoken_jax.s2 -> geotoken_jax.nn -> geotoken_jax.encoders -> geotoken_jax.models
"""

from geotoken_jax.nn import heads, layers

__all__ = ["heads", "layers"]
