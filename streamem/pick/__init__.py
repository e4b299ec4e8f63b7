"""Auto-picking (RELION-2's template picker, a Laplacian-of-Gaussian picker) and extraction.

- :mod:`streamem.pick.template`: CTF-modulated template matching on a micrograph
  downscaled to the low-pass filter's Nyquist, with RELION's probability-ratio
  figure of merit (conventions, defaults and their calibration); its parts:
  :mod:`~streamem.pick.micrograph` (grids, normalisation, local statistics),
  :mod:`~streamem.pick.bank` (template transforms and rotations),
  :mod:`~streamem.pick.scan` (the FOM scan, reference loop, automatic scale) and
  :mod:`~streamem.pick.fastscan` (the batched scan);
- :mod:`streamem.pick.log`: template-free blob picking;
- :mod:`streamem.pick.peaks`: peak search, suppression, one-to-one matching;
- :mod:`streamem.pick.job`: the picking job (one Dask task per micrograph);
- :mod:`streamem.pick.extract`: particle extraction into a particle store.
"""

from streamem.pick.log import LogPickParams, pick_log
from streamem.pick.peaks import Picks, match_coordinates
from streamem.pick.template import MicrographCtf, TemplatePickParams, pick_templates

__all__ = [
    "LogPickParams",
    "MicrographCtf",
    "Picks",
    "TemplatePickParams",
    "match_coordinates",
    "pick_log",
    "pick_templates",
]
