"""Tilt-aware per-tilt CTF estimation (issue 4): defocus U/V/angle, phase shift, fit resolution.

Conventions (``docs/conventions.md`` §4, §7): defocus in Å, underfocus positive;
DefocusU along ``defocus_angle_deg`` measured from +x toward +y (index space, +y = increasing
row index), reported CTFFIND-style with U ≥ V and angle in (−90, 90]; the defocus of a point
is ``Δf = Δf_centre + hand·z_P`` (RELION ``rlnTomoHand``), z_P = depth of the point after the
projection rotation ``Rz(axis)·Ry(tilt)`` (:mod:`tomopipe.algorithms.geometry`). Image positions
are measured from the FFT centre ``N // 2`` of the image.

Method, per tilt image:

1. Periodograms of overlapping windows (``window_px``, 50 % overlap, cosine edge taper; frame
   periodograms summed for ``[n, frames, h, w]`` input). The specimen is taken as a flat slab
   (z = 0): each window centre has a known depth z_P, so its defocus is ``Δf_centre + hand·z_P``.
2. Each window's spectrum is reduced to azimuthal sectors (5°) × 1-pixel radial bins, whitened by
   a smooth background (``P / bg − 1``; a log-polynomial fitted to the fit range alone, so that
   the amorphous-ice ring at 3.7 Å or the detector fall-off cannot bend it there) and detrended (a quadratic
   in k is projected out of data
   and model alike, so that a residual background cannot favour any defocus).
3. Score = weighted normalised cross-correlation (CTFFIND-style) between these profiles and the
   model CTF² (averaged over each radial bin) within the fit range. The score is linear in the
   data, so correlation tables ``N(Δf)`` are computed once by a matrix product and shifted by
   each window group's defocus offset: the exhaustive search over the centre defocus (50 Å
   steps), astigmatism ((U − V)/2 up to 2300 Å × 15° angles) and phase shift (15° steps, with
   ``fit_phase``) is table look-ups.
4. Local refinement of (defocus, astigmatism vector, phase) by Nelder–Mead on the same score
   tabulated on a 5 Å defocus grid (2.5° phase grid) and interpolated linearly.
5. Second pass: background and envelope are fitted by least squares against the first model
   (``P ≈ bg(k) + A·exp(−B·k²/4)·CTF²``, piecewise-linear bg with knots 0.4 Thon-ring periods
   apart in the fit range, B on a grid; rejected when A is not significant, i.e. when the
   background took up the rings); the search and
   refinement are repeated with the data whitened by ``bg`` and the oscillation of the model
   (CTF² − ½) weighted by the signal-to-noise envelope ``env / bg`` (a matched filter, which keeps
   noise-dominated high frequencies from creating false maxima). The envelope is used only when
   its amplitude is ≥ 3 standard errors above zero.

Tilt series:

* Handedness: every tilt with |tilt| ≥ ``HAND_MIN_TILT_DEG`` is fitted (second pass) with
  ``hand = −1`` and ``+1``: the two hands predict opposite defocus gradients across the tilt axis,
  and the wrong one smears the Thon rings. The per-tilt differences d = score(+1) − score(−1)
  decide: the data's hand is the sign of their mean, *clear* when most tilts agree with it and
  the p-value is ≤ ``HAND_MAX_P``: the smaller of a two-sided sign test (how many tilts agree:
  8 of 8, 11 of 12, 14 of 16, 17 of 20 suffice; robust to the magnitudes of d, which grow with
  the tilt) and a one-sample t-test of mean(d) = 0 (t = mean(d) / (SD(d)/√n); decides with
  few tilts whose differences are consistent).
  ``hand="auto"`` fits with the data's hand when it is clear and with −1 (RELION's default)
  otherwise, which ``handedness["source"]`` records. Independently, ``gradient_slope``
  regresses local defocus values (fitted per grid cell without any hand assumption) on the
  plane depth z_P: ≈ +1 or −1.
* Astigmatism is one vector for the whole series (an objective-lens property), found by
  maximising the summed scores of all tilts (each with its own defocus) — it pools the SNR of
  all tilts; ``astigmatism_per_tilt=True`` keeps each tilt's own value instead.
* Consistency: every tilt's score curve over the whole defocus range is expressed in units of
  its noise level (sandwich estimate, z-scores). Each tilt takes the one of its 6 best maxima (or
  its best value within 1500 Å of a series trend) that maximises z − 1 per 1000 Å of distance
  to the trend beyond 1500 Å (at most 8); the trend is the constant that maximises the sum of
  these values (scanned over the whole range), refined to a robust quadratic in the tilt angle
  from 8 tilts on. A weak maximum far from the series gives way, a strong genuine jump stays.
* A ``gy × gx`` grid of local defocus values (the windows of each cell, offsets relative to the
  cell centre) is fitted per tilt.

Fit resolution (documented rule): the whitened spectrum and the model are averaged in bins of
the CTF phase χ (π/12 wide, over all sectors and windows, so astigmatism and tilt are
corrected), and for every Thon ring n (χ from nπ to (n+1)π) the weighted correlation between
data and model (each with a linear trend in χ removed) is computed over rings n−1..n+1. Going
outward from the first ring inside the fit range, the fit resolution is 1/k (at the mean
defocus) of the outer zero of the last ring of the first run of rings with correlation ≥
``FIT_RESOLUTION_THRESHOLD`` (0.5, and ≥ 3/√bins so that a short window of noise cannot pass);
the run must start within the first three rings and ends at two consecutive rings below the
threshold (single dips are tolerated); k is evaluated up to ``0.96 × Nyquist``. If no ring
passes, the low-resolution limit of the fit range is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from scipy.stats import binomtest
from scipy.stats import t as student_t

from tomopipe.algorithms.ctf import ctf_1d, electron_wavelength_A, enforce_ctffind_convention
from tomopipe.algorithms.fourier import cosine_edge_taper
from tomopipe.algorithms.geometry import projection_rotations
from tomopipe.algorithms.peaks import parabolic_offset
from tomopipe.errors import TomopipeError

__all__ = [
    "CtfEstimationError",
    "FIT_RESOLUTION_THRESHOLD",
    "HAND_MIN_TILT_DEG",
    "HAND_MAX_P",
    "handedness_evidence",
    "tile_origins_px",
    "power_spectrum_tiles",
    "specimen_plane_depth_A",
    "fit_ctf_1d",
    "fit_resolution_from_phase_profile",
    "estimate_tilt_series_ctf",
]

FIT_RESOLUTION_THRESHOLD = 0.5
HAND_MIN_TILT_DEG = 9.5  # tilts that inform the handedness check (a 10° tilt read as 9.99° counts)
HAND_MAX_P = 0.01  # a clear hand: p-value of the per-tilt score differences at most this
_F64 = torch.float64
_SUBSAMPLES = 4  # model samples per radial bin (the model is averaged over the bin width)
_DETREND_DEGREE = 2  # polynomial in k projected out of data and model within the fit range
_ASTIG_HALF_A = (0.0, 150.0, 300.0, 500.0, 800.0, 1200.0, 1700.0, 2300.0)  # (U − V)/2 grid
_ASTIG_ANGLES_DEG = tuple(range(0, 180, 15))
_LOCAL_BACKGROUND_DEGREE = 6  # pass-1 background: log-polynomial degree inside the fit range
_BACKGROUND_KNOT_PERIODS = 0.4  # pass-2 background: knot spacing (Thon-ring periods) up to the fit range's end
_BACKGROUND_KNOT_PX = 4.0  # and at least this many radial bins
_BACKGROUND_KNOT_PX_OUTSIDE = 16.0  # and beyond it
_PHASE_GRID_DEG = tuple(range(0, 180, 15))


class CtfEstimationError(TomopipeError):
    """Settings or images with which a CTF cannot be estimated (the message says what to change)."""


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
    return torch.stack(spectra), torch.tensor(centres, dtype=_F64)


def specimen_plane_depth_A(positions_A, tilt_axis_angle_deg, tilt_angles_deg) -> torch.Tensor:
    """Depth z_P (Å) of the flat specimen (z = 0) seen at image positions, per tilt: ``[n, m]``.

    ``positions_A`` ``[m, 2]`` (x, y) in Å from the image centre; the specimen point (X, Y, 0)
    with ``[R·(X, Y, 0)]_xy = (x, y)`` is solved for, R = ``projection_rotations(axis, tilt)``,
    and its depth ``[R·(X, Y, 0)]_z`` returned (for a tilt θ about an axis along +y:
    ``z_P = −x·tan θ``).
    """
    rot = projection_rotations(torch.as_tensor(tilt_axis_angle_deg, dtype=_F64),
                               torch.as_tensor(tilt_angles_deg, dtype=_F64))
    p = torch.as_tensor(positions_A, dtype=_F64).reshape(-1, 2)
    plane = torch.linalg.solve(rot[:, :2, :2], p.T[None].expand(rot.shape[0], 2, p.shape[0]))
    return torch.einsum("nj,njm->nm", rot[:, 2, :2], plane)


# ----------------------------------------------------------------------------- settings
@dataclass
class _Setup:
    """Everything that is the same for all tilts of one call."""

    pixel_size_A: float
    window_px: int
    voltage_kV: float
    cs_mm: float
    amplitude_contrast: float
    n_sectors: int
    j: torch.Tensor  # radial bins (Fourier pixels) [n_k]
    k: torch.Tensor  # bin centres (1/Å) [n_k]
    k_sub: torch.Tensor  # sub-samples [n_k, Q]
    fit: torch.Tensor  # bool [n_k]: inside the fit range
    sector_deg: torch.Tensor  # sector centres [n_sec]
    bin_index: torch.Tensor  # rfft pixel -> flat (sector, bin) index, for masked pixels
    pixel_mask: torch.Tensor  # bool [w, w//2+1]
    detrend: torch.Tensor  # (I − V·Vᵀ) [n_fit, n_fit]
    step_A: float
    table_defocus_A: torch.Tensor  # [L]
    search_lo: int  # first candidate index (centre defocus) in the table
    search_hi: int  # last candidate index
    k_low: float
    k_high: float
    astig_half_A: tuple = _ASTIG_HALF_A
    astig_angles_deg: tuple = _ASTIG_ANGLES_DEG
    models: dict = field(default_factory=dict)  # phase_deg -> CTF² table [n_k, L]

    def model_table(self, phase_deg: float) -> torch.Tensor:
        """Bin-averaged CTF² ``[n_k, L]`` for every table defocus."""
        key = round(float(phase_deg), 6)
        if key not in self.models:
            c = ctf_1d(self.k_sub[:, :, None], self.table_defocus_A[None, None, :], self.voltage_kV,
                       self.cs_mm, self.amplitude_contrast, phase_shift_deg=key)
            self.models[key] = (c * c).mean(1)
        return self.models[key]


def _validate(images, pixel_size_A, tilt_angles_deg, window_px, resolution_range_A, defocus_range_A,
              defocus_grid, hand, amplitude_contrast):
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CtfEstimationError(f"images must be a tensor [n, h, w] (or [n, frames, h, w]), got {shape}")
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if n < 1:
        raise CtfEstimationError("images: the tilt series has no images")
    if len(tilt_angles_deg) != n:
        raise CtfEstimationError(f"{len(tilt_angles_deg)} tilt angles for {n} images")
    if not pixel_size_A > 0:
        raise CtfEstimationError(f"pixel_size_A must be > 0, got {pixel_size_A}")
    if int(window_px) != window_px or window_px < 32 or window_px % 2:
        raise CtfEstimationError(f"window_px must be an even number of pixels >= 32, got {window_px}")
    if window_px > min(h, w):
        raise CtfEstimationError(
            f"the CTF window ({window_px} px) is larger than the images ({w} x {h} px); use window_px <= {min(h, w)}")
    low, high = (float(x) for x in resolution_range_A)
    if not low > high > 0:
        raise CtfEstimationError(
            f"resolution_range_A must be (low, high) with low > high > 0 Å, got {tuple(resolution_range_A)}")
    nyquist = 2.0 * pixel_size_A
    if high < nyquist:
        raise CtfEstimationError(
            f"the fit resolution range reaches {high:g} Å, beyond Nyquist ({nyquist:g} Å at {pixel_size_A:g} Å/px); "
            f"use a high-resolution limit >= {nyquist:g} Å")
    if window_px * pixel_size_A / low < 4.0:
        raise CtfEstimationError(
            f"the low-resolution limit {low:g} Å is too coarse for a {window_px} px window at {pixel_size_A:g} Å/px "
            f"(it must be below {window_px * pixel_size_A / 4.0:g} Å)")
    d_lo, d_hi = (float(x) for x in defocus_range_A)
    if not 0 < d_lo < d_hi:
        raise CtfEstimationError(f"defocus_range_A must be (min, max) with 0 < min < max, got {tuple(defocus_range_A)}")
    gy, gx = (int(x) for x in defocus_grid)
    if gy < 1 or gx < 1:
        raise CtfEstimationError(f"defocus_grid must be (gy, gx) >= (1, 1), got {tuple(defocus_grid)}")
    if hand not in (-1, 1, "auto"):
        raise CtfEstimationError(f"hand must be -1, +1 or 'auto', got {hand!r}")
    if not 0 <= amplitude_contrast < 1:
        raise CtfEstimationError(f"amplitude_contrast must be in [0, 1), got {amplitude_contrast}")


def _make_setup(pixel_size_A, window_px, voltage_kV, cs_mm, amplitude_contrast, resolution_range_A,
                defocus_range_A, max_offset_A, n_sectors=36, step_A=50.0) -> _Setup:
    w = int(window_px)
    low, high = (float(x) for x in resolution_range_A)
    k_low, k_high = 1.0 / low, 1.0 / high
    to_px = w * pixel_size_A  # radius (Fourier px) = k · to_px
    j0 = max(2, int(math.floor(0.8 * k_low * to_px)))
    j1 = int(math.floor(0.96 * (w // 2)))
    j = torch.arange(j0, j1 + 1, dtype=_F64)
    k = j / to_px
    q = (torch.arange(_SUBSAMPLES, dtype=_F64) + 0.5) / _SUBSAMPLES - 0.5
    k_sub = (j[:, None] + q[None, :]) / to_px
    fit = (k >= k_low - 0.5 / to_px) & (k <= k_high + 0.5 / to_px)
    # rfft grid -> (sector, radial bin)
    ky = torch.fft.fftfreq(w, d=1.0 / w, dtype=_F64)[:, None]
    kx = torch.fft.rfftfreq(w, d=1.0 / w, dtype=_F64)[None, :]
    r = torch.sqrt(kx * kx + ky * ky)
    ky, kx = torch.broadcast_tensors(ky, kx)
    phi = torch.rad2deg(torch.atan2(ky, kx))  # [-90, 90] on the rfft half plane
    rb = torch.round(r).long()
    mask = (rb >= j0) & (rb <= j1)
    sec = torch.clamp(torch.floor((phi + 90.0) / (180.0 / n_sectors)).long(), 0, n_sectors - 1)
    index = (sec * len(j) + (rb - j0))[mask]
    sector_deg = -90.0 + (torch.arange(n_sectors, dtype=_F64) + 0.5) * (180.0 / n_sectors)
    # detrend projector within the fit range
    kf = k[fit]
    t = (kf - kf.mean()) / max(float(kf.max() - kf.min()), 1e-12) * 2.0
    basis = torch.stack([t ** d for d in range(_DETREND_DEGREE + 1)], 1)
    qmat, _ = torch.linalg.qr(basis)
    detrend = torch.eye(len(kf), dtype=_F64) - qmat @ qmat.T
    # defocus table: the search range padded by the largest window offset and astigmatism
    d_lo, d_hi = (float(x) for x in defocus_range_A)
    pad = max_offset_A + max(_ASTIG_HALF_A) + 2500.0
    first = math.floor((d_lo - pad) / step_A)
    last = math.ceil((d_hi + pad) / step_A)
    table = torch.arange(first, last + 1, dtype=_F64) * step_A
    search_lo = int(round(d_lo / step_A)) - first
    search_hi = int(round(d_hi / step_A)) - first
    return _Setup(pixel_size_A=float(pixel_size_A), window_px=w, voltage_kV=float(voltage_kV), cs_mm=float(cs_mm),
                  amplitude_contrast=float(amplitude_contrast), n_sectors=n_sectors, j=j, k=k, k_sub=k_sub, fit=fit,
                  sector_deg=sector_deg, bin_index=index, pixel_mask=mask, detrend=detrend, step_A=step_A,
                  table_defocus_A=table, search_lo=search_lo, search_hi=search_hi, k_low=k_low, k_high=k_high)


# ----------------------------------------------------------------------------- per-tilt data
@dataclass
class _Tilt:
    """Sector profiles of one tilt's windows, and the windows' geometry."""

    profiles: torch.Tensor  # [t, n_sec, n_k] mean power per (sector, radial bin)
    depth_A: torch.Tensor  # [t] z_P of the window centres
    centres_A: torch.Tensor  # [t, 2] (x, y) from the image centre
    mean_spectrum: torch.Tensor  # [w, w//2+1] mean periodogram (diagnostic)
    tilt_deg: float
    axis_deg: float
    image_area_px: float
    groups: object = None  # _Groups of all windows (by depth)
    bg: torch.Tensor | None = None  # [n_k] background used for whitening
    snr: torch.Tensor | None = None  # [n_k] model weight (env / bg) or ones


def _sector_profiles(spectra: torch.Tensor, setup: _Setup) -> torch.Tensor:
    """Mean power per (sector, radial bin) of each window: ``[t, n_sec, n_k]``."""
    n_k, n_sec = len(setup.j), setup.n_sectors
    flat = spectra.reshape(spectra.shape[0], -1)[:, setup.pixel_mask.reshape(-1)].T.to(_F64)  # [pix, t]
    sums = torch.zeros(n_sec * n_k, spectra.shape[0], dtype=_F64).index_add_(0, setup.bin_index, flat)
    counts = torch.bincount(setup.bin_index, minlength=n_sec * n_k).to(_F64)
    prof = (sums / counts.clamp(min=1)[:, None]).T.reshape(-1, n_sec, n_k)
    empty = (counts == 0).reshape(n_sec, n_k)
    if bool(empty.any()):  # fill empty cells with the rotational average of the same radius
        full = sums.T.reshape(-1, n_sec, n_k).sum(1) / counts.reshape(n_sec, n_k).sum(0).clamp(min=1)
        prof = torch.where(empty[None], full[:, None, :], prof)
    return prof


def _prepare_tilt(image, tilt_deg, axis_deg, setup: _Setup, overlap: float) -> _Tilt:
    spectra, centres_px = power_spectrum_tiles(image, setup.window_px, overlap)
    spectra = spectra.cpu()  # the FFTs run where the images are; the (small) fits on the CPU
    h, w = image.shape[-2], image.shape[-1]
    centres_A = (centres_px - torch.tensor([w // 2, h // 2], dtype=_F64)) * setup.pixel_size_A
    depth = specimen_plane_depth_A(centres_A, axis_deg, tilt_deg)[0]
    return _Tilt(profiles=_sector_profiles(spectra, setup), depth_A=depth, centres_A=centres_A,
                 mean_spectrum=spectra.mean(0), tilt_deg=float(tilt_deg), axis_deg=float(axis_deg),
                 image_area_px=float(h * w))


def _smooth_log_background(profile: torch.Tensor, k: torch.Tensor, degree: int = 4,
                           local_range_per_A: tuple[float, float] | None = None,
                           local_degree: int = _LOCAL_BACKGROUND_DEGREE) -> torch.Tensor:
    """Robust smooth fit of a radial power profile: polynomial in k fitted to log P (2 reweightings).

    ``local_range_per_A = (k0, k1)``: inside it the background is a separate fit of degree
    ``local_degree`` to that range only, so that structure far outside (the amorphous-ice ring at
    3.7 Å, the detector's fall-off near Nyquist) cannot bend the background where the fit runs."""
    def fit(sel: torch.Tensor, deg: int) -> torch.Tensor:
        ks = k[sel]
        t = (k - ks.mean()) / (ks.max() - ks.min()).clamp(min=1e-12) * 2.0
        basis = torch.stack([t ** d for d in range(deg + 1)], 1)
        y = torch.log(profile.clamp(min=1e-30))
        wts = torch.ones_like(y[sel])
        for _ in range(3):
            sw = wts.sqrt()[:, None]
            coef = torch.linalg.lstsq(basis[sel] * sw, (y[sel] * sw[:, 0])[:, None]).solution[:, 0]
            res = y[sel] - basis[sel] @ coef
            scale = 1.4826 * res.abs().median().clamp(min=1e-6)
            wts = 1.0 / (1.0 + (res / (2.0 * scale)) ** 2)
        return torch.exp(basis @ coef)

    everywhere = torch.ones_like(k, dtype=torch.bool)
    bg = fit(everywhere, degree)
    if local_range_per_A is not None:
        inside = (k >= local_range_per_A[0]) & (k <= local_range_per_A[1])
        if int(inside.sum()) > 2 * (local_degree + 1):
            bg = torch.where(inside, fit(inside, local_degree), bg)
    return bg


# ----------------------------------------------------------------------------- rows (grouped windows)
@dataclass
class _Groups:
    """Windows grouped by depth (100 Å bins): mean power, number of windows, exact mean depth."""

    power: torch.Tensor  # [rows, n_sec, n_k]
    weight: torch.Tensor  # [rows]
    depth_A: torch.Tensor  # [rows]


@dataclass
class _Rows:
    """Grouped windows whitened (``P / bg − 1``) and detrended within the fit range."""

    s_fit: torch.Tensor  # [rows, n_sec, n_fit]
    weight: torch.Tensor  # [rows]
    depth_A: torch.Tensor  # [rows]
    data_norm: float  # Σ w·s²
    overlap: float = 1.0  # Σ window areas / image area (≥ 1): windows share their noise


def _group(tilt: _Tilt, setup: _Setup, select=None, depth_ref_A: float = 0.0, width_A: float = 100.0) -> _Groups:
    """Windows (optionally a subset) grouped by depth relative to ``depth_ref_A`` in bins of
    ``width_A`` (each group keeps its exact mean depth)."""
    prof, depth = tilt.profiles, tilt.depth_A - depth_ref_A
    if select is not None:
        prof, depth = prof[select], depth[select]
    _, inv = torch.unique(torch.round(depth / width_A).long(), return_inverse=True)
    n = int(inv.max()) + 1
    wsum = torch.zeros(n, dtype=_F64).index_add_(0, inv, torch.ones_like(depth))
    psum = torch.zeros((n,) + prof.shape[1:], dtype=_F64).index_add_(0, inv, prof)
    dsum = torch.zeros(n, dtype=_F64).index_add_(0, inv, depth)
    return _Groups(power=psum / wsum[:, None, None], weight=wsum, depth_A=dsum / wsum)


def _rows(groups: _Groups, tilt: _Tilt, setup: _Setup) -> _Rows:
    s = groups.power[..., setup.fit] / tilt.bg[setup.fit] - 1.0
    s_fit = s @ setup.detrend.T
    norm = float((groups.weight[:, None, None] * s_fit * s_fit).sum())
    overlap = max(1.0, float(groups.weight.sum()) * setup.window_px ** 2 / tilt.image_area_px)
    return _Rows(s_fit=s_fit, weight=groups.weight, depth_A=groups.depth_A, data_norm=max(norm, 1e-30),
                 overlap=overlap)


# ----------------------------------------------------------------------------- tables and search
@dataclass
class _Fit:
    score: float
    defocus_A: float  # mean defocus (U + V) / 2 at the image centre
    astig_x_A: float  # (U − V)/2 · cos 2θ
    astig_y_A: float  # (U − V)/2 · sin 2θ
    phase_deg: float

    @property
    def half_astig_A(self) -> float:
        return math.hypot(self.astig_x_A, self.astig_y_A)

    @property
    def angle_deg(self) -> float:
        return math.degrees(0.5 * math.atan2(self.astig_y_A, self.astig_x_A))


def _model_fit(setup: _Setup, snr_fit: torch.Tensor, phase_deg: float) -> torch.Tensor:
    """Model table ``[n_fit, L]``: ``detrend(snr(k)·(CTF² − ½))``. Only the oscillation of CTF²
    about its mean ½ is weighted by the SNR envelope, so that the envelope's own shape (fitted to
    the data) cannot correlate with the data at every defocus."""
    return setup.detrend @ ((setup.model_table(phase_deg)[setup.fit] - 0.5) * snr_fit[:, None])


def _shift_tables(rows: _Rows, mfit: torch.Tensor, hand: int, setup: _Setup, lo: int, hi: int,
                  squared: bool = False):
    """Correlation tables for candidate centre-defocus indices ``lo..hi`` of the table grid.

    ``num [n_sec, c]`` = Σ_rows w·Σ_k s·model(Δf + hand·z_row) and ``den [c]`` = Σ_rows w·‖model‖²
    (per sector); ``squared``: w²·s² instead of w·s in ``num`` (for the noise level; pass the
    squared model). The table is padded so that shifted indices stay inside it.
    """
    offsets = torch.round(hand * rows.depth_A / setup.step_A).long()
    idx = (torch.arange(lo, hi + 1)[None, :] + offsets[:, None]).clamp(0, mfit.shape[1] - 1)  # [rows, c]
    data = (rows.s_fit * rows.weight[:, None, None]) ** 2 if squared else rows.s_fit * rows.weight[:, None, None]
    num = torch.einsum("rsj,jrc->sc", data, mfit[:, idx])
    den = torch.einsum("r,rc->c", rows.weight, (mfit * mfit).sum(0)[idx])
    return num, den


def _search(rows: _Rows, setup: _Setup, snr_fit, hand: int, lo: int, hi: int, phases_deg, astig=None,
            n_peaks: int = 6, window_A: float = 600.0, return_curve: bool = False):
    """Exhaustive search over the centre defocus (table indices lo..hi, ``step_A`` apart) and the
    phase grid without astigmatism, then over the astigmatism grid (``(U − V)/2`` × angle) within
    ``± window_A`` of the ``n_peaks`` best local maxima. ``astig = (ax, ay)`` fixes the
    astigmatism vector instead; then ``return_curve`` also returns, for every candidate, the score
    (best phase), its noise level and that phase: ``(fit, curve, sigma, phase_deg)`` (``[hi−lo+1]``
    each). The noise level is the sandwich estimate of the score's standard deviation,
    ``sqrt(Σ w²·s²·m²) / sqrt(Σ w·s² · Σ w·m²)`` (= that of the score with random signs on the
    data), scaled by √(window overlap) because overlapping windows share their noise."""
    if astig is None:
        combos = [(0.0, 0.0)] + [(a, th) for a in setup.astig_half_A if a > 0 for th in setup.astig_angles_deg]
    else:
        combos = [(math.hypot(*astig), math.degrees(0.5 * math.atan2(astig[1], astig[0])))]
    a_t = torch.tensor([c[0] for c in combos], dtype=_F64)
    th_t = torch.tensor([c[1] for c in combos], dtype=_F64)
    e = torch.round(a_t[:, None] * torch.cos(2 * torch.deg2rad(setup.sector_deg[None, :] - th_t[:, None]))
                    / setup.step_A).long()  # [combo, n_sec] defocus offset of each sector (grid steps)
    e_max = int(e.abs().max())
    n_c = hi - lo + 1
    win = int(round(window_A / setup.step_A))
    best = _Fit(-math.inf, 0.0, 0.0, 0.0, 0.0)
    curve = torch.full((n_c,), -math.inf, dtype=_F64)
    curve_phase = torch.zeros(n_c, dtype=_F64)
    curve_sigma = torch.ones(n_c, dtype=_F64)
    for phase in phases_deg:
        mfit = _model_fit(setup, snr_fit, phase)
        num, den = _shift_tables(rows, mfit, hand, setup, lo - e_max, hi + e_max)
        core = slice(e_max, e_max + n_c)
        score0 = num[:, core].sum(0) / torch.sqrt(rows.data_norm * (num.shape[0] * den[core]).clamp(min=1e-30))
        peak = torch.ones(n_c, dtype=torch.bool)
        peak[1:] &= score0[1:] >= score0[:-1]
        peak[:-1] &= score0[:-1] >= score0[1:]
        cand = torch.nonzero(peak)[:, 0]
        cand = cand[torch.argsort(score0[cand], descending=True)[:n_peaks]]
        if len(combos) == 1:  # fixed astigmatism: every candidate
            xs = torch.arange(n_c)
        else:
            xs = torch.unique(torch.clamp(cand[:, None] + torch.arange(-win, win + 1)[None, :], 0, n_c - 1).reshape(-1))
        x = xs[None, None, :] + e[:, :, None] + e_max  # [combo, sec, c]
        tot_num = torch.gather(num[None].expand(len(combos), -1, -1), 2, x).sum(1)
        score = tot_num / torch.sqrt(rows.data_norm * den[x].sum(1).clamp(min=1e-30))
        if len(combos) == 1 and return_curve:
            var, _ = _shift_tables(rows, mfit * mfit, hand, setup, lo - e_max, hi + e_max, squared=True)
            sigma = torch.sqrt(torch.gather(var, 1, x[0]).sum(0) / (rows.data_norm * den[x[0]].sum(0).clamp(min=1e-30)))
            better = score[0] > curve
            curve = torch.where(better, score[0], curve)
            curve_sigma = torch.where(better, sigma * math.sqrt(rows.overlap), curve_sigma)
            curve_phase = torch.where(better, torch.full_like(curve_phase, float(phase)), curve_phase)
        ci, xi = divmod(int(torch.argmax(score)), len(xs))
        if float(score[ci, xi]) > best.score:
            th = math.radians(2 * float(th_t[ci]))
            a = float(a_t[ci])
            best = _Fit(float(score[ci, xi]), float(setup.table_defocus_A[lo + int(xs[xi])]), a * math.cos(th),
                        a * math.sin(th), float(phase))
    if return_curve:
        if astig is None:
            raise ValueError("_search: return_curve needs a fixed astigmatism")
        return best, curve, curve_sigma, curve_phase
    return best


def _row_model(setup: _Setup, depth_A, hand: int, defocus_A, ax_A, ay_A, phase_deg, columns) -> torch.Tensor:
    """Bin-averaged CTF² ``[rows, n_sec, n_cols]`` for continuous parameters (differentiable)."""
    phi = torch.deg2rad(setup.sector_deg)
    df = (defocus_A + hand * depth_A[:, None] + ax_A * torch.cos(2 * phi)[None, :]
          + ay_A * torch.sin(2 * phi)[None, :])
    c = ctf_1d(setup.k_sub[columns][None, None], df[:, :, None, None], setup.voltage_kV, setup.cs_mm,
               setup.amplitude_contrast, phase_shift_deg=phase_deg)
    return (c * c).mean(-1)


class _LocalTables:
    """Correlation tables of one tilt on a fine defocus grid (``step_A``) around a start value, for
    every phase of a small phase grid; the score of continuous parameters is interpolated linearly."""

    def __init__(self, rows: _Rows, setup: _Setup, snr_fit, hand: int, centre_A: float, radius_A: float,
                 phases_deg, step_A: float = 5.0):
        a_lim = max(setup.astig_half_A) + 500.0
        self.offs = hand * rows.depth_A  # [rows]
        self.step = step_A
        self.first = centre_A - radius_A - a_lim + float(self.offs.min()) - 2 * step_A
        self.n_d = int(math.ceil((2 * radius_A + 2 * a_lim + float(self.offs.max() - self.offs.min())) / step_A)) + 5
        self.phases = [float(p) for p in phases_deg]
        d = self.first + step_A * torch.arange(self.n_d, dtype=_F64)
        nums, dens = [], []
        for phase in self.phases:
            c = ctf_1d(setup.k_sub[setup.fit][:, :, None], d[None, None, :], setup.voltage_kV, setup.cs_mm,
                       setup.amplitude_contrast, phase_shift_deg=phase)
            m = setup.detrend @ (((c * c).mean(1) - 0.5) * snr_fit[:, None])  # as _model_fit
            nums.append(torch.einsum("rsj,jd->rsd", rows.s_fit * rows.weight[:, None, None], m).reshape(-1, self.n_d))
            dens.append((m * m).sum(0))
        self.num = torch.stack(nums)  # [P, rows·n_sec, n_d]
        self.den = torch.stack(dens)  # [P, n_d]
        phi = torch.deg2rad(setup.sector_deg)
        self.c2, self.s2 = torch.cos(2 * phi)[None, :], torch.sin(2 * phi)[None, :]
        n_r, n_s = rows.s_fit.shape[0], rows.s_fit.shape[1]
        self.flat_offs = self.offs[:, None].expand(n_r, n_s)
        self.wts = rows.weight[:, None].expand(n_r, n_s).reshape(-1)
        self.row_ix = torch.arange(n_r * n_s)
        self.norm = rows.data_norm

    def scores(self, defocus_A: torch.Tensor, ax_A: float, ay_A: float, phase_deg: float) -> torch.Tensor:
        """Scores for centre defocus values ``[m]`` (−1 where the tables do not reach)."""
        df = (defocus_A[:, None, None] + self.flat_offs[None] + ax_A * self.c2[None] + ay_A * self.s2[None])
        pos = ((df - self.first) / self.step).reshape(len(defocus_A), -1)
        bad = (pos < 0).any(1) | (pos > self.n_d - 2).any(1)
        pos = pos.clamp(0, self.n_d - 2)
        i0 = pos.floor().long()
        f = pos - i0
        if len(self.phases) > 1:
            pp = (phase_deg - self.phases[0]) / (self.phases[1] - self.phases[0])
            if not 0.0 <= pp <= len(self.phases) - 1:
                return torch.full((len(defocus_A),), -1.0, dtype=_F64)
            p0 = min(int(math.floor(pp)), len(self.phases) - 2)
            parts = ((p0, 1.0 - (pp - p0)), (p0 + 1, pp - p0))
        else:
            parts = ((0, 1.0),)
        num = torch.zeros(len(defocus_A), dtype=_F64)
        den = torch.zeros(len(defocus_A), dtype=_F64)
        flat = self.row_ix[None, :] * self.n_d + i0
        for p, wp in parts:
            nv = torch.take(self.num[p], flat) * (1 - f) + torch.take(self.num[p], flat + 1) * f
            dv = torch.take(self.den[p], i0) * (1 - f) + torch.take(self.den[p], i0 + 1) * f
            num += wp * nv.sum(1)
            den += wp * (self.wts[None, :] * dv).sum(1)
        out = num / torch.sqrt(self.norm * den.clamp(min=1e-30))
        return torch.where(bad, torch.full_like(out, -1.0), out)

    def score(self, defocus_A: float, ax_A: float, ay_A: float, phase_deg: float) -> float:
        return float(self.scores(torch.tensor([defocus_A], dtype=_F64), ax_A, ay_A, phase_deg)[0])


def _nelder_mead(fun, x0, step: float = 0.6, xatol: float = 0.02):
    """Minimise ``fun`` from ``x0`` (scipy Nelder–Mead, initial simplex edges of ``step``)."""
    from scipy.optimize import minimize

    x0 = [float(v) for v in x0]
    simplex = [x0] + [[v + (step if i == j else 0.0) for j, v in enumerate(x0)] for i in range(len(x0))]
    res = minimize(fun, x0, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "xatol": xatol, "fatol": 1e-8, "maxiter": 200 * len(x0)})
    return [float(v) for v in res.x]


def _refine(rows: _Rows, setup: _Setup, snr_fit, hand: int, start: _Fit, fit_phase: bool,
            fit_astig: bool = True, radius_A: float = 400.0) -> _Fit:
    """Local refinement of defocus (and astigmatism vector, phase) by Nelder–Mead on the exact
    correlation tabulated on a 5 Å defocus grid (2.5° phase grid), interpolated linearly."""
    phases = [start.phase_deg]
    if fit_phase:
        phases = [start.phase_deg + dp for dp in torch.arange(-15.0, 15.01, 2.5).tolist()]
    tab = _LocalTables(rows, setup, snr_fit, hand, start.defocus_A, radius_A, phases)

    def unpack(x):
        dm = 100.0 * x[0]
        ax, ay = (100.0 * x[1], 100.0 * x[2]) if fit_astig else (start.astig_x_A, start.astig_y_A)
        ph = start.phase_deg + 10.0 * x[-1] if fit_phase else start.phase_deg
        return start.defocus_A + dm, ax, ay, ph

    x0 = [0.0] + ([start.astig_x_A / 100.0, start.astig_y_A / 100.0] if fit_astig else [])
    x0 += [0.0] if fit_phase else []
    initial = tab.score(*unpack(x0))
    x = _nelder_mead(lambda v: -tab.score(*unpack(v)), x0)
    d, ax, ay, ph = unpack(x)
    final = tab.score(d, ax, ay, ph)
    if not math.isfinite(final) or final < initial or abs(d - start.defocus_A) > radius_A:
        return _Fit(initial, start.defocus_A, start.astig_x_A, start.astig_y_A, start.phase_deg)
    return _Fit(final, d, ax, ay, ph % 180.0 if fit_phase else ph)


def _series_astigmatism(tables, fits, radius_A: float = 400.0, step_A: float = 20.0):
    """Astigmatism vector (ax, ay) shared by all tilts: maximises Σ_tilts max_m score_t(m, ax, ay)
    (m within ``± radius_A`` of each tilt's own fit), started from every tilt's own vector and 0."""
    grid = torch.arange(-radius_A, radius_A + step_A / 2, step_A, dtype=_F64)

    def total(ax, ay):
        return sum(float(t.scores(f.defocus_A + grid, ax, ay, f.phase_deg).max()) for t, f in zip(tables, fits))

    starts = [(0.0, 0.0)] + [(f.astig_x_A, f.astig_y_A) for f in fits]
    best = max(starts, key=lambda a: total(*a))
    x = _nelder_mead(lambda v: -total(100.0 * v[0], 100.0 * v[1]), [best[0] / 100.0, best[1] / 100.0], step=1.0)
    cand = (100.0 * x[0], 100.0 * x[1])
    return cand if total(*cand) >= total(*best) else best


def _local_defocus(rows: _Rows, setup: _Setup, mfit: torch.Tensor, hand: int, fit: _Fit, centre_A: float,
                   range_A: float):
    """Best centre defocus of ``rows`` within ``centre_A ± range_A``, astigmatism and phase fixed
    (``mfit`` = ``_model_fit`` at the fit's phase), with parabolic interpolation between table
    steps; returns (defocus_A, score)."""
    first = float(setup.table_defocus_A[0])
    lo = max(0, int(round((centre_A - range_A - first) / setup.step_A)))
    hi = min(len(setup.table_defocus_A) - 1, int(round((centre_A + range_A - first) / setup.step_A)))
    e = torch.round((fit.astig_x_A * torch.cos(2 * torch.deg2rad(setup.sector_deg))
                     + fit.astig_y_A * torch.sin(2 * torch.deg2rad(setup.sector_deg))) / setup.step_A).long()
    e_max = int(e.abs().max())
    num, den = _shift_tables(rows, mfit, hand, setup, lo - e_max, hi + e_max)
    x = torch.arange(hi - lo + 1)[None, :] + e[:, None] + e_max
    score = torch.gather(num, 1, x).sum(0) / torch.sqrt(rows.data_norm * den[x].sum(0).clamp(min=1e-30))
    i = int(torch.argmax(score))
    shift = 0.0
    if 0 < i < len(score) - 1:
        shift = float(parabolic_offset(*(float(score[i + d]) for d in (-1, 0, 1))))
    return float(setup.table_defocus_A[lo + i]) + shift * setup.step_A, float(score[i])


# ----------------------------------------------------------------------------- background / envelope
def _hat_basis(k: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear (hat) basis ``[n_k, n_knots]`` on increasing knots (constant beyond the ends)."""
    x = k.clamp(float(knots[0]), float(knots[-1]))
    i = torch.searchsorted(knots.contiguous(), x.contiguous()).clamp(1, len(knots) - 1)
    t = (x - knots[i - 1]) / (knots[i] - knots[i - 1])
    basis = torch.zeros(len(k), len(knots), dtype=_F64)
    basis.scatter_(1, (i - 1)[:, None], (1.0 - t)[:, None])
    basis.scatter_add_(1, i[:, None], t[:, None])
    return basis


def _background_knots(setup: "_Setup", defocus_A: float) -> torch.Tensor:
    """Knots of the pass-2 background, in 1/Å: from the first radial bin to the end of the fit
    range (+ margin) ``_BACKGROUND_KNOT_PERIODS`` Thon-ring periods apart at ``defocus_A`` (local
    period of CTF² ``1/(2·λ·Δf·k)``; at least ``_BACKGROUND_KNOT_PX`` bins), then
    ``_BACKGROUND_KNOT_PX_OUTSIDE`` bins apart to the last bin: the background follows the
    spectrum's shape where the fit runs but cannot follow the rings themselves."""
    to_px = setup.window_px * setup.pixel_size_A
    lam = float(electron_wavelength_A(setup.voltage_kV))
    j0, j1 = float(setup.j[0]), float(setup.j[-1])
    inner_end = min(j1, setup.k_high * to_px + 2 * _BACKGROUND_KNOT_PX)
    knots = [j0]
    while knots[-1] < inner_end:
        k = knots[-1] / to_px
        period_px = to_px / (2.0 * lam * max(defocus_A, 1.0) * k)
        knots.append(knots[-1] + max(_BACKGROUND_KNOT_PX, _BACKGROUND_KNOT_PERIODS * period_px))
    while knots[-1] + _BACKGROUND_KNOT_PX_OUTSIDE < j1:
        knots.append(knots[-1] + _BACKGROUND_KNOT_PX_OUTSIDE)
    if knots[-1] < j1:
        knots.append(j1)
    return torch.tensor(knots, dtype=_F64) / to_px


_ENVELOPE_B_GRID_A2 = (0.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1200.0)


def _fit_background_envelope(tilt: _Tilt, setup: _Setup, hand: int, fit: _Fit, min_t: float = 3.0):
    """Least squares ``P ≈ bg(k) + A·exp(−B·k²/4)·CTF²`` over all windows and sectors, with a
    piecewise-linear bg, for every B of a grid (weights 1/bg₀², the periodogram variance); the B with
    the smallest residual wins. Returns ``(bg, snr)`` with ``snr = A·exp(−B·k²/4)/bg`` normalised to
    a maximum of 1 in the fit range. None (keep the pass-1 background, unweighted) when bg is not
    positive or the envelope amplitude A is not at least ``min_t`` standard errors above 0: then the
    flexible background has taken up the rings themselves (or there is too little signal).
    The two-parameter envelope cannot follow the noise, unlike a free envelope."""
    groups = tilt.groups
    cols = torch.ones(len(setup.k), dtype=torch.bool)
    with torch.no_grad():
        c = _row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A, fit.phase_deg, cols)
    basis = _hat_basis(setup.k, _background_knots(setup, fit.defocus_A))  # [n_k, nb]
    nb = basis.shape[1]
    wt = (groups.weight[:, None, None] / tilt.bg[None, None, :] ** 2).expand_as(c)  # [rows, sec, n_k]
    s0, s1, s2 = wt.sum((0, 1)), (wt * c).sum((0, 1)), (wt * c * c).sum((0, 1))
    y0, y1 = (wt * groups.power).sum((0, 1)), (wt * c * groups.power).sum((0, 1))
    yy = float((wt * groups.power ** 2).sum())
    bb = (s0[:, None, None] * basis[:, :, None] * basis[:, None, :]).sum(0)  # [nb, nb]
    best = None
    for b_factor in _ENVELOPE_B_GRID_A2:
        e = torch.exp(-0.25 * b_factor * setup.k ** 2)
        ata = torch.zeros(nb + 1, nb + 1, dtype=_F64)
        ata[:nb, :nb] = bb
        ata[:nb, nb] = ata[nb, :nb] = basis.T @ (s1 * e)
        ata[nb, nb] = (s2 * e * e).sum()
        aty = torch.cat([basis.T @ y0, ((y1 * e).sum())[None]])
        ata = ata + 1e-12 * torch.trace(ata) / (nb + 1) * torch.eye(nb + 1, dtype=_F64)
        sol = torch.linalg.solve(ata, aty)
        residual = yy - float(sol @ aty)
        if best is None or residual < best[0]:
            best = (residual, b_factor, sol, ata)
    _, b_factor, sol, ata = best
    bg = basis @ sol[:nb]
    if not bool((bg > 0).all()):
        return None
    dof = max(float((groups.weight > 0).sum()) * setup.n_sectors * len(setup.k) - nb - 1, 1.0)
    sigma2 = max(best[0] / dof, 1e-30)
    se = math.sqrt(sigma2 * float(torch.linalg.inv(ata)[nb, nb]))
    amplitude = float(sol[nb])
    if not amplitude > min_t * se:  # the background took up the rings: keep the pass-1 one
        return None
    snr = amplitude * torch.exp(-0.25 * b_factor * setup.k ** 2) / bg
    return bg, snr / snr[setup.fit].max()


# ----------------------------------------------------------------------------- fit resolution
def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation (like ``numpy.interp``) for increasing ``xp``."""
    i = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    t = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0.0, 1.0)
    return fp[i - 1] + t * (fp[i] - fp[i - 1])


def _unwrapped_phase(setup: _Setup, defocus_A: torch.Tensor, phase_deg: float, k: torch.Tensor) -> torch.Tensor:
    """CTF phase χ (rad) for defocus values ``[...]`` at frequencies ``k [m]`` → ``[..., m]``: from
    ``ctf_1d`` (sin χ and sin(χ + π/2)) on a fine grid from k = 0, unwrapped, interpolated."""
    n_fine = 2048
    kf = torch.linspace(0.0, float(k.max()) * 1.0001, n_fine, dtype=_F64)
    d = defocus_A[..., None]
    s = ctf_1d(kf, d, setup.voltage_kV, setup.cs_mm, setup.amplitude_contrast, phase_shift_deg=phase_deg)
    c = ctf_1d(kf, d, setup.voltage_kV, setup.cs_mm, setup.amplitude_contrast, phase_shift_deg=phase_deg + 90.0)
    wrapped = torch.atan2(s, c)
    step = torch.diff(wrapped, dim=-1)
    step = step - 2 * math.pi * torch.round(step / (2 * math.pi))
    start = wrapped[..., :1] % (2 * math.pi)
    chi = torch.cat([start, start + torch.cumsum(step, -1)], -1)
    pos = (k / float(kf[-1]) * (n_fine - 1)).clamp(0, n_fine - 1)
    i0 = pos.floor().long().clamp(max=n_fine - 2)
    f = pos - i0
    return chi[..., i0] * (1 - f) + chi[..., i0 + 1] * f


def fit_resolution_from_phase_profile(chi_rad: torch.Tensor, data: torch.Tensor, model: torch.Tensor,
                                      weight: torch.Tensor, chi_start_rad: float,
                                      threshold: float = FIT_RESOLUTION_THRESHOLD, bins_per_ring: int = 12):
    """Phase χ (rad) of the fit-resolution limit from samples (χ, data, model, weight) of a spectrum.

    Samples are averaged in χ bins of π/``bins_per_ring``; ring n spans χ ∈ [nπ, (n+1)π) and its
    quality is the weighted correlation of data and model, each with a weighted linear trend in χ
    removed, over rings n−1..n+1 (χ ≥ ``chi_start_rad``). Going outward from the ring containing
    ``chi_start_rad``, the limit is the outer phase (n+1)π of the last ring of the first run of
    rings with correlation ≥ ``threshold`` (and ≥ 3/√bins, 3σ above chance); the run must start
    within the first three rings and ends at two consecutive rings below the threshold (a single
    dip is tolerated). ``chi_start_rad`` if no ring passes. Returns ``(chi_limit_rad,
    ring_correlations)``.
    """
    width = math.pi / bins_per_ring
    b = torch.floor(chi_rad.reshape(-1) / width).long()
    b0 = int(b.min())
    b = b - b0
    nb = int(b.max()) + 1
    wt = weight.reshape(-1).to(_F64)
    wsum = torch.zeros(nb, dtype=_F64).index_add_(0, b, wt)
    dm = torch.zeros(nb, dtype=_F64).index_add_(0, b, wt * data.reshape(-1).to(_F64)) / wsum.clamp(min=1e-300)
    mm = torch.zeros(nb, dtype=_F64).index_add_(0, b, wt * model.reshape(-1).to(_F64)) / wsum.clamp(min=1e-300)
    ok = wsum > 0
    centres = (torch.arange(nb, dtype=_F64) + b0 + 0.5) * width
    ring_first = int(math.floor(chi_start_rad / math.pi))
    ring_last = int(math.floor(float(centres[ok].max()) / math.pi)) - 1
    corrs, limit, failed, misses = [], chi_start_rad, False, 0
    for n in range(ring_first, ring_last + 1):
        sel = ok & (centres >= max((n - 1) * math.pi, chi_start_rad)) & (centres < (n + 2) * math.pi)
        r = 0.0
        if int(sel.sum()) >= bins_per_ring:
            w_, x_ = wsum[sel], centres[sel]
            basis = torch.stack([torch.ones_like(x_), x_ - (w_ * x_).sum() / w_.sum()], 1)
            sw = w_.sqrt()[:, None]

            def detrended(y):  # remove a weighted linear trend in χ (residual background)
                coef = torch.linalg.lstsq(basis * sw, y[:, None] * sw).solution
                return y - (basis @ coef)[:, 0]

            d_c, m_c = detrended(dm[sel]), detrended(mm[sel])
            den = float(torch.sqrt((w_ * d_c * d_c).sum() * (w_ * m_c * m_c).sum()))
            r = float((w_ * d_c * m_c).sum()) / den if den > 0 else 0.0
        corrs.append(r)
        if failed:
            continue
        if r >= max(threshold, 3.0 / math.sqrt(max(int(sel.sum()), 1))):  # and 3σ above chance
            limit, misses = (n + 1) * math.pi, 0
        elif limit > chi_start_rad:  # inside the run: two consecutive failures end it
            misses += 1
            failed = misses >= 2
        else:  # before the run: at most two failing rings are skipped
            failed = n - ring_first >= 2
    return limit, torch.tensor(corrs, dtype=_F64)


def _fit_resolution_A(tilt: _Tilt, setup: _Setup, hand: int, fit: _Fit, threshold: float) -> float:
    groups = tilt.groups
    cols = setup.k >= setup.k_low
    k = setup.k[cols]
    s = groups.power[..., cols] / tilt.bg[cols] - 1.0
    with torch.no_grad():
        model = _row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A,
                           fit.phase_deg, cols)
        phi = torch.deg2rad(setup.sector_deg)
        df = (fit.defocus_A + hand * groups.depth_A[:, None] + fit.astig_x_A * torch.cos(2 * phi)[None, :]
              + fit.astig_y_A * torch.sin(2 * phi)[None, :])
        chi = _unwrapped_phase(setup, df, fit.phase_deg, k)
        chi_centre = _unwrapped_phase(setup, torch.tensor(fit.defocus_A, dtype=_F64), fit.phase_deg, k)
    chi_start = float(_interp(torch.tensor([setup.k_low], dtype=_F64), k, chi_centre)[0])
    limit, _ = fit_resolution_from_phase_profile(chi, s, model, groups.weight[:, None, None].expand_as(s),
                                                 chi_start, threshold)
    if limit <= chi_start:
        return 1.0 / setup.k_low
    increasing = bool((torch.diff(chi_centre) > 0).all())
    if not increasing:  # beyond the Cs turnover: keep the monotonic part
        stop = int(torch.nonzero(torch.diff(chi_centre) <= 0)[0])
        chi_centre, k = chi_centre[: stop + 1], k[: stop + 1]
    k_lim = float(_interp(torch.tensor([limit], dtype=_F64), chi_centre, k)[0])
    return 1.0 / max(k_lim, setup.k_low)


# ----------------------------------------------------------------------------- 1-D fit (rotational average)
def fit_ctf_1d(power_profile, frequency_per_A, voltage_kV, cs_mm, amplitude_contrast,
               defocus_range_A=(5000.0, 80000.0), resolution_range_A=(30.0, 7.0), phase_shift_deg=0.0,
               step_A: float = 50.0) -> dict:
    """Exhaustive 1-D defocus search on a rotationally averaged power spectrum (no astigmatism).

    The profile is whitened by a smooth background (polynomial fit to log P), a quadratic in k is
    projected out of data and model within the fit range, and the normalised cross-correlation
    with CTF² is computed for every defocus on a ``step_A`` grid; the maximum is refined by
    parabolic interpolation. Returns ``{"defocus_A", "score", "defocus_grid_A", "scores"}``.
    """
    p = torch.as_tensor(power_profile, dtype=_F64).reshape(-1)
    k = torch.as_tensor(frequency_per_A, dtype=_F64).reshape(-1)
    if p.shape != k.shape or len(k) < 8:
        raise CtfEstimationError(f"fit_ctf_1d: profile ({len(p)}) and frequencies ({len(k)}) must match, >= 8 values")
    low, high = (float(x) for x in resolution_range_A)
    fit = (k >= 1.0 / low) & (k <= 1.0 / high)
    if int(fit.sum()) < 8:
        raise CtfEstimationError(f"fit_ctf_1d: fewer than 8 frequencies inside the fit range {low:g}-{high:g} Å")
    d_lo, d_hi = (float(x) for x in defocus_range_A)
    grid = torch.arange(math.floor(d_lo / step_A), math.ceil(d_hi / step_A) + 1, dtype=_F64) * step_A
    sel = k > 0
    bg = _smooth_log_background(p[sel], k[sel])
    s = (p[fit] / bg[fit[sel]] - 1.0)
    kf = k[fit]
    t = (kf - kf.mean()) / max(float(kf.max() - kf.min()), 1e-12) * 2.0
    qmat, _ = torch.linalg.qr(torch.stack([t ** d for d in range(_DETREND_DEGREE + 1)], 1))
    proj = torch.eye(len(kf), dtype=_F64) - qmat @ qmat.T
    s = proj @ s
    c = ctf_1d(kf[:, None], grid[None, :], voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg=phase_shift_deg)
    m = proj @ (c * c)
    scores = (s @ m) / torch.sqrt((s * s).sum() * (m * m).sum(0)).clamp(min=1e-30)
    i = int(torch.argmax(scores))
    shift = 0.0
    if 0 < i < len(grid) - 1:
        shift = float(parabolic_offset(*(float(scores[i + d]) for d in (-1, 0, 1))))
    return {"defocus_A": float(grid[i]) + shift * step_A, "score": float(scores[i]),
            "defocus_grid_A": grid, "scores": scores}


# ----------------------------------------------------------------------------- tilt series
def _robust_trend(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, degree: int) -> torch.Tensor:
    """Polynomial trend of ``y(x)``: weighted least squares, reweighted with Tukey's biweight
    (c = 4.685, scale = 1.4826·weighted MAD) from the weighted median; robust to a minority of wild
    values."""
    t = (x - x.mean()) / max(float((x - x.mean()).abs().max()), 1e-12)
    basis = torch.stack([t ** d for d in range(degree + 1)], 1)

    def weighted_median(v, w):
        order = torch.argsort(v)
        cw = torch.cumsum(w[order], 0)
        return float(v[order][int(torch.searchsorted(cw, 0.5 * cw[-1]).clamp(max=len(v) - 1))])

    fit = torch.full_like(y, weighted_median(y, weight))
    for _ in range(30):
        res = y - fit
        scale = max(1.4826 * weighted_median(res.abs(), weight), 1.0)
        u = res / (4.685 * scale)
        w = weight * torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u))
        if int((w > 0).sum()) <= degree + 1:
            break
        sw = w.sqrt()[:, None]
        new = (basis @ torch.linalg.lstsq(basis * sw, y[:, None] * sw).solution)[:, 0]
        converged = float((new - fit).abs().max()) < 1e-3
        fit = new
        if converged:
            break
    return fit


def _consistent_choice(z_curves, tilt_angles, step_A: float, free_A: float, z_per_A: float, max_penalty: float,
                       n_candidates: int = 6):
    """Choice of one maximum per tilt that agrees with a defocus trend along the tilt series.

    ``z_curves`` ``[n, c]``: every tilt's score over the centre-defocus grid (``step_A`` apart) in
    units of its noise level. Candidates of a tilt: its ``n_candidates`` best local maxima and its
    best value within ``free_A`` of the trend; each tilt takes the candidate that maximises
    ``z − min(max_penalty, z_per_A·max(0, |Δf − trend| − free_A))``. The trend is first the
    constant that maximises the sum of these values over all tilts (a scan of the whole grid: a
    majority of weak, scattered wrong maxima cannot outvote it), then, from 8 tilts on, a robust
    quadratic in the tilt angle (Tukey biweight, weights z²) through the values chosen with it.
    Returns the chosen grid index of every tilt and the trend (Å from the grid start)."""
    n, n_grid = z_curves.shape
    cands, zs = [], []
    for z in z_curves:
        peak = torch.ones_like(z, dtype=torch.bool)
        peak[1:] &= z[1:] >= z[:-1]
        peak[:-1] &= z[:-1] >= z[1:]
        idx = torch.nonzero(peak)[:, 0]
        idx = idx[torch.argsort(z[idx], descending=True)[:n_candidates]]
        cands.append(idx)
        zs.append(z[idx])
    half = int(round(free_A / step_A))
    # best z within ±free_A of every grid position (running maximum)
    near = torch.nn.functional.max_pool1d(z_curves[:, None, :], 2 * half + 1, stride=1, padding=half)[:, 0, :]
    grid = torch.arange(n_grid, dtype=_F64) * step_A

    def penalty(distance):
        return (z_per_A * (distance - free_A).clamp(min=0.0)).clamp(max=max_penalty)

    # constant trend: scan every grid position
    total = near.sum(0).clone()
    for t in range(n):
        far = (zs[t][None, :] - penalty((cands[t].to(_F64)[None, :] * step_A - grid[:, None]).abs())).max(1).values
        total += (far - near[t]).clamp(min=0.0)
    trend = torch.full((n,), float(grid[int(torch.argmax(total))]), dtype=_F64)

    def choose(trend):
        choice = []
        for t in range(n):
            ref = float(trend[t])
            lo = max(0, int(math.floor((ref - free_A) / step_A)))
            hi = min(n_grid - 1, int(math.ceil((ref + free_A) / step_A)))
            c, z = cands[t], zs[t]
            if lo <= hi:
                best_near = lo + int(torch.argmax(z_curves[t, lo:hi + 1]))
                c, z = torch.cat([c, torch.tensor([best_near])]), torch.cat([z, z_curves[t, best_near:best_near + 1]])
            value = z - penalty((c.to(_F64) * step_A - ref).abs())
            choice.append(int(c[int(torch.argmax(value))]))
        return choice

    choice = choose(trend)
    if n >= 8:
        chosen = torch.tensor(choice, dtype=_F64) * step_A
        weight = torch.stack([z_curves[t, c] for t, c in enumerate(choice)]).clamp(min=0.0) ** 2 + 1e-6
        trend = _robust_trend(torch.tensor(tilt_angles, dtype=_F64), chosen, weight, 2)
        choice = choose(trend)
    return choice, trend


def _consistency(rows_of, fits, curves, sigmas, curve_phases, setup, snr_of, hand, fit_phase, tilt_angles, astig,
                 refine_astig: bool = False, free_A: float = 1500.0, z_per_1000_A: float = 1.0,
                 max_penalty: float = 8.0):
    """Tilt-series consistency of the defocus: every tilt's score curve over the whole defocus range
    (``curves [n, c]``, astigmatism ``astig``) in units of its noise level ``sigmas`` (z-scores); a
    robust trend through the tilts' own best maxima (weighted by z²); each tilt takes the candidate
    maximum that maximises z minus ``z_per_1000_A`` per 1000 Å of distance to the trend beyond
    ``free_A`` (at most ``max_penalty``). A tilt whose choice is more than 500 Å from its fit is
    refined again from it: a weak wrong maximum gives way, a strong genuine jump stays."""
    n = len(fits)
    refit = [False] * n
    if n < 3:
        return fits, refit
    choice, _ = _consistent_choice(curves / sigmas, tilt_angles, setup.step_A, free_A, z_per_1000_A / 1000.0,
                                   max_penalty)
    for i, c in enumerate(choice):
        d = float(setup.table_defocus_A[setup.search_lo + c])
        if abs(d - fits[i].defocus_A) <= 500.0:
            continue
        start = _Fit(float(curves[i, c]), d, astig[0], astig[1], float(curve_phases[i][c]))
        fits[i] = _refine(rows_of[i], setup, snr_of[i], hand, start, fit_phase, fit_astig=refine_astig)
        refit[i] = True
    return fits, refit


def _cells(image_shape, grid, centres_px):
    """Per grid cell: (centre (x, y) px, tile selection). Tiles whose centre lies in the cell
    (edges inclusive) belong to it; a cell without any takes the nearest tile(s)."""
    h, w = image_shape
    gy, gx = grid
    out = []
    for iy in range(gy):
        for ix in range(gx):
            x0, x1 = ix * w / gx, (ix + 1) * w / gx
            y0, y1 = iy * h / gy, (iy + 1) * h / gy
            centre = torch.tensor([(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5], dtype=_F64)
            inside = ((centres_px[:, 0] >= x0 - 0.5) & (centres_px[:, 0] <= x1 - 0.5)
                      & (centres_px[:, 1] >= y0 - 0.5) & (centres_px[:, 1] <= y1 - 0.5))
            if not bool(inside.any()):
                dist = (centres_px - centre).norm(dim=1)
                inside = dist <= dist.min() + 1e-6
            out.append((centre, inside))
    return out


def _full_spectrum(half: torch.Tensor) -> torch.Tensor:
    """rfft-layout power ``[w, w//2+1]`` -> full fftshifted ``[w, w]`` (Friedel symmetry)."""
    w = half.shape[0]
    kx = torch.fft.fftfreq(w, d=1.0 / w).long()  # -w/2..w/2-1 per column of the full grid
    ky = torch.fft.fftfreq(w, d=1.0 / w).long()
    rows = torch.where(kx[None, :] >= 0, ky[:, None] % w, (-ky[:, None]) % w)
    cols = kx.abs()[None, :].expand(w, w)
    cols = cols.clamp(max=half.shape[1] - 1)
    full = half[rows, cols]
    return torch.fft.fftshift(full)


def _diagnostic(tilt: _Tilt, setup: _Setup, hand: int, fit: _Fit) -> torch.Tensor:
    """CTFFIND-style diagnostic ``[w, w]`` (DC at ``w//2``, frequencies as ``torch.fft`` with
    ``fftshift``): the left half (kx < 0) shows the observed spectrum (mean periodogram of the
    windows, whitened by the fitted background, smoothed by a Gaussian of σ = 1 px), the right half
    the fitted model (per sector and radial bin: CTF² mixed over the windows' defocus offsets, times
    the SNR envelope); each is standardised within the fit range and clipped to ±4."""
    w = setup.window_px
    f = torch.fft.fftshift(torch.fft.fftfreq(w, d=setup.pixel_size_A, dtype=_F64))
    kk = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    # background at every pixel: linear interpolation in the radial bins (bin j at radius j px)
    pos = (kk * w * setup.pixel_size_A - float(setup.j[0])).clamp(0, len(setup.j) - 1.000001)
    i0 = pos.floor().long()
    bg = tilt.bg[i0] * (1 - (pos - i0)) + tilt.bg[(i0 + 1).clamp(max=len(setup.j) - 1)] * (pos - i0)
    observed = (_full_spectrum(tilt.mean_spectrum) / bg.float() - 1.0)[None, None]
    g = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    g = g / g.sum()
    observed = torch.nn.functional.pad(observed, (3, 3, 3, 3), mode="reflect")
    observed = torch.nn.functional.conv2d(observed, g[None, None, :, None])
    observed = torch.nn.functional.conv2d(observed, g[None, None, None, :])[0, 0].to(_F64)
    groups = tilt.groups
    cols = torch.ones(len(setup.k), dtype=torch.bool)
    with torch.no_grad():
        m = _row_model(setup, groups.depth_A, hand, fit.defocus_A, fit.astig_x_A, fit.astig_y_A, fit.phase_deg, cols)
    m = (groups.weight[:, None, None] * m).sum(0) / groups.weight.sum() * tilt.snr
    half = torch.zeros(setup.pixel_mask.shape, dtype=_F64)
    half[setup.pixel_mask] = m.reshape(-1)[setup.bin_index]
    model = _full_spectrum(half)
    ring = (kk >= setup.k_low) & (kk <= setup.k_high)
    left = torch.arange(w)[None, :].expand(w, w) < w // 2
    out = torch.empty(w, w, dtype=_F64)
    for img, part in ((observed, left), (model, ~left)):
        vals = img[ring & part]
        std = float(vals.std())
        out[part] = ((img - vals.mean()) / (std if std > 0 else 1.0))[part]
    return out.clamp(-4.0, 4.0).to(torch.float32)


def handedness_evidence(tilt_angles_deg, scores_minus_one, scores_plus_one,
                        min_tilt_deg: float = HAND_MIN_TILT_DEG) -> dict:
    """Which defocus hand the per-tilt best fit scores (one per tilt, for hand −1 and +1) support.

    Only tilts with ``|tilt| ≥ min_tilt_deg`` count (near 0° both hands predict the same spectra).
    Returns ``hand`` (sign of the mean of d = score(+1) − score(−1); 0 without an informative
    tilt), ``tilts_used``, ``tilts_agreeing`` (tilts whose d has the sign of ``hand``),
    ``t_statistic`` (mean(d) / (SD(d)/√n); NaN below 2 tilts), ``p_value`` (the smaller of the
    two-sided sign test and t-test p-values; 1 without evidence), ``clear`` (more than half of
    the tilts agree and ``p_value ≤ HAND_MAX_P``), ``score_difference_mean`` / ``_sd``,
    ``score_minus_one`` / ``score_plus_one`` (mean scores over those tilts) and ``min_tilt_deg``.
    """
    tilts = torch.as_tensor(tilt_angles_deg, dtype=_F64).reshape(-1)
    minus = torch.as_tensor(scores_minus_one, dtype=_F64).reshape(-1)
    plus = torch.as_tensor(scores_plus_one, dtype=_F64).reshape(-1)
    used = tilts.abs() >= min_tilt_deg
    d = (plus - minus)[used]
    n = int(d.numel())
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std()) if n >= 2 else math.nan
    hand = int(math.copysign(1, mean)) if n and mean != 0 else 0
    agreeing = int((torch.sign(d) == hand).sum()) if hand else 0
    t, p = math.nan, 1.0
    if hand:
        p = float(binomtest(agreeing, n).pvalue)
    if hand and n >= 2:
        t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean)
        p = min(p, float(2.0 * student_t.sf(abs(t), n - 1)))
    return {"hand": hand, "clear": bool(hand != 0 and 2 * agreeing > n and p <= HAND_MAX_P), "p_value": p,
            "t_statistic": t, "tilts_used": n, "tilts_agreeing": agreeing,
            "score_difference_mean": mean, "score_difference_sd": sd,
            "score_minus_one": float(minus[used].mean()) if n else math.nan,
            "score_plus_one": float(plus[used].mean()) if n else math.nan, "min_tilt_deg": float(min_tilt_deg)}


def estimate_tilt_series_ctf(images: torch.Tensor, pixel_size_A: float, tilt_angles_deg, tilt_axis_angle_deg,
                             voltage_kV: float, cs_mm: float, amplitude_contrast: float, window_px: int = 512,
                             resolution_range_A=(30.0, 7.0), defocus_range_A=(5000.0, 80000.0),
                             defocus_grid=(2, 2), fit_phase: bool = False, hand="auto", *, overlap: float = 0.5,
                             astigmatism_per_tilt: bool = False,
                             fit_resolution_threshold: float = FIT_RESOLUTION_THRESHOLD) -> dict:
    """Tilt-aware CTF estimation of every image of a tilt series (see the module docstring).

    ``images`` ``[n, h, w]`` (or ``[n, frames, h, w]``: frame periodograms are summed — immune to
    drift, but with f frames the Thon rings stand f times weaker above the noise background than
    in the periodogram of the sum; any float dtype, on any device: the FFTs run there);
    ``tilt_angles_deg`` ``[n]``; ``tilt_axis_angle_deg`` scalar or ``[n]`` (RELION ``rlnTomoZRot``,
    from +y CCW, for the arrays as given); ``hand``: −1 / +1 (RELION ``rlnTomoHand``) to fit with
    that handedness, or ``"auto"`` (default) to fit with the one the data clearly support (else −1).

    Returns per-tilt float32 tensors ``defocus_u_A, defocus_v_A, defocus_angle_deg`` (U ≥ V,
    angle in (−90, 90], from +x toward +y), ``phase_shift_deg`` (0 unless ``fit_phase``),
    ``fit_resolution_A``, ``fit_score`` (normalised cross-correlation in the fit range),
    ``refit`` (bool: changed by the tilt-series consistency stage), ``power_spectra [n, w, w]``
    (diagnostic, DC at ``w//2``: left half observed, right half model), ``defocus_grid_A
    [n, gy, gx]`` (mean defocus at the centres of a gy × gx grid of image cells, fitted locally),
    and ``handedness``: the evidence of :func:`handedness_evidence` (``hand``: the hand the data
    support, ``clear``, ``t_statistic``, ``tilts_used``, ``tilts_agreeing``, …) plus
    ``hand_used`` (the hand of the reported defocus values), ``source`` (``"given"``,
    ``"detected"`` or ``"default"``: auto without a clear hand) and ``gradient_slope`` (slope of
    the grid defocus against the plane depth z_P: ≈ hand).
    """
    tilt_list = [float(a) for a in torch.as_tensor(tilt_angles_deg, dtype=_F64).reshape(-1)]
    _validate(images, pixel_size_A, tilt_list, window_px, resolution_range_A, defocus_range_A, defocus_grid,
              hand, amplitude_contrast)
    n = images.shape[0]
    h, w = images.shape[-2], images.shape[-1]
    axes = torch.as_tensor(tilt_axis_angle_deg, dtype=_F64).reshape(-1)
    if axes.numel() == 1:
        axes = axes.expand(n)
    if axes.numel() != n:
        raise CtfEstimationError(f"tilt_axis_angle_deg needs 1 or {n} values, got {axes.numel()}")
    tilts_t = torch.tensor(tilt_list, dtype=_F64)
    corners = torch.tensor([[-w / 2, -h / 2], [w / 2, -h / 2], [-w / 2, h / 2], [w / 2, h / 2]],
                           dtype=_F64) * pixel_size_A
    max_offset = float(specimen_plane_depth_A(corners, axes, tilts_t).abs().max())
    setup = _make_setup(pixel_size_A, window_px, voltage_kV, cs_mm, amplitude_contrast, resolution_range_A,
                        defocus_range_A, max_offset)
    tilts = []
    for i in range(n):
        if not bool(torch.isfinite(images[i]).all()):
            raise CtfEstimationError(f"image {i} (tilt {tilt_list[i]:g}°) contains NaN or infinite values")
        t = _prepare_tilt(images[i], tilt_list[i], float(axes[i]), setup, overlap)
        t.groups = _group(t, setup)
        t.bg = _smooth_log_background(t.profiles.mean((0, 1)), setup.k,
                                      local_range_per_A=(0.8 * setup.k_low, 1.25 * setup.k_high))
        t.snr = torch.ones_like(setup.k)
        tilts.append(t)
    lo, hi = setup.search_lo, setup.search_hi
    # pass 1: unweighted model, given hand (or -1)
    hand0 = -1 if hand == "auto" else int(hand)
    phases = _PHASE_GRID_DEG if fit_phase else (0.0,)
    fits = [_search(_rows(t.groups, t, setup), setup, t.snr[setup.fit], hand0, lo, hi, phases) for t in tilts]
    # pass 2: background and SNR envelope from the first model; search with both hands
    for t, f in zip(tilts, fits):
        res = _fit_background_envelope(t, setup, hand0, f)
        if res is not None:
            t.bg, t.snr = res
    rows_of = [_rows(t.groups, t, setup) for t in tilts]
    snr_of = [t.snr[setup.fit] for t in tilts]
    starts = {hd: [_search(r, setup, s, hd, lo, hi, phases) for r, s in zip(rows_of, snr_of)] for hd in (-1, 1)}
    evidence = handedness_evidence(tilt_list, [f.score for f in starts[-1]], [f.score for f in starts[1]])
    if hand != "auto":
        hand_used, source = int(hand), "given"
    elif evidence["clear"]:
        hand_used, source = evidence["hand"], "detected"
    else:
        hand_used, source = -1, "default"
    fits = [_refine(r, setup, s, hand_used, st, fit_phase) for r, s, st in zip(rows_of, snr_of, starts[hand_used])]
    if astigmatism_per_tilt:  # the consistency stage searches with the median astigmatism
        astig = (float(torch.tensor([f.astig_x_A for f in fits]).median()),
                 float(torch.tensor([f.astig_y_A for f in fits]).median()))
    else:  # one astigmatism for the tilt series, then every defocus again
        tables = [_LocalTables(r, setup, s, hand_used, f.defocus_A, 500.0, [f.phase_deg])
                  for r, s, f in zip(rows_of, snr_of, fits)]
        astig = _series_astigmatism(tables, fits)
    searched = [_search(r, setup, s, hand_used, lo, hi, phases, astig=astig, return_curve=True)
                for r, s in zip(rows_of, snr_of)]
    if not astigmatism_per_tilt:
        fits = [_refine(r, setup, s, hand_used, found[0], fit_phase, fit_astig=False)
                for r, s, found in zip(rows_of, snr_of, searched)]
    fits, refit = _consistency(rows_of, fits, torch.stack([x[1] for x in searched]),
                               torch.stack([x[2] for x in searched]), [x[3] for x in searched], setup, snr_of,
                               hand_used, fit_phase, tilt_list, astig, refine_astig=astigmatism_per_tilt)
    # per-tilt outputs
    gy, gx = (int(g) for g in defocus_grid)
    out_u, out_v, out_a, out_res, grid_out, spectra = [], [], [], [], [], []
    slope_num = slope_den = 0.0
    centre_px = torch.tensor([w // 2, h // 2], dtype=_F64)
    for t, f, r, s in zip(tilts, fits, rows_of, snr_of):
        u, v, a = enforce_ctffind_convention(torch.tensor(f.defocus_A + f.half_astig_A, dtype=_F64),
                                             torch.tensor(f.defocus_A - f.half_astig_A, dtype=_F64),
                                             torch.tensor(f.angle_deg, dtype=_F64))
        out_u.append(float(u)), out_v.append(float(v)), out_a.append(float(a))
        out_res.append(_fit_resolution_A(t, setup, hand_used, f, fit_resolution_threshold))
        values, measured, depths = [], [], []
        mfit = _model_fit(setup, s, f.phase_deg)
        for cell_px, sel in _cells((h, w), (gy, gx), t.centres_A / setup.pixel_size_A + centre_px):
            # reported value: windows of the cell, offsets (hand_used) relative to the cell centre
            z = float(specimen_plane_depth_A(((cell_px - centre_px) * setup.pixel_size_A)[None], t.axis_deg,
                                             t.tilt_deg)[0, 0])
            cell_rows = _rows(_group(t, setup, sel, depth_ref_A=z), t, setup)
            values.append(_local_defocus(cell_rows, setup, mfit, hand_used, f, f.defocus_A + hand_used * z, 2000.0)[0])
            # handedness check: no offsets inside the cell, value at the windows' mean depth
            z_mean = float(t.depth_A[sel].mean())
            plain = _rows(_group(t, setup, sel), t, setup)
            measured.append(_local_defocus(plain, setup, mfit, 0, f, f.defocus_A, 2000.0 + 1.5 * abs(z_mean))[0])
            depths.append(z_mean)
        grid_out.append(torch.tensor(values, dtype=_F64).reshape(gy, gx))
        meas, dep = torch.tensor(measured, dtype=_F64), torch.tensor(depths, dtype=_F64)
        dz = dep - dep.mean()
        slope_num += float((dz * (meas - meas.mean())).sum())
        slope_den += float((dz * dz).sum())
        spectra.append(_diagnostic(t, setup, hand_used, f))
    f32 = torch.float32
    return {
        "defocus_u_A": torch.tensor(out_u, dtype=f32),
        "defocus_v_A": torch.tensor(out_v, dtype=f32),
        "defocus_angle_deg": torch.tensor(out_a, dtype=f32),
        "phase_shift_deg": torch.tensor([f.phase_deg for f in fits], dtype=f32),
        "fit_resolution_A": torch.tensor(out_res, dtype=f32),
        "fit_score": torch.tensor([f.score for f in fits], dtype=f32),
        "refit": torch.tensor(refit, dtype=torch.bool),
        "power_spectra": torch.stack(spectra),
        "defocus_grid_A": torch.stack(grid_out).to(f32),
        "handedness": {**evidence, "hand_used": int(hand_used), "source": source,
                       "gradient_slope": slope_num / slope_den if slope_den > 0 else float("nan")},
    }
