"""SerialEM mdoc reading on all real mdocs (values checked against the file text), CRLF, frame
mdocs, montage refusal, dose rule, and writing that re-reads with our reader and mdocfile."""

from __future__ import annotations

import re
from datetime import datetime

import mdocfile
import numpy as np
import pandas as pd
import pytest

from tomopipe.errors import InputFileError
from tomopipe.io.mdoc import (
    dose_per_tilt_e_per_A2,
    format_mdoc_value,
    movie_name_from_path,
    parse_mdoc_datetime,
    read_mdoc,
    write_mdoc,
)


def _values(text: str, key: str) -> list[str]:
    return re.findall(rf"^{key} = (.*?)\s*$", text, flags=re.MULTILINE)


def test_tilt_series_mdoc_against_file_text(shared_data):
    path = shared_data / "mdoc" / "tilt_series.mdoc"
    text = path.read_text()
    doc = read_mdoc(path, require_tilt_series=True)
    assert doc.kind == "tilt_series"
    assert len(doc.sections) == 41 == text.count("[ZValue =")
    assert doc.tilt_axis_angle_deg == 85.3
    assert doc.pixel_size_A == 5.4
    assert doc.image_size == (924, 958)
    assert doc.voltage_kV is None  # this mdoc does not state it
    assert doc.binning == 4 and doc.magnification == 105000
    angles = [float(v) for v in _values(text, "TiltAngle")]
    assert doc.tilt_angles_deg == angles
    assert angles[0] == 0.000999877 and angles[-1] == 60.0006
    assert doc.sections["z_value"].tolist() == list(range(41))
    # DateTime: parsed, and increasing in section order in this (dose-symmetric) file
    times = doc.sections["date_time"]
    assert times.iloc[0] == pd.Timestamp("2015-11-30 15:21:38")
    assert times.iloc[-1] == pd.Timestamp("2015-11-30 16:06:45")
    assert times.is_monotonic_increasing
    # Windows SubFramePath kept verbatim; the movie name is its basename
    assert doc.sections["sub_frame_path"].tolist() == _values(text, "SubFramePath")
    assert doc.sections["movie_name"].iloc[2] == "TS_01_002_-3.0.mrc"
    assert doc.sections["num_sub_frames"].tolist() == [8] * 41
    assert doc.sections["exposure_time_s"].iloc[0] == 0.8
    assert doc.sections["stage_x"].iloc[0] == 20.7936 and doc.sections["stage_y"].iloc[0] == 155.287
    assert doc.sections["target_defocus_um"].iloc[0] == -4.0
    # conventions.md T1: RotationAngle - 90 = title tilt-axis angle
    rotation = doc.sections["rotation_angle_deg"].to_numpy()
    np.testing.assert_allclose(rotation - 90.0, doc.tilt_axis_angle_deg, atol=0.1)
    # unknown-to-us fields are kept
    assert doc.sections["min_max_mean"].iloc[0] == (5.0, 1403.0, 623.699)


def test_crlf_mdoc_reads_like_lf(shared_data):
    crlf = shared_data / "mdoc" / "TS_01.mrc.mdoc"
    assert b"\r\n" in crlf.read_bytes()
    a = read_mdoc(crlf)
    b = read_mdoc(shared_data / "mdoc" / "tilt_series.mdoc")
    pd.testing.assert_frame_equal(a.sections, b.sections)
    assert (a.tilt_axis_angle_deg, a.pixel_size_A, a.titles) == (b.tilt_axis_angle_deg, b.pixel_size_A, b.titles)


def test_frame_set_single(shared_data):
    path = shared_data / "mdoc" / "frame_set_single.mdoc"
    doc = read_mdoc(path)
    assert doc.kind == "frame_set"
    assert len(doc.sections) == 0 and len(doc.frame_sets) == 1
    row = doc.frame_sets.iloc[0]
    assert doc.pixel_size_A == 1.2827 and doc.voltage_kV == 300 and doc.binning == 0.5
    assert row["tilt_angle_deg"] == 32.984
    assert row["exposure_dose_e_per_A2"] == 7.65892
    assert row["frame_doses_and_number"] == [(0.63824, 12)]
    assert row["dose_rate"] == 4.97858
    assert row["movie_name"] == "s_mmm_00993_33.0_Oct08_07.39.05.tif"
    assert row["gain_reference"] == "SuperRef_s_mmm_00000_-15.0_Oct08_01.59.24.dm4"
    assert doc.titles[0].startswith("SerialEM: UMass_Krios")  # unbracketed "T = ..." title
    assert dose_per_tilt_e_per_A2(row, doc.unbinned_pixel_size_A) == 7.65892
    with pytest.raises(InputFileError, match="per-exposure frame mdoc") as info:
        read_mdoc(path, require_tilt_series=True)
    assert str(path) in str(info.value)


def test_frame_set_multiple_prior_record_dose_is_consistent(shared_data):
    path = shared_data / "mdoc" / "frame_set_multiple.mdoc"
    doc = read_mdoc(path)
    assert doc.kind == "frame_tilt_series"
    assert len(doc.sections) == 20 and len(doc.frame_sets) == 1
    assert doc.pixel_size_A == 1.2827  # from the [FrameSet] section
    assert doc.sections["frame_ts_start_end_frames"].iloc[1] == "22 34"
    prior = doc.sections["prior_record_dose"].to_numpy()
    dose = doc.sections["exposure_dose_e_per_A2"].to_numpy()
    np.testing.assert_allclose(prior[1:], prior[:-1] + dose[:-1], atol=1e-3)
    with pytest.raises(InputFileError, match="frame ranges"):
        read_mdoc(path, require_tilt_series=True)


def test_montage_is_refused(shared_data):
    path = shared_data / "mdoc" / "montage_section.mdoc"
    with pytest.raises(InputFileError, match="montage mdoc.*not a tilt series") as info:
        read_mdoc(path)
    assert str(path) in str(info.value)


def test_missing_tilt_angle_names_file_and_section(shared_data, tmp_path):
    text = (shared_data / "mdoc" / "tilt_series.mdoc").read_text()
    lines = text.splitlines()
    # drop TiltAngle from section ZValue = 2 only
    start = lines.index("[ZValue = 2]")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("TiltAngle"))
    del lines[end]
    path = tmp_path / "no_tilt.mdoc"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputFileError, match=r"no TiltAngle in section\(s\) ZValue = \[2\]") as info:
        read_mdoc(path)
    assert str(path) in str(info.value)


def test_bad_values_and_non_mdoc_files(tmp_path):
    bad = tmp_path / "bad.mdoc"
    bad.write_text("PixelSpacing = 1.0\n\n[ZValue = 0]\nTiltAngle = abc\n")
    with pytest.raises(InputFileError, match="TiltAngle") as info:
        read_mdoc(bad)
    assert str(bad) in str(info.value)
    empty = tmp_path / "empty.mdoc"
    empty.write_text("just text\n")
    with pytest.raises(InputFileError, match="no \\[ZValue\\]"):
        read_mdoc(empty)
    dupes = tmp_path / "dup.mdoc"
    dupes.write_text("[ZValue = 0]\nTiltAngle = 1\n\n[ZValue = 0]\nTiltAngle = 2\n")
    with pytest.raises(InputFileError, match="duplicate ZValue"):
        read_mdoc(dupes)
    with pytest.raises(InputFileError, match="file not found"):
        read_mdoc(tmp_path / "none.mdoc")


def test_dose_rule():
    assert dose_per_tilt_e_per_A2({"exposure_dose_e_per_A2": 3.5}, 1.0) == 3.5
    frames = {"exposure_dose_e_per_A2": 0.0, "frame_doses_and_number": [(0.25, 8), (0.5, 2)]}
    assert dose_per_tilt_e_per_A2(frames, 1.0) == pytest.approx(3.0)
    rate = {"exposure_dose_e_per_A2": 0.0, "dose_rate": 8.0, "exposure_time_s": 2.0}
    assert dose_per_tilt_e_per_A2(rate, 2.0) == pytest.approx(8.0 * 2.0 / 4.0)
    assert dose_per_tilt_e_per_A2(rate, None) is None
    assert dose_per_tilt_e_per_A2({"exposure_dose_e_per_A2": 0.0}, 1.0) is None
    assert dose_per_tilt_e_per_A2(pd.Series({"exposure_dose_e_per_A2": np.nan}), 1.0) is None


def test_helpers():
    assert movie_name_from_path(r"D:\DATA\x\TS_01_000_0.0.mrc") == "TS_01_000_0.0.mrc"
    assert movie_name_from_path("/data/frames/a.tif") == "a.tif"
    assert movie_name_from_path("X:relative.tif") == "relative.tif"
    assert parse_mdoc_datetime("30-Nov-15  15:21:38") == pd.Timestamp("2015-11-30 15:21:38")
    assert parse_mdoc_datetime("08-Oct-2021 07:39:08") == pd.Timestamp("2021-10-08 07:39:08")
    assert parse_mdoc_datetime("yesterday") is pd.NaT
    assert format_mdoc_value("X", 300.0) == "300"
    assert format_mdoc_value("X", -2.5e-5) == "-0.000025"
    assert format_mdoc_value("X", [(0.264, 10)]) == "0.264 10"
    assert format_mdoc_value("X", True) == "1"
    assert format_mdoc_value("X", datetime(2024, 3, 5, 9, 8, 7)) == "05-Mar-24  09:08:07"


def _sections():
    angles = [0.0, 2.0, -2.0, -4.0, 4.0]
    return [
        {
            "TiltAngle": a,
            "StagePosition": (12.5, -3.25),
            "Magnification": 64000,
            "ExposureDose": 2.64,
            "PixelSpacing": 1.35,
            "ExposureTime": 0.5,
            "Defocus": -2.75,
            "TargetDefocus": -2.5,
            "RotationAngle": -175.6,
            "NumSubFrames": 10,
            "FrameDosesAndNumber": [(0.264, 10)],
            "SubFramePath": rf"X:\data\frames\TS_01_{i:03d}_{a:.1f}.tif",
            "DateTime": datetime(2026, 11, 24, 10, i, 30),
        }
        for i, a in enumerate(angles)
    ]


def test_write_mdoc_reads_back_with_ours_and_mdocfile(tmp_path):
    path = tmp_path / "TS_01.mdoc"
    sections = _sections()
    write_mdoc(
        path,
        {"PixelSpacing": 1.35, "Voltage": 300, "ImageFile": "TS_01.mrc", "ImageSize": (512, 480), "DataMode": 1},
        ["SerialEM: tomopipe simulator", "[T = Tilt axis angle = -85.6, binning = 1  spot = 8  camera = 0]"],
        sections,
    )
    doc = read_mdoc(path, require_tilt_series=True)
    assert doc.tilt_axis_angle_deg == -85.6 and doc.pixel_size_A == 1.35 and doc.voltage_kV == 300
    assert doc.image_size == (512, 480)
    assert doc.tilt_angles_deg == [s["TiltAngle"] for s in sections]
    assert doc.sections["movie_name"].tolist() == [f"TS_01_{i:03d}_{a:.1f}.tif"
                                                   for i, a in enumerate(doc.tilt_angles_deg)]
    assert doc.sections["sub_frame_path"].tolist() == [s["SubFramePath"] for s in sections]
    assert doc.sections["date_time"].tolist() == [pd.Timestamp(s["DateTime"]) for s in sections]
    assert doc.sections["frame_doses_and_number"].iloc[0] == [(0.264, 10)]
    assert (doc.sections["stage_x"] == 12.5).all() and (doc.sections["stage_y"] == -3.25).all()
    assert dose_per_tilt_e_per_A2(doc.sections.iloc[0], 1.35) == 2.64

    plain = mdocfile.read(path)
    assert len(plain) == 5
    assert plain["TiltAngle"].tolist() == doc.tilt_angles_deg
    assert plain["PixelSpacing"].iloc[0] == 1.35
    assert plain["titles"].iloc[0][1] == "[T = Tilt axis angle = -85.6, binning = 1  spot = 8  camera = 0]"
    text = path.read_text()
    assert "[ZValue = 4]" in text and "DateTime = 24-Nov-26  10:04:30" in text


def test_write_mdoc_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ZValue"):
        write_mdoc(tmp_path / "a.mdoc", {}, [], [{"ZValue": 3, "TiltAngle": 0.0}])
    with pytest.raises(ValueError, match="invalid mdoc key"):
        write_mdoc(tmp_path / "a.mdoc", {}, [], [{"Tilt Angle": 0.0}])
    with pytest.raises(ValueError, match="'='"):
        write_mdoc(tmp_path / "a.mdoc", {"ImageFile": "a=b.mrc"}, [], [{"TiltAngle": 0.0}])
    with pytest.raises(ValueError, match="line break"):
        write_mdoc(tmp_path / "a.mdoc", {}, [], [{"NavigatorLabel": "a\nb"}])
    assert not (tmp_path / "a.mdoc").exists()
