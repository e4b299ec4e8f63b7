"""The expectation-maximisation engine shared by refine3d and classification.

``estep`` (per chunk, pure), ``statistics`` (the monoid the chunks reduce),
``mstep`` (reconstruction, noise, priors, FSC), ``schedule`` (RELION's
auto-refine sampling schedule) and ``refine`` (the thin Dask driver).
"""
