"""Checks of option values, shared by the options dataclasses and the commands.

Every check raises :class:`~streamem.errors.InputError` with one line that names the
CLI option and the problem (``--particle-diameter must be positive (Å), got -50``),
and returns the value, so a check can sit inside an expression. ``None`` passes every
check (an option left at its default). Floats must also be finite: ``float("nan")``
and ``inf`` parse from the command line and would pass a bare ``<= 0`` test.

Decisions (what is refused, and why):

- Only impossible values are refused: a resolution or diameter <= 0, a step of 0, a
  negative range, a HEALPix order outside ``0..MAX_HEALPIX_ORDER``. Values that are
  merely unusual (an ``--ini-high`` finer than Nyquist, which RELION clamps) pass.
- HEALPix orders: coarse orders ``0..7`` (60° .. 0.47°); the fine pass of adaptive
  oversampling is one order finer (0.23° at 7), finer than any refinement here needs,
  and order 8 as a coarse global search would be ~10^9 orientations.
- Seeds: integers >= 0 (NumPy's generators refuse negative seeds).
- Symmetry names: see :func:`streamem.core.symmetry.parse_symmetry` (C1..C120,
  D2..D60, T, O, I, I1..I4).
"""

from __future__ import annotations

import math
import numbers

from streamem.errors import InputError

#: Largest coarse HEALPix order an option may ask for (step 60/2**7 = 0.47°).
MAX_HEALPIX_ORDER = 7


def _fail(option: str, problem: str, value) -> None:
    shown = f"{value:g}" if isinstance(value, float) else repr(value)  # -50.0 -> -50
    raise InputError(None, f"{option} {problem}, got {shown}")


def _unit(unit: str) -> str:
    return f" ({unit})" if unit else ""


def number(option: str, value, unit: str = ""):
    """``value`` if it is a finite real number (or None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(option, f"must be a number{_unit(unit)}", value)
    if not math.isfinite(value):
        _fail(option, f"must be a finite number{_unit(unit)}", value)
    return value


def integer(option: str, value):
    """``value`` if it is an integer (or None); floats such as 2.0 are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(option, "must be an integer", value)
    return value


def positive(option: str, value, unit: str = ""):
    """A finite number > 0 (or None)."""
    if number(option, value, unit) is not None and not value > 0:
        _fail(option, f"must be positive{_unit(unit)}", value)
    return value


def non_negative(option: str, value, unit: str = ""):
    """A finite number >= 0 (or None)."""
    if number(option, value, unit) is not None and not value >= 0:
        _fail(option, f"must be >= 0{_unit(unit)}", value)
    return value


def at_least(option: str, value, minimum: int):
    """An integer >= ``minimum`` (or None)."""
    if integer(option, value) is not None and value < minimum:
        _fail(option, f"must be >= {minimum}", value)
    return value


def in_range(option: str, value, low: float, high: float, unit: str = ""):
    """A finite number with ``low <= value <= high`` (or None)."""
    if number(option, value, unit) is not None and not low <= value <= high:
        _fail(option, f"must be in [{low:g}, {high:g}]{_unit(unit)}", value)
    return value


def fraction(option: str, value, *, open_low: bool = False, open_high: bool = False):
    """A number in [0, 1], with 0 or 1 left out where ``open_low``/``open_high``."""
    if number(option, value) is None:
        return None
    lo_ok = value > 0 if open_low else value >= 0
    hi_ok = value < 1 if open_high else value <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        _fail(option, f"must be in {interval}", value)
    return value


def healpix_order(option: str, value, maximum: int = MAX_HEALPIX_ORDER):
    """An integer HEALPix order in ``0..maximum`` (or None)."""
    if integer(option, value) is not None and not 0 <= value <= maximum:
        _fail(option, f"must be a HEALPix order in 0..{maximum}", value)
    return value


def seed(option: str, value):
    """A random seed: an integer >= 0."""
    return at_least(option, value, 0)


def symmetry(option: str, name):
    """A point-group name that :mod:`streamem.core.symmetry` knows; returns it unchanged."""
    from streamem.core.symmetry import parse_symmetry

    if name is None:
        return None
    parse_symmetry(name, option)
    return name


def finer_than(option_fine: str, fine, option_coarse: str, coarse, unit: str = "Å") -> None:
    """Refuse a resolution pair whose 'fine' limit (Å) is not below its 'coarse' one."""
    if fine is not None and coarse is not None and not fine < coarse:
        raise InputError(
            None,
            f"{option_fine} ({fine:g} {unit}) must be finer (smaller) than "
            f"{option_coarse} ({coarse:g} {unit})",
        )


def diameter_fits_box(
    option: str, diameter_A: float | None, box_size: int, pixel_size_A: float
) -> None:
    """Refuse a particle diameter larger than the box (``box_size * pixel_size_A`` Å).

    RELION only warns; here the solvent mask of such a diameter covers the whole box,
    so the run would fit noise outside the particle without saying so.
    """
    box_A = box_size * pixel_size_A
    if diameter_A is not None and diameter_A > box_A * (1 + 1e-9):
        raise InputError(
            None,
            f"{option} {diameter_A:g} Å is larger than the box "
            f"({box_size} px x {pixel_size_A:g} Å = {box_A:g} Å)",
        )
