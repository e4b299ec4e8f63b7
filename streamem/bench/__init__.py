"""Benchmarks: each module adds ``streamem bench NAME`` via ``register_bench``."""
