"""Tilt-angle offset of an alignment from the tilt of the specimen layer in a quick tomogram (the
idea of IMOD's tomopitch), and the offset applied to an alignment.

The offset is a gauge of the projection model (:mod:`tomopipe.algorithms.align_fit`):
``Ry(θ + Δ)·Ry(−Δ)·p = Ry(θ)·p``, so adding Δ to every tilt and rotating the specimen points by
``Ry(−Δ)`` changes no projection (:func:`with_tilt_offset`). It is defined by the specimen: the
slab is level (its mid-plane ``z = const`` along x) at the chosen offset.

:func:`layer_tilt_offset` reconstructs the views (binned to at most ``max_width_px``, weighted back
projection, :func:`tomopipe.algorithms.reconstruct.reconstruct_volume`) with the alignment, takes
the local energy of the tomogram (square, smoothed, mean along the tilt axis y), and in columns
along x finds the specimen layer as the z range where the energy profile is above half its peak
over the background (its lower quartile); the mid-heights ``z(x)`` are fitted with a line
``z = a + b·x`` weighted by the layer's signal, and the offset that levels it is ``−atan(b)`` (the
convention of :func:`~tomopipe.algorithms.align_fit.level_specimen`), with the standard error of the
slope as its uncertainty. It does not use intensities, so it works on unfiltered data, on data
whose exposure changes with tilt and on density-scaled views.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tomopipe.algorithms.align_fit import AlignmentError, FitResult
from tomopipe.algorithms.geometry import projection_rotations
from tomopipe.algorithms.normalize import bin_image
from tomopipe.algorithms.reconstruct import ReconstructionParams, reconstruct_volume

__all__ = ["LayerTilt", "layer_tilt_offset", "with_tilt_offset"]


def with_tilt_offset(fit: FitResult, tilt_offset_deg: float) -> FitResult:
    """``fit`` with the tilt-angle offset ``tilt_offset_deg`` (mean of refined − nominal tilt): every
    tilt moves by the same Δ and the points turn by ``Ry(−Δ)``; projections and shifts are unchanged."""
    delta = float(tilt_offset_deg) - fit.tilt_offset_deg
    turn = projection_rotations(torch.zeros(1, dtype=torch.float64), torch.tensor([-delta], dtype=torch.float64))[0]
    return dataclasses.replace(fit, tilt_deg=fit.tilt_deg + delta, points_px=fit.points_px @ turn.T,
                               tilt_offset_deg=float(tilt_offset_deg))


@dataclass
class LayerTilt:
    tilt_offset_deg: float  #: the offset that levels the layer (to replace the alignment's offset)
    uncertainty_deg: float  #: standard error of the layer's slope, as an angle
    thickness_px: float  #: median layer thickness (half-maximum extent of its energy), input pixels
    columns: int  #: columns along x in which the layer was found
    contrast: float  #: median over those columns of the layer's energy peak over the background


def layer_tilt_offset(images: torch.Tensor, fit: FitResult, max_width_px: int = 128, columns: int = 16,
                      min_contrast: float = 0.3) -> LayerTilt:
    """The tilt-angle offset at which the specimen layer in a quick tomogram of ``images
    [n, y, x]`` (the aligned views, sorted as ``fit``'s) is level (see the module docstring).

    Raises :class:`~tomopipe.algorithms.align_fit.AlignmentError` when fewer than 4 of ``columns``
    columns (in the central 80 % of the width) show a layer whose energy peak stands
    ``min_contrast`` (relative) above the background, or the fit of the mid-heights fails."""
    n, ny, nx = images.shape
    factor = max(1.0, max(nx, ny) / float(max_width_px))
    binned = torch.stack([bin_image(view, factor) for view in images.to(torch.float32)])
    scale = nx / binned.shape[-1]  # input px per binned px
    thickness = int(max(binned.shape[-2:]))
    volume = reconstruct_volume(binned, fit.rot_z_deg, fit.tilt_deg, torch.zeros(n, dtype=torch.float64),
                                fit.shifts_px / scale, 1.0, ReconstructionParams(thickness_px=thickness,
                                                                                 super_sampling=1),
                                magnification=fit.magnification)
    energy = F.avg_pool3d(volume.double().square()[None, None], 3, stride=1, padding=1)[0, 0].mean(1)  # [z, x]
    nz, wx = energy.shape
    edges = torch.linspace(0.1 * wx, 0.9 * wx, columns + 1).round().long()
    z = torch.arange(nz, dtype=torch.float64) - nz // 2
    rows = []
    for k in range(columns):
        profile = energy[:, edges[k]:edges[k + 1]].mean(1)
        profile = F.avg_pool1d(profile[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
        background = float(torch.quantile(profile, 0.25))
        excess = profile - background
        peak = float(excess.max())
        if background <= 0 or peak / background < min_contrast:
            continue
        inside = torch.nonzero(excess >= 0.5 * peak)[:, 0]
        bottom, top = float(z[inside[0]]), float(z[inside[-1]])
        x = 0.5 * float(edges[k] + edges[k + 1] - 1) - wx // 2
        rows.append((x, 0.5 * (bottom + top), top - bottom + 1.0, float(excess.clamp_min(0).sum()), peak / background))
    if len(rows) < 4:
        raise AlignmentError(f"no specimen layer in the quick tomogram: {len(rows)} of {columns} columns show one "
                             f"(need 4)")
    x, mid, width, weight, contrast = (torch.tensor(v, dtype=torch.float64) for v in zip(*rows))
    design = torch.stack([torch.ones_like(x), x], -1)
    w = weight / weight.mean()
    normal = design.T @ (w[:, None] * design)
    solution = torch.linalg.solve(normal, design.T @ (w * mid))
    residual = mid - design @ solution
    variance = float((w * residual.square()).sum()) / max(len(rows) - 2, 1)
    slope, slope_se = float(solution[1]), math.sqrt(variance * float(torch.linalg.inv(normal)[1, 1]))
    return LayerTilt(tilt_offset_deg=fit.tilt_offset_deg - math.degrees(math.atan(slope)),
                     uncertainty_deg=math.degrees(slope_se / (1.0 + slope * slope)),
                     thickness_px=float(width.median()) * scale, columns=len(rows), contrast=float(contrast.median()))
