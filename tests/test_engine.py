"""Workflow engine: parsing, validation, resume/skip/re-run, failures, kill, executors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pandas as pd
import pytest

import support_steps  # noqa: F401  (registers the test step type)
from conftest import REPO, assert_same_document, write_acquisition
from tiny_tutorial import run_tutorial, tiny_acquisition, tutorial_overrides
from tomopipe.cli import main
from tomopipe.engine.executors import DaskExecutor, LocalExecutor
from tomopipe.engine.runner import run_on_outputs, run_workflow
from tomopipe.engine.step_api import Param, params_from_fields
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
    # each run's summary keeps its peak memory (this process holds torch: more than 50 MB)
    assert all(0.05 < o.run.summary["peak_rss_GB"] < 64 for o in first.outcomes)
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


def test_run_on_outputs_runs_a_step_on_a_finished_runs_sets(setup):
    tmp_path, workflow = setup
    project_dir = tmp_path / "project"
    _run(project_dir, workflow)
    with Project.open(project_dir) as project:
        outcome, input_sets = run_on_outputs(project, "import", support_steps.DoseSummary, "tripled",
                                             {"scale": 3.0}, LocalExecutor(1))
        assert outcome.status == "finished" and list(input_sets) == ["movies"]
        summary = project.read_items(project.sets_of_run(outcome.run.id)["summary"].id)
        assert summary["total_dose_e_per_A2"].tolist() == [45.0, 45.0]  # 5 tilts x 3 e/A2 x scale 3
        with pytest.raises(TomopipeError, match="has no tilt_series_movies output"):
            run_on_outputs(project, "summary", support_steps.DoseSummary, "again", {}, LocalExecutor(1))
        with pytest.raises(TomopipeError, match="unknown parameter 'scal'"):
            run_on_outputs(project, "import", support_steps.DoseSummary, "again", {"scal": 1.0}, LocalExecutor(1))


def test_params_from_fields_declares_each_parameter_once():
    @dataclass(frozen=True)
    class Options:
        width_px: int = field(default=4, metadata={"help": "width", "min": 1, "max": 9})
        mode: str = field(default="a", metadata={"help": "mode", "choices": ("a", "b")})

    width, mode = params_from_fields(Options)
    assert width == Param("width_px", "int", "width", default=4, min=1, max=9)
    assert mode == Param("mode", "str", "mode", default="a", choices=("a", "b"))
    assert width.validate("7", "s") == 7
    with pytest.raises(TomopipeError, match="above the maximum 9"):
        width.validate(10, "s")

    @dataclass(frozen=True)
    class Undocumented:
        width_px: int = 4

    with pytest.raises(TypeError, match="Undocumented.width_px"):
        params_from_fields(Undocumented)


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


def _outputs(project_dir) -> dict:
    """Every finished run's output sets: ``{(step, set name): items}``."""
    with Project.open(project_dir) as project:
        return {(run.name, name): project.read_items(record.id)
                for run in project.runs() for name, record in project.sets_of_run(run.id).items()}


def _assert_same_file(a, b):
    """Two output files hold the same data: arrays (MRC) and numbers to float32 rounding, the rest equal."""
    import json

    import numpy as np

    from tomopipe.io.mrc import read_mrc

    if a.suffix == ".mrc":
        (x, _), (y, _) = read_mrc(a), read_mrc(b)
        assert x.shape == y.shape, a.name
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(float(np.abs(x).max()), 1e-30), err_msg=a.name)
    elif a.suffix == ".json":
        assert_same_document(json.loads(a.read_text()), json.loads(b.read_text()), a.name)
    elif a.suffix == ".csv":
        pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), check_exact=False, rtol=1e-5)
    else:
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.usefixtures("one_thread")  # as in the Dask workers: the same sums in the same order
def test_local_and_dask_executors_give_identical_outputs(tmp_path):
    """The whole tutorial workflow (import -> ... -> pick -> extract -> initial model -> refine at bin 10, 4, 2 ->
    postprocess) on two tilt series, three ways: locally (in this process), on a Dask LocalCluster of two worker
    processes (``--dask local``), and through the command line against a running scheduler's address
    (``--dask tcp://...``): the same items in every output set and the same data in every file they point to."""
    from distributed import LocalCluster

    from tomopipe.demo import tutorial_workflow_path

    data = tiny_acquisition(tmp_path / "data", n_tilt_series=2)
    local = run_tutorial(tmp_path / "local", data, LocalExecutor(1))
    dask = DaskExecutor("local", workers=2)
    try:
        on_dask = run_tutorial(tmp_path / "dask", data, dask)
    finally:
        dask.close()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        arguments = ["run", str(tutorial_workflow_path()), "--project", str(tmp_path / "address"),
                     "--dask", cluster.scheduler_address]
        assert main([*arguments, *(f"--set={override}" for override in tutorial_overrides(data))]) == 0
    steps = [o.name for o in local.outcomes]
    assert steps[0] == "import" and steps[-1] == "postprocess"
    assert [o.status for o in local.outcomes] == [o.status for o in on_dask.outcomes] == ["finished"] * len(steps)
    local_sets = _outputs(tmp_path / "local")
    assert ("pick", "particles") in local_sets and ("refine_bin2", "subtomograms") in local_sets
    for other in ("dask", "address"):
        other_sets = _outputs(tmp_path / other)
        assert local_sets.keys() == other_sets.keys()
        for key, items in local_sets.items():
            # sub-voxel peak positions amplify float32 rounding (summation order): 1e-3 absolute (Å, °) at most
            pd.testing.assert_frame_equal(items, other_sets[key], check_exact=False, rtol=1e-5, atol=1e-3)
            for column in (c for c in items.columns if c.endswith("_path")):
                for stored in items[column].unique():
                    if not str(stored).startswith("runs/"):
                        continue  # the input data, outside the projects
                    _assert_same_file(tmp_path / "local" / stored, tmp_path / other / stored)
