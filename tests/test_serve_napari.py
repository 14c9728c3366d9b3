"""The napari reader and writer of tomopipe projects, without napari, on the tiny tutorial's project
(``tests/tiny_tutorial.py``): the reader's layer tuples place the picks of the pick step on the particles of the
reconstructed tomograms, and a points layer edited as napari would (a point deleted, one added, one moved) saves back
as a new coordinate set through the picks code."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from tiny_tutorial import TINY_TOMOGRAM_VOXEL_A, TINY_TOMOGRAM_XYZ_PX, copy_project
from tomopipe.errors import TomopipeError
from tomopipe.model.particles import XYZ_A, tomogram_frames
from tomopipe.project.store import Project
from tomopipe.serve.napari_plugin import napari_get_reader, points_edit, read_project, write_points


@pytest.fixture
def project_dir(tiny_tutorial_project, tmp_path):
    return copy_project(tiny_tutorial_project, tmp_path / "project")


def _picks_zyx_px(project_dir, ts_id: str) -> tuple[int, np.ndarray]:
    """The pick step's particle set and its enabled picks on ``ts_id`` in ``[z, y, x]`` voxels, from the database."""
    with Project.open(project_dir) as project:
        picks = project.sets_of_run(project.find_run("pick").id)["particles"]
        items = project.read_items(picks.id)
        frame = tomogram_frames(project.read_items(project.finished_sets("tomograms")[-1].id))[ts_id]
    mine = items[(items["ts_id"] == ts_id) & items["enabled"]]
    return picks.id, frame.to_voxels(mine[list(XYZ_A)].to_numpy(np.float64))[:, ::-1]


def test_the_reader_opens_tomograms_and_picks(project_dir, tmp_path):
    assert napari_get_reader(str(tmp_path)) is None  # not a project: not ours
    assert napari_get_reader(str(project_dir / "tomopipe.sqlite")) is read_project
    reader = napari_get_reader(str(project_dir))
    layers = reader(str(project_dir))
    assert [layer_type for _, _, layer_type in layers] == ["image", "points"] * 2  # one pair per tomogram
    (volume, image_kwargs, _), (points, points_kwargs, _) = layers[:2]
    assert image_kwargs["metadata"]["ts_id"] == "TS_01" and layers[2][1]["metadata"]["ts_id"] == "TS_02"
    assert volume.shape == TINY_TOMOGRAM_XYZ_PX[::-1] and image_kwargs["scale"] == (TINY_TOMOGRAM_VOXEL_A,) * 3
    picks_set, expected = _picks_zyx_px(project_dir, "TS_01")
    assert points_kwargs["metadata"]["particles_set_id"] == picks_set
    np.testing.assert_allclose(points, expected, atol=1e-6)  # [z, y, x] voxels
    assert points_kwargs["scale"] == image_kwargs["scale"]
    assert len(points_kwargs["features"]["item"]) == len(points) >= 10
    # the points sit on the particles: around each, in its section, the protein shell (6-10 voxels) is dark
    volume = np.asarray(volume, dtype=np.float64)
    y, x = np.indices(volume.shape[1:])
    shell = [volume[round(pz)][(np.hypot(x - px, y - py) >= 6) & (np.hypot(x - px, y - py) < 8.5)].mean()
             for pz, py, px in points if 8 <= pz <= volume.shape[0] - 8]
    assert len(shell) >= 5 and np.median(shell) < volume.mean() - 1.0 * volume.std(), shell


def test_the_writer_saves_a_new_coordinate_set(project_dir, tmp_path):
    (_, _, _), (points, kwargs, _) = read_project(str(project_dir))[:2]
    items = kwargs["features"]["item"].copy()
    # as napari would: delete point 1, move point 2 by 3 voxels along x, add a point
    edited = np.delete(points, 1, axis=0)
    items = np.delete(items, 1)
    edited[1, 2] += 3.0
    edited = np.vstack([edited, [16.0, 100.0, 120.0]])
    items = np.append(items, -1)
    attributes = {"metadata": kwargs["metadata"], "features": {"item": items}}
    metadata, added, removed = points_edit(edited, attributes)
    moved_xyz = points[2, ::-1] + [3.0, 0.0, 0.0]
    assert removed == sorted(kwargs["features"]["item"][1:3].tolist())
    np.testing.assert_allclose(added, [moved_xyz, [120.0, 100.0, 16.0]])

    note = tmp_path / "picks.tomopipe.json"
    assert write_points(str(note), edited, attributes) == [str(note)]
    written = json.loads(note.read_text())
    with Project.open(project_dir) as project:
        source = project.read_items(kwargs["metadata"]["particles_set_id"])
        saved = project.read_items(written["particles_set_id"])
        assert project.get_run(written["run_id"]).step_type == "edit_picks"
    assert len(saved) == len(source) + 2
    assert np.flatnonzero(~saved["enabled"].to_numpy()).tolist() == removed
    (_, _, _), (reread, reread_kwargs, _) = read_project(str(project_dir))[:2]
    assert len(reread) == len(points) and reread_kwargs["metadata"]["particles_set_id"] == written["particles_set_id"]
    np.testing.assert_allclose(reread[-2:], [moved_xyz[::-1], [16.0, 100.0, 120.0]], atol=1e-3)

    with pytest.raises(TomopipeError, match="nothing to save"):
        write_points(str(note), reread, {"metadata": reread_kwargs["metadata"], "features": reread_kwargs["features"]})
    with pytest.raises(TomopipeError, match="did not come from a tomopipe project"):
        write_points(str(note), reread, {"metadata": {}})


def test_the_manifest_names_the_functions():
    text = (resources.files("tomopipe.serve") / "napari.yaml").read_text()
    for name in ("tomopipe.serve.napari_plugin:napari_get_reader", "tomopipe.serve.napari_plugin:write_points"):
        module, function = name.split(":")
        assert name in text and callable(getattr(__import__(module, fromlist=[function]), function))
