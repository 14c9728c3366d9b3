"""The refinement's scores against the truth (validate/refinement.py) on known values: a refined set whose
poses are the truth seen in another frame (a rotation G and a translation τ of the map, one free
translation per tilt series), with known orientation and offset errors added."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.fsc import fsc_resolution_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix, matrix_to_euler_relion, random_rotations
from tomopipe.algorithms.subtomo.initial_model import rotate_and_shift
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.validate.map_score import without_short_dips
from tomopipe.validate.picking import TRUTH_EULER, TRUTH_XYZ
from tomopipe.validate.refinement import PoseErrors, pose_errors
from tomopipe.validate.truth import Truth


def _axis_angle(axis: torch.Tensor, angle_deg: float) -> torch.Tensor:
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    a = np.radians(angle_deg)
    return torch.eye(3, dtype=torch.float64) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def test_pose_errors_remove_the_map_frame_and_find_the_added_errors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    m = 60
    true_rot = random_rotations(m, generator, dtype=torch.float64)
    true_xyz = rng.uniform(-600, 600, (m, 3))
    ts = np.where(np.arange(m) < 30, "TS_01", "TS_02")
    truth_table = pd.DataFrame({"rlnTomoName": ts, **dict(zip(TRUTH_XYZ, true_xyz.T)),
                                **dict(zip(TRUTH_EULER, (a.numpy() for a in matrix_to_euler_relion(true_rot))))})
    truth = Truth(tmp_path)
    truth.__dict__["particles"] = truth_table  # the cached table, without files

    frame = random_rotations(1, generator, dtype=torch.float64)[0]
    group = symmetry_group("O").to(torch.float64)
    symmetric = group[torch.randint(0, 24, (m,), generator=generator)]  # each particle's pose, any O copy
    error_deg = np.where(np.arange(m) % 3 == 0, 20.0, 2.0)  # a third of the particles 20° off
    wobble = torch.stack([_axis_angle(torch.randn(3, generator=generator, dtype=torch.float64), e) for e in error_deg])
    refined = wobble @ true_rot @ symmetric @ frame
    tau = np.array([4.0, -3.0, 2.0])  # the map's own centre
    direction = rng.normal(size=(m, 3))
    offset_error = 1.5 * direction / np.linalg.norm(direction, axis=1, keepdims=True)  # 1.5 Å off, any direction
    free = {"TS_01": np.array([30.0, -20.0, 10.0]), "TS_02": np.array([-15.0, 5.0, 0.0])}
    positions = true_xyz - np.stack([free[t] for t in ts]) + rng.normal(0, 1.0, (m, 3))  # crops cut near
    centres = true_xyz - np.stack([free[t] for t in ts]) - np.einsum("mab,b->ma", refined.numpy(), tau) + offset_error
    rot, tilt, psi = matrix_to_euler_relion(refined)
    items = pd.DataFrame({"ts_id": ts, "x_A": positions[:, 0], "y_A": positions[:, 1], "z_A": positions[:, 2],
                          "rot_deg": rot.numpy(), "tilt_deg": tilt.numpy(), "psi_deg": psi.numpy(),
                          **{f"origin_{a}_A": positions[:, i] - centres[:, i] for i, a in enumerate("xyz")}})
    assert torch.allclose(euler_relion_to_matrix(rot, tilt, psi), refined, atol=1e-9)
    errors = pose_errors(items, truth, "O")
    np.testing.assert_allclose(errors.orientation_deg, error_deg, atol=0.5)  # the frame: a mean of 2° errors
    # τ and the free translations are estimated from the particles, their errors and all
    assert abs(float(np.median(errors.offset_A)) - 1.5) < 0.25 and float(errors.offset_A.max()) < 2.5
    summary = errors.summary()
    assert abs(summary["orientation_error_median_deg"] - 2.0) < 0.3
    assert summary["share_within_5_degrees"] == round(2 / 3, 3)


def test_the_map_is_put_on_the_truth_frame_by_the_particles_frame():
    """A map made as ``truth(F·(v − τ))`` comes back onto the truth by :meth:`PoseErrors.map_in_truth_frame`."""
    generator = torch.Generator().manual_seed(4)
    n, voxel_A = 32, 2.0
    axis = (torch.arange(n, dtype=torch.float32) - n // 2) * voxel_A
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    centres = (torch.rand((6, 3), generator=generator) - 0.5) * 30.0
    truth = sum(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 18.0) for cx, cy, cz in centres)
    frame = random_rotations(1, generator, dtype=torch.float64)[0]
    tau_A = np.array([3.0, -2.0, 5.0])
    refined_map = rotate_and_shift(truth, frame.T.float(), torch.tensor(tau_A / voxel_A, dtype=torch.float32))
    errors = PoseErrors(np.zeros(1), np.zeros(1), frame, tau_A)
    back = errors.map_in_truth_frame(refined_map, voxel_A)
    before = float(torch.corrcoef(torch.stack([refined_map.reshape(-1), truth.reshape(-1)]))[0, 1])
    after = float(torch.corrcoef(torch.stack([back.reshape(-1), truth.reshape(-1)]))[0, 1])
    print("correlation with the truth before / after:", before, after)
    assert after > 0.99 and before < 0.5


def test_short_dips_of_the_fsc_are_not_crossings():
    """A dip of two shells below 0.5 that the curve climbs out of is filled; three shells, or a dip that
    runs to Nyquist, is a crossing."""
    curve = torch.tensor([1.0, 0.9, 0.46, 0.47, 0.7, 0.6, 0.45, 0.44, 0.43, 0.6, 0.3])
    filled = without_short_dips(curve, 0.5)
    assert filled[2:4].tolist() == [0.5, 0.5] and torch.equal(filled[6:9], curve[6:9].double())
    assert float(filled[-1]) == pytest.approx(0.3)  # the last shell: below to Nyquist
    # the first sustained crossing, between shells 5 (0.6) and 6 (0.45) of a 20-px box at 2 Å
    assert fsc_resolution_A(filled, 2.0, 0.5) == pytest.approx(40.0 / (5 + 0.1 / 0.15), rel=0.02)
    assert fsc_resolution_A(curve, 2.0, 0.5) > 40.0 / 3  # the raw curve's first crossing: the dip at shell 2
