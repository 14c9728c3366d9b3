"""Seed step "imod - Xray eraser": find and replace X-ray hits and hot pixels in every view, in the
manner of IMOD ccderaser -find (:mod:`tomopipe.algorithms.xray`), with the parameters Scipion's
imod plugin passes by default, and one test of tomopipe's own (``shot_noise_probability``): on
images of counts, a patch that Poisson shot noise explains is kept (at a tilt image's one or two
counts per pixel, ccderaser's SD criteria take about 1e-5 of the pixels for X-rays). X-ray hits
are best removed earlier, in the frames (``motion_ctf``'s ``remove_frame_outliers``): after
sub-pixel alignment and dose weighting a hit is smeared beyond the patches erased here.

Every view of every tilt series is processed, excluded views included (they stay in the new stack
and keep their ``enabled`` flag). Per tilt series one new MRC stack ``TS.mrc`` (the input's data
type; pixels that are not replaced keep their exact values), its even/odd half stacks when the
input has them (``image_even_path``, ``image_odd_path``: the pixels found in the full sum are
replaced in each half, fitted from that half), and ``TS_xrays.csv`` listing the replaced pixels
(``tilt_index, x_px, y_px``: column and row in the stack, 0-based). Items get the new paths and
sections and the columns ``xray_pixels`` and ``xray_patches`` (per view); all other columns, the
flags and the set attributes are copied.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.xray import XrayParams, erase_xrays, fill_patches
from tomopipe.engine.step_api import Port, Step, params_from_fields, register
from tomopipe.errors import InputFileError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.mrc import write_mrc
from tomopipe.model.sets import TILT_SERIES
from tomopipe.steps._tilt_series import (
    HALF_COLUMNS,
    TiltSeriesResult,
    TiltSeriesTask,
    merge_views,
    read_views,
    tilt_series_tasks,
)
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

def xray_params(params: dict) -> XrayParams:
    return XrayParams(**{name: params[name] for name in XrayParams.names() if name in params})


def erase_tilt_series(task: TiltSeriesTask) -> TiltSeriesResult:
    """Erase X-rays in every view of one tilt series and write its new stack(s) and pixel table.

    One stack is in memory at a time: the full sums first, then each half with the pixels found
    in the full sums."""
    ts_id = task.ts_id
    folder = Path(task.folder)
    acquisition = task.acquisition
    params = xray_params(task.params)
    device = compute_device(task.device)
    views = task.views
    pixel_size_A = float(acquisition["pixel_size_A"])
    files = {"image_path": folder / f"{ts_id}.mrc", "xray_table_path": folder / f"{ts_id}_xrays.csv"}
    images = read_views(views, "image_path", acquisition["image_size_px"])
    image_pixels = int(images.size)
    found, per_view = [], []
    for index, view in enumerate(views):
        image = torch.from_numpy(images[index]).to(device)
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise InputFileError(view.image_path, f"section {view.image_section} (tilt_index {view.tilt_index}) "
                                                  f"has NaN or infinite values")
        result = erase_xrays(image, params)
        images[index] = result.image.cpu().numpy()
        ys, xs = torch.nonzero(result.mask, as_tuple=True)
        found.append((ys.cpu().numpy(), xs.cpu().numpy()))
        per_view.append({"tilt_index": view.tilt_index, "image_section": index,
                         "xray_pixels": result.n_pixels, "xray_patches": result.n_patches})
        log.info("%s tilt %d: %d pixels in %d patches replaced (%d passes)", ts_id, view.tilt_index,
                 result.n_pixels, result.n_patches, result.passes)
    write_mrc(files["image_path"], images, pixel_size_A, stack=True)
    del images
    for column in HALF_COLUMNS if task.has_halves else ():
        half = read_views(views, column, acquisition["image_size_px"])
        for index, (ys, xs) in enumerate(found):
            if len(ys):
                mask = torch.zeros(half.shape[1:], dtype=torch.bool, device=device)
                mask[torch.from_numpy(ys).to(device), torch.from_numpy(xs).to(device)] = True
                cleaned = fill_patches(torch.from_numpy(half[index]).to(device), mask, params.border_size_px,
                                       params.polynomial_order)
                half[index] = cleaned.cpu().numpy()
        files[column] = folder / f"{ts_id}_{column.split('_')[1]}.mrc"
        write_mrc(files[column], half, pixel_size_A, stack=True)
        del half
    table = pd.DataFrame({"tilt_index": np.concatenate([np.full(len(ys), v.tilt_index) for v, (ys, _) in
                                                        zip(views, found)]).astype(np.int64),
                          "x_px": np.concatenate([xs for _, xs in found]).astype(np.int64),
                          "y_px": np.concatenate([ys for ys, _ in found]).astype(np.int64)})
    write_text_atomic(files["xray_table_path"], table.to_csv(index=False))
    return TiltSeriesResult(ts_id, tuple(per_view), {k: str(v) for k, v in files.items()},
                            {"pixels": int(sum(v["xray_pixels"] for v in per_view)),
                             "patches": int(sum(v["xray_patches"] for v in per_view)), "image_pixels": image_pixels})



@register
class XrayEraser(Step):
    type_name = "xray_eraser"
    title = "imod - Xray eraser"
    description = ("Find X-ray hits and hot pixels (peaks above the local mean, pixel-to-pixel differences) and "
                   "replace them by a polynomial fitted to the pixels around them, as IMOD ccderaser -find does; "
                   "on images of counts, patches that Poisson shot noise explains are kept. "
                   "All views are processed; other pixels keep their exact values.")
    params = (*params_from_fields(XrayParams), DEVICE_PARAM)
    inputs = (Port("tilt_series", TILT_SERIES.name, "tilt series (e.g. the motion-corrected sums)"),)
    outputs = (Port("tilt_series", TILT_SERIES.name, "the same tilt series with X-rays erased: one MRC stack each"),)

    def run(self, ctx):
        try:
            xray_params(ctx.params)
        except ValueError as error:
            ctx.fail(str(error))
        items, tasks = tilt_series_tasks(ctx, "tilt_series")
        results = ctx.map(erase_tilt_series, tasks, desc="x-ray eraser")
        out = merge_views(ctx, items, results, file_columns=("image_path", "xray_table_path", *HALF_COLUMNS),
                          drop=HALF_COLUMNS)
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        ctx.add_output("tilt_series", out, attrs)
        total_pixels = sum(r.summary["image_pixels"] for r in results)
        return {"tilt_series": len(results), "tilts": len(out),
                "pixels_replaced": {r.ts_id: r.summary["pixels"] for r in results},
                "patches_replaced": {r.ts_id: r.summary["patches"] for r in results},
                "fraction_replaced": sum(r.summary["pixels"] for r in results) / max(1, total_pixels)}
