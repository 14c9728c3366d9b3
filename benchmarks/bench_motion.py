"""Motion correction: shift error vs the truth, power restored at 4-8 Å, seconds per tilt movie,
side by side with torch-motion-correction (teamtomo) on the same frames.

Frames (``--source``):
* ``simulate`` (default): movies of the digital twin (``tomopipe.simulate``, preset ``--preset``,
  default ``small``: 1920 x 1440 px at 0.79 Å/px, 8 frames per tilt), gain-corrected with the
  twin's gain reference, truth from ``DIR/truth/TS_xx_frame_shifts.csv``. ``--tilts N`` simulates
  one tilt series of N tilts around 0° (the preset's sizes otherwise); ``--data DIR`` reuses a
  simulated folder.
* ``synthetic``: a non-periodic texture (low-pass noise + CTF-modulated noise, cut from a larger
  canvas) moved by a random beam-induced trajectory, ~0.6 e/px/frame, Poisson noise.

Our method runs with the seed's parameters (1 x 1 x 3, 500-10 Å, B = -500) and dose weighting.
The peer runs the recipe that ``shared/notes/dependency-vetting.md`` found accurate:
``estimate_global_motion`` (integer-pixel cross-correlation) refined by ``estimate_local_motion``
on a (3, 1, 1) deformation grid (3 time points, global), then ``correct_motion``.
torch-motion-correction is an optional benchmark peer (``pip install torch-motion-correction``),
never a tomopipe dependency.

Shift error: RMS over frames of |estimate - truth| (both relative to their mean over frames), Å.
Power restored (4-8 Å): signal power of the sum aligned with the estimated shifts over that with
the true shifts (simulate: signal power measured without noise bias as the cross-power of the
even- and odd-frame half sums; synthetic: power of the noise-free frames, reference = the
motion-free sum). Times: wall-clock and process CPU seconds per tilt movie (estimate + aligned
sum), measured in the same run for both methods.

    python benchmarks/bench_motion.py [--source simulate|synthetic] [--preset small] [--tilts 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from tomopipe.algorithms.ctf import ctf_2d  # noqa: E402
from tomopipe.algorithms.motion import (  # noqa: E402
    MotionModel,
    align_and_sum,
    apply_gain,
    estimate_motion,
    fourier_shift_2d,
    frame_dose_e_per_A2,
    frame_times,
)
from tomopipe.io.movies import read_gain, read_movie  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


def _band(shape, pixel_size_A, low_A, high_A):
    k = torch.sqrt(torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(shape[1], dtype=torch.float64)[None, :] ** 2) / pixel_size_A
    return (k >= 1 / low_A) & (k <= 1 / high_A)


def band_power(image, pixel_size_A, low_A=8.0, high_A=4.0):
    spectrum = torch.fft.rfft2(image.double())
    return float((spectrum.abs() ** 2)[_band(image.shape, pixel_size_A, low_A, high_A)].sum())


def band_cross_power(a, b, pixel_size_A, low_A=8.0, high_A=4.0):
    """Re Σ A·B* over the band: the signal power shared by two images with independent noise."""
    band = _band(a.shape, pixel_size_A, low_A, high_A)
    return float((torch.fft.rfft2(a.double()) * torch.fft.rfft2(b.double()).conj()).real[band].sum())


def half_sum_signal(movie, pixel_size_A, shifts_A):
    """Signal power at 4-8 Å of a sum aligned with ``shifts_A``: even x odd half-sum cross-power."""
    model = MotionModel(shifts_A, shifts_A, tuple(movie.shape[1:]), pixel_size_A, 3)
    out = align_and_sum(movie, pixel_size_A, model, even_odd=True)
    return band_cross_power(out["even"], out["odd"], pixel_size_A)


def simulated_movies(data: Path):
    """(name, gain-corrected movie, true shifts (x, y) Å mean zero, pixel size, frame doses) per tilt."""
    config = json.loads((data / "truth" / "truth.json").read_text())["config"]
    pixel_size_A = float(config["pixel_size_A"])
    gain = torch.from_numpy(read_gain(data / "gain_ref.mrc", flip_y=True))  # stored upside down (truth/README)
    for shifts_csv in sorted((data / "truth").glob("*_frame_shifts.csv")):
        truth = pd.read_csv(shifts_csv)
        tilts = pd.read_csv(str(shifts_csv).replace("_frame_shifts.csv", "_tilts.csv"))
        for index, group in truth.groupby("acquisition_index"):
            tilt = tilts[tilts["acquisition_index"] == index].iloc[0]
            movie = apply_gain(torch.from_numpy(read_movie(data / group["movie"].iloc[0]).astype(np.float32)), gain)
            shifts = group.sort_values("frame")[["shift_x_A", "shift_y_A"]].to_numpy()
            shifts = torch.tensor(shifts - shifts.mean(0), dtype=torch.float32)
            doses = frame_dose_e_per_A2(float(tilt["pre_exposure_e_per_A2"]), float(tilt["dose_e_per_A2"]),
                                        movie.shape[0])
            yield group["movie"].iloc[0], movie, shifts, pixel_size_A, doses


def simulate_preset(preset: str, n_tilts: int | None) -> Path:
    """Simulate (once, cached in benchmarks/results) one tilt series of ``n_tilts`` tilts of ``preset``."""
    from tomopipe.simulate import config_from_preset, simulate

    overrides = {"n_tilt_series": 1}
    if n_tilts:
        step = float(config_from_preset(preset).tilt_step_deg)
        half = (n_tilts - 1) // 2
        overrides.update(tilt_min_deg=-half * step, tilt_max_deg=(n_tilts - 1 - half) * step)
    folder = RESULTS / f"motion_sim_{preset}_{n_tilts or 'all'}"
    if not (folder / "truth" / "truth.json").is_file():
        print(f"simulating preset {preset!r} with {overrides} into {folder} ...", flush=True)
        simulate(config_from_preset(preset, **overrides), folder, progress=False)
    return folder


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
    parser.add_argument("--source", choices=("simulate", "synthetic"), default="simulate")
    parser.add_argument("--preset", default="small", help="simulator preset (source simulate)")
    parser.add_argument("--data", type=Path, help="an already simulated folder (source simulate)")
    parser.add_argument("--tilts", type=int, default=4, help="tilt movies (0 with simulate: the whole preset)")
    parser.add_argument("--size", type=int, default=1024, help="frame side, px (synthetic)")
    parser.add_argument("--frames", type=int, default=10, help="frames per movie (synthetic)")
    parser.add_argument("--pixel-size", type=float, default=1.35, help="Å/px (synthetic)")
    parser.add_argument("--counts", type=float, default=0.6, help="e/px/frame (synthetic)")
    parser.add_argument("--contrast", type=float, default=0.15, help="texture SD / mean (synthetic)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip torch-motion-correction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peer = not args.no_peer
    if peer:
        try:
            import torch_motion_correction  # noqa: F401
        except ImportError:
            print("torch-motion-correction is not installed: pip install torch-motion-correction (or --no-peer)")
            peer = False

    if args.source == "simulate":
        data = args.data or simulate_preset(args.preset, args.tilts or None)
        movies = ((name, movie, truth, pix, doses, None, None)
                  for name, movie, truth, pix, doses in simulated_movies(data))
        what = f"simulated {data.name}"
    else:
        def synthetic():
            for tilt in range(args.tilts):
                movie, expected, truth, still = tilt_movie(args.size, args.frames, args.pixel_size, args.counts,
                                                           args.contrast, tilt)
                yield (f"synthetic_{tilt}", movie, truth, args.pixel_size,
                       frame_dose_e_per_A2(3.5 * tilt, 3.5, args.frames), expected, still)
        movies = synthetic()
        what = (f"synthetic {args.size}^2 px at {args.pixel_size} A/px, {args.frames} frames, "
                f"{args.counts} e/px/frame, contrast {args.contrast}")

    warm, _, _, _ = tilt_movie(128, 4, 1.0, 1.0, 0.2, 99)  # first-call overheads, not timed
    run_ours(warm, 1.0, None)
    if peer:
        run_peer(warm, 1.0)
    rows = []
    for name, movie, truth_A, pix, doses, expected, still in movies:
        model, estimate_s, ours_s, ours_cpu_s = run_ours(movie, pix, doses)
        if expected is not None:  # synthetic: noise-free frames
            reference = band_power(still, pix)

            def restored(shifts_A):
                m = MotionModel(shifts_A, shifts_A, tuple(movie.shape[1:]), pix, 3)
                return band_power(align_and_sum(expected, pix, m)["sum"], pix) / reference
        else:  # simulated: even x odd cross-power, relative to the true shifts
            reference = half_sum_signal(movie, pix, truth_A)

            def restored(shifts_A):
                return half_sum_signal(movie, pix, shifts_A) / reference
        row = {"movie": name, "frames": movie.shape[0], "size_px": f"{movie.shape[2]}x{movie.shape[1]}",
               "motion_A": float((truth_A[1:] - truth_A[:-1]).norm(dim=-1).sum()),
               "zero_rms_A": rms_A(torch.zeros_like(truth_A), truth_A),
               "rms_A": rms_A(model.shifts_A, truth_A), "raw_rms_A": rms_A(model.raw_shifts_A, truth_A),
               "restored_4_8A": restored(model.shifts_A), "unaligned_4_8A": restored(torch.zeros_like(truth_A)),
               "estimate_s": estimate_s, "seconds_per_movie": ours_s, "cpu_s_per_movie": ours_cpu_s}
        if peer:
            coarse, refined, coarse_s, refine_s, peer_s, peer_cpu_s = run_peer(movie, pix)
            row.update({"tmc_xc_rms_A": rms_A(coarse, truth_A), "tmc_rms_A": rms_A(refined, truth_A),
                        "tmc_restored_4_8A": restored(refined - refined.mean(0)),
                        "tmc_seconds_per_movie": peer_s, "tmc_cpu_s_per_movie": peer_cpu_s,
                        "time_ratio_tmc_over_ours": peer_s / ours_s,
                        "cpu_ratio_tmc_over_ours": peer_cpu_s / ours_cpu_s})
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    summary = {"movie": f"mean of {len(rows)}"}
    for key, value in rows[0].items():
        if isinstance(value, float):
            summary[key] = sum(r[key] for r in rows) / len(rows)
    summary["rms_A"] = math.sqrt(sum(r["rms_A"] ** 2 for r in rows) / len(rows))  # RMS over all frames
    if peer:
        summary["tmc_rms_A"] = math.sqrt(sum(r["tmc_rms_A"] ** 2 for r in rows) / len(rows))
        summary["time_ratio_tmc_over_ours"] = (sum(r["tmc_seconds_per_movie"] for r in rows)
                                               / sum(r["seconds_per_movie"] for r in rows))
        summary["cpu_ratio_tmc_over_ours"] = (sum(r["tmc_cpu_s_per_movie"] for r in rows)
                                              / sum(r["cpu_s_per_movie"] for r in rows))
    rows.append(summary)
    load = os.getloadavg()
    notes = (f"{what}; torch threads {args.threads}, device cpu, load average {load[0]:.1f} on {os.cpu_count()} "
             f"cores. Ours: seed parameters 1x1x3, 500-10 A, B -500, dose-weighted sum; seconds = estimate + sum. "
             f"tmc: torch-motion-correction global XC + estimate_local_motion (3,1,1), 100 iterations + "
             f"correct_motion; tmc_restored uses its shifts in our sum. zero_rms = error of 'no motion'. "
             f"Goal: rms <= 0.5 A, restored >= 0.9. Mean row: RMS of rms columns, ratio of summed times.")
    report(f"motion_{args.source}", rows, notes)


if __name__ == "__main__":
    main()
