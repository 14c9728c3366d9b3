"""Particle picks in and out: RELION 5 ``particles.star``, IMOD ``.mod``, copick picks JSON and
plain text, as a small registry of formats (in the manner of copick's format handlers).

Every format reads into a ``particles`` table (``model/sets.py``: ``x_A, y_A, z_A`` in Å from the
tomogram's centre ``n / 2`` (RELION 5), RELION ZYZ angles, score, half set; unknown values NaN) and
writes one; ``tomograms`` (the items of a ``tomograms`` set) give each tomogram's size and voxel
size. Points are checked on read: a tomogram that is not in ``tomograms`` or a point outside it is
an error naming the file.

- ``relion5``: ``data_optics`` + ``data_particles`` with ``rlnTomoName``,
  ``rlnCenteredCoordinateX/Y/ZAngst``, ``rlnAngleRot/Tilt/Psi`` (when any is known; unknown ones
  written as 0, RELION's value for a pick without orientation), ``rlnAutopickFigureOfMerit``
  (RELION's picking score; −999 for a pick without score, as RELION's manual picker writes) and
  ``rlnRandomSubset``. Read also: ``rlnLCCmax`` (pytom-match-pick) as the score, origins and
  subtomogram orientations (RELION: position = coordinate − A_subtomo·origin, A = A_subtomo·A),
  and RELION 4 pixel coordinates ``rlnCoordinateX/Y/Z`` (unbinned tilt-series pixels from the
  corner, pixel size from the optics table's ``rlnTomoTiltSeriesPixelSize`` or the option
  ``coordinate_pixel_size_A``): ``x_A = coordinate · pixel − (n / 2) · voxel``.
- ``imod``: one ``<ts_id>.mod`` per tomogram in a folder (IMOD users keep one model per tomogram),
  one object, one scattered contour; import takes a file (its tomogram: option ``ts_id``, else
  the file's stem) or a folder of them. Points are in IMOD model coordinates of the tomogram:
  the centre of voxel (i, j, k) is at (i + 0.5, j + 0.5, k) (3dmod puts x, y = 0 at the corner of
  the first pixel and z = 0 at the centre of the first section: imodmodel's documentation, and
  ``index2ImodPoints.m`` in IMOD's authors' MATLAB code). Positions only.
- ``copick``: a copick overlay folder, ``ExperimentRuns/<ts_id>/Picks/<user>_<session>_<object>.json``
  (copick 1.31 ``CopickPicksFile``/``CopickPoint``: ``location`` in Å from the corner, the centre
  of voxel 0 at 0, so ``location = voxel · voxel_size``; ``transformation_`` 4×4 reference ->
  tomogram with the rotation A and a shift in Å added to the location; ``score``,
  ``instance_id``, ``pickable_object_name``, ``user_id``, ``session_id``, ``run_name`` = ts_id,
  ``voxel_spacing``, ``unit``, ``trust_orientation``). Written with our own code: the ``copick``
  package pulls ~25 dependencies (s3fs, sshfs, zarr, ome-zarr, textual, trimesh, ...).
- ``text``: whitespace columns ``ts_id x y z [rot tilt psi [score]]`` with a header line naming
  them (``x_A`` ... or ``x_px`` ...); option ``units`` (A or px: 0-based voxels) for writing and
  for files without a header.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import read_imod_model, write_imod_model
from tomopipe.io.star import read_particles_star, write_particles_star
from tomopipe.model.particles import (
    ANGLES_DEG,
    XYZ_A,
    TomogramFrame,
    angles_from_matrices,
    check_particles,
    orientation_matrices,
    particles_table,
    tomogram_frames,
)

UNITS = ("A", "px")
RELION_NO_SCORE = -999.0  # rlnAutopickFigureOfMerit of a manual pick in RELION


@dataclass(frozen=True)
class PicksOptions:
    """What some formats need beyond the tomograms."""

    ts_id: str | None = None  # imod: the tomogram of a single .mod file
    units: str = "A"  # text: A (Å from the centre) or px (0-based voxels)
    coordinate_pixel_size_A: float | None = None  # relion: pixel size of RELION 4 rlnCoordinateX/Y/Z
    user_id: str = "tomopipe"  # copick
    session_id: str = "0"  # copick
    object_name: str = "particle"  # copick pickable_object_name


class PicksFormat(Protocol):
    name: str
    suffixes: tuple[str, ...]  # file suffixes read as this format ("" for a folder layout)

    def read(self, path: Path, frames: dict[str, TomogramFrame], options: PicksOptions) -> pd.DataFrame: ...

    def write(self, path: Path, particles: pd.DataFrame, frames: dict[str, TomogramFrame],
              options: PicksOptions) -> list[Path]: ...


def _angles(particles: pd.DataFrame) -> np.ndarray:
    return particles[list(ANGLES_DEG)].to_numpy(np.float64)


# ----------------------------------------------------------------------------- relion5
class Relion5:
    name, suffixes = "relion5", (".star",)

    def read(self, path, frames, options):
        table, optics = read_particles_star(path)
        ts_ids = table["rlnTomoName"].astype(str).to_numpy()
        xyz = self._positions(path, table, optics, ts_ids, frames, options)
        angles = np.full((len(table), 3), np.nan)
        if {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(table.columns):
            matrices = orientation_matrices(*(table[f"rlnAngle{a}"] for a in ("Rot", "Tilt", "Psi")))
            if {"rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi"} <= set(table.columns):
                matrices = self._subtomogram(table) @ matrices
            angles = np.stack(angles_from_matrices(matrices), axis=1)
        score = next((table[c].to_numpy(np.float64) for c in ("rlnAutopickFigureOfMerit", "rlnLCCmax")
                      if c in table.columns), None)
        if score is not None:
            score = np.where(score == RELION_NO_SCORE, np.nan, score)
        half = table["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in table.columns else None
        return particles_table(ts_ids, xyz, angles, score, half)

    @staticmethod
    def _subtomogram(table):
        return orientation_matrices(*(table[f"rlnTomoSubtomogram{a}"] for a in ("Rot", "Tilt", "Psi")))

    def _positions(self, path, table, optics, ts_ids, frames, options):
        centred = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
        if set(centred) <= set(table.columns):
            xyz = table[centred].to_numpy(np.float64)
        else:
            xyz = self._legacy_positions(path, table, optics, ts_ids, frames, options)
        origins = [f"rlnOrigin{a}Angst" for a in "XYZ"]
        if set(origins) <= set(table.columns):
            shifts = table[origins].to_numpy(np.float64)
            if {"rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi"} <= set(table.columns):
                shifts = np.einsum("nij,nj->ni", self._subtomogram(table), shifts)
            xyz = xyz - shifts
        return xyz

    @staticmethod
    def _legacy_positions(path, table, optics, ts_ids, frames, options):
        pixel = options.coordinate_pixel_size_A
        if pixel is None and "rlnTomoTiltSeriesPixelSize" in optics.columns:
            sizes = optics.set_index("rlnOpticsGroup")["rlnTomoTiltSeriesPixelSize"] \
                if "rlnOpticsGroup" in optics.columns and "rlnOpticsGroup" in table.columns else None
            pixel = (table["rlnOpticsGroup"].map(sizes).to_numpy(np.float64) if sizes is not None
                     else float(optics["rlnTomoTiltSeriesPixelSize"].iloc[0]))
        if pixel is None:
            raise InputFileError(path, "RELION 4 pixel coordinates (rlnCoordinateX/Y/Z) need their pixel size: the "
                                       "optics table has no rlnTomoTiltSeriesPixelSize; give the coordinate pixel size")
        missing = sorted(set(ts_ids) - set(frames))
        if missing:
            raise InputFileError(path, f"no tomogram for {', '.join(map(repr, missing))} "
                                       f"(tomograms: {', '.join(sorted(frames)) or 'none'})")
        coordinates = table[[f"rlnCoordinate{a}" for a in "XYZ"]].to_numpy(np.float64)
        centres_A = np.stack([frames[t].centre_px * frames[t].voxel_size_A for t in ts_ids]) if len(ts_ids) \
            else np.zeros((0, 3))
        return coordinates * np.reshape(pixel, (-1, 1)) - centres_A

    def write(self, path, particles, frames, options):
        write_particles_star(path, relion5_particles_table(particles), pd.DataFrame(
            {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["optics1"]}))
        return [path]


def relion5_particles_table(particles: pd.DataFrame, optics_group: int = 1) -> pd.DataFrame:
    """The ``data_particles`` table of a RELION 5 particles.star for a ``particles`` table."""
    table = pd.DataFrame({"rlnTomoName": particles["ts_id"].astype(str).to_numpy()})
    for axis, column in zip("XYZ", XYZ_A):
        table[f"rlnCenteredCoordinate{axis}Angst"] = particles[column].to_numpy(np.float64)
    angles = _angles(particles)
    if np.isfinite(angles).any():
        for i, name in enumerate(("Rot", "Tilt", "Psi")):
            table[f"rlnAngle{name}"] = np.nan_to_num(angles[:, i], nan=0.0)
    for axis in "xyz":
        if f"origin_{axis}_A" in particles.columns:
            table[f"rlnOrigin{axis.upper()}Angst"] = particles[f"origin_{axis}_A"].fillna(0.0).to_numpy(np.float64)
    score = particles["score"].to_numpy(np.float64)
    if np.isfinite(score).any():
        table["rlnAutopickFigureOfMerit"] = np.where(np.isfinite(score), score, RELION_NO_SCORE)
    table["rlnRandomSubset"] = particles["half_set"].to_numpy(np.int64)
    table["rlnOpticsGroup"] = optics_group
    return table


# ----------------------------------------------------------------------------- imod
IMOD_VOXEL_CENTRE = np.array([0.5, 0.5, 0.0])  # model coordinates of the centre of voxel (0, 0, 0)


class Imod:
    name, suffixes = "imod", (".mod",)

    def read(self, path, frames, options):
        files = sorted(path.glob("*.mod")) if path.is_dir() else [path]
        if not files:
            raise InputFileError(path, "no IMOD models (*.mod) in this folder")
        if path.is_dir() and options.ts_id:
            raise TomopipeError(f"{path}: a folder of models names each tomogram by its file (<ts_id>.mod); "
                                f"give one file with a ts_id")
        tables = [self._read_one(file, options.ts_id or file.stem, frames) for file in files]
        return pd.concat(tables, ignore_index=True)

    @staticmethod
    def _read_one(path, ts_id, frames):
        if ts_id not in frames:
            raise InputFileError(path, f"no tomogram {ts_id!r} for this model (tomograms: "
                                       f"{', '.join(sorted(frames)) or 'none'}); name the tomogram it belongs to")
        points = read_imod_model(path)[["x", "y", "z"]].to_numpy(np.float64)
        return particles_table(ts_id, frames[ts_id].to_centred_A(points - IMOD_VOXEL_CENTRE))

    def write(self, path, particles, frames, options):
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for ts_id, group in particles.groupby("ts_id", sort=True):
            frame = frames[ts_id]
            points = frame.to_voxels(group[list(XYZ_A)].to_numpy(np.float64)) + IMOD_VOXEL_CENTRE
            out = path / f"{ts_id}.mod"
            write_imod_model(out, pd.DataFrame(points, columns=["x", "y", "z"]), image_size_xyz=frame.size_xyz_px)
            written.append(out)
        return written


# ----------------------------------------------------------------------------- copick
class Copick:
    name, suffixes = "copick", (".json",)

    def read(self, path, frames, options):
        files = sorted(path.rglob("Picks/*.json")) if path.is_dir() else [path]
        if not files:
            raise InputFileError(path, "no copick picks (ExperimentRuns/<run>/Picks/*.json) in this folder")
        return pd.concat([self._read_one(file, frames) for file in files], ignore_index=True)

    @staticmethod
    def _read_one(path, frames):
        try:
            document = json.loads(path.read_text())
            ts_id = str(document["run_name"]) if document.get("run_name") else path.parent.parent.name
            points = document.get("points") or []
            unit = document.get("unit", "angstrom")
            if unit != "angstrom":
                raise ValueError(f"unit {unit!r}; copick picks are in angstrom")
            location = np.array([[p["location"][a] for a in "xyz"] for p in points], dtype=np.float64).reshape(-1, 3)
            transforms = np.array([p.get("transformation_", np.eye(4).tolist()) for p in points], dtype=np.float64)
            score = np.array([np.nan if p.get("score") is None else p["score"] for p in points], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputFileError(path, f"not a copick picks file ({type(exc).__name__}: {exc})") from exc
        if ts_id not in frames:
            raise InputFileError(path, f"run {ts_id!r} has no tomogram (tomograms: {', '.join(sorted(frames))})")
        transforms = transforms.reshape(-1, 4, 4)
        angles = (np.stack(angles_from_matrices(transforms[:, :3, :3]), axis=1)
                  if document.get("trust_orientation", True) else None)
        frame = frames[ts_id]
        voxels = (location + transforms[:, :3, 3]) / frame.voxel_size_A
        return particles_table(ts_id, frame.to_centred_A(voxels.reshape(-1, 3)), angles, score)

    def write(self, path, particles, frames, options):
        written = []
        for ts_id, group in particles.groupby("ts_id", sort=True):
            frame = frames[ts_id]
            location = frame.to_voxels(group[list(XYZ_A)].to_numpy(np.float64)) * frame.voxel_size_A
            angles = _angles(group)
            known = bool(np.isfinite(angles).all())
            matrices = orientation_matrices(*angles.T) if known else np.broadcast_to(np.eye(3), (len(group), 3, 3))
            points = []
            for xyz, matrix, score in zip(location, matrices, group["score"].to_numpy(np.float64)):
                transform = np.eye(4)
                transform[:3, :3] = matrix
                points.append({"location": dict(zip("xyz", map(float, xyz))), "transformation_": transform.tolist(),
                               "instance_id": 0, "score": float(score) if math.isfinite(score) else None})
            document = {"pickable_object_name": options.object_name, "user_id": options.user_id,
                        "session_id": options.session_id, "run_name": ts_id, "voxel_spacing": frame.voxel_size_A,
                        "unit": "angstrom", "points": points, "trust_orientation": known}
            out = (path / "ExperimentRuns" / ts_id / "Picks"
                   / f"{options.user_id}_{options.session_id}_{options.object_name}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(document, indent=1) + "\n")
            written.append(out)
        return written


# ----------------------------------------------------------------------------- text
class Text:
    name, suffixes = "text", (".txt", ".tsv", ".coords")

    def read(self, path, frames, options):
        try:
            lines = [(number, line.split()) for number, line in enumerate(path.read_text().splitlines(), 1)
                     if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(path, f"cannot read text ({exc})") from exc
        units = options.units
        if lines and not _is_number(lines[0][1][1] if len(lines[0][1]) > 1 else "0"):
            units = self._header_units(path, lines.pop(0)[1])
        rows = [self._row(path, number, fields) for number, fields in lines]
        ts_ids = [r[0] for r in rows]
        values = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 7)
        xyz = values[:, :3]
        if units == "px":
            unknown = sorted(set(ts_ids) - set(frames))
            if unknown:
                raise InputFileError(path, f"no tomogram for {', '.join(map(repr, unknown))}")
            xyz = np.stack([frames[t].to_centred_A(p) for t, p in zip(ts_ids, xyz)]) if rows else xyz
        return particles_table(np.array(ts_ids, dtype=object), xyz, values[:, 3:6], values[:, 6])

    @staticmethod
    def _header_units(path, header):
        if header[:1] != ["ts_id"] or len(header) not in (4, 7, 8):
            raise InputFileError(path, f"header {' '.join(header)!r}: expected ts_id x_A y_A z_A "
                                       f"[rot_deg tilt_deg psi_deg [score]] (or x_px y_px z_px)")
        units = header[1].rpartition("_")[2]
        if units not in UNITS or header[1:4] != [f"{a}_{units}" for a in "xyz"]:
            raise InputFileError(path, f"header {' '.join(header)!r}: coordinates must be x_A y_A z_A "
                                       f"or x_px y_px z_px")
        return units

    @staticmethod
    def _row(path, number, fields):
        if len(fields) not in (4, 7, 8):
            raise InputFileError(path, f"line {number}: {len(fields)} columns; expected ts_id x y z "
                                       f"[rot tilt psi [score]]")
        try:
            numbers = [float(v) for v in fields[1:]]
        except ValueError:
            raise InputFileError(path, f"line {number}: {' '.join(fields[1:])!r} are not all numbers") from None
        return fields[0], (numbers + [math.nan] * 7)[:7]

    def write(self, path, particles, frames, options):
        if options.units not in UNITS:
            raise TomopipeError(f"units {options.units!r}: expected one of {', '.join(UNITS)}")
        xyz = particles[list(XYZ_A)].to_numpy(np.float64)
        if options.units == "px":
            xyz = np.stack([frames[t].to_voxels(p) for t, p in zip(particles["ts_id"], xyz)]) if len(xyz) else xyz
        header = ["ts_id", *(f"{a}_{options.units}" for a in "xyz"), *ANGLES_DEG, "score"]
        lines = [" ".join(header)]
        for ts_id, position, angles, score in zip(particles["ts_id"], xyz, _angles(particles),
                                                  particles["score"].to_numpy(np.float64)):
            lines.append(" ".join([str(ts_id), *(f"{v:.4f}" for v in position), *(f"{v:.4f}" for v in angles),
                                   f"{score:.6g}"]))
        write_text_atomic(path, "\n".join(lines) + "\n")
        return [path]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- registry
FORMATS: dict[str, PicksFormat] = {f.name: f for f in (Relion5(), Imod(), Copick(), Text())}


def picks_format(name: str) -> PicksFormat:
    if name not in FORMATS:
        raise TomopipeError(f"unknown picks format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def detect_format(path: str | os.PathLike) -> PicksFormat:
    """The format of a file by its suffix, or of a folder by what it holds (``*.mod``: imod;
    ``ExperimentRuns/*/Picks/*.json``: copick)."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.mod")):
            return FORMATS["imod"]
        if any(path.rglob("Picks/*.json")):
            return FORMATS["copick"]
        raise InputFileError(path, "a folder without IMOD models (*.mod) or copick picks (*/Picks/*.json)")
    for fmt in FORMATS.values():
        if path.suffix.lower() in fmt.suffixes:
            return fmt
    raise InputFileError(path, f"cannot tell the picks format from the suffix {path.suffix!r} "
                               f"(known: {', '.join(s for f in FORMATS.values() for s in f.suffixes)}); name it")


def read_picks(path: str | os.PathLike, tomograms: pd.DataFrame, fmt: str = "auto",
               options: PicksOptions = PicksOptions()) -> pd.DataFrame:
    """A ``particles`` table from a picks file or folder; every point checked against ``tomograms``."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    reader = detect_format(path) if fmt == "auto" else picks_format(fmt)
    frames = tomogram_frames(tomograms)
    particles = reader.read(path, frames, options)
    check_particles(particles, frames, str(path))
    return particles


def write_picks(path: str | os.PathLike, particles: pd.DataFrame, tomograms: pd.DataFrame, fmt: str,
                options: PicksOptions = PicksOptions()) -> list[Path]:
    """Write a ``particles`` table as ``fmt`` (a file, or a folder for imod and copick)."""
    writer, frames = picks_format(fmt), tomogram_frames(tomograms)
    check_particles(particles, frames, f"picks to write to {path}")
    return writer.write(Path(path), particles, frames, options)
