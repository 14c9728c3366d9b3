"""Seed step "imod - preprocess tilt series": bin the tilt series (any factor >= 1, antialiased by
Fourier cropping) and adjust their densities (the seed: scaled to a common mean 0 and SD 1), as
IMOD newstack does for Scipion's imod plugin (:mod:`tomopipe.algorithms.normalize`).

Every view is processed, excluded views included (flags kept). Per tilt series one new float32
MRC stack ``TS.mrc``, and its even/odd halves when the input has them (processed the same way,
each half scaled on its own, as the plugin runs newstack on each). The output acquisition of every
tilt series gets the new ``pixel_size_A`` (old x the actual binning ``crop / n_new`` along x, see
:func:`tomopipe.algorithms.normalize.binned_geometry`) and ``image_size_px``; alignment shifts are
in Å and need no change. Items get the new paths and sections; all other columns are copied.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from tomopipe.algorithms.normalize import DENSITY_MODES, bin_image, binned_geometry, scale_densities
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError
from tomopipe.io.mrc import write_mrc
from tomopipe.model.sets import TILT_SERIES
from tomopipe.steps._tilt_series import (
    HALF_COLUMNS,
    TiltSeriesResult,
    TiltSeriesTask,
    View,
    merge_views,
    read_views,
    tilt_series_tasks,
)
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")


def _process(images: np.ndarray, views: tuple[View, ...], column: str, params: dict, device) -> np.ndarray:
    out = []
    for index, view in enumerate(views):
        image = torch.from_numpy(images[index]).to(device)
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise InputFileError(view.path(column), f"section {view.image_section} (tilt_index {view.tilt_index}) "
                                                    f"has NaN or infinite values")
        binned = bin_image(image, params["binning"])
        try:
            scaled = scale_densities(binned, params["density_mode"], params["mean"], params["sd"])
        except ValueError as error:
            raise InputFileError(view.path(column), f"section {view.image_section} (tilt_index "
                                                    f"{view.tilt_index}): {error}") from None
        out.append(scaled.to(torch.float32).cpu().numpy())
    return np.stack(out)


def preprocess_tilt_series(task: TiltSeriesTask) -> TiltSeriesResult:
    """Bin and scale every view of one tilt series; write the new stack(s)."""
    ts_id = task.ts_id
    folder = Path(task.folder)
    params = task.params
    acquisition = task.acquisition
    device = compute_device(task.device)
    views = task.views
    nx, ny = (int(v) for v in acquisition["image_size_px"])
    geometry = binned_geometry((ny, nx), params["binning"])
    pixel_size_A = float(acquisition["pixel_size_A"]) * geometry["pixel_factor"][1]
    files = {}
    for column in ("image_path", *(HALF_COLUMNS if task.has_halves else ())):
        images = read_views(views, column, acquisition["image_size_px"])
        stack = _process(images, views, column, params, device)
        del images
        suffix = "" if column == "image_path" else "_" + column.split("_")[1]
        files[column] = str(folder / f"{ts_id}{suffix}.mrc")
        write_mrc(files[column], stack, pixel_size_A, stack=True)
    new_ny, new_nx = geometry["new_shape"]
    log.info("%s: %d views, %d x %d px -> %d x %d px, %.4f A/px", ts_id, len(views), nx, ny, new_nx, new_ny,
             pixel_size_A)
    return TiltSeriesResult(ts_id, tuple({"tilt_index": v.tilt_index, "image_section": i} for i, v in enumerate(views)),
                            files, {"pixel_size_A": pixel_size_A,
                                    "pixel_size_y_A": float(acquisition["pixel_size_A"]) * geometry["pixel_factor"][0],
                                    "image_size_px": [int(new_nx), int(new_ny)]})


@register
class Preprocess(Step):
    type_name = "preprocess"
    title = "imod - preprocess tilt series"
    description = ("Bin the tilt series by any factor (antialiased: Fourier cropping) and adjust their densities "
                   "(scaled to a common mean and standard deviation, shifted to a common mean, or unchanged).")
    params = (
        Param("binning", "float", "binning factor (>= 1, need not be an integer)", default=1.0, min=1),
        Param("density_mode", "str", "adjust densities: none, scaled_mean_sd (to the mean and SD below, every "
                                     "view) or shifted_mean (to the mean below, not scaled)",
              default="scaled_mean_sd", choices=DENSITY_MODES),
        Param("mean", "float", "mean of every view after scaling (scaled_mean_sd, shifted_mean)", default=0.0),
        Param("sd", "float", "standard deviation of every view after scaling (scaled_mean_sd)", default=1.0,
              min=1e-12),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", TILT_SERIES.name, "tilt series (e.g. after the X-ray eraser)"),)
    outputs = (Port("tilt_series", TILT_SERIES.name, "binned, density-scaled tilt series: one float32 MRC stack each"),)

    def run(self, ctx):
        items, tasks = tilt_series_tasks(ctx, "tilt_series")
        for task in tasks:
            nx, ny = (int(v) for v in task.acquisition["image_size_px"])
            if min(nx, ny) / ctx.params["binning"] < 2:
                ctx.fail(f"binning {ctx.params['binning']} leaves less than 2 pixels of the {nx} x {ny} px images of "
                         f"{task.ts_id}")
        results = ctx.map(preprocess_tilt_series, tasks, desc="preprocess")
        out = merge_views(ctx, items, results, file_columns=("image_path", *HALF_COLUMNS), drop=HALF_COLUMNS)
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        for result in results:
            acquisition = attrs["tilt_series"][result.ts_id]
            acquisition["pixel_size_A"] = result.summary["pixel_size_A"]
            acquisition["image_size_px"] = result.summary["image_size_px"]
        attrs["preprocess"] = {"binning": ctx.params["binning"], "density_mode": ctx.params["density_mode"],
                               "mean": ctx.params["mean"], "sd": ctx.params["sd"]}
        ctx.add_output("tilt_series", out, attrs)
        return {"tilt_series": len(results), "tilts": len(out),
                "pixel_size_A": sorted({round(r.summary["pixel_size_A"], 6) for r in results}),
                "image_size_px": [list(s) for s in sorted({tuple(r.summary["image_size_px"]) for r in results})]}
