"""Settings of one estimation: constants, input checks and the radial/sector/defocus grids (``Setup``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tomopipe.algorithms.ctf import ctf_1d
from tomopipe.errors import TomopipeError

FIT_RESOLUTION_THRESHOLD = 0.5
HAND_MIN_TILT_DEG = 9.5  # tilts that inform the handedness check (a 10° tilt read as 9.99° counts)
HAND_MAX_P = 0.01  # a clear hand: p-value of the per-tilt score differences at most this
F64 = torch.float64
_SUBSAMPLES = 4  # model samples per radial bin (the model is averaged over the bin width)
DETREND_DEGREE = 2  # polynomial in k projected out of data and model within the fit range
ASTIG_HALF_A = (0.0, 150.0, 300.0, 500.0, 800.0, 1200.0, 1700.0, 2300.0)  # (U − V)/2 grid
ASTIG_ANGLES_DEG = tuple(range(0, 180, 15))


class CtfEstimationError(TomopipeError):
    """Settings or images with which a CTF cannot be estimated (the message says what to change)."""


@dataclass
class Setup:
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
    astig_half_A: tuple = ASTIG_HALF_A
    astig_angles_deg: tuple = ASTIG_ANGLES_DEG
    models: dict = field(default_factory=dict)  # phase_deg -> CTF² table [n_k, L]

    def model_table(self, phase_deg: float) -> torch.Tensor:
        """Bin-averaged CTF² ``[n_k, L]`` for every table defocus."""
        key = round(float(phase_deg), 6)
        if key not in self.models:
            c = ctf_1d(self.k_sub[:, :, None], self.table_defocus_A[None, None, :], self.voltage_kV,
                       self.cs_mm, self.amplitude_contrast, phase_shift_deg=key)
            self.models[key] = (c * c).mean(1)
        return self.models[key]


def validate_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CtfEstimationError(f"images must be a tensor [n, h, w] (or [n, frames, h, w]), got {shape}")


def validate_inputs(n_images, image_shape, pixel_size_A, tilt_angles_deg, window_px, resolution_range_A,
                    defocus_range_A, defocus_grid, hand, amplitude_contrast):
    """The estimation's settings for ``n_images`` images of ``image_shape`` ``(h, w)`` px."""
    n, (h, w) = int(n_images), (int(image_shape[0]), int(image_shape[1]))
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


def make_setup(pixel_size_A, window_px, voltage_kV, cs_mm, amplitude_contrast, resolution_range_A,
               defocus_range_A, max_offset_A, n_sectors=36, step_A=50.0) -> Setup:
    w = int(window_px)
    low, high = (float(x) for x in resolution_range_A)
    k_low, k_high = 1.0 / low, 1.0 / high
    to_px = w * pixel_size_A  # radius (Fourier px) = k · to_px
    j0 = max(2, int(math.floor(0.8 * k_low * to_px)))
    j1 = int(math.floor(0.96 * (w // 2)))
    j = torch.arange(j0, j1 + 1, dtype=F64)
    k = j / to_px
    q = (torch.arange(_SUBSAMPLES, dtype=F64) + 0.5) / _SUBSAMPLES - 0.5
    k_sub = (j[:, None] + q[None, :]) / to_px
    fit = (k >= k_low - 0.5 / to_px) & (k <= k_high + 0.5 / to_px)
    # rfft grid -> (sector, radial bin)
    ky = torch.fft.fftfreq(w, d=1.0 / w, dtype=F64)[:, None]
    kx = torch.fft.rfftfreq(w, d=1.0 / w, dtype=F64)[None, :]
    r = torch.sqrt(kx * kx + ky * ky)
    ky, kx = torch.broadcast_tensors(ky, kx)
    phi = torch.rad2deg(torch.atan2(ky, kx))  # [-90, 90] on the rfft half plane
    rb = torch.round(r).long()
    mask = (rb >= j0) & (rb <= j1)
    sec = torch.clamp(torch.floor((phi + 90.0) / (180.0 / n_sectors)).long(), 0, n_sectors - 1)
    index = (sec * len(j) + (rb - j0))[mask]
    sector_deg = -90.0 + (torch.arange(n_sectors, dtype=F64) + 0.5) * (180.0 / n_sectors)
    # detrend projector within the fit range
    kf = k[fit]
    t = (kf - kf.mean()) / max(float(kf.max() - kf.min()), 1e-12) * 2.0
    basis = torch.stack([t ** d for d in range(DETREND_DEGREE + 1)], 1)
    qmat, _ = torch.linalg.qr(basis)
    detrend = torch.eye(len(kf), dtype=F64) - qmat @ qmat.T
    # defocus table: the search range padded by the largest window offset and astigmatism
    d_lo, d_hi = (float(x) for x in defocus_range_A)
    pad = max_offset_A + max(ASTIG_HALF_A) + 2500.0
    first = math.floor((d_lo - pad) / step_A)
    last = math.ceil((d_hi + pad) / step_A)
    table = torch.arange(first, last + 1, dtype=F64) * step_A
    search_lo = int(round(d_lo / step_A)) - first
    search_hi = int(round(d_hi / step_A)) - first
    return Setup(pixel_size_A=float(pixel_size_A), window_px=w, voltage_kV=float(voltage_kV), cs_mm=float(cs_mm),
                 amplitude_contrast=float(amplitude_contrast), n_sectors=n_sectors, j=j, k=k, k_sub=k_sub, fit=fit,
                 sector_deg=sector_deg, bin_index=index, pixel_mask=mask, detrend=detrend, step_A=step_A,
                 table_defocus_A=table, search_lo=search_lo, search_hi=search_hi, k_low=k_low, k_high=k_high)
