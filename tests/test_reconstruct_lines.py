"""Super-sampling along lines (:mod:`tomopipe.algorithms.reconstruct`): the workflow's path (raw
views + alignment, super-sampling 2, no x-tilt) against the fine-grid back projection with
Fourier cropping that it replaces, and its two back projectors against each other."""

from __future__ import annotations

import math

import pytest
import torch

import tomopipe.algorithms.reconstruct as reconstruct
from test_reconstruct import TRIAD, blobs_volume, corr, project_blobs, random_centres
from tomopipe.algorithms.reconstruct import HAVE_NUMBA, ReconstructionParams, projection_matrices, reconstruct_volume

pytestmark = pytest.mark.usefixtures("one_thread")

TILTS = torch.arange(-40.0, 40.01, 2.0, dtype=torch.float64)  # the small preset's tilts


def _raw_views(seed: int = 5):
    """Blob views as the workflow reconstructs them: the tilt axis near x (-84.5° ± 0.2°), shifts
    and magnifications from an alignment; 72 x 64 px at 2 Å."""
    g = torch.Generator().manual_seed(seed)
    n = len(TILTS)
    rot_z = -84.5 + torch.randn(n, generator=g, dtype=torch.float64) * 0.2
    shifts_px = torch.randn((n, 2), generator=g, dtype=torch.float64) * 3
    mag = 1 + torch.randn(n, generator=g, dtype=torch.float64) * 0.01
    centres = TRIAD + random_centres(40, seed=2)
    images = project_blobs(centres, rot_z, TILTS, 0.0, shifts_px, size=(72, 64))
    return images, rot_z, shifts_px * 2.0, mag, centres


def test_line_directions_are_the_axis_normal_and_need_no_x_tilt():
    """The line of a view is the image direction of the volume's x and z: (cos rot_z, sin rot_z)
    whatever the tilt and magnification; x-tilt moves z off that line (no line path)."""
    rot_z = torch.tensor([-84.5, 10.0, 80.0], dtype=torch.float64)
    rot_y = torch.tensor([-40.0, 0.0, 30.0], dtype=torch.float64)
    m, _ = projection_matrices(rot_z, rot_y, 0.0, torch.zeros(3, 2), 1.0, torch.tensor([1.0, 1.02, 0.98]))
    e = reconstruct._line_directions(m)
    expected = torch.stack([torch.cos(torch.deg2rad(rot_z)), torch.sin(torch.deg2rad(rot_z))], dim=1)
    torch.testing.assert_close(e.abs(), expected.abs(), rtol=0, atol=1e-12)
    tilted, _ = projection_matrices(rot_z, rot_y, 2.0, torch.zeros(3, 2), 1.0)
    assert reconstruct._line_directions(tilted) is None


@pytest.mark.parametrize("super_sampling", [2, 3])
def test_supersampled_lines_equal_the_fine_grid(monkeypatch, super_sampling):
    """The line path gives the tomogram of the fine-grid path (back projection on the s-times finer
    x-z grid, then Fourier cropping) within 4 % RMS, and the same correlation with the truth."""
    images, rot_z, shifts_A, mag, centres = _raw_views()
    params = ReconstructionParams(thickness_px=31, super_sampling=super_sampling)
    args = (images, rot_z, TILTS, 0.0, shifts_A, 2.0, params, mag)
    lines = reconstruct_volume(*args)
    monkeypatch.setattr(reconstruct, "_line_directions", lambda m: None)
    fine_grid = reconstruct_volume(*args)
    assert lines.shape == fine_grid.shape == (31, 72, 64)
    assert float((lines - fine_grid).norm() / fine_grid.norm()) < 0.04
    assert corr(lines, fine_grid) > 0.999
    truth = blobs_volume(centres, (31, 72, 64))
    assert corr(lines, truth) == pytest.approx(corr(fine_grid, truth), abs=0.002)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("axis_deg", [80.0, 10.0, -84.5])
def test_line_path_compiled_equals_grid_sample(axis_deg):
    """Both back projectors of the line path (numba; torch ``grid_sample``) read the same lines
    at the same places: random views with content up to the edges, a varying axis, large shifts,
    magnifications, SHIFT x/z, a width and thickness that do not match the views, slabs of 7 rows."""
    g = torch.Generator().manual_seed(12)
    n = 9
    tilts = torch.linspace(-57.0, 48.0, n, dtype=torch.float64)
    rot_z = axis_deg + torch.randn(n, generator=g, dtype=torch.float64) * 3
    shifts_A = torch.randn((n, 2), generator=g, dtype=torch.float64) * 12.0
    mag = 1.0 + torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    images = torch.randn((n, 37, 50), generator=g)
    params = ReconstructionParams(thickness_px=15, width_px=41, super_sampling=2, shift_x_px=2.5,
                                  shift_z_px=-1.75, slab_rows=7)
    args = (images, rot_z, tilts, 0.0, shifts_A, 1.5, params, mag)
    compiled = reconstruct_volume(*args, use_compiled=True)
    reference = reconstruct_volume(*args, use_compiled=False)
    along = 50 if abs(math.sin(math.radians(axis_deg))) > math.sqrt(0.5) else 37
    assert compiled.shape == reference.shape == (15, along, 41)
    scale = float(reference.abs().max())
    torch.testing.assert_close(compiled, reference, rtol=0, atol=5e-5 * scale)
