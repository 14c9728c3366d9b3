"""Tests of the Fourier shell correlation and the resolution estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tomopipe.algorithms import fsc as m
from tomopipe.algorithms.filters import radial_frequency_grid

F64 = torch.float64


def _numpy_fsc_full_spectrum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent reference: full complex FFT, shells round(|k|·n) up to n//2."""
    n = a.shape[-1]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    freqs = np.meshgrid(*([np.fft.fftfreq(n) * n] * a.ndim), indexing="ij")
    r = np.rint(np.sqrt(sum(q**2 for q in freqs))).astype(int).ravel()
    keep = r <= n // 2
    num = np.bincount(r[keep], (fa * fb.conj()).real.ravel()[keep], minlength=n // 2 + 1)
    pa = np.bincount(r[keep], (np.abs(fa) ** 2).ravel()[keep], minlength=n // 2 + 1)
    pb = np.bincount(r[keep], (np.abs(fb) ** 2).ravel()[keep], minlength=n // 2 + 1)
    return num / np.sqrt(pa * pb)


@pytest.mark.parametrize("n", [32, 33])
def test_fsc_matches_full_spectrum_reference(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, n, generator=gen, dtype=F64)
    b = a + 2 * torch.randn(n, n, n, generator=gen, dtype=F64)
    curve = m.fsc(a, b)
    assert curve.shape == (n // 2 + 1,) and curve.dtype == F64
    np.testing.assert_allclose(curve.numpy(), _numpy_fsc_full_spectrum(a.numpy(), b.numpy()), atol=1e-12)
    img_a, img_b = a[0], b[0]  # FRC of square images uses the same code path
    np.testing.assert_allclose(m.fsc(img_a, img_b).numpy(), _numpy_fsc_full_spectrum(img_a.numpy(), img_b.numpy()),
                               atol=1e-12)


def test_identical_volumes_give_one_and_independent_noise_gives_zero():
    gen = torch.Generator().manual_seed(0)
    n = 64
    a = torch.randn(n, n, n, generator=gen)
    torch.testing.assert_close(m.fsc(a, a.clone()), torch.ones(n // 2 + 1, dtype=F64))
    torch.testing.assert_close(m.fsc(a, -a), -torch.ones(n // 2 + 1, dtype=F64))
    torch.testing.assert_close(m.fsc(a, 3.0 * a), torch.ones(n // 2 + 1, dtype=F64))  # scale-invariant
    b = torch.randn(n, n, n, generator=gen)
    curve = m.fsc(a, b)
    # expected spread of a correlation over N independent coefficients: ~1/sqrt(N)
    counts = torch.bincount(m.shell_indices(n, 3).reshape(-1), minlength=n // 2 + 2)[: n // 2 + 1].double()
    assert torch.all(curve[2:].abs() < 5 / counts[2:].sqrt())
    assert abs(float(curve[4:].mean())) < 0.01


def test_lowpassed_copy_crosses_where_it_should():
    """A = S, B = H·S + N (white S and N of equal power, Gaussian H): FSC(k) = H / sqrt(H² + 1),
    which falls to 0.143 at k = s·sqrt(ln(1/0.143² - 1))."""
    gen = torch.Generator().manual_seed(3)
    n, pix, s = 96, 2.0, 0.06  # s: Gaussian width in cycles/Å
    signal = torch.randn(n, n, n, generator=gen, dtype=F64)
    noise = torch.randn(n, n, n, generator=gen, dtype=F64)
    k = radial_frequency_grid((n, n, n), torch.tensor(pix, dtype=F64))
    h = torch.exp(-(k**2) / (2 * s**2))
    b = torch.fft.irfftn(torch.fft.rfftn(signal) * h, s=(n, n, n)) + noise
    curve = m.fsc(signal, b)
    freqs = m.shell_frequencies_per_A(n, pix)
    hk = torch.exp(-(freqs**2) / (2 * s**2))
    expected = hk / torch.sqrt(hk**2 + 1)
    # sampling spread of a correlation over N independent coefficients: (1 - rho²)/sqrt(N), N = count/2
    counts = torch.bincount(m.shell_indices(n, 3).reshape(-1), minlength=n // 2 + 2)[: n // 2 + 1].double()
    tol = 4 * (1 - expected**2) / torch.sqrt(counts / 2) + 1e-3
    assert torch.all((curve[1:] - expected[1:]).abs() < tol[1:])
    k143 = s * math.sqrt(math.log(1 / 0.143**2 - 1))
    res = m.fsc_resolution_A(curve, pix)
    assert res == pytest.approx(1 / k143, rel=0.03)
    # 0.5 threshold: H = 1/sqrt(3)
    k05 = s * math.sqrt(math.log(3.0))
    assert m.fsc_resolution_A(curve, pix, threshold=0.5) == pytest.approx(1 / k05, rel=0.03)


def test_fsc_resolution_interpolation_and_edges():
    curve = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.05], dtype=F64)  # box 8, shells at i / (8·pix)
    # 0.143 is crossed between shells 2 (0.5) and 3 (0.1): shell 2 + 0.357/0.4 = 2.8925
    assert m.fsc_resolution_A(curve, 1.5) == pytest.approx(8 * 1.5 / 2.8925)
    assert m.fsc_resolution_A(torch.ones(5), 1.5) == pytest.approx(3.0)  # never crosses: Nyquist
    assert m.fsc_resolution_A(torch.tensor([1.0, 1.0, 0.9]), 2.0, box_size_px=5) == pytest.approx(5.0)  # odd box
    # a dip below threshold counts at its first crossing
    assert m.fsc_resolution_A(torch.tensor([1.0, 0.143, 0.1, 0.9, 0.9]), 1.0) == pytest.approx(8 / 1.0)
    with pytest.raises(ValueError, match="shells"):
        m.fsc_resolution_A(torch.ones(5), 1.0, box_size_px=11)
    torch.testing.assert_close(m.shell_frequencies_per_A(8, 2.0), torch.tensor([0, 1, 2, 3, 4], dtype=F64) / 16)


def test_fsc_mask_batch_and_errors():
    gen = torch.Generator().manual_seed(5)
    n = 32
    a = torch.randn(2, n, n, n, generator=gen)
    b = torch.randn(2, n, n, n, generator=gen)
    batch = m.fsc(a, b)
    assert batch.shape == (2, n // 2 + 1)
    torch.testing.assert_close(batch[1], m.fsc(a[1], b[1]))
    # a mask that zeroes where the maps differ makes them identical
    mask = torch.zeros(n, n, n)
    mask[8:24, 8:24, 8:24] = 1.0
    b2 = a[0].clone()
    b2[mask == 0] = torch.randn(int((mask == 0).sum()), generator=gen)
    assert float(m.fsc(a[0], b2)[5]) < 0.9
    torch.testing.assert_close(m.fsc(a[0], b2, mask=mask), torch.ones(n // 2 + 1, dtype=F64))
    # shells with no power give 0, not NaN
    assert torch.all(m.fsc(torch.zeros(n, n, n), a[0]) == 0)
    with pytest.raises(ValueError, match="differ in shape"):
        m.fsc(a[0], b[0, :-1])
    with pytest.raises(ValueError, match="cubic"):
        m.fsc(torch.zeros(4, 6), torch.zeros(4, 6))
