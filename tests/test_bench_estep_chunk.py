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


def test_local_searches_with_and_without_prepass_find_the_poses():
    from streamem.bench.estep_chunk import measure_local

    rows = measure_local(box=32, n_images=16, snr=0.5, per_image=False)
    searches = [(r["fine_step_deg"], r["prepass"]) for r in rows]
    # RELION's plain search and the pre-pass at every fine step
    assert searches == [(step, pre) for step in (3.75, 1.875, 0.9375) for pre in (False, True)]
    assert all(r["s"] > 0 and r["per_image_s"] is None for r in rows)
    for r in rows:  # the pre-pass's radius is reported, never above the pass's own (both
        # are capped by the work radius at this box; the fraction's test is in
        # test_estep_coarse_batched.py)
        if r["prepass"]:
            assert 0 < r["prepass_radius_px"] <= r["coarse_radius_px"], r
        else:
            assert r["prepass_radius_px"] is None
    for r in rows:  # poses found to within about two fine steps of the truth (2° off at start)
        assert r["error_deg"] < 2.5 * r["fine_step_deg"] + 0.5, r
    err = {search: r["error_deg"] for search, r in zip(searches, rows, strict=True)}
    for step in (3.75, 1.875, 0.9375):  # the pre-pass costs no more than a fine step
        assert err[(step, True)] <= err[(step, False)] + step, err
