"""Our reconstruction side by side with ASTRA Toolbox (2-D parallel beam, CPU), on one aligned input.

ASTRA is GPL-3.0 and a benchmark peer only: it lives in its own venv (``bash
benchmarks/setup_astra_venv.sh`` makes ``benchmarks/.venv-astra``) and runs in a subprocess of
this script (``--astra-worker``, which imports numpy and astra only); arrays go through .npy files
in a temporary folder, so the project's venv never imports astra. Only ASTRA's 2-D CPU algorithms
are used (its 3-D ones are CUDA-only).

Input, the same for both programs: an aligned stack (tilt axis along y, odd width so that the
centre N//2 of tomopipe and the centre (N-1)/2 of ASTRA coincide) and its tilt angles.

* ``real``: the small preset's bin-10 tilt series (``--project``, the aligned set of ``--run``),
  interpolated into the aligned frame (bicubic) from its alignment columns; scored against the
  simulator's true specimen (:mod:`tomopipe.validate.tomogram`, contrast -1, correlation
  low-passed to ``--resolution-A``, best translation).
* ``phantom``: Gaussian blobs in a slab with exact line-integral views (``bench_reconstruct``),
  ±40° in 2° steps as the small preset; scored against the blob volume (contrast +1).

Methods: ours = :func:`tomopipe.algorithms.reconstruct.reconstruct_volume` (WBP with IMOD's radial
filter, the seed's cutoff 0.35 and, like Ram-Lak, the ramp up to Nyquist; SIRT-like filter with N
iterations), ASTRA = ``FBP`` (Ram-Lak) and ``SIRT`` (N iterations)
slice by slice with the ``linear`` projector. ASTRA's geometry (angle sign, row direction) is
checked by projecting a single voxel before use. Times are the reconstruction alone (ours: filter
+ back projection, best of 3; ASTRA: its per-slice loop, best of 2 for FBP), without file exchange
or process start; ASTRA's CPU 2-D algorithms run on one thread, ours on ``--threads`` and on one
thread (like for like). On an aligned stack our compiled kernel blends the two image rows once
per volume row. ``real`` also times the workflow's own path: the raw (bin-10) views with their
alignment columns and the seed's super-sampling 2, as ``reconstruct_tomogram`` runs it (the
views read along super-sampled lines; no interpolated stack), against ASTRA on the aligned stack
(ASTRA's time leaves out making that stack).

    bash benchmarks/setup_astra_venv.sh        # once
    python benchmarks/bench_astra.py [--data real,phantom] [--threads 2] [--sirt-iterations 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ASTRA_PYTHON = HERE / ".venv-astra" / "bin" / "python"


# ----------------------------------------------------------------------------- ASTRA side
def astra_worker(folder: Path) -> None:
    """Runs in benchmarks/.venv-astra: reconstruct ``aligned.npy`` slice by slice as ``job.json`` says."""
    import astra

    job = json.loads((folder / "job.json").read_text())
    stack = np.load(folder / "aligned.npy").astype(np.float32)  # [n, ny, nx]
    tilts = np.radians(np.asarray(job["tilt_angles_deg"], dtype=np.float64))
    n, ny, nx = stack.shape
    nz = int(job["thickness_px"])
    if nx % 2 == 0 or nz % 2 == 0:
        raise SystemExit("astra worker: width and thickness must be odd (shared centre)")
    vol_geom = astra.create_vol_geom(nz, nx)  # rows = our z, columns = our x

    def geometry(sign):
        proj_geom = astra.create_proj_geom("parallel", 1.0, nx, sign * tilts)
        return proj_geom, astra.create_projector("linear", proj_geom, vol_geom)

    # which ASTRA angle sign and row direction give our model u = cos(t)·x + sin(t)·z?
    probe = np.zeros((nz, nx), dtype=np.float32)
    r0, c0 = nz // 2 + min(5, nz // 4), nx // 2 + min(9, nx // 4)
    probe[r0, c0] = 1.0
    choice = None
    for sign in (1.0, -1.0):
        proj_geom, projector = geometry(sign)
        sino_id, sino = astra.create_sino(probe, projector)
        astra.data2d.delete(sino_id)
        detector = np.arange(nx) - nx // 2
        found = (sino * detector).sum(1) / sino.sum(1)
        for row_direction in (1, -1):
            want = np.cos(tilts) * (c0 - nx // 2) + np.sin(tilts) * row_direction * (r0 - nz // 2)
            if np.abs(found - want).max() < 0.25:
                choice = (sign, row_direction)
        astra.projector.delete(projector)
        if choice:
            break
    if choice is None:
        raise SystemExit("astra worker: no angle sign / row direction reproduces the projection model")
    sign, row_direction = choice
    proj_geom, projector = geometry(sign)
    results = {"astra_version": astra.__version__, "angle_sign": sign, "row_direction": row_direction}
    for method in job["methods"]:
        kind, iterations = method["astra"], int(method.get("iterations", 1))
        out = np.empty((nz, ny, nx), dtype=np.float32)
        best = (math.inf, math.inf)
        for _ in range(int(method.get("repeats", 1))):
            wall, cpu = time.perf_counter(), time.process_time()
            _astra_slices(astra, kind, iterations, method, stack, proj_geom, vol_geom, projector, out)
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
        results[method["name"]] = {"seconds": best[0], "cpu_seconds": best[1]}
        if row_direction < 0:
            out = out[::-1]
        np.save(folder / f"{method['name']}.npy", np.ascontiguousarray(out))
    astra.projector.delete(projector)
    (folder / "result.json").write_text(json.dumps(results))


def _astra_slices(astra, kind, iterations, method, stack, proj_geom, vol_geom, projector, out):
    """One ASTRA 2-D reconstruction per row of the aligned stack, into ``out[:, y, :]``."""
    for y in range(stack.shape[1]):
        sino_id = astra.data2d.create("-sino", proj_geom, stack[:, y, :])
        rec_id = astra.data2d.create("-vol", vol_geom, 0.0)
        cfg = astra.astra_dict(kind)
        cfg["ProjectorId"] = projector
        cfg["ProjectionDataId"] = sino_id
        cfg["ReconstructionDataId"] = rec_id
        if kind == "FBP":
            cfg["option"] = {"FilterType": method.get("filter", "ram-lak")}
        alg = astra.algorithm.create(cfg)
        astra.algorithm.run(alg, iterations)
        out[:, y, :] = astra.data2d.get(rec_id)
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, rec_id])


def run_astra(stack: np.ndarray, tilt_angles_deg, thickness_px: int, methods: list[dict]) -> tuple[dict, dict]:
    """ASTRA in its venv through a subprocess: ``({name: volume [z, y, x]}, info with times)``."""
    if not ASTRA_PYTHON.is_file():
        raise SystemExit(f"{ASTRA_PYTHON} not found: run `bash benchmarks/setup_astra_venv.sh` first")
    with tempfile.TemporaryDirectory(prefix="bench-astra-") as tmp:
        folder = Path(tmp)
        np.save(folder / "aligned.npy", np.ascontiguousarray(stack, dtype=np.float32))
        (folder / "job.json").write_text(json.dumps({"tilt_angles_deg": [float(a) for a in tilt_angles_deg],
                                                     "thickness_px": int(thickness_px), "methods": methods}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env["OMP_NUM_THREADS"] = "1"
        subprocess.run([str(ASTRA_PYTHON), str(Path(__file__).resolve()), "--astra-worker", str(folder)],
                       check=True, env=env)
        info = json.loads((folder / "result.json").read_text())
        volumes = {m["name"]: np.load(folder / f"{m['name']}.npy") for m in methods}
    return volumes, info


# ----------------------------------------------------------------------------- inputs
def aligned_stack(images, rot_z_deg, shifts_px, magnification, width_px: int, height_px: int):
    """``aligned(X) = raw(m·R2(rot_z)·X + shift + N//2)`` (bicubic, zeros outside), X from the
    aligned centre ``(width//2, height//2)``: the tilt axis along +y."""
    import torch
    import torch.nn.functional as F

    from tomopipe.algorithms.geometry import rotation_2d

    n, h, w = images.shape
    xs = torch.arange(width_px, dtype=torch.float64) - width_px // 2
    ys = torch.arange(height_px, dtype=torch.float64) - height_px // 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy], -1).reshape(-1, 2)  # (x, y)
    out = torch.empty((n, height_px, width_px), dtype=torch.float32)
    for i in range(n):
        r = rotation_2d(torch.tensor(float(rot_z_deg[i]), dtype=torch.float64)) * float(magnification[i])
        raw = points @ r.T + shifts_px[i] + torch.tensor([w // 2, h // 2], dtype=torch.float64)
        grid = torch.stack([2 * raw[:, 0] / (w - 1) - 1, 2 * raw[:, 1] / (h - 1) - 1], -1).float()
        sampled = F.grid_sample(images[i][None, None].float(), grid.reshape(1, height_px, width_px, 2),
                                mode="bicubic", padding_mode="zeros", align_corners=True)
        out[i] = sampled[0, 0]
    return out


def real_input(project_path: str, run: int, ts_id: str):
    """The aligned views of ``ts_id`` in run ``run`` (a tilt_series set with alignment columns)."""
    import torch

    from tomopipe.io.mrc import read_mrc
    from tomopipe.project.store import Project

    project = Project.open(project_path)
    sets = project.sets_of_run(run)
    if "tilt_series" not in sets:
        raise SystemExit(f"run {run} of {project_path} has no tilt_series output")
    record = sets["tilt_series"]
    items = project.read_items(record.id, enabled_only=True)
    items = items[items["ts_id"] == ts_id].sort_values("tilt_index")
    if items.empty or "rot_z_deg" not in items:
        raise SystemExit(f"{ts_id}: no aligned views in run {run}")
    if "rot_x_deg" in items and float(items["rot_x_deg"].fillna(0).abs().max()) > 1e-3:
        raise SystemExit(f"{ts_id}: x-tilt present; slice-by-slice 2-D reconstruction needs rot_x = 0")
    stack, _ = read_mrc(project.absolute_path(items["image_path"].iloc[0]))
    images = torch.from_numpy(np.ascontiguousarray(stack[items["image_section"].to_numpy()], dtype=np.float32))
    pixel_A = float(record.attrs["tilt_series"][ts_id]["pixel_size_A"])
    rot_z = items["rot_z_deg"].to_numpy(float)
    shifts_px = torch.tensor(items[["shift_x_A", "shift_y_A"]].to_numpy(float) / pixel_A)
    mag = items["magnification"].fillna(1.0).to_numpy(float) if "magnification" in items else np.ones(len(items))
    return images, rot_z, items["rot_y_deg"].to_numpy(float), shifts_px, mag, pixel_A


# ----------------------------------------------------------------------------- benchmark
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--astra-worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="real,phantom")
    ap.add_argument("--project", default="/tmp/demo_small/project",
                    help="a project of `tomopipe demo --preset small --until reconstruct`")
    ap.add_argument("--run", type=int, default=6, help="run whose tilt_series output holds the aligned bin-10 views")
    ap.add_argument("--truth", default="/tmp/demo_small/data")
    ap.add_argument("--ts", default="TS_01")
    ap.add_argument("--thickness", type=int, default=127, help="odd (the shared centre)")
    ap.add_argument("--resolution-A", type=float, default=30.0, help="low-pass of the real-space correlation (real)")
    ap.add_argument("--phantom-size", type=int, default=255)
    ap.add_argument("--phantom-blobs", type=int, default=300)
    ap.add_argument("--sirt-iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.astra_worker:
        astra_worker(Path(args.astra_worker))
        return
    if args.thickness % 2 == 0:
        raise SystemExit("--thickness must be odd")

    import torch

    sys.path.insert(0, str(HERE))
    from _report import report  # noqa: E402
    from tomopipe.algorithms.reconstruct import ReconstructionParams, reconstruct_volume
    from tomopipe.validate.tomogram import score_tomogram, true_specimen_for_tomogram
    from tomopipe.validate.truth import Truth

    n_sirt = args.sirt_iterations
    methods = [{"name": "astra_fbp", "astra": "FBP", "filter": "ram-lak", "repeats": 2},
               {"name": "astra_sirt", "astra": "SIRT", "iterations": n_sirt}]
    rows = []
    for data in [d.strip() for d in args.data.split(",") if d.strip()]:
        if data == "real":
            images, rot_z, rot_y, shifts_px, mag, voxel_A = real_input(args.project, args.run, args.ts)
            axis_near_x = abs(math.sin(math.radians(float(np.mean(rot_z))))) > math.sqrt(0.5)
            height, across = (images.shape[-1], images.shape[-2]) if axis_near_x else images.shape[-2:]
            width = across - (1 - across % 2)  # odd
            stack = aligned_stack(images, rot_z, shifts_px, mag, width, height)
            tilts = torch.tensor(rot_y, dtype=torch.float64)
            truth = Truth.find(args.truth)

            def truth_for(shape, _truth=truth, _voxel=voxel_A, _ts=args.ts):
                return true_specimen_for_tomogram(_truth, _ts, shape, _voxel)

            sign, resolution = -1, args.resolution_A
            label = f"{args.ts} bin-10 aligned stack ({width}x{height}, {len(tilts)} views)"
            raw = (images, torch.tensor(rot_z), shifts_px * voxel_A, torch.tensor(mag))
        elif data == "phantom":
            from bench_reconstruct import phantom, views_of, volume_of

            size, voxel_A = args.phantom_size | 1, 1.0
            tilts = torch.arange(-40.0, 40.01, 2.0, dtype=torch.float64)
            centres, amps = phantom(size, args.thickness, args.phantom_blobs, 0, "cpu")
            stack = views_of(centres, amps, torch.zeros(len(tilts), dtype=torch.float64), tilts,
                             torch.zeros((len(tilts), 2), dtype=torch.float64), size, "cpu")

            def truth_for(shape, _c=centres, _a=amps):
                return volume_of(_c, _a, tuple(shape), "cpu")

            sign, resolution = 1, 4.0 * voxel_A
            width = height = size
            raw = None
            label = f"blob phantom ({size}x{size}, {len(tilts)} views, +-40 deg)"
        else:
            raise SystemExit(f"--data: unknown {data!r} (real, phantom)")
        n = len(tilts)
        zeros = torch.zeros((n, 2), dtype=torch.float64)
        volumes, timing = {}, {}
        for name, params, threads in (
                ("ours WBP ss1", ReconstructionParams(thickness_px=args.thickness, super_sampling=1), 1),
                ("ours WBP ss1", ReconstructionParams(thickness_px=args.thickness, super_sampling=1), args.threads),
                ("ours WBP ss2 (default)", ReconstructionParams(thickness_px=args.thickness), args.threads),
                ("ours WBP ss1 ramp to Nyquist", ReconstructionParams(thickness_px=args.thickness, super_sampling=1,
                                                                      radial_cutoff=0.5, radial_falloff=0.0),
                 args.threads),
                (f"ours SIRT-like {n_sirt}", ReconstructionParams(thickness_px=args.thickness, super_sampling=1,
                                                                  sirt_like_iterations=n_sirt), 1),
                (f"ours SIRT-like {n_sirt}", ReconstructionParams(thickness_px=args.thickness, super_sampling=1,
                                                                  sirt_like_iterations=n_sirt), args.threads)):
            torch.set_num_threads(threads)
            reconstruct_volume(stack[:, :4], 0.0, tilts, 0.0, zeros, voxel_A, params)  # warm-up (compiled kernel)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                volume = reconstruct_volume(stack, 0.0, tilts, 0.0, zeros, voxel_A, params)
                best = min(best, time.perf_counter() - start)
            volumes[name] = volume
            timing[(name, threads)] = best
        torch.set_num_threads(args.threads)
        astra_volumes, info = run_astra(stack.numpy(), tilts.numpy(), args.thickness, methods)
        truth_volume = truth_for(tuple(volumes["ours WBP ss1"].shape))
        scores = {}
        for name, volume in list(volumes.items()) + [(k, torch.from_numpy(v)) for k, v in astra_volumes.items()]:
            s = score_tomogram(volume, truth_volume, voxel_A, resolution, contrast_sign=sign, mirror=False)
            scores[name] = s
        pairs = {"ours WBP ss1": "astra_fbp", "ours WBP ss2 (default)": "astra_fbp",
                 "ours WBP ss1 ramp to Nyquist": "astra_fbp",
                 f"ours SIRT-like {n_sirt}": "astra_sirt"}
        for (name, threads), seconds in timing.items():
            s = scores[name]
            peer = pairs[name]
            rows.append({"data": label, "method": name, "threads": threads, "seconds": seconds,
                         f"{peer}_s / ours_s": info[peer]["seconds"] / seconds,
                         "correlation": s.correlation, "fsc_0.5_A": s.fsc_0_5_A, "fsc_0.143_A": s.fsc_0_143_A,
                         "translation_A": s.translation_A})
        if raw is not None:  # the workflow's own path: raw views + alignment (no interpolated stack)
            images, rot_z_t, shifts_A, mag_t = raw
            for ss, threads in ((2, 1), (2, args.threads), (1, 1)):
                params = ReconstructionParams(thickness_px=args.thickness, super_sampling=ss)
                torch.set_num_threads(threads)
                best = math.inf
                for _ in range(3):
                    start = time.perf_counter()
                    volume = reconstruct_volume(images, rot_z_t, tilts, 0.0, shifts_A, voxel_A, params, mag_t)
                    best = min(best, time.perf_counter() - start)
                torch.set_num_threads(args.threads)
                s = score_tomogram(volume, truth_for(tuple(volume.shape)), voxel_A, resolution, contrast_sign=sign,
                                   mirror=False)
                name = "ours WBP ss2 (the workflow's path: raw views + alignment)" if ss == 2 else \
                    "ours WBP ss1 from the raw views + alignment"
                rows.append({"data": label, "method": name, "threads": threads, "seconds": best,
                             "astra_fbp_s / ours_s": info["astra_fbp"]["seconds"] / best,
                             "correlation": s.correlation, "fsc_0.5_A": s.fsc_0_5_A, "fsc_0.143_A": s.fsc_0_143_A,
                             "translation_A": s.translation_A})
        for name in ("astra_fbp", "astra_sirt"):
            s = scores[name]
            method = "ASTRA FBP ram-lak" if name == "astra_fbp" else f"ASTRA SIRT {n_sirt}"
            rows.append({"data": label, "method": f"{method} (v{info['astra_version']}, CPU)", "threads": 1,
                         "seconds": info[name]["seconds"], "correlation": s.correlation, "fsc_0.5_A": s.fsc_0_5_A,
                         "fsc_0.143_A": s.fsc_0_143_A, "translation_A": s.translation_A,
                         "astra_cpu_seconds": info[name]["cpu_seconds"]})
    report("astra_vs_ours", rows,
           notes="same aligned stack for both; ratio = ASTRA seconds / ours (FBP peer for WBP, SIRT peer for "
                 "SIRT-like); scores vs the true specimen after the best translation (real: contrast -1, "
                 f"correlation low-passed to {args.resolution_A} A; phantom: contrast +1, 4 voxels); "
                 "ASTRA 2-D CPU is single-threaded (cpu_seconds ~ seconds)")


if __name__ == "__main__":
    main()
