"""Benchmarks that print one JSON line each: `python -m geotoken_jax.bench NAME --help`."""
