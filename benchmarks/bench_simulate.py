"""Benchmark of the digital twin: simulation time and peak memory per preset.

Each preset runs in a fresh child process (so that its peak resident memory is its own), the
table is printed and written to ``benchmarks/results/simulate.json``.

    python benchmarks/bench_simulate.py                      # tiny and small on the CPU
    python benchmarks/bench_simulate.py --presets tutorial --device cuda
    python benchmarks/bench_simulate.py --presets small --threads 2 --keep /scratch/small

Columns: wall time, CPU time (user + system of the child), peak resident memory (GB), peak GPU
memory when on CUDA, the stages of ``truth.json`` (potential, image formation, frames, writing),
tilts, particles and the size of what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402


def child(preset: str, out: str, device: str, threads: int, seed: int) -> None:
    """Run one simulation and print one JSON line with its measurements."""
    import torch

    from tomopipe.simulate import config_from_preset, simulate

    config = config_from_preset(preset, device=device, threads=threads, seed=seed)
    t0 = time.perf_counter()
    summary = simulate(config, out, progress=False)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gpu = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(json.dumps({
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_GB": usage.ru_maxrss / 1e6,
        "peak_gpu_GB": gpu,
        "timings": summary["timings"],
        "n_tilts": sum(ts["n_tilts"] for ts in summary["tilt_series"]),
        "n_particles": sum(ts["n_particles"] for ts in summary["tilt_series"]),
        "written_GB": size / 1e9,
        "image": f"{config.image_width_px}x{config.image_height_px}",
        "frames": config.frames_per_tilt,
        "torch_threads": torch.get_num_threads(),
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "tutorial"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the data here (one folder per preset) and keep it")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.device, args.threads, args.seed)
        return 0

    rows = []
    for preset in args.presets:
        scratch = (Path(tempfile.mkdtemp(prefix=f"bench_simulate_{preset}_")) if args.keep is None
                   else args.keep / preset)
        load = os.getloadavg()[0]
        command = [sys.executable, __file__, "--child", preset, str(scratch), "--device", args.device,
                   "--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            raise SystemExit(f"simulation of preset {preset!r} failed")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        timings = result.pop("timings")
        rows.append({
            "preset": preset,
            "device": args.device,
            "image": result["image"],
            "tilts": result["n_tilts"],
            "frames": result["frames"],
            "particles": result["n_particles"],
            "wall_s": result["wall_s"],
            "cpu_s": result["cpu_s"],
            "peak_rss_GB": result["peak_rss_GB"],
            "peak_gpu_GB": result["peak_gpu_GB"] if result["peak_gpu_GB"] is not None else "",
            "potential_s": timings["potential_s"],
            "images_s": timings["image_formation_s"],
            "frames_s": timings["frames_s"],
            "writing_s": timings["writing_s"],
            "written_GB": result["written_GB"],
            "threads": result["torch_threads"],
            "load_avg_at_start": load,
        })
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    notes = (f"CPUs: {os.cpu_count()}; wall time depends on other processes on the machine "
             f"(load_avg_at_start); cpu_s is the child's user + system time.")
    report("simulate", rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
