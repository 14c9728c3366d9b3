"""Tests of the Fourier filters: frequency grids, exposure filter, band-pass, Fourier-crop binning."""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms import filters as f

F64 = torch.float64


# ----------------------------------------------------------------------------- grids
def test_radial_frequency_grid_values_and_layout():
    k = f.radial_frequency_grid((6, 8), 2.0)
    assert k.shape == (6, 5) and k.dtype == torch.float32
    assert float(k[0, 0]) == 0.0
    assert float(k[0, 4]) == pytest.approx(0.25)  # x Nyquist = 1 / (2 · 2 Å)
    assert float(k[3, 0]) == pytest.approx(0.25)  # y Nyquist (row n//2 is -0.5 cycles/px)
    assert float(k[1, 1]) == pytest.approx(math.hypot(1 / 12, 1 / 16))
    full = f.radial_frequency_grid((6, 8), 2.0, rfft=False)
    assert full.shape == (6, 8)
    torch.testing.assert_close(full[:, :5], k)
    vol = f.radial_frequency_grid((4, 6, 8), torch.tensor([1.0, 2.0], dtype=F64))
    assert vol.shape == (2, 4, 6, 5) and vol.dtype == F64
    torch.testing.assert_close(vol[0], 2 * vol[1])
    assert float(vol[0, 2, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pixel_size_A"):
        f.radial_frequency_grid((4, 4), 0.0)


# ----------------------------------------------------------------------------- exposure
def test_critical_exposure_and_filter_known_values():
    # Grant & Grigorieff 2015: Ne(k) = 0.245 k^-1.665 + 2.81 at 300 kV
    k = torch.tensor([0.1, 0.25, 0.5], dtype=F64)
    expected = 0.245 * k**-1.665 + 2.81
    torch.testing.assert_close(f.critical_exposure_e_per_A2(k), expected)
    # 0.245·10^1.665 + 2.81
    assert float(f.critical_exposure_e_per_A2(torch.tensor(0.1, dtype=F64))) == pytest.approx(14.1383, abs=1e-3)
    # at 200 kV the critical exposure is 0.8x (more damage per e/Å²)
    torch.testing.assert_close(f.critical_exposure_e_per_A2(k, 200.0), 0.8 * expected)
    # the filter at N = Ne is exp(-1/2); DC and zero dose untouched
    assert float(f.exposure_filter(k[0], expected[0])) == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert float(f.exposure_filter(torch.tensor(0.0, dtype=F64), 100.0)) == 1.0
    torch.testing.assert_close(f.exposure_filter(k, 0.0), torch.ones(3, dtype=F64))
    # monotonic: more dose or higher frequency -> more attenuation
    q = f.exposure_filter(torch.linspace(0.01, 0.5, 50, dtype=F64)[None], torch.tensor([[10.0], [40.0]], dtype=F64))
    assert torch.all(q[:, 1:] < q[:, :-1]) and torch.all(q[1] < q[0])
    with pytest.raises(ValueError, match="300, 200 or 100"):
        f.exposure_filter(k, 10.0, voltage_kV=120.0)
    with pytest.raises(ValueError, match=">= 0"):
        f.exposure_filter(k, -1.0)


def test_dose_weights_normalised_over_frames():
    k = f.radial_frequency_grid((32, 32), 1.0).double()
    doses = torch.arange(1, 11, dtype=F64) * 3.0  # 10 frames of 3 e/Å²
    w = f.dose_weights(k, doses)
    assert w.shape == (10, 32, 17)
    torch.testing.assert_close(w.sum(0), torch.ones_like(k))
    torch.testing.assert_close(w[:, 0, 0], torch.full((10,), 0.1, dtype=F64))  # DC: plain average
    assert torch.all(w[0, 10, 10] > w[-1, 10, 10])  # early frames weigh more at high frequency
    p = f.dose_weights(k, doses, normalise="power")
    torch.testing.assert_close((p**2).sum(0), torch.ones_like(k))
    torch.testing.assert_close(p / p.sum(0), w)
    with pytest.raises(ValueError, match="normalise"):
        f.dose_weights(k, doses, normalise="max")


# ----------------------------------------------------------------------------- band-pass
def test_bandpass_edges():
    shape, pix = (128, 128), 2.0
    k = f.radial_frequency_grid(shape, pix)
    bp = f.bandpass(shape, pix, low_A=100.0, high_A=10.0, falloff_per_A=0.01)
    assert bp.shape == k.shape
    assert float(bp[0, 0]) == 0.0  # DC removed by the high-pass
    passband = (k > 1 / 100 + 0.005) & (k < 1 / 10 - 0.005)
    stop = (k < 1 / 100 - 0.005) | (k > 1 / 10 + 0.005)
    assert torch.all(bp[passband] == 1) and torch.all(bp[stop] == 0)
    edge = (k - 0.1).abs() < 1e-3
    assert torch.all((bp[edge] - 0.5).abs() < 0.2)
    assert torch.all((bp >= 0) & (bp <= 1))
    lowpass_only = f.bandpass(shape, pix, high_A=8.0, falloff_per_A=0.0)
    torch.testing.assert_close(lowpass_only, (k < 1 / 8).float())
    assert torch.all(f.bandpass(shape, pix) == 1)
    with pytest.raises(ValueError, match="coarser"):
        f.bandpass(shape, pix, low_A=10.0, high_A=20.0)


def test_bandpass_filters_an_image():
    n, pix = 128, 1.0
    y, x = torch.meshgrid(torch.arange(n, dtype=F64), torch.arange(n, dtype=F64), indexing="ij")
    low = torch.cos(2 * math.pi * 3 * x / n)  # 3 cycles / 128 Å: ~43 Å
    mid = torch.cos(2 * math.pi * 16 * y / n)  # 8 Å
    high = torch.cos(2 * math.pi * 50 * (x + y) / n)  # ~1.8 Å
    img = low + mid + high
    out = torch.fft.irfft2(torch.fft.rfft2(img) * f.bandpass((n, n), pix, low_A=20.0, high_A=4.0).double(), s=(n, n))
    torch.testing.assert_close(out, mid, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- binning
@pytest.mark.parametrize("shape, factor", [((96, 128), 2), ((96, 128), 4), ((100, 90), 3), ((97, 101), 2),
                                           ((128, 128), 1.5), ((200, 150), 2.7)])
def test_fourier_crop_bin_preserves_mean_and_sinusoids(shape, factor):
    gen = torch.Generator().manual_seed(0)
    h, w = shape
    new_h, new_w = f.fourier_crop_shape(shape, factor)
    assert (new_h, new_w) == (int(h / factor), int(w / factor))
    # sinusoid below the new Nyquist (integer cycles per image); the centre n//2 maps to n_new//2:
    # output pixel j samples the input at n//2 + (j - n_new//2)·n/n_new
    ky, kx = max(1, new_h // 2 - 3), max(1, new_w // 2 - 2)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    img = 5.0 + torch.cos(2 * math.pi * (ky * yy / h + kx * xx / w) + 0.3)
    out = f.fourier_crop_bin(img, factor)
    assert out.shape == (new_h, new_w) and out.dtype == F64
    yb, xb = torch.meshgrid(torch.arange(new_h, dtype=F64), torch.arange(new_w, dtype=F64), indexing="ij")
    y_in = h // 2 + (yb - new_h // 2) * h / new_h
    x_in = w // 2 + (xb - new_w // 2) * w / new_w
    expected = 5.0 + torch.cos(2 * math.pi * (ky * y_in / h + kx * x_in / w) + 0.3)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)
    # a delta at the centre stays at the centre
    delta = torch.zeros(h, w, dtype=F64)
    delta[h // 2, w // 2] = 1.0
    peak = f.fourier_crop_bin(delta, factor)
    assert divmod(int(peak.argmax()), new_w) == (new_h // 2, new_w // 2)
    # noise image: the mean is preserved exactly, content above the new Nyquist is removed
    noise = torch.randn(3, h, w, generator=gen, dtype=F64) + 2.0
    binned = f.fourier_crop_bin(noise, factor)
    torch.testing.assert_close(binned.mean((-2, -1)), noise.mean((-2, -1)), atol=1e-12, rtol=0)


def test_fourier_crop_bin_antialiases_and_matches_block_average_at_low_frequency():
    n = 128
    yy, xx = torch.meshgrid(torch.arange(n, dtype=F64), torch.arange(n, dtype=F64), indexing="ij")
    above = torch.cos(2 * math.pi * 40 * xx / n)  # above the Nyquist (32) of the binned image
    assert float(f.fourier_crop_bin(above, 2).abs().max()) < 1e-12  # removed, not aliased to 24 cycles
    # float32 stays float32; batch dims are kept
    assert f.fourier_crop_bin(torch.randn(2, 5, 64, 64), 2).shape == (2, 5, 32, 32)
    assert f.fourier_crop_bin(torch.randn(64, 64), 2).dtype == torch.float32
    with pytest.raises(ValueError, match=">= 1"):
        f.fourier_crop_bin(above, 0.5)


def test_fourier_crop_bin_volume():
    gen = torch.Generator().manual_seed(1)
    n = 48
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=F64),) * 3, indexing="ij")
    vol = 1.0 + torch.sin(2 * math.pi * (3 * zz + 5 * yy + 7 * xx) / n)
    out = f.fourier_crop_bin(vol, 2, ndim=3)
    zb, yb, xb = torch.meshgrid(*(torch.arange(n // 2, dtype=F64),) * 3, indexing="ij")
    torch.testing.assert_close(out, 1.0 + torch.sin(2 * math.pi * (3 * zb + 5 * yb + 7 * xb) / (n // 2)),
                               atol=1e-9, rtol=0)
    noise = torch.randn(n, n, n, generator=gen, dtype=F64)
    assert float(f.fourier_crop_bin(noise, 3, ndim=3).mean()) == pytest.approx(float(noise.mean()), abs=1e-12)
    # binning volumes equals binning every axis: power spectrum below the new Nyquist is unchanged
    b = f.fourier_crop_bin(noise, 2, ndim=3)
    spec_in = torch.fft.rfftn(noise)[:4, :4, :4] / n**3
    spec_out = torch.fft.rfftn(b)[:4, :4, :4] / (n // 2) ** 3
    torch.testing.assert_close(spec_out, spec_in, atol=1e-12, rtol=0)
