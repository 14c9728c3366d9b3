"""``tomopipe demo``: simulate the apoferritin data set, run the tutorial workflow on it, and
print per step its time and its scores against the simulator's truth."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from tomopipe.engine.executors import make_executor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow
from tomopipe.project.store import Project
from tomopipe.report.scores import score_import
from tomopipe.report.truth import Truth

SCORERS = {"import_movies": score_import}


def tutorial_workflow_path() -> Path:
    return Path(str(resources.files("tomopipe") / "workflows" / "apoferritin_tutorial.toml"))


def simulate_once(data_dir: Path, preset: str, seed: int) -> float:
    """Simulate unless ``data_dir`` already holds this preset and seed; returns seconds spent."""
    from tomopipe.simulate import config_from_preset, simulate

    config = config_from_preset(preset, seed=seed)
    marker = data_dir / "truth" / "truth.json"
    if marker.is_file():
        stored = json.loads(marker.read_text()).get("config")
        if stored == json.loads(json.dumps(config.to_dict(), default=str)):
            print(f"using the simulated data in {data_dir} (preset {preset}, seed {seed})")
            return 0.0
    start = time.perf_counter()
    simulate(config, data_dir)
    return time.perf_counter() - start


def run_demo(out: Path, preset: str = "small", seed: int = 1, jobs: int = 1) -> int:
    out = Path(out)
    data_dir = out / "data"
    simulation_s = simulate_once(data_dir, preset, seed)
    if simulation_s:
        print(f"[simulate] {preset} preset, seed {seed}: {simulation_s:.1f} s -> {data_dir}")
    overrides = [f"import.files_directory={json.dumps(str(data_dir.resolve()))}",
                 f"import.gain_image={json.dumps(str((data_dir / 'gain_ref.mrc').resolve()))}",
                 "import.gain_flip_y=true"]
    workflow = load_workflow(tutorial_workflow_path(), overrides)
    truth = Truth.find(data_dir)
    executor = make_executor(jobs)
    try:
        with Project.open_or_init(out / "project") as project:
            report = run_workflow(project, workflow, executor)
            print("\nstep            time (s)  scores against the truth")
            for outcome in report.outcomes:
                scores = {}
                scorer = SCORERS.get(next(s.step.type_name for s in workflow.steps if s.name == outcome.name))
                if scorer and outcome.run is not None and outcome.status in ("finished", "skipped"):
                    for record in project.sets_of_run(outcome.run.id).values():
                        scores = scorer(project.read_items(record.id), record.attrs, truth)
                seconds = outcome.run.elapsed_s if outcome.run and outcome.run.elapsed_s else 0.0
                print(f"{outcome.name:15s} {seconds:8.1f}  {outcome.status}  {json.dumps(scores)}")
            print(f"\nproject: {project.folder} (tomopipe status --project {project.folder})")
    finally:
        executor.close()
    return 0 if report.ok else 1
