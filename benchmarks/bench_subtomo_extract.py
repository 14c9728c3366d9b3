"""Speed of particle extraction from a tilt series (:func:`tomopipe.algorithms.subtomo.extract.extract_crops`).

The small data set's case by default: 300 particles x 41 tilts (±60°, step 3°) of a 1920 x 1440
series at 0.79 Å, binned 2 (1.58 Å), box 128, crop 64, CTF premultiplication, dose weighting and
circular crop on. The images are noise (the work does not depend on the content); the tilt images
are read through a callable, as a step reading MRC sections would. Seconds per thread count (CPU)
or on a GPU; a small warm-up run is not timed.

    python benchmarks/bench_subtomo_extract.py [--particles 300] [--size 1920,1440] [--box 128]
                                               [--crop 64] [--binning 2] [--batch 64] [--threads 1,2]
                                               [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.algorithms.subtomo.extract import TiltGeometry, extract_crops  # noqa: E402

PIXEL_A = 0.79


def _geometry(nx: int, ny: int) -> TiltGeometry:
    tilts = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
    n = tilts.numel()
    order = torch.argsort(torch.argsort(tilts.abs()))  # dose-symmetric-like: low tilts first
    return TiltGeometry.from_alignment(
        85.0, tilts, 0.0, torch.zeros(n, 2), defocus_u_A=torch.full((n,), 30500.0),
        defocus_v_A=torch.full((n,), 29500.0), defocus_angle_deg=torch.full((n,), 30.0),
        pre_exposure_e_per_A2=3.0 * order.double(), defocus_hand=-1, pixel_size_A=PIXEL_A, image_size_px=(nx, ny),
        voltage_kV=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1)


def _positions(count: int, nx: int, ny: int, margin_A: float, generator: torch.Generator) -> torch.Tensor:
    half = torch.tensor([0.5 * nx * PIXEL_A - margin_A, 0.5 * ny * PIXEL_A - margin_A, 250.0])
    return (2.0 * torch.rand((count, 3), generator=generator, dtype=torch.float64) - 1.0) * half.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--size", default="1920,1440", help="tilt image nx,ny (pixels)")
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--binning", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    nx, ny = (int(v) for v in args.size.split(","))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    geometry = _geometry(nx, ny)
    stack = torch.randn((geometry.n_tilts, ny, nx), generator=generator).to(device)
    positions = _positions(args.particles, nx, ny, args.box * args.binning * PIXEL_A, generator)

    def run(count: int) -> float:
        start = time.perf_counter()
        result = extract_crops(lambda i: stack[i], geometry, positions[:count], args.box, args.crop,
                               binning=args.binning, batch_size=args.batch, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert result.n_dropped == 0, f"{result.n_dropped} particles dropped: the test geometry is wrong"
        return seconds

    rows = []
    for threads in ([0] if device.type == "cuda" else [int(t) for t in args.threads.split(",")]):
        if threads:
            torch.set_num_threads(threads)
        run(4)  # warm-up
        seconds = run(args.particles)
        rows.append({"device": str(device), "threads": threads or "-", "particles": args.particles,
                     "tilts": geometry.n_tilts, "image": f"{nx}x{ny}", "binning": args.binning, "box": args.box,
                     "crop": args.crop, "batch": args.batch, "seconds": seconds,
                     "ms_per_particle_tilt": 1000.0 * seconds / (args.particles * geometry.n_tilts)})
    report("subtomo_extract_speed", rows, "CTF-premultiplied, dose-weighted, circle-cropped 2-D crops")


if __name__ == "__main__":
    main()
