"""Exclusion by hand and by rule: new subsets, inputs untouched, every rule fires where it should."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tomopipe.algorithms.exclusion import dark_or_empty_views, defocus_outliers, high_astigmatism, poor_fit_resolution
from tomopipe.cli import main
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_step
from tomopipe.engine.workflow import WorkflowStep
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import write_mrc
from tomopipe.project.store import Project
from tomopipe.steps.exclude import ExcludeViews, parse_tilt_selection

N_TILTS = 7


def _project_with_tilt_series_and_ctf(tmp_path):
    """A finished 'motion' run holding a tilt_series set (an MRC stack per TS) and a ctf set."""
    project = Project.init(tmp_path / "p")
    run = project.create_run("motion", "motion_ctf", {}, {}, "motion-signature")
    rng = np.random.default_rng(0)
    series, ctf = [], []
    for ts_id in ("TS_01", "TS_02"):
        stack = rng.poisson(20.0, size=(N_TILTS, 16, 16)).astype(np.float32)
        if ts_id == "TS_02":
            stack[5] *= 0.1  # a dark view
        path = project.folder / run.folder / f"{ts_id}.mrc"
        write_mrc(path, stack, 2.0, stack=True)
        for index in range(N_TILTS):
            series.append({"ts_id": ts_id, "tilt_index": index, "tilt_angle_deg": -9.0 + 3 * index,
                           "image_path": project.relative_path(path), "image_section": index})
            defocus = 25000.0 + 100 * index + (8000.0 if (ts_id, index) == ("TS_01", 3) else 0.0)
            astigmatism = 900.0 if (ts_id, index) == ("TS_02", 1) else 200.0
            ctf.append({"ts_id": ts_id, "tilt_index": index, "defocus_u_A": defocus + astigmatism / 2,
                        "defocus_v_A": defocus - astigmatism / 2, "defocus_angle_deg": 10.0,
                        "fit_resolution_A": 14.0 if (ts_id, index) == ("TS_02", 6) else 6.5})
    project.add_set(run.id, "tilt_series", "tilt_series", pd.DataFrame(series), {"tilt_series": {}})
    project.add_set(run.id, "ctf", "ctf", pd.DataFrame(ctf), {"tilt_series": {}})
    project.finish_run(run.id)
    return project, project.sets_of_run(run.id)


def _exclude(project, sets, **params):
    validated = ExcludeViews.validate_params("exclude", params)
    step = WorkflowStep("exclude", ExcludeViews, validated, {})
    return run_step(project, step, {"tilt_series": sets["tilt_series"], "ctf": sets["ctf"]}, repr(params),
                    LocalExecutor(1))


def _disabled(project, outcome, port):
    items = project.read_items(project.sets_of_run(outcome.run.id)[port].id)
    return sorted((ts, int(i) + 1)
                  for ts, i in items.loc[~items["enabled"], ["ts_id", "tilt_index"]].itertuples(index=False))


def test_rules_flag_the_planted_bad_tilts(tmp_path):
    project, sets = _project_with_tilt_series_and_ctf(tmp_path)
    outcome = _exclude(project, sets, max_astigmatism_A=500.0, max_fit_resolution_A=10.0,
                       max_defocus_deviation_A=2000.0, exclude_dark_views=True)
    assert outcome.status == "finished", outcome.message
    expected = [("TS_01", 4), ("TS_02", 2), ("TS_02", 6), ("TS_02", 7)]
    assert _disabled(project, outcome, "tilt_series") == expected == _disabled(project, outcome, "ctf")
    assert outcome.summary["excluded"]["TS_02:6"] == ["dark or empty"]
    # the inputs are untouched, the outputs are subsets of them
    assert project.read_items(sets["ctf"].id)["enabled"].all()
    assert project.sets_of_run(outcome.run.id)["ctf"].parent_set_id == sets["ctf"].id


def test_by_hand_from_the_command_line(tmp_path, capsys):
    project, _ = _project_with_tilt_series_and_ctf(tmp_path)
    project.close()
    assert main(["exclude", "--run", "motion", "--tilts", "TS_01:1,3-4", "--tilts", "TS_02:7",
                 "--project", str(tmp_path / "p")]) == 0
    assert "4 tilt(s) newly excluded" in capsys.readouterr().out
    with Project.open(tmp_path / "p") as project:
        run = project.find_run("exclude")
        items = project.read_items(project.sets_of_run(run.id)["tilt_series"].id)
        assert sorted(map(tuple, items.loc[~items["enabled"], ["ts_id", "tilt_index"]].values.tolist())) == \
            [("TS_01", 0), ("TS_01", 2), ("TS_01", 3), ("TS_02", 6)]
    assert main(["exclude", "--run", "motion", "--tilts", "TS_09:1", "--project", str(tmp_path / "p")]) == 1
    assert "no tilt series 'TS_09'" in capsys.readouterr().err
    assert main(["exclude", "--run", "motion", "--tilts", "TS_01:8", "--project", str(tmp_path / "p")]) == 1


def test_rule_functions():
    assert high_astigmatism(np.array([1000.0, 1000.0]), np.array([900.0, 400.0]), 500.0).tolist() == [False, True]
    assert poor_fit_resolution(np.array([6.0, 12.0, np.nan]), 10.0).tolist() == [False, True, True]
    assert (defocus_outliers(np.array([2e4, 2.01e4, 3e4, 2.03e4, 2.04e4]), 2000.0).tolist()
            == [False] * 2 + [True] + [False] * 2)
    assert dark_or_empty_views(np.array([10.0, 10.0, 2.0, 10.0]), np.array([3.0, 0.0, 1.0, 3.0]), 0.3).tolist() == \
        [False, True, True, False]


def test_tilt_selection_parsing():
    assert parse_tilt_selection("TS_01:3,5-7; TS_02:1") == {"TS_01": [3, 5, 6, 7], "TS_02": [1]}
    for bad in ("TS_01", "TS_01:0", "TS_01:4-2", "TS_01:a"):
        with pytest.raises(TomopipeError):
            parse_tilt_selection(bad)
