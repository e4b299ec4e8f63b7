"""The simulator's real-space projector, phantoms and atomic-model maps.

The projection convention is pinned by hand-computed cases: a point r of the map
(x, y, z from the centre) lands in the image at the first two components of A r.
"""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from streamem.core.euler import euler_to_matrix
from streamem.errors import InputError
from streamem.simulate.atomic import volume_from_model
from streamem.simulate.phantoms import list_phantoms, phantom, phantom_atoms
from streamem.simulate.projection import (
    RealSpaceProjector,
    project_real_space,
    shift_images,
    support_radius_px,
)

S3 = np.sqrt(3.0) / 2.0


def _blob_volume(box: int, r_xyz, sigma_px: float = 1.5) -> np.ndarray:
    c = box // 2
    z, y, x = np.mgrid[:box, :box, :box] - c
    d2 = (x - r_xyz[0]) ** 2 + (y - r_xyz[1]) ** 2 + (z - r_xyz[2]) ** 2
    return np.exp(-d2 / (2 * sigma_px**2)).astype(np.float32)


def _gauss2d(box: int, xy, sigma_px: float = 1.5) -> np.ndarray:
    c = box // 2
    y, x = np.mgrid[:box, :box] - c
    d2 = (x - xy[0]) ** 2 + (y - xy[1]) ** 2
    return (2 * np.pi * sigma_px**2) ** 0.5 * np.exp(-d2 / (2 * sigma_px**2))


def _centroid(img):
    c = img.shape[-1] // 2
    y, x = np.mgrid[: img.shape[0], : img.shape[1]] - c
    return np.array([(img * x).sum(), (img * y).sum()]) / img.sum()


# (rot, tilt, psi) -> where the map point (x, y, z) lands, computed by hand from
# RELION's Euler_angles2matrix (CONVENTIONS.md):
HAND = {
    (0.0, 0.0, 0.0): lambda x, y, z: (x, y),
    # rot 90, tilt 90, psi 30: A = [[-1/2, 0, -√3/2], [-√3/2, 0, 1/2], [0, 1, 0]]
    (90.0, 90.0, 30.0): lambda x, y, z: (-0.5 * x - S3 * z, -S3 * x + 0.5 * z),
    # rot 0, tilt 90, psi 0: A = [[0, 0, -1], [0, 1, 0], [1, 0, 0]] (looking along x)
    (0.0, 90.0, 0.0): lambda x, y, z: (-z, y),
    # rot 0, tilt 0, psi 90: A = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]] (in-plane rotation)
    (0.0, 0.0, 90.0): lambda x, y, z: (y, -x),
    # rot 90, tilt 0, psi 0: same in-plane rotation through rot
    (90.0, 0.0, 0.0): lambda x, y, z: (y, -x),
    # rot 0, tilt 180, psi 0: A = diag(-1, 1, -1)
    (0.0, 180.0, 0.0): lambda x, y, z: (-x, y),
}


@pytest.mark.parametrize("angles", list(HAND))
@pytest.mark.parametrize("box", [40, 41])
def test_projection_of_off_centre_blob_lands_at_A_r(angles, box):
    r = (8.0, -5.0, 3.0)
    vol = _blob_volume(box, r)
    img = project_real_space(vol, euler_to_matrix(*angles))
    want = HAND[angles](*r)
    expected = _gauss2d(box, want)
    # the whole image, not just the centroid: a 2-D Gaussian at (A r)_xy
    assert np.abs(img - expected).max() < 0.02 * expected.max()
    assert np.allclose(_centroid(img), want, atol=0.02)


def test_projection_batch_and_mass():
    vol = phantom("asym", 40, 4.0)
    angles = np.array([[10.0, 20.0, 30.0], [200.0, 120.0, -75.0], [0.0, 90.0, 45.0]])
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    imgs = project_real_space(vol, rots)
    assert imgs.shape == (3, 40, 40) and imgs.dtype == np.float32
    # a projection keeps the map's total (the spline interpolates a smooth map well)
    assert np.allclose(imgs.sum(axis=(1, 2)), vol.sum(), rtol=2e-3)
    single = project_real_space(vol, rots[1])
    assert np.array_equal(single, imgs[1])
    # restricting the sum to the support sphere changes nothing
    full = RealSpaceProjector(vol, radius_px=40 * 0.87 + 2).project(rots)
    assert np.allclose(full, imgs, atol=1e-5 * np.abs(imgs).max())
    assert support_radius_px(vol) < 0.36 * 40 + 6


def test_real_space_projection_agrees_with_fourier_projector():
    """Two independent projectors (real-space cubic vs padded Fourier slice) agree."""
    from streamem.core.projector import make_projector, project_images

    vol = phantom("asym", 48, 4.0)
    rots = euler_to_matrix([15.0, 130.0], [70.0, 150.0], [-30.0, 200.0])
    real = project_real_space(vol, rots)
    fourier = np.asarray(project_images(make_projector(vol), rots))
    for a, b in zip(real, fourier, strict=True):
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert corr > 0.995
        assert np.abs(a - b).max() < 0.06 * np.abs(a).max()


def test_shift_images_moves_content_by_dy_dx():
    box = 32
    img = _gauss2d(box, (0.0, 0.0)).astype(np.float32)
    shifts = np.array([[1.5, -2.25], [-3.0, 0.4]])
    out = shift_images(np.stack([img, img]), shifts)
    for o, (dy, dx) in zip(out, shifts, strict=True):
        assert np.allclose(_centroid(o), (dx, dy), atol=1e-3)
    back = shift_images(out, -shifts)
    assert np.allclose(back, img, atol=1e-5 * img.max() * 10)


# -- phantoms ------------------------------------------------------------------------


def test_list_and_unknown_phantom():
    assert {"asym", "asym-B", "C4", "D7", "T", "O", "I"} <= set(list_phantoms())
    with pytest.raises(InputError):
        phantom("no-such-thing", 32, 2.0)


@pytest.mark.parametrize("name", ["asym", "asym-B", "C4", "D7", "T", "O", "I"])
def test_phantom_basic_properties(name):
    box, px = 48, 4.0
    vol = phantom(name, box, px)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    assert vol.min() >= 0 and vol.max() > 0
    # fits in 0.7 of the box (plus the Gaussian tails)
    assert support_radius_px(vol, 1e-3) <= 0.35 * box + 3
    if name != "asym-B":  # asym-B keeps the frame of asym
        c = box // 2
        idx = np.indices(vol.shape).reshape(3, -1) - c
        com = (idx * vol.ravel()).sum(1) / vol.sum()
        assert np.all(np.abs(com) < 0.05)


@pytest.mark.parametrize("name", ["C4", "D7", "T", "O", "I"])
def test_symmetric_phantoms_are_invariant_under_their_group(name):
    from streamem.core.symmetry import symmetry_matrices

    atoms = phantom_atoms(name, box_A=192.0)
    tree = cKDTree(atoms.positions_A)
    for R in symmetry_matrices(name):
        d, _ = tree.query(atoms.positions_A @ np.asarray(R).T)
        assert d.max() < 1e-3  # Å


def test_asym_is_asymmetric_and_asym_b_differs_in_one_domain():
    box, px = 48, 4.0
    a = phantom("asym", box, px)
    b = phantom("asym-B", box, px)
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert 0.5 < corr < 0.95  # mostly shared, clearly different
    assert abs(a.sum() - b.sum()) < 0.1 * a.sum()
    # no 2-fold axis along x, y or z (rotations about the centre voxel)
    for axes in [(0, 1), (0, 2), (1, 2)]:
        rotated = np.roll(np.rot90(a, 2, axes=axes), 1, axis=axes)
        assert np.corrcoef(a.ravel(), rotated.ravel())[0, 1] < 0.7


def test_phantom_is_the_same_molecule_at_any_pixel_size():
    # same box in A (192) at two samplings: same mass and radius of gyration
    coarse, fine = phantom("asym", 48, 4.0), phantom("asym", 96, 2.0)

    def mass_rg(v, px):
        c = v.shape[0] // 2
        idx = (np.indices(v.shape).reshape(3, -1) - c) * px
        m = v.sum() * px**3
        rg = np.sqrt((v.ravel() * (idx**2).sum(0)).sum() * px**3 / m)
        return m, rg

    (m1, r1), (m2, r2) = mass_rg(coarse, 4.0), mass_rg(fine, 2.0)
    assert m1 == pytest.approx(m2, rel=1e-3)
    assert r1 == pytest.approx(r2, rel=0.02)
    # the same seed gives the same molecule, another seed another one
    assert np.array_equal(phantom("asym", 32, 6.0, seed=1), phantom("asym", 32, 6.0, seed=1))
    assert not np.array_equal(phantom("asym", 32, 6.0, seed=1), phantom("asym", 32, 6.0))


def test_default_phantom_is_a_few_hundred_kDa():
    atoms = phantom_atoms("asym", box_A=128 * 1.5)
    assert 200.0 <= atoms.mass_kDa <= 500.0
    assert 2 * atoms.radius_A() <= 0.7 * 128 * 1.5 + 1e-6


# -- atomic models --------------------------------------------------------------------

PDB = """\
CRYST1   40.000   40.000   40.000  90.00  90.00  90.00 P 1           1
ATOM      1  CA  GLY A   1      10.000  10.000  10.000  1.00  0.00           C
ATOM      2  CA  GLY A   2      16.000  10.000  10.000  1.00  0.00           C
ATOM      3  CA  GLY A   3      10.000  14.000  10.000  1.00  0.00           C
ATOM      4  CA  GLY A   4      10.000  10.000  18.000  1.00  0.00           C
END
"""


def test_volume_from_model_centre_axes_and_total(tmp_path):
    import gemmi

    path = tmp_path / "tiny.pdb"
    path.write_text(PDB)
    box, px = 40, 1.0
    vol = volume_from_model(path, box, px)
    assert vol.shape == (box,) * 3 and vol.dtype == np.float32
    # total = sum of the scattering factors at s = 0 (sum of a_j) per atom
    a = np.array(gemmi.Element("C").c4322.get_coefs()[:5])
    assert vol.sum() * px**3 == pytest.approx(4 * a.sum(), rel=1e-3)
    # all atoms carbon: the map's centre of mass is the model's, at B // 2
    c = box // 2
    idx = np.indices(vol.shape).reshape(3, -1) - c
    assert np.allclose((idx * vol.ravel()).sum(1) / vol.sum(), 0.0, atol=0.02)
    # the atom at z = 18 (8 A above the others, COM z = 12) is at array index [z, y, x]
    com = np.array([11.5, 11.0, 12.0])  # x, y, z
    x, y, z = np.array([10.0, 10.0, 18.0]) - com
    k = (int(round(c + z)), int(round(c + y)), int(round(c + x)))
    assert vol[k] > 0.5 * vol.max()


def test_volume_from_model_bad_files(tmp_path):
    with pytest.raises(InputError):
        volume_from_model(tmp_path / "missing.pdb", 32, 1.0)
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a model\n")
    with pytest.raises(InputError):
        volume_from_model(bad, 32, 1.0)
    empty = tmp_path / "empty.pdb"
    empty.write_text("END\n")
    with pytest.raises(InputError):
        volume_from_model(empty, 32, 1.0)
