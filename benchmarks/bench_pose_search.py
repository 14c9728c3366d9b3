"""Speed of the auto-refine pose search (:mod:`tomopipe.algorithms.subtomo.pose_search`).

The work does not depend on the content, so the crops are random spectra and the reference a random
volume; CTF weights of one and a white noise spectrum. Three measurements:

1. throughput: one shared grid of rotations (slices sampled once per rotation·tilt) scored against
   particles × tilts at box 24 up to 60 Å (bin 10, 13.5 Å pixels: 5.4 px), with 1 shift and with the 27
   shifts of a 3 × 3 × 3 grid: particles · tilts · rotations (· shifts) per second, per thread count;
2. the global search of the seed at bin 10: 7.5° on O's asymmetric unit, offsets 5 px in steps of 1 px,
   60 Å, 300 particles × 41 tilts, box 24 (:func:`coarse_to_fine_search` without local stages: the
   marching pass at half the band with 2-px offsets, then the 8 best rotations at the full band);
3. local searches at bin 4 (5.4 Å pixels, box 64, 12 Å: 28.8 px): 1.875° within 3.75° around the 2
   best rotations, offsets 1 px in steps of 0.5 px, 300 particles × 41 tilts.

    python benchmarks/bench_pose_search.py [--particles 300] [--tilts 41] [--threads 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.algorithms._numba import numba  # noqa: E402
from tomopipe.algorithms.fourier_slice import FourierSliceProjector  # noqa: E402
from tomopipe.algorithms.geometry import projection_rotations, random_rotations  # noqa: E402
from tomopipe.algorithms.so3 import so3_grid  # noqa: E402
from tomopipe.algorithms.subtomo.pose_search import (  # noqa: E402
    ParticleStacks,
    coarse_to_fine_search,
    local_search,
    search_poses,
    shift_grid_A,
)


def _problem(particles: int, tilts: int, box: int, pixel_A: float, device: str):
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn((box,) * 3, generator=generator).to(device)
    projector = FourierSliceProjector(volume, pixel_A, pad_factor=2)
    angles = torch.linspace(-60.0, 60.0, tilts, dtype=torch.float64)
    rotations = projection_rotations(torch.full((tilts,), 85.0, dtype=torch.float64), angles, 0.0).float()
    spectrum = (particles, tilts, box, box // 2 + 1)
    crops = torch.complex(torch.randn(spectrum, generator=generator), torch.randn(spectrum, generator=generator))
    data = ParticleStacks(crops.to(device), torch.ones(spectrum, device=device), rotations, pixel_A,
                          torch.ones(box // 2 + 1))
    return projector, data


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    m, n = args.particles, args.tilts
    thread_counts = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [0]
    coarse, coarse_max_px = _problem(m, n, 24, 13.5, args.device), 24 * 13.5 / 60.0
    fine, fine_max_px = _problem(m, n, 64, 5.4, args.device), 64 * 5.4 / 12.0
    grid = so3_grid(30.0)
    search_poses(*coarse, grid[:4], shift_grid_A(0.0, 1.0), coarse_max_px)  # warm-up: kernel compilation
    previous = random_rotations(m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
        for label, shifts in (("1 shift", shift_grid_A(0.0, 13.5)), ("27 shifts", shift_grid_A(13.5 * 3**0.5, 13.5))):
            seconds = _timed(lambda: search_poses(*coarse, grid, shifts, coarse_max_px))  # noqa: B023
            rows.append({"measure": f"throughput, box 24, {label}", "threads": threads or "",
                         "rotations": grid.shape[0], "seconds": seconds,
                         "particle_tilt_rotations_per_s": m * n * grid.shape[0] / seconds})
        seconds = _timed(lambda: coarse_to_fine_search(*coarse, symmetry="O", global_step_deg=7.5, local_steps_deg=(),
                                                       offset_range_A=5 * 13.5, offset_step_A=13.5,
                                                       max_frequency_px=coarse_max_px))
        rows.append({"measure": "global 7.5 deg O, box 24, 60 A, offsets 5 px / 1 px", "threads": threads or "",
                     "seconds": seconds})
        centres = torch.stack([previous, previous], dim=1)
        seconds = _timed(lambda: local_search(*fine, centres, torch.zeros((m, 3), dtype=torch.float64), 1.875,
                                              3.75, 5.4, 2.7, fine_max_px))
        rows.append({"measure": "local 1.875 deg within 3.75 deg x 2 centres, box 64, 12 A, offsets 1 px / 0.5 px",
                     "threads": threads or "", "seconds": seconds})
    report("pose_search_speed", rows, f"{m} particles x {n} tilts on {args.device}")


if __name__ == "__main__":
    main()
