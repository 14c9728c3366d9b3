"""Fiducial-less tilt-series alignment: the image side (IMOD tiltxcorr's patch tracking, then
depth-focused point tracking) and :func:`align_images`, the whole alignment of one tilt series.

Conventions (``geometry.py``, RELION 5): an image position is ``x_img = m·Rz(axis)·Ry(tilt)·p + s``,
in pixels from the image centre ``(N//2)`` along x and y (x = column, y = row, +y up). The tilt axis
lies in the image along ``(-sin axis, cos axis)``; features at height z = 0 are foreshortened by
``cos(tilt)`` along ``u = (cos axis, sin axis)`` ("cosine stretching"). ``s`` (specimen shift) is the
image position of the tomogram origin. The *aligned frame* of a view is the raw view rotated so that
the tilt axis is +Y: ``aligned(X) = raw(m·R2(axis)·X + s)``; there a specimen point ``p = (x, y, z)``
is at ``X = x·cos(tilt) + z·sin(tilt)``, ``Y = y``.

* :func:`bandpass_images` — IMOD-like filter (Gaussian high-pass sigma1, low-pass radius2/sigma2).
* :func:`coarse_align` — cross-correlation of neighbouring views, the view closer to zero tilt
  stretched by ``cos(tilt_target)/cos(tilt_ref)`` perpendicular to the axis, accumulated outwards
  from the zero tilt; returns the specimen shift of every view.
* :func:`track_patches` — square patches (side in pixels) on a grid in the zero-tilt view, tracked
  view by view outwards with stretched-patch cross-correlation and sub-pixel peaks; a patch whose
  correlation is not significant, or that leaves the image, ends its contour there.
* :func:`aligned_views`, :func:`find_specimen_points`, :func:`track_points` — the second stage.
  Large patches of a thick specimen hold features at many depths whose parallax differs, so a
  patch contour follows a blend that drifts from view to view, and errors common to all contours
  of a view pass into the shifts and the tilt axis. The second stage tracks *points*: local maxima
  of a shift-and-add (unfiltered back-projection) volume, each measured in every view against the
  shift-and-add slice of all the other views at the point's depth (content at that depth adds up,
  content at other depths blurs out), so that a contour is one depth and has no drift.
* :func:`align_images` — bandpass, coarse alignment, patch tracking and a projection-model fit,
  then rounds of point tracking and fitting until the geometry stops changing.

Images are ``[n, y, x]`` float tensors, views sorted by tilt angle; everything is computed in float32
on the images' device, positions in float64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tomopipe.algorithms.align_fit import (
    AlignmentError,
    FitOptions,
    FitResult,
    fit_projection_model,
    projected_shift_error_px,
    usable_contours,
)
from tomopipe.algorithms.fourier import cosine_edge_taper
from tomopipe.algorithms.geometry import fft_centre, projection_rotations, rotation_2d
from tomopipe.algorithms.peaks import parabolic_offset

__all__ = ["bandpass_images", "stretch_matrices", "coarse_align", "track_patches", "CoarseAlignment", "PatchTracks",
           "zero_tilt_index", "patch_grid", "aligned_frame_size", "aligned_views", "aligned_to_raw",
           "find_specimen_points", "track_points", "PointTracks", "AlignOptions", "AlignmentResult", "align_images",
           "fill_untracked_views"]


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


def _find_peak(cc: torch.Tensor, max_shift_px: float | None = None, exclude_px: float = 3.0) -> Peak:
    """Highest peak of fft-shifted maps ``[b, h, w]`` within ``max_shift_px`` of zero, refined by a 1-D
    parabola through the 3 samples along x and y. Its significance is measured against the whole
    map outside ``exclude_px`` of the peak (the background of the correlation), so that it does not
    depend on the size of the searched region."""
    b, h, w = cc.shape
    cy, cx = fft_centre(h), fft_centre(w)
    yy = torch.arange(h, device=cc.device)[:, None] - cy
    xx = torch.arange(w, device=cc.device)[None, :] - cx
    search = cc
    if max_shift_px is not None:
        inside = (yy * yy + xx * xx) <= max_shift_px * max_shift_px
        search = torch.where(inside, cc, torch.full_like(cc, -torch.inf))
    flat = search.reshape(b, -1)
    value, index = flat.max(dim=1)
    iy, ix = index // w, index % w
    rows = torch.arange(b, device=cc.device)
    dx = parabolic_offset(cc[rows, iy, (ix - 1) % w], value, cc[rows, iy, (ix + 1) % w])
    dy = parabolic_offset(cc[rows, (iy - 1) % h, ix], value, cc[rows, (iy + 1) % h, ix])
    shift = torch.stack([(ix - cx).to(torch.float64) + dx.double(), (iy - cy).to(torch.float64) + dy.double()], -1)
    background = ((yy[None] - (iy - cy)[:, None, None]).square() + (xx[None] - (ix - cx)[:, None, None]).square()
                  > exclude_px * exclude_px)
    counts = background.reshape(b, -1).sum(1).clamp_min(2)
    mean = torch.where(background, cc, torch.zeros_like(cc)).reshape(b, -1).sum(1) / counts
    var = torch.where(background, cc - mean[:, None, None], torch.zeros_like(cc)).square().reshape(b, -1).sum(1) \
        / (counts - 1)
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
    n = images.shape[0]
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts.numel() != n:
        raise ValueError(f"coarse_align: {n} images but {tilts.numel()} tilt angles")
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    correlation = torch.ones(n, dtype=torch.float64)
    significance = torch.full((n,), math.inf, dtype=torch.float64)
    i0 = zero_tilt_index(tilts)
    for step in (1, -1):
        for t in range(i0 + step, n if step > 0 else -1, step):
            peak = _neighbour_peak(images, [t - step], t, shifts, tilt_axis_deg, tilts, edge_fraction,
                                   max_shift_fraction)
            shifts[t], correlation[t], significance[t] = peak.shift_px[0], peak.value[0], peak.significance[0]
    return CoarseAlignment(shifts, correlation, significance)


def _neighbour_peak(images: torch.Tensor, refs, t: int, shifts_px: torch.Tensor, tilt_axis_deg: float,
                    tilts_deg: torch.Tensor, edge_fraction: float = 0.1, max_shift_fraction: float = 0.4) -> Peak:
    """Whole-view cross-correlation of view ``t`` with the mean of views ``refs`` (specimen shifts
    ``shifts_px [n, 2]``), each resampled through the cosine stretch from its tilt to tilt ``t``:
    the peak is view t's specimen shift (of z = 0 features). Fields on the CPU, ``[1]``-sized."""
    _, ny, nx = images.shape
    device = images.device
    window = cosine_edge_taper((ny, nx), edge_fraction * min(nx, ny), device=device)
    centre = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij")
    rel = torch.stack([xx, yy], -1) - centre  # [ny, nx, 2] output pixel positions from the centre
    reference = torch.zeros(1, ny, nx, dtype=torch.float32, device=device)
    for r in refs:
        s_inv = torch.linalg.inv(stretch_matrices(tilt_axis_deg, tilts_deg[r], tilts_deg[t])[0])
        coords = centre + shifts_px[r] + rel @ s_inv.T  # ref(s_ref + S^-1 x)
        reference += _sample(images[r:r + 1], coords[None].to(device))
    peak = _find_peak(_correlate(images[t:t + 1], reference, window), max_shift_fraction * min(nx, ny))
    return Peak(peak.shift_px.cpu(), peak.value.cpu(), peak.significance.cpu())


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
    window = cosine_edge_taper((size, size), size / 4.0, device=device)
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
                ref_coords = (centre + p_ref[sl, None, None, :]
                              + (grid + (q[sl] - predicted[sl])[:, None, None, :]) @ S_inv.T)
                reference = _sample(images[r].expand(k, ny, nx), ref_coords.to(device))
                peak = _find_peak(_correlate(target, reference, window), limit)
                good = (peak.significance.cpu() >= min_significance)
                found = predicted[sl] + peak.shift_px.cpu()
                rows = index[sl][good]
                positions[rows, t] = found[good]
                correlation[rows, t] = peak.value.cpu()[good]
            active = ~torch.isnan(positions[:, t, 0])
    return PatchTracks(positions, correlation, size, starts)


# ----------------------------------------------------------------------------- second stage: points
def aligned_frame_size(image_size_xy, tilt_axis_deg: float) -> tuple[int, int]:
    """``(nx, ny)`` of the aligned frame (tilt axis along +Y) that holds the raw field: the raw size,
    x and y swapped when the tilt axis is closer to the raw x axis than to the raw y axis."""
    nx, ny = (int(v) for v in image_size_xy)
    a = math.radians(float(tilt_axis_deg))
    return (ny, nx) if abs(math.sin(a)) > abs(math.cos(a)) else (nx, ny)


def aligned_views(images: torch.Tensor, rot_z_deg, shifts_px, magnification, size_xy, edge_px: float = 4.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views in their aligned frames, ``aligned(X) = raw(m·R2(rot_z)·X + s)`` about the centres
    ``N//2`` (bicubic), and their coverage: 1 where the raw sample lies at least ``edge_px`` inside the
    raw image, falling linearly to 0 at its border (0 outside). Both ``[n, ny, nx]``, ``size_xy`` of
    the aligned frame; ``rot_z_deg`` and ``magnification`` per view or scalar, ``shifts_px [n, 2]``."""
    n, ny, nx = images.shape
    nxa, nya = (int(v) for v in size_xy)
    rot = torch.as_tensor(rot_z_deg, dtype=torch.float64).reshape(-1).expand(n)
    mag = torch.as_tensor(magnification, dtype=torch.float64).reshape(-1).expand(n)
    shifts = torch.as_tensor(shifts_px, dtype=torch.float64).reshape(n, 2)
    c_in = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    c_out = torch.tensor([fft_centre(nxa), fft_centre(nya)], dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(nya, dtype=torch.float64), torch.arange(nxa, dtype=torch.float64),
                            indexing="ij")
    rel = torch.stack([xx, yy], -1) - c_out
    a = mag[:, None, None] * rotation_2d(rot)
    coords = c_in + torch.einsum("nij,yxj->nyxi", a, rel) + shifts[:, None, None]
    views = _sample(images, coords.to(images.device))
    inside = torch.minimum(torch.minimum(coords[..., 0], nx - 1 - coords[..., 0]),
                           torch.minimum(coords[..., 1], ny - 1 - coords[..., 1]))
    coverage = (inside / max(edge_px, 1e-6)).clamp(0.0, 1.0).to(torch.float32).to(images.device)
    return views, coverage


def aligned_to_raw(positions_px: torch.Tensor, rot_z_deg, shifts_px, magnification) -> torch.Tensor:
    """Positions ``[m, n, 2]`` in the aligned frames (px from the centre) -> raw image positions
    ``m·R2(rot_z)·X + s`` (px from the raw centre); NaN stays NaN."""
    n = positions_px.shape[1]
    rot = torch.as_tensor(rot_z_deg, dtype=torch.float64).reshape(-1).expand(n)
    mag = torch.as_tensor(magnification, dtype=torch.float64).reshape(-1).expand(n)
    a = mag[:, None, None] * rotation_2d(rot)
    return torch.einsum("nij,mnj->mni", a, positions_px.to(torch.float64)) + torch.as_tensor(
        shifts_px, dtype=torch.float64).reshape(n, 2)[None]


def _shift_and_add(views: torch.Tensor, tilts_deg: torch.Tensor, x_px: torch.Tensor, y_px: torch.Tensor,
                   z_px: torch.Tensor) -> torch.Tensor:
    """``Σ_j views_j(x·cos θ_j + z·sin θ_j, y)`` (bilinear, 0 outside) at specimen points given as
    broadcastable grids ``x_px, y_px, z_px`` (px from the centre); returns the grid's shape."""
    n, ny, nx = views.shape
    x, y, z = torch.broadcast_tensors(x_px.to(torch.float64), y_px.to(torch.float64), z_px.to(torch.float64))
    shape = x.shape
    t = torch.deg2rad(tilts_deg.to(torch.float64))
    out = torch.zeros(shape, dtype=torch.float32, device=views.device)
    gy = (y + fft_centre(ny)).reshape(1, -1, 1)
    for j in range(n):
        gx = (x * torch.cos(t[j]) + z * torch.sin(t[j]) + fft_centre(nx)).reshape(1, -1, 1)
        coords = torch.stack([gx, gy], -1)
        out += F.grid_sample(views[j][None, None], _normalised(coords, nx, ny).to(views.device), mode="bilinear",
                             padding_mode="zeros", align_corners=True).reshape(shape)
    return out


def _normalised(coords: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
    grid = torch.empty_like(coords, dtype=torch.float32)
    grid[..., 0] = (coords[..., 0] * (2.0 / (nx - 1)) - 1.0).to(torch.float32)
    grid[..., 1] = (coords[..., 1] * (2.0 / (ny - 1)) - 1.0).to(torch.float32)
    return grid


def find_specimen_points(views: torch.Tensor, coverage: torch.Tensor, tilt_angles_deg, max_depth_px: float,
                         count: int, min_distance_px: float, border_px: float, binning: int = 2) -> torch.Tensor:
    """Candidate specimen points ``[k, 3]`` (x, y, z px in the specimen frame of the current
    alignment): the ``count`` strongest local maxima, at least ``min_distance_px`` apart, of the local
    energy (square, smoothed over 3 voxels) of the shift-and-add volume ``Σ w_j·V_j / Σ w_j`` of the
    aligned (band-passed) views ``V`` with coverage ``w``, for depths ``|z| <= max_depth_px``,
    computed on a grid ``binning`` times coarser. Only voxels seen by 90 % of the views and at least
    ``border_px`` inside the aligned frame qualify."""
    n, ny, nx = views.shape
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    b = max(1, int(binning))
    pooled = F.avg_pool2d((views * coverage)[:, None], b, b)[:, 0]
    weights = F.avg_pool2d(coverage[:, None], b, b)[:, 0]
    pny, pnx = pooled.shape[-2:]
    # pooled pixel p covers full-resolution pixels b·p .. b·p + b - 1; a point at x (full px from N//2)
    # is at pooled index (x + N//2 - (b - 1)/2)/b = x/b + c + pnx//2: sampled with x_arg = x/b + c
    cx = (fft_centre(nx) - (b - 1) / 2) / b - fft_centre(pnx)
    cy = (fft_centre(ny) - (b - 1) / 2) / b - fft_centre(pny)
    zs = torch.arange(-math.floor(max_depth_px / b), math.floor(max_depth_px / b) + 1, dtype=torch.float64)
    X = (torch.arange(pnx, dtype=torch.float64) - fft_centre(pnx))[None, None, :]
    Y = (torch.arange(pny, dtype=torch.float64) - fft_centre(pny))[None, :, None]
    Z = zs[:, None, None]
    sums = _shift_and_add(pooled, tilts, X, Y, Z)
    seen = _shift_and_add(weights, tilts, X, Y, Z)
    sums, seen = sums.cpu(), seen.cpu()
    volume = torch.where(seen > 0.9 * n, sums / seen.clamp_min(1e-6), torch.zeros_like(sums))
    energy = F.avg_pool3d(volume.square()[None, None], 3, stride=1, padding=1)[0, 0]
    radius = max(1, int(round(min_distance_px / b)))
    local_max = F.max_pool3d(energy[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]
    keep = (energy == local_max) & (energy > 0) & (seen > 0.9 * n)
    edge = int(math.ceil(border_px / b))
    keep[:, :edge] = False
    keep[:, pny - edge:] = False
    keep[:, :, :edge] = False
    keep[:, :, pnx - edge:] = False
    keep[0] = False
    keep[-1] = False
    index = torch.nonzero(keep)
    order = torch.argsort(energy[keep], descending=True)[:count]
    index = index[order].to(torch.float64)
    points = torch.stack([(index[:, 2] - fft_centre(pnx) - cx) * b, (index[:, 1] - fft_centre(pny) - cy) * b,
                          zs[index[:, 0].long()] * b], -1)
    return points.cpu()


@dataclass
class PointTracks:
    positions_px: torch.Tensor  #: [m, n, 2] measured positions in the aligned frames (px from the centre), NaN: none
    correlation: torch.Tensor  #: [m, n] normalised correlation with the reference (NaN: not measured)
    window_px: int


def track_points(views: torch.Tensor, coverage: torch.Tensor, tilt_angles_deg, points_px: torch.Tensor,
                 window_px: int, max_shift_px: float | None = None, min_views: int = 5,
                 min_correlation: float = 0.2) -> PointTracks:
    """Measure specimen points ``[m, 3]`` in every aligned view ``V_i`` (coverage ``w_i``).

    The reference of point k in view i is the shift-and-add slice of all other views at the point's
    depth ``z_k``, drawn in view i: ``ref(X, Y) = Σ_{j≠i} w_j·V_j(x·cos θ_j + z_k·sin θ_j, Y) /
    Σ_{j≠i} w_j`` with ``x = (X − z_k·sin θ_i)/cos θ_i``; features at depth ``z_k`` sit where the
    current geometry puts them and others are blurred by their parallax. The window (``window_px``,
    tapered) around the predicted position ``(x_k cos θ_i + z_k sin θ_i, y_k)`` of ``V_i`` is
    correlated with it; the peak (within ``max_shift_px``, default a quarter window) is the
    measured position. Not measured: windows not fully inside the view, where fewer than
    ``min_views`` other views contribute, with a peak correlation below ``min_correlation`` or a
    peak at the edge of the searched disk (within 1 px: no peak found)."""
    n, ny, nx = views.shape
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts.numel() != n:
        raise ValueError(f"track_points: {n} views but {tilts.numel()} tilt angles")
    w = int(window_px) + (int(window_px) % 2)
    if w < 8 or w > min(nx, ny):
        raise ValueError(f"track_points: window {window_px} px must be between 8 and {min(nx, ny)} px")
    device = views.device
    points = points_px.to(torch.float64)
    m = points.shape[0]
    t = torch.deg2rad(tilts)
    c, s = torch.cos(t), torch.sin(t)
    half = w // 2
    # the local shift-and-add slices: specimen grid x_k + u (|u| <= half / min cos + 2), y_k + v
    hx = int(math.ceil(half / float(c.min()))) + 2
    hy = half + 2
    u = torch.arange(-hx, hx + 1, dtype=torch.float64)
    v = torch.arange(-hy, hy + 1, dtype=torch.float64)
    weighted = views * coverage
    x = points[:, 0, None, None] + u[None, None, :]
    y = points[:, 1, None, None] + v[None, :, None]
    z = points[:, 2, None, None].expand(m, 1, 1)
    sums = _shift_and_add(weighted, tilts, x, y, z)  # [m, 2hy+1, 2hx+1]
    counts = _shift_and_add(coverage, tilts, x, y, z)
    g = torch.arange(w, dtype=torch.float64) - half
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([gx, gy], -1)  # [w, w, 2]
    window = cosine_edge_taper((w, w), w / 4.0, device=device)
    limit = max_shift_px if max_shift_px is not None else w / 4.0
    centre = torch.tensor([fft_centre(nx), fft_centre(ny)], dtype=torch.float64)
    positions = torch.full((m, n, 2), math.nan, dtype=torch.float64)
    correlation = torch.full((m, n), math.nan, dtype=torch.float64)
    for i in range(n):
        predicted = torch.stack([points[:, 0] * c[i] + points[:, 2] * s[i], points[:, 1]], -1)
        q = torch.round(predicted)
        pos = q[:, None, None, :] + grid  # [m, w, w, 2] aligned px from the centre
        inside = ((q - half >= -centre) & (q + half <= torch.tensor([nx - 1, ny - 1]) - centre)).all(-1)
        target = _sample(views[i:i + 1].expand(m, ny, nx), (centre + pos).to(device))
        own_w = _sample(coverage[i:i + 1].expand(m, ny, nx), (centre + pos).to(device))
        # the same pixels on the local slice grid: u = (X - z s_i)/c_i - x_k, v = Y - y_k
        lu = (pos[..., 0] - points[:, 2, None, None] * s[i]) / c[i] - points[:, 0, None, None] + hx
        lv = pos[..., 1] - points[:, 1, None, None] + hy
        local = torch.stack([lu, lv], -1)
        # view i's own term is removed as it entered the sums (same two interpolations), exactly
        own_sum = _shift_and_add(weighted[i:i + 1], tilts[i:i + 1], x, y, z)
        own_count = _shift_and_add(coverage[i:i + 1], tilts[i:i + 1], x, y, z)
        others = _sample(counts - own_count, local.to(device))
        reference = _sample(sums - own_sum, local.to(device)) / others.clamp_min(1e-3)
        ok = inside & (own_w.amin(dim=(-2, -1)).cpu() > 0.99) & (others.amin(dim=(-2, -1)).cpu() >= min_views)
        if not bool(ok.any()):
            continue
        on_device = ok.to(device)
        peak = _find_peak(_correlate(target[on_device], reference[on_device], window), limit)
        rows = torch.nonzero(ok)[:, 0]
        good = (peak.value.cpu() >= min_correlation) & (peak.shift_px.cpu().norm(dim=-1) <= limit - 1.0)
        rows = rows[good]
        positions[rows, i] = q[rows] + peak.shift_px.cpu()[good]
        correlation[rows, i] = peak.value.cpu()[good]
    return PointTracks(positions, correlation, w)


# ----------------------------------------------------------------------------- the whole alignment
@dataclass(frozen=True)
class AlignOptions:
    """Options of :func:`align_images` (sizes in pixels of the images being aligned)."""

    patch_size_px: int = 64
    patch_overlap: float = 0.8
    patch_min_significance: float = 6.0  #: a patch's correlation peak must stand this many SDs out
    adapt_patches: bool = True  #: also try other patch sizes when views keep too few contours
    fit: FitOptions = FitOptions()
    points: bool = True  #: second stage (point tracking); False: the patch fit is the result
    point_window_px: int = 32
    point_count: int = 150
    point_rounds: int = 3  #: most rounds of point tracking + fit
    point_max_depth_px: float | None = None  #: depth range searched for points (default half the smaller side)
    point_min_views_fraction: float = 0.25  #: a point contour needs this fraction of the views
    converged_px: float = 0.1  #: rounds stop when no shift moves more (and the axis < converged_deg)
    converged_deg: float = 0.05


@dataclass
class AlignmentResult:
    fit: FitResult  #: the final alignment (shifts of views left out of the fit from cross-correlation)
    patch_fit: FitResult  #: the alignment from the patch contours alone (same for its left-out views)
    coarse: CoarseAlignment
    patches: PatchTracks
    points: PointTracks | None  #: last round of point tracking (aligned-frame positions), None without it
    points_xyz_px: torch.Tensor | None  #: [m, 3] the tracked points (specimen frame of the final fit)
    stage: str  #: "points" or "patches": which stage gave ``fit``
    rounds: list  #: per point round: axis, shift change, residual, contours
    note: str = ""  #: why the point stage was not used, when it was not
    patch_trials: list = field(default_factory=list)  #: patch sizes tried: size, views covered, contours

    @property
    def view_method(self) -> list[str]:
        """Per view: "contours" (in the final fit) or "cross-correlation" (whole-view fallback)."""
        return ["contours" if bool(v) else "cross-correlation" for v in self.fit.view_fitted]


def _fit_options_for(options: AlignOptions, n_views: int) -> FitOptions:
    return dataclasses.replace(options.fit, min_views_per_contour=max(
        options.fit.min_views_per_contour, int(math.ceil(options.point_min_views_fraction * n_views))))


def _patch_sizes(options: AlignOptions, image_size_xy) -> list[int]:
    """Patch sides to try: the asked one (at most half the smaller image side, so that the field
    holds several independent patches), then 1.5 times larger (more signal per patch) and 0.6 times
    smaller (more patches), within 24 px .. 0.6 × the smaller side."""
    side = min(int(v) for v in image_size_xy)
    first = max(8, min(int(options.patch_size_px), side // 2))
    if not options.adapt_patches:
        return [first]
    others = [min(int(round(1.5 * first)), int(0.6 * side)), max(24, int(round(0.6 * first)))]
    return list(dict.fromkeys([first] + [size for size in others if 8 <= size <= side]))


def _track_adaptively(filtered: torch.Tensor, tilts: torch.Tensor, tilt_axis_deg: float, shifts_px: torch.Tensor,
                      options: AlignOptions) -> tuple[PatchTracks, list]:
    """Patch tracks from the first of :func:`_patch_sizes` that gives every view enough contours for
    the fit (:func:`~tomopipe.algorithms.align_fit.usable_contours`), else from the size that covers
    the most views (then the most contours); also the trials."""
    trials, best, best_key = [], None, None
    for size in _patch_sizes(options, (filtered.shape[-1], filtered.shape[-2])):
        tracks = track_patches(filtered, tilts, tilt_axis_deg, shifts_px, size, options.patch_overlap,
                               options.patch_min_significance)
        contours, views = usable_contours(~torch.isnan(tracks.positions_px[..., 0]), options.fit)
        key = (int(views.sum()) if int(contours.sum()) >= options.fit.min_contours else 0, int(contours.sum()))
        trials.append({"patch_size_px": tracks.patch_size_px, "patches": int(tracks.positions_px.shape[0]),
                       "views_covered": key[0], "contours": key[1]})
        if best_key is None or key > best_key:
            best, best_key = tracks, key
        if key[0] == filtered.shape[0]:
            break
    return best, trials


def fill_untracked_views(filtered: torch.Tensor, fit: FitResult, references: int = 4) -> tuple[FitResult, torch.Tensor]:
    """``fit`` with the specimen shifts of its views left out (``view_fitted`` False) found by
    whole-view cross-correlation with the mean of the ``references`` aligned views next to them on the
    side of the fit's reference view, each through the cosine stretch of the fitted axis and tilts
    (outwards from the reference view, as :func:`coarse_align`; the mean has less noise than one
    neighbour); also the peak significance of each filled view (NaN for fitted ones).
    ``filtered``: the band-passed views."""
    n = filtered.shape[0]
    significance = torch.full((n,), math.nan, dtype=torch.float64)
    if bool(fit.view_fitted.all()):
        return fit, significance
    shifts = fit.shifts_px.clone()
    i0 = int(torch.argmin(torch.where(fit.view_fitted, fit.tilt_deg.abs(), torch.full_like(fit.tilt_deg, math.inf))))
    for step in (1, -1):
        for t in range(i0 + step, n if step > 0 else -1, step):
            if bool(fit.view_fitted[t]):
                continue
            refs = [r for r in range(t - step, t - step * (references + 1), -step) if 0 <= r < n]
            peak = _neighbour_peak(filtered, refs, t, shifts, fit.axis_deg, fit.tilt_deg)
            shifts[t], significance[t] = peak.shift_px[0], peak.significance[0]
    return dataclasses.replace(fit, shifts_px=shifts), significance


def align_images(images: torch.Tensor, tilt_angles_deg, tilt_axis_deg: float, options: AlignOptions = AlignOptions(),
                 tilt_offset_deg: float | None = None) -> AlignmentResult:
    """Align one tilt series ``images [n, y, x]`` (views sorted by tilt angle, nominal angles
    ``tilt_angles_deg``, starting tilt-axis angle ``tilt_axis_deg``).

    1. Band-pass, :func:`coarse_align`, :func:`track_patches` (other patch sizes too when views keep
       too few contours: :func:`_track_adaptively`) and
       :func:`~tomopipe.algorithms.align_fit.fit_projection_model` (the patch fit).
    2. Rounds of: views interpolated into their aligned frames with the current alignment,
       specimen points found once (:func:`find_specimen_points`), :func:`track_points`, and the
       projection model fitted to the point contours, until no shift moves by more than
       ``converged_px`` and the axis by less than ``converged_deg`` (at most ``point_rounds``).
       If the point stage cannot be fitted (too few points, e.g. images too small for the window)
       the patch fit is returned and ``note`` says why.

    Views that a fit leaves out (too few contours: low signal, high tilt) are aligned by
    :func:`fill_untracked_views` after each fit, so the point stage measures them too.

    The tilt-angle offset (a gauge of the projection model) is ``tilt_offset_deg`` when given (for
    example from :func:`~tomopipe.algorithms.align_fit.transmission_tilt_offset`), else, when
    ``options.fit.refine_tilt_offset``, the one that levels the points of the patch fit
    (:func:`~tomopipe.algorithms.align_fit.level_specimen`), else 0; the point stage keeps it.
    Raises :class:`~tomopipe.algorithms.align_fit.AlignmentError` when the patch stage fails (too
    few contours, or fewer than ``options.fit.min_views_fitted`` views with enough of them)."""
    n, ny, nx = images.shape
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    if tilts.numel() != n:
        raise ValueError(f"align_images: {n} images but {tilts.numel()} tilt angles")
    filtered = bandpass_images(images)
    coarse = coarse_align(filtered, tilts, tilt_axis_deg)
    patches, trials = _track_adaptively(filtered, tilts, tilt_axis_deg, coarse.shifts_px, options)
    patch_fit = fit_projection_model(patches.positions_px, tilts, tilt_axis_deg, coarse.shifts_px, options.fit,
                                     tilt_offset_deg=tilt_offset_deg)
    patch_fit = fill_untracked_views(filtered, patch_fit)[0]

    def patches_only(note: str, rounds=(), tracks=None) -> AlignmentResult:
        return AlignmentResult(patch_fit, patch_fit, coarse, patches, tracks, None, "patches", list(rounds), note,
                               trials)

    if not options.points:
        return patches_only("point stage off")
    size = aligned_frame_size((nx, ny), patch_fit.axis_deg)
    window = int(options.point_window_px)
    if window + 8 > min(size):
        return patches_only(f"images of {nx} x {ny} px are too small for point windows of {window} px")
    fine_filtered = bandpass_images(images, sigma1=0.03, radius2=0.3)
    fit_options = _fit_options_for(options, n)
    # the tilt-angle offset (a gauge) stays that of the patch fit: imposed, or levelled on the patch
    # contours (their points sample the whole field; the point stage's are fewer and noisier)
    round_offset = float((patch_fit.tilt_deg - tilts).mean())
    fit, points, tracks, observed, rounds = patch_fit, None, None, None, []
    max_depth = options.point_max_depth_px if options.point_max_depth_px is not None else min(size) / 2.0
    for round_index in range(1, options.point_rounds + 1):
        views, coverage = aligned_views(fine_filtered, fit.rot_z_deg, fit.shifts_px, fit.magnification, size)
        if points is None:
            points = find_specimen_points(views, coverage, fit.tilt_deg, max_depth, options.point_count,
                                          min_distance_px=window / 4.0, border_px=window / 2.0 + 2)
            if points.shape[0] < fit_options.min_contours:
                return patches_only(f"only {points.shape[0]} specimen points found", rounds)
        tracks = track_points(views, coverage, fit.tilt_deg, points, window)
        observed = _screen(aligned_to_raw(tracks.positions_px, fit.rot_z_deg, fit.shifts_px, fit.magnification), fit,
                           fit_options.min_views_per_contour)
        try:
            new = fit_projection_model(observed, tilts, fit.axis_deg, fit.shifts_px, fit_options,
                                       tilt_offset_deg=round_offset)
        except AlignmentError as error:
            return patches_only(f"point round {round_index}: {error}", rounds, tracks)
        new = fill_untracked_views(filtered, new)[0]
        moved = projected_shift_error_px(new.rot_z_deg, new.tilt_deg, new.shifts_px, new.magnification,
                                         fit.shifts_px)["max_px"]
        turned = abs(new.axis_deg - fit.axis_deg)
        points = torch.where(new.contour_used[:, None], new.points_px, _points_from_observations(observed, new, points))
        fit = new
        rounds.append({"round": round_index, "axis_deg": fit.axis_deg, "max_shift_change_px": moved,
                       "rms_residual_px": fit.rms_residual_px, "contours": int(fit.contour_used.sum()),
                       "points": int(points.shape[0]), "views_fitted": int(fit.view_fitted.sum())})
        if moved <= options.converged_px and turned <= options.converged_deg:
            break
    return AlignmentResult(fit, patch_fit, coarse, patches, tracks, points, "points", rounds, "", trials)


def _screen(observed_px: torch.Tensor, fit: FitResult, min_views: int, floor_px: float = 2.0) -> torch.Tensor:
    """Contours cleaned with the current geometry before the joint fit: each contour's 3-D point is
    solved alone; observations further than ``max(floor_px, 3 x median residual)`` from its
    projection are dropped (twice), then contours whose RMS residual exceeds ``max(floor_px / 2,
    2 x the median contour RMS)`` or that keep fewer than ``min_views`` views. Spurious points
    (seeds between features) and missed peaks would otherwise outnumber what the fit's robust
    rejection can take."""
    rot = projection_rotations(fit.rot_z_deg, fit.tilt_deg).to(torch.float64)
    a = fit.magnification[:, None, None] * rot[:, :2, :]
    out = observed_px.clone()
    zeros = torch.zeros(out.shape[0], 3, dtype=torch.float64)
    for _ in range(2):
        points = _points_from_observations(out, fit, zeros)
        residual = (torch.einsum("nki,mi->mnk", a, points) + fit.shifts_px[None] - out).norm(dim=-1)
        seen = ~torch.isnan(residual)
        if not bool(seen.any()):
            return out
        bound = max(floor_px, 3.0 * float(residual[seen].median()))
        out[seen & (residual > bound)] = math.nan
    points = _points_from_observations(out, fit, zeros)
    residual = (torch.einsum("nki,mi->mnk", a, points) + fit.shifts_px[None] - out).norm(dim=-1)
    seen = ~torch.isnan(residual)
    count = seen.sum(1)
    rms = torch.sqrt(torch.where(seen, residual.square(), torch.zeros_like(residual)).sum(1) / count.clamp_min(1))
    valid = count >= min_views
    if bool(valid.any()):
        bound = max(floor_px / 2.0, 2.0 * float(rms[valid].median()))
        out[~valid | (rms > bound)] = math.nan
    return out


def _points_from_observations(observed_px: torch.Tensor, fit: FitResult, fallback: torch.Tensor) -> torch.Tensor:
    """Least-squares 3-D position of every contour ``observed_px [m, n, 2]`` (raw px) with the
    geometry of ``fit`` (all its observed views, equal weights); ``fallback`` where fewer than 3
    views were observed."""
    rot = projection_rotations(fit.rot_z_deg, fit.tilt_deg).to(torch.float64)
    a = fit.magnification[:, None, None] * rot[:, :2, :]  # [n, 2, 3]
    seen = ~torch.isnan(observed_px[..., 0])
    weight = seen.to(torch.float64)
    x = torch.nan_to_num(observed_px) - fit.shifts_px[None]
    h = torch.einsum("mn,nki,nkj->mij", weight, a, a) + 1e-9 * torch.eye(3, dtype=torch.float64)
    b = torch.einsum("mn,nki,mnk->mi", weight, a, x)
    solved = torch.linalg.solve(h, b)
    return torch.where((seen.sum(1) >= 3)[:, None], solved, fallback)
