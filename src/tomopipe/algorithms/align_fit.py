"""Fiducial-less tilt-series alignment, part 2: robust fit of the projection model to contours
(the role of IMOD tiltalign), the tilt-angle offset, and a gauge-free shift error.

Model (RELION 5, ``geometry.py``), in pixels from the image centre ``N//2``:
``x_ij = m_i · [Rz(axis_i)·Ry(tilt_i)·p_j]_xy + s_i`` with ``axis_i = axis + δaxis_i``,
``tilt_i = nominal_i + offset + δtilt_i``. Unknowns: the 3-D contour points ``p_j``, the shifts ``s_i``,
the axis angle (global; per-view deviations optional), per-view tilt deviations and per-view
magnifications (optional). The magnification of the zero-tilt view is 1; the per-view deviations
have a Gaussian prior (``*_prior_sd``) so that the common part goes to the global parameters.

Gauges (changes that leave every projection the same, so the images cannot tell them):

* A 3-D translation of the points (``p − t``, ``s + m·R·t``). After the fit the tomogram origin is
  put at the mean height of the points and under the image centre of the zero-tilt view (``s = 0``
  there).
* The tilt-angle offset: ``Ry(θ + Δ)·Ry(−Δ)·p = Ry(θ)·p``, a rotation of the specimen about the
  tilt axis. It is *defined* by the specimen: the offset is the one at which the specimen slab is
  level at tilt 0. Two estimates: :func:`transmission_tilt_offset` (preferred when the views'
  mean intensities are known: the zero-loss transmission ``exp(−t/(λ·cos(θ + Δ)))`` of a slab of
  thickness t is highest when the beam is normal to the slab), and, as IMOD tiltalign does, the
  offset that makes the plane fitted to the contour points level along x
  (:func:`level_specimen`). The second is only as good as the points sample the slab: ~150
  particles in a slab as thick as half its width leave it uncertain by 1–2 degrees.

Robustness: iteratively reweighted — after each fit, observations with a residual above
``median + k·1.4826·MAD`` (at least ``min_outlier_px``) get weight 0, and contours whose mean
residual is above the same bound over contours are rejected; rounds stop when nothing changes.
Views with fewer than ``min_contours_per_view`` usable contours are left out of the fit
(``FitResult.view_fitted`` False: their shifts are not determined and are 0, their tilt is the
nominal one plus the offset, their magnification 1; the caller aligns them another way). Failures
(too few contours, fewer than ``min_views_fitted`` views with enough contours, a fit that diverges
or leaves large residuals) raise :class:`AlignmentError` with the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tomopipe.algorithms.geometry import projection_rotations
from tomopipe.algorithms.peaks import parabolic_offset
from tomopipe.errors import TomopipeError

__all__ = ["AlignmentError", "FitOptions", "FitResult", "fit_projection_model", "usable_contours",
           "projected_shift_error_px",
           "level_specimen", "transmission_tilt_offset", "TransmissionFit"]


class AlignmentError(TomopipeError):
    """The tilt series cannot be aligned; the message says why (with the numbers)."""


@dataclass(frozen=True)
class FitOptions:
    refine_axis: bool = True  #: global tilt-axis angle
    refine_axis_per_view: bool = False  #: per-view axis deviations
    refine_tilt_offset: bool = True  #: one offset added to every tilt angle
    refine_tilt_per_view: bool = False  #: per-view tilt deviations (noisier than stage errors usually are)
    refine_magnification: bool = True  #: per-view magnification (zero tilt fixed at 1)
    axis_prior_sd_deg: float = 0.5
    tilt_prior_sd_deg: float = 1.0
    magnification_prior_sd: float = 0.005
    outlier_mad_factor: float = 4.0  #: k in median + k·1.4826·MAD
    min_outlier_px: float = 1.0  #: residuals below this are never outliers
    min_views_per_contour: int = 4
    min_contours: int = 10
    min_contours_per_view: int = 3  #: views with fewer usable contours are left out of the fit
    min_views_fitted: int = 3  #: fewest views the fit must hold
    max_residual_px: float = 2.0  #: RMS residual above which the fit is declared failed
    max_rounds: int = 6
    max_iterations: int = 100


@dataclass
class FitResult:
    rot_z_deg: torch.Tensor  #: [n] tilt-axis angle per view
    tilt_deg: torch.Tensor  #: [n] refined tilt angle per view
    shifts_px: torch.Tensor  #: [n, 2] specimen shifts (x, y), px
    magnification: torch.Tensor  #: [n] image scale relative to the zero-tilt view
    points_px: torch.Tensor  #: [m, 3] contour points (x, y, z) px from the tomogram origin (NaN: rejected)
    residual_view_px: torch.Tensor  #: [n] RMS residual of the used observations per view (NaN: not fitted)
    residual_contour_px: torch.Tensor  #: [m] RMS residual per contour (all its observations in fitted views)
    contour_used: torch.Tensor  #: [m] bool, False for rejected / too-short contours
    view_fitted: torch.Tensor  #: [n] bool, False for views left out of the fit (too few contours)
    observation_used: torch.Tensor  #: [m, n] bool
    rms_residual_px: float
    axis_deg: float  #: global axis angle
    tilt_offset_deg: float  #: mean of (refined - nominal) tilt over the views
    specimen_x_tilt_deg: float  #: slope of the specimen plane along y (not applied: rot_x stays 0)
    rounds: int
    history: list = field(default_factory=list)


def _model(params: dict, tilts0: torch.Tensor, options: FitOptions, i0: int):
    axis = params["axis"] + (params["daxis"] if options.refine_axis_per_view else 0.0)
    tilt = tilts0 + params["offset"] + (params["dtilt"] if options.refine_tilt_per_view else 0.0)
    rot = projection_rotations(axis * torch.ones_like(tilt), tilt)  # float64, differentiable
    if options.refine_magnification:
        mask = torch.ones_like(params["logmag"])
        mask[i0] = 0.0
        mag = torch.exp(params["logmag"] * mask)
    else:
        mag = torch.ones_like(tilt)
    return axis * torch.ones_like(tilt), tilt, rot, mag


def _predict(rot, mag, points, shifts):
    return mag[None, :, None] * torch.einsum("nij,mj->mni", rot[:, :2, :], points) + shifts[None]


def _solve_linear(rot, mag, obs, weight):
    """Exact weighted least squares for all points and shifts with the view geometry fixed.

    The points are eliminated per contour (3 x 3 blocks, Schur complement) and the reduced
    ``2n x 2n`` system for the shifts is solved with a tiny ridge: the 3-D translation gauge
    (``p - t``, ``s + m·R·t``) is left at its minimum-norm choice."""
    a = mag[:, None, None] * rot[:, :2, :]  # [n, 2, 3]
    x = torch.nan_to_num(obs)
    m, n = weight.shape
    h = torch.einsum("mn,nki,nkj->mij", weight, a, a) + 1e-9 * torch.eye(3, dtype=a.dtype)  # [m, 3, 3]
    h_inv = torch.linalg.inv(h)
    b = torch.einsum("mn,nki,mnk->mi", weight, a, x)  # [m, 3]
    wa = (weight[:, :, None, None] * a[None]).reshape(m, 2 * n, 3)  # [m, 2n, 3]
    g = torch.bmm(wa, h_inv)  # [m, 2n, 3]
    coupling = g.transpose(0, 1).reshape(2 * n, 3 * m) @ wa.transpose(0, 1).reshape(2 * n, 3 * m).T
    lhs = torch.diag_embed(weight.sum(0)[:, None].expand(n, 2).reshape(-1)) - coupling
    rhs = (weight[..., None] * x).sum(0) - torch.bmm(g, b[:, :, None])[..., 0].sum(0).reshape(n, 2)
    scale = float(lhs.diagonal().abs().max().clamp_min(1.0))
    shifts = torch.linalg.solve(lhs + 1e-9 * scale * torch.eye(2 * n, dtype=a.dtype), rhs.reshape(-1)).reshape(n, 2)
    points = torch.einsum("mij,mj->mi", h_inv, b - torch.bmm(wa.transpose(1, 2), shifts.reshape(1, 2 * n, 1)
                                                              .expand(m, -1, -1))[..., 0])
    return points, shifts


def _robust_bound(values: torch.Tensor, k: float, floor: float) -> float:
    med = values.median()
    mad = (values - med).abs().median()
    return max(float(med + k * 1.4826 * mad), floor)


def fit_projection_model(positions_px: torch.Tensor, tilt_angles_deg, tilt_axis_deg: float, shifts_px: torch.Tensor,
                         options: FitOptions = FitOptions(), zero_index: int | None = None,
                         tilt_offset_deg: float | None = None) -> FitResult:
    """Fit the projection model to contours ``positions_px [m, n, 2]`` (NaN where not tracked),
    starting from the nominal tilts and ``tilt_axis_deg`` (``shifts_px [n, 2]``, the coarse
    shifts, are not needed by the solver: points and shifts are solved exactly for each geometry).
    The tilt-angle offset (a gauge) is ``tilt_offset_deg`` when given, else the levelling offset
    of the fitted points when ``options.refine_tilt_offset``, else 0."""
    obs = positions_px.to(torch.float64)
    m, n, _ = obs.shape
    tilts0 = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts0.numel() != n:
        raise ValueError(f"fit_projection_model: {n} views in the contours but {tilts0.numel()} tilt angles")
    seen = ~torch.isnan(obs[..., 0])
    used_contour, fitted = _usable(seen, options, "after tracking")
    i0 = _reference_view(tilts0, fitted, zero_index)
    params = {
        "axis": torch.tensor(float(tilt_axis_deg), dtype=torch.float64),
        "daxis": torch.zeros(n, dtype=torch.float64),
        "offset": torch.tensor(float(tilt_offset_deg or 0.0), dtype=torch.float64),
        "dtilt": torch.zeros(n, dtype=torch.float64),
        "logmag": torch.zeros(n, dtype=torch.float64),
    }
    weight = (seen & used_contour[:, None] & fitted[None]).to(torch.float64)
    history = []
    rounds = 0
    for rounds in range(1, options.max_rounds + 1):
        points, shifts = _lbfgs(params, obs, weight, tilts0, options, i0)
        with torch.no_grad():
            _, _, rot, mag = _model(params, tilts0, options, i0)
            residual = (_predict(rot, mag, points, shifts) - obs).norm(dim=-1)  # NaN where not seen
        if not bool(torch.isfinite(points).all() and torch.isfinite(shifts).all()):
            raise AlignmentError("the projection-model fit diverged (non-finite parameters)")
        used = weight > 0
        obs_bound = _robust_bound(residual[used], options.outlier_mad_factor, options.min_outlier_px)
        contour_rms = _contour_rms(residual, seen & fitted[None])
        contour_bound = _robust_bound(contour_rms[used_contour], options.outlier_mad_factor, options.min_outlier_px)
        history.append({"round": rounds, "rms_px": float(residual[used].square().mean().sqrt()),
                        "observations": int(used.sum()), "contours": int(used_contour.sum()),
                        "observation_bound_px": obs_bound, "contour_bound_px": contour_bound})
        kept = seen & (used_contour & (contour_rms <= contour_bound))[:, None] & (residual <= obs_bound)
        used_contour, fitted = _usable(kept & fitted[None], options, f"after outlier rejection (round {rounds})")
        new_weight = (kept & used_contour[:, None] & fitted[None]).to(torch.float64)
        changed = bool((new_weight != weight).any())
        weight = new_weight
        i0 = _reference_view(tilts0, fitted, zero_index)
        if not changed:
            break
    else:
        points, shifts = _lbfgs(params, obs, weight, tilts0, options, i0)
    x_tilt_deg = 0.0
    with torch.no_grad():
        if tilt_offset_deg is None and options.refine_tilt_offset:
            offset_deg, x_tilt_deg = level_specimen(points, used_contour)
            params["offset"] = params["offset"] + offset_deg
        else:
            x_tilt_deg = level_specimen(points, used_contour)[1]
        axis, tilt, rot, mag = _model(params, tilts0, options, i0)
        points, shifts = _solve_linear(rot, mag, obs, weight)
        points, shifts = _fix_origin(rot, mag, points, shifts, weight, i0)
        residual = (_predict(rot, mag, points, shifts) - obs).norm(dim=-1)
    used = weight > 0
    sq = torch.where(used, residual.square(), torch.zeros_like(residual))
    residual_view = torch.where(fitted, torch.sqrt(sq.sum(0) / used.sum(0).clamp_min(1)),
                                torch.full_like(sq[0], math.nan))
    residual_contour = _contour_rms(residual, seen & fitted[None])
    rms = float(torch.sqrt(sq.sum() / used.sum()))
    if not math.isfinite(rms) or rms > options.max_residual_px:
        raise AlignmentError(f"the projection-model fit failed: RMS residual {rms:.2f} px > {options.max_residual_px}"
                             f" px with {int(used_contour.sum())} contours (the contours do not follow one rigid "
                             f"specimen; check the tilt angles, the tilt-axis angle and the images)")
    points = torch.where(used_contour[:, None], points, torch.full_like(points, math.nan))
    return FitResult(rot_z_deg=axis, tilt_deg=tilt, shifts_px=shifts, magnification=mag, points_px=points,
                     residual_view_px=residual_view, residual_contour_px=residual_contour,
                     contour_used=used_contour, view_fitted=fitted, observation_used=used, rms_residual_px=rms,
                     axis_deg=float(params["axis"]), tilt_offset_deg=float((tilt - tilts0).mean()),
                     specimen_x_tilt_deg=x_tilt_deg, rounds=rounds, history=history)


def usable_contours(seen: torch.Tensor, options: FitOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Contours with at least ``min_views_per_contour`` views and views with at least
    ``min_contours_per_view`` such contours (``[m]``, ``[n]`` bool) in the observation mask
    ``seen [m, n]``, pruned together until stable."""
    views = torch.ones(seen.shape[1], dtype=torch.bool)
    while True:
        contours = (seen & views[None]).sum(1) >= options.min_views_per_contour
        new_views = views & ((seen & contours[:, None]).sum(0) >= options.min_contours_per_view)
        if bool((new_views == views).all()):
            return contours, views
        views = new_views


def _usable(seen: torch.Tensor, options: FitOptions, when: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`usable_contours`; raises :class:`AlignmentError` when fewer than ``min_contours``
    contours or ``min_views_fitted`` views are left."""
    contours, views = usable_contours(seen, options)
    count = int(contours.sum())
    if count < options.min_contours:
        raise AlignmentError(f"too few contours {when}: {count} with at least {options.min_views_per_contour} views "
                             f"(need {options.min_contours}); the patches could not be tracked between views")
    if int(views.sum()) < options.min_views_fitted:
        raise AlignmentError(f"only {int(views.sum())} views have {options.min_contours_per_view} or more tracked "
                             f"contours {when} (need {options.min_views_fitted}); the views could not be tracked")
    return contours, views


def _contour_rms(residual: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """RMS over each contour's ``observed`` views of ``residual [m, n]`` (NaN for none)."""
    sq = torch.where(observed, residual.square(), torch.zeros_like(residual)).sum(1)
    count = observed.sum(1)
    return torch.where(count > 0, torch.sqrt(sq / count.clamp_min(1)), torch.full_like(sq, math.nan))


def _reference_view(tilts0: torch.Tensor, fitted: torch.Tensor, zero_index: int | None) -> int:
    """The view whose magnification is 1 and shift 0: ``zero_index`` (default the smallest tilt) if it is
    fitted, else the fitted view of smallest tilt."""
    if zero_index is not None and bool(fitted[zero_index]):
        return int(zero_index)
    return int(torch.argmin(torch.where(fitted, tilts0.abs(), torch.full_like(tilts0, math.inf))))


def _lbfgs(params, obs, weight, tilts0, options: FitOptions, i0: int):
    """Minimise the weighted squared residual over the enabled geometry parameters, the points and
    shifts being solved exactly for each geometry (variable projection: by the envelope theorem
    the gradient with the linear solution held fixed is the gradient of the reduced objective)."""
    names = [name for name, on in (("axis", options.refine_axis),
                                   ("daxis", options.refine_axis_per_view),
                                   ("dtilt", options.refine_tilt_per_view),
                                   ("logmag", options.refine_magnification)) if on]
    variables = {name: params[name].clone().requires_grad_(True) for name in names}
    target = torch.nan_to_num(obs)
    total = weight.sum().clamp_min(1.0)

    def objective():
        current = {**params, **variables}
        _, _, rot, mag = _model(current, tilts0, options, i0)
        with torch.no_grad():
            points, shifts = _solve_linear(rot, mag, obs, weight)
        r2 = (_predict(rot, mag, points, shifts) - target).square().sum(-1)
        loss = (weight * r2).sum() / total
        prior = torch.zeros((), dtype=torch.float64)
        if "daxis" in variables:
            prior = prior + (variables["daxis"] / options.axis_prior_sd_deg).square().sum()
        if "dtilt" in variables:
            prior = prior + (variables["dtilt"] / options.tilt_prior_sd_deg).square().sum()
        if "logmag" in variables:
            prior = prior + (variables["logmag"] / options.magnification_prior_sd).square().sum()
        return loss + prior / total, points, shifts

    if names:
        optimiser = torch.optim.LBFGS(list(variables.values()), lr=1.0, max_iter=options.max_iterations,
                                      tolerance_grad=1e-8, tolerance_change=1e-12, history_size=30,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = objective()[0]
            loss.backward()
            return loss

        optimiser.step(closure)
        for name in names:
            params[name] = variables[name].detach()
    with torch.no_grad():
        _, points, shifts = objective()
    return points, shifts


def level_specimen(points: torch.Tensor, used: torch.Tensor) -> tuple[float, float]:
    """Tilt-angle offset to add that makes the contour points level. A common offset of all tilts
    is the same as rotating the specimen about the tilt axis (``Ry(θ+Δ)·p = Ry(θ)·Ry(Δ)·p``), so
    the projections cannot give it; as IMOD tiltalign does, it is chosen so that the least-squares
    plane of the points ``used``, ``z = αx + βy + c``, has no slope along x: ``Δ = -atan(α)``.
    Also returns the slope along y as an angle (the x-axis tilt that would level it, reported,
    not applied). The points' mid-plane is the specimen's only when they sample the slab well."""
    p = points[used]
    design = torch.stack([p[:, 0], p[:, 1], torch.ones_like(p[:, 0])], -1)
    alpha, beta, _ = torch.linalg.lstsq(design, p[:, 2:3]).solution[:, 0].tolist()
    return -math.degrees(math.atan(alpha)), math.degrees(math.atan(beta))


def _fix_origin(rot, mag, points, shifts, weight, i0: int):
    """Translate the tomogram origin (no projection changes): z at the points' mean height, x and y
    such that the zero-tilt view's shift is 0."""
    used = weight.sum(1) > 0
    t = torch.zeros(3, dtype=torch.float64)
    t[2] = points[used, 2].mean()
    # s_i0 + m·[R p_shift]: choose (tx, ty) so that s_i0 + m R (t) = 0 with t_z fixed
    a = mag[i0] * rot[i0, :2, :]
    rhs = -(shifts[i0] + a[:, 2] * t[2])
    t[:2] = torch.linalg.solve(a[:, :2], rhs)
    # translation p -> p - t keeps x = mR(p - t) + (s + mRt)
    new_shifts = shifts + mag[:, None] * (rot[:, :2, :] @ t)
    return points - t, new_shifts


def _as_f64(value) -> torch.Tensor:
    """A float64 tensor copy of a tensor, array or list (read-only arrays accepted)."""
    return torch.tensor(value.tolist() if hasattr(value, "tolist") else value, dtype=torch.float64)


def projected_shift_error_px(rot_z_deg, tilt_deg, shifts_px, magnification, true_shifts_px) -> dict:
    """Gauge-free error of fitted specimen shifts against the truth, in px.

    An alignment is defined up to a 3-D translation ``t`` of the tomogram origin (it adds
    ``m_i·[R_i t]_xy`` to every shift). The translation that best matches the truth is removed by
    least squares (with the estimated geometry) and the RMS over views of the remaining 2-D shift
    differences is returned as ``rms_px`` (with ``max_px`` and the translation ``origin_px``)."""
    rot = projection_rotations(_as_f64(rot_z_deg),
                               _as_f64(tilt_deg))
    mag = _as_f64(magnification).reshape(-1)
    a = mag[:, None, None] * rot[:, :2, :]  # [n, 2, 3]
    diff = (_as_f64(true_shifts_px) - _as_f64(shifts_px))
    t = torch.linalg.lstsq(a.reshape(-1, 3), diff.reshape(-1, 1)).solution[:, 0]
    remaining = diff - a @ t
    norms = remaining.norm(dim=-1)
    return {"rms_px": float(norms.square().mean().sqrt()), "max_px": float(norms.max()), "origin_px": t.tolist()}


@dataclass
class TransmissionFit:
    tilt_offset_deg: float  #: Δ: the slab is normal to the beam at nominal tilt −Δ (tilt = nominal + Δ)
    offset_se_deg: float  #: standard error of Δ (joint fit of log I_0, τ and Δ)
    thickness_mfp: float  #: τ = t / λ, the slab thickness in mean free paths
    thickness_se_mfp: float  #: standard error of τ
    log_intensity_0: float  #: log of the intensity per unit dose the slab would transmit at zero thickness
    rms_log_residual: float  #: RMS misfit of log(intensity)


def transmission_tilt_offset(tilt_angles_deg, mean_intensity, dose_e_per_A2=None, max_offset_deg: float = 20.0,
                             max_rms_log_residual: float = 0.05, min_significance: float = 10.0,
                             max_thickness_mfp: float = 3.0) -> TransmissionFit:
    """Tilt-angle offset from the mean intensity of the views per unit dose (Beer–Lambert,
    zero-loss or elastic transmission of a slab of uniform thickness t):
    ``log(I_i / D_i) = log I_0 − τ / cos(θ_i + Δ)``, ``τ = t/λ``; the beam crosses the least ice when
    it is normal to the slab, so ``Δ`` is the offset to add to the nominal tilts ``θ_i`` for the slab
    to be level at tilt 0. ``D_i`` is the view's dose (``dose_e_per_A2``; None: the same for every
    view). For each Δ on a grid (0.05°) ``(log I_0, τ)`` are a linear least-squares fit; the best Δ is
    refined by a parabola through its neighbours, and the standard errors come from the Jacobian of
    all three parameters.

    The fit must explain the data, else :class:`AlignmentError` says why: positive intensities
    (not density-scaled images) and doses, at least 5 views, a minimum inside the search range, an
    RMS misfit at most ``max_rms_log_residual``, an attenuation τ significant (``τ / SE(τ) >=
    min_significance``: flat intensities, e.g. unfiltered data or a dose that is not known per view,
    carry no offset) and physically plausible (``τ <= max_thickness_mfp``)."""
    theta = _as_f64(tilt_angles_deg).reshape(-1)
    intensity = _as_f64(mean_intensity).reshape(-1)
    if theta.numel() != intensity.numel():
        raise ValueError(f"transmission_tilt_offset: {theta.numel()} tilt angles but {intensity.numel()} intensities")
    if theta.numel() < 5:
        raise AlignmentError(f"the transmission fit needs at least 5 views ({theta.numel()} given)")
    if not bool(torch.isfinite(intensity).all()) or float(intensity.min()) <= 0:
        raise AlignmentError("the transmission fit needs positive mean intensities (images of counts or electrons, "
                             f"not density-scaled ones); the smallest is {float(intensity.min()):.4g}")
    if dose_e_per_A2 is not None:
        dose = _as_f64(dose_e_per_A2).reshape(-1)
        if dose.numel() != theta.numel() or not bool(torch.isfinite(dose).all()) or float(dose.min()) <= 0:
            raise AlignmentError(f"the transmission fit needs a positive dose for each of the {theta.numel()} views, "
                                 f"got {dose.tolist()}")
        intensity = intensity / dose
    log_i = torch.log(intensity)

    def misfit(delta_deg: torch.Tensor):
        u = 1.0 / torch.cos(torch.deg2rad(theta[None, :] + delta_deg[:, None]))  # [k, n]
        design = torch.stack([torch.ones_like(u), -u], -1)  # [k, n, 2]
        solution = torch.linalg.lstsq(design, log_i[None, :, None].expand(delta_deg.numel(), -1, 1)).solution
        residual = (design @ solution)[..., 0] - log_i[None]
        return residual.square().sum(1), solution[..., 0]

    step = 0.05
    grid = torch.arange(-max_offset_deg, max_offset_deg + step / 2, step, dtype=torch.float64)
    grid = grid[(theta.abs().max() + grid.abs()) < 89.0]
    sse, _ = misfit(grid)
    k = int(torch.argmin(sse))
    if k == 0 or k == grid.numel() - 1:
        raise AlignmentError(f"the transmission fit has no minimum within ±{max_offset_deg} deg of the nominal tilts "
                             f"(best at {float(grid[k]):+.2f} deg)")
    a, b, c = float(sse[k - 1]), float(sse[k]), float(sse[k + 1])
    delta = float(grid[k]) + step * float(parabolic_offset(-a, -b, -c))  # vertex of the minimum
    best_sse, best = misfit(torch.tensor([delta], dtype=torch.float64))
    log_i0, tau = float(best[0, 0]), float(best[0, 1])
    rms = math.sqrt(float(best_sse[0]) / theta.numel())
    # Jacobian of log I = log I0 - tau / cos(theta + delta) in (log I0, tau, delta [rad])
    angle = torch.deg2rad(theta + delta)
    jacobian = torch.stack([torch.ones_like(angle), -1.0 / torch.cos(angle),
                            -tau * torch.sin(angle) / torch.cos(angle).square()], -1)
    covariance = float(best_sse[0]) / max(theta.numel() - 3, 1) * torch.linalg.pinv(jacobian.T @ jacobian)
    tau_se = math.sqrt(max(float(covariance[1, 1]), 0.0))
    delta_se = math.degrees(math.sqrt(max(float(covariance[2, 2]), 0.0)))
    if rms > max_rms_log_residual:
        raise AlignmentError(f"the mean intensities do not follow the slab transmission law (RMS misfit of "
                             f"log intensity {rms:.3g} > {max_rms_log_residual})")
    if tau <= min_significance * tau_se:
        raise AlignmentError(f"the mean intensity per dose does not fall significantly with tilt (tau = {tau:.3g} "
                             f"± {tau_se:.2g}, need tau > {min_significance} SE): no transmission signal")
    if tau > max_thickness_mfp:
        raise AlignmentError(f"the transmission fit gives a slab of {tau:.3g} mean free paths (> {max_thickness_mfp}): "
                             "not a plausible specimen")
    return TransmissionFit(delta, delta_se, tau, tau_se, log_i0, rms)
