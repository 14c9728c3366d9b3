"""Fit resolution: the ring-by-ring correlation of data and model along the CTF phase χ."""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms.ctf import ctf_1d
from tomopipe.algorithms.ctf_estimate.search import CtfFit, row_model
from tomopipe.algorithms.ctf_estimate.setup import F64, FIT_RESOLUTION_THRESHOLD, Setup
from tomopipe.algorithms.ctf_estimate.spectra import TiltSpectra


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation (like ``numpy.interp``) for increasing ``xp``."""
    i = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    t = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0.0, 1.0)
    return fp[i - 1] + t * (fp[i] - fp[i - 1])


def _unwrapped_phase(setup: Setup, defocus_A: torch.Tensor, phase_deg: float, k: torch.Tensor) -> torch.Tensor:
    """CTF phase χ (rad) for defocus values ``[...]`` at frequencies ``k [m]`` → ``[..., m]``: from
    ``ctf_1d`` (sin χ and sin(χ + π/2)) on a fine grid from k = 0, unwrapped, interpolated."""
    n_fine = 2048
    kf = torch.linspace(0.0, float(k.max()) * 1.0001, n_fine, dtype=F64)
    d = defocus_A[..., None]
    s = ctf_1d(kf, d, setup.voltage_kV, setup.cs_mm, setup.amplitude_contrast, phase_shift_deg=phase_deg)
    c = ctf_1d(kf, d, setup.voltage_kV, setup.cs_mm, setup.amplitude_contrast, phase_shift_deg=phase_deg + 90.0)
    wrapped = torch.atan2(s, c)
    step = torch.diff(wrapped, dim=-1)
    step = step - 2 * math.pi * torch.round(step / (2 * math.pi))
    start = wrapped[..., :1] % (2 * math.pi)
    chi = torch.cat([start, start + torch.cumsum(step, -1)], -1)
    pos = (k / float(kf[-1]) * (n_fine - 1)).clamp(0, n_fine - 1)
    i0 = pos.floor().long().clamp(max=n_fine - 2)
    f = pos - i0
    return chi[..., i0] * (1 - f) + chi[..., i0 + 1] * f


def fit_resolution_from_phase_profile(chi_rad: torch.Tensor, data: torch.Tensor, model: torch.Tensor,
                                      weight: torch.Tensor, chi_start_rad: float,
                                      threshold: float = FIT_RESOLUTION_THRESHOLD, bins_per_ring: int = 12):
    """Phase χ (rad) of the fit-resolution limit from samples (χ, data, model, weight) of a spectrum.

    Samples are averaged in χ bins of π/``bins_per_ring``; ring n spans χ ∈ [nπ, (n+1)π) and its
    quality is the weighted correlation of data and model, each with a weighted linear trend in χ
    removed, over rings n−1..n+1 (χ ≥ ``chi_start_rad``). Going outward from the ring containing
    ``chi_start_rad``, the limit is the outer phase (n+1)π of the last ring of the first run of
    rings with correlation ≥ ``threshold`` (and ≥ 3/√bins, 3σ above chance); the run must start
    within the first three rings and ends at two consecutive rings below the threshold (a single
    dip is tolerated). ``chi_start_rad`` if no ring passes. Returns ``(chi_limit_rad,
    ring_correlations)``.
    """
    width = math.pi / bins_per_ring
    b = torch.floor(chi_rad.reshape(-1) / width).long()
    b0 = int(b.min())
    b = b - b0
    nb = int(b.max()) + 1
    wt = weight.reshape(-1).to(F64)
    wsum = torch.zeros(nb, dtype=F64).index_add_(0, b, wt)
    dm = torch.zeros(nb, dtype=F64).index_add_(0, b, wt * data.reshape(-1).to(F64)) / wsum.clamp(min=1e-300)
    mm = torch.zeros(nb, dtype=F64).index_add_(0, b, wt * model.reshape(-1).to(F64)) / wsum.clamp(min=1e-300)
    ok = wsum > 0
    centres = (torch.arange(nb, dtype=F64) + b0 + 0.5) * width
    ring_first = int(math.floor(chi_start_rad / math.pi))
    ring_last = int(math.floor(float(centres[ok].max()) / math.pi)) - 1
    corrs, limit, failed, misses = [], chi_start_rad, False, 0
    for n in range(ring_first, ring_last + 1):
        sel = ok & (centres >= max((n - 1) * math.pi, chi_start_rad)) & (centres < (n + 2) * math.pi)
        r = 0.0
        if int(sel.sum()) >= bins_per_ring:
            w_, x_ = wsum[sel], centres[sel]
            basis = torch.stack([torch.ones_like(x_), x_ - (w_ * x_).sum() / w_.sum()], 1)
            sw = w_.sqrt()[:, None]

            def detrended(y):  # remove a weighted linear trend in χ (residual background)
                coef = torch.linalg.lstsq(basis * sw, y[:, None] * sw).solution
                return y - (basis @ coef)[:, 0]

            d_c, m_c = detrended(dm[sel]), detrended(mm[sel])
            den = float(torch.sqrt((w_ * d_c * d_c).sum() * (w_ * m_c * m_c).sum()))
            r = float((w_ * d_c * m_c).sum()) / den if den > 0 else 0.0
        corrs.append(r)
        if failed:
            continue
        if r >= max(threshold, 3.0 / math.sqrt(max(int(sel.sum()), 1))):  # and 3σ above chance
            limit, misses = (n + 1) * math.pi, 0
        elif limit > chi_start_rad:  # inside the run: two consecutive failures end it
            misses += 1
            failed = misses >= 2
        else:  # before the run: at most two failing rings are skipped
            failed = n - ring_first >= 2
    return limit, torch.tensor(corrs, dtype=F64)


def fit_resolution_A(tilt: TiltSpectra, setup: Setup, hand: int, fit: CtfFit, threshold: float) -> float:
    groups = tilt.groups
    cols = setup.k >= setup.k_low
    k = setup.k[cols]
    s = groups.power[..., cols] / tilt.bg[cols] - 1.0
    with torch.no_grad():
        model = row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A,
                          fit.phase_deg, cols)
        phi = torch.deg2rad(setup.sector_deg)
        df = (fit.defocus_A + hand * groups.depth_A[:, None] + fit.astig_x_A * torch.cos(2 * phi)[None, :]
              + fit.astig_y_A * torch.sin(2 * phi)[None, :])
        chi = _unwrapped_phase(setup, df, fit.phase_deg, k)
        chi_centre = _unwrapped_phase(setup, torch.tensor(fit.defocus_A, dtype=F64), fit.phase_deg, k)
    chi_start = float(_interp(torch.tensor([setup.k_low], dtype=F64), k, chi_centre)[0])
    limit, _ = fit_resolution_from_phase_profile(chi, s, model, groups.weight[:, None, None].expand_as(s),
                                                 chi_start, threshold)
    if limit <= chi_start:
        return 1.0 / setup.k_low
    increasing = bool((torch.diff(chi_centre) > 0).all())
    if not increasing:  # beyond the Cs turnover: keep the monotonic part
        stop = int(torch.nonzero(torch.diff(chi_centre) <= 0)[0])
        chi_centre, k = chi_centre[: stop + 1], k[: stop + 1]
    k_lim = float(_interp(torch.tensor([limit], dtype=F64), chi_centre, k)[0])
    return 1.0 / max(k_lim, setup.k_low)
