"""File formats at the edges: MRC maps and stacks, STAR tables, the Zarr particle store.

Numerics never open files; these modules return arrays and tables.
"""
