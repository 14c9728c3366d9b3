"""Fiducial-less alignment algorithms on synthetic tilt series with a known alignment (RELION 5
projection model): coarse alignment, patch tracking, the robust projection-model fit, depth-focused
point tracking, the whole two-stage alignment on a thick specimen, the tilt-angle offset from the
transmission, and clear failures."""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.align import (
    AlignOptions,
    align_images,
    aligned_views,
    bandpass_images,
    coarse_align,
    find_specimen_points,
    stretch_matrices,
    track_patches,
    track_points,
)
from tomopipe.algorithms.align_fit import (
    AlignmentError,
    FitOptions,
    fit_projection_model,
    projected_shift_error_px,
    transmission_tilt_offset,
)
from tomopipe.algorithms.align_offset import layer_tilt_offset, with_tilt_offset
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.simulate.blob_tilt_series import blob_tilt_series

AXIS_DEG = -85.6
TILTS_40 = torch.arange(-40.0, 40.1, 2.0, dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert abs(fit.tilt_offset_deg - 1.2) <= 0.3  # a thin flat slab: levelling the points finds the offset
    assert float((fit.tilt_deg - ts.true_tilt_deg).abs().max()) <= 1.0
    assert float((fit.magnification - ts.magnification).abs().max()) <= 0.01
    assert fit.rms_residual_px < 0.6 and fit.residual_view_px.shape == (41,)
    assert float(fit.shifts_px[20].norm()) < 1e-6  # origin under the image centre of the zero tilt


def test_small_patches_are_tracked():
    """The peak significance is measured against the whole correlation map: patches of 40 px
    (search radius 10 px) are tracked through the series, not stopped at the first view."""
    ts = blob_tilt_series(size_px=128, tilt_angles_deg=TILTS_40, tilt_axis_deg=AXIS_DEG, shift_sd_px=2.0,
                          slab_thickness_px=10.0, blobs=1500, noise_sd=0.5, seed=8)
    images = bandpass_images(ts.images)
    coarse = coarse_align(images, ts.nominal_tilt_deg, AXIS_DEG)
    tracks = track_patches(images, ts.nominal_tilt_deg, AXIS_DEG, coarse.shifts_px, 40, 0.5)
    lengths = (~torch.isnan(tracks.positions_px[..., 0])).sum(1)
    assert int((lengths == 41).sum()) >= 8, lengths.tolist()  # the central ones never leave the field


def test_outlier_contours_are_rejected():
    ts = blob_tilt_series(size_px=96, tilt_axis_deg=AXIS_DEG, seed=5)
    rot = projection_rotations(AXIS_DEG, ts.true_tilt_deg).to(torch.float64)
    xy = project_points(ts.points_px[:60], rot)[..., :2].transpose(0, 1) + ts.shifts_px[None]
    g = torch.Generator().manual_seed(0)
    xy = xy + 0.1 * torch.randn(xy.shape, generator=g, dtype=torch.float64)
    xy[:5, 25:] += 6.0 * torch.randn(5, 16, 2, generator=g, dtype=torch.float64)  # 5 contours jump to wrong features
    fit = fit_projection_model(xy, ts.nominal_tilt_deg, AXIS_DEG, torch.zeros(41, 2, dtype=torch.float64))
    assert not bool(fit.contour_used[:5].any()) and bool(fit.contour_used[5:].all())
    assert fit.rms_residual_px < 0.2 and float(fit.residual_contour_px[:5].min()) > 1.0
    error = projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification, ts.shifts_px)
    assert error["rms_px"] < 0.1


def test_an_imposed_tilt_offset_is_a_gauge():
    """Fitting with the tilt-angle offset fixed at any value gives the same projections (and shifts)."""
    ts = blob_tilt_series(size_px=96, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=0.7, seed=6)
    rot = projection_rotations(AXIS_DEG, ts.true_tilt_deg).to(torch.float64)
    xy = project_points(ts.points_px[:80], rot)[..., :2].transpose(0, 1) + ts.shifts_px[None]
    fits = [fit_projection_model(xy, ts.nominal_tilt_deg, AXIS_DEG, ts.shifts_px,
                                 FitOptions(refine_magnification=False),
                                 tilt_offset_deg=offset) for offset in (0.7, -3.0)]
    assert fits[0].tilt_offset_deg == pytest.approx(0.7) and fits[1].tilt_offset_deg == pytest.approx(-3.0)
    for fit in fits:
        assert fit.rms_residual_px < 1e-3
        assert projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification,
                                        ts.shifts_px)["rms_px"] < 1e-3


def test_pure_noise_fails_clearly():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(21, 128, 128, generator=g)
    tilts = torch.arange(-60.0, 60.1, 6.0, dtype=torch.float64)
    filtered = bandpass_images(images)
    coarse = coarse_align(filtered, tilts, AXIS_DEG)
    tracks = track_patches(filtered, tilts, AXIS_DEG, coarse.shifts_px, 48, 0.8)
    with pytest.raises(AlignmentError, match="too few contours|fewer than"):
        fit_projection_model(tracks.positions_px, tilts, AXIS_DEG, coarse.shifts_px, FitOptions())
    with pytest.raises(AlignmentError, match="too few contours|fewer than"):
        align_images(images, tilts, AXIS_DEG, AlignOptions(patch_size_px=48))


def test_contours_of_no_rigid_specimen_fail_the_fit():
    """Contours that wander (independent random walks) cannot be one rigid specimen: the fit
    reports its RMS residual instead of returning an alignment."""
    g = torch.Generator().manual_seed(2)
    tilts = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
    start = (torch.rand(40, 1, 2, generator=g, dtype=torch.float64) - 0.5) * 100
    walk = torch.cumsum(1.5 * torch.randn(40, tilts.numel(), 2, generator=g, dtype=torch.float64), dim=1)
    with pytest.raises(AlignmentError, match="RMS residual"):
        fit_projection_model(start + walk, tilts, AXIS_DEG, torch.zeros(tilts.numel(), 2, dtype=torch.float64),
                             FitOptions(outlier_mad_factor=10.0))


def _true_aligned_views(ts):
    n = ts.images.shape[0]
    size = ts.images.shape[-1]
    return aligned_views(bandpass_images(ts.images, sigma1=0.03, radius2=0.3),
                         torch.full((n,), ts.tilt_axis_deg, dtype=torch.float64), ts.shifts_px, ts.magnification,
                         (size, size))


def test_point_tracking_measures_the_projections_of_specimen_points():
    """With the true alignment, every point's measured positions follow the projection of one 3-D
    point at the true (x, y): residual and x, y error well below a pixel (depth may be pulled a
    little towards features at other depths sharing the window)."""
    ts = blob_tilt_series(size_px=128, tilt_angles_deg=torch.arange(-40.0, 40.1, 4.0), tilt_axis_deg=AXIS_DEG,
                          shift_sd_px=3.0, slab_thickness_px=40.0, blobs=80, blob_sigma_px=2.0, noise_sd=0.3, seed=4)
    views, coverage = _true_aligned_views(ts)
    points = ts.points_px[(ts.points_px[:, :2].abs() < 40).all(-1)]
    tracks = track_points(views, coverage, ts.true_tilt_deg, points, 24)
    seen = ~torch.isnan(tracks.positions_px[..., 0])
    assert int(seen.sum()) >= 0.8 * seen.numel()
    t = torch.deg2rad(ts.true_tilt_deg)
    zero = torch.zeros_like(t)
    a = torch.stack([torch.stack([torch.cos(t), zero, torch.sin(t)], -1),
                     torch.stack([zero, torch.ones_like(t), zero], -1)], 1)  # aligned frame: [Ry p]_xy
    w = seen.to(torch.float64)
    h = torch.einsum("mn,nki,nkj->mij", w, a, a)
    fitted = torch.linalg.solve(h, torch.einsum("mn,nki,mnk->mi", w, a, torch.nan_to_num(tracks.positions_px)))
    residual = (torch.einsum("nki,mi->mnk", a, fitted) - tracks.positions_px).norm(dim=-1)[seen]
    assert float(residual.median()) < 0.5
    assert float((fitted[:, :2] - points[:, :2]).norm(dim=-1).median()) < 0.5
    assert float((fitted[:, 2] - points[:, 2]).abs().median()) < 1.0


def test_specimen_points_are_found_at_features():
    ts = blob_tilt_series(size_px=128, tilt_angles_deg=torch.arange(-40.0, 40.1, 4.0), tilt_axis_deg=AXIS_DEG,
                          shift_sd_px=3.0, slab_thickness_px=40.0, blobs=80, blob_sigma_px=2.0, noise_sd=0.3, seed=4)
    views, coverage = _true_aligned_views(ts)
    found = find_specimen_points(views, coverage, ts.true_tilt_deg, 40.0, count=10, min_distance_px=6, border_px=14)
    assert found.shape == (10, 3)
    distance = torch.cdist(found, ts.points_px).min(1).values
    assert int((distance < 2.5).sum()) >= 8, distance.tolist()  # binned search: within a voxel or so


def test_two_stage_alignment_of_a_thick_specimen():
    """A slab as thick as a third of the field: contours of 48-px patches are blends of features at
    different depths and bias the tilt axis; the point stage recovers it and the shifts."""
    ts = blob_tilt_series(size_px=160, tilt_angles_deg=TILTS_40, tilt_axis_deg=AXIS_DEG, shift_sd_px=3.0,
                          slab_thickness_px=60.0, blobs=500, blob_sigma_px=2.0, noise_sd=0.5, seed=1)
    result = align_images(ts.images, ts.nominal_tilt_deg, AXIS_DEG + 1.0,
                          AlignOptions(patch_size_px=48, point_window_px=24))
    assert result.stage == "points" and result.note == "" and 1 <= len(result.rounds) <= 3
    fit, patch = result.fit, result.patch_fit
    errors = {name: (abs(f.axis_deg - AXIS_DEG), projected_shift_error_px(
        f.rot_z_deg, f.tilt_deg, f.shifts_px, f.magnification, ts.shifts_px)["rms_px"]) for name, f in
        (("points", fit), ("patches", patch))}
    assert errors["points"][0] <= 0.3, errors
    assert errors["points"][1] <= 0.15, errors
    assert result.points_xyz_px.shape[0] >= 50 and int(fit.contour_used.sum()) >= 30
    assert float(fit.shifts_px[20].norm()) < 1e-6


def test_images_too_small_for_point_windows_keep_the_patch_fit():
    ts = blob_tilt_series(size_px=96, tilt_angles_deg=TILTS_40, tilt_axis_deg=AXIS_DEG, shift_sd_px=1.0,
                          slab_thickness_px=8.0, blobs=800, noise_sd=0.3, seed=9)
    result = align_images(ts.images, ts.nominal_tilt_deg, AXIS_DEG, AlignOptions(patch_size_px=48, point_window_px=90))
    assert result.stage == "patches" and "too small" in result.note and result.fit is result.patch_fit


def test_transmission_tilt_offset_recovers_the_slab_tilt():
    theta = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
    exact = 1.6 * torch.exp(-0.3 / torch.cos(torch.deg2rad(theta + 0.5)))
    fit = transmission_tilt_offset(theta, exact)
    assert fit.tilt_offset_deg == pytest.approx(0.5, abs=1e-3) and fit.thickness_mfp == pytest.approx(0.3, rel=1e-3)
    assert fit.log_intensity_0 == pytest.approx(math.log(1.6), abs=1e-3) and fit.rms_log_residual < 1e-6
    g = torch.Generator().manual_seed(0)
    noisy = exact * (1 + 5e-4 * torch.randn(theta.shape, generator=g, dtype=torch.float64))  # shot noise of ~4 Me-
    fit = transmission_tilt_offset(theta, noisy)
    assert abs(fit.tilt_offset_deg - 0.5) < max(4 * fit.offset_se_deg, 0.02) and fit.offset_se_deg < 0.2
    assert abs(fit.tilt_offset_deg - 0.5) < 0.3


def test_transmission_refuses_what_is_not_a_transmission():
    theta = torch.arange(-40.0, 40.1, 4.0, dtype=torch.float64)
    with pytest.raises(AlignmentError, match="positive"):
        transmission_tilt_offset(theta, torch.zeros_like(theta))  # density-scaled views: mean 0
    with pytest.raises(AlignmentError, match="does not fall|no minimum"):
        transmission_tilt_offset(theta, torch.exp(0.2 / torch.cos(torch.deg2rad(theta))))  # brighter when tilted
    with pytest.raises(AlignmentError, match="at least 5"):
        transmission_tilt_offset(theta[:3], torch.ones(3, dtype=torch.float64))
    ragged = torch.exp(-0.3 / torch.cos(torch.deg2rad(theta))) * (1 + 0.3 * (torch.arange(theta.numel()) % 2))
    with pytest.raises(AlignmentError, match="do not follow"):
        transmission_tilt_offset(theta, ragged)


@pytest.mark.parametrize("seed", [0, 4, 5])
def test_flat_intensities_give_no_transmission_offset(seed):
    """Unfiltered data (or a dose that is not known per view): the mean intensity does not fall with
    tilt. Noise alone made the old fit report offsets of -2.3, +6.8 and -12.8 deg for these seeds;
    the slope is not significant, so the fit refuses."""
    theta = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    flat = 5000.0 * (1 + 0.01 * torch.randn(theta.shape, generator=g, dtype=torch.float64))
    with pytest.raises(AlignmentError, match="significantly|no minimum|does not fall"):
        transmission_tilt_offset(theta, flat)


def test_transmission_divides_by_each_views_dose():
    """SerialEM's cos-dependent exposure raises the dose at high tilt (here 1/cos): per unit dose the
    slab law holds and the offset is found; the raw means rise with tilt and are refused."""
    theta = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
    dose = 2.0 / torch.cos(torch.deg2rad(theta))
    g = torch.Generator().manual_seed(2)
    means = 800.0 * dose * torch.exp(-0.3 / torch.cos(torch.deg2rad(theta + 1.5)))
    means = means * (1 + 1e-3 * torch.randn(theta.shape, generator=g, dtype=torch.float64))
    fit = transmission_tilt_offset(theta, means, dose)
    assert abs(fit.tilt_offset_deg - 1.5) < max(4 * fit.offset_se_deg, 0.05) and fit.offset_se_deg < 0.1
    assert fit.thickness_mfp == pytest.approx(0.3, rel=0.02) and fit.thickness_mfp > 10 * fit.thickness_se_mfp
    with pytest.raises(AlignmentError, match="does not fall|no minimum"):
        transmission_tilt_offset(theta, means)
    with pytest.raises(AlignmentError, match="positive dose"):
        transmission_tilt_offset(theta, means, torch.zeros_like(theta))


def test_an_offset_applied_afterwards_changes_no_projection():
    ts = blob_tilt_series(size_px=96, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=0.7, seed=6)
    rot = projection_rotations(AXIS_DEG, ts.true_tilt_deg).to(torch.float64)
    xy = project_points(ts.points_px[:80], rot)[..., :2].transpose(0, 1) + ts.shifts_px[None]
    fit = fit_projection_model(xy, ts.nominal_tilt_deg, AXIS_DEG, ts.shifts_px, FitOptions(refine_magnification=False))
    moved = with_tilt_offset(fit, -4.0)
    assert moved.tilt_offset_deg == pytest.approx(-4.0) and torch.allclose(
        moved.tilt_deg - fit.tilt_deg, fit.tilt_deg.new_full((41,), -4.0 - fit.tilt_offset_deg))
    for f in (fit, moved):
        projected = project_points(f.points_px, projection_rotations(f.rot_z_deg, f.tilt_deg))[..., :2]
        assert float((projected.transpose(0, 1) + f.shifts_px[None] - xy).norm(dim=-1).max()) < 1e-3


@pytest.mark.parametrize("offset_deg", [4.0, -3.0])
def test_tilt_offset_from_the_layer_in_a_quick_tomogram(offset_deg):
    """A slab of blobs tilted by the offset, aligned with the offset imposed at 0: the layer in the
    quick tomogram is tilted, and levelling it finds the true offset (no intensities used)."""
    ts = blob_tilt_series(size_px=128, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=offset_deg, shift_sd_px=2.0,
                          slab_thickness_px=30.0, blobs=3000, noise_sd=0.7, seed=12)
    result = align_images(ts.images, ts.nominal_tilt_deg, AXIS_DEG, AlignOptions(patch_size_px=48, points=False),
                          tilt_offset_deg=0.0)
    layer = layer_tilt_offset(ts.images, result.fit)
    assert abs(layer.tilt_offset_deg - offset_deg) <= max(3 * layer.uncertainty_deg, 0.5), layer
    assert layer.uncertainty_deg < 1.0 and 20 <= layer.thickness_px <= 45, layer


def test_layer_offset_refuses_noise():
    g = torch.Generator().manual_seed(3)
    ts = blob_tilt_series(size_px=96, tilt_axis_deg=AXIS_DEG, seed=6)
    fit = fit_projection_model(
        project_points(ts.points_px[:80], projection_rotations(AXIS_DEG, ts.true_tilt_deg).to(torch.float64))[..., :2]
        .transpose(0, 1) + ts.shifts_px[None], ts.nominal_tilt_deg, AXIS_DEG, ts.shifts_px)
    with pytest.raises(AlignmentError, match="no specimen layer"):
        layer_tilt_offset(torch.randn(41, 96, 96, generator=g), fit)


def test_sparse_low_signal_field_degrades_gracefully(tmp_path):
    """Defect 4 on the twin: a 1024 A field with 16 particles at 2 A/px aligned at 8 A/px (the mdoc's
    axis off by the twin's calibration error). Patch tracking keeps too few contours in some high
    tilts (the old alignment failed there: "fewer than 3 tracked contours"); those views are
    aligned by whole-view cross-correlation, and the point stage fits (nearly) every view."""
    from tomopipe.simulate.config import config_from_preset
    from tomopipe.simulate.run import simulate
    from tomopipe.validate.score_alignment import score_alignment
    from tomopipe.validate.truth import Truth
    from tomopipe.validate.twin_views import twin_views

    simulate(config_from_preset("tiny", image_width_px=512, image_height_px=512, pixel_size_A=2.0,
                                tilt_min_deg=-52.0, tilt_max_deg=52.0, tilt_step_deg=4.0, particles_per_tilt_series=16,
                                frames_per_tilt=1, beam_induced_motion=False, local_motion=False, movie_format="mrc",
                                ice_thickness_A=600.0, xray_hits_per_megapixel_per_tilt=0.5,
                                hot_pixels_per_megapixel=2.0, stage_shift_sigma_A=60.0, seed=4), tmp_path,
             progress=False)
    views = twin_views(tmp_path, "TS_01", binning=4)
    options = AlignOptions(patch_size_px=round(500 / views.pixel_size_A),
                           point_window_px=round(250 / views.pixel_size_A))
    result = align_images(views.images, views.tilt_angles_deg, views.tilt_axis_deg, options)
    assert not bool(result.patch_fit.view_fitted.all())  # the patch stage left views to cross-correlation
    assert result.stage == "points" and int(result.fit.view_fitted.sum()) >= 24, result.note
    fitted = result.fit.view_fitted
    assert bool(torch.isnan(result.fit.residual_view_px[~fitted]).all())
    assert float(result.fit.residual_view_px[fitted].max()) < 1.5 and bool(torch.isfinite(result.fit.shifts_px).all())
    score = score_alignment(views.items(result.fit), views.attrs, Truth.find(tmp_path))["tilt_series"]["TS_01"]
    assert abs(score["axis_error_deg"]) <= 0.5 and score["shift_rms_px"] <= 1.0, score
