"""Peaks of sampled functions: sub-pixel refinement and non-maximum suppression.

Conventions: maps are ``[y, x]`` or ``[z, y, x]``; peak positions are returned as integer indices
in the map's axis order (``[k, ndim]``), offsets in samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["non_maximum_suppression", "parabolic_offset"]


def parabolic_offset(minus, centre, plus) -> torch.Tensor:
    """Offset (in samples, -0.5..0.5) of the vertex of the parabola through three equally spaced
    samples ``minus, centre, plus`` (tensors of one shape, or numbers) from the centre sample.

    The offset is 0 where the parabola has no maximum (``minus - 2·centre + plus >= 0``); for a
    minimum pass the negated samples. Computed in the inputs' dtype (float64 for numbers).
    """
    minus, centre, plus = (torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) else v
                           for v in (minus, centre, plus))
    curvature = minus - 2 * centre + plus
    safe = torch.where(curvature < 0, curvature, -torch.ones_like(curvature))
    offset = torch.where(curvature < 0, 0.5 * (minus - plus) / safe, torch.zeros_like(curvature))
    return offset.clamp(-0.5, 0.5)


def _cube_maximum(values: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over the ``(2r+1)``-cube (or square) around every sample (edges: over the part
    inside), one axis at a time: the cube's maximum is separable, and r per-axis passes cost far less
    than one pass over the cube (O(r) instead of O(r³) per sample)."""
    pool = F.max_pool2d if values.ndim == 2 else F.max_pool3d
    out = values[None, None]
    for axis in range(values.ndim):
        kernel = [1] * values.ndim
        padding = [0] * values.ndim
        kernel[axis], padding[axis] = 2 * radius + 1, radius
        out = pool(out, tuple(kernel), stride=1, padding=tuple(padding))
    return out[0, 0]


def non_maximum_suppression(scores: torch.Tensor, min_distance_px: float, threshold: float | None = None,
                            max_peaks: int | None = None) -> torch.Tensor:
    """Local maxima of a 2-D ``[y, x]`` or 3-D ``[z, y, x]`` map, highest first, at least
    ``min_distance_px`` apart (Euclidean, in samples).

    Candidates are the samples that are the maximum of their ``(2r+1)``-cube neighbourhood
    (``r = ceil(min_distance_px / sqrt(ndim)) - 1``, at least 1: the cube lies inside the ball of
    ``min_distance_px``, so that peaks that far apart along a diagonal are both candidates) and
    above ``threshold`` (if given); they are
    then taken greedily by decreasing score, dropping every one closer than ``min_distance_px`` to
    one already taken. Returns indices ``[k, ndim]`` (long, the map's axis order), ``k <= max_peaks``.
    """
    if scores.ndim not in (2, 3):
        raise ValueError(f"non_maximum_suppression needs a 2-D or 3-D map, got shape {tuple(scores.shape)}")
    if not min_distance_px > 0:
        raise ValueError(f"min_distance_px must be > 0, got {min_distance_px}")
    radius = max(1, math.ceil(min_distance_px / math.sqrt(scores.ndim)) - 1)
    values = scores.to(torch.float32)
    local_max = _cube_maximum(values, radius)
    candidate = values >= local_max
    if threshold is not None:
        candidate &= values > threshold
    index = candidate.nonzero()  # [m, ndim]
    order = torch.argsort(values[candidate], descending=True, stable=True)
    index = index[order]
    position = index.to(torch.float64)
    free = torch.ones(index.shape[0], dtype=torch.bool, device=index.device)
    kept = []
    for i in range(index.shape[0]):
        if not free[i]:
            continue
        kept.append(i)
        if max_peaks is not None and len(kept) >= max_peaks:
            break
        free &= (position - position[i]).square().sum(1) >= float(min_distance_px) ** 2
    return index[torch.tensor(kept, dtype=torch.long, device=index.device)]
