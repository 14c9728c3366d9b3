"""IMOD layout: one folder per tilt series holding what IMOD's programs read — ``TS.rawtlt``
(nominal angles in stack order, every view) and ``TS_excludelist.txt`` (IMOD's 1-based view
list, e.g. ``1-3,7``, for EXCLUDELIST in newst/tilt/tiltalign) when views are excluded."""

from __future__ import annotations

from pathlib import Path

from tomopipe.errors import TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import format_exclude_list, write_tlt
from tomopipe.project.store import Project, SetRecord


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    if "tilt_series_movies" not in sets:
        raise TomopipeError(f"{project.folder}: no tilt series to export to IMOD")
    items = project.read_items(sets["tilt_series_movies"].id)
    written = []
    for ts_id, group in items.groupby("ts_id", sort=True):
        group = group.sort_values("tilt_index")
        folder = out / ts_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ts_id}.rawtlt"
        write_tlt(path, group["tilt_angle_deg"].to_numpy())
        written.append(path)
        excluded = (group["tilt_index"][~group["enabled"].to_numpy(bool)] + 1).tolist()
        if excluded:
            path = folder / f"{ts_id}_excludelist.txt"
            write_text_atomic(path, format_exclude_list(excluded) + "\n")
            written.append(path)
    return written
