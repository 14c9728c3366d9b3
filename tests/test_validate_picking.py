"""The picking scores against the truth: free translation, one-to-one matching, F-beta."""

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.geometry import euler_relion_to_matrix, matrix_to_euler_relion, random_rotations
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.validate.picking import free_translation_A, match_picks, score_picks


def _truth(n: int, rng) -> pd.DataFrame:
    xyz = rng.uniform(-500, 500, (n, 3)) * np.array([1.0, 1.0, 0.2])
    rotations = random_rotations(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    rot, tilt, psi = matrix_to_euler_relion(rotations)
    return pd.DataFrame({"rlnCenteredCoordinateXAngst": xyz[:, 0], "rlnCenteredCoordinateYAngst": xyz[:, 1],
                         "rlnCenteredCoordinateZAngst": xyz[:, 2], "rlnAngleRot": rot.numpy(),
                         "rlnAngleTilt": tilt.numpy(), "rlnAnglePsi": psi.numpy()})


def test_free_translation_is_found_among_false_picks():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-500, 500, (120, 3))
    shift = np.array([37.0, -81.0, 12.5])
    picks = np.concatenate([truth[:100] - shift + rng.normal(0, 3, (100, 3)), rng.uniform(-500, 500, (40, 3))])
    found = free_translation_A(picks, truth)
    assert np.linalg.norm(found - shift) < 2.0


def test_matching_is_one_to_one_and_within_the_distance():
    truth = np.array([[0.0, 0, 0], [100.0, 0, 0]])
    picks = np.array([[5.0, 0, 0], [8.0, 0, 0], [100.0, 29.0, 0], [300.0, 0, 0]])
    rows, cols = match_picks(picks, truth, 30.0)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (2, 1)]


def test_scores_with_known_counts_and_orientation_error_modulo_symmetry():
    rng = np.random.default_rng(2)
    truth = _truth(100, rng)
    shift = np.array([20.0, -45.0, 8.0])
    found = truth.iloc[:80]  # recall 0.8
    xyz = found[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                 "rlnCenteredCoordinateZAngst"]].to_numpy() - shift
    # orientations: the true one times an octahedral symmetry element, then turned 5 degrees
    group = symmetry_group("O")
    true_rotations = euler_relion_to_matrix(*(torch.tensor(found[c].to_numpy()) for c in
                                              ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    turn = euler_relion_to_matrix(*torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64))
    mine = true_rotations @ group[torch.arange(80) % group.shape[0]] @ turn
    rot, tilt, psi = matrix_to_euler_relion(mine)
    false = rng.uniform(-500, 500, (20, 3)) * np.array([1.0, 1.0, 0.2]) + 2000.0  # 20 false picks far away
    picks = pd.DataFrame({"x_A": np.r_[xyz[:, 0], false[:, 0]], "y_A": np.r_[xyz[:, 1], false[:, 1]],
                          "z_A": np.r_[xyz[:, 2], false[:, 2]], "rot_deg": np.r_[rot.numpy(), np.zeros(20)],
                          "tilt_deg": np.r_[tilt.numpy(), np.zeros(20)], "psi_deg": np.r_[psi.numpy(), np.zeros(20)]})
    score = score_picks(picks, truth, 30.0, "O")
    assert score.true_positives == 80
    assert score.precision == pytest.approx(0.8) and score.recall == pytest.approx(0.8)
    assert score.f1 == pytest.approx(0.8)
    assert score.f_beta4 == pytest.approx(0.8)
    assert score.median_orientation_error_deg == pytest.approx(5.0, abs=1e-6)
    assert score_picks(picks, truth, 30.0, "C1").median_orientation_error_deg > 30.0
    # F-beta 4 weights recall: all true found plus as many false picks -> precision 0.5, recall 1
    doubled = pd.concat([picks.iloc[:80], picks.iloc[:80].assign(x_A=lambda d: d["x_A"] + 3000.0)])
    doubled = pd.concat([doubled, truth.iloc[80:].rename(columns={"rlnCenteredCoordinateXAngst": "x_A",
                                                                  "rlnCenteredCoordinateYAngst": "y_A",
                                                                  "rlnCenteredCoordinateZAngst": "z_A"})
                         .assign(x_A=lambda d: d["x_A"] - shift[0], y_A=lambda d: d["y_A"] - shift[1],
                                 z_A=lambda d: d["z_A"] - shift[2])])
    score = score_picks(doubled, truth, 30.0, "O", orientations_known=False)
    precision, recall = 100 / 180, 1.0
    assert score.recall == pytest.approx(recall)
    assert score.f_beta4 == pytest.approx(17 * precision * recall / (16 * precision + recall))
    assert score.median_orientation_error_deg is None
