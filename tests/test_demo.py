"""The demo end to end on the tiny preset: simulate, import through the workflow, score vs truth."""

from __future__ import annotations

from tomopipe.cli import main
from tomopipe.project.store import Project


def test_demo_on_the_tiny_preset(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "tiny", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert '"max_tilt_angle_error_deg": 0.0' in out and '"tilt_axis_direction": "as the truth"' in out
    with Project.open(tmp_path / "demo" / "project") as project:
        assert all(run.status == "finished" for run in project.runs())
    # a second demo reuses the simulation and skips the finished, unchanged steps
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "tiny", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "using the simulated data" in out and "skipped" in out
