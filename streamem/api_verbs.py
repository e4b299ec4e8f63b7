"""The CLI verbs that the Python API runs through the command's own code, and the
table of how the hand-written API verbs name the CLI's options.

:mod:`streamem.api` re-exports everything here. The verbs below are built by
:func:`streamem.api_cli.verb_function` (module docstring there: why). The verbs
written as Python functions (refine3d, class2d, class3d, select, simulate, demo)
take an options dataclass and unit-suffixed names; :data:`CLI_NAMES` says, for each
of their CLI options, which parameter or options field carries it, so
``tests/test_api_verbs.py`` can check that none is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamem.api_cli import verb_function
from streamem.io.store import ParticleStore


def _store(namespace: argparse.Namespace) -> ParticleStore:
    return ParticleStore(namespace.out)


def _out(namespace: argparse.Namespace) -> Path:
    return Path(namespace.out)


def _info_store(namespace: argparse.Namespace) -> ParticleStore:
    return ParticleStore(namespace.store)


import_particles = verb_function("import", "import_particles", _store, "the new ParticleStore")
export = verb_function("export", "export", _out, "the path of the STAR or .cs file written")
info = verb_function(
    "info",
    "info",
    _info_store,
    "the ParticleStore (its description is printed; with ``verify=True`` a bad chunk "
    "raises InputError after the report)",
)
reconstruct = verb_function("reconstruct", "reconstruct", _out, "the path of the map written")
ctf = verb_function("ctf", "ctf", _out, "the output folder (micrographs_ctf.star and plots)")
pick = verb_function("pick", "pick", _out, "the output folder (coordinate STAR files)")
extract = verb_function("extract", "extract", _store, "the new ParticleStore")
postprocess = verb_function("postprocess", "postprocess", _out, "the output folder")
mask_create = verb_function("mask-create", "mask_create", _out, "the path of the mask written")
local_resolution = verb_function(
    "local-resolution", "local_resolution", _out, "the path of the local-resolution map"
)
simulate_micrographs = verb_function(
    "simulate-micrographs",
    "simulate_micrographs",
    _out,
    "the output folder (micrographs, micrographs.star, coordinates.star, truth)",
)

#: CLI verbs with no Python function, and why.
CLI_ONLY = {
    "cluster": "manages clusters and certificates from a shell (start, certs); in Python, "
    "use distributed.LocalCluster / dask_jobqueue directly (notebooks/04-cluster)",
    "bench": "benchmarks for the project's developers, printed as tables; their modules "
    "are importable as streamem.bench.*",
}

#: Execution options of the hand-written verbs: they take a ``distributed.Client``
#: (``client=``) instead, made as the user likes (LocalCluster, a scheduler address, ...).
#: ``--storage-options`` is fsspec's configuration of store URLs: in Python, call
#: :func:`streamem.io.store_url.configure_storage_options` once (or set fsspec's own
#: configuration), then pass ``"s3://bucket/p.zarr"`` or a ParticleStore of it.
EXECUTION_OPTIONS = frozenset(
    {
        "storage_options",
        "scheduler",
        "scheduler_timeout",
        "tls_ca_file",
        "tls_cert",
        "tls_key",
        "gateway",
        "gateway_option",
        "gateway_workers",
        "n_workers",
        "threads_per_worker",
        "gpu",
        "no_cluster",
        "adapt",
        "dashboard_address",
    }
)

_EM_2D = {
    "out": "out_dir",
    "particle_diameter": "particle_diameter_A",
    "offset_range": "offset_range_px",
    "offset_step": "offset_step_px",
    "no_ctf": "do_ctf",  # negated
    "memory_per_worker": "memory_per_worker_bytes",  # a size ("4GiB") -> bytes
}
_EM = {**_EM_2D, "ref": "reference", "ini_high": "ini_high_A", "sym": "symmetry"}
_IMAGING = {
    "box": "box_size",
    "pixel_size": "pixel_size_A",
    "defocus": "defocus_range_A",  # "MIN:MAX" -> (min, max)
    "astigmatism": "astigmatism_A",
    "voltage": "voltage_kV",
    "cs": "cs_mm",
    "bfactor": "bfactor_A2",
}

#: For each hand-written verb: CLI ``dest`` -> the API parameter or options field that
#: carries it (a dest absent here has the same name in the API).
CLI_NAMES: dict[str, dict[str, str]] = {
    "refine3d": {
        **_EM,
        "auto_local_healpix_order": "local_from_order",
    },
    "class3d": {
        **_EM,
        "k": "n_classes",
        "local": "local_sigma_deg",
        "strict_highres": "strict_highres_A",
        "no_random_seeds": "random_seeds",  # negated
        "no_cross_half": "cross_half",  # negated
        "no_unbiased_scores": "unbiased_scores",  # negated
    },
    "class2d": {**_EM_2D, "k": "n_classes", "psi_step": "psi_step_deg"},
    "select": {"out": "out_path", "run": "run_dir", "max_resolution": "max_resolution_A"},
    "simulate": {
        **_IMAGING,
        "out": "out_path",
        "model": "volumes",  # a PDB/mmCIF file -> its density (commands.simulate.resolve_volume)
        "junk": "junk_fraction",
        "preferred_orientation": "orientation",  # True -> "preferred"
        "preferred_spread": "preferred_spread_deg",
        "max_shift": "max_shift_A",
        "no_ctf": "ctf",  # negated
        "relion": "relion_dir",
    },
    "demo": {
        "out": "out_dir",
        "box": "box_size",
        "pixel_size": "pixel_size_A",
        "no_cluster": "use_cluster",  # negated
    },
}
