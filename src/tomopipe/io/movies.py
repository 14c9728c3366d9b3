"""Movie frames and gain references: TIFF (``.tif/.tiff``), MRC (``.mrc/.mrcs``) and EER.

ORIENTATION RULE (the one place where it is applied)
- Arrays are ``[frame, y, x]`` in MRC row order: row 0 is the first row of an MRC file and
  is drawn at the bottom by 3dmod (+y up). SerialEM's mdoc states the tilt axis of the frames
  as stored; for TIFF movies the axis of these arrays is therefore 180° − the mdoc's angle
  (the importer applies it: ``tomopipe.model.acquisition.mdoc_axis_for_movies``).
- TIFF movies are flipped along Y (row order reversed) on read, as IMOD, RELION ("TIFF images
  are flipped along the slow axis when being read into memory or written to a file", RELION
  docs, Conventions) and MotionCor2 do. ``write_movie`` applies the same flip when it writes
  TIFF, so ``read_movie(write_movie(frames))`` is the identity and a TIFF and an MRC written
  from the same frames read back as the same array.
- TIFF gain references (``.tif/.tiff``, SerialEM/DigitalMicrograph style) follow the same
  Y flip, so a TIFF gain lines up with TIFF movies from the same camera. MRC gains are read
  as stored.
- EER movies (``.eer``) and Thermo Fisher ``.gain`` files are read in file row order, without
  the flip: RELION's EER renderer places electrons at row ``position >> 12`` of the file, and
  its EER gain loader explicitly reverts its TIFF reader's Y flip for ``.gain`` files
  (relion ``src/renderEER.cpp``, ``src/renderEER.h`` ``loadEERGain``). An EER movie and its
  ``.gain`` file therefore line up with each other and with RELION.
- ``read_gain`` options are applied after reading, in this order: transpose first (swap
  y and x), then ``flip_x`` (reverse columns), then ``flip_y`` (reverse rows).

EER frames are electron events at 4096² (``eer_upsampling=1``; 2 and 3 give 8K and 16K
super-resolution as in RELION); ``eer_frames_per_group`` sums consecutive EER frames into
one output frame, RELION style: ``n // group`` output frames, the last one also takes the
remaining ``n % group`` EER frames. Decoding needs ``imagecodecs`` with EER support.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tomopipe.errors import InputFileError
from tomopipe.io import mrc as _mrc
from tomopipe.io._atomic import atomic_path
from tomopipe.io.mrc import _to_numpy, read_mrc, read_mrc_header

TIFF_SUFFIXES = (".tif", ".tiff")
MRC_SUFFIXES = (".mrc", ".mrcs", ".st")
EER_SUFFIXES = (".eer",)
GAIN_SUFFIXES = (".mrc", ".tif", ".tiff", ".gain")
EER_COMPRESSIONS = (65000, 65001, 65002)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputFileError(path, "file not found")
    if not path.is_file():
        raise InputFileError(path, "not a file")


def eer_supported() -> bool:
    """True when the installed imagecodecs can decode EER frames."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(imagecodecs, "EER", None) and imagecodecs.EER.available)


def _open_tiff(path: Path, superres: int = 0) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path, superres=superres) if superres else tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, f"not a readable TIFF file ({exc})") from exc


def _check_uniform_pages(path: Path, tif: tifffile.TiffFile) -> tuple[int, int, int, np.dtype]:
    pages = tif.pages
    n = len(pages)
    if n == 0:
        raise InputFileError(path, "TIFF file has no images")
    first = pages.first
    if first.samplesperpixel != 1 or len(first.shape) != 2:
        raise InputFileError(path, f"expected grey-scale frames, found page shape {first.shape}")
    ny, nx = first.shape
    return n, ny, nx, np.dtype(first.dtype)


def _decode_page(path: Path, page: Any, index: int) -> np.ndarray:
    try:
        frame = page.asarray()
    except (ValueError, KeyError, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
        compression = getattr(page, "compression", "?")
        hint = ""
        if "imagecodecs" in str(exc) or "not implemented" in str(exc).lower():
            hint = " (compressed TIFF frames need the 'imagecodecs' package)"
        raise InputFileError(
            path, f"cannot decode frame {index} (TIFF compression {compression!s}): {exc}{hint}"
        ) from exc
    return frame


def _is_eer(path: Path, tif: tifffile.TiffFile) -> bool:
    if len(tif.pages) == 0:
        raise InputFileError(path, "TIFF file has no images")
    return _suffix(path) in EER_SUFFIXES or int(tif.pages.first.compression) in EER_COMPRESSIONS


def _eer_superres(path: Path, eer_upsampling: int) -> int:
    if eer_upsampling not in (1, 2, 3):
        raise ValueError(f"{path}: eer_upsampling must be 1 (4K), 2 (8K) or 3 (16K), got {eer_upsampling}")
    return eer_upsampling - 1


def _eer_groups(path: Path, n_frames: int, eer_frames_per_group: int | None) -> list[range]:
    group = 1 if eer_frames_per_group is None else int(eer_frames_per_group)
    if group < 1:
        raise ValueError(f"{path}: eer_frames_per_group must be >= 1, got {eer_frames_per_group}")
    if group > n_frames:
        raise InputFileError(
            path, f"eer_frames_per_group={group} is larger than the number of EER frames ({n_frames})"
        )
    n_groups = n_frames // group
    starts = [i * group for i in range(n_groups)]
    ends = starts[1:] + [n_frames]  # the last group takes the remainder (RELION)
    return [range(s, e) for s, e in zip(starts, ends)]


def _require_eer_codec(path: Path) -> None:
    if not eer_supported():
        raise InputFileError(
            path,
            "EER movie, but the installed imagecodecs cannot decode EER "
            "(install imagecodecs >= 2021.x with EER support)",
        )


def _read_eer(path: Path, eer_upsampling: int, eer_frames_per_group: int | None) -> np.ndarray:
    _require_eer_codec(path)
    with _open_tiff(path, superres=_eer_superres(path, eer_upsampling)) as tif:
        n, ny, nx, _ = _check_uniform_pages(path, tif)
        groups = _eer_groups(path, n, eer_frames_per_group)
        out = np.zeros((len(groups), ny, nx), dtype=np.uint16)
        for g, frames in enumerate(groups):
            for i in frames:
                frame = _decode_page(path, tif.pages[i], i)
                if frame.shape != (ny, nx):
                    raise InputFileError(path, f"EER frame {i} has shape {frame.shape}, frame 0 has {(ny, nx)}")
                out[g] += frame
    return out  # file row order (see module docstring)


def _read_tiff(path: Path) -> np.ndarray:
    with _open_tiff(path) as tif:
        if _is_eer(path, tif):
            raise InputFileError(path, "this TIFF holds EER-compressed frames: name it .eer to read it as EER")
        n, ny, nx, dtype = _check_uniform_pages(path, tif)
        out = np.empty((n, ny, nx), dtype=dtype)
        for i, page in enumerate(tif.pages):
            frame = _decode_page(path, page, i)
            if frame.shape != (ny, nx):
                raise InputFileError(path, f"frame {i} has shape {frame.shape}, frame 0 has {(ny, nx)}")
            out[i] = frame[::-1]  # TIFF Y-flip rule
    return out


def read_movie(
    path: str | os.PathLike,
    *,
    eer_upsampling: int = 1,
    eer_frames_per_group: int | None = None,
) -> np.ndarray:
    """Read all frames of a movie as ``[frames, y, x]`` in the stored dtype (EER: uint16 counts).

    TIFF frames are Y-flipped on read (see the module docstring); MRC and EER frames are
    returned in file row order. Raises InputFileError for missing, unreadable or
    unsupported files.
    """
    path = Path(path)
    _check_exists(path)
    suffix = _suffix(path)
    if suffix in MRC_SUFFIXES:
        data, _ = read_mrc(path)
        return data[np.newaxis] if data.ndim == 2 else data
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path)
    if suffix in EER_SUFFIXES:
        return _read_eer(path, eer_upsampling, eer_frames_per_group)
    raise InputFileError(path, f"unsupported movie format '{path.suffix}' (use .tif, .tiff, .mrc, .mrcs or .eer)")


def movie_info(
    path: str | os.PathLike,
    *,
    eer_upsampling: int = 1,
    eer_frames_per_group: int | None = None,
) -> tuple[int, int, int, np.dtype]:
    """``(n_frames, ny, nx, dtype)`` of a movie as ``read_movie`` would return it, from headers
    only (no pixel data decoded). For EER, ``n_frames`` counts output frames after grouping."""
    path = Path(path)
    _check_exists(path)
    suffix = _suffix(path)
    if suffix in MRC_SUFFIXES:
        header = read_mrc_header(path)
        nz, ny, nx = header["shape"]
        return nz, ny, nx, np.dtype(header["dtype"])
    if suffix in TIFF_SUFFIXES:
        with _open_tiff(path) as tif:
            if _is_eer(path, tif):
                raise InputFileError(path, "this TIFF holds EER-compressed frames: name it .eer to read it as EER")
            n, ny, nx, dtype = _check_uniform_pages(path, tif)
        return n, ny, nx, dtype
    if suffix in EER_SUFFIXES:
        superres = _eer_superres(path, eer_upsampling)
        with _open_tiff(path) as tif:
            n, ny, nx, _ = _check_uniform_pages(path, tif)
        groups = _eer_groups(path, n, eer_frames_per_group)
        return len(groups), ny << superres, nx << superres, np.dtype(np.uint16)
    raise InputFileError(path, f"unsupported movie format '{path.suffix}' (use .tif, .tiff, .mrc, .mrcs or .eer)")


def _integer_counts(path: Path, frames: Any) -> np.ndarray:
    array = _to_numpy(frames)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"{path}: movie frames must be [frames, y, x], got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{path}: cannot write an empty movie (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{path}: movie frames must be integer counts, got dtype {array.dtype} (round and cast first)")
    if array.dtype != np.bool_ and array.min() < 0:
        raise ValueError(f"{path}: movie frames must be non-negative counts, found {array.min()}")
    return array


def write_movie(path: str | os.PathLike, frames: Any, *, pixel_size_A: float | None = None) -> None:
    """Write integer counts ``[frames, y, x]`` as a movie, atomically, chosen by extension.

    ``.tif/.tiff``: one LZW-compressed page per frame, uint8 when all counts <= 255 else
    uint16 (larger counts raise), rows flipped along Y (the TIFF rule; ``read_movie`` undoes
    it). ``.mrc/.mrcs``: an MRC image stack, int8 (mode 0) when counts <= 127 (no signed /
    unsigned ambiguity), else int16, uint16, or float32 (exact up to 2^24); ``pixel_size_A``
    goes into the MRC header (0 = unknown when not given).
    """
    path = Path(path)
    counts = _integer_counts(path, frames)
    max_count = int(counts.max())
    suffix = _suffix(path)
    if suffix in TIFF_SUFFIXES:
        if max_count <= 255:
            dtype = np.uint8
        elif max_count <= 65535:
            dtype = np.uint16
        else:
            raise ValueError(f"{path}: counts up to {max_count} do not fit a uint16 TIFF movie")
        with atomic_path(path) as tmp:
            with tifffile.TiffWriter(tmp) as tif:
                for frame in counts:
                    tif.write(
                        np.ascontiguousarray(frame[::-1], dtype=dtype),
                        compression="lzw",
                        photometric="minisblack",
                        metadata=None,
                    )
        return
    if suffix in (".mrc", ".mrcs"):
        if max_count <= 127:
            dtype = np.int8
        elif max_count <= 32767:
            dtype = np.int16
        elif max_count <= 65535:
            dtype = np.uint16
        elif max_count <= 2**24:
            dtype = np.float32
        else:
            raise ValueError(f"{path}: counts up to {max_count} cannot be stored exactly in MRC")
        _mrc._write(path, counts.astype(dtype), pixel_size_A, stack=True)
        return
    raise ValueError(f"{path}: unsupported movie extension '{path.suffix}' (use .tif, .tiff, .mrc or .mrcs)")


def _read_tiff_first_page(path: Path) -> np.ndarray:
    with _open_tiff(path) as tif:
        _check_uniform_pages(path, tif)
        return _decode_page(path, tif.pages.first, 0)


def read_gain(
    path: str | os.PathLike,
    flip_x: bool = False,
    flip_y: bool = False,
    transpose: bool = False,
) -> np.ndarray:
    """Read a gain reference as float32 ``[y, x]``.

    MRC: the single image as stored. TIFF (``.tif/.tiff``): first page, Y-flipped (the TIFF
    rule). Thermo Fisher ``.gain`` (TIFF container, EER): first page in file order. Then
    ``transpose`` (first), ``flip_x``, ``flip_y`` (last) as given by the user. Raises
    InputFileError for unsupported formats, multi-image MRC files and non-finite values.
    """
    path = Path(path)
    _check_exists(path)
    suffix = _suffix(path)
    if suffix in (".mrc", ".mrcs"):
        data, _ = read_mrc(path)
        if data.ndim == 3:
            if data.shape[0] != 1:
                raise InputFileError(path, f"a gain reference must be one image, found {data.shape[0]} sections")
            data = data[0]
        gain = np.asarray(data, dtype=np.float32)
    elif suffix in TIFF_SUFFIXES:
        gain = _read_tiff_first_page(path)[::-1].astype(np.float32)
    elif suffix == ".gain":
        gain = _read_tiff_first_page(path).astype(np.float32)
    elif suffix in (".dm4", ".dm3"):
        raise InputFileError(path, "DigitalMicrograph gain files are not supported: "
                                   "convert it with IMOD 'dm2mrc' first")
    else:
        raise InputFileError(path, f"unsupported gain format '{path.suffix}' (use .mrc, .tif, .tiff or .gain)")
    if not np.all(np.isfinite(gain)):
        raise InputFileError(path, "gain reference contains NaN or infinite values")
    if transpose:
        gain = gain.T
    if flip_x:
        gain = gain[:, ::-1]
    if flip_y:
        gain = gain[::-1, :]
    return np.ascontiguousarray(gain, dtype=np.float32)
