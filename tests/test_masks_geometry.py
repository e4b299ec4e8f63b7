"""Mask geometry for ``mask-create`` and ``postprocess --auto-mask``: dilation volume,
soft-edge width, erosion, low-pass, automatic threshold."""

import numpy as np
import pytest

from streamem.core.masks import centred_radius
from streamem.post.mask import auto_mask, create_mask, largest_components

BOX = 48


def ball(radius_px: float, box: int = BOX) -> np.ndarray:
    return (centred_radius(box) <= radius_px).astype(np.float32)


def equivalent_radius(mask) -> float:
    """Radius of the sphere with the mask's volume (px)."""
    return float((3.0 * mask.sum() / (4.0 * np.pi)) ** (1.0 / 3.0))


def test_grown_point_is_a_ball():
    point = np.zeros((BOX,) * 3, dtype=np.float32)
    point[BOX // 2, BOX // 2, BOX // 2] = 1.0
    for n in (5, 8):
        m = create_mask(point, 0.5, extend_px=n)
        assert m.sum() == pytest.approx(4.0 / 3.0 * np.pi * n**3, rel=0.02)


@pytest.mark.parametrize("r", [7.0, 12.0, 16.0])
@pytest.mark.parametrize("extend", [0, 2, 5, 8])
def test_dilated_sphere_volume(r, extend):
    """Growing a sphere of radius r by N px gives a sphere of radius r + N.

    Distances are between voxel centres (as RELION's mask_create measures them), and
    the outermost voxel centres of a digitised sphere lie up to half a voxel inside r,
    so the grown sphere's radius falls short of r + N by 0.2-0.35 px; the volume is
    within 8 % of 4/3 π (r + N)³ from r = 12 px on (11 % at r = 7 px, N = 2).
    """
    m = create_mask(ball(r), 0.5, extend_px=extend, soft_edge_px=0)
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert equivalent_radius(m) == pytest.approx(r + extend, abs=0.4)
    if r >= 12:
        assert m.sum() == pytest.approx(4.0 / 3.0 * np.pi * (r + extend) ** 3, rel=0.08)


def test_eroded_sphere_volume():
    r = 12.0
    m = create_mask(ball(r), 0.5, extend_px=-4, soft_edge_px=0)
    assert equivalent_radius(m) == pytest.approx(r - 4, abs=0.5)
    assert np.all(m <= ball(r))


@pytest.mark.parametrize("edge", [3, 6])
def test_soft_edge_goes_from_one_to_zero_over_its_width(edge):
    r, ext = 6.0, 3
    m = create_mask(ball(r), 0.5, extend_px=ext, soft_edge_px=edge)
    c = BOX // 2
    profile = m[c, c, c:]  # along +x from the centre: distance d = x - r from the ball
    d = np.arange(profile.size) - r
    assert np.all(profile[d <= ext] == 1.0)
    assert np.all(profile[d >= ext + edge] == 0.0)
    inside_edge = (d > ext) & (d < ext + edge)
    assert np.count_nonzero((profile > 0) & (profile < 1)) == np.count_nonzero(inside_edge)
    np.testing.assert_allclose(
        profile[inside_edge], 0.5 * (1 + np.cos(np.pi * (d[inside_edge] - ext) / edge)), atol=1e-6
    )
    # In volume: the soft mask is a hard ball of radius a plus a raised-cosine shell
    # ∫ 4πρ² e(ρ - a) dρ of width `edge`; a is calibrated on the hard mask grown to the
    # middle of the edge (which absorbs the voxel-centre offset, see above).
    a = equivalent_radius(create_mask(ball(r), 0.5, extend_px=ext + edge / 2)) - edge / 2
    rho = np.linspace(a, a + edge, 2001)
    shell = np.trapezoid(4 * np.pi * rho**2 * 0.5 * (1 + np.cos(np.pi * (rho - a) / edge)), rho)
    assert m.sum() == pytest.approx(4 / 3 * np.pi * a**3 + shell, rel=0.02)
    assert np.all((m >= 0) & (m <= 1))


def test_lowpass_removes_isolated_spikes():
    vol = ball(8.0)
    vol[4, 4, 4] = 5.0  # a one-voxel spike far from the ball
    assert create_mask(vol, 0.5)[4, 4, 4] == 1.0
    smooth = create_mask(vol, 0.5, lowpass_A=8.0, pixel_size_A=1.0)
    assert smooth[4, 4, 4] == 0.0
    assert smooth[BOX // 2, BOX // 2, BOX // 2] == 1.0
    with pytest.raises(ValueError):
        create_mask(vol, 0.5, lowpass_A=8.0)


def test_largest_components_drops_small_parts():
    inside = ball(6.0) > 0
    inside[2:4, 2:4, 2:4] = True  # 8 voxels, far away
    kept = largest_components(inside)
    assert not kept[2, 2, 2] and kept[BOX // 2, BOX // 2, BOX // 2]
    assert kept.sum() == (ball(6.0) > 0).sum()


def test_auto_mask_covers_a_noisy_phantom():
    from streamem.simulate.phantoms import phantom

    pix = 2.0
    truth = phantom("asym", BOX, pix).astype(np.float64)
    rng = np.random.default_rng(4)
    noisy = truth + 1.0 * truth.std() * rng.standard_normal(truth.shape)
    m = auto_mask(noisy, pix)
    inside = m > 0.5
    # nearly all of the molecule's mass is inside, and the mask is not the whole box
    assert truth[inside].sum() / truth.sum() > 0.99
    assert 0.02 < inside.mean() < 0.4
    assert m.dtype == np.float32 and m.min() >= 0 and m.max() == 1
