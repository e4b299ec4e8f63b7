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


def bilinear_plan_at(ky, kx, psi_deg: float, scale: float, origin: int, size: int, xp):
    """Bilinear interpolation at ``Aᵀk`` (A: in-plane angle ψ, module docstring) on a
    ``size x size`` grid whose frequency 0 is at index ``origin`` and whose step is
    ``1/scale`` S-box frequencies.

    ``ky``, ``kx`` float64 (any shape, flattened) S-box frequencies. Returns flat
    indices ``(4, M)`` int64 and weights ``(4, M)`` float32, zero where a corner falls
    off the grid.
    """
    a = math.radians(psi_deg)
    c, s = math.cos(a), math.sin(a)
    # A = [[c, s], [-s, c]] (x, y order); Aᵀk = (c kx − s ky, s kx + c ky)
    y = ((s * kx + c * ky) * scale + origin).ravel()
    x = ((c * kx - s * ky) * scale + origin).ravel()
    y0, x0 = xp.floor(y), xp.floor(x)
    fy, fx = (y - y0).astype(xp.float32), (x - x0).astype(xp.float32)
    y0, x0 = y0.astype(xp.int64), x0.astype(xp.int64)
    ok = ((y0 >= 0) & (y0 < size - 1) & (x0 >= 0) & (x0 < size - 1)).astype(xp.float32)
    y0, x0 = xp.clip(y0, 0, size - 2), xp.clip(x0, 0, size - 2)
    base = y0 * size + x0
    index = xp.stack([base, base + 1, base + size, base + size + 1])
    weight = xp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]) * ok
    return index, weight


def _interpolated(bank: TemplateBank, index, weight, which=None):
    """``Σ_corners weight · ft[index]``: ``(n, M)`` complex64."""
    xp = xp_of(bank.ft)
    P = bank.ft.shape[-1]
    flat = bank.ft.reshape(bank.n_templates, P * P)
    if which is not None:
        flat = flat[xp.asarray(which)]
    out = xp.zeros((flat.shape[0], index.shape[1]), dtype=xp.complex64)
    for corner in range(4):
        out += xp.take(flat, index[corner], axis=1) * weight[corner]
    return out


def rotated_template_ft(bank: TemplateBank, psi_deg: float, grid: WorkGrid, which=None):
    """``T̂(Aᵀk)`` on the work grid for in-plane angle ψ: ``(n, W, W//2+1)`` complex64.

    Bilinear interpolation of the padded transforms; ``which``: optional template
    indices (default all).
    """
    xp = xp_of(bank.ft)
    P = bank.ft.shape[-1]
    ky, kx = grid_frequencies(grid, xp)
    index, weight = bilinear_plan_at(ky, kx, psi_deg, P / grid.size_px, P // 2, P, xp)
    out = _interpolated(bank, index, weight, which)
    W = grid.work_px
    return out.reshape(out.shape[0], W, W // 2 + 1)


def template_images(bank: TemplateBank, psi_deg: float, grid: WorkGrid, box_px: int, which=None):
    """The templates rotated by ψ, in real space at the work grid's sampling, centred at
    ``box_px // 2`` of a ``box_px`` square: ``(n, box_px, box_px)`` float32.

    The same ``T̂(Aᵀk)`` as :func:`rotated_template_ft`, read at the box's own
    frequencies (step W / box_px S-box frequencies) up to the work grid's Nyquist, so
    that ``Σ_s image(s) y(r + s)`` is the work-grid correlation of the template with
    y at r, up to what the template holds beyond the box (none for a box that holds
    the rotated template box) and beyond the work grid's Nyquist square.
    """
    xp = xp_of(bank.ft)
    P = bank.ft.shape[-1]
    b, W = int(box_px), grid.work_px
    ky, kx = xp.meshgrid(
        xp.fft.fftfreq(b, d=1.0 / b) * (W / b),
        xp.arange(b // 2 + 1, dtype=xp.float64) * (W / b),
        indexing="ij",
    )
    index, weight = bilinear_plan_at(ky, kx, psi_deg, P / grid.size_px, P // 2, P, xp)
    spectra = _interpolated(bank, index, weight, which).reshape(-1, b, b // 2 + 1)
    images = xp.fft.irfft2(spectra, s=(b, b), axes=(-2, -1))
    return fftshift(images, axes=(-2, -1)).astype(xp.float32)


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
