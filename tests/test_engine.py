"""Workflow engine: parsing, validation, resume/skip/re-run, failures, kill, executors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

import support_steps  # noqa: F401  (registers the test step type)
from conftest import REPO, write_acquisition
from tomopipe.cli import main
from tomopipe.engine.executors import DaskExecutor, LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow, parse_override
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.project.store import Project

WORKFLOW = """
[workflow]
name = "engine_test"

[steps.import]
type = "import_movies"
files_directory = "{data}"
tilt_axis_angle_deg = 85.0

[steps.summary]
type = "test_dose_summary"
movies = "import.movies"
scale = 1.0
"""


@pytest.fixture()
def setup(tmp_path):
    data = write_acquisition(tmp_path / "data")
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.format(data=data))
    return tmp_path, workflow


def _run(project_dir, workflow, overrides=(), until=None, executor=None):
    wf = load_workflow(workflow, list(overrides))
    with Project.open_or_init(project_dir) as project:
        return run_workflow(project, wf, executor or LocalExecutor(1), until=until, echo=lambda *_: None)


def test_parse_override_types():
    assert parse_override("import.pixel_size_A=1.5") == ("import", "pixel_size_A", 1.5)
    assert parse_override("import.files_directory=/data/TS") == ("import", "files_directory", "/data/TS")
    assert parse_override("a.b=true") == ("a", "b", True)
    with pytest.raises(TomopipeError, match="STEP.PARAM=VALUE"):
        parse_override("nodot=3")


def test_unknown_parameter_is_refused_with_suggestion(setup):
    _, workflow = setup
    with pytest.raises(InputFileError, match="did you mean tilt_axis_angle_deg"):
        load_workflow(workflow, ["import.tilt_axis_angle=3"])
    with pytest.raises(TomopipeError, match="no step named 'nope'"):
        load_workflow(workflow, ["nope.x=1"])
    with pytest.raises(InputFileError, match="expected a number"):
        load_workflow(workflow, ["import.pixel_size_A=abc"])


def test_bad_input_reference(tmp_path):
    wf = tmp_path / "wf.toml"
    wf.write_text('[steps.summary]\ntype = "test_dose_summary"\nmovies = "import.movies"\n')
    with pytest.raises(InputFileError, match="not an earlier step"):
        load_workflow(wf)


def test_resume_skip_and_rerun(setup):
    tmp_path, workflow = setup
    project_dir = tmp_path / "project"
    first = _run(project_dir, workflow)
    assert [o.status for o in first.outcomes] == ["finished", "finished"]
    again = _run(project_dir, workflow)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
    assert [o.run.id for o in again.outcomes] == [o.run.id for o in first.outcomes]
    # a changed downstream parameter re-runs only that step
    changed = _run(project_dir, workflow, ["summary.scale=2"])
    assert [o.status for o in changed.outcomes] == ["skipped", "finished"]
    # a changed upstream parameter re-runs that step and everything after it
    upstream = _run(project_dir, workflow, ["import.tilt_axis_angle_deg=84.0", "summary.scale=2"])
    assert [o.status for o in upstream.outcomes] == ["finished", "finished"]
    with Project.open(project_dir) as project:
        summary_set = project.sets_of_run(upstream.outcomes[1].run.id)["summary"]
        summary = project.read_items(summary_set.id)
        assert summary["total_dose_e_per_A2"].tolist() == [30.0, 30.0]  # 5 tilts x 3 e/A2 x scale 2
        assert len(project.runs()) == 5


def test_until_stops_after_the_step(setup):
    tmp_path, workflow = setup
    report = _run(tmp_path / "p", workflow, until="import")
    assert [o.name for o in report.outcomes] == ["import"]
    with pytest.raises(TomopipeError, match="--until 'nope'"):
        _run(tmp_path / "p", workflow, until="nope")


def test_failed_step_blocks_dependents_and_names_the_log(setup):
    tmp_path, workflow = setup
    report = _run(tmp_path / "p", workflow, ["import.pattern=*.nothing"])
    assert [o.status for o in report.outcomes] == ["failed", "blocked"]
    assert "no file matches" in report.outcomes[0].message
    with Project.open(tmp_path / "p") as project:
        runs = project.runs()
        assert [r.status for r in runs] == ["failed"]
        assert project.finished_sets() == []


def test_cli_run_status_show(setup, capsys):
    tmp_path, workflow = setup
    project_dir = tmp_path / "cli_project"
    assert main(["project", "init", str(project_dir)]) == 0
    assert main(["project", "init", str(project_dir)]) == 2  # refuses to overwrite
    assert main(["run", str(workflow), "--project", str(project_dir), "--until", "import"]) == 0
    assert main(["status", "--project", str(project_dir)]) == 0
    assert main(["show", "import", "--project", str(project_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"status": "finished"' in out and "movies(10)" in out
    assert main(["run", str(workflow), "--project", str(project_dir), "--set", "import.pattern=none*"]) == 1


def test_killed_step_is_not_finished_and_reruns_cleanly(setup):
    tmp_path, workflow = setup
    project_dir = tmp_path / "p"
    hold = tmp_path / "release"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import support_steps
        from tomopipe.cli import main
        sys.exit(main(["run", {str(workflow)!r}, "--project", {str(project_dir)!r}]))
    """)
    env = dict(os.environ, TOMOPIPE_TEST_HOLD=str(hold))
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(project_dir.glob("runs/*_summary/partial.txt")):
        assert time.time() < deadline and process.poll() is None, "the workflow did not reach the summary step"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with Project.open(project_dir) as project:
        assert [r.status for r in project.runs()] == ["finished", "running"]
        assert [s.name for s in project.finished_sets()] == ["movies"]
    report = _run(project_dir, workflow)
    assert [o.status for o in report.outcomes] == ["skipped", "finished"]
    with Project.open(project_dir) as project:
        assert [r.status for r in project.runs()] == ["finished", "killed", "finished"]


def _items_without_paths(project_dir, run_name):
    with Project.open(project_dir) as project:
        run = project.find_run(run_name)
        return {name: project.read_items(record.id) for name, record in project.sets_of_run(run.id).items()}


def test_local_and_dask_executors_give_identical_outputs(setup):
    tmp_path, workflow = setup
    _run(tmp_path / "local", workflow, executor=LocalExecutor(2))
    dask = DaskExecutor("local", workers=2)
    try:
        _run(tmp_path / "dask", workflow, executor=dask)
    finally:
        dask.close()
    for step in ("import", "summary"):
        local_sets = _items_without_paths(tmp_path / "local", step)
        dask_sets = _items_without_paths(tmp_path / "dask", step)
        assert local_sets.keys() == dask_sets.keys()
        for name in local_sets:
            pd.testing.assert_frame_equal(local_sets[name], dask_sets[name])
