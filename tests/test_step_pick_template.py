"""The template-matching pick step on a synthetic tomogram: hollow shells at known places found with a
shell template (F1 = 1, positions to a voxel), and the bad inputs the issue names refused clearly,
leaving no finished run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.filters import bandpass
from tomopipe.algorithms.picking.template import shell_template
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.io.mrc import write_mrc
from tomopipe.project.store import Project
from tomopipe.steps.pick_template import PickTemplateMatching
from tomopipe.validate.picking import match_picks

VOXEL_A = 8.0
SHAPE_ZYX = (48, 80, 88)
DIAMETER_A, INNER_A = 120.0, 80.0


def _synthetic_tomogram(seed: int = 0):
    """Dark hollow shells (protein darker than ice, as in a tomogram of raw images) in a slab, plus
    band-limited noise; returns the volume and the true centres in Å from the centre (x, y, z)."""
    rng = np.random.default_rng(seed)
    box = 20
    shell = shell_template(box, VOXEL_A, DIAMETER_A, INNER_A).numpy()
    volume = np.zeros(SHAPE_ZYX, np.float32)
    centres = []
    while len(centres) < 14:
        c = np.array([rng.integers(16, 32), rng.integers(3, SHAPE_ZYX[1] - 3), rng.integers(3, SHAPE_ZYX[2] - 3)])
        if all(np.linalg.norm(c - o) > 17 for o in centres):
            centres.append(c)
    padded = np.pad(volume, box)
    for z, y, x in centres:
        h = box // 2
        padded[box + z - h:box + z + h, box + y - h:box + y + h, box + x - h:box + x + h] -= shell
    volume = padded[box:-box, box:-box, box:-box]
    white = torch.from_numpy(rng.normal(size=SHAPE_ZYX).astype(np.float32))
    noise = torch.fft.irfftn(torch.fft.rfftn(white) * bandpass(SHAPE_ZYX, VOXEL_A, 400.0, 20.0), s=SHAPE_ZYX)
    volume = volume + 0.6 * float(volume.std()) / float(noise.std()) * noise.numpy()
    centres_A = [(np.array([x, y, z], float) - np.array(SHAPE_ZYX[::-1]) / 2) * VOXEL_A for z, y, x in centres]
    return volume.astype(np.float32), np.array(centres_A)


def _project_with(tmp_path, volumes: dict[str, np.ndarray], voxel_sizes: dict[str, float] | None = None):
    project = Project.init(tmp_path / "p")
    run = project.create_run("reconstruct", "reconstruct", {}, {}, "tomograms")
    rows = []
    for ts_id, volume in volumes.items():
        path = project.absolute_path(run.folder) / f"{ts_id}.mrc"
        voxel = (voxel_sizes or {}).get(ts_id, VOXEL_A)
        write_mrc(path, volume, voxel)
        nz, ny, nx = volume.shape
        rows.append({"ts_id": ts_id, "tomogram_path": project.relative_path(path), "voxel_size_A": voxel,
                     "size_x_px": nx, "size_y_px": ny, "size_z_px": nz})
    record = project.add_set(run.id, "tomograms", "tomograms", pd.DataFrame(rows), {"tilt_series": {}})
    project.finish_run(run.id)
    return project, record


PARAMS = {"template": "shell", "particle_diameter_A": DIAMETER_A, "inner_diameter_A": INNER_A,
          "ctf_weighting": False, "symmetry": "O"}


def _pick(project, record, **changes):
    return run_on_sets(project, PickTemplateMatching, "pick", {**PARAMS, **changes}, {"tomograms": record},
                       LocalExecutor(1))


def test_shells_are_found_with_a_shell_template(tmp_path):
    volume, truth_A = _synthetic_tomogram()
    project, record = _project_with(tmp_path, {"TS_01": volume})
    with project:
        outcome = _pick(project, record)
        assert outcome.status == "finished", outcome.message
        picks = project.read_items(project.sets_of_run(outcome.run.id)["particles"].id)
        attrs = project.sets_of_run(outcome.run.id)["particles"].attrs
    xyz = picks[["x_A", "y_A", "z_A"]].to_numpy()
    rows, cols = match_picks(xyz, truth_A, 0.5 * VOXEL_A * 2)
    assert len(rows) == len(truth_A) == len(picks)  # every shell, nothing else, within a voxel
    assert np.median(np.linalg.norm(xyz[rows] - truth_A[cols], axis=1)) < 0.5 * VOXEL_A
    assert sorted(picks["half_set"].value_counts().tolist()) == [7, 7]
    assert attrs["picking"]["orientation_known"] is False and attrs["picking"]["rotations"] == 1
    assert attrs["tomograms"]["TS_01"]["size_xyz_px"] == [88, 80, 48]
    assert outcome.summary["picks"]["TS_01"]["threshold"] < picks["score"].min()


@pytest.mark.parametrize("case, message", [
    ("constant", "empty"),
    ("voxel sizes", "several voxel sizes"),
    ("mask", "does not fit in a box"),
    ("threshold", "no pick in any tomogram"),
    ("symmetry", "symmetry"),
])
def test_bad_input_is_refused_clearly(tmp_path, case, message):
    volume, _ = _synthetic_tomogram(1)
    volumes = {"TS_01": np.zeros(SHAPE_ZYX, np.float32) if case == "constant" else volume}
    sizes = None
    if case == "voxel sizes":
        volumes["TS_02"] = volume
        sizes = {"TS_02": 4.0}
    changes = {"mask": {"box_px": 12}, "threshold": {"min_score": 0.999}, "symmetry": {"symmetry": "Q7"}}
    project, record = _project_with(tmp_path, volumes, sizes)
    with project:
        outcome = _pick(project, record, **changes.get(case, {}))
        assert outcome.status == "failed"
        assert message in outcome.message
        assert not project.finished_sets("particles")
