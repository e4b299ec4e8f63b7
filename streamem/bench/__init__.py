"""Benchmarks: each module adds ``streamem bench NAME`` via ``register_bench``."""

from __future__ import annotations

import tempfile
from pathlib import Path


def scratch_folder(prefix: str, workdir: str | Path | None = None) -> Path:
    """A new temporary folder for a benchmark's data, inside ``workdir`` (created if
    missing: it is where the user asked the bench to write) or the system's temp dir."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
