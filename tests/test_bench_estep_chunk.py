"""``streamem bench estep-chunk``: the NumPy column on the CPU finds the poses; the
CuPy column (GPU only) agrees with it."""

import pytest

from streamem.bench.estep_chunk import measure


def test_numpy_column_finds_the_poses():
    rows = measure(box=32, n_images=24)
    assert [r["search"] for r in rows] == ["order 2 global", "order 3 global", "order 3 local 8°"]
    assert all(r["xp_s"] is None and r["numpy_s"] > 0 for r in rows)
    assert rows[1]["error_numpy_deg"] < 7.5  # below the fine step of order 3 at this SNR


@pytest.mark.gpu
def test_cupy_column_agrees():
    cp = pytest.importorskip("cupy")
    rows = measure(box=32, n_images=24, xp=cp, sync=cp.cuda.Stream.null.synchronize)
    assert all(r["same_pose"] >= 0.95 and r["acc_rel_diff"] < 1e-4 for r in rows), rows
