"""A 3-D auto-refine scored against the simulator's truth: the particles' poses and the map, and the map
the same crops give with the TRUE poses (the data's limit, reconstructed by the refinement's own code).

The refined map has the frame of its initial model (de novo: any rotation G and translation τ of the
truth), so the poses are compared after removing that frame. G from the particles' rotations
(``R_i ≈ T_i·S_i·G``, S_i in the point group): the candidate ``S·T_iᵀ·R_i`` of a few particles with the
smallest median error of ``R_i·Gᵀ`` against ``T_i`` modulo the group, then the rotation nearest the mean
of the particles' own frames within 10° of it. τ by least squares from the particle centres
(``c_i − t_i ≈ −R_i·τ``). Each refined particle is matched to the nearest true particle after the one
translation per tilt series that the tilt-series alignment leaves free
(:func:`tomopipe.validate.picking.free_translation_A`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.fsc import fsc_resolution_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.subtomo.auto_refine import reconstruct_series
from tomopipe.algorithms.subtomo.initial_model import rotate_and_shift
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group
from tomopipe.model.subtomograms import particle_shifts_A
from tomopipe.validate.map_score import score_map
from tomopipe.validate.picking import TRUTH_EULER, TRUTH_XYZ, free_translation_A
from tomopipe.validate.truth import Truth

__all__ = ["PoseErrors", "matched_truth", "pose_errors", "true_pose_reconstruction"]

XYZ = ["x_A", "y_A", "z_A"]
ANGLES = ["rot_deg", "tilt_deg", "psi_deg"]
FRAME_CANDIDATE_PARTICLES = 25
FRAME_INLIER_DEG = 10.0


@dataclass(frozen=True)
class PoseErrors:
    """Orientation errors (deg, modulo the symmetry) and offset errors (Å) per particle, after the map's
    frame: ``frame`` F ``[3, 3]`` and ``map_centre_A`` τ (x, y, z) with ``map(v) = truth(F·(v − τ))``."""

    orientation_deg: np.ndarray
    offset_A: np.ndarray
    frame: torch.Tensor
    map_centre_A: np.ndarray

    def map_in_truth_frame(self, volume: torch.Tensor, voxel_size_A: float) -> torch.Tensor:
        """``truth(w) ≈ map(Fᵀ·w + τ)``: the refined map turned and moved onto the truth's frame."""
        shift_px = -(self.frame.numpy() @ self.map_centre_A) / voxel_size_A
        return rotate_and_shift(volume.float(), self.frame.float(), torch.from_numpy(shift_px).float())

    def summary(self) -> dict:
        return {"orientation_error_median_deg": round(float(np.median(self.orientation_deg)), 2),
                "share_within_5_degrees": round(float((self.orientation_deg <= 5.0).mean()), 3),
                "offset_error_median_A": round(float(np.median(self.offset_A)), 2)}


def _rotations(table: pd.DataFrame, columns) -> torch.Tensor:
    return euler_relion_to_matrix(*(torch.tensor(table[c].to_numpy(np.float64)) for c in columns))


def matched_truth(items: pd.DataFrame, truth: Truth) -> tuple[torch.Tensor, np.ndarray]:
    """The nearest true particle of each item (same order): its rotation ``[m, 3, 3]`` and its centre
    ``[m, 3]`` (Å) in the items' frame (the free translation of each tilt series removed)."""
    rotations = torch.zeros((len(items), 3, 3), dtype=torch.float64)
    centres = np.zeros((len(items), 3))
    for ts_id, mine in items.groupby("ts_id", sort=False):
        true = truth.particles[truth.particles["rlnTomoName"] == ts_id]
        xyz = mine[XYZ].to_numpy(np.float64)
        true_xyz = true[list(TRUTH_XYZ)].to_numpy(np.float64)
        true_xyz = true_xyz - free_translation_A(xyz, true_xyz)
        nearest = np.linalg.norm(xyz[:, None] - true_xyz[None], axis=-1).argmin(1)
        where = items.index.get_indexer(mine.index)
        rotations[where] = _rotations(true.iloc[nearest], TRUTH_EULER)
        centres[where] = true_xyz[nearest]
    return rotations, centres


def pose_errors(items: pd.DataFrame, truth: Truth, symmetry: str) -> PoseErrors:
    """The refined poses of ``items`` (angles and RELION origins) against the truth (module docstring)."""
    items = items.reset_index(drop=True)
    true_rotations, true_centres = matched_truth(items, truth)
    refined = _rotations(items, ANGLES)
    group = symmetry_group(symmetry).to(torch.float64)
    probe = torch.linspace(0, len(items) - 1, min(FRAME_CANDIDATE_PARTICLES, len(items))).long()
    candidates = (group[None] @ true_rotations[probe].transpose(-1, -2)[:, None] @ refined[probe][:, None])
    frame = min(candidates.reshape(-1, 3, 3),
                key=lambda f: float(misorientation_deg(refined @ f.T, true_rotations, symmetry).median()))
    frame = _mean_frame(refined, true_rotations, group, frame)
    best = misorientation_deg(refined @ frame.T, true_rotations, symmetry)
    centres = items[XYZ].to_numpy(np.float64) + particle_shifts_A(items)
    moved = centres - true_centres
    r = refined.numpy()
    tau = -np.einsum("mba,mb->ma", r, moved).mean(0)  # least squares: c_i − t_i ≈ −R_i·τ
    offsets = np.linalg.norm(moved + np.einsum("mab,b->ma", r, tau), axis=1)
    return PoseErrors(best.numpy(), offsets, frame, tau)


def _mean_frame(refined: torch.Tensor, true: torch.Tensor, group: torch.Tensor, frame: torch.Tensor,
                inlier_deg: float = FRAME_INLIER_DEG, rounds: int = 3) -> torch.Tensor:
    """The frame refined as the rotation nearest the mean of the particles' own frames ``S·T_iᵀ·R_i``
    (each with the S nearest the current frame) within ``inlier_deg`` of it."""
    per_particle = group[None] @ true.transpose(-1, -2)[:, None] @ refined[:, None]  # [m, |G|, 3, 3]
    for _ in range(rounds):
        cosine = ((torch.einsum("ab,mgab->mg", frame, per_particle) - 1.0) / 2.0).clamp(-1.0, 1.0)
        angle_deg = torch.rad2deg(torch.arccos(cosine))
        nearest = per_particle[torch.arange(len(refined)), angle_deg.argmin(1)]
        inliers = angle_deg.amin(1) <= inlier_deg
        if not bool(inliers.any()):
            break
        u, _, vt = torch.linalg.svd(nearest[inliers].sum(0))
        d = torch.sign(torch.linalg.det(u @ vt))
        frame = u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=u.dtype)) @ vt
    return frame


def true_pose_reconstruction(series: list, items_per_series: list[pd.DataFrame], truth: Truth, symmetry: str,
                             pad_factor: int, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Half maps, full map and their FSC from the refinement's crops (``series``, one per tilt series, the
    rows of ``items_per_series``) with the true orientations and centres, by the refinement's own
    reconstruction: the best map these crops can give, in the truth's frame."""
    for s, rows in zip(series, items_per_series):
        rotations, centres = matched_truth(rows.reset_index(drop=True), truth)
        s.rotations = rotations
        s.shifts_A = torch.from_numpy(centres - rows[XYZ].to_numpy(np.float64))
    return reconstruct_series(series, symmetry_group(symmetry), pad_factor, device)


def true_pose_scores(maps: dict[str, torch.Tensor], curve: torch.Tensor, voxel_size_A: float, truth: Truth,
                     mask_diameter_A: float) -> dict:
    """FSC 0.5 of the true-pose map against the truth and its gold-standard (FSC 0.143) resolution."""
    score = score_map(maps["full"].float().cpu(), voxel_size_A, truth, mask_diameter_A)
    return {"true_pose_fsc_0_5_truth_A": score.resolution_fsc_0_5_A,
            "true_pose_gold_standard_A": round(fsc_resolution_A(curve, voxel_size_A, 0.143, maps["full"].shape[0]), 2)}
