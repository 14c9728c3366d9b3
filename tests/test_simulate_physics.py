"""The simulated physics against the ground truth, each effect checked on written files.

* at tilt 0 without noise an image equals the CTF-modulated projection of the model's potential
  (computed here independently: gemmi potential of the rotated atoms, the conventions sheet's
  projection formulas and tomopipe's CTF);
* the zeros of a 1-D power spectrum sit where the true defocus puts them;
* the mean counts per frame match the mdoc dose;
* frame shifts measured by phase correlation on a noise-free movie match the truth.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import STRUCTURE, gemmi_potential_V
from tomopipe.algorithms.ctf import ctf_1d, ctf_2d, ctf_zero_frequencies_per_A
from tomopipe.algorithms.potential import interaction_constant_rad_per_V_A
from tomopipe.io.mdoc import read_mdoc
from tomopipe.io.movies import read_gain, read_movie
from tomopipe.io.star import read_particles_star, read_tilt_series_star, read_tomograms_star
from tomopipe.simulate import config_from_preset, simulate

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes):
    assert STRUCTURE.is_file(), f"the apoferritin model is expected at {STRUCTURE}"
    return config_from_preset("tiny", structure=str(STRUCTURE), truth_binnings=(1,), **changes)


# ----------------------------------------------------------------------------- independent model


def rz(a_deg: float) -> np.ndarray:
    """Active right-handed rotation about z (conventions sheet §0)."""
    c, s = math.cos(math.radians(a_deg)), math.sin(math.radians(a_deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def ry(a_deg: float) -> np.ndarray:
    """``Ry(a) = [[c, 0, s], [0, 1, 0], [-s, 0, c]]`` (conventions sheet §0)."""
    c, s = math.cos(math.radians(a_deg)), math.sin(math.radians(a_deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def projected_phase_box(rotation: np.ndarray, box: int, pixel_A: float, voltage_kV: float) -> np.ndarray:
    """Phase image (rad) of the model rotated by ``rotation`` (reference -> image frame), projected
    along z: gemmi electron-scattering potential on a 4× finer grid, Fourier-cropped, summed."""
    potential_V = gemmi_potential_V(box, pixel_A, rotation=rotation)
    return (potential_V.sum(0) * pixel_A * interaction_constant_rad_per_V_A(voltage_kV)).numpy()


def place(image_shape, box_image: np.ndarray, x_px: float, y_px: float) -> np.ndarray:
    """Put a box (centre at box//2) with its centre at pixel (x, y) of an image (sub-pixel by a phase ramp)."""
    h, w = image_shape
    n = box_image.shape[0]
    canvas = np.zeros((h, w))
    canvas[:n, :n] = box_image
    dx, dy = x_px - n // 2, y_px - n // 2
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    return np.fft.irfft2(np.fft.rfft2(canvas) * np.exp(-2j * np.pi * (kx * dx + ky * dy)), s=(h, w))


# ----------------------------------------------------------------------------- tests


def test_tilt_zero_image_equals_ctf_modulated_projection(tmp_path):
    config = tiny(
        tilt_min_deg=0.0, tilt_max_deg=0.0, particles_per_tilt_series=2, shot_noise=False, movie_format="mrc",
        ice_structure=False, solvent_exclusion=False, coherence_envelopes=False, detector_mtf=False,
        beam_induced_motion=False, radiation_damage=False, gain_reference=False, inelastic_loss=False,
        frames_per_tilt=1, dose_per_tilt_e_per_A2=10.0, implicit_hydrogens=False,  # gemmi sees the file's atoms
    )
    simulate(config, tmp_path, progress=False)
    frame = read_movie(next(tmp_path.glob("TS_01_001_*.mrc")))[0].astype(np.float64)
    p = config.pixel_size_A
    counts = config.dose_per_tilt_e_per_A2 * p * p
    contrast_sim = frame / counts - 1.0

    tilt = read_tilt_series_star(tmp_path / "truth" / "TS_01.star").iloc[0]
    particles, _ = read_particles_star(tmp_path / "truth" / "particles.star")
    hand = float(read_tomograms_star(tmp_path / "truth" / "tomograms.star")["rlnTomoHand"][0])
    h, w = frame.shape
    proj = rz(float(tilt.rlnTomoZRot)) @ ry(float(tilt.rlnTomoYTilt))
    spectrum = np.zeros((h, w // 2 + 1), dtype=complex)
    box = 56
    for _, part in particles.iterrows():
        x = np.array([part.rlnCenteredCoordinateXAngst, part.rlnCenteredCoordinateYAngst,
                      part.rlnCenteredCoordinateZAngst])
        a = Rotation.from_euler("ZYZ", [part.rlnAngleRot, part.rlnAngleTilt, part.rlnAnglePsi],
                                degrees=True).as_matrix().T
        phase = projected_phase_box(proj @ a, box, p, config.voltage_kV)
        img_pos = proj @ x
        px = w // 2 + (img_pos[0] + tilt.rlnTomoXShiftAngst) / p
        py = h // 2 + (img_pos[1] + tilt.rlnTomoYShiftAngst) / p
        dz = hand * img_pos[2]
        ctf = ctf_2d((h, w), p, tilt.rlnDefocusU + dz, tilt.rlnDefocusV + dz, tilt.rlnDefocusAngle,
                     300.0, 2.7, 0.1).double()
        spectrum += np.fft.rfft2(place((h, w), phase, px, py)) * ctf.numpy()
    # the simulator's projections are band-limited to the Nyquist circle (central slices of a sphere)
    q = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    contrast_ref = np.fft.irfft2(-2.0 * spectrum * (q <= 0.5), s=(h, w))
    corr = np.corrcoef(contrast_sim.ravel(), contrast_ref.ravel())[0, 1]
    rel = np.linalg.norm(contrast_sim - contrast_ref) / np.linalg.norm(contrast_ref)
    assert corr > 0.998, corr
    assert rel < 0.06, rel  # projector accuracy ~3 % (pad 3) and 50 Å depth layers
    assert abs(contrast_sim.min()) > 0.01  # the particles are really there (dark: protein denser than ice)


def radial_profile(image: np.ndarray, pixel_A: float, bins: int):
    ps = np.abs(np.fft.rfft2(image - image.mean())) ** 2
    h, w = image.shape
    q = np.sqrt(np.fft.fftfreq(h, d=pixel_A)[:, None] ** 2 + np.fft.rfftfreq(w, d=pixel_A)[None, :] ** 2)
    edges = np.linspace(0, 0.5 / pixel_A, bins + 1)
    idx = np.digitize(q.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < bins)
    total = np.bincount(idx[ok], ps.ravel()[ok], bins)
    count = np.maximum(np.bincount(idx[ok], minlength=bins), 1)
    return (edges[:-1] + edges[1:]) / 2, total / count


def test_thon_ring_zeros_match_the_true_defocus(tmp_path):
    pixel = 1.58
    config = tiny(
        image_width_px=512, image_height_px=512, pixel_size_A=pixel, tilt_min_deg=0.0, tilt_max_deg=0.0,
        particles_per_tilt_series=0, ice_thickness_A=300.0, astigmatism_A=0.0, astigmatism_sigma_A=0.0,
        dose_per_tilt_e_per_A2=100.0, frames_per_tilt=2, local_motion=False,
    )
    simulate(config, tmp_path, progress=False)
    frames = read_movie(tmp_path / "TS_01_001_0.0.tif").astype(np.float64)
    gain = read_gain(tmp_path / "gain_ref.mrc", flip_y=True)
    image = (frames * gain).sum(0)
    bins = 256
    q, profile = radial_profile(image, pixel, bins)
    truth = read_tilt_series_star(tmp_path / "truth" / "TS_01.star").iloc[0]
    defocus = float(truth.rlnDefocusU)
    assert defocus == pytest.approx(float(truth.rlnDefocusV))
    zeros = ctf_zero_frequencies_per_A(defocus, 300.0, 2.7, 0.1, 12).numpy()
    smooth = np.convolve(profile, np.ones(3) / 3, mode="same")
    minima = q[1:-1][(smooth[1:-1] < smooth[:-2]) & (smooth[1:-1] < smooth[2:])]
    bin_width = q[1] - q[0]
    for z in zeros:
        assert np.abs(minima - z).min() <= 1.5 * bin_width, (z, minima)
    # a 1-D fit of the defocus to the rings recovers the truth
    band = (q > 0.035) & (q < 0.28)
    background = np.convolve(profile, np.ones(15) / 15, mode="same")
    signal = (profile / background)[band]
    candidates = torch.arange(20000.0, 32000.0, 10.0, dtype=torch.float64)
    models = ctf_1d(torch.tensor(q[band])[None, :], candidates[:, None], 300.0, 2.7, 0.1).numpy() ** 2
    scores = [np.corrcoef(signal, m)[0, 1] for m in models]
    best = float(candidates[int(np.argmax(scores))])
    assert abs(best - defocus) < 100.0, (best, defocus)


def test_mean_counts_per_frame_match_the_mdoc_dose(tmp_path):
    config = tiny()
    simulate(config, tmp_path, progress=False)
    mdoc = read_mdoc(tmp_path / "TS_01.mdoc")
    gain = read_gain(tmp_path / "gain_ref.mrc", flip_y=True)  # the README's rule
    tilts = pd.read_csv(tmp_path / "truth" / "TS_01_tilts.csv").set_index("movie")
    hot = pd.read_csv(tmp_path / "truth" / "hot_pixels.csv")
    xrays = pd.read_csv(tmp_path / "truth" / "TS_01_xrays.csv")
    assert len(hot) > 0 and len(xrays) > 0
    pixel = mdoc.pixel_size_A
    for _, section in mdoc.sections.iterrows():
        movie = section.movie_name
        frames = read_movie(tmp_path / movie).astype(np.float64)
        assert frames.shape[0] == int(section.num_sub_frames)
        [(dose_per_frame, n)] = section.frame_doses_and_number
        assert int(n) == frames.shape[0]
        assert dose_per_frame * n == pytest.approx(section.exposure_dose_e_per_A2, rel=1e-3)
        mask = np.ones(frames.shape[1:], dtype=bool)
        mask[hot.y, hot.x] = False
        hits = xrays[xrays.movie == movie]
        mask[hits.y, hits.x] = False
        # the counts follow the zero-loss transmission through the (uneven) ice under the image
        expected = section.exposure_dose_e_per_A2 / n * pixel * pixel * tilts.loc[movie, "transmission_mean"]
        assert tilts.loc[movie, "transmission"] == pytest.approx(
            math.exp(-config.ice_thickness_A / (config.inelastic_mean_free_path_A
                                                * math.cos(math.radians(tilts.loc[movie, "true_tilt_deg"])))),
            rel=1e-6,
        )
        for frame in frames:
            corrected = (frame * gain)[mask]
            # Poisson error ~0.2 %; the particles' amplitude contrast darkens the mean slightly
            assert corrected.mean() == pytest.approx(expected, rel=0.01)
        raw_mean = frames[:, mask].mean()
        assert raw_mean == pytest.approx(expected * (1.0 / gain[mask]).mean(), rel=0.01)
        # hot pixels are brighter than the rest in every movie
        assert frames[:, hot.y, hot.x].mean() > expected + 0.5 * config.hot_pixel_rate_counts


def phase_correlation_shift(reference: np.ndarray, moving: np.ndarray, upsampling: int = 100) -> tuple[float, float]:
    """Displacement (dx, dy) of ``moving``'s content relative to ``reference`` (px): the peak of the
    phase correlation (whitened cross-power spectrum), refined by evaluating the correlation on a
    1/``upsampling`` px grid around it with a matrix-product DFT (Guizar-Sicairos et al. 2008)."""
    cross = np.conj(np.fft.fft2(reference)) * np.fft.fft2(moving)
    cross /= np.abs(cross) + 1e-12
    corr = np.fft.ifft2(cross).real
    h, w = corr.shape
    iy, ix = np.unravel_index(np.argmax(corr), corr.shape)
    y0 = iy if iy <= h // 2 else iy - h
    x0 = ix if ix <= w // 2 else ix - w
    offsets = np.arange(-1.5 * upsampling, 1.5 * upsampling + 1) / upsampling
    ys, xs = y0 + offsets, x0 + offsets
    ky, kx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    left = np.exp(2j * np.pi * ys[:, None] * ky[None, :])  # [ny, H]
    right = np.exp(2j * np.pi * kx[:, None] * xs[None, :])  # [W, nx]
    fine = (left @ cross @ right).real
    jy, jx = np.unravel_index(np.argmax(fine), fine.shape)
    return float(xs[jx]), float(ys[jy])


def test_frame_shifts_by_phase_correlation_match_the_truth(tmp_path):
    config = tiny(
        shot_noise=False, movie_format="mrc", gain_reference=False, local_motion=False, drift_A=12.0,
        tilt_min_deg=-6.0, tilt_max_deg=6.0, frames_per_tilt=6,
    )
    simulate(config, tmp_path, progress=False)
    truth = pd.read_csv(tmp_path / "truth" / "TS_01_frame_shifts.csv")
    errors = []
    for movie, rows in truth.groupby("movie"):
        frames = read_movie(tmp_path / movie).astype(np.float64)
        rows = rows.sort_values("frame")
        assert abs(rows.shift_x_px.iloc[-1]) + abs(rows.shift_y_px.iloc[-1]) > 1.0  # there is motion to find
        for f in range(1, frames.shape[0]):
            sx, sy = phase_correlation_shift(frames[0], frames[f])
            tx = rows.shift_x_px.iloc[f] - rows.shift_x_px.iloc[0]
            ty = rows.shift_y_px.iloc[f] - rows.shift_y_px.iloc[0]
            errors.append(math.hypot(sx - tx, sy - ty))
    errors = np.array(errors)
    assert errors.max() < 0.03, errors  # noise-free movie, 0.01 px search grid
    assert np.sqrt((errors**2).mean()) < 0.02


def test_radiation_damage_fades_the_particles_and_keeps_the_ice():
    """Frame f of a tilt with pre-exposure P: the particles' part of the contrast is multiplied by
    the exposure filter at P + (f + ½)·D/F, the ice's part is left as it is (shot noise off)."""
    from datetime import datetime

    from tomopipe.algorithms.filters import exposure_filter
    from tomopipe.simulate.detector import DetectorModel, exposure_rate_grid, render_frames
    from tomopipe.simulate.plan import TiltPlan

    h = w = 64
    pixel_A, dose_per_frame, pre_exposure = 2.0, 1.5, 60.0
    generator = torch.Generator().manual_seed(3)
    particles = torch.fft.rfft2(0.05 * torch.randn(h, w, generator=generator))
    ice = torch.fft.rfft2(0.05 * torch.randn(h, w, generator=generator))
    tilt = TiltPlan(index=5, nominal_deg=10.0, stage_deg=10.0, tilt_deg=10.0, axis_deg=0.0, shift_A=(0.0, 0.0),
                    magnification=1.0, defocus_u_A=2e4, defocus_v_A=2e4, astigmatism_angle_deg=0.0,
                    target_defocus_um=-2.0, scope_defocus_um=-2.0, pre_exposure_e_per_A2=pre_exposure,
                    dose_e_per_A2=2 * dose_per_frame, time=datetime(2026, 1, 1), frame_shifts_A=torch.zeros(2, 2),
                    local_profile=torch.zeros(2), local_field=None)
    detector = DetectorModel(gain=None, hot_pixels=torch.zeros(0, 2, dtype=torch.long), hot_pixel_rate_counts=0.0,
                             xray_hits_per_megapixel_per_tilt=0.0, shot_noise=False)
    frames, _, _ = render_frames(particles + ice, tilt, (h, w), pixel_A, 2, dose_per_frame, 1.0, detector, generator,
                                 exposure_rate=exposure_rate_grid((h, w), pixel_A, 300.0, "cpu"),
                                 damaged_spectrum=particles)
    counts_per_px = dose_per_frame * pixel_A ** 2
    ky = torch.fft.fftfreq(h, d=pixel_A)[:, None]
    kx = torch.fft.rfftfreq(w, d=pixel_A)[None, :]
    k = torch.sqrt(kx * kx + ky * ky)
    for f in range(2):
        dose = pre_exposure + (f + 0.5) * dose_per_frame
        expected = torch.fft.irfft2(particles * exposure_filter(k, dose, 300.0) + ice, s=(h, w))
        measured = frames[f].double() / counts_per_px - 1.0
        assert torch.allclose(measured, expected.double(), atol=2e-4)
    # the damage is real: the particles alone lose most of their power at 5 Å by then
    assert float(exposure_filter(torch.tensor(0.2), pre_exposure, 300.0)) < 0.1
