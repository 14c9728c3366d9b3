"""Fiducial-less alignment accuracy and runtime.

Synthetic (default): blob tilt series (RELION 5 model, known truth) at the seed's alignment sampling
(7.9 Å/px, patches 500 Å with 80 % overlap, point windows 250 Å), several specimen thicknesses,
starting axis 1° off: shift RMS (gauge-free), axis and tilt-offset errors of the patch stage and of
the final (point) stage, runtime. Writes results/align.json.

Simulated data set (``--project P --data D``): the step's own per-tilt-series function
(``steps.align.align_tilt_series``) on the preprocessed (binned) tilt series of project P, with the
X-ray-erased (unbinned) set as the intensity reference for the tilt-angle offset, scored against the
truth of D (:func:`tomopipe.validate.score_alignment.score_alignment`) at the alignment binning and
after assigning the alignment to the unbinned set (shifts in Å are copied, as ``assign_alignment``
does). Nothing is written into P (IMOD files go to a temporary folder). ``--compare-specimen`` also
runs without the reference (tilt offset from levelling the contour points). Writes
results/align_preset.json.

Usage: python benchmarks/bench_align.py [--project P --data D [--input-run N] [--reference-run N]
[--compare-specimen] [--threads T]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from tomopipe.algorithms.align import AlignOptions, align_images  # noqa: E402
from tomopipe.algorithms.align_fit import projected_shift_error_px  # noqa: E402
from tomopipe.simulate.blob_tilt_series import blob_tilt_series  # noqa: E402

PIXEL_A, AXIS_DEG, OFFSET_DEG = 7.9, -85.6, 1.2


def synthetic() -> None:
    rows = []
    options = AlignOptions(patch_size_px=round(500 / PIXEL_A), point_window_px=round(250 / PIXEL_A))
    for size, thickness_px, noise in ((256, 12, 0.7), (256, 40, 0.7), (256, 80, 0.7), (384, 40, 1.0)):
        ts = blob_tilt_series(size_px=size, tilt_angles_deg=torch.arange(-60.0, 60.1, 3.0), tilt_axis_deg=AXIS_DEG,
                              tilt_offset_deg=OFFSET_DEG, shift_sd_px=3.0, magnification_sd=0.002,
                              slab_thickness_px=thickness_px, blobs=int(1500 * (size / 224) ** 2), blob_sigma_px=2.0,
                              noise_sd=noise, seed=7)
        start = time.perf_counter()
        result = align_images(ts.images, ts.nominal_tilt_deg, AXIS_DEG + 1.0, options)
        seconds = time.perf_counter() - start
        row = {"size_px": size, "slab_A": thickness_px * PIXEL_A, "noise_sd": noise, "tilts": 41}
        for name, fit in (("patch", result.patch_fit), ("final", result.fit)):
            error = projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification,
                                             ts.shifts_px)
            row.update({f"{name}_shift_rms_px": error["rms_px"], f"{name}_axis_err_deg": fit.axis_deg - AXIS_DEG})
        row.update({"stage": result.stage, "offset_err_deg": result.fit.tilt_offset_deg - OFFSET_DEG,
                    "contours": int(result.fit.contour_used.sum()), "seconds": seconds,
                    "threads": torch.get_num_threads()})
        rows.append(row)
    report("align", rows, notes="targets: shift RMS <= 0.5 px, axis and offset errors <= 0.3 deg; start axis 1 deg off;"
                                " offset from levelling the points (no transmission in these images)")


def _task_for(project, items, attrs, ts_id: str, params: dict, folder: Path, reference=None) -> dict:
    group = items[items["ts_id"] == ts_id].sort_values("tilt_index")
    views = [{"tilt_index": int(r.tilt_index), "image_path": str(project.absolute_path(r.image_path)),
              "image_section": int(r.image_section), "enabled": bool(r.enabled),
              "tilt_angle_deg": float(r.tilt_angle_deg)}
             for r in group.itertuples(index=False)]
    intensity = None
    if reference is not None:
        ref = reference[reference["ts_id"] == ts_id]
        intensity = [{"tilt_index": int(r.tilt_index), "image_path": str(project.absolute_path(r.image_path)),
                      "image_section": int(r.image_section)} for r in ref.itertuples(index=False)]
    return {"ts_id": ts_id, "params": params, "folder": str(folder), "acquisition": attrs["tilt_series"][ts_id],
            "views": views, "intensity_views": intensity}


def preset(project_dir: str, data_dir: str, input_run: str | None, reference_run: str | None,
           compare_specimen: bool) -> None:
    import pandas as pd

    from tomopipe.project.store import Project
    from tomopipe.steps.align import AlignTiltSeries, align_tilt_series
    from tomopipe.validate.score_alignment import score_alignment
    from tomopipe.validate.truth import Truth

    project = Project.open(project_dir)
    truth = Truth.find(data_dir)

    def newest(step_type: str, key: str | None):
        if key is not None:
            return project.find_run(key)
        runs = [r for r in project.runs() if r.step_type == step_type and r.status == "finished"]
        if not runs:
            raise SystemExit(f"{project_dir}: no finished {step_type} run")
        return runs[-1]

    source_run, reference_run_record = newest("preprocess", input_run), newest("xray_eraser", reference_run)
    source = project.sets_of_run(source_run.id)["tilt_series"]
    target = project.sets_of_run(reference_run_record.id)["tilt_series"]
    items, reference = project.read_items(source.id), project.read_items(target.id)
    params = AlignTiltSeries.validate_params("align", {"device": "cpu"})
    variants = [("transmission", reference)] + ([("specimen", None)] if compare_specimen else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp:
        for ts_id in sorted(items["ts_id"].unique()):
            for label, ref in variants:
                start = time.perf_counter()
                result = align_tilt_series(_task_for(project, items, source.attrs, ts_id, params, Path(tmp), ref))
                seconds = time.perf_counter() - start
                views = pd.DataFrame(result["views"])
                aligned = items[items["ts_id"] == ts_id].merge(views, on="tilt_index", how="left")
                assigned = reference[reference["ts_id"] == ts_id].merge(
                    views.drop(columns=["align_residual_px"]), on="tilt_index", how="left")
                binned = score_alignment(aligned, source.attrs, truth)["tilt_series"][ts_id]
                unbinned = score_alignment(assigned, target.attrs, truth)["tilt_series"][ts_id]
                rows.append({"ts": ts_id, "offset_from": result["tilt_offset"]["method"], "stage": result["stage"],
                             "views": binned["views"], "pixel_A": binned["pixel_size_A"],
                             "shift_rms_px": binned["shift_rms_px"], "shift_rms_A_bin1": unbinned["shift_rms_A"],
                             "shift_rms_px_bin1": unbinned["shift_rms_px"],
                             "content_rms_A": unbinned["shift_rms_content_A"],
                             "axis_err_deg": binned["axis_error_deg"], "offset_err_deg": binned["offset_error_deg"],
                             "residual_px": result["rms_residual_px"], "seconds": seconds,
                             "threads": torch.get_num_threads()})
    report("align_preset", rows, notes=(
        f"project {project_dir} (input run {source_run.id}, reference run {reference_run_record.id}), "
        f"truth {data_dir}. "
        "Targets: shift RMS <= 0.5 px at the alignment binning, <= 2 A after assigning to bin 1, axis and offset "
        "errors <= 0.3 deg. Shift errors are after removing the best 3-D translation; content_rms_A is against the "
        "truth shift + the mean motion of the tilt's frames (where the motion-corrected sum's content is)."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="tomopipe project with preprocess and xray_eraser runs (read only)")
    parser.add_argument("--data", help="simulated data folder (with truth/)")
    parser.add_argument("--input-run",
                        help="run (id or name) whose tilt_series set is aligned (default: newest preprocess)")
    parser.add_argument("--reference-run",
                        help="run (id or name) of the intensity reference (default: newest xray_eraser)")
    parser.add_argument("--compare-specimen", action="store_true", help="also align without the intensity reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.project or args.data:
        if not (args.project and args.data):
            parser.error("--project and --data go together")
        preset(args.project, args.data, args.input_run, args.reference_run, args.compare_specimen)
    else:
        synthetic()


if __name__ == "__main__":
    main()
