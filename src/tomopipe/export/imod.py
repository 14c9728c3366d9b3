"""IMOD layout: one folder per tilt series holding what IMOD's programs read, for the stack of
the tilt series (views in tilt order, numbered from 1):

- ``TS.rawtlt``: nominal tilt angles of every view;
- ``TS_excludelist.txt``: IMOD's view list of the excluded views (e.g. ``1-3,7``), for
  EXCLUDELIST in newst/tilt/tiltalign — the views stay in the stack, as IMOD expects;
- ``TS.defocus``: ctfplotter format (version 3, with astigmatism and phase shift where every
  estimate has them) when there are CTF estimates; a view without a CTF entry is excluded;
- ``TS.xf`` / ``TS.tlt`` / ``TS.xtilt``: the alignment, when there is one, one line per view of
  the stack, as IMOD's newstack/tilt expect (``.xf`` about the IMOD centre, pixels of the stack;
  ``.tlt`` the refined tilt angles). A view that the alignment left out (it is in the exclude
  list) gets the alignment interpolated from its neighbours in tilt, as tiltalign does for views
  excluded from its fit, so that the lines of the aligned views keep their view numbers.

A file whose data the project does not hold yet (no CTF, no alignment) is not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import format_exclude_list, write_defocus, write_tlt, write_xf
from tomopipe.model.alignment import xf_for_views
from tomopipe.model.sets import ALIGNMENT_GEOMETRY, ALIGNMENT_REQUIRED_NAMES, CTF, TILT_SERIES, TILT_SERIES_MOVIES
from tomopipe.project.store import Project, SetRecord


def _defocus_table(views: pd.DataFrame, estimates: pd.DataFrame) -> pd.DataFrame | None:
    """ctfplotter rows (1-based views, nm) of the views that have a defocus estimate; astigmatism and
    phase shift only when every such view has them. ``None`` when no view has an estimate."""
    if "defocus_u_A" not in estimates or estimates["defocus_u_A"].isna().all():
        return None
    known = estimates["defocus_u_A"].notna().to_numpy()
    view_numbers = np.flatnonzero(known) + 1
    angles = views["tilt_angle_deg"].to_numpy(np.float64)[known]
    defocus_u_A = estimates["defocus_u_A"].to_numpy(np.float64)[known]
    table = pd.DataFrame({"start_view": view_numbers, "end_view": view_numbers, "tilt1_deg": angles,
                          "tilt2_deg": angles, "defocus1_nm": defocus_u_A / 10})

    def complete(column: str) -> np.ndarray | None:
        if column not in estimates:
            return None
        values = estimates[column].to_numpy(np.float64)[known]
        return values if np.isfinite(values).all() else None

    defocus_v_A, angle_deg = complete("defocus_v_A"), complete("defocus_angle_deg")
    if defocus_v_A is not None and angle_deg is not None:
        table["defocus2_nm"], table["astigmatism_angle_deg"] = defocus_v_A / 10, angle_deg
    phase_deg = complete("phase_shift_deg")
    if phase_deg is not None:
        table["phase_shift_deg"] = phase_deg
    return table


def _has_alignment(views: pd.DataFrame) -> bool:
    return set(ALIGNMENT_REQUIRED_NAMES) <= set(views.columns) and views["rot_z_deg"].notna().any()


def alignment_of_every_view(views: pd.DataFrame) -> pd.DataFrame:
    """``views`` (one tilt series) with the alignment columns of the views that have none
    interpolated linearly in the nominal tilt angle from the aligned views (held constant beyond
    the ends); the refined tilt of such a view is its nominal tilt plus the interpolated offset."""
    filled = views.copy()
    aligned = filled["rot_z_deg"].notna().to_numpy()
    if aligned.all():
        return filled
    nominal_deg = filled["tilt_angle_deg"].to_numpy(np.float64)
    order = np.argsort(nominal_deg[aligned], kind="stable")
    known_deg = nominal_deg[aligned][order]
    columns = [c for c in ALIGNMENT_GEOMETRY if c in filled]
    for column in columns:
        values = filled[column].to_numpy(np.float64, copy=True)
        if column == "rot_y_deg":
            values = values - nominal_deg
        if column == "magnification":
            values = np.where(np.isfinite(values), values, 1.0)
        values[~aligned] = np.interp(nominal_deg[~aligned], known_deg, values[aligned][order])
        filled[column] = values + nominal_deg if column == "rot_y_deg" else values
    return filled


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    base = next((sets[k] for k in (TILT_SERIES.name, TILT_SERIES_MOVIES.name) if k in sets), None)
    if base is None:
        raise TomopipeError(f"{project.folder}: no tilt series to export to IMOD")
    items = project.read_items(base.id)
    ctf = project.read_items(sets[CTF.name].id) if CTF.name in sets else None
    written = []
    for ts_id, views in items.groupby("ts_id", sort=True):
        views = views.sort_values("tilt_index").reset_index(drop=True)
        enabled = views["enabled"].fillna(False).to_numpy(bool)
        folder = out / ts_id
        folder.mkdir(parents=True, exist_ok=True)

        def path(suffix: str) -> Path:
            written.append(folder / f"{ts_id}{suffix}")
            return written[-1]

        write_tlt(path(".rawtlt"), views["tilt_angle_deg"].to_numpy())
        if ctf is not None:
            estimates = views[["tilt_index"]].merge(ctf[ctf["ts_id"] == ts_id], on="tilt_index", how="left")
            enabled = enabled & estimates["enabled"].fillna(False).to_numpy(bool)  # a view without a CTF is left out
            table = _defocus_table(views, estimates)
            if table is not None:
                write_defocus(path(".defocus"), table)
        if _has_alignment(views):
            pixel_size_A = base.attrs["tilt_series"][ts_id]["pixel_size_A"]
            aligned = alignment_of_every_view(views)
            A, d = xf_for_views(aligned, pixel_size_A)
            write_xf(path(".xf"), A, d)
            write_tlt(path(".tlt"), aligned["rot_y_deg"].to_numpy())
            if "rot_x_deg" in aligned:
                write_tlt(path(".xtilt"), aligned["rot_x_deg"].to_numpy())
        excluded = (np.flatnonzero(~enabled) + 1).tolist()
        if excluded:
            write_text_atomic(path("_excludelist.txt"), format_exclude_list(excluded) + "\n")
    return written
