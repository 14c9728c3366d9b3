"""The whole tutorial workflow, from the movies to the post-processed map, as a user runs it: ``tomopipe demo``
(simulation included) in a child process. One row per step: its time, its peak resident memory (of the
step's process and, with ``--jobs`` > 1, of its largest worker; measured by the runner and stored in each
run's summary) and its scores against the truth with their goals; then the side-by-side ratios against
peers that the other benchmarks measured on this machine (``benchmarks/results/*.json``; ``--peers``
runs ``bench_motion.py`` first, ASTRA's needs ``setup_astra_venv.sh``).

    python benchmarks/bench_workflow.py [--preset small|reduced|tutorial] [--out DIR] [--jobs 2] [--peers]

``--out`` defaults to ``benchmarks/results/workflow_PRESET`` and is reused: simulated data of the same preset
and seed are not simulated again, and finished steps are not run again (use a new folder to time them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import RESULTS, report  # noqa: E402

PEER_KEY_MARKS = ("ratio", "/ ours")  # result columns that hold a peer's time over ours


def run_demo(preset: str, out: Path, jobs: int, seed: int) -> tuple[float, float, int]:
    """``tomopipe demo`` in a child process: (wall seconds, peak resident memory of any child in GB, exit code)."""
    command = [sys.executable, "-m", "tomopipe.cli", "demo", "--out", str(out), "--preset", preset,
               "--jobs", str(jobs), "--seed", str(seed)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    wall_s = time.perf_counter() - start
    return wall_s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, code


def step_rows(records: list[dict]) -> list[dict]:
    """The demo's score records (``OUT/scores.json``) as one row per step: time, memory, scores with goals."""
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record["step"], {"step": record["step"], "seconds": record["time_s"],
                                               "peak_rss_GB": record.get("peak_rss_GB"), "scores": []})
        if record["score"] == "status":
            row["status"] = record["value"]
            continue
        value = record["value"]
        text = f"{record['subject'] + ' ' if record['subject'] else ''}{record['score']} = "
        text += f"{value:.3g}" if isinstance(value, float) else str(value)
        if record["goal"]:
            text += f" ({record['goal']} {'met' if record['met'] else 'MISSED'})"
        row["scores"].append(text)
    return [{**row, "scores": "; ".join(row["scores"])} for row in rows.values()]


def peer_rows(results: Path) -> list[dict]:
    """Rows of the other benchmarks' results that compare a peer's time with ours."""
    rows = []
    for path in sorted(results.glob("*.json")):
        if path.stem.startswith("workflow"):
            continue
        document = json.loads(path.read_text())
        for row in document.get("rows", []):
            for key, value in row.items():
                if any(mark in key for mark in PEER_KEY_MARKS) and isinstance(value, (int, float)):
                    what = row.get("method") or row.get("movie") or row.get("data") or ""
                    rows.append({"benchmark": document["benchmark"], "what": what, "ratio": key,
                                 "value": float(value), "measured": document.get("date", "")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--peers", action="store_true", help="run bench_motion.py (peer: torch-motion-correction)")
    args = parser.parse_args()
    out = args.out or RESULTS / f"workflow_{args.preset}"
    if args.peers:
        subprocess.call([sys.executable, str(Path(__file__).with_name("bench_motion.py")), "--tilts", "4"])
    wall_s, peak_GB, code = run_demo(args.preset, out, args.jobs, args.seed)
    records = json.loads((out / "scores.json").read_text())
    rows = step_rows(records)
    missed = sum(1 for record in records if record["met"] is False)
    rows.append({"step": "whole demo (wall, simulation included)", "seconds": round(wall_s, 1),
                 "peak_rss_GB": round(peak_GB, 3), "status": f"exit {code}",
                 "scores": f"{missed} goal(s) missed of {sum(1 for r in records if r['met'] is not None)}"})
    peers = peer_rows(RESULTS)
    notes = (f"preset {args.preset}, seed {args.seed}, --jobs {args.jobs}, {os.cpu_count()} CPU cores, "
             f"{platform.processor() or platform.machine()}; peak memory: the step's process, or its largest "
             f"worker when larger; the last row: the largest child process.")
    if peers:
        notes += "\npeers (measured by the other benchmarks on this machine):\n" + "\n".join(
            f"  {p['benchmark']}: {p['what']}: {p['ratio']} = {p['value']:.3g} ({p['measured']})" for p in peers)
    report(f"workflow_{args.preset}", rows, notes)
    sys.exit(code)


if __name__ == "__main__":
    main()
