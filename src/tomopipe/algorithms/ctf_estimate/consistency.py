"""Tilt-series consistency of the defocus: one maximum per tilt that agrees with a series trend."""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms.ctf_estimate.search import CtfFit, refine_fit
from tomopipe.algorithms.ctf_estimate.setup import F64


def _robust_trend(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, degree: int) -> torch.Tensor:
    """Polynomial trend of ``y(x)``: weighted least squares, reweighted with Tukey's biweight
    (c = 4.685, scale = 1.4826·weighted MAD) from the weighted median; robust to a minority of wild
    values."""
    t = (x - x.mean()) / max(float((x - x.mean()).abs().max()), 1e-12)
    basis = torch.stack([t ** d for d in range(degree + 1)], 1)

    def weighted_median(v, w):
        order = torch.argsort(v)
        cw = torch.cumsum(w[order], 0)
        return float(v[order][int(torch.searchsorted(cw, 0.5 * cw[-1]).clamp(max=len(v) - 1))])

    fit = torch.full_like(y, weighted_median(y, weight))
    for _ in range(30):
        res = y - fit
        scale = max(1.4826 * weighted_median(res.abs(), weight), 1.0)
        u = res / (4.685 * scale)
        w = weight * torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u))
        if int((w > 0).sum()) <= degree + 1:
            break
        sw = w.sqrt()[:, None]
        new = (basis @ torch.linalg.lstsq(basis * sw, y[:, None] * sw).solution)[:, 0]
        converged = float((new - fit).abs().max()) < 1e-3
        fit = new
        if converged:
            break
    return fit


def consistent_choice(z_curves, tilt_angles, step_A: float, free_A: float, z_per_A: float, max_penalty: float,
                      n_candidates: int = 6):
    """Choice of one maximum per tilt that agrees with a defocus trend along the tilt series.

    ``z_curves`` ``[n, c]``: every tilt's score over the centre-defocus grid (``step_A`` apart) in
    units of its noise level. Candidates of a tilt: its ``n_candidates`` best local maxima and its
    best value within ``free_A`` of the trend; each tilt takes the candidate that maximises
    ``z − min(max_penalty, z_per_A·max(0, |Δf − trend| − free_A))``. The trend is first the
    constant that maximises the sum of these values over all tilts (a scan of the whole grid: a
    majority of weak, scattered wrong maxima cannot outvote it), then, from 8 tilts on, a robust
    quadratic in the tilt angle (Tukey biweight, weights z²) through the values chosen with it.
    Returns the chosen grid index of every tilt and the trend (Å from the grid start)."""
    n, n_grid = z_curves.shape
    cands, zs = [], []
    for z in z_curves:
        peak = torch.ones_like(z, dtype=torch.bool)
        peak[1:] &= z[1:] >= z[:-1]
        peak[:-1] &= z[:-1] >= z[1:]
        idx = torch.nonzero(peak)[:, 0]
        idx = idx[torch.argsort(z[idx], descending=True)[:n_candidates]]
        cands.append(idx)
        zs.append(z[idx])
    half = int(round(free_A / step_A))
    # best z within ±free_A of every grid position (running maximum)
    near = torch.nn.functional.max_pool1d(z_curves[:, None, :], 2 * half + 1, stride=1, padding=half)[:, 0, :]
    grid = torch.arange(n_grid, dtype=F64) * step_A

    def penalty(distance):
        return (z_per_A * (distance - free_A).clamp(min=0.0)).clamp(max=max_penalty)

    # constant trend: scan every grid position
    total = near.sum(0).clone()
    for t in range(n):
        far = (zs[t][None, :] - penalty((cands[t].to(F64)[None, :] * step_A - grid[:, None]).abs())).max(1).values
        total += (far - near[t]).clamp(min=0.0)
    trend = torch.full((n,), float(grid[int(torch.argmax(total))]), dtype=F64)

    def choose(trend):
        choice = []
        for t in range(n):
            ref = float(trend[t])
            lo = max(0, int(math.floor((ref - free_A) / step_A)))
            hi = min(n_grid - 1, int(math.ceil((ref + free_A) / step_A)))
            c, z = cands[t], zs[t]
            if lo <= hi:
                best_near = lo + int(torch.argmax(z_curves[t, lo:hi + 1]))
                c, z = torch.cat([c, torch.tensor([best_near])]), torch.cat([z, z_curves[t, best_near:best_near + 1]])
            value = z - penalty((c.to(F64) * step_A - ref).abs())
            choice.append(int(c[int(torch.argmax(value))]))
        return choice

    choice = choose(trend)
    if n >= 8:
        chosen = torch.tensor(choice, dtype=F64) * step_A
        weight = torch.stack([z_curves[t, c] for t, c in enumerate(choice)]).clamp(min=0.0) ** 2 + 1e-6
        trend = _robust_trend(torch.tensor(tilt_angles, dtype=F64), chosen, weight, 2)
        choice = choose(trend)
    return choice, trend


def enforce_consistency(rows_of, fits, curves, sigmas, curve_phases, setup, snr_of, hand, fit_phase, tilt_angles, astig,
                        refine_astig: bool = False, free_A: float = 1500.0, z_per_1000_A: float = 1.0,
                        max_penalty: float = 8.0):
    """Tilt-series consistency of the defocus: every tilt's score curve over the whole defocus range
    (``curves [n, c]``, astigmatism ``astig``) in units of its noise level ``sigmas`` (z-scores); a
    robust trend through the tilts' own best maxima (weighted by z²); each tilt takes the candidate
    maximum that maximises z minus ``z_per_1000_A`` per 1000 Å of distance to the trend beyond
    ``free_A`` (at most ``max_penalty``). A tilt whose choice is more than 500 Å from its fit is
    refined again from it: a weak wrong maximum gives way, a strong genuine jump stays."""
    n = len(fits)
    refit = [False] * n
    if n < 3:
        return fits, refit
    choice, _ = consistent_choice(curves / sigmas, tilt_angles, setup.step_A, free_A, z_per_1000_A / 1000.0,
                                  max_penalty)
    for i, c in enumerate(choice):
        d = float(setup.table_defocus_A[setup.search_lo + c])
        if abs(d - fits[i].defocus_A) <= 500.0:
            continue
        start = CtfFit(float(curves[i, c]), d, astig[0], astig[1], float(curve_phases[i][c]))
        fits[i] = refine_fit(rows_of[i], setup, snr_of[i], hand, start, fit_phase, fit_astig=refine_astig)
        refit[i] = True
    return fits, refit
