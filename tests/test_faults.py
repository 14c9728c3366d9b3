"""Faults (issue 14): a command SIGKILLed at any step resumes to the same outputs as an uninterrupted
run; one writer per project at a time (a second refuses with the holder's name, or waits with
``--wait``); an unwritable folder or a full disk fails the run with the path and the reason, never
marks it finished, and leaves the database intact."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import support_steps  # noqa: F401  (registers test_dose_summary, which can be held with TOMOPIPE_TEST_HOLD)
from conftest import REPO, assert_same_document, write_acquisition
from tiny_tutorial import TINY_WORKFLOW_OVERRIDES
from tomopipe.cli import main
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import _TEMPORARY_NAME, remove_partial_files, run_workflow
from tomopipe.engine.step_api import REGISTRY, Port, Step, register
from tomopipe.engine.workflow import load_workflow
from tomopipe.errors import TomopipeError
from tomopipe.io._atomic import _temporary_sibling, atomic_path
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.project.lock import LOCK_NAME, ProjectLockedError, holds_lock, project_lock, read_holder
from tomopipe.project.store import DATABASE_NAME, Project

TESTS = REPO / "tests"


class WriteVolumes(Step):
    """Test step: one small MRC volume per tilt series, written through the io layer (atomically)."""

    type_name = "test_write_volumes"
    title = "test - write one volume per tilt series"
    params = ()
    inputs = (Port("movies", "tilt_series_movies"),)
    outputs = (Port("volumes", "test_volumes"),)

    def run(self, ctx):
        items = ctx.input_items("movies", enabled_only=True)
        rows = []
        for index, ts_id in enumerate(sorted(items["ts_id"].unique())):
            path = ctx.folder / f"{ts_id}.mrc"
            write_mrc(path, np.full((4, 8, 8), float(index), dtype=np.float32), voxel_size_A=2.0)
            rows.append({"ts_id": ts_id, "volume_path": ctx.stored_path(path)})
        ctx.add_output("volumes", pd.DataFrame(rows))
        return {"volumes": len(rows)}


if WriteVolumes.type_name not in REGISTRY:
    register(WriteVolumes)

ENGINE_WORKFLOW = """
[workflow]
name = "faults_test"

[steps.import]
type = "import_movies"
files_directory = "{data}"
tilt_axis_angle_deg = 85.0

[steps.{second}]
type = "{second_type}"
movies = "import.movies"
"""


def _engine_workflow(tmp_path: Path, second: str = "write", second_type: str = "test_write_volumes") -> Path:
    data = write_acquisition(tmp_path / "data", ts_names=("TS_01",), tilt_angles=(0.0, 3.0, -3.0), size=16)
    path = tmp_path / f"wf_{second}.toml"
    path.write_text(ENGINE_WORKFLOW.format(data=data, second=second, second_type=second_type))
    return path


def _integrity(project_dir: Path) -> str:
    with sqlite3.connect(project_dir / DATABASE_NAME) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def _statuses(project_dir: Path) -> list[tuple[str, str]]:
    with Project.open(project_dir) as project:
        return [(run.name, run.status) for run in project.runs()]


def _cli_process(args: list[str], env: dict | None = None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    """``tomopipe ARGS`` in a new Python process that knows the test step types."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import support_steps, test_faults
        from tomopipe.cli import main
        sys.exit(main({[str(a) for a in args]!r}))
    """)
    return subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, **(env or {})), stdout=stdout,
                            stderr=stderr, text=True)


def _wait_for(condition, what: str, timeout_s: float = 120.0, process=None, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, f"the process ended (rc {process.returncode}) before {what}"
        time.sleep(interval_s)


# ---------------------------------------------------------------------------------------------- the lock
def test_lock_is_reentrant_names_its_holder_and_dies_with_it(tmp_path):
    """The lock file says who holds the project; the same process may take it again; another process
    is refused at once, naming the holder; a SIGKILLed holder leaves no stale lock."""
    folder = tmp_path / "project"
    with project_lock(folder, command="tomopipe run wf.toml"):
        holder = read_holder(folder)
        assert holder["pid"] == os.getpid() and holder["command"] == "tomopipe run wf.toml"
        with project_lock(folder):  # re-entrant: the engine inside a command
            assert holds_lock(folder)
        assert holds_lock(folder)
        probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from tomopipe.project.lock import project_lock
            with project_lock({str(folder)!r}, hint="Wait for it"):
                pass
        """)], capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0
        assert "ProjectLockedError" in probe.stderr and str(folder.resolve()) in probe.stderr
        assert f"pid {os.getpid()}" in probe.stderr and "tomopipe run wf.toml" in probe.stderr
        assert "Wait for it" in probe.stderr
    assert not holds_lock(folder)
    # a holder killed with SIGKILL: the kernel releases the lock, the next writer gets it at once
    holder_process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from tomopipe.project.lock import project_lock
        with project_lock({str(folder)!r}, command="holder"):
            time.sleep(600)
    """)])
    try:
        _wait_for(lambda: (read_holder(folder) or {}).get("pid") == holder_process.pid, "the holder's lock",
                  process=holder_process)
        with pytest.raises(ProjectLockedError, match=f"pid {holder_process.pid}") as refused:
            with project_lock(folder):
                pass
        assert refused.value.holder["command"] == "holder"
    finally:
        holder_process.send_signal(signal.SIGKILL)
        holder_process.wait()
    start = time.monotonic()
    with project_lock(folder, wait_s=0.0):
        assert read_holder(folder)["pid"] == os.getpid()
    assert time.monotonic() - start < 1.0
    assert (folder / LOCK_NAME).is_file()


def test_lock_waits_then_refuses_or_gets_it(tmp_path):
    """``wait_s`` seconds: refused after that long, naming the holder; got as soon as the holder ends."""
    folder = tmp_path / "project"
    holder_process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tomopipe.project.lock import project_lock
        with project_lock({str(folder)!r}, command="holder"):
            while not Path({str(tmp_path / "release")!r}).exists():
                time.sleep(0.02)
    """)])
    try:
        _wait_for(lambda: (read_holder(folder) or {}).get("pid") == holder_process.pid, "the holder's lock",
                  process=holder_process)
        told = []
        start = time.monotonic()
        with pytest.raises(ProjectLockedError, match="after waiting 0.6 s"):
            with project_lock(folder, wait_s=0.6, echo=told.append):
                pass
        assert 0.55 <= time.monotonic() - start < 5.0
        assert len(told) == 1 and "waiting for project" in told[0] and f"pid {holder_process.pid}" in told[0]
        (tmp_path / "release").touch()
        with project_lock(folder, wait_s=60.0):
            assert read_holder(folder)["pid"] == os.getpid()
    finally:
        (tmp_path / "release").touch()
        holder_process.wait(timeout=60)


# ------------------------------------------------------------------------------- two commands at once
def test_two_runs_on_one_project_the_second_refuses_or_waits(tmp_path):
    """While one ``tomopipe run`` writes (held inside its second step), a read-only ``status`` works, a
    second ``run`` refuses at once (exit 2) naming the project, the holder's pid and ``--wait``, and a
    third with ``--wait`` waits, then finds everything up to date; the database stays intact and holds
    one run per step."""
    workflow = _engine_workflow(tmp_path, second="summary", second_type="test_dose_summary")
    project_dir = tmp_path / "p"
    release = tmp_path / "release"
    first = _cli_process(["run", workflow, "--project", project_dir], env={"TOMOPIPE_TEST_HOLD": str(release)})
    waiting = None
    try:
        _wait_for(lambda: list(project_dir.glob("runs/*_summary/partial.txt")), "the held step", process=first)
        status = subprocess.run([sys.executable, "-m", "tomopipe.cli", "status", "--project", str(project_dir)],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and re.search(r"summary\s+test_dose_summary\s+running", status.stdout)
        second = _cli_process(["run", workflow, "--project", project_dir])
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert str(project_dir.resolve()) in err and f"pid {first.pid}" in err and "--wait" in err
        assert "in use by another tomopipe command" in err and first.poll() is None
        err_file = tmp_path / "waiting.err"
        with open(err_file, "w") as err_handle:
            waiting = _cli_process(["run", workflow, "--project", project_dir, "--wait", "300"], stderr=err_handle)
        _wait_for(lambda: "waiting for project" in err_file.read_text(), "the third run to wait", process=waiting)
        assert f"pid {first.pid}" in err_file.read_text()
        release.touch()
        assert first.wait(timeout=120) == 0
        out, _ = waiting.communicate(timeout=120)
        assert waiting.returncode == 0
        assert "[import] up to date" in out and "[summary] up to date" in out
    finally:
        release.touch()
        for process in (first, waiting):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert _integrity(project_dir) == "ok"
    assert _statuses(project_dir) == [("import", "finished"), ("summary", "finished")]


def test_run_with_a_bounded_wait_refuses_after_it(tmp_path):
    """``tomopipe run --wait 1`` on a project another process holds: exit 2 after about a second, with
    the holder's pid and command; nothing is recorded. The same for ``demo --wait 0.5``."""
    workflow = _engine_workflow(tmp_path)
    project_dir = tmp_path / "p"
    with project_lock(project_dir, command="tomopipe demo --out elsewhere"):
        start = time.monotonic()
        process = _cli_process(["run", workflow, "--project", project_dir, "--wait", "1"])
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, err
        assert "after waiting 1 s" in err and f"pid {os.getpid()}" in err and "tomopipe demo --out elsewhere" in err
        assert time.monotonic() - start >= 1.0
    assert not (project_dir / DATABASE_NAME).exists()  # refused before the project was even created
    # the demo holds OUT/project, the simulation included: refused before it simulates anything
    with project_lock(tmp_path / "demo" / "project", command="tomopipe demo --out demo"):
        process = _cli_process(["demo", "--out", tmp_path / "demo", "--preset", "tiny", "--wait", "0.5"])
        out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "after waiting 0.5 s" in err and "tomopipe demo --out demo" in err
    assert str((tmp_path / "demo" / "project").resolve()) in err and not (tmp_path / "demo" / "data").exists()


# --------------------------------------------------------------------- unwritable folders, full disks
def test_unwritable_run_folder_fails_the_run_with_the_path(tmp_path, capsys):
    """The project's ``runs`` is a file, not a folder (as root, chmod does not stop writes): ``tomopipe
    run`` exits 2 naming the path and the reason; the run is 'failed', never finished; the database
    is intact."""
    workflow = _engine_workflow(tmp_path)
    project_dir = tmp_path / "p"
    Project.init(project_dir).close()
    (project_dir / "runs").rmdir()
    (project_dir / "runs").write_text("not a folder")
    assert main(["run", str(workflow), "--project", str(project_dir)]) == 2
    err = capsys.readouterr().err
    folder = project_dir.resolve() / "runs" / "0001_import"
    expected = f"{folder}: cannot create the run's folder: Not a directory (ENOTDIR)"
    assert expected in err
    with Project.open(project_dir) as project:
        [run] = project.runs()
        assert run.status == "failed" and expected in run.error
        assert project.finished_sets() == []
    assert _integrity(project_dir) == "ok"


def test_full_disk_while_writing_an_output_fails_the_run(tmp_path, monkeypatch, capsys):
    """ENOSPC when an output file is flushed (as a full disk reports it): the step fails with the path and
    the reason, its run is 'failed' with that message, its outputs are invisible, no temporary file is
    left; with space again the workflow resumes from that step."""
    workflow = _engine_workflow(tmp_path)
    project_dir = tmp_path / "p"
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(["run", str(workflow), "--project", str(project_dir)]) == 1
    out = capsys.readouterr().out
    folder = project_dir.resolve() / "runs" / "0002_write"
    assert f"[write] FAILED: step 'write': {folder}: cannot write: No space left on device (ENOSPC)" in out
    with Project.open(project_dir) as project:
        assert [(run.name, run.status) for run in project.runs()] == [("import", "finished"), ("write", "failed")]
        assert "No space left on device (ENOSPC)" in project.get_run(2).error
        assert [record.name for record in project.finished_sets()] == ["movies"]
    assert sorted(path.name for path in folder.iterdir()) == ["run.log"]
    assert "No space left on device" in (folder / "run.log").read_text()
    assert _integrity(project_dir) == "ok"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["run", str(workflow), "--project", str(project_dir)]) == 0
    assert _statuses(project_dir)[-1] == ("write", "finished")


def test_full_disk_on_the_database_leaves_no_run_finished(tmp_path, monkeypatch):
    """The database cannot record the end of a run (SQLITE_FULL): a clear error, the run stays
    'running', never 'finished'; the next run of the project marks it killed and runs the step again."""
    workflow = load_workflow(_engine_workflow(tmp_path))
    project_dir = tmp_path / "p"

    def database_full(self, run_id, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Project, "finish_run", database_full)
    monkeypatch.setattr(Project, "fail_run", database_full)
    with Project.open_or_init(project_dir) as project:
        with pytest.raises(TomopipeError, match="could not record the failure .database or disk is full.: run 1 is "
                                                "marked killed when the project is next run"):
            run_workflow(project, workflow, LocalExecutor(1), echo=lambda *_: None)
    assert _statuses(project_dir) == [("import", "running")]
    monkeypatch.undo()
    notes = []
    with Project.open(project_dir) as project:
        report = run_workflow(project, workflow, LocalExecutor(1), echo=notes.append)
    assert report.ok and "note: run 1 was interrupted earlier and is marked killed" in notes
    assert _statuses(project_dir) == [("import", "killed"), ("import", "finished"), ("write", "finished")]
    assert _integrity(project_dir) == "ok"


def test_partial_files_are_the_atomic_writers_temporaries(tmp_path):
    """The cleanup after a kill removes exactly the temporaries of ``atomic_path`` (the name pattern is
    shared knowledge of two modules: this test ties them), never a finished file."""
    names = [_temporary_sibling(tmp_path / name).name for name in ("TS_01.mrc", "TS_01.tlt", "a.b.json", "noext")]
    assert all(_TEMPORARY_NAME.match(name) for name in names)
    for name in ("TS_01.mrc", ".hidden.mrc", "TS_01.tmp.mrc", "run.log"):
        assert not _TEMPORARY_NAME.match(name), name
    (tmp_path / "sub").mkdir()
    for name in names:
        (tmp_path / "sub" / name).write_text("partial")
    (tmp_path / "sub" / "TS_01.mrc").write_text("done")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.mrc"):
        raise RuntimeError("writer failed")  # atomic_path cleans its own temporary on an exception
    assert remove_partial_files(tmp_path) == len(names)
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["TS_01.mrc"]


def test_stale_run_of_a_reused_pid_is_marked_killed_under_the_lock(tmp_path):
    """A run left 'running' whose pid now belongs to another live process (pids are reused, in a
    container quickly): without the lock it cannot be told from a live run; the holder of the lock
    knows no other writer exists and marks it killed, keeping only the runs it executes now."""
    with Project.init(tmp_path / "p") as project:
        other = project.create_run("import", "import_movies", {}, {}, "sig-a")
        own = project.create_run("motion", "motion_ctf", {}, {}, "sig-b")
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            project._db.execute("UPDATE runs SET pid=? WHERE id=?", (live.pid, other.id))
            project._db.commit()
            assert project.mark_stale_runs() == []  # a live pid on this host: it may be running
            assert project.mark_stale_runs(writer_lock_held=True, executing=[own.id]) == [other.id]
        finally:
            live.kill()
            live.wait()
        assert project.get_run(other.id).status == "killed" and project.get_run(own.id).status == "running"


# ------------------------------------------------------------------------- SIGKILL at five moments
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """One tilt series of the tiny preset with enough dose and particles to be aligned and picked."""
    from tomopipe.simulate import config_from_preset, simulate

    folder = tmp_path_factory.mktemp("faults") / "data"
    config = config_from_preset("tiny", seed=3, n_tilt_series=1, dose_per_tilt_e_per_A2=10.0,
                                particles_per_tilt_series=20)
    simulate(config, folder, overwrite=True)
    return folder


def _running(db: sqlite3.Connection) -> list[tuple[int, str, str]]:
    try:
        return db.execute("SELECT id, name, folder FROM runs WHERE status='running'").fetchall()
    except sqlite3.Error:  # not created yet
        return []


def _temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if _TEMPORARY_NAME.match(path.name)]


def _kill_at(args: list[str], project_dir: Path, step: str, mid_write: bool, delay_s: float) -> dict:
    """Start ``tomopipe ARGS``, watch the runs table, and SIGKILL the process while ``step`` runs:
    ``delay_s`` after it started, or (``mid_write``) the moment a temporary output file of it exists.
    Returns what was running when it died and the temporaries it left."""
    process = _cli_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = None
    seen_at = None
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"the command ended (rc {process.returncode}) before step {step} ran"
            assert time.monotonic() < deadline, f"step {step} never ran"
            if db is None and (project_dir / DATABASE_NAME).exists():
                db = sqlite3.connect(f"file:{project_dir / DATABASE_NAME}?mode=ro", uri=True, isolation_level=None)
            running = _running(db) if db is not None else []
            assert seen_at is None or (running and running[0][1] == step), \
                f"step {step} ended before the kill ({delay_s:.2f} s after it started)"
            if running and running[0][1] == step and running[0][2]:
                seen_at = seen_at or time.monotonic()
                if mid_write and _temporaries(project_dir / running[0][2]):
                    break
                if not mid_write and time.monotonic() - seen_at >= delay_s:
                    break
            time.sleep(0.004)
        process.send_signal(signal.SIGKILL)
        process.wait()
        running = _running(db)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if db is not None:
            db.close()
    [(run_id, name, folder)] = running
    return {"run_id": run_id, "step": name, "temporaries": _temporaries(project_dir / folder)}


def _normalised(value):
    """Run folders differ between two projects (killed runs take ids): ``runs/0012_pick/`` -> ``runs/*_pick/``."""
    if isinstance(value, str):
        return re.sub(r"runs/\d{4,}_", "runs/*_", value)
    if isinstance(value, dict):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    return value


def _final_outputs(project_dir: Path) -> dict:
    """``{(step, set name): (attrs, items)}`` of the newest finished run of each step."""
    outputs = {}
    with Project.open(project_dir) as project:
        for run in project.runs():
            if run.status == "finished":
                for name, record in project.sets_of_run(run.id).items():
                    items = project.read_items(record.id)
                    for column in items.columns:
                        if not pd.api.types.is_numeric_dtype(items[column]):
                            items[column] = items[column].map(_normalised)
                    outputs[(run.name, name)] = (_normalised(record.attrs), items)
    return outputs


def _files(project_dir: Path) -> dict[str, Path]:
    """Every file of the finished runs' folders, by normalised path (logs aside: they hold times)."""
    with Project.open(project_dir) as project:
        folders = [project.absolute_path(run.folder) for run in project.runs() if run.status == "finished"]
    return {_normalised(str(path.relative_to(project_dir))): path
            for folder in folders for path in folder.rglob("*") if path.is_file() and path.name != "run.log"}


def _assert_same_project_outputs(reference: Path, resumed: Path) -> None:
    """The same sets (attributes, items) and the same files: numbers to 1e-6 relative, MRC data to
    float32 rounding, other files byte for byte."""
    ref_sets, res_sets = _final_outputs(reference), _final_outputs(resumed)
    assert ref_sets.keys() == res_sets.keys()
    for key, (attrs, items) in ref_sets.items():
        assert_same_document(attrs, res_sets[key][0], str(key), rel=1e-6, abs=1e-9)
        pd.testing.assert_frame_equal(items, res_sets[key][1], check_exact=False, rtol=1e-6, atol=1e-6, obj=str(key))
    ref_files, res_files = _files(reference), _files(resumed)
    assert ref_files.keys() == res_files.keys()
    assert any(name.endswith(".mrc") for name in ref_files)
    for name, path in ref_files.items():
        if path.read_bytes() == res_files[name].read_bytes():
            continue
        if path.suffix == ".mrc":
            (a, voxel_a), (b, voxel_b) = read_mrc(path), read_mrc(res_files[name])
            assert a.shape == b.shape and voxel_a == voxel_b, name
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()), err_msg=name)
        elif path.suffix == ".json":
            assert_same_document(json.loads(path.read_text()), json.loads(res_files[name].read_text()), name,
                                 rel=1e-6, abs=1e-9)
        elif path.suffix == ".csv":
            pd.testing.assert_frame_equal(pd.read_csv(path), pd.read_csv(res_files[name]), check_exact=False,
                                          rtol=1e-6, atol=1e-9, obj=name)
        else:
            assert _numbers_close(path.read_text(), res_files[name].read_text()), f"{name} differs"


def _numbers_close(a: str, b: str) -> bool:
    """Two text files (IMOD .xf, .tlt ...) equal but for the last digits of their numbers: 1e-5 relative, or
    one unit of the last printed decimal (values 1e-6 apart can round to either side of it)."""
    number = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
    if re.sub(number, "#", a) != re.sub(number, "#", b):
        return False
    texts = re.findall(number, a)
    x, y = (np.array([float(v) for v in re.findall(number, text)]) for text in (a, b))
    last_digit = np.array([10.0 ** -len(t.split(".")[1]) if "." in t and "e" not in t.lower() else 0.0 for t in texts])
    return bool(np.all(np.abs(x - y) <= np.maximum(1e-5 * np.abs(x) + 1e-6, 1.0001 * last_digit)))


def _tutorial_args(project_dir: Path, data: Path, until: str, extra=()) -> list[str]:
    from tomopipe.demo import tutorial_workflow_path

    overrides = [f'import.files_directory="{data}"', f'import.gain_image="{data / "gain_ref.mrc"}"',
                 "import.gain_flip_y=true", *TINY_WORKFLOW_OVERRIDES, *extra]
    return ["run", tutorial_workflow_path(), "--project", project_dir, "--until", until,
            *[f"--set={override}" for override in overrides]]


def _kill_resume_and_compare(tmp_path: Path, args_of, schedule, rng: random.Random) -> list[dict]:
    """Run ``args_of(project)`` uninterrupted, then again in another project killed once per
    ``schedule`` entry (step, mid_write, longest delay s) and resumed to the end; both must agree."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    done = subprocess.run([sys.executable, "-m", "tomopipe.cli", *map(str, args_of(reference))],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    kills = []
    for step, mid_write, longest_delay_s in schedule:
        for _ in range(5):  # a mid-write kill may land just after the rename: then try again
            kill = _kill_at(args_of(resumed), resumed, step, mid_write, rng.uniform(0.0, longest_delay_s))
            assert kill["step"] == step
            assert _integrity(resumed) == "ok"
            kills.append(kill)
            if kill["temporaries"] or not mid_write:
                break
        else:
            pytest.fail(f"no kill of step {step} landed while it was writing an output")
    finished = subprocess.run([sys.executable, "-m", "tomopipe.cli", *map(str, args_of(resumed))],
                              capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert _integrity(resumed) == "ok"
    statuses = _statuses(resumed)
    assert "running" not in {status for _, status in statuses}
    killed = {kill["run_id"] for kill in kills}
    with Project.open(resumed) as project:
        assert {run.id for run in project.runs() if run.status == "killed"} == killed
    left = [path for kill in kills for path in kill["temporaries"]]
    assert left and not any(path.exists() for path in left), "the partial files of the killed runs are removed"
    assert f"note: run {kills[-1]['run_id']} was interrupted earlier and is marked killed" in finished.stdout
    _assert_same_project_outputs(reference, resumed)
    return kills


def test_sigkill_at_five_steps_resumes_to_the_same_outputs(tiny_data, tmp_path):
    """``tomopipe run`` (the tutorial workflow, tiny preset, to the extracted particles) SIGKILLed
    while motion correction writes an output, while the X-ray eraser writes, during the alignment,
    while the reconstruction writes its tomogram, and during picking; each restart skips what finished, marks
    the killed run and removes its partial files; the end is the same as an uninterrupted run: the
    same items and the same files (~70 s on 2 cores)."""
    schedule = [("motion", True, 0.0), ("xray", True, 0.0), ("align", False, 0.5), ("reconstruct", True, 0.0),
                ("pick", False, 0.5)]
    kills = _kill_resume_and_compare(tmp_path, lambda project: _tutorial_args(project, tiny_data, "extract2d"),
                                     schedule, random.Random(14))
    assert {kill["step"] for kill in kills} == {"motion", "xray", "align", "reconstruct", "pick"}
    assert {kill["step"] for kill in kills if kill["temporaries"]} >= {"motion", "xray", "reconstruct"}


def _postprocessed(project_dir: Path) -> tuple[float, dict[str, np.ndarray]]:
    """The newest finished post-processing of a project: its resolution (Å) and the maps it wrote."""
    with Project.open(project_dir) as project:
        run = [run for run in project.runs() if run.name == "postprocess" and run.status == "finished"][-1]
        [record] = project.sets_of_run(run.id).values()
        items = project.read_items(record.id)
        maps = {row.map_name: read_mrc(project.absolute_path(row.map_path))[0] for row in items.itertuples()
                if str(row.map_path).startswith(run.folder)}
    return float(run.summary["resolution_A"]), maps


@pytest.mark.slow
def test_sigkilled_demo_resumes_to_the_same_post_processed_map(tmp_path):
    """``tomopipe demo`` (reduced preset) SIGKILLed during the initial model, the bin-10 refinement, while
    the bin-4 extraction writes, during the bin-4 refinement, while the bin-2 reconstruction writes and
    during the bin-2 refinement; resumed, its post-processed map is the uninterrupted run's: the same
    gold-standard resolution (within 2 %) and maps that correlate to 0.999 (~10 min on 2 cores)."""
    import shutil

    reference_out, resumed_out = tmp_path / "reference", tmp_path / "resumed"

    def args_of(out: Path) -> list[str]:
        return [sys.executable, "-m", "tomopipe.cli", "demo", "--out", str(out), "--preset", "reduced", "--seed", "2"]

    # run the reference, then give the resumed demo the same simulated data (reused, not simulated again)
    done = subprocess.run(args_of(reference_out), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shutil.copytree(reference_out / "data", resumed_out / "data")
    schedule = [("initial_model", False, 1.0), ("refine_bin10", False, 5.0), ("extract_bin4", True, 0.0),
                ("refine_bin4", False, 10.0), ("reconstruct_bin2", True, 0.0), ("refine_bin2", False, 20.0)]
    rng = random.Random(41)
    kills = []
    for step, mid_write, longest_delay_s in schedule:
        for _ in range(5):
            kill = _kill_at(args_of(resumed_out)[3:], resumed_out / "project", step, mid_write,
                            rng.uniform(0.0, longest_delay_s))
            assert kill["step"] == step and _integrity(resumed_out / "project") == "ok"
            kills.append(kill)
            if kill["temporaries"] or not mid_write:
                break
        else:
            pytest.fail(f"no kill of step {step} landed while it was writing an output")
    finished = subprocess.run(args_of(resumed_out), capture_output=True, text=True, timeout=1800)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "using the simulated data" in finished.stdout and "[import] up to date" in finished.stdout
    assert _integrity(resumed_out / "project") == "ok"
    assert {kill["step"] for kill in kills} == {step for step, _, _ in schedule}
    assert not any(path.exists() for kill in kills for path in kill["temporaries"])
    (resolution_a, maps_a), (resolution_b, maps_b) = (_postprocessed(reference_out / "project"),
                                                      _postprocessed(resumed_out / "project"))
    print(f"post-processed resolution: uninterrupted {resolution_a:.3f} Å, killed 6 times and resumed "
          f"{resolution_b:.3f} Å")
    assert resolution_b == pytest.approx(resolution_a, rel=0.02)
    assert maps_a.keys() == maps_b.keys() and maps_a
    for name, map_a in maps_a.items():
        correlation = float(np.corrcoef(map_a.ravel(), maps_b[name].ravel())[0, 1])
        difference = float(np.abs(map_a - maps_b[name]).max() / np.abs(map_a).max())
        print(f"{name}: correlation {correlation:.6f}, max |difference| / max {difference:.2e}")
        assert correlation >= 0.999, name


@pytest.mark.parametrize("content", [b"", b"not a database at all, " * 100])
def test_a_project_whose_creation_was_killed_gives_a_clear_error(tmp_path, content):
    """A database file without the project's schema (``project init`` killed after creating the file,
    or another file under the name): a clear error naming it and the way out, not a traceback."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / DATABASE_NAME).write_bytes(content)
    with pytest.raises(TomopipeError, match=f"{DATABASE_NAME}: not a tomopipe project database .*remove the file"):
        Project.open(tmp_path / "p")


ORPHAN_SCRIPT = """
import time
from tomopipe.engine.executors import LocalExecutor

if __name__ == "__main__":
    LocalExecutor(2).map(time.sleep, [120.0, 120.0])
"""


def _children(pid: int) -> list[int]:
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.MULTILINE):
            children.append(int(status.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_parent_leaves_no_workers_computing(tmp_path):
    """SIGKILL a process whose local executor has two workers busy: the workers end within seconds
    (their watchdog sees the parent gone) instead of computing on as orphans."""
    script = tmp_path / "orphans.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline, workers = time.time() + 60, []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)  # the spawned workers: the resource tracker is a child too, hence "at least"
            workers = [pid for pid in _children(parent.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2, "the pool's workers did not start"
        time.sleep(2.0)  # let them import and start the tasks
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
