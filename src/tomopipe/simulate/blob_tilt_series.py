"""Synthetic tilt series with a known alignment, for testing and benchmarking the alignment.

A specimen of Gaussian blobs in a slab is projected with the RELION 5 model
(``x = m·[Rz(axis)·Ry(tilt)·p]_xy + s``, px from the image centre ``N//2``, :mod:`geometry`). The
projection of a 3-D Gaussian blob is a 2-D Gaussian of the same width, so each image is the blob
centres splatted bilinearly (the splat keeps the centroid exactly) and blurred by that Gaussian in
Fourier space, plus white Gaussian noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms.geometry import fft_centre, project_points, projection_rotations

__all__ = ["SyntheticTiltSeries", "blob_tilt_series"]


@dataclass
class SyntheticTiltSeries:
    images: torch.Tensor  #: [n, N, N] float32
    nominal_tilt_deg: torch.Tensor  #: [n] the tilt angles a user would import
    true_tilt_deg: torch.Tensor  #: [n] nominal + offset
    tilt_axis_deg: float
    shifts_px: torch.Tensor  #: [n, 2] true specimen shifts (x, y)
    magnification: torch.Tensor  #: [n]
    points_px: torch.Tensor  #: [k, 3] blob centres (x, y, z) from the tomogram origin


def blob_tilt_series(size_px: int = 160, tilt_angles_deg=None, tilt_axis_deg: float = -85.6,
                     tilt_offset_deg: float = 0.0, shift_sd_px: float = 6.0, magnification_sd: float = 0.0,
                     blobs: int = 1500, slab_thickness_px: float = 40.0, blob_sigma_px: float = 1.5,
                     noise_sd: float = 0.5, seed: int = 0) -> SyntheticTiltSeries:
    """Project random blobs (in ``x, y`` over 1.6 times the field, ``z`` over the slab) at
    ``tilt_angles_deg`` (default −60..60 by 3) + ``tilt_offset_deg``, with random per-view shifts
    (SD ``shift_sd_px``, the zero tilt included) and magnifications (1 ± ``magnification_sd``, the
    zero tilt 1). ``noise_sd`` is relative to the SD of the noise-free images."""
    g = torch.Generator().manual_seed(seed)
    nominal = (torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64) if tilt_angles_deg is None
               else torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1))
    n = nominal.numel()
    true_tilt = nominal + tilt_offset_deg
    half = 0.8 * size_px
    points = torch.stack([(torch.rand(blobs, generator=g, dtype=torch.float64) * 2 - 1) * half,
                          (torch.rand(blobs, generator=g, dtype=torch.float64) * 2 - 1) * half,
                          (torch.rand(blobs, generator=g, dtype=torch.float64) - 0.5) * slab_thickness_px], -1)
    amplitude = 0.5 + torch.rand(blobs, generator=g, dtype=torch.float64)
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64) * shift_sd_px
    mag = 1.0 + torch.randn(n, generator=g, dtype=torch.float64) * magnification_sd
    mag[int(torch.argmin(nominal.abs()))] = 1.0
    rot = projection_rotations(tilt_axis_deg, true_tilt).to(torch.float64)
    xy = mag[:, None, None] * project_points(points, rot)[..., :2] + shifts[:, None, :]
    c = fft_centre(size_px)
    images = torch.zeros(n, size_px, size_px, dtype=torch.float64)
    fx, fy = xy[..., 0] + c, xy[..., 1] + c
    x0, y0 = torch.floor(fx), torch.floor(fy)
    wx, wy = fx - x0, fy - y0
    for dx, dy, w in ((0, 0, (1 - wx) * (1 - wy)), (1, 0, wx * (1 - wy)), (0, 1, (1 - wx) * wy), (1, 1, wx * wy)):
        ix, iy = (x0 + dx).long(), (y0 + dy).long()
        ok = (ix >= 0) & (ix < size_px) & (iy >= 0) & (iy < size_px)
        view = torch.arange(n)[:, None].expand_as(ix)
        flat = images.view(-1)
        flat.index_add_(0, (view * size_px * size_px + iy * size_px + ix)[ok], (w * amplitude[None, :])[ok])
    ky = torch.fft.fftfreq(size_px, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(size_px, dtype=torch.float64)[None, :]
    blur = torch.exp(-2 * math.pi**2 * blob_sigma_px**2 * (kx * kx + ky * ky))
    images = torch.fft.irfft2(torch.fft.rfft2(images) * blur, s=(size_px, size_px))
    images = images - images.mean(dim=(-2, -1), keepdim=True)
    images = images + noise_sd * images.std() * torch.randn(images.shape, generator=g, dtype=torch.float64)
    return SyntheticTiltSeries(images.to(torch.float32), nominal, true_tilt, float(tilt_axis_deg), shifts, mag, points)
