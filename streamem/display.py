"""How results and stores show themselves in Jupyter: a summary table and inline images.

The result classes (:class:`~streamem.em.refine.RefineResult`,
:class:`~streamem.em.classify2d.Class2DResult`,
:class:`~streamem.em.classify3d.Class3DResult`) and
:class:`~streamem.io.store.ParticleStore` delegate their ``_repr_html_`` and short
``__repr__`` here, so data classes hold no plotting (STYLE.md, habit 6).

Decisions: figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg
canvas, never through pyplot, so showing a result neither opens a window nor changes
the notebook's backend or current figure; each image is a PNG embedded as base64
(the notebook file carries it, no side files); HTML is escaped where it shows a path
or a label; ``__repr__`` shows scalars and shapes, never an array's values.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

#: Dots per inch of the embedded PNGs (small: a notebook holds many).
DPI = 80


def short_repr(name: str, **fields: Any) -> str:
    """``Name(a=1, b='x')`` with floats to 4 significant digits and arrays as shapes."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, np.ndarray):
            value = f"<{value.dtype} array {'x'.join(map(str, value.shape))}>"
        elif isinstance(value, float | np.floating):
            value = f"{float(value):.4g}"
        else:
            value = repr(value if isinstance(value, int | str | None) else str(value))
        parts.append(f"{key}={value}")
    return f"{name}({', '.join(parts)})"


def figure_img(draw: Callable[[Any], Any], size_in: tuple[float, float] = (4.0, 3.0)) -> str:
    """An ``<img>`` tag (base64 PNG) of ``draw(fig)`` on a new Agg figure of ``size_in``
    inches (width, height)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in)
    FigureCanvasAgg(fig)
    draw(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="plot"/>'


def table(rows: Iterable[tuple[str, Any]], header: Sequence[str] | None = None) -> str:
    """An HTML ``<table>`` of (label, value) rows (or rows of any length with a header)."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _text(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


def _page(title: str, *parts: str) -> str:
    body = "".join(f'<div style="display:inline-block;vertical-align:top">{p}</div>' for p in parts)
    return f"<div><strong>{html.escape(title)}</strong><br/>{body}</div>"


def _slices(fig, volumes: np.ndarray, labels: Sequence[str]) -> None:
    """Central z, y and x slices (rows: volumes (K, B, B, B), columns: the three axes)."""
    for k, volume in enumerate(volumes):
        b = volume.shape[0] // 2
        for j, (plane, axis) in enumerate(
            ((volume[b], "z"), (volume[:, b], "y"), (volume[:, :, b], "x"))
        ):
            ax = fig.add_subplot(len(volumes), 3, 3 * k + j + 1)
            ax.imshow(plane, cmap="gray", origin="lower")
            ax.set_title(f"{labels[k]} {axis} = {b}", fontsize=7)
            ax.axis("off")


def _angular_distribution(fig, poses: dict) -> None:
    """Particle counts over (rot, tilt), degrees (RELION's ZYZ angles)."""
    ax = fig.add_subplot(1, 1, 1)
    counts, _, _ = np.histogram2d(
        np.asarray(poses["rlnAngleTilt"]),
        np.asarray(poses["rlnAngleRot"]),
        bins=(18, 36),
        range=((0, 180), (-180, 180)),
    )
    image = ax.imshow(counts, extent=(-180, 180, 180, 0), aspect="auto", cmap="viridis")
    ax.set_xlabel("rot (°)")
    ax.set_ylabel("tilt (°)")
    ax.set_title("angular distribution", fontsize=9)
    fig.colorbar(image, ax=ax, label="particles")


# -- the objects ------------------------------------------------------------------------


def refine_html(result) -> str:
    """RefineResult: facts, the FSC curve, central slices of the map, the angular
    distribution of the refined poses."""
    rows = [
        ("run folder", result.out_dir),
        ("resolution (Å, FSC 0.143)", result.resolution_A),
        ("iterations", result.iterations),
        ("box (px)", result.map.shape[0]),
        ("pixel size (Å)", result.pixel_size_A),
    ]
    if result.poses:
        rows.append(("particles", len(next(iter(result.poses.values())))))
    images = [
        figure_img(lambda fig: result.plot(ax=fig.add_subplot(1, 1, 1))),
        figure_img(lambda fig: _slices(fig, result.map[None], ["map"]), (6.0, 2.2)),
    ]
    if result.poses and "rlnAngleRot" in result.poses:
        images.append(figure_img(lambda fig: _angular_distribution(fig, result.poses)))
    return _page("refine3d result", table(rows), *images)


def _class_rows(result) -> list[tuple]:
    order = np.argsort(-np.asarray(result.fractions), kind="stable")
    return [(k + 1, result.fractions[k], result.resolutions_A[k]) for k in order]


def _class_facts(result) -> str:
    rows = [
        ("run folder", result.out_dir),
        ("iterations", result.iterations),
        ("particles", len(result.class_numbers)),
        ("pixel size (Å)", result.pixel_size_A),
    ]
    if result.truth_accuracy is not None:
        rows.append(("against the truth", result.truth_accuracy.summary()))
    return table(rows) + table(_class_rows(result), ("class", "fraction", "resolution (Å)"))


def class2d_html(result) -> str:
    """Class2DResult: facts, classes by size, the gallery of class averages."""
    k = len(result.fractions)
    cols = int(np.ceil(np.sqrt(k)))
    size = (1.6 * cols, 1.8 * int(np.ceil(k / cols)))
    gallery = figure_img(lambda fig: result.plot(fig=fig), size)
    return _page("class2d result", _class_facts(result), gallery)


def class3d_html(result) -> str:
    """Class3DResult: facts, classes by size, central slices of each class map, the class
    fractions per iteration."""
    labels = [f"class {k + 1}" for k in range(len(result.maps))]
    slices = figure_img(
        lambda fig: _slices(fig, result.maps, labels), (6.0, 2.0 * len(result.maps))
    )
    images = [slices]
    if len(result.history):
        images.append(figure_img(lambda fig: result.plot(ax=fig.add_subplot(1, 1, 1))))
    return _page("class3d result", _class_facts(result), *images)


def store_html(store, n_images: int = 8) -> str:
    """ParticleStore: ``streamem info``'s description as a table and its first images."""
    from streamem.commands.info import describe

    rows = []
    for line in describe(store).splitlines():
        if line.startswith("  "):  # an optics group under "optics groups:"
            rows.append(("", line.strip()))
        elif line.endswith(":"):
            rows.append((line[:-1], ""))
        else:
            rows.append((line[:13].strip(), line[13:].strip()))
    n = min(n_images, store.n_particles)
    images = store.read_chunk(0, n).images

    def draw(fig):
        draw_images(fig, images)

    return _page("particle store", table(rows), figure_img(draw, (1.0 * n, 1.2)))


def draw_images(fig, images: np.ndarray) -> None:
    """Images ``(n, B, B)`` in one row of ``fig``, numbered (y up, as RELION shows them)."""
    n = len(images)
    for i, image in enumerate(images):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(image, cmap="gray", origin="lower")
        ax.set_title(str(i), fontsize=7)
        ax.axis("off")
