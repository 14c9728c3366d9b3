"""RELION 5 STAR files: real tomograms/tilt-series stars round-trip exactly (values, columns,
order), values checked against the file text, particles writer validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import real_file
from tomopipe.errors import InputFileError
from tomopipe.io.star import (
    read_particles_star,
    read_star,
    read_tilt_series_star,
    read_tomograms_star,
    write_particles_star,
    write_star,
    write_tilt_series_star,
    write_tomograms_star,
)


def test_tomograms_star_values_and_round_trip(tmp_path):
    df = read_tomograms_star(real_file("star/relion5_EMPIAR-10164/tomograms.star"))
    assert df["rlnTomoName"].tolist() == ["TS_01", "TS_03", "TS_43", "TS_45", "TS_54"]
    assert (df["rlnTomoTiltSeriesPixelSize"] == 1.35).all()
    assert (df["rlnMicrographOriginalPixelSize"] == 0.675).all()
    assert (df["rlnTomoHand"] == -1.0).all()
    assert df[["rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]].iloc[0].tolist() == [4000, 4000, 2000]
    write_tomograms_star(tmp_path / "tomograms.star", df)
    back = read_tomograms_star(tmp_path / "tomograms.star")
    pd.testing.assert_frame_equal(back, df)
    assert list(back.columns) == list(df.columns)
    text = (tmp_path / "tomograms.star").read_text()
    assert text.startswith("# version 50001\n\ndata_global\n")
    # plain starfile reads what we wrote the same way
    pd.testing.assert_frame_equal(starfile.read(tmp_path / "tomograms.star"), df)


def test_tilt_series_star_values_and_round_trip(tmp_path):
    df = read_tilt_series_star(real_file("star/relion5_EMPIAR-10164/tilt_series/TS_01.star"))
    assert df.attrs["tomo_name"] == "TS_01"
    assert df.shape == (40, 28)
    first = df.iloc[0]
    assert first["rlnMicrographMovieName"] == "frames/TS_01_038_-57.0.mrc"
    assert first["rlnTomoNominalStageTiltAngle"] == -56.9985
    assert first["rlnMicrographPreExposure"] == 114.0
    assert first["rlnDefocusU"] == 39527.78125 and first["rlnDefocusV"] == 39418.410156
    assert first["rlnTomoZRot"] == 85.032958 and first["rlnTomoYShiftAngst"] == 108.499417
    write_tilt_series_star(tmp_path / "TS_01.star", df)
    back = read_tilt_series_star(tmp_path / "TS_01.star")
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs["tomo_name"] == "TS_01"
    assert "data_TS_01" in (tmp_path / "TS_01.star").read_text()
    # the block is named after the file when the frame carries no name
    plain = df.copy()
    plain.attrs = {}
    write_tilt_series_star(tmp_path / "TS_99.star", plain)
    assert read_tilt_series_star(tmp_path / "TS_99.star").attrs["tomo_name"] == "TS_99"


def _particles(n=6, seed=0):
    rng = np.random.default_rng(seed)
    particles = pd.DataFrame({
        "rlnTomoName": ["TS_01"] * (n // 2) + ["TS_02"] * (n - n // 2),
        "rlnCenteredCoordinateXAngst": rng.uniform(-900, 900, n).round(6),
        "rlnCenteredCoordinateYAngst": rng.uniform(-900, 900, n).round(6),
        "rlnCenteredCoordinateZAngst": rng.uniform(-200, 200, n).round(6),
        "rlnAngleRot": rng.uniform(-180, 180, n).round(6),
        "rlnAngleTilt": rng.uniform(0, 180, n).round(6),
        "rlnAnglePsi": rng.uniform(-180, 180, n).round(6),
        "rlnTomoSubtomogramRot": np.zeros(n),
        "rlnTomoSubtomogramTilt": np.zeros(n),
        "rlnTomoSubtomogramPsi": np.zeros(n),
        "rlnOpticsGroup": [1] * n,
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["optics1"], "rlnSphericalAberration": [2.7],
        "rlnVoltage": [300.0], "rlnAmplitudeContrast": [0.1], "rlnTomoTiltSeriesPixelSize": [1.35],
    })
    return particles, optics


def test_particles_round_trip(tmp_path):
    particles, optics = _particles()
    write_particles_star(tmp_path / "particles.star", particles, optics)
    back_particles, back_optics = read_particles_star(tmp_path / "particles.star")
    pd.testing.assert_frame_equal(back_particles, particles)
    pd.testing.assert_frame_equal(back_optics, optics)
    blocks = read_star(tmp_path / "particles.star")
    assert list(blocks) == ["optics", "particles"]


def test_particles_writer_validation(tmp_path):
    particles, optics = _particles()
    with pytest.raises(ValueError, match="optics groups \\[2\\]"):
        write_particles_star(tmp_path / "p.star", particles.assign(rlnOpticsGroup=2), optics)
    with pytest.raises(ValueError, match="not a RELION label"):
        write_particles_star(tmp_path / "p.star", particles.assign(x=1), optics)
    with pytest.raises(ValueError, match="rlnCenteredCoordinate"):
        write_particles_star(tmp_path / "p.star", particles.drop(columns="rlnCenteredCoordinateZAngst"), optics)
    with pytest.raises(ValueError, match="rlnTomoName"):
        write_particles_star(tmp_path / "p.star", particles.drop(columns="rlnTomoName"), optics)
    with pytest.raises(ValueError, match="unique"):
        write_tomograms_star(tmp_path / "t.star", pd.DataFrame({"rlnTomoName": ["a", "a"]}))
    assert list(tmp_path.iterdir()) == []


def test_simple_block_round_trip(tmp_path):
    general = pd.DataFrame([{"rlnTomoName": "TS_01", "rlnTomoTiltSeriesPixelSize": 1.35}])
    general.attrs["star_block"] = "simple"
    table = pd.DataFrame({"rlnTomoNominalStageTiltAngle": [0.0, 3.0]})
    write_star(tmp_path / "s.star", {"general": general, "TS_01": table})
    text = (tmp_path / "s.star").read_text()
    assert "loop_" in text.split("data_TS_01")[1] and "loop_" not in text.split("data_TS_01")[0]
    blocks = read_star(tmp_path / "s.star")
    assert blocks["general"].attrs["star_block"] == "simple"
    assert blocks["general"].iloc[0].to_dict() == {"rlnTomoName": "TS_01", "rlnTomoTiltSeriesPixelSize": 1.35}
    pd.testing.assert_frame_equal(blocks["TS_01"], table)


def test_bad_star_files(tmp_path):
    empty = tmp_path / "empty.star"
    empty.write_text("# nothing here\n")
    with pytest.raises(InputFileError) as info:
        read_star(empty)
    assert str(empty) in str(info.value)
    write_star(tmp_path / "two.star", {"a": pd.DataFrame({"rlnX": [1]}), "b": pd.DataFrame({"rlnX": [2]})})
    with pytest.raises(InputFileError, match="one data block"):
        read_tilt_series_star(tmp_path / "two.star")
    with pytest.raises(InputFileError, match="no data_particles"):
        read_particles_star(tmp_path / "two.star")
    with pytest.raises(InputFileError, match="file not found"):
        read_star(tmp_path / "none.star")
