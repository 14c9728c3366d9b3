"""Shared primitives: the cosine edge taper, Fourier shift and crop, n-D phase ramp and zero
padding (algorithms.fourier), the
parabolic sub-pixel peak and non-maximum suppression (algorithms.peaks)."""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.fourier import (
    cosine_edge_taper,
    crop_rfft2,
    embed_centered,
    fourier_shift_2d,
    pad_at_end,
    phase_ramp_2d,
    phase_ramp_rfftn,
)
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


def test_phase_ramp_rfftn_moves_a_volume_and_matches_the_2d_ramp():
    generator = torch.Generator().manual_seed(5)
    volume = torch.randn((6, 8, 10), generator=generator)
    shape = tuple(volume.shape)
    # an integer shift (z, y, x) is a periodic roll
    moved = torch.fft.irfftn(torch.fft.rfftn(volume) * phase_ramp_rfftn(shape, (2, -3, 4)), s=shape)
    torch.testing.assert_close(moved, torch.roll(volume, shifts=(2, -3, 4), dims=(0, 1, 2)), atol=1e-5, rtol=0)
    # a sub-voxel shift and its opposite round-trip; the last axis is the halved rfftn axis
    ramp = phase_ramp_rfftn(shape, (0.3, -1.7, 2.25))
    assert ramp.shape == (6, 8, 6) and ramp.dtype == torch.complex64
    back = phase_ramp_rfftn(shape, (-0.3, 1.7, -2.25))
    torch.testing.assert_close(ramp * back, torch.ones_like(ramp), atol=1e-6, rtol=0)
    # in 2-D it is the (x, y) ramp of phase_ramp_2d with the shift given as (y, x)
    torch.testing.assert_close(phase_ramp_rfftn((8, 10), (1.5, -0.25)),
                               phase_ramp_2d(torch.tensor([-0.25, 1.5]), (8, 10)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 axes but 2 shifts"):
        phase_ramp_rfftn(shape, (1.0, 2.0))


def test_pad_at_end_keeps_the_origin_and_embed_centered_keeps_the_centre():
    volume = torch.arange(1.0, 2.0 * 3 * 5 + 1).reshape(2, 3, 5).double()
    padded = pad_at_end(volume, (4, 6, 8))
    assert padded.dtype == torch.float64 and padded.shape == (4, 6, 8)
    assert torch.equal(padded[:2, :3, :5], volume) and float(padded.sum()) == float(volume.sum())
    cube = embed_centered(volume, (8, 8, 8))
    assert cube.shape == (8, 8, 8) and float(cube.sum()) == float(volume.sum())
    # the centre sample N//2 of every axis lands on n//2
    assert float(cube[4, 4, 4]) == float(volume[1, 1, 2])
    assert torch.equal(cube[3:5, 3:6, 2:7], volume)
    # odd into odd and even into odd sizes keep the centre too
    assert float(embed_centered(volume, (3, 5, 7))[1, 2, 3]) == float(volume[1, 1, 2])
    with pytest.raises(ValueError, match="cannot pad"):
        pad_at_end(volume, (1, 6, 8))
    with pytest.raises(ValueError, match="cannot embed"):
        embed_centered(volume, (4, 4))


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
