"""Exports read back with our readers give the project's values; excluded items are left out."""

from __future__ import annotations

import numpy as np

from conftest import write_acquisition
from tomopipe.cli import main
from tomopipe.io.imod import read_exclude_list, read_tlt
from tomopipe.io.star import read_star, read_tilt_series_star
from tomopipe.project.store import Project


def _imported_project(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_angles=(0.0, 3.0, -3.0, 6.0, -6.0), dose_per_tilt=2.5)
    workflow = tmp_path / "wf.toml"
    workflow.write_text(f'[steps.import]\ntype = "import_movies"\nfiles_directory = "{data}"\n')
    assert main(["run", str(workflow), "--project", str(tmp_path / "p")]) == 0
    return tmp_path / "p"


def _exclude_first_tilt(project_dir):
    """A new run whose movies set is a subset with TS_01's tilt_index 0 disabled."""
    with Project.open(project_dir) as project:
        parent = project.finished_sets("tilt_series_movies")[-1]
        items = project.read_items(parent.id)
        items.loc[(items["ts_id"] == "TS_01") & (items["tilt_index"] == 0), "enabled"] = False
        run = project.create_run("exclude", "exclude_views", {}, {"movies": parent.id}, "subset")
        project.add_set(run.id, "movies", "tilt_series_movies", items, parent.attrs, parent_set_id=parent.id)
        project.finish_run(run.id)
        return project.read_items(parent.id)


def test_relion5_export_round_trip(tmp_path):
    project_dir = _imported_project(tmp_path)
    items = _exclude_first_tilt(project_dir)
    out = tmp_path / "relion"
    assert main(["export", "relion5", "--project", str(project_dir), "--out", str(out)]) == 0
    global_table = read_star(out / "tilt_series.star")["global"]
    assert global_table["rlnTomoName"].tolist() == ["TS_01", "TS_02"]
    assert np.allclose(global_table["rlnMicrographOriginalPixelSize"], 2.0)
    assert (global_table["rlnTomoHand"] == -1).all()
    for ts_id in ("TS_01", "TS_02"):
        table = read_tilt_series_star(out / "tilt_series" / f"{ts_id}.star")
        expected = items[items["ts_id"] == ts_id].sort_values("tilt_angle_deg")
        if ts_id == "TS_01":
            expected = expected[expected["tilt_index"] != 0]
        assert table.attrs["tomo_name"] == ts_id
        np.testing.assert_allclose(table["rlnTomoNominalStageTiltAngle"], expected["tilt_angle_deg"], atol=1e-6)
        np.testing.assert_allclose(table["rlnMicrographPreExposure"], expected["pre_exposure_e_per_A2"], atol=1e-6)
        assert table["rlnMicrographMovieName"].tolist() == expected["movie_path"].tolist()
        assert (table["rlnTomoTiltMovieFrameCount"] == 2).all()
    assert len(read_tilt_series_star(out / "tilt_series" / "TS_01.star")) == 4


def test_imod_export_round_trip(tmp_path):
    project_dir = _imported_project(tmp_path)
    items = _exclude_first_tilt(project_dir)
    out = tmp_path / "imod"
    assert main(["export", "imod", "--project", str(project_dir), "--out", str(out)]) == 0
    for ts_id in ("TS_01", "TS_02"):
        expected = items[items["ts_id"] == ts_id].sort_values("tilt_index")
        np.testing.assert_allclose(read_tlt(out / ts_id / f"{ts_id}.rawtlt"), expected["tilt_angle_deg"], atol=0.005)
    assert read_exclude_list((out / "TS_01" / "TS_01_excludelist.txt").read_text()) == [1]
    assert not (out / "TS_02" / "TS_02_excludelist.txt").exists()


def test_export_of_an_empty_project_is_refused(tmp_path, capsys):
    Project.init(tmp_path / "empty").close()
    assert main(["export", "relion5", "--project", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to export" in capsys.readouterr().err
