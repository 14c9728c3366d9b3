"""IMOD layout: one folder per tilt series holding what IMOD's programs read, for the stack of
the tilt series (views in tilt order, numbered from 1):

- ``TS.rawtlt``: nominal tilt angles of every view;
- ``TS_excludelist.txt``: IMOD's view list of the excluded views (e.g. ``1-3,7``), for
  EXCLUDELIST in newst/tilt/tiltalign — the views stay in the stack, as IMOD expects;
- ``TS.defocus``: ctfplotter format (version 3, with astigmatism and phase shift) when there
  are CTF estimates;
- ``TS.xf`` / ``TS.tlt`` / ``TS.xtilt``: the alignment, when there is one, one line per aligned
  (enabled) view, as the alignment step writes them (``.xf`` about the IMOD centre, pixels of
  the stack; ``.tlt`` the refined tilt angles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import format_exclude_list, write_defocus, write_tlt, write_xf
from tomopipe.model.alignment import xf_for_views
from tomopipe.project.store import Project, SetRecord


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    base = next((sets[k] for k in ("tilt_series", "tilt_series_movies") if k in sets), None)
    if base is None:
        raise TomopipeError(f"{project.folder}: no tilt series to export to IMOD")
    items = project.read_items(base.id)
    ctf = project.read_items(sets["ctf"].id) if "ctf" in sets else None
    written = []
    for ts_id, views in items.groupby("ts_id", sort=True):
        views = views.sort_values("tilt_index").reset_index(drop=True)
        enabled = views["enabled"].to_numpy(bool)
        folder = out / ts_id
        folder.mkdir(parents=True, exist_ok=True)

        def path(suffix: str) -> Path:
            written.append(folder / f"{ts_id}{suffix}")
            return written[-1]

        write_tlt(path(".rawtlt"), views["tilt_angle_deg"].to_numpy())
        if ctf is not None:
            estimates = views[["tilt_index"]].merge(ctf[ctf["ts_id"] == ts_id], on="tilt_index", how="left")
            enabled &= estimates["enabled"].fillna(False).to_numpy(bool)
            known = estimates["defocus_u_A"].notna().to_numpy()
            view_numbers = np.flatnonzero(known) + 1
            write_defocus(path(".defocus"), pd.DataFrame({
                "start_view": view_numbers, "end_view": view_numbers,
                "tilt1_deg": estimates["tilt_angle_deg"][known].to_numpy(),
                "tilt2_deg": estimates["tilt_angle_deg"][known].to_numpy(),
                "defocus1_nm": estimates["defocus_u_A"][known].to_numpy() / 10.0,
                "defocus2_nm": estimates["defocus_v_A"][known].to_numpy() / 10.0,
                "astigmatism_angle_deg": estimates["defocus_angle_deg"][known].to_numpy(),
                "phase_shift_deg": estimates["phase_shift_deg"][known].to_numpy(),
            }))
        if "rot_z_deg" in views.columns and views["rot_z_deg"].notna().any():
            pixel_size_A = base.attrs["tilt_series"][ts_id]["pixel_size_A"]
            aligned = views[views["rot_z_deg"].notna()]
            A, d = xf_for_views(aligned, pixel_size_A)
            write_xf(path(".xf"), A, d)
            write_tlt(path(".tlt"), aligned["rot_y_deg"].to_numpy())
            write_tlt(path(".xtilt"), aligned["rot_x_deg"].to_numpy())
        excluded = (np.flatnonzero(~enabled) + 1).tolist()
        if excluded:
            write_text_atomic(path("_excludelist.txt"), format_exclude_list(excluded) + "\n")
    return written
