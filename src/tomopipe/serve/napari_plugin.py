"""A napari reader and writer for tomopipe projects (RELION 5's viewer is napari), declared in
``napari.yaml`` (npe2 manifest, entry point ``napari.manifest``). Nothing here imports napari: the
reader returns plain ``(data, kwargs, layer_type)`` tuples and the writer takes napari's
``(path, data, attributes)``.

- Reader: a project folder (or its ``tomopipe.sqlite``) opens the newest tomograms set as image
  layers (``[z, y, x]`` memory-mapped, ``scale`` = voxel size in Å) and, for each tomogram, the
  enabled picks of the newest particle set on it as a points layer (``[z, y, x]`` voxels, same
  scale). Each point carries the feature ``item`` (its item number in the particle set; new points
  get −1) and the layer's metadata names the project and the sets.
- Writer (points): the layer's points become a new coordinate set in the project its metadata
  names, through the same code as ``tomopipe picks add|remove`` (an ``edit_picks`` run): points
  whose ``item`` is gone are removed, points with ``item`` −1 are added, moved points are both.
  The file napari asks for receives a one-line note of the run made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tomopipe.errors import TomopipeError
from tomopipe.project.store import DATABASE_NAME, Project

#: a point moved by more than this (voxels) is saved as removed + added
MOVED_PX = 0.5


def project_folder_of(path: str | Path) -> Path | None:
    """The project folder ``path`` names (the folder or its database file), or None."""
    path = Path(path)
    if path.is_file() and path.name == DATABASE_NAME:
        return path.parent
    if path.is_dir() and (path / DATABASE_NAME).is_file():
        return path
    return None


def napari_get_reader(path):
    """npe2 reader command: :func:`read_project` for a tomopipe project, else None (not ours)."""
    if isinstance(path, list):
        path = path[0] if len(path) == 1 else None
    return read_project if path is not None and project_folder_of(path) is not None else None


def read_project(path) -> list[tuple]:
    """Layer data tuples of a project: per tomogram an image layer and a points layer of its picks."""
    from tomopipe.export import lineage
    from tomopipe.io.mrc import read_mrc
    from tomopipe.model.particles import XYZ_A, tomogram_frames

    if isinstance(path, list):
        path = path[0]
    folder = project_folder_of(path)
    if folder is None:
        raise TomopipeError(f"{path}: not a tomopipe project (no {DATABASE_NAME})")
    layers = []
    with Project.open(folder) as project:
        tomogram_sets = project.finished_sets("tomograms")
        if not tomogram_sets:
            raise TomopipeError(f"{folder}: the project has no tomograms yet")
        tomograms = tomogram_sets[-1]
        items = project.read_items(tomograms.id, enabled_only=True)
        frames = tomogram_frames(items)
        picks = next((record for record in reversed(project.finished_sets("particles"))
                      if lineage(project, record).get("tomograms", None) is not None
                      and lineage(project, record)["tomograms"].id == tomograms.id), None)
        particles = project.read_items(picks.id) if picks is not None else None
        for row in items.itertuples():
            ts_id, voxel_A = str(row.ts_id), float(row.voxel_size_A)
            volume, _ = read_mrc(project.absolute_path(row.tomogram_path), mmap=True)
            metadata = {"tomopipe_project": str(folder), "tomograms_set_id": tomograms.id, "ts_id": ts_id}
            layers.append((volume, {"name": f"{ts_id} (tomograms set {tomograms.id})", "scale": (voxel_A,) * 3,
                                    "metadata": metadata}, "image"))
            index = np.zeros(0, dtype=np.int64)
            zyx = np.zeros((0, 3))
            if particles is not None:
                mine = np.flatnonzero((particles["ts_id"].to_numpy() == ts_id) & particles["enabled"].to_numpy(bool))
                index = mine.astype(np.int64)
                xyz = frames[ts_id].to_voxels(particles.loc[mine, list(XYZ_A)].to_numpy(np.float64))
                zyx = xyz[:, ::-1].copy()
            layers.append((zyx, {
                "name": f"picks {ts_id}" + (f" (particles set {picks.id})" if picks is not None else ""),
                "scale": (voxel_A,) * 3, "size": 2 * max(3.0, 60.0 / voxel_A), "face_color": "transparent",
                "border_color": "lime", "features": {"item": index}, "feature_defaults": {"item": -1},
                "metadata": {**metadata, "particles_set_id": None if picks is None else picks.id,
                             "item_positions_px": {int(i): p.tolist() for i, p in zip(index, zyx)}}}, "points"))
    return layers


def _items_of(attributes: dict, n_points: int) -> np.ndarray:
    """The ``item`` feature (or property) of each point; −1 for new points."""
    for key in ("features", "properties"):
        table = attributes.get(key)
        if table is not None and "item" in table:
            values = np.asarray(table["item"], dtype=np.float64)
            if len(values) == n_points:
                return np.where(np.isfinite(values), values, -1).astype(np.int64)
    return np.full(n_points, -1, dtype=np.int64)


def points_edit(data, attributes: dict) -> tuple[dict, list[list[float]], list[int]]:
    """What saving a points layer changes: ``(metadata, added [x, y, z] voxels, removed item numbers)``."""
    metadata = attributes.get("metadata") or {}
    if "tomopipe_project" not in metadata or "ts_id" not in metadata:
        raise TomopipeError("this points layer did not come from a tomopipe project (its metadata names no "
                            "tomopipe_project / ts_id): open the project with the tomopipe reader first")
    zyx = np.asarray(data, dtype=np.float64).reshape(-1, 3)
    items = _items_of(attributes, len(zyx))
    original = {int(k): np.asarray(v, dtype=np.float64) for k, v in (metadata.get("item_positions_px") or {}).items()}
    kept, added = set(), []
    for point, item in zip(zyx, items):
        if item >= 0 and item in original and np.linalg.norm(point - original[item]) <= MOVED_PX:
            kept.add(int(item))
        else:
            added.append(point[::-1].tolist())
    removed = sorted(set(original) - kept)
    return metadata, added, removed


def write_points(path: str, data, attributes: dict) -> list[str]:
    """npe2 writer of a points layer: a new coordinate set in the project (see the module)."""
    from tomopipe.edits import edit_picks
    from tomopipe.project.lock import project_lock

    metadata, added, removed = points_edit(data, attributes)
    if not added and not removed:
        raise TomopipeError("no pick was added, moved or removed: nothing to save")
    folder = Path(metadata["tomopipe_project"])
    source = metadata.get("particles_set_id") or metadata["tomograms_set_id"]
    ts_id = metadata["ts_id"]
    values = {"units": "px", "add": ";".join(f"{ts_id}:{x:.3f},{y:.3f},{z:.3f}" for x, y, z in added),
              "remove_index": ",".join(map(str, removed))}
    with project_lock(folder), Project.open(folder) as project:
        outcome = edit_picks(project, project.get_set(int(source)).run_id, values, "picks_napari")
        if outcome.status != "finished":
            raise TomopipeError(f"saving the picks failed: {outcome.message}")
        new_set = project.sets_of_run(outcome.run.id)["particles"]
    note = {"tomopipe_project": str(folder), "run_id": outcome.run.id, "particles_set_id": new_set.id,
            "added": len(added), "removed": len(removed)}
    Path(path).write_text(json.dumps(note) + "\n", encoding="utf-8")
    return [str(path)]
