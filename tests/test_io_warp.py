"""Warp tilt-series XML: values of the real gs04_ts_003.xml checked against its text."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from tomopipe.errors import InputFileError
from tomopipe.io.warp import read_warp_tiltseries_xml


@pytest.fixture()
def warp_xml(shared_data):
    return shared_data / "warp" / "gs04_ts_003.xml"


def test_real_warp_xml_values(warp_xml):
    data = read_warp_tiltseries_xml(warp_xml)
    root = ET.parse(warp_xml).getroot()
    assert data["n_tilts"] == 47
    assert data["tilt_angles_deg"] == [float(v) for v in root.find("Angles").text.split()]
    assert data["tilt_angles_deg"][0] == 46.0 and data["tilt_angles_deg"][-1] == -45.99
    assert data["dose_e_per_A2"][0] == 140.97852 and min(data["dose_e_per_A2"]) == 15.4122
    assert all(data["use_tilt"]) and len(data["use_tilt"]) == 47
    assert set(data["axis_angle_deg"]) == {84.500114}
    assert data["axis_offset_x_A"][0] == -10.848754 and data["axis_offset_y_A"][0] == 38.199642
    assert len(data["movie_paths"]) == 47 and all(p.endswith(".eer") for p in data["movie_paths"])
    assert data["movie_paths"][0] == "../frameseries/gs04_ts_003_00000_-46.0_17.14.00.eer"
    assert data["are_angles_inverted"] is False
    assert data["plane_normal"] == [-0.0552735, -0.009931533, 0.99842185]
    ctf = data["ctf"]
    assert (ctf["defocus_um"], ctf["defocus_delta_um"], ctf["defocus_angle_deg"]) == (5.207778, 0.0088111779795914, 129)
    assert (ctf["voltage_kV"], ctf["cs_mm"], ctf["amplitude_contrast"],
            ctf["pixel_size_A"]) == (300.0, 2.7, 0.1, 0.7303)
    assert data["pixel_size_A"] == 0.7303
    options = data["options_ctf"]
    assert options["GainPath"] == "20240906_110257_EER_GainReference.gain"
    assert options["GainFlipY"] is False and options["GridDims"] == [5, 5, 1] and options["Window"] == 768


def test_real_warp_xml_grids(warp_xml):
    data = read_warp_tiltseries_xml(warp_xml)
    text = warp_xml.read_text(encoding="utf-8-sig")
    grid_block = text.split("<GridCTF ")[1].split("</GridCTF>")[0]
    values = [float(v) for v in re.findall(r'Value="([^"]+)"', grid_block)]
    assert data["grids"]["GridCTF"]["dims"] == [1, 1, 47]
    assert data["tilt_defocus_um"] == values
    assert data["tilt_defocus_um"][0] == 5.162571
    delta = data["tilt_defocus_delta_um"][0]
    assert data["tilt_defocus_u_A"][0] == pytest.approx((5.162571 + delta / 2) * 1e4)
    assert data["tilt_defocus_v_A"][0] == pytest.approx((5.162571 - delta / 2) * 1e4)
    assert data["tilt_defocus_angle_deg"] == [129.0] * 47
    assert data["grids"]["GridVolumeWarpX"]["dims"] == [1, 1, 1, 1]


def test_warp_errors(tmp_path):
    not_ts = tmp_path / "other.xml"
    not_ts.write_text("<Movie></Movie>")
    with pytest.raises(InputFileError, match="not a Warp <TiltSeries>") as info:
        read_warp_tiltseries_xml(not_ts)
    assert str(not_ts) in str(info.value)
    mismatch = tmp_path / "mismatch.xml"
    mismatch.write_text(
        "<TiltSeries><Angles>1\n2</Angles><Dose>0\n1</Dose><UseTilt>True</UseTilt><AxisAngle>1\n1</AxisAngle>"
        "<AxisOffsetX>0\n0</AxisOffsetX><AxisOffsetY>0\n0</AxisOffsetY><MoviePath>a\nb</MoviePath></TiltSeries>"
    )
    with pytest.raises(InputFileError, match="<UseTilt> has 1 entries"):
        read_warp_tiltseries_xml(mismatch)
    broken = tmp_path / "broken.xml"
    broken.write_text("<TiltSeries><Angles>")
    with pytest.raises(InputFileError, match="not a readable XML"):
        read_warp_tiltseries_xml(broken)
