"""Results and stores show themselves: HTML with a table and images, short reprs (display.py)."""

import base64
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from streamem.em.classify2d import Class2DResult
from streamem.em.classify3d import Class3DResult
from streamem.em.refine import RefineResult

B = 24


def _map(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:B, :B, :B] - B // 2
    blob = np.exp(-((x - 3) ** 2 + y**2 + (z + 2) ** 2) / 18.0)
    return (blob + 0.05 * rng.standard_normal((B, B, B))).astype(np.float32)


def _refine() -> RefineResult:
    rng = np.random.default_rng(0)
    n = 300
    poses = {
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
    }
    fsc = np.clip(1.2 - np.arange(B // 2 + 1) / 8, 0, 1)
    return RefineResult(Path("run"), _map(1), np.stack([_map(2), _map(3)]), fsc, 9.6, 4.0, 6, poses)


def _class2d() -> Class2DResult:
    rng = np.random.default_rng(1)
    return Class2DResult(
        Path("c2"),
        rng.standard_normal((5, B, B)).astype(np.float32),
        np.array([0.1, 0.3, 0.2, 0.25, 0.15]),
        np.array([20.0, 12.0, 15.0, 13.0, 18.0]),
        rng.integers(1, 6, 300),
        4.0,
        10,
    )


def _class3d() -> Class3DResult:
    history = [[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]]
    return Class3DResult(
        Path("c3"),
        np.stack([_map(4), _map(5)]),
        np.array([0.7, 0.3]),
        np.array([11.0, 14.0]),
        np.repeat([1, 2], [210, 90]),
        4.0,
        3,
        history=history,
    )


def _png_sizes(page: str) -> list[tuple[int, int]]:
    """(width, height) of every embedded PNG, read from its IHDR chunk."""
    sizes = []
    for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append((int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")))
    return sizes


@pytest.mark.parametrize(
    ("make", "n_images", "text"),
    [
        (_refine, 3, "9.6"),  # FSC, map slices, angular distribution; the resolution
        (_class2d, 1, "0.3"),  # the gallery; the largest class's fraction
        (_class3d, 2, "class"),  # map slices per class, fractions per iteration
    ],
)
def test_results_render_a_table_and_images(make, n_images, text):
    result = make()
    backend = matplotlib.get_backend()
    page = result._repr_html_()
    assert "<table" in page and "<img" in page and text in page
    sizes = _png_sizes(page)
    assert len(sizes) == n_images and all(w > 50 and h > 50 for w, h in sizes)
    assert matplotlib.get_backend() == backend  # showing a result changes no state
    r = repr(result)
    assert len(r) < 300 and "array" in r and "[" not in r.split("array")[0]
    assert r.startswith(type(result).__name__ + "(")


def test_class_table_is_sorted_by_size():
    page = _class2d()._repr_html_()
    classes = re.findall(r"<tr><td>(\d)</td><td>0\.\d+</td>", page)
    assert classes == ["2", "4", "3", "5", "1"]


def test_store_renders_its_description_and_first_images(tmp_path):
    from streamem.simulate.particles import simulate_particles

    store = simulate_particles(tmp_path / "s.zarr", 20, box_size=B, pixel_size_A=4.0, seed=2)
    page = store._repr_html_()
    assert "<table" in page and "particles" in page and "20" in page
    assert len(_png_sizes(page)) == 1
    assert len(repr(store)) < 300
    from matplotlib.figure import Figure

    fig = store.plot(Figure(), n_images=5)
    shown = [ax.images[0].get_array() for ax in fig.axes]
    assert len(shown) == 5
    np.testing.assert_array_equal(shown[3], store.read_chunk(0, 5).images[3])


def test_repr_html_escapes_paths():
    result = _refine()
    result.out_dir = Path("<script>x</script>")
    page = result._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
