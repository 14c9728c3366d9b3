"""Fourier-space helpers shared by the algorithms: edge taper, sub-pixel shift, spectrum crop,
zero padding.

Conventions: arrays are ``[..., y, x]`` (``[..., z, y, x]`` for volumes); 2-D shifts are (x, y) in
px and move the content by ``+shift``; spectra are ``torch.fft.rfft2`` / ``rfftn`` layouts (DC at
index 0). The n-D helpers (:func:`phase_ramp_rfftn`, :func:`pad_at_end`, :func:`embed_centered`)
take shapes and shifts in array-axis order (``(z, y, x)`` for a volume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["cosine_edge_taper", "crop_centered", "crop_rfft2", "embed_centered", "fourier_shift_2d",
           "frequencies_rfft2_px", "pad_at_end", "phase_ramp_2d", "phase_ramp_rfftn"]


def cosine_edge_taper(shape: Sequence[int], edge_px: float, *, max_edge_fraction: float | None = None,
                      device=None) -> torch.Tensor:
    """Separable raised-cosine window ``shape`` (any number of axes), float32.

    Along an axis of n samples the distance to the border is ``d = min(i + 0.5, n - 0.5 - i)``
    and the window is ``0.5 - 0.5·cos(π·min(d / w, 1))``: about 0 at the border, 1 from ``w``
    px inwards. ``w = edge_px``, capped at ``floor(n · max_edge_fraction)`` when that is given;
    an axis with ``w <= 0`` is not tapered.
    """
    window = torch.ones(tuple(int(n) for n in shape), dtype=torch.float32, device=device)
    for axis, n in enumerate(window.shape):
        width = float(edge_px)
        if max_edge_fraction is not None:
            width = min(width, math.floor(n * max_edge_fraction))
        if width <= 0:
            continue
        i = torch.arange(n, dtype=torch.float32, device=device)
        ramp = torch.clamp(torch.minimum(i + 0.5, n - 0.5 - i) / width, max=1.0)
        view = [1] * window.ndim
        view[axis] = n
        window = window * (0.5 - 0.5 * torch.cos(math.pi * ramp)).reshape(view)
    return window


def frequencies_rfft2_px(shape: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky ``[h, 1]``, kx ``[1, w//2+1]``) in cycles/px (float64) of an rfft2 of a real ``shape`` (h, w)."""
    h, w = shape
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)[None, :]
    return ky, kx


def phase_ramp_2d(shifts_px: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``exp(-2πi (kx·sx + ky·sy))`` ``[..., h, w//2+1]`` (complex64) for shifts ``[..., 2]`` (x, y) px:
    multiplying an rfft2 spectrum of ``shape`` (h, w) by it moves the content by ``+shift``."""
    ky, kx = frequencies_rfft2_px(shape, shifts_px.device)
    s = shifts_px.to(torch.float64)
    # separable: the phases are computed in float64 (large shifts), the outer product in complex64
    angle_y = -2.0 * math.pi * ky * s[..., 1, None, None]
    angle_x = -2.0 * math.pi * kx * s[..., 0, None, None]
    phase_y = torch.polar(torch.ones_like(angle_y), angle_y).to(torch.complex64)
    phase_x = torch.polar(torch.ones_like(angle_x), angle_x).to(torch.complex64)
    return phase_y * phase_x


def fourier_shift_2d(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Move the content of ``images`` ``[..., y, x]`` by ``shifts_px`` ``[..., 2]`` (x, y) pixels,
    sub-pixel, periodic (Fourier phase ramp). Returns float32."""
    shape = tuple(images.shape[-2:])
    spectrum = torch.fft.rfft2(images.to(torch.float32))
    return torch.fft.irfft2(spectrum * phase_ramp_2d(shifts_px.to(images.device), shape), s=shape)


def crop_rfft2(spectrum: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Keep the frequencies of an rfft2 ``[..., H, W//2+1]`` that an rfft2 of ``shape`` (h, w) holds
    (plain truncation: a Fourier crop to h × w px; the values are not rescaled)."""
    h, w = shape
    rows = torch.cat([spectrum[..., : (h + 1) // 2, :], spectrum[..., spectrum.shape[-2] - h // 2:, :]], dim=-2)
    return rows[..., : w // 2 + 1]


def phase_ramp_rfftn(shape: Sequence[int], shifts_px: Sequence[float], device=None) -> torch.Tensor:
    """``exp(-2πi Σ_d k_d·s_d)`` on the ``torch.fft.rfftn`` grid of a real array of ``shape``
    (last axis halved: ``[..., n_last//2+1]``), complex64; ``shifts_px`` per axis in array order
    (``(z, y, x)`` for a volume). Multiplying an rfftn spectrum by it moves the content by
    ``+shift`` px (periodic). The phases are summed in float64."""
    if len(shape) != len(shifts_px):
        raise ValueError(f"phase_ramp_rfftn: {len(shape)} axes but {len(shifts_px)} shifts")
    phase = torch.zeros((), dtype=torch.float64, device=device)
    last = len(shape) - 1
    for axis, (n, shift) in enumerate(zip(shape, shifts_px)):
        frequencies = (torch.fft.rfftfreq if axis == last else torch.fft.fftfreq)(int(n), dtype=torch.float64,
                                                                                   device=device)
        view = [1] * len(shape)
        view[axis] = frequencies.numel()
        phase = phase + (-2.0 * math.pi * float(shift)) * frequencies.reshape(view)
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def pad_at_end(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``array`` to ``shape`` (same number of axes, each at least as large) by appending
    zeros at the end of every axis: index 0 stays index 0, as a periodic correlation needs.
    Same dtype and device as ``array``."""
    if len(shape) != array.ndim or any(int(n) < s for n, s in zip(shape, array.shape)):
        raise ValueError(f"pad_at_end: cannot pad {tuple(array.shape)} to {tuple(shape)}")
    out = torch.zeros(tuple(int(n) for n in shape), dtype=array.dtype, device=array.device)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out


def embed_centered(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``array`` to ``shape`` keeping its centre sample ``N//2`` on ``n//2`` along every
    axis (the centre convention of volumes and Fourier centring). Same dtype and device."""
    if len(shape) != array.ndim or any(int(n) < s for n, s in zip(shape, array.shape)):
        raise ValueError(f"embed_centered: cannot embed {tuple(array.shape)} in {tuple(shape)}")
    out = torch.zeros(tuple(int(n) for n in shape), dtype=array.dtype, device=array.device)
    starts = [int(n) // 2 - s // 2 for n, s in zip(shape, array.shape)]
    out[tuple(slice(start, start + s) for start, s in zip(starts, array.shape))] = array
    return out


def crop_centered(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Cut the ``shape`` window out of ``array`` keeping its centre sample ``N//2`` on ``n//2`` along
    every axis (the inverse of :func:`embed_centered`). A view of ``array``."""
    if len(shape) != array.ndim or any(int(n) > s or int(n) < 1 for n, s in zip(shape, array.shape)):
        raise ValueError(f"crop_centered: cannot crop {tuple(array.shape)} to {tuple(shape)}")
    starts = [s // 2 - int(n) // 2 for n, s in zip(shape, array.shape)]
    return array[tuple(slice(start, start + int(n)) for start, n in zip(starts, shape))]
