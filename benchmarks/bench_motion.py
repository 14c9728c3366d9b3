"""Motion correction: shift error vs the truth, power restored at 4-8 Å, seconds per tilt movie,
side by side with torch-motion-correction (teamtomo) on the same frames.

Frames: a non-periodic texture (low-pass noise + CTF-modulated noise, cut from a larger canvas so
the frame edges are real edges) moved by a beam-induced trajectory per tilt (fast early motion,
slow drift, random per tilt), expected counts ~0.6 e/px/frame, Poisson noise. Our method runs with
the seed's parameters (1 x 1 x 3, 500-10 Å, B = -500). The peer runs the recipe that
``shared/notes/dependency-vetting.md`` found accurate: ``estimate_global_motion`` (integer-pixel
cross-correlation) refined by ``estimate_local_motion`` on a (3, 1, 1) deformation grid
(3 time points, global), then ``correct_motion``. torch-motion-correction is an optional
benchmark peer (``pip install torch-motion-correction``), never a tomopipe dependency.

Shift errors: RMS over frames of |estimate - truth| (both relative to the mean over frames), Å.
Power restored: band power (4-8 Å) of the noise-free frames summed with the estimated
shifts / that of the motion-free sum (1.0 = perfect; "unaligned" is the plain sum).

    python benchmarks/bench_motion.py [--size 1024] [--frames 10] [--tilts 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

from tomopipe.algorithms.ctf import ctf_2d  # noqa: E402
from tomopipe.algorithms.motion import (  # noqa: E402
    MotionModel,
    align_and_sum,
    estimate_motion,
    fourier_shift_2d,
    frame_dose_e_per_A2,
    frame_times,
)


def texture(size: int, pixel_size_A: float, generator: torch.Generator, margin: int = 64) -> torch.Tensor:
    """Zero-mean unit-SD texture on a (size + 2·margin)² periodic canvas."""
    n = size + 2 * margin
    spectrum = torch.fft.rfft2(torch.randn(n, n, generator=generator, dtype=torch.float64))
    k = torch.sqrt(torch.fft.fftfreq(n, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(n, dtype=torch.float64)[None, :] ** 2) / pixel_size_A
    ctf = ctf_2d((n, n), pixel_size_A, 25000.0, 24000.0, 30.0, 300.0, 2.7, 0.1, rfft=True).to(torch.float64)
    out = torch.fft.irfft2(spectrum * (2.0 * torch.exp(-((k * 50.0) ** 2)) + ctf * torch.exp(-40 * k**2)), s=(n, n))
    return (out - out.mean()) / out.std()


def trajectory_px(n_frames: int, generator: torch.Generator, pixel_size_A: float) -> torch.Tensor:
    """Beam-induced motion: an exponential approach (2-6 Å) plus drift (0-2 Å), random direction; mean zero."""
    t = frame_times(n_frames)
    r = torch.rand(6, generator=generator, dtype=torch.float64)
    amplitude_A, drift_A, tau = 2 + 4 * r[0], 2 * r[1], 0.15 + 0.3 * r[2]
    a, b = 2 * math.pi * r[3], 2 * math.pi * r[4]
    fast = (1 - torch.exp(-t / tau)) * amplitude_A
    slow = t * drift_A
    traj = torch.stack([fast * math.cos(a) + slow * math.cos(b), fast * math.sin(a) + slow * math.sin(b)], dim=-1)
    traj = traj / pixel_size_A
    return traj - traj.mean(0)


def tilt_movie(size, n_frames, pixel_size_A, counts, contrast, seed, margin=64):
    g = torch.Generator().manual_seed(seed)
    canvas = texture(size, pixel_size_A, g, margin)
    truth_px = trajectory_px(n_frames, g, pixel_size_A)
    crop = (slice(margin, margin + size), slice(margin, margin + size))
    expected = torch.stack([counts * (1 + contrast * fourier_shift_2d(canvas, truth_px[f])[crop]).clamp_min(0)
                            for f in range(n_frames)])
    still = (counts * (1 + contrast * canvas[crop])).clamp_min(0) * n_frames
    noisy = torch.poisson(expected.double(), generator=g).float()
    return noisy, expected.float(), (truth_px * pixel_size_A).float(), still.float()


def band_power(image, pixel_size_A, low_A=8.0, high_A=4.0):
    spectrum = torch.fft.rfft2(image.double())
    k = torch.sqrt(torch.fft.fftfreq(image.shape[0], dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(image.shape[1], dtype=torch.float64)[None, :] ** 2) / pixel_size_A
    band = (k >= 1 / low_A) & (k <= 1 / high_A)
    return float((spectrum.abs() ** 2)[band].sum())


def rms_A(estimate, truth):
    e = estimate - estimate.mean(0)
    return float((e - truth).pow(2).sum(-1).mean().sqrt())


def run_ours(movie, pixel_size_A, doses):
    start, cpu = time.perf_counter(), time.process_time()
    model = estimate_motion(movie, pixel_size_A)
    estimate_s = time.perf_counter() - start
    align_and_sum(movie, pixel_size_A, model, frame_dose_e_per_A2=doses)
    return model, estimate_s, time.perf_counter() - start, time.process_time() - cpu


def run_peer(movie, pixel_size_A):
    """torch-motion-correction: global XC, then its optimiser on a (3, 1, 1) grid, then correct_motion."""
    import contextlib
    import io

    from torch_motion_correction import (
        FourierFilterConfig,
        OptimizationConfig,
        PatchSamplingConfig,
        correct_motion,
        estimate_global_motion,
        estimate_local_motion,
    )

    filt = FourierFilterConfig(b_factor=500, frequency_range=(500, 10))
    start, cpu = time.perf_counter(), time.process_time()
    coarse = estimate_global_motion(movie, pixel_size_A, fourier_filter=filt)
    coarse_s = time.perf_counter() - start
    patch = min(movie.shape[-2:]) // 2
    with contextlib.redirect_stderr(io.StringIO()):  # it prints a progress bar on every call
        field, _ = estimate_local_motion(movie, pixel_size_A, (3, 1, 1), PatchSamplingConfig((patch, patch), 0.5),
                                         initial_deformation_field=coarse, fourier_filter=filt,
                                         optimization=OptimizationConfig(max_iterations=100))
    refine_s = time.perf_counter() - start
    correct_motion(movie, field, pixel_size_A).sum(0)
    total_s, total_cpu_s = time.perf_counter() - start, time.process_time() - cpu

    def per_frame(f):  # (y, x) Å at every frame time -> (x, y)
        data = torch.stack([f.evaluate_at_t(float(t), (1, 1))[:, 0, 0] for t in frame_times(movie.shape[0])])
        return data.flip(-1).detach().float()

    return per_frame(coarse), per_frame(field), coarse_s, refine_s, total_s, total_cpu_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="frame side (px)")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--tilts", type=int, default=4)
    parser.add_argument("--pixel-size", type=float, default=1.35, help="Å/px")
    parser.add_argument("--counts", type=float, default=0.6, help="e/px/frame")
    parser.add_argument("--contrast", type=float, default=0.15, help="SD of the texture relative to the mean")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip torch-motion-correction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pix = args.pixel_size
    peer = not args.no_peer
    if peer:
        try:
            import torch_motion_correction  # noqa: F401
        except ImportError:
            print("torch-motion-correction is not installed: pip install torch-motion-correction (or --no-peer)")
            peer = False

    warm, _, _, _ = tilt_movie(128, 4, pix, args.counts, args.contrast, 99)  # first-call overheads, not timed
    run_ours(warm, pix, None)
    if peer:
        run_peer(warm, pix)
    rows = []
    for tilt in range(args.tilts):
        movie, expected, truth_A, still = tilt_movie(args.size, args.frames, pix, args.counts, args.contrast, tilt)
        doses = frame_dose_e_per_A2(3.5 * tilt, 3.5, args.frames)
        model, estimate_s, ours_s, ours_cpu_s = run_ours(movie, pix, doses)
        reference = band_power(still, pix)
        restored = band_power(align_and_sum(expected, pix, model)["sum"], pix) / reference
        row = {"tilt": tilt, "motion_A": float((truth_A[1:] - truth_A[:-1]).norm(dim=-1).sum()),
               "rms_A": rms_A(model.shifts_A, truth_A), "raw_rms_A": rms_A(model.raw_shifts_A, truth_A),
               "restored_4_8A": restored, "unaligned_4_8A": band_power(expected.sum(0), pix) / reference,
               "estimate_s": estimate_s, "seconds_per_movie": ours_s, "cpu_s_per_movie": ours_cpu_s}
        if peer:
            coarse, refined, coarse_s, refine_s, peer_s, peer_cpu_s = run_peer(movie, pix)
            perfect = MotionModel(refined - refined.mean(0), refined, (args.size, args.size), pix, 3)
            row.update({"tmc_xc_rms_A": rms_A(coarse, truth_A), "tmc_rms_A": rms_A(refined, truth_A),
                        "tmc_restored_4_8A": band_power(align_and_sum(expected, pix, perfect)["sum"], pix) / reference,
                        "tmc_xc_s": coarse_s, "tmc_refine_s": refine_s, "tmc_seconds_per_movie": peer_s,
                        "tmc_cpu_s_per_movie": peer_cpu_s, "time_ratio_tmc_over_ours": peer_s / ours_s,
                        "cpu_ratio_tmc_over_ours": peer_cpu_s / ours_cpu_s})
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    summary = {"tilt": "mean"}
    for key in rows[0]:
        if key != "tilt":
            summary[key] = sum(r[key] for r in rows) / len(rows)
    rows.append(summary)
    load = os.getloadavg()
    notes = (f"load average during the run {load[0]:.1f} (on {os.cpu_count()} cores); "
             f"{args.tilts} tilt movies of {args.frames} frames x {args.size}^2 px at {pix} A/px, "
             f"{args.counts} e/px/frame, contrast {args.contrast}, torch threads {args.threads}, "
             f"device cpu. Ours: seed parameters 1x1x3, 500-10 A, B -500, dose weighting; seconds_per_movie = "
             f"estimate + dose-weighted aligned sum. tmc: torch-motion-correction global XC + estimate_local_motion "
             f"(3,1,1) 100 iterations + correct_motion; tmc_restored uses its shifts in our sum. Goal: rms <= 0.5 A, "
             f"restored >= 0.9.")
    report("motion", rows, notes)


if __name__ == "__main__":
    main()
