"""Fiducial-less alignment algorithms on synthetic tilt series with a known alignment (RELION 5
projection model): coarse alignment, patch tracking and the robust projection-model fit."""

from __future__ import annotations

import pytest
import torch

from tomopipe.algorithms.align import bandpass_images, coarse_align, stretch_matrices, track_patches
from tomopipe.algorithms.align_fit import AlignmentError, FitOptions, fit_projection_model, projected_shift_error_px
from tomopipe.algorithms.align_synthetic import blob_tilt_series

AXIS_DEG = -85.6


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stretch_foreshortens_only_perpendicular_to_the_axis():
    s = stretch_matrices(AXIS_DEG, 0.0, 60.0)[0]
    a = torch.deg2rad(torch.tensor(AXIS_DEG, dtype=torch.float64))
    along = torch.stack([-torch.sin(a), torch.cos(a)])
    across = torch.stack([torch.cos(a), torch.sin(a)])
    assert torch.allclose(s @ along, along, atol=1e-12)
    assert torch.allclose(s @ across, 0.5 * across, atol=1e-12)


def test_patch_tracking_and_fit_recover_the_alignment():
    ts = blob_tilt_series(size_px=224, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=1.2, shift_sd_px=2.0,
                          magnification_sd=0.005, slab_thickness_px=12.0, blobs=3000, noise_sd=0.7, seed=3)
    start_axis = AXIS_DEG + 0.8  # the imported (nominal) axis is 0.8 deg off
    images = bandpass_images(ts.images)
    coarse = coarse_align(images, ts.nominal_tilt_deg, start_axis)
    relative = ts.shifts_px - ts.shifts_px[20]  # coarse shifts are 0 at the zero tilt
    assert float((coarse.shifts_px - relative).norm(dim=-1).max()) < 2.0
    tracks = track_patches(images, ts.nominal_tilt_deg, start_axis, coarse.shifts_px, 64, 0.8)
    assert tracks.positions_px.shape[1] == 41 and tracks.positions_px.shape[0] >= 100
    fit = fit_projection_model(tracks.positions_px, ts.nominal_tilt_deg, start_axis, coarse.shifts_px)
    error = projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification, ts.shifts_px)
    assert error["rms_px"] <= 0.5, error
    assert abs(fit.axis_deg - AXIS_DEG) <= 0.3
    assert abs(fit.tilt_offset_deg - 1.2) <= 0.3
    assert float((fit.tilt_deg - ts.true_tilt_deg).abs().max()) <= 1.0
    assert float((fit.magnification - ts.magnification).abs().max()) <= 0.01
    assert fit.rms_residual_px < 0.6 and fit.residual_view_px.shape == (41,)
    assert float(fit.shifts_px[20].norm()) < 1e-6  # origin under the image centre of the zero tilt


def test_outlier_contours_are_rejected():
    ts = blob_tilt_series(size_px=96, tilt_axis_deg=AXIS_DEG, seed=5)
    rot_points = ts.points_px[:60]
    from tomopipe.algorithms.geometry import project_points, projection_rotations
    rot = projection_rotations(AXIS_DEG, ts.true_tilt_deg).to(torch.float64)
    xy = project_points(rot_points, rot)[..., :2].transpose(0, 1) + ts.shifts_px[None]
    g = torch.Generator().manual_seed(0)
    xy = xy + 0.1 * torch.randn(xy.shape, generator=g, dtype=torch.float64)
    xy[:5, 25:] += 6.0 * torch.randn(5, 16, 2, generator=g, dtype=torch.float64)  # 5 contours jump to wrong features
    fit = fit_projection_model(xy, ts.nominal_tilt_deg, AXIS_DEG, torch.zeros(41, 2, dtype=torch.float64))
    assert not bool(fit.contour_used[:5].any()) and bool(fit.contour_used[5:].all())
    assert fit.rms_residual_px < 0.2 and float(fit.residual_contour_px[:5].min()) > 1.0
    error = projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification, ts.shifts_px)
    assert error["rms_px"] < 0.1


def test_pure_noise_fails_clearly():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(21, 128, 128, generator=g)
    tilts = torch.arange(-60.0, 60.1, 6.0, dtype=torch.float64)
    filtered = bandpass_images(images)
    coarse = coarse_align(filtered, tilts, AXIS_DEG)
    tracks = track_patches(filtered, tilts, AXIS_DEG, coarse.shifts_px, 48, 0.8)
    with pytest.raises(AlignmentError, match="too few contours|fewer than"):
        fit_projection_model(tracks.positions_px, tilts, AXIS_DEG, coarse.shifts_px, FitOptions())
