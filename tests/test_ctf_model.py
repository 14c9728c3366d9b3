"""Tests of the CTF model conventions (docs/conventions.md §4, §8 T8/T9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tomopipe.algorithms import ctf as c
from tomopipe.algorithms import geometry as g

F64 = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=F64)


# ----------------------------------------------------------------------------- constants
@pytest.mark.parametrize("kv, expected_A", [(300.0, 0.019687), (200.0, 0.025079), (100.0, 0.037014)])
def test_electron_wavelength(kv, expected_A):
    assert float(c.electron_wavelength_A(t(kv))) == pytest.approx(expected_A, abs=2e-6)


def test_amplitude_contrast_phase_and_dc_value():
    assert math.degrees(float(c.amplitude_contrast_phase_rad(t(0.1)))) == pytest.approx(5.739, abs=1e-3)
    for w in (0.0, 0.07, 0.1, 0.3):
        # DC value = amplitude contrast with RELION's sign (positive first peak), minus it with CTFFIND's
        relion = c.ctf_2d((32, 32), 1.5, 20000.0, 18000.0, 10.0, 300.0, 2.7, w)
        ctffind = c.ctf_2d((32, 32), 1.5, 20000.0, 18000.0, 10.0, 300.0, 2.7, w, convention="ctffind")
        assert float(relion[0, 0]) == pytest.approx(w, abs=1e-6)
        torch.testing.assert_close(ctffind, -relion)
    with pytest.raises(ValueError, match="amplitude_contrast"):
        c.ctf_1d(0.1, 20000.0, 300.0, 2.7, 1.0)
    with pytest.raises(ValueError, match="voltage"):
        c.electron_wavelength_A(0.0)
    with pytest.raises(ValueError, match="convention"):
        c.ctf_1d(0.1, 20000.0, 300.0, 2.7, 0.1, convention="imod")


def test_first_peak_positive_and_phase_shift():
    k = torch.linspace(0, 0.02, 200, dtype=F64)
    # before the first zero the CTF is positive and rises from w
    z1 = float(c.ctf_zero_frequencies_per_A(t(30000.0), 300.0, 2.7, 0.07, 1)[0])
    ctf = c.ctf_1d(k[k < z1], t(30000.0), 300.0, 2.7, 0.07)
    assert torch.all(ctf > 0)
    # a 90 degree phase plate makes the DC value cos(asin(w)) ... sin(asin w + pi/2)
    dc = c.ctf_1d(t(0.0), 30000.0, 300.0, 2.7, 0.1, phase_shift_deg=90.0)
    assert float(dc) == pytest.approx(math.sqrt(1 - 0.01), abs=1e-12)


# ----------------------------------------------------------------------------- zeros
@pytest.mark.parametrize("defocus_A, cs_mm, kv", [(10000.0, 2.7, 300.0), (35000.0, 2.7, 300.0), (20000.0, 0.0, 200.0),
                                                  (5000.0, 0.01, 300.0)])
def test_analytic_zeros_match_sign_changes_of_the_ctf(defocus_A, cs_mm, kv):
    zeros = c.ctf_zero_frequencies_per_A(t(defocus_A), kv, cs_mm, 0.07, 8)
    k = torch.linspace(0, float(zeros[-1]) * 1.0001, 400001, dtype=F64)
    ctf = c.ctf_1d(k, t(defocus_A), kv, cs_mm, 0.07)
    flips = torch.nonzero(torch.sign(ctf[1:]) != torch.sign(ctf[:-1]))[:, 0]
    brute = 0.5 * (k[flips] + k[flips + 1])
    assert len(brute) == 8
    torch.testing.assert_close(brute, zeros, atol=float(k[1] - k[0]), rtol=0)
    torch.testing.assert_close(c.ctf_1d(zeros, t(defocus_A), kv, cs_mm, 0.07), torch.zeros(8, dtype=F64),
                               atol=1e-9, rtol=0)


def test_zeros_cs0_closed_form_and_turnover():
    lam = float(c.electron_wavelength_A(t(300.0)))
    phi0 = math.asin(0.1)
    expected = [math.sqrt((n - phi0 / math.pi) / (lam * 20000.0)) for n in (1, 2, 3)]
    np.testing.assert_allclose(c.ctf_zero_frequencies_per_A(t(20000.0), 300.0, 0.0, 0.1, 3).numpy(), expected,
                               rtol=1e-12)
    # 500 A underfocus with Cs 2.7 mm never reaches chi = pi (chi_max = pi·df²/(2·Cs·lambda) + phi0 < pi)
    assert torch.isnan(c.ctf_zero_frequencies_per_A(t(500.0), 300.0, 2.7, 0.07, 2)).all()
    with pytest.raises(ValueError, match="underfocus"):
        c.ctf_zero_frequencies_per_A(t(-1000.0), 300.0, 2.7, 0.07, 2)
    batch = c.ctf_zero_frequencies_per_A(t([10000.0, 20000.0]), 300.0, 2.7, 0.07, 4)
    assert batch.shape == (2, 4) and torch.all(batch[0] > batch[1])


# ----------------------------------------------------------------------------- T9 astigmatism
def test_T9_enforce_convention_sheet_example_and_invariance():
    u, v, a = c.enforce_ctffind_convention(24000.0, 25000.0, 30.0)
    assert (float(u), float(v), float(a)) == pytest.approx((25000.0, 24000.0, -60.0))
    u, v, a = c.enforce_ctffind_convention(t([25000.0, 25000.0, 25000.0]), t([24000.0] * 3), t([90.0, -90.0, 271.0]))
    torch.testing.assert_close(a, t([90.0, 90.0, -89.0]))
    gen = torch.Generator().manual_seed(0)
    du = 15000 + 20000 * torch.rand(50, generator=gen, dtype=F64)
    dv = 15000 + 20000 * torch.rand(50, generator=gen, dtype=F64)
    ang = 720 * torch.rand(50, generator=gen, dtype=F64) - 360
    u, v, a = c.enforce_ctffind_convention(du, dv, ang)
    assert torch.all(u >= v) and torch.all((a > -90) & (a <= 90))
    azimuth = torch.linspace(-180, 180, 37, dtype=F64)[:, None]
    torch.testing.assert_close(c.defocus_at_azimuth_A(u, v, a, azimuth), c.defocus_at_azimuth_A(du, dv, ang, azimuth))
    torch.testing.assert_close(
        c.ctf_2d((48, 40), 2.0, u, v, a, 300.0, 2.7, 0.07), c.ctf_2d((48, 40), 2.0, du, dv, ang, 300.0, 2.7, 0.07),
        atol=1e-5, rtol=0
    )


def test_T9_defocus_u_lies_along_the_angle():
    assert float(c.defocus_at_azimuth_A(25000.0, 24000.0, 30.0, 30.0)) == pytest.approx(25000.0)
    assert float(c.defocus_at_azimuth_A(25000.0, 24000.0, 30.0, 120.0)) == pytest.approx(24000.0)
    assert float(c.defocus_at_azimuth_A(25000.0, 24000.0, 30.0, 75.0)) == pytest.approx(24500.0)


def _ctf_at(kx, ky, defocus_A):
    return float(c.ctf_1d(t(math.hypot(kx, ky)), t(defocus_A), 300.0, 2.7, 0.07))


def test_T9_ctf_2d_axes_angle_from_plus_x_toward_plus_row():
    n, pix = 64, 2.0
    u_A, v_A = 30000.0, 20000.0
    full = lambda ang: c.ctf_2d((n, n), pix, t(u_A), t(v_A), t(ang), 300.0, 2.7, 0.07, rfft=False)  # noqa: E731
    k = 5 / (n * pix)
    # angle 0: U along x (columns), V along y (rows)
    assert float(full(0.0)[0, 5]) == pytest.approx(_ctf_at(k, 0, u_A), abs=1e-6)
    assert float(full(0.0)[5, 0]) == pytest.approx(_ctf_at(0, k, v_A), abs=1e-6)
    # angle +45: U along (+x, +row); -45: U along (+x, -row) -> +y is increasing row index
    assert float(full(45.0)[5, 5]) == pytest.approx(_ctf_at(k, k, u_A), abs=1e-6)
    assert float(full(45.0)[n - 5, 5]) == pytest.approx(_ctf_at(k, k, v_A), abs=1e-6)
    assert float(full(-45.0)[n - 5, 5]) == pytest.approx(_ctf_at(k, k, u_A), abs=1e-6)
    # rfft layout is the left half of the full layout (the Nyquist column is +0.5 in rfft, -0.5 in fft)
    half = c.ctf_2d((n, n), pix, u_A, v_A, 30.0, 300.0, 2.7, 0.07)
    torch.testing.assert_close(half[:, : n // 2], full(30.0)[:, : n // 2].float())
    rows = [r for r in range(n) if r != n // 2]  # (-ky, +0.5) is the centrosymmetric partner of (ky, -0.5)
    torch.testing.assert_close(half[rows, n // 2], full(30.0)[[(-r) % n for r in rows], n // 2].float())


def test_ctf_2d_thon_ring_zeros_along_u_and_v():
    n, pix, u_A, v_A, ang = 512, 1.0, 25000.0, 21000.0, 0.0
    ctf = c.ctf_2d((n, n), pix, t(u_A), t(v_A), t(ang), 300.0, 2.7, 0.1)
    for row, d in ((ctf[0, :], u_A), (ctf[:, 0][: n // 2 + 1], v_A)):
        k = torch.arange(row.numel(), dtype=F64) / (n * pix)
        flips = torch.nonzero(torch.sign(row[1:]) != torch.sign(row[:-1]))[:, 0]
        zeros = c.ctf_zero_frequencies_per_A(t(d), 300.0, 2.7, 0.1, 4)
        assert torch.all((k[flips[:4]] <= zeros) & (zeros <= k[flips[:4] + 1]))


def test_ctf_2d_shapes_batch_fftshift_bfactor():
    du = torch.tensor([20000.0, 25000.0, 30000.0])
    out = c.ctf_2d((30, 31), 1.7, du, du - 500, torch.tensor([0.0, 10.0, 20.0]), 300.0, 2.7, 0.07)
    assert out.shape == (3, 30, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[1], c.ctf_2d((30, 31), 1.7, 25000.0, 24500.0, 10.0, 300.0, 2.7, 0.07))
    broadcast = c.ctf_2d((30, 31), 1.7, torch.full((4, 1), 2e4), 2e4, torch.zeros(5), 300.0, 2.7, 0.07)
    assert broadcast.shape == (4, 5, 30, 16)
    assert c.ctf_2d((30, 31), t(1.7), t(2e4), 2e4, 0.0, 300.0, 2.7, 0.07).dtype == F64
    shifted = c.ctf_2d((30, 31), 1.7, 2e4, 1.8e4, 5.0, 300.0, 2.7, 0.07, rfft=False, fftshift=True)
    plain = c.ctf_2d((30, 31), 1.7, 2e4, 1.8e4, 5.0, 300.0, 2.7, 0.07, rfft=False)
    torch.testing.assert_close(shifted, torch.fft.fftshift(plain))
    assert float(shifted[15, 15]) == pytest.approx(0.07, abs=1e-6)
    rshift = c.ctf_2d((30, 31), 1.7, 2e4, 1.8e4, 5.0, 300.0, 2.7, 0.07, fftshift=True)
    torch.testing.assert_close(rshift,
                               torch.fft.fftshift(c.ctf_2d((30, 31), 1.7, 2e4, 1.8e4, 5.0, 300.0, 2.7, 0.07), dim=-2))
    b = c.ctf_2d((30, 31), 1.7, 2e4, 1.8e4, 5.0, 300.0, 2.7, 0.07, b_factor_A2=100.0, rfft=False)
    k2 = torch.fft.fftfreq(30)[:, None] ** 2 / 1.7**2 + torch.fft.fftfreq(31)[None, :] ** 2 / 1.7**2
    torch.testing.assert_close(b, plain * torch.exp(-25.0 * k2), atol=1e-6, rtol=0)


def test_ctf_agrees_with_torch_ctf_same_angle_convention():
    """torch-ctf 0.6.0 takes mean defocus and (U-V)/2 in um. Its docstring says angle 0 puts U along y,
    but its code builds the astigmatism vector as (y, x) = (sin a, cos a): angle 0 puts U along +x,
    i.e. the same convention as ours (measured here: same angle agrees, angle + 90 does not)."""
    import torch_ctf  # test-time reference only (teamtomo, BSD-3)

    u_A, v_A = 25000.0, 22000.0
    for ang in (0.0, 30.0, -60.0, 75.0):
        ours = c.ctf_2d((64, 64), 2.0, u_A, v_A, ang, 300.0, 2.7, 0.07)
        kw = dict(defocus=(u_A + v_A) / 2e4, astigmatism=(u_A - v_A) / 2e4, voltage=300.0, spherical_aberration=2.7,
                  amplitude_contrast=0.07, phase_shift=0.0, pixel_size=2.0, image_shape=(64, 64), rfft=True,
                  fftshift=False)
        theirs = torch_ctf.calculate_ctf_2d(astigmatism_angle=ang, **kw)
        assert float((ours - theirs).abs().max()) < 1e-3
        rotated = torch_ctf.calculate_ctf_2d(astigmatism_angle=ang + 90.0, **kw)
        assert float((ours - rotated).abs().max()) > 0.5


# ----------------------------------------------------------------------------- T8 handedness
def test_T8_defocus_handedness_sheet_example():
    """alpha 85.3, tilt +30, centre defocus 30000 A, point 1000 A to the right of the axis (tomogram x), z = 0."""
    r = g.projection_rotations(t(85.3), t([30.0]))
    proj = g.project_points(t([[1000.0, 0.0, 0.0]]), r)
    depth = proj[0, 0, 2]
    assert float(depth) == pytest.approx(-500.0)
    assert float(c.defocus_with_handedness(t(30000.0), depth, hand=-1)) == pytest.approx(30500.0)
    assert float(c.defocus_with_handedness(t(30000.0), depth, hand=+1)) == pytest.approx(29500.0)
    # in the raw image "right of the axis" is the direction R2(85.3)·(1, 0) = (0.082, 0.997): +y
    direction = proj[0, 0, :2] / proj[0, 0, :2].norm()
    torch.testing.assert_close(direction, t([0.081939, 0.996637]), atol=1e-6, rtol=0)
    # +z (toward the source) is less underfocused with hand -1
    up = g.project_points(t([[0.0, 0.0, 100.0]]), g.projection_rotations(0.0, t([0.0])))[0, 0, 2]
    assert float(c.defocus_with_handedness(30000.0, up, hand=-1)) == pytest.approx(29900.0)
    # at negative tilt the left side becomes the more underfocused one
    r_neg = g.projection_rotations(t(85.3), t([-30.0]))
    d_left = c.defocus_with_handedness(30000.0, g.project_points(t([[-1000.0, 0.0, 0.0]]), r_neg)[0, 0, 2], hand=-1)
    assert float(d_left) == pytest.approx(30500.0)
    with pytest.raises(ValueError, match="handedness"):
        c.defocus_with_handedness(30000.0, 0.0, hand=0)


# ----------------------------------------------------------------------------- helpers
def test_phase_flip_and_premultiply():
    gen = torch.Generator().manual_seed(5)
    ctf = c.ctf_2d((32, 32), 2.0, 20000.0, 19000.0, 0.0, 300.0, 2.7, 0.07)
    f = torch.fft.rfft2(torch.randn(32, 32, generator=gen))
    flipped = c.phase_flip(f * ctf, ctf)
    torch.testing.assert_close(flipped, f * ctf.abs())
    torch.testing.assert_close(c.phase_flip(c.phase_flip(f, ctf), ctf), f)
    torch.testing.assert_close(c.ctf_premultiply(f, ctf), f * ctf)
