"""Scores against the true map of a map made without the truth's frame (a de novo initial model): the
map is first superimposed on the true map (rotation over the point group's asymmetric unit, shift,
and both hands: :func:`~tomopipe.algorithms.subtomo.initial_model.align_volumes`), then scored as
any map (:func:`~tomopipe.validate.map_score.score_map`: the FSC against the truth inside a soft
sphere, resolution where it crosses 0.5). The hand is right when the map itself, not its mirror
image, fits the truth better.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tomopipe.algorithms.subtomo.initial_model import align_volumes
from tomopipe.io.mrc import read_mrc
from tomopipe.validate.map_score import score_map, true_map_like

__all__ = ["AlignedMapScore", "score_aligned_map", "score_aligned_map_file"]

#: Angular step (deg) of the alignment's first search (refined to a ninth of it).
ALIGN_STEP_DEG = 10.0


@dataclass(frozen=True)
class AlignedMapScore:
    resolution_fsc_0_5_A: float  #: FSC 0.5 against the truth after the alignment
    right_hand: bool  #: the map fits the truth better than its mirror image does
    correlation: float  #: normalised correlation of the aligned map (the better hand) with the truth
    other_hand_correlation: float  #: the same for the other hand


def score_aligned_map(volume: torch.Tensor, voxel_size_A: float, truth, symmetry: str,
                      mask_diameter_A: float) -> AlignedMapScore:
    """Align ``volume`` (cubic, even box, protein positive) to the true map at its voxel size and box,
    searching the asymmetric unit of ``symmetry`` and both hands, and score it (module docstring)."""
    volume = volume.to(torch.float32)
    true_map = true_map_like(truth, voxel_size_A, int(volume.shape[0]))
    alignment = align_volumes(volume, true_map, symmetry=symmetry, step_deg=ALIGN_STEP_DEG)
    score = score_map(alignment.aligned, voxel_size_A, truth, mask_diameter_A)
    return AlignedMapScore(score.resolution_fsc_0_5_A, not alignment.mirrored, alignment.correlation,
                           alignment.other_hand_correlation)


def score_aligned_map_file(path: Path, truth, symmetry: str, mask_diameter_A: float | None) -> AlignedMapScore:
    """:func:`score_aligned_map` of an MRC map (its voxel size from the header); without a mask
    diameter, 90 % of the box."""
    data, voxel_size_A = read_mrc(path)
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    diameter_A = mask_diameter_A or 0.9 * volume.shape[0] * voxel_size_A
    return score_aligned_map(volume, float(voxel_size_A), truth, symmetry, float(diameter_A))
