"""Fourier shell (ring) correlation and resolution estimates.

Shell i holds the Fourier coefficients with ``round(|k|·n) == i`` (k in cycles/pixel, n the
box size), i = 0 .. n//2 (Nyquist); the corners beyond Nyquist are ignored. Shell i is at
``i / (n·pixel_size_A)`` cycles/Å. Works for cubic volumes ``[..., n, n, n]`` (FSC) and square
images ``[..., n, n]`` (FRC); sums are accumulated in float64 with ``bincount``.
"""

from __future__ import annotations

import torch

__all__ = ["shell_indices", "shell_frequencies_per_A", "fsc", "fsc_resolution_A"]


def shell_indices(n: int, ndim: int, device=None) -> torch.Tensor:
    """Shell index ``round(|k|·n)`` of every rfft coefficient of an n^ndim box: ``[n]*(ndim-1) + [n//2+1]`` (int64)."""
    if ndim not in (2, 3) or n < 2:
        raise ValueError(f"shell_indices: need ndim 2 or 3 and n >= 2, got ndim={ndim}, n={n}")
    full = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)  # integer frequencies
    half = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)
    axes = [full] * (ndim - 1) + [half]
    r2 = torch.zeros((), dtype=torch.float64, device=device)
    for i, a in enumerate(axes):
        view = [1] * ndim
        view[i] = a.numel()
        r2 = r2 + a.reshape(view) ** 2
    return torch.round(torch.sqrt(r2)).to(torch.int64)


def shell_frequencies_per_A(n: int, pixel_size_A: float) -> torch.Tensor:
    """Spatial frequency of each shell, ``i / (n·pixel_size_A)`` for i = 0 .. n//2 (cycles/Å, float64)."""
    if pixel_size_A <= 0:
        raise ValueError(f"shell_frequencies_per_A: pixel_size_A must be > 0, got {pixel_size_A!r}")
    return torch.arange(n // 2 + 1, dtype=torch.float64) / (n * pixel_size_A)


def _rfft_weights(n: int, ndim: int, device) -> torch.Tensor:
    """Multiplicity of each rfft column in the full spectrum (2 for columns with a conjugate twin)."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def fsc(volume_a: torch.Tensor, volume_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fourier shell correlation ``[..., n//2 + 1]`` of two cubic volumes (or FRC of square images).

    ``FSC(i) = Re Σ F_a F_b* / sqrt(Σ|F_a|² Σ|F_b|²)`` over shell i of the full spectrum. With a
    ``mask`` (real space, broadcast to the volumes), both are multiplied by it first. The spatial
    dims are the last 3 if the last three sizes are equal, else the last 2 (square images).
    Shells with no power in either map give 0. float64 result.
    """
    if volume_a.shape != volume_b.shape:
        raise ValueError(f"fsc: volumes differ in shape: {tuple(volume_a.shape)} vs {tuple(volume_b.shape)}")
    shape = volume_a.shape
    if volume_a.ndim >= 3 and shape[-1] == shape[-2] == shape[-3]:
        ndim = 3
    elif volume_a.ndim >= 2 and shape[-1] == shape[-2]:
        ndim = 2
    else:
        raise ValueError(f"fsc: need a cubic volume [..., n, n, n] or square image [..., n, n], got {tuple(shape)}")
    n = shape[-1]
    device = volume_a.device
    work = torch.float64 if volume_a.dtype == torch.float64 else torch.float32
    a, b = volume_a.to(work), volume_b.to(work)
    if mask is not None:
        m = mask.to(device=device, dtype=work)
        a, b = a * m, b * m
    dims = tuple(range(-ndim, 0))
    fa = torch.fft.rfftn(a, dim=dims)
    fb = torch.fft.rfftn(b, dim=dims)
    n_shells = n // 2 + 1
    # shells beyond Nyquist go to an overflow bin that is dropped
    idx = shell_indices(n, ndim, device).clamp_(max=n_shells).reshape(-1)
    w = _rfft_weights(n, ndim, device)
    batch = fa.shape[:-ndim]
    fa = fa.reshape(-1, *fa.shape[-ndim:])
    fb = fb.reshape(-1, *fb.shape[-ndim:])
    out = torch.empty((fa.shape[0], n_shells), dtype=torch.float64, device=device)

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(idx, weights=(values.double() * w).reshape(-1), minlength=n_shells + 1)[:n_shells]

    for j in range(fa.shape[0]):
        ca, cb = fa[j], fb[j]
        num = shell_sum(ca.real * cb.real + ca.imag * cb.imag)
        pa = shell_sum(ca.real.square() + ca.imag.square())
        pb = shell_sum(cb.real.square() + cb.imag.square())
        den = torch.sqrt(pa * pb)
        out[j] = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return out.reshape(*batch, n_shells)


def fsc_resolution_A(curve: torch.Tensor, pixel_size_A: float, threshold: float = 0.143,
                     box_size_px: int | None = None) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold``, linearly interpolated between shells.

    ``curve`` from :func:`fsc` (shell 0 .. n//2); ``box_size_px`` defaults to ``2·(len(curve) - 1)``
    (even box; pass it for odd boxes). Returns ``2·pixel_size_A`` (Nyquist) when the curve never
    drops below the threshold.
    """
    c = torch.as_tensor(curve, dtype=torch.float64).reshape(-1).cpu()
    if c.numel() < 2:
        raise ValueError(f"fsc_resolution_A: need at least 2 shells, got {c.numel()}")
    if pixel_size_A <= 0:
        raise ValueError(f"fsc_resolution_A: pixel_size_A must be > 0, got {pixel_size_A!r}")
    n = box_size_px if box_size_px is not None else 2 * (c.numel() - 1)
    if n // 2 + 1 != c.numel():
        raise ValueError(f"fsc_resolution_A: a box of {n} px has {n // 2 + 1} shells, the curve has {c.numel()}")
    below = torch.nonzero(c[1:] < threshold)
    if below.numel() == 0:
        return 2.0 * pixel_size_A * n / (2 * (n // 2))
    i = int(below[0]) + 1  # first shell below threshold; i-1 is at or above
    c0, c1 = float(c[i - 1]), float(c[i])
    frac = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    shell = (i - 1) + frac
    if shell <= 0:
        return float("inf")
    return n * pixel_size_A / shell
