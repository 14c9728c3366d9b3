"""Fourier-space filters: frequency grids, exposure (dose) filter, band-pass, Fourier-crop binning.

Conventions: frequencies in cycles/Å laid out as ``torch.fft`` does (``fftfreq`` on every axis,
``rfftfreq`` on the last one when ``rfft``); images ``[..., y, x]``, volumes ``[..., z, y, x]``.
Pure torch, any device; float64 internally, float32 out unless float64 goes in.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from tomopipe.algorithms._tensor import as_f64, out_dtype, tensor_device

__all__ = [
    "fast_fft_size",
    "frequency_grid",
    "radial_frequency_grid",
    "critical_exposure_e_per_A2",
    "exposure_filter",
    "dose_weights",
    "bandpass",
    "fourier_crop_shape",
    "fourier_crop_bin",
]

# Grant & Grigorieff (2015) eLife 4:e06980, critical exposure at 300 kV: Ne(k) = a·k^b + c (e/Å², k in 1/Å)
_NE_A, _NE_B, _NE_C = 0.245, -1.665, 2.81
# critical exposure scale with voltage (Grant & Grigorieff 2015; cisTEM ElectronDose): lower kV, more damage
_NE_VOLTAGE_SCALE = {300.0: 1.0, 200.0: 0.8, 100.0: 0.532}


def fast_fft_size(n: int, even: bool = False) -> int:
    """Smallest m >= n (even when ``even``) whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    step = 2 if even else 1
    m = max(step, int(n) + (int(n) % 2 if even else 0))
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += step


def frequency_grid(shape, pixel_size_A, rfft: bool = True, device=None) -> list[torch.Tensor]:
    """Per-axis frequency components (cycles/Å) for a real-space ``shape``, broadcastable to the grid.

    Returns one tensor per axis, in the order of ``shape`` (e.g. [kz, ky, kx]); each has the
    leading dims of ``pixel_size_A`` followed by the grid dims (size 1 on the other axes).
    """
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"frequency_grid: shape must be positive, got {shape!r}")
    device = device if device is not None else tensor_device(pixel_size_A)
    pix = as_f64(pixel_size_A, device)
    if bool((pix <= 0).any()):
        raise ValueError(f"frequency_grid: pixel_size_A must be > 0, got {pixel_size_A!r}")
    pix = pix.reshape(pix.shape + (1,) * len(shape))
    grids = []
    for i, n in enumerate(shape):
        last = i == len(shape) - 1
        f = (torch.fft.rfftfreq if (rfft and last) else torch.fft.fftfreq)(n, dtype=torch.float64, device=device)
        view = [1] * len(shape)
        view[i] = f.numel()
        grids.append(f.reshape(view) / pix)
    return grids


def radial_frequency_grid(shape, pixel_size_A, rfft: bool = True) -> torch.Tensor:
    """|k| in cycles/Å on the (r)FFT grid of a real-space ``shape`` (2-D or 3-D, any dims).

    Output ``[*pixel_size_A.shape, *grid]`` with grid = ``shape`` (last dim ``n // 2 + 1`` if ``rfft``).
    """
    dtype = out_dtype(pixel_size_A)
    grids = frequency_grid(shape, pixel_size_A, rfft)
    k2 = grids[0] ** 2
    for gk in grids[1:]:
        k2 = k2 + gk**2
    return torch.sqrt(k2).to(dtype)


def _voltage_scale(voltage_kV, device) -> torch.Tensor:
    v = as_f64(voltage_kV, device)
    scale = torch.full_like(v, float("nan"))
    for kv, s in _NE_VOLTAGE_SCALE.items():
        scale = torch.where((v - kv).abs() <= 1.0, torch.full_like(v, s), scale)
    if bool(torch.isnan(scale).any()):
        raise ValueError(
            f"exposure filter: voltage_kV must be 300, 200 or 100 (the voltages the critical-exposure curve "
            f"is calibrated for), got {voltage_kV!r}"
        )
    return scale


def critical_exposure_e_per_A2(frequency_per_A, voltage_kV=300.0) -> torch.Tensor:
    """Critical exposure ``Ne(k) = (0.245·k^-1.665 + 2.81) · s(kV)`` in e/Å² (s = 1, 0.8, 0.532 at 300, 200, 100 kV).

    Infinite at k = 0 (the DC component is not damaged).
    """
    dtype, device = out_dtype(frequency_per_A), tensor_device(frequency_per_A, voltage_kV)
    k = as_f64(frequency_per_A, device).abs()
    ne = (_NE_A * torch.pow(k, _NE_B) + _NE_C) * _voltage_scale(voltage_kV, device)
    return ne.to(dtype)


def exposure_filter(frequency_per_A, accumulated_dose_e_per_A2, voltage_kV=300.0) -> torch.Tensor:
    """Grant & Grigorieff (2015) exposure filter ``exp(-N / (2·Ne(k)))`` (amplitude attenuation).

    ``accumulated_dose_e_per_A2`` (N) and ``frequency_per_A`` broadcast; 1 at k = 0 and N = 0.
    """
    dtype = out_dtype(frequency_per_A, accumulated_dose_e_per_A2)
    device = tensor_device(frequency_per_A, accumulated_dose_e_per_A2, voltage_kV)
    dose = as_f64(accumulated_dose_e_per_A2, device)
    if bool((dose < 0).any()):
        raise ValueError(f"exposure_filter: accumulated dose must be >= 0 e/Å², got {accumulated_dose_e_per_A2!r}")
    ne = critical_exposure_e_per_A2(as_f64(frequency_per_A, device), voltage_kV)
    return torch.exp(-dose / (2.0 * ne)).to(dtype)


def dose_weights(frequency_per_A, accumulated_dose_e_per_A2, voltage_kV=300.0, normalise: str = "sum") -> torch.Tensor:
    """Per-frame dose weights ``[n_frames, *frequency.shape]``, normalised over frames at every frequency.

    ``accumulated_dose_e_per_A2`` ``[n_frames]``: exposure received before the frame is read out
    (the caller chooses start, middle or end of the frame; cisTEM/unblur use the end).
    ``normalise="sum"``: weights sum to 1 (a weighted average; RELION); ``"power"``: the sum of
    squares is 1 (unblur's noise-power restoration).
    """
    dtype = out_dtype(frequency_per_A, accumulated_dose_e_per_A2)
    device = tensor_device(frequency_per_A, accumulated_dose_e_per_A2)
    dose = as_f64(accumulated_dose_e_per_A2, device).reshape(-1)
    k = as_f64(frequency_per_A, device)
    q = exposure_filter(k[None], dose.reshape((-1,) + (1,) * k.ndim), voltage_kV)
    if normalise == "sum":
        q = q / q.sum(0, keepdim=True)
    elif normalise == "power":
        q = q / torch.sqrt((q * q).sum(0, keepdim=True))
    else:
        raise ValueError(f"dose_weights: normalise must be 'sum' or 'power', got {normalise!r}")
    return q.to(dtype)


def _raised_cosine_step(k: torch.Tensor, edge: float, width: float) -> torch.Tensor:
    """0 below ``edge - width/2``, 1 above ``edge + width/2``, half-cosine in between (0.5 at ``edge``)."""
    if width <= 0:
        return (k >= edge).to(k.dtype)
    x = torch.clamp((k - (edge - 0.5 * width)) / width, 0.0, 1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * x)


def bandpass(shape, pixel_size_A, low_A=None, high_A=None, falloff_per_A=None, rfft: bool = True) -> torch.Tensor:
    """Band-pass filter on the (r)FFT grid: passes resolutions between ``low_A`` and ``high_A``.

    ``low_A``: coarsest resolution kept (high-pass edge at 1/low_A; None = keep down to DC).
    ``high_A``: finest resolution kept (low-pass edge at 1/high_A; None = keep up to Nyquist).
    Raised-cosine edges ``falloff_per_A`` wide (cycles/Å, centred on the cut-offs, 0.5 there);
    default two Fourier pixels of the smallest dimension; 0 gives hard edges.
    """
    pix = float(pixel_size_A)
    if pix <= 0:
        raise ValueError(f"bandpass: pixel_size_A must be > 0, got {pixel_size_A!r}")
    if low_A is not None and high_A is not None and low_A <= high_A:
        raise ValueError(f"bandpass: low_A ({low_A}) must be coarser (larger) than high_A ({high_A})")
    for name, val in (("low_A", low_A), ("high_A", high_A)):
        if val is not None and val <= 0:
            raise ValueError(f"bandpass: {name} must be > 0 Å or None, got {val!r}")
    if falloff_per_A is None:
        falloff_per_A = 2.0 / (min(int(s) for s in shape) * pix)
    k = radial_frequency_grid(shape, torch.tensor(pix, dtype=torch.float64), rfft)
    out = torch.ones_like(k)
    if low_A is not None:
        out = out * _raised_cosine_step(k, 1.0 / low_A, falloff_per_A)
    if high_A is not None:
        out = out * (1.0 - _raised_cosine_step(k, 1.0 / high_A, falloff_per_A))
    return out.to(torch.get_default_dtype())


def fourier_crop_shape(shape, factor: float) -> tuple[int, ...]:
    """Output shape of :func:`fourier_crop_bin`: ``floor(n / factor)`` per axis (at least 1).

    The exact new pixel size is ``pixel_size_A · n / n_new`` per axis.
    """
    if not factor >= 1.0:
        raise ValueError(f"binning factor must be >= 1, got {factor!r}")
    return tuple(max(1, int(math.floor(int(n) / factor + 1e-9))) for n in shape)


def _crop_full_axis(spec: torch.Tensor, dim: int, n_new: int) -> torch.Tensor:
    """Keep frequencies |k| < n_new/2 of a full (fft) axis; for even n_new the Nyquist bin gets
    the mean of the +/- n_new/2 input bins (symmetric truncation, keeps a real signal real)."""
    n = spec.shape[dim]
    if n_new == n:
        return spec
    n_pos = (n_new + 1) // 2  # bins 0 .. n_pos-1 (non-negative frequencies below Nyquist)
    n_neg = n_new // 2 - (1 if n_new % 2 == 0 else 0)  # strictly negative frequencies below Nyquist
    parts = [spec.narrow(dim, 0, n_pos)]
    if n_new % 2 == 0:
        k = n_new // 2
        nyq = 0.5 * (spec.narrow(dim, k, 1) + spec.narrow(dim, n - k, 1))
        parts.append(nyq)
    if n_neg > 0:
        parts.append(spec.narrow(dim, n - n_neg, n_neg))
    return torch.cat(parts, dim=dim)


def _cyclic_shift(x: torch.Tensor, shifts: Sequence[int], dims: Sequence[int]) -> torch.Tensor:
    """``torch.roll(x, shifts, dims)`` as one copy of 2^len(dims) blocks (torch.roll copies once per axis)."""
    pieces = []
    for d, shift in zip(dims, shifts):
        n = x.shape[d]
        s = shift % n
        pieces.append((((d, slice(0, n - s)), (d, slice(s, n))), ((d, slice(n - s, n)), (d, slice(0, s)))))
    out = torch.empty_like(x)
    for combo in itertools.product(*pieces):
        source, target = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        for (d, a), (_, b) in combo:
            source[d], target[d] = a, b
        out[tuple(target)] = x[tuple(source)]
    return out


def fourier_crop_bin(image: torch.Tensor, factor: float, ndim: int = 2) -> torch.Tensor:
    """Antialiased binning by Fourier cropping, for any factor >= 1 (integer or not).

    Bins the last ``ndim`` axes (2: images ``[..., y, x]``, 3: volumes ``[..., z, y, x]``) to
    :func:`fourier_crop_shape`. The centre is kept (tomopipe's image centre ``n // 2``): output
    pixel j samples the band-limited input at ``n//2 + (j - n_new//2) · n / n_new``, so a
    point at a given Å offset from the centre stays there. The mean is preserved; frequencies
    below the new Nyquist are unchanged; for even n and n_new (integer factors of even boxes)
    this is the same as sampling at ``j · n / n_new``.
    """
    if ndim not in (2, 3) or image.ndim < ndim:
        raise ValueError(f"fourier_crop_bin: ndim must be 2 or 3 and <= image.ndim, got ndim={ndim}, "
                         f"shape {tuple(image.shape)}")
    shape = tuple(image.shape[-ndim:])
    new_shape = fourier_crop_shape(shape, factor)
    if new_shape == shape:
        return image.clone()
    dims = tuple(range(-ndim, 0))
    work_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    # move the centre n//2 to index 0, crop, and move index 0 back to n_new//2
    centred = _cyclic_shift(image.to(work_dtype), [-(n // 2) for n in shape], dims)
    spec = torch.fft.rfftn(centred, dim=dims)
    for d, n_new in zip(dims[:-1], new_shape[:-1]):
        spec = _crop_full_axis(spec, d, n_new)
    spec = spec[..., : new_shape[-1] // 2 + 1]
    out = _cyclic_shift(torch.fft.irfftn(spec, s=new_shape, dim=dims), [n // 2 for n in new_shape], dims)
    scale = math.prod(new_shape) / math.prod(shape)
    return (out * scale).to(image.dtype if image.is_floating_point() else torch.get_default_dtype())
