"""Tomogram reconstruction: weighted back projection (WBP) with IMOD's radial filter and a
SIRT-like filter, straight from the tilt images and their RELION 5 alignment.

Geometry (``docs/conventions.md`` §2c, §3, §7; :mod:`tomopipe.algorithms.geometry`):

* Output volume ``[z, y, x]``: z = thickness, **+z toward the electron source**; x, y as the
  aligned image (tilt axis along +y). Voxel (i_z, i_y, i_x) sits at the specimen point
  ``p = (i_x - nx//2 - shift_x, i_y - ny//2, i_z - nz//2 - shift_z)`` voxels from the tomogram
  centre (``shift_x/z``: IMOD ``SHIFT``, a positive value moves the content to +x / +z).
* Every tilt image is sampled (bilinear) where each voxel projects:
  ``x_img = magnification·Rz(rot_z)·Ry(rot_y)·Rx(rot_x)·p + shift + N//2`` (pixels), with
  :func:`~tomopipe.algorithms.geometry.projection_rotations`; ``magnification`` is the image
  scale of the view (the alignment column; its IMOD ``.xf`` has ``A = R2(-rot_z)/magnification``,
  see :func:`tomopipe.model.alignment.xf_for_views`). No interpolated (aligned) stack is made.
* Weighting (IMOD ``tilt`` ``RADIAL cutoff falloff`` with ``FalloffIsTrueSigma 1``): a ramp
  ``|k_perp|`` (cycles/pixel, k_perp = frequency across the tilt axis, the direction
  ``(cos rot_z, sin rot_z)`` in the tilt image) up to ``cutoff``, times
  ``exp(-(|k_perp| - cutoff)² / (2·falloff²))`` beyond it.
* SIRT-like filter (IMOD ``FakeSIRTiterations N``, after Zeng 2012, Med. Phys. 39:603): N
  Landweber/SIRT iterations from zero equal a filtered back projection with the ramp multiplied
  by ``1 - (1 - λ(k))^N``, λ(k) the eigenvalue of the normalised ``C·Aᵀ·R·A`` (back projection
  divided by the view count, ray sums by the ray length L): ``λ(k) = min(1, 1 / (π·|k|·L))``
  with k in cycles/pixel and L the thickness in pixels (derived for parallel rays; IMOD's own
  constants were not available to check). Low frequencies (λ ≈ 1) keep the ramp, high
  frequencies are damped to ``N / (π·L)``: relatively more low-frequency weight, as IMOD
  documents. N = 0: plain WBP.
* Super-sampling s (IMOD ``SuperSampleFactor``), against the aliasing of interpolated reads:
  without x-tilt (every view's x and z move the sample along one image line), each view is
  Fourier-upsampled s times once and read along its line through every volume row at spacing
  1/s; the output voxels interpolate those lines linearly (a compensation in the upsampling
  keeps the main-band transfer of bilinear reads). With x-tilt, voxels are computed on a grid s
  times finer in x and z (the slice plane) and brought back by Fourier cropping. Both give the
  same main band; the line path costs the output grid instead of s² times it.
* Optional per-tilt dose weighting (Grant & Grigorieff exposure filter at the tilt's
  pre-exposure) and CTF phase flipping (per tilt at its defocus, or in strips parallel to the
  tilt axis with the defocus gradient of ``rlnTomoHand``).

Scale: ``volume = (π / n_views) · Σ back-projected filtered images`` (the discrete inverse Radon
transform; a specimen of density ρ per voxel projected as line sums gives ρ back with full
angular coverage). Images are mean-subtracted per view. Memory is bounded by working in slabs of
rows along y (:func:`iter_slabs`).

Back projection kernels (same sampling, same result to float32 rounding): on the CPU a compiled
numba kernel (one pass over the voxels, bilinear samples in a zero-padded image, no coordinate
grids; 10-15x faster than ``grid_sample`` on the small preset's sizes; for an aligned stack,
whose image row depends on y only, the row blend is shared by all voxels of a row; for the
super-sampled lines, the read position is shared by all rows of a voxel column), elsewhere
(GPU, or numba missing) torch ``grid_sample`` on coordinate grids built per chunk of views.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tomopipe.algorithms._numba import HAVE_NUMBA, numba
from tomopipe.algorithms.ctf import ctf_2d, defocus_with_handedness, phase_flip
from tomopipe.algorithms.filters import exposure_filter, fast_fft_size, fourier_crop_bin
from tomopipe.algorithms.geometry import projection_rotations

__all__ = [
    "ReconstructionParams",
    "CtfParams",
    "radial_weighting",
    "sirt_like_factor",
    "filter_tilt_images",
    "volume_shape_for",
    "projection_matrices",
    "iter_slabs",
    "reconstruct_volume",
]


@dataclass(frozen=True)
class ReconstructionParams:
    """Reconstruction settings (IMOD ``tilt`` names in brackets); sizes in output voxels."""

    thickness_px: int = 128  # THICKNESS
    width_px: int = 0  # WIDTH; 0 = the image extent across the tilt axis
    shift_x_px: float = 0.0  # SHIFT x: moves the content toward +x
    shift_z_px: float = 0.0  # SHIFT z: moves the content toward +z (the source)
    tilt_angle_offset_deg: float = 0.0  # OFFSET (first value): added to every tilt angle
    tilt_axis_offset_deg: float = 0.0  # OFFSET (second value): added to every tilt-axis angle
    super_sampling: int = 2  # SuperSampleFactor
    sirt_like_iterations: int = 0  # FakeSIRTiterations
    radial_cutoff: float = 0.35  # RADIAL cutoff, cycles/pixel
    radial_falloff: float = 0.035  # RADIAL fall-off (Gaussian sigma), cycles/pixel
    slab_rows: int = 0  # rows along y per slab; 0 = from memory_budget_bytes
    memory_budget_bytes: int = 256 << 20  # working memory of one slab (samples and grids)

    def __post_init__(self):
        if int(self.thickness_px) < 1:
            raise ValueError(f"thickness_px must be >= 1, got {self.thickness_px}")
        if int(self.width_px) < 0:
            raise ValueError(f"width_px must be >= 0 (0: the image width), got {self.width_px}")
        if int(self.super_sampling) < 1:
            raise ValueError(f"super_sampling must be >= 1, got {self.super_sampling}")
        if int(self.sirt_like_iterations) < 0:
            raise ValueError(f"sirt_like_iterations must be >= 0, got {self.sirt_like_iterations}")
        if not 0 < self.radial_cutoff <= 0.5 or self.radial_falloff < 0:
            raise ValueError(f"radial cutoff must be in (0, 0.5] cycles/pixel and fall-off >= 0, got "
                             f"{self.radial_cutoff}, {self.radial_falloff}")
        if int(self.slab_rows) < 0:
            raise ValueError(f"slab_rows must be >= 0, got {self.slab_rows}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class CtfParams:
    """CTF phase flipping: per-tilt defocus (Å, underfocus positive, U along ``angle`` from +x) and
    the defocus handedness ``defocus_hand`` (RELION ``rlnTomoHand``, −1 or +1: no default, it is
    a property of the data)."""

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    voltage_kV: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    defocus_hand: int
    phase_shift_deg: torch.Tensor | float = 0.0
    strip_width_px: float = 0.0  # 0: one defocus per tilt; > 0: strips parallel to the tilt axis

    def __post_init__(self):
        if self.defocus_hand not in (-1, 1):
            raise ValueError(f"defocus_hand must be -1 or +1 (RELION rlnTomoHand), got {self.defocus_hand!r}")


# ----------------------------------------------------------------------------- filters
def radial_weighting(frequency_cpp: torch.Tensor, cutoff: float = 0.35, falloff: float = 0.035) -> torch.Tensor:
    """IMOD ``RADIAL`` weighting: ``|k|`` up to ``cutoff``, times a Gaussian (sigma ``falloff``) beyond.

    ``frequency_cpp`` in cycles/pixel (signed or not); ``falloff = 0``: a hard cut at ``cutoff``.
    """
    k = frequency_cpp.abs()
    if falloff > 0:
        atten = torch.exp(-torch.clamp(k - cutoff, min=0.0) ** 2 / (2.0 * falloff * falloff))
    else:
        atten = (k <= cutoff).to(k.dtype)
    return k * atten


def sirt_like_factor(frequency_cpp: torch.Tensor, iterations: int, ray_length_px: float) -> torch.Tensor:
    """Factor ``1 - (1 - λ)^N`` turning the ramp into N SIRT iterations, ``λ = min(1, 1/(π·|k|·L))``.

    ``iterations`` N = 0 gives 1 (plain WBP). ``ray_length_px`` L: the specimen thickness in
    pixels (the SIRT ray-sum normalisation). k in cycles/pixel.
    """
    if iterations < 0:
        raise ValueError(f"sirt_like_factor: iterations must be >= 0, got {iterations}")
    if ray_length_px <= 0:
        raise ValueError(f"sirt_like_factor: ray_length_px must be > 0, got {ray_length_px}")
    if iterations == 0:
        return torch.ones_like(frequency_cpp)
    k = frequency_cpp.abs()
    lam = torch.clamp(1.0 / (math.pi * torch.clamp(k, min=1e-12) * ray_length_px), max=1.0)
    return 1.0 - (1.0 - lam) ** iterations


def filter_tilt_images(
    images: torch.Tensor,
    tilt_axis_angle_deg: torch.Tensor,
    tilt_angles_deg: torch.Tensor,
    pixel_size_A: float,
    thickness_px: float,
    radial_cutoff: float = 0.35,
    radial_falloff: float = 0.035,
    sirt_like_iterations: int = 0,
    pre_exposure_e_per_A2: torch.Tensor | None = None,
    voltage_kV: float | None = None,
    ctf: CtfParams | None = None,
    shifts_px: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted tilt images ``[n, ny, nx]`` (float32) ready for back projection.

    Per view: mean subtracted, zero-padded (>= 1.5x), multiplied in Fourier space by the radial
    weighting across the tilt axis (:func:`radial_weighting`, :func:`sirt_like_factor`), the
    exposure filter at ``pre_exposure_e_per_A2`` (when given; it needs ``voltage_kV``) and the
    sign of the CTF (when ``ctf`` is given; ``shifts_px`` locate the tilt axis in the image for
    strips), cropped back.
    """
    if pre_exposure_e_per_A2 is not None and voltage_kV is None:
        raise ValueError("dose weighting (pre_exposure_e_per_A2) needs voltage_kV: the exposure filter depends on it")
    n, ny, nx = images.shape
    device = images.device
    py, px = fast_fft_size(math.ceil(1.5 * ny)), fast_fft_size(math.ceil(1.5 * nx))
    ky = torch.fft.fftfreq(py, device=device, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(px, device=device, dtype=torch.float64)[None, :]
    axis = torch.as_tensor(tilt_axis_angle_deg, dtype=torch.float64, device=device).reshape(-1).expand(n)
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64, device=device).reshape(-1).expand(n)
    out = torch.empty((n, ny, nx), dtype=torch.float32, device=device)
    k_abs_A = torch.sqrt(kx * kx + ky * ky) / pixel_size_A
    for i in range(n):
        a = math.radians(float(axis[i]))
        k_perp = kx * math.cos(a) + ky * math.sin(a)  # frequency across the tilt axis
        weight = radial_weighting(k_perp, radial_cutoff, radial_falloff)
        weight = weight * sirt_like_factor(k_perp, sirt_like_iterations, float(thickness_px))
        if pre_exposure_e_per_A2 is not None:
            weight = weight * exposure_filter(k_abs_A, float(pre_exposure_e_per_A2[i]), voltage_kV).to(torch.float64)
        image = images[i].to(torch.float64)
        image = image - image.mean()
        padded = torch.zeros((py, px), dtype=torch.float64, device=device)
        padded[:ny, :nx] = image
        spectrum = torch.fft.rfft2(padded)
        if ctf is not None:
            spectrum = _phase_flip_view(spectrum, (py, px), (ny, nx), i, float(axis[i]), float(tilts[i]),
                                        pixel_size_A, ctf, None if shifts_px is None else shifts_px[i])
        filtered = torch.fft.irfft2(spectrum * weight, s=(py, px))
        out[i] = filtered[:ny, :nx].to(torch.float32)
    return out


def _phase_flip_view(spectrum, padded_shape, shape, i, axis_deg, tilt_deg, pixel_size_A, ctf: CtfParams, shift_px):
    """Phase-flip one view: at its centre defocus, or in strips parallel to the tilt axis (Δf from
    the depth z_P = -tan(tilt)·x_aligned of the specimen mid-plane, RELION ``rlnTomoHand``)."""
    py, px = padded_shape
    ny, nx = shape
    device = spectrum.device
    phases = torch.as_tensor(ctf.phase_shift_deg, dtype=torch.float64).reshape(-1)
    phase_deg = float(phases[i] if phases.numel() > 1 else phases[0])

    def flipped(delta_A: float) -> torch.Tensor:
        c = ctf_2d((py, px), torch.tensor(pixel_size_A, dtype=torch.float64, device=device),
                   float(ctf.defocus_u_A[i]) + delta_A, float(ctf.defocus_v_A[i]) + delta_A,
                   float(ctf.defocus_angle_deg[i]), ctf.voltage_kV, ctf.spherical_aberration_mm,
                   ctf.amplitude_contrast, phase_deg)
        return phase_flip(spectrum, c)

    if ctf.strip_width_px <= 0 or abs(tilt_deg) < 1e-6:
        return flipped(0.0)
    # aligned x of every pixel: R2(-axis)·(pixel - centre - shift), x component
    a = math.radians(axis_deg)
    sx, sy = (0.0, 0.0) if shift_px is None else (float(shift_px[0]), float(shift_px[1]))
    yy = torch.arange(py, device=device, dtype=torch.float64)[:, None] - ny // 2 - sy
    xx = torch.arange(px, device=device, dtype=torch.float64)[None, :] - nx // 2 - sx
    x_aligned = math.cos(a) * xx + math.sin(a) * yy
    strip = torch.round(x_aligned / ctf.strip_width_px)
    out = torch.zeros((py, px), dtype=torch.float64, device=device)
    for s in torch.unique(strip[:ny, :nx]).tolist():
        centre_x_A = s * ctf.strip_width_px * pixel_size_A
        depth_A = -math.tan(math.radians(tilt_deg)) * centre_x_A
        delta = float(defocus_with_handedness(0.0, depth_A, ctf.defocus_hand))
        part = torch.fft.irfft2(flipped(delta), s=(py, px))
        out = torch.where(strip == s, part, out)
    return torch.fft.rfft2(out)


# ----------------------------------------------------------------------------- geometry
def volume_shape_for(image_size_px, tilt_axis_angle_deg: float, params: ReconstructionParams) -> tuple[int, int, int]:
    """Output ``(nz, ny, nx)``: thickness; the image extent along the tilt axis; ``width_px`` or
    the extent across it (nx and ny of the images swap when the axis is nearer to x than to y)."""
    nx_img, ny_img = (int(v) for v in image_size_px)
    a = math.radians(float(tilt_axis_angle_deg))
    along, across = (nx_img, ny_img) if abs(math.sin(a)) > abs(math.cos(a)) else (ny_img, nx_img)
    width = int(params.width_px) or across
    return int(params.thickness_px), along, width


def projection_matrices(rot_z_deg, rot_y_deg, rot_x_deg, shifts_A, pixel_size_A: float, magnification=None,
                        params: ReconstructionParams = ReconstructionParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view ``(M [n, 2, 3], t [n, 2])`` with ``x_img - N//2 = M·p + t`` in pixels.

    ``M = magnification · rows 0-1 of Rz(rot_z + axis offset)·Ry(rot_y + angle offset)·Rx(rot_x)``;
    ``t = shift_A / pixel_size_A``. float64.
    """
    rot_z = torch.as_tensor(rot_z_deg, dtype=torch.float64).reshape(-1) + params.tilt_axis_offset_deg
    rot_y = torch.as_tensor(rot_y_deg, dtype=torch.float64).reshape(-1) + params.tilt_angle_offset_deg
    rot_x = torch.as_tensor(rot_x_deg, dtype=torch.float64).reshape(-1)
    r = projection_rotations(rot_z, rot_y, rot_x)
    n = r.shape[0]
    mag = torch.ones(n, dtype=torch.float64) if magnification is None else \
        torch.as_tensor(magnification, dtype=torch.float64).reshape(-1).expand(n)
    if bool((mag <= 0).any()) or not bool(torch.isfinite(mag).all()):
        raise ValueError(f"magnification must be positive and finite, got {mag.tolist()}")
    shifts = torch.as_tensor(shifts_A, dtype=torch.float64).reshape(-1, 2).expand(n, 2)
    return r[:, :2, :] * mag[:, None, None], shifts / float(pixel_size_A)


def _auto_slab_rows(n_views: int, nz_fine: int, nx_fine: int, budget: int, compiled: bool = False) -> int:
    if compiled:  # the slab itself and the spectra of its Fourier crop
        per_row = nz_fine * nx_fine * 4 * 6
    else:
        per_row = max(1, n_views) * nz_fine * nx_fine * 4 * 4  # samples + (x, y) grid, float32, and slack
    return max(1, budget // per_row)


#: the padding (pixels of zeros) around each view for the compiled kernel; samples whose
#: bilinear footprint can touch the image lie in (-1, N); the kernel visits (-1.5, N + 0.5)
_PAD = 2
_NUMBA_LOCK = threading.Lock()  # the workqueue layer must not be entered by two threads at once

if HAVE_NUMBA:

    @numba.njit(inline="always")
    def _inside_range(c0, step, lo, hi, count):  # pragma: no cover - compiled
        """``[a, b)``: the indices i < count with ``lo < c0 + step·i < hi`` (float64)."""
        if step == 0.0:
            if lo < c0 < hi:
                return 0, count
            return 0, 0
        ia = (lo - c0) / step
        ib = (hi - c0) / step
        if ia > ib:
            ia, ib = ib, ia
        # clip before converting to int: a tiny step (an axis at 90°) puts ia, ib beyond int64
        ia = min(max(ia, -1.0), count + 1.0)
        ib = min(max(ib, -1.0), count + 1.0)
        a = max(0, int(math.floor(ia)))
        b = min(count, int(math.ceil(ib)) + 1)
        while a < b and not (lo < c0 + step * a < hi):
            a += 1
        while b > a and not (lo < c0 + step * (b - 1) < hi):
            b -= 1
        return a, b

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _backproject_numba(padded, padded_t, transposed, m, t, x0, dx, ys, zs, out):  # pragma: no cover - compiled
        """``out[z, y, x] += Σ_k bilinear(view k, M_k·(x0 + dx·ix, ys[y], zs[z]) + t_k)``.

        ``padded`` [n, H + 2·PAD, W + 2·PAD] float32 with zero borders and ``padded_t`` the same
        transposed ([n, W', H']); ``t`` already holds the image centre and PAD. Views with
        ``transposed[k]`` are read from ``padded_t`` (when a step along the output x moves mostly
        along the image's y, the transposed copy keeps the reads in consecutive memory). For
        every output row and view only the run of x whose sample lies in (0.5, size - 1.5) of the
        padded image is visited (the rest sample zeros), so every read is in bounds; the inner
        loop is float32 with unsigned indices.
        """
        n, h2, w2 = padded.shape
        nz, ny, nx = out.shape
        flat = padded.reshape(n, h2 * w2)
        flat_t = padded_t.reshape(padded_t.shape[0], h2 * w2)
        one = np.uint64(1)
        for iz in numba.prange(nz):
            z = zs[iz]
            for iy in range(ny):
                y = ys[iy]
                row = out[iz, iy]
                for k in range(n):
                    du = m[k, 0, 0] * dx
                    dv = m[k, 1, 0] * dx
                    u0 = m[k, 0, 0] * x0 + m[k, 0, 1] * y + m[k, 0, 2] * z + t[k, 0]
                    v0 = m[k, 1, 0] * x0 + m[k, 1, 1] * y + m[k, 1, 2] * z + t[k, 1]
                    if transposed[k]:  # fast axis = image y
                        image = flat_t[transposed[k] - 1]
                        f0, df, s0, ds, nf, ns = v0, dv, u0, du, h2, w2
                    else:
                        image = flat[k]
                        f0, df, s0, ds, nf, ns = u0, du, v0, dv, w2, h2
                    fa, fb = _inside_range(f0, df, 0.5, nf - 1.5, nx)
                    sa, sb = _inside_range(s0, ds, 0.5, ns - 1.5, nx)
                    lo = max(fa, sa)
                    hi = min(fb, sb)
                    stride = np.uint64(nf)
                    f0f, dff, s0f, dsf = np.float32(f0), np.float32(df), np.float32(s0), np.float32(ds)
                    for ix in range(lo, hi):
                        f = f0f + dff * np.float32(ix)
                        sl = s0f + dsf * np.float32(ix)
                        # unsigned indices (f, sl > 0 here): no negative-index wrap-around code
                        i_f = np.uint64(f)
                        i_s = np.uint64(sl)
                        wf = f - np.float32(i_f)
                        ws = sl - np.float32(i_s)
                        base = i_s * stride + i_f
                        p00 = image[base]
                        p01 = image[base + one]
                        p10 = image[base + stride]
                        p11 = image[base + stride + one]
                        near = p00 + wf * (p01 - p00)
                        far = p10 + wf * (p11 - p10)
                        row[ix] += near + ws * (far - near)

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _backproject_rows_numba(padded, m, t, x0, dx, ys, zs, out):  # pragma: no cover - compiled
        """:func:`_backproject_numba` for views whose image row depends on the volume's y only
        (``M[k, 1, 0] = M[k, 1, 2] = 0``: an aligned stack, tilt axis along the image's y, no
        x-tilt): the two image rows around each (y, view) are blended once into a line, and every
        sample is then a linear interpolation along that line (the same bilinear value)."""
        n, h2, w2 = padded.shape
        nz, ny, nx = out.shape
        lines = np.zeros((ny, n, w2), dtype=np.float32)
        for iy in numba.prange(ny):
            for k in range(n):
                v = m[k, 1, 1] * ys[iy] + t[k, 1]
                if 0.5 < v < h2 - 1.5:
                    iv = int(v)
                    wv = np.float32(v - iv)
                    for j in range(w2):
                        lines[iy, k, j] = padded[k, iv, j] + wv * (padded[k, iv + 1, j] - padded[k, iv, j])
        one = np.uint64(1)
        for iz in numba.prange(nz):
            z = zs[iz]
            for iy in range(ny):
                y = ys[iy]
                row = out[iz, iy]
                for k in range(n):
                    line = lines[iy, k]
                    du = m[k, 0, 0] * dx
                    u0 = m[k, 0, 0] * x0 + m[k, 0, 1] * y + m[k, 0, 2] * z + t[k, 0]
                    lo, hi = _inside_range(u0, du, 0.5, w2 - 1.5, nx)
                    u0f, duf = np.float32(u0), np.float32(du)
                    for ix in range(lo, hi):
                        u = u0f + duf * np.float32(ix)
                        iu = np.uint64(u)
                        wu = u - np.float32(iu)
                        a = line[iu]
                        row[ix] += a + wu * (line[iu + one] - a)


    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _sample_lines_numba(fine, base, step_y, step_j, ys, out):  # pragma: no cover - compiled
        """``out[j, y] = bilinear(fine, base + ys[y]·step_y + j·step_j)`` ((x, y) positions in
        pixels of ``fine``; zeros outside it, as ``grid_sample`` with ``padding_mode="zeros"``)."""
        h, w = fine.shape
        length, ny = out.shape
        for j in numba.prange(length):
            for iy in range(ny):
                x = base[0] + ys[iy] * step_y[0] + j * step_j[0]
                y = base[1] + ys[iy] * step_y[1] + j * step_j[1]
                xf, yf = math.floor(x), math.floor(y)
                wx, wy = x - xf, y - yf
                ix, iy0 = int(xf), int(yf)
                value = 0.0
                if 0 <= iy0 < h:
                    if 0 <= ix < w:
                        value += (1.0 - wy) * (1.0 - wx) * fine[iy0, ix]
                    if 0 <= ix + 1 < w:
                        value += (1.0 - wy) * wx * fine[iy0, ix + 1]
                if 0 <= iy0 + 1 < h:
                    if 0 <= ix < w:
                        value += wy * (1.0 - wx) * fine[iy0 + 1, ix]
                    if 0 <= ix + 1 < w:
                        value += wy * wx * fine[iy0 + 1, ix + 1]
                out[j, iy] = value

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _backproject_lines_numba(lines, row0, cx, cz, a0, s, x0, dx, zs, out_t):  # pragma: no cover - compiled
        """``out_t[z, x, r] += Σ_k lerp_u(lines[k, :, row0 + r])`` at ``u = s·(cx_k·(x0 + dx·x) +
        cz_k·zs[z] - a0_k)`` (:func:`_view_lines`): for a voxel column (z, x) and a view, u and its
        weight are the same for every row, so the inner loop runs along the rows over consecutive
        memory (``lines [n, L, ny]``, ``out_t [nz, nx, rows]``: y last) and vectorises."""
        n, length, _ = lines.shape
        nz, nx, rows = out_t.shape
        for iz in numba.prange(nz):
            for k in range(n):
                u0 = s * (cx[k] * x0 + cz[k] * zs[iz] - a0[k])
                du = s * cx[k] * dx
                lo, hi = _inside_range(u0, du, 0.0, length - 1.0, nx)
                for ix in range(lo, hi):
                    u = u0 + du * ix
                    iu = int(u)
                    wu = np.float32(u - iu)
                    near = lines[k, iu, row0:row0 + rows]
                    far = lines[k, iu + 1, row0:row0 + rows]
                    column = out_t[iz, ix]
                    for r in range(rows):
                        column[r] += near[r] + wu * (far[r] - near[r])

# ----------------------------------------------------------------------------- super-sampling by lines
def _line_directions(m: torch.Tensor) -> torch.Tensor | None:
    """Per view the unit image direction ``e`` [n, 2] along which both the volume's x and z move
    (``M[:, :, 0]`` parallel to ``M[:, :, 2]``: no x-tilt), or None when a view has no such line."""
    mx, mz = m[:, :, 0], m[:, :, 2]
    if bool(((mx[:, 0] * mz[:, 1] - mx[:, 1] * mz[:, 0]).abs() > 1e-9).any()):
        return None
    longer = torch.where((mx.norm(dim=1) >= mz.norm(dim=1))[:, None], mx, mz)
    return longer / longer.norm(dim=1, keepdim=True)


def _upsampled_views(views: torch.Tensor, s: int, e: torch.Tensor) -> torch.Tensor:
    """The views ``[k, ny, nx]`` on an ``s`` times finer grid (band-limited: spectra zero-padded;
    fine pixel i is view pixel i/s), times the compensation that gives the lines of
    :func:`_view_lines` the transfer of bilinear reads of the view itself (what a fine-grid back
    projection sees): ``sinc²(k_x)·sinc²(k_y) / (sinc²(k_x/s)·sinc²(k_y/s)·sinc²(k·e/s))`` (the
    bilinear reads of the fine view and the linear interpolation along the line at spacing 1/s
    divided out). ``e [k, 2]``: the views' line directions."""
    k, ny, nx = views.shape
    py, px = fast_fft_size(ny + 8, even=True), fast_fft_size(nx + 8, even=True)
    ky = torch.fft.fftfreq(py, dtype=torch.float64, device=views.device)[None, :, None]
    kx = torch.fft.rfftfreq(px, dtype=torch.float64, device=views.device)[None, None, :]
    t = lambda q: torch.sinc(q) ** 2  # noqa: E731  (bilinear / linear interpolation's transfer)
    along_e = (kx * e[:, 0, None, None] + ky * e[:, 1, None, None]) / s
    compensation = (t(kx) * t(ky) / (t(kx / s) * t(ky / s) * t(along_e))).to(torch.float32)
    spectrum = torch.fft.rfft2(views.to(torch.float32), s=(py, px)) * compensation
    spectrum[:, py // 2] *= 0.5  # the Nyquist row and column: half at +N/2, half at -N/2
    spectrum[:, :, px // 2] *= 0.5
    fine = torch.zeros((k, s * py, s * px // 2 + 1), dtype=spectrum.dtype, device=views.device)
    fine[:, :py // 2 + 1, :px // 2 + 1] = spectrum[:, :py // 2 + 1]
    fine[:, s * py - py // 2:, :px // 2 + 1] = spectrum[:, py // 2:]
    return torch.fft.irfft2(fine, s=(s * py, s * px)).mul_(s * s)


def _view_lines(filtered, m, t, e, xs, zs, ys, s: int, compiled: bool, memory_budget_bytes: int):
    """Per view its line through every volume row, sampled at spacing 1/s pixel: ``lines [n, L,
    ny]`` (float32, y last) and per view ``cx, cz, a0`` [n]: voxel (x, y, z) lies on line y at
    sample ``s·(cx·x + cz·z - a0)`` (``cx, cz``: M's x and z columns along ``e``).

    Sample j of line y of view k is at ``N//2 + t + y·M[:, 1] + (a0 + j/s)·e`` in the view, read
    bilinearly from :func:`_upsampled_views` (numba or ``grid_sample``, zeros outside; views
    upsampled in chunks within ``memory_budget_bytes``); two zero samples pad both ends. Memory:
    ``n·ny·L·4`` bytes, L ≈ s·(width·|cos| + thickness·|sin|)."""
    n, ny_img, nx_img = filtered.shape
    device = filtered.device
    cx = (m[:, :, 0] * e).sum(1)
    cz = (m[:, :, 2] * e).sum(1)
    corners = torch.stack([cx * x + cz * z for x in (xs[0], xs[-1]) for z in (zs[0], zs[-1])])
    a0 = corners.amin(0) - 2.0 / s
    length = int(math.ceil(float((corners.amax(0) - corners.amin(0)).max()) * s)) + 5
    lines = torch.empty((n, length, len(ys)), dtype=torch.float32, device=device)
    centre = torch.tensor([nx_img // 2, ny_img // 2], dtype=torch.float64, device=device)
    j = torch.arange(length, device=device, dtype=torch.float64)
    fine_bytes = 12 * s * s * (ny_img + 16) * (nx_img + 16)  # a fine view, its spectrum and slack
    chunk = max(1, min(n, memory_budget_bytes // fine_bytes))
    for k in range(n):
        if k % chunk == 0:
            fine_views = _upsampled_views(filtered[k:k + chunk], s, e[k:k + chunk])
        fine = fine_views[k % chunk]
        base, step_y, step_j = s * (centre + t[k] + a0[k] * e[k]), s * m[k, :, 1], e[k]
        if compiled:
            _sample_lines_numba(fine.numpy(), base.numpy(), step_y.numpy(), step_j.numpy(), ys.numpy(),
                                lines[k].numpy())
            continue
        points = base + ys[None, :, None] * step_y + j[:, None, None] * step_j  # [L, ny, (x, y)]
        size = torch.tensor([fine.shape[1] - 1, fine.shape[0] - 1], dtype=torch.float64, device=device)
        grid = (2.0 * points / size - 1.0).to(torch.float32)
        lines[k] = F.grid_sample(fine[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                                 align_corners=True)[0, 0]
    return lines, cx, cz, a0


def _iter_line_slabs(filtered, m, t, e, volume_shape, params: ReconstructionParams, compiled: bool):
    """:func:`iter_slabs` for super-sampling s > 1 without x-tilt: every voxel of the output grid
    reads its view's line (:func:`_view_lines`: s times finer, band-limited) by linear
    interpolation. The same main band as back projection on the s-times finer grid followed by
    Fourier cropping, at the cost of the output grid; and without the aliasing of bilinear reads
    along the tilt axis, which a grid finer in x and z only does not remove."""
    n = filtered.shape[0]
    device = filtered.device
    nz, ny, nx = volume_shape
    s = int(params.super_sampling)
    xs = torch.arange(nx, device=device, dtype=torch.float64) - nx // 2 - params.shift_x_px
    zs = torch.arange(nz, device=device, dtype=torch.float64) - nz // 2 - params.shift_z_px
    ys_all = torch.arange(ny, device=device, dtype=torch.float64) - ny // 2
    lines, cx, cz, a0 = _view_lines(filtered, m, t, e, xs, zs, ys_all, s, compiled, params.memory_budget_bytes)
    length = lines.shape[1]
    rows = int(params.slab_rows) or _auto_slab_rows(n, nz, nx, params.memory_budget_bytes, compiled)
    rows = max(1, min(rows, ny))
    chunk = max(1, min(n, params.memory_budget_bytes // max(1, nz * nx * rows * 16)))
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        if compiled:
            acc_t = np.zeros((nz, nx, y1 - y0), dtype=np.float32)
            with _NUMBA_LOCK:
                previous = numba.get_num_threads()
                numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
                try:
                    _backproject_lines_numba(lines.numpy(), y0, cx.numpy(), cz.numpy(), a0.numpy(), float(s),
                                             float(xs[0]), 1.0, zs.numpy(), acc_t)
                finally:
                    numba.set_num_threads(previous)
            acc = torch.from_numpy(acc_t).permute(0, 2, 1).contiguous()
        else:
            acc = torch.zeros((nz, y1 - y0, nx), dtype=torch.float32, device=device)
            gx = 2.0 * torch.arange(y1 - y0, device=device, dtype=torch.float64) / max(y1 - y0 - 1, 1) - 1.0
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                u = s * (cx[c0:c1, None, None] * xs[None, None, :] + cz[c0:c1, None, None] * zs[None, :, None]
                         - a0[c0:c1, None, None])  # [k, nz, nx]
                gy = (2.0 * u / (length - 1) - 1.0)[:, :, None, :].expand(-1, -1, y1 - y0, -1)
                grid = torch.stack([gx[None, None, :, None].expand_as(gy), gy], dim=-1).to(torch.float32)
                sampled = F.grid_sample(lines[c0:c1, None, :, y0:y1], grid.reshape(c1 - c0, nz, -1, 2),
                                        mode="bilinear", padding_mode="zeros", align_corners=True)
                acc += sampled.sum(dim=0)[0].reshape(nz, y1 - y0, nx)
                del grid, sampled
        acc *= math.pi / n
        yield y0, y1, acc

def _use_compiled(device: torch.device, use_compiled: bool | None) -> bool:
    if use_compiled is None:
        return HAVE_NUMBA and device.type == "cpu"
    if use_compiled and not (HAVE_NUMBA and device.type == "cpu"):
        raise ValueError("the compiled back projector needs numba and CPU tensors")
    return bool(use_compiled)


def iter_slabs(
    filtered: torch.Tensor,
    matrices: torch.Tensor,
    translations_px: torch.Tensor,
    volume_shape: tuple[int, int, int],
    params: ReconstructionParams = ReconstructionParams(),
    use_compiled: bool | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Back-project ``filtered`` views slab by slab along y: yields ``(y0, y1, slab [nz, y1-y0, nx])``.

    ``matrices`` / ``translations_px`` from :func:`projection_matrices`; the images' centre is
    ``N//2``. The slab result does not depend on the slab size. ``use_compiled``: None = the
    numba kernel for CPU tensors, torch ``grid_sample`` otherwise; False = torch always (views
    summed in chunks that fit ``params.memory_budget_bytes``).
    """
    n, ny_img, nx_img = filtered.shape
    device = filtered.device
    compiled = _use_compiled(device, use_compiled)
    nz, ny, nx = (int(v) for v in volume_shape)
    s = int(params.super_sampling)
    nz_f, nx_f = nz * s, nx * s
    m = matrices.to(device=device, dtype=torch.float64)
    t = translations_px.to(device=device, dtype=torch.float64)
    e = _line_directions(m) if s > 1 else None
    if e is not None:
        yield from _iter_line_slabs(filtered, m, t, e, (nz, ny, nx), params, compiled)
        return
    rows = int(params.slab_rows) or _auto_slab_rows(n, nz_f, nx_f, params.memory_budget_bytes, compiled)
    rows = max(1, min(rows, ny))
    chunk = max(1, min(n, params.memory_budget_bytes // max(1, nz_f * nx_f * rows * 16)))
    # fine-grid coordinates (voxels of the output grid) of the slice plane; the fine centre
    # (s·N)//2 maps onto N//2 in fourier_crop_bin
    x0 = -(nx_f // 2) / s - params.shift_x_px
    xs = (torch.arange(nx_f, device=device, dtype=torch.float64) - (nx_f // 2)) / s - params.shift_x_px
    zs = (torch.arange(nz_f, device=device, dtype=torch.float64) - (nz_f // 2)) / s - params.shift_z_px
    cx, cy = nx_img // 2, ny_img // 2
    scale = math.pi / n
    if compiled:
        padded = np.zeros((n, ny_img + 2 * _PAD, nx_img + 2 * _PAD), dtype=np.float32)
        padded[:, _PAD:_PAD + ny_img, _PAD:_PAD + nx_img] = filtered.detach().to(torch.float32).numpy()
        # views where a step along the volume's x moves more along the image's y than its x are
        # read from a transposed copy (transposed[k] = 1 + index in that copy; 0: not transposed)
        along_y = (m[:, 1, 0].abs() > m[:, 0, 0].abs()).numpy()
        transposed = np.zeros(n, dtype=np.int64)
        transposed[along_y] = np.arange(1, int(along_y.sum()) + 1)
        padded_t = np.ascontiguousarray(padded[along_y].transpose(0, 2, 1)) if along_y.any() else \
            np.zeros((1, padded.shape[2], padded.shape[1]), dtype=np.float32)
        m_np = m.numpy()
        rows_only = bool((m[:, 1, 0] == 0).all() and (m[:, 1, 2] == 0).all())  # an aligned stack
        t_np = (t + torch.tensor([cx + _PAD, cy + _PAD], dtype=torch.float64)).numpy()
        zs_np = zs.numpy()
    else:
        images = filtered[:, None]  # [n, 1, ny, nx]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        ys = torch.arange(y0, y1, device=device, dtype=torch.float64) - ny // 2
        acc = torch.zeros((nz_f, y1 - y0, nx_f), dtype=torch.float32, device=device)
        if compiled:
            with _NUMBA_LOCK:
                previous = numba.get_num_threads()
                numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
                try:
                    if rows_only:
                        _backproject_rows_numba(padded, m_np, t_np, x0, 1.0 / s, ys.numpy(), zs_np, acc.numpy())
                    else:
                        _backproject_numba(padded, padded_t, transposed, m_np, t_np, x0, 1.0 / s, ys.numpy(),
                                           zs_np, acc.numpy())
                finally:
                    numba.set_num_threads(previous)
        else:
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                mc, tc = m[c0:c1], t[c0:c1]

                # image position (pixels) of every fine voxel, per view: [k, nz_f, rows, nx_f]
                def coord(row: int, centre: int, size: int) -> torch.Tensor:
                    v = (mc[:, row, 0, None, None, None] * xs[None, None, None, :]
                         + mc[:, row, 1, None, None, None] * ys[None, None, :, None]
                         + mc[:, row, 2, None, None, None] * zs[None, :, None, None]
                         + (tc[:, row] + centre)[:, None, None, None])
                    return (2.0 * v / max(size - 1, 1) - 1.0).to(torch.float32)

                grid = torch.stack([coord(0, cx, nx_img), coord(1, cy, ny_img)], dim=-1)
                k = c1 - c0
                grid = grid.reshape(k, nz_f, (y1 - y0) * nx_f, 2)
                sampled = F.grid_sample(images[c0:c1], grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=True)
                acc += sampled.sum(dim=0)[0].reshape(nz_f, y1 - y0, nx_f)
                del grid, sampled
        acc *= scale
        if s > 1:  # [z, y, x] -> [y, z, x], crop (z, x), back
            acc = fourier_crop_bin(acc.permute(1, 0, 2), s, ndim=2).permute(1, 0, 2).contiguous()
        yield y0, y1, acc


def reconstruct_volume(
    images: torch.Tensor,
    rot_z_deg,
    rot_y_deg,
    rot_x_deg,
    shifts_A,
    pixel_size_A: float,
    params: ReconstructionParams = ReconstructionParams(),
    magnification=None,
    pre_exposure_e_per_A2=None,
    voltage_kV: float | None = None,
    ctf: CtfParams | None = None,
    use_compiled: bool | None = None,
) -> torch.Tensor:
    """Whole tomogram ``[nz, ny, nx]`` (float32, on the images' device) from views ``[n, ny, nx]``.

    One value per view for the angles (degrees), ``shifts_A [n, 2]`` (RELION 5 specimen shifts),
    ``magnification`` and ``pre_exposure_e_per_A2`` (dose weighting when given, with
    ``voltage_kV``). For volumes
    that do not fit in memory use :func:`filter_tilt_images` and :func:`iter_slabs`
    (``use_compiled``: see there).
    """
    if images.ndim != 3 or images.shape[0] < 1:
        raise ValueError(f"reconstruct_volume: images must be [n, ny, nx] with n >= 1, got {tuple(images.shape)}")
    n = images.shape[0]
    rot_z = torch.as_tensor(rot_z_deg, dtype=torch.float64).reshape(-1).expand(n)
    rot_y = torch.as_tensor(rot_y_deg, dtype=torch.float64).reshape(-1).expand(n)
    m, t = projection_matrices(rot_z, rot_y, rot_x_deg, shifts_A, pixel_size_A, magnification, params)
    shape = volume_shape_for((images.shape[2], images.shape[1]), float(rot_z.mean()) + params.tilt_axis_offset_deg,
                             params)
    pre = (None if pre_exposure_e_per_A2 is None
           else torch.as_tensor(pre_exposure_e_per_A2, dtype=torch.float64).reshape(-1))
    filtered = filter_tilt_images(images, rot_z + params.tilt_axis_offset_deg, rot_y + params.tilt_angle_offset_deg,
                                  pixel_size_A, params.thickness_px, params.radial_cutoff, params.radial_falloff,
                                  params.sirt_like_iterations, pre, voltage_kV, ctf, t)
    volume = torch.empty(shape, dtype=torch.float32, device=images.device)
    for y0, y1, slab in iter_slabs(filtered, m, t, shape, params, use_compiled):
        volume[:, y0:y1] = slab
    return volume
