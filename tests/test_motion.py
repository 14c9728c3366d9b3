"""Motion correction (tomopipe.algorithms.motion) on synthetic movies with a known trajectory.

The movies are Gaussian blobs rendered exactly at sub-pixel positions (no interpolation), moved
by a smooth beam-induced trajectory (and, for local motion, a spatially varying field), turned
into expected counts with ~1 count/px/frame and sampled with Poisson noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.filters import exposure_filter
from tomopipe.algorithms.motion import (
    MotionModel,
    align_and_sum,
    apply_gain,
    bspline_basis,
    estimate_motion,
    fourier_shift_2d,
    frame_dose_e_per_A2,
    frame_times,
)

PIXEL_A = 1.0


def _render(positions_xy: torch.Tensor, amplitudes: torch.Tensor, sigma_px: float, shape) -> torch.Tensor:
    """Sum of Gaussian blobs at exact sub-pixel positions, separably: (Gy · a) @ Gxᵀ."""
    ny, nx = shape
    y = torch.arange(ny, dtype=torch.float64)[:, None]
    x = torch.arange(nx, dtype=torch.float64)[:, None]
    gy = torch.exp(-((y - positions_xy[None, :, 1]) ** 2) / (2 * sigma_px**2))
    gx = torch.exp(-((x - positions_xy[None, :, 0]) ** 2) / (2 * sigma_px**2))
    return ((gy * amplitudes[None]).float() @ gx.T.float()).double()


def beam_induced_trajectory_px(n_frames: int) -> torch.Tensor:
    """Fast early motion that slows down, plus slow drift; (x, y) px, mean zero over frames."""
    t = frame_times(n_frames)
    traj = torch.stack([4.0 * (1 - torch.exp(-t / 0.35)) + 0.8 * t,
                        -3.0 * (1 - torch.exp(-t / 0.5)) + 0.6 * t**2], dim=-1)
    return traj - traj.mean(0)


def synthetic_movie(shape=(384, 384), n_frames=8, counts=1.0, contrast=0.3, sigma_px=0.8, n_blobs=3000,
                    trajectory_px=None, field_px=None, seed=0):
    """(noisy counts [F, y, x], expected counts [F, y, x], true shifts (x, y) Å [F, 2], motion-free
    expected sum [y, x]). ``field_px(positions, t)`` adds a local displacement."""
    g = torch.Generator().manual_seed(seed)
    ny, nx = shape
    positions = torch.rand(n_blobs, 2, generator=g, dtype=torch.float64) * torch.tensor([nx, ny], dtype=torch.float64)
    amplitudes = torch.rand(n_blobs, generator=g, dtype=torch.float64) + 0.5
    trajectory = beam_induced_trajectory_px(n_frames) if trajectory_px is None else trajectory_px
    still = _render(positions, amplitudes, sigma_px, shape)
    mean, std = still.mean(), still.std()

    def to_counts(image):
        return (counts * (1 + contrast * (image - mean) / std)).clamp_min(0)

    times = frame_times(n_frames)
    expected = []
    for f in range(n_frames):
        moved = positions + trajectory[f]
        if field_px is not None:
            moved = moved + field_px(positions, times[f])
        expected.append(to_counts(_render(moved, amplitudes, sigma_px, shape)))
    expected = torch.stack(expected).float()
    noisy = torch.poisson(expected, generator=g)
    return noisy, expected, (trajectory * PIXEL_A).float(), (to_counts(still) * n_frames).float()


def band_power(image: torch.Tensor, pixel_size_A: float, low_A: float, high_A: float) -> float:
    spectrum = torch.fft.rfft2(image.double())
    ky = torch.fft.fftfreq(image.shape[0], dtype=torch.float64)[:, None] / pixel_size_A
    kx = torch.fft.rfftfreq(image.shape[1], dtype=torch.float64)[None, :] / pixel_size_A
    k = torch.sqrt(ky**2 + kx**2)
    band = (k >= 1 / low_A) & (k <= 1 / high_A)
    return float((spectrum.abs() ** 2)[band].sum())


def rms_A(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).pow(2).sum(-1).mean().sqrt())


def _model(shifts_A, shape, temporal=3):
    return MotionModel(shifts_A=shifts_A, raw_shifts_A=shifts_A, image_size_px=shape, pixel_size_A=PIXEL_A,
                       temporal=temporal)


# ---------------------------------------------------------------------------------------------

def test_bspline_basis_properties():
    t = frame_times(11)
    for n in (1, 2, 3, 4, 6):
        basis = bspline_basis(t, n)
        assert basis.shape == (11, n)
        assert torch.allclose(basis.sum(1), torch.ones(11, dtype=torch.float64))  # partition of unity
        assert bool((basis >= 0).all())
        if n > 1:  # clamped: the curve starts at the first and ends at the last control point
            assert basis[0, 0] == 1 and basis[-1, -1] == 1
    quadratic = bspline_basis(t, 3)  # 3 control points = a quadratic Bézier (Bernstein basis)
    bernstein = torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], dim=1)
    assert torch.allclose(quadratic, bernstein, atol=1e-12)
    # any quadratic trajectory is reproduced exactly by the 3-point model
    values = 2.0 - 3.0 * t + 5.0 * t**2
    fitted = quadratic @ torch.linalg.lstsq(quadratic, values[:, None]).solution
    assert torch.allclose(fitted[:, 0], values, atol=1e-10)


def test_fourier_shift_moves_content_by_plus_shift():
    image = torch.zeros(32, 48)
    image[20, 10] = 1.0  # row 20 (y), column 10 (x)
    moved = fourier_shift_2d(image, torch.tensor([3.0, -2.0]))
    y, x = divmod(int(moved.argmax()), 48)
    assert (x, y) == (13, 18)
    assert float(moved.max()) == pytest.approx(1.0, abs=1e-5)


def test_global_motion_matches_truth_subpixel():
    movie, _, truth_A, _ = synthetic_movie(counts=1.0, seed=1)
    model = estimate_motion(movie, PIXEL_A)  # the seed's 1 x 1 x 3 model, 500-10 Å, B = -500
    assert model.shifts_A.shape == (8, 2)
    assert torch.allclose(model.shifts_A.mean(0), torch.zeros(2), atol=1e-4)  # relative to the mean
    error = rms_A(model.shifts_A, truth_A)
    assert error <= 0.5, f"shift RMS error {error:.3f} Å"
    assert rms_A(model.raw_shifts_A, truth_A) <= 0.5
    assert rms_A(-model.shifts_A, truth_A) > 3.0  # the sign is content displacement, not the correction
    assert model.alignment_pixel_size_A > PIXEL_A  # estimated on frames Fourier-cropped to the fit range


def test_low_dose_half_count_per_pixel():
    movie, _, truth_A, _ = synthetic_movie(counts=0.5, contrast=0.2, seed=2)
    model = estimate_motion(movie, PIXEL_A)
    assert rms_A(model.shifts_A, truth_A) <= 0.5


def test_hot_pixels_and_x_ray_hits_do_not_pull_towards_zero_shift():
    movie, _, truth_A, _ = synthetic_movie(counts=1.0, contrast=0.2, seed=11)
    g = torch.Generator().manual_seed(3)
    hot = torch.randint(0, movie.shape[1] * movie.shape[2], (2000,), generator=g)
    movie.view(movie.shape[0], -1)[:, hot] += 5.0  # the same pixels in every frame: a fixed pattern
    hits = torch.randint(0, movie.numel(), (300,), generator=g)
    movie.view(-1)[hits] += 200.0  # X-ray hits: single pixels of single frames
    model = estimate_motion(movie, PIXEL_A)  # (these defects cost 0.87 Å RMS when left in)
    assert rms_A(model.shifts_A, truth_A) <= 0.3


def test_pure_noise_gives_no_motion_rather_than_a_noise_trajectory():
    noise = torch.poisson(torch.full((6, 256, 256), 1.0), generator=torch.Generator().manual_seed(9))
    model = estimate_motion(noise, PIXEL_A)
    assert not model.significant
    assert torch.equal(model.shifts_A, torch.zeros(6, 2))
    assert not MotionModel.from_dict(model.to_dict()).significant
    movie, _, _, _ = synthetic_movie(counts=1.0, seed=1)
    assert estimate_motion(movie, PIXEL_A).significant


def test_aligned_sum_restores_power_at_4_to_8_A():
    movie, expected, truth_A, still_sum = synthetic_movie(seed=4)
    model = estimate_motion(movie, PIXEL_A)
    # signal power of the noise-free frames aligned with the estimated shifts vs the motion-free sum
    aligned = align_and_sum(expected, PIXEL_A, model)["sum"]
    unaligned = expected.sum(0)
    reference = band_power(still_sum, PIXEL_A, 8.0, 4.0)
    restored = band_power(aligned, PIXEL_A, 8.0, 4.0) / reference
    assert restored >= 0.9, f"power at 4-8 Å restored to {restored:.3f}"
    assert band_power(unaligned, PIXEL_A, 8.0, 4.0) / reference < 0.6
    # plain sum: total counts preserved
    assert float(aligned.sum()) == pytest.approx(float(expected.sum()), rel=1e-4)


def _shear_field(size_px: int):
    def field(positions_xy, t):
        amplitude = 2.5 * (t - 0.5)  # px, opposite at the two ends of the exposure
        u = positions_xy[:, 0] / size_px - 0.5
        v = positions_xy[:, 1] / size_px - 0.5
        return torch.stack([2 * amplitude * u, -2 * amplitude * v], dim=-1)
    return field


def test_local_motion_grid_fits_a_smooth_field():
    size = 384
    field = _shear_field(size)
    movie, expected, truth_A, still_sum = synthetic_movie(shape=(size, size), field_px=field, seed=3)
    points = torch.tensor([[y, x] for y in (60.0, 192.0, 324.0) for x in (60.0, 192.0, 324.0)])
    times = frame_times(8)
    truth = torch.stack([truth_A[f] + field(points.flip(-1).double(), times[f]).float() * PIXEL_A for f in range(8)])
    truth = truth - truth.mean(0, keepdim=True)

    global_only = estimate_motion(movie, PIXEL_A, grid=(1, 1, 3))
    local = estimate_motion(movie, PIXEL_A, grid=(2, 2, 3))
    assert local.grid == (2, 2, 3) and local.local_control_A.shape == (3, 2, 2, 2)
    error_global = rms_A(global_only.shifts_at_A(points), truth)
    error_local = rms_A(local.shifts_at_A(points), truth)
    assert error_local <= 0.5 and error_global > 0.6, (error_local, error_global)
    reference = band_power(still_sum, PIXEL_A, 8.0, 4.0)
    restored_local = band_power(align_and_sum(expected, PIXEL_A, local)["sum"], PIXEL_A, 8.0, 4.0) / reference
    restored_global = band_power(align_and_sum(expected, PIXEL_A, global_only)["sum"], PIXEL_A, 8.0, 4.0) / reference
    assert restored_local >= 0.9 and restored_local > restored_global + 0.1


def test_local_grid_on_a_rigid_movie_keeps_no_spurious_field():
    movie, _, truth_A, _ = synthetic_movie(counts=0.7, contrast=0.2, seed=8)  # no local motion at all
    model = estimate_motion(movie, PIXEL_A, grid=(3, 3, 3))
    field = torch.stack([model.local_field_A(f) for f in range(model.n_frames)])
    assert float(field.norm(dim=-1).max()) < 0.1  # patch noise is not turned into a deformation
    assert rms_A(model.shifts_A, truth_A) <= 0.5


def test_dose_weighting_follows_the_exposure_filter():
    n_frames, shape = 6, (64, 64)
    doses = frame_dose_e_per_A2(pre_exposure_e_per_A2=20.0, tilt_dose_e_per_A2=3.0, n_frames=n_frames)
    assert torch.allclose(doses, 20.0 + 0.5 * torch.arange(1, 7, dtype=torch.float64))
    k = torch.sqrt(torch.fft.fftfreq(64, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(64, dtype=torch.float64)[None, :] ** 2) / PIXEL_A
    q = torch.stack([exposure_filter(k, float(d)) for d in doses])
    norm = torch.sqrt(n_frames / (q * q).sum(0))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    zero = _model(torch.zeros(n_frames, 2), shape)
    gains = []
    for frame in (0, n_frames - 1):
        movie = torch.zeros(n_frames, *shape)
        movie[frame] = noise
        out = align_and_sum(movie, PIXEL_A, zero, frame_dose_e_per_A2=doses)["sum"]
        ratio = torch.fft.rfft2(out.double()) / torch.fft.rfft2(noise.double())
        assert torch.allclose(ratio.real, q[frame] * norm, atol=1e-4)  # exactly the formula's weight
        assert float(ratio.imag.abs().max()) < 1e-4
        gains.append(ratio.real)
    high = k > 0.3  # late frames contribute less at high resolution than early frames
    assert bool((gains[1][high] < gains[0][high]).all())
    assert float(gains[1][high].mean()) < 0.8 * float(gains[0][high].mean())
    assert float(gains[0][0, 0]) == pytest.approx(1.0, abs=1e-6)  # DC: the plain sum


def test_even_odd_sums_add_up_with_dose_weighting_and_binning():
    movie, _, truth_A, _ = synthetic_movie(shape=(128, 160), n_frames=7, seed=6)
    model = _model(truth_A, (128, 160))
    doses = frame_dose_e_per_A2(10.0, 3.5, 7)
    out = align_and_sum(movie, PIXEL_A, model, frame_dose_e_per_A2=doses, binning_factor=2.0, even_odd=True)
    assert out["sum"].shape == (64, 80) and out["pixel_size_A"] == pytest.approx(2.0)
    assert torch.allclose(out["even"] + out["odd"], out["sum"], atol=1e-4)
    assert float(out["even"].mean()) == pytest.approx(float(movie[0::2].sum(0).mean()), rel=1e-4)
    assert float(out["odd"].mean()) == pytest.approx(float(movie[1::2].sum(0).mean()), rel=1e-4)
    # non-integer binning: Fourier-crop size and pixel size
    out = align_and_sum(movie, PIXEL_A, model, binning_factor=1.5)
    assert out["sum"].shape == (85, 106) and out["pixel_size_A"] == pytest.approx(160 / 106)
    assert out["even"] is None


def test_model_round_trip_and_local_field():
    control = torch.zeros(3, 2, 2, 2)
    control[2, 1, 1] = torch.tensor([1.0, -2.0])  # only the last time point, top-right corner
    model = MotionModel(shifts_A=torch.zeros(5, 2), raw_shifts_A=torch.zeros(5, 2), image_size_px=(33, 65),
                        pixel_size_A=1.5, temporal=3, local_control_A=control)
    again = MotionModel.from_dict(model.to_dict())
    assert again.grid == (2, 2, 3) and again.image_size_px == (33, 65)
    field = again.local_field_A(4)
    assert field.shape == (33, 65, 2)
    assert torch.allclose(field[32, 64], torch.tensor([1.0, -2.0])) and torch.allclose(field[0, 0], torch.zeros(2))
    assert torch.allclose(again.local_field_A(0), torch.zeros(33, 65, 2))
    at = again.shifts_at_A(torch.tensor([[32.0, 64.0], [16.0, 32.0]]))
    assert at.shape == (5, 2, 2) and torch.allclose(at[4, 0], torch.tensor([1.0, -2.0]))
    assert torch.allclose(at[4, 1], torch.tensor([0.25, -0.5]), atol=1e-6)  # bilinear at the centre
    # a field measured over a smaller rectangle continues linearly outside it
    inner = MotionModel.from_dict({**model.to_dict(), "local_extent_px": [8.0, 24.0, 16.0, 48.0]})
    at = inner.local_field_A(4, torch.tensor([[24.0, 48.0], [32.0, 64.0], [0.0, 16.0]]))
    assert torch.allclose(at, torch.tensor([[1.0, -2.0], [2.25, -4.5], [0.0, 0.0]]), atol=1e-4)
    assert torch.allclose(inner.local_field_A(4)[32, 64], torch.tensor([2.25, -4.5]), atol=1e-4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="1 frame; motion correction needs at least 2"):
        estimate_motion(torch.ones(1, 64, 64), PIXEL_A)
    with pytest.raises(ValueError, match="gain is 64 x 48 px but the frames are 48 x 64 px"):
        apply_gain(torch.ones(3, 64, 48), torch.ones(48, 64))
    with pytest.raises(ValueError, match="finer than Nyquist"):
        estimate_motion(torch.ones(3, 64, 64), 6.0, fit_resolution_max_A=10.0)
    movie = torch.ones(4, 64, 64)
    with pytest.raises(ValueError, match="motion model is for 5 frames"):
        align_and_sum(movie, PIXEL_A, _model(torch.zeros(5, 2), (64, 64)))
    assert torch.equal(apply_gain(torch.ones(2, 4, 3, dtype=torch.uint8), torch.full((4, 3), 2.0)),
                       torch.full((2, 4, 3), 2.0))


def test_batched_frames_float64_input_and_device_follow():
    movie, _, truth_A, _ = synthetic_movie(shape=(128, 128), n_frames=6, counts=2.0, seed=7)
    model = estimate_motion(movie.double(), PIXEL_A, fit_resolution_max_A=6.0)
    assert model.shifts_A.dtype == torch.float32 and model.shifts_A.device == movie.device
    assert rms_A(model.shifts_A, truth_A) <= 0.5
    assert not math.isnan(float(align_and_sum(movie.double(), PIXEL_A, model)["sum"].sum()))
