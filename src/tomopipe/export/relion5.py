"""RELION 5 tomography layout: ``tilt_series.star`` (one row per tilt series) and one STAR per
tilt series in ``tilt_series/`` (one row per enabled tilt, sorted by tilt angle), as RELION's
Import job writes them (``rlnTomoHand`` −1, the sheet's default)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io.star import write_star, write_tilt_series_star
from tomopipe.project.store import Project, SetRecord

DEFAULT_HAND = -1.0


def tilt_series_tables(project: Project, movies: SetRecord) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The global table and the per-tilt-series tables of a tilt-series movie set."""
    items = project.read_items(movies.id, enabled_only=True)
    acquisitions = movies.attrs["tilt_series"]
    global_rows = []
    per_ts: dict[str, pd.DataFrame] = {}
    for ts_id, group in items.groupby("ts_id", sort=True):
        acquisition = acquisitions[ts_id]
        group = group.sort_values("tilt_angle_deg", kind="stable")
        per_ts[ts_id] = pd.DataFrame({
            "rlnMicrographMovieName": group["movie_path"].to_numpy(),
            "rlnTomoTiltMovieFrameCount": group["frame_count"].to_numpy(),
            "rlnTomoNominalStageTiltAngle": group["tilt_angle_deg"].to_numpy(),
            "rlnTomoNominalTiltAxisAngle": acquisition["tilt_axis_angle_deg"],
            "rlnMicrographPreExposure": group["pre_exposure_e_per_A2"].to_numpy(),
            "rlnTomoNominalDefocus": group["target_defocus_um"].to_numpy(),
        })
        global_rows.append({
            "rlnTomoName": ts_id,
            "rlnTomoTiltSeriesStarFile": f"tilt_series/{ts_id}.star",
            "rlnVoltage": acquisition["voltage_kV"],
            "rlnSphericalAberration": acquisition["spherical_aberration_mm"],
            "rlnAmplitudeContrast": acquisition["amplitude_contrast"],
            "rlnMicrographOriginalPixelSize": acquisition["pixel_size_A"],
            "rlnTomoHand": DEFAULT_HAND,
            "rlnOpticsGroupName": "optics1",
        })
    return pd.DataFrame(global_rows), per_ts


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    if "tilt_series_movies" not in sets:
        raise TomopipeError(f"{project.folder}: no tilt series to export to RELION 5")
    global_table, per_ts = tilt_series_tables(project, sets["tilt_series_movies"])
    written = []
    for ts_id, table in per_ts.items():
        path = out / "tilt_series" / f"{ts_id}.star"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tilt_series_star(path, table, tomo_name=ts_id)
        written.append(path)
    path = out / "tilt_series.star"
    write_star(path, {"global": global_table})
    written.insert(0, path)
    return written
