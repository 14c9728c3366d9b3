"""Template matching: normalised cross-correlation of a rotated, weighted template with a tomogram.

The method of pytom-match-pick (Chaillet et al. 2023, IJMS 24:13375) and STOPGAP: for every
rotation A the template is rotated (``T_A(x) = T(A^T x)``, x from the box centre ``b // 2``, so the
index of the best rotation gives the particle orientation A of ``x_tomo = position + A · x_ref``),
multiplied in Fourier space by the tomogram's per-tilt weight (missing wedge, CTF, dose; applied
after the rotation, in the tomogram's frame), normalised to zero mean and unit variance under the
mask, and correlated with the tomogram by FFT. Dividing by ``N · σ_local``, the standard deviation of
the tomogram under the mask around each voxel (local mean and mean square by FFT convolution with
the mask, N = Σ mask), gives a normalised cross-correlation in [-1, 1] per voxel and rotation.
The tomogram (mean 0) is zero-padded by at least half the box, so that no correlation wraps
around: every voxel of the tomogram gets a score, those near an edge from the part of the mask
inside the volume (a particle cut by the edge scores about √(fraction inside) of its full score,
at the same noise level).

Rotation: trilinear interpolation (``grid_sample``) of the template oversampled twice by Fourier
zero-padding. Trilinear interpolation of the template itself would low-pass it (near Nyquist the
amplitude falls to ~40 % on average, to 0 at half-voxel offsets) and make the score depend on the
rotation; on the ×2 grid the template's Nyquist keeps ~80 %, and the identity rotation samples the
original voxels (exact up to float32 rounding of the sampling grid).

Background correction (pytom / STOPGAP): the same search with a phase-randomised template (same
amplitude spectrum); its best score per voxel, low-passed (σ = b / 8 voxels, so that its roughness
below the particle's size does not move the peaks), is subtracted. It removes most of the score of
features that correlate with any template of that spectrum (membranes, carbon edges).

Conventions: volumes ``[z, y, x]`` float32, rotation matrices act on column vectors (x, y, z).
Everything runs on the tomogram's device, batched over rotations (one path for CPU and CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import fast_fft_size, frequency_grid
from tomopipe.algorithms.fourier import pad_at_end
from tomopipe.algorithms.picking.template import resample_volume

__all__ = ["MatchResult", "is_spherical", "match_template", "phase_randomized", "rotate_volumes"]

_DIMS = (-3, -2, -1)


@dataclass
class MatchResult:
    """Result of :func:`match_template` (all maps ``[z, y, x]`` on the tomogram's device).

    ``scores``: best normalised cross-correlation over the rotations (minus the low-passed best score
    of the phase-randomised template when the background was corrected);
    ``rotation_index``: index into the rotations of the best score;
    ``score_sum`` / ``score_sumsq`` (float64): sums over all rotations of the raw scores and of their
    squares.
    """

    scores: torch.Tensor
    rotation_index: torch.Tensor
    score_sum: torch.Tensor
    score_sumsq: torch.Tensor
    n_rotations: int

    def score_std(self, region_mask: torch.Tensor | None = None) -> float:
        """σ of all raw (voxel, rotation) scores of the voxels inside ``region_mask`` (bool
        ``[z, y, x]``, e.g. the specimen slab; all voxels when None)."""
        keep = (torch.ones_like(self.scores, dtype=torch.bool) if region_mask is None
                else region_mask.to(self.scores.device, torch.bool))
        n = int(keep.sum()) * self.n_rotations
        if n == 0:
            raise ValueError("score_std: the region holds no voxel")
        mean = float(self.score_sum[keep].sum()) / n
        return math.sqrt(max(float(self.score_sumsq[keep].sum()) / n - mean**2, 0.0))


def is_spherical(mask: torch.Tensor, rtol: float = 1e-4) -> bool:
    """True when a cubic mask's values depend only on the distance from the centre voxel ``b // 2``
    (equal, to ``rtol`` of its largest value, on every voxel of one integer squared radius): then
    rotating it changes nothing and the tomogram's local statistics are computed once."""
    b = mask.shape[0]
    r = torch.arange(b, device=mask.device) - b // 2
    r2 = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).reshape(-1)
    values = mask.reshape(-1).to(torch.float64)
    size = int(r2.max()) + 1
    high = torch.full((size,), -math.inf, dtype=torch.float64, device=mask.device).scatter_reduce(0, r2, values, "amax")
    low = torch.full((size,), math.inf, dtype=torch.float64, device=mask.device).scatter_reduce(0, r2, values, "amin")
    present = torch.isfinite(high)
    return bool(((high - low)[present] <= rtol * float(values.abs().max())).all())


def phase_randomized(volume: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A real volume with the amplitude spectrum of ``volume`` and uniformly random phases (the
    phases of the FFT of white noise, hence Hermitian); the mean (DC term) is kept. float32."""
    device = generator.device if generator is not None else volume.device
    noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64, device=device).to(volume.device)
    spectrum = torch.fft.rfftn(volume.to(torch.float64))
    phase = torch.fft.rfftn(noise)
    phase = phase / phase.abs().clamp(min=1e-300)
    phase[0, 0, 0] = 1.0
    return torch.fft.irfftn(spectrum * phase, s=volume.shape).to(torch.float32)


def _oversampled(volumes: torch.Tensor) -> torch.Tensor:
    """``[c, b, b, b]`` -> ``[c, 2b, 2b, 2b]`` by Fourier zero-padding; voxel i of the input is fine voxel
    ``b + 2 (i - b // 2)`` (the centre ``b // 2`` goes to ``b``)."""
    return torch.stack([resample_volume(v, 2.0, 1.0) for v in volumes])


def rotate_volumes(fine: torch.Tensor, rotations: torch.Tensor, box_px: int) -> torch.Tensor:
    """Rotate oversampled volumes ``fine`` ``[c, 2b, 2b, 2b]`` (from :func:`_oversampled`) by every
    rotation ``[n, 3, 3]``: out ``[n, c, b, b, b]`` with ``out(x) = V(A^T x)``, x (x, y, z) from the
    centre voxel ``b // 2``; trilinear on the fine grid, zero outside."""
    b, n = box_px, rotations.shape[0]
    r = torch.arange(b, dtype=torch.float32, device=fine.device) - b // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    points = torch.stack([x, y, z], -1).reshape(-1, 3)  # (x, y, z) per output voxel
    source = points @ rotations.to(fine.device, torch.float32)  # rows of A^T x: [n, b³, 3]
    grid = (2.0 * (b + 2.0 * source) / (2 * b - 1) - 1.0).reshape(1, n * b, b, b, 3)
    out = F.grid_sample(fine[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].reshape(fine.shape[0], n, b, b, b).transpose(0, 1)


def _normalised_under_mask(templates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask · (t - μ) / σ`` with μ, σ the mean and standard deviation of each template under the mask."""
    n = mask.sum(_DIMS, keepdim=True)
    mean = (templates * mask).sum(_DIMS, keepdim=True) / n
    mean_sq = (templates.square() * mask).sum(_DIMS, keepdim=True) / n
    var = mean_sq - mean.square()
    if bool((var <= 1e-10 * mean_sq).any()):
        raise ValueError("match_template: the (weighted, rotated) template is constant under the mask")
    return mask * (templates - mean) / var.sqrt()


def _correlate(volume_ft: torch.Tensor, kernels: torch.Tensor, padded: tuple, shape: tuple) -> torch.Tensor:
    """``Σ_u V(q − b//2 + u) k(u)`` for every centre q of the tomogram (``[n, *shape]``) of kernels
    ``[n, b, b, b]``; ``padded`` ≥ shape + b // 2 on every axis, so that nothing wraps."""
    c = kernels.shape[-1] // 2
    kernel_ft = torch.fft.rfftn(pad_at_end(kernels, (kernels.shape[0], *padded)), dim=_DIMS)
    out = torch.fft.irfftn(kernel_ft.conj_physical_().mul_(volume_ft), s=padded, dim=_DIMS)
    return torch.roll(out, (c, c, c), _DIMS)[..., : shape[0], : shape[1], : shape[2]]


def _local_std(volume_ft, volume_sq_ft, masks: torch.Tensor, padded: tuple, shape: tuple) -> torch.Tensor:
    """Standard deviation of the volume under each mask ``[n, b, b, b]`` at every corner position."""
    n = masks.sum(_DIMS).reshape(-1, 1, 1, 1)
    mean = _correlate(volume_ft, masks, padded, shape) / n
    mean_sq = _correlate(volume_sq_ft, masks, padded, shape) / n
    return (mean_sq - mean.square()).clamp(min=1e-6).sqrt()


def _batch_scores(volume_ft, templates, masks, local_std, weight, padded: tuple, shape: tuple) -> list:
    """NCC maps, one ``[m, *shape]`` (corner frame) per channel of rotated templates ``[m, c, b, b, b]``:
    weighted in Fourier space, normalised under their masks ``[m or 1, b, b, b]``, divided by N · σ_local."""
    b = templates.shape[-1]
    if weight is not None:
        templates = torch.fft.irfftn(torch.fft.rfftn(templates, dim=_DIMS) * weight, s=(b, b, b), dim=_DIMS)
    kernels = _normalised_under_mask(templates, masks[:, None])
    scale = 1.0 / (masks.sum(_DIMS).reshape(-1, 1, 1, 1) * local_std)
    return [_correlate(volume_ft, kernels[:, c], padded, shape) * scale for c in range(kernels.shape[1])]


def _check_inputs(tomogram, template, mask, rotations, weight_rfftn, batch_size) -> None:
    if tomogram.ndim != 3:
        raise ValueError(f"match_template: the tomogram must be [z, y, x], got shape {tuple(tomogram.shape)}")
    if template.ndim != 3 or len(set(template.shape)) != 1:
        raise ValueError(f"match_template: the template must be a cube [b, b, b], got {tuple(template.shape)}")
    b = template.shape[0]
    if tuple(mask.shape) != tuple(template.shape):
        raise ValueError(f"match_template: mask {tuple(mask.shape)} and template {tuple(template.shape)} differ")
    if b > min(tomogram.shape):
        raise ValueError(f"match_template: the template box ({b} px) is larger than the tomogram "
                         f"{tuple(tomogram.shape)}")
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or rotations.shape[0] < 1:
        raise ValueError(f"match_template: rotations must be [n >= 1, 3, 3], got {tuple(rotations.shape)}")
    if weight_rfftn is not None and tuple(weight_rfftn.shape) != (b, b, b // 2 + 1):
        raise ValueError(f"match_template: weight_rfftn must be [{b}, {b}, {b // 2 + 1}] (rfftn of the template "
                         f"box), got {tuple(weight_rfftn.shape)}")
    if not float(mask.sum()) > 0:
        raise ValueError("match_template: the mask is empty")
    if batch_size < 1:
        raise ValueError(f"match_template: batch_size must be >= 1, got {batch_size}")


def match_template(tomogram: torch.Tensor, template: torch.Tensor, mask: torch.Tensor, rotations: torch.Tensor,
                   weight_rfftn: torch.Tensor | None = None, *, background_correction: bool = True,
                   batch_size: int = 8, generator: torch.Generator | None = None,
                   progress: Callable[[int, int], None] | None = None) -> MatchResult:
    """Search ``tomogram`` ``[z, y, x]`` for ``template`` ``[b, b, b]`` (same contrast as the tomogram)
    under ``mask`` ``[b, b, b]`` at every rotation ``[n, 3, 3]`` (see the module docstring).

    ``weight_rfftn`` ``[b, b, b//2+1]``: the tomogram's Fourier weight on the template box
    (:func:`tomopipe.algorithms.picking.weighting.tilt_weight_rfftn`), applied after rotating.
    ``background_correction``: subtract, per voxel, the (low-passed) best score of a phase-randomised
    template (random phases from ``generator``) searched the same way (see the module docstring).
    A mask that is not spherical (:func:`is_spherical`) is rotated with the template, and the local
    statistics recomputed per rotation. ``progress(done, total)`` is called after every batch.
    """
    _check_inputs(tomogram, template, mask, rotations, weight_rfftn, batch_size)
    device, shape, b = tomogram.device, tuple(tomogram.shape), template.shape[0]
    volume = tomogram.to(torch.float32)
    spread = volume.std()
    if not bool(torch.isfinite(spread)) or float(spread) == 0.0:
        raise ValueError("match_template: the tomogram is constant or holds non-finite values")
    volume = (volume - volume.mean()) / spread  # keeps E[T²] - E[T]² well conditioned in float32
    padded = tuple(fast_fft_size(n + b // 2) for n in shape)
    volume_ft = torch.fft.rfftn(pad_at_end(volume, padded))
    volume_sq_ft = torch.fft.rfftn(pad_at_end(volume.square(), padded))
    mask = mask.to(device, torch.float32)
    spherical = is_spherical(mask)
    channels = [template.to(device, torch.float32)]
    if background_correction:
        channels.append(phase_randomized(channels[0], generator))
    if not spherical:
        channels.append(mask)
    fine = _oversampled(torch.stack(channels))
    local_std = _local_std(volume_ft, volume_sq_ft, mask[None], padded, shape)[0] if spherical else None
    weight = None if weight_rfftn is None else weight_rfftn.to(device, torch.float32)

    n_rot = rotations.shape[0]
    best = torch.full(shape, -math.inf, dtype=torch.float32, device=device)
    best_noise = torch.full(shape, -math.inf, dtype=torch.float32, device=device) if background_correction else None
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    score_sum = torch.zeros(shape, dtype=torch.float64, device=device)
    score_sumsq = torch.zeros(shape, dtype=torch.float64, device=device)
    for start in range(0, n_rot, batch_size):
        rotated = rotate_volumes(fine, rotations[start:start + batch_size], b)  # [m, c, b, b, b]
        masks = mask[None] if spherical else rotated[:, -1]
        std = local_std if spherical else _local_std(volume_ft, volume_sq_ft, masks, padded, shape)
        searched = rotated[:, :2] if background_correction else rotated[:, :1]
        scores = _batch_scores(volume_ft, searched, masks, std, weight, padded, shape)
        batch_best, batch_index = scores[0].max(0)
        better = batch_best > best
        best = torch.where(better, batch_best, best)
        index = torch.where(better, batch_index + start, index)
        score_sum += scores[0].sum(0)  # float32 over one batch, float64 across batches
        score_sumsq += scores[0].square_().sum(0)
        if background_correction:
            best_noise = torch.maximum(best_noise, scores[1].max(0).values)
        if progress is not None:
            progress(min(start + batch_size, n_rot), n_rot)
    return _result(best, best_noise, index, score_sum, score_sumsq, b, n_rot)


def _smoothed(values: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian low-pass (σ in voxels) of ``values`` ``[z, y, x]`` by FFT, zero-padded by 3σ and
    normalised by the blurred support (``G * v / G * 1``), so that the edges do not wrap or darken."""
    shape = tuple(values.shape)
    padded = tuple(fast_fft_size(n + math.ceil(3 * sigma_px)) for n in shape)
    kz, ky, kx = (f.to(values.device) for f in frequency_grid(padded, 1.0))
    gaussian = torch.exp(-2.0 * math.pi**2 * sigma_px**2 * (kz**2 + ky**2 + kx**2)).to(torch.float32)
    blur = [torch.fft.irfftn(torch.fft.rfftn(pad_at_end(v, padded)) * gaussian, s=padded)[: shape[0], : shape[1],
                                                                                          : shape[2]]
            for v in (values, torch.ones_like(values))]
    return blur[0] / blur[1].clamp(min=1e-6)


def _result(best, best_noise, index, score_sum, score_sumsq, box_px: int, n_rotations: int) -> MatchResult:
    """Subtract the noise template's best scores, low-passed (σ = b / 8 voxels) so that their
    roughness at scales below the particle's does not move the peaks (the background they stand for
    varies over the template's size)."""
    scores = best if best_noise is None else best - _smoothed(best_noise, box_px / 8.0)
    return MatchResult(scores, index, score_sum, score_sumsq, n_rotations)
