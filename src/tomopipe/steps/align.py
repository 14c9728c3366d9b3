"""Seed step "imod - teamtomo/batchruntomo" (fiducial-less alignment): coarse cross-correlation,
patch tracking and a robust fit of the projection model, then rounds of depth-focused point
tracking and fitting (:func:`tomopipe.algorithms.align.align_images`).

Only enabled views are used; excluded views keep NaN alignment columns. The output set points to
the same images with the alignment as metadata (the seed's "+ali", not applied), RELION 5
semantics: ``rot_z_deg`` (tilt axis), ``rot_y_deg`` (refined tilt), ``rot_x_deg`` (0),
``shift_x_A, shift_y_A`` (specimen shifts: image position of the tomogram origin from the image
centre ``N//2``), ``magnification`` (image scale relative to the zero-tilt view) and
``align_residual_px`` (RMS residual of the view's contour points).

Tilt-angle offset (a gauge of the projection model, set by the specimen; see
:mod:`tomopipe.algorithms.align_fit`), by ``tilt_offset_method``:

* "transmission": fitted to the mean intensities per unit dose (``dose_e_per_A2``) of the views
  of the ``intensity_reference`` input — the same acquisition before density scaling, e.g. the
  X-ray-erased tilt series — with :func:`~tomopipe.algorithms.align_fit.transmission_tilt_offset`
  (the slab transmits most when it is normal to the beam), which refuses intensities that the
  slab law does not explain (flat, unfiltered, a misfit, an implausible thickness); also refused
  when the mean free path it implies with the layer thickness of the quick tomogram is outside
  1000–30000 Å.
* "tomogram": the tilt of the specimen layer in a quick tomogram made with the alignment
  (:func:`~tomopipe.algorithms.align_offset.layer_tilt_offset`, as IMOD's tomopitch), which does
  not use intensities.
* "specimen": levelling the points of the patch contours (only as good as they sample the slab).
* "auto" (default): the first of these that works.

The run summary says which method gave the offset (``tilt_offset_method``) and its standard error
(``tilt_offset_uncertainty_deg``; NaN for "specimen"), and why the others were not used.

Views that patch tracking leaves without enough contours are aligned by whole-view
cross-correlation (:func:`~tomopipe.algorithms.align.fill_untracked_views`); the column
``align_view_method`` says "contours" or "cross-correlation" per view (``align_residual_px`` is NaN
for the latter), and the summary lists them.

Per tilt series, in the run folder: ``TS.xf`` / ``TS.tlt`` / ``TS.xtilt`` for the stack of the
enabled views in tilt order (``.xf`` via :func:`geometry.xf_from_alignment` with magnification
``1/m`` so that it maps raw to aligned), ``TS_contours.csv`` (per contour of both stages: stage,
views, residual, used, 3-D point in Å) and when asked ``TS_ali.mrc``: the enabled views
interpolated (bicubic) at ``interpolated_binning`` with the tilt axis along Y, x and y of the
frame swapped when the axis is nearer the raw x axis (``aligned_image_path`` /
``aligned_image_section`` columns). A tilt series that cannot be aligned (too few contours, a fit
that diverges or leaves large residuals) fails the step with the reason; nothing is written for it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.align import AlignOptions, align_images, aligned_frame_size, aligned_views
from tomopipe.algorithms.align_fit import AlignmentError, FitOptions, transmission_tilt_offset
from tomopipe.algorithms.align_offset import layer_tilt_offset, with_tilt_offset
from tomopipe.algorithms.geometry import xf_from_alignment
from tomopipe.algorithms.normalize import bin_image, binned_geometry
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import write_tlt, write_xf
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.model.sets import TILT_SERIES
from tomopipe.steps._tilt_series import (
    TiltSeriesResult,
    TiltSeriesTask,
    View,
    check_same_acquisition,
    merge_views,
    read_views,
    tilt_series_tasks,
    views_of,
)
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

OFFSET_METHODS = ("auto", "transmission", "tomogram", "specimen")
MEAN_FREE_PATH_RANGE_A = (1000.0, 30000.0)  #: plausible attenuation lengths (inelastic or aperture) of ice


def fit_options(params: dict) -> FitOptions:
    return FitOptions(refine_axis=params["refine_tilt_axis"], refine_axis_per_view=params["refine_tilt_axis_per_view"],
                      refine_tilt_offset=params["refine_tilt_offset"],
                      refine_tilt_per_view=params["refine_tilt_angles"],
                      refine_magnification=params["refine_magnification"],
                      outlier_mad_factor=params["outlier_mad_factor"], min_contours=params["min_contours"],
                      max_residual_px=params["max_residual_px"])


def align_options(params: dict, pixel_size_A: float) -> AlignOptions:
    return AlignOptions(patch_size_px=int(round(params["patch_size_A"] / pixel_size_A)),
                        patch_overlap=params["patch_overlap_percent"] / 100.0, fit=fit_options(params),
                        points=params["point_tracking"],
                        point_window_px=int(round(params["point_window_A"] / pixel_size_A)),
                        point_count=params["point_count"], point_rounds=params["point_rounds"])


def interpolate_aligned(images: torch.Tensor, rot_z_deg, shifts_px, magnification, binning: float) -> torch.Tensor:
    """Aligned views at ``binning``: ``aligned(X) = raw(m·R2(rot_z)·X + s)`` about the centres
    ``N//2`` (tilt axis along +Y), after antialiased binning of the raw views; the frame is the
    binned raw frame, x and y swapped when the axis is nearer the raw x axis."""
    binned = torch.stack([bin_image(im.to(torch.float64), binning) for im in images]).to(torch.float32)
    factor = images.shape[-1] / binned.shape[-1]  # raw px per binned px along x (the actual binning)
    rot = torch.as_tensor(rot_z_deg, dtype=torch.float64)
    size = aligned_frame_size((binned.shape[-1], binned.shape[-2]), float(rot.mean()))
    views, _ = aligned_views(binned, rot, torch.as_tensor(shifts_px, dtype=torch.float64) / factor, magnification,
                             size)
    return views


@dataclass(frozen=True)
class AlignTask(TiltSeriesTask):
    """A tilt series to align; ``intensity_views``: the same views in the ``intensity_reference``
    set (with ``dose_e_per_A2`` in their values), when that input is given."""

    intensity_views: tuple[View, ...] | None = None


def mean_intensities(views: list[View]) -> np.ndarray:
    """Mean value (float64) of each view's section ``image_path``/``image_section``, read section by section."""
    opened: dict[str, np.ndarray] = {}
    means = []
    for view in views:
        path = view.image_path
        if path not in opened:
            opened[path] = read_mrc(path, mmap=True)[0]
        data = opened[path]
        section = view.image_section
        if data.ndim != 3 or section >= data.shape[0]:
            raise InputFileError(path, f"has no section {section} (tilt_index {view.tilt_index})")
        means.append(float(np.asarray(data[section], dtype=np.float64).mean()))
    return np.asarray(means)


def _transmission(tilts: torch.Tensor, intensity_views: list[View] | None, thickness_A: float | None) -> dict:
    """The transmission offset of the views (``offset_deg``, ``uncertainty_deg`` and the fit), or
    ``error``: why the intensities do not give one."""
    if intensity_views is None:
        return {"error": "no intensity_reference input"}
    doses = [v.values.get("dose_e_per_A2") for v in intensity_views]
    if any(d is None or not np.isfinite(d) for d in doses):
        return {"error": "the intensity_reference set has no per-view dose (dose_e_per_A2): exposure and "
                         "transmission cannot be told apart"}
    try:
        fit = transmission_tilt_offset(tilts, mean_intensities(intensity_views), np.asarray(doses, dtype=float))
    except AlignmentError as error:
        return {"error": str(error)}
    found = {"offset_deg": fit.tilt_offset_deg, "uncertainty_deg": fit.offset_se_deg,
             "thickness_mfp": fit.thickness_mfp, "thickness_se_mfp": fit.thickness_se_mfp,
             "rms_log_residual": fit.rms_log_residual}
    if thickness_A is not None:
        found["mean_free_path_A"] = thickness_A / fit.thickness_mfp
        low, high = MEAN_FREE_PATH_RANGE_A
        if not low <= found["mean_free_path_A"] <= high:
            return {"error": f"the transmission fit implies a mean free path of {found['mean_free_path_A']:.0f} A "
                             f"with the layer of {thickness_A:.0f} A in the quick tomogram (plausible: {low:.0f}-"
                             f"{high:.0f} A)"}
    return found


def _tilt_offset(ts_id: str, params: dict, raw: torch.Tensor, fit, tilts: torch.Tensor,
                 intensity_views: list[View] | None, pixel_size_A: float) -> dict:
    """How the tilt-angle offset is found (see the module docstring): ``method``, ``offset_deg``,
    ``uncertainty_deg`` and what each method tried said."""
    if not params["refine_tilt_offset"]:
        return {"method": "none (nominal tilts)", "offset_deg": fit.tilt_offset_deg, "uncertainty_deg": math.nan}
    method = params["tilt_offset_method"]
    tried: dict = {}
    layer = None
    if method in ("auto", "tomogram", "transmission"):
        try:
            layer = layer_tilt_offset(raw, fit)
            tried["tomogram"] = {"offset_deg": layer.tilt_offset_deg, "uncertainty_deg": layer.uncertainty_deg,
                                 "thickness_A": layer.thickness_px * pixel_size_A, "columns": layer.columns}
        except AlignmentError as error:
            tried["tomogram"] = {"error": str(error)}
    if method in ("auto", "transmission"):
        tried["transmission"] = _transmission(tilts, intensity_views, None if layer is None
                                              else layer.thickness_px * pixel_size_A)
    order = {"auto": ("transmission", "tomogram"), "transmission": ("transmission",), "tomogram": ("tomogram",),
             "specimen": ()}[method]
    for name in order:
        if "error" not in tried[name]:
            return {"method": name, "offset_deg": tried[name]["offset_deg"],
                    "uncertainty_deg": tried[name]["uncertainty_deg"], "tried": tried}
    if method in ("transmission", "tomogram"):
        raise TomopipeError(f"{ts_id}: tilt-angle offset from the {method} failed: {tried[method]['error']}")
    if tried:
        log.warning("%s: tilt-angle offset: %s; levelling the contour points instead", ts_id,
                    "; ".join(f"{k}: {v['error']}" for k, v in tried.items()))
    return {"method": "specimen", "offset_deg": fit.tilt_offset_deg, "uncertainty_deg": math.nan, "tried": tried}


def _contour_table(stage: str, positions: torch.Tensor, fit, pixel_size_A: float) -> pd.DataFrame:
    seen = ~torch.isnan(positions[..., 0])
    points_A = fit.points_px * pixel_size_A
    return pd.DataFrame({"stage": stage, "contour": np.arange(seen.shape[0]), "views": seen.sum(1).numpy(),
                         "residual_px": fit.residual_contour_px.numpy(), "used": fit.contour_used.numpy(),
                         "x_A": points_A[:, 0].numpy(), "y_A": points_A[:, 1].numpy(), "z_A": points_A[:, 2].numpy()})


def align_tilt_series(task: AlignTask) -> TiltSeriesResult:
    """Align one tilt series (enabled views) and write its IMOD files (and the aligned stack)."""
    ts_id, params = task.ts_id, task.params
    folder = Path(task.folder)
    acquisition = task.acquisition
    device = compute_device(task.device)
    views = [v for v in task.views if v.values["enabled"]]
    if len(views) < 5:
        raise TomopipeError(f"{ts_id}: {len(views)} enabled views; at least 5 are needed to align a tilt series")
    views.sort(key=lambda v: v.values["tilt_angle_deg"])
    pixel_size_A = float(acquisition["pixel_size_A"])
    axis = acquisition.get("tilt_axis_angle_deg")
    if axis is None or not np.isfinite(float(axis)):
        raise TomopipeError(f"{ts_id}: the tilt series has no tilt-axis angle (tilt_axis_angle_deg in its "
                            "acquisition); set it at import (import_movies tilt_axis_angle_deg)")
    tilts = torch.tensor([v.values["tilt_angle_deg"] for v in views], dtype=torch.float64)
    intensity_views = None
    if task.intensity_views is not None:
        by_index = {v.tilt_index: v for v in task.intensity_views}
        intensity_views = [by_index[v.tilt_index] for v in views]
    raw = torch.from_numpy(read_views(views, "image_path", acquisition["image_size_px"]).astype(np.float32)).to(device)
    try:
        result = align_images(raw, tilts, float(axis), align_options(params, pixel_size_A),
                              tilt_offset_deg=None if params["refine_tilt_offset"] else 0.0)
    except (AlignmentError, ValueError) as error:
        raise TomopipeError(f"{ts_id}: alignment failed: {error}") from None
    offset = _tilt_offset(ts_id, params, raw, result.fit, tilts, intensity_views, pixel_size_A)
    fit = with_tilt_offset(result.fit, offset["offset_deg"])
    shifts_A = fit.shifts_px * pixel_size_A
    methods = result.view_method
    per_view = [{"tilt_index": v.tilt_index, "rot_z_deg": float(fit.rot_z_deg[i]), "rot_y_deg": float(fit.tilt_deg[i]),
                 "rot_x_deg": 0.0, "shift_x_A": float(shifts_A[i, 0]), "shift_y_A": float(shifts_A[i, 1]),
                 "magnification": float(fit.magnification[i]), "align_residual_px": float(fit.residual_view_px[i]),
                 "align_view_method": methods[i]}
                for i, v in enumerate(views)]
    files = {"xf": folder / f"{ts_id}.xf", "tlt": folder / f"{ts_id}.tlt", "xtilt": folder / f"{ts_id}.xtilt",
             "contours": folder / f"{ts_id}_contours.csv"}
    a, d = xf_from_alignment(fit.rot_z_deg, fit.shifts_px, 1.0 / fit.magnification)
    write_xf(files["xf"], a, d)
    write_tlt(files["tlt"], fit.tilt_deg)
    write_tlt(files["xtilt"], torch.zeros_like(fit.tilt_deg))
    tables = [_contour_table("patch", result.patches.positions_px, result.patch_fit, pixel_size_A)]
    if result.stage == "points":
        tables.append(_contour_table("point", result.points.positions_px, fit, pixel_size_A))
    write_text_atomic(files["contours"], pd.concat(tables, ignore_index=True).to_csv(index=False, float_format="%.4f"))
    if params["interpolated_stack"]:
        binning = params["interpolated_binning"]
        aligned = interpolate_aligned(raw, fit.rot_z_deg, fit.shifts_px, fit.magnification, binning)
        geometry = binned_geometry(tuple(raw.shape[-2:]), binning)
        files["aligned_image_path"] = folder / f"{ts_id}_ali.mrc"
        write_mrc(files["aligned_image_path"], aligned.cpu().numpy(), pixel_size_A * geometry["pixel_factor"][1],
                  stack=True)
        for i, view in enumerate(per_view):
            view["aligned_image_section"] = i
    contours = int(result.patches.positions_px.shape[0]) + (int(result.points.positions_px.shape[0])
                                                            if result.stage == "points" else 0)
    used = int(result.patch_fit.contour_used.sum()) + (int(fit.contour_used.sum()) if result.stage == "points" else 0)
    log.info("%s: %d views, %s stage%s, %d/%d contours, RMS residual %.3f px, axis %.2f deg, tilt offset %.2f deg "
             "(%s)", ts_id, len(views), result.stage, f" ({result.note})" if result.note else "", used, contours,
             fit.rms_residual_px, fit.axis_deg, fit.tilt_offset_deg, offset["method"])
    return TiltSeriesResult(ts_id, tuple(per_view), {k: str(v) for k, v in files.items()}, {
            "rms_residual_px": fit.rms_residual_px, "axis_deg": fit.axis_deg, "tilt_offset_deg": fit.tilt_offset_deg,
            "tilt_offset": {k: v for k, v in offset.items() if k != "offset_deg"},
            "patch_size_px": result.patches.patch_size_px,
            "views_cross_correlation": [v["tilt_index"] for v in per_view
                                        if v["align_view_method"] == "cross-correlation"],
            "stage": result.stage, "note": result.note, "point_rounds": len(result.rounds),
            "patch_axis_deg": result.patch_fit.axis_deg, "contours": contours, "contours_used": used,
            "specimen_x_tilt_deg": fit.specimen_x_tilt_deg})


@register
class AlignTiltSeries(Step):
    type_name = "align_tilt_series"
    title = "imod - teamtomo/batchruntomo"
    version = 2
    description = ("Fiducial-less alignment as IMOD does it: coarse cross-correlation with cosine stretching from "
                   "the zero tilt, patch tracking, and a robust fit of the projection model (shifts, tilt axis, tilt "
                   "offset and per-view tilts, magnifications) with outlier contours rejected; then rounds of "
                   "specimen points tracked against depth-focused references and fitted the same way.")
    params = (
        Param("patch_size_A", "float", "side of the tracked patches (Å)", default=500.0, min=1),
        Param("patch_overlap_percent", "float", "overlap of neighbouring patches (%)", default=80.0, min=0, max=95),
        Param("refine_tilt_axis", "bool", "refine the tilt-axis angle (one for all views)", default=True),
        Param("refine_tilt_axis_per_view", "bool", "refine per-view deviations of the tilt axis", default=False),
        Param("refine_tilt_offset", "bool", "refine a tilt-angle offset (see tilt_offset_method)", default=True),
        Param("tilt_offset_method", "str", "how the tilt-angle offset is found: transmission (mean intensities per "
                                           "dose of the intensity_reference input), tomogram (tilt of the specimen "
                                           "layer in a quick tomogram), specimen (level the contour points) or auto "
                                           "(the first of these that works)",
              default="auto", choices=OFFSET_METHODS),
        Param("refine_tilt_angles", "bool", "refine per-view tilt angles", default=False),
        Param("refine_magnification", "bool", "refine per-view magnifications", default=True),
        Param("outlier_mad_factor", "float", "contours / points with residual > median + k·1.4826·MAD are rejected",
              default=4.0, min=1),
        Param("min_contours", "int", "fewest usable contours for a valid alignment", default=10, min=3),
        Param("max_residual_px", "float", "RMS residual (px) above which the alignment is declared failed",
              default=2.0, min=0.01),
        Param("point_tracking", "bool", "second stage: track specimen points against depth-focused references",
              default=True),
        Param("point_window_A", "float", "side of the point-tracking windows (Å)", default=250.0, min=1),
        Param("point_count", "int", "most specimen points tracked", default=150, min=10),
        Param("point_rounds", "int", "most rounds of point tracking and fitting", default=3, min=1),
        Param("interpolated_stack", "bool", "also write the interpolated aligned stack (tilt axis along Y)",
              default=False),
        Param("interpolated_binning", "float", "binning of the interpolated stack", default=1.0, min=1),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", TILT_SERIES.name, "tilt series (e.g. preprocessed, binned)"),
              Port("intensity_reference", TILT_SERIES.name, "the same acquisition before density scaling (e.g. X-ray "
                                                         "erased): mean intensities for the tilt-angle offset",
                   optional=True))
    outputs = (Port("tilt_series", TILT_SERIES.name, "the same images with the alignment columns"),)

    def run(self, ctx):
        if ctx.params["tilt_offset_method"] == "transmission" and ctx.params["refine_tilt_offset"] \
                and "intensity_reference" not in ctx.inputs:
            ctx.fail("tilt_offset_method = 'transmission' needs the 'intensity_reference' input")
        items, tasks = tilt_series_tasks(ctx, "tilt_series", AlignTask)
        reference = self._intensity_reference(ctx, items) if "intensity_reference" in ctx.inputs else {}
        tasks = [replace(task, intensity_views=reference.get(task.ts_id)) for task in tasks]
        results = ctx.map(align_tilt_series, tasks, desc="align")
        out = merge_views(ctx, items, results, file_columns=("aligned_image_path",),
                          drop=("aligned_image_path", "aligned_image_section"))
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        attrs["alignment"] = {r.ts_id: {"xf_path": ctx.stored_path(r.files["xf"]),
                                        "tlt_path": ctx.stored_path(r.files["tlt"]),
                                        "xtilt_path": ctx.stored_path(r.files["xtilt"]),
                                        "contours_path": ctx.stored_path(r.files["contours"]),
                                        "rms_residual_px": r.summary["rms_residual_px"],
                                        "tilt_axis_deg": r.summary["axis_deg"],
                                        "tilt_offset_deg": r.summary["tilt_offset_deg"],
                                        "tilt_offset": r.summary["tilt_offset"],
                                        "stage": r.summary["stage"], "note": r.summary["note"]} for r in results}
        ctx.add_output("tilt_series", out, attrs)
        return {"tilt_series": len(results),
                "rms_residual_px": {r.ts_id: r.summary["rms_residual_px"] for r in results},
                "tilt_axis_deg": {r.ts_id: r.summary["axis_deg"] for r in results},
                "tilt_offset_deg": {r.ts_id: r.summary["tilt_offset_deg"] for r in results},
                "tilt_offset_method": {r.ts_id: r.summary["tilt_offset"]["method"] for r in results},
                "tilt_offset_uncertainty_deg": {r.ts_id: r.summary["tilt_offset"]["uncertainty_deg"] for r in results},
                "patch_size_px": {r.ts_id: r.summary["patch_size_px"] for r in results},
                "views_cross_correlation": {r.ts_id: r.summary["views_cross_correlation"] for r in results},
                "stage": {r.ts_id: r.summary["stage"] + (f" ({r.summary['note']})" if r.summary["note"] else "")
                          for r in results},
                "contours_used": {r.ts_id: f"{r.summary['contours_used']}/{r.summary['contours']}" for r in results},
                "residual_per_view_px": {r.ts_id: [None if math.isnan(v["align_residual_px"])
                                                   else round(v["align_residual_px"], 3) for v in r.views]
                                         for r in results}}

    @staticmethod
    def _intensity_reference(ctx, items: pd.DataFrame) -> dict:
        """Per tilt series, the views of the ``intensity_reference`` set (absolute paths), checked to be
        the same acquisition as the input."""
        reference = ctx.input_items("intensity_reference", enabled_only=False)
        for column in ("ts_id", "tilt_index", "image_path", "image_section"):
            if column not in reference.columns:
                ctx.fail(f"the 'intensity_reference' set has no {column!r} column: not a tilt-series set")
        ref_acqs = ctx.input_attrs("intensity_reference").get("tilt_series", {})
        acqs = ctx.input_attrs("tilt_series").get("tilt_series", {})
        out = {}
        for ts_id, group in items.groupby("ts_id", sort=True):
            ref = reference[reference["ts_id"] == ts_id].sort_values("tilt_index")
            if ref.empty or ts_id not in ref_acqs:
                ctx.fail(f"tilt series {ts_id!r} is not in the 'intensity_reference' set")
            problems = check_same_acquisition(ts_id, ref, group.sort_values("tilt_index"), ref_acqs[ts_id],
                                              acqs.get(ts_id, {}), 0.05)
            if problems:
                ctx.fail(f"tilt series {ts_id!r}: the 'intensity_reference' set is not the same acquisition: "
                         + "; ".join(problems))
            out[ts_id] = views_of(ctx, ref)
        return out
