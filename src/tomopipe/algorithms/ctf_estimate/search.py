"""Correlation score of the CTF model with whitened rows: exhaustive search and local refinement."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf import ctf_1d
from tomopipe.algorithms.ctf_estimate.setup import F64, Setup
from tomopipe.algorithms.ctf_estimate.spectra import WhitenedRows
from tomopipe.algorithms.peaks import parabolic_offset


@dataclass
class CtfFit:
    score: float
    defocus_A: float  # mean defocus (U + V) / 2 at the image centre
    astig_x_A: float  # (U − V)/2 · cos 2θ
    astig_y_A: float  # (U − V)/2 · sin 2θ
    phase_deg: float

    @property
    def half_astig_A(self) -> float:
        return math.hypot(self.astig_x_A, self.astig_y_A)

    @property
    def angle_deg(self) -> float:
        return math.degrees(0.5 * math.atan2(self.astig_y_A, self.astig_x_A))


def model_fit_table(setup: Setup, snr_fit: torch.Tensor, phase_deg: float) -> torch.Tensor:
    """Model table ``[n_fit, L]``: ``detrend(snr(k)·(CTF² − ½))``. Only the oscillation of CTF²
    about its mean ½ is weighted by the SNR envelope, so that the envelope's own shape (fitted to
    the data) cannot correlate with the data at every defocus."""
    return setup.detrend @ ((setup.model_table(phase_deg)[setup.fit] - 0.5) * snr_fit[:, None])


def _shift_tables(rows: WhitenedRows, mfit: torch.Tensor, hand: int, setup: Setup, lo: int, hi: int,
                  squared: bool = False):
    """Correlation tables for candidate centre-defocus indices ``lo..hi`` of the table grid.

    ``num [n_sec, c]`` = Σ_rows w·Σ_k s·model(Δf + hand·z_row) and ``den [c]`` = Σ_rows w·‖model‖²
    (per sector); ``squared``: w²·s² instead of w·s in ``num`` (for the noise level; pass the
    squared model). The table is padded so that shifted indices stay inside it.
    """
    offsets = torch.round(hand * rows.depth_A / setup.step_A).long()
    idx = (torch.arange(lo, hi + 1)[None, :] + offsets[:, None]).clamp(0, mfit.shape[1] - 1)  # [rows, c]
    data = (rows.s_fit * rows.weight[:, None, None]) ** 2 if squared else rows.s_fit * rows.weight[:, None, None]
    num = torch.einsum("rsj,jrc->sc", data, mfit[:, idx])
    den = torch.einsum("r,rc->c", rows.weight, (mfit * mfit).sum(0)[idx])
    return num, den


def search_defocus(rows: WhitenedRows, setup: Setup, snr_fit, hand: int, lo: int, hi: int, phases_deg, astig=None,
                   n_peaks: int = 6, window_A: float = 600.0, return_curve: bool = False):
    """Exhaustive search over the centre defocus (table indices lo..hi, ``step_A`` apart) and the
    phase grid without astigmatism, then over the astigmatism grid (``(U − V)/2`` × angle) within
    ``± window_A`` of the ``n_peaks`` best local maxima. ``astig = (ax, ay)`` fixes the
    astigmatism vector instead; then ``return_curve`` also returns, for every candidate, the score
    (best phase), its noise level and that phase: ``(fit, curve, sigma, phase_deg)`` (``[hi−lo+1]``
    each). The noise level is the sandwich estimate of the score's standard deviation,
    ``sqrt(Σ w²·s²·m²) / sqrt(Σ w·s² · Σ w·m²)`` (= that of the score with random signs on the
    data), scaled by √(window overlap) because overlapping windows share their noise."""
    if astig is None:
        combos = [(0.0, 0.0)] + [(a, th) for a in setup.astig_half_A if a > 0 for th in setup.astig_angles_deg]
    else:
        combos = [(math.hypot(*astig), math.degrees(0.5 * math.atan2(astig[1], astig[0])))]
    a_t = torch.tensor([c[0] for c in combos], dtype=F64)
    th_t = torch.tensor([c[1] for c in combos], dtype=F64)
    e = torch.round(a_t[:, None] * torch.cos(2 * torch.deg2rad(setup.sector_deg[None, :] - th_t[:, None]))
                    / setup.step_A).long()  # [combo, n_sec] defocus offset of each sector (grid steps)
    e_max = int(e.abs().max())
    n_c = hi - lo + 1
    win = int(round(window_A / setup.step_A))
    best = CtfFit(-math.inf, 0.0, 0.0, 0.0, 0.0)
    curve = torch.full((n_c,), -math.inf, dtype=F64)
    curve_phase = torch.zeros(n_c, dtype=F64)
    curve_sigma = torch.ones(n_c, dtype=F64)
    for phase in phases_deg:
        mfit = model_fit_table(setup, snr_fit, phase)
        num, den = _shift_tables(rows, mfit, hand, setup, lo - e_max, hi + e_max)
        core = slice(e_max, e_max + n_c)
        score0 = num[:, core].sum(0) / torch.sqrt(rows.data_norm * (num.shape[0] * den[core]).clamp(min=1e-30))
        peak = torch.ones(n_c, dtype=torch.bool)
        peak[1:] &= score0[1:] >= score0[:-1]
        peak[:-1] &= score0[:-1] >= score0[1:]
        cand = torch.nonzero(peak)[:, 0]
        cand = cand[torch.argsort(score0[cand], descending=True)[:n_peaks]]
        if len(combos) == 1:  # fixed astigmatism: every candidate
            xs = torch.arange(n_c)
        else:
            xs = torch.unique(torch.clamp(cand[:, None] + torch.arange(-win, win + 1)[None, :], 0, n_c - 1).reshape(-1))
        x = xs[None, None, :] + e[:, :, None] + e_max  # [combo, sec, c]
        tot_num = torch.gather(num[None].expand(len(combos), -1, -1), 2, x).sum(1)
        score = tot_num / torch.sqrt(rows.data_norm * den[x].sum(1).clamp(min=1e-30))
        if len(combos) == 1 and return_curve:
            var, _ = _shift_tables(rows, mfit * mfit, hand, setup, lo - e_max, hi + e_max, squared=True)
            sigma = torch.sqrt(torch.gather(var, 1, x[0]).sum(0) / (rows.data_norm * den[x[0]].sum(0).clamp(min=1e-30)))
            better = score[0] > curve
            curve = torch.where(better, score[0], curve)
            curve_sigma = torch.where(better, sigma * math.sqrt(rows.overlap), curve_sigma)
            curve_phase = torch.where(better, torch.full_like(curve_phase, float(phase)), curve_phase)
        ci, xi = divmod(int(torch.argmax(score)), len(xs))
        if float(score[ci, xi]) > best.score:
            th = math.radians(2 * float(th_t[ci]))
            a = float(a_t[ci])
            best = CtfFit(float(score[ci, xi]), float(setup.table_defocus_A[lo + int(xs[xi])]), a * math.cos(th),
                          a * math.sin(th), float(phase))
    if return_curve:
        if astig is None:
            raise ValueError("search_defocus: return_curve needs a fixed astigmatism")
        return best, curve, curve_sigma, curve_phase
    return best


def row_model(setup: Setup, depth_A, hand: int, defocus_A, ax_A, ay_A, phase_deg, columns) -> torch.Tensor:
    """Bin-averaged CTF² ``[rows, n_sec, n_cols]`` for continuous parameters (differentiable)."""
    phi = torch.deg2rad(setup.sector_deg)
    df = (defocus_A + hand * depth_A[:, None] + ax_A * torch.cos(2 * phi)[None, :]
          + ay_A * torch.sin(2 * phi)[None, :])
    c = ctf_1d(setup.k_sub[columns][None, None], df[:, :, None, None], setup.voltage_kV, setup.cs_mm,
               setup.amplitude_contrast, phase_shift_deg=phase_deg)
    return (c * c).mean(-1)


class LocalTables:
    """Correlation tables of one tilt on a fine defocus grid (``step_A``) around a start value, for
    every phase of a small phase grid; the score of continuous parameters is interpolated linearly."""

    def __init__(self, rows: WhitenedRows, setup: Setup, snr_fit, hand: int, centre_A: float, radius_A: float,
                 phases_deg, step_A: float = 5.0):
        a_lim = max(setup.astig_half_A) + 500.0
        self.offs = hand * rows.depth_A  # [rows]
        self.step = step_A
        self.first = centre_A - radius_A - a_lim + float(self.offs.min()) - 2 * step_A
        self.n_d = int(math.ceil((2 * radius_A + 2 * a_lim + float(self.offs.max() - self.offs.min())) / step_A)) + 5
        self.phases = [float(p) for p in phases_deg]
        d = self.first + step_A * torch.arange(self.n_d, dtype=F64)
        nums, dens = [], []
        for phase in self.phases:
            c = ctf_1d(setup.k_sub[setup.fit][:, :, None], d[None, None, :], setup.voltage_kV, setup.cs_mm,
                       setup.amplitude_contrast, phase_shift_deg=phase)
            m = setup.detrend @ (((c * c).mean(1) - 0.5) * snr_fit[:, None])  # as model_fit_table
            nums.append(torch.einsum("rsj,jd->rsd", rows.s_fit * rows.weight[:, None, None], m).reshape(-1, self.n_d))
            dens.append((m * m).sum(0))
        self.num = torch.stack(nums)  # [P, rows·n_sec, n_d]
        self.den = torch.stack(dens)  # [P, n_d]
        phi = torch.deg2rad(setup.sector_deg)
        self.c2, self.s2 = torch.cos(2 * phi)[None, :], torch.sin(2 * phi)[None, :]
        n_r, n_s = rows.s_fit.shape[0], rows.s_fit.shape[1]
        self.flat_offs = self.offs[:, None].expand(n_r, n_s)
        self.wts = rows.weight[:, None].expand(n_r, n_s).reshape(-1)
        self.row_ix = torch.arange(n_r * n_s)
        self.norm = rows.data_norm

    def scores(self, defocus_A: torch.Tensor, ax_A: float, ay_A: float, phase_deg: float) -> torch.Tensor:
        """Scores for centre defocus values ``[m]`` (−1 where the tables do not reach)."""
        df = (defocus_A[:, None, None] + self.flat_offs[None] + ax_A * self.c2[None] + ay_A * self.s2[None])
        pos = ((df - self.first) / self.step).reshape(len(defocus_A), -1)
        bad = (pos < 0).any(1) | (pos > self.n_d - 2).any(1)
        pos = pos.clamp(0, self.n_d - 2)
        i0 = pos.floor().long()
        f = pos - i0
        if len(self.phases) > 1:
            pp = (phase_deg - self.phases[0]) / (self.phases[1] - self.phases[0])
            if not 0.0 <= pp <= len(self.phases) - 1:
                return torch.full((len(defocus_A),), -1.0, dtype=F64)
            p0 = min(int(math.floor(pp)), len(self.phases) - 2)
            parts = ((p0, 1.0 - (pp - p0)), (p0 + 1, pp - p0))
        else:
            parts = ((0, 1.0),)
        num = torch.zeros(len(defocus_A), dtype=F64)
        den = torch.zeros(len(defocus_A), dtype=F64)
        flat = self.row_ix[None, :] * self.n_d + i0
        for p, wp in parts:
            nv = torch.take(self.num[p], flat) * (1 - f) + torch.take(self.num[p], flat + 1) * f
            dv = torch.take(self.den[p], i0) * (1 - f) + torch.take(self.den[p], i0 + 1) * f
            num += wp * nv.sum(1)
            den += wp * (self.wts[None, :] * dv).sum(1)
        out = num / torch.sqrt(self.norm * den.clamp(min=1e-30))
        return torch.where(bad, torch.full_like(out, -1.0), out)

    def score(self, defocus_A: float, ax_A: float, ay_A: float, phase_deg: float) -> float:
        return float(self.scores(torch.tensor([defocus_A], dtype=F64), ax_A, ay_A, phase_deg)[0])


def _nelder_mead(fun, x0, step: float = 0.6, xatol: float = 0.02):
    """Minimise ``fun`` from ``x0`` (scipy Nelder–Mead, initial simplex edges of ``step``)."""
    from scipy.optimize import minimize

    x0 = [float(v) for v in x0]
    simplex = [x0] + [[v + (step if i == j else 0.0) for j, v in enumerate(x0)] for i in range(len(x0))]
    res = minimize(fun, x0, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "xatol": xatol, "fatol": 1e-8, "maxiter": 200 * len(x0)})
    return [float(v) for v in res.x]


def refine_fit(rows: WhitenedRows, setup: Setup, snr_fit, hand: int, start: CtfFit, fit_phase: bool,
               fit_astig: bool = True, radius_A: float = 400.0) -> CtfFit:
    """Local refinement of defocus (and astigmatism vector, phase) by Nelder–Mead on the exact
    correlation tabulated on a 5 Å defocus grid (2.5° phase grid), interpolated linearly."""
    phases = [start.phase_deg]
    if fit_phase:
        phases = [start.phase_deg + dp for dp in torch.arange(-15.0, 15.01, 2.5).tolist()]
    tab = LocalTables(rows, setup, snr_fit, hand, start.defocus_A, radius_A, phases)

    def unpack(x):
        dm = 100.0 * x[0]
        ax, ay = (100.0 * x[1], 100.0 * x[2]) if fit_astig else (start.astig_x_A, start.astig_y_A)
        ph = start.phase_deg + 10.0 * x[-1] if fit_phase else start.phase_deg
        return start.defocus_A + dm, ax, ay, ph

    x0 = [0.0] + ([start.astig_x_A / 100.0, start.astig_y_A / 100.0] if fit_astig else [])
    x0 += [0.0] if fit_phase else []
    initial = tab.score(*unpack(x0))
    x = _nelder_mead(lambda v: -tab.score(*unpack(v)), x0)
    d, ax, ay, ph = unpack(x)
    final = tab.score(d, ax, ay, ph)
    if not math.isfinite(final) or final < initial or abs(d - start.defocus_A) > radius_A:
        return CtfFit(initial, start.defocus_A, start.astig_x_A, start.astig_y_A, start.phase_deg)
    return CtfFit(final, d, ax, ay, ph % 180.0 if fit_phase else ph)


def series_astigmatism(tables, fits, radius_A: float = 400.0, step_A: float = 20.0):
    """Astigmatism vector (ax, ay) shared by all tilts: maximises Σ_tilts max_m score_t(m, ax, ay)
    (m within ``± radius_A`` of each tilt's own fit), started from every tilt's own vector and 0."""
    grid = torch.arange(-radius_A, radius_A + step_A / 2, step_A, dtype=F64)

    def total(ax, ay):
        return sum(float(t.scores(f.defocus_A + grid, ax, ay, f.phase_deg).max()) for t, f in zip(tables, fits))

    starts = [(0.0, 0.0)] + [(f.astig_x_A, f.astig_y_A) for f in fits]
    best = max(starts, key=lambda a: total(*a))
    x = _nelder_mead(lambda v: -total(100.0 * v[0], 100.0 * v[1]), [best[0] / 100.0, best[1] / 100.0], step=1.0)
    cand = (100.0 * x[0], 100.0 * x[1])
    return cand if total(*cand) >= total(*best) else best


def local_defocus(rows: WhitenedRows, setup: Setup, mfit: torch.Tensor, hand: int, fit: CtfFit, centre_A: float,
                  range_A: float):
    """Best centre defocus of ``rows`` within ``centre_A ± range_A``, astigmatism and phase fixed
    (``mfit`` = ``model_fit_table`` at the fit's phase), with parabolic interpolation between table
    steps; returns (defocus_A, score)."""
    first = float(setup.table_defocus_A[0])
    lo = max(0, int(round((centre_A - range_A - first) / setup.step_A)))
    hi = min(len(setup.table_defocus_A) - 1, int(round((centre_A + range_A - first) / setup.step_A)))
    e = torch.round((fit.astig_x_A * torch.cos(2 * torch.deg2rad(setup.sector_deg))
                     + fit.astig_y_A * torch.sin(2 * torch.deg2rad(setup.sector_deg))) / setup.step_A).long()
    e_max = int(e.abs().max())
    num, den = _shift_tables(rows, mfit, hand, setup, lo - e_max, hi + e_max)
    x = torch.arange(hi - lo + 1)[None, :] + e[:, None] + e_max
    score = torch.gather(num, 1, x).sum(0) / torch.sqrt(rows.data_norm * den[x].sum(0).clamp(min=1e-30))
    i = int(torch.argmax(score))
    shift = 0.0
    if 0 < i < len(score) - 1:
        shift = float(parabolic_offset(*(float(score[i + d]) for d in (-1, 0, 1))))
    return float(setup.table_defocus_A[lo + i]) + shift * setup.step_A, float(score[i])
