"""Core numerics: pure functions over NumPy or CuPy arrays (no I/O, no Dask)."""
