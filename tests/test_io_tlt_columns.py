"""IMOD ``.tlt`` files with more than one column (cets-imod writes the accumulated dose after the
angle): read as IMOD reads them (the first number of each line), the other columns kept."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import real_file
from tomopipe.errors import InputFileError
from tomopipe.io.imod import read_tlt, read_tlt_columns
from tomopipe.io.inspect import inspect_file


def test_real_two_column_tlt_from_cets_imod():
    path = real_file("imod/cets_imod_TS_03/TS_03.tlt")
    angles = read_tlt(path)  # refused before: "expected one angle in degrees, got '-57.00 117'"
    np.testing.assert_array_equal(angles, np.arange(-57.0, 60.5, 3.0))
    columns = read_tlt_columns(path)
    assert columns.shape == (40, 2)
    np.testing.assert_array_equal(columns[:, 0], angles)
    assert columns[0, 1] == 117 and columns[19].tolist() == [0.0, 3.0] and columns[-1, 1] == 123
    assert inspect_file(path)["n_views"] == 40


def test_one_column_files_read_the_same_both_ways():
    path = real_file("imod/TS_001/TS_001.tlt")
    np.testing.assert_array_equal(read_tlt_columns(path)[:, 0], read_tlt(path))
    assert read_tlt_columns(path).shape == (40, 1)


def test_columns_separators_and_errors(tmp_path):
    path = tmp_path / "a.tlt"
    path.write_text("-3.0, 6.5, 2\n\n0.0 3.25 1\n 3.0\t9.75\t3\n")
    np.testing.assert_array_equal(read_tlt(path), [-3.0, 0.0, 3.0])
    np.testing.assert_array_equal(read_tlt_columns(path), [[-3.0, 6.5, 2], [0.0, 3.25, 1], [3.0, 9.75, 3]])
    path.write_text("-3.0 6.5\n0.0\n")
    np.testing.assert_array_equal(read_tlt(path), [-3.0, 0.0])  # IMOD ignores what follows the angle
    with pytest.raises(InputFileError, match="line 2: 1 columns, but line 1 has 2"):
        read_tlt_columns(path)
    path.write_text("-3.0 dose\n")
    assert read_tlt(path).tolist() == [-3.0]
    with pytest.raises(InputFileError, match="line 1: expected a number, got 'dose'"):
        read_tlt_columns(path)
    path.write_text("inf 3\n")
    with pytest.raises(InputFileError, match="not finite"):
        read_tlt(path)
