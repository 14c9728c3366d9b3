"""RELION 5 tomography layout: ``tilt_series.star`` (one row per tilt series) and one STAR per
tilt series in ``tilt_series/`` (one row per tilt, sorted by tilt angle), with the columns of
RELION's Import, MotionCorr, CtfFind and alignment jobs as far as the project has those data.

A tilt that is excluded (``enabled`` off) in any of the sets used is not written. Motion-corrected
images live in one MRC stack per tilt series; ``rlnMicrographName`` names a view as
``N@stack.mrc`` (RELION's image-in-stack notation, N from 1). Defocus handedness
(``rlnTomoHand``) comes from the CTF estimation when there is one, else −1 (the sheet's default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io.star import write_star, write_tilt_series_star
from tomopipe.project.store import Project, SetRecord

DEFAULT_HAND = -1.0
KEY = ["ts_id", "tilt_index"]
ALIGNMENT_COLUMNS = {"rot_x_deg": "rlnTomoXTilt", "rot_y_deg": "rlnTomoYTilt", "rot_z_deg": "rlnTomoZRot",
                     "shift_x_A": "rlnTomoXShiftAngst", "shift_y_A": "rlnTomoYShiftAngst"}


def merged_tilts(project: Project, sets: dict[str, SetRecord]) -> pd.DataFrame:
    """One row per tilt enabled in every set used (movies, tilt series, CTF), columns of all."""
    tables = [project.read_items(sets[kind].id).add_prefix(f"{kind}.").rename(
        columns={f"{kind}.{k}": k for k in KEY}) for kind in ("tilt_series_movies", "tilt_series", "ctf") if kind in sets]
    merged = tables[0]
    for table in tables[1:]:
        merged = merged.merge(table, on=KEY, how="inner")
    enabled = np.ones(len(merged), dtype=bool)
    for column in [c for c in merged.columns if c.endswith(".enabled")]:
        enabled &= merged[column].fillna(True).to_numpy(bool)
    return merged[enabled].reset_index(drop=True)


def _column(table: pd.DataFrame, name: str, kinds=("tilt_series", "tilt_series_movies", "ctf")):
    for kind in kinds:
        if f"{kind}.{name}" in table.columns:
            return table[f"{kind}.{name}"].to_numpy()
    return None


def per_tilt_series_table(project: Project, group: pd.DataFrame, acquisition: dict) -> pd.DataFrame:
    group = group.sort_values(_first_present(group, "tilt_angle_deg"), kind="stable")
    out: dict[str, object] = {}
    movie = _column(group, "movie_path", ("tilt_series_movies",))
    if movie is not None:
        out["rlnMicrographMovieName"] = movie
        out["rlnTomoTiltMovieFrameCount"] = _column(group, "frame_count", ("tilt_series_movies",))
    out["rlnTomoNominalStageTiltAngle"] = _column(group, "tilt_angle_deg")
    out["rlnTomoNominalTiltAxisAngle"] = acquisition["tilt_axis_angle_deg"]
    out["rlnMicrographPreExposure"] = _column(group, "pre_exposure_e_per_A2")
    target = _column(group, "target_defocus_um", ("tilt_series_movies", "tilt_series"))
    if target is not None:
        out["rlnTomoNominalDefocus"] = target
    image = _column(group, "image_path", ("tilt_series",))
    if image is not None:
        sections = _column(group, "image_section", ("tilt_series",))
        out["rlnMicrographName"] = [f"{int(s) + 1}@{project.absolute_path(p)}" for p, s in zip(image, sections)]
    if "ctf.defocus_u_A" in group.columns:
        u, v = group["ctf.defocus_u_A"].to_numpy(), group["ctf.defocus_v_A"].to_numpy()
        out.update({"rlnDefocusU": u, "rlnDefocusV": v, "rlnCtfAstigmatism": np.abs(u - v),
                    "rlnDefocusAngle": group["ctf.defocus_angle_deg"].to_numpy(),
                    "rlnCtfMaxResolution": group["ctf.fit_resolution_A"].to_numpy(),
                    "rlnCtfFigureOfMerit": group["ctf.fit_score"].to_numpy(),
                    "rlnPhaseShift": group["ctf.phase_shift_deg"].to_numpy()})
        diagnostic = group["ctf.diagnostic_path"].to_numpy()
        out["rlnCtfImage"] = [f"{int(s) + 1}@{project.absolute_path(p)}"
                              for p, s in zip(diagnostic, group["ctf.diagnostic_section"])]
    for ours, theirs in ALIGNMENT_COLUMNS.items():
        values = _column(group, ours, ("tilt_series",))
        if values is not None:
            out[theirs] = values
    return pd.DataFrame(out)


def _first_present(table: pd.DataFrame, name: str) -> str:
    for kind in ("tilt_series", "tilt_series_movies", "ctf"):
        if f"{kind}.{name}" in table.columns:
            return f"{kind}.{name}"
    raise KeyError(name)


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    base = next((sets[k] for k in ("tilt_series", "tilt_series_movies") if k in sets), None)
    if base is None:
        raise TomopipeError(f"{project.folder}: no tilt series to export to RELION 5")
    movies = sets.get("tilt_series_movies")
    tilts = merged_tilts(project, sets)
    hands = {}
    if "ctf" in sets:
        hands = tilts.groupby("ts_id")["ctf.defocus_hand"].first().to_dict()
    written, global_rows = [], []
    for ts_id, group in tilts.groupby("ts_id", sort=True):
        acquisition = base.attrs["tilt_series"][ts_id]
        original = movies.attrs["tilt_series"][ts_id] if movies and ts_id in movies.attrs["tilt_series"] else acquisition
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
            "rlnTomoHand": float(hands.get(ts_id, DEFAULT_HAND)),
            "rlnOpticsGroupName": "optics1",
        })
    path = out / "tilt_series.star"
    write_star(path, {"global": pd.DataFrame(global_rows)})
    return [path, *written]
