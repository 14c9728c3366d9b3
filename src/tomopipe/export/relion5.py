"""RELION 5 tomography layout: ``tilt_series.star`` (one row per tilt series) and one STAR per
tilt series in ``tilt_series/`` (one row per tilt, sorted by tilt angle), with the columns of
RELION's Import, MotionCorr, CtfFind and alignment jobs as far as the project has those data.

A tilt that is excluded (``enabled`` off) in any of the sets used is not written; a column is
written only when the project holds its data (no CTF or alignment columns before those steps, no
nominal defocus when the mdoc had none). Motion-corrected images live in one MRC stack per tilt
series; ``rlnMicrographName`` names a view as ``N@stack.mrc`` (RELION's image-in-stack notation,
N from 1). Defocus handedness (``rlnTomoHand``) comes from the CTF estimation when there is one
(``defocus_hand`` of the tilt series' acquisition, or the CTF set's column), else −1 (RELION's and
the sheet's default, the only value a project without a CTF estimate can give).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io.star import write_star, write_tilt_series_star
from tomopipe.model.sets import CTF, TILT_SERIES, TILT_SERIES_MOVIES
from tomopipe.project.store import Project, SetRecord

DEFAULT_HAND = -1.0
KEY = ["ts_id", "tilt_index"]
# model/sets.py column names -> RELION 5 labels
ALIGNMENT_COLUMNS = {"rot_x_deg": "rlnTomoXTilt", "rot_y_deg": "rlnTomoYTilt", "rot_z_deg": "rlnTomoZRot",
                     "shift_x_A": "rlnTomoXShiftAngst", "shift_y_A": "rlnTomoYShiftAngst"}
CTF_COLUMNS = {"defocus_u_A": "rlnDefocusU", "defocus_v_A": "rlnDefocusV", "defocus_angle_deg": "rlnDefocusAngle",
               "fit_resolution_A": "rlnCtfMaxResolution", "fit_score": "rlnCtfFigureOfMerit",
               "phase_shift_deg": "rlnPhaseShift"}


def merged_tilts(project: Project, sets: dict[str, SetRecord]) -> pd.DataFrame:
    """One row per tilt enabled in every set used (movies, tilt series, CTF), columns of all."""
    tables = [project.read_items(sets[kind].id).add_prefix(f"{kind}.").rename(
        columns={f"{kind}.{k}": k for k in KEY})
        for kind in (TILT_SERIES_MOVIES.name, TILT_SERIES.name, CTF.name) if kind in sets]
    merged = tables[0]
    for table in tables[1:]:
        merged = merged.merge(table, on=KEY, how="inner")
    enabled = np.ones(len(merged), dtype=bool)
    for column in [c for c in merged.columns if c.endswith(".enabled")]:
        enabled &= merged[column].fillna(True).to_numpy(bool)
    return merged[enabled].reset_index(drop=True)


def _column(table: pd.DataFrame, name: str, kinds=(TILT_SERIES.name, TILT_SERIES_MOVIES.name, CTF.name)):
    """The values of ``name`` from the first of ``kinds`` that has any, else None."""
    for kind in kinds:
        column = table.get(f"{kind}.{name}")
        if column is not None and column.notna().any():
            return column.to_numpy()
    return None


def _image_in_stack(project: Project, group: pd.DataFrame, path_column: str, section_column: str):
    """``N@stack`` names (N from 1) when every row has a stack and a section, else None."""
    paths, sections = group.get(path_column), group.get(section_column)
    if paths is None or sections is None or paths.isna().any() or sections.isna().any():
        return None
    return [f"{int(s) + 1}@{project.absolute_path(p)}" for p, s in zip(paths, sections)]


def per_tilt_series_table(project: Project, group: pd.DataFrame, acquisition: dict) -> pd.DataFrame:
    """The rows of one tilt series; a column is written only when the project holds its data."""
    group = group.sort_values(_first_present(group, "tilt_angle_deg"), kind="stable")
    columns: dict[str, object] = {
        "rlnMicrographMovieName": _column(group, "movie_path", (TILT_SERIES_MOVIES.name,)),
        "rlnTomoTiltMovieFrameCount": _column(group, "frame_count", (TILT_SERIES_MOVIES.name,)),
        "rlnTomoNominalStageTiltAngle": _column(group, "tilt_angle_deg"),
        "rlnTomoNominalTiltAxisAngle": acquisition.get("tilt_axis_angle_deg"),
        "rlnMicrographPreExposure": _column(group, "pre_exposure_e_per_A2"),
        "rlnTomoNominalDefocus": _column(group, "target_defocus_um", (TILT_SERIES_MOVIES.name, TILT_SERIES.name)),
        "rlnMicrographName": _image_in_stack(project, group, f"{TILT_SERIES.name}.image_path",
                                            f"{TILT_SERIES.name}.image_section"),
    }
    columns.update({theirs: _column(group, ours, (CTF.name,)) for ours, theirs in CTF_COLUMNS.items()})
    if columns["rlnDefocusU"] is not None and columns["rlnDefocusV"] is not None:
        columns["rlnCtfAstigmatism"] = np.abs(columns["rlnDefocusU"] - columns["rlnDefocusV"])
    columns["rlnCtfImage"] = _image_in_stack(project, group, f"{CTF.name}.diagnostic_path",
                                            f"{CTF.name}.diagnostic_section")
    columns.update({theirs: _column(group, ours, (TILT_SERIES.name,)) for ours, theirs in ALIGNMENT_COLUMNS.items()})
    return pd.DataFrame({name: values for name, values in columns.items() if values is not None})


def _first_present(table: pd.DataFrame, name: str) -> str:
    for kind in (TILT_SERIES.name, TILT_SERIES_MOVIES.name, CTF.name):
        if f"{kind}.{name}" in table.columns:
            return f"{kind}.{name}"
    raise KeyError(name)


def _hand(acquisition: dict, tilts: pd.DataFrame, ts_id: str) -> float:
    """The CTF estimation's defocus handedness of a tilt series, else ``DEFAULT_HAND``."""
    if acquisition.get("defocus_hand") in (-1, 1):
        return float(acquisition["defocus_hand"])
    if f"{CTF.name}.defocus_hand" not in tilts.columns:
        return DEFAULT_HAND
    hands = tilts.loc[tilts["ts_id"] == ts_id, f"{CTF.name}.defocus_hand"].dropna()
    return float(hands.iloc[0]) if len(hands) else DEFAULT_HAND


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    base = next((sets[k] for k in (TILT_SERIES.name, TILT_SERIES_MOVIES.name) if k in sets), None)
    if base is None:
        raise TomopipeError(f"{project.folder}: no tilt series to export to RELION 5")
    movies = sets.get(TILT_SERIES_MOVIES.name)
    tilts = merged_tilts(project, sets)
    written, global_rows = [], []
    for ts_id, group in tilts.groupby("ts_id", sort=True):
        acquisition = base.attrs["tilt_series"][ts_id]
        original = (movies.attrs["tilt_series"][ts_id] if movies and ts_id in movies.attrs["tilt_series"]
                    else acquisition)
        path = out / "tilt_series" / f"{ts_id}.star"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tilt_series_star(path, per_tilt_series_table(project, group, acquisition), tomo_name=ts_id)
        written.append(path)
        global_rows.append({
            "rlnTomoName": ts_id,
            "rlnTomoTiltSeriesStarFile": f"tilt_series/{ts_id}.star",
            "rlnVoltage": acquisition["voltage_kV"],
            "rlnSphericalAberration": acquisition["spherical_aberration_mm"],
            "rlnAmplitudeContrast": acquisition["amplitude_contrast"],
            "rlnMicrographOriginalPixelSize": original["pixel_size_A"],
            "rlnTomoTiltSeriesPixelSize": acquisition["pixel_size_A"],
            "rlnTomoHand": _hand(acquisition, tilts, ts_id),
            "rlnOpticsGroupName": "optics1",
        })
    path = out / "tilt_series.star"
    write_star(path, {"global": pd.DataFrame(global_rows)})
    return [path, *written]
