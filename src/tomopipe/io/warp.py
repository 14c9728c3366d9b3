"""Warp / WarpTools tilt-series metadata (``<TiltSeries>`` XML), read only.

Values are returned as Warp stores them, with units in the key names:
- per tilt, in the XML's order: ``tilt_angles_deg`` (Warp sign; default ``ts_import`` stores
  −mdoc angles unless ``--dont_invert``, see ``notes/conventions.md`` §6), ``dose_e_per_A2``
  (Warp's "Dose": accumulated exposure of each tilt, e/Å²), ``use_tilt``,
  ``axis_angle_deg``, ``axis_offset_x_A`` / ``axis_offset_y_A`` (image-space shifts in Å:
  Warp multiplies IMOD pixel shifts by its binned pixel size), ``movie_paths``;
- CTF (``ctf``): ``defocus_um`` (underfocus positive), ``defocus_delta_um``,
  ``defocus_angle_deg``, ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``, ``pixel_size_A``,
  ``phase_shift`` (Warp's units: fraction of π);
- grids (``grids``): every ``Grid*`` element as ``{"dims": [width, height, depth],
  "values": nested list [depth][height][width]}``; for a 1×1×n ``GridCTF`` the per-tilt
  defocus is also given as ``tilt_defocus_um`` (plus ``tilt_defocus_delta_um``,
  ``tilt_defocus_angle_deg``) and RELION-style ``tilt_defocus_u_A`` / ``tilt_defocus_v_A`` =
  (defocus ± delta/2) · 10⁴ (Warp's RELION export, ``ExportParticlesTiltseries.cs``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from tomopipe.errors import InputFileError

_PER_TILT = {
    "Angles": ("tilt_angles_deg", float),
    "Dose": ("dose_e_per_A2", float),
    "UseTilt": ("use_tilt", "bool"),
    "AxisAngle": ("axis_angle_deg", float),
    "AxisOffsetX": ("axis_offset_x_A", float),
    "AxisOffsetY": ("axis_offset_y_A", float),
    "MoviePath": ("movie_paths", str),
}


def _parse_bool(path: Path, text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise InputFileError(path, f"expected True/False, got {text!r}")


def _parse_scalar(text: str) -> Any:
    """Warp Param value: bool, number, list of numbers ("1, 0, 0, 1") or text."""
    value = text.strip()
    if value in ("True", "False"):
        return value == "True"
    parts = [p.strip() for p in value.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return value
    numbers_out: list[Any] = [int(n) if n.is_integer() and "." not in p and "e" not in p.lower() else n
                              for n, p in zip(numbers, parts)]
    return numbers_out[0] if len(numbers_out) == 1 else numbers_out


def _params(element: ET.Element | None) -> dict[str, Any]:
    if element is None:
        return {}
    return {p.attrib["Name"]: _parse_scalar(p.attrib.get("Value", ""))
            for p in element.findall("Param") if "Name" in p.attrib}


def _grid(path: Path, element: ET.Element) -> dict[str, Any]:
    try:
        width = int(element.attrib.get("Width", 1))
        height = int(element.attrib.get("Height", 1))
        depth = int(element.attrib.get("Depth", 1))
        duration = int(element.attrib.get("Duration", 1))
    except ValueError as exc:
        raise InputFileError(path, f"{element.tag}: non-integer grid size") from exc
    shape = (duration, depth, height, width) if "Duration" in element.attrib else (depth, height, width)
    values = np.zeros(shape, dtype=np.float64)
    for node in element.findall("Node"):
        try:
            x, y, z = int(node.attrib["X"]), int(node.attrib["Y"]), int(node.attrib["Z"])
            w = int(node.attrib.get("W", 0))
            value = float(node.attrib["Value"])
        except (KeyError, ValueError) as exc:
            raise InputFileError(path, f"{element.tag}: malformed grid node {node.attrib}") from exc
        index = (w, z, y, x) if len(shape) == 4 else (z, y, x)
        if any(i < 0 or i >= s for i, s in zip(index, shape)):
            raise InputFileError(path, f"{element.tag}: node {node.attrib} outside the grid {list(shape)}")
        values[index] = value
    dims = [width, height, depth] + ([duration] if len(shape) == 4 else [])
    return {"dims": dims, "values": values.tolist()}


def read_warp_tiltseries_xml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Warp tilt-series XML (see the module docstring for keys and units)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputFileError(path, f"not a readable XML file ({exc})") from exc
    if root.tag != "TiltSeries":
        raise InputFileError(path, f"root element is <{root.tag}>, not a Warp <TiltSeries>")

    out: dict[str, Any] = {}
    for tag, (key, kind) in _PER_TILT.items():
        element = root.find(tag)
        if element is None:
            raise InputFileError(path, f"no <{tag}> element")
        tokens = (element.text or "").split()
        try:
            if kind == "bool":
                out[key] = [_parse_bool(path, t) for t in tokens]
            else:
                out[key] = [kind(t) for t in tokens]
        except ValueError as exc:
            raise InputFileError(path, f"<{tag}>: {exc}") from exc
    n_tilts = len(out["tilt_angles_deg"])
    if n_tilts == 0:
        raise InputFileError(path, "no tilt angles")
    for tag, (key, _) in _PER_TILT.items():
        if len(out[key]) != n_tilts:
            raise InputFileError(path, f"<{tag}> has {len(out[key])} entries, <Angles> has {n_tilts}")
    out["n_tilts"] = n_tilts

    attrib = root.attrib
    out["are_angles_inverted"] = _parse_bool(path, attrib.get("AreAnglesInverted", "False"))
    out["plane_normal"] = _parse_scalar(attrib.get("PlaneNormal", "")) if attrib.get("PlaneNormal") else None
    out["magnification_correction"] = (_parse_scalar(attrib.get("MagnificationCorrection", ""))
                                       if attrib.get("MagnificationCorrection") else None)
    out["data_directory"] = attrib.get("DataDirectory")

    ctf_params = _params(root.find("CTF"))
    out["ctf"] = {
        "defocus_um": ctf_params.get("Defocus"),
        "defocus_delta_um": ctf_params.get("DefocusDelta"),
        "defocus_angle_deg": ctf_params.get("DefocusAngle"),
        "voltage_kV": ctf_params.get("Voltage"),
        "cs_mm": ctf_params.get("Cs"),
        "amplitude_contrast": ctf_params.get("Amplitude"),
        "pixel_size_A": ctf_params.get("PixelSize"),
        "phase_shift": ctf_params.get("PhaseShift"),
        "bfactor_A2": ctf_params.get("Bfactor"),
        "all": ctf_params,
    }
    out["options_ctf"] = _params(root.find("OptionsCTF"))
    out["pixel_size_A"] = ctf_params.get("PixelSize", out["options_ctf"].get("PixelSize"))

    grids = {child.tag: _grid(path, child) for child in root if child.tag.startswith("Grid")}
    out["grids"] = grids

    def per_tilt(tag: str) -> list[float] | None:
        grid = grids.get(tag)
        if grid is None or grid["dims"][:3] != [1, 1, n_tilts]:
            return None
        return [float(v[0][0]) for v in grid["values"]]

    out["tilt_defocus_um"] = per_tilt("GridCTF")
    out["tilt_defocus_delta_um"] = per_tilt("GridCTFDefocusDelta")
    out["tilt_defocus_angle_deg"] = per_tilt("GridCTFDefocusAngle")
    if out["tilt_defocus_um"] is not None and out["tilt_defocus_delta_um"] is not None:
        out["tilt_defocus_u_A"] = [(d + dd / 2) * 1e4
                                   for d, dd in zip(out["tilt_defocus_um"], out["tilt_defocus_delta_um"])]
        out["tilt_defocus_v_A"] = [(d - dd / 2) * 1e4
                                   for d, dd in zip(out["tilt_defocus_um"], out["tilt_defocus_delta_um"])]
    else:
        out["tilt_defocus_u_A"] = out["tilt_defocus_v_A"] = None
    return out
