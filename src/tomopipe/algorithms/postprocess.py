"""Post-processing of two half maps, as RELION's ``relion_postprocess`` does it.

Steps (Chen et al. 2013, Ultramicroscopy 135:24; Rosenthal & Henderson 2003, JMB 333:721):
the FSC of the unmasked and of the masked half maps; the masked FSC corrected for the mask by
phase randomisation beyond the first shell where the unmasked FSC drops below 0.8,
``FSC_true = (FSC_t − FSC_n) / (1 − FSC_n)`` from two shells beyond it; the resolution where the
corrected FSC falls below 0.143; the average map weighted by ``sqrt(2·FSC/(1 + FSC))``, sharpened
by a B-factor fitted to its Guinier plot (ln mean |F| against 1/d²) from ``fit_low_A`` to the
resolution, and low-passed at the resolution with a raised-cosine edge two shells wide. One
departure from RELION: the Guinier fit uses the masked average (the solvent's noise left out);
the sharpened map itself is the unmasked average, as in RELION.

Conventions: volumes ``[z, y, x]`` cubic, float32 maps out, float64 curves; shells as in
:mod:`tomopipe.algorithms.fsc` (shell i at ``i / (n·pixel_size_A)`` cycles/Å). B-factors follow
RELION's ``rlnBfactorUsedForSharpening``: the map's amplitudes are multiplied by ``exp(−B·k²/4)``
(k in cycles/Å), so a negative B sharpens; the fitted B is ``4 × slope`` of the Guinier line, i.e.
−150 Å² for a map whose amplitudes fall as ``exp(−150·k²/4)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from tomopipe.algorithms.filters import bandpass, radial_frequency_grid
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_frequencies_per_A, shell_indices
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.errors import TomopipeError

__all__ = ["GuinierPlot", "PostprocessResult", "auto_mask", "corrected_fsc", "guinier_plot", "local_resolution",
           "postprocess", "randomise_phases"]

#: The unmasked FSC below which phases are randomised (RELION's ``--randomize_at_fsc``).
RANDOMISE_AT_FSC = 0.8
#: The corrected FSC uses the masked one up to this many shells beyond the randomisation shell (RELION).
CORRECTION_HANDOFF_SHELLS = 2
#: Gold-standard resolution threshold.
FSC_THRESHOLD = 0.143


@dataclasses.dataclass(frozen=True)
class GuinierPlot:
    """Guinier plot of a map: ``ln_amplitude`` (ln of the mean |F| of each shell, NaN where 0) against
    ``inv_resolution_sq_per_A2`` (1/d² = k², 1/Å²) for shells 0 .. n//2; the line
    ``intercept + slope_A2 · k²`` fitted (least squares) to the shells where ``fit_used``."""

    inv_resolution_sq_per_A2: torch.Tensor
    ln_amplitude: torch.Tensor
    fit_used: torch.Tensor
    slope_A2: float
    intercept: float
    correlation: float

    @property
    def b_factor_A2(self) -> float:
        """The B-factor of the fit, ``4 × slope`` (negative for a map whose amplitudes fall off)."""
        return 4.0 * self.slope_A2

    def fit_line(self) -> torch.Tensor:
        """The fitted line at every shell's k² (float64)."""
        return self.intercept + self.slope_A2 * self.inv_resolution_sq_per_A2


@dataclasses.dataclass(frozen=True)
class PostprocessResult:
    """What :func:`postprocess` measures and makes. Curves are float64 over shells 0 .. n//2
    (``shell_frequencies_per_A``); ``fsc_masked`` and ``fsc_randomised_masked`` are None without a
    mask (then ``fsc_corrected`` is the unmasked FSC); ``randomise_from_shell`` is the first shell
    whose phases were randomised minus one (RELION's ``randomize_at``; None when the unmasked FSC
    never drops below 0.8 and nothing needs correcting). ``map_sharpened`` is the FSC-weighted,
    B-sharpened, low-passed average of the half maps (RELION's postprocess.mrc), ``map_masked``
    the same times the mask (postprocess_masked.mrc). ``guinier`` is the plot of the FSC-weighted
    map with the fit (None when ``b_factor_A2`` was given)."""

    shell_frequencies_per_A: torch.Tensor
    fsc_unmasked: torch.Tensor
    fsc_masked: torch.Tensor | None
    fsc_randomised_masked: torch.Tensor | None
    fsc_corrected: torch.Tensor
    randomise_from_shell: int | None
    resolution_A: float
    b_factor_A2: float
    guinier: GuinierPlot | None
    map_sharpened: torch.Tensor
    map_masked: torch.Tensor | None
    mask: torch.Tensor | None


def _check_cube(volume: torch.Tensor, name: str) -> int:
    if volume.ndim != 3 or not volume.shape[0] == volume.shape[1] == volume.shape[2] or volume.shape[0] < 4:
        raise TomopipeError(f"{name}: expected a cubic volume [n, n, n] with n >= 4, got shape {tuple(volume.shape)}")
    if not bool(torch.isfinite(volume).all()):
        raise TomopipeError(f"{name}: the volume holds NaN or infinite values")
    return int(volume.shape[0])


def auto_mask(volume: torch.Tensor, threshold: float, extend_px: float = 3.0, soft_edge_px: float = 6.0
              ) -> torch.Tensor:
    """A soft mask made from a map, as ``relion_mask_create`` makes it: voxels ``>= threshold`` are 1,
    the binary mask is grown by ``extend_px`` voxels (shrunk when negative; Euclidean distance),
    then a raised-cosine edge ``0.5 + 0.5·cos(π·d / soft_edge_px)`` falls from 1 at the grown
    mask's border (distance d = 0) to 0 at d = ``soft_edge_px``. Float32, same shape as ``volume``."""
    if volume.ndim != 3:
        raise TomopipeError(f"auto_mask: expected a volume [z, y, x], got shape {tuple(volume.shape)}")
    if soft_edge_px < 0:
        raise TomopipeError(f"auto_mask: soft_edge_px must be >= 0, got {soft_edge_px}")
    binary = (volume >= threshold).cpu().numpy()
    if not binary.any():
        raise TomopipeError(f"auto_mask: no voxel reaches the threshold {threshold:g} "
                            f"(the map spans {float(volume.min()):g} .. {float(volume.max()):g})")
    if extend_px < 0:
        binary = distance_transform_edt(binary) > -extend_px
        if not binary.any():
            raise TomopipeError(f"auto_mask: shrinking by {-extend_px:g} voxels leaves nothing of the mask")
    # distance to the grown mask = distance to the binary mask − extend (Euclidean growth)
    distance = torch.from_numpy(distance_transform_edt(~binary)) - max(extend_px, 0.0)
    if soft_edge_px == 0:
        mask = (distance <= 0).to(torch.float64)
    else:
        mask = 0.5 + 0.5 * torch.cos(math.pi * torch.clamp(distance / soft_edge_px, 0.0, 1.0))
    return mask.to(device=volume.device, dtype=torch.float32)


def randomise_phases(volume: torch.Tensor, beyond_shell: int, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """``volume`` with the phases of every Fourier coefficient in shells ``> beyond_shell`` replaced by
    uniform random phases, amplitudes kept (RELION's ``randomizePhasesBeyond``). The phases are those
    of the FFT of Gaussian white noise, so they keep the Hermitian symmetry of a real map and the
    result is exactly real. Same dtype as ``volume``."""
    n = _check_cube(volume, "randomise_phases")
    spectrum = torch.fft.rfftn(volume.to(torch.float64))
    noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64, device="cpu").to(volume.device)
    noise_spectrum = torch.fft.rfftn(noise)
    unit = noise_spectrum / noise_spectrum.abs().clamp_min(torch.finfo(torch.float64).tiny)
    beyond = shell_indices(n, 3, volume.device) > beyond_shell
    spectrum = torch.where(beyond, spectrum.abs() * unit, spectrum)
    return torch.fft.irfftn(spectrum, s=volume.shape).to(volume.dtype)


def _randomise_from_shell(fsc_unmasked: torch.Tensor) -> int | None:
    """RELION's ``randomize_at``: the first shell > 0 whose unmasked FSC is below 0.8 (None if none is)."""
    below = torch.nonzero(fsc_unmasked[1:] < RANDOMISE_AT_FSC)
    return int(below[0]) + 1 if below.numel() else None


def corrected_fsc(fsc_masked: torch.Tensor, fsc_randomised_masked: torch.Tensor, randomise_from_shell: int
                  ) -> torch.Tensor:
    """Chen et al. (2013): ``(FSC_t − FSC_n) / (1 − FSC_n)`` in shells ``>= randomise_from_shell + 2``,
    the masked FSC ``FSC_t`` below (RELION's hand-off two shells beyond the randomisation)."""
    denominator = 1.0 - fsc_randomised_masked
    safe = denominator > 1e-12
    true = torch.where(safe, (fsc_masked - fsc_randomised_masked) / torch.where(safe, denominator, 1.0), 0.0)
    shells = torch.arange(fsc_masked.shape[-1], device=fsc_masked.device)
    return torch.where(shells < randomise_from_shell + CORRECTION_HANDOFF_SHELLS, fsc_masked, true)


def _shell_lookup(per_shell: torch.Tensor, n: int) -> torch.Tensor:
    """A per-shell array (shells 0 .. n//2) spread over the rfft grid of an n³ box; 0 in the corners
    beyond Nyquist."""
    idx = shell_indices(n, 3, per_shell.device)
    padded = torch.cat([per_shell, per_shell.new_zeros(1)])
    return padded[idx.clamp(max=per_shell.numel())]


def _fsc_weights(fsc_curve: torch.Tensor) -> torch.Tensor:
    """Rosenthal & Henderson (2003) ``sqrt(2·FSC / (1 + FSC))`` per shell; 0 from the first shell whose
    FSC is below 0.0001 on (RELION)."""
    weights = torch.sqrt(2.0 * fsc_curve.clamp_min(0.0) / (1.0 + fsc_curve.clamp_min(0.0)))
    low = torch.nonzero(fsc_curve < 1e-4)
    if low.numel():
        weights[int(low[0]):] = 0.0
    return weights


def _guinier_range(n: int, pixel_size_A: float, fit_low_A: float, fit_high_A: float) -> torch.Tensor:
    """Shells (bool ``[n//2 + 1]``, DC excluded) whose resolution n·pixel_size_A / i lies in
    [``fit_high_A``, ``fit_low_A``]."""
    shells = torch.arange(n // 2 + 1)
    resolution_A = n * pixel_size_A / shells.clamp_min(1)
    return (shells > 0) & (resolution_A <= fit_low_A) & (resolution_A >= fit_high_A)


def guinier_shells(n: int, pixel_size_A: float, fit_low_A: float, fit_high_A: float) -> int:
    """How many shells of an n³ map a Guinier fit from ``fit_low_A`` to ``fit_high_A`` would use."""
    return int(_guinier_range(n, pixel_size_A, fit_low_A, fit_high_A).sum())


def guinier_plot(spectrum: torch.Tensor, n: int, pixel_size_A: float, fit_low_A: float, fit_high_A: float
                 ) -> GuinierPlot:
    """The Guinier plot of an rfft ``spectrum`` of an n³ map, with a straight line fitted to the shells
    whose resolution d = n·pixel_size_A / i lies in [``fit_high_A``, ``fit_low_A``]. Raises
    :class:`TomopipeError` when fewer than 3 shells with signal fall in that range."""
    idx = shell_indices(n, 3, spectrum.device).reshape(-1)
    n_shells = n // 2 + 1
    keep = idx < n_shells
    total = torch.bincount(idx[keep], weights=spectrum.abs().reshape(-1)[keep].double(), minlength=n_shells)
    count = torch.bincount(idx[keep], minlength=n_shells).clamp_min(1)
    mean_amplitude = (total / count).cpu()
    k2 = shell_frequencies_per_A(n, pixel_size_A) ** 2
    ln_amplitude = torch.where(mean_amplitude > 0, torch.log(mean_amplitude.clamp_min(1e-300)), math.nan)
    used = _guinier_range(n, pixel_size_A, fit_low_A, fit_high_A) & (mean_amplitude > 0)
    if int(used.sum()) < 3:
        raise TomopipeError(
            f"B-factor fit: only {int(used.sum())} shells between {fit_low_A:g} Å and the resolution "
            f"{fit_high_A:.2f} Å (pixel {pixel_size_A:g} Å, box {n}); a Guinier fit needs 3: give b_factor_A2 "
            f"instead, or lower fit_low_A")
    x, y = k2[used].numpy(), ln_amplitude[used].numpy()
    slope, intercept = np.polyfit(x, y, 1)
    correlation = float(np.corrcoef(x, y)[0, 1])
    return GuinierPlot(k2, ln_amplitude, used, float(slope), float(intercept), correlation)


def _b_factor_filter(n: int, pixel_size_A: float, b_factor_A2: float, device) -> torch.Tensor:
    """``exp(−B·k²/4)`` on the rfft grid of an n³ box (k in cycles/Å)."""
    k = radial_frequency_grid((n, n, n), torch.tensor(pixel_size_A, dtype=torch.float64)).to(device)
    return torch.exp(-0.25 * b_factor_A2 * k**2)


def postprocess(half1: torch.Tensor, half2: torch.Tensor, pixel_size_A: float, mask: torch.Tensor | None = None, *,
                auto_mask_threshold: float | None = None, auto_mask_extend_px: float = 3.0,
                auto_mask_soft_edge_px: float = 6.0, auto_mask_lowpass_A: float | None = 15.0,
                b_factor_A2: float | None = None, fit_low_A: float = 10.0,
                generator: torch.Generator | None = None) -> PostprocessResult:
    """RELION's post-processing of two half maps ``[n, n, n]`` (see the module docstring).

    ``mask``: a soft mask in [0, 1] of the same shape; or, with ``auto_mask_threshold``, one made by
    :func:`auto_mask` from the average of the half maps low-passed at ``auto_mask_lowpass_A``
    (relion_mask_create's ``--lowpass``; None: not filtered). Without either, no correction is
    needed and the unmasked FSC gives the resolution. ``b_factor_A2``: the B-factor to apply
    (negative sharpens); None fits it to the Guinier plot from ``fit_low_A`` to the resolution, or
    applies none (B = 0, ``guinier`` None) when fewer than 3 shells lie in that range (a map at
    worse than ~10 Å: RELION too fits only from 10 Å on). ``generator`` draws the random phases.
    """
    n = _check_cube(half1, "postprocess: half map 1")
    _check_cube(half2, "postprocess: half map 2")
    if half1.shape != half2.shape:
        raise TomopipeError(f"postprocess: the half maps differ in shape: {tuple(half1.shape)} vs {tuple(half2.shape)}")
    if not pixel_size_A > 0:
        raise TomopipeError(f"postprocess: pixel_size_A must be > 0, got {pixel_size_A!r}")
    if mask is not None and auto_mask_threshold is not None:
        raise TomopipeError("postprocess: give either a mask or auto_mask_threshold, not both")
    h1, h2 = half1.to(torch.float64), half2.to(torch.float64)
    average = 0.5 * (h1 + h2)
    if auto_mask_threshold is not None:
        smooth = average if auto_mask_lowpass_A is None else _filtered(
            average, _lowpass_filter(n, pixel_size_A, auto_mask_lowpass_A, average.device))
        mask = auto_mask(smooth, auto_mask_threshold, auto_mask_extend_px, auto_mask_soft_edge_px)
    fsc_unmasked = fsc(h1, h2)
    fsc_masked = fsc_random = randomise_from = None
    fsc_curve = fsc_unmasked
    if mask is not None:
        _check_mask(mask, half1.shape)
        fsc_masked, fsc_random, randomise_from = _masked_fscs(h1, h2, mask, fsc_unmasked, generator)
        fsc_curve = fsc_masked if fsc_random is None else corrected_fsc(fsc_masked, fsc_random, randomise_from)
    if float(fsc_curve[1]) < FSC_THRESHOLD:
        raise TomopipeError("postprocess: the half maps do not correlate (the FSC is below 0.143 from the first "
                            "shell on): nothing to post-process")
    resolution_A = fsc_resolution_A(fsc_curve, pixel_size_A, FSC_THRESHOLD, n)
    weights = _shell_lookup(_fsc_weights(fsc_curve), n).to(h1.device)
    guinier = None
    if b_factor_A2 is None and guinier_shells(n, pixel_size_A, fit_low_A, resolution_A) < 3:
        b_factor_A2 = 0.0  # too few shells between fit_low_A and the resolution to fit: no sharpening
    if b_factor_A2 is None:  # fitted on the masked map (solvent noise left out); the map written is unmasked
        fitted = average * mask.to(average.device, torch.float64) if mask is not None else average
        guinier = guinier_plot(torch.fft.rfftn(fitted) * weights, n, pixel_size_A, fit_low_A, resolution_A)
        b_factor_A2 = guinier.b_factor_A2
    sharpened = _filtered(average, weights * _b_factor_filter(n, pixel_size_A, b_factor_A2, h1.device)
                          * _lowpass_filter(n, pixel_size_A, resolution_A, h1.device))
    masked_map = (sharpened * mask.to(sharpened.device, torch.float64)).to(torch.float32) if mask is not None else None
    return PostprocessResult(
        shell_frequencies_per_A=shell_frequencies_per_A(n, pixel_size_A), fsc_unmasked=fsc_unmasked.cpu(),
        fsc_masked=None if fsc_masked is None else fsc_masked.cpu(),
        fsc_randomised_masked=None if fsc_random is None else fsc_random.cpu(), fsc_corrected=fsc_curve.cpu(),
        randomise_from_shell=randomise_from, resolution_A=resolution_A, b_factor_A2=float(b_factor_A2), guinier=guinier,
        map_sharpened=sharpened.to(torch.float32), map_masked=masked_map,
        mask=None if mask is None else mask.to(torch.float32))


def _lowpass_filter(n: int, pixel_size_A: float, resolution_A: float, device) -> torch.Tensor:
    """Low-pass at ``resolution_A`` on the rfft grid of an n³ box, raised-cosine edge two shells wide."""
    return bandpass((n, n, n), pixel_size_A, high_A=resolution_A).to(device=device, dtype=torch.float64)


def _filtered(volume: torch.Tensor, spectral_filter: torch.Tensor) -> torch.Tensor:
    """``volume`` with its rfft multiplied by ``spectral_filter``."""
    return torch.fft.irfftn(torch.fft.rfftn(volume) * spectral_filter, s=volume.shape)


def _masked_fscs(h1: torch.Tensor, h2: torch.Tensor, mask: torch.Tensor, fsc_unmasked: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """The masked FSC, the masked FSC of the half maps with phases randomised beyond the unmasked
    FSC's 0.8 shell, and that shell (both None when the unmasked FSC never drops below 0.8)."""
    m = mask.to(device=h1.device, dtype=torch.float64)
    fsc_masked = fsc(h1 * m, h2 * m)
    randomise_from = _randomise_from_shell(fsc_unmasked)
    if randomise_from is None:
        return fsc_masked, None, None
    r1, r2 = (randomise_phases(h, randomise_from, generator) for h in (h1, h2))
    return fsc_masked, fsc(r1 * m, r2 * m), randomise_from


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> None:
    if mask.shape != shape:
        raise TomopipeError(f"postprocess: the mask's shape {tuple(mask.shape)} differs from the half maps' "
                            f"{tuple(shape)}")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3 or hi <= 0:
        raise TomopipeError(f"postprocess: a mask must lie in [0, 1] and be non-zero somewhere, got values "
                            f"{lo:g} .. {hi:g}")


def _window_centres(n: int, step_px: int) -> torch.Tensor:
    """Window centres along one axis: every ``step_px`` voxels through the box centre ``n // 2``."""
    first = n // 2 - (n // 2 // step_px) * step_px
    return torch.arange(first, n, step_px)


def _crop_windows(volume: torch.Tensor, centres: torch.Tensor, window_px: int) -> torch.Tensor:
    """Cubes ``[m, w, w, w]`` of ``volume`` centred (voxel w // 2) on ``centres`` ``[m, 3]`` (z, y, x),
    wrapping around the box edges (the maps are periodic for the FFT anyway)."""
    n = volume.shape[0]
    offsets = torch.arange(window_px, device=volume.device) - window_px // 2
    iz, iy, ix = ((centres[:, a, None].to(volume.device) + offsets) % n for a in range(3))
    return volume[iz[:, :, None, None], iy[:, None, :, None], ix[:, None, None, :]]


def local_resolution(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, pixel_size_A: float,
                     window_px: int = 24, step_px: int = 4, generator: torch.Generator | None = None,
                     batch: int = 256) -> torch.Tensor:
    """Local resolution (Å, float32 map; 0 where ``mask`` is 0), as RELION's ``--locres``: the
    phase-randomisation-corrected FSC (0.143) of the half maps inside a soft sphere (diameter
    0.75 × ``window_px``, raised-cosine edge 0.25 × ``window_px``) in a ``window_px`` cube around
    centres every ``step_px`` voxels (through the box centre); each voxel of the mask gets the value
    of its nearest centre. Phases are randomised beyond the shell where the global unmasked FSC
    drops below 0.8. Windows where the FSC never falls below 0.143 give Nyquist (2 × pixel)."""
    n = _check_cube(half1, "local_resolution: half map 1")
    if half2.shape != half1.shape or mask.shape != half1.shape:
        raise TomopipeError(f"local_resolution: half maps and mask must share a shape, got {tuple(half1.shape)}, "
                            f"{tuple(half2.shape)}, {tuple(mask.shape)}")
    if not (8 <= window_px <= n and window_px % 2 == 0) or not 1 <= step_px <= n:
        raise TomopipeError(f"local_resolution: window_px must be even and in 8 .. {n}, step_px in 1 .. {n}; "
                            f"got {window_px}, {step_px}")
    h1, h2 = half1.to(torch.float64), half2.to(torch.float64)
    randomise_from = _randomise_from_shell(fsc(h1, h2))
    randomised = None
    if randomise_from is not None:
        randomised = (randomise_phases(h1, randomise_from, generator), randomise_phases(h2, randomise_from, generator))
        randomise_from = max(1, round(randomise_from * window_px / n))
    sphere = spherical_mask(window_px, 1.0, 0.75 * window_px, 0.25 * window_px).to(h1.device, torch.float64)
    axis = _window_centres(n, step_px)
    nearest = torch.round((torch.arange(n) - axis[0]) / step_px).long().clamp(0, axis.numel() - 1)
    g = axis.numel()
    inside = mask > 0
    cell = ((nearest[:, None, None] * g + nearest[None, :, None]) * g + nearest[None, None, :]).to(mask.device)
    cells, cell_of_voxel = torch.unique(cell[inside], return_inverse=True)
    centres = torch.stack([axis[cells.cpu() // (g * g)], axis[cells.cpu() // g % g], axis[cells.cpu() % g]], 1)
    values = torch.empty(cells.numel(), dtype=torch.float64)
    for start in range(0, cells.numel(), batch):
        part = centres[start:start + batch]
        curves = fsc(_crop_windows(h1, part, window_px) * sphere, _crop_windows(h2, part, window_px) * sphere)
        if randomised is not None:
            noise = fsc(_crop_windows(randomised[0], part, window_px) * sphere,
                        _crop_windows(randomised[1], part, window_px) * sphere)
            curves = corrected_fsc(curves, noise, randomise_from)
        for j, curve in enumerate(curves):
            values[start + j] = min(fsc_resolution_A(curve, pixel_size_A, FSC_THRESHOLD, window_px),
                                    window_px * pixel_size_A)
    out = torch.zeros(half1.shape, dtype=torch.float32, device=mask.device)
    out[inside] = values.to(device=mask.device, dtype=torch.float32)[cell_of_voxel]
    return out
