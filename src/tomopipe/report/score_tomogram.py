"""Score a tomogram against the simulator's truth: real-space correlation and FSC after the best
translation, for the tomogram and for its mirror image (the handedness check).

The true specimen (:func:`specimen_volume`) is the particles' potential relative to the ice:
the truth map ``maps/true_map_binN.mrc`` (``V``, solvent excluded, the reference of
``particles.star``) rotated by ``A = (Rz(rot)·Ry(tilt)·Rz(psi))ᵀ`` (reference -> particle,
:func:`tomopipe.algorithms.geometry.euler_relion_to_matrix`, as the simulator applies it:
``particle(x) = map(Aᵀ·(x - c))``) and centred at ``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the
tomogram centre, z = thickness toward the source). The ice itself is left out on purpose: its
mean potential fills the slab ``|z| <= thickness/2`` uniformly, which projects to a constant in
every view (removed with the view mean; its spectrum lies on the k_z axis, inside the missing
wedge), and the simulator draws the ice fluctuations independently in every tilt, so they have
no 3-D structure a tomogram could recover.

Frames: volumes ``[z, y, x]``; the tomogram's centre voxel ``N//2`` is the centre of the RELION 5
projection model (``docs/architecture.md``), so a point at ``p`` Å from the centre sits at voxel
``p / voxel_size_A + N//2``.

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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import bandpass, fast_fft_size
from tomopipe.algorithms.fourier import cosine_edge_taper
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_frequencies_per_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix, rotation_y
from tomopipe.algorithms.peaks import parabolic_offset
from tomopipe.errors import TomopipeError

__all__ = [
    "specimen_volume",
    "fourier_upsample",
    "TomogramScore",
    "score_tomogram",
    "truth_map_for_voxel_size",
    "true_specimen_for_tomogram",
    "score_tomogram_against_truth",
    "score_tomogram_set",
]


# ----------------------------------------------------------------------------- truth volume
def fourier_upsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Band-limited interpolation of a cubic ``[n, n, n]`` volume onto a grid ``factor`` times finer
    (zero-padding its spectrum), keeping the centre voxel ``n//2`` on ``(factor·n)//2`` and the
    values (not the sum). The Nyquist plane of an even n is split between +n/2 and -n/2."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"fourier_upsample: factor must be >= 1, got {factor}")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"fourier_upsample: need a cubic volume [n, n, n], got {tuple(volume.shape)}")
    if factor == 1:
        return volume.clone()
    n = int(volume.shape[0])
    big = n * factor
    work = torch.float64 if volume.dtype == torch.float64 else torch.float32
    spec = torch.fft.fftn(torch.roll(volume.to(work), shifts=(-(n // 2),) * 3, dims=(0, 1, 2)))
    idx = torch.fft.fftfreq(n, d=1.0 / n, device=volume.device).round().long()  # signed integer frequencies
    if n % 2 == 0:  # split the Nyquist bin symmetrically so the result stays real
        for d in range(3):
            nyq = spec.narrow(d, n // 2, 1) * 0.5
            spec = torch.cat([spec.narrow(d, 0, n // 2), nyq, spec.narrow(d, n // 2 + 1, n - n // 2 - 1), nyq], dim=d)
        idx = torch.cat([idx[: n // 2], torch.tensor([-(n // 2)], device=idx.device), idx[n // 2 + 1:],
                         torch.tensor([n // 2], device=idx.device)])
    dest = torch.remainder(idx, big)
    out = torch.zeros((big, big, big), dtype=spec.dtype, device=volume.device)
    out[dest[:, None, None], dest[None, :, None], dest[None, None, :]] = spec
    real = torch.fft.ifftn(out).real * factor**3
    return torch.roll(real, shifts=(big // 2,) * 3, dims=(0, 1, 2)).to(volume.dtype)


def specimen_volume(
    reference: torch.Tensor,
    reference_voxel_size_A: float,
    positions_A: torch.Tensor,
    rotations: torch.Tensor,
    shape: tuple[int, int, int],
    voxel_size_A: float,
    oversampling: int = 4,
    max_box_px: int = 256,
) -> torch.Tensor:
    """Volume ``[nz, ny, nx]`` (float32) holding ``reference(Aᵀ·(x - c))`` for every particle.

    ``reference`` ``[n, n, n]`` (centre voxel n//2) at ``reference_voxel_size_A``; ``positions_A``
    ``[P, 3]`` (x, y, z) Å from the volume centre (voxel N//2); ``rotations`` ``[P, 3, 3]``
    reference -> particle (RELION ``A``). The reference is first low-passed to the output grid's
    Nyquist when it is finer (no aliasing), then Fourier-interpolated ``oversampling`` times finer
    (at most ``max_box_px`` voxels) and sampled trilinearly at the output voxels (the trilinear
    attenuation at the output Nyquist is ``sinc²(1/(2·oversampling))`` ≈ 0.95 for 4).
    """
    if reference.ndim != 3 or len(set(reference.shape)) != 1:
        raise TomopipeError(f"specimen_volume: the reference must be a cubic volume, got {tuple(reference.shape)}")
    if reference_voxel_size_A <= 0 or voxel_size_A <= 0:
        raise TomopipeError(f"specimen_volume: voxel sizes must be > 0, got {reference_voxel_size_A}, {voxel_size_A}")
    positions = torch.as_tensor(positions_A, dtype=torch.float64).reshape(-1, 3)
    rot = torch.as_tensor(rotations, dtype=torch.float64).reshape(-1, 3, 3)
    if rot.shape[0] != positions.shape[0]:
        raise TomopipeError(f"specimen_volume: {positions.shape[0]} positions but {rot.shape[0]} rotations")
    nz, ny, nx = (int(s) for s in shape)
    device = reference.device
    ref = reference.to(torch.float32)
    n = int(ref.shape[0])
    if reference_voxel_size_A < voxel_size_A * (1 - 1e-6):
        lowpass = bandpass((n, n, n), reference_voxel_size_A, high_A=2.0 * voxel_size_A).to(device)
        ref = torch.fft.irfftn(torch.fft.rfftn(ref) * lowpass, s=(n, n, n))
    factor = max(1, min(int(math.ceil(oversampling * reference_voxel_size_A / voxel_size_A - 1e-9)), max_box_px // n))
    ref = fourier_upsample(ref, factor)
    n_up = n * factor
    step_A = reference_voxel_size_A / factor
    volume = torch.zeros((nz, ny, nx), dtype=torch.float32, device=device)
    if positions.shape[0] == 0:
        return volume
    # half-width (output voxels) of the box that holds the rotated reference: the radius beyond
    # which |reference| < 1e-4 of its maximum (at most the cube's half-diagonal)
    d = (torch.arange(n_up, dtype=torch.float32, device=device) - n_up // 2) ** 2
    radius2 = d[:, None, None] + d[None, :, None] + d[None, None, :]
    significant = ref.abs() >= 1e-4 * float(ref.abs().max())
    reach_A = (math.sqrt(float(radius2[significant].max())) + 2.0) * step_A if bool(significant.any()) else 0.0
    del radius2, significant
    half = int(math.ceil(reach_A / voxel_size_A)) + 1
    centre = torch.tensor([nx // 2, ny // 2, nz // 2], dtype=torch.float64)
    ref5 = ref[None, None]
    scale = 2.0 / max(n_up - 1, 1)
    for p in range(positions.shape[0]):
        c_vox = positions[p] / voxel_size_A + centre  # (x, y, z) voxel index of the particle centre
        lo = [max(0, int(math.floor(float(c_vox[a]))) - half) for a in range(3)]
        hi = [min(size, int(math.floor(float(c_vox[a]))) + half + 1) for a, size in enumerate((nx, ny, nz))]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        # reference-frame voxel index of every output voxel: Aᵀ·(x - c) / step + n_up//2, built
        # separably from the three axes (row a of A weights offset component a)
        a_rows = (rot[p] * (scale / step_A)).to(device=device, dtype=torch.float32)  # [3 (x, y, z), 3]
        ox, oy, oz = ((torch.arange(lo[a], hi[a], dtype=torch.float64) - centre[a]) * voxel_size_A - positions[p, a]
                      for a in range(3))
        grid = (oz.to(device, torch.float32)[:, None, None, None] * a_rows[2]
                + oy.to(device, torch.float32)[None, :, None, None] * a_rows[1]
                + ox.to(device, torch.float32)[None, None, :, None] * a_rows[0]
                + (n_up // 2) * scale - 1.0)[None]
        sampled = F.grid_sample(ref5, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        volume[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] += sampled
    return volume


# ----------------------------------------------------------------------------- scores
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


def _padded(volume: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32, device=volume.device)
    nz, ny, nx = volume.shape
    out[:nz, :ny, :nx] = volume
    return out


def _shift_phase(shape, shift_zyx, device) -> torch.Tensor:
    """rfftn-grid phase ramp that moves content by ``shift_zyx`` voxels (complex64)."""
    phase = torch.zeros((), dtype=torch.float64, device=device)
    for d, (n, s) in enumerate(zip(shape, shift_zyx)):
        k = (torch.fft.rfftfreq if d == 2 else torch.fft.fftfreq)(n, dtype=torch.float64, device=device)
        view = [1, 1, 1]
        view[d] = k.numel()
        phase = phase + (-2.0 * math.pi * float(s)) * k.reshape(view)
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def _find_translation(cc: torch.Tensor, limits) -> tuple[float, float, float]:
    """Signed (z, y, x) shift of the cross-correlation maximum within ``|shift| <= limits`` voxels,
    refined by a parabola through the peak along each axis."""
    shape = cc.shape
    picks = []
    for n, m in zip(shape, limits):
        m = min(int(m), (n - 1) // 2)
        picks.append(torch.cat([torch.arange(0, m + 1), torch.arange(n - m, n)]) if m > 0 else torch.tensor([0]))
    sub = cc[picks[0][:, None, None], picks[1][None, :, None], picks[2][None, None, :]]
    k = int(torch.argmax(sub))
    iz, rem = divmod(k, sub.shape[1] * sub.shape[2])
    iy, ix = divmod(rem, sub.shape[2])
    peak = [int(picks[0][iz]), int(picks[1][iy]), int(picks[2][ix])]
    out = []
    for d, n in enumerate(shape):
        at = list(peak)
        values = []
        for step in (-1, 0, 1):
            at[d] = (peak[d] + step) % n
            values.append(float(cc[at[0], at[1], at[2]]))
        signed = peak[d] if peak[d] <= n // 2 else peak[d] - n
        out.append(signed + float(parabolic_offset(*values)))
    return tuple(out)


def _embed_cube(volume: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad ``[nz, ny, nx]`` to ``[n, n, n]`` keeping the centre voxel N//2 on n//2."""
    out = torch.zeros((n, n, n), dtype=torch.float64, device=volume.device)
    starts = [n // 2 - s // 2 for s in volume.shape]
    nz, ny, nx = volume.shape
    out[starts[0]:starts[0] + nz, starts[1]:starts[1] + ny, starts[2]:starts[2] + nx] = volume
    return out


def _crossing_A(curve: torch.Tensor, voxel_size_A: float, threshold: float, box: int, first_shell: int) -> float:
    """:func:`fsc_resolution_A` with shells below ``first_shell`` counted as passing."""
    c = curve.clone()
    if first_shell > 1:
        c[:first_shell] = torch.clamp(c[:first_shell], min=threshold + 1e-9)
    return fsc_resolution_A(c, voxel_size_A, threshold, box_size_px=box)


def _score_one(tomogram, truth, voxel_size_A, resolution_A, max_shift_vox, edge_px, with_fsc=True):
    """(translation (x, y, z) Å, correlation, FSC curve or None, cube edge) of one tomogram."""
    shape = tuple(tomogram.shape)
    device = tomogram.device
    mask = cosine_edge_taper(shape, int(edge_px), max_edge_fraction=0.25, device=device)
    padded_shape = tuple(fast_fft_size(n + int(math.ceil(m)) + 1, even=True) for n, m in zip(shape, max_shift_vox))
    lowpass = bandpass(padded_shape, voxel_size_A, high_A=resolution_A).to(device=device, dtype=torch.float32)
    f_tomo = torch.fft.rfftn(_padded(tomogram * mask, padded_shape))
    f_true = torch.fft.rfftn(_padded(truth * mask, padded_shape))
    cc = torch.fft.irfftn(f_tomo * f_true.conj() * (lowpass * lowpass), s=padded_shape)
    shift = _find_translation(cc, max_shift_vox)
    del cc
    f_moved = f_true * _shift_phase(padded_shape, shift, device)
    del f_true
    nz, ny, nx = shape
    tomo_lp = torch.fft.irfftn(f_tomo * lowpass, s=padded_shape)[:nz, :ny, :nx]
    moved_lp = torch.fft.irfftn(f_moved * lowpass, s=padded_shape)[:nz, :ny, :nx]
    del f_tomo
    w = mask.double()
    a, b = (tomo_lp.double() * w).flatten(), (moved_lp.double() * w).flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    correlation = float((a * b).sum()) / denom if denom > 0 else 0.0
    translation_A = (shift[2] * voxel_size_A, shift[1] * voxel_size_A, shift[0] * voxel_size_A)
    cube = max(shape) + max(shape) % 2
    if not with_fsc:
        return translation_A, correlation, None, cube
    moved = torch.fft.irfftn(f_moved, s=padded_shape)[:nz, :ny, :nx]
    curve = fsc(_embed_cube(tomogram.double() * w, cube), _embed_cube(moved.double() * w, cube))
    return translation_A, correlation, curve, cube


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
    if max_shift_A is None:
        max_shift_vox = tuple(0.25 * n for n in tomogram.shape)
    else:
        xyz = (float(max_shift_A),) * 3 if np.isscalar(max_shift_A) else tuple(float(v) for v in max_shift_A)
        max_shift_vox = (xyz[2] / voxel_size_A, xyz[1] / voxel_size_A, xyz[0] / voxel_size_A)
    tomo = tomogram.to(torch.float32) * float(contrast_sign)
    truth = true_volume.to(device=tomo.device, dtype=torch.float32)
    t, c, curve, cube = _score_one(tomo, truth, voxel_size_A, resolution_A, max_shift_vox, edge_px, with_fsc)
    first_shell = int(math.ceil(cube * voxel_size_A / fsc_from_A)) if fsc_from_A > 0 else 0

    def res(cv, threshold):
        return float("nan") if cv is None else _crossing_A(cv, voxel_size_A, threshold, cube, first_shell)

    mirrored = dict(mirrored_translation_A=None, mirrored_correlation=None, mirrored_fsc_0_5_A=None,
                    mirrored_fsc_0_143_A=None)
    mcurve = None
    if mirror:
        mt, mc, mcurve, _ = _score_one(torch.flip(tomo, dims=(0,)), truth, voxel_size_A, resolution_A,
                                       max_shift_vox, edge_px, with_fsc)
        mirrored = dict(mirrored_translation_A=tuple(round(v, 3) for v in mt), mirrored_correlation=mc,
                        mirrored_fsc_0_5_A=res(mcurve, 0.5), mirrored_fsc_0_143_A=res(mcurve, 0.143))
    return TomogramScore(
        resolution_limit_A=float(resolution_A), contrast_sign=int(contrast_sign),
        translation_A=tuple(round(v, 3) for v in t), correlation=c,
        fsc_0_5_A=res(curve, 0.5), fsc_0_143_A=res(curve, 0.143), **mirrored,
        fsc_curve=[] if curve is None else curve.tolist(),
        mirrored_fsc_curve=[] if mcurve is None else mcurve.tolist(),
        fsc_frequencies_per_A=shell_frequencies_per_A(cube, voxel_size_A).tolist() if with_fsc else [])


# ----------------------------------------------------------------------------- the simulator's truth
def truth_map_for_voxel_size(truth, voxel_size_A: float) -> tuple[torch.Tensor, float]:
    """The coarsest ``maps/true_map_binN.mrc`` whose voxel is not larger than ``voxel_size_A``:
    ``(map [n, n, n] float32, its voxel size Å)``."""
    from tomopipe.io.mrc import read_mrc_header, read_mrc

    candidates = []
    for path in sorted((Path(truth.folder) / "maps").glob("true_map_bin*.mrc")):
        candidates.append((float(read_mrc_header(path)["voxel_size_A"]), path))
    usable = [(v, p) for v, p in candidates if v <= voxel_size_A * (1 + 1e-4)]
    if not usable:
        raise TomopipeError(f"{truth.folder}/maps: no true map with a voxel size <= {voxel_size_A} Å "
                            f"(have {sorted(v for v, _ in candidates)})")
    v, path = max(usable)
    data, voxel = read_mrc(path)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), float(voxel)


def true_specimen_for_tomogram(truth, ts_id: str, shape, voxel_size_A: float, tilt_offset_deg: float = 0.0,
                               device="cpu") -> torch.Tensor:
    """The true specimen of tilt series ``ts_id`` on a tomogram grid ``[nz, ny, nx]`` at ``voxel_size_A``
    (particles of ``particles.star`` rotated and placed as the simulator did), optionally turned by
    ``Ry(tilt_offset_deg)`` about the tilt axis (y) through the tomogram centre."""
    particles = truth.particles
    mine = particles[particles["rlnTomoName"] == ts_id]
    if mine.empty:
        raise TomopipeError(f"{truth.folder}/particles.star: no particle of tilt series {ts_id!r}")
    positions = torch.tensor(mine[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                                   "rlnCenteredCoordinateZAngst"]].to_numpy(float), dtype=torch.float64)
    rotations = euler_relion_to_matrix(*(torch.tensor(mine[c].to_numpy(float), dtype=torch.float64)
                                         for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    if tilt_offset_deg:
        turn = rotation_y(torch.tensor(float(tilt_offset_deg), dtype=torch.float64))
        positions, rotations = positions @ turn.T, turn @ rotations
    reference, reference_voxel_A = truth_map_for_voxel_size(truth, voxel_size_A)
    return specimen_volume(reference.to(device), reference_voxel_A, positions, rotations, tuple(shape), voxel_size_A)


def score_tomogram_against_truth(tomogram: torch.Tensor, voxel_size_A: float, truth, ts_id: str,
                                 resolution_A: float, contrast_sign: int = -1, max_shift_A=None,
                                 tilt_offset_search_deg: float = 0.0, tilt_offset_step_deg: float = 1.0
                                 ) -> TomogramScore:
    """:func:`score_tomogram` of one tomogram ``[z, y, x]`` against the truth of ``ts_id``
    (``truth``: a :class:`tomopipe.report.truth.Truth`).

    ``tilt_offset_search_deg`` > 0 also searches a rotation δ of the truth about the tilt axis
    within ±that range (grid of ``tilt_offset_step_deg``, refined by a parabola): a tilt-angle
    offset leaves the projections unchanged when the specimen turns with it, so an alignment that
    refines the tilt offset fixes the specimen only up to such a turn (δ = true tilt − our tilt).
    The score is then the one at the best δ (``tilt_offset_deg``).
    """
    shape = tuple(tomogram.shape)

    def correlation_at(delta: float) -> float:
        volume = true_specimen_for_tomogram(truth, ts_id, shape, voxel_size_A, delta, tomogram.device)
        return score_tomogram(tomogram, volume, voxel_size_A, resolution_A, contrast_sign, max_shift_A,
                              mirror=False, with_fsc=False).correlation

    best = 0.0
    if tilt_offset_search_deg > 0:
        if tilt_offset_step_deg <= 0:
            raise TomopipeError(f"tilt_offset_step_deg must be > 0, got {tilt_offset_step_deg}")
        count = int(math.floor(tilt_offset_search_deg / tilt_offset_step_deg + 1e-9))
        grid = [k * tilt_offset_step_deg for k in range(-count, count + 1)]
        values = [correlation_at(d) for d in grid]
        i = int(np.argmax(values))
        best = grid[i]
        if 0 < i < len(grid) - 1:
            best = grid[i] + tilt_offset_step_deg * float(parabolic_offset(values[i - 1], values[i], values[i + 1]))
    true_volume = true_specimen_for_tomogram(truth, ts_id, shape, voxel_size_A, best, tomogram.device)
    score = score_tomogram(tomogram, true_volume, voxel_size_A, resolution_A, contrast_sign, max_shift_A)
    return replace(score, tilt_offset_deg=round(float(best), 3))


def score_tomogram_set(items, project, truth, resolution_A: float, contrast_sign: int = -1,
                       tilt_offset_search_deg: float = 0.0) -> dict:
    """Scores of every tomogram of a ``tomograms`` set (items with ``ts_id, tomogram_path,
    voxel_size_A``; paths relative to ``project``): ``{ts_id: TomogramScore.summary()}``."""
    from tomopipe.io.mrc import read_mrc

    out = {}
    for row in items.itertuples(index=False):
        data, _ = read_mrc(project.absolute_path(row.tomogram_path))
        tomogram = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        score = score_tomogram_against_truth(tomogram, float(row.voxel_size_A), truth, row.ts_id, resolution_A,
                                             contrast_sign, tilt_offset_search_deg=tilt_offset_search_deg)
        out[row.ts_id] = score.summary()
    return out


def main(argv=None) -> int:
    """``python -m tomopipe.report.score_tomogram PROJECT RUN TRUTH_DIR [--resolution-A 30]``."""
    import argparse
    import json

    from tomopipe.project.store import Project
    from tomopipe.report.truth import Truth

    parser = argparse.ArgumentParser(description="Score the tomograms of a run against the simulator's truth.")
    parser.add_argument("project")
    parser.add_argument("run", type=int, help="run id of a reconstruct_tomogram run")
    parser.add_argument("truth", help="simulated data folder (or its truth/ folder)")
    parser.add_argument("--resolution-A", type=float, default=30.0, help="low-pass of the correlation (Å)")
    parser.add_argument("--contrast-sign", type=int, default=-1, choices=(-1, 1))
    parser.add_argument("--tilt-offset-search-deg", type=float, default=0.0,
                        help="also search a turn of the truth about the tilt axis within +-this (degrees)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    project = Project.open(args.project)
    sets = project.sets_of_run(args.run)
    if "tomograms" not in sets:
        raise TomopipeError(f"run {args.run} has no 'tomograms' output (it has {sorted(sets)})")
    scores = score_tomogram_set(project.read_items(sets["tomograms"].id), project, Truth.find(args.truth),
                                args.resolution_A, args.contrast_sign, args.tilt_offset_search_deg)
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
