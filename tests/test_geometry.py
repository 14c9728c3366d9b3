"""Round-trip tests of the geometry conventions (docs/conventions.md §8: T1, T2, T3, T6, T7).

Expected numbers are the worked examples of the conventions sheet (computed there independently),
not outputs of this package.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import SHARED_DATA as DATA
from tomopipe.algorithms import geometry as g

F64 = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=F64)


# ----------------------------------------------------------------------------- rotations
def test_rotation_matrices_match_the_sheet_and_are_right_handed():
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    torch.testing.assert_close(g.rotation_y(t(30.0)), t([[c, 0, s], [0, 1, 0], [-s, 0, c]]))
    # right-handed: Rz(90) takes +x to +y, Rx(90) takes +y to +z, Ry(90) takes +z to +x
    torch.testing.assert_close(g.rotation_z(t(90.0)) @ t([1.0, 0, 0]), t([0.0, 1, 0]))
    torch.testing.assert_close(g.rotation_x(t(90.0)) @ t([0.0, 1, 0]), t([0.0, 0, 1]))
    torch.testing.assert_close(g.rotation_y(t(90.0)) @ t([0.0, 0, 1]), t([1.0, 0, 0]))
    # batched, float32 by default, orthonormal with det +1
    r = g.rotation_x(torch.linspace(-170, 170, 7))
    assert r.shape == (7, 3, 3) and r.dtype == torch.float32
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3).expand(7, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(7))


def test_wrap_angle():
    torch.testing.assert_close(g.wrap_angle_deg(t([180.0, -180.0, 190.0, -190.0, 540.0, 0.0])),
                               t([180.0, 180.0, -170.0, 170.0, 180.0, 0.0]))


# ----------------------------------------------------------------------------- T1 mdoc
def _mdoc_title_axis_and_rotation_angles(path: Path):
    text = path.read_text()
    title = re.search(r"Tilt axis angle\s*=\s*([-+0-9.]+)", text)
    assert title, f"{path}: no 'Tilt axis angle' in the titles"
    rotations = [float(v) for v in re.findall(r"^RotationAngle\s*=\s*([-+0-9.eE]+)", text, re.M)]
    assert rotations, f"{path}: no RotationAngle lines"
    return float(title.group(1)), rotations


@pytest.mark.parametrize(
    "name, expected_axis_deg",
    [("tilt_series.mdoc", 85.3), ("TS_01.mrc.mdoc", 85.3), ("montage_section.mdoc", -86.7)],
)
def test_T1_mdoc_rotation_angle_minus_90_is_the_title_tilt_axis(name, expected_axis_deg):
    title_axis, rotations = _mdoc_title_axis_and_rotation_angles(DATA / "mdoc" / name)
    assert title_axis == pytest.approx(expected_axis_deg)
    alpha = g.tilt_axis_from_rotation_angle(t(rotations))
    assert torch.all((alpha - title_axis).abs() <= 0.1), (name, alpha.unique(), title_axis)


def test_T1_sheet_examples():
    assert float(g.tilt_axis_from_rotation_angle(175.3)) == pytest.approx(85.3, abs=1e-4)
    assert float(g.tilt_axis_from_rotation_angle(3.34915)) == pytest.approx(-86.65085, abs=1e-4)
    # positive tilt-axis direction in index space: R2(85.3)·(0, 1) = R2(175.3)·(1, 0) = (-0.9966, 0.0819)
    torch.testing.assert_close(g.rotation_2d(t(85.3)) @ t([0.0, 1.0]), t([-0.996637, 0.081939]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g.rotation_2d(t(175.3)) @ t([1.0, 0.0]), t([-0.996637, 0.081939]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- T2 .xf
SHEET_XF = t([[[0.081939, 0.996637], [-0.996637, 0.081939]]]), t([[12.0, -7.0]])


def test_T2_sheet_xf_gives_axis_85_3_and_puts_the_axis_on_plus_y():
    a, d = SHEET_XF
    rot, shift = g.alignment_from_xf(a, d)
    assert float(rot[0]) == pytest.approx(85.3, abs=1e-3)
    assert float(torch.rad2deg(torch.atan2(a[0, 0, 1], a[0, 0, 0]))) == pytest.approx(85.3, abs=1e-3)
    torch.testing.assert_close(shift, t([[-7.960, -11.386]]), atol=1e-3, rtol=0)
    # A maps the positive tilt-axis direction onto +y
    torch.testing.assert_close(a[0] @ t([-0.996637, 0.081939]), t([0.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_px", [512, 513, 4096, 4095])
def test_T2_xf_round_trip_random(n_px):
    gen = torch.Generator().manual_seed(n_px)
    n = 50
    alpha = torch.rand(n, generator=gen, dtype=F64) * 360 - 180
    d = (torch.rand(n, 2, generator=gen, dtype=F64) - 0.5) * 200
    a = g.rotation_2d(-alpha)
    rot, shift = g.alignment_from_xf(a, d)
    torch.testing.assert_close(rot, alpha, atol=1e-9, rtol=0)
    # atan2(A12, A11) == atan2(-A21, A11) for a rotation
    torch.testing.assert_close(torch.rad2deg(torch.atan2(a[:, 0, 1], a[:, 0, 0])), rot, atol=1e-9, rtol=0)
    a2, d2 = g.xf_from_alignment(rot, shift)
    torch.testing.assert_close(a2, a, atol=1e-6, rtol=0)
    torch.testing.assert_close(d2, d, atol=1e-6, rtol=0)
    # the .xf rotates about (N-1)/2: the raw centre lands on the aligned centre + d
    centre = torch.full((n, 1, 2), g.imod_centre(n_px), dtype=F64)
    torch.testing.assert_close(g.xf_apply(a, d, centre, n_px), centre + d[:, None], atol=1e-9, rtol=0)
    # raw -> aligned -> raw is the identity (even and odd N), also for non-square images
    pts = torch.rand(n, 10, 2, generator=gen, dtype=F64) * n_px
    ai, di = g.xf_invert(a, d)
    back = g.xf_apply(ai, di, g.xf_apply(a, d, pts, (n_px, n_px + 7), (n_px - 3, n_px)),
                      (n_px - 3, n_px), (n_px, n_px + 7))
    torch.testing.assert_close(back, pts, atol=1e-8, rtol=0)


def test_T2_transposed_A12_A21_is_detected():
    """Reading A12/A21 swapped (a bug seen in old converters) must give the wrong axis and wrong positions."""
    a, d = SHEET_XF
    a_t = a.transpose(-1, -2)
    rot_t, _ = g.alignment_from_xf(a_t, d)
    assert float(rot_t[0]) == pytest.approx(-85.3, abs=1e-3)  # mirror of the true 85.3
    pts = t([[[100.0, 300.0], [2000.0, 50.0]]])
    moved = (g.xf_apply(a_t, d, pts, 4096) - g.xf_apply(a, d, pts, 4096)).norm(dim=-1)
    assert torch.all(moved > 100.0)


def test_T2_stretch_and_mirror_are_rejected_magnification_is_kept():
    a, d = SHEET_XF
    stretch = a @ t([[1.05, 0.0], [0.0, 0.95]])
    with pytest.raises(ValueError, match="distortion"):
        g.alignment_from_xf(stretch, d)
    mirror = a @ t([[-1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="view 0"):
        g.alignment_from_xf(mirror, d)
    mag, dist = g.xf_scale_and_distortion(1.01 * a)
    assert float(mag[0]) == pytest.approx(1.01 * 1.0000001, abs=1e-6) and float(dist[0]) < 1e-6
    rot, shift = g.alignment_from_xf(1.01 * a, d)
    a2, d2 = g.xf_from_alignment(rot, shift, magnification=mag)
    torch.testing.assert_close(a2, 1.01 * a, atol=1e-6, rtol=0)
    torch.testing.assert_close(d2, d, atol=1e-9, rtol=0)


def test_T2_real_imod_xf_file():
    """TS_001.xf (etomo run, ImageRotationA = 83.9 in TS_001.edf): 6 floats per line, round trip to print precision."""
    path = DATA / "imod" / "TS_001" / "TS_001.xf"
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 40 and all(len(r) == 6 for r in rows), f"{path}: expected 40 lines of 6 floats"
    xf = t(rows)
    a, d = xf[:, :4].reshape(-1, 2, 2), xf[:, 4:]
    edf = (DATA / "imod" / "TS_001" / "TS_001.edf").read_text()
    expected_axis = float(re.search(r"^Setup\.ImageRotationA=([-0-9.]+)", edf, re.M).group(1))
    assert expected_axis == pytest.approx(83.9)
    rot, shift = g.alignment_from_xf(a, d)
    assert torch.all((rot - expected_axis).abs() < 0.5), rot  # same sign and near the etomo value for all views
    assert float(rot.max() - rot.min()) < 0.2
    mag, _ = g.xf_scale_and_distortion(a)
    a2, d2 = g.xf_from_alignment(rot, shift, magnification=mag)
    assert float((a2 - a).abs().max()) <= 5e-8 + 1e-12  # printed with 7 decimals
    assert float((d2 - d).abs().max()) <= 5e-4 + 1e-9  # printed with 3 decimals


# ----------------------------------------------------------------------------- T3 projection
SHEET_RAW = t([1997.624, 2136.489])


def _internal_model_raw(centre_px):
    a, d = SHEET_XF
    rot, shift_px = g.alignment_from_xf(a, d)
    pixel_size_A = 1.0
    r = g.projection_rotations(rot, t([30.0]))
    proj = g.project_points(t([[100.0, 50.0, 20.0]]) * pixel_size_A, r, shift_px * pixel_size_A)
    return proj[0, 0, :2] / pixel_size_A + centre_px


def test_T3_imod_chain_equals_internal_model_worked_example():
    n_px = 4096
    a, d = SHEET_XF
    # IMOD chain: Ry(tlt) on the trimvol -rx tomogram gives the aligned position; inverse .xf to raw
    aligned = (g.rotation_y(t(30.0)) @ t([100.0, 50.0, 20.0]))[:2]
    torch.testing.assert_close(aligned, t([96.603, 50.0]), atol=1e-3, rtol=0)
    ai, di = g.xf_invert(a, d)
    raw_imod = g.xf_apply(ai, di, (aligned + g.imod_centre(n_px))[None, None], n_px)[0, 0]
    torch.testing.assert_close(raw_imod, SHEET_RAW, atol=1e-3, rtol=0)
    raw_model = _internal_model_raw(g.imod_centre(n_px))
    torch.testing.assert_close(raw_model, SHEET_RAW, atol=1e-3, rtol=0)
    # the 6-decimal matrix has |det| = 1 - 4e-7; the RELION model drops that scale: < 1e-4 px
    torch.testing.assert_close(raw_model, raw_imod, atol=1e-4, rtol=0)


def test_T3_relion_centre_int_n_over_2_differs_by_exactly_half_a_pixel():
    n_px = 4096
    diff = _internal_model_raw(g.fft_centre(n_px)) - _internal_model_raw(g.imod_centre(n_px))
    torch.testing.assert_close(diff, t([0.5, 0.5]), atol=1e-9, rtol=0)
    assert g.imod_centre(4095) == g.fft_centre(4095) == 2047  # odd N: no difference


def test_T3_projection_model_equals_xf_chain_for_random_views_and_points():
    gen = torch.Generator().manual_seed(3)
    n, m = 20, 30
    alpha = torch.rand(n, generator=gen, dtype=F64) * 360 - 180
    tilt = torch.rand(n, generator=gen, dtype=F64) * 120 - 60
    shift_px = (torch.rand(n, 2, generator=gen, dtype=F64) - 0.5) * 40
    points = (torch.rand(m, 3, generator=gen, dtype=F64) - 0.5) * 800
    n_px = 1023
    raw = g.project_points(points, g.projection_rotations(alpha, tilt), shift_px)[..., :2] + g.imod_centre(n_px)
    a, d = g.xf_from_alignment(alpha, shift_px)
    aligned = g.xf_apply(a, d, raw, n_px) - g.imod_centre(n_px)
    expected = torch.einsum("nij,mj->nmi", g.rotation_y(tilt), points)[..., :2]
    torch.testing.assert_close(aligned, expected, atol=1e-9, rtol=0)


def test_projection_rotations_broadcast_and_depth():
    r = g.projection_rotations(85.3, torch.tensor([-30.0, 0.0, 30.0]))
    assert r.shape == (3, 3, 3) and r.dtype == torch.float32
    torch.testing.assert_close(r[1], g.rotation_z(85.3))
    # depth z_P = -sin(tilt)·x + cos(tilt)·z in the aligned frame, independent of the axis angle
    p = g.project_points(torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 100.0]]), r)
    torch.testing.assert_close(p[:, 0, 2], torch.tensor([500.0, 0.0, -500.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(p[:, 1, 2], 100 * torch.cos(torch.deg2rad(torch.tensor([-30.0, 0.0, 30.0]))))
    with pytest.raises(ValueError, match="one value per tilt"):
        g.projection_rotations(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    xt = g.projection_rotations(10.0, 20.0, x_tilt_deg=5.0)
    torch.testing.assert_close(xt[0], g.rotation_z(10.0) @ g.rotation_y(20.0) @ g.rotation_x(5.0))


# ----------------------------------------------------------------------------- T6 coordinates
@pytest.mark.parametrize("n_unbinned", [4000, 4001, 2000, 999])
@pytest.mark.parametrize("binning", [1, 2, 4, 8])
def test_T6_centred_A_to_pixels_round_trip_and_binning(n_unbinned, binning):
    pixel_size_A = 1.35
    size_b = n_unbinned / binning  # RELION centres binned volumes at N_binned / 2.0
    coords_A = t([[0.0, 0.0, 0.0], [135.0, -270.0, 13.5], [-1000.0, 2000.0, -500.0]])
    px = g.centred_A_to_pixels(coords_A, size_b, pixel_size_A * binning)
    torch.testing.assert_close(px[0], t([size_b / 2] * 3))
    torch.testing.assert_close(px[1] - px[0], t([100.0, -200.0, 10.0]) / binning)
    torch.testing.assert_close(g.pixels_to_centred_A(px, size_b, pixel_size_A * binning), coords_A)
    # N/2.0 makes binning a pure scaling: binned pixel · b = unbinned pixel
    px1 = g.centred_A_to_pixels(coords_A, n_unbinned, pixel_size_A)
    torch.testing.assert_close(px * binning, px1)


def test_T6_anisotropic_size_and_relion_python_picker_offset():
    size = (4000, 4000, 2000)  # tomograms.star of EMPIAR-10164 (rlnTomoSizeX/Y/Z)
    px = g.centred_A_to_pixels(t([[0.0, 0.0, 0.0]]), t(size), 1.35)
    torch.testing.assert_close(px, t([[2000.0, 2000.0, 1000.0]]))
    # picker writes with centre N/2 - 1, C++ reads with N/2.0: one unbinned pixel (relion #1137)
    pick_px = t([[1234.0, 567.0, 890.0]])
    written_A = g.pixels_to_centred_A(pick_px, t(size), 1.35, centre_px=t(size) / 2 - 1)
    read_px = g.centred_A_to_pixels(written_A, t(size), 1.35)
    torch.testing.assert_close(read_px - pick_px, t([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="pixel_size_A"):
        g.centred_A_to_pixels(pick_px, 100, 0.0)


def test_centre_conventions():
    assert (g.fft_centre(64), g.imod_centre(64), g.relion_coordinate_centre(64)) == (32, 31.5, 32.0)
    assert (g.fft_centre(65), g.imod_centre(65), g.relion_coordinate_centre(65)) == (32, 32.0, 32.5)


# ----------------------------------------------------------------------------- T7 Euler angles
def test_T7_sheet_reference_matrix():
    a = g.euler_relion_to_matrix(t(30.0), t(60.0), t(90.0))
    expected = t([[-0.5, 0.866, 0.0], [-0.433, -0.25, 0.866], [0.75, 0.433, 0.5]])
    torch.testing.assert_close(a, expected, atol=5e-4, rtol=0)
    # projection direction in the reference frame A^T e_z = (sin t cos r, sin t sin r, cos t)
    torch.testing.assert_close(a.T @ t([0.0, 0.0, 1.0]), t([0.75, 0.433, 0.5]), atol=5e-4, rtol=0)
    rot, tilt, psi = g.matrix_to_euler_relion(a)
    assert (float(rot), float(tilt), float(psi)) == pytest.approx((30.0, 60.0, 90.0), abs=1e-9)


def test_T7_scipy_zyz_transpose_equality():
    gen = torch.Generator().manual_seed(7)
    ang = torch.rand(200, 3, generator=gen, dtype=F64) * t([360.0, 180.0, 360.0]) - t([180.0, 0.0, 180.0])
    ours = g.euler_relion_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]).numpy()
    ref = Rotation.from_euler("ZYZ", ang.numpy(), degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tilt_deg", [0.0, 1e-6, 1e-3, 0.5, 45.0, 90.0, 179.5, 180.0 - 1e-3, 180.0])
def test_T7_euler_round_trip_including_gimbal_lock(tilt_deg, dtype):
    gen = torch.Generator().manual_seed(11)
    rot = torch.rand(300, generator=gen, dtype=F64) * 360 - 180
    psi = torch.rand(300, generator=gen, dtype=F64) * 360 - 180
    a = g.euler_relion_to_matrix(rot, torch.full_like(rot, tilt_deg), psi).to(dtype)
    r2, t2, p2 = g.matrix_to_euler_relion(a)
    assert r2.dtype == dtype
    assert torch.all((t2 >= 0) & (t2 <= 180)) and torch.all((r2 > -180) & (r2 <= 180))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(g.euler_relion_to_matrix(r2, t2, p2), a, atol=tol, rtol=0)
    if 1.0 < tilt_deg < 179.0:  # angles themselves are unique away from gimbal lock
        torch.testing.assert_close(r2.double(), g.wrap_angle_deg(rot),
                                   atol=1e-3 if dtype == torch.float32 else 1e-9, rtol=0)
        torch.testing.assert_close(p2.double(), g.wrap_angle_deg(psi),
                                   atol=1e-3 if dtype == torch.float32 else 1e-9, rtol=0)
    if tilt_deg in (0.0, 180.0):  # convention at gimbal lock: psi = 0
        assert torch.all(p2 == 0)


def test_T7_composition_subtomogram_times_particle():
    """A_total = A_subtomo · A_particle equals rotating by the particle angles first, then the subtomogram ones."""
    a_sub = g.euler_relion_to_matrix(t(10.0), t(20.0), t(30.0))
    a_par = g.euler_relion_to_matrix(t(-40.0), t(110.0), t(70.0))
    ref = (Rotation.from_euler("ZYZ", [10, 20, 30], degrees=True).inv()
           * Rotation.from_euler("ZYZ", [-40, 110, 70], degrees=True).inv())
    np.testing.assert_allclose((a_sub @ a_par).numpy(), ref.as_matrix(), atol=1e-12)


def test_random_rotations_are_uniform_and_reproducible():
    gen = torch.Generator().manual_seed(1)
    r = g.random_rotations(20000, gen, dtype=F64)
    assert r.shape == (20000, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=F64).expand_as(r), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(20000, dtype=F64), atol=1e-12, rtol=0)
    # Haar measure: E[R] = 0, E[R_ij^2] = 1/3, rotation angle w has E[cos w] = -1/2
    assert float(r.mean(0).abs().max()) < 0.02
    torch.testing.assert_close((r**2).mean(0), torch.full((3, 3), 1 / 3, dtype=F64), atol=0.01, rtol=0)
    cos_w = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    assert float(cos_w.mean()) == pytest.approx(-0.5, abs=0.01)
    torch.testing.assert_close(g.random_rotations(20000, torch.Generator().manual_seed(1), dtype=F64), r,
                               atol=0, rtol=0)
    assert not torch.equal(g.random_rotations(20000, torch.Generator().manual_seed(2), dtype=F64), r)
    assert g.random_rotations(3).dtype == torch.float32
