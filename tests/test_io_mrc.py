"""MRC reading/writing: dtype and value round trips, header fields checked with plain mrcfile,
image-stack flag, memory mapping, statistics, and clear errors for bad files."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import torch

from tomopipe.errors import InputFileError
from tomopipe.io.mrc import IMOD_STAMP, mrc_stack_writer, read_mrc, read_mrc_header, write_mrc

DTYPES = [np.float32, np.int16, np.uint8, np.float16, np.uint16, np.int8]


def _data(dtype, shape=(3, 7, 9), seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    return (rng.standard_normal(shape) * 50).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_dtype_values_and_pixel_size(tmp_path, dtype):
    data = _data(dtype)
    path = tmp_path / "a.mrc"
    write_mrc(path, data, 1.35, stack=True)
    back, voxel_size_A = read_mrc(path)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, data)
    assert voxel_size_A == pytest.approx(1.35, abs=1e-6)
    assert back.flags.writeable


@pytest.mark.parametrize("dtype", DTYPES)
def test_header_statistics_match_data(tmp_path, dtype):
    data = _data(dtype, seed=3)
    path = tmp_path / "s.mrc"
    write_mrc(path, data, 2.0)
    header = read_mrc_header(path, compute_stats=True)
    values = data.astype(np.float64)
    assert header["header_min"] == pytest.approx(values.min(), rel=1e-3, abs=1e-3)
    assert header["header_max"] == pytest.approx(values.max(), rel=1e-3, abs=1e-3)
    assert header["header_mean"] == pytest.approx(values.mean(), rel=1e-3, abs=1e-3)
    assert header["header_rms"] == pytest.approx(values.std(), rel=1e-3)
    assert header["min"] == values.min() and header["max"] == values.max()
    assert header["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert header["std"] == pytest.approx(values.std(), rel=1e-12)


def test_stack_flag_and_volume_as_seen_by_mrcfile(tmp_path):
    data = _data(np.float32, shape=(4, 6, 5))
    write_mrc(tmp_path / "stack.mrcs", data, 1.5, stack=True)
    write_mrc(tmp_path / "vol.mrc", data, (1.5, 1.5, 3.0))
    with mrcfile.open(tmp_path / "stack.mrcs") as m:
        assert m.header.ispg == 0 and m.is_image_stack()
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (5, 6, 4)
        assert m.voxel_size.x == pytest.approx(1.5)
        np.testing.assert_array_equal(m.data, data)
    with mrcfile.open(tmp_path / "vol.mrc") as m:
        assert m.header.ispg == 1 and m.is_volume()
        assert m.voxel_size.z == pytest.approx(3.0)
    header = read_mrc_header(tmp_path / "stack.mrcs")
    assert header["shape"] == [4, 6, 5]
    assert header["is_image_stack"] is True
    assert read_mrc_header(tmp_path / "vol.mrc")["voxel_size_xyz_A"] == pytest.approx([1.5, 1.5, 3.0])


def test_single_image_and_torch_input(tmp_path):
    image = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    write_mrc(tmp_path / "img.mrc", image, 0.8)
    back, voxel_size_A = read_mrc(tmp_path / "img.mrc")
    assert back.shape == (4, 5)
    np.testing.assert_array_equal(back, image.numpy())
    assert voxel_size_A == pytest.approx(0.8)
    assert read_mrc_header(tmp_path / "img.mrc")["shape"] == [1, 4, 5]


def test_float64_written_as_float32(tmp_path):
    data = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    write_mrc(tmp_path / "d.mrc", data, 1.0)
    back, _ = read_mrc(tmp_path / "d.mrc")
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, data, rtol=1e-7)


def test_uint8_above_127_uses_imod_unsigned_stamp(tmp_path):
    data = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    path = tmp_path / "u8.mrc"
    write_mrc(path, data, 1.0)
    back, _ = read_mrc(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, data)
    with mrcfile.open(path) as m:  # a reader that ignores IMOD's flag sees signed bytes
        assert m.header.mode == 0
        np.testing.assert_array_equal(m.data, data.view(np.int8))
    raw = path.read_bytes()
    assert int.from_bytes(raw[152:156], "little") == IMOD_STAMP
    assert int.from_bytes(raw[156:160], "little") & 1 == 0


def test_mode0_without_imod_stamp_reads_signed(tmp_path):
    data = np.array([[-5, 3, 100]], dtype=np.int8)
    with mrcfile.new(tmp_path / "s8.mrc") as m:
        m.set_data(data)
    back, _ = read_mrc(tmp_path / "s8.mrc")
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, data)


def test_mmap_is_read_only_and_equal(tmp_path):
    data = _data(np.float32, shape=(5, 8, 8))
    write_mrc(tmp_path / "m.mrc", data, 1.0)
    mapped, _ = read_mrc(tmp_path / "m.mrc", mmap=True)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, data)
    with pytest.raises(ValueError):
        mapped[0, 0, 0] = 1.0


def test_read_files_written_by_mrcfile_with_extended_header(tmp_path):
    data = _data(np.int16, shape=(2, 4, 4))
    with mrcfile.new(tmp_path / "ext.mrc") as m:
        m.set_data(data)
        m.set_extended_header(np.zeros(10, dtype=[("a", "f4")]))
        m.voxel_size = 3.2
    back, voxel_size_A = read_mrc(tmp_path / "ext.mrc")
    np.testing.assert_array_equal(back, data)
    assert voxel_size_A == pytest.approx(3.2)
    assert read_mrc_header(tmp_path / "ext.mrc")["extended_header_bytes"] == 40


def test_truncated_file_error_names_file(tmp_path):
    path = tmp_path / "t.mrc"
    write_mrc(path, _data(np.float32), 1.0)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputFileError, match="truncated") as info:
        read_mrc(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputFileError, match="truncated"):
        read_mrc(path, mmap=True)
    assert read_mrc_header(path)["shape"] == [3, 7, 9]  # the header alone is still readable


def test_not_mrc_and_missing_file_errors(tmp_path):
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"hello" * 300)
    with pytest.raises(InputFileError, match="not a readable MRC") as info:
        read_mrc(junk)
    assert str(junk) in str(info.value)
    with pytest.raises(InputFileError, match="file not found"):
        read_mrc(tmp_path / "nothing.mrc")


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2), dtype=np.int64), 1.0)
    with pytest.raises(ValueError, match="positive"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2), dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="2-D"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2, 2), dtype=np.float32), 1.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_mrc(tmp_path / "no" / "x.mrc", np.zeros((2, 2), dtype=np.float32), 1.0)
    assert not (tmp_path / "x.mrc").exists()


def test_overwrite_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "o.mrc"
    write_mrc(path, np.zeros((2, 2), np.float32), 1.0)
    write_mrc(path, np.ones((3, 3), np.float32), 2.0)
    back, voxel_size_A = read_mrc(path)
    assert back.shape == (3, 3) and voxel_size_A == pytest.approx(2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mrc"]


def test_complex64_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((4, 6)) + 1j * rng.standard_normal((4, 6))).astype(np.complex64)
    write_mrc(tmp_path / "c.mrc", data, 1.0)
    back, _ = read_mrc(tmp_path / "c.mrc")
    assert back.dtype == np.complex64 and read_mrc_header(tmp_path / "c.mrc")["mode"] == 4
    np.testing.assert_array_equal(back, data)


def test_non_contiguous_input_is_written_in_logical_order(tmp_path):
    base = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    view = base[:, ::-1, ::2]  # negative and step strides
    write_mrc(tmp_path / "nc.mrc", view, 1.0)
    np.testing.assert_array_equal(read_mrc(tmp_path / "nc.mrc")[0], view)


def test_stack_written_section_by_section_is_the_same_file(tmp_path):
    """mrc_stack_writer (sections in any order, never all in memory) writes the very bytes of write_mrc,
    header statistics included; a section left out or an error leaves no file."""
    rng = np.random.default_rng(5)
    stack = (rng.normal(size=(4, 24, 36)) * 3.0 + 7.0).astype(np.float32)
    with mrc_stack_writer(tmp_path / "streamed.mrc", 4, (24, 36), 2.5) as write:
        for index in (2, 0, 3, 1):
            write(index, torch.from_numpy(stack[index]))
    write_mrc(tmp_path / "whole.mrc", stack, 2.5, stack=True)
    assert (tmp_path / "streamed.mrc").read_bytes() == (tmp_path / "whole.mrc").read_bytes()
    with pytest.raises(ValueError, match=r"sections \[1\] of 4 were not written"):
        with mrc_stack_writer(tmp_path / "partial.mrc", 4, (24, 36), 2.5) as write:
            for index in (0, 2, 3):
                write(index, stack[index])
    with pytest.raises(ValueError, match="does not fit"):
        with mrc_stack_writer(tmp_path / "wrong.mrc", 4, (24, 36), 2.5) as write:
            write(0, stack[0, :20])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.mrc", "whole.mrc"]
