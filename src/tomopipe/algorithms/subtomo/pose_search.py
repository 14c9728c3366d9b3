"""Pose search of 3-D auto-refine on 2-D pseudo-subtomograms (RELION 5 ``relion_refine --ios`` with 2-D stacks).

Model (conventions of :mod:`tomopipe.algorithms.subtomo.extract` and ``steps/reconstruct_particle.py``): a
particle with orientation A (reference -> particle, ``A = euler_relion_to_matrix(rot, tilt, psi)``) and
centre ``position + t`` (t the 3-D shift in Å, **tomogram frame**; RELION puts the centre at the coordinate
minus ``rlnOriginX/Y/ZAngst``, so its origin is ``−t``, rotated into the subtomogram frame where
``rlnTomoSubtomogramRot/Tilt/Psi`` are used) appears in tilt i as the central slice
``S_i(k) = F_ref((R_i·A)ᵀ·k)`` of the reference, moved by ``s_i = m_i·[R_i·t]_xy / pixel`` px. The
extracted crop is ``X = −CTF·D·image`` and the image is ``−CTF·D·S + N`` (protein dark), so
``X = w·S·e^{−2πi k·s/c} + CTF·D·N`` with ``w = (CTF·D)²`` (``ParticleCrops.ctf2``) and the noise of X has
power ``w·σ²(|k|)`` (σ² the power ``E|N(k)|²`` of the image noise in the unnormalised ``rfft2`` of the
crop, per shell). Its Gaussian log-likelihood, up to a term that does not depend on the pose, is

    L(A, t) = Σ_i Σ_{0 < |k| ≤ k_max} [Re(conj(X)·S·e^{−2πi k·s/c}) − ½·w·|S|²] / σ²(|k|)

summed over the full Fourier plane (the ``rfft2`` half plane counted twice off the kx = 0 column). It
needs no division by the CTF; the DC term is left out (RELION too). With a Gaussian prior on the
previous pose (rotation angle ``σ_ang``, offset ``σ_offset``) the score is the log-posterior and the
posterior over the candidates ``∝ exp(score − max)`` gives the spread reported for the pose-change log.

Cost and choices: the slices depend on the tilt and the rotation only (one tilt series shares its
``R_i``), so a search over rotations shared by all particles (the global grid) samples ``n·R`` slices once
and scores all particles against them; local grids differ per particle and sample ``m·n·R`` slices
(RELION samples per (rotation, tilt) pair as well). The shift search is a real matrix product per
particle: the products ``conj(X)·S`` over (tilt, frequency) times the phases ``e^{−2πi k·s_i(t)/c}`` of
the candidate shifts, which depend on the tilt geometry alone. Only frequencies up to ``k_max`` enter.
:func:`coarse_to_fine_search` runs a global pass on a low-frequency band with a coarser shift grid
(frequency marching, as cryoDRGN's pose search), keeps the best rotations of each particle, scores them
at ``k_max``, then refines with local grids of finer steps around the best few (RELION's adaptive
oversampling and local searches). Rigorous branch-and-bound is not used: the bound the score allows
(``Re(conj(X)·S) − ½w|S|² ≤ |X|²/2w`` per term) is far too loose on noisy crops to prune anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms._rotation import rotation_angle_deg
from tomopipe.algorithms.fourier_slice import FourierSliceProjector
from tomopipe.algorithms.so3 import local_so3_grid, so3_grid_asymmetric
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.errors import TomopipeError

TILT_WEIGHT_FLOOR = 1e-2  #: a tilt's frequencies count while its (CTF·D)² is this share of the best tilt's

__all__ = ["ParticleStacks", "PosePrior", "PoseSearchResult", "shift_grid_A", "estimate_noise_power",
           "search_poses", "local_search", "coarse_to_fine_search"]


@dataclass(frozen=True)
class ParticleStacks:
    """The m particles of one tilt series (n tilts, crops of c px) as the search reads them.

    ``crops_ft`` ``[m, n, c, c//2+1]`` complex: ``centred_rfft2`` of the crops (particle on ``c//2``);
    ``ctf2`` ``[m, n, c, c//2+1]``: ``(CTF·D)²`` (zero for tilts not used); ``tilt_rotations`` ``[n, 3, 3]``;
    ``pixel_size_A`` of the crops; ``noise_power`` ``[S]`` or ``[n, S]``: σ² per shell ``round(|k|)``
    (module docstring), S > the largest ``k_max`` used; ``magnification`` per tilt (default 1).
    """

    crops_ft: torch.Tensor
    ctf2: torch.Tensor
    tilt_rotations: torch.Tensor
    pixel_size_A: float
    noise_power: torch.Tensor
    magnification: torch.Tensor | float = 1.0

    def __post_init__(self):
        x = self.crops_ft
        if x.ndim != 4 or not x.is_complex() or x.shape[-1] != x.shape[-2] // 2 + 1:
            raise TomopipeError(f"pose search: crops_ft must be complex [m, n, c, c//2+1], got {tuple(x.shape)} "
                                f"{x.dtype}")
        if tuple(self.ctf2.shape) != tuple(x.shape):
            raise TomopipeError(f"pose search: ctf2 {tuple(self.ctf2.shape)} differs from crops_ft {tuple(x.shape)}")
        n = x.shape[1]
        if tuple(self.tilt_rotations.shape) != (n, 3, 3):
            raise TomopipeError(f"pose search: tilt_rotations must be [{n}, 3, 3], got "
                                f"{tuple(self.tilt_rotations.shape)}")
        if not self.pixel_size_A > 0:
            raise TomopipeError(f"pose search: pixel_size_A must be > 0, got {self.pixel_size_A!r}")
        sigma2 = torch.as_tensor(self.noise_power, dtype=torch.float32)
        if sigma2.ndim == 1:
            sigma2 = sigma2.expand(n, -1)
        if sigma2.ndim != 2 or sigma2.shape[0] != n or not bool((sigma2 > 0).all()):
            raise TomopipeError(f"pose search: noise_power must be positive, [S] or [{n}, S], got "
                                f"{tuple(torch.as_tensor(self.noise_power).shape)}")
        magnification = torch.as_tensor(self.magnification, dtype=torch.float32).reshape(-1).expand(n)
        object.__setattr__(self, "noise_power", sigma2.to(x.device))
        object.__setattr__(self, "magnification", magnification.clone())

    @property
    def crop_px(self) -> int:
        return int(self.crops_ft.shape[-2])


@dataclass(frozen=True)
class PosePrior:
    """Gaussian prior on the previous pose: ``rotations`` ``[m, 3, 3]``, ``shifts_A`` ``[m, 3]`` (tomogram
    frame), widths ``sigma_angle_deg`` (rotation angle) and ``sigma_offset_A``; ``inf`` leaves a term out."""

    rotations: torch.Tensor
    shifts_A: torch.Tensor
    sigma_angle_deg: float
    sigma_offset_A: float


@dataclass(frozen=True)
class PoseSearchResult:
    """Per particle: the ``keep`` best rotations ``[m, k, 3, 3]`` (best first) with the best shift of each
    ``[m, k, 3]`` (Å, tomogram frame) and their scores ``[m, k]`` (log-posterior up to a constant);
    the posterior spread over all candidates: rotation angle from the best (deg, modulo the symmetry
    given) and offset from the best shift (Å), root-mean-square."""

    rotations: torch.Tensor
    shifts_A: torch.Tensor
    scores: torch.Tensor
    angular_spread_deg: torch.Tensor
    offset_spread_A: torch.Tensor

    @property
    def best_rotations(self) -> torch.Tensor:
        return self.rotations[:, 0]

    @property
    def best_shifts_A(self) -> torch.Tensor:
        return self.shifts_A[:, 0]


def shift_grid_A(range_A: float, step_A: float) -> torch.Tensor:
    """3-D shifts ``[T, 3]`` (float64, Å) on a cubic grid of ``step_A`` within the ball of ``range_A``, zero
    first (RELION's ``offset_range`` / ``offset_step``, in 3-D)."""
    if not (range_A >= 0 and step_A > 0):
        raise TomopipeError(f"pose search: need offset range >= 0 and step > 0, got {range_A!r}, {step_A!r}")
    k = math.floor(range_A / step_A + 1e-9)
    axis = torch.arange(-k, k + 1, dtype=torch.float64) * step_A
    grid = torch.cartesian_prod(axis, axis, axis).reshape(-1, 3)
    norm = grid.norm(dim=-1)
    grid = grid[norm <= range_A * (1 + 1e-9) + 1e-12]
    return grid[torch.argsort(grid.norm(dim=-1), stable=True)]


def _frequency_radius(c: int, device) -> torch.Tensor:
    """|k| ``[c, c//2+1]`` in cycles per box of the ``rfft2`` grid of a c-px crop."""
    ky = torch.fft.fftfreq(c, d=1.0 / c, device=device)[:, None]
    kx = torch.fft.rfftfreq(c, d=1.0 / c, device=device)[None, :]
    return torch.sqrt(kx**2 + ky**2)


def estimate_noise_power(crops_ft: torch.Tensor, ctf2: torch.Tensor, predicted_ft: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """σ² per shell ``[c//2+1]`` (module docstring) from crops ``[..., c, c//2+1]`` and their ``(CTF·D)²``:
    ``Σ|X − w·P|² / Σ w`` over each shell ``round(|k|)``, unbiased since ``E|X − w·P|² = w·σ²``. ``predicted_ft``
    the slices P of the current poses; None uses ``|X|²`` (signal included: RELION's first iteration)."""
    c = crops_ft.shape[-2]
    residual = crops_ft if predicted_ft is None else crops_ft - ctf2 * predicted_ft
    shell = torch.round(_frequency_radius(c, crops_ft.device)).long().clamp(max=c // 2).reshape(-1)
    power = residual.abs().square().reshape(-1, shell.numel()).sum(0).double()
    weight = ctf2.reshape(-1, shell.numel()).sum(0).double()
    num = torch.zeros(c // 2 + 1, dtype=torch.float64, device=crops_ft.device).index_add_(0, shell, power)
    den = torch.zeros_like(num).index_add_(0, shell, weight)
    if not bool((den[1:] > 0).all()):
        raise TomopipeError("pose search: a frequency shell has no CTF weight: cannot estimate its noise power")
    return (num / den.clamp(min=1e-30)).float()


@dataclass(frozen=True)
class _Band:
    """The frequencies ``0 < |k| ≤ k_max`` of the crop's ``rfft2`` grid: flat ``index`` ``[K]``, ``kx``, ``ky``
    (cycles per box), ``weight_per_tilt`` ``[n, K]``: the half-plane multiplicity over σ², and ``tilt_radius``
    ``[n]``: each tilt's own band limit (:func:`_tilt_radii`), the slices being zero beyond it."""

    index: torch.Tensor
    kx: torch.Tensor
    ky: torch.Tensor
    weight_per_tilt: torch.Tensor
    tilt_radius: torch.Tensor


def _band(data: ParticleStacks, max_frequency_px: float) -> _Band:
    c = data.crop_px
    device = data.crops_ft.device
    if not 0 < max_frequency_px < c // 2:
        raise TomopipeError(f"pose search: max_frequency_px must be in (0, {c // 2}) for crops of {c} px, "
                            f"got {max_frequency_px!r}")
    radius = _frequency_radius(c, device)
    index = torch.nonzero(((radius > 0) & (radius <= max_frequency_px)).reshape(-1)).reshape(-1)
    ky = torch.fft.fftfreq(c, d=1.0 / c, device=device)[:, None].expand(c, c // 2 + 1).reshape(-1)[index]
    kx = torch.fft.rfftfreq(c, d=1.0 / c, device=device)[None, :].expand(c, c // 2 + 1).reshape(-1)[index]
    shell = torch.round(radius.reshape(-1)[index]).long()
    if int(shell.max()) >= data.noise_power.shape[1]:
        raise TomopipeError(f"pose search: noise_power has {data.noise_power.shape[1]} shells, the band up to "
                            f"{max_frequency_px} px needs {int(shell.max()) + 1}")
    multiplicity = torch.where(kx == 0, 1.0, 2.0)
    return _Band(index, kx, ky, multiplicity[None] / data.noise_power[:, shell],
                 _tilt_radii(data, shell, index, max_frequency_px))


def _tilt_radii(data: ParticleStacks, shell: torch.Tensor, index: torch.Tensor, max_frequency_px: float
                ) -> torch.Tensor:
    """Each tilt's band limit ``[n]``: the last shell where its mean ``(CTF·D)²`` over the particles is at
    least :data:`TILT_WEIGHT_FLOOR` of the best tilt's (dose weighting makes the late tilts' high frequencies
    weigh nothing: leaving them out saves their slices and changes the scores by less than that share)."""
    n = data.crops_ft.shape[1]
    weight = data.ctf2.reshape(*data.ctf2.shape[:2], -1)[..., index].sum(0)  # [n, K]
    per_shell = torch.zeros((n, int(shell.max()) + 1), dtype=torch.float64, device=weight.device)
    per_shell.index_add_(1, shell.to(weight.device), weight.double())
    kept = per_shell >= TILT_WEIGHT_FLOOR * per_shell.amax(0, keepdim=True).clamp(min=1e-30)
    shells = torch.arange(per_shell.shape[1], device=weight.device)
    last = torch.where(kept, shells, -1).amax(1).double() + 0.5
    return last.clamp(max=max_frequency_px).float().cpu()


def _slices(projector: FourierSliceProjector, rotations: torch.Tensor, magnification: torch.Tensor, band: _Band,
            batch: int = 4096) -> torch.Tensor:
    """Slices ``[..., n, K]`` on the band (each tilt within its own radius) for rotations ``[..., n, 3, 3]``
    (reference -> tilt image) with the tilts' magnification ``[n]`` (image = projection(x/m): ``m²·F(m·k)``)."""
    shape = rotations.shape[:-2]
    flat = rotations.reshape(-1, 3, 3)
    mag = magnification.to(flat.device).expand(*shape).reshape(-1)
    radius = band.tilt_radius.to(flat.device).expand(*shape).reshape(-1)
    scaled = bool((magnification != 1).any())
    out = []
    for start in range(0, flat.shape[0], batch):
        sl = slice(start, start + batch)
        values = projector.slices_at(flat[sl], mag[sl], band.kx, band.ky, radius[sl]).to(band.index.device)
        out.append(values * (mag[sl] ** 2).to(values.device)[:, None] if scaled else values)
    return torch.cat(out).reshape(*shape, -1)


def _phases(data: ParticleStacks, shifts_A: torch.Tensor, band: _Band) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[..., n·K, T]`` of ``−2π k·s_i(t)/c`` for shifts ``[..., T, 3]`` (Å, tomogram frame)."""
    device = band.index.device
    r = data.tilt_rotations.to(device, torch.float64)
    s = torch.einsum("iab,...tb->...ita", r[:, :2], shifts_A.to(device, torch.float64))  # [..., n, T, 2] Å
    s = s * (data.magnification.to(device, torch.float64)[:, None, None] / data.pixel_size_A)
    angle = (-2.0 * math.pi / data.crop_px) * (s[..., 0, None] * band.kx.double() + s[..., 1, None] * band.ky.double())
    angle = angle.transpose(-1, -2)  # [..., n, K, T]
    angle = angle.reshape(*angle.shape[:-3], -1, angle.shape[-1]).float()
    return torch.cos(angle), torch.sin(angle)


def _angles_deg(centres: torch.Tensor, candidates: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Misorientation ``[b, R]`` (deg, modulo ``group``) of candidates ``[b, R, 3, 3]`` from centres ``[b, 3, 3]``."""
    relative = centres.to(torch.float64)[:, None].transpose(-1, -2) @ candidates.to(torch.float64)
    return rotation_angle_deg(relative[:, :, None] @ group.to(torch.float64)).amin(dim=-1)


def _rotation_prior(candidates: torch.Tensor, prior: PosePrior | None, which: torch.Tensor, group: torch.Tensor
                    ) -> torch.Tensor | float:
    if prior is None or not math.isfinite(prior.sigma_angle_deg):
        return 0.0
    angle = _angles_deg(prior.rotations[which].to(candidates.device), candidates, group)
    return (-0.5 * (angle / prior.sigma_angle_deg) ** 2).float()[..., None]  # [b, R, 1]


def _shift_prior(shifts_A: torch.Tensor, prior: PosePrior | None, which: torch.Tensor) -> torch.Tensor | float:
    if prior is None or not math.isfinite(prior.sigma_offset_A):
        return 0.0
    centre = prior.shifts_A[which].to(shifts_A.device, torch.float64)
    d2 = ((shifts_A.to(torch.float64) - centre[:, None]) ** 2).sum(-1)
    return (-0.5 * d2 / prior.sigma_offset_A**2).float()[:, None]  # [b, 1, T]


def _scores(slices: torch.Tensor, y: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> torch.Tensor:
    """Log-likelihoods ``[b, R, T]``: slices ``[b|1, R, n, K]``, ``y = conj(X)·weight`` and ``w = ctf2·weight``
    ``[b, n, K]``, phases ``[n·K, T]``."""
    b = y.shape[0]
    z = (slices * y[:, None]).reshape(b, slices.shape[1], -1)
    linear = z.real @ cos - z.imag @ sin  # Re(z·e^{iθ}) = Re z·cos θ − Im z·sin θ
    quadratic = 0.5 * torch.einsum("brnk,bnk->br", slices.real**2 + slices.imag**2, w)
    return linear - quadratic[..., None]


def search_poses(projector: FourierSliceProjector, data: ParticleStacks, rotations: torch.Tensor,
                 shifts_A: torch.Tensor, max_frequency_px: float, *, centre_shifts_A: torch.Tensor | None = None,
                 prior: PosePrior | None = None, symmetry: str = "C1", keep: int = 1, batch_particles: int = 8,
                 batch_rotations: int = 256) -> PoseSearchResult:
    """Score every candidate (rotation, shift) of every particle (module docstring) and rank the rotations.

    ``projector``: the reference (box = the crop size, same voxel size). ``rotations``: ``[R, 3, 3]`` shared
    by all particles (slices sampled once) or ``[m, R, 3, 3]`` per particle; candidate shifts (Å, tomogram
    frame): ``centre_shifts_A`` ``[m, 3]`` (default 0) plus the offsets ``shifts_A`` ``[T, 3]`` (their phases
    are shared: a particle's centre shift moves its crops instead, ``e^{−2πi k·s(c + δ)} = e^{−2πi k·s(c)}·
    e^{−2πi k·s(δ)}``). ``max_frequency_px``: the band limit in cycles per box.
    ``symmetry``: the point group for the angular spread. Returns the ``keep`` best rotations per
    particle with their best shifts.
    """
    m, n, c = data.crops_ft.shape[0], data.crops_ft.shape[1], data.crop_px
    if projector.n != c:
        raise TomopipeError(f"pose search: the reference box ({projector.n} px) differs from the crops ({c} px)")
    if abs(projector.pixel_size_A - data.pixel_size_A) > 1e-3 * data.pixel_size_A:
        raise TomopipeError(f"pose search: the reference's voxel size ({projector.pixel_size_A:.4g} Å) differs "
                            f"from the crops' pixel ({data.pixel_size_A:.4g} Å)")
    shared = rotations.ndim == 3
    if rotations.shape[-2:] != (3, 3) or (not shared and (rotations.ndim != 4 or rotations.shape[0] != m)):
        raise TomopipeError(f"pose search: rotations must be [R, 3, 3] or [{m}, R, 3, 3], got {tuple(rotations.shape)}")
    if shifts_A.ndim != 2 or shifts_A.shape[-1] != 3:
        raise TomopipeError(f"pose search: shifts_A must be [T, 3], got {tuple(shifts_A.shape)}")
    if centre_shifts_A is not None and tuple(centre_shifts_A.shape) != (m, 3):
        raise TomopipeError(f"pose search: centre_shifts_A must be [{m}, 3], got {tuple(centre_shifts_A.shape)}")
    device = data.crops_ft.device
    band = _band(data, max_frequency_px)
    group = symmetry_group(symmetry).to(device)
    tilts = data.tilt_rotations.to(device, torch.float32)
    rot = rotations.to(device, torch.float64)
    shared_slices = _slices(projector, tilts[None] @ rot[:, None].float(), data.magnification, band) if shared else None
    offsets = shifts_A.to(device, torch.float64)
    cos, sin = _phases(data, offsets, band)
    centres = (torch.zeros((m, 3), dtype=torch.float64, device=device) if centre_shifts_A is None
               else centre_shifts_A.to(device, torch.float64))
    keep = min(keep, rot.shape[-3])
    outputs = {name: [] for name in ("rotations", "shifts", "scores", "angle", "offset")}
    for start in range(0, m, batch_particles):
        which = torch.arange(start, min(start + batch_particles, m), device=device)
        x = data.crops_ft[which].reshape(len(which), n, -1)[..., band.index]
        w = data.ctf2[which].reshape(len(which), n, -1)[..., band.index]
        y = x.conj() * band.weight_per_tilt
        if centre_shifts_A is not None:
            y = y * torch.complex(*_phases(data, centres[which, None], band)).reshape(y.shape)
        wq = w * band.weight_per_tilt
        candidates = rot[which] if not shared else rot[None].expand(len(which), -1, -1, -1)
        shifts = centres[which, None] + offsets  # [b, T, 3]
        table = []
        for r0 in range(0, candidates.shape[1], batch_rotations):
            slices = (shared_slices[None, r0:r0 + batch_rotations] if shared else
                      _slices(projector, tilts[None, None] @ candidates[:, r0:r0 + batch_rotations, None].float(),
                              data.magnification, band))
            table.append(_scores(slices, y, wq, cos, sin))
        score = torch.cat(table, dim=1) + _rotation_prior(candidates, prior, which, group)
        score = score + _shift_prior(shifts, prior, which)
        _rank(score, candidates, shifts, keep, group, outputs)
    return PoseSearchResult(*(torch.cat(outputs[k]) for k in ("rotations", "shifts", "scores", "angle", "offset")))


def _rank(score: torch.Tensor, candidates: torch.Tensor, shifts: torch.Tensor, keep: int, group: torch.Tensor,
          outputs: dict) -> None:
    """Best ``keep`` rotations (with their best shifts) and the posterior spreads of one particle batch."""
    b = score.shape[0]
    per_rotation, best_shift = score.max(dim=2)  # [b, R]
    top_scores, top = per_rotation.topk(keep, dim=1)
    rows = torch.arange(b, device=score.device)[:, None]
    top_rot = candidates[rows, top]
    top_shift = shifts[rows, best_shift[rows, top]]
    posterior = torch.softmax(score.double().reshape(b, -1), dim=1).reshape(score.shape)
    p_rot, p_shift = posterior.sum(2), posterior.sum(1)
    angle = _angles_deg(top_rot[:, 0], candidates, group)
    offset2 = ((shifts.to(torch.float64) - top_shift[:, :1].to(torch.float64)) ** 2).sum(-1)
    outputs["rotations"].append(top_rot.to(torch.float64))
    outputs["shifts"].append(top_shift.to(torch.float64))
    outputs["scores"].append(top_scores)
    outputs["angle"].append(torch.sqrt((p_rot * angle**2).sum(1)))
    outputs["offset"].append(torch.sqrt((p_shift * offset2).sum(1)))


def local_search(projector: FourierSliceProjector, data: ParticleStacks, centres: torch.Tensor,
                 centre_shifts_A: torch.Tensor, step_deg: float, max_angle_deg: float, offset_range_A: float,
                 offset_step_A: float, max_frequency_px: float, alternate: bool = False,
                 **options) -> PoseSearchResult:
    """Search local grids (:func:`~tomopipe.algorithms.so3.local_so3_grid` of ``step_deg`` within
    ``max_angle_deg``) around each particle's ``centres`` ``[m, C, 3, 3]``, with shifts of ``offset_step_A``
    within ``offset_range_A`` of ``centre_shifts_A`` ``[m, 3]``; ``options`` go to :func:`search_poses`.
    ``alternate``: the rotations at the current shifts, then the shifts at the best rotation (R + T
    candidates instead of R·T: for small changes of poses near convergence, which hardly couple)."""
    m, count = centres.shape[:2]
    grids = [local_so3_grid(centre, step_deg, max_angle_deg) for centre in centres.reshape(-1, 3, 3).double()]
    rotations = torch.stack(grids).reshape(m, count * grids[0].shape[0], 3, 3)
    offsets = shift_grid_A(offset_range_A, offset_step_A)
    if alternate:
        options = dict(options, keep=1)
        rotations = search_poses(projector, data, rotations, offsets[:1], max_frequency_px,
                                 centre_shifts_A=centre_shifts_A, **options).rotations
    return search_poses(projector, data, rotations, offsets, max_frequency_px, centre_shifts_A=centre_shifts_A,
                        **options)


def coarse_to_fine_search(projector: FourierSliceProjector, data: ParticleStacks, *, symmetry: str = "C1",
                          global_step_deg: float = 7.5, local_steps_deg=(3.75, 1.875), offset_range_A: float,
                          offset_step_A: float, max_frequency_px: float, marching_fraction: float = 0.5,
                          keep: int = 8, centres: int = 2, prior: PosePrior | None = None,
                          **options) -> PoseSearchResult:
    """Global search on the asymmetric unit's grid of ``global_step_deg`` and then local refinement.

    1. every grid rotation × shifts of ``offset_step_A / marching_fraction`` on the band up to
       ``marching_fraction · max_frequency_px``: the ``keep`` best rotations of each particle;
    2. those rotations × shifts of ``offset_step_A`` within ``offset_range_A`` up to ``max_frequency_px``;
    3. per step s of ``local_steps_deg``: local grids of step s within the previous step around the
       ``centres`` best rotations, shifts of the previous shift step / 2 within it around the best shift.
    ``prior`` (Gaussian on the previous pose) applies to every stage.
    """
    if not 0 < marching_fraction <= 1:
        raise TomopipeError(f"pose search: marching_fraction must be in (0, 1], got {marching_fraction!r}")
    options = dict(options, prior=prior, symmetry=symmetry)
    grid = so3_grid_asymmetric(global_step_deg, symmetry)
    coarse_step = offset_step_A / marching_fraction
    first = search_poses(projector, data, grid, shift_grid_A(offset_range_A, coarse_step),
                         marching_fraction * max_frequency_px, keep=keep, **options)
    result = search_poses(projector, data, first.rotations, shift_grid_A(offset_range_A, offset_step_A),
                          max_frequency_px, keep=keep, **options)
    previous_step, shift_step = global_step_deg, offset_step_A
    for step in local_steps_deg:
        result = local_search(projector, data, result.rotations[:, :centres], result.best_shifts_A, step,
                              previous_step, shift_step, shift_step / 2, max_frequency_px, keep=keep, **options)
        previous_step, shift_step = step, shift_step / 2
    return result
