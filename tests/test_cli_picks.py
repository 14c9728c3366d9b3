"""``tomopipe picks add|remove|import|export`` and the picks of ``tomopipe export relion5``: every edit
is a new run with a new particle set (nothing deleted), exports read back give the picks, and bad
input is refused with a clear error, leaving the project as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import write_acquisition
from tomopipe.cli import main
from tomopipe.io.mrc import write_mrc
from tomopipe.io.picks import read_picks, write_picks
from tomopipe.io.star import read_particles_star, read_star
from tomopipe.model.particles import particles_table
from tomopipe.project.store import Project

SIZES = {"TS_01": (40, 32, 12), "TS_02": (36, 36, 10)}  # x, y, z voxels
VOXEL_A = 8.0
ACQUISITION = {"pixel_size_A": 2.0, "voltage_kV": 300.0, "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.07}


def _add_tomograms(project, inputs=None):
    """A finished run with a tomograms set (fake MRC volumes of known sizes) made from ``inputs``."""
    run = project.create_run("reconstruct", "reconstruct", {}, inputs or {}, "tomograms")
    rows = []
    for ts_id, (nx, ny, nz) in SIZES.items():
        path = project.absolute_path(run.folder) / f"{ts_id}.mrc"
        write_mrc(path, np.zeros((nz, ny, nx), np.float32), VOXEL_A)
        rows.append({"ts_id": ts_id, "tomogram_path": project.relative_path(path), "voxel_size_A": VOXEL_A,
                     "size_x_px": nx, "size_y_px": ny, "size_z_px": nz})
    project.add_set(run.id, "tomograms", "tomograms", pd.DataFrame(rows),
                    {"tilt_series": {ts: dict(ACQUISITION) for ts in SIZES}})
    project.finish_run(run.id)


@pytest.fixture
def project_dir(tmp_path):
    """A project with a tomograms run and no picks."""
    folder = tmp_path / "p"
    with Project.init(folder) as project:
        _add_tomograms(project)
    return folder


def _latest_picks(folder):
    with Project.open(folder) as project:
        record = project.finished_sets("particles")[-1]
        return project.read_items(record.id), record


def _n_runs(folder):
    with Project.open(folder) as project:
        return len(project.runs())


def test_add_then_remove_are_new_runs_and_keep_the_picks(project_dir, capsys):
    p = ["--project", str(project_dir)]
    assert main(["picks", "add", *p, "--run", "reconstruct", "--ts", "TS_01", "--xyz", "10.5,-20.25,8",
                 "--xyz=-100,50,0"]) == 0
    assert main(["picks", "add", *p, "--run", "picks", "--ts", "TS_02", "--units", "px", "--xyz", "18,0.5,9"]) == 0
    items, record = _latest_picks(project_dir)
    assert items["ts_id"].tolist() == ["TS_01", "TS_01", "TS_02"]
    np.testing.assert_allclose(items[["x_A", "y_A", "z_A"]], [[10.5, -20.25, 8], [-100, 50, 0], [0, -140, 32]])
    assert sorted(items["half_set"]) == [1, 1, 2] and items[["rot_deg", "score"]].isna().all().all()
    assert record.parent_set_id is not None  # the second edit derives from the first

    assert main(["picks", "remove", *p, "--run", "picks", "--ts", "TS_01", "--near=-90,45,3"]) == 0
    removed, _ = _latest_picks(project_dir)
    assert removed["enabled"].tolist() == [True, False, True]
    assert len(removed) == 3  # nothing deleted
    assert main(["picks", "remove", *p, "--run", "picks", "--ts", "TS_01", "--index", "0"]) == 0
    assert _latest_picks(project_dir)[0]["enabled"].tolist() == [False, False, True]
    assert "removed 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["add", "--run", "reconstruct", "--ts", "TS_09", "--xyz", "0,0,0"], "no tomogram for 'TS_09'"),
    (["add", "--run", "reconstruct", "--ts", "TS_01", "--xyz", "0,0,60"], "outside the tomogram"),
    (["add", "--run", "reconstruct", "--ts", "TS_01", "--xyz", "0,0"], "expected TS:X,Y,Z"),
    (["remove", "--run", "reconstruct", "--ts", "TS_01", "--near", "0,0,0"], "has no particles"),
    (["import", "missing.star", "--tomograms", "reconstruct"], "file not found"),
    (["export", "--run", "reconstruct", "--format", "text", "--out", "x.txt"], "has no particles"),
])
def test_bad_input_is_refused_and_the_project_is_unchanged(project_dir, capsys, argv, message):
    before = _n_runs(project_dir)
    assert main(["picks", *argv, "--project", str(project_dir)]) == 2
    assert message in capsys.readouterr().err
    assert _n_runs(project_dir) == before


def test_remove_near_nothing_is_refused(project_dir, capsys):
    p = ["--project", str(project_dir)]
    assert main(["picks", "add", *p, "--run", "reconstruct", "--ts", "TS_01", "--xyz", "0,0,0"]) == 0
    before = _n_runs(project_dir)
    assert main(["picks", "remove", *p, "--run", "picks", "--ts", "TS_01", "--near", "100,0,0"]) == 2
    assert "no enabled pick within 30" in capsys.readouterr().err
    assert _n_runs(project_dir) == before


@pytest.mark.parametrize("fmt, out", [("relion5", "picks.star"), ("imod", "mods"), ("copick", "copick"),
                                      ("text", "picks.txt")])
def test_import_export_round_trip_through_the_cli(project_dir, tmp_path, fmt, out):
    rng = np.random.default_rng(1)
    truth = particles_table(["TS_01"] * 3 + ["TS_02"] * 2, rng.uniform(-30, 30, (5, 3)) + 0.37,
                            rng.uniform(10, 170, (5, 3)), [0.9, 0.2, 0.5, 0.7, 0.4], [1, 2, 1, 2, 2])
    with Project.open(project_dir) as project:
        tomograms = project.read_items(project.finished_sets("tomograms")[-1].id)
    write_picks(tmp_path / "in.txt", truth, tomograms, "text")
    p = ["--project", str(project_dir)]
    assert main(["picks", "import", str(tmp_path / "in.txt"), *p, "--tomograms", "reconstruct"]) == 0
    assert main(["picks", "export", *p, "--run", "picks", "--format", fmt, "--out", str(tmp_path / out),
                 "--min-score", "0.3", "--max-number", "3"]) == 0
    back = read_picks(tmp_path / out, tomograms).sort_values("x_A").reset_index(drop=True)
    best = truth.iloc[[0, 3, 2]].sort_values("x_A").reset_index(drop=True)  # the 3 best scores >= 0.3
    np.testing.assert_allclose(back[["x_A", "y_A", "z_A"]], best[["x_A", "y_A", "z_A"]], atol=1e-3)
    if fmt != "imod":
        np.testing.assert_allclose(back["score"], best["score"], rtol=1e-5)


def test_export_relion5_writes_tomograms_and_particles(project_dir, tmp_path):
    p = ["--project", str(project_dir)]
    assert main(["picks", "add", *p, "--run", "reconstruct", "--ts", "TS_02", "--xyz", "12.5,-3,7",
                 "--xyz", "0,0,0"]) == 0
    assert main(["picks", "remove", *p, "--run", "picks", "--ts", "TS_02", "--index", "1"]) == 0
    assert main(["export", "relion5", *p, "--out", str(tmp_path / "r")]) == 0
    tomograms = read_star(tmp_path / "r" / "tomograms.star")["global"].set_index("rlnTomoName")
    assert tomograms.loc["TS_02", "rlnTomoTomogramBinning"] == pytest.approx(4.0)  # 8 Å voxels of 2 Å images
    assert tomograms.loc["TS_01", ["rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]].tolist() == [160, 128, 48]
    assert tomograms.loc["TS_01", "rlnTomoReconstructedTomogram"].endswith("TS_01.mrc")
    assert tomograms.loc["TS_01", "rlnVoltage"] == pytest.approx(300.0)
    particles, optics = read_particles_star(tmp_path / "r" / "particles.star")
    assert particles["rlnTomoName"].tolist() == ["TS_02"]  # the removed pick is left out
    np.testing.assert_allclose(particles[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()[0],
                               [12.5, -3, 7])
    assert optics["rlnTomoTiltSeriesPixelSize"].tolist() == [2.0]


def test_export_relion5_with_the_tilt_series_of_the_tomograms(tmp_path):
    """Tomograms made from imported tilt series: tomograms.star carries the tilt-series star files
    and the binning against the tilt series' pixel size (2 Å)."""
    data = write_acquisition(tmp_path / "data", tilt_angles=(0.0, 3.0, -3.0), pixel_size_A=2.0)
    workflow = tmp_path / "wf.toml"
    workflow.write_text(f'[steps.import]\ntype = "import_movies"\nfiles_directory = "{data}"\n')
    assert main(["run", str(workflow), "--project", str(tmp_path / "p")]) == 0
    with Project.open(tmp_path / "p") as project:
        _add_tomograms(project, {"tilt_series": project.finished_sets("tilt_series_movies")[-1].id})
    p = ["--project", str(tmp_path / "p")]
    assert main(["picks", "add", *p, "--run", "reconstruct", "--ts", "TS_01", "--xyz", "1,2,3"]) == 0
    assert main(["export", "relion5", *p, "--out", str(tmp_path / "r")]) == 0
    tomograms = read_star(tmp_path / "r" / "tomograms.star")["global"]
    assert tomograms["rlnTomoTiltSeriesStarFile"].tolist() == ["tilt_series/TS_01.star", "tilt_series/TS_02.star"]
    assert tomograms["rlnTomoTomogramBinning"].tolist() == [4.0, 4.0]
    assert (tmp_path / "r" / "tilt_series" / "TS_01.star").exists()
    particles, _ = read_particles_star(tmp_path / "r" / "particles.star")
    np.testing.assert_allclose(particles[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy(), [[1, 2, 3]])
