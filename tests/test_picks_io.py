"""Picks formats (io/picks.py): each one written and read back gives the same particles (sub-voxel
positions, angles, scores where the format holds them); conventions checked against known values;
bad files give errors naming the file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.imod import read_imod_model
from tomopipe.io.picks import PicksOptions, detect_format, read_picks, write_picks
from tomopipe.io.star import read_particles_star, write_particles_star
from tomopipe.model.particles import orientation_matrices, particles_table

TOMOGRAMS = pd.DataFrame({"ts_id": ["TS_01", "TS_02"], "tomogram_path": ["a.mrc", "b.mrc"],
                          "voxel_size_A": [10.0, 7.5], "size_x_px": [64, 50], "size_y_px": [48, 50],
                          "size_z_px": [20, 17]})


def _picks(seed=0, n=6):
    rng = np.random.default_rng(seed)
    ts = np.array(["TS_01"] * (n // 2) + ["TS_02"] * (n - n // 2), dtype=object)
    half_extent = np.where(ts[:, None] == "TS_01", [300.0, 220.0, 80.0], [180.0, 180.0, 55.0])
    xyz = rng.uniform(-1, 1, (n, 3)) * half_extent + 0.123
    angles = np.column_stack([rng.uniform(-179, 179, n), rng.uniform(5, 175, n), rng.uniform(-179, 179, n)])
    return particles_table(ts, xyz, angles, rng.uniform(0.1, 0.9, n), np.arange(n) % 2 + 1)


def _same_rotations(a, b):
    """Angle between the rotations of two particle tables, degrees, per particle."""
    ma = orientation_matrices(*a[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy().T)
    mb = orientation_matrices(*b[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy().T)
    cos = (np.einsum("nij,nij->n", ma, mb) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


@pytest.mark.parametrize("fmt, name", [("relion5", "particles.star"), ("copick", "copick"), ("text", "picks.txt")])
def test_round_trip_with_angles_and_scores(tmp_path, fmt, name):
    picks = _picks()
    write_picks(tmp_path / name, picks, TOMOGRAMS, fmt)
    back = read_picks(tmp_path / name, TOMOGRAMS)  # format detected
    back = back.sort_values(["ts_id", "x_A"]).reset_index(drop=True)
    picks = picks.sort_values(["ts_id", "x_A"]).reset_index(drop=True)
    assert back["ts_id"].tolist() == picks["ts_id"].tolist()
    np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]], picks[["x_A", "y_A", "z_A"]], atol=1e-3)
    np.testing.assert_allclose(back["score"], picks["score"], rtol=1e-5)
    assert _same_rotations(back, picks).max() < 1e-3
    if fmt == "relion5":
        assert back["half_set"].tolist() == picks["half_set"].tolist()


def test_imod_round_trip_one_model_per_tomogram(tmp_path):
    picks = _picks()
    written = write_picks(tmp_path / "mods", picks, TOMOGRAMS, "imod")
    assert sorted(p.name for p in written) == ["TS_01.mod", "TS_02.mod"]
    back = read_picks(tmp_path / "mods", TOMOGRAMS).sort_values(["ts_id", "x_A"]).reset_index(drop=True)
    picks = picks.sort_values(["ts_id", "x_A"]).reset_index(drop=True)
    np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]], picks[["x_A", "y_A", "z_A"]], atol=1e-3)
    one = read_picks(tmp_path / "mods" / "TS_02.mod", TOMOGRAMS, options=PicksOptions(ts_id="TS_02"))
    assert len(one) == 3 and set(one["ts_id"]) == {"TS_02"}


def test_imod_known_value(tmp_path):
    """Voxel (i, j, k) of a 64 x 48 x 20 tomogram at 10 Å is at model (i + 0.5, j + 0.5, k)."""
    picks = particles_table("TS_01", [[(5 - 32) * 10.0, (7 - 24) * 10.0, (3 - 10) * 10.0]])
    write_picks(tmp_path / "m", picks, TOMOGRAMS, "imod")
    points = read_imod_model(tmp_path / "m" / "TS_01.mod")
    np.testing.assert_allclose(points[["x", "y", "z"]].to_numpy()[0], [5.5, 7.5, 3.0], atol=1e-5)


def test_copick_known_value_and_schema(tmp_path):
    """Voxel 0 is at location 0; the transformation holds RELION's Euler matrix (reference -> tomogram)."""
    picks = particles_table("TS_02", [[-25 * 7.5, -25 * 7.5, -8.5 * 7.5]], [[30.0, 40.0, 50.0]], [0.5])
    (path,) = write_picks(tmp_path / "root", picks, TOMOGRAMS, "copick")
    assert path.relative_to(tmp_path / "root").as_posix() == "ExperimentRuns/TS_02/Picks/tomopipe_0_particle.json"
    document = json.loads(path.read_text())
    assert {"pickable_object_name", "user_id", "session_id", "run_name", "voxel_spacing", "unit", "points",
            "trust_orientation"} <= set(document)
    point = document["points"][0]
    np.testing.assert_allclose([point["location"][a] for a in "xyz"], [0, 0, 0], atol=1e-9)
    from scipy.spatial.transform import Rotation
    expected = Rotation.from_euler("ZYZ", [30, 40, 50], degrees=True).inv().as_matrix()
    np.testing.assert_allclose(np.array(point["transformation_"])[:3, :3], expected, atol=1e-9)


def test_relion4_pixel_coordinates(tmp_path):
    """RELION 4: unbinned tilt-series pixels from the corner, pixel size from the optics table."""
    particles = pd.DataFrame({"rlnTomoName": ["TS_01"], "rlnCoordinateX": [128.0], "rlnCoordinateY": [100.0],
                              "rlnCoordinateZ": [40.0], "rlnOpticsGroup": [1]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["o"], "rlnTomoTiltSeriesPixelSize": [2.5]})
    write_particles_star(tmp_path / "p.star", particles, optics)
    back = read_picks(tmp_path / "p.star", TOMOGRAMS)
    # 128 px * 2.5 Å = 320 Å from the corner; the centre voxel 32 at 10 Å is 320 Å from voxel 0
    np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]].to_numpy()[0], [0.0, 250 - 240, 100 - 100], atol=1e-9)
    assert back[["rot_deg", "score"]].isna().all().all()


def test_relion5_unknown_angles_and_scores_are_written_as_relion_does(tmp_path):
    picks = particles_table(["TS_01", "TS_01"], [[0, 0, 0], [10, 10, 10]], score=[np.nan, 0.7])
    write_picks(tmp_path / "p.star", picks, TOMOGRAMS, "relion5")
    table, _ = read_particles_star(tmp_path / "p.star")
    assert "rlnAngleRot" not in table.columns
    assert table["rlnAutopickFigureOfMerit"].tolist() == [-999.0, 0.7]
    back = read_picks(tmp_path / "p.star", TOMOGRAMS)
    assert np.isnan(back["score"][0]) and back["score"][1] == pytest.approx(0.7)


def test_text_in_voxels(tmp_path):
    (tmp_path / "p.txt").write_text("# hand picks\nts_id x_px y_px z_px\nTS_01 32 24 10\nTS_02 25.5 0 16\n")
    back = read_picks(tmp_path / "p.txt", TOMOGRAMS)
    np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]], [[0, 0, 0], [3.75, -187.5, 56.25]])
    write_picks(tmp_path / "q.txt", back, TOMOGRAMS, "text", PicksOptions(units="px"))
    assert (tmp_path / "q.txt").read_text().splitlines()[2].split()[:4] == ["TS_02", "25.5000", "0.0000", "16.0000"]


@pytest.mark.parametrize("text, message", [
    ("ts_id x_A y_A z_A\nTS_09 0 0 0\n", "no tomogram for 'TS_09'"),
    ("ts_id x_A y_A z_A\nTS_01 0 0 500\n", "outside the tomogram"),
    ("ts_id x_A y_A z_A\nTS_01 0 zero 0\n", "line 2"),
    ("ts_id x_A y_A\nTS_01 0 0\n", "header"),
])
def test_bad_text_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TomopipeError, match=message) as info:
        read_picks(path, TOMOGRAMS)
    assert str(path) in str(info.value)


def test_bad_files_and_formats(tmp_path):
    (tmp_path / "x.xyz").write_text("1 2 3\n")
    with pytest.raises(InputFileError, match="suffix"):
        detect_format(tmp_path / "x.xyz")
    with pytest.raises(TomopipeError, match="unknown picks format"):
        read_picks(tmp_path / "x.xyz", TOMOGRAMS, "pdb")
    (tmp_path / "bad.json").write_text('{"points": [{"nolocation": 1}], "run_name": "TS_01"}')
    with pytest.raises(InputFileError, match="bad.json.*not a copick picks file"):
        read_picks(tmp_path / "bad.json", TOMOGRAMS)
    (tmp_path / "bad.mod").write_bytes(b"IMODV1.2" + b"\0" * 10)
    with pytest.raises(InputFileError, match="bad.mod"):
        read_picks(tmp_path / "bad.mod", TOMOGRAMS, options=PicksOptions(ts_id="TS_01"))
    with pytest.raises(InputFileError, match="no tomogram 'bad'"):
        read_picks(tmp_path / "bad.mod", TOMOGRAMS)
