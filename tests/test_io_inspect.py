"""inspect_file / format_inspect on every real data file and on written files with known content."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest

from conftest import real_file
from tomopipe.errors import InputFileError
from tomopipe.io.inspect import format_inspect, inspect_file
from tomopipe.io.mdoc import read_mdoc, write_mdoc
from tomopipe.io.movies import write_movie
from tomopipe.io.mrc import write_mrc

REAL_FILES = {
    "mdoc/tilt_series.mdoc": "mdoc",
    "mdoc/TS_01.mrc.mdoc": "mdoc",
    "mdoc/frame_set_single.mdoc": "mdoc",
    "mdoc/frame_set_multiple.mdoc": "mdoc",
    "star/relion5_EMPIAR-10164/tomograms.star": "star",
    "star/relion5_EMPIAR-10164/tilt_series/TS_01.star": "star",
    "imod/TS_001/TS_001.xf": "imod_xf",
    "imod/IMOD_tutorial_BB/BBa.xf": "imod_xf",
    "imod/TS_001/TS_001.tlt": "imod_angles",
    "imod/TS_001/TS_001.rawtlt": "imod_angles",
    "imod/TS_001/TS_001.xtilt": "imod_angles",
    "imod/IMOD_tutorial_BB/tilta.com": "imod_com",
    "imod/models/point_sizes_example.mod": "imod_model",
    "warp/gs04_ts_003.xml": "warp_tiltseries_xml",
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_every_real_file_gives_json_and_text(shared_data, name):
    summary = inspect_file(real_file(name))
    assert summary["file_type"] == REAL_FILES[name]
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    text = format_inspect(summary)
    assert text.splitlines()[0].startswith(str(shared_data / name))


def test_tilt_series_mdoc_summary(shared_data):
    path = shared_data / "mdoc" / "tilt_series.mdoc"
    s = inspect_file(path)
    doc = read_mdoc(path)
    assert s["n_tilts"] == 41 and s["tilt_axis_angle_deg"] == 85.3 and s["pixel_size_A"] == 5.4
    assert s["voltage_kV"] is None
    assert s["tilt_angles_deg"] == doc.tilt_angles_deg
    assert s["acquisition_order"] == list(range(41)) and s["acquisition_order_from"] == "DateTime"
    # this mdoc states no dose (ExposureDose = 0, no frame doses, no dose rate)
    assert s["dose_per_tilt_e_per_A2"] == [None] * 41 and s["pre_exposure_e_per_A2"] is None
    assert s["movie_names"][0] == "TS_01_000_0.0.mrc" and s["frame_counts"] == [8] * 41
    text = format_inspect(s)
    assert "tilt_axis_angle_deg: 85.3" in text
    assert "TS_01_040_60.0.mrc" in text and "60.0006" in text
    assert len([line for line in text.splitlines() if "TS_01_0" in line]) == 41


def test_frame_mdoc_pre_exposure_equals_prior_record_dose(shared_data):
    path = shared_data / "mdoc" / "frame_set_multiple.mdoc"
    s = inspect_file(path)
    prior = read_mdoc(path).sections["prior_record_dose"].to_numpy()
    assert s["mdoc_kind"] == "frame_tilt_series" and s["n_tilts"] == 20
    assert s["acquisition_order_from"] == "section order"
    np.testing.assert_allclose(s["pre_exposure_e_per_A2"], prior, atol=1e-3)
    doses = np.asarray(s["dose_per_tilt_e_per_A2"], dtype=float)
    np.testing.assert_allclose(s["accumulated_dose_e_per_A2"], prior + doses, atol=1e-3)


def test_bidirectional_written_mdoc_uses_date_times(tmp_path):
    # sections in angle order; acquired 0, +3, +6, then -3, -6; 2.5 e/A^2 per tilt
    angles = [-6.0, -3.0, 0.0, 3.0, 6.0]
    minutes = [4, 3, 0, 1, 2]
    sections = [
        {"TiltAngle": a, "ExposureDose": 2.5, "NumSubFrames": 6, "SubFramePath": rf"D:\f\t_{a}.tif",
         "DateTime": datetime(2026, 1, 2, 3, m, 0)}
        for a, m in zip(angles, minutes)
    ]
    write_mdoc(tmp_path / "b.mdoc", {"PixelSpacing": 2.0, "Voltage": 300}, ["Tilt axis angle = 85.0, binning = 1"],
               sections)
    s = inspect_file(tmp_path / "b.mdoc")
    assert s["acquisition_order"] == [4, 3, 0, 1, 2]
    assert s["pre_exposure_e_per_A2"] == [10.0, 7.5, 0.0, 2.5, 5.0]
    assert s["accumulated_dose_e_per_A2"] == [12.5, 10.0, 2.5, 5.0, 7.5]
    assert s["dose_per_tilt_e_per_A2"] == [2.5] * 5
    assert s["voltage_kV"] == 300 and s["tilt_axis_angle_deg"] == 85.0
    assert s["movie_names"] == [f"t_{a}.tif" for a in angles]


def test_mrc_summary_with_computed_stats_and_sniffing(tmp_path):
    data = np.random.default_rng(0).standard_normal((3, 8, 10)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", data, 2.5)
    s = inspect_file(tmp_path / "v.mrc")
    assert s["file_type"] == "mrc" and s["shape"] == [3, 8, 10] and s["voxel_size_A"] == 2.5
    assert s["mean"] == pytest.approx(float(data.astype(np.float64).mean()))
    assert s["std"] == pytest.approx(float(data.astype(np.float64).std()))
    assert s["dtype"] == "float32" and s["mode"] == 2
    (tmp_path / "v.dat").write_bytes((tmp_path / "v.mrc").read_bytes())
    assert inspect_file(tmp_path / "v.dat")["file_type"] == "mrc"  # by content


def test_xf_summary_rotation(shared_data):
    s = inspect_file(shared_data / "imod" / "TS_001" / "TS_001.xf")
    first = s["transforms"][0]
    assert first == [0.1020875, 0.994776, -0.994776, 0.1020875, 2.395, -3.871]
    assert s["rotation_deg"][0] == pytest.approx(np.degrees(np.arctan2(0.994776, 0.1020875)))
    assert s["shifts_px"][0] == [2.395, -3.871] and s["n_views"] == 40


def test_tiff_movie_summary(tmp_path):
    write_movie(tmp_path / "m.tif", np.ones((3, 6, 5), dtype=np.int32))
    s = inspect_file(tmp_path / "m.tif")
    assert s == {"path": str(tmp_path / "m.tif"), "file_type": "tiff_movie", "n_frames": 3,
                 "frame_shape_yx": [6, 5], "dtype": "uint8"}


def test_unknown_and_refused_files(shared_data, tmp_path):
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello\n")
    with pytest.raises(InputFileError, match="unknown file type") as info:
        inspect_file(unknown)
    assert str(unknown) in str(info.value)
    with pytest.raises(InputFileError, match="montage"):
        inspect_file(shared_data / "mdoc" / "montage_section.mdoc")
    with pytest.raises(InputFileError, match="file not found"):
        inspect_file(tmp_path / "missing.mrc")
