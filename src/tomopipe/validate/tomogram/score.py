"""Score a tomogram against the simulator's truth: real-space correlation and FSC after the best
translation, for the tomogram and for its mirror image (the handedness check). The true specimen
comes from :mod:`tomopipe.validate.tomogram.render`, the translation search from
:mod:`tomopipe.validate.tomogram.register`.

Scores (:func:`score_tomogram`): the alignment fixes the specimen only up to a 3-D translation,
so the truth is first moved onto the tomogram by the translation that maximises their
cross-correlation (low-passed to ``resolution_A``, within ``max_shift_A``, sub-voxel by a
parabola through the peak). ``contrast_sign`` is the sign of protein in the tomogram: -1 for a
tomogram of raw phase-contrast views (protein dark below the first CTF zero; tomopipe does not
invert contrast), +1 for inverted data. Then, with a soft-edged box mask:

* ``correlation``: Pearson correlation of the two volumes low-passed to ``resolution_A`` (a
  raised-cosine edge, 0.5 at 1/resolution_A);
* ``fsc``: the FSC of the unfiltered volumes (:func:`tomopipe.algorithms.fsc.fsc`, zero-padded to a
  cube) and the resolutions where it first falls below 0.5 and 0.143, searched from ``fsc_from_A``
  (200 Å) on: the coarser shells hold too few coefficients, with the missing wedge, for a stable
  value. A curve already below the threshold there gives about ``fsc_from_A``. Tomograms not
  corrected for the CTF lose correlation at the first CTF zero.

Besides the translation, a tilt-angle offset is free too: turning the specimen by δ about the
tilt axis and every tilt angle by -δ leaves the projections unchanged, so an alignment that
refines the tilt offset fixes the specimen only up to that turn. The wrapper
:func:`score_tomogram_against_truth` can search δ (``tilt_offset_search_deg``) and reports it.

The same is done for the tomogram mirrored along z (``z -> -z``, what a wrong tilt-angle sign or
handedness produces), with its own translation search: a correctly handed tomogram scores
clearly better than its mirror.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from tomopipe.algorithms.fourier import cosine_edge_taper, embed_centered
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_frequencies_per_A
from tomopipe.algorithms.peaks import parabolic_offset
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc
from tomopipe.validate.tomogram.register import register_translation
from tomopipe.validate.tomogram.render import true_specimen_for_tomogram
from tomopipe.validate.truth import Truth

__all__ = ["TomogramScore", "score_tomogram", "score_tomogram_against_truth", "score_tomogram_set"]


@dataclass(frozen=True)
class TomogramScore:
    """Scores of a tomogram against the true specimen (see the module docstring)."""

    resolution_limit_A: float  #: low-pass of the correlation and the translation search
    contrast_sign: int
    translation_A: tuple[float, float, float]  #: (x, y, z): the truth moved by this matches the tomogram
    correlation: float
    fsc_0_5_A: float
    fsc_0_143_A: float
    mirrored_translation_A: tuple[float, float, float] | None
    mirrored_correlation: float | None
    mirrored_fsc_0_5_A: float | None
    mirrored_fsc_0_143_A: float | None
    tilt_offset_deg: float = 0.0  #: rotation of the truth about the tilt axis (y) before the translation
    fsc_curve: list[float] = field(default_factory=list, repr=False)
    mirrored_fsc_curve: list[float] = field(default_factory=list, repr=False)
    fsc_frequencies_per_A: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The numbers without the curves."""
        return {k: v for k, v in asdict(self).items() if not k.endswith(("curve", "per_A"))}


@dataclass(frozen=True)
class _Comparison:
    """One tomogram (or its mirror) against the truth, after the translation search."""

    translation_A: tuple[float, float, float]  #: (x, y, z), rounded to 0.001 Å
    correlation: float
    fsc_curve: torch.Tensor | None  #: None when the FSC was skipped
    cube_px: int  #: edge of the cube the FSC is computed in


def _masked_correlation(first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor) -> float:
    """Pearson correlation of ``first·weights`` and ``second·weights`` (float64), 0 when either is flat."""
    a = (first.double() * weights).flatten()
    b = (second.double() * weights).flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def _compare(tomogram: torch.Tensor, truth: torch.Tensor, voxel_size_A: float, resolution_A: float,
             max_shift_vox: tuple[float, float, float], edge_px: int, with_fsc: bool) -> _Comparison:
    """Translation search, low-passed correlation and (``with_fsc``) FSC of ``tomogram`` against
    ``truth`` (both ``[z, y, x]`` float32), under a soft-edged box mask of ``edge_px``."""
    shape = tuple(tomogram.shape)
    mask = cosine_edge_taper(shape, int(edge_px), max_edge_fraction=0.25, device=tomogram.device)
    registration = register_translation(tomogram * mask, truth * mask, voxel_size_A, resolution_A, max_shift_vox)
    padded_shape, lowpass = registration.padded_shape, registration.lowpass
    crop = tuple(slice(0, n) for n in shape)
    tomogram_lowpassed = torch.fft.irfftn(registration.tomogram_spectrum * lowpass, s=padded_shape)[crop]
    truth_lowpassed = torch.fft.irfftn(registration.moved_truth_spectrum * lowpass, s=padded_shape)[crop]
    weights = mask.double()
    correlation = _masked_correlation(tomogram_lowpassed, truth_lowpassed, weights)
    shift_z, shift_y, shift_x = registration.shift_zyx_vox
    translation_A = tuple(round(v * voxel_size_A, 3) for v in (shift_x, shift_y, shift_z))
    cube_px = max(shape) + max(shape) % 2
    if not with_fsc:
        return _Comparison(translation_A, correlation, None, cube_px)
    moved_truth = torch.fft.irfftn(registration.moved_truth_spectrum, s=padded_shape)[crop]
    cube = (cube_px,) * 3
    curve = fsc(embed_centered(tomogram.double() * weights, cube), embed_centered(moved_truth.double() * weights, cube))
    return _Comparison(translation_A, correlation, curve, cube_px)


def _crossing_A(curve: torch.Tensor | None, voxel_size_A: float, threshold: float, box_px: int,
                first_shell: int) -> float:
    """:func:`fsc_resolution_A` with shells below ``first_shell`` counted as passing; NaN without a curve."""
    if curve is None:
        return float("nan")
    passing = curve.clone()
    if first_shell > 1:
        passing[:first_shell] = torch.clamp(passing[:first_shell], min=threshold + 1e-9)
    return fsc_resolution_A(passing, voxel_size_A, threshold, box_size_px=box_px)


def _max_shift_vox(max_shift_A, shape, voxel_size_A: float) -> tuple[float, float, float]:
    """(z, y, x) search limit in voxels from one value or (x, y, z) Å; default a quarter of each extent."""
    if max_shift_A is None:
        return tuple(0.25 * n for n in shape)
    x_A, y_A, z_A = (float(max_shift_A),) * 3 if np.isscalar(max_shift_A) else tuple(float(v) for v in max_shift_A)
    return (z_A / voxel_size_A, y_A / voxel_size_A, x_A / voxel_size_A)


def _check_inputs(tomogram, true_volume, voxel_size_A, resolution_A, contrast_sign) -> None:
    if tomogram.ndim != 3 or tuple(tomogram.shape) != tuple(true_volume.shape):
        raise TomopipeError(f"score_tomogram: need two volumes [z, y, x] of one shape, got "
                            f"{tuple(tomogram.shape)} and {tuple(true_volume.shape)}")
    if contrast_sign not in (-1, 1):
        raise TomopipeError(f"score_tomogram: contrast_sign must be -1 or +1, got {contrast_sign!r}")
    if voxel_size_A <= 0 or resolution_A < 2 * voxel_size_A * (1 - 1e-9):
        raise TomopipeError(f"score_tomogram: resolution_A ({resolution_A}) must be at least Nyquist "
                            f"(2 x the voxel size {voxel_size_A} Å)")
    if not bool(torch.isfinite(tomogram).all()):
        raise TomopipeError("score_tomogram: the tomogram has NaN or infinite values")
    if float(true_volume.abs().max()) == 0.0:
        raise TomopipeError("score_tomogram: the true volume is empty (no particle inside the tomogram box?)")


def score_tomogram(
    tomogram: torch.Tensor,
    true_volume: torch.Tensor,
    voxel_size_A: float,
    resolution_A: float,
    contrast_sign: int = -1,
    max_shift_A: float | tuple[float, float, float] | None = None,
    edge_px: int = 4,
    fsc_from_A: float = 200.0,
    mirror: bool = True,
    with_fsc: bool = True,
) -> TomogramScore:
    """Correlation and FSC of ``tomogram`` against ``true_volume`` (same shape ``[z, y, x]`` and
    voxel size) after the best translation, and the same for the tomogram mirrored along z.

    ``resolution_A``: low-pass of the translation search and of the correlation. ``max_shift_A``:
    largest translation searched, one value or (x, y, z); default a quarter of each extent.
    ``contrast_sign``: sign of protein in the tomogram (-1: raw phase contrast, protein dark).
    ``fsc_from_A``: the 0.5 / 0.143 crossings are searched from this resolution on (the coarser
    shells hold too few coefficients for a stable FSC). ``mirror=False`` skips the mirror image
    (its fields are None); ``with_fsc=False`` skips the FSC (NaN resolutions, empty curves).
    """
    _check_inputs(tomogram, true_volume, voxel_size_A, resolution_A, contrast_sign)
    max_shift_vox = _max_shift_vox(max_shift_A, tomogram.shape, voxel_size_A)
    signed_tomogram = tomogram.to(torch.float32) * float(contrast_sign)
    truth = true_volume.to(device=signed_tomogram.device, dtype=torch.float32)
    direct = _compare(signed_tomogram, truth, voxel_size_A, resolution_A, max_shift_vox, edge_px, with_fsc)
    first_shell = int(math.ceil(direct.cube_px * voxel_size_A / fsc_from_A)) if fsc_from_A > 0 else 0

    def crossing_A(comparison: _Comparison, threshold: float) -> float:
        return _crossing_A(comparison.fsc_curve, voxel_size_A, threshold, direct.cube_px, first_shell)

    def curve_list(comparison: _Comparison | None) -> list[float]:
        return [] if comparison is None or comparison.fsc_curve is None else comparison.fsc_curve.tolist()

    mirrored = None
    if mirror:
        mirrored = _compare(torch.flip(signed_tomogram, dims=(0,)), truth, voxel_size_A, resolution_A,
                            max_shift_vox, edge_px, with_fsc)
    return TomogramScore(
        resolution_limit_A=float(resolution_A), contrast_sign=int(contrast_sign),
        translation_A=direct.translation_A, correlation=direct.correlation,
        fsc_0_5_A=crossing_A(direct, 0.5), fsc_0_143_A=crossing_A(direct, 0.143),
        mirrored_translation_A=None if mirrored is None else mirrored.translation_A,
        mirrored_correlation=None if mirrored is None else mirrored.correlation,
        mirrored_fsc_0_5_A=None if mirrored is None else crossing_A(mirrored, 0.5),
        mirrored_fsc_0_143_A=None if mirrored is None else crossing_A(mirrored, 0.143),
        fsc_curve=curve_list(direct), mirrored_fsc_curve=curve_list(mirrored),
        fsc_frequencies_per_A=shell_frequencies_per_A(direct.cube_px, voxel_size_A).tolist() if with_fsc else [])


def _best_tilt_offset_deg(correlation_at, search_deg: float, step_deg: float) -> float:
    """The turn δ within ±``search_deg`` (grid of ``step_deg``, refined by a parabola) that
    maximises ``correlation_at(δ)``."""
    if step_deg <= 0:
        raise TomopipeError(f"tilt_offset_step_deg must be > 0, got {step_deg}")
    count = int(math.floor(search_deg / step_deg + 1e-9))
    offsets_deg = [k * step_deg for k in range(-count, count + 1)]
    correlations = [correlation_at(offset) for offset in offsets_deg]
    best = int(np.argmax(correlations))
    if 0 < best < len(offsets_deg) - 1:
        return offsets_deg[best] + step_deg * float(parabolic_offset(*correlations[best - 1:best + 2]))
    return offsets_deg[best]


def score_tomogram_against_truth(tomogram: torch.Tensor, voxel_size_A: float, truth: Truth, ts_id: str,
                                 resolution_A: float, contrast_sign: int = -1, max_shift_A=None,
                                 tilt_offset_search_deg: float = 0.0, tilt_offset_step_deg: float = 1.0
                                 ) -> TomogramScore:
    """:func:`score_tomogram` of one tomogram ``[z, y, x]`` against the truth of ``ts_id``.

    ``tilt_offset_search_deg`` > 0 also searches a rotation δ of the truth about the tilt axis
    within ±that range (grid of ``tilt_offset_step_deg``, refined by a parabola): a tilt-angle
    offset leaves the projections unchanged when the specimen turns with it, so an alignment that
    refines the tilt offset fixes the specimen only up to such a turn (δ = true tilt − our tilt).
    The score is then the one at the best δ (``tilt_offset_deg``).
    """
    shape = tuple(tomogram.shape)

    def correlation_at(offset_deg: float) -> float:
        volume = true_specimen_for_tomogram(truth, ts_id, shape, voxel_size_A, offset_deg, tomogram.device)
        return score_tomogram(tomogram, volume, voxel_size_A, resolution_A, contrast_sign, max_shift_A,
                              mirror=False, with_fsc=False).correlation

    best_deg = 0.0
    if tilt_offset_search_deg > 0:
        best_deg = _best_tilt_offset_deg(correlation_at, tilt_offset_search_deg, tilt_offset_step_deg)
    true_volume = true_specimen_for_tomogram(truth, ts_id, shape, voxel_size_A, best_deg, tomogram.device)
    score = score_tomogram(tomogram, true_volume, voxel_size_A, resolution_A, contrast_sign, max_shift_A)
    return replace(score, tilt_offset_deg=round(float(best_deg), 3))


def score_tomogram_set(items, project, truth: Truth, resolution_A: float, contrast_sign: int = -1,
                       tilt_offset_search_deg: float = 0.0) -> dict[str, TomogramScore]:
    """Scores of every tomogram of a ``tomograms`` set (items with ``ts_id, tomogram_path,
    voxel_size_A``; paths relative to ``project``), by tilt series."""
    scores = {}
    for row in items.itertuples(index=False):
        data, _ = read_mrc(project.absolute_path(row.tomogram_path))
        tomogram = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        scores[row.ts_id] = score_tomogram_against_truth(
            tomogram, float(row.voxel_size_A), truth, row.ts_id, resolution_A, contrast_sign,
            tilt_offset_search_deg=tilt_offset_search_deg)
    return scores
