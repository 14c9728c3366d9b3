"""Exports read back with our readers give the project's values; excluded items are left out; both
exports work at every stage of the tutorial workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_acquisition
from tomopipe.cli import main
from tomopipe.io.imod import read_defocus, read_exclude_list, read_tlt, read_xf
from tomopipe.io.picks import read_picks
from tomopipe.io.star import read_particles_star, read_star, read_tilt_series_star
from tomopipe.model.alignment import xf_for_views
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


# ----------------------------------------------------------------------------- every stage of the tutorial

# The tutorial workflow on a tiny twin with parameters that fit it (11 tilts of 256 px; align at bin 2
# with 300 Å patches instead of bin 10 with 500 Å, which would leave 25 px views), one view excluded by hand.
STAGE_OVERRIDES = ["motion.ctf_window_px=128", 'exclude.exclude_tilts="TS_01:2"', "preprocess.binning=2",
                   "align.patch_size_A=300", "reconstruct.thickness_px=32", *(f"{step}.{value}" for step in (
                       "extract3d", "extract2d", "extract_bin4", "extract_bin2") for value in (
                       "binning=2", "box_px=48", "crop_px=24")), "initial_model.batch_size=8",
                   *(f"{step}.max_iterations=2" for step in ("refine_bin10", "refine_bin4", "refine_bin2")),
                   "postprocess.mask_diameter_A=140"]


@pytest.fixture(scope="module")
def twin_data(tmp_path_factory):
    from tomopipe.simulate import config_from_preset, simulate

    data = tmp_path_factory.mktemp("twin") / "data"
    config = config_from_preset("tiny", seed=3, tilt_min_deg=-30.0, tilt_max_deg=30.0, dose_per_tilt_e_per_A2=20.0,
                                particles_per_tilt_series=20, threads=1)
    simulate(config, data, progress=False)
    return data


def _check_imod_export(project, sets, out):
    """The IMOD files read back give the project's values; files of missing data are absent."""
    base = next(sets[k] for k in ("tilt_series", "tilt_series_movies") if k in sets)
    items = project.read_items(base.id)
    ctf = project.read_items(sets["ctf"].id) if "ctf" in sets else None
    for ts_id, views in items.groupby("ts_id"):
        views = views.sort_values("tilt_index").reset_index(drop=True)
        folder = out / ts_id
        np.testing.assert_allclose(read_tlt(folder / f"{ts_id}.rawtlt"), views["tilt_angle_deg"], atol=0.005)
        enabled = views["enabled"].to_numpy(bool)
        assert (folder / f"{ts_id}.defocus").exists() == (ctf is not None)
        if ctf is not None:
            estimates = views[["tilt_index"]].merge(ctf[ctf["ts_id"] == ts_id], on="tilt_index")
            enabled = enabled & estimates["enabled"].to_numpy(bool)
            defocus = read_defocus(folder / f"{ts_id}.defocus")
            assert defocus["start_view"].tolist() == list(range(1, len(views) + 1))
            np.testing.assert_allclose(defocus["defocus1_nm"], estimates["defocus_u_A"] / 10, atol=0.051)
            np.testing.assert_allclose(defocus["defocus2_nm"], estimates["defocus_v_A"] / 10, atol=0.051)
        aligned = views[views["rot_z_deg"].notna()] if "rot_z_deg" in views else views.iloc[:0]
        assert (folder / f"{ts_id}.xf").exists() == (len(aligned) > 0)
        if len(aligned):
            A, d = read_xf(folder / f"{ts_id}.xf")
            # one line per view of the stack (IMOD numbers .xf lines by view); aligned views exact
            assert len(A) == len(views)
            rows = aligned.index.to_numpy()
            A_expected, d_expected = xf_for_views(aligned, base.attrs["tilt_series"][ts_id]["pixel_size_A"])
            np.testing.assert_allclose(A[rows], A_expected, atol=1e-6)
            np.testing.assert_allclose(d[rows], d_expected, atol=0.001)
            np.testing.assert_allclose(read_tlt(folder / f"{ts_id}.tlt")[rows], aligned["rot_y_deg"], atol=0.005)
        exclude_list = folder / f"{ts_id}_excludelist.txt"
        excluded = (np.flatnonzero(~enabled) + 1).tolist()
        assert (read_exclude_list(exclude_list.read_text()) if exclude_list.exists() else []) == excluded


def _check_relion5_export(project, sets, out):
    """One row per tilt enabled in every set, with the CTF and alignment columns once the project has them."""
    base = next(sets[k] for k in ("tilt_series", "tilt_series_movies") if k in sets)
    items = project.read_items(base.id)
    if "ctf" in sets:
        ctf = project.read_items(sets["ctf"].id)
        items = items.merge(ctf[["ts_id", "tilt_index", "defocus_u_A", "enabled"]], on=["ts_id", "tilt_index"],
                            suffixes=("", "_ctf"))
        items["enabled"] &= items["enabled_ctf"]
    global_table = read_star(out / "tilt_series.star")["global"]
    assert global_table["rlnTomoName"].tolist() == sorted(items["ts_id"].unique())
    for ts_id, views in items.groupby("ts_id"):
        expected = views[views["enabled"]].sort_values("tilt_angle_deg")
        table = read_tilt_series_star(out / "tilt_series" / f"{ts_id}.star")
        np.testing.assert_allclose(table["rlnTomoNominalStageTiltAngle"], expected["tilt_angle_deg"], atol=1e-5)
        np.testing.assert_allclose(table["rlnMicrographPreExposure"], expected["pre_exposure_e_per_A2"], atol=1e-5)
        assert ("rlnDefocusU" in table) == ("ctf" in sets)
        if "ctf" in sets:
            np.testing.assert_allclose(table["rlnDefocusU"], expected["defocus_u_A"], rtol=1e-6)
        assert ("rlnMicrographName" in table) == ("image_path" in views)
        if "image_path" in views:
            stacks = {name.split("@", 1)[1] for name in table["rlnMicrographName"]}
            assert stacks == {str(project.absolute_path(p)) for p in expected["image_path"]}
        assert ("rlnTomoZRot" in table) == ("rot_z_deg" in views)
        if "rot_z_deg" in views:
            np.testing.assert_allclose(table["rlnTomoZRot"], expected["rot_z_deg"], atol=1e-5)
            np.testing.assert_allclose(table["rlnTomoXShiftAngst"], expected["shift_x_A"], atol=1e-5)
    assert (out / "particles.star").exists() == ("particles" in sets)
    if "subtomograms" in sets:  # extracted (or refined: centres may have moved past an edge) particles
        exported = read_particles_star(out / "particles.star")[0]
        items = project.read_items(sets["subtomograms"].id, enabled_only=True)
        assert len(exported) == len(items) > 0
        refined = "refined" in sets["subtomograms"].attrs  # an auto-refine's: also Refine3D/run_data.star
        assert (out / "Refine3D" / "run_data.star").exists() == refined
        if refined:
            run_data = read_particles_star(out / "Refine3D" / "run_data.star")[0]
            for axis in "xyz":
                np.testing.assert_allclose(run_data[f"rlnOrigin{axis.upper()}Angst"], items[f"origin_{axis}_A"],
                                           atol=1e-5)
            np.testing.assert_allclose(run_data["rlnAngleTilt"], items["tilt_deg"], atol=1e-5)
    elif "particles" in sets:  # the picks, read back as RELION 5 reads them
        picks = project.read_items(sets["particles"].id, enabled_only=True).sort_values(["ts_id", "x_A"])
        back = read_picks(out / "particles.star", project.read_items(sets["tomograms"].id)).sort_values(
            ["ts_id", "x_A"])
        assert len(picks) > 0 and back["ts_id"].tolist() == picks["ts_id"].tolist()
        np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]], picks[["x_A", "y_A", "z_A"]], atol=1e-3)
        tomograms = read_star(out / "tomograms.star")["global"]
        assert sorted(tomograms["rlnTomoName"]) == sorted(picks["ts_id"].unique())


def test_both_exports_after_each_step_of_the_tutorial(twin_data, tmp_path, one_thread):
    """Defect: ``export imod`` failed with 'output array is read-only' once there was a CTF set
    (pandas' arrays are read-only views). Each step of the tutorial workflow, then both exports."""
    from tomopipe.demo import tutorial_workflow_path
    from tomopipe.engine.executors import LocalExecutor
    from tomopipe.engine.runner import run_workflow
    from tomopipe.engine.workflow import load_workflow
    from tomopipe.export import export_project, sets_to_export

    overrides = [f"import.files_directory={json.dumps(str(twin_data))}",
                 f"import.gain_image={json.dumps(str(twin_data / 'gain_ref.mrc'))}", "import.gain_flip_y=true",
                 *STAGE_OVERRIDES]
    workflow = load_workflow(tutorial_workflow_path(), overrides)
    with Project.open_or_init(tmp_path / "project") as project:
        for step in workflow.step_names():
            assert run_workflow(project, workflow, LocalExecutor(), until=step, echo=lambda *a: None).ok, step
            sets = sets_to_export(project)
            for fmt, check in (("imod", _check_imod_export), ("relion5", _check_relion5_export)):
                out = tmp_path / f"{step}_{fmt}"
                assert export_project(project, fmt, out), (step, fmt)
                check(project, sets, out)


def test_exports_of_a_ctf_set_with_only_defocus(tmp_path):
    """A CTF set made elsewhere may hold only the defocus, and not for every view: IMOD gets a
    version-2 .defocus of the estimated views and excludes the others, RELION leaves those out and
    writes only the CTF columns there are."""
    project_dir = _imported_project(tmp_path)
    with Project.open(project_dir) as project:
        movies = project.finished_sets("tilt_series_movies")[-1]
        items = project.read_items(movies.id)
        estimates = items.loc[items["tilt_index"] != 4, ["ts_id", "tilt_index"]]
        estimates["defocus_u_A"] = 20000.0 + 100.0 * estimates["tilt_index"]
        run = project.create_run("ctf", "test_ctf", {}, {"movies": movies.id}, "by hand")
        project.add_set(run.id, "ctf", "ctf", estimates, {})
        project.finish_run(run.id)
    assert main(["export", "imod", "--project", str(project_dir), "--out", str(tmp_path / "imod")]) == 0
    assert main(["export", "relion5", "--project", str(project_dir), "--out", str(tmp_path / "relion")]) == 0
    defocus = read_defocus(tmp_path / "imod" / "TS_01" / "TS_01.defocus")
    assert defocus.attrs["version"] == 2 and defocus["start_view"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(defocus["defocus1_nm"], [2000.0, 2010.0, 2020.0, 2030.0])
    assert read_exclude_list((tmp_path / "imod" / "TS_01" / "TS_01_excludelist.txt").read_text()) == [5]
    table = read_tilt_series_star(tmp_path / "relion" / "tilt_series" / "TS_01.star")
    assert "rlnDefocusV" not in table and "rlnCtfImage" not in table and len(table) == 4
    np.testing.assert_allclose(np.sort(table["rlnDefocusU"]), [20000.0, 20100.0, 20200.0, 20300.0])
    assert (read_star(tmp_path / "relion" / "tilt_series.star")["global"]["rlnTomoHand"] == -1).all()


def test_views_left_out_of_the_alignment_get_interpolated_lines():
    """IMOD numbers ``.xf``/``.tlt`` lines by view: a view the alignment left out gets the
    neighbours' alignment interpolated in tilt (its refined tilt keeps its own nominal angle)."""
    import pandas as pd

    from tomopipe.export.imod import alignment_of_every_view

    views = pd.DataFrame({"tilt_angle_deg": [-4.0, -2.0, 0.0, 2.0, 4.0],
                          "rot_z_deg": [-85.0, np.nan, -85.4, -85.6, np.nan],
                          "rot_y_deg": [-3.5, np.nan, 0.5, 2.5, np.nan],
                          "shift_x_A": [10.0, np.nan, 30.0, 40.0, np.nan],
                          "shift_y_A": [0.0, np.nan, -2.0, -4.0, np.nan]})
    filled = alignment_of_every_view(views)
    np.testing.assert_allclose(filled["rot_z_deg"], [-85.0, -85.2, -85.4, -85.6, -85.6])
    np.testing.assert_allclose(filled["rot_y_deg"], [-3.5, -1.5, 0.5, 2.5, 4.5])
    np.testing.assert_allclose(filled["shift_x_A"], [10.0, 20.0, 30.0, 40.0, 40.0])
    assert views["rot_z_deg"].isna().sum() == 2  # the input is left as it was
