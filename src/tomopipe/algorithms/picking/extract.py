"""Picking from a template-matching score map: the specimen slab, the false-alarm threshold, peaks.

Conventions: maps ``[z, y, x]``; positions in voxels in the map's axis order; z ranges are
half-open ``(z_min, z_max)`` in voxels (``tomogram[z_min:z_max]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import bandpass
from tomopipe.algorithms.peaks import non_maximum_suppression, parabolic_offset

__all__ = ["Peaks", "extract_peaks", "false_alarm_threshold", "specimen_slab_z"]


@dataclass
class Peaks:
    """Picked peaks in descending score: ``positions_zyx_px`` float64 ``[k, 3]`` (sub-voxel),
    ``scores`` ``[k]``, ``rotation_index`` int64 ``[k]`` (into the matched rotations)."""

    positions_zyx_px: torch.Tensor
    scores: torch.Tensor
    rotation_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _local_mean(volume: torch.Tensor, width: int) -> torch.Tensor:
    """Mean over a ``width``³ box (odd) around every voxel, shrunk at the edges (separable)."""
    out = volume[None, None]
    for kernel in ((width, 1, 1), (1, width, 1), (1, 1, width)):
        out = F.avg_pool3d(out, kernel, stride=1, padding=tuple(k // 2 for k in kernel), count_include_pad=False)
    return out[0, 0]


def specimen_slab_z(tomogram: torch.Tensor, *, feature_px: float = 8.0, quantile: float = 0.9,
                    min_contrast: float = 0.5) -> tuple[int, int]:
    """The z range (half-open, voxels) that holds the specimen.

    The tomogram is band-passed to the scale of particles (wavelengths ``feature_px / 2``, at least
    2.5 px, to ``2 · feature_px``); its local variance (the mean square over a box ``feature_px``
    wide) is summarised per z slice by its ``quantile`` over the slice (the quantile, not the mean,
    so that sparse particles count). The slab runs from the first to the last slice above the level
    halfway between the lowest (empty ice) and the highest (specimen) slice: for a layer of particles,
    about the outermost particle centres. When the highest slice is not ``1 + min_contrast`` times
    the lowest (no empty ice: the specimen fills the volume, or nothing stands out of the noise) the
    whole range ``(0, nz)`` is returned.
    """
    if tomogram.ndim != 3:
        raise ValueError(f"specimen_slab_z: expected a tomogram [z, y, x], got shape {tuple(tomogram.shape)}")
    if feature_px < 2:
        raise ValueError(f"specimen_slab_z: feature_px must be >= 2 voxels, got {feature_px}")
    volume = tomogram.to(torch.float32)
    band = bandpass(volume.shape, 1.0, low_A=2.0 * feature_px, high_A=max(0.5 * feature_px, 2.5)).to(volume.device)
    filtered = torch.fft.irfftn(torch.fft.rfftn(volume - volume.mean()) * band, s=volume.shape)
    energy = _local_mean(filtered.square(), 2 * int(feature_px // 2) + 1)
    per_slice = energy.reshape(energy.shape[0], -1)
    rank = min(per_slice.shape[1], max(1, math.ceil(quantile * per_slice.shape[1])))
    profile = torch.kthvalue(per_slice, rank, dim=1).values  # the quantile (no size limit, unlike quantile)
    low, high = float(profile.min()), float(profile.max())
    if not high > (1.0 + min_contrast) * low:
        return 0, volume.shape[0]
    above = torch.nonzero(profile > 0.5 * (low + high))[:, 0]
    return int(above[0]), int(above[-1]) + 1


def false_alarm_threshold(score_std: float, n_voxels: int, n_rotations: int, n_false_alarms: float = 1.0) -> float:
    """Score above which ``n_false_alarms`` peaks are expected from noise alone (Rickgauer, Grigorieff
    & Denk 2017, eLife 6:e25648, as pytom-match-pick): ``σ · √2 · erfcinv(2 · n_false / (N_voxels ·
    N_rotations))``, the scores of the N_voxels · N_rotations trials taken as independent N(0, σ²)."""
    if not score_std > 0 or n_voxels < 1 or n_rotations < 1 or not n_false_alarms > 0:
        raise ValueError(f"false_alarm_threshold: need score_std > 0, n_voxels, n_rotations >= 1 and "
                         f"n_false_alarms > 0, got {score_std}, {n_voxels}, {n_rotations}, {n_false_alarms}")
    p = n_false_alarms / (float(n_voxels) * float(n_rotations))
    if p >= 1.0:
        return -math.inf
    # √2 · erfcinv(2p) = Φ⁻¹(1 - p) = -Φ⁻¹(p) (the standard normal quantile; accurate for tiny p)
    return -float(score_std) * NormalDist().inv_cdf(p)


def _allowed(shape, device, z_range, edge_px: int) -> torch.Tensor:
    """Voxels at least ``edge_px`` from every edge and inside ``z_range``."""
    allowed = torch.zeros(shape, dtype=torch.bool, device=device)
    z0, z1 = (0, shape[0]) if z_range is None else (int(z_range[0]), int(z_range[1]))
    e = max(int(edge_px), 0)
    allowed[max(z0, e):min(z1, shape[0] - e), e:shape[1] - e, e:shape[2] - e] = True
    return allowed


def _subvoxel(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Integer peaks ``[k, 3]`` refined per axis by a parabola through the neighbours (no refinement
    along an axis where a neighbour is outside the map or not finite)."""
    position = index.to(torch.float64)
    centre = scores[tuple(index.T)].to(torch.float64)
    for axis, n in enumerate(scores.shape):
        neighbours = []
        for step in (-1, 1):
            moved = index.clone()
            moved[:, axis] = (moved[:, axis] + step).clamp(0, n - 1)
            neighbours.append(scores[tuple(moved.T)].to(torch.float64))
        ok = (index[:, axis] > 0) & (index[:, axis] < n - 1)
        ok &= torch.isfinite(neighbours[0]) & torch.isfinite(neighbours[1])
        offset = parabolic_offset(neighbours[0], centre, neighbours[1])
        position[:, axis] += torch.where(ok, offset, torch.zeros_like(offset))
    return position


def extract_peaks(scores: torch.Tensor, rotation_index: torch.Tensor, *, min_distance_px: float,
                  threshold: float | None = None, max_peaks: int | None = None,
                  z_range: tuple[int, int] | None = None, edge_px: int = 0) -> Peaks:
    """Peaks of a score map ``[z, y, x]`` in descending score, at least ``min_distance_px`` apart
    (non-maximum suppression; the particle diameter), above ``threshold``, at most ``max_peaks``,
    inside ``z_range`` (half-open) and at least ``edge_px`` from every edge; non-finite scores are never
    peaks. The maxima are found on the whole map, then those outside the region dropped (a particle
    just outside does not leave a peak on the region's border). Positions are refined to sub-voxel
    by parabolas. May be empty (the caller decides)."""
    if scores.ndim != 3 or rotation_index.shape != scores.shape:
        raise ValueError(f"extract_peaks: scores [z, y, x] and rotation_index of the same shape needed, got "
                         f"{tuple(scores.shape)} and {tuple(rotation_index.shape)}")
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf))
    floor = -math.inf if threshold is None else float(threshold)
    index = non_maximum_suppression(finite, min_distance_px, threshold=floor)
    index = index[_allowed(scores.shape, scores.device, z_range, edge_px)[tuple(index.T)]][:max_peaks]
    return Peaks(_subvoxel(scores, index), scores[tuple(index.T)], rotation_index[tuple(index.T)])
