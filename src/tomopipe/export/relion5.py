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

When the project holds tomograms and picks, ``tomograms.star`` (the tilt-series columns plus each
tomogram's binning, size and file, as RELION 5's reconstruction writes it) and ``particles.star``
(the enabled picks of the newest particle set, ``tomopipe.io.picks``) are written beside them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io.picks import relion5_particles_table
from tomopipe.io.star import write_particles_star, write_star, write_tilt_series_star, write_tomograms_star
from tomopipe.model.sets import CTF, PARTICLES, TILT_SERIES, TILT_SERIES_MOVIES, TOMOGRAMS
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
    picks = TOMOGRAMS.name in sets and PARTICLES.name in sets
    if base is None and not picks:
        raise TomopipeError(f"{project.folder}: no tilt series to export to RELION 5")
    written, global_rows = _export_tilt_series(project, sets, base, out) if base is not None else ([], [])
    if picks:
        written += export_picks(project, sets, out, {row["rlnTomoName"]: row for row in global_rows})
    return written


def _export_tilt_series(project: Project, sets: dict[str, SetRecord], base: SetRecord,
                        out: Path) -> tuple[list[Path], list[dict]]:
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
    return [path, *written], global_rows


def _acquisition_row(ts_id: str, acquisition: dict, voxel_size_A: float) -> dict:
    """The tilt-series columns of a tomograms.star row from a set's acquisition (no tilt series exported)."""
    pixel_size_A = acquisition.get("pixel_size_A", voxel_size_A)
    row = {"rlnTomoName": ts_id, "rlnVoltage": acquisition.get("voltage_kV"),
           "rlnSphericalAberration": acquisition.get("spherical_aberration_mm"),
           "rlnAmplitudeContrast": acquisition.get("amplitude_contrast"),
           "rlnMicrographOriginalPixelSize": pixel_size_A, "rlnTomoTiltSeriesPixelSize": pixel_size_A,
           "rlnTomoHand": float(acquisition.get("defocus_hand", DEFAULT_HAND)), "rlnOpticsGroupName": "optics1"}
    return {key: value for key, value in row.items() if value is not None}


def tomograms_table(project: Project, tomograms: SetRecord, tilt_series_rows: dict[str, dict]) -> pd.DataFrame:
    """RELION 5 ``tomograms.star`` rows: the tilt-series columns plus ``rlnTomoTomogramBinning``
    (voxel size / tilt-series pixel size), ``rlnTomoSizeX/Y/Z`` (in tilt-series pixels, as RELION 5
    gives them: the tomogram's size times its binning) and ``rlnTomoReconstructedTomogram``."""
    items = project.read_items(tomograms.id, enabled_only=True).sort_values("ts_id", kind="stable")
    acquisitions = tomograms.attrs.get("tilt_series", {})
    rows = []
    for tomogram in items.itertuples():
        row = dict(tilt_series_rows.get(tomogram.ts_id)
                   or _acquisition_row(tomogram.ts_id, acquisitions.get(tomogram.ts_id, {}), tomogram.voxel_size_A))
        binning = tomogram.voxel_size_A / row["rlnTomoTiltSeriesPixelSize"]
        row.update({"rlnTomoTomogramBinning": binning,
                    **{f"rlnTomoSize{axis}": int(round(size * binning)) for axis, size in
                       zip("XYZ", (tomogram.size_x_px, tomogram.size_y_px, tomogram.size_z_px))},
                    "rlnTomoReconstructedTomogram": str(project.absolute_path(tomogram.tomogram_path))})
        rows.append(row)
    return pd.DataFrame(rows)


def export_picks(project: Project, sets: dict[str, SetRecord], out: Path,
                 tilt_series_rows: dict[str, dict]) -> list[Path]:
    """``tomograms.star`` and the ``particles.star`` of the enabled picks of the set's tomograms,
    one optics group (``optics1``) with the first tomogram's optics."""
    tomograms = tomograms_table(project, sets[TOMOGRAMS.name], tilt_series_rows)
    particles = project.read_items(sets[PARTICLES.name].id, enabled_only=True)
    particles = particles[particles["ts_id"].isin(tomograms["rlnTomoName"])]
    optics_columns = ["rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                      "rlnTomoTiltSeriesPixelSize"]
    optics = tomograms[[c for c in optics_columns if c in tomograms.columns]].head(1).assign(rlnOpticsGroup=1)
    paths = [out / "tomograms.star", out / "particles.star"]
    write_tomograms_star(paths[0], tomograms)
    write_particles_star(paths[1], relion5_particles_table(particles), optics)
    return paths
