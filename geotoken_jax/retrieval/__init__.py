"""Retrieval: nearest-neighbour search of image embeddings against a gallery (search.py)."""

from geotoken_jax.retrieval.search import (REASONS, ConcatRows, Exclusion, SearchResult,  # noqa: F401
                                           search)
