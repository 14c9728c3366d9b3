"""``inspect_file``: a JSON-serialisable summary of any file tomopipe reads, and
``format_inspect``: the same for humans.

The type is chosen by extension, else by content (MRC map id, TIFF magic, mdoc sections,
STAR ``data_`` blocks, Warp ``<TiltSeries>``). Keys carry units (``pixel_size_A``,
``tilt_angles_deg``, ``dose_per_tilt_e_per_A2`` ...). For an mdoc tilt series the
acquisition order comes from DateTime when every section has one, else section order;
``accumulated_dose_e_per_A2`` is the dose received before each tilt (pre-exposure,
RELION ``rlnMicrographPreExposure``), ``null`` when the mdoc does not give the dose.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tomopipe.errors import InputFileError
from tomopipe.io import aretomo, imod, mdoc, movies, mrc, star, warp
from tomopipe.model.acquisition import acquisition_order_and_pre_exposure

MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".ali", ".rec", ".map", ".preali")
TLT_SUFFIXES = (".tlt", ".rawtlt", ".xtilt")


def _jsonable(value: Any) -> Any:
    """Numpy/pandas scalars and containers -> plain Python; NaN/NaT -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, (Path, np.dtype)):
        return str(value)
    return value


def _inspect_mdoc(path: Path) -> dict[str, Any]:
    doc = mdoc.read_mdoc(path)
    out: dict[str, Any] = {
        "file_type": "mdoc",
        "mdoc_kind": doc.kind,
        "pixel_size_A": doc.pixel_size_A,
        "voltage_kV": doc.voltage_kV,
        "tilt_axis_angle_deg": doc.tilt_axis_angle_deg,
        "magnification": doc.magnification,
        "binning": doc.binning,
        "image_size_xy": list(doc.image_size) if doc.image_size else None,
        "titles": doc.titles,
    }
    rows = doc.sections if len(doc.sections) else doc.frame_sets
    if doc.kind == "frame_set":
        out["n_frame_sets"] = len(doc.frame_sets)
    out["n_tilts"] = len(rows)
    unbinned = doc.unbinned_pixel_size_A
    doses = [mdoc.dose_per_tilt_e_per_A2(row, unbinned) for _, row in rows.iterrows()]
    angles = [float(a) for a in rows["tilt_angle_deg"]] if "tilt_angle_deg" in rows else []
    times = list(rows["date_time"]) if "date_time" in rows else None
    has_times = times is not None and len(times) > 0 and not any(pd.isna(t) for t in times)
    out["tilt_angles_deg"] = angles
    out["dose_per_tilt_e_per_A2"] = doses
    if angles:
        known = all(d is not None for d in doses)
        order, pre = acquisition_order_and_pre_exposure(angles, times if has_times else None, doses if known else 0.0)
        out["acquisition_order"] = order.tolist()
        out["acquisition_order_from"] = "DateTime" if has_times else "section order"
        out["pre_exposure_e_per_A2"] = pre.tolist() if known else None
        out["accumulated_dose_e_per_A2"] = (pre + np.asarray(doses, dtype=float)).tolist() if known else None
    out["date_times"] = [t.isoformat() if not pd.isna(t) else None for t in times] if times is not None else None
    out["movie_names"] = list(rows["movie_name"]) if "movie_name" in rows else None
    out["frame_counts"] = ([None if pd.isna(v) else int(v) for v in rows["num_sub_frames"]]
                           if "num_sub_frames" in rows else None)
    if "z_value" in rows:
        out["z_values"] = [int(z) for z in rows["z_value"]]
    return out


def _inspect_mrc(path: Path) -> dict[str, Any]:
    header = mrc.read_mrc_header(path, compute_stats=True)
    header.pop("path", None)
    return {"file_type": "mrc", **header}


def _inspect_star(path: Path) -> dict[str, Any]:
    blocks = star.read_star(path)
    return {
        "file_type": "star",
        "n_blocks": len(blocks),
        "blocks": {
            name: {"columns": [str(c) for c in df.columns], "n_rows": int(len(df)),
                   "simple": df.attrs.get("star_block") == "simple"}
            for name, df in blocks.items()
        },
    }


def _inspect_xf(path: Path) -> dict[str, Any]:
    matrices, shifts = imod.read_xf(path)
    rotation = np.degrees(np.arctan2(-matrices[:, 1, 0], matrices[:, 0, 0]))
    scale = np.sqrt(np.abs(np.linalg.det(matrices)))
    return {
        "file_type": "imod_xf",
        "n_views": int(len(matrices)),
        "transforms": [[m[0, 0], m[0, 1], m[1, 0], m[1, 1], s[0], s[1]] for m, s in zip(matrices, shifts)],
        "rotation_deg": rotation.tolist(),
        "scale": scale.tolist(),
        "shifts_px": shifts.tolist(),
    }


def _inspect_tlt(path: Path) -> dict[str, Any]:
    angles = imod.read_tlt(path)
    return {
        "file_type": "imod_angles",
        "n_views": int(angles.size),
        "angles_deg": angles.tolist(),
        "min_angle_deg": float(angles.min()),
        "max_angle_deg": float(angles.max()),
    }


def _inspect_aln(path: Path) -> dict[str, Any]:
    aln = aretomo.read_aln(path)
    rows = aln.global_alignment
    return {"file_type": "aretomo_aln", "raw_size_px": list(aln.raw_size_px), "n_aligned_views": int(len(rows)),
            "dark_tilt_positions": aln.dark_frames["tilt_position"].tolist(),
            "local_alignment_patches": aln.num_patches,
            "alpha_offset_deg": aln.alpha_offset_deg, "beta_offset_deg": aln.beta_offset_deg,
            "tilt_angles_deg": rows["tilt_deg"].tolist(), "tilt_axis_deg": rows["rot_deg"].tolist(),
            "shift_x_px": rows["tx_px"].tolist(), "shift_y_px": rows["ty_px"].tolist()}


def _inspect_mod(path: Path) -> dict[str, Any]:
    return {"file_type": "imod_model", **imod.imod_model_info(path)}


def _inspect_warp(path: Path) -> dict[str, Any]:
    data = warp.read_warp_tiltseries_xml(path)
    keys = ["n_tilts", "tilt_angles_deg", "dose_e_per_A2", "use_tilt", "axis_angle_deg",
            "axis_offset_x_A", "axis_offset_y_A", "movie_paths", "are_angles_inverted",
            "pixel_size_A", "tilt_defocus_um", "tilt_defocus_u_A", "tilt_defocus_v_A",
            "tilt_defocus_angle_deg"]
    out = {"file_type": "warp_tiltseries_xml", **{k: data[k] for k in keys}}
    ctf = {k: v for k, v in data["ctf"].items() if k != "all"}
    out["ctf"] = ctf
    return out


def _inspect_movie(path: Path) -> dict[str, Any]:
    n, ny, nx, dtype = movies.movie_info(path)
    kind = "eer_movie" if path.suffix.lower() == ".eer" else "tiff_movie"
    return {"file_type": kind, "n_frames": n, "frame_shape_yx": [ny, nx], "dtype": str(dtype)}


def _inspect_defocus(path: Path) -> dict[str, Any]:
    df = imod.read_defocus(path)
    return {"file_type": "imod_defocus", "version": df.attrs["version"], "flags": df.attrs["flags"],
            "n_rows": int(len(df)), "rows": df.to_dict(orient="records")}


def _inspect_com(path: Path) -> dict[str, Any]:
    com = imod.read_com(path)
    return {"file_type": "imod_com", "program": com["program"], "format": com["format"],
            "keywords": com["keywords"], "commands": [c["program"] for c in com["commands"]]}


_BY_SUFFIX: dict[str, Callable[[Path], dict[str, Any]]] = {
    ".mdoc": _inspect_mdoc,
    ".star": _inspect_star,
    ".xf": _inspect_xf,
    ".aln": _inspect_aln,
    ".prexf": _inspect_xf,
    ".prexg": _inspect_xf,
    ".mod": _inspect_mod,
    ".fid": _inspect_mod,
    ".xml": _inspect_warp,
    ".tif": _inspect_movie,
    ".tiff": _inspect_movie,
    ".eer": _inspect_movie,
    ".defocus": _inspect_defocus,
    ".com": _inspect_com,
    **{s: _inspect_mrc for s in MRC_SUFFIXES},
    **{s: _inspect_tlt for s in TLT_SUFFIXES},
}


def _sniff(path: Path) -> Callable[[Path], dict[str, Any]] | None:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if len(head) >= 212 and head[208:212] == b"MAP ":
        return _inspect_mrc
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _inspect_movie if path.suffix.lower() in (".tif", ".tiff", ".eer") else None
    if head[:4] == b"IMOD":
        return _inspect_mod
    text = head.decode("utf-8", errors="replace")
    if "[ZValue" in text or "[FrameSet" in text:
        return _inspect_mdoc
    if "# AreTomo Alignment" in text:
        return _inspect_aln
    if "<TiltSeries" in text:
        return _inspect_warp
    if any(line.strip().startswith("data_") for line in text.splitlines()):
        return _inspect_star
    return None


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Summarise a file as a JSON-serialisable dict (keys with units; ``file_type`` says
    which reader was used). Raises InputFileError for missing or unknown files."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    if not path.is_file():
        raise InputFileError(path, "not a file")
    handler = _BY_SUFFIX.get(path.suffix.lower()) or _sniff(path)
    if handler is None:
        raise InputFileError(
            path,
            "unknown file type (known: .mdoc, .mrc/.mrcs/.st/.ali/.rec, .tif/.tiff/.eer, .star, "
            ".xf, .tlt/.rawtlt/.xtilt, AreTomo .aln, .mod, .defocus, .com, Warp .xml)",
        )
    summary = handler(path)
    return _jsonable({"path": str(path), **summary})


# ----------------------------------------------------------------------------- text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        if len(value) > 8 and all(isinstance(v, (int, float)) or v is None for v in value):
            head = ", ".join(_fmt(v) for v in value[:4])
            tail = ", ".join(_fmt(v) for v in value[-2:])
            return f"[{head}, ..., {tail}] ({len(value)} values)"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _table(columns: list[tuple[str, list[Any]]]) -> list[str]:
    headers = [name for name, _ in columns]
    cells = [[_fmt(v) for v in values] for _, values in columns]
    n = max(len(c) for c in cells) if cells else 0
    widths = [max([len(h)] + [len(c) for c in col]) for h, col in zip(headers, cells)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    for i in range(n):
        lines.append("  ".join((col[i] if i < len(col) else "").rjust(w) for col, w in zip(cells, widths)))
    return lines


_PER_TILT_TABLES = {
    "mdoc": ["z_values", "tilt_angles_deg", "acquisition_order", "dose_per_tilt_e_per_A2",
             "accumulated_dose_e_per_A2", "frame_counts", "date_times", "movie_names"],
    "imod_xf": ["rotation_deg", "scale", "shifts_px"],
    "imod_angles": ["angles_deg"],
    "aretomo_aln": ["tilt_angles_deg", "tilt_axis_deg", "shift_x_px", "shift_y_px"],
    "warp_tiltseries_xml": ["tilt_angles_deg", "dose_e_per_A2", "use_tilt", "axis_angle_deg",
                            "axis_offset_x_A", "axis_offset_y_A", "tilt_defocus_um", "movie_paths"],
}


def format_inspect(d: dict[str, Any]) -> str:
    """Readable multi-line text of an ``inspect_file`` summary: scalar fields first, then
    one table row per tilt/view for per-tilt data, then STAR blocks."""
    file_type = d.get("file_type", "?")
    lines = [f"{d.get('path', '?')}  ({file_type})"]
    table_keys = [k for k in _PER_TILT_TABLES.get(file_type, []) if d.get(k) is not None]
    skip = set(table_keys) | {"path", "file_type", "blocks", "transforms", "rows", "keywords"}
    for key, value in d.items():
        if key in skip:
            continue
        lines.append(f"  {key}: {_fmt(value)}")
    if table_keys:
        n = max(len(d[k]) for k in table_keys)
        columns = [("#", list(range(n)))] + [(k, d[k]) for k in table_keys]
        lines.append("")
        lines.extend("  " + line for line in _table(columns))
    if file_type == "star":
        for name, block in d["blocks"].items():
            lines.append(f"  data_{name}: {block['n_rows']} rows, {len(block['columns'])} columns")
            lines.append("    " + " ".join(block["columns"]))
    if file_type == "imod_com":
        for key, value in d["keywords"].items():
            lines.append(f"    {key} = {_fmt(value)}")
    if file_type == "imod_defocus":
        keys = list(d["rows"][0].keys()) if d["rows"] else []
        lines.extend("  " + line for line in _table([(k, [r[k] for r in d["rows"]]) for k in keys]))
    return "\n".join(lines)
