"""Tomogram reconstruction (:mod:`tomopipe.algorithms.reconstruct`) on Gaussian-blob phantoms.

The tilt images are computed analytically: an isotropic 3-D Gaussian projects to a 2-D Gaussian
of the same sigma at the projected centre, and the centres are projected with
:func:`tomopipe.algorithms.geometry.project_points` (the RELION 5 model), so the tests check the
reconstruction against the package's one definition of the geometry.
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.algorithms.reconstruct import (
    HAVE_NUMBA,
    ReconstructionParams,
    filter_tilt_images,
    iter_slabs,
    projection_matrices,
    radial_weighting,
    reconstruct_volume,
    sirt_like_factor,
    volume_shape_for,
)

SIGMA = 2.0
TILTS = torch.arange(-60.0, 61.0, 3.0)
TRIAD = [(10.0, 0.0, -4.0), (0.0, 12.0, 0.0), (0.0, 0.0, 8.0)]  # x, y, z (voxels); right-handed


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs_volume(centres, shape, amps=None):
    nz, ny, nx = shape
    z = torch.arange(nz, dtype=torch.float64) - nz // 2
    y = torch.arange(ny, dtype=torch.float64) - ny // 2
    x = torch.arange(nx, dtype=torch.float64) - nx // 2
    v = torch.zeros(shape, dtype=torch.float64)
    for j, (cx, cy, cz) in enumerate(centres):
        a = 1.0 if amps is None else amps[j]
        v += a * torch.exp(-((x[None, None] - cx) ** 2 + (y[None, :, None] - cy) ** 2
                             + (z[:, None, None] - cz) ** 2) / (2 * SIGMA**2))
    return v


def project_blobs(centres, rot_z, rot_y, rot_x=0.0, shifts_px=None, size=(64, 64), amps=None):
    """Line integrals of the blobs in every view: images [n, ny, nx], centre N//2, shifts in px."""
    nx, ny = size
    r = projection_rotations(torch.as_tensor(rot_z, dtype=torch.float64),
                             torch.as_tensor(rot_y, dtype=torch.float64), torch.as_tensor(rot_x, dtype=torch.float64))
    shifts = None if shifts_px is None else torch.as_tensor(shifts_px, dtype=torch.float64)
    pts = project_points(torch.tensor(centres, dtype=torch.float64), r, shifts)
    y = torch.arange(ny, dtype=torch.float64) - ny // 2
    x = torch.arange(nx, dtype=torch.float64) - nx // 2
    images = torch.zeros((r.shape[0], ny, nx), dtype=torch.float64)
    for j in range(len(centres)):
        a = 1.0 if amps is None else amps[j]
        px, py = pts[:, j, 0][:, None, None], pts[:, j, 1][:, None, None]
        images += a * SIGMA * math.sqrt(2 * math.pi) * torch.exp(
            -((x[None, None] - px) ** 2 + (y[None, :, None] - py) ** 2) / (2 * SIGMA**2))
    return images.float()


def random_centres(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand((n, 3), generator=g, dtype=torch.float64) - 0.5) * torch.tensor([40.0, 40.0, 14.0])
    return [tuple(row) for row in c.tolist()]


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def peak_positions(volume, centres, radius=3):
    """Centroid (x, y, z from the centre) of the brightest voxel near each expected centre."""
    nz, ny, nx = volume.shape
    out = []
    for cx, cy, cz in centres:
        ix, iy, iz = round(cx) + nx // 2, round(cy) + ny // 2, round(cz) + nz // 2
        box = volume[iz - radius:iz + radius + 1, iy - radius:iy + radius + 1, ix - radius:ix + radius + 1]
        k = int(torch.argmax(box))
        dz, dy, dx = k // (box.shape[1] * box.shape[2]), (k // box.shape[2]) % box.shape[1], k % box.shape[2]
        out.append((ix - radius + dx - nx // 2, iy - radius + dy - ny // 2, iz - radius + dz - nz // 2))
    return out


PARAMS = ReconstructionParams(thickness_px=32, super_sampling=1)


def test_phantom_correlation_and_scale():
    centres = TRIAD + random_centres(12)
    images = project_blobs(centres, 0.0, TILTS)
    volume = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0, PARAMS)
    assert volume.shape == (32, 64, 64)
    truth = blobs_volume(centres, (32, 64, 64))
    assert corr(volume, truth) > 0.8  # ±60°: the missing wedge elongates blobs along z
    # the density comes back at the right scale (blob peaks 1; overlapping blobs slightly more)
    peaks = [float(volume[p[2] + 16, p[1] + 32, p[0] + 32]) for p in peak_positions(volume, TRIAD)]
    assert all(0.7 < v < 1.3 for v in peaks), peaks


def test_super_sampling_keeps_the_reconstruction():
    centres = TRIAD + random_centres(6, seed=1)
    images = project_blobs(centres, 0.0, TILTS)
    params = ReconstructionParams(thickness_px=16, super_sampling=2)
    truth = blobs_volume(centres, (16, 64, 64))
    single = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0,
                                ReconstructionParams(thickness_px=16, super_sampling=1))
    double = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0, params)
    assert double.shape == single.shape
    assert corr(double, single) > 0.98
    assert corr(double, truth) >= corr(single, truth) - 0.01


def test_triad_keeps_its_handedness_and_z_points_to_the_source():
    """Blob 3 sits at +z: with the RELION 5 model (+z toward the source) it must come back at
    +z (index > nz//2), and the triad (x, y, z axes) stays right-handed."""
    images = project_blobs(TRIAD, 0.0, TILTS)
    volume = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0, PARAMS)
    found = peak_positions(volume, TRIAD)
    for want, got in zip(TRIAD, found):
        assert max(abs(w - g) for w, g in zip(want, got)) <= 1, (want, got)
    a, b, c = (torch.tensor(p, dtype=torch.float64) for p in found)
    assert float(torch.dot(torch.linalg.cross(a, b), c)) > 0
    # the mirror image (z -> -z) is not what comes back
    mirrored = blobs_volume([(x, y, -z) for x, y, z in TRIAD], (32, 64, 64))
    truth = blobs_volume(TRIAD, (32, 64, 64))
    assert corr(volume, truth) > corr(volume, mirrored) + 0.2


def test_axis_shifts_xtilt_and_magnification_are_applied():
    """A series with a tilted axis (85°), per-view shifts, an x-tilt and magnification changes
    reconstructs to the same volume as the plain series."""
    centres = TRIAD + random_centres(8, seed=2)
    n = len(TILTS)
    g = torch.Generator().manual_seed(3)
    shifts_px = (torch.rand((n, 2), generator=g, dtype=torch.float64) - 0.5) * 8
    rot_z = 85.0 + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    mag = 1.0 + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.02
    plain = reconstruct_volume(project_blobs(centres, 0.0, TILTS), 0.0, TILTS, 0.0, torch.zeros(n, 2), 1.0, PARAMS)
    # the projector works in pixels: x_img = mag·R·p + shift; build it from scaled centres per view
    r = projection_rotations(rot_z, TILTS.double(), 2.0)
    pts = project_points(torch.tensor(centres, dtype=torch.float64), r) * mag[:, None, None]
    images = torch.zeros((n, 64, 64), dtype=torch.float64)
    yy = torch.arange(64, dtype=torch.float64)[:, None] - 32
    xx = torch.arange(64, dtype=torch.float64)[None, :] - 32
    for j in range(len(centres)):
        px = pts[:, j, 0] + shifts_px[:, 0]
        py = pts[:, j, 1] + shifts_px[:, 1]
        images += SIGMA * math.sqrt(2 * math.pi) * torch.exp(
            -((xx[None] - px[:, None, None]) ** 2 + (yy[None] - py[:, None, None]) ** 2) / (2 * SIGMA**2))
    pixel_A = 2.5
    volume = reconstruct_volume(images.float(), rot_z, TILTS, 2.0, shifts_px * pixel_A, pixel_A, PARAMS,
                                magnification=mag)
    assert volume.shape == plain.shape  # axis near x: the volume's y runs along the image x
    assert corr(volume, plain) > 0.95
    # without the shifts it is much worse: the shifts were used
    unshifted = reconstruct_volume(images.float(), rot_z, TILTS, 2.0, torch.zeros(n, 2), pixel_A, PARAMS,
                                   magnification=mag)
    assert corr(unshifted, plain) < corr(volume, plain) - 0.2


def test_tilt_angle_and_axis_offsets():
    centres = TRIAD + random_centres(6, seed=4)
    n = len(TILTS)
    plain = reconstruct_volume(project_blobs(centres, 0.0, TILTS), 0.0, TILTS, 0.0, torch.zeros(n, 2), 1.0, PARAMS)
    images = project_blobs(centres, 3.0, TILTS + 2.0)  # true axis 3°, true angles +2°
    with_offsets = ReconstructionParams(thickness_px=32, super_sampling=1, tilt_angle_offset_deg=2.0,
                                        tilt_axis_offset_deg=3.0)
    fixed = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(n, 2), 1.0, with_offsets)
    wrong = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(n, 2), 1.0, PARAMS)
    assert corr(fixed, plain) > 0.97
    assert corr(wrong, plain) < corr(fixed, plain) - 0.05


def test_shift_x_and_z_move_the_content():
    images = project_blobs(TRIAD, 0.0, TILTS)
    moved = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0,
                               ReconstructionParams(thickness_px=32, super_sampling=1, shift_x_px=3, shift_z_px=2))
    found = peak_positions(moved, [(x + 3, y, z + 2) for x, y, z in TRIAD])
    for (x, y, z), got in zip(TRIAD, found):
        assert got == (round(x) + 3, round(y), round(z) + 2)


def test_width_and_shape():
    params = ReconstructionParams(thickness_px=20, width_px=40)
    assert volume_shape_for((64, 48), 0.0, params) == (20, 48, 40)
    assert volume_shape_for((64, 48), 85.0, ReconstructionParams(thickness_px=20)) == (20, 64, 48)


def test_slab_by_slab_equals_whole_volume():
    centres = TRIAD + random_centres(6, seed=5)
    images = project_blobs(centres, 10.0, TILTS)
    m, t = projection_matrices(torch.full((len(TILTS),), 10.0), TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0)
    filtered = filter_tilt_images(images, 10.0, TILTS, 1.0, 16)
    shape = (16, 64, 64)
    whole = torch.cat([s for _, _, s in iter_slabs(filtered, m, t, shape, ReconstructionParams(
        thickness_px=16, slab_rows=64))], dim=1)
    slabs = list(iter_slabs(filtered, m, t, shape, ReconstructionParams(thickness_px=16, slab_rows=7)))
    assert len(slabs) == 10 and slabs[-1][:2] == (63, 64)
    pieces = torch.cat([s for _, _, s in slabs], dim=1)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))


def test_excluded_views_are_left_out():
    """A corrupted view: reconstructing without it equals the reconstruction of the clean views."""
    centres = TRIAD + random_centres(6, seed=6)
    images = project_blobs(centres, 0.0, TILTS)
    keep = torch.ones(len(TILTS), dtype=torch.bool)
    keep[5] = False
    bad = images.clone()
    bad[5] += 50 * torch.rand(bad[5].shape, generator=torch.Generator().manual_seed(0))
    clean = reconstruct_volume(images[keep], 0.0, TILTS[keep], 0.0, torch.zeros(int(keep.sum()), 2), 1.0, PARAMS)
    with_bad = reconstruct_volume(bad, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0, PARAMS)
    without_bad = reconstruct_volume(bad[keep], 0.0, TILTS[keep], 0.0, torch.zeros(int(keep.sum()), 2), 1.0, PARAMS)
    torch.testing.assert_close(without_bad, clean)
    assert corr(with_bad, clean) < 0.9


def test_radial_weighting_is_imods_ramp_with_gaussian_falloff():
    k = torch.linspace(0, 0.5, 101, dtype=torch.float64)
    w = radial_weighting(k, 0.35, 0.035)
    below = k <= 0.35
    torch.testing.assert_close(w[below], k[below])
    # one sigma beyond the cutoff: ramp x exp(-1/2)
    torch.testing.assert_close(radial_weighting(torch.tensor([0.385], dtype=torch.float64), 0.35, 0.035),
                               torch.tensor([0.385 * math.exp(-0.5)], dtype=torch.float64))
    assert float(radial_weighting(torch.tensor([0.5]), 0.35, 0.0)) == 0.0


def test_sirt_like_filter_boosts_low_frequencies_relative_to_wbp():
    k = torch.tensor([0.01, 0.05, 0.2, 0.4], dtype=torch.float64)
    ramp = radial_weighting(k, 0.5, 0.0)
    thickness = 100.0
    assert torch.equal(sirt_like_factor(k, 0, thickness), torch.ones_like(k))
    previous = None
    for n in (1, 5, 20, 200):
        f = sirt_like_factor(k, n, thickness)
        # low frequencies (λ = 1/(π k L) large) converge first: relative weight high / low drops
        relative = (f * ramp) / ramp
        assert torch.all(relative[:-1] >= relative[1:])
        if previous is not None:
            assert torch.all(f >= previous)  # more iterations -> closer to WBP
        previous = f
    # one iteration = plain back projection: flat filter N/(πL) where λ < 1
    f1 = sirt_like_factor(k, 1, thickness) * ramp
    torch.testing.assert_close(f1, torch.full_like(f1, 1 / (math.pi * thickness)))
    # below 1/(πL) SIRT has converged in one step: the ramp is kept
    torch.testing.assert_close(sirt_like_factor(torch.tensor([0.002], dtype=torch.float64), 10, thickness),
                               torch.ones(1, dtype=torch.float64))
    # and in a reconstruction: low-frequency content relatively stronger with the SIRT-like filter
    images = project_blobs(TRIAD + random_centres(10, seed=7), 0.0, TILTS)
    wbp = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0, PARAMS)
    sirt = reconstruct_volume(images, 0.0, TILTS, 0.0, torch.zeros(len(TILTS), 2), 1.0,
                              ReconstructionParams(thickness_px=32, super_sampling=1, sirt_like_iterations=10))

    def low_high(v):
        p = torch.fft.rfftn(v.double()).abs() ** 2
        kk = torch.sqrt(torch.fft.fftfreq(32)[:, None, None] ** 2 + torch.fft.fftfreq(64)[None, :, None] ** 2
                        + torch.fft.rfftfreq(64)[None, None, :] ** 2).double()
        return float(p[(kk > 0) & (kk < 0.05)].sum() / p[(kk > 0.15) & (kk < 0.3)].sum())

    assert low_high(sirt) > 1.5 * low_high(wbp)


def test_dose_weighting_lowers_high_frequencies_of_late_views():
    images = project_blobs(TRIAD, 0.0, TILTS[:3])
    plain = filter_tilt_images(images, 0.0, TILTS[:3], 2.0, 32)
    weighted = filter_tilt_images(images, 0.0, TILTS[:3], 2.0, 32,
                                  pre_exposure_e_per_A2=torch.tensor([0.0, 20.0, 80.0]), voltage_kV=300.0)
    torch.testing.assert_close(weighted[0], plain[0])
    power = [float((torch.fft.rfft2(weighted[i]).abs() ** 2)[:, 10:].sum()) for i in range(3)]
    base = [float((torch.fft.rfft2(plain[i]).abs() ** 2)[:, 10:].sum()) for i in range(3)]
    assert power[1] / base[1] < 0.99 and power[2] / base[2] < power[1] / base[1]


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="thickness"):
        ReconstructionParams(thickness_px=0)
    with pytest.raises(ValueError, match="super_sampling"):
        ReconstructionParams(super_sampling=0)
    with pytest.raises(ValueError, match="magnification"):
        projection_matrices([0.0], [0.0], 0.0, [[0.0, 0.0]], 1.0, magnification=[0.0])


def test_ctf_phase_flip_per_view_and_in_strips():
    """Views convolved with a CTF: phase flipping makes every coefficient's sign right again, so the
    flipped view correlates with the |CTF|-filtered truth; at 0° strips equal one defocus, at 50°
    strips follow the defocus gradient (right side more underfocused, rlnTomoHand = -1)."""
    from tomopipe.algorithms.ctf import ctf_2d
    from tomopipe.algorithms.filters import fast_fft_size
    from tomopipe.algorithms.reconstruct import CtfParams

    images = project_blobs(TRIAD + random_centres(10, seed=8), 0.0, torch.tensor([0.0, 50.0]))
    pixel_A, defocus = 2.0, 20000.0
    py = px = fast_fft_size(96)
    ctf_kw = dict(voltage_kV=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1, defocus_hand=-1)
    c = ctf_2d((py, px), pixel_A, defocus, defocus, 0.0, 300.0, 2.7, 0.1)
    padded = torch.zeros((2, py, px))
    padded[:, :64, :64] = images - images.mean(dim=(1, 2), keepdim=True)
    observed = torch.fft.irfft2(torch.fft.rfft2(padded) * c, s=(py, px))[:, :64, :64]
    params = CtfParams(torch.full((2,), defocus), torch.full((2,), defocus), torch.zeros(2), **ctf_kw)
    flipped = filter_tilt_images(observed, 0.0, torch.tensor([0.0, 50.0]), pixel_A, 32, 0.5, 0.0, ctf=params)
    unflipped = filter_tilt_images(observed, 0.0, torch.tensor([0.0, 50.0]), pixel_A, 32, 0.5, 0.0)
    reference = filter_tilt_images(torch.fft.irfft2(torch.fft.rfft2(padded) * c.abs(), s=(py, px))[:, :64, :64],
                                   0.0, torch.tensor([0.0, 50.0]), pixel_A, 32, 0.5, 0.0)
    assert corr(flipped[0], reference[0]) > 0.99 > corr(unflipped[0], reference[0])
    strips = CtfParams(torch.full((2,), defocus), torch.full((2,), defocus), torch.zeros(2), strip_width_px=8, **ctf_kw)
    by_strips = filter_tilt_images(observed, 0.0, torch.tensor([0.0, 50.0]), pixel_A, 32, 0.5, 0.0, ctf=strips)
    torch.testing.assert_close(by_strips[0], flipped[0])
    assert not torch.allclose(by_strips[1], flipped[1], atol=1e-3)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("super_sampling, axis_deg", [(1, 80.0), (2, 80.0), (2, 10.0), (2, None)])
def test_compiled_back_projector_equals_grid_sample(super_sampling, axis_deg):
    """The numba kernels sample exactly where ``grid_sample`` does (bilinear, zeros outside the
    view): random views with content up to the edges, a tilted and varying axis, x-tilt, large
    shifts (parts of the volume project outside some views), magnification, SHIFT x/z and a
    width and thickness that do not match the views; equal to float32 rounding. Axis 80°: views
    read transposed (the volume's x runs along the image's y); 10°: read as stored; None: an
    aligned stack (axis 0, no x-tilt), the kernel that blends image rows once per volume row."""
    g = torch.Generator().manual_seed(11)
    n = 9
    tilts = torch.linspace(-57.0, 48.0, n, dtype=torch.float64)
    if axis_deg is None:
        rot_z, rot_x = torch.zeros(n, dtype=torch.float64), 0.0
    else:
        rot_z, rot_x = axis_deg + torch.randn(n, generator=g, dtype=torch.float64) * 3, 3.0
    shifts_A = torch.randn((n, 2), generator=g, dtype=torch.float64) * 12.0
    mag = 1.0 + torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    images = torch.randn((n, 37, 50), generator=g)
    params = ReconstructionParams(thickness_px=15, width_px=41, super_sampling=super_sampling, shift_x_px=2.5,
                                  shift_z_px=-1.75, slab_rows=7)
    args = (images, rot_z, tilts, rot_x, shifts_A, 1.5, params, mag)
    compiled = reconstruct_volume(*args, use_compiled=True)
    reference = reconstruct_volume(*args, use_compiled=False)
    assert compiled.shape == reference.shape == ((15, 50, 41) if axis_deg and axis_deg > 45 else (15, 37, 41))
    scale = float(reference.abs().max())
    torch.testing.assert_close(compiled, reference, rtol=0, atol=5e-5 * scale)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
def test_compiled_sample_range_with_tiny_and_normal_steps():
    """The run of samples that fall inside the image: exact for ordinary steps, and a step of
    1e-30 px (an axis at exactly 90°: cos = 6e-17 times small factors) must neither overflow nor
    drop the row."""
    from tomopipe.algorithms.reconstruct import _inside_range

    assert _inside_range(-3.2, 0.5, 0.5, 10.0, 100) == (8, 27)  # -3.2 + 0.5 i in (0.5, 10): i = 8 .. 26
    assert _inside_range(12.0, -1.0, 0.5, 10.0, 100) == (3, 12)
    assert _inside_range(5.0, 1e-30, 0.5, 10.0, 50) == (0, 50)
    assert _inside_range(-5000.0, 1e-30, 0.5, 10.0, 50)[1] <= _inside_range(-5000.0, 1e-30, 0.5, 10.0, 50)[0]
    assert _inside_range(5000.0, -1e-30, 0.5, 10.0, 50)[1] <= _inside_range(5000.0, -1e-30, 0.5, 10.0, 50)[0]
    assert _inside_range(5.0, 0.0, 0.5, 10.0, 7) == (0, 7)
