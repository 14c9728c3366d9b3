"""From a tilt's contrast to movie frames: damage, beam-induced motion, dose, shot noise, detector.

Frame f of a tilt (``F`` frames, dose ``D/F`` each):

1. Radiation damage: the particles' signal is multiplied by the exposure filter at the frame's
   mid accumulated dose, ``pre_exposure + (f + ½)·D/F`` (Grant & Grigorieff 2015,
   :func:`tomopipe.algorithms.filters.exposure_filter`). The amorphous ice is not faded: the
   beam rearranges its molecules, but what it leaves is amorphous ice with the same structure
   factor, so its power spectrum — the Thon rings of late, high-dose tilts — stays (as in real
   tilt series, whose last tilts still show Thon rings).
2. Motion: the global content displacement ``d_f`` is a Fourier phase ramp (exact, periodic at
   the borders); the smooth local deformation ``u_f(x) = g_f·D(x)`` is applied by warping the
   contrast at a few temporal knots (bilinear) and interpolating their spectra in time.
3. Intensity: expected counts ``λ = (D/F)·p²·T·(1 + c_f) / g(x)`` with ``T = exp(−t/(λ_in cos θ))``
   (zero-loss energy filter; ``t`` the ice thickness under the pixel, a number or an image) and
   ``g`` the gain reference that corrects the camera (``corrected = raw × g``).
4. Shot noise ``Poisson(λ)``; hot pixels (fixed positions, extra Poisson counts in every frame);
   X-ray hits (:func:`draw_xray_hits`). Counts are clipped to 255.

X-ray hits (``realistic`` spectrum): Poisson(rate·area) hits per movie at uniform random places
and frames. A hit is a spot (a round blob of diameter ``d``, log-uniform in 1..``max_size_px``) or,
for a share ``streak_fraction``, a streak (a track of length ``L``, log-uniform in
3..``max_size_px``, 1 px wide, random direction, counts fluctuating along it). Its peak counts
are ``s·sqrt(λ̄)`` (at least 1), ``λ̄`` the frame's expected counts there and ``s`` Pareto
(``P(S > s) = s^−snr_tail``, s >= 1): from the noise level up, heavy-tailed. A share
``two_frame_fraction`` is split between two consecutive frames (a hit during the read-out).
``simple`` spectrum: 1–3 pixels of 30–200 counts in one frame (tomopipe's first twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import exposure_filter
from tomopipe.simulate._numba import HAVE_NUMBA as _HAVE_NUMBA
from tomopipe.simulate._numba import numba
from tomopipe.simulate.plan import TiltPlan

__all__ = [
    "DetectorModel",
    "gain_reference",
    "hot_pixel_positions",
    "exposure_rate_grid",
    "render_frames",
    "transmission",
    "XraySpectrum",
    "draw_xray_hits",
]


@dataclass(frozen=True)
class XraySpectrum:
    """Shapes and strengths of X-ray hits (module docstring)."""

    kind: str = "realistic"  #: "realistic" or "simple"
    max_size_px: float = 8.0
    streak_fraction: float = 0.3
    two_frame_fraction: float = 0.1
    snr_tail: float = 0.6


@dataclass
class DetectorModel:
    """Camera defects and settings shared by all movies of a session."""

    gain: torch.Tensor | None  #: [H, W] gain reference in the frame of the movies as read
    hot_pixels: torch.Tensor  #: [k, 2] (x, y) pixel indices
    hot_pixel_rate_counts: float
    xray_hits_per_megapixel_per_tilt: float
    shot_noise: bool = True
    max_count: int = 255
    xray_spectrum: XraySpectrum = XraySpectrum()


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


def transmission(thickness_A, tilt_deg: float, mean_free_path_A: float, enabled: bool = True):
    """Zero-loss fraction of the beam through ``thickness_A / cos(tilt)`` of ice (a number, or a
    tensor for a thickness image)."""
    if not enabled:
        return 1.0 if not isinstance(thickness_A, torch.Tensor) else torch.ones_like(thickness_A)
    exponent = -thickness_A / (mean_free_path_A * math.cos(math.radians(tilt_deg)))
    return torch.exp(exponent) if isinstance(thickness_A, torch.Tensor) else math.exp(exponent)


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


def _poisson_torch(contrast: torch.Tensor, scale: torch.Tensor, generator: torch.Generator,
                   max_count: int) -> torch.Tensor:
    lam = (1.0 + contrast).clamp_min(0.0) * scale
    return torch.poisson(lam, generator=generator).clamp_max(max_count).to(torch.uint8)


if _HAVE_NUMBA:

    @numba.njit(cache=True, parallel=True, fastmath=True)
    def _poisson_numba(contrast, scale, seed, max_count, out):  # pragma: no cover - compiled
        """out = min(Poisson((1 + c)·scale), max_count) by CDF inversion for λ < 30 (numpy's
        sampler above). Uniforms from xorshift64* streams, one per chunk of pixels seeded from
        ``seed`` and the chunk number (splitmix64), so the result does not depend on the threads."""
        n = contrast.size
        n_chunks = 16
        size = (n + n_chunks - 1) // n_chunks
        for chunk in numba.prange(n_chunks):
            z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(chunk + 1) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = z ^ (z >> np.uint64(31))
            if state == np.uint64(0):
                state = np.uint64(0x2545F4914F6CDD1D)
            np.random.seed(seed + 7919 * chunk)
            for i in range(chunk * size, min(n, (chunk + 1) * size)):
                lam = 1.0 + contrast[i]
                if lam < 0.0:
                    lam = 0.0
                lam *= scale[i]
                if lam < 30.0:
                    state ^= state >> np.uint64(12)
                    state ^= state << np.uint64(25)
                    state ^= state >> np.uint64(27)
                    u = float((state * np.uint64(2685821657736338717)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                    if u <= 1.0 - lam:  # 1 − λ <= exp(−λ): certainly no count, no exponential needed
                        out[i] = 0
                        continue
                    p = math.exp(-lam)
                    cdf = p
                    k = 0
                    while u > cdf and k < max_count:
                        k += 1
                        p *= lam / k
                        cdf += p
                else:
                    k = min(np.random.poisson(lam), max_count)
                out[i] = k


def _poisson_counts(contrast: torch.Tensor, scale: torch.Tensor, generator: torch.Generator,
                    max_count: int) -> torch.Tensor:
    """Counts ``min(Poisson((1 + contrast)·scale), max_count)`` as uint8: the compiled CPU sampler
    (numba, seeded from ``generator``) or ``torch.poisson``. Reproducible per seed."""
    if _HAVE_NUMBA and contrast.device.type == "cpu" and max_count <= 255:
        seed = int(torch.randint(0, 2**30, (1,), generator=generator))
        out = np.empty(contrast.numel(), dtype=np.uint8)
        _poisson_numba(contrast.contiguous().reshape(-1).numpy(), scale.contiguous().reshape(-1).numpy(), seed,
                       max_count, out)
        return torch.from_numpy(out).reshape(contrast.shape)
    return _poisson_torch(contrast, scale, generator, max_count)


_STREAK_WIDTH_PX = 0.4  # Gaussian SD across a streak (and of its ends)


def _simple_hit(g: torch.Generator, w: int, h: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tomopipe's first twin: 1–3 pixels, the first of 30–200 counts, the others half of it."""
    cx = int(torch.randint(1, w - 1, (1,), generator=g))
    cy = int(torch.randint(1, h - 1, (1,), generator=g))
    value = int(torch.randint(30, 201, (1,), generator=g))
    n_pix = int(torch.randint(1, 4, (1,), generator=g))
    xs = torch.tensor([cx, cx + 1, cx][:n_pix])
    ys = torch.tensor([cy, cy, cy + 1][:n_pix])
    counts = torch.tensor([value, value // 2, value // 2][:n_pix])
    return ({"shape": "simple", "x": float(cx), "y": float(cy), "size_px": float(n_pix), "angle_deg": 0.0},
            xs, ys, counts)


def _realistic_hit(g: torch.Generator, w: int, h: int, background: torch.Tensor,
                   spectrum: XraySpectrum) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A spot or a streak (module docstring): its properties and its pixels' counts (x, y, counts)."""
    u = torch.rand(6, generator=g, dtype=torch.float64).tolist()
    cx, cy = 1.0 + u[0] * (w - 3), 1.0 + u[1] * (h - 3)
    top = spectrum.max_size_px
    streak = u[2] < spectrum.streak_fraction
    if streak:
        low = min(3.0, top)
        size, angle = low * (top / low) ** u[3], u[4] * 180.0
    else:
        size, angle = top ** u[3], 0.0
    lam = float(background[int(round(cy)), int(round(cx))])
    snr = (1.0 - u[5]) ** (-1.0 / spectrum.snr_tail)
    peak = min(255.0, max(1.0, round(snr * math.sqrt(max(lam, 0.0)))))
    reach = int(math.ceil(size / 2 + 3 * _STREAK_WIDTH_PX + 1))
    ys, xs = torch.meshgrid(torch.arange(int(cy) - reach, int(cy) + reach + 2),
                            torch.arange(int(cx) - reach, int(cx) + reach + 2), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dx, dy = xs.double() - cx, ys.double() - cy
    if streak:
        a = math.radians(angle)
        along = dx * math.cos(a) + dy * math.sin(a)
        across = -dx * math.sin(a) + dy * math.cos(a)
        beyond = (along.abs() - size / 2).clamp_min(0.0)
        weight = torch.exp(-(across.square() + beyond.square()) / (2 * _STREAK_WIDTH_PX**2))
        weight = weight * (0.5 + 0.5 * torch.rand(weight.shape, generator=g, dtype=torch.float64))  # energy loss
    else:
        sigma = max(size, 1.0) / 4.0
        weight = torch.exp(-(dx.square() + dy.square()) / (2 * sigma * sigma))
    counts = torch.round(peak * weight / weight.max()).to(torch.int64)
    keep = (counts > 0) & (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    props = {"shape": "streak" if streak else "spot", "x": cx, "y": cy, "size_px": size, "angle_deg": angle}
    return props, xs[keep], ys[keep], counts[keep]


def draw_xray_hits(spectrum: XraySpectrum, hits_per_megapixel: float, frames: int, background: torch.Tensor,
                   generator: torch.Generator) -> tuple[list[dict], list[tuple[torch.Tensor, ...]]]:
    """The X-ray hits of one movie (module docstring): per hit its properties (``hit``, ``frame``,
    ``second_frame`` (−1: none), ``shape``, centre ``x``, ``y`` (px), ``size_px``, ``angle_deg``,
    ``peak_counts``, ``background_counts`` (the frame's expected counts there, ``λ̄``), ``snr``
    (peak / sqrt(λ̄)), ``n_pixels``, ``total_counts``) and its frame-pixels ``(frame, y, x, counts)``
    (int64 tensors). ``background``: expected counts per pixel and frame ``[H, W]`` (CPU)."""
    h, w = background.shape
    rate = torch.tensor([hits_per_megapixel * h * w / 1e6], dtype=torch.float64)
    n_hits = int(torch.poisson(rate, generator=generator)[0])
    props, pixels = [], []
    for index in range(n_hits):
        frame = int(torch.randint(0, frames, (1,), generator=generator))
        if spectrum.kind == "simple":
            hit, xs, ys, counts = _simple_hit(generator, w, h)
        else:
            hit, xs, ys, counts = _realistic_hit(generator, w, h, background, spectrum)
        lam = float(background[int(round(hit["y"])), int(round(hit["x"]))])
        peak = int(counts.max())
        second, split = -1, torch.rand((), generator=generator, dtype=torch.float64)
        f = torch.full_like(counts, frame)
        if spectrum.kind != "simple" and frames > 1 and float(split) < spectrum.two_frame_fraction:
            second = frame + 1 if frame + 1 < frames else frame - 1
            share = 0.3 + 0.4 * float(split) / max(spectrum.two_frame_fraction, 1e-12)
            first_counts = torch.round(counts * share).to(torch.int64)
            f = torch.cat([f, torch.full_like(counts, second)])
            xs, ys = torch.cat([xs, xs]), torch.cat([ys, ys])
            counts = torch.cat([first_counts, counts - first_counts])
            keep = counts > 0
            f, xs, ys, counts = f[keep], xs[keep], ys[keep], counts[keep]
        hit.update(hit=index, frame=frame, second_frame=second, peak_counts=peak, background_counts=lam,
                   snr=peak / math.sqrt(max(lam, 1e-12)), n_pixels=int(torch.unique(ys * w + xs).numel()),
                   total_counts=int(counts.sum()))
        props.append(hit)
        pixels.append((f, ys, xs, counts))
    return props, pixels


def _local_field_image(tilt: TiltPlan, h: int, w: int, device) -> torch.Tensor:
    """The local deformation field ``[H, W, 2]`` (px) of a tilt, evaluated on a grid 8 times
    coarser and interpolated (it varies over hundreds of pixels)."""
    step = 8
    hc, wc = h // step + 2, w // step + 2
    ys = (torch.arange(hc, dtype=torch.float64) * step - h // 2).to(device)
    xs = (torch.arange(wc, dtype=torch.float64) * step - w // 2).to(device)
    coarse = tilt.local_field.evaluate_grid(xs, ys)  # [hc, wc, 2]
    grid_y = (torch.arange(h, dtype=torch.float32, device=device) / ((hc - 1) * step)) * 2 - 1
    grid_x = (torch.arange(w, dtype=torch.float32, device=device) / ((wc - 1) * step)) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), -1)[None]
    fine = F.grid_sample(coarse.permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=True)[0]
    return fine.permute(1, 2, 0).contiguous()


def render_frames(
    contrast_spectrum: torch.Tensor,
    tilt: TiltPlan,
    image_shape: tuple[int, int],
    pixel_size_A: float,
    frames: int,
    dose_per_frame_e_per_A2: float,
    intensity_transmission,
    detector: DetectorModel,
    generator: torch.Generator,
    *,
    exposure_rate: torch.Tensor | None = None,
    damaged_spectrum: torch.Tensor | None = None,
    local_motion_knots: int = 3,
    xray_generator: torch.Generator | None = None,
    device="cpu",
) -> tuple[torch.Tensor, list[dict]]:
    """Frames ``[F, H, W]`` (uint8 counts, or float32 expected counts when shot noise is off), the
    X-ray hits' pixels ``[{hit, frame, x, y, counts}]`` (x, y pixel indices of the frames as read;
    counts as added, below the 255 clip) and the hits (:func:`draw_xray_hits`).

    ``intensity_transmission``: the zero-loss fraction, a number or an image ``[H, W]``.
    ``generator`` (on ``device``) draws the shot noise; ``xray_generator`` (CPU) the X-ray hits.
    ``exposure_rate`` from :func:`exposure_rate_grid` switches radiation damage on; it fades
    ``damaged_spectrum``, the particles' part of ``contrast_spectrum``
    (``render_tilt_contrast(..., particle_share=True)``), and leaves the rest (the ice) as it is.
    """
    if exposure_rate is not None and damaged_spectrum is None:
        raise ValueError("render_frames: radiation damage (exposure_rate) needs damaged_spectrum")
    device = torch.device(device)
    h, w = image_shape
    counts_per_px = dose_per_frame_e_per_A2 * pixel_size_A**2

    # spectra at the local-motion knots (g = profile value), interpolated linearly in g
    knots_g: list[float] = [0.0]
    parts = [contrast_spectrum] + ([damaged_spectrum] if exposure_rate is not None else [])
    knot_spectra = [parts]
    if tilt.local_field is not None and float(tilt.local_profile.max()) > 0:
        bases = [torch.fft.irfft2(part, s=(h, w)) for part in parts]
        field = _local_field_image(tilt, h, w, device)
        n_knots = max(2, int(local_motion_knots))
        g_max = float(tilt.local_profile.max())
        for gk in torch.linspace(0, g_max, n_knots)[1:].tolist():
            knots_g.append(gk)
            knot_spectra.append([torch.fft.rfft2(_warp(base, field * gk)) for base in bases])
        del bases, field

    scale = torch.full((h, w), counts_per_px, dtype=torch.float32, device=device)
    scale = scale * (intensity_transmission.to(device) if isinstance(intensity_transmission, torch.Tensor)
                     else intensity_transmission)
    if detector.gain is not None:
        scale = scale / detector.gain.to(device)
    hits, hit_pixels = [], []
    if xray_generator is not None and detector.shot_noise and detector.xray_hits_per_megapixel_per_tilt > 0:
        hits, hit_pixels = draw_xray_hits(detector.xray_spectrum, detector.xray_hits_per_megapixel_per_tilt, frames,
                                          scale.cpu(), xray_generator)
    if exposure_rate is not None:
        damage = torch.exp(-(tilt.pre_exposure_e_per_A2 + 0.5 * dose_per_frame_e_per_A2) * exposure_rate)
        damage_step = torch.exp(-dose_per_frame_e_per_A2 * exposure_rate)
    out_dtype = torch.uint8 if detector.shot_noise else torch.float32
    out = torch.empty((frames, h, w), dtype=out_dtype, device=device)
    xrays: list[dict] = []
    ky = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    for f in range(frames):
        g_f = float(tilt.local_profile[f])
        if len(knots_g) > 1:
            b = max(0, min(len(knots_g) - 2, sum(1 for gk in knots_g if gk <= g_f) - 1))
            t = (g_f - knots_g[b]) / (knots_g[b + 1] - knots_g[b])
            at_g = [torch.lerp(x, y, t) for x, y in zip(knot_spectra[b], knot_spectra[b + 1])]
        else:
            at_g = [x.clone() for x in knot_spectra[0]]
        spec = at_g[0]
        if exposure_rate is not None:  # total − (1 − damage)·particles
            spec -= (1.0 - damage) * at_g[1]
            damage = damage * damage_step
        del at_g
        dx, dy = (float(v) / pixel_size_A for v in tilt.frame_shifts_A[f])
        if dx or dy:
            py = torch.polar(torch.ones_like(ky), -2 * math.pi * ky * dy).to(torch.complex64)
            px = torch.polar(torch.ones_like(kx), -2 * math.pi * kx * dx).to(torch.complex64)
            spec *= py[:, None]
            spec *= px[None, :]
        contrast = torch.fft.irfft2(spec, s=(h, w))
        del spec
        if not detector.shot_noise:
            out[f] = (1.0 + contrast).clamp_min(0.0) * scale
            continue
        counts = _poisson_counts(contrast, scale, generator, detector.max_count).to(device)
        if detector.hot_pixels.numel():
            hx, hy = detector.hot_pixels[:, 0].to(device), detector.hot_pixels[:, 1].to(device)
            extra = torch.poisson(
                torch.full((hx.numel(),), detector.hot_pixel_rate_counts, device=device), generator=generator
            )
            counts[hy, hx] = (counts[hy, hx].to(torch.float32) + extra).clamp_max(detector.max_count).to(torch.uint8)
        for index, (hf, hy, hx, hc) in enumerate(hit_pixels):
            now = hf == f
            if not bool(now.any()):
                continue
            y, x = hy[now].to(device), hx[now].to(device)
            before = counts[y, x].to(torch.int64)
            added = torch.minimum(hc[now].to(device), detector.max_count - before)
            counts[y, x] = (before + added).to(torch.uint8)
            for xi, yi, ci in zip(x.tolist(), y.tolist(), added.tolist()):
                xrays.append({"hit": index, "frame": f, "x": xi, "y": yi, "counts": ci})
        out[f] = counts
    return out, xrays, hits
