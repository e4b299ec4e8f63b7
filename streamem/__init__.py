"""streamem: streaming cryo-EM single-particle analysis on Dask and Zarr.

RELION's regularised-likelihood algorithms (refine3d, class2d/3d) over particle
stacks stored as chunked Zarr arrays, one Dask task per chunk (or per equal part of a
chunk, where a store has few).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
