"""Picking on the small preset, scored against the simulator's truth, on the workflow's code path.

Runs the pick steps on the tomograms of a finished demo (``tomopipe demo --out DIR``) through the
engine, as the workflow does, each as a new run in a copy of the demo's project:

* ``workflow``: ``pick_template_matching`` with the parameters of ``[steps.pick]`` in
  workflows/apoferritin_tutorial.toml (a hollow shell of apoferritin's diameters; one rotation);
* ``atomic model``: the same step with the packaged 6Z6U model as template, symmetry O, angular
  step from Crowther's criterion (or ``--angular-step``): orientations and the search speed.
  6Z6U is the structure that made the simulated data, so this row is an upper bound for a
  template from another apoferritin model; the demo and the workflow never use it;
* ``network``: ``pick_network`` trained on the workflow's picks (``--training-time`` s).

Each row: per tomogram precision, recall, F1, F-beta 4 at 30 Å (after removing the free
translation; true particles inside the tomogram), the median orientation error modulo O, the
step's time, and for template matching the seconds per 1,000 rotations.

    python benchmarks/bench_picking.py --demo DIR [--threads 2] [--angular-step 0] [--training-time 120]
                                       [--skip model,network]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.data import APOFERRITIN_MODEL  # noqa: E402
from tomopipe.demo import tutorial_workflow_path  # noqa: E402
from tomopipe.engine.executors import LocalExecutor  # noqa: E402
from tomopipe.engine.runner import run_on_sets  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.steps.pick_network import PickNetwork  # noqa: E402
from tomopipe.steps.pick_template import PickTemplateMatching  # noqa: E402
from tomopipe.validate.registry import scores_of_set  # noqa: E402
from tomopipe.validate.truth import Truth  # noqa: E402


def _sets(project: Project, run_name: str) -> dict:
    run = [r for r in project.runs() if r.name == run_name and r.status == "finished"][-1]
    return project.sets_of_run(run.id)


def _rows(project, outcome, step_type, label, truth, seconds) -> list[dict]:
    if outcome.status != "finished":
        raise SystemExit(f"{label}: {outcome.message}")
    record = project.sets_of_run(outcome.run.id)["particles"]
    scores = {}
    for score in scores_of_set(project, record, step_type, truth):
        scores.setdefault(score.subject, {})[score.name] = score.value
    summary = outcome.run.summary
    rotations = summary.get("rotations")
    rows = []
    for ts_id, values in sorted(scores.items()):
        picks = summary["picks"][ts_id]  # a count, or the template matcher's per-tomogram summary
        picks = picks["picks"] if isinstance(picks, dict) else picks
        rows.append({"picker": label, "ts_id": ts_id, "picks": int(picks),
                     "true": values.get("true_particles"), "precision": values.get("precision"),
                     "recall": values.get("recall"), "f1": values.get("f1"), "f_beta4": values.get("f_beta4"),
                     "median_orientation_error_deg": values.get("median_orientation_error_deg"),
                     "median_position_error_A": values.get("median_position_error_A"),
                     "step_s": round(seconds, 1), "rotations": rotations,
                     "s_per_1000_rotations": (round(1000.0 * seconds / (rotations * len(scores)), 1)
                                              if rotations and rotations >= 100 else None)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `tomopipe demo`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--angular-step", type=float, default=0.0, help="0: Crowther's criterion")
    parser.add_argument("--training-time", type=float, default=120.0)
    parser.add_argument("--skip", default="", help="comma-separated: model, network")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    truth = Truth.find(args.demo / "data")
    workflow_params = tomllib.loads(tutorial_workflow_path().read_text())["steps"]["pick"]
    pick_params = {k: v for k, v in workflow_params.items() if k not in ("type", "tomograms", "tilt_series", "ctf")}
    rows = []
    notes = (f"{args.threads} torch threads; demo {args.demo}; CPU; angular step "
             f"{'Crowther' if not args.angular_step else args.angular_step}")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(args.demo / "project", Path(folder) / "project")
        with Project.open(Path(folder) / "project") as project:
            inputs = {"tomograms": _sets(project, "reconstruct")["tomograms"],
                      "tilt_series": _sets(project, "align")["tilt_series"], "ctf": _sets(project, "exclude")["ctf"]}
            started = time.perf_counter()
            outcome = run_on_sets(project, PickTemplateMatching, "bench_pick_shell", pick_params, inputs,
                                  LocalExecutor(1))
            rows += _rows(project, outcome, "pick_template_matching", "workflow (shell template)", truth,
                          time.perf_counter() - started)
            report("picking", rows, notes)
            workflow_picks = project.sets_of_run(outcome.run.id)["particles"]
            if "model" not in skip:
                params = {**pick_params, "template": str(APOFERRITIN_MODEL), "symmetry": "O",
                          "angular_step_deg": args.angular_step}
                started = time.perf_counter()
                outcome = run_on_sets(project, PickTemplateMatching, "bench_pick_model", params, inputs,
                                      LocalExecutor(1))
                rows += _rows(project, outcome, "pick_template_matching", "atomic model 6Z6U (upper bound)", truth,
                              time.perf_counter() - started)
                report("picking", rows, notes)
            if "network" not in skip:
                params = {"particle_diameter_A": pick_params["particle_diameter_A"],
                          "training_time_s": args.training_time, "device": "cpu"}
                started = time.perf_counter()
                outcome = run_on_sets(project, PickNetwork, "bench_pick_network", params,
                                      {"tomograms": inputs["tomograms"], "particles": workflow_picks},
                                      LocalExecutor(1))
                rows += _rows(project, outcome, "pick_network", "network (trained on the workflow's picks)", truth,
                              time.perf_counter() - started)
    report("picking", rows, notes)


if __name__ == "__main__":
    main()
