"""The napari reader and writer of tomopipe projects, without napari: the reader's layer tuples
place the picks on the tomogram, and a points layer edited as napari would (a point deleted, one
added, one moved) saves back as a new coordinate set through the picks code."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from test_serve_api import PARTICLES_XYZ_PX, TOMOGRAM_VOXEL_A, TOMOGRAM_XYZ_PX, build_project
from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project
from tomopipe.serve.napari_plugin import napari_get_reader, points_edit, read_project, write_points


@pytest.fixture
def project_dir(tmp_path):
    return build_project(tmp_path / "project")


def test_the_reader_opens_tomograms_and_picks(project_dir, tmp_path):
    assert napari_get_reader(str(tmp_path)) is None  # not a project: not ours
    assert napari_get_reader(str(project_dir / "tomopipe.sqlite")) is read_project
    reader = napari_get_reader(str(project_dir))
    (volume, image_kwargs, image_type), (points, points_kwargs, points_type) = reader(str(project_dir))
    assert image_type == "image" and points_type == "points"
    assert volume.shape == TOMOGRAM_XYZ_PX[::-1] and image_kwargs["scale"] == (TOMOGRAM_VOXEL_A,) * 3
    np.testing.assert_allclose(points, PARTICLES_XYZ_PX[:, ::-1], atol=1e-6)  # [z, y, x] voxels
    assert points_kwargs["scale"] == image_kwargs["scale"]
    assert points_kwargs["features"]["item"].tolist() == [0, 1, 2, 3]
    z, y, x = np.round(points[0]).astype(int)
    shell = volume[z, y, x + 7]  # the simulated shell around the first pick is where the pick says
    assert shell > volume[z, y, x] + 0.5


def test_the_writer_saves_a_new_coordinate_set(project_dir, tmp_path):
    (_, _, _), (points, kwargs, _) = read_project(str(project_dir))
    items = kwargs["features"]["item"].copy()
    # as napari would: delete point 1, move point 2 by 3 voxels along x, add a point
    edited = np.delete(points, 1, axis=0)
    items = np.delete(items, 1)
    edited[1, 2] += 3.0
    edited = np.vstack([edited, [60.0, 100.0, 120.0]])
    items = np.append(items, -1)
    attributes = {"metadata": kwargs["metadata"], "features": {"item": items}}
    metadata, added, removed = points_edit(edited, attributes)
    assert removed == [1, 2] and np.allclose(added, [[153.0, 30.0, 70.0], [120.0, 100.0, 60.0]])

    note = tmp_path / "picks.tomopipe.json"
    assert write_points(str(note), edited, attributes) == [str(note)]
    written = json.loads(note.read_text())
    with Project.open(project_dir) as project:
        saved = project.read_items(written["particles_set_id"])
        assert project.get_run(written["run_id"]).step_type == "edit_picks"
    assert len(saved) == 6 and saved["enabled"].tolist() == [True, False, False, True, True, True]
    (_, _, _), (reread, reread_kwargs, _) = read_project(str(project_dir))
    assert len(reread) == 4 and reread_kwargs["metadata"]["particles_set_id"] == written["particles_set_id"]

    with pytest.raises(TomopipeError, match="nothing to save"):
        write_points(str(note), reread, {"metadata": reread_kwargs["metadata"], "features": reread_kwargs["features"]})
    with pytest.raises(TomopipeError, match="did not come from a tomopipe project"):
        write_points(str(note), reread, {"metadata": {}})


def test_the_manifest_names_the_functions():
    text = (resources.files("tomopipe.serve") / "napari.yaml").read_text()
    for name in ("tomopipe.serve.napari_plugin:napari_get_reader", "tomopipe.serve.napari_plugin:write_points"):
        module, function = name.split(":")
        assert name in text and callable(getattr(__import__(module, fromlist=[function]), function))
