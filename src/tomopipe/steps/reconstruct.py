"""Seed step "imod - reconstruct tomogram": weighted back projection (IMOD radial filter, optional
SIRT-like filter) of every aligned tilt series, straight from its views and alignment columns
(:mod:`tomopipe.algorithms.reconstruct`).

Input: a ``tilt_series`` set with alignment columns (``rot_z_deg, rot_y_deg, shift_x_A,
shift_y_A``; ``rot_x_deg`` and ``magnification`` optional), e.g. from ``align_tilt_series`` or
``assign_alignment``; optionally the ``ctf`` set for phase flipping (with the defocus hand of
each tilt series in its attributes). Nothing is assumed: dose weighting needs the voltage, phase
flipping the voltage, Cs, amplitude contrast and hand, else the step fails. Disabled views and the
tilt indices in ``exclude_tilt_indices`` are left out. Output: one float32 MRC per tilt series,
``TS.mrc`` ``[z, y, x]``: z = thickness with +z toward the electron source, y along the tilt
axis, voxel size = the tilt series' pixel size; the volume is computed slab by slab along y into
a memory-mapped scratch file, so memory stays bounded for large tomograms.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.reconstruct import (
    CtfParams,
    ReconstructionParams,
    filter_tilt_images,
    iter_slabs,
    projection_matrices,
    volume_shape_for,
)
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError
from tomopipe.io.mrc import write_mrc
from tomopipe.model.sets import ALIGNMENT_REQUIRED_NAMES, CTF, DEFOCUS_NAMES, TILT_SERIES, TOMOGRAMS
from tomopipe.steps._tilt_series import (
    TiltSeriesResult,
    TiltSeriesTask,
    acquisition_of,
    ctf_hand,
    read_views,
    views_of,
)
from tomopipe.steps.base import DEVICE_PARAM, compute_device, missing_numbers

log = logging.getLogger("tomopipe")

CTF_ACQUISITION = ("voltage_kV", "spherical_aberration_mm", "amplitude_contrast")


def reconstruction_params(params: dict) -> ReconstructionParams:
    values = {name: params[name] for name in ReconstructionParams.names() if name in params}
    values["memory_budget_bytes"] = int(params.get("memory_budget_mb", 256)) << 20
    return ReconstructionParams(**values)


@dataclass(frozen=True)
class ReconstructTask(TiltSeriesTask):
    """A tilt series to reconstruct: its views to use, with alignment (and CTF) columns in their
    values; ``ctf``: ``defocus_hand`` and ``strip_width_px`` when phase flipping, else None."""

    ctf: dict | None = None


def reconstruct_tilt_series(task: ReconstructTask) -> TiltSeriesResult:
    """Reconstruct one tilt series and write ``TS.mrc``; the summary has its size and voxel size."""
    ts_id = task.ts_id
    acquisition = task.acquisition
    params = reconstruction_params(task.params)
    device = compute_device(task.device)
    views = task.views
    pixel_size_A = float(acquisition["pixel_size_A"])
    images = read_views(views, "image_path", acquisition["image_size_px"])
    images_t = torch.from_numpy(images.astype(np.float32, copy=False)).to(device)
    del images
    for index, view in enumerate(views):
        if not bool(torch.isfinite(images_t[index]).all()):
            raise InputFileError(view.image_path, f"section {view.image_section} (tilt_index {view.tilt_index}) "
                                                  f"has NaN or infinite values")
    col = lambda name: torch.tensor([v.values[name] for v in views], dtype=torch.float64)  # noqa: E731
    rot_z, rot_y, rot_x = col("rot_z_deg"), col("rot_y_deg"), col("rot_x_deg")
    shifts_A = torch.stack([col("shift_x_A"), col("shift_y_A")], dim=1)
    m, t = projection_matrices(rot_z, rot_y, rot_x, shifts_A, pixel_size_A, col("magnification"), params)
    ctf = None
    if task.ctf:
        c = task.ctf
        ctf = CtfParams(col("defocus_u_A"), col("defocus_v_A"), col("defocus_angle_deg"),
                        float(acquisition["voltage_kV"]), float(acquisition["spherical_aberration_mm"]),
                        float(acquisition["amplitude_contrast"]), defocus_hand=int(c["defocus_hand"]),
                        phase_shift_deg=col("phase_shift_deg"), strip_width_px=float(c["strip_width_px"]))
    pre = col("pre_exposure_e_per_A2") if task.params["dose_weighting"] else None
    voltage_kV = float(acquisition["voltage_kV"]) if pre is not None else None
    filtered = filter_tilt_images(images_t, rot_z + params.tilt_axis_offset_deg, rot_y + params.tilt_angle_offset_deg,
                                  pixel_size_A, params.thickness_px, params.radial_cutoff, params.radial_falloff,
                                  params.sirt_like_iterations, pre, voltage_kV, ctf, t)
    del images_t
    shape = volume_shape_for(acquisition["image_size_px"], float(rot_z.mean()) + params.tilt_axis_offset_deg, params)
    folder = Path(task.folder)
    path = folder / f"{ts_id}.mrc"
    scratch = folder / f".{ts_id}.reconstruct-scratch.npy"
    try:
        volume = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=shape)
        for y0, y1, slab in iter_slabs(filtered, m, t, shape, params):
            volume[:, y0:y1] = slab.cpu().numpy()
        volume.flush()
        write_mrc(path, volume, pixel_size_A)
        stats = (float(volume.mean()), float(volume.std()))
        del volume
    finally:
        if scratch.exists():
            os.unlink(scratch)
    log.info("%s: %d views -> %d x %d x %d voxels of %.4f A", ts_id, len(views), shape[2], shape[1], shape[0],
             pixel_size_A)
    return TiltSeriesResult(ts_id, files={"tomogram_path": str(path)},
                            summary={"voxel_size_A": pixel_size_A, "size_x_px": shape[2], "size_y_px": shape[1],
                                     "size_z_px": shape[0], "n_views": len(views), "mean": stats[0], "sd": stats[1]})


@register
class ReconstructTomogram(Step):
    type_name = "reconstruct_tomogram"
    title = "imod - reconstruct tomogram"
    description = ("Weighted back projection of the aligned tilt series (IMOD's radial filter, optional SIRT-like "
                   "filter, super-sampling, dose weighting and CTF phase flipping), straight from the views and "
                   "their alignment; tomograms [z, y, x] with +z toward the source, y along the tilt axis.")
    params = (
        Param("thickness_px", "int", "thickness of the tomogram (voxels of the tilt-series pixel size)", default=128,
              min=1),
        Param("width_px", "int", "width across the tilt axis (0: the image width)", default=0, min=0),
        Param("shift_x_px", "float", "shift of the content toward +x (IMOD SHIFT x)", default=0.0),
        Param("shift_z_px", "float", "shift of the content toward +z, the source (IMOD SHIFT z)", default=0.0),
        Param("tilt_angle_offset_deg", "float", "added to every tilt angle (IMOD OFFSET)", default=0.0),
        Param("tilt_axis_offset_deg", "float", "added to every tilt-axis angle", default=0.0),
        Param("super_sampling", "int", "compute the slices on a grid this many times finer in x and z, then "
                                       "Fourier-crop (IMOD SuperSampleFactor)", default=2, min=1, max=8),
        Param("sirt_like_iterations", "int", "filter equivalent to this many SIRT iterations (0: plain WBP; IMOD "
                                             "FakeSIRTiterations)", default=0, min=0),
        Param("radial_cutoff", "float", "radial filter cutoff, cycles/pixel (IMOD RADIAL)", default=0.35, min=0.001,
              max=0.5),
        Param("radial_falloff", "float", "radial filter Gaussian fall-off (sigma), cycles/pixel", default=0.035,
              min=0),
        Param("exclude_tilt_indices", "list[int]", "tilt indices to leave out, besides disabled views", default=[]),
        Param("dose_weighting", "bool", "weight every view by the exposure filter at its pre-exposure",
              default=False),
        Param("ctf_correction", "str", "none, or phase_flip (needs the ctf input)", default="none",
              choices=("none", "phase_flip")),
        Param("ctf_strip_width_px", "float", "phase-flip in strips this wide parallel to the tilt axis (0: one "
                                             "defocus per view)", default=0.0, min=0),
        Param("memory_budget_mb", "int", "working memory of one slab", default=256, min=16),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", TILT_SERIES.name, "aligned tilt series (alignment columns)"),
              Port("ctf", CTF.name, "CTF estimates, for phase flipping", optional=True))
    outputs = (Port("tomograms", TOMOGRAMS.name, "one MRC volume per tilt series"),)

    def run(self, ctx):
        p = ctx.params
        try:
            reconstruction_params(p)
        except ValueError as error:
            ctx.fail(str(error))
        items = ctx.input_items("tilt_series", enabled_only=False)
        if items.empty:
            ctx.fail("the input set 'tilt_series' has no items")
        missing = [c for c in ("ts_id", "tilt_index", "image_path", "image_section", *ALIGNMENT_REQUIRED_NAMES)
                   if c not in items.columns]
        if missing:
            ctx.fail(f"the input set 'tilt_series' has no column(s) {', '.join(missing)}: the tilt series are not "
                     f"aligned (run align_tilt_series, or assign_alignment from an aligned set, first)")
        items = items.copy()
        if "rot_x_deg" not in items.columns:
            items["rot_x_deg"] = 0.0
        if "magnification" not in items.columns:
            items["magnification"] = 1.0
        items["rot_x_deg"] = items["rot_x_deg"].fillna(0.0)
        items["magnification"] = items["magnification"].fillna(1.0)
        use = items["enabled"].astype(bool) & ~items["tilt_index"].isin(p["exclude_tilt_indices"] or [])
        ctf_table, ctf_info = None, None
        if p["ctf_correction"] == "phase_flip":
            if "ctf" not in ctx.inputs:
                ctx.fail("ctf_correction = 'phase_flip' needs the 'ctf' input (a ctf set)")
            ctf_table = ctx.input_items("ctf", enabled_only=False)
            absent = [c for c in ("ts_id", "tilt_index", *DEFOCUS_NAMES) if c not in ctf_table.columns]
            if absent:
                ctx.fail(f"the input set 'ctf' has no column(s) {', '.join(absent)}")
        tasks = []
        for ts_id, group in items[use].sort_values(["ts_id", "tilt_index"]).groupby("ts_id", sort=True):
            acquisition = acquisition_of(ctx, "tilt_series", ts_id)
            group = group.copy()
            bad = group[list(ALIGNMENT_REQUIRED_NAMES)].isna().any(axis=1)
            if bad.any():
                ctx.fail(f"tilt series {ts_id!r}: enabled views without alignment (tilt_index "
                         f"{group.loc[bad, 'tilt_index'].tolist()}); disable them or align again")
            if p["dose_weighting"] and ("pre_exposure_e_per_A2" not in group
                                        or group["pre_exposure_e_per_A2"].isna().any()):
                ctx.fail(f"tilt series {ts_id!r}: dose_weighting needs pre_exposure_e_per_A2 for every view")
            needed = {**({"voltage_kV": "dose_weighting"} if p["dose_weighting"] else {}),
                      **({name: "phase_flip" for name in CTF_ACQUISITION} if ctf_table is not None else {})}
            missing = missing_numbers(acquisition, needed)
            if missing:
                ctx.fail(f"tilt series {ts_id!r}: the acquisition in the attributes of the input set 'tilt_series' "
                         f"has no {', '.join(f'{name} (needed by {needed[name]})' for name in missing)}")
            if ctf_table is not None:
                est = ctf_table[ctf_table["ts_id"] == ts_id].drop(columns=["ts_id", "enabled", "tilt_angle_deg"],
                                                                  errors="ignore")
                group = group.drop(columns=[c for c in est.columns if c != "tilt_index" and c in group.columns])
                group = group.merge(est, on="tilt_index", how="left")
                if group[list(DEFOCUS_NAMES)].isna().any().any():
                    ctx.fail(f"tilt series {ts_id!r}: views without a CTF estimate (tilt_index "
                             f"{group.loc[group[list(DEFOCUS_NAMES)].isna().any(axis=1), 'tilt_index'].tolist()})")
                if "phase_shift_deg" not in group:
                    group["phase_shift_deg"] = 0.0
                group["phase_shift_deg"] = group["phase_shift_deg"].fillna(0.0)
                ctf_info = {"defocus_hand": ctf_hand(ctx, ts_id), "strip_width_px": p["ctf_strip_width_px"]}
            tasks.append(ReconstructTask(str(ts_id), acquisition, views_of(ctx, group), dict(p), str(ctx.folder),
                                         p["device"], ctf_info))
        if not tasks:
            ctx.fail("no enabled views to reconstruct")
        for task in tasks:
            if len(task.views) < 2:
                ctx.fail(f"tilt series {task.ts_id!r} has {len(task.views)} view(s) left to reconstruct")
        results = ctx.map(reconstruct_tilt_series, tasks, desc="reconstruct")
        out = pd.DataFrame([{"ts_id": r.ts_id, "tomogram_path": ctx.stored_path(r.files["tomogram_path"]),
                             **{k: r.summary[k] for k in ("voxel_size_A", "size_x_px", "size_y_px", "size_z_px")},
                             "enabled": True} for r in results])
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        attrs["reconstruction"] = {name: p[name] for name in p if name != "device"}
        ctx.add_output("tomograms", out, attrs)
        sizes = [r.summary for r in results]
        return {"tomograms": len(results), "views": {r.ts_id: r.summary["n_views"] for r in results},
                "size_xyz_px": sorted({(s["size_x_px"], s["size_y_px"], s["size_z_px"]) for s in sizes}),
                "voxel_size_A": sorted({round(s["voxel_size_A"], 6) for s in sizes})}
