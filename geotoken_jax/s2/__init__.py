"""S2 cells and the GeoToken token sequences built from them.

NumPy (host, float64, bit-exact with the C++ S2 library):
  latlng_to_cell_ids, cell_centers, cell_vertices, ... in `cells`;
  TokenSpec, latlng_to_tokens, tokens_to_latlng, ... in `tokens`.
JAX (device, float32, inside jit): `jax_ops.tokens_to_latlng`.
"""

from geotoken_jax.s2.cells import (
    MAX_LEVEL,
    NUM_FACES,
    cell_centers,
    cell_ids_are_valid,
    cell_ids_face,
    cell_ids_level,
    cell_ids_parent,
    cell_vertices,
    cell_vertices_xyz,
    child_positions,
    latlng_to_cell_ids,
    normalize_longitude,
)
from geotoken_jax.s2.tokens import (
    TokenSpec,
    cell_ids_to_tokens,
    latlng_to_tokens,
    tokens_to_cell_ids,
    tokens_to_latlng,
    tokens_to_vertices,
)
