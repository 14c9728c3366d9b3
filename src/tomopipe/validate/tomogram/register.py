"""Translation search of the true specimen onto a tomogram: the maximum of their low-passed
cross-correlation within a shift limit, sub-voxel by a parabola through the peak along each axis.

Frames: volumes ``[z, y, x]``; shifts in voxels in array order (z, y, x), signed, and move the
truth onto the tomogram (the truth moved by the shift matches the tomogram). The volumes are
zero-padded (at the end of every axis) so that shifts up to the limit do not wrap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tomopipe.algorithms.filters import bandpass, fast_fft_size
from tomopipe.algorithms.fourier import pad_at_end, phase_ramp_rfftn
from tomopipe.algorithms.peaks import parabolic_offset

__all__ = ["Registration", "cross_correlation_peak", "register_translation"]


@dataclass(frozen=True)
class Registration:
    """The truth moved onto a tomogram, as padded spectra (``torch.fft.rfftn`` of
    ``padded_shape``) ready for the scores."""

    shift_zyx_vox: tuple[float, float, float]  #: the truth moved by this matches the tomogram
    padded_shape: tuple[int, int, int]
    lowpass: torch.Tensor  #: the search's low-pass on the rfftn grid of ``padded_shape`` (float32)
    tomogram_spectrum: torch.Tensor  #: of the (masked) tomogram
    moved_truth_spectrum: torch.Tensor  #: of the (masked) truth, moved by ``shift_zyx_vox``


def cross_correlation_peak(cross_correlation: torch.Tensor,
                           max_shift_vox: Sequence[float]) -> tuple[float, float, float]:
    """Signed (z, y, x) shift of the maximum of a periodic ``cross_correlation`` ``[z, y, x]``
    (zero shift at index 0) within ``|shift| <= max_shift_vox`` per axis, refined by a parabola
    through the peak along each axis."""
    shape = cross_correlation.shape
    candidates = []
    for n, limit in zip(shape, max_shift_vox):
        limit = min(int(limit), (n - 1) // 2)
        candidates.append(torch.cat([torch.arange(0, limit + 1), torch.arange(n - limit, n)]) if limit > 0
                          else torch.tensor([0]))
    window = cross_correlation[candidates[0][:, None, None], candidates[1][None, :, None],
                               candidates[2][None, None, :]]
    flat = int(torch.argmax(window))
    iz, rest = divmod(flat, window.shape[1] * window.shape[2])
    iy, ix = divmod(rest, window.shape[2])
    peak = [int(candidates[0][iz]), int(candidates[1][iy]), int(candidates[2][ix])]
    shift = []
    for axis, n in enumerate(shape):
        at = list(peak)
        values = []
        for step in (-1, 0, 1):
            at[axis] = (peak[axis] + step) % n
            values.append(float(cross_correlation[at[0], at[1], at[2]]))
        signed = peak[axis] if peak[axis] <= n // 2 else peak[axis] - n
        shift.append(signed + float(parabolic_offset(*values)))
    return tuple(shift)


def register_translation(tomogram: torch.Tensor, truth: torch.Tensor, voxel_size_A: float, resolution_A: float,
                         max_shift_vox: Sequence[float]) -> Registration:
    """Move ``truth`` onto ``tomogram`` (both ``[z, y, x]`` float32, already masked) by the
    translation that maximises their cross-correlation low-passed to ``resolution_A`` (the
    squared :func:`tomopipe.algorithms.filters.bandpass` edge), within ``max_shift_vox`` (z, y, x)."""
    shape = tuple(tomogram.shape)
    padded_shape = tuple(fast_fft_size(n + int(math.ceil(limit)) + 1, even=True)
                         for n, limit in zip(shape, max_shift_vox))
    lowpass = bandpass(padded_shape, voxel_size_A, high_A=resolution_A).to(device=tomogram.device,
                                                                          dtype=torch.float32)
    tomogram_spectrum = torch.fft.rfftn(pad_at_end(tomogram, padded_shape))
    truth_spectrum = torch.fft.rfftn(pad_at_end(truth, padded_shape))
    cross_correlation = torch.fft.irfftn(tomogram_spectrum * truth_spectrum.conj() * (lowpass * lowpass),
                                         s=padded_shape)
    shift = cross_correlation_peak(cross_correlation, max_shift_vox)
    del cross_correlation
    moved = truth_spectrum * phase_ramp_rfftn(padded_shape, shift, tomogram.device)
    return Registration(shift, padded_shape, lowpass, tomogram_spectrum, moved)
