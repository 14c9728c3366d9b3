"""Speed of the template-matching search (:func:`tomopipe.algorithms.picking.match.match_template`).

Seconds per 1,000 rotations on a noise tomogram (the search does not depend on the content), with a
spherical mask (local statistics computed once) and a ±60° wedge / CTF weight, with and without the
random-phase background correction (which doubles the correlations), per thread count (CPU) or on
a GPU. The first batch is a warm-up and is not timed; wall and CPU (process) time are reported.

    python benchmarks/bench_match_template.py [--shape 128,192,144] [--box 24] [--rotations 64]
                                              [--batch 8] [--threads 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.algorithms.geometry import random_rotations  # noqa: E402
from tomopipe.algorithms.picking.match import match_template  # noqa: E402
from tomopipe.algorithms.picking.template import shell_template, spherical_mask  # noqa: E402
from tomopipe.algorithms.picking.weighting import tilt_weight_rfftn  # noqa: E402

VOXEL_A = 10.0


def _seconds_per_1000(tomogram, template, mask, rotations, weight, batch: int, correction: bool) -> tuple:
    def run(r):
        match_template(tomogram, template, mask, r, weight, background_correction=correction, batch_size=batch,
                       generator=torch.Generator(device=tomogram.device).manual_seed(0))
        if tomogram.is_cuda:
            torch.cuda.synchronize()

    run(rotations[:batch])  # warm-up (FFT plans, allocations)
    start, cpu_start = time.perf_counter(), time.process_time()
    run(rotations)
    per_1000 = 1000.0 / rotations.shape[0]
    return per_1000 * (time.perf_counter() - start), per_1000 * (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,192,144", help="tomogram z,y,x (voxels)")
    parser.add_argument("--box", type=int, default=24)
    parser.add_argument("--rotations", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    tomogram = torch.randn(shape, generator=generator).to(device)
    template = shell_template(args.box, VOXEL_A, 0.8 * args.box * VOXEL_A, 0.5 * args.box * VOXEL_A).to(device)
    mask = spherical_mask(args.box, VOXEL_A, 0.9 * args.box * VOXEL_A, 2 * VOXEL_A).to(device)
    weight = tilt_weight_rfftn(args.box, VOXEL_A, torch.arange(-60.0, 60.1, 3.0), 30000.0, 0.0, 300.0, 2.7,
                               0.07).to(device)
    rotations = random_rotations(args.rotations, generator).to(device)
    rows = []
    for threads in ([0] if device.type == "cuda" else [int(t) for t in args.threads.split(",")]):
        if threads:
            torch.set_num_threads(threads)
        for correction in (False, True):
            wall, cpu = _seconds_per_1000(tomogram, template, mask, rotations, weight, args.batch, correction)
            rows.append({"device": str(device), "threads": threads or "-", "shape": "x".join(map(str, shape)),
                         "box": args.box, "batch": args.batch, "background_correction": correction,
                         "s_per_1000_rotations": wall, "cpu_s_per_1000_rotations": cpu})
    report("match_template_speed", rows, f"{args.rotations} rotations timed after a warm-up batch; CPU time is "
           "of all threads (on a shared machine wall time grows with the load, CPU time much less)")


if __name__ == "__main__":
    main()
