"""``tomopipe demo``: simulate the apoferritin data set, run the tutorial workflow on it, and
print per step its time and its scores against the simulator's truth as a table (value, unit,
goal from :data:`tomopipe.validate.scores.GOALS`, met or not), written as JSON to ``OUT/scores.json``."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from tomopipe.engine.executors import make_executor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow
from tomopipe.model.sets import MAPS, TOMOGRAMS
from tomopipe.project.lock import project_lock
from tomopipe.project.store import Project
from tomopipe.report import write_report
from tomopipe.validate.registry import scores_of_set
from tomopipe.validate.scores import format_score_table, score_record
from tomopipe.validate.truth import Truth


def collect_scores(project: Project, workflow, report, truth: Truth) -> list[dict]:
    """The demo's score records (:func:`tomopipe.validate.scores.score_record`) of a workflow run:
    per step its status, its seconds per tilt when it reports them, and its scores against the truth
    (the scorers of :mod:`tomopipe.validate.registry`)."""
    types = {step.name: step.step.type_name for step in workflow.steps}
    records = []
    for outcome in report.outcomes:
        seconds = outcome.run.elapsed_s if outcome.run and outcome.run.elapsed_s else 0.0
        peak_GB = step_peak_rss_GB(outcome.summary)
        rows = [("", "status", outcome.status)]
        rows += [("", key, value) for key, value in outcome.summary.items() if key.endswith("_s_per_tilt")]
        if outcome.run is not None and outcome.status in ("finished", "skipped"):
            for record in project.sets_of_run(outcome.run.id).values():
                rows += [(score.subject, score.name, score.value)
                         for score in scores_of_set(project, record, types[outcome.name], truth)]
        records += [score_record(outcome.name, score, value, seconds, subject, peak_GB)
                    for subject, score, value in rows]
    return records


def step_peak_rss_GB(summary: dict) -> float | None:
    """A run's peak resident memory in GB: its main process's, or its largest worker's when larger
    (None for runs recorded before memory was measured)."""
    peaks = [summary[key] for key in ("peak_rss_GB", "peak_rss_worker_GB") if key in summary]
    return max(peaks) if peaks else None


def tomogram_paths(project: Project, report) -> list[Path]:
    """The tomograms of the workflow's last finished reconstruction (none before it ran)."""
    paths = []
    for outcome in report.outcomes:
        if outcome.run is not None and outcome.status in ("finished", "skipped"):
            for record in project.sets_of_run(outcome.run.id).values():
                if record.kind == TOMOGRAMS.name:
                    items = project.read_items(record.id, enabled_only=True)
                    paths = [project.absolute_path(path) for path in items["tomogram_path"]]
    return paths


FINAL_MAP_NAMES = ("sharpened", "full", "masked")  # the map a user looks at, best first


def final_map(project: Project, report) -> tuple[str, float | None, Path] | None:
    """The last map the workflow made: (step name, resolution in Å at FSC 0.143 as the step reports
    it, path of the post-processed or full map); None before any map."""
    for outcome in reversed(report.outcomes):
        if outcome.run is None or outcome.status not in ("finished", "skipped"):
            continue
        for record in project.sets_of_run(outcome.run.id).values():
            if record.kind != MAPS.name:
                continue
            items = project.read_items(record.id, enabled_only=True)
            paths = dict(zip(items["map_name"], items["map_path"]))
            for name in FINAL_MAP_NAMES:
                if name in paths:
                    return outcome.name, outcome.summary.get("resolution_A"), project.absolute_path(paths[name])
    return None


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


def run_demo(out: Path, preset: str = "small", seed: int = 4, jobs: int = 1, until: str | None = None,
             overrides: list[str] = (), simulate_device: str = "cpu", wait_s: float | None = 0.0,
             echo=print, hint: str = "") -> int:
    """Simulate (or reuse) the data in ``OUT/data`` and run the tutorial in ``OUT/project``, holding the
    project's write lock throughout (the simulation included: two demos on one folder would write the
    same data); ``wait_s``: see :func:`tomopipe.project.lock.project_lock`."""
    with project_lock(Path(out) / "project", wait_s=wait_s, echo=echo, hint=hint):
        return _run_demo_locked(Path(out), preset, seed, jobs, until, overrides, simulate_device)


def _run_demo_locked(out: Path, preset: str, seed: int, jobs: int, until: str | None, overrides: list[str],
                     simulate_device: str) -> int:
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
            records = [score_record("simulate", "status", "simulated" if simulation_s else "reused", simulation_s),
                       *collect_scores(project, workflow, report, truth)]
            print("\nscores against the simulator's truth\n" + format_score_table(records))
            (out / "scores.json").write_text(json.dumps(records, indent=1, default=float, ensure_ascii=False),
                                             encoding="utf-8")
            print(f"\nscores: {out / 'scores.json'}")
            print(f"project: {project.folder} (tomopipe status --project {project.folder})")
            for path in tomogram_paths(project, report):
                print(f"tomogram: {path}")
            made = final_map(project, report)
            if made is not None:
                step_name, resolution_A, map_path = made
                resolution = f"{resolution_A:.2f} Å (gold-standard FSC 0.143)" if resolution_A else "made"
                print(f"final map ({step_name}): {resolution} -> {map_path}")
            print(f"report: {write_report(project.folder)}")
    finally:
        executor.close()
    return 0 if report.ok else 1
