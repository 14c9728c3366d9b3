"""Tomogram reconstruction (WBP): time and FSC on a phantom, and the speed of the back projector.

``--mode phantom`` (default): a set of Gaussian blobs (random positions in a slab, sigma 2 voxels)
whose views are their exact line integrals, projected with the RELION 5 model (an 85° tilt axis,
random shifts, ±60° in 3° steps). The tomogram is reconstructed with the seed parameters
(super-sampling 2) and without super-sampling, and with a SIRT-like filter (10 iterations); FSC
is computed on the central cube (edge = thickness) against the phantom at the same voxel size,
and the resolution limit reported is where the FSC drops below 0.5. ASTRA is compared in
``bench_astra.py`` (its own venv).

``--mode speed``: filter + back projection at the small preset's sizes (41 views, tilt axis
-85.9°, shifts and magnifications as after alignment): bin 10 (192 x 144 px, thickness 128) in
full, bin 4 (480 x 360, 320) and bin 2 (960 x 720, 640) on the first slabs of rows, extrapolated
to the whole volume (marked); both back projectors, the compiled (numba, CPU default) and torch
``grid_sample`` (the previous implementation, GPU path), with the largest difference between them.

    python benchmarks/bench_reconstruct.py [--mode phantom|speed] [--size 512] [--thickness 128] [--blobs 400]
        [--device cpu] [--threads 2] [--bins 10,4,2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A  # noqa: E402
from tomopipe.algorithms.geometry import project_points, projection_rotations  # noqa: E402
from tomopipe.algorithms.reconstruct import (  # noqa: E402
    ReconstructionParams,
    filter_tilt_images,
    iter_slabs,
    projection_matrices,
    reconstruct_volume,
    volume_shape_for,
)

#: the small preset's tilt series at bins 10, 4, 2: image (x, y) px, thickness, slab rows timed (0: all)
PRESET_SIZES = {10: (192, 144, 128, 0), 4: (480, 360, 320, 24), 2: (960, 720, 640, 6)}

SIGMA = 2.0


def phantom(size, thickness, n_blobs, seed, device):
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand((n_blobs, 3), generator=g, dtype=torch.float64) - 0.5) * torch.tensor(
        [0.8 * size, 0.8 * size, 0.6 * thickness], dtype=torch.float64)
    amps = 0.5 + torch.rand(n_blobs, generator=g, dtype=torch.float64)
    return centres.to(device), amps.to(device)


def volume_of(centres, amps, shape, device):
    nz, ny, nx = shape
    z = torch.arange(nz, dtype=torch.float32, device=device) - nz // 2
    y = torch.arange(ny, dtype=torch.float32, device=device) - ny // 2
    x = torch.arange(nx, dtype=torch.float32, device=device) - nx // 2
    v = torch.zeros(shape, dtype=torch.float32, device=device)
    r = int(4 * SIGMA) + 1
    for (cx, cy, cz), a in zip(centres.tolist(), amps.tolist()):
        ix, iy, iz = round(cx) + nx // 2, round(cy) + ny // 2, round(cz) + nz // 2
        sx, sy, sz = (slice(max(0, ix - r), ix + r + 1), slice(max(0, iy - r), iy + r + 1),
                      slice(max(0, iz - r), iz + r + 1))
        v[sz, sy, sx] += a * torch.exp(-((x[None, None, sx] - cx) ** 2 + (y[None, sy, None] - cy) ** 2
                                         + (z[sz, None, None] - cz) ** 2) / (2 * SIGMA**2))
    return v


def views_of(centres, amps, rot_z, rot_y, shifts_px, size, device):
    r = projection_rotations(rot_z, rot_y, 0.0)
    pts = project_points(centres, r, shifts_px)
    coords = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    images = torch.zeros((r.shape[0], size, size), dtype=torch.float32, device=device)
    rad = int(4 * SIGMA) + 1
    for i in range(r.shape[0]):
        for j, a in enumerate(amps.tolist()):
            px, py = float(pts[i, j, 0]), float(pts[i, j, 1])
            ix, iy = round(px) + size // 2, round(py) + size // 2
            sx, sy = slice(max(0, ix - rad), ix + rad + 1), slice(max(0, iy - rad), iy + rad + 1)
            images[i, sy, sx] += a * SIGMA * math.sqrt(2 * math.pi) * torch.exp(
                -((coords[None, sx] - px) ** 2 + (coords[sy, None] - py) ** 2) / (2 * SIGMA**2))
    return images


def speed(args, device):
    """Filter + back projection at the small preset's sizes, both back projectors (see the docstring)."""
    n = 41
    tilts = torch.linspace(-40.0, 40.0, n, dtype=torch.float64)
    g = torch.Generator().manual_seed(args.seed)
    rot_z = -85.9 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    shifts_px = torch.randn((n, 2), generator=g, dtype=torch.float64) * 10
    mag = 1 + torch.randn(n, generator=g, dtype=torch.float64) * 0.005
    backends = [("compiled (numba)", True), ("grid_sample (torch)", False)] if device.type == "cpu" else \
        [("grid_sample (torch)", False)]
    rows = []
    for binning in (int(b) for b in args.bins.split(",")):
        w, h, thickness, slab_rows = PRESET_SIZES[binning]
        images = torch.randn((n, h, w), generator=g).to(device)
        for ss in (1, 2):
            params = ReconstructionParams(thickness_px=thickness, super_sampling=ss, slab_rows=slab_rows or 0)
            m, t = projection_matrices(rot_z, tilts, 0.0, shifts_px, 1.0, mag, params)
            shape = volume_shape_for((w, h), float(rot_z.mean()), params)
            start = time.perf_counter()
            filtered = filter_tilt_images(images, rot_z, tilts, 1.0, thickness)
            filter_s = time.perf_counter() - start
            results = {}
            for label, compiled in backends:
                if compiled:  # compile (cached on disk after the first run) outside the timing
                    next(iter_slabs(filtered[:, :8], m, t, (4, 4, 4), ReconstructionParams(thickness_px=4),
                                    use_compiled=True))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                done, pieces = 0, []
                for y0, y1, slab in iter_slabs(filtered, m, t, shape, params, use_compiled=compiled):
                    pieces.append(slab)
                    done = y1
                    if slab_rows and done >= slab_rows:
                        break
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) * shape[1] / done
                results[label] = torch.cat(pieces, dim=1).cpu()
                rows.append({"bin": binning, "volume_xyz": f"{shape[2]}x{shape[1]}x{shape[0]}", "views": n,
                             "super_sampling": ss, "backprojector": label, "device": str(device),
                             "threads": torch.get_num_threads(), "filter_s": filter_s, "backproject_s": seconds,
                             "extrapolated_from_rows": done if done < shape[1] else "",
                             "M_voxel_views_per_s": shape[0] * shape[1] * shape[2] * n / seconds / 1e6})
            if len(results) == 2:
                a, b = results.values()
                rows[-1]["max_diff_rel"] = rows[-2]["max_diff_rel"] = float((a - b).abs().max() / b.abs().max())
    report(f"reconstruct_speed_{device.type}", rows,
           notes="41 random views, axis -85.9 deg, shifts, magnifications; backproject_s for the whole volume "
                 "(extrapolated from the first slabs where marked: for super-sampling 2 an upper bound, its "
                 "super-sampled lines of all rows are made before the first slab); max_diff_rel: largest "
                 "difference between the two back projectors over the largest value")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("phantom", "speed"), default="phantom")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--thickness", type=int, default=128)
    ap.add_argument("--blobs", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bins", default="10,4,2", help="speed mode: binnings of the small preset to time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.mode == "speed":
        speed(args, device)
        return
    tilts = torch.arange(-60.0, 61.0, 3.0, dtype=torch.float64)
    n = len(tilts)
    g = torch.Generator().manual_seed(args.seed + 1)
    shifts_px = (torch.rand((n, 2), generator=g, dtype=torch.float64) - 0.5) * 20
    rot_z = torch.full((n,), 85.0, dtype=torch.float64)
    centres, amps = phantom(args.size, args.thickness, args.blobs, args.seed, "cpu")
    images = views_of(centres, amps, rot_z, tilts, shifts_px, args.size, "cpu").to(device)
    truth = volume_of(centres, amps, (args.thickness, args.size, args.size), "cpu")
    t, c = args.thickness, args.size // 2
    cube = (slice(None), slice(c - t // 2, c - t // 2 + t), slice(c - t // 2, c - t // 2 + t))
    rows = []
    for label, params in (("seed (ss 2)", ReconstructionParams(thickness_px=t, super_sampling=2)),
                          ("ss 1", ReconstructionParams(thickness_px=t, super_sampling=1)),
                          ("ss 2, SIRT-like 10", ReconstructionParams(thickness_px=t, super_sampling=2,
                                                                       sirt_like_iterations=10))):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        volume = reconstruct_volume(images, rot_z, tilts, 0.0, shifts_px, 1.0, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        volume = volume.cpu()
        curve = fsc(volume[cube].double(), truth[cube].double())
        correlation = float(torch.corrcoef(torch.stack([volume.flatten().double(), truth.flatten().double()]))[0, 1])
        rows.append({"method": label, "device": str(device), "volume_xyz": f"{args.size}x{args.size}x{t}",
                     "views": n, "seconds": seconds,
                     "Mvoxel_views_per_s": args.size * args.size * t * n / seconds / 1e6,
                     "correlation": correlation, "fsc_0.5_A": fsc_resolution_A(curve, 1.0, 0.5),
                     "fsc_mean_to_0.25": float(curve[1: t // 4 + 1].mean())})
    report(f"reconstruct_{device.type}", rows,
           notes="phantom: Gaussian blobs (sigma 2 voxels), exact line-integral views, RELION 5 model, "
                 "axis 85 deg, random shifts, +-60 deg / 3 deg; FSC on the central cube vs the true volume, "
                 "1 A voxels (resolution in voxels)")


if __name__ == "__main__":
    main()
