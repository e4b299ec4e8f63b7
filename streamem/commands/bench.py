"""``streamem bench NAME``: benchmarks that report ratios measured in one run."""

from __future__ import annotations

import importlib

#: Modules in streamem.bench that provide ``register_bench(bench_subparsers)``.
BENCH_MODULES = [
    "estep",
    "project",
    "io",
    "simulate",
    "refine",
    "classify",
    "pick",
    "ctf",
    "gpu_core",
    "estep_chunk",
    "class3d_accuracy",
    "refine_memory",
    "refine_phases",
    "chaos",
    "star_write",
    "out_of_core",
]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (speed and memory ratios)", description=__doc__)
    bench_sub = p.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(f"streamem.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"streamem.bench.{name}":
                continue
            raise
        module.register_bench(bench_sub)
    p.set_defaults(func=lambda args: p.print_help() or 1)
