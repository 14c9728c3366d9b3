"""RELION 5 STAR files (tomography layout), read and written through ``starfile``.

Blocks are pandas DataFrames with RELION's column names (``rlnTomoName``, ...), in file
order. A simple (key-value, non-loop) block is returned as a one-row DataFrame with
``df.attrs["star_block"] == "simple"`` and is written back as a simple block.

RELION 5 tomography files handled by the helpers:
- ``tomograms.star``: one ``data_global`` loop, one row per tilt series (rlnTomoName,
  rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast, rlnMicrographOriginalPixelSize,
  rlnTomoHand, rlnOpticsGroupName, rlnTomoTiltSeriesPixelSize, rlnTomoTiltSeriesStarFile,
  rlnTomoSizeX/Y/Z, ...).
- ``<TS>.star`` (tilt-series star): one loop named after the tilt series (``data_TS_01``),
  one row per tilt image (rlnMicrographMovieName, rlnTomoNominalStageTiltAngle,
  rlnMicrographPreExposure, rlnDefocusU/V/Angle, rlnTomoXTilt/YTilt/ZRot,
  rlnTomoXShiftAngst/YShiftAngst, ...).
- ``particles.star``: ``data_optics`` then ``data_particles`` (rlnTomoName,
  rlnCenteredCoordinateX/Y/ZAngst = Å from the tomogram centre, rlnAngleRot/Tilt/Psi,
  rlnTomoSubtomogramRot/Tilt/Psi, rlnOpticsGroup, ...).
Floats are written with 6 decimals, as RELION does; each block is preceded by
``# version 50001`` (RELION 5).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import starfile

from tomopipe.errors import InputFileError
from tomopipe.io._atomic import write_text_atomic

RELION_STAR_VERSION = "50001"
FLOAT_FORMAT = "%.6f"
_NAME = re.compile(r"^rln[A-Za-z0-9_]+$")


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file, ``{block name: DataFrame}`` in file order."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many types on malformed input
        raise InputFileError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from exc
    if not blocks:
        raise InputFileError(path, "no data blocks (not a STAR file?)")
    out: dict[str, pd.DataFrame] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            df = block.reset_index(drop=True)
        else:
            df = pd.DataFrame([dict(block)])
            df.attrs["star_block"] = "simple"
        out[str(name)] = df
    return out


def _check_columns(where: str, df: pd.DataFrame) -> None:
    for column in df.columns:
        if not isinstance(column, str) or not _NAME.match(column):
            raise ValueError(f"{where}: column {column!r} is not a RELION label (rlnSomething)")


def write_star(path: str | os.PathLike, blocks: Mapping[str, pd.DataFrame | Mapping[str, Any]]) -> None:
    """Write ``{block name: DataFrame}`` (or dicts for simple blocks) as a STAR file, atomically."""
    path = Path(path)
    if not blocks:
        raise ValueError(f"{path}: nothing to write (no blocks)")
    to_write: dict[str, Any] = {}
    for name, block in blocks.items():
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"{path}: invalid block name {name!r}")
        if isinstance(block, pd.DataFrame):
            if block.attrs.get("star_block") == "simple":
                if len(block) != 1:
                    raise ValueError(f"{path}: simple block {name} must have exactly one row")
                to_write[name] = {k: v for k, v in block.iloc[0].items()}
            else:
                to_write[name] = block.reset_index(drop=True)
        elif isinstance(block, Mapping):
            to_write[name] = dict(block)
        else:
            raise TypeError(f"{path}: block {name} must be a DataFrame or a dict, got {type(block).__name__}")
    text = starfile.to_string(to_write, float_format=FLOAT_FORMAT, sep=" ")
    # drop starfile's own banner; mark each block with RELION's version comment
    lines = [line for line in text.splitlines() if not line.startswith("# Created by the starfile")]
    out: list[str] = []
    for line in lines:
        if line.startswith("data_"):
            out.extend([f"# version {RELION_STAR_VERSION}", ""])
        out.append(line)
    write_text_atomic(path, "\n".join(out).strip("\n") + "\n")


def _single_block(path: Path, blocks: dict[str, pd.DataFrame], preferred: str | None) -> tuple[str, pd.DataFrame]:
    if preferred is not None and preferred in blocks:
        return preferred, blocks[preferred]
    if len(blocks) != 1:
        raise InputFileError(path, f"expected one data block{f' named {preferred!r}' if preferred else ''}, "
                                   f"found {list(blocks)}")
    return next(iter(blocks.items()))


def _require(path: Path, df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputFileError(path, f"{what} lacks required column(s) {missing}")


def read_tomograms_star(path: str | os.PathLike) -> pd.DataFrame:
    """The ``data_global`` table of a RELION 5 tomograms.star (one row per tilt series)."""
    path = Path(path)
    _, df = _single_block(path, read_star(path), "global")
    _require(path, df, ["rlnTomoName"], "tomograms star")
    return df


def write_tomograms_star(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a RELION 5 tomograms.star (``data_global``); needs unique ``rlnTomoName``."""
    _check_columns(str(path), df)
    if "rlnTomoName" not in df.columns:
        raise ValueError(f"{path}: tomograms star needs a rlnTomoName column")
    if df["rlnTomoName"].duplicated().any():
        raise ValueError(f"{path}: rlnTomoName values must be unique")
    write_star(path, {"global": df})


def read_tilt_series_star(path: str | os.PathLike) -> pd.DataFrame:
    """A RELION 5 tilt-series star: one row per tilt image, rows in file order.

    The block name (the tilt-series name) is in ``df.attrs["tomo_name"]``.
    """
    path = Path(path)
    name, df = _single_block(path, read_star(path), None)
    if not any(c in df.columns for c in ("rlnMicrographMovieName", "rlnMicrographName")):
        raise InputFileError(path, "tilt-series star lacks rlnMicrographMovieName / rlnMicrographName")
    df = df.copy()
    df.attrs["tomo_name"] = name
    return df


def write_tilt_series_star(path: str | os.PathLike, df: pd.DataFrame, tomo_name: str | None = None) -> None:
    """Write a RELION 5 tilt-series star. The block is named ``tomo_name``, else
    ``df.attrs["tomo_name"]``, else the file name without extension (RELION: TS_01.star holds
    data_TS_01)."""
    path = Path(path)
    _check_columns(str(path), df)
    name = tomo_name or df.attrs.get("tomo_name") or path.stem
    write_star(path, {str(name): df})


def read_particles_star(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(particles, optics)`` of a RELION 5 tomography particles.star."""
    path = Path(path)
    blocks = read_star(path)
    if "particles" not in blocks:
        raise InputFileError(path, f"no data_particles block (found {list(blocks)})")
    if "optics" not in blocks:
        raise InputFileError(path, "no data_optics block (RELION >= 3.1 particle files have one)")
    particles, optics = blocks["particles"], blocks["optics"]
    _require(path, particles, ["rlnTomoName"], "particles block")
    _check_particle_coordinates(path, particles, InputFileError)
    return particles, optics


def _check_particle_coordinates(path: Path, particles: pd.DataFrame, error: type) -> None:
    centred = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    pixels = [f"rlnCoordinate{a}" for a in "XYZ"]
    if not (all(c in particles.columns for c in centred) or all(c in particles.columns for c in pixels)):
        message = "particles need rlnCenteredCoordinateX/Y/ZAngst (RELION 5) or rlnCoordinateX/Y/Z"
        raise error(path, message) if error is InputFileError else error(f"{path}: {message}")


def write_particles_star(path: str | os.PathLike, particles_df: pd.DataFrame, optics_df: pd.DataFrame) -> None:
    """Write a RELION 5 particles.star: ``data_optics`` then ``data_particles``.

    Checks: RELION column names, ``rlnTomoName`` and coordinates present, ``rlnOpticsGroup``
    in the optics table, and every particle's optics group defined there.
    """
    path = Path(path)
    _check_columns(f"{path} (particles)", particles_df)
    _check_columns(f"{path} (optics)", optics_df)
    if "rlnTomoName" not in particles_df.columns:
        raise ValueError(f"{path}: particles need a rlnTomoName column")
    _check_particle_coordinates(path, particles_df, ValueError)
    if "rlnOpticsGroup" not in optics_df.columns or len(optics_df) == 0:
        raise ValueError(f"{path}: the optics table needs at least one row with rlnOpticsGroup")
    if "rlnOpticsGroup" in particles_df.columns:
        unknown = set(particles_df["rlnOpticsGroup"]) - set(optics_df["rlnOpticsGroup"])
        if unknown:
            raise ValueError(f"{path}: particles refer to optics groups {sorted(unknown)} not in the optics table")
    write_star(path, {"optics": optics_df, "particles": particles_df})
