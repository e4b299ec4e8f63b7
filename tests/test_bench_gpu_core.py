"""``streamem bench gpu-core``: the table logic on the CPU (NumPy on both sides) and a
clean message without CuPy; the GPU run itself needs the device (see the note)."""

import importlib.util

import numpy as np
import pytest

from streamem.bench.gpu_core import measure
from streamem.cli import main


def test_numpy_on_both_sides_gives_zero_differences():
    rows = measure(np, lambda: None, boxes=(16,), n_images=20)
    names = [r[0] for r in rows]
    assert "reconstruct D7 box 16" in names and len(rows) == 7
    assert all(diff == 0.0 and t_np > 0 and t_xp > 0 for _, diff, t_np, t_xp in rows)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_without_cupy_it_says_so(capsys):
    assert main(["bench", "gpu-core"]) == 1
    assert "needs CuPy" in capsys.readouterr().out


@pytest.mark.gpu
def test_cupy_parity():
    cp = pytest.importorskip("cupy")
    rows = measure(cp, cp.cuda.Stream.null.synchronize, boxes=(32,), n_images=50)
    assert all(diff < 1e-3 for _, diff, _, _ in rows), rows
