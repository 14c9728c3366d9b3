"""Beam-induced motion of movie frames: estimation (global + local) and the aligned, dose-weighted sum.

Conventions
- A movie is ``[frames, y, x]`` (already multiplied by the gain), float32, any device.
- Shift vectors are ``(x, y)`` in Å. A shift is the **displacement of the frame's content**: a
  feature at position ``r`` in the reference appears at ``r + shift`` in the frame, so the frame
  is aligned by sampling it at ``r + shift`` (i.e. moving it by ``-shift``).
- Shifts are relative to the **mean position over the frames** (every trajectory sums to zero
  over frames), so the aligned sum sits where the unaligned sum's centre of mass sits.
- Frame time ``t = f / (n_frames - 1)`` in [0, 1]. The temporal model is a clamped uniform
  B-spline of degree ``min(3, n_control - 1)`` with ``n_control`` control points over t
  (1: constant, 2: linear, 3: quadratic, 4: cubic, more: a cubic spline with interior knots).
- Local motion (grid X x Y > 1) is a residual displacement field on top of the global
  trajectory: a tensor-product B-spline over (t, y, x) whose spatial control points span the
  rectangle of the patch centres it was measured at (``MotionModel.local_extent_px``; the field
  continues linearly outside it).

Method (global): pixels that are outliers in the sum of the frames (hot pixels: a fixed pattern
that would pull every frame towards zero shift) and in single frames (X-ray hits) are replaced by
the mean, edges tapered, frames Fourier-cropped to the fit resolution (estimation only). The
cross-power spectra are weighted by a band ``fit_resolution_min_A .. fit_resolution_max_A`` and a
B-factor ``exp(B k² / 4)`` (Warp's sign: a negative B damps high frequencies).
1. Start: a constant drift from the displacement between the sums of the first and second half
   of the frames (zero when that correlation peak is not significant, > 6 SD).
2. Iterate: every frame is cross-correlated with the sum of all other frames (leave-one-out: no
   self-correlation of noise); the sub-pixel peak (parabolic fit) within a small step gives a
   per-frame correction; the trajectory is projected onto the temporal model (least squares);
   until it stops changing.
3. Significance: if the half sums did not correlate significantly, or the trajectory is within
   the noise of its per-frame measurements (chi-square, 95 %), the frames are kept still
   (``MotionModel.significant = False``): no motion is better than a noise trajectory.
Local: the same on overlapping patches of the globally aligned frames (kept off the frame edges),
a least-squares fit of the field to the patch trajectories, dropped when not significant at ~3 SD
and otherwise shrunk James-Stein style, so that patch noise does not become a deformation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import critical_exposure_e_per_A2, fourier_crop_bin, fourier_crop_shape
from tomopipe.algorithms.fourier import (
    cosine_edge_taper,
    crop_rfft2,
    fourier_shift_2d,
    frequencies_rfft2_px,
    phase_ramp_2d,
)
from tomopipe.algorithms.peaks import parabolic_offset

__all__ = [
    "MotionModel",
    "frame_times",
    "bspline_basis",
    "apply_gain",
    "estimate_motion",
    "align_and_sum",
    "frame_dose_e_per_A2",
    "fourier_shift_2d",
]

_TWO_PI = 2.0 * math.pi
# a correlation peak this many SDs above the mean of the searched disc is signal, not noise (the
# largest of a few thousand noise values is ~4 SD)
_MIN_PEAK_SIGNIFICANCE = 6.0


# ----------------------------------------------------------------------------------------------
# temporal and spatial basis
# ----------------------------------------------------------------------------------------------

def frame_times(n_frames: int, device=None) -> torch.Tensor:
    """Normalised frame times ``f / (n_frames - 1)`` in [0, 1] (float64); ``[0.]`` for one frame."""
    if n_frames < 1:
        raise ValueError(f"frame_times: n_frames must be >= 1, got {n_frames}")
    if n_frames == 1:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.arange(n_frames, dtype=torch.float64, device=device) / (n_frames - 1)


def bspline_basis(positions: torch.Tensor, n_control: int) -> torch.Tensor:
    """Clamped uniform B-spline basis ``[len(positions), n_control]`` (float64) at positions in [0, 1].

    Degree ``min(3, n_control - 1)``; rows sum to 1 (partition of unity); the curve passes
    through the first and last control points at 0 and 1.
    """
    if n_control < 1:
        raise ValueError(f"bspline_basis: n_control must be >= 1, got {n_control}")
    t = torch.as_tensor(positions, dtype=torch.float64).reshape(-1).clamp(0.0, 1.0)
    if n_control == 1:
        return torch.ones(t.numel(), 1, dtype=torch.float64, device=t.device)
    p = min(3, n_control - 1)
    n_interior = n_control - p - 1
    interior = torch.linspace(0.0, 1.0, n_interior + 2, dtype=torch.float64, device=t.device)[1:-1]
    knots = torch.cat([torch.zeros(p + 1, dtype=torch.float64, device=t.device), interior,
                       torch.ones(p + 1, dtype=torch.float64, device=t.device)])
    n_intervals = knots.numel() - 1
    basis = ((t[:, None] >= knots[None, :-1]) & (t[:, None] < knots[None, 1:])).to(torch.float64)
    basis[t >= 1.0, :] = 0.0
    basis[t >= 1.0, n_control - 1] = 1.0  # the last non-empty interval owns t = 1
    for degree in range(1, p + 1):
        new = torch.zeros(t.numel(), n_intervals - degree, dtype=torch.float64, device=t.device)
        for i in range(n_intervals - degree):
            left_den = float(knots[i + degree] - knots[i])
            right_den = float(knots[i + degree + 1] - knots[i + 1])
            if left_den > 0:
                new[:, i] += (t - knots[i]) / left_den * basis[:, i]
            if right_den > 0:
                new[:, i] += (knots[i + degree + 1] - t) / right_den * basis[:, i + 1]
        basis = new
    return basis[:, :n_control]


def _bspline_basis_extended(positions: torch.Tensor, n_control: int) -> torch.Tensor:
    """:func:`bspline_basis` inside [0, 1], continued linearly (value and slope at the end) outside."""
    u = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
    inside = u.clamp(0.0, 1.0)
    basis = bspline_basis(inside, n_control)
    if n_control == 1 or bool(((u >= 0) & (u <= 1)).all()):
        return basis
    eps = 1e-6
    ends = torch.tensor([0.0, eps, 1.0 - eps, 1.0], dtype=torch.float64, device=u.device)
    at = bspline_basis(ends, n_control)
    slope_start, slope_end = (at[1] - at[0]) / eps, (at[3] - at[2]) / eps
    below, above = (u < 0)[:, None], (u > 1)[:, None]
    basis = basis + torch.where(below, u[:, None] * slope_start, 0.0)
    return basis + torch.where(above, (u - 1.0)[:, None] * slope_end, 0.0)


# ----------------------------------------------------------------------------------------------
# the motion model
# ----------------------------------------------------------------------------------------------

@dataclass
class MotionModel:
    """Estimated motion of one movie (see the module docstring for the conventions).

    ``shifts_A`` ``[frames, 2]`` (x, y): the smooth global trajectory, mean zero over frames.
    ``raw_shifts_A`` ``[frames, 2]``: the per-frame measurement before the temporal model.
    ``local_control_A`` ``[temporal, grid_y, grid_x, 2]`` (x, y) or None: the residual local field.
    ``local_extent_px`` (y_first, y_last, x_first, x_last): the pixel rectangle the field's spatial
    B-spline spans (the patch centres it was measured at; None: the whole image); outside it the
    field continues linearly (value and slope at its edge).
    ``image_size_px`` (ny, nx) and ``pixel_size_A`` of the movie the model was estimated on.
    ``significant``: False when the data held no significant evidence of motion (then
    ``shifts_A`` is zero and ``raw_shifts_A`` keeps the measurement for diagnosis).
    """

    shifts_A: torch.Tensor
    raw_shifts_A: torch.Tensor
    image_size_px: tuple[int, int]
    pixel_size_A: float
    temporal: int
    local_control_A: torch.Tensor | None = None
    local_extent_px: tuple[float, float, float, float] | None = None
    iterations: int = 0
    alignment_pixel_size_A: float = 0.0
    significant: bool = True

    def _spatial_coordinates(self, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel rows/columns -> the field's normalised coordinates (0 and 1 at the extent's edges)."""
        ny, nx = self.image_size_px
        y0, y1, x0, x1 = self.local_extent_px or (0.0, ny - 1.0, 0.0, nx - 1.0)
        u = (y - y0) / (y1 - y0) if y1 > y0 else torch.zeros_like(y)
        v = (x - x0) / (x1 - x0) if x1 > x0 else torch.zeros_like(x)
        return u, v

    @property
    def n_frames(self) -> int:
        return int(self.shifts_A.shape[0])

    @property
    def grid(self) -> tuple[int, int, int]:
        """(x, y, temporal) of the model, as the seed names the motion grid."""
        if self.local_control_A is None:
            return (1, 1, self.temporal)
        t, gy, gx, _ = self.local_control_A.shape
        return (gx, gy, t)

    def local_field_A(self, frame: int, positions_yx_px: torch.Tensor | None = None) -> torch.Tensor | None:
        """Residual local displacement (x, y) in Å of ``frame``: ``[ny, nx, 2]`` on the full pixel
        grid, or ``[n, 2]`` at ``positions_yx_px`` ``[n, 2]`` (row, column). None without a local model."""
        if self.local_control_A is None:
            return None
        control = self.local_control_A.to(torch.float64)
        device = control.device
        ny, nx = self.image_size_px
        t = frame_times(self.n_frames, device)[frame:frame + 1]
        bt = bspline_basis(t, control.shape[0])[0]  # [T]
        at_time = torch.einsum("t,tyxc->yxc", bt, control)  # [gy, gx, 2]
        if positions_yx_px is None:  # separable: [ny, gy] @ [gy, gx] @ [gx, nx] per component, in float32
            u, v = self._spatial_coordinates(torch.arange(ny, dtype=torch.float64, device=device),
                                             torch.arange(nx, dtype=torch.float64, device=device))
            by = _bspline_basis_extended(u, control.shape[1]).float()
            bx = _bspline_basis_extended(v, control.shape[2]).float()
            return torch.einsum("yb,bcd,xc->yxd", by, at_time.float(), bx)
        pos = torch.as_tensor(positions_yx_px, dtype=torch.float64, device=device).reshape(-1, 2)
        u, v = self._spatial_coordinates(pos[:, 0], pos[:, 1])
        field = torch.einsum("nb,bcd,nc->nd", _bspline_basis_extended(u, control.shape[1]), at_time,
                             _bspline_basis_extended(v, control.shape[2]))
        return field.to(torch.float32)

    def shifts_at_A(self, positions_yx_px: torch.Tensor) -> torch.Tensor:
        """Total displacement (global + local) in Å, ``[frames, n, 2]`` (x, y), at ``[n, 2]`` (row, column)."""
        pos = torch.as_tensor(positions_yx_px, dtype=torch.float32).reshape(-1, 2)
        total = self.shifts_A.to(torch.float32).cpu()[:, None, :].expand(-1, pos.shape[0], -1).clone()
        if self.local_control_A is not None:
            for f in range(self.n_frames):
                total[f] += self.local_field_A(f, pos.to(self.local_control_A.device)).cpu()
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (lists of floats), read back by :meth:`from_dict`."""
        return {
            "convention": "content displacement of each frame, (x, y) in A, relative to the mean over frames",
            "image_size_px": [int(self.image_size_px[0]), int(self.image_size_px[1])],
            "pixel_size_A": float(self.pixel_size_A),
            "temporal": int(self.temporal),
            "iterations": int(self.iterations),
            "alignment_pixel_size_A": float(self.alignment_pixel_size_A),
            "significant": bool(self.significant),
            "shifts_A": self.shifts_A.detach().cpu().double().tolist(),
            "raw_shifts_A": self.raw_shifts_A.detach().cpu().double().tolist(),
            "local_control_A": None if self.local_control_A is None
            else self.local_control_A.detach().cpu().double().tolist(),
            "local_extent_px": None if self.local_extent_px is None else [float(v) for v in self.local_extent_px],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MotionModel":
        local = data.get("local_control_A")
        return cls(
            shifts_A=torch.tensor(data["shifts_A"], dtype=torch.float32),
            raw_shifts_A=torch.tensor(data["raw_shifts_A"], dtype=torch.float32),
            image_size_px=tuple(data["image_size_px"]),
            pixel_size_A=float(data["pixel_size_A"]),
            temporal=int(data["temporal"]),
            local_control_A=None if local is None else torch.tensor(local, dtype=torch.float32),
            local_extent_px=None if data.get("local_extent_px") is None else tuple(data["local_extent_px"]),
            iterations=int(data.get("iterations", 0)),
            alignment_pixel_size_A=float(data.get("alignment_pixel_size_A", 0.0)),
            significant=bool(data.get("significant", True)),
        )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _check_movie(movie: torch.Tensor, what: str) -> None:
    if not isinstance(movie, torch.Tensor):
        raise TypeError(f"{what}: movie must be a torch.Tensor [frames, y, x], got {type(movie).__name__}")
    if movie.ndim != 3:
        raise ValueError(f"{what}: movie must be [frames, y, x], got shape {tuple(movie.shape)}")
    if movie.shape[0] < 2:
        raise ValueError(f"{what}: the movie has {movie.shape[0]} frame; motion correction needs at least 2 frames")
    if min(movie.shape[1:]) < 16:
        raise ValueError(f"{what}: frames of {movie.shape[2]} x {movie.shape[1]} px are too small (16 px minimum)")


def apply_gain(movie: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """``movie * gain`` as float32 (the gain multiplies every frame); checks that the sizes match."""
    movie = torch.as_tensor(movie)
    if movie.ndim != 3:
        raise ValueError(f"apply_gain: movie must be [frames, y, x], got shape {tuple(movie.shape)}")
    movie = movie.to(torch.float32)
    if gain is None:
        return movie
    gain = torch.as_tensor(gain, dtype=torch.float32, device=movie.device)
    if gain.ndim != 2 or tuple(gain.shape) != tuple(movie.shape[1:]):
        raise ValueError(f"gain is {gain.shape[-1]} x {gain.shape[-2] if gain.ndim > 1 else 1} px but the frames are "
                         f"{movie.shape[2]} x {movie.shape[1]} px (x by y); "
                         "flip/transpose the gain or use the right one")
    return movie * gain


def _edge_taper(shape: tuple[int, int], width_px: float, device) -> torch.Tensor:
    """Raised-cosine edge taper [h, w] of ``width_px`` (at least 1, at most a quarter of the axis)."""
    return cosine_edge_taper(shape, max(1, int(width_px)), max_edge_fraction=0.25, device=device)


def _fixed_pattern_mask(movie: torch.Tensor, n_sigma: float = 6.0) -> torch.Tensor:
    """Pixels that are too bright in the sum of all frames ``[y, x]`` (bool): hot pixels and other
    fixed-pattern defects, which would pull every frame towards zero shift."""
    total = movie.sum(dim=0, dtype=torch.float32)
    mask = torch.zeros_like(total, dtype=torch.bool)
    for _ in range(2):  # second pass without the defects found in the first (they inflate the SD)
        good = total[~mask]
        mask = total > good.mean() + n_sigma * good.std().clamp_min(1e-12)
    return mask


def _prepare_for_alignment(frame: torch.Tensor, defects: torch.Tensor, taper: torch.Tensor,
                           small_shape: tuple[int, int]) -> torch.Tensor:
    """Spectrum (rfft2, ``small_shape``) of a frame for the estimation: defects and outliers (X-ray
    hits) replaced by the mean, mean removed, edges tapered, Fourier-cropped."""
    mean = frame.mean()
    std = frame.std().clamp_min(1e-12)
    bad = defects | (frame > mean + 8.0 * std)
    clean = torch.where(bad, frame[~bad].mean(), frame)
    clean = (clean - clean.mean()) * taper
    return crop_rfft2(torch.fft.rfft2(clean), small_shape)


def _correlation_weight(shape: tuple[int, int], pixel_size_yx_A: tuple[float, float], low_A: float, high_A: float,
                        b_factor_A2: float, device) -> torch.Tensor:
    """Weight of the cross-power spectrum ``[h, w//2+1]``: raised-cosine band ``low_A..high_A`` times
    ``exp(B k²/4)`` (k in 1/Å)."""
    ky, kx = frequencies_rfft2_px(shape, device)
    ky = ky / pixel_size_yx_A[0]
    kx = kx / pixel_size_yx_A[1]
    k = torch.sqrt(ky**2 + kx**2)
    nyquist = 0.5 / max(pixel_size_yx_A)
    k_high = min(1.0 / high_A, nyquist)
    k_low = 1.0 / low_A
    width = max(2.0 / (min(shape) * max(pixel_size_yx_A)), 0.05 * k_high)
    low_edge = torch.clamp((k - (k_low - 0.5 * width)) / width, 0.0, 1.0)
    high_edge = torch.clamp(((k_high + 0.0) - k) / width, 0.0, 1.0)  # 1 below k_high - width, 0 at k_high
    weight = (0.5 - 0.5 * torch.cos(math.pi * low_edge)) * (0.5 - 0.5 * torch.cos(math.pi * high_edge))
    weight = weight * torch.exp(b_factor_A2 * k**2 / 4.0)
    weight[0, 0] = 0.0
    return weight.to(torch.float32)


def _subpixel_peaks(cc: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Peak positions ``[..., 2]`` (x, y) in px of periodic correlation maps ``[..., h, w]`` whose zero
    shift is at index (0, 0); only |shift| <= radius is searched; parabolic sub-pixel refinement."""
    h, w = cc.shape[-2:]
    lead = cc.shape[:-2]
    flat = cc.reshape(-1, h, w)
    iy = torch.fft.fftfreq(h, 1.0 / h, device=cc.device)
    ix = torch.fft.fftfreq(w, 1.0 / w, device=cc.device)
    outside = (iy[:, None] ** 2 + ix[None, :] ** 2) > radius_px**2
    masked = flat.masked_fill(outside, float("-inf"))
    index = masked.reshape(flat.shape[0], -1).argmax(dim=1)
    py, px = index // w, index % w
    batch = torch.arange(flat.shape[0], device=cc.device)

    def value(dy, dx):
        return flat[batch, (py + dy) % h, (px + dx) % w].to(torch.float64)

    c0 = value(0, 0)
    dy = parabolic_offset(value(-1, 0), c0, value(1, 0))
    dx = parabolic_offset(value(0, -1), c0, value(0, 1))
    y = iy[py].to(torch.float64) + dy
    x = ix[px].to(torch.float64) + dx
    return torch.stack([x, y], dim=-1).reshape(*lead, 2)


def _peak_significance(cc: torch.Tensor, radius_px: float) -> torch.Tensor:
    """(max - mean) / SD of correlation maps ``[..., h, w]`` over the disc |shift| <= radius."""
    h, w = cc.shape[-2:]
    iy = torch.fft.fftfreq(h, 1.0 / h, device=cc.device)
    ix = torch.fft.fftfreq(w, 1.0 / w, device=cc.device)
    inside = (iy[:, None] ** 2 + ix[None, :] ** 2) <= radius_px**2
    values = cc[..., inside]
    return (values.max(dim=-1).values - values.mean(dim=-1)) / values.std(dim=-1).clamp_min(1e-30)


def _linear_start(spectra: torch.Tensor, shape: tuple[int, int], weight: torch.Tensor,
                  radius_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting trajectories ``[N, F, 2]`` (px, mean zero): a constant drift from the displacement
    between the sums of the first and the second half of the frames (each with half the dose, far
    more signal than one frame), zero where that peak is not significant; and whether it is ``[N]``
    (when it is not, single frames hold too little signal to be aligned)."""
    n, n_frames = spectra.shape[:2]
    half = n_frames // 2
    first, second = spectra[:, :half].sum(dim=1), spectra[:, half:].sum(dim=1)
    cc = torch.fft.irfft2(second * first.conj() * weight, s=shape)
    displacement = _subpixel_peaks(cc, radius_px)  # [N, 2] second half relative to the first
    significant = _peak_significance(cc, radius_px) >= _MIN_PEAK_SIGNIFICANCE
    t = frame_times(n_frames, spectra.device)
    velocity = displacement / (t[half:].mean() - t[:half].mean())
    start = velocity[:, None, :] * (t - t.mean())[None, :, None]
    return torch.where(significant[:, None, None], start, torch.zeros_like(start)), significant


def _align_stacks(spectra: torch.Tensor, shape: tuple[int, int], weight: torch.Tensor, smoother: torch.Tensor,
                  radius_px: float, max_iterations: int, tolerance_px: float,
                  step_px: float = 2.5) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Iterative leave-one-out alignment of ``N`` independent stacks ``spectra`` ``[N, F, h, w//2+1]``.

    Starts from :func:`_linear_start`; each iteration moves a frame by at most ``step_px`` (a local
    refinement: no jumps to noise peaks) and no frame further than ``radius_px`` from the mean.
    ``smoother`` ``[F, F]`` projects a trajectory onto the temporal model. Returns (smooth shifts,
    raw shifts) ``[N, F, 2]`` (x, y) in px (content displacement, mean zero), the iteration count
    and the variance ``[N, F, 2]`` (px²) of each raw shift (:func:`_shift_variance_px2`; infinite
    where the half sums did not correlate significantly, :func:`_linear_start`).
    """
    shifts, signal = _linear_start(spectra, shape, weight, radius_px)
    raw = shifts.clone()
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        aligned = spectra * phase_ramp_2d(-shifts, shape)
        reference = aligned.sum(dim=1, keepdim=True) - aligned
        cc = torch.fft.irfft2(aligned * reference.conj() * weight, s=shape)
        raw = shifts + _subpixel_peaks(cc, min(step_px, radius_px))
        new = torch.einsum("fg,ngc->nfc", smoother, raw)
        new = new - new.mean(dim=1, keepdim=True)
        length = new.norm(dim=-1, keepdim=True)
        new = new * torch.where(length > radius_px, radius_px / length.clamp_min(1e-30), torch.ones_like(length))
        change = float((new - shifts).abs().max())
        shifts = new
        if change < tolerance_px:
            break
    raw = raw - raw.mean(dim=1, keepdim=True)
    aligned = spectra * phase_ramp_2d(-raw, shape)
    variance = _shift_variance_px2(aligned, aligned.sum(dim=1, keepdim=True) - aligned, weight, shape)
    variance = torch.where(signal[:, None, None], variance, float("inf"))  # too little signal: no evidence
    return shifts, raw, iterations, variance


def _shift_variance_px2(aligned: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor,
                        shape: tuple[int, int]) -> torch.Tensor:
    """Variance ``[..., 2]`` (x, y, px²) of the cross-correlation peak position of every frame.

    Sandwich estimate at the peak (the frames are aligned, so the peak is at 0): the correlation
    is ``c(δ) = Σ_k W·Re(A·R*·e^{2πik·δ})``; the noise of its slope is estimated from the data as
    ``Σ (2πk)² W² |A|² |R|² / 2`` (conservative: the signal counts as noise), its curvature is
    ``Σ (2πk)² W Re(A·R*)``; variance = slope noise / curvature².
    """
    ky, kx = frequencies_rfft2_px(shape, aligned.device)
    product = aligned * reference.conj()
    power = (product.real**2 + product.imag**2).to(torch.float64)
    real = product.real.to(torch.float64)
    w = weight.to(torch.float64)
    out = []
    for k in (kx, ky):
        k2 = (_TWO_PI * k) ** 2
        noise = (k2 * w * w * power).sum(dim=(-2, -1)) / 2.0
        curvature = (k2 * w * real).sum(dim=(-2, -1))
        out.append(noise / curvature.clamp_min(1e-30) ** 2 * torch.where(curvature > 0, 1.0, float("inf")))
    return torch.stack(out, dim=-1)


def _trajectory_is_significant(shifts_px: torch.Tensor, variance_px2: torch.Tensor, n_model: int,
                               level: float = 0.95) -> bool:
    """Chi-square test of a smooth trajectory ``[F, 2]`` (mean zero) against the per-frame variance
    ``[F, 2]`` of the measurements it was fitted to: it spans ``2(min(n_model, F) - 1)`` dimensions."""
    from scipy.stats import chi2

    n_frames = shifts_px.shape[0]
    k = 2 * (min(n_model, n_frames) - 1)
    if k < 1:
        return False
    statistic = float(shifts_px.pow(2).sum() / variance_px2.mean().clamp_min(1e-30))
    return statistic >= float(chi2.ppf(level, k))


def _smoother(n_frames: int, n_control: int, device) -> torch.Tensor:
    """Least-squares projection ``[F, F]`` of a per-frame trajectory onto the temporal B-spline model."""
    basis = bspline_basis(frame_times(n_frames, device), n_control)
    return basis @ torch.linalg.pinv(basis)


def _patch_layout(n: int, grid: int, min_size: int) -> tuple[int, list[int]]:
    """Patch side and start indices along one axis: ``grid`` patches overlapping by half."""
    if grid <= 1:
        return n, [0]
    size = int(round(2.0 * n / (grid + 1)))
    size = max(min(n, max(size, min_size)), 8)
    size -= size % 2
    starts = torch.linspace(0, n - size, grid).round().long().tolist()
    return size, starts


# ----------------------------------------------------------------------------------------------
# estimation
# ----------------------------------------------------------------------------------------------

def estimate_motion(
    movie: torch.Tensor,
    pixel_size_A: float,
    *,
    fit_resolution_min_A: float = 500.0,
    fit_resolution_max_A: float = 10.0,
    b_factor_A2: float = -500.0,
    grid: tuple[int, int, int] = (1, 1, 3),
    max_shift_A: float | None = None,
    max_iterations: int = 15,
    tolerance_A: float = 0.01,
    min_patch_px: int = 48,
) -> MotionModel:
    """Estimate the motion of ``movie`` ``[frames, y, x]`` (gain-corrected, float32, any device).

    ``grid`` is the seed's motion model grid (X, Y, temporal): temporal control points of the
    trajectory and, when X·Y > 1, an X x Y local field. ``max_shift_A``: largest displacement of
    a frame from the mean position searched (default a quarter of the smaller image side).
    Returns a :class:`MotionModel` (shifts in Å, content displacement, mean zero over frames).
    """
    _check_movie(movie, "estimate_motion")
    grid_x, grid_y, temporal = (int(g) for g in grid)
    if min(grid_x, grid_y, temporal) < 1:
        raise ValueError(f"estimate_motion: the motion grid must be >= 1 on every axis, got {grid!r}")
    if not (pixel_size_A > 0 and fit_resolution_min_A > fit_resolution_max_A > 0):
        raise ValueError(f"estimate_motion: need pixel_size_A > 0 and fit_resolution_min_A > fit_resolution_max_A > 0, "
                         f"got {pixel_size_A}, {fit_resolution_min_A}, {fit_resolution_max_A}")
    if fit_resolution_max_A < 2.0 * pixel_size_A * 0.999:
        raise ValueError(f"estimate_motion: fit_resolution_max_A = {fit_resolution_max_A} Å is finer than Nyquist "
                         f"({2 * pixel_size_A:.3f} Å at {pixel_size_A} Å/px)")
    device = movie.device
    n_frames, ny, nx = movie.shape

    # frames at the fit resolution: Nyquist a little finer than fit_resolution_max_A
    factor = max(1.0, fit_resolution_max_A / (2.0 * pixel_size_A) * 0.9)
    small_shape = fourier_crop_shape((ny, nx), factor)
    if min(small_shape) < 32:  # keep enough pixels to correlate
        factor = max(1.0, min(ny, nx) / 32.0)
        small_shape = fourier_crop_shape((ny, nx), factor)
    pix_yx = (pixel_size_A * ny / small_shape[0], pixel_size_A * nx / small_shape[1])
    taper_px = max(4, min(ny, nx) // 20)
    taper = _edge_taper((ny, nx), taper_px, device)
    defects = _fixed_pattern_mask(movie)
    spectra = torch.stack([_prepare_for_alignment(movie[f].to(torch.float32), defects, taper, small_shape)
                           for f in range(n_frames)])

    weight = _correlation_weight(small_shape, pix_yx, fit_resolution_min_A, fit_resolution_max_A, b_factor_A2, device)
    if max_shift_A is None:
        radius_px = min(small_shape) / 4.0
    else:
        radius_px = max(1.5, max_shift_A / min(pix_yx))
    smoother = _smoother(n_frames, temporal, device)
    tolerance_px = tolerance_A / max(pix_yx)
    shifts_px, raw_px, iterations, variance = _align_stacks(spectra[None], small_shape, weight, smoother, radius_px,
                                                            max_iterations, tolerance_px)
    # a trajectory within the noise of its measurements is no evidence of motion: keep the frames still
    significant = _trajectory_is_significant(shifts_px[0], variance[0], temporal)
    if not significant:
        shifts_px = torch.zeros_like(shifts_px)
    to_A = torch.tensor([pix_yx[1], pix_yx[0]], dtype=torch.float64, device=device)
    shifts_A = (shifts_px[0] * to_A).to(torch.float32)
    raw_A = (raw_px[0] * to_A).to(torch.float32)

    local, extent = None, None
    if grid_x * grid_y > 1:
        local, extent = _estimate_local(spectra, small_shape, pix_yx, shifts_px[0], (grid_x, grid_y, temporal),
                                fit_resolution_min_A, fit_resolution_max_A, b_factor_A2, smoother,
                                max_iterations, tolerance_px, (ny, nx), min_patch_px, taper_px)
    return MotionModel(shifts_A=shifts_A, raw_shifts_A=raw_A, image_size_px=(int(ny), int(nx)),
                       pixel_size_A=float(pixel_size_A), temporal=temporal, local_control_A=local,
                       local_extent_px=extent, iterations=iterations, alignment_pixel_size_A=float(max(pix_yx)),
                       significant=significant)


def _estimate_local(spectra, small_shape, pix_yx, global_px, grid, low_A, high_A, b_factor_A2, smoother,
                    max_iterations, tolerance_px, full_shape, min_patch_px, frame_taper_px):
    """Residual local field control points ``[T, gy, gx, 2]`` (x, y) Å and the pixel rectangle they
    span, from patches of the globally aligned frames (each patch aligned like a movie, then a
    least-squares tensor-product fit over the patch centres, shrunk by its significance)."""
    grid_x, grid_y, temporal = grid
    h, w = small_shape
    ny, nx = full_shape
    aligned = torch.fft.irfft2(spectra * phase_ramp_2d(-global_px, small_shape), s=small_shape)  # [F, h, w]
    # keep patches off the border: the frame edge and its taper stay put on the detector while the
    # content moves, which would pull the outer patches towards the detector's frame
    margin = int(math.ceil(frame_taper_px * max(h / ny, w / nx) + float(global_px.abs().max()))) + 1
    size_y, starts_y = _patch_layout(h - 2 * margin, grid_y, min_patch_px)
    size_x, starts_x = _patch_layout(w - 2 * margin, grid_x, min_patch_px)
    starts_y = [margin + y0 for y0 in starts_y]
    starts_x = [margin + x0 for x0 in starts_x]
    taper = _edge_taper((size_y, size_x), max(2, min(size_y, size_x) // 8), aligned.device)
    patches = torch.stack([aligned[:, y0:y0 + size_y, x0:x0 + size_x] for y0 in starts_y for x0 in starts_x])
    patches = (patches - patches.mean(dim=(-2, -1), keepdim=True)) * taper  # [P, F, sy, sx]
    patch_spectra = torch.fft.rfft2(patches)
    weight = _correlation_weight((size_y, size_x), pix_yx, low_A, high_A, b_factor_A2, aligned.device)
    radius_px = max(2.0, min(size_y, size_x) / 8.0)  # residuals are small after the global alignment
    _, raw_px, _, _ = _align_stacks(patch_spectra, (size_y, size_x), weight, smoother, radius_px, max_iterations,
                                    tolerance_px)
    to_A = torch.tensor([pix_yx[1], pix_yx[0]], dtype=torch.float64, device=aligned.device)
    measured = (raw_px * to_A).reshape(len(starts_y), len(starts_x), -1, 2)  # [py, px, F, 2] per-frame
    # patch centres in full-size pixel coordinates (pixel centres on integers, sample j at j·n/n_small)
    centres_y = torch.tensor([(y0 + (size_y - 1) / 2.0) * ny / h for y0 in starts_y], dtype=torch.float64)
    centres_x = torch.tensor([(x0 + (size_x - 1) / 2.0) * nx / w for x0 in starts_x], dtype=torch.float64)
    extent = (float(centres_y[0]), float(centres_y[-1]), float(centres_x[0]), float(centres_x[-1]))

    def normalised(c):
        return (c - c[0]) / (c[-1] - c[0]) if len(c) > 1 else torch.zeros_like(c)

    by = bspline_basis(normalised(centres_y), grid_y).to(aligned.device)
    bx = bspline_basis(normalised(centres_x), grid_x).to(aligned.device)
    bt = bspline_basis(frame_times(measured.shape[2], aligned.device), temporal)
    pinvs = [torch.linalg.pinv(b) for b in (bt, by, bx)]
    control = torch.einsum("tf,by,cx,yxfd->tbcd", *pinvs, measured)
    return _shrink_to_significance(control, measured, (bt, by, bx)).to(torch.float32), extent


def _shrink_to_significance(control: torch.Tensor, measured: torch.Tensor, bases) -> torch.Tensor:
    """James-Stein (positive part) shrinkage of a least-squares field ``[T, gy, gx, 2]``.

    The noise variance comes from the fit residuals; the field's chi-square is its Mahalanobis
    norm ``cᵀBᵀBc / σ² = |fitted|² / σ²`` (B the separable design matrix), over ``k`` fitted
    parameters. A field not significant at 3 sigma (chi² < k + 3·sqrt(2k)) is dropped, a
    significant one is shrunk by ``1 - (k - 2) / chi²``."""
    bt, by, bx = bases
    fitted = torch.einsum("ft,yb,xc,tbcd->yxfd", bt, by, bx, control)
    rank = math.prod(int(torch.linalg.matrix_rank(b)) for b in bases)
    dof = measured[..., 0].numel() - rank
    if dof < 1:
        return control
    noise_var = ((measured - fitted).pow(2).sum(dim=(0, 1, 2)) / dof).clamp_min(1e-30)  # [2] (x, y)
    chi2 = float((fitted.pow(2).sum(dim=(0, 1, 2)) / noise_var).sum())
    k = 2 * rank
    if chi2 < k + 3.0 * math.sqrt(2.0 * k):  # not significant at ~3 sigma: noise, no deformation
        return torch.zeros_like(control)
    return control * (1.0 - (k - 2) / chi2)


# ----------------------------------------------------------------------------------------------
# aligned sum
# ----------------------------------------------------------------------------------------------

def frame_dose_e_per_A2(pre_exposure_e_per_A2: float, tilt_dose_e_per_A2: float, n_frames: int) -> torch.Tensor:
    """Accumulated dose at the end of each frame ``[n_frames]`` (float64): the exposure before the
    tilt plus the tilt's dose spread evenly over its frames (unblur / cisTEM / RELION use the end)."""
    if n_frames < 1 or tilt_dose_e_per_A2 < 0 or pre_exposure_e_per_A2 < 0:
        raise ValueError(f"frame_dose_e_per_A2: need n_frames >= 1 and doses >= 0, got {n_frames}, "
                         f"{tilt_dose_e_per_A2}, {pre_exposure_e_per_A2}")
    per_frame = tilt_dose_e_per_A2 / n_frames
    return pre_exposure_e_per_A2 + per_frame * torch.arange(1, n_frames + 1, dtype=torch.float64)


def _warp_local(image: torch.Tensor, field_A: torch.Tensor, pixel_size_A: float) -> torch.Tensor:
    """Sample ``image`` [y, x] at ``r + field(r)`` (bicubic, border): removes a displacement field
    [y, x, 2] (x, y) Å."""
    ny, nx = image.shape
    ys = torch.arange(ny, dtype=torch.float32, device=image.device)
    xs = torch.arange(nx, dtype=torch.float32, device=image.device)
    x = xs[None, :] + field_A[..., 0].to(image.device) / pixel_size_A
    y = ys[:, None] + field_A[..., 1].to(image.device) / pixel_size_A
    grid = torch.stack([2.0 * x / max(nx - 1, 1) - 1.0, 2.0 * y / max(ny - 1, 1) - 1.0], dim=-1)[None]
    return F.grid_sample(image[None, None], grid, mode="bicubic", padding_mode="border", align_corners=True)[0, 0]


def align_and_sum(
    movie: torch.Tensor,
    pixel_size_A: float,
    motion: MotionModel,
    *,
    frame_dose_e_per_A2: torch.Tensor | None = None,
    voltage_kV: float = 300.0,
    binning_factor: float = 1.0,
    even_odd: bool = False,
    keep_frames: bool = False,
) -> dict[str, Any]:
    """The aligned (and dose-weighted) sum of ``movie`` ``[frames, y, x]``.

    Global shifts are removed by a Fourier phase ramp (sub-pixel, periodic), a local field by
    bicubic resampling. With ``frame_dose_e_per_A2`` ``[frames]`` (accumulated dose of each frame,
    see :func:`frame_dose_e_per_A2`) frames are weighted by the exposure filter
    ``q_f(k) = exp(-N_f / 2Ne(k))`` (Grant & Grigorieff 2015) and the sum is multiplied by
    ``sqrt(F / Σ_f q_f(k)²)``: the optimal-SNR sum with the noise power of the plain sum, equal
    to the plain sum at k = 0 (a dose common to all frames, e.g. earlier tilts, cancels out).
    Without doses the plain sum. Then Fourier-crop binning by ``binning_factor``.
    ``even_odd``: also the sums of frames 0, 2, 4, ... ("even") and 1, 3, 5, ... ("odd"), with
    the same weights, so that ``even + odd == sum``. ``keep_frames``: also the aligned, binned
    frames without dose weighting (``"frames"`` ``[frames, y', x']``, e.g. for per-frame spectra).
    Returns ``{"sum", "even", "odd", "frames" (None when not asked), "pixel_size_A"}``, float32.
    """
    _check_movie(movie, "align_and_sum")
    n_frames, ny, nx = movie.shape
    if motion.n_frames != n_frames or tuple(motion.image_size_px) != (ny, nx):
        raise ValueError(f"align_and_sum: the motion model is for {motion.n_frames} frames of "
                         f"{motion.image_size_px[1]} x {motion.image_size_px[0]} px, the movie has {n_frames} frames "
                         f"of {nx} x {ny} px")
    if binning_factor < 1:
        raise ValueError(f"align_and_sum: binning_factor must be >= 1, got {binning_factor}")
    device = movie.device
    shape = (ny, nx)
    shifts_px = motion.shifts_A.to(device=device, dtype=torch.float64) / pixel_size_A

    weight_of = None
    if frame_dose_e_per_A2 is not None:
        doses = [float(d) for d in torch.as_tensor(frame_dose_e_per_A2, dtype=torch.float64).reshape(-1)]
        if len(doses) != n_frames:
            raise ValueError(f"align_and_sum: {len(doses)} frame doses for {n_frames} frames")
        if min(doses) < 0:
            raise ValueError(f"align_and_sum: frame doses must be >= 0 e/Å², got {doses}")
        ky, kx = frequencies_rfft2_px(shape, device)
        k_per_A = (torch.sqrt(ky**2 + kx**2) / pixel_size_A).to(torch.float32)
        # exposure_filter's q = exp(-N / 2Ne(k)), with Ne(k) computed once for all frames (float32:
        # a 4k frame's grid in float64 per frame costs more than the FFTs)
        half_inverse_ne = 0.5 / critical_exposure_e_per_A2(k_per_A, voltage_kV)
        power = torch.zeros_like(half_inverse_ne)
        for dose in doses:
            power += torch.exp(-2.0 * dose * half_inverse_ne)
        norm = torch.sqrt(n_frames / power)

        def weight_of(frame: int) -> torch.Tensor:
            return torch.exp(-doses[frame] * half_inverse_ne) * norm

    def finish(spectrum):
        image = torch.fft.irfft2(spectrum, s=shape)
        return fourier_crop_bin(image, binning_factor) if binning_factor > 1 else image

    total = None
    halves = [None, None]
    kept = []
    for f in range(n_frames):
        spectrum = torch.fft.rfft2(movie[f].to(torch.float32))
        spectrum = spectrum * phase_ramp_2d(-shifts_px[f], shape)
        field = motion.local_field_A(f)
        if field is not None:
            image = _warp_local(torch.fft.irfft2(spectrum, s=shape), field.to(device), pixel_size_A)
            spectrum = torch.fft.rfft2(image)
        if keep_frames:
            kept.append(finish(spectrum))
        if weight_of is not None:
            spectrum = spectrum * weight_of(f)
        total = spectrum if total is None else total + spectrum
        if even_odd:
            half = f % 2
            halves[half] = spectrum if halves[half] is None else halves[half] + spectrum

    out_shape = fourier_crop_shape(shape, binning_factor)
    return {
        "sum": finish(total),
        "even": finish(halves[0]) if even_odd else None,
        "odd": finish(halves[1]) if even_odd else None,
        "frames": torch.stack(kept) if keep_frames else None,
        "pixel_size_A": float(pixel_size_A * nx / out_shape[1]),
    }
