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

The helpers :func:`tilt_series_tasks`, :func:`read_views` and :func:`output_items` are shared
with the preprocess step: both read every view of a tilt series and write a new stack.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.xray import XrayParams, erase_xrays, fill_patches
from tomopipe.errors import InputFileError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.steps.base import DEVICE_PARAM, Param, Port, Step, compute_device, register

log = logging.getLogger("tomopipe")

HALF_COLUMNS = ("image_even_path", "image_odd_path")  # even/odd sums of the motion step, same sections


def tilt_series_tasks(ctx, port: str, extra: dict) -> tuple[pd.DataFrame, list[dict]]:
    """All items of the input set (every view, sorted by ts_id and tilt_index) and one task per
    tilt series: its views (absolute stack paths and sections, halves when present), its
    acquisition, ``folder`` and the ``extra`` entries."""
    items = ctx.input_items(port, enabled_only=False)
    if items.empty:
        ctx.fail(f"the input set {port!r} has no items")
    for column in ("ts_id", "tilt_index", "image_path", "image_section"):
        if column not in items.columns:
            ctx.fail(f"the input set {port!r} has no {column!r} column: not a tilt-series set")
    items = items.sort_values(["ts_id", "tilt_index"], kind="stable").reset_index(drop=True)
    acquisitions = ctx.input_attrs(port).get("tilt_series", {})
    tasks = []
    for ts_id, group in items.groupby("ts_id", sort=True):
        if ts_id not in acquisitions:
            ctx.fail(f"tilt series {ts_id!r} has no acquisition in the attributes of the input set {port!r}")
        views = []
        for row in group.itertuples(index=False):
            view = {"tilt_index": int(row.tilt_index), "image_path": str(ctx.resolve(row.image_path)),
                    "image_section": int(row.image_section)}
            for column in HALF_COLUMNS:
                value = getattr(row, column, None)
                if isinstance(value, str) and value:
                    view[column] = str(ctx.resolve(value))
            views.append(view)
        if not all(c in v for v in views for c in HALF_COLUMNS):  # halves only when every view has both
            for view in views:
                for column in HALF_COLUMNS:
                    view.pop(column, None)
        tasks.append({"ts_id": ts_id, "views": views, "acquisition": acquisitions[ts_id],
                      "folder": str(ctx.folder), **extra})
    return items, tasks


def read_views(views: list[dict], column: str, image_size_px) -> np.ndarray:
    """The sections of ``views`` (column ``image_path`` or a half) as one array ``[n, y, x]``, input dtype.

    Raises InputFileError naming the stack when a section is missing or has the wrong size.
    """
    nx, ny = (int(v) for v in image_size_px)
    opened: dict[str, np.ndarray] = {}
    out = None
    for index, view in enumerate(views):
        path = view[column]
        if path not in opened:
            data, _ = read_mrc(path, mmap=True)
            opened[path] = data if data.ndim == 3 else data[np.newaxis]
        stack = opened[path]
        section = view["image_section"]
        if not 0 <= section < stack.shape[0]:
            raise InputFileError(path, f"has {stack.shape[0]} sections; tilt_index {view['tilt_index']} refers to "
                                       f"section {section}")
        if stack.shape[1:] != (ny, nx):
            raise InputFileError(path, f"images are {stack.shape[2]} x {stack.shape[1]} px but the tilt series' "
                                       f"acquisition says {nx} x {ny} px")
        if out is None:
            out = np.empty((len(views), ny, nx), dtype=stack.dtype.newbyteorder("="))
        out[index] = stack[section]
    return out


def output_items(ctx, items: pd.DataFrame, results: list[dict]) -> pd.DataFrame:
    """Input items with the new files (``result["files"]``: column -> path, e.g. ``image_path``), the
    new sections and the per-view result columns (``result["views"]``); halves that were not
    processed are dropped (they would not match the new stack)."""
    tables = []
    for result in results:
        group = items[items["ts_id"] == result["ts_id"]]
        per_view = pd.DataFrame(result["views"])
        replaced = [c for c in (*per_view.columns, *HALF_COLUMNS) if c != "tilt_index" and c in group.columns]
        group = group.drop(columns=replaced).merge(per_view, on="tilt_index", how="left", validate="one_to_one")
        for column, path in result["files"].items():
            group[column] = ctx.stored_path(path)
        tables.append(group)
    return pd.concat(tables, ignore_index=True)


def xray_params(params: dict) -> XrayParams:
    return XrayParams(**{name: params[name] for name in XrayParams.names() if name in params})


def erase_tilt_series(task: dict) -> dict:
    """Erase X-rays in every view of one tilt series and write its new stack(s) and pixel table.

    One stack is in memory at a time: the full sums first, then each half with the pixels found
    in the full sums."""
    ts_id = task["ts_id"]
    folder = Path(task["folder"])
    acquisition = task["acquisition"]
    params = xray_params(task["params"])
    device = compute_device(task["params"]["device"])
    views = task["views"]
    pixel_size_A = float(acquisition["pixel_size_A"])
    files = {"image_path": folder / f"{ts_id}.mrc", "xray_table_path": folder / f"{ts_id}_xrays.csv"}
    images = read_views(views, "image_path", acquisition["image_size_px"])
    image_pixels = int(images.size)
    found, per_view = [], []
    for index, view in enumerate(views):
        image = torch.from_numpy(images[index]).to(device)
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise InputFileError(view["image_path"], f"section {view['image_section']} (tilt_index "
                                                     f"{view['tilt_index']}) has NaN or infinite values")
        result = erase_xrays(image, params)
        images[index] = result.image.cpu().numpy()
        ys, xs = torch.nonzero(result.mask, as_tuple=True)
        found.append((ys.cpu().numpy(), xs.cpu().numpy()))
        per_view.append({"tilt_index": view["tilt_index"], "image_section": index,
                         "xray_pixels": result.n_pixels, "xray_patches": result.n_patches})
        log.info("%s tilt %d: %d pixels in %d patches replaced (%d passes)", ts_id, view["tilt_index"],
                 result.n_pixels, result.n_patches, result.passes)
    write_mrc(files["image_path"], images, pixel_size_A, stack=True)
    del images
    for column in HALF_COLUMNS:
        if column not in views[0]:
            continue
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
    table = pd.DataFrame({"tilt_index": np.concatenate([np.full(len(ys), v["tilt_index"]) for v, (ys, _) in
                                                        zip(views, found)]).astype(np.int64),
                          "x_px": np.concatenate([xs for _, xs in found]).astype(np.int64),
                          "y_px": np.concatenate([ys for ys, _ in found]).astype(np.int64)})
    write_text_atomic(files["xray_table_path"], table.to_csv(index=False))
    return {"ts_id": ts_id, "views": per_view, "files": {k: str(v) for k, v in files.items()},
            "pixels": int(sum(v["xray_pixels"] for v in per_view)),
            "patches": int(sum(v["xray_patches"] for v in per_view)), "image_pixels": image_pixels}


_DEFAULTS = XrayParams()


@register
class XrayEraser(Step):
    type_name = "xray_eraser"
    title = "imod - Xray eraser"
    description = ("Find X-ray hits and hot pixels (peaks above the local mean, pixel-to-pixel differences) and "
                   "replace them by a polynomial fitted to the pixels around them, as IMOD ccderaser -find does; "
                   "on images of counts, patches that Poisson shot noise explains are kept. "
                   "All views are processed; other pixels keep their exact values.")
    params = (
        Param("peak_criterion_sd", "float", "peak criterion: SDs above the local (annulus) mean to erase a peak",
              default=_DEFAULTS.peak_criterion_sd, min=0.001),
        Param("diff_criterion_sd", "float", "difference criterion: SDs above the mean pixel-to-neighbours difference",
              default=_DEFAULTS.diff_criterion_sd, min=0.001),
        Param("maximum_radius_px", "float", "maximum radius of a peak area to erase",
              default=_DEFAULTS.maximum_radius_px, min=0.5, max=10),
        Param("big_diff_criterion_sd", "float", "extra-large peaks are erased only if their adjacent-pixel "
                                                "differences exceed this many SDs",
              default=_DEFAULTS.big_diff_criterion_sd, min=0),
        Param("grow_criterion_sd", "float", "SDs above the local mean to add pixels to a peak",
              default=_DEFAULTS.grow_criterion_sd, min=0.001),
        Param("scan_criterion_sd", "float", "SDs above the scan area's mean to look for a peak",
              default=_DEFAULTS.scan_criterion_sd, min=0.001),
        Param("giant_criterion_sd", "float", "SDs above the local mean to erase an extra-large peak (0: off)",
              default=_DEFAULTS.giant_criterion_sd, min=0),
        Param("extra_large_radius_px", "float", "maximum radius of an extra-large peak area",
              default=_DEFAULTS.extra_large_radius_px, min=0.5),
        Param("annulus_width_px", "float", "width of the annulus giving the local mean and SD",
              default=_DEFAULTS.annulus_width_px, min=0.5),
        Param("max_pixels_in_diff_patch", "int", "largest patch the difference criterion erases",
              default=_DEFAULTS.max_pixels_in_diff_patch, min=1),
        Param("xy_scan_size_px", "int", "size of the scan areas for the mean and SD", default=_DEFAULTS.xy_scan_size_px,
              min=8),
        Param("edge_exclusion_width_px", "int", "width of the border not searched, on every edge",
              default=_DEFAULTS.edge_exclusion_width_px, min=0),
        Param("border_size_px", "int", "width of the ring of pixels the replacement is fitted to",
              default=_DEFAULTS.border_size_px, min=1, max=5),
        Param("polynomial_order", "int", "order of the polynomial fitted to the ring (0: its mean)",
              default=_DEFAULTS.polynomial_order, min=0, max=3),
        Param("max_passes", "int", "search passes on the cleaned image, at most", default=_DEFAULTS.max_passes, min=1),
        Param("shot_noise_probability", "float", "tomopipe: on images of counts, replace a patch only if it is less "
                                                 "probable than this as Poisson shot noise (at one or two counts per "
                                                 "pixel the SD criteria mistake noise for X-rays); 0: off, as "
                                                 "ccderaser", default=_DEFAULTS.shot_noise_probability, min=0, max=0.5),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", "tilt_series", "tilt series (e.g. the motion-corrected sums)"),)
    outputs = (Port("tilt_series", "tilt_series", "the same tilt series with X-rays erased: one MRC stack each"),)

    def run(self, ctx):
        try:
            xray_params(ctx.params)
        except ValueError as error:
            ctx.fail(str(error))
        items, tasks = tilt_series_tasks(ctx, "tilt_series", {"params": ctx.params})
        results = ctx.map(erase_tilt_series, tasks, desc="x-ray eraser")
        out = output_items(ctx, items, results)
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        ctx.add_output("tilt_series", out, attrs)
        total_pixels = sum(r["image_pixels"] for r in results)
        return {"tilt_series": len(results), "tilts": len(out),
                "pixels_replaced": {r["ts_id"]: r["pixels"] for r in results},
                "patches_replaced": {r["ts_id"]: r["patches"] for r in results},
                "fraction_replaced": sum(r["pixels"] for r in results) / max(1, total_pixels)}
