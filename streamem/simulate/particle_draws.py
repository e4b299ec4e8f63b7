"""What ``streamem simulate`` draws for each particle: the run's parameters and the seeded
per-particle random draws (pose, shift, defocus, class, junk), one generator per particle
and stream, so a particle's draws do not depend on the chunking or the worker.
Image formation and the store job are in :mod:`streamem.simulate.particles`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from streamem.core.ctf import OpticsParams
from streamem.errors import InputError


@dataclass(frozen=True)
class ParticleSimParams:
    """Everything that decides the simulated data besides the volumes themselves."""

    n_particles: int
    box_size: int = 128
    pixel_size_A: float = 1.5
    snr: float = 0.05
    seed: int = 0
    fractions: tuple[float, ...] = (1.0,)
    junk_fraction: float = 0.0
    orientation: str = "uniform"
    preferred_fraction: float = 0.7
    preferred_spread_deg: float = 20.0
    max_shift_A: float = 3.0
    defocus_range_A: tuple[float, float] = (10000.0, 30000.0)
    astigmatism_A: float = 500.0
    defocus_spread_A: float = 100.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0
    ctf: bool = True
    particles_per_micrograph: int = 100
    n_reference: int = 64
    interpolation_order: int = 3
    volume_names: tuple[str, ...] = field(default=("volume1",))

    def __post_init__(self):
        problems = []
        if self.n_particles < 1:
            problems.append(f"n_particles must be >= 1, got {self.n_particles}")
        if self.box_size < 8:
            problems.append(f"box must be >= 8 pixels, got {self.box_size}")
        if self.pixel_size_A <= 0:
            problems.append(f"pixel size must be positive, got {self.pixel_size_A}")
        if not self.snr > 0 or not math.isfinite(self.snr):
            problems.append(f"snr must be positive and finite, got {self.snr}")
        if not 0.0 <= self.junk_fraction <= 1.0:
            problems.append(f"junk fraction must be in [0, 1], got {self.junk_fraction}")
        if not self.fractions or any(f < 0 for f in self.fractions) or sum(self.fractions) <= 0:
            problems.append(f"mix fractions must be >= 0 with a positive sum: {self.fractions}")
        if self.orientation not in ("uniform", "preferred"):
            problems.append(f"orientation must be 'uniform' or 'preferred': {self.orientation!r}")
        if not 0.0 <= self.preferred_fraction <= 1.0:
            problems.append(f"preferred fraction must be in [0, 1]: {self.preferred_fraction}")
        lo, hi = self.defocus_range_A
        if self.ctf and not 0 < lo <= hi:
            problems.append(f"defocus range must satisfy 0 < min <= max, got {lo}, {hi}")
        if self.max_shift_A < 0 or self.astigmatism_A < 0 or self.defocus_spread_A < 0:
            problems.append("max shift, astigmatism and defocus spread must be >= 0")
        if self.particles_per_micrograph < 1 or self.n_reference < 1:
            problems.append("particles per micrograph and n_reference must be >= 1")
        if self.bfactor_A2 < 0:
            problems.append(f"B-factor must be >= 0, got {self.bfactor_A2}")
        if not 0 <= self.amplitude_contrast < 1 or self.voltage_kV <= 0:
            problems.append("voltage must be > 0 and amplitude contrast in [0, 1)")
        if problems:
            raise InputError(None, "; ".join(problems))

    @property
    def optics(self) -> OpticsParams:
        return OpticsParams(self.voltage_kV, self.cs_mm, self.amplitude_contrast)

    @property
    def class_probabilities(self) -> np.ndarray:
        """(K + 1,) probabilities of junk (index 0) and of each volume."""
        f = np.asarray(self.fractions, dtype=np.float64)
        return np.concatenate([[self.junk_fraction], (1.0 - self.junk_fraction) * f / f.sum()])

    @property
    def bg_radius_px(self) -> float:
        return 0.75 * self.box_size / 2.0


# -- per-particle random draws -----------------------------------------------------------


def _particle_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream, int(index)]))


def draw_particles(
    params: ParticleSimParams, start: int, stop: int, stream: int = 0
) -> tuple[dict[str, np.ndarray], list[np.random.Generator]]:
    """Per-particle parameters of particles ``[start, stop)`` and their generators.

    Returns ``({label: (n,) array}, rngs)``: ``class`` (0 = junk), ``rot``, ``tilt``,
    ``psi`` (deg), ``shift_y``, ``shift_x`` (px), ``defocus_u``, ``defocus_v`` (Å),
    ``defocus_angle`` (deg), ``micrograph`` (index). The generators continue each
    particle's stream (for its noise). ``stream`` 2 draws reference particles
    (never junk).
    """
    n = stop - start
    p = params
    probs = p.class_probabilities
    if stream == 2:
        probs = np.concatenate([[0.0], probs[1:] / probs[1:].sum()])
    cum = np.cumsum(probs)
    out = {
        k: np.empty(n)
        for k in (
            "rot",
            "tilt",
            "psi",
            "shift_y",
            "shift_x",
            "defocus_u",
            "defocus_v",
            "defocus_angle",
        )
    }
    out["class"] = np.empty(n, dtype=np.int32)
    out["micrograph"] = np.empty(n, dtype=np.int64)
    rngs = []
    mic_cache: dict[int, tuple[float, float, float]] = {}
    lo, hi = p.defocus_range_A
    max_shift_px = p.max_shift_A / p.pixel_size_A
    kappa = 1.0 / np.deg2rad(max(p.preferred_spread_deg, 1e-3)) ** 2
    for j, i in enumerate(range(start, stop)):
        rng = _particle_rng(p.seed, stream, i)
        u = rng.random(8)
        out["class"][j] = min(int(np.searchsorted(cum, u[0] * cum[-1], side="right")), len(cum) - 1)
        out["rot"][j] = 360.0 * u[1]
        out["psi"][j] = 360.0 * u[2]
        if p.orientation == "preferred" and u[3] < p.preferred_fraction:
            # Fisher distribution about +z: cos(tilt) = 1 + log(1 - v (1 - e^{-2κ})) / κ
            cos_t = 1.0 + np.log1p(-u[4] * -np.expm1(-2.0 * kappa)) / kappa
        else:
            cos_t = 2.0 * u[4] - 1.0
        out["tilt"][j] = np.rad2deg(np.arccos(np.clip(cos_t, -1.0, 1.0)))
        r = max_shift_px * np.sqrt(u[5])
        out["shift_y"][j] = r * np.sin(2 * np.pi * u[6])
        out["shift_x"][j] = r * np.cos(2 * np.pi * u[6])
        # reference particles each get their own micrograph (defocus): S averages over defocus
        mic = i if stream == 2 else i // p.particles_per_micrograph
        if mic not in mic_cache:
            m = _particle_rng(p.seed, 1 if stream == 0 else 3, mic).random(3)
            mean = lo + (hi - lo) * m[0]
            astig = p.astigmatism_A * m[1]
            mic_cache[mic] = (mean + astig / 2, mean - astig / 2, 180.0 * m[2])
        du, dv, ang = mic_cache[mic]
        height = p.defocus_spread_A * (2.0 * u[7] - 1.0)
        out["defocus_u"][j], out["defocus_v"][j] = du + height, dv + height
        out["defocus_angle"][j] = ang
        out["micrograph"][j] = mic
        rngs.append(rng)
    return out, rngs
