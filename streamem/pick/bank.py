"""Template banks: padded Fourier transforms of 2-D templates, their in-plane
rotations read from the transforms, projections of a map, and template sizes.

Conventions: :mod:`streamem.pick.template`'s docstring ("Templates").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamem.core.backend import fftshift, ifftshift, to_numpy, xp_of
from streamem.pick.micrograph import WorkGrid, grid_frequencies

TEMPLATE_PADDING = 4


@dataclass(frozen=True)
class TemplateBank:
    """Padded, gridding-corrected, centred Fourier transforms of templates.

    ``ft`` complex64 ``(n, P, P)`` with frequency 0 at ``P // 2`` (P = padding · B).
    """

    ft: object
    box_size: int
    padding: int

    @property
    def n_templates(self) -> int:
        return int(self.ft.shape[0])


def prepare_templates(templates, padding: int = TEMPLATE_PADDING) -> TemplateBank:
    """Templates ``(n, B, B)`` (white protein, centre ``B//2``) -> :class:`TemplateBank`."""
    xp = xp_of(templates)
    t = xp.asarray(templates, dtype=xp.float32)
    if t.ndim == 2:
        t = t[None]
    n, B, B2 = t.shape
    if B != B2:
        raise ValueError(f"templates must be square, got {t.shape}")
    P = padding * B
    # bilinear interpolation of the padded FT multiplies the image by sinc²(x/P) sinc²(y/P)
    c = xp.arange(B, dtype=xp.float64) - B // 2
    s = xp.sinc(c / P) ** 2
    corr = (s[:, None] * s[None, :]).astype(xp.float32)
    padded = xp.zeros((n, P, P), dtype=xp.float32)
    o = P // 2 - B // 2
    padded[:, o : o + B, o : o + B] = t / corr
    F = xp.fft.fft2(ifftshift(padded, axes=(1, 2)), axes=(1, 2))
    return TemplateBank(fftshift(F, axes=(1, 2)).astype(xp.complex64), B, padding)


def _bilinear_plan(psi_deg: float, grid: WorkGrid, P: int, xp):
    """Flat indices (4, M) into a P x P centred grid and weights (4, M) of bilinear
    interpolation at ``Aᵀk`` for every work-grid frequency k (module docstring)."""
    ky, kx = grid_frequencies(grid, xp)
    a = math.radians(psi_deg)
    c, s = math.cos(a), math.sin(a)
    f = P / grid.size_px
    # A = [[c, s], [-s, c]] (x, y order); Aᵀk = (c kx − s ky, s kx + c ky)
    y = ((s * kx + c * ky) * f + P // 2).ravel()
    x = ((c * kx - s * ky) * f + P // 2).ravel()
    y0, x0 = xp.floor(y), xp.floor(x)
    fy, fx = (y - y0).astype(xp.float32), (x - x0).astype(xp.float32)
    y0, x0 = y0.astype(xp.int64), x0.astype(xp.int64)
    # beyond the padded grid (corners of a full-size work grid): zero
    ok = ((y0 >= 0) & (y0 < P - 1) & (x0 >= 0) & (x0 < P - 1)).astype(xp.float32)
    y0, x0 = xp.clip(y0, 0, P - 2), xp.clip(x0, 0, P - 2)
    base = y0 * P + x0
    index = xp.stack([base, base + 1, base + P, base + P + 1])
    weight = xp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]) * ok
    return index, weight


def rotated_template_ft(bank: TemplateBank, psi_deg: float, grid: WorkGrid, which=None):
    """``T̂(Aᵀk)`` on the work grid for in-plane angle ψ: ``(n, W, W//2+1)`` complex64.

    Bilinear interpolation of the padded transforms; ``which``: optional template
    indices (default all).
    """
    xp = xp_of(bank.ft)
    P = bank.ft.shape[-1]
    index, weight = _bilinear_plan(psi_deg, grid, P, xp)
    flat = bank.ft.reshape(bank.n_templates, P * P)
    if which is not None:
        flat = flat[xp.asarray(which)]
    out = xp.zeros((flat.shape[0], index.shape[1]), dtype=xp.complex64)
    for corner in range(4):
        out += xp.take(flat, index[corner], axis=1) * weight[corner]
    W = grid.work_px
    return out.reshape(flat.shape[0], W, W // 2 + 1)


def template_box_from_diameter(diameter_A: float, pixel_size_A: float) -> int:
    """An even box 1.5x the diameter (RELION's box for Gaussian-blob references)."""
    b = int(math.ceil(1.5 * diameter_A / pixel_size_A))
    return b + b % 2


def estimate_particle_diameter_A(templates, pixel_size_A: float, rel: float = 0.05) -> float:
    """Twice the largest radius where ``|template| > rel · max|template|``, median over templates."""
    t = np.abs(to_numpy(templates)).reshape(-1, *np.shape(templates)[-2:])
    B = t.shape[-1]
    c = np.arange(B) - B // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    radii = []
    for img in t:
        m = img > rel * img.max() if img.max() > 0 else np.zeros_like(img, dtype=bool)
        radii.append(r[m].max() if m.any() else B / 4)
    return float(2.0 * np.median(radii) * pixel_size_A)


def projection_templates(volume, healpix_order: int = 1, symmetry: str = "C1"):
    """Projections of a map at HEALPix directions (psi 0) in the asymmetric unit.

    Returns (templates ``(n, B, B)`` float32, angles ``(n, 3)`` (rot, tilt, psi) deg).
    The picker's in-plane rotations supply psi.
    """
    from streamem.core.euler import euler_to_matrix
    from streamem.core.projector import make_projector, project_images
    from streamem.core.sampling import healpix_directions
    from streamem.core.symmetry import asymmetric_unit_mask

    rot, tilt = healpix_directions(healpix_order)
    keep = asymmetric_unit_mask(rot, tilt, symmetry)
    rot, tilt = rot[keep], tilt[keep]
    xp = xp_of(volume)
    fvol = make_projector(xp.asarray(volume, dtype=xp.float32), 2)
    A = xp.asarray(euler_to_matrix(rot, tilt, np.zeros_like(rot)))
    images = project_images(fvol, A)
    return images, np.stack([rot, tilt, np.zeros_like(rot)], axis=1)
