"""What ``tomopipe simulate`` writes: movies, mdoc (through tomopipe's importer and plain
mdocfile), gain, truth files in their standard formats; flags change the output; seeds reproduce."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import mdocfile
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import STRUCTURE
from tomopipe.algorithms.geometry import projection_rotations
from tomopipe.io.imod import read_tlt, read_xf
from tomopipe.io.mdoc import read_mdoc
from tomopipe.io.movies import movie_info, read_gain, read_movie
from tomopipe.io.mrc import read_mrc
from tomopipe.io.star import read_particles_star, read_tilt_series_star, read_tomograms_star
from tomopipe.simulate.command import add_arguments, run_from_args
from tomopipe.simulate.config import PRESETS, config_from_preset, nominal_tilt_angles_deg
from tomopipe.steps.import_movies import ImportMovies, read_tilt_series

# a minimal acquisition for the flag tests: one small tilt, two frames, one particle
MINI = ["--preset", "tiny", "--image-width-px", "96", "--image-height-px", "96", "--tilt-min-deg", "0",
        "--tilt-max-deg", "0", "--frames-per-tilt", "2", "--particles-per-tilt-series", "1",
        "--truth-binnings", "1", "--quiet", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out: Path, *argv: str) -> int:
    assert STRUCTURE.is_file(), f"the apoferritin model is expected at {STRUCTURE}"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_from_args(parser.parse_args(["--structure", str(STRUCTURE), "--out", str(out), *argv]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert run(out, "--preset", "tiny", "--seed", "11", "--quiet", "--threads", "1") == 0
    return out


def test_movies_are_integer_counts_named_like_serialem(tiny_run):
    config = config_from_preset("tiny")
    mdoc = read_mdoc(tiny_run / "TS_01.mdoc")
    names = list(mdoc.sections["movie_name"])
    assert (names == sorted(p.name for p in tiny_run.glob("TS_01_*.tif"))
            or len(names) == len(list(tiny_run.glob("*.tif"))))
    assert len(names) == len(nominal_tilt_angles_deg(config))
    for index, (name, angle) in enumerate(zip(names, mdoc.tilt_angles_deg)):
        assert name == f"TS_01_{index + 1:03d}_{angle:.1f}.tif"
        n, ny, nx, dtype = movie_info(tiny_run / name)
        assert (n, ny, nx) == (config.frames_per_tilt, config.image_height_px, config.image_width_px)
        assert dtype == np.uint8
    assert (tiny_run / "gain_ref.mrc").is_file()


def test_mdoc_reads_through_tomopipe_and_mdocfile(tiny_run):
    config = config_from_preset("tiny")
    path = tiny_run / "TS_01.mdoc"
    mdoc = read_mdoc(path, require_tilt_series=True)
    assert mdoc.pixel_size_A == pytest.approx(config.pixel_size_A) and mdoc.voltage_kV == 300
    # the title states the axis of the TIFF files as stored: 180° − (the truth (read) axis + the
    # session's calibration error), to the title's 0.1°
    error = json.loads((tiny_run / "truth" / "truth.json").read_text())["mdoc_tilt_axis_error_deg"]
    assert 0.0 < abs(error) < 5 * config.mdoc_tilt_axis_error_sigma_deg
    assert mdoc.tilt_axis_angle_deg == pytest.approx(180.0 - (-85.6 + error) - 360.0, abs=0.051)
    assert all(r - 90 == pytest.approx(mdoc.tilt_axis_angle_deg, abs=0.051)
               for r in mdoc.sections["rotation_angle_deg"])
    sections = mdoc.sections
    assert list(sections["tilt_angle_deg"].round(0)) == nominal_tilt_angles_deg(config)  # acquisition order
    times = pd.to_datetime(sections["date_time"])
    assert times.is_monotonic_increasing and times.is_unique
    # SerialEM's cosine rule: dose and exposure time grow as 1/cos(tilt)^power, the frames' doses follow
    growth = np.cos(np.radians(sections["tilt_angle_deg"].to_numpy(float))) ** -config.exposure_cosine_power
    assert sections["exposure_dose_e_per_A2"].to_numpy(float) == pytest.approx(2.64 * growth, abs=1e-4)
    assert sections["exposure_time_s"].to_numpy(float) == pytest.approx(config.exposure_time_s * growth, abs=1e-4)
    assert sections["exposure_dose_e_per_A2"].max() > 1.01 * 2.64  # the ±12° tilts got more
    doses = sections["exposure_dose_e_per_A2"].to_numpy(float)
    assert list(sections["prior_record_dose"]) == pytest.approx(np.concatenate([[0.0], np.cumsum(doses)[:-1]]),
                                                                abs=1e-3)
    for dose, (per_frame, n) in zip(doses, [fd[0] for fd in sections["frame_doses_and_number"]]):
        assert per_frame * n == pytest.approx(dose, abs=1e-4)
    assert (sections["target_defocus_um"] < 0).all() and (sections["defocus_um"] < 0).all()
    assert all(str(p).startswith("X:\\") and "\\" in str(p) for p in sections["sub_frame_path"])
    for column in ("magnification", "exposure_time_s", "num_sub_frames", "stage_x", "min_max_mean"):
        assert column in sections.columns
    plain = mdocfile.read(path)
    assert len(plain) == len(sections)
    assert list(plain["TiltAngle"]) == pytest.approx(list(sections["tilt_angle_deg"]))
    assert f"Tilt axis angle = {mdoc.tilt_axis_angle_deg:.1f}" in " ".join(str(t) for t in plain["titles"].iloc[0])


def test_importer_reads_the_simulated_acquisition(tiny_run):
    params = {p.name: p.default for p in ImportMovies.params}
    params.update(files_directory=str(tiny_run), gain_image=str(tiny_run / "gain_ref.mrc"), gain_flip_y=True)
    result = read_tilt_series({"mdoc_path": str(tiny_run / "TS_01.mdoc"), "params": params})
    acquisition = result["acquisition"]
    error = json.loads((tiny_run / "truth" / "truth.json").read_text())["mdoc_tilt_axis_error_deg"]
    # TIFF rule: 180 − the mdoc's angle = the truth + the calibration error (to the title's 0.1°)
    assert acquisition["tilt_axis_angle_deg"] == pytest.approx(-85.6 + error, abs=0.051)
    assert acquisition["pixel_size_A"] == pytest.approx(3.16)
    truth = pd.read_csv(tiny_run / "truth" / "TS_01_tilts.csv").set_index("movie")
    for row in result["rows"]:
        name = Path(row["movie_path"]).name
        assert row["pre_exposure_e_per_A2"] == pytest.approx(truth.loc[name, "pre_exposure_e_per_A2"])
        assert row["dose_e_per_A2"] == pytest.approx(truth.loc[name, "dose_e_per_A2"])  # grows with the tilt


def test_truth_files_in_standard_formats(tiny_run):
    truth = tiny_run / "truth"
    config = config_from_preset("tiny")
    n = len(nominal_tilt_angles_deg(config))
    A, d = read_xf(truth / "TS_01.xf")
    tlt = read_tlt(truth / "TS_01.tlt")
    star = read_tilt_series_star(truth / "TS_01.star")
    assert A.shape == (n, 2, 2) and d.shape == (n, 2) and tlt.shape == (n,) and len(star) == n
    assert np.all(np.diff(tlt) > 0)  # sorted by angle, as the stack
    assert tlt == pytest.approx(star["rlnTomoYTilt"].to_numpy(), abs=1e-3)
    offsets = star["rlnTomoYTilt"] - star["rlnTomoNominalStageTiltAngle"]
    # the stage-angle offset plus the specimen's pretilt about the tilt axis (a tilt-angle offset too)
    assert offsets.mean() == pytest.approx(config.tilt_angle_offset_deg + config.specimen_pretilt_deg, abs=0.05)
    assert (star["rlnDefocusU"] - star["rlnDefocusV"]).mean() == pytest.approx(config.astigmatism_A, abs=60)
    assert star["rlnDefocusU"].between(2.0e4, 3.1e4).all()
    # magnification is folded into the .xf: det A = 1/m², rotation = −ZRot
    tilts = pd.read_csv(truth / "TS_01_tilts.csv").sort_values("nominal_tilt_deg")
    assert np.linalg.det(A) == pytest.approx((1 / tilts["magnification"].to_numpy()) ** 2, rel=1e-6)
    assert np.degrees(np.arctan2(-A[:, 1, 0], A[:, 0, 0])) == pytest.approx(star["rlnTomoZRot"].to_numpy(), abs=1e-4)
    tomos = read_tomograms_star(truth / "tomograms.star")
    assert tomos["rlnTomoHand"][0] == -1 and tomos["rlnTomoTiltSeriesPixelSize"][0] == pytest.approx(3.16)
    particles, optics = read_particles_star(truth / "particles.star")
    assert len(particles) == config.particles_per_tilt_series and set(particles["rlnTomoName"]) == {"TS_01"}
    for column in ("rlnCenteredCoordinateZAngst", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        assert column in particles.columns
    assert particles["rlnCenteredCoordinateZAngst"].abs().max() < config.ice_thickness_A / 2
    frame_shifts = pd.read_csv(truth / "TS_01_frame_shifts.csv")
    assert len(frame_shifts) == n * config.frames_per_tilt
    assert (frame_shifts[frame_shifts.frame == 0][["shift_x_A", "shift_y_A"]] == 0).all().all()
    assert frame_shifts.shift_x_px.to_numpy() == pytest.approx(frame_shifts.shift_x_A.to_numpy() / 3.16, abs=2e-6)
    local = pd.read_csv(truth / "TS_01_local_motion.csv")
    assert len(local) == n * config.frames_per_tilt * 25 and local.dx_px.abs().max() > 0
    for b in (1, 2):
        volume, voxel = read_mrc(truth / "maps" / f"true_map_bin{b}.mrc")
        assert voxel == pytest.approx(3.16 * b) and volume.shape[0] % 2 == 0
    summary = json.loads((truth / "truth.json").read_text())
    assert (summary["config"]["seed"] == 11
            and summary["interaction_constant_rad_per_V_A"] == pytest.approx(6.53e-4, rel=0.01))
    readme = (truth / "README.md").read_text()
    title = f"Tilt axis angle = {180.0 - (-85.6 + summary['mdoc_tilt_axis_error_deg']) - 360.0:.1f}"
    for words in (title, "-85.6", "calibration error", "flipped upside down", "rlnTomoHand", "sorted by tilt angle"):
        assert words in readme


def test_particle_projections_follow_the_projection_model(tiny_run):
    truth = tiny_run / "truth"
    particles, _ = read_particles_star(truth / "particles.star")
    star = read_tilt_series_star(truth / "TS_01.star").set_index("rlnMicrographMovieName")
    tilts = pd.read_csv(truth / "TS_01_tilts.csv").set_index("acquisition_index")
    proj = pd.read_csv(truth / "TS_01_particle_projections.csv")
    xyz = torch.tensor(particles[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy())
    for _, row in proj.sample(12, random_state=0).iterrows():
        t = tilts.loc[int(row.acquisition_index)]
        s = star.loc[t.movie]
        r = projection_rotations(s.rlnTomoZRot, s.rlnTomoYTilt).double()[0]
        p = r @ xyz[int(row.particle)]
        x = 128 + (t.magnification * float(p[0]) + s.rlnTomoXShiftAngst) / 3.16
        y = 128 + (t.magnification * float(p[1]) + s.rlnTomoYShiftAngst) / 3.16
        assert (row.x_px, row.y_px) == pytest.approx((x, y), abs=1e-4)
        assert row.defocus_A == pytest.approx(0.5 * (s.rlnDefocusU + s.rlnDefocusV) - float(p[2]), abs=1e-3)


def test_xrays_and_hot_pixels_are_where_the_truth_says(tiny_run):
    truth = tiny_run / "truth"
    xrays = pd.read_csv(truth / "TS_01_xrays.csv")
    hot = pd.read_csv(truth / "hot_pixels.csv")
    assert len(xrays) > 0 and len(hot) > 0
    for movie, hits in xrays.groupby("movie"):
        frames = read_movie(tiny_run / movie)
        for _, hit in hits.iterrows():
            assert frames[hit.frame, hit.y, hit.x] >= min(hit.counts, 255)
    gain = read_gain(tiny_run / "gain_ref.mrc", flip_y=True)
    assert gain.mean() == pytest.approx(1.0, abs=1e-3) and 0.01 < gain.std() < 0.1


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def only_movie(folder: Path) -> Path:
    """The one movie of a one-tilt run (its name holds the stage reading, 0.0 or -0.0)."""
    movies = sorted(folder.glob("TS_01_001_*.tif")) + sorted(folder.glob("TS_01_001_*.mrc"))
    assert len(movies) == 1, movies
    return movies[0]


def test_same_seed_same_output_other_seed_other_output(tmp_path):
    run(tmp_path / "a", *MINI, "--seed", "5")
    run(tmp_path / "b", *MINI, "--seed", "5")
    run(tmp_path / "c", *MINI, "--seed", "6")
    assert digest(only_movie(tmp_path / "a")) == digest(only_movie(tmp_path / "b"))
    assert digest(tmp_path / "a" / "truth" / "particles.star") == digest(tmp_path / "b" / "truth" / "particles.star")
    assert digest(only_movie(tmp_path / "a")) != digest(only_movie(tmp_path / "c"))
    assert digest(tmp_path / "a" / "truth" / "particles.star") != digest(tmp_path / "c" / "truth" / "particles.star")


def test_flags_change_the_output(tmp_path):
    base = tmp_path / "base"
    run(base, *MINI)
    base_frames = read_movie(only_movie(base)).astype(float)
    base_mdoc = read_mdoc(base / "TS_01.mdoc")

    dose = tmp_path / "dose"
    run(dose, *MINI, "--dose-per-tilt-e-per-A2", "10")
    assert read_mdoc(dose / "TS_01.mdoc").sections["exposure_dose_e_per_A2"][0] == pytest.approx(10.0)
    ratio = read_movie(only_movie(dose)).mean() / base_frames.mean()
    assert ratio == pytest.approx(10.0 / 2.64, rel=0.05)

    axis = tmp_path / "axis"
    run(axis, *MINI, "--tilt-axis-angle-deg", "80", "--movie-format", "mrc", "--mdoc-tilt-axis-error-sigma-deg", "0")
    assert read_mdoc(axis / "TS_01.mdoc").tilt_axis_angle_deg == pytest.approx(80.0)  # MRC: as read = as stored
    assert only_movie(axis).suffix == ".mrc"

    tilts = tmp_path / "tilts"
    run(tilts, *MINI, "--tilt-min-deg", "-20", "--tilt-max-deg", "20", "--tilt-step-deg", "10")
    assert read_mdoc(tilts / "TS_01.mdoc").tilt_angles_deg == pytest.approx([0, 10, 20, -10, -20], abs=0.05)

    focus = tmp_path / "focus"
    run(focus, *MINI, "--defocus-min-um", "4.0", "--defocus-max-um", "4.0")
    star = read_tilt_series_star(focus / "truth" / "TS_01.star")
    assert star["rlnDefocusU"][0] == pytest.approx(4.0e4, abs=600)
    assert read_mdoc(focus / "TS_01.mdoc").sections["target_defocus_um"][0] == pytest.approx(-4.0)
    assert base_mdoc.sections["target_defocus_um"][0] == pytest.approx(-2.55)

    clean = tmp_path / "clean"
    run(clean, *MINI, "--no-shot-noise", "--movie-format", "mrc", "--no-gain-reference")
    frames = read_movie(only_movie(clean))
    assert frames.dtype == np.float32 and not np.allclose(frames, np.round(frames))
    assert not (clean / "gain_ref.mrc").exists()
    assert frames.mean() == pytest.approx(base_frames.mean(), rel=0.05)

    still = tmp_path / "still"
    run(still, *MINI, "--no-beam-induced-motion")
    shifts = pd.read_csv(still / "truth" / "TS_01_frame_shifts.csv")
    assert (shifts[["shift_x_A", "shift_y_A"]] == 0).all().all()
    moving = pd.read_csv(base / "truth" / "TS_01_frame_shifts.csv")
    assert moving.shift_x_A.abs().max() > 0

    thick = tmp_path / "thick"
    run(thick, *MINI, "--ice-thickness-A", "1500")
    thin_row = pd.read_csv(base / "truth" / "TS_01_tilts.csv").iloc[0]
    thick_row = pd.read_csv(thick / "truth" / "TS_01_tilts.csv").iloc[0]
    cos_tilt = math.cos(math.radians(thick_row.true_tilt_deg))
    assert thick_row.transmission == pytest.approx(math.exp(-1500.0 / (3500.0 * cos_tilt)), rel=1e-5)
    assert thin_row.transmission == pytest.approx(math.exp(-PRESETS["tiny"]["ice_thickness_A"] / (3500.0 * cos_tilt)),
                                                  rel=1e-5)
    assert read_movie(only_movie(thick)).mean() < 0.8 * base_frames.mean()


def test_bad_settings_fail_before_writing(tmp_path):
    from tomopipe.errors import InputFileError, TomopipeError

    with pytest.raises(TomopipeError, match="empty tilt range"):
        run(tmp_path / "x", *MINI, "--tilt-min-deg", "10", "--tilt-max-deg", "-10")
    with pytest.raises(TomopipeError, match="pixel_size_A must be > 0"):
        run(tmp_path / "y", *MINI, "--pixel-size-A", "0")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(InputFileError, match="absent.pdb"):
        run_from_args(parser.parse_args(["--structure", str(tmp_path / "absent.pdb"), "--out", str(tmp_path / "z"),
                                         *MINI]))
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_a_second_simulation_needs_overwrite(tmp_path):
    from tomopipe.errors import TomopipeError

    run(tmp_path, *MINI, "--tilt-min-deg", "-10", "--tilt-max-deg", "10", "--tilt-step-deg", "10")
    assert len(list(tmp_path.glob("TS_01_*.tif"))) == 3
    with pytest.raises(TomopipeError, match="already holds a simulated acquisition"):
        run(tmp_path, *MINI)
    (tmp_path / "notes.txt").write_text("mine")
    run(tmp_path, *MINI, "--overwrite")
    assert len(list(tmp_path.glob("TS_01_*.tif"))) == 1  # the earlier movies are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone
