"""The averaging chain of the tutorial workflow, from the picks to the post-processed map, on a finished demo:
per step its time, its peak memory and its scores against the truth (the demo's scorers: gold standard
against Nyquist, FSC 0.5 against the true map after superposition, hand, orientation and offset errors,
the map the same crops give with the TRUE poses and the ratio to it).

The steps after ``pick`` run again, with the workflow file's parameters, as new runs in a copy of the
demo's project (the demo itself is left as it is), in this process (one worker: the sampled memory is
the step's own; the resident set size is sampled every 20 ms by a thread). ``--jobs N`` runs them on a local
executor of N worker processes instead and ``--dask ADDRESS`` (or ``local``: a LocalCluster) on Dask (what
``tomopipe run --jobs N`` / ``--dask`` do: extraction fans out, and the pose searches of auto-refine on Dask;
``--fan-out-local`` sends them to the local workers too, to measure it: ``steps.auto_refine``'s
``FAN_OUT_ON_LOCAL_POOLS``); the memory shown is then this process's only. ``--steps`` runs only the steps named,
each from the demo's own runs of the steps before it (e.g. ``--steps refine_bin4``).

    python benchmarks/bench_averaging_chain.py --demo demo_out [--threads 2] [--workflow FILE] [--jobs 2]
                                               [--fan-out-local] [--dask local] [--steps refine_bin4,...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tomopipe.steps.auto_refine as auto_refine_step  # noqa: E402
from _report import report  # noqa: E402
from tomopipe.demo import tutorial_workflow_path  # noqa: E402
from tomopipe.engine.executors import make_executor  # noqa: E402
from tomopipe.engine.runner import run_on_sets  # noqa: E402
from tomopipe.engine.workflow import load_workflow  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.validate.registry import scores_of_set  # noqa: E402
from tomopipe.validate.truth import Truth  # noqa: E402

FIRST_STEP = "extract3d"  # the first step after picking
SHOWN = ("gold_standard_A", "nyquist_A", "fsc_0_5_truth_A", "right_hand", "true_pose_fsc_0_5_truth_A",
         "truth_resolution_over_true_pose_map", "gold_truth_disagreement", "orientation_error_median_deg",
         "share_within_5_degrees", "offset_error_median_A", "resolution_A", "b_factor_A2")


class PeakMemory:
    """The largest resident set size (GB) of this process while the context is open (sampled)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak_gb, self._stop = interval_s, 0.0, threading.Event()

    @staticmethod
    def _rss_gb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
        return 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, self._rss_gb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _latest_outputs(project: Project, name: str) -> dict:
    runs = [r for r in project.runs() if r.name == name and r.status == "finished"]
    if not runs:
        raise SystemExit(f"the demo's project has no finished run of {name!r}: run the demo first")
    return project.sets_of_run(runs[-1].id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `tomopipe demo`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workflow", type=Path, default=tutorial_workflow_path())
    parser.add_argument("--jobs", type=int, default=1, help="local worker processes (1: in this process)")
    parser.add_argument("--fan-out-local", action="store_true",
                        help="auto-refine's pose searches on the --jobs workers too (FAN_OUT_ON_LOCAL_POOLS)")
    parser.add_argument("--dask", default=None, help="a Dask scheduler's address, or 'local' (a LocalCluster)")
    parser.add_argument("--steps", default="", help="comma-separated step names to run (default: the whole chain)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    auto_refine_step.FAN_OUT_ON_LOCAL_POOLS = args.fan_out_local
    truth = Truth.find(args.demo / "data")
    workflow = load_workflow(args.workflow, [])
    names = workflow.step_names()
    chain = [step for step in workflow.steps if names.index(step.name) >= names.index(FIRST_STEP)]
    if args.steps:
        wanted = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {step.name for step in chain})
        if unknown:
            raise SystemExit(f"--steps: {', '.join(unknown)} not in the chain ({', '.join(s.name for s in chain)})")
        chain = [step for step in chain if step.name in wanted]
    rows, total_s = [], 0.0
    executor = make_executor(args.jobs, args.dask)
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(args.demo / "project", Path(folder) / "project")
        with Project.open(Path(folder) / "project") as project:
            produced = {}
            for step in chain:
                inputs = {}
                for port, ref in step.inputs.items():
                    if ref.step not in produced:
                        produced[ref.step] = _latest_outputs(project, ref.step)
                    inputs[port] = produced[ref.step][ref.output]
                started = time.perf_counter()
                with PeakMemory() as memory:
                    outcome = run_on_sets(project, step.step, step.name, step.params, inputs, executor)
                seconds = time.perf_counter() - started
                if outcome.status != "finished":
                    raise SystemExit(f"{step.name}: {outcome.message}")
                total_s += seconds
                produced[step.name] = project.sets_of_run(outcome.run.id)
                scores = {score.name: score.value for record in produced[step.name].values()
                          for score in scores_of_set(project, record, step.step.type_name, truth)}
                row = {"step": step.name, "seconds": round(seconds, 1), "peak_rss_GB": round(memory.peak_gb, 2)}
                row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items() if k in SHOWN})
                rows.append(row)
                print(row, flush=True)
    executor.close()
    rows.append({"step": "chain total", "seconds": round(total_s, 1)})
    name = "averaging_chain" + (f"_{args.steps.replace(',', '-')}" if args.steps else "") + (
        "_dask" if args.dask else f"_jobs{args.jobs}" if args.jobs > 1 else "") + (
        "_fan_out_local" if args.fan_out_local else "")
    report(name, rows, f"{args.workflow.name}, steps {chain[0].name}..{chain[-1].name}, {args.threads} torch threads, "
                       f"CPU, executor: {executor.describe()}")


if __name__ == "__main__":
    main()
