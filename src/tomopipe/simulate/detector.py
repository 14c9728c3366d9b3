"""From a tilt's contrast to movie frames: damage, beam-induced motion, dose, shot noise, detector.

Frame f of a tilt (``F`` frames, dose ``D/F`` each):

1. Radiation damage: the signal is multiplied by the exposure filter at the frame's mid
   accumulated dose, ``pre_exposure + (f + ½)·D/F`` (Grant & Grigorieff 2015,
   :func:`tomopipe.algorithms.filters.exposure_filter`).
2. Motion: the global content displacement ``d_f`` is a Fourier phase ramp (exact, periodic at
   the borders); the smooth local deformation ``u_f(x) = g_f·D(x)`` is applied by warping the
   contrast at a few temporal knots (bilinear) and interpolating their spectra in time.
3. Intensity: expected counts ``λ = (D/F)·p²·T·(1 + c_f) / g(x)`` with ``T = exp(−t/(λ_in cos θ))``
   (zero-loss energy filter) and ``g`` the gain reference that corrects the camera
   (``corrected = raw × g``).
4. Shot noise ``Poisson(λ)``; hot pixels (fixed positions, extra Poisson counts in every frame);
   X-ray hits (random single frames, 1–3 pixels of 30–200 counts). Counts are clipped to 255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import exposure_filter
from tomopipe.simulate.plan import TiltPlan

__all__ = [
    "DetectorModel",
    "gain_reference",
    "hot_pixel_positions",
    "exposure_rate_grid",
    "render_frames",
    "transmission",
]


@dataclass
class DetectorModel:
    """Camera defects and settings shared by all movies of a session."""

    gain: torch.Tensor | None  #: [H, W] gain reference in the frame of the movies as read
    hot_pixels: torch.Tensor  #: [k, 2] (x, y) pixel indices
    hot_pixel_rate_counts: float
    xray_hits_per_megapixel_per_tilt: float
    shot_noise: bool = True
    max_count: int = 255


def gain_reference(shape: tuple[int, int], sigma: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """A multiplicative gain reference ``g`` (mean 1): smooth sensor response (low-frequency field),
    per-pixel variation and a few weaker columns, with overall relative spread ≈ ``sigma``."""
    h, w = shape
    device = torch.device(device)
    noise = torch.randn((h, w), generator=generator, device=device)
    ky = torch.fft.fftfreq(h, device=device)[:, None]
    kx = torch.fft.rfftfreq(w, device=device)[None, :]
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * torch.exp(-(kx * kx + ky * ky) / (2 * 0.01**2)), s=(h, w))
    smooth = smooth / smooth.std().clamp_min(1e-12)
    pixel = torch.randn((h, w), generator=generator, device=device)
    columns = torch.zeros(w, device=device)
    n_col = max(1, w // 512)
    idx = torch.randint(0, w, (n_col,), generator=generator, device=device)
    columns[idx] = 0.05 * (1 + torch.rand(n_col, generator=generator, device=device))
    response = 1.0 + sigma * (0.8 * smooth + 0.6 * pixel) - columns[None, :]
    response = response.clamp(0.5, 1.5)
    gain = 1.0 / response
    return (gain / gain.mean()).float()


def hot_pixel_positions(shape: tuple[int, int], per_megapixel: float, generator: torch.Generator) -> torch.Tensor:
    """Hot-pixel positions ``[k, 2]`` (x, y), k = round(per_megapixel · H·W / 10⁶), distinct."""
    h, w = shape
    k = int(round(per_megapixel * h * w / 1e6))
    if k == 0:
        return torch.zeros((0, 2), dtype=torch.int64)
    flat = torch.randperm(h * w, generator=generator)[:k]
    return torch.stack([flat % w, flat // w], -1)


def transmission(thickness_A: float, tilt_deg: float, mean_free_path_A: float, enabled: bool = True) -> float:
    """Zero-loss fraction of the beam through ``thickness_A / cos(tilt)`` of ice."""
    if not enabled:
        return 1.0
    return math.exp(-thickness_A / (mean_free_path_A * math.cos(math.radians(tilt_deg))))


def exposure_rate_grid(image_shape, pixel_size_A, voltage_kV, device) -> torch.Tensor:
    """``h(k) = −ln(exposure_filter(k, 1 e⁻/Å²))`` on the rfft grid, so that the filter at dose D is ``exp(−D·h)``."""
    h, w = image_shape
    ky = torch.fft.fftfreq(h, d=pixel_size_A, dtype=torch.float64, device=device)
    kx = torch.fft.rfftfreq(w, d=pixel_size_A, dtype=torch.float64, device=device)
    k = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    e1 = exposure_filter(k, 1.0, voltage_kV).double().clamp_min(1e-300)
    return (-torch.log(e1)).float()


def _warp(image: torch.Tensor, displacement_px: torch.Tensor) -> torch.Tensor:
    """``out(x) = image(x − u(x))`` (bilinear), ``displacement_px`` [H, W, 2] (dx, dy)."""
    h, w = image.shape
    ys = torch.arange(h, dtype=torch.float32, device=image.device)
    xs = torch.arange(w, dtype=torch.float32, device=image.device)
    gx = (xs[None, :] - displacement_px[..., 0]) * (2.0 / (w - 1)) - 1.0
    gy = (ys[:, None] - displacement_px[..., 1]) * (2.0 / (h - 1)) - 1.0
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]


def _shift_phasor(image_shape, shift_px: tuple[float, float], device) -> torch.Tensor:
    """``exp(−2πi(kx·dx + ky·dy))`` (k in cycles/px) on the rfft grid: moves content by (dx, dy)."""
    h, w = image_shape
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    py = torch.polar(torch.ones_like(ky), -2 * math.pi * ky * shift_px[1]).to(torch.complex64)
    px = torch.polar(torch.ones_like(kx), -2 * math.pi * kx * shift_px[0]).to(torch.complex64)
    return py[:, None] * px[None, :]


def render_frames(
    contrast_spectrum: torch.Tensor,
    tilt: TiltPlan,
    image_shape: tuple[int, int],
    pixel_size_A: float,
    frames: int,
    dose_per_frame_e_per_A2: float,
    intensity_transmission: float,
    detector: DetectorModel,
    generator: torch.Generator,
    *,
    exposure_rate: torch.Tensor | None = None,
    local_motion_knots: int = 3,
    xray_generator: torch.Generator | None = None,
    device="cpu",
) -> tuple[torch.Tensor, list[dict]]:
    """Frames ``[F, H, W]`` (uint8 counts, or float32 expected counts when shot noise is off)
    and the X-ray hits ``[{frame, x, y, counts}]`` (x, y pixel indices of the frames as read).

    ``generator`` (on ``device``) draws the shot noise; ``xray_generator`` (CPU) the X-ray hits.
    ``exposure_rate`` from :func:`exposure_rate_grid` switches radiation damage on.
    """
    device = torch.device(device)
    h, w = image_shape
    counts_per_px = dose_per_frame_e_per_A2 * pixel_size_A**2 * intensity_transmission

    # spectra at the local-motion knots (g = profile value), interpolated linearly in g
    knots_g: list[float] = [0.0]
    knot_spectra = [contrast_spectrum]
    if tilt.local_field is not None and float(tilt.local_profile.max()) > 0:
        base = torch.fft.irfft2(contrast_spectrum, s=(h, w))
        ys = (torch.arange(h, dtype=torch.float64) - h // 2).to(device)
        xs = (torch.arange(w, dtype=torch.float64) - w // 2).to(device)
        field = tilt.local_field.evaluate(xs[None, :].expand(h, w), ys[:, None].expand(h, w)).float()
        n_knots = max(2, int(local_motion_knots))
        g_max = float(tilt.local_profile.max())
        for gk in torch.linspace(0, g_max, n_knots)[1:].tolist():
            knots_g.append(gk)
            knot_spectra.append(torch.fft.rfft2(_warp(base, field * gk)))
        del base, field

    gain = detector.gain
    inverse_gain = None if gain is None else (1.0 / gain).to(device)
    out_dtype = torch.uint8 if detector.shot_noise else torch.float32
    out = torch.empty((frames, h, w), dtype=out_dtype, device=device)
    xrays: list[dict] = []
    for f in range(frames):
        g_f = float(tilt.local_profile[f])
        if len(knots_g) > 1:
            b = min(max(int(torch.searchsorted(torch.tensor(knots_g), torch.tensor(g_f), right=True)) - 1, 0), len(knots_g) - 2)
            t = (g_f - knots_g[b]) / (knots_g[b + 1] - knots_g[b])
            spec = knot_spectra[b] * (1 - t) + knot_spectra[b + 1] * t
        else:
            spec = knot_spectra[0]
        if exposure_rate is not None:
            dose_mid = tilt.pre_exposure_e_per_A2 + (f + 0.5) * dose_per_frame_e_per_A2
            spec = spec * torch.exp(-dose_mid * exposure_rate)
        shift = tilt.frame_shifts_A[f] / pixel_size_A
        if float(shift.abs().max()) > 0:
            spec = spec * _shift_phasor(image_shape, (float(shift[0]), float(shift[1])), device)
        contrast = torch.fft.irfft2(spec, s=(h, w))
        lam = (1.0 + contrast).clamp_min(0.0) * counts_per_px
        if inverse_gain is not None:
            lam = lam * inverse_gain
        if not detector.shot_noise:
            out[f] = lam
            continue
        counts = torch.poisson(lam, generator=generator)
        if detector.hot_pixels.numel():
            hx, hy = detector.hot_pixels[:, 0].to(device), detector.hot_pixels[:, 1].to(device)
            extra = torch.poisson(
                torch.full((hx.numel(),), detector.hot_pixel_rate_counts, device=device), generator=generator
            )
            counts[hy, hx] += extra
        if xray_generator is not None and detector.xray_hits_per_megapixel_per_tilt > 0:
            rate = torch.tensor([detector.xray_hits_per_megapixel_per_tilt * h * w / 1e6 / frames], dtype=torch.float64)
            n_hits = int(torch.poisson(rate, generator=xray_generator)[0])
            for _ in range(n_hits):
                cx = int(torch.randint(1, w - 1, (1,), generator=xray_generator))
                cy = int(torch.randint(1, h - 1, (1,), generator=xray_generator))
                value = int(torch.randint(30, 201, (1,), generator=xray_generator))
                n_pix = int(torch.randint(1, 4, (1,), generator=xray_generator))
                pixels = [(cx, cy, value)] + [(cx + dx, cy + dy, value // 2) for dx, dy in ((1, 0), (0, 1))[: n_pix - 1]]
                for x, y, v in pixels:
                    counts[y, x] += v
                    xrays.append({"frame": f, "x": x, "y": y, "counts": v})
        out[f] = counts.clamp_max(detector.max_count).to(torch.uint8)
    return out, xrays
