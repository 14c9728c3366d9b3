"""The ``assign_alignment`` step: the alignment of a binned set attached to the unbinned set of
the same acquisition (IMOD .xf shifts scale with the pixel-size ratio), mismatches refused, and
the unbinned set reconstructed with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_reconstruct import TRIAD, peak_positions
from test_step_reconstruct import PIXEL_A, N, run, tomograms, write_set
from tomopipe.engine.step_api import step_class
from tomopipe.io.mrc import read_mrc
from tomopipe.model.alignment import xf_for_views
from tomopipe.project.store import Project

pytestmark = pytest.mark.usefixtures("one_thread")

WORKFLOW = """
[workflow]
name = "assign_test"
[steps.binned]
type = "test_tilt_series_table"
folder = "{data}"
name = "binned"
[steps.full]
type = "test_tilt_series_table"
folder = "{data}"
name = "{target}"
[steps.assign]
type = "assign_alignment"
source = "binned.tilt_series"
target = "full.tilt_series"
[steps.rec]
type = "reconstruct_tomogram"
tilt_series = "assign.tilt_series"
thickness_px = 32
super_sampling = 1
device = "cpu"
"""


def _items(tmp_path, step):
    with Project.open(tmp_path / "project") as project:
        record = project.sets_of_run(project.find_run(step).id)["tilt_series"]
        return project.read_items(record.id).sort_values("tilt_index").reset_index(drop=True), record.attrs


def test_title():
    assert step_class("assign_alignment").title == "tomo - tilt-series assign alignment"


def test_alignment_assigned_to_the_unbinned_set_and_reconstructed(tmp_path):
    data = tmp_path / "data"
    write_set(data, "binned", 2 * PIXEL_A, 32, aligned=True, disabled=(2,))
    write_set(data, "full", PIXEL_A, 64, aligned=False, disabled=(4,))
    report = run(tmp_path, WORKFLOW.format(data=data, target="full"))
    assert [o.status for o in report.outcomes] == ["finished"] * 4, [o.message for o in report.outcomes]
    source, _ = _items(tmp_path, "binned")
    out, attrs = _items(tmp_path, "assign")
    target, target_attrs = _items(tmp_path, "full")
    # angles and Å shifts carried over unchanged; the target's images, sections and pixel size kept
    for column in ("rot_z_deg", "rot_y_deg", "rot_x_deg", "shift_x_A", "shift_y_A", "magnification"):
        np.testing.assert_array_equal(out[column].to_numpy(), source[column].to_numpy())
    assert out["image_path"].tolist() == target["image_path"].tolist()
    assert out["image_section"].tolist() == target["image_section"].tolist()
    assert attrs["tilt_series"] == target_attrs["tilt_series"]
    assert attrs["assigned_alignment"]["pixel_size_ratio"] == {"TS_01": 2.0}
    assert out["enabled"].tolist() == [i not in (2, 4) for i in range(N)]
    # IMOD .xf: same rotation, DX/DY in target pixels = source pixels x (source / target pixel size)
    a_src, d_src = xf_for_views(source, 2 * PIXEL_A)
    a_out, d_out = xf_for_views(out, PIXEL_A)
    np.testing.assert_allclose(a_out, a_src)
    np.testing.assert_allclose(d_out, d_src * 2.0, rtol=1e-12)
    assert np.abs(d_out).max() > 1.0  # the shifts are not trivially zero
    # the unbinned set reconstructs with the assigned alignment (triad where it belongs)
    items, _, summary = tomograms(tmp_path, "rec")
    assert summary["views"] == {"TS_01": N - 2}
    volume, voxel = read_mrc(items["tomogram_path"][0])
    assert voxel == pytest.approx(PIXEL_A) and volume.shape == (32, 64, 64)
    found = peak_positions(torch.from_numpy(volume.copy()), TRIAD)
    for want, got in zip(TRIAD, found):
        assert max(abs(w - g) for w, g in zip(want, got)) <= 1


@pytest.mark.parametrize("target_kwargs, message", [
    ({"angle_error_deg": 1.0}, "tilt angles differ"),
    ({"n_views": N - 1}, f"{N} views in the source but {N - 1}"),
    ({"mdoc": "TS_02.mdoc"}, "different mdoc files"),
    ({"size_px": 48}, "different fields of view"),
])
def test_mismatched_acquisitions_are_refused(tmp_path, target_kwargs, message):
    data = tmp_path / "data"
    write_set(data, "binned", 2 * PIXEL_A, 32, aligned=True)
    kwargs = {"pixel_size_A": PIXEL_A, "size_px": 64, "aligned": False, **target_kwargs}
    write_set(data, "other", **kwargs)
    report = run(tmp_path, WORKFLOW.format(data=data, target="other"))
    outcome = next(o for o in report.outcomes if o.name == "assign")
    assert outcome.status == "failed"
    assert "TS_01" in outcome.message and message in outcome.message, outcome.message
