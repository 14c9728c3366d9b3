"""Fiducial-less alignment on synthetic blob tilt series (RELION 5 model, known truth) at the seed's
alignment sampling (7.9 Å/px, patches 500 Å with 80 % overlap): shift RMS (gauge-free), axis and
tilt-offset errors, runtime, for several specimen thicknesses. Usage: python benchmarks/bench_align.py"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

from tomopipe.algorithms.align import bandpass_images, coarse_align, track_patches  # noqa: E402
from tomopipe.algorithms.align_fit import fit_projection_model, projected_shift_error_px  # noqa: E402
from tomopipe.algorithms.align_synthetic import blob_tilt_series  # noqa: E402

PIXEL_A, AXIS_DEG, OFFSET_DEG = 7.9, -85.6, 1.2


def main() -> None:
    rows = []
    for size, thickness_px, noise in ((256, 12, 0.7), (256, 25, 0.7), (256, 40, 0.7), (384, 25, 1.0)):
        ts = blob_tilt_series(size_px=size, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=OFFSET_DEG, shift_sd_px=3.0,
                              magnification_sd=0.005, slab_thickness_px=thickness_px, blobs=int(3000 * (size / 224) ** 2),
                              noise_sd=noise, seed=7)
        start = time.perf_counter()
        images = bandpass_images(ts.images)
        coarse = coarse_align(images, ts.nominal_tilt_deg, AXIS_DEG + 1.0)
        tracks = track_patches(images, ts.nominal_tilt_deg, AXIS_DEG + 1.0, coarse.shifts_px, round(500 / PIXEL_A), 0.8)
        fit = fit_projection_model(tracks.positions_px, ts.nominal_tilt_deg, AXIS_DEG + 1.0, coarse.shifts_px)
        seconds = time.perf_counter() - start
        error = projected_shift_error_px(fit.rot_z_deg, fit.tilt_deg, fit.shifts_px, fit.magnification, ts.shifts_px)
        rows.append({"size_px": size, "slab_A": thickness_px * PIXEL_A, "noise_sd": noise, "tilts": 41,
                     "contours": f"{int(fit.contour_used.sum())}/{tracks.positions_px.shape[0]}",
                     "residual_px": fit.rms_residual_px, "shift_rms_px": error["rms_px"],
                     "axis_err_deg": fit.axis_deg - AXIS_DEG, "offset_err_deg": fit.tilt_offset_deg - OFFSET_DEG,
                     "seconds": seconds, "threads": torch.get_num_threads()})
    report("align", rows, notes="targets: shift RMS <= 0.5 px, axis and offset errors <= 0.3 deg; start axis 1 deg off")


if __name__ == "__main__":
    main()
