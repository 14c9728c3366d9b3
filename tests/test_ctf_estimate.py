"""Tests of tilt-aware per-tilt CTF estimation (``tomopipe.algorithms.ctf_estimate``).

The tilted images are simulated here with the CTF model (``tomopipe.algorithms.ctf``): a white
phase object, filtered by the CTF whose defocus follows the tilted specimen plane pixel by pixel
(``defocus_with_handedness`` of the projected depth), with a B-factor envelope, a smooth
(coloured, not CTF-modulated) background and shot noise at low SNR.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tomopipe.algorithms import ctf_estimate as ce
from tomopipe.algorithms.ctf import (
    ctf_1d,
    ctf_2d,
    defocus_with_handedness,
    electron_wavelength_A,
    enforce_ctffind_convention,
)
from tomopipe.algorithms.ctf_estimate.consistency import consistent_choice
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.errors import TomopipeError

F64 = torch.float64
KV, CS, AC = 300.0, 2.7, 0.07


# ----------------------------------------------------------------------------- simulator
class TiltedCtfSimulator:
    """Images of a tilted thin specimen with a spatially varying defocus.

    The CTF at defocus offset d from a reference is ``sin(χ_ref + π·λ·d·k²)``, built from two
    ``ctf_2d`` calls (phase shifts φ and φ + 90° give sin χ_ref and cos χ_ref). Each pixel's
    defocus is ``defocus_with_handedness(Δf_centre, z_P, hand)`` with the plane depth
    ``z_P = −tan θ·(x cos α + y sin α)`` (tilt θ about the axis at α from +y, CCW); the image is
    blended linearly from CTF-filtered copies at defocus levels ≤ 300 Å apart.
    """

    def __init__(self, size_px: int, pixel_size_A: float, half_astig_A: float, astig_angle_deg: float,
                 phase_shift_deg: float = 0.0, reference_A: float = 30000.0):
        n = size_px
        self.n, self.pixel, self.reference = n, pixel_size_A, reference_A
        u, v = torch.tensor(reference_A + half_astig_A, dtype=F64), reference_A - half_astig_A
        args = ((n, n), pixel_size_A, u, v, astig_angle_deg, KV, CS, AC)
        self.sin_ref = ctf_2d(*args, phase_shift_deg).float()
        self.cos_ref = ctf_2d(*args, phase_shift_deg + 90.0).float()
        ky = torch.fft.fftfreq(n, d=pixel_size_A)[:, None]
        kx = torch.fft.rfftfreq(n, d=pixel_size_A)[None, :]
        self.k2 = kx ** 2 + ky ** 2
        self.lam = float(electron_wavelength_A(KV))
        c = (torch.arange(n, dtype=F64) - n // 2) * pixel_size_A
        self.y, self.x = torch.meshgrid(c, c, indexing="ij")

    def image(self, gen: torch.Generator, tilt_deg: float, axis_deg: float, defocus_A: float, hand: int = -1,
              b_factor_A2: float = 100.0, dose_e_per_A2: float = 3.0, contrast: float = 0.15,
              background: float = 0.5, level_step_A: float = 300.0) -> torch.Tensor:
        n = self.n
        obj = torch.fft.rfft2(torch.randn(n, n, generator=gen))
        a, t = math.radians(axis_deg), math.radians(tilt_deg)
        depth = -math.tan(t) * (self.x * math.cos(a) + self.y * math.sin(a))
        offset = (defocus_with_handedness(torch.tensor(defocus_A, dtype=F64), depth, hand) - self.reference).float()
        lo, hi = float(offset.min()), float(offset.max())
        levels = torch.linspace(lo, hi, math.ceil((hi - lo) / level_step_A) + 1).tolist() if hi - lo > 1 else [lo]
        envelope = torch.exp(-0.25 * b_factor_A2 * self.k2)
        signal = torch.zeros(n, n)
        for d in levels:
            p = math.pi * self.lam * d * self.k2
            filtered = torch.fft.irfft2(obj * (self.sin_ref * torch.cos(p) + self.cos_ref * torch.sin(p)) * envelope,
                                        s=(n, n))
            if len(levels) == 1:
                signal = filtered
            else:
                signal += torch.clamp(1 - (offset - d).abs() / (levels[1] - levels[0]), min=0) * filtered
        coloured = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, n, generator=gen))
                                    / torch.sqrt(1 + self.k2 / 0.02 ** 2), s=(n, n))
        counts = dose_e_per_A2 * self.pixel ** 2
        return torch.poisson(counts * torch.clamp(1 + contrast * signal + background * coloured, min=0), generator=gen)


def simulate_series(seed: int, tilts_deg, hand: int = -1, half_astig_A: float = 300.0, astig_angle_deg: float = 25.0,
                    axis_deg: float = 85.0, base_A: float = 30000.0, size_px: int = 1024, pixel_size_A: float = 2.0,
                    contrast: float = 0.15, phase_shift_deg: float = 0.0):
    """Images ``[n, size, size]`` and true (U, V, angle) per tilt; the defocus drifts smoothly
    along the series with ±1000 Å tilt-to-tilt jitter, B = 100 Å² + 100 Å²·(1 − cos tilt)."""
    gen = torch.Generator().manual_seed(seed)
    sim = TiltedCtfSimulator(size_px, pixel_size_A, half_astig_A, astig_angle_deg, phase_shift_deg)
    images, truth = [], []
    for i, tilt in enumerate(tilts_deg):
        jitter = float(torch.rand((), generator=gen)) * 2000.0 - 1000.0
        d = base_A + 2500.0 * math.sin(0.3 * i + seed) + jitter
        images.append(sim.image(gen, tilt, axis_deg, d, hand=hand,
                                b_factor_A2=100.0 + 100.0 * (1 - math.cos(math.radians(tilt))), contrast=contrast))
        truth.append((d + half_astig_A, d - half_astig_A, astig_angle_deg))
    return torch.stack(images), torch.tensor(truth, dtype=F64)


def angle_difference_deg(a, b):
    """Difference of astigmatism angles modulo 180°, in (−90, 90]."""
    d = (torch.as_tensor(a, dtype=F64) - torch.as_tensor(b, dtype=F64)) % 180.0
    return torch.where(d > 90.0, d - 180.0, d)


# ----------------------------------------------------------------------------- windows and geometry
def test_tile_origins_cover_the_image_with_overlap():
    assert ce.tile_origins_px(1024, 512) == [0, 256, 512]
    assert ce.tile_origins_px(512, 512) == [0]
    origins = ce.tile_origins_px(1000, 512, overlap=0.5)
    assert origins[0] == 0 and origins[-1] == 1000 - 512
    assert all(b - a <= 256 for a, b in zip(origins, origins[1:]))
    with pytest.raises(TomopipeError, match="larger than the image"):
        ce.tile_origins_px(300, 512)


def test_power_spectrum_tiles_peak_parseval_and_frames():
    gen = torch.Generator().manual_seed(0)
    w, n = 128, 256
    # a cosine of 10 cycles per window along x and 4 along y (index space: +y = row index)
    yy, xx = torch.meshgrid(torch.arange(n, dtype=F64), torch.arange(n, dtype=F64), indexing="ij")
    img = torch.cos(2 * math.pi * (10 * xx + 4 * yy) / w).float()
    spectra, centres = ce.power_spectrum_tiles(img, w)
    assert spectra.shape == (9, w, w // 2 + 1)
    assert torch.equal(centres[0], torch.tensor([63.5, 63.5], dtype=F64))
    peak = torch.nonzero(spectra[0] == spectra[0].max())[0].tolist()
    assert peak == [4, 10]
    # white noise of variance s²: the mean periodogram is s² (taper-normalised)
    noise = 3.0 * torch.randn(n, n, generator=gen)
    spectra, _ = ce.power_spectrum_tiles(noise, w)
    assert float(spectra[:, 1:, 1:].mean()) == pytest.approx(9.0, rel=0.03)
    # frames: the periodograms of the frames are summed
    frames = torch.randn(3, n, n, generator=gen)
    summed, _ = ce.power_spectrum_tiles(frames, w)
    each = sum(ce.power_spectrum_tiles(f, w)[0] for f in frames)
    torch.testing.assert_close(summed, each, rtol=1e-4, atol=1e-4)


def test_specimen_plane_depth_matches_project_points():
    gen = torch.Generator().manual_seed(1)
    tilts = torch.tensor([-55.0, -20.0, 0.0, 35.0, 60.0], dtype=F64)
    axis = torch.tensor([85.3, 85.3, -86.7, 10.0, -120.0], dtype=F64)
    xy = (torch.rand(50, 2, generator=gen, dtype=F64) - 0.5) * 4000.0
    specimen = torch.cat([xy, torch.zeros(50, 1, dtype=F64)], 1)
    projected = project_points(specimen, projection_rotations(axis, tilts))  # [n, m, 3]
    for i in range(len(tilts)):
        depth = ce.specimen_plane_depth_A(projected[i, :, :2], axis[i], tilts[i])[0]
        torch.testing.assert_close(depth, projected[i, :, 2], rtol=0, atol=1e-6)
    # the closed form for an axis along +y: z_P = −x·tan θ
    z = ce.specimen_plane_depth_A(torch.tensor([[1000.0, 300.0]], dtype=F64), 0.0, 30.0)
    assert float(z) == pytest.approx(-1000.0 * math.tan(math.radians(30.0)), abs=1e-9)


# ----------------------------------------------------------------------------- 1-D fit and fit resolution
def test_fit_ctf_1d_recovers_defocus_from_a_noisy_rotational_average():
    gen = torch.Generator().manual_seed(2)
    k = torch.linspace(0.005, 0.2, 600, dtype=F64)
    for defocus in (9000.0, 27000.0, 52000.0):
        ctf2 = ctf_1d(k, torch.tensor(defocus, dtype=F64), KV, CS, AC, b_factor_A2=80.0) ** 2
        background = 5.0 * torch.exp(-k / 0.03) + 1.0 + 2.0 * k
        profile = (background + 0.6 * ctf2) * (1 + 0.1 * torch.randn(len(k), generator=gen, dtype=F64))
        fit = ce.fit_ctf_1d(profile, k, KV, CS, AC, defocus_range_A=(5000.0, 80000.0))
        assert abs(fit.defocus_A - defocus) < 60.0
        assert fit.score > 0.3
        assert fit.scores.shape == fit.defocus_grid_A.shape


def test_fit_resolution_rule_on_a_phase_profile():
    gen = torch.Generator().manual_seed(3)
    chi = torch.rand(200000, generator=gen, dtype=F64) * 30 * math.pi
    model = torch.sin(chi) ** 2
    signal_until = 17 * math.pi  # the data follow the model up to ring 16, then only noise
    noise = 0.3 * torch.randn(len(chi), generator=gen, dtype=F64)
    data = torch.where(chi < signal_until, model, torch.zeros_like(model)) + noise
    limit, corrs = ce.fit_resolution_from_phase_profile(chi, data, model, torch.ones_like(chi), chi_start_rad=0.5)
    assert limit == pytest.approx(signal_until, abs=1.01 * math.pi)
    assert float(corrs[:14].min()) > 0.9 and float(corrs[-5:].abs().mean()) < 0.3
    # no signal at all: the limit stays at the start
    limit, _ = ce.fit_resolution_from_phase_profile(chi, torch.randn(len(chi), generator=gen, dtype=F64), model,
                                                    torch.ones_like(chi), chi_start_rad=0.5)
    assert limit == 0.5


# ----------------------------------------------------------------------------- tilt series
@pytest.mark.parametrize("seed", [11, 12])
def test_tilt_series_defocus_accuracy(one_thread, seed):
    """11 tilts −40…40° (one noise draw per seed; per-pixel SNR ≈ 0.03): median |error| ≤ 150 Å and
    95th percentile ≤ 500 Å over U and V of all tilts, astigmatism (U − V) within 200 Å and its
    angle within 5°, every tilt's fit resolution reported, handedness −1 found, the 2 × 2 grid
    following the tilted plane."""
    tilts = [-40.0 + 8.0 * i for i in range(11)]
    images, truth = simulate_series(seed, tilts)
    res = ce.estimate_tilt_series_ctf(images, 2.0, torch.tensor(tilts, dtype=F64), 85.0, KV, CS, AC)
    n = len(tilts)
    for key in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg", "fit_resolution_A",
                "fit_score"):
        assert getattr(res, key).shape == (n,) and bool(torch.isfinite(getattr(res, key)).all()), key
    assert bool((res.defocus_u_A >= res.defocus_v_A).all())
    assert bool(((res.defocus_angle_deg > -90) & (res.defocus_angle_deg <= 90)).all())
    errors = torch.cat([(res.defocus_u_A.double() - truth[:, 0]).abs(),
                        (res.defocus_v_A.double() - truth[:, 1]).abs()])
    assert float(errors.median()) <= 150.0, errors
    assert float(torch.quantile(errors, 0.95)) <= 500.0, errors
    astig_error = ((res.defocus_u_A - res.defocus_v_A).double() - (truth[:, 0] - truth[:, 1])).abs()
    assert float(astig_error.max()) <= 200.0
    assert float(angle_difference_deg(res.defocus_angle_deg, truth[:, 2]).abs().max()) <= 5.0
    # fit resolution: inside [Nyquist, low limit of the fit range]; the rings reach the fit range
    assert bool(((res.fit_resolution_A >= 4.0) & (res.fit_resolution_A <= 30.0)).all())
    assert float(res.fit_resolution_A.median()) < 10.0
    assert bool((res.fit_score > 0.03).all())
    assert not bool(res.refit.any())  # all tilts were right on their own
    hd = res.handedness
    assert hd.evidence.hand == -1 and hd.hand_used == -1 and hd.evidence.score_minus_one > hd.evidence.score_plus_one
    assert hd.gradient_slope == pytest.approx(-1.0, abs=0.5)
    grid = res.defocus_grid_A
    assert grid.shape == (n, 2, 2)
    centre = (res.defocus_u_A + res.defocus_v_A) / 2
    assert float((grid.mean((1, 2)) - centre).abs().max()) < 400.0
    for i, tilt in enumerate(tilts):  # +x side of the axis more underfocused at positive tilts (hand −1)
        if abs(tilt) >= 16.0:
            assert _grid_gradient_sign(grid[i].double(), 85.0, tilt) * math.copysign(1.0, tilt) > 0
    assert res.power_spectra.shape == (n, 512, 512)


def _grid_gradient_sign(grid: torch.Tensor, axis_deg: float, tilt_deg: float) -> float:
    """Sign of the defocus change across the 2×2 grid along the direction perpendicular to the tilt
    axis, (cos α, sin α) in (x, y): positive when that side is more underfocused."""
    a = math.radians(axis_deg)
    xs, ys = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]), torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    proj = xs * math.cos(a) + ys * math.sin(a)
    return float(((grid - grid.mean()) * proj).sum())


@pytest.mark.parametrize("true_hand", [-1, 1])
def test_handedness_is_found_for_both_signs(one_thread, true_hand):
    """``hand="auto"`` detects each hand clearly (not by falling back on −1): all 8 tilts agree."""
    tilts = [-50.0, -40.0, -30.0, -20.0, 20.0, 30.0, 40.0, 50.0]
    images, truth = simulate_series(20 + true_hand, tilts, hand=true_hand, axis_deg=-80.0, half_astig_A=200.0)
    res = ce.estimate_tilt_series_ctf(images, 2.0, tilts, -80.0, KV, CS, AC, hand="auto")
    hd = res.handedness
    assert hd.evidence.hand == true_hand and hd.hand_used == true_hand
    assert hd.source == "detected" and hd.evidence.clear and hd.evidence.p_value <= ce.HAND_MAX_P
    assert hd.evidence.tilts_used == hd.evidence.tilts_agreeing == 8 and hd.evidence.t_statistic * true_hand > 3.0
    better, worse = (hd.evidence.score_plus_one, hd.evidence.score_minus_one) if true_hand == 1 else (
        hd.evidence.score_minus_one, hd.evidence.score_plus_one)
    assert better > worse
    assert hd.gradient_slope == pytest.approx(true_hand, abs=0.5)
    mean = (res.defocus_u_A + res.defocus_v_A).double() / 2
    assert float((mean - (truth[:, 0] + truth[:, 1]) / 2).abs().median()) < 150.0
    # the grid gradient across the axis: +x side (perpendicular to the axis) more underfocused at
    # positive tilts for hand −1 (conventions §4b), the opposite for hand +1
    for i, tilt in enumerate(tilts):
        sign = _grid_gradient_sign(res.defocus_grid_A[i].double(), -80.0, tilt)
        assert sign * math.copysign(1.0, tilt) * (-true_hand) > 0
    # a fixed hand is used as given, and the data's own hand is still reported
    if true_hand == 1:
        fixed = ce.estimate_tilt_series_ctf(images[:2], 2.0, tilts[:2], -80.0, KV, CS, AC, hand=-1)
        assert fixed.handedness.hand_used == -1 and fixed.handedness.evidence.hand == 1
        assert fixed.handedness.source == "given"


def test_handedness_evidence_statistics():
    """The decision on known per-tilt scores: tilts below 9.5° do not count; 8 of 8 agreeing give
    the sign-test p = 2/2⁸; consistent differences decide by the t-test with few tilts; a mean
    pulled by one tilt against the majority, or no informative tilt, is not clear."""
    minus = [0.10] * 8
    plus = [0.11, 0.12, 0.105, 0.13, 0.20, 0.14, 0.15, 0.11]
    tilts = [15.0, -15.0, 30.0, -30.0, 45.0, -45.0, 60.0, -60.0]
    e = ce.handedness_evidence(tilts, minus, plus)
    assert e.hand == 1 and e.clear and e.tilts_used == e.tilts_agreeing == 8
    d = torch.tensor(plus, dtype=F64) - 0.10
    assert e.t_statistic == pytest.approx(float(d.mean() / (d.std() / math.sqrt(8))))
    assert e.p_value == pytest.approx(2 / 2**8)  # the sign test beats t ≈ 3.0 (p ≈ 0.02)
    assert e.score_plus_one == pytest.approx(float(torch.tensor(plus).double().mean()))
    # the same with the signs swapped: hand -1
    assert ce.handedness_evidence(tilts, plus, minus).hand == -1
    # 3 tilts with consistent differences: t-test (2 degrees of freedom)
    few = ce.handedness_evidence([20.0, -30.0, 40.0], [0.1] * 3, [0.120, 0.121, 0.1205])
    assert few.clear and few.p_value < 0.001 and few.tilts_agreeing == 3
    # near-zero tilts are ignored: their differences cannot outvote the tilted ones
    mixed = ce.handedness_evidence(tilts + [0.0, 3.0, -6.0, 9.0], minus + [0.1] * 4, plus + [0.05] * 4)
    assert mixed.tilts_used == 8 and mixed.p_value == pytest.approx(e.p_value)
    # one large difference against 7 small opposite ones: the mean says +1, the majority -1
    outvoted = ce.handedness_evidence(tilts, minus, [0.5] + [0.099] * 7)
    assert outvoted.hand == 1 and outvoted.tilts_agreeing == 1 and not outvoted.clear
    none = ce.handedness_evidence([0.0, 3.0, -3.0], [0.1] * 3, [0.1, 0.2, 0.3])
    assert none.hand == 0 and not none.clear and none.tilts_used == 0 and none.p_value == 1.0


def test_hand_decision_follows_the_evidence_and_flattens_for_the_ctf_set():
    """``hand="auto"`` takes a clear hand and otherwise −1 (RELION's default); a given hand wins
    over the data. ``HandDecision.to_dict`` is the flat record the ctf set stores: every evidence
    field, then hand_used, source and gradient_slope."""
    from tomopipe.algorithms.ctf_estimate.handedness import decide_hand

    tilts = [15.0, -15.0, 30.0, -30.0, 45.0, -45.0, 60.0, -60.0]
    clear = ce.handedness_evidence(tilts, [0.10] * 8, [0.11, 0.12, 0.105, 0.13, 0.20, 0.14, 0.15, 0.11])
    unclear = ce.handedness_evidence([0.0, 3.0, -3.0], [0.1] * 3, [0.1, 0.2, 0.3])
    assert decide_hand("auto", clear) == (1, "detected")
    assert decide_hand("auto", unclear) == (-1, "default")
    assert decide_hand(-1, clear) == (-1, "given")
    record = ce.HandDecision(evidence=clear, hand_used=1, source="detected", gradient_slope=0.9).to_dict()
    assert list(record)[-3:] == ["hand_used", "source", "gradient_slope"]
    assert {k: record[k] for k in list(record)[:-3]} == dataclasses.asdict(clear)
    assert record["hand"] == 1 and record["clear"] and record["p_value"] == clear.p_value


def test_strong_astigmatism_per_tilt(one_thread):
    """Untilted images with different astigmatism, fitted independently (astigmatism_per_tilt)."""
    gen = torch.Generator().manual_seed(5)
    cases = [(26000.0, 1000.0, -50.0), (18000.0, 600.0, 70.0), (41000.0, 1500.0, 10.0)]  # mean, (U−V)/2, angle
    images = []
    for mean, half, angle in cases:
        sim = TiltedCtfSimulator(1024, 2.0, half, angle, reference_A=mean)
        images.append(sim.image(gen, 0.0, 85.0, mean, contrast=0.3))
    res = ce.estimate_tilt_series_ctf(torch.stack(images), 2.0, [0.0, 0.0, 0.0], 85.0, KV, CS, AC,
                                      astigmatism_per_tilt=True)
    for i, (mean, half, angle) in enumerate(cases):
        assert float(res.defocus_u_A[i]) == pytest.approx(mean + half, abs=150.0)
        assert float(res.defocus_v_A[i]) == pytest.approx(mean - half, abs=150.0)
        assert float(res.defocus_u_A[i] - res.defocus_v_A[i]) == pytest.approx(2 * half, abs=200.0)
        assert abs(float(angle_difference_deg(res.defocus_angle_deg[i], angle))) < 3.0


def test_phase_shift_is_fitted(one_thread):
    gen = torch.Generator().manual_seed(6)
    sim = TiltedCtfSimulator(768, 2.0, 300.0, 40.0, phase_shift_deg=70.0, reference_A=15000.0)
    images = torch.stack([sim.image(gen, t, 85.0, 15000.0, contrast=0.25) for t in (-10.0, 10.0)])
    res = ce.estimate_tilt_series_ctf(images, 2.0, [-10.0, 10.0], 85.0, KV, CS, AC, fit_phase=True)
    assert bool(((res.phase_shift_deg - 70.0).abs() < 15.0).all()), res.phase_shift_deg
    mean = (res.defocus_u_A + res.defocus_v_A) / 2
    assert bool(((mean - 15000.0).abs() < 500.0).all()), mean
    # without fit_phase the phase shift is reported as 0
    plain = ce.estimate_tilt_series_ctf(images[:1], 2.0, [-10.0], 85.0, KV, CS, AC, window_px=256)
    assert float(plain.phase_shift_deg[0]) == 0.0


def test_diagnostic_spectrum_model_half_matches_observed_half(one_thread):
    images, _ = simulate_series(7, [0.0], size_px=768, contrast=0.5)
    res = ce.estimate_tilt_series_ctf(images, 2.0, [0.0], 85.0, KV, CS, AC)
    ps = res.power_spectra[0].double()
    w = ps.shape[0]
    f = torch.fft.fftshift(torch.fft.fftfreq(w, d=2.0, dtype=F64))
    k = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    ring = (k > 1 / 30) & (k < 1 / 7)
    # left half (observed) against the point-mirrored right half (model): Friedel symmetry
    ys, xs = torch.nonzero(ring & (torch.arange(w)[None, :] < w // 2) & (torch.arange(w)[None, :] > 0)
                           & (torch.arange(w)[:, None] > 0), as_tuple=True)
    observed, model = ps[ys, xs], ps[w - ys, w - xs]
    corr = float(torch.corrcoef(torch.stack([observed, model]))[0, 1])
    assert corr > 0.3
    assert float(ps.abs().max()) <= 4.0


def test_bad_settings_raise_clear_errors():
    images = torch.zeros(2, 256, 256)
    args = ([0.0, 10.0], 85.0, KV, CS, AC)
    with pytest.raises(TomopipeError, match=r"beyond Nyquist \(8 Å at 4 Å/px\)"):
        ce.estimate_tilt_series_ctf(images, 4.0, *args, window_px=128, resolution_range_A=(30.0, 7.0))
    with pytest.raises(TomopipeError, match=r"window \(512 px\) is larger than the images \(256 x 256 px\)"):
        ce.estimate_tilt_series_ctf(images, 2.0, *args)
    with pytest.raises(TomopipeError, match="2 tilt angles for 3 images"):
        ce.estimate_tilt_series_ctf(torch.zeros(3, 256, 256), 2.0, *args, window_px=128)
    with pytest.raises(TomopipeError, match="hand must be"):
        ce.estimate_tilt_series_ctf(images, 2.0, *args, window_px=128, hand=0)
    with pytest.raises(TomopipeError, match="resolution_range_A"):
        ce.estimate_tilt_series_ctf(images, 2.0, *args, window_px=128, resolution_range_A=(7.0, 30.0))
    with pytest.raises(TomopipeError, match="defocus_range_A"):
        ce.estimate_tilt_series_ctf(images, 2.0, *args, window_px=128, defocus_range_A=(8e4, 5e3))
    with pytest.raises(TomopipeError, match="NaN"):
        ce.estimate_tilt_series_ctf(torch.full((2, 256, 256), float("nan")), 2.0, *args, window_px=128)
    assert issubclass(ce.CtfEstimationError, TomopipeError)


def test_consistency_prefers_the_series_trend_over_a_weak_far_maximum():
    """Robust trend + penalty (z-scores, 1 per 1000 Å beyond 1500 Å, at most 8): a tilt whose best
    maximum is slightly stronger but far off follows the series; a tilt with a strong genuine
    5000 Å jump keeps it; a tilt without any maximum near the truth stays near the trend."""
    step = 50.0
    grid = 5000.0 + step * torch.arange(1501, dtype=F64)
    gen = torch.Generator().manual_seed(8)
    tilts = [-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0]
    true = torch.tensor([30000.0, 30500.0, 31000.0, 36000.0, 31500.0, 31000.0, 30500.0], dtype=F64)  # jump at 0°

    def peak(centre, height):
        return height * torch.exp(-0.5 * ((grid - centre) / 150.0) ** 2)

    curves = []  # z-scores: unit noise, true maxima at z = 20 (30 for the jump)
    for i, d in enumerate(true.tolist()):
        curve = torch.randn(len(grid), generator=gen, dtype=F64) + peak(d, 20.0 if i != 3 else 30.0)
        if i == 5:  # the true maximum is weaker than a wrong one 15000 Å away
            curve = curve - peak(d, 8.0) + peak(d - 15000.0, 15.0)
        if i == 6:  # no maximum at the truth, a wrong one 20000 Å away
            curve = curve - peak(d, 18.0) + peak(d + 20000.0, 4.0)
        curves.append(curve)
    curves = torch.stack(curves)
    choice, trend = consistent_choice(curves, tilts, step, free_A=1500.0, z_per_A=1e-3, max_penalty=8.0)
    chosen = grid[torch.tensor(choice)]
    assert float((chosen[:6] - true[:6]).abs().max()) <= 100.0
    assert int(torch.argmax(curves[5])) != choice[5]  # tilt 20° did not take its own best maximum
    # tilt 30° (noise only near the truth): a value near the trend, not the maximum 20000 Å off
    assert abs(float(chosen[6] - (trend[6] + 5000.0))) <= 3000.0 and abs(float(chosen[6] - true[6])) < 5000.0
    assert float((trend + 5000.0 - true).abs()[[0, 1, 2, 4, 5]].max()) < 3000.0


# ----------------------------------------------------------------------------- the digital twin
def _twin_tilt_series(folder):
    """Frames summed per tilt ``[n, h, w]`` (gain-corrected) and the truth STAR rows (angle order)."""
    import numpy as np

    from tomopipe.io.movies import read_gain, read_movie
    from tomopipe.io.star import read_tilt_series_star

    star = read_tilt_series_star(folder / "truth" / "TS_01.star")
    gain = torch.from_numpy(read_gain(folder / "gain_ref.mrc", flip_y=True))  # stored upside down (README)
    sums = torch.stack([(torch.from_numpy(read_movie(folder / name).astype(np.float32)) * gain).sum(0)
                        for name in star["rlnMicrographMovieName"]])
    return sums, star


def _twin_truth(star):
    u, v, a = (torch.tensor(star[c].to_numpy(), dtype=F64) for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    return enforce_ctffind_convention(u, v, a)


def test_twin_tiny_noise_free_matches_its_truth(one_thread, tmp_path):
    """The simulator's image formation (multi-layer weak phase, coherence envelopes, MTF) and this
    estimator agree: noise-free ``tiny`` images (256 px, 3.16 Å/px), U and V within 100 Å of the
    truth STAR, the astigmatism angle (per tilt) within 5°."""
    from tomopipe.simulate import config_from_preset, simulate

    simulate(config_from_preset("tiny", seed=0, tilt_min_deg=-6.0, tilt_max_deg=6.0, shot_noise=False,
                                movie_format="mrc", radiation_damage=False, hot_pixels_per_megapixel=0.0,
                                xray_hits_per_megapixel_per_tilt=0.0, beam_induced_motion=False, local_motion=False),
             tmp_path, progress=False)
    sums, star = _twin_tilt_series(tmp_path)
    res = ce.estimate_tilt_series_ctf(sums, 3.16, star["rlnTomoYTilt"].tolist(), star["rlnTomoZRot"].tolist(), KV,
                                      CS, 0.1, window_px=256, astigmatism_per_tilt=True)
    u, v, a = _twin_truth(star)
    assert float((res.defocus_u_A.double() - u).abs().max()) <= 100.0, (res.defocus_u_A, u)
    assert float((res.defocus_v_A.double() - v).abs().max()) <= 100.0, (res.defocus_v_A, v)
    assert float(angle_difference_deg(res.defocus_angle_deg, a).abs().max()) <= 5.0
    assert bool((res.fit_score > 0.5).all()) and bool((res.fit_resolution_A < 8.0).all())


def test_twin_tiny_preset_scored_against_its_truth(one_thread, tmp_path):
    """The ``tiny`` preset as it is (2.64 e⁻/Å² per tilt on 256 px images, shot noise, damage, drift,
    hot pixels, X-rays): the frame sums' defocus within 1500 Å of the truth, median ≤ 500 Å."""
    from tomopipe.simulate import config_from_preset, simulate

    simulate(config_from_preset("tiny", seed=0), tmp_path, progress=False)
    sums, star = _twin_tilt_series(tmp_path)
    res = ce.estimate_tilt_series_ctf(sums, 3.16, star["rlnTomoYTilt"].tolist(), star["rlnTomoZRot"].tolist(), KV,
                                      CS, 0.1, window_px=256)
    u, v, _ = _twin_truth(star)
    error = ((res.defocus_u_A + res.defocus_v_A).double() / 2 - (u + v) / 2).abs()
    assert float(error.median()) <= 500.0 and float(error.max()) <= 1500.0, error
    assert bool(((res.fit_resolution_A >= 2 * 3.16) & (res.fit_resolution_A <= 30.0)).all())
