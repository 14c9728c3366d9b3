"""Project store: creation, runs, sets round trip, visibility of unfinished runs, provenance."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from tomopipe.errors import TomopipeError
from tomopipe.project.store import DATABASE_NAME, Project


def _items(n=5):
    return pd.DataFrame({
        "ts_id": ["TS_01"] * 3 + ["TS_02"] * (n - 3),
        "tilt_angle_deg": np.linspace(-6, 6, n),
        "count": np.arange(n, dtype=np.int64),
        "defocus_A": [20000.0, np.nan, 21000.0, 22000.0, np.nan][:n],
        "when": pd.to_datetime(["2026-11-24 10:00"] * n),
        "enabled": [True, False, True, True, False][:n],
    })


def test_init_open_and_refusals(tmp_path):
    with Project.init(tmp_path / "p") as project:
        assert (project.folder / DATABASE_NAME).is_file() and (project.folder / "runs").is_dir()
        mode = project._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    with pytest.raises(TomopipeError, match="already exists"):
        Project.init(tmp_path / "p")
    with pytest.raises(TomopipeError, match="not a tomopipe project"):
        Project.open(tmp_path / "elsewhere")
    Project.open(tmp_path / "p").close()


def test_set_round_trip_keeps_values_dtypes_and_order(tmp_path):
    items = _items()
    with Project.init(tmp_path / "p") as project:
        run = project.create_run("import", "import_movies", {"a": 1}, {}, "sig1")
        record = project.add_set(run.id, "movies", "tilt_series_movies", items, {"tilt_series": {"TS_01": {"x": 1.5}}})
        project.finish_run(run.id, {"tilts": 5})
        back = project.read_items(record.id)
        assert list(back.columns) == list(items.columns)
        np.testing.assert_array_equal(back["count"].to_numpy(), items["count"].to_numpy())
        np.testing.assert_array_equal(back["defocus_A"].to_numpy(), items["defocus_A"].to_numpy())
        assert back["enabled"].dtype == bool and back["when"].iloc[0] == items["when"].iloc[0]
        assert back["ts_id"].tolist() == items["ts_id"].tolist()
        enabled = project.read_items(record.id, enabled_only=True)
        assert enabled["count"].tolist() == [0, 2, 3]
        assert project.get_set(record.id).attrs["tilt_series"]["TS_01"]["x"] == 1.5
        assert project.get_run(run.id).summary == {"tilts": 5}


def test_unfinished_runs_hide_their_sets(tmp_path):
    with Project.init(tmp_path / "p") as project:
        run = project.create_run("import", "import_movies", {}, {}, "sig")
        record = project.add_set(run.id, "movies", "tilt_series_movies", _items())
        assert project.finished_sets() == []
        with pytest.raises(TomopipeError, match="no finished set"):
            project.get_set(record.id)
        assert project.finished_run_with_signature("sig") is None
        project.fail_run(run.id, "boom")
        assert project.get_run(run.id).status == "failed"
        with pytest.raises(TomopipeError, match="cannot be finished"):
            project.finish_run(run.id)


def test_provenance_subsets_and_enabled_default(tmp_path):
    with Project.init(tmp_path / "p") as project:
        first = project.create_run("import", "import_movies", {}, {}, "s1")
        parent = project.add_set(first.id, "movies", "tilt_series_movies", _items().drop(columns="enabled"))
        project.finish_run(first.id)
        assert project.read_items(parent.id)["enabled"].all()
        second = project.create_run("exclude", "exclude", {}, {"movies": parent.id}, "s2")
        subset_items = project.read_items(parent.id)
        subset_items.loc[0, "enabled"] = False
        subset = project.add_set(second.id, "movies", "tilt_series_movies", subset_items, parent_set_id=parent.id)
        project.finish_run(second.id)
        assert project.get_set(subset.id).parent_set_id == parent.id
        assert project.read_items(parent.id)["enabled"].all()  # the parent is untouched
        assert project.provenance(second.id) == [("input", "movies", parent.id), ("output", "movies", subset.id)]
        assert project.find_run("exclude").id == second.id
        with pytest.raises(TomopipeError, match="no run named"):
            project.find_run("nope")


def test_stale_running_run_is_marked_killed(tmp_path):
    with Project.init(tmp_path / "p") as project:
        run = project.create_run("import", "import_movies", {}, {}, "s")
        project._db.execute("UPDATE runs SET pid=? WHERE id=?", (2**22 + 12345, run.id))
        project._db.commit()
        assert project.mark_stale_runs() == [run.id]
        assert project.get_run(run.id).status == "killed"


def test_database_is_plain_sqlite(tmp_path):
    Project.init(tmp_path / "p").close()
    tables = {row[0] for row in sqlite3.connect(tmp_path / "p" / DATABASE_NAME).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "sets", "items", "provenance", "meta"} <= tables
