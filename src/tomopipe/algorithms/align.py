"""Fiducial-less tilt-series alignment, part 1: coarse alignment and patch tracking (the role of
IMOD tiltxcorr in batchruntomo's patch-tracking path).

Conventions (``geometry.py``, RELION 5): an image position is ``x_img = m·Rz(axis)·Ry(tilt)·p + s``,
in pixels from the image centre ``(N//2)`` along x and y (x = column, y = row, +y up). The tilt axis
lies in the image along ``(-sin axis, cos axis)``; features at height z = 0 are foreshortened by
``cos(tilt)`` along ``u = (cos axis, sin axis)`` ("cosine stretching"). ``s`` (specimen shift) is the
image position of the tomogram origin.

* :func:`bandpass_images` — IMOD-like filter (Gaussian high-pass sigma1, low-pass radius2/sigma2).
* :func:`coarse_align` — cross-correlation of neighbouring views, the view closer to zero tilt
  stretched by ``cos(tilt_target)/cos(tilt_ref)`` perpendicular to the axis, accumulated outwards
  from the zero tilt; returns the specimen shift of every view.
* :func:`track_patches` — square patches (side in pixels) on a grid in the zero-tilt view, tracked
  view by view outwards with stretched-patch cross-correlation and sub-pixel peaks; a patch whose
  correlation is not significant, or that leaves the image, ends its contour there.

Images are ``[n, y, x]`` float tensors, views sorted by tilt angle; everything is computed in float32
on the images' device, positions in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tomopipe.algorithms.geometry import fft_centre

__all__ = ["bandpass_images", "stretch_matrices", "coarse_align", "track_patches", "CoarseAlignment", "PatchTracks",
           "zero_tilt_index"]


def zero_tilt_index(tilt_angles_deg: torch.Tensor) -> int:
    """Index of the view with the smallest absolute tilt (the start of the alignment chains)."""
    return int(torch.argmin(torch.as_tensor(tilt_angles_deg, dtype=torch.float64).abs()))


def bandpass_images(images: torch.Tensor, sigma1: float = 0.03, radius2: float = 0.25, sigma2: float = 0.05
                    ) -> torch.Tensor:
    """IMOD tiltxcorr-style filter (frequencies in cycles/pixel): high-pass ``1 - exp(-k²/2σ1²)``,
    low-pass 1 below ``radius2`` and Gaussian (``σ2``) above; each image normalised to mean 0, SD 1."""
    x = images.to(torch.float32)
    ny, nx = x.shape[-2:]
    ky = torch.fft.fftfreq(ny, device=x.device)[:, None]
    kx = torch.fft.rfftfreq(nx, device=x.device)[None, :]
    k = torch.sqrt(ky * ky + kx * kx)
    weight = 1.0 - torch.exp(-(k * k) / (2 * sigma1 * sigma1)) if sigma1 > 0 else torch.ones_like(k)
    weight = weight * torch.where(k <= radius2, torch.ones_like(k), torch.exp(-((k - radius2) ** 2) / (2 * sigma2**2)))
    out = torch.fft.irfft2(torch.fft.rfft2(x) * weight, s=(ny, nx))
    out = out - out.mean(dim=(-2, -1), keepdim=True)
    return out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _axis_direction(tilt_axis_deg: float) -> torch.Tensor:
    """Unit vector u perpendicular to the tilt axis in the image: ``Rz(axis)·(1, 0)``."""
    a = math.radians(tilt_axis_deg)
    return torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)


def stretch_matrices(tilt_axis_deg: float, tilt_from_deg, tilt_to_deg) -> torch.Tensor:
    """``[k, 2, 2]`` maps of image vectors (z = 0 features) from one tilt to another:
    ``I + (cos(to)/cos(from) - 1)·u·uᵀ`` with u perpendicular to the tilt axis."""
    u = _axis_direction(tilt_axis_deg)
    a = torch.as_tensor(tilt_from_deg, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(tilt_to_deg, dtype=torch.float64).reshape(-1)
    factor = torch.cos(torch.deg2rad(b)) / torch.cos(torch.deg2rad(a))
    return torch.eye(2, dtype=torch.float64) + (factor - 1.0)[:, None, None] * torch.outer(u, u)


def _sample(images: torch.Tensor, coords_px: torch.Tensor) -> torch.Tensor:
    """Bicubic samples of ``images [b, y, x]`` at absolute pixel coordinates ``coords_px [b, h, w, 2]``
    (x, y index order); zero outside."""
    ny, nx = images.shape[-2:]
    grid = torch.empty_like(coords_px, dtype=torch.float32)
    grid[..., 0] = (coords_px[..., 0] * (2.0 / (nx - 1)) - 1.0).to(torch.float32)
    grid[..., 1] = (coords_px[..., 1] * (2.0 / (ny - 1)) - 1.0).to(torch.float32)
    out = F.grid_sample(images[:, None].to(torch.float32), grid, mode="bicubic", padding_mode="zeros",
                        align_corners=True)
    return out[:, 0]


def _taper(shape, edge_px: float, device) -> torch.Tensor:
    """Separable window: 1 inside, cosine fall-off to 0 over ``edge_px`` pixels at every border."""
    def one(n):
        i = torch.arange(n, dtype=torch.float32, device=device)
        d = torch.minimum(i + 0.5, n - 0.5 - i)
        return torch.where(d >= edge_px, torch.ones_like(d), 0.5 - 0.5 * torch.cos(math.pi * d / edge_px))
    return one(shape[0])[:, None] * one(shape[1])[None, :]


def _correlate(target: torch.Tensor, reference: torch.Tensor, window: torch.Tensor):
    """Normalised circular cross-correlation of windowed, mean-free images ``[b, h, w]``: ``cc[d]`` is
    high where ``target(x) ≈ reference(x - d)``; the map is fft-shifted (zero shift at ``N//2``)."""
    def prep(x):
        x = x * window
        x = x - (x.sum(dim=(-2, -1), keepdim=True) / window.sum()) * window
        return x / x.square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
    t, r = prep(target), prep(reference)
    h, w = t.shape[-2:]
    cc = torch.fft.irfft2(torch.fft.rfft2(t) * torch.conj(torch.fft.rfft2(r)), s=(h, w))
    return torch.fft.fftshift(cc, dim=(-2, -1))


@dataclass
class Peak:
    shift_px: torch.Tensor  #: [b, 2] (x, y) float64
    value: torch.Tensor  #: [b] normalised correlation at the peak (-1..1)
    significance: torch.Tensor  #: [b] (peak - mean) / SD of the searched map


def _find_peak(cc: torch.Tensor, max_shift_px: float | None = None) -> Peak:
    """Highest peak of fft-shifted maps ``[b, h, w]`` within ``max_shift_px`` of zero, refined by a 1-D
    parabola through the 3 samples along x and y."""
    b, h, w = cc.shape
    cy, cx = fft_centre(h), fft_centre(w)
    search = cc
    if max_shift_px is not None:
        yy = torch.arange(h, device=cc.device)[:, None] - cy
        xx = torch.arange(w, device=cc.device)[None, :] - cx
        inside = (yy * yy + xx * xx) <= max_shift_px * max_shift_px
        search = torch.where(inside, cc, torch.full_like(cc, -torch.inf))
        finite = inside.expand_as(cc)
    else:
        finite = torch.ones_like(cc, dtype=torch.bool)
    flat = search.reshape(b, -1)
    value, index = flat.max(dim=1)
    iy, ix = index // w, index % w
    rows = torch.arange(b, device=cc.device)

    def parabola(minus, centre, plus):
        denominator = minus - 2 * centre + plus
        offset = torch.where(denominator < 0, 0.5 * (minus - plus) / denominator, torch.zeros_like(centre))
        return offset.clamp(-0.5, 0.5)

    dx = parabola(cc[rows, iy, (ix - 1) % w], value, cc[rows, iy, (ix + 1) % w])
    dy = parabola(cc[rows, (iy - 1) % h, ix], value, cc[rows, (iy + 1) % h, ix])
    shift = torch.stack([(ix - cx).to(torch.float64) + dx.double(), (iy - cy).to(torch.float64) + dy.double()], -1)
    counts = finite.reshape(b, -1).sum(1).clamp_min(2)
    masked = torch.where(finite, cc, torch.zeros_like(cc)).reshape(b, -1)
    mean = masked.sum(1) / counts
    var = (torch.where(finite, cc, mean[:, None, None]).reshape(b, -1) - mean[:, None]).square().sum(1) / (counts - 1)
    return Peak(shift, value.double(), ((value - mean) / var.sqrt().clamp_min(1e-12)).double())


@dataclass
class CoarseAlignment:
    shifts_px: torch.Tensor  #: [n, 2] specimen shift (x, y) of every view, px from the image centre; 0 at zero tilt
    correlation: torch.Tensor  #: [n] normalised peak correlation with the neighbour (1 at the zero tilt)
    significance: torch.Tensor  #: [n] peak significance in SDs of the correlation map (inf at the zero tilt)


def coarse_align(images: torch.Tensor, tilt_angles_deg, tilt_axis_deg: float, edge_fraction: float = 0.1,
                 max_shift_fraction: float = 0.4) -> CoarseAlignment:
    """Cross-correlate every view with its neighbour closer to zero tilt, cosine-stretched, outwards
    from the zero tilt (:func:`zero_tilt_index`), and accumulate the specimen shifts.

    The neighbour is resampled so that its specimen origin sits at the image centre and its z = 0
    features at their positions for the target tilt; the correlation peak is then the target's
    specimen shift. ``images`` should be band-pass filtered (:func:`bandpass_images`)."""
    n, ny, nx = images.shape
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts.numel() != n:
        raise ValueError(f"coarse_align: {n} images but {tilts.numel()} tilt angles")
    device = images.device
    window = _taper((ny, nx), edge_fraction * min(nx, ny), device)
    centre = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij")
    rel = torch.stack([xx, yy], -1) - centre  # [ny, nx, 2] output pixel positions from the centre
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    correlation = torch.ones(n, dtype=torch.float64)
    significance = torch.full((n,), math.inf, dtype=torch.float64)
    i0 = zero_tilt_index(tilts)
    for step in (1, -1):
        for t in range(i0 + step, n if step > 0 else -1, step):
            r = t - step
            s_inv = torch.linalg.inv(stretch_matrices(tilt_axis_deg, tilts[r], tilts[t])[0])
            coords = centre + shifts[r] + rel @ s_inv.T  # ref(s_ref + S^-1 x)
            reference = _sample(images[r:r + 1], coords[None].to(device))
            cc = _correlate(images[t:t + 1], reference, window)
            peak = _find_peak(cc, max_shift_fraction * min(nx, ny))
            shifts[t] = peak.shift_px[0].cpu()
            correlation[t] = peak.value[0].cpu()
            significance[t] = peak.significance[0].cpu()
    return CoarseAlignment(shifts, correlation, significance)


@dataclass
class PatchTracks:
    positions_px: torch.Tensor  #: [m, n, 2] (x, y) px from the image centre, NaN where not tracked
    correlation: torch.Tensor  #: [m, n] normalised correlation with the neighbouring view (NaN: not tracked)
    patch_size_px: int
    start_px: torch.Tensor  #: [m, 2] patch centres in the zero-tilt view


def patch_grid(image_size_xy, patch_size_px: int, overlap_fraction: float, border_px: int = 0) -> torch.Tensor:
    """Patch centres ``[m, 2]`` (x, y, px from the image centre) tiling the image with the given overlap."""
    nx, ny = (int(v) for v in image_size_xy)
    step = max(1.0, patch_size_px * (1.0 - overlap_fraction))
    half = patch_size_px / 2.0
    axes = []
    for n, c in ((nx, fft_centre(nx)), (ny, fft_centre(ny))):
        lo, hi = half + border_px - c, n - half - border_px - c - 1
        if hi < lo:
            raise ValueError(f"patch_grid: patches of {patch_size_px} px do not fit in {nx} x {ny} px images")
        count = int(math.floor((hi - lo) / step)) + 1
        start = lo + (hi - lo - (count - 1) * step) / 2
        axes.append(torch.round(start + step * torch.arange(count, dtype=torch.float64)))
    gy, gx = torch.meshgrid(axes[1], axes[0], indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)


def track_patches(images: torch.Tensor, tilt_angles_deg, tilt_axis_deg: float, shifts_px: torch.Tensor,
                  patch_size_px: int, overlap_fraction: float = 0.8, min_significance: float = 6.0,
                  max_correction_px: float | None = None, border_px: int = 2, batch: int = 512) -> PatchTracks:
    """Track patches from the zero-tilt view outwards, one neighbouring view at a time.

    For a patch at ``P`` in the reference view ``r`` its position in the target view ``t`` is
    predicted as ``s_t + S·(P - s_r)`` (``S`` = :func:`stretch_matrices`, ``s`` = ``shifts_px``); the
    reference patch is resampled (bicubic) through ``S`` onto the target's pixel grid and the
    correlation peak corrects the prediction (sub-pixel). Contours end when the patch leaves the
    image or the peak significance falls below ``min_significance``."""
    n, ny, nx = images.shape
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts.numel() != n or shifts_px.shape != (n, 2):
        raise ValueError(f"track_patches: {n} images, {tilts.numel()} tilt angles and shifts of shape "
                         f"{tuple(shifts_px.shape)} do not match")
    size = int(patch_size_px) + (int(patch_size_px) % 2)
    if size < 8 or size > min(nx, ny):
        raise ValueError(f"track_patches: patch size {patch_size_px} px must be between 8 and {min(nx, ny)} px")
    device = images.device
    starts = patch_grid((nx, ny), size, overlap_fraction, border_px)
    m = starts.shape[0]
    centre = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    i0 = zero_tilt_index(tilts)
    positions = torch.full((m, n, 2), math.nan, dtype=torch.float64)
    correlation = torch.full((m, n), math.nan, dtype=torch.float64)
    positions[:, i0] = starts + shifts_px[i0]
    correlation[:, i0] = 1.0
    window = _taper((size, size), size / 4.0, device)
    g = torch.arange(size, dtype=torch.float64) - size // 2
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([gx, gy], -1)  # [size, size, 2] offsets from the patch centre
    limit = max_correction_px if max_correction_px is not None else size / 4.0
    lo = centre * 0 - centre + size // 2 + border_px  # smallest allowed patch centre (px from the centre)
    hi = torch.tensor([nx - 1, ny - 1], dtype=torch.float64) - centre - (size - 1 - size // 2) - border_px
    for step in (1, -1):
        active = torch.ones(m, dtype=torch.bool)
        for t in range(i0 + step, n if step > 0 else -1, step):
            r = t - step
            active &= ~torch.isnan(positions[:, r, 0])
            index = torch.nonzero(active)[:, 0]
            if index.numel() == 0:
                break
            S = stretch_matrices(tilt_axis_deg, tilts[r], tilts[t])[0]
            S_inv = torch.linalg.inv(S)
            p_ref = positions[index, r]
            predicted = shifts_px[t] + (p_ref - shifts_px[r]) @ S.T
            q = torch.round(predicted)
            inside = ((q >= lo) & (q <= hi)).all(-1)
            index, p_ref, predicted, q = index[inside], p_ref[inside], predicted[inside], q[inside]
            for b0 in range(0, index.numel(), batch):
                sl = slice(b0, b0 + batch)
                k = index[sl].numel()
                # target patch: integer pixels around q; reference: ref(P_ref + S^-1 (g + q - predicted))
                target_coords = centre + q[sl, None, None, :] + grid
                ix = target_coords[..., 0].long().to(device)
                iy = target_coords[..., 1].long().to(device)
                target = images[t][iy, ix]
                ref_coords = centre + p_ref[sl, None, None, :] + (grid + (q[sl] - predicted[sl])[:, None, None, :]) @ S_inv.T
                reference = _sample(images[r].expand(k, ny, nx), ref_coords.to(device))
                peak = _find_peak(_correlate(target, reference, window), limit)
                good = (peak.significance.cpu() >= min_significance)
                found = predicted[sl] + peak.shift_px.cpu()
                rows = index[sl][good]
                positions[rows, t] = found[good]
                correlation[rows, t] = peak.value.cpu()[good]
            active = ~torch.isnan(positions[:, t, 0])
    return PatchTracks(positions, correlation, size, starts)
