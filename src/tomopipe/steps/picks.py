"""Picking by hand and picks from other programs: ``edit_picks`` adds and removes coordinates,
``import_picks`` reads a picks file (RELION 5 / 4 STAR, IMOD model, copick JSON, text; see
``tomopipe.io.picks``). Each is a new run with a new ``particles`` set: nothing is deleted (a
removed pick is flagged ``enabled = False``, as excluded tilts are) and provenance is kept.

Both take a ``tomograms`` input, which gives each tomogram's size and voxel size: a pick for a
tilt series without a tomogram, or outside its tomogram, is refused. Positions are Å from the
tomogram's centre ``n / 2`` (RELION 5) (``units = A``) or 0-based voxel coordinates (``units = px``).
Hand picks have no orientation or score (NaN); half sets are assigned to keep the halves even.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import TomopipeError
from tomopipe.io.picks import FORMATS, UNITS, PicksOptions, read_picks
from tomopipe.model.particles import (
    XYZ_A,
    TomogramFrame,
    check_particles,
    fill_half_sets,
    particle_set_attrs,
    particles_table,
    tomogram_frames,
)
from tomopipe.model.sets import PARTICLES, TOMOGRAMS

log = logging.getLogger("tomopipe")


def parse_points(text: str, what: str) -> list[tuple[str, np.ndarray]]:
    """``"TS_01:10,20,30;TS_02:1.5,2,3"`` -> ``[("TS_01", [10, 20, 30]), ...]``."""
    points = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        ts_id, _, numbers = part.rpartition(":")
        try:
            xyz = np.array([float(v) for v in numbers.split(",")], dtype=np.float64)
        except ValueError:
            xyz = np.zeros(0)
        if not ts_id.strip() or xyz.shape != (3,) or not np.isfinite(xyz).all():
            raise TomopipeError(f"{what} {part!r}: expected TS:X,Y,Z, e.g. TS_01:10,20,30")
        points.append((ts_id.strip(), xyz))
    return points


def _to_A(points: list[tuple[str, np.ndarray]], frames: dict[str, TomogramFrame], units: str, what: str):
    """Points in Å from the centre; ``units = px`` converts 0-based voxels with each tomogram's frame."""
    unknown = sorted({ts for ts, _ in points} - set(frames))
    if unknown:
        raise TomopipeError(f"{what}: no tomogram for {', '.join(map(repr, unknown))} "
                            f"(tomograms: {', '.join(sorted(frames)) or 'none'})")
    return [(ts, frames[ts].to_centred_A(xyz) if units == "px" else xyz) for ts, xyz in points]


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in filter(None, (v.strip() for v in text.split(",")))]
    except ValueError:
        raise TomopipeError(f"remove_index {text!r}: expected item numbers, e.g. 0,4,7") from None


def edit_particles(particles: pd.DataFrame | None, tomograms: pd.DataFrame,
                   params: dict) -> tuple[pd.DataFrame, dict]:
    """The edited set (added picks appended, removed ones flagged; ``particles`` None: start from
    nothing) and counts; raises on bad input."""
    particles = particles_table([], np.zeros((0, 3))) if particles is None else particles
    frames = tomogram_frames(tomograms)
    units = params["units"]
    added = _to_A(parse_points(params["add"], "add"), frames, units, "add")
    table = particles_table([ts for ts, _ in added], [xyz for _, xyz in added]) if added \
        else particles_table([], np.zeros((0, 3)))
    check_particles(table, frames, "add")
    # new picks keep the halves of the whole set even
    halves = fill_half_sets(np.concatenate([particles["half_set"].to_numpy(np.float64), np.full(len(table), np.nan)]))
    table["half_set"] = halves[len(particles):]
    edited = pd.concat([particles, table], ignore_index=True) if len(particles) else table
    enabled = edited["enabled"].to_numpy(bool).copy()
    removed: set[int] = set()
    for index in _indices(params["remove_index"]):
        if not 0 <= index < len(particles):
            raise TomopipeError(f"remove_index {index}: the particle set has items 0..{len(particles) - 1}")
        removed.add(index)
    for ts_id, xyz in _to_A(parse_points(params["remove_near"], "remove_near"), frames, units, "remove_near"):
        distance = np.linalg.norm(edited[list(XYZ_A)].to_numpy(np.float64) - xyz, axis=1)
        near = np.flatnonzero((edited["ts_id"].to_numpy() == ts_id) & enabled & (distance <= params["radius_A"]))
        if not len(near):
            raise TomopipeError(f"remove_near {ts_id}:{','.join(f'{v:g}' for v in xyz)} Å: no enabled pick within "
                                f"{params['radius_A']:g} Å")
        removed.add(int(near[np.argmin(distance[near])]))
    newly = [i for i in sorted(removed) if enabled[i]]
    enabled[sorted(removed)] = False
    edited["enabled"] = enabled
    return edited, {"added": len(table), "removed": len(newly), "picks": int(enabled.sum())}


def import_options(params: dict) -> PicksOptions:
    return PicksOptions(ts_id=params["ts_id"] or None, units=params["units"],
                        coordinate_pixel_size_A=params["coordinate_pixel_size_A"])


UNITS_PARAM = Param("units", "str", "units of the coordinates: A (Å from the tomogram centre) or px "
                                    "(0-based voxels of the tomogram)", default="A", choices=UNITS)


@register
class EditPicks(Step):
    type_name = "edit_picks"
    title = "picking by hand: add and remove coordinates"
    description = ("A new particle set: the input picks (if any) plus the added ones, with removed picks flagged "
                   "as excluded.")
    params = (
        Param("add", "str", "picks to add: TS:X,Y,Z;TS:X,Y,Z (units below)", default=""),
        Param("remove_near", "str", "remove the nearest enabled pick to each TS:X,Y,Z (within radius_A)",
              default=""),
        Param("radius_A", "float", "how far from a remove_near point a pick may be", default=30.0, min=0),
        Param("remove_index", "str", "remove the picks at these 0-based item numbers of the input set, e.g. 0,4",
              default=""),
        UNITS_PARAM,
    )
    inputs = (Port("tomograms", TOMOGRAMS.name, "tomograms the picks belong to"),
              Port("particles", PARTICLES.name, "picks to edit (none: start from nothing)", optional=True))
    outputs = (Port("particles", PARTICLES.name, "the edited picks"),)

    def run(self, ctx):
        particles = ctx.input_items("particles") if "particles" in ctx.inputs else None
        edited, counts = edit_particles(particles, ctx.input_items("tomograms"), ctx.params)
        attrs = (ctx.input_attrs("particles") if "particles" in ctx.inputs
                 else particle_set_attrs(ctx.input_items("tomograms"), ctx.input_attrs("tomograms")))
        ctx.add_output("particles", edited, attrs, parent=ctx.inputs.get("particles"))
        log.info("picks edited: %d added, %d removed, %d enabled", counts["added"], counts["removed"], counts["picks"])
        return counts


@register
class ImportPicks(Step):
    type_name = "import_picks"
    title = "tomo - import 3D coordinates"
    description = ("Picks from a RELION 5 (or 4) particles.star, IMOD models, copick picks JSON or a text file, "
                   "on the given tomograms.")
    params = (
        Param("path", "path", "picks file, or a folder of IMOD models / a copick overlay", required=True),
        Param("format", "str", "file format (auto: from the suffix or the folder)", default="auto",
              choices=("auto", *FORMATS)),
        Param("ts_id", "str", "tomogram of a single IMOD model (default: the file name)", default=""),
        UNITS_PARAM,
        Param("coordinate_pixel_size_A", "float", "pixel size of RELION 4 rlnCoordinateX/Y/Z (default: the "
                                                  "optics table's rlnTomoTiltSeriesPixelSize)", min=0),
    )
    inputs = (Port("tomograms", TOMOGRAMS.name, "tomograms the picks belong to"),)
    outputs = (Port("particles", PARTICLES.name, "the imported picks"),)

    @classmethod
    def fingerprint(cls, params):
        path = Path(params["path"])
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files if p.exists()]

    def run(self, ctx):
        particles = read_picks(ctx.params["path"], ctx.input_items("tomograms"), ctx.params["format"],
                               import_options(ctx.params))
        ctx.add_output("particles", particles,
                       particle_set_attrs(ctx.input_items("tomograms"), ctx.input_attrs("tomograms")))
        return {"picks": len(particles), "tomograms": int(particles["ts_id"].nunique())}
