"""The demo on the tiny preset: simulate, import, motion + CTF, exclusion; scores against the truth."""

from __future__ import annotations

from tomopipe.cli import main
from tomopipe.project.store import Project


def test_demo_on_the_tiny_preset(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "tiny", "--seed", "3", "--until", "exclude",
                 "--set", "motion.ctf_window_px=128"]) == 0
    out = capsys.readouterr().out
    assert '"max_tilt_angle_error_deg": 0.0' in out and '"tilt_axis_direction": "as the truth"' in out
    assert '"motion_shift_rms_error_A"' in out and '"defocus_error_median_A"' in out
    with Project.open(tmp_path / "demo" / "project") as project:
        assert all(run.status == "finished" for run in project.runs())
    # a second demo reuses the simulation and skips the finished, unchanged steps
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "tiny", "--seed", "3", "--until", "exclude",
                 "--set", "motion.ctf_window_px=128"]) == 0
    out = capsys.readouterr().out
    assert "using the simulated data" in out and "skipped" in out


def test_simulated_data_are_reused_whatever_device_made_them(tmp_path):
    """The data set is identified by its data settings: one simulated on a GPU is reused on the
    CPU (device and threads change how fast it is made, not what), a different seed is not."""
    import json

    from tomopipe.demo import simulate_once

    data = tmp_path / "data"
    assert simulate_once(data, "tiny", 3) > 0.0
    marker = data / "truth" / "truth.json"
    stored = json.loads(marker.read_text())
    stored["config"]["device"], stored["config"]["threads"] = "cuda", 16
    marker.write_text(json.dumps(stored))
    assert simulate_once(data, "tiny", 3) == 0.0
    assert simulate_once(data, "tiny", 4) > 0.0
