"""The per-tilt-series fit: pass-1 search, pass-2 backgrounds, hand, shared astigmatism, consistency,
and the per-tilt outputs (convention of the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf import enforce_ctffind_convention
from tomopipe.algorithms.ctf_estimate.background import fit_background_envelope, smooth_log_background
from tomopipe.algorithms.ctf_estimate.consistency import enforce_consistency
from tomopipe.algorithms.ctf_estimate.diagnostic import diagnostic_spectrum
from tomopipe.algorithms.ctf_estimate.handedness import (
    HandDecision,
    HandednessEvidence,
    decide_hand,
    handedness_evidence,
)
from tomopipe.algorithms.ctf_estimate.resolution import fit_resolution_A
from tomopipe.algorithms.ctf_estimate.search import (
    CtfFit,
    LocalTables,
    local_defocus,
    model_fit_table,
    refine_fit,
    search_defocus,
    series_astigmatism,
)
from tomopipe.algorithms.ctf_estimate.setup import (
    F64,
    FIT_RESOLUTION_THRESHOLD,
    CtfEstimationError,
    Setup,
    make_setup,
    validate_images,
    validate_inputs,
)
from tomopipe.algorithms.ctf_estimate.spectra import (
    TiltSpectra,
    WhitenedRows,
    group_by_depth,
    prepare_tilt,
    specimen_plane_depth_A,
    whiten,
)

_PHASE_GRID_DEG = tuple(range(0, 180, 15))


@dataclass
class TiltSeriesCtf:
    """CTF of every tilt of a series (per-tilt tensors ``[n]`` float32 unless stated).

    Defocus in Å, underfocus positive, U ≥ V, angle in (−90, 90] from +x toward +y.
    """

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    phase_shift_deg: torch.Tensor  # 0 unless fit_phase
    fit_resolution_A: torch.Tensor
    fit_score: torch.Tensor  # normalised cross-correlation in the fit range
    refit: torch.Tensor  # bool: changed by the tilt-series consistency stage
    power_spectra: torch.Tensor  # [n, w, w] diagnostic, DC at w//2: left half observed, right half model
    defocus_grid_A: torch.Tensor  # [n, gy, gx] mean defocus at the centres of a gy × gx grid of cells
    handedness: HandDecision


@dataclass
class _SeriesFit:
    """Fits of every tilt with the hand used, and what the per-tilt outputs need."""

    tilts: list[TiltSpectra]
    fits: list[CtfFit]
    refit: list[bool]
    rows_of: list[WhitenedRows]  # per tilt, whitened by the pass-2 background
    snr_of: list[torch.Tensor]  # SNR weight in the fit range per tilt
    hand_used: int
    source: str
    evidence: HandednessEvidence


def _axes_per_tilt(tilt_axis_angle_deg, n: int) -> torch.Tensor:
    axes = torch.as_tensor(tilt_axis_angle_deg, dtype=F64).reshape(-1)
    if axes.numel() == 1:
        axes = axes.expand(n)
    if axes.numel() != n:
        raise CtfEstimationError(f"tilt_axis_angle_deg needs 1 or {n} values, got {axes.numel()}")
    return axes


def _max_depth_offset_A(image_shape, pixel_size_A: float, axes: torch.Tensor, tilt_list) -> float:
    """Largest |z_P| at the image corners over the series: how far the table must reach."""
    h, w = image_shape
    corners = torch.tensor([[-w / 2, -h / 2], [w / 2, -h / 2], [-w / 2, h / 2], [w / 2, h / 2]],
                           dtype=F64) * pixel_size_A
    return float(specimen_plane_depth_A(corners, axes, torch.tensor(tilt_list, dtype=F64)).abs().max())


@dataclass(frozen=True)
class CtfSeriesPlan:
    """What a tilt series' estimation needs before its images: the fit's setup, the tilt angles (°), the tilt
    axis per tilt (°), the images' ``(h, w)`` (px) and the windows' overlap. With it the images can be
    streamed: :func:`tilt_spectra` reduces each image (or movie) to its window spectra as it comes, and
    :func:`fit_tilt_series_ctf` fits the series from those alone."""

    setup: Setup
    tilt_angles_deg: tuple[float, ...]
    axes_deg: torch.Tensor
    image_shape: tuple[int, int]
    overlap: float


def plan_tilt_series_ctf(image_shape, pixel_size_A: float, tilt_angles_deg, tilt_axis_angle_deg, voltage_kV: float,
                         cs_mm: float, amplitude_contrast: float, window_px: int = 512,
                         resolution_range_A=(30.0, 7.0), defocus_range_A=(5000.0, 80000.0), defocus_grid=(2, 2),
                         hand="auto", *, overlap: float = 0.5) -> CtfSeriesPlan:
    """The plan of an estimation (:func:`estimate_tilt_series_ctf` for the arguments) of images of
    ``image_shape`` ``(h, w)`` px, one per tilt angle; the settings are checked here."""
    tilt_list = [float(a) for a in torch.as_tensor(tilt_angles_deg, dtype=F64).reshape(-1)]
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    validate_inputs(len(tilt_list), image_shape, pixel_size_A, tilt_list, window_px, resolution_range_A,
                    defocus_range_A, defocus_grid, hand, amplitude_contrast)
    axes = _axes_per_tilt(tilt_axis_angle_deg, len(tilt_list))
    setup = make_setup(pixel_size_A, window_px, voltage_kV, cs_mm, amplitude_contrast, resolution_range_A,
                       defocus_range_A, _max_depth_offset_A(image_shape, pixel_size_A, axes, tilt_list))
    return CtfSeriesPlan(setup, tuple(tilt_list), axes, image_shape, float(overlap))


def tilt_spectra(plan: CtfSeriesPlan, index: int, image: torch.Tensor) -> TiltSpectra:
    """Tilt ``index``'s window spectra (``image`` ``[h, w]``, or ``[frames, h, w]``: frame periodograms
    summed), grouped by depth, with the pass-1 background and a flat SNR weight. Small: the image can
    be dropped once this is made."""
    angle = plan.tilt_angles_deg[index]
    if tuple(image.shape[-2:]) != plan.image_shape:
        raise CtfEstimationError(f"image {index} (tilt {angle:g}°) is {tuple(image.shape[-2:])} px, the plan's "
                                 f"images {plan.image_shape}")
    if not bool(torch.isfinite(image).all()):
        raise CtfEstimationError(f"image {index} (tilt {angle:g}°) contains NaN or infinite values")
    setup = plan.setup
    tilt = prepare_tilt(image, angle, float(plan.axes_deg[index]), setup, plan.overlap)
    tilt.groups = group_by_depth(tilt, setup)
    tilt.bg = smooth_log_background(tilt.profiles.mean((0, 1)), setup.k,
                                    local_range_per_A=(0.8 * setup.k_low, 1.25 * setup.k_high))
    tilt.snr = torch.ones_like(setup.k)
    return tilt


def _refit_backgrounds(tilts: list[TiltSpectra], setup: Setup, hand: int, phases_deg) -> None:
    """Pass 1 (unweighted model, ``hand``), then the pass-2 background and SNR envelope of every
    tilt from its pass-1 model (kept from pass 1 where the envelope is not significant)."""
    lo, hi = setup.search_lo, setup.search_hi
    pass_one = [search_defocus(whiten(t.groups, t, setup), setup, t.snr[setup.fit], hand, lo, hi, phases_deg)
                for t in tilts]
    for tilt, fit in zip(tilts, pass_one):
        background = fit_background_envelope(tilt, setup, hand, fit)
        if background is not None:
            tilt.bg, tilt.snr = background


def _fit_series(tilts, tilt_list, setup: Setup, hand, fit_phase: bool, astigmatism_per_tilt: bool) -> _SeriesFit:
    """Pass 2: both hands searched, the hand decided, fits refined, one astigmatism for the series
    (unless ``astigmatism_per_tilt``), and the tilt-series consistency stage."""
    lo, hi = setup.search_lo, setup.search_hi
    phases = _PHASE_GRID_DEG if fit_phase else (0.0,)
    _refit_backgrounds(tilts, setup, -1 if hand == "auto" else int(hand), phases)
    rows_of = [whiten(t.groups, t, setup) for t in tilts]
    snr_of = [t.snr[setup.fit] for t in tilts]
    starts = {hd: [search_defocus(r, setup, s, hd, lo, hi, phases) for r, s in zip(rows_of, snr_of)]
              for hd in (-1, 1)}
    evidence = handedness_evidence(tilt_list, [f.score for f in starts[-1]], [f.score for f in starts[1]])
    hand_used, source = decide_hand(hand, evidence)
    fits = [refine_fit(r, setup, s, hand_used, st, fit_phase) for r, s, st in zip(rows_of, snr_of, starts[hand_used])]
    if astigmatism_per_tilt:  # the consistency stage searches with the median astigmatism
        astig = (float(torch.tensor([f.astig_x_A for f in fits]).median()),
                 float(torch.tensor([f.astig_y_A for f in fits]).median()))
    else:  # one astigmatism for the tilt series, then every defocus again
        tables = [LocalTables(r, setup, s, hand_used, f.defocus_A, 500.0, [f.phase_deg])
                  for r, s, f in zip(rows_of, snr_of, fits)]
        astig = series_astigmatism(tables, fits)
    searched = [search_defocus(r, setup, s, hand_used, lo, hi, phases, astig=astig, return_curve=True)
                for r, s in zip(rows_of, snr_of)]
    if not astigmatism_per_tilt:
        fits = [refine_fit(r, setup, s, hand_used, found[0], fit_phase, fit_astig=False)
                for r, s, found in zip(rows_of, snr_of, searched)]
    curves = torch.stack([found[1] for found in searched])
    sigmas = torch.stack([found[2] for found in searched])
    fits, refit = enforce_consistency(rows_of, fits, curves, sigmas, [found[3] for found in searched], setup, snr_of,
                                      hand_used, fit_phase, tilt_list, astig, refine_astig=astigmatism_per_tilt)
    return _SeriesFit(tilts=tilts, fits=fits, refit=refit, rows_of=rows_of, snr_of=snr_of, hand_used=hand_used,
                      source=source, evidence=evidence)


def _cells(image_shape, grid, centres_px):
    """Per grid cell: (centre (x, y) px, tile selection). Tiles whose centre lies in the cell
    (edges inclusive) belong to it; a cell without any takes the nearest tile(s)."""
    h, w = image_shape
    gy, gx = grid
    out = []
    for iy in range(gy):
        for ix in range(gx):
            x0, x1 = ix * w / gx, (ix + 1) * w / gx
            y0, y1 = iy * h / gy, (iy + 1) * h / gy
            centre = torch.tensor([(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5], dtype=F64)
            inside = ((centres_px[:, 0] >= x0 - 0.5) & (centres_px[:, 0] <= x1 - 0.5)
                      & (centres_px[:, 1] >= y0 - 0.5) & (centres_px[:, 1] <= y1 - 0.5))
            if not bool(inside.any()):
                dist = (centres_px - centre).norm(dim=1)
                inside = dist <= dist.min() + 1e-6
            out.append((centre, inside))
    return out


def _defocus_grid(tilt: TiltSpectra, setup: Setup, snr_fit, hand_used: int, fit: CtfFit, image_shape, grid):
    """Local defocus of each grid cell ``[gy, gx]`` (the cell's windows, offsets (``hand_used``)
    relative to the cell centre), and the gradient evidence: ``(Σ dz·(Δf − mean), Σ dz²)`` of
    defocus values fitted per cell without any depth offset against the cells' mean window depth."""
    h, w = image_shape
    centre_px = torch.tensor([w // 2, h // 2], dtype=F64)
    model = model_fit_table(setup, snr_fit, fit.phase_deg)
    values, measured, depths = [], [], []
    for cell_px, select in _cells((h, w), grid, tilt.centres_A / setup.pixel_size_A + centre_px):
        cell_depth_A = float(specimen_plane_depth_A(((cell_px - centre_px) * setup.pixel_size_A)[None],
                             tilt.axis_deg, tilt.tilt_deg)[0, 0])
        cell_rows = whiten(group_by_depth(tilt, setup, select, depth_ref_A=cell_depth_A), tilt, setup)
        values.append(local_defocus(cell_rows, setup, model, hand_used, fit,
                                    fit.defocus_A + hand_used * cell_depth_A, 2000.0)[0])
        mean_depth_A = float(tilt.depth_A[select].mean())
        plain_rows = whiten(group_by_depth(tilt, setup, select), tilt, setup)
        measured.append(local_defocus(plain_rows, setup, model, 0, fit, fit.defocus_A,
                                      2000.0 + 1.5 * abs(mean_depth_A))[0])
        depths.append(mean_depth_A)
    measured_A, depth_A = torch.tensor(measured, dtype=F64), torch.tensor(depths, dtype=F64)
    dz = depth_A - depth_A.mean()
    slope_terms = (float((dz * (measured_A - measured_A.mean())).sum()), float((dz * dz).sum()))
    return torch.tensor(values, dtype=F64).reshape(grid), slope_terms


def _ctffind_uv_angle(fit: CtfFit) -> tuple[float, float, float]:
    u, v, angle = enforce_ctffind_convention(torch.tensor(fit.defocus_A + fit.half_astig_A, dtype=F64),
                                             torch.tensor(fit.defocus_A - fit.half_astig_A, dtype=F64),
                                             torch.tensor(fit.angle_deg, dtype=F64))
    return float(u), float(v), float(angle)


def _per_tilt_outputs(series: _SeriesFit, setup: Setup, image_shape, grid, threshold: float) -> TiltSeriesCtf:
    uva, resolutions, grids, spectra = [], [], [], []
    slope_num = slope_den = 0.0
    for tilt, fit, snr_fit in zip(series.tilts, series.fits, series.snr_of):
        uva.append(_ctffind_uv_angle(fit))
        resolutions.append(fit_resolution_A(tilt, setup, series.hand_used, fit, threshold))
        cell_defocus, (num, den) = _defocus_grid(tilt, setup, snr_fit, series.hand_used, fit, image_shape, grid)
        grids.append(cell_defocus)
        slope_num += num
        slope_den += den
        spectra.append(diagnostic_spectrum(tilt, setup, series.hand_used, fit))
    f32 = torch.float32
    u, v, angle = (torch.tensor(column, dtype=f32) for column in zip(*uva))
    decision = HandDecision(evidence=series.evidence, hand_used=int(series.hand_used), source=series.source,
                            gradient_slope=slope_num / slope_den if slope_den > 0 else float("nan"))
    return TiltSeriesCtf(
                         defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=angle,
                         phase_shift_deg=torch.tensor([f.phase_deg for f in series.fits], dtype=f32),
                         fit_resolution_A=torch.tensor(resolutions, dtype=f32),
                         fit_score=torch.tensor([f.score for f in series.fits], dtype=f32),
                         refit=torch.tensor(series.refit, dtype=torch.bool), power_spectra=torch.stack(spectra),
                         defocus_grid_A=torch.stack(grids).to(f32), handedness=decision)


def estimate_tilt_series_ctf(images: torch.Tensor, pixel_size_A: float, tilt_angles_deg, tilt_axis_angle_deg,
                             voltage_kV: float, cs_mm: float, amplitude_contrast: float, window_px: int = 512,
                             resolution_range_A=(30.0, 7.0), defocus_range_A=(5000.0, 80000.0),
                             defocus_grid=(2, 2), fit_phase: bool = False, hand="auto", *, overlap: float = 0.5,
                             astigmatism_per_tilt: bool = False,
                             fit_resolution_threshold: float = FIT_RESOLUTION_THRESHOLD) -> TiltSeriesCtf:
    """Tilt-aware CTF estimation of every image of a tilt series (see the package docstring).

    ``images`` ``[n, h, w]`` (or ``[n, frames, h, w]``: frame periodograms are summed — immune to
    drift, but with f frames the Thon rings stand f times weaker above the noise background than
    in the periodogram of the sum; any float dtype, on any device: the FFTs run there);
    ``tilt_angles_deg`` ``[n]``; ``tilt_axis_angle_deg`` scalar or ``[n]`` (RELION ``rlnTomoZRot``,
    from +y CCW, for the arrays as given); ``hand``: −1 / +1 (RELION ``rlnTomoHand``) to fit with
    that handedness, or ``"auto"`` (default) to fit with the one the data clearly support (else −1).
    ``defocus_grid`` ``(gy, gx)``: cells of the local defocus grid.
    """
    validate_images(images)
    plan = plan_tilt_series_ctf((images.shape[-2], images.shape[-1]), pixel_size_A, tilt_angles_deg,
                                tilt_axis_angle_deg, voltage_kV, cs_mm, amplitude_contrast, window_px,
                                resolution_range_A, defocus_range_A, defocus_grid, hand, overlap=overlap)
    if images.shape[0] != len(plan.tilt_angles_deg):
        raise CtfEstimationError(f"{len(plan.tilt_angles_deg)} tilt angles for {images.shape[0]} images")
    tilts = [tilt_spectra(plan, i, images[i]) for i in range(images.shape[0])]
    return fit_tilt_series_ctf(plan, tilts, defocus_grid, fit_phase, hand, astigmatism_per_tilt=astigmatism_per_tilt,
                               fit_resolution_threshold=fit_resolution_threshold)


def fit_tilt_series_ctf(plan: CtfSeriesPlan, tilts: list[TiltSpectra], defocus_grid=(2, 2), fit_phase: bool = False,
                        hand="auto", *, astigmatism_per_tilt: bool = False,
                        fit_resolution_threshold: float = FIT_RESOLUTION_THRESHOLD) -> TiltSeriesCtf:
    """The series' fit from every tilt's :func:`tilt_spectra` (in the plan's tilt order)."""
    if len(tilts) != len(plan.tilt_angles_deg):
        raise CtfEstimationError(f"{len(tilts)} tilts' spectra for {len(plan.tilt_angles_deg)} tilt angles")
    series = _fit_series(tilts, list(plan.tilt_angles_deg), plan.setup, hand, fit_phase, astigmatism_per_tilt)
    grid = tuple(int(g) for g in defocus_grid)
    return _per_tilt_outputs(series, plan.setup, plan.image_shape, grid, fit_resolution_threshold)
