"""Window periodograms, their (sector, radial bin) profiles, and windows grouped by depth and whitened."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf_estimate.setup import F64, CtfEstimationError, Setup
from tomopipe.algorithms.fourier import cosine_edge_taper
from tomopipe.algorithms.geometry import projection_rotations


# ----------------------------------------------------------------------------- windows
def tile_origins_px(size_px: int, window_px: int, overlap: float = 0.5) -> list[int]:
    """Origins of windows of ``window_px`` covering ``size_px`` with at least ``overlap`` overlap.

    The first window starts at 0, the last one ends at the image edge, the others are spread
    evenly in between.
    """
    if window_px > size_px:
        raise CtfEstimationError(f"window of {window_px} px is larger than the image ({size_px} px)")
    if not 0.0 <= overlap < 1.0:
        raise CtfEstimationError(f"window overlap must be in [0, 1), got {overlap}")
    step = max(1.0, window_px * (1.0 - overlap))
    n = max(1, math.ceil((size_px - window_px) / step) + 1)
    if n == 1:
        return [0]
    return [round(i * (size_px - window_px) / (n - 1)) for i in range(n)]


def power_spectrum_tiles(image: torch.Tensor, window_px: int = 512, overlap: float = 0.5,
                         edge_taper_px: int | None = None):
    """Periodograms of overlapping windows of one image (or of the frames of one movie).

    ``image`` ``[h, w]`` or ``[frames, h, w]`` (frame periodograms are summed). Each window has
    its (taper-weighted) mean removed, is multiplied by a raised-cosine edge taper
    (``edge_taper_px``, default ``window_px // 16``) and gives ``|rfft2|² / Σ taper²``.
    Returns ``(spectra [t, window, window//2 + 1] float32 (torch.fft layout, DC at [0, 0]),
    centres_px [t, 2] float64 (x, y) window centres in image pixels)``.
    """
    img = torch.as_tensor(image)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise CtfEstimationError(f"power_spectrum_tiles: expected [h, w] or [frames, h, w], got {tuple(img.shape)}")
    img = img.to(torch.float32)
    _, h, w = img.shape
    if window_px > min(h, w):
        raise CtfEstimationError(f"window of {window_px} px is larger than the image ({w} x {h} px)")
    oy, ox = tile_origins_px(h, window_px, overlap), tile_origins_px(w, window_px, overlap)
    taper = cosine_edge_taper((window_px, window_px), window_px // 16 if edge_taper_px is None else int(edge_taper_px),
                              device=img.device)
    norm = float((taper * taper).sum())
    spectra, centres = [], []
    for y0 in oy:
        for x0 in ox:
            tile = img[:, y0:y0 + window_px, x0:x0 + window_px]
            mean = (tile * taper).sum(dim=(-2, -1), keepdim=True) / taper.sum()
            f = torch.fft.rfft2((tile - mean) * taper)
            spectra.append((f.real ** 2 + f.imag ** 2).sum(0) / norm)
            centres.append((x0 + (window_px - 1) / 2.0, y0 + (window_px - 1) / 2.0))
    return torch.stack(spectra), torch.tensor(centres, dtype=F64)


def specimen_plane_depth_A(positions_A, tilt_axis_angle_deg, tilt_angles_deg) -> torch.Tensor:
    """Depth z_P (Å) of the flat specimen (z = 0) seen at image positions, per tilt: ``[n, m]``.

    ``positions_A`` ``[m, 2]`` (x, y) in Å from the image centre; the specimen point (X, Y, 0)
    with ``[R·(X, Y, 0)]_xy = (x, y)`` is solved for, R = ``projection_rotations(axis, tilt)``,
    and its depth ``[R·(X, Y, 0)]_z`` returned (for a tilt θ about an axis along +y:
    ``z_P = −x·tan θ``).
    """
    rot = projection_rotations(torch.as_tensor(tilt_axis_angle_deg, dtype=F64),
                               torch.as_tensor(tilt_angles_deg, dtype=F64))
    p = torch.as_tensor(positions_A, dtype=F64).reshape(-1, 2)
    plane = torch.linalg.solve(rot[:, :2, :2], p.T[None].expand(rot.shape[0], 2, p.shape[0]))
    return torch.einsum("nj,njm->nm", rot[:, 2, :2], plane)


# ----------------------------------------------------------------------------- per-tilt data
@dataclass
class TiltSpectra:
    """Sector profiles of one tilt's windows, and the windows' geometry."""

    profiles: torch.Tensor  # [t, n_sec, n_k] mean power per (sector, radial bin)
    depth_A: torch.Tensor  # [t] z_P of the window centres
    centres_A: torch.Tensor  # [t, 2] (x, y) from the image centre
    mean_spectrum: torch.Tensor  # [w, w//2+1] mean periodogram (diagnostic)
    tilt_deg: float
    axis_deg: float
    image_area_px: float
    groups: DepthGroups | None = None  # all windows, grouped by depth
    bg: torch.Tensor | None = None  # [n_k] background used for whitening
    snr: torch.Tensor | None = None  # [n_k] model weight (env / bg) or ones


def _sector_profiles(spectra: torch.Tensor, setup: Setup) -> torch.Tensor:
    """Mean power per (sector, radial bin) of each window: ``[t, n_sec, n_k]``."""
    n_k, n_sec = len(setup.j), setup.n_sectors
    flat = spectra.reshape(spectra.shape[0], -1)[:, setup.pixel_mask.reshape(-1)].T.to(F64)  # [pix, t]
    sums = torch.zeros(n_sec * n_k, spectra.shape[0], dtype=F64).index_add_(0, setup.bin_index, flat)
    counts = torch.bincount(setup.bin_index, minlength=n_sec * n_k).to(F64)
    prof = (sums / counts.clamp(min=1)[:, None]).T.reshape(-1, n_sec, n_k)
    empty = (counts == 0).reshape(n_sec, n_k)
    if bool(empty.any()):  # fill empty cells with the rotational average of the same radius
        full = sums.T.reshape(-1, n_sec, n_k).sum(1) / counts.reshape(n_sec, n_k).sum(0).clamp(min=1)
        prof = torch.where(empty[None], full[:, None, :], prof)
    return prof


def prepare_tilt(image, tilt_deg, axis_deg, setup: Setup, overlap: float) -> TiltSpectra:
    """Window spectra of one image as sector profiles, with the window centres (Å from the image's
    FFT centre ``N // 2``) and their plane depths z_P."""
    spectra, centres_px = power_spectrum_tiles(image, setup.window_px, overlap)
    spectra = spectra.cpu()  # the FFTs run where the images are; the (small) fits on the CPU
    h, w = image.shape[-2], image.shape[-1]
    centres_A = (centres_px - torch.tensor([w // 2, h // 2], dtype=F64)) * setup.pixel_size_A
    depth = specimen_plane_depth_A(centres_A, axis_deg, tilt_deg)[0]
    return TiltSpectra(profiles=_sector_profiles(spectra, setup), depth_A=depth, centres_A=centres_A,
                       mean_spectrum=spectra.mean(0), tilt_deg=float(tilt_deg), axis_deg=float(axis_deg),
                       image_area_px=float(h * w))


# ----------------------------------------------------------------------------- rows (grouped windows)
@dataclass
class DepthGroups:
    """Windows grouped by depth (100 Å bins): mean power, number of windows, exact mean depth."""

    power: torch.Tensor  # [rows, n_sec, n_k]
    weight: torch.Tensor  # [rows]
    depth_A: torch.Tensor  # [rows]


@dataclass
class WhitenedRows:
    """Grouped windows whitened (``P / bg − 1``) and detrended within the fit range."""

    s_fit: torch.Tensor  # [rows, n_sec, n_fit]
    weight: torch.Tensor  # [rows]
    depth_A: torch.Tensor  # [rows]
    data_norm: float  # Σ w·s²
    overlap: float = 1.0  # Σ window areas / image area (≥ 1): windows share their noise


def group_by_depth(tilt: TiltSpectra, setup: Setup, select=None, depth_ref_A: float = 0.0,
                   width_A: float = 100.0) -> DepthGroups:
    """Windows (optionally a subset) grouped by depth relative to ``depth_ref_A`` in bins of
    ``width_A`` (each group keeps its exact mean depth)."""
    prof, depth = tilt.profiles, tilt.depth_A - depth_ref_A
    if select is not None:
        prof, depth = prof[select], depth[select]
    _, inv = torch.unique(torch.round(depth / width_A).long(), return_inverse=True)
    n = int(inv.max()) + 1
    wsum = torch.zeros(n, dtype=F64).index_add_(0, inv, torch.ones_like(depth))
    psum = torch.zeros((n,) + prof.shape[1:], dtype=F64).index_add_(0, inv, prof)
    dsum = torch.zeros(n, dtype=F64).index_add_(0, inv, depth)
    return DepthGroups(power=psum / wsum[:, None, None], weight=wsum, depth_A=dsum / wsum)


def whiten(groups: DepthGroups, tilt: TiltSpectra, setup: Setup) -> WhitenedRows:
    s = groups.power[..., setup.fit] / tilt.bg[setup.fit] - 1.0
    s_fit = s @ setup.detrend.T
    norm = float((groups.weight[:, None, None] * s_fit * s_fit).sum())
    overlap = max(1.0, float(groups.weight.sum()) * setup.window_px ** 2 / tilt.image_area_px)
    return WhitenedRows(s_fit=s_fit, weight=groups.weight, depth_A=groups.depth_A, data_norm=max(norm, 1e-30),
                        overlap=overlap)
