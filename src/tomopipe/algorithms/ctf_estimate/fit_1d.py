"""Exhaustive 1-D defocus search on a rotationally averaged power spectrum."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf import ctf_1d
from tomopipe.algorithms.ctf_estimate.background import smooth_log_background
from tomopipe.algorithms.ctf_estimate.setup import DETREND_DEGREE, F64, CtfEstimationError
from tomopipe.algorithms.peaks import parabolic_offset


@dataclass(frozen=True)
class Fit1d:
    """Best defocus of a rotational average and the score curve it was taken from."""

    defocus_A: float  # parabolic refinement of the best grid value
    score: float  # normalised cross-correlation at the best grid value
    defocus_grid_A: torch.Tensor  # [m] the searched defocus values (step_A apart)
    scores: torch.Tensor  # [m] score of every grid value


def fit_ctf_1d(power_profile, frequency_per_A, voltage_kV, cs_mm, amplitude_contrast,
               defocus_range_A=(5000.0, 80000.0), resolution_range_A=(30.0, 7.0), phase_shift_deg=0.0,
               step_A: float = 50.0) -> Fit1d:
    """Exhaustive 1-D defocus search on a rotationally averaged power spectrum (no astigmatism).

    The profile is whitened by a smooth background (polynomial fit to log P), a quadratic in k is
    projected out of data and model within the fit range, and the normalised cross-correlation
    with CTF² is computed for every defocus on a ``step_A`` grid; the maximum is refined by
    parabolic interpolation.
    """
    p = torch.as_tensor(power_profile, dtype=F64).reshape(-1)
    k = torch.as_tensor(frequency_per_A, dtype=F64).reshape(-1)
    if p.shape != k.shape or len(k) < 8:
        raise CtfEstimationError(f"fit_ctf_1d: profile ({len(p)}) and frequencies ({len(k)}) must match, >= 8 values")
    low, high = (float(x) for x in resolution_range_A)
    fit = (k >= 1.0 / low) & (k <= 1.0 / high)
    if int(fit.sum()) < 8:
        raise CtfEstimationError(f"fit_ctf_1d: fewer than 8 frequencies inside the fit range {low:g}-{high:g} Å")
    d_lo, d_hi = (float(x) for x in defocus_range_A)
    grid = torch.arange(math.floor(d_lo / step_A), math.ceil(d_hi / step_A) + 1, dtype=F64) * step_A
    sel = k > 0
    bg = smooth_log_background(p[sel], k[sel])
    s = (p[fit] / bg[fit[sel]] - 1.0)
    kf = k[fit]
    t = (kf - kf.mean()) / max(float(kf.max() - kf.min()), 1e-12) * 2.0
    qmat, _ = torch.linalg.qr(torch.stack([t ** d for d in range(DETREND_DEGREE + 1)], 1))
    proj = torch.eye(len(kf), dtype=F64) - qmat @ qmat.T
    s = proj @ s
    c = ctf_1d(kf[:, None], grid[None, :], voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg=phase_shift_deg)
    m = proj @ (c * c)
    scores = (s @ m) / torch.sqrt((s * s).sum() * (m * m).sum(0)).clamp(min=1e-30)
    i = int(torch.argmax(scores))
    shift = 0.0
    if 0 < i < len(grid) - 1:
        shift = float(parabolic_offset(*(float(scores[i + d]) for d in (-1, 0, 1))))
    return Fit1d(defocus_A=float(grid[i]) + shift * step_A, score=float(scores[i]), defocus_grid_A=grid,
                 scores=scores)
