"""CTFFIND-style diagnostic image: observed spectrum (left half) against the fitted model (right)."""

from __future__ import annotations

import torch

from tomopipe.algorithms.ctf_estimate.search import CtfFit, row_model
from tomopipe.algorithms.ctf_estimate.setup import F64, Setup
from tomopipe.algorithms.ctf_estimate.spectra import TiltSpectra


def _full_spectrum(half: torch.Tensor) -> torch.Tensor:
    """rfft-layout power ``[w, w//2+1]`` -> full fftshifted ``[w, w]`` (Friedel symmetry)."""
    w = half.shape[0]
    kx = torch.fft.fftfreq(w, d=1.0 / w).long()  # -w/2..w/2-1 per column of the full grid
    ky = torch.fft.fftfreq(w, d=1.0 / w).long()
    rows = torch.where(kx[None, :] >= 0, ky[:, None] % w, (-ky[:, None]) % w)
    cols = kx.abs()[None, :].expand(w, w)
    cols = cols.clamp(max=half.shape[1] - 1)
    full = half[rows, cols]
    return torch.fft.fftshift(full)


def diagnostic_spectrum(tilt: TiltSpectra, setup: Setup, hand: int, fit: CtfFit) -> torch.Tensor:
    """CTFFIND-style diagnostic ``[w, w]`` (DC at ``w//2``, frequencies as ``torch.fft`` with
    ``fftshift``): the left half (kx < 0) shows the observed spectrum (mean periodogram of the
    windows, whitened by the fitted background, smoothed by a Gaussian of σ = 1 px), the right half
    the fitted model (per sector and radial bin: CTF² mixed over the windows' defocus offsets, times
    the SNR envelope); each is standardised within the fit range and clipped to ±4."""
    w = setup.window_px
    f = torch.fft.fftshift(torch.fft.fftfreq(w, d=setup.pixel_size_A, dtype=F64))
    kk = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    # background at every pixel: linear interpolation in the radial bins (bin j at radius j px)
    pos = (kk * w * setup.pixel_size_A - float(setup.j[0])).clamp(0, len(setup.j) - 1.000001)
    i0 = pos.floor().long()
    bg = tilt.bg[i0] * (1 - (pos - i0)) + tilt.bg[(i0 + 1).clamp(max=len(setup.j) - 1)] * (pos - i0)
    observed = (_full_spectrum(tilt.mean_spectrum) / bg.float() - 1.0)[None, None]
    g = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    g = g / g.sum()
    observed = torch.nn.functional.pad(observed, (3, 3, 3, 3), mode="reflect")
    observed = torch.nn.functional.conv2d(observed, g[None, None, :, None])
    observed = torch.nn.functional.conv2d(observed, g[None, None, None, :])[0, 0].to(F64)
    groups = tilt.groups
    cols = torch.ones(len(setup.k), dtype=torch.bool)
    with torch.no_grad():
        m = row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A, fit.phase_deg, cols)
    m = (groups.weight[:, None, None] * m).sum(0) / groups.weight.sum() * tilt.snr
    half = torch.zeros(setup.pixel_mask.shape, dtype=F64)
    half[setup.pixel_mask] = m.reshape(-1)[setup.bin_index]
    model = _full_spectrum(half)
    ring = (kk >= setup.k_low) & (kk <= setup.k_high)
    left = torch.arange(w)[None, :].expand(w, w) < w // 2
    out = torch.empty(w, w, dtype=F64)
    for img, part in ((observed, left), (model, ~left)):
        vals = img[ring & part]
        std = float(vals.std())
        out[part] = ((img - vals.mean()) / (std if std > 0 else 1.0))[part]
    return out.clamp(-4.0, 4.0).to(torch.float32)
