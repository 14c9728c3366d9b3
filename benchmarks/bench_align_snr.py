"""Alignment error against the signal: the digital twin at 1x, 1/2, 1/4 and 1/8 of the dose.

Each row is one simulated tilt series (a 1024 A field at 2 A/px, -52..52 deg by 4, one frame per
tilt without beam-induced motion so that a view is its movie; the twin's mdoc axis error, pretilt
and cos-dependent exposure as by default) aligned at 8 A/px with
:func:`tomopipe.algorithms.align.align_images` from the mdoc's axis, scored against the truth
(:func:`tomopipe.validate.score_alignment.score_alignment`): shift RMS (gauge-free, px at 8 A/px), axis
error, views left to whole-view cross-correlation by the patch and the final stage; and the
tilt-angle offset error of the two estimates that do not level contour points: the transmission
(mean counts per dose, :func:`~tomopipe.algorithms.align_fit.transmission_tilt_offset`) and the layer
of a quick tomogram (:func:`~tomopipe.algorithms.align_offset.layer_tilt_offset`), each with its
standard error (an estimate that refuses the data says so). Writes results/align_snr.json.

Usage: python benchmarks/bench_align_snr.py [--particles N [N ...]] [--seed S] [--threads T]
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
from tomopipe.algorithms.align_fit import AlignmentError, transmission_tilt_offset  # noqa: E402
from tomopipe.algorithms.align_offset import layer_tilt_offset, with_tilt_offset  # noqa: E402
from tomopipe.simulate.config import config_from_preset  # noqa: E402
from tomopipe.simulate.run import simulate  # noqa: E402
from tomopipe.validate.score_alignment import score_alignment  # noqa: E402
from tomopipe.validate.truth import Truth  # noqa: E402
from tomopipe.validate.twin_views import twin_views  # noqa: E402

BASE_DOSE = 2.64
BINNING = 4


def _offset_errors(name: str, estimate, true_offset_deg: float) -> dict:
    try:
        found = estimate()
    except AlignmentError as error:
        return {f"{name}_offset_err_deg": f"refused ({str(error)[:40]}...)"}
    return {f"{name}_offset_err_deg": found[0] - true_offset_deg, f"{name}_offset_se_deg": found[1]}


def one(dose_factor: float, particles: int, seed: int, folder: Path) -> dict:
    config = config_from_preset("tiny", image_width_px=512, image_height_px=512, pixel_size_A=2.0, tilt_min_deg=-52.0,
                                tilt_max_deg=52.0, tilt_step_deg=4.0, particles_per_tilt_series=particles,
                                frames_per_tilt=1, beam_induced_motion=False, local_motion=False, movie_format="mrc",
                                ice_thickness_A=600.0, xray_hits_per_megapixel_per_tilt=0.5,
                                hot_pixels_per_megapixel=2.0, stage_shift_sigma_A=60.0, seed=seed,
                                dose_per_tilt_e_per_A2=BASE_DOSE / dose_factor)
    simulate(config, folder, progress=False, overwrite=True)
    truth = Truth.find(folder)
    views = twin_views(folder, "TS_01", BINNING)
    tilts = truth.tilts("TS_01")
    true_offset = float((tilts["true_tilt_deg"] - tilts["stage_tilt_deg"]).mean())
    row = {"dose_e_per_A2": config.dose_per_tilt_e_per_A2, "dose_factor": f"1/{dose_factor:g}",
           "pixel_A": views.pixel_size_A, "views": int(views.images.shape[0])}
    options = AlignOptions(patch_size_px=round(500 / views.pixel_size_A),
                           point_window_px=round(250 / views.pixel_size_A))
    start = time.perf_counter()
    try:
        result = align_images(views.images, views.tilt_angles_deg, views.tilt_axis_deg, options)
    except AlignmentError as error:
        row.update({"stage": f"failed: {str(error)[:60]}", "seconds": time.perf_counter() - start})
        return row
    row["seconds"] = time.perf_counter() - start
    fit = with_tilt_offset(result.fit, true_offset)  # the shift score needs the offset; scored separately below
    score = score_alignment(views.items(fit), views.attrs, truth)["tilt_series"]["TS_01"]
    row.update({"stage": result.stage, "patch_px": result.patches.patch_size_px,
                "xcorr_views_patch": int((~result.patch_fit.view_fitted).sum()),
                "xcorr_views_final": int((~result.fit.view_fitted).sum()),
                "shift_rms_px": score["shift_rms_px"], "shift_max_px": score["shift_max_px"],
                "axis_err_deg": score["axis_error_deg"], "residual_px": result.fit.rms_residual_px})
    means = views.images.double().mean(dim=(-2, -1))

    def transmission():
        found = transmission_tilt_offset(views.tilt_angles_deg, means, views.dose_e_per_A2)
        return found.tilt_offset_deg, found.offset_se_deg

    def layer():
        found = layer_tilt_offset(views.images, result.fit)
        return found.tilt_offset_deg, found.uncertainty_deg

    row.update(_offset_errors("transmission", transmission, true_offset))
    row.update(_offset_errors("layer", layer, true_offset))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 64],
                        help="particles in the field, one sweep each (default 16 64)")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_align_snr_") as tmp:
        for particles in args.particles:
            for factor in (1.0, 2.0, 4.0, 8.0):
                rows.append({"particles": particles,
                             **one(factor, particles, args.seed, Path(tmp) / f"dose_{factor:g}")})
    report("align_snr", rows, notes=(
        f"twin: 512 x 512 px at 2 A/px, 600 A ice, seed {args.seed}, aligned at "
        f"{2 * BINNING} A/px from the mdoc axis; shift errors after the true offset is applied (gauge) and the best "
        "3-D translation removed; offsets: error and standard error of each estimate against the truth."))


if __name__ == "__main__":
    main()
