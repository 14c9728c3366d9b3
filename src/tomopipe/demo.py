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
from tomopipe.project.store import SetRecord
from tomopipe.report.score_alignment import score_alignment
from tomopipe.report.score_tomogram import score_tomogram_set
from tomopipe.report.scores import score_ctf, score_import, score_motion
from tomopipe.report.truth import Truth


TOMOGRAM_SCORE_RESOLUTION_A = 30.0  #: low-pass (Å) of the tomogram–truth correlation


def scores_of_set(project: Project, record: SetRecord, step_type: str, truth: Truth) -> dict:
    """The scores against the truth of one output set of a step (empty when there are none)."""
    items = project.read_items(record.id, enabled_only=True)
    if step_type == "import_movies":
        return score_import(items, record.attrs, truth)
    if step_type == "motion_ctf" and record.kind == "tilt_series":
        return score_motion(items, project, truth)
    if step_type == "motion_ctf" and record.kind == "ctf":
        return score_ctf(items, truth)
    if step_type in ("align_tilt_series", "assign_alignment") and record.kind == "tilt_series":
        return {key: value for key, value in score_alignment(items, record.attrs, truth).items()
                if key.startswith("max_")}
    if step_type == "reconstruct_tomogram" and record.kind == "tomograms":
        scores = score_tomogram_set(items, project, truth, resolution_A=TOMOGRAM_SCORE_RESOLUTION_A)
        return {f"{ts_id}_{key}": (round(value, 3) if isinstance(value, float) else value)
                for ts_id, score in scores.items()
                for key, value in score.items() if key in ("correlation", "fsc_0_143_A", "mirrored_correlation")}
    return {}


def tutorial_workflow_path() -> Path:
    return Path(str(resources.files("tomopipe") / "workflows" / "apoferritin_tutorial.toml"))


_NOT_DATA = ("device", "threads")  # settings that change how fast a data set is made, not the data


def simulate_once(data_dir: Path, preset: str, seed: int, device: str = "cpu") -> float:
    """Simulate (on ``device``) unless ``data_dir`` already holds this preset and seed; returns
    seconds spent."""
    from tomopipe.simulate import config_from_preset, simulate

    config = config_from_preset(preset, seed=seed, device=device)
    config.validate()
    marker = data_dir / "truth" / "truth.json"
    if marker.is_file():
        def data_settings(settings: dict) -> dict:
            return {key: value for key, value in settings.items() if key not in _NOT_DATA}

        stored = json.loads(marker.read_text()).get("config") or {}
        if data_settings(stored) == data_settings(json.loads(json.dumps(config.to_dict(), default=str))):
            print(f"using the simulated data in {data_dir} (preset {preset}, seed {seed})")
            return 0.0
    start = time.perf_counter()
    simulate(config, data_dir, overwrite=True)
    return time.perf_counter() - start


def run_demo(out: Path, preset: str = "small", seed: int = 1, jobs: int = 1, until: str | None = None,
             overrides: list[str] = (), simulate_device: str = "cpu") -> int:
    out = Path(out)
    data_dir = out / "data"
    simulation_s = simulate_once(data_dir, preset, seed, simulate_device)
    if simulation_s:
        print(f"[simulate] {preset} preset, seed {seed}: {simulation_s:.1f} s -> {data_dir}")
    overrides = [f"import.files_directory={json.dumps(str(data_dir.resolve()))}",
                 f"import.gain_image={json.dumps(str((data_dir / 'gain_ref.mrc').resolve()))}",
                 "import.gain_flip_y=true", *overrides]
    workflow = load_workflow(tutorial_workflow_path(), overrides)
    truth = Truth.find(data_dir)
    executor = make_executor(jobs)
    try:
        with Project.open_or_init(out / "project") as project:
            report = run_workflow(project, workflow, executor, until=until)
            print("\nstep            time (s)  scores against the truth")
            types = {step.name: step.step.type_name for step in workflow.steps}
            tomogram_paths = []
            for outcome in report.outcomes:
                scores = {key: round(value, 3) for key, value in outcome.summary.items() if key.endswith("_s_per_tilt")}
                if outcome.run is not None and outcome.status in ("finished", "skipped"):
                    for record in project.sets_of_run(outcome.run.id).values():
                        scores.update(scores_of_set(project, record, types[outcome.name], truth))
                        if record.kind == "tomograms":
                            tomogram_paths = [project.absolute_path(path) for path in
                                              project.read_items(record.id, enabled_only=True)["tomogram_path"]]
                seconds = outcome.run.elapsed_s if outcome.run and outcome.run.elapsed_s else 0.0
                print(f"{outcome.name:15s} {seconds:8.1f}  {outcome.status}  {json.dumps(scores)}")
            print(f"\nproject: {project.folder} (tomopipe status --project {project.folder})")
            for path in tomogram_paths:
                print(f"tomogram: {path}")
    finally:
        executor.close()
    return 0 if report.ok else 1
