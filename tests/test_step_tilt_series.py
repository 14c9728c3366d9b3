"""The tilt-series plumbing of the steps (typed tasks and results, merging per-view results into a
set) and the x-ray eraser's parameters made from the XrayParams fields."""

from __future__ import annotations

import pickle
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.algorithms.xray import XrayParams
from tomopipe.engine.step_api import step_class
from tomopipe.steps._tilt_series import TiltSeriesResult, TiltSeriesTask, merge_views, views_of


class _Ctx:
    """The two path methods of a run context, for a project at /project."""

    @staticmethod
    def resolve(stored):
        return Path("/project") / stored

    @staticmethod
    def stored_path(path):
        return str(Path(path).relative_to("/project"))


def _items() -> pd.DataFrame:
    return pd.DataFrame({"ts_id": ["TS_1"] * 3 + ["TS_2"] * 2, "tilt_index": [0, 1, 2, 0, 1],
                         "image_path": ["a.mrc"] * 3 + ["b.mrc"] * 2, "image_section": [0, 1, 2, 0, 1],
                         "image_even_path": ["a_even.mrc"] * 3 + ["b_even.mrc", None],
                         "image_odd_path": ["a_odd.mrc"] * 3 + ["b_odd.mrc"] * 2,
                         "enabled": np.array([True, False, True, True, True]),
                         "rot_z_deg": [1.0, 2.0, 3.0, 4.0, 5.0]})


def test_views_carry_halves_only_when_every_view_has_both():
    items = _items()
    full = views_of(_Ctx, items[items["ts_id"] == "TS_1"])
    assert [v.path("image_even_path") for v in full] == ["/project/a_even.mrc"] * 3
    assert full[1].image_section == 1 and full[1].values == {"enabled": False, "rot_z_deg": 2.0}
    assert type(full[1].values["enabled"]) is bool  # plain values, not numpy scalars
    partial = views_of(_Ctx, items[items["ts_id"] == "TS_2"])
    assert all(v.half_paths == {} for v in partial)


def test_tasks_and_results_pickle_for_worker_processes():
    views = views_of(_Ctx, _items()[lambda t: t["ts_id"] == "TS_1"])
    task = TiltSeriesTask("TS_1", {"pixel_size_A": 2.0}, views, {"device": "cpu"}, "/project/runs/1", "cpu")
    assert pickle.loads(pickle.dumps(task)) == task and task.has_halves
    result = TiltSeriesResult("TS_1", ({"tilt_index": 0, "x": 1.0},), {"image_path": "/project/new.mrc"}, {"n": 1})
    assert pickle.loads(pickle.dumps(result)) == result


def test_merge_views_replaces_columns_and_sets_files_on_listed_views():
    items = _items()
    results = [TiltSeriesResult("TS_1", ({"tilt_index": 0, "rot_z_deg": 10.0}, {"tilt_index": 2, "rot_z_deg": 30.0}),
                                {"image_path": "/project/runs/1/TS_1.mrc", "xf": "/project/runs/1/TS_1.xf"}),
               TiltSeriesResult("TS_2", ({"tilt_index": 0, "rot_z_deg": 40.0}, {"tilt_index": 1, "rot_z_deg": 50.0}),
                                {"image_path": "/project/runs/1/TS_2.mrc"})]
    out = merge_views(_Ctx, items, results, file_columns=("image_path",), drop=("image_even_path",))
    assert "image_even_path" not in out.columns and "xf" not in out.columns
    assert out["rot_z_deg"].fillna(-1).tolist() == [10.0, -1, 30.0, 40.0, 50.0]
    stored = [None if pd.isna(v) else v for v in out["image_path"]]
    assert stored == ["runs/1/TS_1.mrc", None, "runs/1/TS_1.mrc"] + ["runs/1/TS_2.mrc"] * 2
    assert out["image_odd_path"].tolist() == items["image_odd_path"].tolist()  # not dropped: kept
    assert out["enabled"].tolist() == items["enabled"].tolist()


def test_xray_eraser_parameters_are_the_xray_params_fields():
    step = step_class("xray_eraser")
    defaults = XrayParams()
    derived = [p for p in step.params if p.name != "device"]
    assert [p.name for p in derived] == [f.name for f in fields(XrayParams)]
    assert all(p.default == getattr(defaults, p.name) for p in derived)
    assert step.param("border_size_px").max == 5 and step.param("peak_criterion_sd").min == 0.001
