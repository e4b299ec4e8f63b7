"""``streamem bench class3d-accuracy`` runs and reports scores in range (tiny setting)."""

from streamem.bench.class3d_accuracy import measure


def test_tiny_run_reports_scores():
    r = measure(n_particles=60, search="skip", iterations=2)
    assert 0.5 <= r["accuracy"] <= 1.0
    assert 0.0 <= r["fraction_a"] <= 1.0 and 0.4 < r["true_fraction_a"] < 0.8
    assert r["median_angular_error_deg"] < 1e-6  # skip-align keeps the true poses
    assert r["seconds_per_iteration"] > 0


def test_registered_as_a_bench_command(capsys):
    import pytest

    from streamem.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "class3d-accuracy", "--help"])
    assert stop.value.code == 0 and "60/40" in capsys.readouterr().out
