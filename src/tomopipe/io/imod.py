"""IMOD text and model files: ``.xf``, ``.tlt``/``.rawtlt``/``.xtilt``, exclude lists,
ctfplotter ``.defocus``, ``.mod`` models (through ``imodmodel``) and ``.com`` command files.

Conventions (``notes/conventions.md`` §2): an ``.xf`` line ``A11 A12 A21 A22 DX DY`` maps raw
to aligned image coordinates about the image centre, ``X' = A·(X − c) + D + c'``, shifts in
pixels of the stack that was aligned; line order = stack (view) order. ``.tlt`` holds one
tilt angle (degrees) per view, in stack order: IMOD reads the first number of each line
(later columns, e.g. cets-imod's accumulated dose, are ignored). IMOD view numbers in exclude lists and
``.defocus`` files are 1-based. ``.defocus`` values are in nm, underfocus positive.
This module only reads and writes numbers; geometry lives in ``tomopipe.algorithms.geometry``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tomopipe.errors import InputFileError
from tomopipe.io._atomic import atomic_path, write_text_atomic
from tomopipe.io.mrc import _to_numpy

XF_FORMAT = "%12.7f%12.7f%12.7f%12.7f%12.3f%12.3f"
_XF_FIELD_WIDTH = 12


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise InputFileError(path, "file not found")
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc})") from exc


# ----------------------------------------------------------------------------- .xf


def _parse_xf_line(path: Path, number: int, line: str) -> list[float]:
    fields = line.split()
    if len(fields) != 6:
        # IMOD writes fixed-width fields that can touch when a value fills its width
        text = line.rstrip("\n")
        if len(text.rstrip()) == 6 * _XF_FIELD_WIDTH or len(fields) < 6:
            fields = [text[i : i + _XF_FIELD_WIDTH] for i in range(0, 6 * _XF_FIELD_WIDTH, _XF_FIELD_WIDTH)]
    try:
        values = [float(f) for f in fields]
    except ValueError as exc:
        raise InputFileError(path, f"line {number}: expected 6 numbers (A11 A12 A21 A22 DX DY), "
                                   f"got {line.strip()!r}") from exc
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise InputFileError(path, f"line {number}: expected 6 finite numbers (A11 A12 A21 A22 DX DY), "
                                   f"got {line.strip()!r}")
    return values


def read_xf(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an IMOD ``.xf``: ``(A [n, 2, 2], shifts_px [n, 2])`` as float64, one row per view."""
    path = Path(path)
    rows = [
        _parse_xf_line(path, i + 1, line)
        for i, line in enumerate(_read_lines(path))
        if line.strip()
    ]
    if not rows:
        raise InputFileError(path, "no transforms in .xf file")
    values = np.asarray(rows, dtype=np.float64)
    matrices = values[:, :4].reshape(-1, 2, 2)  # [[A11, A12], [A21, A22]]
    return matrices, values[:, 4:6].copy()


def format_xf(A: Any, shifts_px: Any) -> str:
    """Text of an ``.xf`` file in IMOD's exact format (``%12.7f`` x4, ``%12.3f`` x2 per line)."""
    matrices = np.asarray(_to_numpy(A), dtype=np.float64)
    shifts = np.asarray(_to_numpy(shifts_px), dtype=np.float64)
    if matrices.ndim != 3 or matrices.shape[1:] != (2, 2):
        raise ValueError(f"A must have shape [n, 2, 2], got {matrices.shape}")
    if shifts.shape != (matrices.shape[0], 2):
        raise ValueError(f"shifts_px must have shape [{matrices.shape[0]}, 2], got {shifts.shape}")
    if not (np.all(np.isfinite(matrices)) and np.all(np.isfinite(shifts))):
        raise ValueError("A and shifts_px must be finite")
    lines = [
        XF_FORMAT % (m[0, 0], m[0, 1], m[1, 0], m[1, 1], s[0], s[1])
        for m, s in zip(matrices, shifts)
    ]
    return "\n".join(lines) + "\n"


def write_xf(path: str | os.PathLike, A: Any, shifts_px: Any) -> None:
    """Write an IMOD ``.xf`` atomically from ``A [n, 2, 2]`` and ``shifts_px [n, 2]``."""
    write_text_atomic(path, format_xf(A, shifts_px))


# ----------------------------------------------------------------------------- .tlt


def _tlt_fields(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, numbers as text)`` of each non-blank line; commas separate like spaces
    (Fortran list-directed input)."""
    return [(i + 1, fields) for i, line in enumerate(_read_lines(path))
            if (fields := [f for f in re.split(r"[,\s]+", line.strip()) if f])]


def _tlt_number(path: Path, number: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise InputFileError(path, f"line {number}: expected a number, got {text!r}") from exc
    if not math.isfinite(value):
        raise InputFileError(path, f"line {number}: value is not finite ({text!r})")
    return value


def read_tlt(path: str | os.PathLike) -> np.ndarray:
    """Read ``.tlt``, ``.rawtlt`` or ``.xtilt`` as IMOD does: the first number of each non-blank
    line is the angle (degrees) of one view, in view order; what follows it on the line is
    ignored (cets-imod writes the accumulated dose there, optionally the acquisition order
    after it: :func:`read_tlt_columns` returns every column)."""
    path = Path(path)
    values = [_tlt_number(path, number, fields[0]) for number, fields in _tlt_fields(path)]
    if not values:
        raise InputFileError(path, "no angles in file")
    return np.asarray(values, dtype=np.float64)


def read_tlt_columns(path: str | os.PathLike) -> np.ndarray:
    """Every column of a ``.tlt`` file, ``[n_views, n_columns]`` float64: column 0 the angle
    (degrees, as :func:`read_tlt`), further columns as written (cets-imod: accumulated dose in
    e/Å², then acquisition order). Every line must have the same number of columns."""
    path = Path(path)
    rows = _tlt_fields(path)
    if not rows:
        raise InputFileError(path, "no angles in file")
    width = len(rows[0][1])
    for number, fields in rows:
        if len(fields) != width:
            raise InputFileError(path, f"line {number}: {len(fields)} columns, but line {rows[0][0]} has {width}")
    return np.asarray([[_tlt_number(path, number, f) for f in fields] for number, fields in rows], dtype=np.float64)


def format_tlt(angles_deg: Any, decimals: int = 2) -> str:
    """One angle per line, right-aligned like IMOD (``%7.2f`` for ``decimals=2``)."""
    angles = np.asarray(_to_numpy(angles_deg), dtype=np.float64).reshape(-1)
    if angles.size == 0:
        raise ValueError("no angles to write")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles must be finite")
    width = 5 + decimals
    return "".join(f"{a:{width}.{decimals}f}\n" for a in angles)


def write_tlt(path: str | os.PathLike, angles_deg: Any, *, decimals: int = 2) -> None:
    """Write ``.tlt``/``.rawtlt``/``.xtilt`` atomically (IMOD writes 2 decimals)."""
    write_text_atomic(path, format_tlt(angles_deg, decimals))


# ----------------------------------------------------------------------------- exclude lists


def read_exclude_list(text: str) -> list[int]:
    """Parse an IMOD view list (``"1-3,7"``, commas or spaces) into sorted 1-based views."""
    views: set[int] = set()
    for token in re.split(r"[,\s]+", str(text).strip()):
        if not token:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if not match:
            raise ValueError(f"invalid IMOD view list entry {token!r} in {text!r} (use e.g. '1-3,7')")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else start
        if start < 1 or end < start:
            raise ValueError(f"invalid IMOD view range {token!r} in {text!r}: views are 1-based, start <= end")
        views.update(range(start, end + 1))
    return sorted(views)


def format_exclude_list(views: Iterable[int]) -> str:
    """Format 1-based views as an IMOD list with ranges: ``[1, 2, 3, 7] -> "1-3,7"``."""
    numbers = sorted({int(v) for v in views})
    if numbers and numbers[0] < 1:
        raise ValueError(f"IMOD views are 1-based, got {numbers[0]}")
    parts = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ",".join(parts)


# ----------------------------------------------------------------------------- .defocus

DEFOCUS_FLAG_ASTIGMATISM = 1
DEFOCUS_FLAG_ASTIG_RADIANS = 2
DEFOCUS_FLAG_PHASE = 4
DEFOCUS_FLAG_PHASE_RADIANS = 8
DEFOCUS_FLAG_INVERTED = 16
DEFOCUS_FLAG_CUT_ON = 32

_DEFOCUS_COLUMNS = ["start_view", "end_view", "tilt1_deg", "tilt2_deg", "defocus1_nm"]


def read_defocus(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ctfplotter/ctfphaseflip ``.defocus`` file.

    Version 2: ``start end tilt1 tilt2 defocus_nm``, the first line with a 6th value ``2``.
    Version 3: a first line ``flags 0 0. 0. 0 3``, then ``start end tilt1 tilt2 defocus1_nm
    [defocus2_nm astig_angle] [phase_shift] [cut_on]`` with the optional columns present as
    the flags say (1 astigmatism, 4 phase shift, 32 cut-on; 2/8: those angles in radians;
    16: tilt angles inverted). A 5-value first line is the old version 1. Returns one row
    per line with 1-based views; ``df.attrs`` holds ``version`` and ``flags``. Angles are
    converted to degrees (``astigmatism_angle_deg``, ``phase_shift_deg``).
    """
    path = Path(path)
    rows = [line.split() for line in _read_lines(path) if line.strip()]
    if not rows:
        raise InputFileError(path, "empty .defocus file")
    try:
        numbers = [[float(v) for v in row] for row in rows]
    except ValueError as exc:
        raise InputFileError(path, f"non-numeric value in .defocus file ({exc})") from exc
    if not all(math.isfinite(v) for row in numbers for v in row):
        raise InputFileError(path, "non-finite value (nan or inf) in .defocus file")
    first = numbers[0]
    flags = 0
    if len(first) == 6 and int(first[5]) >= 3:
        version = int(first[5])
        flags = int(first[0])
        data = numbers[1:]
    elif len(first) == 6:
        version = int(first[5])
        data = [first[:5]] + numbers[1:]
    elif len(first) == 5:
        version = 1
        data = numbers
    else:
        raise InputFileError(path, f"first line has {len(first)} values; expected 5 or 6")
    columns = list(_DEFOCUS_COLUMNS)
    if flags & DEFOCUS_FLAG_ASTIGMATISM:
        columns += ["defocus2_nm", "astigmatism_angle_deg"]
    if flags & DEFOCUS_FLAG_PHASE:
        columns.append("phase_shift_deg")
    if flags & DEFOCUS_FLAG_CUT_ON:
        columns.append("cut_on_frequency")
    for i, row in enumerate(data):
        if len(row) != len(columns):
            raise InputFileError(
                path, f"data line {i + 1} has {len(row)} values; flags {flags} need {len(columns)} "
                f"({' '.join(columns)})"
            )
    df = pd.DataFrame(data, columns=columns)
    for column in ("start_view", "end_view"):
        df[column] = df[column].astype(int)
    if (df["start_view"] < 1).any() or (df["end_view"] < df["start_view"]).any():
        raise InputFileError(path, "view numbers must be 1-based with start <= end")
    if flags & DEFOCUS_FLAG_ASTIG_RADIANS:
        df["astigmatism_angle_deg"] = np.degrees(df["astigmatism_angle_deg"])
    if flags & DEFOCUS_FLAG_PHASE_RADIANS:
        df["phase_shift_deg"] = np.degrees(df["phase_shift_deg"])
    df.attrs["version"] = version
    df.attrs["flags"] = flags & ~(DEFOCUS_FLAG_ASTIG_RADIANS | DEFOCUS_FLAG_PHASE_RADIANS)
    return df


def format_defocus(df: pd.DataFrame, *, inverted: bool = False) -> str:
    """Text of a ``.defocus`` file: version 2 when only ``defocus1_nm`` is given, else
    version 3 with flags for the optional columns present (angles in degrees)."""
    for column in _DEFOCUS_COLUMNS:
        if column not in df.columns:
            raise ValueError(f".defocus table lacks column {column}")
    if len(df) == 0:
        raise ValueError("no rows to write")
    has_astig = "defocus2_nm" in df.columns or "astigmatism_angle_deg" in df.columns
    if has_astig and not ("defocus2_nm" in df.columns and "astigmatism_angle_deg" in df.columns):
        raise ValueError("astigmatism needs both defocus2_nm and astigmatism_angle_deg")
    has_phase = "phase_shift_deg" in df.columns
    has_cut_on = "cut_on_frequency" in df.columns
    flags = (
        (DEFOCUS_FLAG_ASTIGMATISM if has_astig else 0)
        | (DEFOCUS_FLAG_PHASE if has_phase else 0)
        | (DEFOCUS_FLAG_CUT_ON if has_cut_on else 0)
        | (DEFOCUS_FLAG_INVERTED if inverted else 0)
    )
    lines = []
    for i, row in enumerate(df.itertuples(index=False)):
        r = row._asdict()
        start, end = int(r["start_view"]), int(r["end_view"])
        if start < 1 or end < start:
            raise ValueError(f"row {i}: views must be 1-based with start <= end, got {start} {end}")
        fields = [f"{start:d}", f"{end:d}", f"{r['tilt1_deg']:.2f}", f"{r['tilt2_deg']:.2f}", f"{r['defocus1_nm']:.1f}"]
        if has_astig:
            fields += [f"{r['defocus2_nm']:.1f}", f"{r['astigmatism_angle_deg']:.2f}"]
        if has_phase:
            fields.append(f"{r['phase_shift_deg']:.2f}")
        if has_cut_on:
            fields.append(f"{r['cut_on_frequency']:.4f}")
        lines.append("\t".join(fields))
    if flags == 0:
        lines[0] += "\t2"  # version 2: plain defocus, version on the first line
        return "\n".join(lines) + "\n"
    return "\n".join([f"{flags}\t0\t0.\t0.\t0\t3"] + lines) + "\n"


def write_defocus(path: str | os.PathLike, df: pd.DataFrame, *, inverted: bool = False) -> None:
    """Write a ctfplotter ``.defocus`` file atomically (see :func:`format_defocus`)."""
    write_text_atomic(path, format_defocus(df, inverted=inverted))


# ----------------------------------------------------------------------------- .mod


# IMOD's binary model layout (IMOD binspec): "IMOD" "V1.2", a 232-byte model header, then chunks
# named by 4 ASCII bytes up to "IEOF". OBJT, CONT and MESH have no byte count: a 176-byte object
# header; a 16-byte contour header (psize first) and psize points of 3 floats; a 16-byte mesh
# header (vsize, lsize first), vsize vertices of 3 floats and lsize indices. Every other chunk is
# a big-endian byte count and that many bytes; imodmodel reads the ones below with a fixed size.
_MODEL_START_BYTES = 8 + 232
_MODEL_FIXED_CHUNKS = {b"IMAT": 16, b"MINX": 72, b"SLAN": 60}
_MODEL_STORAGE_CHUNKS = (b"MOST", b"OBST", b"COST", b"MEST")  # 12-byte entries


def _model_chunk_bytes(data: bytes, offset: int, name: bytes, last_psize: int | None) -> int:
    """Bytes that follow the id of chunk ``name`` (the id ends at ``offset``); ValueError says what
    is inconsistent."""
    def count(at: int, signed: bool = True) -> int:
        if at + 4 > len(data):
            raise ValueError("cut off")
        value = int.from_bytes(data[at:at + 4], "big", signed=signed)
        if value < 0:
            raise ValueError(f"negative count {value}")
        return value

    if name == b"OBJT":
        return 176
    if name == b"CONT":
        return 16 + 12 * count(offset)
    if name == b"MESH":
        return 16 + 12 * count(offset) + 4 * count(offset + 4)
    size = count(offset, signed=False)
    expected = _MODEL_FIXED_CHUNKS.get(name)
    if name == b"SIZE":
        if last_psize is None:
            raise ValueError("point sizes before any contour")
        expected = 4 * last_psize
    if expected is not None and size != expected:
        raise ValueError(f"byte count {size}, expected {expected}")
    if name in _MODEL_STORAGE_CHUNKS and size % 12:
        raise ValueError(f"byte count {size} is not a multiple of 12")
    return 4 + size


def _check_model_chunks(path: Path, data: bytes) -> None:
    """Walk the chunks of an IMOD model (layout above) as imodmodel will, checking every count
    against the bytes left: imodmodel itself loops forever once it reads past the end."""
    if data[:4] != b"IMOD" or len(data) < _MODEL_START_BYTES:
        raise InputFileError(path, "not an IMOD binary model (no IMOD id, or shorter than its header)")
    offset, last_psize = _MODEL_START_BYTES, None
    while (name := data[offset:offset + 4]) != b"IEOF":
        if len(name) < 4:
            raise InputFileError(path, f"damaged IMOD model: ends at byte {len(data)} without IEOF")
        if not (name.isascii() and name.isalnum()):
            raise InputFileError(path, f"damaged IMOD model: no chunk id at byte {offset} ({name!r})")
        try:
            size = _model_chunk_bytes(data, offset + 4, name, last_psize)
            if offset + 4 + size > len(data):
                raise ValueError(f"needs {size} bytes, {len(data) - offset - 4} left")
        except ValueError as exc:
            raise InputFileError(path, f"damaged IMOD model: chunk {name.decode()} at byte {offset}: {exc}") from None
        if name == b"CONT":
            last_psize = (size - 16) // 12
        offset += 4 + size


def _read_model(path: Path):
    """The ``imodmodel.ImodModel`` of ``path``, its chunk structure checked first."""
    from imodmodel.models import ImodModel

    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc})") from exc
    _check_model_chunks(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImodModel.from_file(path)
    except Exception as exc:  # imodmodel raises struct/pydantic/value/index errors on bad files
        raise InputFileError(path, f"not a readable IMOD model ({type(exc).__name__}: {exc})") from exc


def read_imod_model(path: str | os.PathLike) -> pd.DataFrame:
    """Points of an IMOD model: DataFrame ``object``, ``contour`` (0-based, as stored,
    empty objects/contours keep their numbers), ``x``, ``y``, ``z`` (IMOD model coordinates:
    image pixels, z = section)."""
    model = _read_model(Path(path))
    frames = []
    for object_index, obj in enumerate(model.objects):
        for contour_index, contour in enumerate(obj.contours):
            points = np.asarray(contour.points, dtype=np.float64).reshape(-1, 3)
            if len(points):
                frames.append(
                    pd.DataFrame(
                        {
                            "object": object_index,
                            "contour": contour_index,
                            "x": points[:, 0],
                            "y": points[:, 1],
                            "z": points[:, 2],
                        }
                    )
                )
    if not frames:
        return pd.DataFrame({"object": pd.Series(dtype=int), "contour": pd.Series(dtype=int),
                             "x": pd.Series(dtype=float), "y": pd.Series(dtype=float), "z": pd.Series(dtype=float)})
    return pd.concat(frames, ignore_index=True)


def imod_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """Counts and header of an IMOD model: objects (including empty), contours, points."""
    model = _read_model(Path(path))
    return {
        "n_objects": len(model.objects),
        "n_contours": int(sum(len(o.contours) for o in model.objects)),
        "n_points": int(sum(len(c.points) for o in model.objects for c in o.contours)),
        "contours_per_object": [len(o.contours) for o in model.objects],
        "image_size_xyz": [int(model.header.xmax), int(model.header.ymax), int(model.header.zmax)],
        "pixel_size": float(model.header.pixelsize),
        "units": int(model.header.units),
    }


def write_imod_model(
    path: str | os.PathLike,
    points: pd.DataFrame,
    *,
    image_size_xyz: Sequence[int] | None = None,
    contour_type: str = "scattered",
) -> None:
    """Write points (columns ``x, y, z`` and optional ``object``, ``contour``, 0-based) as an
    IMOD model, atomically. Missing object/contour numbers are written as empty ones, so
    :func:`read_imod_model` returns the same numbering. ``contour_type``: scattered, open
    or closed. ``image_size_xyz`` sets the model's image size (IMOD needs it to display)."""
    from imodmodel.models import Contour, ImodModel, Object

    for column in ("x", "y", "z"):
        if column not in points.columns:
            raise ValueError(f"{path}: points need columns x, y, z (missing {column})")
    if contour_type not in ("scattered", "open", "closed"):
        raise ValueError(f"{path}: contour_type must be scattered, open or closed, got {contour_type!r}")
    df = points.copy()
    for column in ("object", "contour"):
        if column not in df.columns:
            df[column] = 0
        if (df[column] < 0).any():
            raise ValueError(f"{path}: {column} numbers must be >= 0")
    coords = df[["x", "y", "z"]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(coords)):
        raise ValueError(f"{path}: point coordinates must be finite")

    model = ImodModel()
    n_objects = int(df["object"].max()) + 1 if len(df) else 1
    for object_index in range(n_objects):
        obj = Object()
        in_object = df[df["object"] == object_index]
        n_contours = int(in_object["contour"].max()) + 1 if len(in_object) else 0
        for contour_index in range(n_contours):
            sel = in_object[in_object["contour"] == contour_index]
            obj.contours.append(Contour(points=sel[["x", "y", "z"]].to_numpy(dtype=np.float32).reshape(-1, 3)))
        obj.header.flags.scattered = contour_type == "scattered"
        obj.header.flags.open = contour_type == "open"
        obj.update_sizes()
        model.objects.append(obj)
    model.update_sizes()
    if image_size_xyz is not None:
        model.header.xmax, model.header.ymax, model.header.zmax = (int(v) for v in image_size_xyz)
    elif len(df):
        upper = np.ceil(coords.max(axis=0)).astype(int) + 1
        model.header.xmax, model.header.ymax, model.header.zmax = (int(max(v, 1)) for v in upper)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # imodmodel's pydantic deprecation warning
            model.to_file(tmp)


# ----------------------------------------------------------------------------- .com

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_POSITIONAL_WITH_FILES = {"tilt": 2}  # old-format tilt: input and output file lines, then keywords


def _parse_com_value(text: str) -> Any:
    text = text.strip()
    if not text:
        return True  # a flag (e.g. PERPENDICULAR)
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    if tokens and all(_NUMBER.match(t) for t in tokens):
        numbers = [int(t) if re.fullmatch(r"[-+]?\d+", t) else float(t) for t in tokens]
        return numbers[0] if len(numbers) == 1 else numbers
    return text


def _add_keyword(keywords: dict[str, Any], key: str, value: Any) -> None:
    if key in keywords:  # repeated PIP options: keep every occurrence, in order
        existing = keywords[key]
        if isinstance(existing, _Repeated):
            existing.append(value)
        else:
            keywords[key] = _Repeated([existing, value])
    else:
        keywords[key] = value


class _Repeated(list):
    """Values of a keyword given on several lines."""


def read_com(path: str | os.PathLike) -> dict[str, Any]:
    """Read an IMOD ``.com`` command file (PIP ``-StandardInput`` or old positional format).

    Returns ``{"program", "format", "keywords", "positional", "commands"}`` for the first
    command (``$tilt``, ``$tiltalign`` ...); ``commands`` lists every ``$`` command the same
    way. ``keywords`` maps each keyword to its value: numbers become int/float (lists when
    several, commas or spaces), text stays text, a bare flag is True, a keyword repeated on
    several lines gives a list of its values. Old positional ``tilt`` files: the input and
    output file lines become ``InputProjections`` / ``OutputFile``; keywords end at DONE.
    """
    path = Path(path)
    commands: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for number, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("$"):
            parts = line[1:].split()
            if not parts:
                continue
            program = parts[0]
            args = parts[1:]
            pip = any(a.lower() == "-standardinput" for a in args)
            current = {
                "program": program,
                "args": args,
                "format": "pip" if pip else "positional",
                "keywords": {},
                "positional": [],
                "_done": False,
            }
            commands.append(current)
            continue
        if current is None:
            raise InputFileError(path, f"line {number}: entry before any $command line: {line!r}")
        if current["format"] == "pip":
            parts = re.split(r"\s+", line, maxsplit=1)
            _add_keyword(current["keywords"], parts[0], _parse_com_value(parts[1] if len(parts) > 1 else ""))
            continue
        # positional (old) format
        if current["_done"]:
            current["positional"].append(line)
            continue
        n_files = _POSITIONAL_WITH_FILES.get(current["program"].lower())
        if n_files is not None:
            if len(current["positional"]) < n_files:
                current["positional"].append(line)
                continue
            if line.upper() == "DONE":
                current["_done"] = True
                continue
            parts = re.split(r"\s+", line, maxsplit=1)
            _add_keyword(current["keywords"], parts[0], _parse_com_value(parts[1] if len(parts) > 1 else ""))
        else:
            current["positional"].append(line)
    if not commands:
        raise InputFileError(path, "no $command lines: not an IMOD command file")
    out_commands = []
    for command in commands:
        command.pop("_done")
        keywords = {k: (list(v) if isinstance(v, _Repeated) else v) for k, v in command["keywords"].items()}
        command["keywords"] = keywords
        if (command["program"].lower() == "tilt" and command["format"] == "positional"
                and len(command["positional"]) >= 2):
            keywords.setdefault("InputProjections", command["positional"][0])
            keywords.setdefault("OutputFile", command["positional"][1])
        out_commands.append(command)
    first = out_commands[0]
    return {
        "program": first["program"],
        "format": first["format"],
        "keywords": first["keywords"],
        "positional": first["positional"],
        "commands": out_commands,
    }
