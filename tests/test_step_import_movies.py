"""The import step: values against the files, user overrides, acquisition order, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import write_acquisition
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow
from tomopipe.io.mrc import write_mrc
from tomopipe.io.movies import write_movie
from tomopipe.project.store import Project

ACQUISITION_ORDER = (0.0, 3.0, -3.0, -6.0, 6.0)  # dose-symmetric in groups of one


def _import(tmp_path, data, **params):
    lines = ['[steps.import]', 'type = "import_movies"', f'files_directory = "{data}"']
    lines += [f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
              for key, value in params.items()]
    workflow = tmp_path / "wf.toml"
    workflow.write_text("\n".join(lines) + "\n")
    project_dir = tmp_path / "project"
    if project_dir.exists():
        shutil.rmtree(project_dir)
    with Project.init(project_dir) as project:
        report = run_workflow(project, load_workflow(workflow), LocalExecutor(1), echo=lambda *_: None)
        outcome = report.outcomes[0]
        if outcome.status != "finished":
            return outcome, None, None
        record = project.sets_of_run(outcome.run.id)["movies"]
        return outcome, project.read_items(record.id), record.attrs


def test_values_come_from_the_mdoc(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_angles=ACQUISITION_ORDER, dose_per_tilt=2.64,
                             pixel_size_A=0.79, tilt_axis_deg=-94.4)
    outcome, items, attrs = _import(tmp_path, data)
    assert outcome.status == "finished", outcome.message
    assert sorted(attrs["tilt_series"]) == ["TS_01", "TS_02"]
    acquisition = attrs["tilt_series"]["TS_01"]
    assert acquisition["pixel_size_A"] == 0.79 and acquisition["voltage_kV"] == 300
    # TIFF frames are flipped along Y on read: the axis of the arrays is 180 - the mdoc's angle
    assert acquisition["tilt_axis_angle_deg"] == pytest.approx(-85.6)
    assert acquisition["image_size_px"] == [32, 32] and acquisition["frame_count"] == 2
    ts = items[items["ts_id"] == "TS_01"]
    # items are sorted by tilt angle; the order of acquisition comes from DateTime
    assert ts["tilt_angle_deg"].tolist() == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert ts["tilt_index"].tolist() == [0, 1, 2, 3, 4]
    assert ts["acquisition_order"].tolist() == [3, 2, 0, 1, 4]
    np.testing.assert_allclose(ts["pre_exposure_e_per_A2"], np.array([3, 2, 0, 1, 4]) * 2.64)
    np.testing.assert_allclose(ts["accumulated_dose_e_per_A2"], (np.array([3, 2, 0, 1, 4]) + 1) * 2.64)
    assert ts["movie_path"].str.endswith(".tif").all() and (ts["frame_count"] == 2).all()
    assert outcome.summary["tilts"] == 10


def test_user_values_win(tmp_path):
    data = write_acquisition(tmp_path / "data", pixel_size_A=0.79, dose_per_tilt=2.64)
    outcome, items, attrs = _import(tmp_path, data, pixel_size_A=1.5, tilt_axis_angle_deg=85.0, voltage_kV=200.0,
                                    dose_per_tilt_e_per_A2=3.0, initial_dose_e_per_A2=1.0)
    acquisition = attrs["tilt_series"]["TS_02"]
    assert (acquisition["pixel_size_A"], acquisition["tilt_axis_angle_deg"], acquisition["voltage_kV"]) == (1.5, 85.0, 200.0)
    assert np.allclose(items["dose_e_per_A2"], 3.0) and items["pre_exposure_e_per_A2"].min() == 1.0


def test_mrc_movies_keep_the_mdoc_axis(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_axis_deg=-85.6, movie_suffix=".mrc")
    outcome, items, attrs = _import(tmp_path, data)
    assert outcome.status == "finished", outcome.message
    assert attrs["tilt_series"]["TS_01"]["tilt_axis_angle_deg"] == pytest.approx(-85.6)
    assert items["movie_path"].str.endswith(".mrc").all()


def test_tomo5_axis_conversion(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_axis_deg=-4.0, movie_suffix=".mrc")
    _, _, attrs = _import(tmp_path, data, tomo5_mdoc=True)
    assert attrs["tilt_series"]["TS_01"]["tilt_axis_angle_deg"] == pytest.approx(-86.0)


def test_gain_is_oriented_and_checked(tmp_path):
    data = write_acquisition(tmp_path / "data", size=32)
    gain = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1024 + 0.5
    write_mrc(tmp_path / "gain.mrc", gain, voxel_size_A=2.0)
    outcome, _, attrs = _import(tmp_path, data, gain_image=str(tmp_path / "gain.mrc"), gain_flip_y=True)
    assert outcome.status == "finished", outcome.message
    from tomopipe.io.mrc import read_mrc

    with Project.open(tmp_path / "project") as project:
        stored, _ = read_mrc(project.absolute_path(attrs["gain_path"]))
    np.testing.assert_array_equal(stored, gain[::-1])
    write_mrc(tmp_path / "small_gain.mrc", gain[:16], voxel_size_A=2.0)
    outcome, _, _ = _import(tmp_path, data, gain_image=str(tmp_path / "small_gain.mrc"))
    assert outcome.status == "failed" and "small_gain.mrc" in outcome.message and "32 x 16" in outcome.message


@pytest.mark.parametrize("damage, expected", [
    ("missing_movie", "is missing"),
    ("frame_mismatch", "all tilts of a tilt series must match"),
    ("size_mismatch", "all tilts of a tilt series must match"),
    ("no_tilt_angle", "TiltAngle"),
    ("corrupt_movie", "TS_01_001_0.0.tif"),
    ("no_pixel_size", "pixel size"),
])
def test_bad_input_is_named_and_leaves_the_project_clean(tmp_path, damage, expected):
    data = write_acquisition(tmp_path / "data", ts_names=("TS_01",), tilt_angles=(0.0, 3.0, -3.0))
    mdoc = data / "TS_01.mdoc"
    if damage == "missing_movie":
        (data / "TS_01_002_3.0.tif").unlink()
    elif damage == "frame_mismatch":
        write_movie(data / "TS_01_002_3.0.tif", np.ones((3, 32, 32), np.uint8))
    elif damage == "size_mismatch":
        write_movie(data / "TS_01_002_3.0.tif", np.ones((2, 32, 16), np.uint8))
    elif damage == "no_tilt_angle":
        mdoc.write_text("\n".join(line for line in mdoc.read_text().splitlines()
                                  if not line.startswith("TiltAngle = 3")) + "\n")
    elif damage == "corrupt_movie":
        (data / "TS_01_001_0.0.tif").write_bytes(b"not a tiff at all")
    elif damage == "no_pixel_size":
        mdoc.write_text("\n".join(line for line in mdoc.read_text().splitlines()
                                  if not line.startswith("PixelSpacing")) + "\n")
    outcome, _, _ = _import(tmp_path, data)
    assert outcome.status == "failed"
    assert expected in outcome.message, outcome.message
    with Project.open(tmp_path / "project") as project:
        assert project.finished_sets() == []
        assert [run.status for run in project.runs()] == ["failed"]
