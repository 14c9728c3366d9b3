"""Scores of particle picks against the simulator's true particles.

As the CZII cryo-ET object-identification challenge scores them: a pick matches a true particle
when it lies within ``match_distance_A`` (half the particle radius; 30 Å for apoferritin), each
true particle matched at most once (an optimal one-to-one assignment); precision, recall, F1 and
F-β with β = 4 (recall weighted). Before matching, the one 3-D translation per tomogram that the
alignment leaves free (the tomogram's origin) is removed: it is the mode of the pick − truth
differences, found by voting and refined by the mean of the differences that agree with it.
Orientation error: the angle of the smallest rotation between a matched pick's orientation and
the true one, modulo the template's point-group symmetry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group

__all__ = ["PickScore", "free_translation_A", "match_picks", "score_picks"]

TRUTH_XYZ = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
TRUTH_EULER = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
PICK_XYZ = ("x_A", "y_A", "z_A")
PICK_EULER = ("rot_deg", "tilt_deg", "psi_deg")


@dataclass(frozen=True)
class PickScore:
    n_picks: int
    n_true: int
    true_positives: int
    precision: float
    recall: float
    f1: float
    f_beta4: float
    translation_removed_A: tuple[float, float, float]  #: added to the picks before matching
    median_position_error_A: float  #: of the matched picks, after the translation
    median_orientation_error_deg: float | None  #: modulo the symmetry; None without orientations

    def as_dict(self) -> dict:
        return asdict(self)


def free_translation_A(picks_A: np.ndarray, truth_A: np.ndarray, max_shift_A: float = 400.0,
                       bin_A: float = 10.0, agree_A: float = 30.0) -> np.ndarray:
    """The translation t (Å, x y z) that best maps picks onto true particles (``picks + t ≈ truth``):
    the densest cell of a ``bin_A`` histogram of all truth − pick differences within ``max_shift_A``
    (votes), refined by the mean of the differences within ``agree_A`` of it. Zero without votes."""
    if len(picks_A) == 0 or len(truth_A) == 0:
        return np.zeros(3)
    differences = (truth_A[None, :, :] - picks_A[:, None, :]).reshape(-1, 3)
    differences = differences[np.all(np.abs(differences) <= max_shift_A, axis=1)]
    if len(differences) == 0:
        return np.zeros(3)
    cells = np.floor(differences / bin_A).astype(np.int64)
    unique, counts = np.unique(cells, axis=0, return_counts=True)
    # a true translation may straddle cell borders: count each cell with its 26 neighbours
    offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    lookup = {tuple(c): n for c, n in zip(unique.tolist(), counts.tolist())}
    votes = [sum(lookup.get(tuple(c + o), 0) for o in offsets) for c in unique]
    centre = (unique[int(np.argmax(votes))] + 0.5) * bin_A
    for _ in range(3):
        near = differences[np.linalg.norm(differences - centre, axis=1) <= agree_A]
        if len(near) == 0:
            break
        centre = near.mean(axis=0)
    return centre


def match_picks(picks_A: np.ndarray, truth_A: np.ndarray, match_distance_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(pick_index, truth_index)`` of the optimal one-to-one matching (least total
    distance) among pairs closer than ``match_distance_A``."""
    if len(picks_A) == 0 or len(truth_A) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    distance = np.linalg.norm(picks_A[:, None, :] - truth_A[None, :, :], axis=-1)
    cost = np.where(distance <= match_distance_A, distance, 1e9)
    rows, cols = linear_sum_assignment(cost)
    keep = distance[rows, cols] <= match_distance_A
    return rows[keep], cols[keep]


def _f_beta(precision: float, recall: float, beta: float) -> float:
    denominator = beta**2 * precision + recall
    return float((1 + beta**2) * precision * recall / denominator) if denominator > 0 else 0.0


def score_picks(picks: pd.DataFrame, truth: pd.DataFrame, match_distance_A: float = 30.0,
                symmetry: str = "C1", orientations_known: bool = True,
                tomogram_half_size_A: tuple[float, float, float] | None = None) -> PickScore:
    """Score the picks of ONE tomogram (``x_A, y_A, z_A`` [, ``rot/tilt/psi_deg``]) against its
    true particles (RELION 5 ``particles.star`` columns). With ``tomogram_half_size_A`` (x, y, z),
    only the true particles whose centre lies inside the tomogram (after the free translation)
    count: the specimen may extend beyond the reconstructed volume."""
    picks_A = picks[list(PICK_XYZ)].to_numpy(np.float64)
    truth_A = truth[list(TRUTH_XYZ)].to_numpy(np.float64)
    shift = free_translation_A(picks_A, truth_A)
    if tomogram_half_size_A is not None:
        inside = np.all(np.abs(truth_A - shift) <= np.asarray(tomogram_half_size_A, np.float64), axis=1)
        truth, truth_A = truth[inside], truth_A[inside]
    rows, cols = match_picks(picks_A + shift, truth_A, match_distance_A)
    tp = len(rows)
    precision = tp / len(picks_A) if len(picks_A) else 0.0
    recall = tp / len(truth_A) if len(truth_A) else 0.0
    position_error = (float(np.median(np.linalg.norm(picks_A[rows] + shift - truth_A[cols], axis=1)))
                      if tp else float("nan"))
    orientation_error = None
    if orientations_known and tp and all(c in picks.columns for c in PICK_EULER):
        mine = euler_relion_to_matrix(*(torch.tensor(picks[c].to_numpy(np.float64)[rows]) for c in PICK_EULER))
        true = euler_relion_to_matrix(*(torch.tensor(truth[c].to_numpy(np.float64)[cols]) for c in TRUTH_EULER))
        orientation_error = float(torch.median(misorientation_deg(mine, true, symmetry_group(symmetry))))
    return PickScore(len(picks_A), len(truth_A), tp, float(precision), float(recall), _f_beta(precision, recall, 1.0),
                     _f_beta(precision, recall, 4.0), tuple(float(v) for v in shift), position_error,
                     orientation_error)
