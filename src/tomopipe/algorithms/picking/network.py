"""A small 3-D U-Net that maps a tomogram to a particle-centre heatmap, its tiled inference, and
the picks (peaks of the heatmap).

In the spirit of DeepFinder and the CZII cryo-ET challenge solutions: a heatmap (keypoint)
network, trained on the data set itself, read out by non-maximum suppression. Conventions:
volumes ``[z, y, x]`` float32; the network sees one channel (a normalised tomogram, usually
binned) and returns logits of the same size; positions are voxel indices ``[z, y, x]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tomopipe.algorithms.peaks import non_maximum_suppression, parabolic_offset

__all__ = ["HeatmapUNet", "UNetConfig", "bin_volume", "heatmap_peaks", "normalise_volume", "parameter_count",
           "predict_heatmap"]


@dataclass(frozen=True)
class UNetConfig:
    """Width of the first level (doubled at every level below) and number of levels (each
    halves the size); input sizes must be multiples of ``2 ** (levels - 1)`` (tiles pad to it)."""

    base_channels: int = 8
    levels: int = 3

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    """Two 3³ convolutions, each with instance normalisation and leaky ReLU."""
    layers = []
    for c_in in (channels_in, channels_out):
        layers += [nn.Conv3d(c_in, channels_out, 3, padding=1), nn.InstanceNorm3d(channels_out, affine=True),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class HeatmapUNet(nn.Module):
    """3-D U-Net (max-pool down, trilinear up, skip concatenation) with one output channel: the
    logit that a voxel is near a particle centre. Pure torch, on any device."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        if config.levels < 1 or config.base_channels < 1:
            raise ValueError(f"UNetConfig needs levels >= 1 and base_channels >= 1, got {config}")
        self.config = config
        widths = [config.base_channels * 2 ** level for level in range(config.levels)]
        self.down = nn.ModuleList(_block(c_in, c_out) for c_in, c_out in zip([1, *widths[:-1]], widths))
        self.up = nn.ModuleList(_block(widths[level] + widths[level + 1], widths[level])
                                for level in range(config.levels - 1))
        self.head = nn.Conv3d(widths[0], 1, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``[batch, 1, z, y, x]`` -> logits of the same shape (sizes multiples of ``size_multiple``)."""
        skips = []
        x = volume
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        for level in reversed(range(len(self.up))):
            x = F.interpolate(x, size=skips[level].shape[2:], mode="trilinear", align_corners=False)
            x = self.up[level](torch.cat([skips[level], x], dim=1))
        return self.head(x)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bin_volume(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor``³ blocks of a ``[z, y, x]`` volume (the trailing remainder is dropped).
    Binned voxel ``i`` covers voxels ``i·factor … i·factor + factor − 1``, centre ``i·factor + (factor − 1)/2``."""
    if factor < 1:
        raise ValueError(f"binning factor must be >= 1, got {factor}")
    volume = volume.to(torch.float32)
    return volume if factor == 1 else F.avg_pool3d(volume[None, None], factor)[0, 0]


def normalise_volume(volume: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit standard deviation over the whole volume (one tomogram at a time)."""
    sd = volume.std()
    if not torch.isfinite(sd) or sd <= 0:
        raise ValueError("the volume is constant or not finite: nothing to pick")
    return (volume - volume.mean()) / sd


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Starts of tiles ``tile`` long, ``step`` apart, covering ``0 … size`` (the last flush with the end)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def _blend_window(shape: tuple[int, ...], device) -> torch.Tensor:
    """Separable raised-cosine weights (never 0) for blending overlapping tiles."""
    window = torch.ones((), device=device)
    for n in shape:
        w = torch.sin(math.pi * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n) + 1e-3
        window = window[..., None] * w
    return window


@torch.no_grad()
def predict_heatmap(model: HeatmapUNet, volume: torch.Tensor, tile_px: int, overlap: float = 0.25,
                    batch_size: int = 2) -> torch.Tensor:
    """Particle-centre probability ``[z, y, x]`` of a normalised volume, by tiles ``tile_px``³
    (clipped to the volume, rounded up to the network's size multiple by zero padding) overlapping
    by ``overlap`` of their size, blended with raised-cosine weights."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    model.eval()
    device = next(model.parameters()).device
    volume = volume.to(device=device, dtype=torch.float32)
    multiple = model.config.size_multiple
    tile = [min(tile_px, n) for n in volume.shape]
    padded = [math.ceil(t / multiple) * multiple for t in tile]
    window = _blend_window(tuple(tile), device)
    total = torch.zeros_like(volume)
    weight = torch.zeros_like(volume)
    corners = [(z, y, x) for z in _tile_starts(volume.shape[0], tile[0], max(1, int(tile[0] * (1 - overlap))))
               for y in _tile_starts(volume.shape[1], tile[1], max(1, int(tile[1] * (1 - overlap))))
               for x in _tile_starts(volume.shape[2], tile[2], max(1, int(tile[2] * (1 - overlap))))]
    for first in range(0, len(corners), batch_size):
        batch = corners[first:first + batch_size]
        pieces = [volume[z:z + tile[0], y:y + tile[1], x:x + tile[2]] for z, y, x in batch]
        pad = [0, padded[2] - tile[2], 0, padded[1] - tile[1], 0, padded[0] - tile[0]]
        probability = torch.sigmoid(model(torch.stack([F.pad(p, pad) for p in pieces])[:, None]))[:, 0]
        for (z, y, x), p in zip(batch, probability):
            region = (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))
            total[region] += window * p[:tile[0], :tile[1], :tile[2]]
            weight[region] += window
    return total / weight


def heatmap_peaks(heatmap: torch.Tensor, min_distance_px: float, threshold: float,
                  max_peaks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks of a probability map above ``threshold``, at least ``min_distance_px`` apart (highest
    first): sub-voxel positions ``[k, 3]`` (float64, ``[z, y, x]``, parabolic refinement per axis, none
    on the volume's faces)
    and their probabilities ``[k]``."""
    index = non_maximum_suppression(heatmap, min_distance_px, threshold, max_peaks)
    scores = heatmap[tuple(index.T)] if len(index) else heatmap.new_zeros(0)
    position = index.to(torch.float64)
    for axis in range(3):
        minus, plus = index.clone(), index.clone()
        minus[:, axis] = (index[:, axis] - 1).clamp(min=0)
        plus[:, axis] = (index[:, axis] + 1).clamp(max=heatmap.shape[axis] - 1)
        inside = (index[:, axis] > 0) & (index[:, axis] < heatmap.shape[axis] - 1)
        offset = parabolic_offset(heatmap[tuple(minus.T)].double(), scores.double(), heatmap[tuple(plus.T)].double())
        position[:, axis] += torch.where(inside, offset, torch.zeros_like(offset))
    return position, scores
