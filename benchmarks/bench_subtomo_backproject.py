"""Speed of Fourier insertion (:class:`tomopipe.algorithms.subtomo.backproject.FourierAccumulator`).

Inserts 10,000 slices of a 64-px box (random spectra and orientations; the work does not depend on
the content) into a pad-2 accumulator, two ways: the 64² spectra themselves (RELION's way) and the
images zero-padded to 128² first (the exact path, 4x the samples); then the symmetrisation (``--symmetry``,
e.g. O; C1 skips it) and one reconstruction.
Seconds per thread count (torch and numba) on the CPU (compiled kernel), or on a GPU (torch). A small warm-up run
(kernel compilation) is not timed.

    python benchmarks/bench_subtomo_backproject.py [--slices 10000] [--box 64] [--threads 1,2] [--device cpu]
        [--symmetry O]
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
from tomopipe.algorithms.geometry import random_rotations  # noqa: E402
from tomopipe.algorithms.subtomo.backproject import FourierAccumulator, centred_rfft2  # noqa: E402


def _seconds(box: int, spectra: torch.Tensor, rotations: torch.Tensor, device: str, symmetry: str) -> dict:
    """Wall seconds of the insertion, symmetrisation and reconstruction, and the process CPU seconds of all."""
    acc = FourierAccumulator(box, device=device)
    cpu = time.process_time()
    marks = [time.perf_counter()]
    for work in (lambda: acc.insert(spectra, rotations), lambda: symmetry != "C1" and acc.symmetrise(symmetry),
                 acc.reconstruct):
        work()
        if device != "cpu":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    return {"insert_s": marks[1] - marks[0], "symmetrise_s": marks[2] - marks[1], "reconstruct_s": marks[3] - marks[2],
            "cpu_s": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=10000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--symmetry", default="O")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((args.slices, args.box, args.box), generator=generator)
    rotations = random_rotations(args.slices, generator=generator, dtype=torch.float32)
    rows = []
    for label, size in (("box", args.box), ("padded", 2 * args.box)):
        spectra = centred_rfft2(images, size)
        _seconds(args.box, spectra[:8], rotations[:8], args.device, args.symmetry)  # warm-up: compilation
        for threads in [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [0]:
            if threads:
                torch.set_num_threads(threads)
                numba.set_num_threads(threads)
            seconds = _seconds(args.box, spectra, rotations, args.device, args.symmetry)
            rows.append({"slices": label, "spectrum": f"{size}x{size // 2 + 1}", "device": args.device,
                         "threads": threads or "", **seconds, "us_per_slice": 1e6 * seconds["insert_s"] / args.slices})
    report("subtomo_backproject_speed", rows, f"{args.slices} slices, box {args.box}, pad 2, density compensation, "
                                              f"symmetry {args.symmetry}")


if __name__ == "__main__":
    main()
