"""Speed and peak memory of the ``extract_subtomos`` step on a project (the small data set by default).

Runs the step through the engine (:func:`tomopipe.engine.runner.run_on_sets`) on the tilt series,
CTF and particle sets of named runs, once per configuration and thread count, each in a fresh
process (peak resident memory = that process's maximum RSS). Use a COPY of a project: every
configuration adds a run (and its files, removed afterwards unless ``--keep``).

    python benchmarks/bench_extract_subtomos_step.py PROJECT [--tilt-series assign] [--ctf exclude]
        [--particles 9] [--configs 10:64:24,2:128:128,2:256:128] [--dims 2,3] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402


def _one(args: argparse.Namespace, binning: float, box: int, crop: int, dims: int, threads: int) -> dict:
    """Run the step once in this process; its seconds, counts and output size."""
    import torch

    from tomopipe.engine.executors import LocalExecutor
    from tomopipe.engine.runner import run_on_sets
    from tomopipe.engine.step_api import step_class
    from tomopipe.project.store import Project

    torch.set_num_threads(threads)
    run = lambda name: project.find_run(int(name) if name.isdigit() else name).id  # noqa: E731
    with Project.open(args.project) as project:
        sets = {"tilt_series": project.sets_of_run(run(args.tilt_series))["tilt_series"],
                "ctf": project.sets_of_run(run(args.ctf))["ctf"],
                "particles": project.sets_of_run(run(args.particles))["particles"]}
        name = f"bench_extract_b{binning:g}_{box}_{crop}_{dims}d_{threads}t_{time.time_ns()}"
        values = {"binning": binning, "box_px": box, "crop_px": crop, "write_2d": dims == 2, "device": "cpu"}
        start = time.perf_counter()
        outcome = run_on_sets(project, step_class("extract_subtomos"), name, values, sets, LocalExecutor(1))
        seconds = time.perf_counter() - start
        if outcome.status != "finished":
            raise SystemExit(f"{name}: {outcome.message}")
        folder = project.absolute_path(outcome.run.folder)
        size_mb = sum(f.stat().st_size for f in folder.glob("*.mrc")) / 2**20
        if not args.keep:
            for path in folder.glob("*.mrc"):
                path.unlink()
        return {"seconds": round(seconds, 2), "kept": outcome.summary["kept"], "dropped": outcome.summary["dropped"],
                "files_MB": round(size_mb, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project")
    parser.add_argument("--tilt-series", default="assign")
    parser.add_argument("--ctf", default="exclude")
    parser.add_argument("--particles", default="9", help="run name or id")
    parser.add_argument("--configs", default="10:64:24,2:128:128,2:256:128", help="binning:box:crop,...")
    parser.add_argument("--dims", default="2,3")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--keep", action="store_true", help="keep the MRC files of each run")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        binning, box, crop, dims, threads = json.loads(args.child)
        row = _one(args, binning, box, crop, dims, threads)
        row["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for config in args.configs.split(","):
        binning, box, crop = (float(v) for v in config.split(":"))
        for dims in (int(d) for d in args.dims.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                child = json.dumps([binning, int(box), int(crop), dims, threads])
                command = [sys.executable, __file__, args.project, "--tilt-series", args.tilt_series, "--ctf",
                           args.ctf, "--particles", args.particles, "--child", child]
                command += ["--keep"] if args.keep else []
                out = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode or not lines:
                    raise SystemExit(f"{child} failed:\n{out.stderr[-3000:]}")
                rows.append({"binning": binning, "box_px": int(box), "crop_px": int(crop), "dims": dims,
                             "threads": threads, **json.loads(lines[0][7:])})
                print(rows[-1], flush=True)
    report("extract_subtomos_step", rows, notes=f"project {args.project}; particles of run {args.particles!r}")


if __name__ == "__main__":
    main()
