"""Post-processing commands: ``mask-create``, ``postprocess``, ``local-resolution``
(as ``relion_mask_create``, ``relion_postprocess`` and ``relion_postprocess --locres``).

Argument checks and file I/O live here; the numerics are in :mod:`streamem.post`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from streamem import validate as check
from streamem.errors import InputError

MASK_HELP = "make a soft solvent mask from a map (as relion_mask_create)"
POST_HELP = "mask-corrected FSC, resolution and sharpened map from two half maps"
LOCRES_HELP = "local resolution map from two half maps (windowed FSC)"


def register(sub) -> None:
    p = sub.add_parser(
        "mask-create",
        help=MASK_HELP,
        description=MASK_HELP
        + ": threshold the map (optionally low-pass filtered first), grow the region by "
        "--extend pixels (negative shrinks it) and add a raised-cosine edge of --soft-edge "
        "pixels.",
    )
    p.add_argument("map", help="input map (.mrc)")
    p.add_argument("--out", required=True, help="output mask (.mrc)")
    p.add_argument("--threshold", type=float, required=True, help="density threshold")
    p.add_argument("--extend", type=float, default=0.0, help="grow the region by N px [0]")
    p.add_argument("--soft-edge", type=float, default=0.0, help="soft edge width in px [0]")
    p.add_argument("--lowpass", type=float, default=None, help="low-pass the map first (Å)")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å) [from header]")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_mask_create)

    p = sub.add_parser(
        "postprocess",
        help=POST_HELP,
        description=POST_HELP + " (as relion_postprocess). Writes OUT/postprocess.mrc (sharpened), "
        "OUT/postprocess_masked.mrc, OUT/postprocess.star (FSC curves, Guinier plot), "
        "OUT/postprocess_fsc.png and OUT/postprocess_guinier.png. Without a mask only the "
        "unmasked FSC is used.",
    )
    p.add_argument("half1", help="half map 1 (.mrc)")
    p.add_argument("half2", help="half map 2 (.mrc)")
    p.add_argument("--out", required=True, help="output folder")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mask", default=None, help="solvent mask (.mrc, values in [0, 1])")
    m.add_argument(
        "--auto-mask",
        action="store_true",
        help="make a mask from the average map (15 Å low-pass, threshold above the "
        "solvent noise, 3 px extension, 6 px soft edge); written as postprocess_automask.mrc",
    )
    p.add_argument(
        "--bfactor",
        type=float,
        default=None,
        help="B-factor to apply (Å², negative sharpens, as RELION's --adhoc_bfac) "
        "[fitted from the Guinier plot]",
    )
    p.add_argument("--autob-lowres", type=float, default=10.0, help="Guinier fit from (Å) [10]")
    p.add_argument(
        "--autob-highres", type=float, default=None, help="Guinier fit to (Å) [the resolution]"
    )
    p.add_argument("--mtf", default=None, help="detector MTF (STAR file, as RELION's)")
    p.add_argument(
        "--mtf-angpix", type=float, default=None, help="micrograph pixel size for --mtf (Å)"
    )
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å) [from header]")
    p.add_argument("--lowpass", type=float, default=None, help="low-pass at (Å) [resolution]")
    p.add_argument(
        "--skip-fsc-weighting",
        action="store_true",
        help="do not weight shells by sqrt(2 FSC / (1 + FSC))",
    )
    p.add_argument(
        "--randomize-at-fsc",
        type=float,
        default=0.8,
        help="randomise phases from where the unmasked FSC falls below this [0.8]",
    )
    p.add_argument(
        "--randomize-at-A",
        type=float,
        default=None,
        dest="randomize_at_A",
        help="randomise phases from this resolution (Å) instead",
    )
    p.add_argument(
        "--force-mask",
        action="store_true",
        help="keep the masked FSC even if the unmasked one reaches further",
    )
    p.add_argument("--seed", type=int, default=0, help="phase-randomisation seed [0]")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_postprocess)

    p = sub.add_parser(
        "local-resolution",
        help=LOCRES_HELP,
        description=LOCRES_HELP
        + " (as relion_postprocess --locres): a soft spherical window is moved over a grid; "
        "each window's FSC is corrected by phase randomisation and the resolution at 0.143 "
        "is interpolated into a map (Å).",
    )
    p.add_argument("half1", help="half map 1 (.mrc)")
    p.add_argument("half2", help="half map 2 (.mrc)")
    p.add_argument("--out", required=True, help="output map (.mrc), in Å")
    p.add_argument("--mask", default=None, help="sample only near this mask (.mrc)")
    p.add_argument("--sampling", type=float, default=25.0, help="grid spacing (Å) [25]")
    p.add_argument("--maskrad", type=float, default=None, help="window radius (Å) [sampling/2]")
    p.add_argument("--edgewidth", type=float, default=None, help="window edge (Å) [sampling]")
    p.add_argument("--randomize-at", type=float, default=25.0, help="randomise from (Å) [25]")
    p.add_argument("--minres", type=float, default=50.0, help="worst resolution reported (Å)")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å) [from header]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_local_resolution)


# -- input checks ---------------------------------------------------------------------


def _read_cubic(path: str) -> tuple[np.ndarray, float]:
    from streamem.io.mrc import read_map

    data, voxel = read_map(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"not a cubic 3-D map (shape {data.shape})")
    return data, voxel


def _pixel_size(path: str, voxel_A: float, angpix: float | None) -> float:
    if angpix is not None:
        if angpix <= 0:
            raise InputError(None, f"--angpix must be positive, got {angpix}")
        return float(angpix)
    if not voxel_A > 0:
        raise InputError(path, "no voxel size in the header: give --angpix")
    return float(voxel_A)


def _same_grid(ref_path: str, ref, ref_voxel: float, path: str, data, voxel: float) -> None:
    if data.shape != ref.shape:
        raise InputError(path, f"box {data.shape} differs from {ref_path}'s {ref.shape}")
    if voxel > 0 and ref_voxel > 0 and abs(voxel - ref_voxel) > 1e-3 * ref_voxel:
        raise InputError(
            path, f"voxel size {voxel:.4f} Å differs from {ref_path}'s {ref_voxel:.4f} Å"
        )


def read_half_maps(half1: str, half2: str, angpix: float | None):
    """Both half maps, the pixel size and half1's header voxel size; InputError if the
    maps do not match."""
    h1, v1 = _read_cubic(half1)
    h2, v2 = _read_cubic(half2)
    _same_grid(half1, h1, v1, half2, h2, v2)
    return h1, h2, _pixel_size(half1, v1, angpix), v1


def read_mask(path: str, half1_path: str, half1, half1_voxel_A: float) -> np.ndarray:
    from streamem.io.mrc import read_map

    mask, voxel = read_map(path)
    _same_grid(half1_path, half1, half1_voxel_A, path, mask, voxel)
    if float(mask.min()) < -1e-6 or float(mask.max()) > 1 + 1e-6:
        raise InputError(
            path, f"mask values must lie in [0, 1] (found {mask.min():.3g}..{mask.max():.3g})"
        )
    return np.clip(mask, 0.0, 1.0)


def read_mtf(path: str, micrograph_pixel_size_A: float):
    """A RELION MTF STAR file (``rlnResolutionInversePixel``, ``rlnMtfValue``)."""
    import starfile

    from streamem.post.postprocess import Mtf

    p = Path(path)
    if not p.exists():
        raise InputError(path, "file not found")
    try:
        data = starfile.read(p, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed files
        raise InputError(path, f"not a readable STAR file ({exc})") from None
    need = ("rlnResolutionInversePixel", "rlnMtfValue")
    table = next(
        (b for b in data.values() if isinstance(b, pd.DataFrame) and all(c in b for c in need)),
        None,
    )
    if table is None:
        raise InputError(path, "no table with rlnResolutionInversePixel and rlnMtfValue")
    f = table["rlnResolutionInversePixel"].to_numpy(np.float64)
    v = table["rlnMtfValue"].to_numpy(np.float64)
    if f.size < 2 or not np.all(np.isfinite(f)) or not np.all(np.isfinite(v)):
        raise InputError(path, "MTF needs at least 2 finite rows")
    if np.any(np.diff(f) <= 0):
        raise InputError(path, "rlnResolutionInversePixel must increase")
    if np.any(v <= 1e-10):
        raise InputError(path, "rlnMtfValue must be positive")
    return Mtf.from_relion(f, v, micrograph_pixel_size_A)


# -- option checks: every value before any map is read (InputError naming the option) --


def check_mask_create_options(args) -> None:
    """``--extend`` may be negative (it shrinks the region); the rest are widths and sizes."""
    check.number("--threshold", args.threshold)
    check.number("--extend", args.extend, "pixels")
    check.non_negative("--soft-edge", args.soft_edge, "pixels")
    check.positive("--lowpass", args.lowpass, "Å")
    check.positive("--angpix", args.angpix, "Å")


def check_postprocess_options(args) -> None:
    """Resolutions positive, the Guinier range ordered, ``--randomize-at-fsc`` in (0, 1]."""
    check.number("--bfactor", args.bfactor, "Å^2")  # any sign: negative sharpens
    check.positive("--autob-lowres", args.autob_lowres, "Å")
    check.positive("--autob-highres", args.autob_highres, "Å")
    check.finer_than("--autob-highres", args.autob_highres, "--autob-lowres", args.autob_lowres)
    check.positive("--mtf-angpix", args.mtf_angpix, "Å")
    check.positive("--angpix", args.angpix, "Å")
    check.positive("--lowpass", args.lowpass, "Å")
    check.fraction("--randomize-at-fsc", args.randomize_at_fsc, open_low=True)
    check.positive("--randomize-at-A", args.randomize_at_A, "Å")
    check.seed("--seed", args.seed)


def check_local_resolution_options(args) -> None:
    """Grid spacing, window and resolutions: all positive lengths in Å."""
    for option, value in (
        ("--sampling", args.sampling),
        ("--maskrad", args.maskrad),
        ("--edgewidth", args.edgewidth),
        ("--randomize-at", args.randomize_at),
        ("--minres", args.minres),
        ("--angpix", args.angpix),
    ):
        check.positive(option, value, "Å")
    check.seed("--seed", args.seed)


# -- mask-create ----------------------------------------------------------------------


def run_mask_create(args) -> int:
    from streamem.io.atomic import check_output
    from streamem.io.mrc import write_map
    from streamem.post.mask import create_mask, mask_volume_fraction

    check_mask_create_options(args)
    check_output(args.out, args.overwrite, [args.map])
    vol, voxel = _read_cubic(args.map)
    if args.soft_edge < 0:
        raise InputError(None, f"--soft-edge must be >= 0, got {args.soft_edge}")
    if args.lowpass is not None and args.lowpass <= 0:
        raise InputError(None, f"--lowpass must be positive, got {args.lowpass}")
    need_px = args.lowpass is not None or args.angpix is not None
    px = _pixel_size(args.map, voxel, args.angpix) if need_px else voxel
    mask = create_mask(vol, args.threshold, args.extend, args.soft_edge, args.lowpass, px)
    if not np.any(mask > 0):
        raise InputError(args.map, f"no voxel reaches the threshold {args.threshold}")
    write_map(args.out, mask, px, overwrite=args.overwrite, inputs=[args.map])
    print(
        f"wrote {args.out} ({vol.shape[0]}^3, {mask_volume_fraction(mask):.1%} of the box "
        "above 0.5)"
    )
    return 0


# -- postprocess ----------------------------------------------------------------------


def _star_blocks(result, args, out_dir: Path, mask_name: str | None) -> dict:
    k = np.arange(result.box_size // 2 + 1)
    res = result.resolution_per_shell_A
    res_A = np.where(np.isfinite(res), res, 999.0)
    general = {
        "rlnFinalResolution": result.resolution_A,
        "rlnBfactorUsedForSharpening": result.bfactor_A2,
        "rlnUnfilteredMapHalf1": str(args.half1),
        "rlnUnfilteredMapHalf2": str(args.half2),
        "rlnPostprocessedMap": str(out_dir / "postprocess.mrc"),
    }
    if mask_name is not None:
        general["rlnParticleBoxFractionSolventMask"] = 0.476 / max(result.mask_fraction, 1e-12)
        general["rlnMaskName"] = mask_name
        general["rlnRandomiseFrom"] = result.randomize_from_A
        general["rlnPostprocessedMapMasked"] = str(out_dir / "postprocess_masked.mrc")
    if result.guinier_fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = result.guinier_fit.slope_A2
        general["rlnFittedInterceptGuinierPlot"] = result.guinier_fit.intercept
        general["rlnCorrelationFitGuinierPlot"] = result.guinier_fit.correlation
    fsc = {
        "rlnSpectralIndex": k.astype(np.int64),
        "rlnResolution": 1.0 / res_A,
        "rlnAngstromResolution": res_A,
    }
    if mask_name is not None:
        fsc["rlnFourierShellCorrelationCorrected"] = result.fsc_corrected
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_unmasked
        fsc["rlnFourierShellCorrelationMaskedMaps"] = result.fsc_masked
        fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = (
            result.fsc_random_masked
        )
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result.fsc_unmasked

    def y(curve):  # RELION writes -99 where a shell has no amplitude
        return np.where(np.isfinite(curve), curve, -99.0)

    guinier = {
        "rlnResolutionSquared": result.frequency_squared_A2,
        "rlnLogAmplitudesOriginal": y(result.guinier_in),
    }
    if result.guinier_invmtf is not None:
        guinier["rlnLogAmplitudesMTFCorrected"] = y(result.guinier_invmtf)
    guinier["rlnLogAmplitudesWeighted"] = y(result.guinier_weighted)
    guinier["rlnLogAmplitudesSharpened"] = y(result.guinier_sharpened)
    if result.guinier_fit is not None:
        guinier["rlnLogAmplitudesIntercept"] = np.full(k.shape, result.guinier_fit.intercept)
    return {
        "general": general,
        "fsc": pd.DataFrame(fsc),
        "guinier": pd.DataFrame(guinier),
    }


def _save_plots(result, out_dir: Path) -> None:
    from matplotlib.figure import Figure

    from streamem.post.postprocess import plot_fsc, plot_guinier

    for name, plot in (
        ("postprocess_fsc.png", plot_fsc),
        ("postprocess_guinier.png", plot_guinier),
    ):
        fig = Figure(figsize=(6, 4), layout="tight")
        plot(result, fig.add_subplot())
        fig.savefig(out_dir / name, dpi=100)


def run_postprocess(args) -> int:
    from streamem.io.atomic import atomic_output, check_output
    from streamem.io.mrc import write_map
    from streamem.io.relion import write_star
    from streamem.post.mask import auto_mask
    from streamem.post.postprocess import postprocess

    check_postprocess_options(args)
    inputs = [args.half1, args.half2, args.mask, args.mtf]
    out_dir = check_output(args.out, args.overwrite, inputs)
    for name in ("autob_lowres", "autob_highres", "lowpass", "randomize_at_A"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(None, f"--{name.replace('_', '-')} must be positive, got {value}")
    h1, h2, px, v1 = read_half_maps(args.half1, args.half2, args.angpix)
    mask, mask_name = None, None
    if args.mask is not None:
        mask = read_mask(args.mask, args.half1, h1, v1)
        mask_name = str(args.mask)
    elif args.auto_mask:
        mask = auto_mask(0.5 * (h1 + h2), px)
        if not np.any(mask > 0.5):
            raise InputError(args.half1, "--auto-mask found no density above the solvent noise")
        mask_name = str(out_dir / "postprocess_automask.mrc")
    mtf = None
    if args.mtf is not None:
        mtf_px = args.mtf_angpix if args.mtf_angpix is not None else px
        if mtf_px <= 0:
            raise InputError(None, f"--mtf-angpix must be positive, got {mtf_px}")
        mtf = read_mtf(args.mtf, mtf_px)

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            result = postprocess(
                h1,
                h2,
                px,
                mask=mask,
                bfactor_A2=args.bfactor,
                mtf=mtf,
                fit_min_resolution_A=args.autob_lowres,
                fit_max_resolution_A=args.autob_highres,
                randomize_at_fsc=args.randomize_at_fsc,
                randomize_at_A=args.randomize_at_A,
                fsc_weighting=not args.skip_fsc_weighting,
                lowpass_A=args.lowpass,
                force_mask=args.force_mask,
                seed=args.seed,
            )
        except ValueError as exc:
            hint = ""
            if "never falls below" in str(exc):
                hint = " (are the half maps identical? --randomize-at-A sets it by hand)"
            raise InputError(args.half1, f"{exc}{hint}") from None

    with atomic_output(out_dir, args.overwrite, inputs, "postprocess") as tmp:
        tmp.mkdir(parents=True)
        write_map(tmp / "postprocess.mrc", result.sharpened, px)
        if mask is not None:
            write_map(tmp / "postprocess_masked.mrc", result.sharpened_masked, px)
        if args.auto_mask:
            write_map(tmp / "postprocess_automask.mrc", mask, px)
        write_star(tmp / "postprocess.star", _star_blocks(result, args, out_dir, mask_name))
        _save_plots(result, tmp)

    for note in result.warnings:
        print(f"warning: {note}")
    if result.randomize_from_A is not None:
        print(f"phases randomised beyond {result.randomize_from_A:.2f} Å")
    if result.guinier_fit is not None:
        fit = result.guinier_fit
        print(
            f"Guinier fit {fit.min_resolution_A:.2f}-{fit.max_resolution_A:.2f} Å: "
            f"B = {fit.bfactor_A2:.1f} Å² (correlation {fit.correlation:.3f})"
        )
    print(f"final resolution {result.resolution_A:.2f} Å; B-factor {result.bfactor_A2:.1f} Å²")
    print(f"wrote {out_dir}/postprocess.mrc, postprocess.star and plots")
    return 0


# -- local-resolution -----------------------------------------------------------------


def run_local_resolution(args) -> int:
    from streamem.io.atomic import check_output
    from streamem.io.mrc import write_map
    from streamem.post.locres import local_resolution_points

    check_local_resolution_options(args)
    inputs = [args.half1, args.half2, args.mask]
    check_output(args.out, args.overwrite, inputs)
    h1, h2, px, v1 = read_half_maps(args.half1, args.half2, args.angpix)
    mask = None
    if args.mask is not None:
        mask = read_mask(args.mask, args.half1, h1, v1)
    for name in ("sampling", "maskrad", "edgewidth", "randomize_at", "minres"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(None, f"--{name.replace('_', '-')} must be positive, got {value}")
    step = max(int(round(args.sampling / px)), 1)
    radius = (0.5 * args.sampling if args.maskrad is None else args.maskrad) / px
    edge = (args.sampling if args.edgewidth is None else args.edgewidth) / px
    try:
        lr = local_resolution_points(
            h1,
            h2,
            px,
            mask=mask,
            step_px=step,
            window_radius_px=radius,
            edge_px=edge,
            randomize_at_A=args.randomize_at,
            min_resolution_A=args.minres,
            seed=args.seed,
        )
    except ValueError as exc:
        raise InputError(args.half1, str(exc)) from None
    if len(lr.points_px) == 0:
        raise InputError(args.mask or args.half1, "no sampling point inside the mask")
    write_map(args.out, lr.map, px, overwrite=args.overwrite, inputs=inputs)
    d = lr.resolution_A
    print(
        f"{len(d)} windows (sub-box {lr.sub_box} px): local resolution "
        f"{d.min():.2f}-{d.max():.2f} Å, median {np.median(d):.2f} Å"
    )
    print(f"wrote {args.out}")
    return 0
