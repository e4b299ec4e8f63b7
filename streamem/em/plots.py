"""PNG pictures of a run, written next to its files (matplotlib, Agg, no display).

- :func:`plot_angdist`: the angular distribution, a HEALPix-binned heat map
  (:func:`streamem.em.angdist.direction_counts`) on a Mollweide projection, longitude =
  rot, latitude = 90° − tilt, one panel per class; colour = particles per pixel.
- :func:`plot_class_slices`: each class's three orthogonal central slices (z, y, x =
  B//2), one row per class, with its fraction and resolution.
- :func:`plot_class_sizes`: class fractions over iterations (one line per class).

Each takes the numbers and a path; none reads run files. Measured at box 128 with 4
classes on the loaded 2-core build machine: slices 0.7 s, angular distribution 1.0 s,
sizes 0.3 s (over the 0.5 s a picture per iteration may cost), so the jobs write them
at the final iteration only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamem.em.angdist import pixel_directions


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Save next to ``path`` and rename over it (a reader never sees half a PNG)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")  # runfolder.is_run_file
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path


def plot_angdist(path: Path, counts: np.ndarray, titles: Sequence[str] | None = None) -> Path:
    """Heat map(s) of particles per HEALPix pixel. counts: (P,) or (K, P) with
    P = 12 * 4**order (nested order); titles: one per row of counts."""
    plt = _pyplot()
    counts = np.atleast_2d(np.asarray(counts, np.float64))
    order = int(round(np.log(counts.shape[1] / 12) / np.log(4)))
    rot, tilt = pixel_directions(order)
    lon = np.deg2rad(np.where(rot > 180, rot - 360, rot))
    lat = np.deg2rad(90.0 - tilt)
    K = counts.shape[0]
    fig = plt.figure(figsize=(6.4, 3.4 * K))
    for k in range(K):
        ax = fig.add_subplot(K, 1, k + 1, projection="mollweide")
        shown = counts[k] > 0
        sc = ax.scatter(
            lon[shown], lat[shown], c=counts[k][shown], s=max(2.0, 600.0 / 4**order),
            cmap="jet", marker="h",
        )  # fmt: skip
        ax.grid(True, lw=0.3)
        ax.set_xticklabels([])
        ax.set_title(
            (titles[k] if titles else "angular distribution")
            + f" ({int(counts[k].sum())} particles)",
            fontsize=9,
        )
        fig.colorbar(sc, ax=ax, shrink=0.7, label="particles per direction")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three central sections of a (B, B, B) [z, y, x] map: (z = B//2 [y, x],
    y = B//2 [z, x], x = B//2 [z, y])."""
    c = volume.shape[0] // 2
    return volume[c], volume[:, c], volume[:, :, c]


def plot_class_slices(
    path: Path, maps: np.ndarray, fractions, resolutions_A, pixel_size_A: float
) -> Path:
    """Central slices of each class: maps (K, B, B, B); fractions (K,); resolutions_A (K,)."""
    plt = _pyplot()
    maps = np.asarray(maps)
    K = maps.shape[0]
    fig, axes = plt.subplots(K, 3, figsize=(6.0, 2.1 * K), squeeze=False)
    for k in range(K):
        for j, (section, name) in enumerate(zip(central_slices(maps[k]), "zyx", strict=True)):
            ax = axes[k, j]
            ax.imshow(section, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(f"{name} = B/2", fontsize=9)
        axes[k, 0].set_ylabel(
            f"class {k + 1}\n{100 * fractions[k]:.1f}%  {resolutions_A[k]:.1f} Å", fontsize=8
        )
    fig.suptitle(f"class central slices (pixel {pixel_size_A:g} Å)", fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_class_sizes(path: Path, history: Sequence[Sequence[float]]) -> Path:
    """Class fractions over iterations: history[i] is iteration i+1's (K,) fractions."""
    plt = _pyplot()
    h = np.asarray(history, np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    its = np.arange(1, h.shape[0] + 1)
    for k in range(h.shape[1]):
        ax.plot(its, 100 * h[:, k], marker="o", ms=3, label=f"class {k + 1}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("particles (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
