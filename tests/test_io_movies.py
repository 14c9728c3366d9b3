"""Movies and gains: the TIFF Y-flip rule (write -> read identity, TIFF == MRC), LZW, header-only
movie_info, gain flips in the documented order, EER decoding of a hand-made EER file with
known electron positions, and clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile

from tomopipe.errors import InputFileError
from tomopipe.io import movies
from tomopipe.io.movies import movie_info, read_gain, read_movie, write_movie
from tomopipe.io.mrc import read_mrc_header, write_mrc


def _counts(shape=(4, 16, 12), lam=2.0, seed=0):
    return np.random.default_rng(seed).poisson(lam, shape).astype(np.int64)


def test_tiff_and_mrc_round_trip_to_the_same_array(tmp_path):
    frames = _counts()
    write_movie(tmp_path / "m.tif", frames)
    write_movie(tmp_path / "m.mrc", frames, pixel_size_A=0.83)
    from_tiff = read_movie(tmp_path / "m.tif")
    from_mrc = read_movie(tmp_path / "m.mrc")
    np.testing.assert_array_equal(from_tiff, frames)
    np.testing.assert_array_equal(from_mrc, frames)
    assert from_tiff.dtype == np.uint8 and from_mrc.dtype == np.int8
    assert read_mrc_header(tmp_path / "m.mrc")["voxel_size_A"] == pytest.approx(0.83)
    assert read_mrc_header(tmp_path / "m.mrc")["is_image_stack"]


def test_tiff_file_holds_rows_flipped_and_lzw(tmp_path):
    frames = _counts(shape=(3, 10, 7))
    write_movie(tmp_path / "m.tiff", frames)
    with tifffile.TiffFile(tmp_path / "m.tiff") as tif:
        assert len(tif.pages) == 3
        assert all(int(p.compression) == 5 for p in tif.pages)  # LZW
        raw = np.stack([p.asarray() for p in tif.pages])
    np.testing.assert_array_equal(raw, frames[:, ::-1, :])


def test_foreign_tiff_is_flipped_on_read(tmp_path):
    raw = np.arange(2 * 5 * 4, dtype=np.uint16).reshape(2, 5, 4)
    tifffile.imwrite(tmp_path / "serialem.tif", raw, photometric="minisblack")
    np.testing.assert_array_equal(read_movie(tmp_path / "serialem.tif"), raw[:, ::-1, :])


def test_dtype_choice_by_count_range(tmp_path):
    big = _counts(shape=(2, 4, 4)) + 300
    write_movie(tmp_path / "b.tif", big)
    write_movie(tmp_path / "b.mrc", big)
    assert read_movie(tmp_path / "b.tif").dtype == np.uint16
    assert read_movie(tmp_path / "b.mrc").dtype == np.int16
    np.testing.assert_array_equal(read_movie(tmp_path / "b.mrc"), big)
    huge = np.full((1, 2, 2), 70000, dtype=np.int64)
    write_movie(tmp_path / "h.mrc", huge)
    assert read_movie(tmp_path / "h.mrc").dtype == np.float32
    np.testing.assert_array_equal(read_movie(tmp_path / "h.mrc"), huge)
    with pytest.raises(ValueError, match="uint16"):
        write_movie(tmp_path / "h.tif", huge)


def test_movie_info_reads_headers_only(tmp_path, monkeypatch):
    frames = _counts(shape=(5, 9, 11))
    write_movie(tmp_path / "m.tif", frames)
    write_movie(tmp_path / "m.mrc", frames)

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    assert movie_info(tmp_path / "m.tif") == (5, 9, 11, np.dtype(np.uint8))
    # an MRC whose data block is cut off still has a readable header
    path = tmp_path / "m.mrc"
    path.write_bytes(path.read_bytes()[:1024 + 10])
    assert movie_info(path) == (5, 9, 11, np.dtype(np.int8))
    with pytest.raises(InputFileError, match="truncated"):
        read_movie(path)


def test_write_movie_rejects_non_counts(tmp_path):
    with pytest.raises(ValueError, match="integer counts"):
        write_movie(tmp_path / "f.tif", np.ones((2, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        write_movie(tmp_path / "f.tif", -np.ones((2, 3, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="extension"):
        write_movie(tmp_path / "f.png", np.ones((2, 3, 3), dtype=np.int32))
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(InputFileError) as info:
        read_movie(bad)
    assert str(bad) in str(info.value)
    (tmp_path / "x.avi").write_bytes(b"x")
    with pytest.raises(InputFileError, match="unsupported movie format"):
        read_movie(tmp_path / "x.avi")
    with pytest.raises(InputFileError, match="file not found"):
        read_movie(tmp_path / "missing.tif")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((4, 4, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputFileError, match="grey-scale"):
        read_movie(rgb)


# ----------------------------------------------------------------------------- gain


def test_gain_orientation_rules_and_flip_order(tmp_path):
    gain = (np.arange(3 * 4, dtype=np.float32).reshape(3, 4) + 1.0) / 10.0
    write_mrc(tmp_path / "g.mrc", gain, 1.0)
    tifffile.imwrite(tmp_path / "g.tif", gain)
    tifffile.imwrite(tmp_path / "g.gain", gain)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.mrc"), gain)
    np.testing.assert_array_equal(read_gain(tmp_path / "g.tif"), gain[::-1])  # TIFF rule
    np.testing.assert_array_equal(read_gain(tmp_path / "g.gain"), gain)  # EER .gain: file order
    out = read_gain(tmp_path / "g.mrc", flip_x=True, flip_y=True, transpose=True)
    # transpose first (shape 4x3), then reverse columns, then reverse rows
    np.testing.assert_array_equal(out, gain.T[:, ::-1][::-1, :])
    assert out.shape == (4, 3) and out.dtype == np.float32
    # element check: after transpose, [i, j] = gain[j, i]; flips map [i, j] -> [3 - i, 2 - j]
    assert out[0, 0] == gain[2, 3]
    np.testing.assert_array_equal(read_gain(tmp_path / "g.mrc", flip_x=True), gain[:, ::-1])
    np.testing.assert_array_equal(read_gain(tmp_path / "g.mrc", flip_y=True), gain[::-1])


def test_gain_errors(tmp_path):
    write_mrc(tmp_path / "two.mrc", np.ones((2, 3, 3), np.float32), 1.0)
    with pytest.raises(InputFileError, match="one image"):
        read_gain(tmp_path / "two.mrc")
    bad = np.ones((3, 3), np.float32)
    bad[1, 1] = np.nan
    write_mrc(tmp_path / "nan.mrc", bad, 1.0)
    with pytest.raises(InputFileError, match="NaN"):
        read_gain(tmp_path / "nan.mrc")
    (tmp_path / "g.dm4").write_bytes(b"\x00" * 10)
    with pytest.raises(InputFileError, match="dm2mrc"):
        read_gain(tmp_path / "g.dm4")


# ----------------------------------------------------------------------------- EER


def _encode_eer_v1(positions: np.ndarray, n_pixels: int, symbols=None) -> bytes:
    """Thermo Fisher EER 7-bit run-length code (compression 65001), written here from the
    format description in RELION's renderEER.cpp: runs of 7 bits (127 = keep going), then 4
    sub-pixel bits XOR 0x0A per electron, bits packed LSB first."""
    bits: list[int] = []

    def put(value: int, n: int) -> None:
        bits.extend((value >> i) & 1 for i in range(n))

    current = 0
    for k, p in enumerate(positions):
        gap = int(p) - current
        while gap >= 127:
            put(127, 7)
            gap -= 127
        put(gap, 7)
        put((0 if symbols is None else int(symbols[k])) ^ 0x0A, 4)
        current = int(p) + 1
    rest = n_pixels - current
    while rest >= 127:
        put(127, 7)
        rest -= 127
    if rest:
        put(rest, 7)
    bits.extend([0] * (-len(bits) % 8))
    packed = np.packbits(np.array(bits, np.uint8).reshape(-1, 8)[:, ::-1])
    return packed.tobytes()


def _write_eer(path, frames_positions, ny, nx, symbols=None):
    """A BigTIFF with EER metadata; strips are EER code (written uncompressed, then the
    Compression tag is set to 65001 because no EER encoder exists in tifffile)."""
    meta = b'<metadata><item name="sensorPixelSize.height">1e-10</item></metadata>'
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, positions in enumerate(frames_positions):
            code = _encode_eer_v1(positions, ny * nx, None if symbols is None else symbols[k])
            assert len(code) <= ny * nx
            strip = np.zeros(ny * nx, np.uint8)
            strip[: len(code)] = np.frombuffer(code, np.uint8)
            tif.write(strip.reshape(ny, nx), photometric="minisblack", rowsperstrip=ny,
                      extratags=[(65001, 7, len(meta), meta, True)], metadata=None)
    with tifffile.TiffFile(path) as tif:
        offsets = [page.tags[259].valueoffset for page in tif.pages]
    with open(path, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write(struct.pack("<H", 65001))


@pytest.fixture()
def eer_movie(tmp_path):
    ny, nx, n_frames = 32, 48, 7
    rng = np.random.default_rng(5)
    positions = [np.sort(rng.choice(ny * nx, 30, replace=False)) for _ in range(n_frames)]
    path = tmp_path / "movie.eer"
    _write_eer(path, positions, ny, nx)
    expected = np.zeros((n_frames, ny * nx), np.uint16)
    for k, p in enumerate(positions):
        expected[k, p] = 1
    return path, expected.reshape(n_frames, ny, nx), positions


def test_eer_frames_decode_to_known_electrons_in_file_order(eer_movie):
    path, expected, _ = eer_movie
    assert movies.eer_supported()
    frames = read_movie(path)
    assert frames.dtype == np.uint16
    np.testing.assert_array_equal(frames, expected)  # no Y flip for EER
    assert movie_info(path) == (7, 32, 48, np.dtype(np.uint16))


def test_eer_grouping_sums_frames_and_last_group_takes_remainder(eer_movie):
    path, expected, _ = eer_movie
    grouped = read_movie(path, eer_frames_per_group=3)  # 7 frames -> groups [0:3], [3:7]
    assert grouped.shape == (2, 32, 48)
    np.testing.assert_array_equal(grouped[0], expected[0:3].sum(0))
    np.testing.assert_array_equal(grouped[1], expected[3:7].sum(0))
    assert int(grouped.sum()) == 7 * 30
    assert movie_info(path, eer_frames_per_group=3)[0] == 2
    with pytest.raises(InputFileError, match="larger than the number of EER frames"):
        read_movie(path, eer_frames_per_group=8)


def test_eer_super_resolution_places_subpixels(tmp_path):
    ny, nx = 16, 16
    position = np.array([5 * nx + 7])  # row 5, column 7
    symbol = np.array([0b1001])  # x sub-pixel bits 01, y sub-pixel bits 10
    _write_eer(tmp_path / "s.eer", [position], ny, nx, symbols=[symbol])
    frame = read_movie(tmp_path / "s.eer", eer_upsampling=2)[0]
    assert frame.shape == (32, 32) and frame.sum() == 1
    # 8K: x = 2*col + bit1 of x sub-pixel, y = 2*row + bit1 of y sub-pixel (RELION render8K)
    assert frame[2 * 5 + 1, 2 * 7 + 0] == 1
    assert movie_info(tmp_path / "s.eer", eer_upsampling=2)[1:3] == (32, 32)
    with pytest.raises(ValueError, match="eer_upsampling"):
        read_movie(tmp_path / "s.eer", eer_upsampling=4)


def test_eer_without_codec_gives_clear_error(eer_movie, monkeypatch):
    path, _, _ = eer_movie
    monkeypatch.setattr(movies, "eer_supported", lambda: False)
    with pytest.raises(InputFileError, match="cannot decode EER") as info:
        read_movie(path)
    assert str(path) in str(info.value)
