"""IMOD files: real .xf/.tlt/.rawtlt/.xtilt read and rewritten (exact text for .xf), exclude
lists, .defocus versions 2/3, .mod round trips of all real models, .com in PIP and old format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import real_file
from tomopipe.errors import InputFileError
from tomopipe.io.imod import (
    format_defocus,
    format_exclude_list,
    format_tlt,
    format_xf,
    imod_model_info,
    read_com,
    read_defocus,
    read_exclude_list,
    read_imod_model,
    read_tlt,
    read_xf,
    write_defocus,
    write_imod_model,
    write_tlt,
    write_xf,
)

XF_FILES = ["TS_001/TS_001.xf", "IMOD_tutorial_BB/BBa.xf"]


@pytest.fixture()
def imod_dir(shared_data):
    return shared_data / "imod"


@pytest.mark.parametrize("name", XF_FILES)
def test_real_xf_reads_and_rewrites_to_identical_text(tmp_path, name):
    path = real_file(f"imod/{name}")
    text = path.read_text()
    A, shifts = read_xf(path)
    rows = [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]
    assert A.shape == (len(rows), 2, 2) and shifts.shape == (len(rows), 2)
    np.testing.assert_array_equal(A.reshape(-1, 4), np.array(rows)[:, :4])
    np.testing.assert_array_equal(shifts, np.array(rows)[:, 4:])
    assert format_xf(A, shifts) == text
    write_xf(tmp_path / "out.xf", A, shifts)
    assert (tmp_path / "out.xf").read_text() == text
    A2, shifts2 = read_xf(tmp_path / "out.xf")
    np.testing.assert_array_equal(A2, A)
    np.testing.assert_array_equal(shifts2, shifts)


def test_ts001_xf_is_a_rotation_near_the_tilt_axis(imod_dir):
    A, _ = read_xf(imod_dir / "TS_001" / "TS_001.xf")
    assert len(A) == 40
    np.testing.assert_allclose(np.linalg.det(A), 1.0, atol=1e-5)
    alpha = np.degrees(np.arctan2(-A[:, 1, 0], A[:, 0, 0]))
    np.testing.assert_allclose(alpha, np.degrees(np.arctan2(A[:, 0, 1], A[:, 0, 0])), atol=1e-4)
    assert np.all((alpha > 83.0) & (alpha < 86.0))


def test_xf_round_trip_random_and_fixed_width_fields(tmp_path):
    rng = np.random.default_rng(1)
    theta = np.radians(rng.uniform(-180, 180, 7))
    A = np.stack([np.stack([np.cos(theta), -np.sin(theta)], -1), np.stack([np.sin(theta), np.cos(theta)], -1)], 1)
    shifts = rng.uniform(-500, 500, (7, 2))
    write_xf(tmp_path / "r.xf", A, shifts)
    A2, s2 = read_xf(tmp_path / "r.xf")
    np.testing.assert_allclose(A2, A, atol=5e-8)
    np.testing.assert_allclose(s2, shifts, atol=5e-4)
    # IMOD's fixed-width fields can touch when a shift fills its width
    touching = "   0.9999999   0.0000000  -0.0000000   0.9999999-1234567.123     -12.500\n"
    assert len(touching) == 6 * 12 + 1
    (tmp_path / "t.xf").write_text(touching)
    _, s3 = read_xf(tmp_path / "t.xf")
    np.testing.assert_allclose(s3, [[-1234567.123, -12.5]])


def test_xf_errors(tmp_path):
    bad = tmp_path / "bad.xf"
    bad.write_text("   1.0   0.0   0.0   1.0   2.0   3.0\n1 0 0 1 2\n")
    with pytest.raises(InputFileError, match="line 2") as info:
        read_xf(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        write_xf(tmp_path / "x.xf", np.eye(2), np.zeros((1, 2)))


@pytest.mark.parametrize(
    "name, n, first, last",
    [
        ("TS_001/TS_001.tlt", 40, -57.12, 59.84),
        ("TS_001/TS_001.rawtlt", 40, -60.0, 56.99),
        ("TS_001/TS_001.xtilt", 40, -0.01, 0.0),
        ("IMOD_tutorial_BB/BBa_fid.tlt", 61, 64.37, -55.53),
    ],
)
def test_real_angle_files(tmp_path, name, n, first, last):
    path = real_file(f"imod/{name}")
    angles = read_tlt(path)
    assert angles.size == n and angles[0] == first and angles[-1] == last
    np.testing.assert_array_equal(angles, [float(v) for v in path.read_text().split()])
    write_tlt(tmp_path / "out.tlt", angles)
    np.testing.assert_array_equal(read_tlt(tmp_path / "out.tlt"), angles)
    if not name.endswith(".rawtlt"):  # .tlt/.xtilt are IMOD-written: %7.2f
        assert format_tlt(angles) == path.read_text()


def test_tlt_errors_and_precision(tmp_path):
    write_tlt(tmp_path / "p.tlt", [1.23456], decimals=4)
    assert (tmp_path / "p.tlt").read_text() == "   1.2346\n"  # width 9 fits -180.0000
    bad = tmp_path / "bad.tlt"
    bad.write_text("1.0\nabc\n")
    with pytest.raises(InputFileError, match="line 2"):
        read_tlt(bad)


def test_exclude_lists():
    assert read_exclude_list("1-3,7") == [1, 2, 3, 7]
    assert read_exclude_list("7, 1-3 10-11") == [1, 2, 3, 7, 10, 11]
    assert read_exclude_list("") == []
    assert format_exclude_list([7, 3, 1, 2, 10, 11, 13]) == "1-3,7,10-11,13"
    for views in ([1], [2, 4, 6], list(range(1, 42))):
        assert read_exclude_list(format_exclude_list(views)) == views
    for bad in ("0", "3-1", "a", "1--3"):
        with pytest.raises(ValueError):
            read_exclude_list(bad)
    with pytest.raises(ValueError, match="1-based"):
        format_exclude_list([0, 1])


def test_defocus_version2_and_version3(tmp_path):
    v2 = "1\t1\t-60.00\t-60.00\t3012.3\t2\n2\t2\t-57.00\t-57.00\t2998.1\n"
    (tmp_path / "v2.defocus").write_text(v2)
    df = read_defocus(tmp_path / "v2.defocus")
    assert df.attrs == {"version": 2, "flags": 0}
    assert df["defocus1_nm"].tolist() == [3012.3, 2998.1]
    assert df["start_view"].tolist() == [1, 2]
    assert format_defocus(df) == v2

    v3 = ("5\t0\t0.\t0.\t0\t3\n1\t1\t-60.00\t-60.00\t3012.3\t2950.0\t45.20\t0.00\n"
          "2\t3\t-57.00\t-54.00\t2998.1\t2900.4\t-12.50\t1.50\n")
    (tmp_path / "v3.defocus").write_text(v3)
    df3 = read_defocus(tmp_path / "v3.defocus")
    assert df3.attrs == {"version": 3, "flags": 5}
    assert df3["defocus2_nm"].tolist() == [2950.0, 2900.4]
    assert df3["astigmatism_angle_deg"].tolist() == [45.2, -12.5]
    assert df3["phase_shift_deg"].tolist() == [0.0, 1.5]
    assert df3["end_view"].tolist() == [1, 3]
    write_defocus(tmp_path / "out.defocus", df3)
    assert (tmp_path / "out.defocus").read_text() == v3
    pd.testing.assert_frame_equal(read_defocus(tmp_path / "out.defocus"), df3)


def test_defocus_radians_and_errors(tmp_path):
    (tmp_path / "rad.defocus").write_text("3\t0\t0.\t0.\t0\t3\n1\t1\t0.00\t0.00\t3000.0\t2900.0\t1.5707963\n")
    df = read_defocus(tmp_path / "rad.defocus")
    assert df["astigmatism_angle_deg"].iloc[0] == pytest.approx(90.0)
    assert df.attrs["flags"] == 1
    (tmp_path / "bad.defocus").write_text("1\t0\t0.\t0.\t0\t3\n1\t1\t0.00\t0.00\t3000.0\n")
    with pytest.raises(InputFileError, match="need 7") as info:
        read_defocus(tmp_path / "bad.defocus")
    assert str(tmp_path / "bad.defocus") in str(info.value)


MODELS = {
    "two_contour_example.mod": (1, 2, 25),
    "multiple_objects_example.mod": (3, 2, 6),
    "point_sizes_example.mod": (3, 5, 18),
    "slicer_angle_example.mod": (1, 4, 4),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_models_round_trip(imod_dir, tmp_path, name):
    path = imod_dir / "models" / name
    points = read_imod_model(path)
    info = imod_model_info(path)
    assert (info["n_objects"], info["n_contours"], info["n_points"]) == MODELS[name]
    assert len(points) == info["n_points"]
    write_imod_model(tmp_path / "out.mod", points, image_size_xyz=info["image_size_xyz"])
    back = read_imod_model(tmp_path / "out.mod")
    pd.testing.assert_frame_equal(back, points)
    assert imod_model_info(tmp_path / "out.mod")["image_size_xyz"] == info["image_size_xyz"]


def test_model_from_points_and_errors(tmp_path):
    pts = pd.DataFrame({"x": [1.5, 2.5, 3.5], "y": [4.0, 5.0, 6.0], "z": [0.0, 1.0, 2.0], "object": [0, 0, 2]})
    write_imod_model(tmp_path / "p.mod", pts)
    back = read_imod_model(tmp_path / "p.mod")
    assert back["object"].tolist() == [0, 0, 2] and back["contour"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy(), pts[["x", "y", "z"]].to_numpy())
    assert imod_model_info(tmp_path / "p.mod")["n_objects"] == 3
    with pytest.raises(ValueError, match="x, y, z"):
        write_imod_model(tmp_path / "q.mod", pts.drop(columns="z"))
    bad = tmp_path / "bad.mod"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(InputFileError) as info:
        read_imod_model(bad)
    assert str(bad) in str(info.value)


def test_com_old_positional_tilt():
    com = read_com(real_file("imod/IMOD_tutorial_BB/tilta.com"))
    assert com["program"] == "tilt" and com["format"] == "positional"
    kw = com["keywords"]
    assert kw["InputProjections"] == "BBa.ali" and kw["OutputFile"] == "BBa.rec"
    assert kw["THICKNESS"] == 96 and kw["FULLIMAGE"] == [512, 512]
    assert kw["XAXISTILT"] == 1.83 and kw["RADIAL"] == [0.35, 0.05]
    assert kw["PERPENDICULAR"] is True and kw["TILTFILE"] == "BBa.tlt"
    assert "DONE" not in kw
    assert [c["program"] for c in com["commands"]] == ["tilt", "if"]


def test_com_pip_files():
    align = read_com(real_file("imod/IMOD_tutorial_BB/aligna.com"))
    assert align["program"] == "tiltalign" and align["format"] == "pip"
    kw = align["keywords"]
    assert kw["RotationAngle"] == -12.5 and kw["AngleOffset"] == -0.5
    assert kw["TiltFile"] == "BBa.rawtlt" and kw["NumberOfLocalPatchesXandY"] == [5, 5]
    assert "ImageSizeXandY" not in kw  # commented out in the file
    xfproduct = align["commands"][1]
    assert xfproduct["program"] == "xfproduct"
    assert xfproduct["keywords"] == {"InputFile1": "BBa.prexg", "InputFile2": "BBa.tltxf", "OutputFile": "BBa_fid.xf"}
    tilt = read_com(real_file("imod/etomo_uitest_midzone2/tilt.com"))["keywords"]
    assert tilt["THICKNESS"] == 84 and tilt["FULLIMAGE"] == [1950, 1024]
    assert tilt["SUBSETSTART"] == [-25, -13] and tilt["EXCLUDELIST"] == 1
    assert tilt["ActionIfGPUFails"] == [1, 2] and tilt["AdjustOrigin"] is True
    assert tilt["XTILTFILE"] == "midzone2a.xtilt"


def test_com_errors(tmp_path):
    bad = tmp_path / "x.com"
    bad.write_text("THICKNESS 10\n")
    with pytest.raises(InputFileError, match="before any \\$command") as info:
        read_com(bad)
    assert str(bad) in str(info.value)
