"""Backgrounds of the power spectrum: pass 1 (smooth log-polynomial), pass 2 (spline + envelope fit)."""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms.ctf import electron_wavelength_A
from tomopipe.algorithms.ctf_estimate.search import CtfFit, row_model
from tomopipe.algorithms.ctf_estimate.setup import F64, Setup
from tomopipe.algorithms.ctf_estimate.spectra import TiltSpectra

_LOCAL_BACKGROUND_DEGREE = 6  # pass-1 background: log-polynomial degree inside the fit range
_BACKGROUND_KNOT_PERIODS = 0.4  # pass-2 background: knot spacing (Thon-ring periods) up to the fit range's end
_BACKGROUND_KNOT_PX = 4.0  # and at least this many radial bins
_BACKGROUND_KNOT_PX_OUTSIDE = 16.0  # and beyond it


def smooth_log_background(profile: torch.Tensor, k: torch.Tensor, degree: int = 4,
                          local_range_per_A: tuple[float, float] | None = None,
                          local_degree: int = _LOCAL_BACKGROUND_DEGREE) -> torch.Tensor:
    """Robust smooth fit of a radial power profile: polynomial in k fitted to log P (2 reweightings).

    ``local_range_per_A = (k0, k1)``: inside it the background is a separate fit of degree
    ``local_degree`` to that range only, so that structure far outside (the amorphous-ice ring at
    3.7 Å, the detector's fall-off near Nyquist) cannot bend the background where the fit runs."""
    def fit(sel: torch.Tensor, deg: int) -> torch.Tensor:
        ks = k[sel]
        t = (k - ks.mean()) / (ks.max() - ks.min()).clamp(min=1e-12) * 2.0
        basis = torch.stack([t ** d for d in range(deg + 1)], 1)
        y = torch.log(profile.clamp(min=1e-30))
        wts = torch.ones_like(y[sel])
        for _ in range(3):
            sw = wts.sqrt()[:, None]
            coef = torch.linalg.lstsq(basis[sel] * sw, (y[sel] * sw[:, 0])[:, None]).solution[:, 0]
            res = y[sel] - basis[sel] @ coef
            scale = 1.4826 * res.abs().median().clamp(min=1e-6)
            wts = 1.0 / (1.0 + (res / (2.0 * scale)) ** 2)
        return torch.exp(basis @ coef)

    everywhere = torch.ones_like(k, dtype=torch.bool)
    bg = fit(everywhere, degree)
    if local_range_per_A is not None:
        inside = (k >= local_range_per_A[0]) & (k <= local_range_per_A[1])
        if int(inside.sum()) > 2 * (local_degree + 1):
            bg = torch.where(inside, fit(inside, local_degree), bg)
    return bg


# ----------------------------------------------------------------------------- pass 2: background and envelope
def _hat_basis(k: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear (hat) basis ``[n_k, n_knots]`` on increasing knots (constant beyond the ends)."""
    x = k.clamp(float(knots[0]), float(knots[-1]))
    i = torch.searchsorted(knots.contiguous(), x.contiguous()).clamp(1, len(knots) - 1)
    t = (x - knots[i - 1]) / (knots[i] - knots[i - 1])
    basis = torch.zeros(len(k), len(knots), dtype=F64)
    basis.scatter_(1, (i - 1)[:, None], (1.0 - t)[:, None])
    basis.scatter_add_(1, i[:, None], t[:, None])
    return basis


def _background_knots(setup: "Setup", defocus_A: float) -> torch.Tensor:
    """Knots of the pass-2 background, in 1/Å: from the first radial bin to the end of the fit
    range (+ margin) ``_BACKGROUND_KNOT_PERIODS`` Thon-ring periods apart at ``defocus_A`` (local
    period of CTF² ``1/(2·λ·Δf·k)``; at least ``_BACKGROUND_KNOT_PX`` bins), then
    ``_BACKGROUND_KNOT_PX_OUTSIDE`` bins apart to the last bin: the background follows the
    spectrum's shape where the fit runs but cannot follow the rings themselves."""
    to_px = setup.window_px * setup.pixel_size_A
    lam = float(electron_wavelength_A(setup.voltage_kV))
    j0, j1 = float(setup.j[0]), float(setup.j[-1])
    inner_end = min(j1, setup.k_high * to_px + 2 * _BACKGROUND_KNOT_PX)
    knots = [j0]
    while knots[-1] < inner_end:
        k = knots[-1] / to_px
        period_px = to_px / (2.0 * lam * max(defocus_A, 1.0) * k)
        knots.append(knots[-1] + max(_BACKGROUND_KNOT_PX, _BACKGROUND_KNOT_PERIODS * period_px))
    while knots[-1] + _BACKGROUND_KNOT_PX_OUTSIDE < j1:
        knots.append(knots[-1] + _BACKGROUND_KNOT_PX_OUTSIDE)
    if knots[-1] < j1:
        knots.append(j1)
    return torch.tensor(knots, dtype=F64) / to_px


_ENVELOPE_B_GRID_A2 = (0.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0)


def fit_background_envelope(tilt: TiltSpectra, setup: Setup, hand: int, fit: CtfFit, min_t: float = 3.0):
    """Least squares ``P ≈ bg(k) + A·exp(−B·k²/4)·CTF²`` over all windows and sectors, with a
    piecewise-linear bg, for every B of a grid (weights 1/bg₀², the periodogram variance); the B with
    the smallest residual wins. Returns ``(bg, snr)`` with ``snr = A·exp(−B·k²/4)/bg`` normalised to
    a maximum of 1 in the fit range. None (keep the pass-1 background, unweighted) when bg is not
    positive or the envelope amplitude A is not at least ``min_t`` standard errors above 0: then the
    flexible background has taken up the rings themselves (or there is too little signal).
    The two-parameter envelope cannot follow the noise, unlike a free envelope."""
    groups = tilt.groups
    cols = torch.ones(len(setup.k), dtype=torch.bool)
    with torch.no_grad():
        c = row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A, fit.phase_deg, cols)
    basis = _hat_basis(setup.k, _background_knots(setup, fit.defocus_A))  # [n_k, nb]
    nb = basis.shape[1]
    wt = (groups.weight[:, None, None] / tilt.bg[None, None, :] ** 2).expand_as(c)  # [rows, sec, n_k]
    s0, s1, s2 = wt.sum((0, 1)), (wt * c).sum((0, 1)), (wt * c * c).sum((0, 1))
    y0, y1 = (wt * groups.power).sum((0, 1)), (wt * c * groups.power).sum((0, 1))
    yy = float((wt * groups.power ** 2).sum())
    bb = (s0[:, None, None] * basis[:, :, None] * basis[:, None, :]).sum(0)  # [nb, nb]
    best = None
    for b_factor in _ENVELOPE_B_GRID_A2:
        e = torch.exp(-0.25 * b_factor * setup.k ** 2)
        ata = torch.zeros(nb + 1, nb + 1, dtype=F64)
        ata[:nb, :nb] = bb
        ata[:nb, nb] = ata[nb, :nb] = basis.T @ (s1 * e)
        ata[nb, nb] = (s2 * e * e).sum()
        aty = torch.cat([basis.T @ y0, ((y1 * e).sum())[None]])
        ata = ata + 1e-12 * torch.trace(ata) / (nb + 1) * torch.eye(nb + 1, dtype=F64)
        sol = torch.linalg.solve(ata, aty)
        residual = yy - float(sol @ aty)
        if best is None or residual < best[0]:
            best = (residual, b_factor, sol, ata)
    _, b_factor, sol, ata = best
    bg = basis @ sol[:nb]
    if not bool((bg > 0).all()):
        return None
    dof = max(float((groups.weight > 0).sum()) * setup.n_sectors * len(setup.k) - nb - 1, 1.0)
    sigma2 = max(best[0] / dof, 1e-30)
    se = math.sqrt(sigma2 * float(torch.linalg.inv(ata)[nb, nb]))
    amplitude = float(sol[nb])
    if not amplitude > min_t * se:  # the background took up the rings: keep the pass-1 one
        return None
    snr = amplitude * torch.exp(-0.25 * b_factor * setup.k ** 2) / bg
    return bg, snr / snr[setup.fit].max()
