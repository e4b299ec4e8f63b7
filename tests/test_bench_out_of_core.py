"""``streamem bench out-of-core`` at a tiny size: it runs both passes, reports, cleans up,
and refuses (one line) to start without enough free disk."""

from __future__ import annotations

import json

import pytest

from streamem.bench.out_of_core import BASE_PARTICLES, make_store, plan
from streamem.cli import main
from streamem.errors import InputError


def test_tiny_out_of_core_pass(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "out-of-core", "--target-gb", "0.001", "--box", "16", "--small", "100"]
    argv += ["--chunk-size", "128", "--shard-size", "256", "--angpix", "8"]
    argv += ["--n-workers", "1", "--workdir", str(tmp_path), "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    n = report["particles"]
    assert n == -(-1_000_000 // (4 * 16 * 16))  # the target size in particles
    assert report["big"]["particles"] == n and report["small"]["particles"] == 100
    for name in ("small", "big"):
        peaks = report[name]["peak_rss"]
        assert "client" in peaks and "worker 0" in peaks
        assert report[name]["particles_per_s"] > 0
    assert 0.5 < report["disk_bytes"] / report["raw_bytes"] < 1.2  # noise barely compresses
    assert "speed big/small" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [out]  # the stores and runs are gone


def test_refuses_without_enough_disk(tmp_path):
    with pytest.raises(InputError, match="free disk"):
        plan(1e15, 128, tmp_path, 5000)


def test_made_store_repeats_the_base_images(tmp_path):
    import numpy as np

    from streamem.io.store import ParticleStore
    from streamem.simulate.particles import simulate_particles

    base = simulate_particles(tmp_path / "b.zarr", BASE_PARTICLES, box_size=16, snr=1.0)
    store = make_store(tmp_path / "s.zarr", base, 600, 64, 128, client=None)
    assert store.shard_size == 128
    images = ParticleStore(store.path).read_chunk(0, 600).images
    first = base.read_chunk(0, BASE_PARTICLES).images
    diff = images[BASE_PARTICLES : 2 * BASE_PARTICLES] - first
    assert 0.05 < float(diff.std()) < 0.15  # the base plus fresh noise of sigma 0.1
    assert not np.array_equal(images[:BASE_PARTICLES], images[BASE_PARTICLES : 2 * BASE_PARTICLES])
    defocus = store.read_field("rlnDefocusU")
    np.testing.assert_array_equal(defocus[BASE_PARTICLES:512], base.read_field("rlnDefocusU")[:256])
