"""MRC images, stacks and volumes (MRC2014), read and written through ``mrcfile``.

Conventions
- Arrays are ``[z, y, x]`` (``[y, x]`` for a single image), row-major, exactly as stored:
  MRC row 0 is the first row in the file (3dmod draws it at the bottom; +y up).
- ``voxel_size_A`` is the x pixel size in Å, ``cella.x / mx`` (0.0 when the header gives none).
- Modes: 0 int8 (or uint8, see below), 1 int16, 2 float32, 4 complex64, 6 uint16, 12 float16.
  Mode 0 is signed bytes in MRC2014 (and RELION) but unsigned in IMOD unless IMOD's header
  stamp says signed. We read mode 0 as uint8 only when the IMOD stamp is present without the
  "signed" flag, else int8; ``write_mrc`` writes uint8 as mode 0 with that IMOD stamp
  (values above 127 read as negative in programs that ignore the stamp, e.g. RELION).
- ``stack=True`` marks a 3-D file as an image stack (space group 0, one section per
  image, MRC2014 / IMOD convention for tilt series and movies); otherwise 3-D data are a
  volume (space group 1).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mrcfile
import mrcfile.utils
import numpy as np

from tomopipe.errors import InputFileError
from tomopipe.io._atomic import atomic_path

IMOD_STAMP = 1146047817  # "IMOD" in the header word at byte 152
IMOD_FLAG_SIGNED_BYTES = 1  # imodFlags bit 0: mode-0 bytes are signed
_IMOD_STAMP_OFFSET = 152
_HEADER_BYTES = 1024

_WRITABLE_DTYPES = {
    np.dtype(np.int8),
    np.dtype(np.uint8),
    np.dtype(np.int16),
    np.dtype(np.uint16),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.complex64),
}


def _to_numpy(data: Any) -> np.ndarray:
    """Accept numpy arrays, torch tensors and array-likes."""
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # torch.Tensor without importing torch
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def _check_extended_header_fits(path: Path) -> None:
    """mrcfile allocates the extended header's stated size (NSYMBT, bytes 93-96, in the byte order
    of the machine stamp) before reading it: refuse a size the file cannot hold."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    try:
        order = mrcfile.utils.byte_order_from_machine_stamp(head[212:216])
    except (ValueError, IndexError):
        return  # too short or no machine stamp: mrcfile says what is wrong
    nsymbt = struct.unpack(order + "i", head[92:96])[0]
    size = path.stat().st_size
    if nsymbt < 0 or 1024 + nsymbt > size:
        raise InputFileError(path, f"not a readable MRC file (extended header of {nsymbt} bytes in a file of "
                                   f"{size} bytes)")


def _open_header(path: Path):
    """Validated header of an MRC file; InputFileError if it is missing or not MRC."""
    if not path.exists():
        raise InputFileError(path, "file not found")
    if not path.is_file():
        raise InputFileError(path, "not a file")
    _check_extended_header_fits(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive=False already raises on real problems
            with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
                return mrc.header.copy(), mrc.extended_header.copy() if mrc.extended_header is not None else None
    except (ValueError, OSError, EOFError, struct.error) as exc:
        raise InputFileError(path, f"not a readable MRC file ({exc})") from exc


def _imod_flags(header) -> int | None:
    """IMOD flags word if the IMOD stamp is present, else None."""
    raw = bytes(header.extra2)[40:48]
    order = header.mode.dtype.byteorder
    fmt = ("<" if (order == "<" or (order == "=" and np.little_endian)) else ">") + "ii"
    stamp, flags = struct.unpack(fmt, raw)
    return flags if stamp == IMOD_STAMP else None


def _layout(path: Path, header) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype in file byte order, shape, data offset) with IMOD's unsigned-byte rule applied."""
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as exc:
        raise InputFileError(path, f"unsupported MRC mode {int(header.mode)} ({exc})") from exc
    if int(header.mode) == 0:
        flags = _imod_flags(header)
        if flags is not None and not flags & IMOD_FLAG_SIGNED_BYTES:
            dtype = np.dtype(np.uint8)
    shape = tuple(int(s) for s in mrcfile.utils.data_shape_from_header(header))
    if any(s <= 0 for s in shape):
        raise InputFileError(path, f"header gives an empty or negative size {shape}")
    offset = _HEADER_BYTES + int(header.nsymbt)
    return dtype, shape, offset


def _voxel_size_xyz(header) -> tuple[float, float, float]:
    cella = header.cella
    sizes = []
    for cell, m in ((cella.x, header.mx), (cella.y, header.my), (cella.z, header.mz)):
        m = int(m)
        size = float(cell) / m if m > 0 else 0.0
        sizes.append(float(f"{size:.7g}"))  # cella is float32: keep its 7 significant digits
    return tuple(sizes)  # type: ignore[return-value]


def _check_size(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> None:
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    file_bytes = path.stat().st_size
    if file_bytes < offset + n_bytes:
        raise InputFileError(
            path,
            f"truncated MRC file: header promises {n_bytes} data bytes after {offset} header bytes "
            f"(shape {list(shape)}, {dtype.name}), but the file has only {file_bytes} bytes",
        )


def read_mrc(path: str | os.PathLike, mmap: bool = False) -> tuple[np.ndarray, float]:
    """Read an MRC file; return ``(array, voxel_size_A)``.

    ``mmap=True`` returns a read-only ``np.memmap`` (nothing is read until used). Otherwise a
    writeable array in native byte order, dtype as stored. Raises InputFileError for a
    missing, non-MRC, truncated or unsupported-mode file.
    """
    path = Path(path)
    header, _ = _open_header(path)
    dtype, shape, offset = _layout(path, header)
    _check_size(path, dtype, shape, offset)
    voxel_size_A = _voxel_size_xyz(header)[0]
    if mmap:
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return data, voxel_size_A
    count = int(np.prod(shape))
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = np.fromfile(fh, dtype=dtype, count=count)
    if data.size != count:  # file changed under us
        raise InputFileError(path, f"truncated MRC file: read {data.size} of {count} values")
    data = data.reshape(shape)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data, voxel_size_A


_STATS_CHUNK = 1 << 22  # values per chunk (32 MB as float64)


def _stats(data: np.ndarray) -> dict[str, float]:
    """min/max/mean/std of all values, in bounded memory (works on memmaps).

    8- and 16-bit integers: exact, from a histogram of the values. Other types: one pass in
    float64 about a shift (the first chunk's mean), so large offsets lose no precision.
    """
    flat = data.reshape(-1)
    n = flat.size
    if np.issubdtype(data.dtype, np.integer) and data.dtype.itemsize <= 2:
        unsigned = np.dtype(f"u{data.dtype.itemsize}")
        hist = np.zeros(1 << (8 * data.dtype.itemsize), dtype=np.int64)
        for start in range(0, n, _STATS_CHUNK):
            chunk = np.ascontiguousarray(flat[start : start + _STATS_CHUNK]).view(unsigned)
            hist += np.bincount(chunk, minlength=hist.size)
        values = np.arange(hist.size, dtype=np.int64)
        if np.issubdtype(data.dtype, np.signedinteger):  # bit pattern -> signed value
            values = values.astype(unsigned).view(data.dtype.newbyteorder("=")).astype(np.int64)
        present = hist > 0
        values, counts = values[present], hist[present]
        mean = float((values * counts).sum()) / n
        var = float((np.square(values - mean) * counts).sum()) / n
        return {"min": float(values.min()), "max": float(values.max()), "mean": mean, "std": float(np.sqrt(var))}
    shift = None
    s1 = s2 = 0.0
    lo, hi = np.inf, -np.inf
    for start in range(0, n, _STATS_CHUNK):
        chunk = np.asarray(flat[start : start + _STATS_CHUNK])
        lo = min(lo, float(chunk.min()))
        hi = max(hi, float(chunk.max()))
        d = chunk.astype(np.float64)
        if shift is None:
            shift = float(d.mean())
        d -= shift
        s1 += float(d.sum())
        s2 += float(np.dot(d, d))
    mean_d = s1 / n
    var = max(s2 / n - mean_d * mean_d, 0.0)
    return {"min": lo, "max": hi, "mean": shift + mean_d, "std": float(np.sqrt(var))}


def read_mrc_header(path: str | os.PathLike, *, compute_stats: bool = False) -> dict[str, Any]:
    """Header summary: shape ``[z, y, x]``, voxel size, mode, dtype, header statistics.

    Keys: ``shape`` (list, 3 entries: nz, ny, nx), ``voxel_size_A`` (x), ``voxel_size_xyz_A``,
    ``mode``, ``dtype``, ``space_group``, ``is_image_stack``, ``header_min/max/mean/rms``
    (as written in the header; rms is the standard deviation in MRC2014), ``origin_A``,
    ``extended_header_bytes``, ``exttyp``, ``labels``. With ``compute_stats=True`` also
    ``min``, ``max``, ``mean``, ``std`` computed from the data (memory-mapped, chunked).
    """
    path = Path(path)
    header, _ = _open_header(path)
    dtype, shape, offset = _layout(path, header)
    labels = []
    for i in range(min(int(header.nlabl), 10)):
        text = bytes(header.label[i]).decode("ascii", errors="replace").strip()
        if text:
            labels.append(text)
    info: dict[str, Any] = {
        "path": str(path),
        "shape": [int(header.nz), int(header.ny), int(header.nx)],
        "voxel_size_A": _voxel_size_xyz(header)[0],
        "voxel_size_xyz_A": list(_voxel_size_xyz(header)),
        "mode": int(header.mode),
        "dtype": np.dtype(dtype).newbyteorder("=").name,
        "space_group": int(header.ispg),
        "is_image_stack": int(header.ispg) == 0,
        "header_min": float(header.dmin),
        "header_max": float(header.dmax),
        "header_mean": float(header.dmean),
        "header_rms": float(header.rms),
        "origin_A": [float(header.origin.x), float(header.origin.y), float(header.origin.z)],
        "extended_header_bytes": int(header.nsymbt),
        "exttyp": bytes(header.exttyp).decode("ascii", errors="replace").strip("\x00 "),
        "labels": labels,
    }
    if compute_stats:
        _check_size(path, dtype, shape, offset)
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        try:
            info.update(_stats(data))
        finally:
            del data
    return info


def _normalise_voxel_size(voxel_size_A: Any) -> tuple[float, float, float]:
    if np.ndim(voxel_size_A) == 0:
        vx = vy = vz = float(voxel_size_A)
    else:
        values = [float(v) for v in voxel_size_A]
        if len(values) != 3:
            raise ValueError(f"voxel_size_A must be one number or (x, y, z), got {voxel_size_A!r}")
        vx, vy, vz = values
    for v in (vx, vy, vz):
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"voxel_size_A must be positive and finite, got {voxel_size_A!r}")
    return vx, vy, vz


def write_mrc(
    path: str | os.PathLike,
    data: Any,
    voxel_size_A: float | tuple[float, float, float],
    *,
    stack: bool = False,
) -> None:
    """Write an image ``[y, x]``, a stack or a volume ``[z, y, x]`` to an MRC file, atomically.

    The dtype is kept for int8, uint8, int16, uint16, float16, float32 and complex64;
    float64 is written as float32. Other dtypes raise ValueError (cast first: integer counts
    do not fit MRC losslessly in general). ``stack=True`` marks a 3-D array as an image stack
    (tilt series, movie); a 2-D array with ``stack=True`` becomes a one-image stack.
    Header statistics (min, max, mean, rms = standard deviation) are set from the data.
    ``voxel_size_A``: one number or (x, y, z), positive.
    """
    _write(path, data, _normalise_voxel_size(voxel_size_A), stack=stack)


def _write(path: str | os.PathLike, data: Any, voxel_size_A: Any, *, stack: bool) -> None:
    """``write_mrc`` that also accepts ``voxel_size_A=None`` (header cell left at 0 = unknown)."""
    array = _to_numpy(data)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype not in _WRITABLE_DTYPES:
        raise ValueError(
            f"{path}: cannot write dtype {array.dtype} to MRC; use one of "
            f"{sorted(d.name for d in _WRITABLE_DTYPES)} (or float64, written as float32)"
        )
    if stack and array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: MRC data must be 2-D [y, x] or 3-D [z, y, x], got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{path}: cannot write an empty array (shape {array.shape})")
    voxel = None if voxel_size_A is None else _normalise_voxel_size(voxel_size_A)
    is_uint8 = array.dtype == np.uint8
    with atomic_path(path) as tmp:
        if array.dtype == np.complex64:  # rare: let mrcfile compute the statistics
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(np.ascontiguousarray(array))
                _finish_header(mrc, array.ndim, stack, voxel)
            return
        # memory-mapped output, filled and measured a few MB at a time: no full-size
        # float64 temporaries (mrcfile's set_data computes its statistics on the whole array)
        stored_dtype = np.dtype(np.int8) if is_uint8 else array.dtype
        mode = int(mrcfile.utils.mode_from_dtype(stored_dtype))
        with mrcfile.new_mmap(tmp, array.shape, mrc_mode=mode, overwrite=True) as mrc:
            target = mrc.data.reshape(-1, array.shape[-1])
            source = array.reshape(-1, array.shape[-1])
            rows = max(1, (1 << 22) // max(1, array.shape[-1]))
            for start in range(0, source.shape[0], rows):
                chunk = source[start : start + rows]
                target[start : start + rows] = chunk.view(np.int8) if is_uint8 else chunk
            stats = _stats(array)
            mrc.header.dmin = stats["min"]
            mrc.header.dmax = stats["max"]
            mrc.header.dmean = stats["mean"]
            mrc.header.rms = stats["std"]
            _finish_header(mrc, array.ndim, stack, voxel)
            byte_order = mrcfile.utils.byte_order_from_machine_stamp(mrc.header.machst)
        if is_uint8:
            with open(tmp, "r+b") as fh:
                fh.seek(_IMOD_STAMP_OFFSET)
                fh.write(struct.pack(byte_order + "ii", IMOD_STAMP, 0))  # stamp, flags: unsigned bytes


@contextmanager
def mrc_stack_writer(path: str | os.PathLike, n_sections: int, image_shape: tuple[int, int],
                     voxel_size_A: float | tuple[float, float, float], dtype: Any = np.float32
                     ) -> Iterator[Callable[[int, Any], None]]:
    """Write an image stack ``[n_sections, y, x]`` one section at a time, atomically: the block gets
    ``write(index, image)``; sections go straight to the file (never all in memory: a tilt series of
    K3 images is gigabytes) and the file appears at ``path`` only when the block ends without error
    with every section written. ``dtype``: float32 or float16. Header statistics as :func:`write_mrc`'s."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"{path}: mrc_stack_writer writes float32 or float16, not {dtype}")
    shape = (int(n_sections), int(image_shape[0]), int(image_shape[1]))
    voxel = _normalise_voxel_size(voxel_size_A)
    section_stats: dict[int, dict[str, float]] = {}
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape, mrc_mode=int(mrcfile.utils.mode_from_dtype(dtype)), overwrite=True) as mrc:
            _finish_header(mrc, 3, True, voxel)
            offset, file_dtype = int(mrc.data.offset), mrc.data.dtype  # the file's byte order
        with open(tmp, "r+b") as fh:
            def write(index: int, image: Any) -> None:
                array = np.ascontiguousarray(_to_numpy(image), dtype=dtype)
                if array.shape != shape[1:] or not 0 <= index < shape[0]:
                    raise ValueError(f"{path}: section {index} of shape {array.shape} does not fit a stack of "
                                     f"{shape}")
                fh.seek(offset + index * array.nbytes)
                fh.write(array.astype(file_dtype, copy=False).tobytes())
                section_stats[index] = _stats(array)

            yield write
        missing = sorted(set(range(shape[0])) - set(section_stats))
        if missing:
            raise ValueError(f"{path}: sections {missing} of {shape[0]} were not written")
        stats = _combined_stats([section_stats[i] for i in range(shape[0])], shape[1] * shape[2])
        with mrcfile.mmap(tmp, mode="r+") as mrc:
            mrc.header.dmin, mrc.header.dmax = stats["min"], stats["max"]
            mrc.header.dmean, mrc.header.rms = stats["mean"], stats["std"]


def _combined_stats(parts: list[dict[str, float]], n_each: int) -> dict[str, float]:
    """min/max/mean/std of equal-sized parts (``n_each`` values each) from the parts' own."""
    means = np.array([p["mean"] for p in parts])
    mean = float(means.mean())
    var = float(np.mean([p["std"] ** 2 + (p["mean"] - mean) ** 2 for p in parts]))
    return {"min": min(p["min"] for p in parts), "max": max(p["max"] for p in parts), "mean": mean,
            "std": float(np.sqrt(var))}


def _finish_header(mrc: Any, ndim: int, stack: bool, voxel: tuple[float, float, float] | None) -> None:
    if stack:
        mrc.set_image_stack()
    elif ndim == 3:
        mrc.set_volume()
    if voxel is not None:
        mrc.voxel_size = voxel
