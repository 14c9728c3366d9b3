"""AreTomo ``.aln`` files: a real AreTomo3 file, a hand-made worked example with dark frames, a
local alignment and the stray first line of some AreTomo3 builds, the convention against IMOD's
``.xf`` (AreTomo's own ``-OutImod`` formulas), and damaged files refused with the file named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import real_file
from tomopipe.algorithms.geometry import alignment_from_xf, xf_from_alignment
from tomopipe.errors import InputFileError
from tomopipe.io.aretomo import read_aln
from tomopipe.io.inspect import inspect_file

ROW = "%5d  %9.4f  %9.5f  %9.3f  %9.3f  %7.2f  %7.2f  %7.2f  %7.2f  %8.2f"  # AreTomo's fprintf

# 6 views at -10..15 deg (tilt order), views 0 and 3 dark; AlphaOffset 1.5 added to the rows' tilts
WORKED = """Hello
# AreTomo Alignment / Priims bprmMn
# RawSize = 200 100 6
# NumPatches = 1
# DarkFrame =     0    0   -10.00
# DarkFrame =     3    4     5.00
# AlphaOffset =     1.50
# BetaOffset =     0.30
# Thickness = 120
# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
    1    85.3000    1.00000      3.000     -2.000     1.00     1.00     1.00     0.00     -3.50
    5    85.2000    1.00000     -1.250      0.500     1.00     1.00     1.00     0.00      1.50
    3    85.1000    1.00000      0.000      0.000     1.00     1.00     1.00     0.00     11.50
    2    85.0000    1.00000      4.500      7.125     1.00     1.00     1.00     0.00     16.50
# Local Alignment
   0   0   -10.00     20.00      0.50     -0.25   1.0
   1   0   -10.00     20.00      0.40     -0.20   1.0
   2   0   -10.00     20.00      0.00      0.00   0.0
   3   0   -10.00     20.00     -0.30      0.10   1.0
"""


def test_real_aretomo3_file():
    aln = read_aln(real_file("aretomo/test_data_no_local.aln"))
    assert aln.raw_size_px == (4096, 4096, 61) and aln.n_views == 61 and aln.num_patches == 0
    assert (aln.alpha_offset_deg, aln.beta_offset_deg, aln.thickness_px) == (-7.0, 0.0, 2050.0)
    rows = aln.global_alignment
    assert len(rows) == 61 and aln.dark_frames.empty and aln.local_alignment.empty
    assert rows["sec"].tolist() == list(range(1, 62))  # AreTomo3 numbers sections from 1
    assert (rows["rot_deg"] == -95.404).all() and (rows["gmag"] == 1.0).all()
    assert rows.iloc[0][["tx_px", "ty_px", "tilt_deg"]].tolist() == [9.22, 103.933, -63.2]
    assert rows.iloc[-1][["tx_px", "ty_px", "tilt_deg"]].tolist() == [-633.32, -527.601, 56.79]
    assert rows.iloc[32][["tx_px", "ty_px"]].tolist() == [0.0, 0.0]  # the reference view
    np.testing.assert_array_equal(aln.view_positions(), np.arange(61))
    summary = inspect_file(real_file("aretomo/test_data_no_local.aln"))
    assert summary["file_type"] == "aretomo_aln" and summary["n_aligned_views"] == 61
    assert summary["tilt_axis_deg"][0] == -95.404 and summary["shift_y_px"][0] == 103.933


def test_worked_example_with_dark_frames_and_local_alignment(tmp_path):
    path = tmp_path / "TS_01.aln"
    path.write_text(WORKED)
    aln = read_aln(path)
    assert aln.raw_size_px == (200, 100, 6) and aln.num_patches == 1
    assert (aln.alpha_offset_deg, aln.beta_offset_deg, aln.thickness_px) == (1.5, 0.3, 120.0)
    assert aln.dark_frames["tilt_position"].tolist() == [0, 3] and aln.dark_frames["section"].tolist() == [0, 4]
    np.testing.assert_array_equal(aln.view_positions(), [1, 2, 4, 5])  # the kept views, in tilt order
    assert aln.global_alignment["tilt_deg"].tolist() == [-3.5, 1.5, 11.5, 16.5]
    assert aln.local_alignment["good"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert aln.local_alignment.iloc[0][["x_px", "y_px", "shift_x_px", "shift_y_px"]].tolist() == [-10, 20, 0.5, -0.25]
    assert ROW % (1, 85.3, 1, 3, -2, 1, 1, 1, 0, -3.5) in WORKED  # the example is in AreTomo's own format
    assert inspect_file(path)["dark_tilt_positions"] == [0, 3]


def test_rot_and_shifts_are_imod_xf_as_aretomo_writes_it():
    """AreTomo's -OutImod .xf (AreTomo2 ImodUtil/CSaveXF.cpp): a11 = cos(-ROT), a12 = -sin(-ROT),
    a21 = sin(-ROT), a22 = cos(-ROT), DX, DY = A·(-TX, -TY). Worked by hand for ROT 85.3, TX 3, TY -2:
    tomopipe's rot_z = ROT and specimen shift = (TX, TY) give the same .xf, and read it back."""
    expected_a = [[0.0819385, 0.9966374], [-0.9966374, 0.0819385]]
    expected_d = [1.7474592, 3.1537892]
    a, d = xf_from_alignment(torch.tensor([85.3], dtype=torch.float64),
                             torch.tensor([[3.0, -2.0]], dtype=torch.float64))
    np.testing.assert_allclose(a[0].numpy(), expected_a, atol=1e-7)
    np.testing.assert_allclose(d[0].numpy(), expected_d, atol=1e-7)
    rot, shift = alignment_from_xf(torch.tensor([expected_a], dtype=torch.float64),
                                   torch.tensor([expected_d], dtype=torch.float64))
    assert float(rot[0]) == pytest.approx(85.3, abs=1e-5)
    np.testing.assert_allclose(shift[0].numpy(), [3.0, -2.0], atol=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("# AreTomo Alignment / Priims bprmMn\n", ""), "not an AreTomo alignment file"),
    (lambda t: t.replace("# RawSize = 200 100 6\n", ""), "no '# RawSize"),
    (lambda t: t.replace("RawSize = 200 100 6", "RawSize = 200 100 7"), "4 alignment rows, but RawSize has 7 views"),
    (lambda t: t.replace("    2    85.0000", "    2    eighty5"), "line 14: expected 10 finite numbers"),
    (lambda t: t.replace("     16.50\n", "     -8.50\n"), "not in ascending tilt"),
    (lambda t: t.replace("# NumPatches = 1", "# NumPatches = 2"), "NumPatches 2 x 4 views"),
    (lambda t: t.replace("# DarkFrame =     3    4", "# DarkFrame =     0    4"), "are not distinct views"),
    (lambda t: t.replace("   1   0   -10.00", "   1   0   nan"), "line 17: expected 7 finite numbers"),
])
def test_damaged_files_are_refused_naming_the_file(tmp_path, edit, message):
    path = tmp_path / "bad.aln"
    path.write_text(edit(WORKED))
    with pytest.raises(InputFileError, match=message) as error:
        read_aln(path)
    assert str(path) in str(error.value)
