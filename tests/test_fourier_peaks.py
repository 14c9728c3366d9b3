"""Shared primitives: the cosine edge taper, Fourier shift and crop (algorithms.fourier), the
parabolic sub-pixel peak and non-maximum suppression (algorithms.peaks)."""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.fourier import cosine_edge_taper, crop_rfft2, fourier_shift_2d
from tomopipe.algorithms.peaks import non_maximum_suppression, parabolic_offset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_taper_profile_known_values():
    window = cosine_edge_taper((20,), 4.0)
    d = torch.tensor([0.5, 1.5, 2.5, 3.5])
    edge = 0.5 - 0.5 * torch.cos(math.pi * d / 4.0)  # distance d from the border, width 4
    assert torch.allclose(window[:4], edge) and torch.allclose(window[-4:], edge.flip(0))
    assert torch.all(window[4:16] == 1.0)
    assert float(window[0]) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 8))


def test_taper_is_separable_in_3d_and_capped():
    window = cosine_edge_taper((8, 12, 16), 9, max_edge_fraction=0.25)
    for axis, n in enumerate(window.shape):  # the cap is floor(n / 4) per axis
        profile = cosine_edge_taper((n,), n // 4)
        line = window.movedim(axis, 0)[:, 6 // 2 if axis else 6, 8 if axis != 2 else 6]
        assert torch.allclose(line / line.max(), profile)
    assert torch.all(cosine_edge_taper((5, 7), 0.0) == 1.0)
    assert window.dtype == torch.float32 and tuple(window.shape) == (8, 12, 16)


def test_fourier_shift_integer_is_a_roll_and_round_trips():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 30, 34, generator=g)
    rolled = fourier_shift_2d(image, torch.tensor([3.0, -5.0]))  # (x, y)
    assert torch.allclose(rolled, torch.roll(image, (-5, 3), (-2, -1)), atol=1e-5)
    shifts = torch.tensor([[0.3, -1.7], [2.25, 0.5]])
    back = fourier_shift_2d(fourier_shift_2d(image, shifts), -shifts)
    # a sub-pixel shift loses the unpaired Nyquist components of even axes; the rest comes back
    def no_nyquist(x):
        s = torch.fft.rfft2(x)
        s[..., 15, :] = 0
        s[..., :, 17] = 0
        return s
    assert torch.allclose(no_nyquist(back), no_nyquist(image), atol=1e-3)


def test_crop_rfft2_is_a_fourier_downsampling():
    ny, nx, h, w = 48, 40, 24, 20
    y = torch.arange(ny, dtype=torch.float64)[:, None]
    x = torch.arange(nx, dtype=torch.float64)[None, :]
    band_limited = torch.cos(2 * math.pi * (3 * y / ny + 5 * x / nx)) + 0.5 * torch.sin(2 * math.pi * 7 * x / nx)
    small = torch.fft.irfft2(crop_rfft2(torch.fft.rfft2(band_limited), (h, w)), s=(h, w)) * (h * w / (ny * nx))
    assert torch.allclose(small, band_limited[::2, ::2], atol=1e-10)
    assert torch.equal(crop_rfft2(torch.fft.rfft2(band_limited), (ny, nx)), torch.fft.rfft2(band_limited))


def test_parabolic_offset_finds_the_vertex():
    vertex = torch.tensor([0.3, -0.45, 0.0])
    samples = [1.0 - 2.0 * (k - vertex) ** 2 for k in (-1.0, 0.0, 1.0)]
    assert torch.allclose(parabolic_offset(*samples), vertex)
    assert float(parabolic_offset(-(1.0 + 0.2), -1.0, -(1.0 + 0.6))) == pytest.approx(0.5 * (-1.2 + 1.6) / -0.8)
    assert float(parabolic_offset(1.0, 0.0, 1.0)) == 0.0  # a minimum: no maximum to refine
    assert float(parabolic_offset(0.0, 1.0, 1.5)) == 0.5  # the vertex lies beyond the samples: clamped


def _gaussians(shape, centres, heights, sigma=1.5):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    out = torch.zeros(shape)
    for c, a in zip(centres, heights):
        out += a * torch.exp(-sum((g - float(ci)) ** 2 for g, ci in zip(grids, c)) / (2 * sigma**2))
    return out


@pytest.mark.parametrize("shape", [(64, 60), (24, 40, 36)])
def test_non_maximum_suppression_highest_first_and_apart(shape):
    g = torch.Generator().manual_seed(3)
    # 12 blobs on a grid 9 px apart with distinct heights, on weak noise
    axes = [torch.arange(6, n - 5, 9) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
    centres = grid[torch.randperm(len(grid), generator=g)[:12]]
    heights = torch.linspace(3.0, 1.0, 12)
    scores = _gaussians(shape, centres.tolist(), heights) + 0.01 * torch.rand(shape, generator=g)
    peaks = non_maximum_suppression(scores, 6.0, threshold=0.5)
    assert peaks.tolist() == centres.tolist()  # each blob once, at its centre, highest first
    values = scores[tuple(peaks.T)]
    assert torch.all(values[:-1] > values[1:])
    assert torch.equal(non_maximum_suppression(scores, 6.0, threshold=0.5, max_peaks=3), peaks[:3])
    # with a distance larger than the grid spacing no two kept peaks are closer than it
    sparse = non_maximum_suppression(scores, 12.0, threshold=0.5)
    distance = torch.cdist(sparse.double(), sparse.double())
    assert len(sparse) < 12 and torch.all(distance[~torch.eye(len(sparse), dtype=torch.bool)] >= 12.0)
    assert sparse[0].tolist() == centres[0].tolist()


def test_non_maximum_suppression_drops_a_weaker_close_peak():
    scores = _gaussians((40, 40), [(10, 10), (10, 14), (30, 30)], [2.0, 1.5, 1.0], sigma=1.0)
    peaks = non_maximum_suppression(scores, 5.0, threshold=0.2)
    assert peaks.tolist() == [[10, 10], [30, 30]]
    assert non_maximum_suppression(scores, 3.0, threshold=0.2).tolist() == [[10, 10], [10, 14], [30, 30]]
    with pytest.raises(ValueError, match="2-D or 3-D"):
        non_maximum_suppression(torch.zeros(5), 2.0)
