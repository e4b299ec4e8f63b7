"""The Dask layer: clusters and graph building only; no numerics here."""
