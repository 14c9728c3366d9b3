"""De novo initial model (:func:`tomopipe.algorithms.subtomo.initial_model.initial_model`) on the seed's sizes.

Synthetic 3-D pseudo-subtomograms (the generator of ``tests/test_subtomo_initial_model.py``) of the
6Z6U apoferritin potential at bin 10 (7.9 Å, box 24): 300 particles with random poses and offsets
(±1 px), 41 tilts over ±60°, white noise at the given per-image SNR, no CTF. The seed's settings:
40 mini-batches, T = 4, mask 150 Å, symmetry O. Scores against the truth: the result aligned to
the true map (:func:`align_volumes`, both hands), the resolution where their FSC crosses 0.5, the
hand, and the median pose error modulo O; time and peak memory (CPU: max RSS) per run.

    python benchmarks/bench_initial_model.py [--particles 300] [--snr 0.1] [--threads 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from _report import report  # noqa: E402
from test_subtomo_initial_model import synthetic_particles  # noqa: E402  (the generator lives with the tests)
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A  # noqa: E402
from tomopipe.algorithms.picking.template import template_from_atomic_model  # noqa: E402
from tomopipe.algorithms.subtomo.initial_model import align_volumes, initial_model  # noqa: E402
from tomopipe.algorithms.symmetry import misorientation_deg  # noqa: E402
from tomopipe.data import APOFERRITIN_MODEL  # noqa: E402
from tomopipe.io.atomic_model import read_atomic_model  # noqa: E402

PIXEL_A, BOX = 7.9, 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    truth = template_from_atomic_model(read_atomic_model(APOFERRITIN_MODEL), PIXEL_A, BOX)
    start = time.perf_counter()
    data, weights, poses, _ = synthetic_particles(truth, args.particles, args.snr, pixel_size_A=PIXEL_A,
                                                  tilts_deg=torch.arange(-60.0, 61.0, 3.0))
    print(f"synthetic data: {time.perf_counter() - start:.1f} s")
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        if args.device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = initial_model(data, weights, PIXEL_A, mask_diameter_A=150.0, symmetry="O",
                               n_iterations=args.iterations, batch_size=args.batch, tau2_fudge=4.0,
                               generator=torch.Generator().manual_seed(0), device=args.device)
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        memory_MB = (torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        volume = result.volume.cpu()
        alignment = align_volumes(volume, truth, symmetry="O", step_deg=10.0)
        in_truth_frame = result.rotations.cpu().double() @ alignment.rotation.double().T
        rows.append({"device": args.device, "threads": threads, "particles": args.particles, "snr": args.snr,
                     "iterations": args.iterations, "batch": args.batch, "seconds": seconds,
                     "peak_memory_MB": memory_MB,
                     "fsc05_vs_truth_A": fsc_resolution_A(fsc(alignment.aligned, truth), PIXEL_A, 0.5),
                     "nyquist_A": 2 * PIXEL_A, "final_resolution_A": result.log[-1].resolution_A,
                     "mirrored": alignment.mirrored, "correlation": alignment.correlation,
                     "other_hand_correlation": alignment.other_hand_correlation,
                     "median_pose_error_deg": float(misorientation_deg(in_truth_frame, poses.double(), "O").median())})
    report("initial_model", rows, notes="de novo initial model, 6Z6U at 7.9 Å box 24, O, T = 4, mask 150 Å")


if __name__ == "__main__":
    main()
