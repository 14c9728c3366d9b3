"""Scores of a reconstructed map against the simulator's true map.

The true map (``truth/maps/true_map_binN.mrc``, the structure's potential in the frame of the
particles' RELION angles) is brought to the map's voxel size (Fourier resampling) and box (centred
pad or crop, centre voxel ``n // 2``). Both are compared inside a soft sphere: the FSC against the
truth (resolution where it falls below 0.5 for at least three shells, or to Nyquist: apoferritin is a
hollow shell whose power has minima at a few frequencies, where one or two shells dip, e.g. to 0.46 at
5.8 Å between 0.55 and 0.69 for a 4.2 Å map at 1.58 Å voxels; the map's true resolution, to be compared
with the gold standard at 0.143) and against the truth's mirror image (a map of the right hand correlates better
with the truth than with its mirror). The map must be in the truth's frame (poses given in it, or
aligned to it first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tomopipe.algorithms.fourier import crop_centered, embed_centered
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A
from tomopipe.algorithms.picking.template import resample_volume, spherical_mask
from tomopipe.validate.tomogram.render import truth_map_for_voxel_size

__all__ = ["MapScore", "score_map", "true_map_like", "without_short_dips"]

SUSTAINED_SHELLS = 3  #: a crossing of the FSC against the truth counts once it stays below for this many shells


@dataclass(frozen=True)
class MapScore:
    resolution_fsc_0_5_A: float  #: where the FSC against the truth first falls below 0.5
    resolution_fsc_0_143_A: float  #: the same at 0.143
    mean_fsc_truth: float  #: mean FSC against the truth up to the 0.5 resolution
    mean_fsc_mirror: float  #: mean FSC against the mirrored truth over the same shells
    fsc_truth: list[float]
    fsc_mirror: list[float]

    @property
    def right_hand(self) -> bool:
        return self.mean_fsc_truth > self.mean_fsc_mirror


def true_map_like(truth, voxel_size_A: float, box_px: int) -> torch.Tensor:
    """The true map at ``voxel_size_A`` in a ``box_px``³ box (float32 ``[z, y, x]``, centre ``box // 2``)."""
    reference, reference_voxel_A = truth_map_for_voxel_size(truth, voxel_size_A)
    volume = resample_volume(reference, reference_voxel_A, voxel_size_A)
    n = volume.shape[0]
    if n < box_px:
        return embed_centered(volume, (box_px,) * 3)
    return crop_centered(volume, (box_px,) * 3) if n > box_px else volume


def without_short_dips(curve: torch.Tensor, threshold: float, shells: int = SUSTAINED_SHELLS) -> torch.Tensor:
    """The curve with every run of fewer than ``shells`` shells below ``threshold`` that the curve climbs
    back out of raised to the threshold: its first crossing is then the first sustained one."""
    c = torch.as_tensor(curve, dtype=torch.float64).reshape(-1).clone()
    below = (c < threshold).tolist()
    start = None
    for i, is_below in enumerate([*below, False]):
        if is_below and start is None:
            start = i
        elif not is_below and start is not None:
            if i < len(below) and i - start < shells:
                c[start:i] = threshold
            start = None
    return c


def score_map(volume: torch.Tensor, voxel_size_A: float, truth, mask_diameter_A: float) -> MapScore:
    """FSC of ``volume`` (cubic, protein positive) against the true map and its mirror image (flipped
    along z) inside a soft sphere of ``mask_diameter_A`` (edge 3 voxels)."""
    box = int(volume.shape[0])
    true_map = true_map_like(truth, voxel_size_A, box)
    mask = spherical_mask(box, voxel_size_A, min(mask_diameter_A, (box - 6) * voxel_size_A), 3 * voxel_size_A)
    volume = volume.to(torch.float32)
    curve = fsc(volume, true_map, mask)
    mirror_curve = fsc(volume, torch.flip(true_map, dims=(0,)), mask)
    resolution_05 = fsc_resolution_A(without_short_dips(curve, 0.5), voxel_size_A, 0.5)
    shells = curve.numel()
    last = max(1, min(shells - 1, round(box * voxel_size_A / resolution_05)))
    return MapScore(resolution_05, fsc_resolution_A(curve, voxel_size_A, 0.143),
                    float(curve[1:last + 1].mean()), float(mirror_curve[1:last + 1].mean()),
                    [float(v) for v in curve], [float(v) for v in mirror_curve])
