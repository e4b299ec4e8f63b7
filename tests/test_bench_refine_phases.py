"""``streamem bench refine-phases``'s report: its per-iteration table from recorded rows."""

from types import SimpleNamespace

from streamem.bench.refine_phases import print_report


def _row(iteration, step_deg, local, seconds, points):
    grid = SimpleNamespace(fine_angular_step_deg=step_deg, local_sigma_deg=1.0 if local else None,
                           local_prepass=local)  # fmt: skip
    phases = {"projection": 6.0, "coarse_gemm": 2.0, "backprojection": 3.0}
    return {"iteration": iteration, "grid": grid, "radius_px": 40.0, "seconds": seconds,
            "phases": phases, "coarse_flops": 1e11, "points": points}  # fmt: skip


def test_report_prints_the_phases_seconds_per_point_and_the_ratios(capsys):
    rows = [
        _row(1, 3.75, True, 10.0, {"projection": 3e8, "backprojection": 1e8}),
        _row(2, 1.88, True, 12.0, {"projection": 2e8}),
        _row(3, 1.88, True, 30.0, {}),  # the final join: apart from the ratios
    ]
    report = {"particles": 10, "box": 64, "refine_s": 52.0, "sgemm_flops": 1e11, "rows": rows,
              "peaks": {1: {"client": 2**30}}, "fsc05_vs_truth_A": 9.5,
              "median_angular_error_deg": 1.3}  # fmt: skip
    print_report(report)
    out = capsys.readouterr().out.splitlines()
    head = out[1].split()
    assert head[-9:-5] == ["proj", "ns", "bp", "ns"]
    first, second = out[2].split(), out[3].split()
    # 6 s over 3·10⁸ points: 20 ns; 3 s over 10⁸: 30 ns; no points counted: nan
    assert first[-2:] == ["20.0", "30.0"] and second[-2:] == ["30.0", "nan"]
    assert "1.88° local / at 3.75° local (final one apart): 1.20" in "\n".join(out)
