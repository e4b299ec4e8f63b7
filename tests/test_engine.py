"""The run loop's shared pieces: dist/iteration (generic Dask graph), io/model_star, io/results."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from streamem.dist.iteration import run_chunks
from streamem.errors import InputError
from streamem.io.model_star import write_model_star
from streamem.io.results import RESULT_FIELDS, create_results_arrays, read_results, write_results


def _span_times(start, stop, factor, shared):
    return np.array([(stop - start) * factor * shared["scale"], 1.0])


def test_run_chunks_sums_one_task_per_chunk_with_the_shared_value_sent_once():
    bounds = [(0, 3), (3, 5), (5, 9), (9, 10)]
    total = run_chunks(_span_times, bounds, 2.0, shared={"scale": 0.5}, client=None, split_every=2)
    np.testing.assert_allclose(total, [10.0, 4.0])  # Σ (stop - start) · 2 · 0.5, 4 tasks


class KilledWorker(Exception):  # distributed's, by name: run_chunks must not import it
    pass


def _dies(start, stop, shared):
    raise KilledWorker("worker died")


def test_a_killed_worker_is_one_line_only_when_the_caller_words_it():
    with pytest.raises(InputError, match="resume after iteration 2"):
        run_chunks(
            _dies, [(0, 1)], shared=None, client=None, killed_message="resume after iteration 2"
        )
    with pytest.raises(KilledWorker):  # not worded: the error is the caller's to see
        run_chunks(_dies, [(0, 1)], shared=None, client=None)


def test_model_star_blocks_and_labels(tmp_path):
    B, p = 8, 2.0
    inv_sigma2 = np.array([[0.0, 1.0, 2.0, 4.0, 8.0]])
    path = tmp_path / "m.star"
    write_model_star(
        path,
        {"rlnCurrentResolution": 9.0, "rlnNrClasses": 2},
        B,
        p,
        inv_sigma2,
        [{"rlnSsnrMap": np.arange(7.0)}, {"rlnSsnrMap": np.ones(5)}],
        {"rlnReferenceImage": ["a", "b"], "rlnClassDistribution": [0.25, 0.75]},
        class_axes=("rlnSpectralIndex", "rlnResolution"),
    )
    blocks = starfile.read(path, always_dict=True)
    assert list(blocks) == [
        "model_general",
        "model_classes",
        "model_class_1",
        "model_class_2",
        "model_optics_group_1",
    ]
    c1 = blocks["model_class_1"]
    assert list(c1.columns) == ["rlnSpectralIndex", "rlnResolution", "rlnSsnrMap"]
    np.testing.assert_allclose(c1["rlnSsnrMap"], np.arange(5.0))  # cut to B//2+1 shells
    np.testing.assert_allclose(c1["rlnResolution"], np.arange(5) / (B * p))
    noise = blocks["model_optics_group_1"]
    assert list(noise.columns) == ["rlnSpectralIndex", "rlnSigma2Noise"]
    np.testing.assert_allclose(noise["rlnSigma2Noise"], [0.0, 1.0, 0.5, 0.25, 0.125])
    assert list(blocks["model_classes"]["rlnReferenceImage"]) == ["a", "b"]


def test_results_round_trip_in_a_fixed_column_order(tmp_path):
    path = tmp_path / "particles.zarr"
    create_results_arrays(path, 1, 6, 3)
    write_results(str(path), 1, 3, {"rlnClassNumber": [2, 1, 2], "rlnAnglePsi": [1.0, 2.0, 3.0]})
    got = read_results(str(path), 1)
    assert list(got) == list(RESULT_FIELDS)
    np.testing.assert_array_equal(got["rlnClassNumber"], [0, 0, 0, 2, 1, 2])
    assert np.isnan(got["rlnAnglePsi"][:3]).all()
    np.testing.assert_allclose(read_results(str(path), 1, 4, 6)["rlnAnglePsi"], [2.0, 3.0])


class _Store:
    def __init__(self, n_particles, chunk_size):
        self.n_particles, self.chunk_size = n_particles, chunk_size


@pytest.mark.parametrize(
    ("n", "chunk", "size"),
    [
        (5000, 1024, 512),  # 5 chunks on 2 threads: 3 rounds, the last half idle -> 10 tasks
        (100_000, 1024, 1024),  # enough chunks: one task each
        (200, 50, 50),  # parts would be under MIN_TASK_PARTICLES
        (1500, 500, 167),  # 3 chunks -> 9 tasks of 167 (ceil(500 / 3))
        (300, 1024, 128),  # one chunk: parts no smaller than 128 (3 tasks)
    ],
)
def test_estep_tasks_are_chunks_or_equal_parts_of_them(n, chunk, size):
    from streamem.em.engine import MIN_TASK_PARTICLES, estep_task_size
    from streamem.io.store import ranges

    got = estep_task_size(_Store(n, chunk))
    assert got == size
    bounds = ranges(n, got)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))  # no gap
    assert got == chunk or got >= MIN_TASK_PARTICLES


def test_results_arrays_keep_their_chunks_for_the_tasks(tmp_path):
    assert create_results_arrays(tmp_path / "r.zarr", 1, 1000, 250) == 250
    # an earlier attempt at the iteration made them: its chunks cut the tasks, so that no
    # two tasks write parts of one chunk
    assert create_results_arrays(tmp_path / "r.zarr", 1, 1000, 100) == 250
    assert create_results_arrays(tmp_path / "r.zarr", 2, 1000, 100) == 100
