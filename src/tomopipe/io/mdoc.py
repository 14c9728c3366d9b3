"""SerialEM ``.mdoc`` metadata: read (through ``mdocfile``) and write.

Reading returns an :class:`MdocTiltSeries`: header values in our units, the title lines, and
one DataFrame row per ``[ZValue = n]`` section with snake_case columns; the columns of the
keys named below are always there (NaN, None or NaT where the mdoc lacks the key: older
SerialEM versions and other writers leave many keys out). Units follow
SerialEM: ``tilt_angle_deg`` (°), ``exposure_dose_e_per_A2`` (e/Å², 0 when not measured),
``exposure_time_s`` (s), ``dose_rate`` (e per unbinned camera pixel per second),
``defocus_um`` / ``target_defocus_um`` (µm, SerialEM sign: negative = underfocus),
``stage_x/y/z`` (µm), ``pixel_spacing_A`` (Å), ``rotation_angle_deg`` (°, from image +X to
the tilt axis, CCW), ``prior_record_dose`` (e/Å²). Fields we do not know are kept as
columns named in snake_case with their text value.

The tilt-axis angle exists only in a title line (``[T = Tilt axis angle = 85.3, binning =
4 ...]``): angle from image +Y to the tilt axis, CCW positive (IMOD convention; see
``notes/conventions.md`` §1). ``None`` when no title states it.

Kinds of mdoc (``MdocTiltSeries.kind``):
- ``"tilt_series"``: ``[ZValue]`` sections, one per tilt image (the normal case).
- ``"frame_set"``: a per-exposure frame mdoc (only ``[FrameSet = n]`` sections), written
  by SerialEM next to a movie. Read as what it is: ``frame_sets`` holds its rows,
  ``sections`` is empty.
- ``"frame_tilt_series"``: a ``[FrameSet]`` movie split into ``[ZValue]`` sub-exposures by
  ``FrameTSStartEndFrames`` (frame-based tilt / dose series). ``sections`` holds the
  sub-exposures, ``frame_sets`` the movie.
``read_mdoc(path, require_tilt_series=True)`` refuses the two frame kinds with a clear
message: their sections are not separate tilt images with their own movies. Montage mdocs
(``Montage = 1``, ``[MontSection]``, ``PieceCoordinates``) are always refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from mdocfile.data_models import Mdoc

from tomopipe.errors import InputFileError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.model.acquisition import parse_serialem_datetime

_SECTION_HEADER = re.compile(r"^\[\s*(ZValue|FrameSet|MontSection)\s*=\s*([^\]]*)\]\s*$")
_TITLE = re.compile(r"^\[\s*T\s*=(.*)\]\s*$")
_BARE_TITLE = re.compile(r"^T\s*=(.*)$")
_TILT_AXIS = re.compile(r"tilt\s*axis\s*angle\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)
_TITLE_BINNING = re.compile(r"binning\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+))", re.IGNORECASE)
SERIALEM_DATE_FORMAT = "%d-%b-%y  %H:%M:%S"

# SerialEM key -> our column name (units in the module docstring); other keys: snake_case.
_COLUMN_NAMES = {
    "ZValue": "z_value",
    "FrameSet": "frame_set",
    "TiltAngle": "tilt_angle_deg",
    "StageZ": "stage_z",
    "Magnification": "magnification",
    "PixelSpacing": "pixel_spacing_A",
    "ExposureDose": "exposure_dose_e_per_A2",
    "DoseRate": "dose_rate",
    "Defocus": "defocus_um",
    "TargetDefocus": "target_defocus_um",
    "RotationAngle": "rotation_angle_deg",
    "ExposureTime": "exposure_time_s",
    "Binning": "binning",
    "PriorRecordDose": "prior_record_dose",
    "NumSubFrames": "num_sub_frames",
    "FrameDosesAndNumber": "frame_doses_and_number",
    "FrameDosesAndNumbers": "frame_doses_and_number",
    "DateTime": "date_time_text",
    "SubFramePath": "sub_frame_path",
    "Voltage": "voltage_kV",
}

def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return s.lower()


def column_name(serialem_key: str) -> str:
    """Our column name for a SerialEM section key (e.g. ``TiltAngle`` -> ``tilt_angle_deg``)."""
    return _COLUMN_NAMES.get(serialem_key, _snake(serialem_key))


@dataclass
class MdocTiltSeries:
    """A parsed mdoc. ``sections``: one row per ``[ZValue]`` section in file order."""

    path: Path
    kind: str
    pixel_size_A: float | None
    voltage_kV: float | None
    tilt_axis_angle_deg: float | None
    magnification: float | None
    binning: float | None
    image_size: tuple[int, int] | None  # (x, y) pixels
    titles: list[str]
    global_fields: dict[str, str]
    sections: pd.DataFrame
    frame_sets: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def n_sections(self) -> int:
        return len(self.sections)

    @property
    def tilt_angles_deg(self) -> list[float]:
        return [float(a) for a in self.sections["tilt_angle_deg"]] if len(self.sections) else []

    @property
    def unbinned_pixel_size_A(self) -> float | None:
        """Camera pixel size before binning (``pixel_size_A / binning``), for DoseRate."""
        if self.pixel_size_A is None:
            return None
        if self.binning and self.binning > 0:
            return self.pixel_size_A / self.binning
        return self.pixel_size_A


def parse_mdoc_datetime(text: Any) -> pd.Timestamp:
    """SerialEM ``DateTime`` (``30-Nov-15  15:21:38``) -> Timestamp; NaT when absent/unparseable."""
    return parse_serialem_datetime(text)


def movie_name_from_path(sub_frame_path: Any) -> str | None:
    """Basename of a SubFramePath written on Windows (``D:\\a\\b.tif``) or POSIX (``/a/b.tif``)."""
    if sub_frame_path is None or (isinstance(sub_frame_path, float) and math.isnan(sub_frame_path)):
        return None
    text = str(sub_frame_path).strip()
    if not text:
        return None
    if "\\" in text or re.match(r"^[A-Za-z]:", text):
        return PureWindowsPath(text).name
    return PurePosixPath(text).name


def _raw_sections(lines: list[str]) -> tuple[list[str], list[tuple[str, str, dict[str, str]]]]:
    """Header lines, and (kind, id, {key: raw value}) per section, split like mdocfile does."""
    header: list[str] = []
    sections: list[tuple[str, str, dict[str, str]]] = []
    for line in lines:
        match = _SECTION_HEADER.match(line)
        if match:
            sections.append((match.group(1), match.group(2).strip(), {}))
            continue
        if not sections:
            header.append(line)
            continue
        if "=" in line and not line.startswith("["):
            key, value = line.split("=", 1)
            sections[-1][2][key.strip()] = value.strip()
    return header, sections


def _normalise_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc})") from exc
    lines = [line.strip() for line in text.splitlines()]  # CRLF, CR and LF
    out = []
    in_header = True
    for line in lines:
        if _SECTION_HEADER.match(line):
            in_header = False
        bare = _BARE_TITLE.match(line) if in_header else None
        # SerialEM frame mdocs start with an unbracketed "T = SerialEM: ..." title line
        out.append(f"[T = {bare.group(1).strip()}]" if bare else line)
    return out


def _title_text(line: str) -> str:
    match = _TITLE.match(line)
    return match.group(1).strip() if match else line.strip()


def _typed_value(value: Any) -> Any:
    if isinstance(value, (PureWindowsPath, PurePosixPath, Path)):
        return str(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _section_rows(
    path: Path,
    typed_sections: list[Any],
    raw_sections: list[tuple[str, str, dict[str, str]]],
) -> list[dict[str, Any]]:
    rows = []
    for typed, (kind, ident, raw) in zip(typed_sections, raw_sections):
        row: dict[str, Any] = {}
        values = typed.model_dump()
        for key, raw_value in raw.items():
            attr = "FrameDosesAndNumbers" if key == "FrameDosesAndNumber" else key
            value = values.get(attr, raw_value)
            row[column_name(key)] = _typed_value(value if value is not None else raw_value)
        if kind == "ZValue":
            try:
                row["z_value"] = int(ident)
            except ValueError as exc:
                raise InputFileError(path, f"section [ZValue = {ident}] has a non-integer ZValue") from exc
        else:
            row["frame_set" if kind == "FrameSet" else "mont_section"] = ident
        if "stage_position" in row:
            xy = row.pop("stage_position")
            row["stage_x"], row["stage_y"] = (float(xy[0]), float(xy[1])) if xy is not None else (np.nan, np.nan)
        if "sub_frame_path" in row:
            row["sub_frame_path"] = raw["SubFramePath"]  # raw text (mdocfile rewrites separators)
            row["movie_name"] = movie_name_from_path(raw["SubFramePath"])
        if "frame_doses_and_number" in row and row["frame_doses_and_number"] is not None:
            row["frame_doses_and_number"] = [(float(d), int(n)) for d, n in row["frame_doses_and_number"]]
        if "date_time_text" in row:
            row["date_time"] = parse_mdoc_datetime(row["date_time_text"])
        rows.append(row)
    return rows


_FIRST_COLUMNS = [
    "z_value",
    "tilt_angle_deg",
    "date_time",
    "exposure_dose_e_per_A2",
    "exposure_time_s",
    "dose_rate",
    "num_sub_frames",
    "frame_doses_and_number",
    "prior_record_dose",
    "sub_frame_path",
    "movie_name",
    "target_defocus_um",
    "defocus_um",
    "stage_x",
    "stage_y",
    "stage_z",
    "magnification",
    "pixel_spacing_A",
    "rotation_angle_deg",
    "binning",
]


_TEXT_COLUMNS = ("sub_frame_path", "movie_name", "frame_doses_and_number")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Sections as a DataFrame; every column of ``_FIRST_COLUMNS`` but ``z_value`` exists, missing
    values being NaN (numbers), None (text, lists) or NaT (``date_time``)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for column in _FIRST_COLUMNS:
        if column != "z_value" and column not in df.columns:
            df[column] = None if column in _TEXT_COLUMNS else np.nan
    first = [c for c in _FIRST_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in first]
    df = df[first + rest]
    if "date_time" in df.columns:
        df["date_time"] = pd.to_datetime(df["date_time"])
    return df.reset_index(drop=True)


def _first_number(frames: Sequence[pd.DataFrame], column: str) -> float | None:
    """First finite number in ``column`` of the first frame that has one."""
    for df in frames:
        if column in df.columns:
            values = pd.to_numeric(df[column], errors="coerce").dropna()
            if len(values):
                return float(values.iloc[0])
    return None


def _validation_message(exc: ValueError) -> str:
    """mdocfile raises pydantic ValidationErrors (ValueError subclasses with ``.errors()``)."""
    if not hasattr(exc, "errors"):
        return str(exc)
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')} (value {err.get('input')!r})")
    return "; ".join(parts)


def read_mdoc(path: str | os.PathLike, *, require_tilt_series: bool = False) -> MdocTiltSeries:
    """Read a SerialEM mdoc. See the module docstring for kinds, units and refusals.

    Raises InputFileError (naming the file) for missing/unparseable files, montage mdocs,
    tilt-series sections without ``TiltAngle``, duplicate ZValues, and (with
    ``require_tilt_series=True``) frame mdocs.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    lines = _normalise_lines(path)
    header_lines, raw_sections = _raw_sections(lines)
    if not raw_sections:
        raise InputFileError(path, "no [ZValue] or [FrameSet] sections: not a SerialEM mdoc")
    mdocfile_logger = logging.getLogger("mdocfile")
    previous_level = mdocfile_logger.level
    mdocfile_logger.setLevel(logging.ERROR)  # it warns about every unknown field
    try:
        mdoc = Mdoc.from_lines(lines)
    except ValueError as exc:
        if hasattr(exc, "errors"):
            raise InputFileError(path, f"invalid mdoc value: {_validation_message(exc)}") from exc
        raise InputFileError(path, f"cannot parse mdoc ({exc})") from exc
    except (TypeError, IndexError) as exc:
        raise InputFileError(path, f"cannot parse mdoc ({exc})") from exc
    finally:
        mdocfile_logger.setLevel(previous_level)
    if len(mdoc.section_data) != len(raw_sections):  # both split on the same headers
        raise InputFileError(path, "inconsistent section structure")

    global_fields: dict[str, str] = {}
    for line in header_lines:
        if "=" in line and not line.startswith("["):
            key, value = line.split("=", 1)
            global_fields[key.strip()] = value.strip()
    titles = [_title_text(t) for t in mdoc.titles]

    kinds = {kind for kind, _, _ in raw_sections}
    is_montage = (
        "MontSection" in kinds
        or str(global_fields.get("Montage", "0")).strip() not in ("0", "", "false", "False")
        or any("PieceCoordinates" in raw for _, _, raw in raw_sections)
    )
    if is_montage:
        raise InputFileError(
            path, "montage mdoc (Montage = 1 / PieceCoordinates sections): a montage, not a tilt series"
        )

    rows = _section_rows(path, mdoc.section_data, raw_sections)
    z_rows = [r for r, (kind, _, _) in zip(rows, raw_sections) if kind == "ZValue"]
    frame_rows = [r for r, (kind, _, _) in zip(rows, raw_sections) if kind == "FrameSet"]
    sections = _frame(z_rows)
    frame_sets = _frame(frame_rows)
    if frame_rows:
        kind = "frame_tilt_series" if z_rows else "frame_set"
    else:
        kind = "tilt_series"

    if require_tilt_series and kind != "tilt_series":
        what = (
            "a per-exposure frame mdoc (one [FrameSet] section for one movie)"
            if kind == "frame_set"
            else "a frame mdoc whose [ZValue] sections are frame ranges (FrameTSStartEndFrames) of one movie"
        )
        raise InputFileError(path, f"{what}, not a tilt-series mdoc with one section per tilt image")

    if z_rows:
        z_values = sections["z_value"].tolist()
        if len(set(z_values)) != len(z_values):
            dupes = sorted({z for z in z_values if z_values.count(z) > 1})
            raise InputFileError(path, f"duplicate ZValue sections {dupes}")
        if "tilt_angle_deg" not in sections.columns or sections["tilt_angle_deg"].isna().any():
            missing = (
                z_values
                if "tilt_angle_deg" not in sections.columns
                else sections.loc[sections["tilt_angle_deg"].isna(), "z_value"].tolist()
            )
            raise InputFileError(path, f"no TiltAngle in section(s) ZValue = {missing[:10]}")
    elif frame_rows and frame_sets["tilt_angle_deg"].isna().any():
        raise InputFileError(path, "no TiltAngle in the [FrameSet] section")

    data_rows = (sections, frame_sets)  # per-section values; frame mdocs hold them in [FrameSet]
    pixel_size_A = _float_or_none(global_fields.get("PixelSpacing"))
    if pixel_size_A is None:
        pixel_size_A = _first_number(data_rows, "pixel_spacing_A")
    voltage_kV = _float_or_none(global_fields.get("Voltage"))
    if voltage_kV is None:
        voltage_kV = _first_number(data_rows, "voltage_kV")
    tilt_axis = None
    title_binning = None
    for title in titles:
        match = _TILT_AXIS.search(title)
        if match and tilt_axis is None:
            tilt_axis = float(match.group(1))
            binning_match = _TITLE_BINNING.search(title)
            if binning_match:
                title_binning = float(binning_match.group(1))
    binning = _first_number(data_rows, "binning")
    if binning is None:
        binning = title_binning
    image_size = None
    if mdoc.global_data.ImageSize is not None:
        image_size = (int(mdoc.global_data.ImageSize[0]), int(mdoc.global_data.ImageSize[1]))

    return MdocTiltSeries(
        path=path,
        kind=kind,
        pixel_size_A=pixel_size_A,
        voltage_kV=voltage_kV,
        tilt_axis_angle_deg=tilt_axis,
        magnification=_first_number(data_rows, "magnification"),
        binning=binning,
        image_size=image_size,
        titles=titles,
        global_fields=global_fields,
        sections=sections,
        frame_sets=frame_sets,
    )


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive(value: Any) -> float | None:
    number = _float_or_none(value) if not isinstance(value, (list, tuple)) else None
    return number if number is not None and number > 0 else None


def dose_per_tilt_e_per_A2(section: Mapping[str, Any] | pd.Series, pixel_size_A: float | None) -> float | None:
    """Dose of one tilt image in e/Å².

    Rule: ``ExposureDose`` if > 0; else the sum of dose x frames in ``FrameDosesAndNumber``
    if > 0; else ``DoseRate`` (e per unbinned camera pixel per second) x ``ExposureTime`` /
    ``pixel_size_A``² where ``pixel_size_A`` is the unbinned camera pixel size in Å; else None.
    """
    get = section.get
    dose = _positive(get("exposure_dose_e_per_A2"))
    if dose is not None:
        return dose
    frames = get("frame_doses_and_number")
    if isinstance(frames, (list, tuple)) and frames:
        total = float(sum(float(d) * int(n) for d, n in frames))
        if total > 0:
            return total
    rate = _positive(get("dose_rate"))
    time_s = _positive(get("exposure_time_s"))
    if rate is not None and time_s is not None and pixel_size_A is not None and pixel_size_A > 0:
        return rate * time_s / (pixel_size_A * pixel_size_A)
    return None


# ----------------------------------------------------------------------------- writing


def _format_scalar(key: str, value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            raise ValueError(f"mdoc value for {key} is infinite")
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return np.format_float_positional(value, trim="-")
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.strftime(SERIALEM_DATE_FORMAT)
    if isinstance(value, (Path, PureWindowsPath, PurePosixPath)):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"cannot write mdoc value for {key}: {value!r} ({type(value).__name__})")


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            out.extend(_flatten(item))
        return out
    return [value]


def format_mdoc_value(key: str, value: Any) -> str:
    """Text of one ``Key = value`` entry: floats compact, lists space-separated, bools 1/0,
    datetimes in SerialEM's ``30-Nov-15  15:21:38`` form."""
    if isinstance(value, (list, tuple, np.ndarray)):
        text = " ".join(_format_scalar(key, v) for v in _flatten(value))
    else:
        text = _format_scalar(key, value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"mdoc value for {key} contains a line break")
    return text


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key):
        raise ValueError(f"invalid mdoc key {key!r}: use SerialEM names like 'TiltAngle'")
    return key


def write_mdoc(
    path: str | os.PathLike,
    global_fields: Mapping[str, Any],
    titles: Sequence[str],
    sections: Sequence[Mapping[str, Any]],
) -> None:
    """Write a SerialEM-style tilt-series mdoc atomically.

    Layout: ``Key = value`` global lines (e.g. PixelSpacing, Voltage, ImageFile, ImageSize,
    DataMode), then one ``[T = ...]`` line per title (a title already in ``[T = ...]`` form is
    kept), then one ``[ZValue = i]`` block per dict, i = 0, 1, ... in list order, with
    ``Key = value`` lines. A ``ZValue`` key in a section dict must equal its index. ``None``
    values are skipped. The file reads back with :func:`read_mdoc` and plain ``mdocfile.read``.
    """
    lines: list[str] = []
    for key, value in global_fields.items():
        _check_key(key)
        if value is None:
            continue
        text = format_mdoc_value(key, value)
        if "=" in text:
            raise ValueError(f"global mdoc value for {key} contains '=' (SerialEM readers split on it)")
        lines.append(f"{key} = {text}")
    lines.append("")
    for title in titles:
        title = str(title).strip()
        if "\n" in title or "\r" in title:
            raise ValueError("mdoc title contains a line break")
        lines.append(title if _TITLE.match(title) else f"[T = {title}]")
        lines.append("")
    for index, section in enumerate(sections):
        if "ZValue" in section and int(section["ZValue"]) != index:
            raise ValueError(f"section {index} has ZValue = {section['ZValue']}; sections are written in list order")
        lines.append(f"[ZValue = {index}]")
        for key, value in section.items():
            if key == "ZValue" or value is None:
                continue
            _check_key(key)
            lines.append(f"{key} = {format_mdoc_value(key, value)}")
        lines.append("")
    write_text_atomic(path, "\n".join(lines) + "\n")
