"""The demo on the tiny preset: simulate, import, motion + CTF, exclusion; its score table and
scores.json against the truth; the goals of the scores."""

from __future__ import annotations

import json

from tomopipe.cli import main
from tomopipe.project.store import Project
from tomopipe.validate.scores import GOALS, format_score_table, score_record


def test_demo_on_the_tiny_preset(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    args = ["demo", "--out", str(out_dir), "--preset", "tiny", "--seed", "3", "--until", "exclude",
            "--set", "motion.ctf_window_px=128"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # a table, not JSON: the scores with units, their goals and whether they are met
    assert "scores against the simulator's truth" in out and "{" not in out
    table = out.split("scores against the simulator's truth")[1]
    assert "max_tilt_angle_error_deg" in table and "≤ 0.01 °" in table and "✓" in table
    records = json.loads((out_dir / "scores.json").read_text())
    by_name = {(r["step"], r["score"]): r for r in records}
    assert by_name[("import", "max_tilt_angle_error_deg")]["value"] == 0.0
    assert by_name[("import", "max_tilt_angle_error_deg")]["met"] is True
    assert by_name[("import", "tilt_axis_direction")]["value"] == "as the truth"
    motion = by_name[("motion", "motion_shift_rms_error_A")]
    assert motion["unit"] == "Å" and motion["goal"] == "≤ 0.5 Å" and motion["met"] == (motion["value"] <= 0.5)
    assert ("motion", "defocus_error_median_A") in by_name
    assert [r["value"] for r in records if r["score"] == "status"] == ["simulated"] + ["finished"] * 3
    with Project.open(out_dir / "project") as project:
        assert all(run.status == "finished" for run in project.runs())
    # a second demo reuses the simulation and skips the finished, unchanged steps
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "using the simulated data" in out and "skipped" in out


def test_score_goals_and_table():
    """Goals come from one table (GOALS) by score name; a value is met or not against its goal,
    a score without a goal has none; the table shows value with unit, goal, ✓/✗/—, the time and the
    peak memory (when measured)."""
    records = [score_record("motion", "motion_shift_rms_error_A", 0.31, 12.04, peak_rss_GB=1.234),
               score_record("motion", "defocus_error_median_A", 180.0, 12.04, peak_rss_GB=1.234),
               score_record("motion", "motion_s_per_tilt", 1.5, 12.04),
               score_record("import", "tilt_axis_direction", "opposite to the truth (other hand)", 0.2),
               score_record("reconstruct", "correlation", 0.45, 6.0, subject="TS_01"),
               score_record("reconstruct", "fsc_0_143_A", 31.0, 6.0, subject="TS_01")]
    assert [r["met"] for r in records] == [True, False, None, False, True, False]
    assert [r["unit"] for r in records] == ["Å", "Å", "s/tilt", "", "", "Å"]
    assert [r["goal"] for r in records] == ["≤ 0.5 Å", "≤ 150.0 Å", None, "as the truth", "≥ 0.4", "≤ 30.0 Å"]
    assert GOALS["max_shift_rms_px"].met(0.49) and not GOALS["max_shift_rms_px"].met(float("nan"))
    # a step's own goal (STEP_GOALS): Nyquist is the goal at bin 10, not at bin 2
    assert score_record("refine_bin10", "gold_over_nyquist", 1.0, 1.0)["met"] is True
    assert score_record("refine_bin10", "gold_over_nyquist", 1.2, 1.0)["met"] is False
    assert score_record("refine_bin2", "gold_over_nyquist", 1.33, 1.0)["goal"] is None
    lines = format_score_table(records).splitlines()
    assert lines[0].split() == ["step", "score", "value", "goal", "met", "time", "peak", "memory"]
    assert lines[1].split() == ["motion", "motion_shift_rms_error_A", "0.31", "Å", "≤", "0.5", "Å", "✓", "12.0", "s",
                                "1.23", "GB"]
    assert lines[2].split() == ["defocus_error_median_A", "180", "Å", "≤", "150.0", "Å", "✗"]
    assert lines[3].split() == ["motion_s_per_tilt", "1.5", "s/tilt", "—"]
    assert lines[5].split() == ["reconstruct", "TS_01", "correlation", "0.45", "≥", "0.4", "✓", "6.0", "s"]


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


def test_scorer_registry_by_set_kind_and_step_type():
    """The demo's scorers come from one registry keyed by (set kind, step type): the motion step's
    tilt series and CTF sets have their own scorers, an aligned and an assigned tilt series
    theirs, sets without a scorer (the exclusion's subsets) none; a pair is registered once."""
    import pytest

    from tomopipe.validate.registry import scorer, scorer_for

    motion_sums, ctf = scorer_for("tilt_series", "motion_ctf"), scorer_for("ctf", "motion_ctf")
    aligned, assigned = scorer_for("tilt_series", "align_tilt_series"), scorer_for("tilt_series", "assign_alignment")
    found = [scorer_for("tilt_series_movies", "import_movies"), motion_sums, ctf, aligned, assigned,
             scorer_for("tomograms", "reconstruct_tomogram")]
    assert all(callable(f) for f in found) and len(set(found)) == len(found)
    assert scorer_for("ctf", "exclude_views") is None and scorer_for("tilt_series", "exclude_views") is None
    with pytest.raises(ValueError, match="already registered"):
        scorer("ctf", "motion_ctf")(lambda project, record, items, truth: [])
    with pytest.raises(ValueError, match="name the step types"):
        scorer("ctf")
