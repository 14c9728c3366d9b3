"""Seed step "imod - teamtomo/batchruntomo" (fiducial-less alignment): coarse cross-correlation,
patch tracking and a robust fit of the projection model (:mod:`tomopipe.algorithms.align`,
:mod:`tomopipe.algorithms.align_fit`).

Only enabled views are used; excluded views keep NaN alignment columns. The output set points to
the same images with the alignment as metadata (the seed's "+ali", not applied), RELION 5
semantics: ``rot_z_deg`` (tilt axis), ``rot_y_deg`` (refined tilt), ``rot_x_deg`` (0),
``shift_x_A, shift_y_A`` (specimen shifts: image position of the tomogram origin from the image
centre ``N//2``), ``magnification`` (image scale relative to the zero-tilt view) and
``align_residual_px`` (RMS residual of the view's contour points). Per tilt series, in the run
folder: ``TS.xf`` / ``TS.tlt`` / ``TS.xtilt`` for the stack of the enabled views in tilt order
(``.xf`` via :func:`geometry.xf_from_alignment` with magnification ``1/m`` so that it maps raw to
aligned), ``TS_contours.csv`` (per contour: views, residual, used, 3-D point in Å), and when asked
``TS_ali.mrc``: the enabled views interpolated (bicubic) at ``interpolated_binning`` with the
tilt axis along Y (``aligned_image_path`` / ``aligned_image_section`` columns).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.align import bandpass_images, coarse_align, track_patches, _sample
from tomopipe.algorithms.align_fit import AlignmentError, FitOptions, fit_projection_model
from tomopipe.algorithms.geometry import fft_centre, rotation_2d, xf_from_alignment
from tomopipe.algorithms.normalize import bin_image, binned_geometry
from tomopipe.errors import TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import write_tlt, write_xf
from tomopipe.io.mrc import write_mrc
from tomopipe.steps.base import DEVICE_PARAM, Param, Port, Step, compute_device, register
from tomopipe.steps.xray_eraser import read_views, tilt_series_tasks

log = logging.getLogger("tomopipe")

ALIGNMENT_COLUMNS = ("rot_z_deg", "rot_y_deg", "rot_x_deg", "shift_x_A", "shift_y_A", "magnification",
                     "align_residual_px")


def fit_options(params: dict) -> FitOptions:
    return FitOptions(refine_axis=params["refine_tilt_axis"], refine_axis_per_view=params["refine_tilt_axis_per_view"],
                      refine_tilt_offset=params["refine_tilt_offset"],
                      refine_tilt_per_view=params["refine_tilt_angles"],
                      refine_magnification=params["refine_magnification"],
                      outlier_mad_factor=params["outlier_mad_factor"], min_contours=params["min_contours"],
                      max_residual_px=params["max_residual_px"])


def interpolate_aligned(images: torch.Tensor, rot_z_deg, shifts_px, magnification, binning: float) -> torch.Tensor:
    """Aligned views ``[n, ny', nx']`` at ``binning``: ``aligned(X) = raw(m·R2(rot_z)·X + s)`` about the
    centres ``N//2`` (tilt axis along +Y), after antialiased binning of the raw views."""
    binned = torch.stack([bin_image(im.to(torch.float64), binning) for im in images]).to(torch.float32)
    n, ny, nx = binned.shape
    factor = images.shape[-1] / nx  # raw px per binned px along x (the actual binning)
    c = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij")
    rel = torch.stack([xx, yy], -1) - c
    a = torch.as_tensor(magnification, dtype=torch.float64)[:, None, None] * rotation_2d(
        torch.as_tensor(rot_z_deg, dtype=torch.float64))
    coords = c + torch.einsum("nij,yxj->nyxi", a, rel) + torch.as_tensor(shifts_px, dtype=torch.float64)[:, None, None] / factor
    return _sample(binned, coords.to(binned.device))


def align_tilt_series(task: dict) -> dict:
    """Align one tilt series (enabled views) and write its IMOD files (and the aligned stack)."""
    ts_id, params = task["ts_id"], task["params"]
    folder = Path(task["folder"])
    acquisition = task["acquisition"]
    device = compute_device(params["device"])
    views = [v for v in task["views"] if v["enabled"]]
    if len(views) < 5:
        raise TomopipeError(f"{ts_id}: {len(views)} enabled views; at least 5 are needed to align a tilt series")
    views.sort(key=lambda v: v["tilt_angle_deg"])
    pixel_size_A = float(acquisition["pixel_size_A"])
    axis_deg = float(acquisition.get("tilt_axis_angle_deg") or 0.0)
    tilts = torch.tensor([v["tilt_angle_deg"] for v in views], dtype=torch.float64)
    raw = torch.from_numpy(read_views(views, "image_path", acquisition["image_size_px"]).astype(np.float32)).to(device)
    patch_px = int(round(params["patch_size_A"] / pixel_size_A))
    try:
        filtered = bandpass_images(raw)
        coarse = coarse_align(filtered, tilts, axis_deg)
        tracks = track_patches(filtered, tilts, axis_deg, coarse.shifts_px, patch_px,
                               params["patch_overlap_percent"] / 100.0)
        fit = fit_projection_model(tracks.positions_px, tilts, axis_deg, coarse.shifts_px, fit_options(params))
    except (AlignmentError, ValueError) as error:
        raise TomopipeError(f"{ts_id}: alignment failed: {error}") from None
    shifts_A = fit.shifts_px * pixel_size_A
    per_view = [{"tilt_index": v["tilt_index"], "rot_z_deg": float(fit.rot_z_deg[i]), "rot_y_deg": float(fit.tilt_deg[i]),
                 "rot_x_deg": 0.0, "shift_x_A": float(shifts_A[i, 0]), "shift_y_A": float(shifts_A[i, 1]),
                 "magnification": float(fit.magnification[i]), "align_residual_px": float(fit.residual_view_px[i])}
                for i, v in enumerate(views)]
    files = {"xf": folder / f"{ts_id}.xf", "tlt": folder / f"{ts_id}.tlt", "xtilt": folder / f"{ts_id}.xtilt",
             "contours": folder / f"{ts_id}_contours.csv"}
    a, d = xf_from_alignment(fit.rot_z_deg, fit.shifts_px, 1.0 / fit.magnification)
    write_xf(files["xf"], a, d)
    write_tlt(files["tlt"], fit.tilt_deg)
    write_tlt(files["xtilt"], torch.zeros_like(fit.tilt_deg))
    seen = ~torch.isnan(tracks.positions_px[..., 0])
    points_A = fit.points_px * pixel_size_A
    table = pd.DataFrame({"contour": np.arange(seen.shape[0]), "views": seen.sum(1).numpy(),
                          "residual_px": fit.residual_contour_px.numpy(), "used": fit.contour_used.numpy(),
                          "x_A": points_A[:, 0].numpy(), "y_A": points_A[:, 1].numpy(), "z_A": points_A[:, 2].numpy()})
    write_text_atomic(files["contours"], table.to_csv(index=False, float_format="%.4f"))
    if params["interpolated_stack"]:
        binning = params["interpolated_binning"]
        aligned = interpolate_aligned(raw, fit.rot_z_deg, fit.shifts_px, fit.magnification, binning)
        geometry = binned_geometry(tuple(raw.shape[-2:]), binning)
        files["aligned"] = folder / f"{ts_id}_ali.mrc"
        write_mrc(files["aligned"], aligned.cpu().numpy(), pixel_size_A * geometry["pixel_factor"][1], stack=True)
        for i, view in enumerate(per_view):
            view["aligned_image_section"] = i
    log.info("%s: %d views, %d/%d contours, RMS residual %.3f px, axis %.2f deg, tilt offset %.2f deg", ts_id,
             len(views), int(fit.contour_used.sum()), seen.shape[0], fit.rms_residual_px, fit.axis_deg,
             fit.tilt_offset_deg)
    return {"ts_id": ts_id, "views": per_view, "files": {k: str(v) for k, v in files.items()},
            "rms_residual_px": fit.rms_residual_px, "axis_deg": fit.axis_deg, "tilt_offset_deg": fit.tilt_offset_deg,
            "contours": int(seen.shape[0]), "contours_used": int(fit.contour_used.sum()),
            "specimen_x_tilt_deg": fit.specimen_x_tilt_deg}


@register
class AlignTiltSeries(Step):
    type_name = "align_tilt_series"
    title = "imod - teamtomo/batchruntomo"
    description = ("Fiducial-less alignment as IMOD does it: coarse cross-correlation with cosine stretching from "
                   "the zero tilt, patch tracking, and a robust fit of the projection model (shifts, tilt axis, tilt "
                   "offset and per-view tilts, magnifications) with outlier contours rejected.")
    params = (
        Param("patch_size_A", "float", "side of the tracked patches (Å)", default=500.0, min=1),
        Param("patch_overlap_percent", "float", "overlap of neighbouring patches (%)", default=80.0, min=0, max=95),
        Param("refine_tilt_axis", "bool", "refine the tilt-axis angle (one for all views)", default=True),
        Param("refine_tilt_axis_per_view", "bool", "refine per-view deviations of the tilt axis", default=False),
        Param("refine_tilt_offset", "bool", "refine a tilt-angle offset (specimen levelled along x)", default=True),
        Param("refine_tilt_angles", "bool", "refine per-view tilt angles", default=True),
        Param("refine_magnification", "bool", "refine per-view magnifications", default=True),
        Param("outlier_mad_factor", "float", "contours / points with residual > median + k·1.4826·MAD are rejected",
              default=4.0, min=1),
        Param("min_contours", "int", "fewest usable contours for a valid alignment", default=10, min=3),
        Param("max_residual_px", "float", "RMS residual (px) above which the alignment is declared failed",
              default=2.0, min=0.01),
        Param("interpolated_stack", "bool", "also write the interpolated aligned stack (tilt axis along Y)",
              default=False),
        Param("interpolated_binning", "float", "binning of the interpolated stack", default=1.0, min=1),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", "tilt_series", "tilt series (e.g. preprocessed, binned)"),)
    outputs = (Port("tilt_series", "tilt_series", "the same images with the alignment columns"),)

    def run(self, ctx):
        items, tasks = tilt_series_tasks(ctx, "tilt_series", {"params": ctx.params})
        for task in tasks:
            group = items[items["ts_id"] == task["ts_id"]].set_index("tilt_index")
            for view in task["views"]:
                view["enabled"] = bool(group.loc[view["tilt_index"], "enabled"])
                view["tilt_angle_deg"] = float(group.loc[view["tilt_index"], "tilt_angle_deg"])
        results = ctx.map(align_tilt_series, tasks, desc="align")
        tables = []
        for result in results:
            group = items[items["ts_id"] == result["ts_id"]]
            group = group.drop(columns=[c for c in (*ALIGNMENT_COLUMNS, "aligned_image_path", "aligned_image_section")
                                        if c in group.columns])
            group = group.merge(pd.DataFrame(result["views"]), on="tilt_index", how="left", validate="one_to_one")
            if "aligned" in result["files"]:
                group["aligned_image_path"] = [ctx.stored_path(result["files"]["aligned"]) if isinstance(e, (bool, np.bool_)) and e
                                               else None for e in group["enabled"]]
            tables.append(group)
        out = pd.concat(tables, ignore_index=True)
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        attrs["alignment"] = {r["ts_id"]: {"xf_path": ctx.stored_path(r["files"]["xf"]),
                                           "tlt_path": ctx.stored_path(r["files"]["tlt"]),
                                           "xtilt_path": ctx.stored_path(r["files"]["xtilt"]),
                                           "contours_path": ctx.stored_path(r["files"]["contours"]),
                                           "rms_residual_px": r["rms_residual_px"], "tilt_axis_deg": r["axis_deg"],
                                           "tilt_offset_deg": r["tilt_offset_deg"]} for r in results}
        ctx.add_output("tilt_series", out, attrs)
        return {"tilt_series": len(results),
                "rms_residual_px": {r["ts_id"]: r["rms_residual_px"] for r in results},
                "tilt_axis_deg": {r["ts_id"]: r["axis_deg"] for r in results},
                "tilt_offset_deg": {r["ts_id"]: r["tilt_offset_deg"] for r in results},
                "contours_used": {r["ts_id"]: f"{r['contours_used']}/{r['contours']}" for r in results},
                "residual_per_view_px": {r["ts_id"]: [round(v["align_residual_px"], 3) for v in r["views"]]
                                         for r in results}}
