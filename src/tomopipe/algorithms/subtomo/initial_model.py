"""De novo initial model from 3-D pseudo-subtomograms (RELION's VDAM-like gradient refinement), volume alignment.

Conventions. Particle spectra ``data_ft`` ``[m, N, N, N//2+1]`` (Σ CTF·F inserted, the rfftn of the
pseudo-subtomogram with its centre voxel N//2 moved to the origin: ``FourierAccumulator.data``)
and ``weights`` (Σ CTF²) are in the TOMOGRAM frame at the particle (from the 3-D extraction's files:
``torch.fft.rfftn(torch.fft.ifftshift(data_volume))`` and the Σ CTF² half spectrum of the
particle's weights, model/subtomograms.py). A pose (A, t): A ``[3, 3]``
maps reference -> particle (``x_tomo = position + t + A·x_ref``), so the particle's spectrum is
``W(k)·X(Aᵀk)·exp(-2πi k·t/N)`` plus noise of variance ``W(k)·σ²(|k|)`` (Fourier indices k
(x, y, z) of the N box, t in px). ``offsets_A`` of the result are t in Å (x, y, z): RELION's
``rlnOriginX/Y/ZAngst`` are ``-offsets_A``.

Each mini-batch (E step): the reference X (kept in real space, zero-padded twice and
pre-divided by the trilinear kernel's ``sinc²`` before its FFT, so that trilinear samples of
its spectrum, ``grid_sample`` on CPU and GPU alike, are accurate) is sampled at ``Rᵀk`` for
every rotation R of a near-uniform grid of
the symmetry's asymmetric unit (:func:`~tomopipe.algorithms.so3.so3_grid_asymmetric`, step from
the current resolution by Crowther's rule, randomly perturbed each mini-batch), on the N-box
frequencies ``1 ≤ |k| ≤ r`` only (r the current resolution's radius). The log-likelihood of
particle i, rotation R and integer offset t is
``Σ_k h(k)/σ²(k)·[Re(conj(D_i(k) e^{2πik·t/N}) X_R(k)) - ½ W_i(k)|X_R(k)|²]`` (h = ½ on the plane
kx = 0, which the half spectrum holds twice): two real matrix products, [b·T, 2S] × [2S, R] and
[b, S] × [S, R] (b particles, T offsets, S frequencies, R rotations). The rotated references are
computed once per mini-batch and shared by all its particles (rotating the reference R times
costs R·S samples; rotating each particle would cost b·R·S, so this wins for any b > 1). The
best offset per rotation is kept; each particle's ``max_poses`` best rotations get posterior
weights (softmax of their log-likelihoods, plus a Gaussian tilt prior when given, over an
annealing temperature): RELION's "significant weights", the rest of the posterior being
negligible at these likelihood scales.

M step (the gradient): each weighted pose gathers the particle's spectrum at ``A·k`` for the
reference-frame k (sums of ``D/σ²`` and ``W/σ²``: the two parts of the log-likelihood's gradient
``Σ (D - W X)/σ²`` and its diagonal curvature); the sums are symmetrised (every pose A also
counts as A·g, :func:`_symmetrised`) and scaled to the whole data set (× m/b). Their exponential
moving averages (momentum ``momentum``, bias-corrected per voxel: Adam's first moment) give the
preconditioned step ``X = ⟨D/σ²⟩ / (⟨W/σ²⟩ + 1/τ²)``: a Newton step on the regularised
log-posterior, with τ² = T × the shell power of the previous reference (T, RELION's
``--tau2_fudge``, larger = more weight on the data). The new reference is multiplied by the soft
spherical mask (solvent flattened to zero, as RELION's ``--zero_mask``).
The noise σ²(shell) is the moving average of the best poses' residuals ``|D - W·X_R|² / W``.

Tilt prior (RELION 5 ``--sigma_tilt``): a Gaussian prior of width ``sigma_tilt_deg`` on each
particle's tilt Euler angle (``acos(A[2, 2])``) about its ``tilt_prior_deg`` (rlnAngleTiltPrior,
e.g. 90° for particles whose reference z axis is known to lie in the tomogram's xy plane), the
closest symmetry mate counting. As in RELION, the prior only applies to particles that carry a
prior tilt: without ``tilt_prior_deg`` the width is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms._rotation import rotation_vector_to_matrix
from tomopipe.algorithms.fourier import embed_centered
from tomopipe.algorithms.fourier_slice import gridding_kernel
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.algorithms.so3 import crowther_angular_step_deg, local_so3_grid, so3_grid_asymmetric
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group
from tomopipe.errors import TomopipeError

__all__ = ["InitialModelError", "InitialModelResult", "IterationLog", "SymmetryFrame", "VolumeAlignment",
           "align_symmetry", "align_volumes", "initial_model", "rotate_and_shift"]

#: Soft edge of the spherical mask, in voxels.
_MASK_EDGE_PX = 2.0
#: Rotations scored per matrix product (bounds the memory of the rotated references).
_ROTATION_CHUNK = 2048
#: Poses whose posterior weight is below this fraction of the particle's best are left out of the update.
_MIN_POSE_WEIGHT = 1e-3
#: Angular steps (deg) allowed by the Crowther rule.
_STEP_RANGE_DEG = (3.0, 30.0)


class InitialModelError(TomopipeError):
    """Inputs that the initial model cannot use."""


@dataclass(frozen=True)
class IterationLog:
    """One mini-batch: resolution and angular step used, rotations scored, mean best log-likelihood
    (relative, summed over the frequencies used), mean change of the batch's particles' rotations
    (deg, modulo symmetry) and offsets (Å) since they were last seen (NaN for first visits)."""

    iteration: int
    resolution_A: float
    angular_step_deg: float
    n_rotations: int
    mean_best_log_likelihood: float
    mean_rotation_change_deg: float
    mean_offset_change_A: float


@dataclass(frozen=True)
class InitialModelResult:
    """The model ``volume`` ``[N, N, N]`` (centre N//2, masked), each particle's pose from a last
    pass with it (``rotations`` ``[m, 3, 3]`` reference -> particle, ``offsets_A`` ``[m, 3]``
    (x, y, z), module docstring), the per-mini-batch ``log`` and the ``symmetry`` imposed."""

    volume: torch.Tensor
    rotations: torch.Tensor
    offsets_A: torch.Tensor
    log: list[IterationLog]
    symmetry: str


@dataclass(frozen=True)
class SymmetryFrame:
    """``rotation`` Q ``[3, 3]``: the volume turned by Q (``V(Qᵀx)``) has the point group's axes in
    RELION's setting; ``correlation`` the mean normalised correlation of the volume with its
    symmetry mates in that frame; ``symmetrised`` the turned volume averaged over the group."""

    rotation: torch.Tensor
    correlation: float
    symmetrised: torch.Tensor


@dataclass(frozen=True)
class VolumeAlignment:
    """``aligned(x) = moving'(Rᵀ(x - t))`` (moving' the moving volume, mirrored through the yz plane
    when ``mirrored``) best matches the reference: ``rotation`` R ``[3, 3]``, ``shift_px`` t (x, y, z),
    ``correlation`` its normalised correlation (over the frequencies searched) and
    ``other_hand_correlation`` the best one of the other hand (NaN when not tried)."""

    rotation: torch.Tensor
    shift_px: torch.Tensor
    mirrored: bool
    correlation: float
    other_hand_correlation: float
    aligned: torch.Tensor


# ----------------------------------------------------------------------------- Fourier grids
@dataclass(frozen=True)
class _Shells:
    """Half-spectrum voxels of an N box with ``1 ≤ |k| ≤ radius``: flat ``index`` [S], ``k`` [S, 3]
    (x, y, z) float32, ``half`` [S] (½ on the plane kx = 0) and integer ``shell`` [S]."""

    index: torch.Tensor
    k: torch.Tensor
    half: torch.Tensor
    shell: torch.Tensor


def _shells(n: int, radius_px: float, device) -> _Shells:
    full = torch.fft.fftfreq(n, d=1.0 / n, device=device)
    kx = torch.arange(n // 2 + 1, device=device, dtype=full.dtype)
    k = torch.stack(torch.broadcast_tensors(kx[None, None, :], full[None, :, None], full[:, None, None]), -1)
    k = k.reshape(-1, 3).float()
    radius = torch.linalg.norm(k, dim=1)
    index = torch.nonzero((radius >= 1.0) & (radius <= radius_px)).squeeze(1)
    k = k[index]
    half = torch.where(k[:, 0] == 0, 0.5, 1.0)
    return _Shells(index=index, k=k, half=half, shell=torch.round(radius[index]).long())


def _padded_spectrum(volume: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Full spectrum ``[1, 2 (re, im), P, P, P]`` (DC at P//2, :func:`_sample`) of ``volume`` (centre N//2)
    zero-padded to P = pad·N, pre-divided by the trilinear kernel's response (``sinc²(x/P)`` per axis)."""
    n = volume.shape[-1]
    p = pad * n
    kernel = gridding_kernel(n, p, volume.device)
    corrected = volume.float() / (kernel[:, None, None] * kernel[None, :, None] * kernel)
    spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(embed_centered(corrected, (p, p, p)))))
    return torch.stack([spectrum.real, spectrum.imag])[None]


def _full_spectra(half: torch.Tensor) -> torch.Tensor:
    """Half spectra ``[..., N, N, N//2+1]`` (DC at index 0) -> full spectra ``[..., N, N, N]`` with the DC at
    N//2 (Hermitian completion ``F(-k) = conj F(k)``, then fftshift), for :func:`_sample`."""
    n = half.shape[-3]
    minus = (-torch.arange(n, device=half.device)) % n
    columns = n - torch.arange(n // 2 + 1, n, device=half.device)
    mirrored = half[..., minus[:, None, None], minus[None, :, None], columns[None, None, :]].conj()
    return torch.fft.fftshift(torch.cat([half, mirrored], -1), dim=(-3, -2, -1))


def _sample(full: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``[B, C, M]`` of full spectra ``[B, C, P, P, P]`` (real channels, DC at P//2) at
    frequencies q ``[B, M, 3]`` (x, y, z) in their index units; zero beyond radius P//2 - 1."""
    p = full.shape[-1]
    grid = (q + p // 2) * (2.0 / (p - 1)) - 1.0
    out = torch.nn.functional.grid_sample(full, grid[:, None, None], mode="bilinear", padding_mode="zeros",
                                          align_corners=True)[:, :, 0, 0]
    inside = (q * q).sum(-1) <= (p // 2 - 1.0) ** 2
    return out * inside[:, None]


def _rotated(spectrum: torch.Tensor, n: int, pad: int, k: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Samples ``[R, S]`` (complex) of the spectrum of the volume rotated by each rotation (``X(Rᵀk)``) at
    k [S, 3]; ``spectrum`` from :func:`_padded_spectrum`."""
    q = pad * (k[None] @ rotations.to(k.device, torch.float32))  # rows of Rᵀk
    values = _sample(spectrum, q.reshape(1, -1, 3))[0].reshape(2, rotations.shape[0], -1)
    return torch.complex(values[0], values[1])


def _phases(k: torch.Tensor, shifts_px: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(2πi k·t/N)`` ``[T, S]`` for offsets t [T, 3] (x, y, z) px: it un-shifts content moved by t."""
    return torch.polar(torch.ones((), device=k.device), (2.0 * math.pi / n) * (shifts_px.float() @ k.T))


def _offset_grid(max_offset_px: int, device) -> torch.Tensor:
    """Integer offsets (x, y, z) ``[T, 3]`` with ``|t| ≤ max_offset_px``, zero first."""
    r = torch.arange(-max_offset_px, max_offset_px + 1, device=device, dtype=torch.float32)
    t = torch.cartesian_prod(r, r, r).reshape(-1, 3)
    t = t[torch.linalg.norm(t, dim=1) <= max_offset_px + 1e-6]
    return t[torch.argsort(torch.linalg.norm(t, dim=1), stable=True)]


def _shell_mean(values: torch.Tensor, shell: torch.Tensor, n_shells: int, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``values`` [S] per shell ``[n_shells]`` (0 where a shell has no weight)."""
    total = torch.bincount(shell, weights=(values * weights).double(), minlength=n_shells)
    count = torch.bincount(shell, weights=weights.double(), minlength=n_shells)
    return (total / count.clamp(min=1e-30)).float()


# ----------------------------------------------------------------------------- pose search
def _search(spectrum: torch.Tensor, n: int, pad: int, data: torch.Tensor, weights: torch.Tensor, sh: _Shells,
            inv_sigma2: torch.Tensor, rotations: torch.Tensor, offsets: torch.Tensor,
            log_prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood (+ log prior) of each particle's best offset per rotation ``[b, R]`` and that offset's index.

    ``data``/``weights`` ``[b, S]`` on the shells' voxels; ``log_prior`` ``[b, R]`` or None.
    """
    b, t_count = data.shape[0], offsets.shape[0]
    scale = sh.half * inv_sigma2[sh.shell]
    unshifted = data[:, None, :] * _phases(sh.k, offsets, n)[None]  # [b, T, S]
    rows = torch.cat([unshifted.real, unshifted.imag], -1).reshape(b * t_count, -1) * torch.cat([scale, scale])
    weight_rows = weights * scale
    best, best_t = [], []
    for start in range(0, rotations.shape[0], _ROTATION_CHUNK):
        x = _rotated(spectrum, n, pad, sh.k, rotations[start:start + _ROTATION_CHUNK])
        cross = (rows @ torch.cat([x.real, x.imag], -1).T).reshape(b, t_count, -1)
        score = cross - 0.5 * (weight_rows @ (x.real.square() + x.imag.square()).T)[:, None, :]
        value, index = score.max(dim=1)
        best.append(value)
        best_t.append(index)
    score, t_index = torch.cat(best, 1), torch.cat(best_t, 1)
    return (score if log_prior is None else score + log_prior), t_index


def _tilt_log_prior(rotations: torch.Tensor, group: torch.Tensor, prior_deg: torch.Tensor, sigma_deg: float
                    ) -> torch.Tensor:
    """``-(tilt - prior)²/(2σ²)`` ``[b, R]``, tilt = acos((R·g)[2, 2]) of the closest symmetry mate g."""
    tilt = torch.rad2deg(torch.acos((rotations[:, None] @ group[None])[..., 2, 2].clamp(-1.0, 1.0)))  # [R, G]
    d = (tilt[None] - prior_deg[:, None, None]).abs().amin(-1)
    return -0.5 * (d / sigma_deg).square()


# ----------------------------------------------------------------------------- initial model
@dataclass
class _Moments:
    """Moving averages (per voxel of the N half spectrum) of the gradient's parts: ⟨D/σ²⟩, ⟨W/σ²⟩ and the
    total weight of the averages (for the bias correction)."""

    numerator: torch.Tensor
    denominator: torch.Tensor
    age: torch.Tensor

    def update(self, index: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, beta: float) -> None:
        self.numerator[index] = beta * self.numerator[index] + (1.0 - beta) * numerator
        self.denominator[index] = beta * self.denominator[index] + (1.0 - beta) * denominator
        self.age[index] = beta * self.age[index] + (1.0 - beta)


def _check_inputs(data_ft: torch.Tensor, weights: torch.Tensor, pixel_size_A: float, mask_diameter_A: float,
                  batch_size: int, n_iterations: int, tau2_fudge: float) -> int:
    if data_ft.ndim != 4 or not data_ft.is_complex():
        raise InitialModelError(f"initial_model: data_ft must be complex [m, N, N, N//2+1], got "
                                f"{tuple(data_ft.shape)} {data_ft.dtype}")
    m, n = data_ft.shape[0], data_ft.shape[1]
    if n % 2 or n < 8 or tuple(data_ft.shape[1:]) != (n, n, n // 2 + 1):
        raise InitialModelError(f"initial_model: data_ft must be [m, N, N, N//2+1] with N even >= 8, got "
                                f"{tuple(data_ft.shape)}")
    if tuple(weights.shape) != tuple(data_ft.shape) or weights.is_complex():
        raise InitialModelError(f"initial_model: weights must be real {tuple(data_ft.shape)}, got "
                                f"{tuple(weights.shape)} {weights.dtype}")
    if m < 2:
        raise InitialModelError(f"initial_model: need at least 2 particles, got {m}")
    if not (pixel_size_A > 0 and mask_diameter_A > 0 and tau2_fudge > 0 and batch_size >= 1 and n_iterations >= 1):
        raise InitialModelError(f"initial_model: pixel_size_A ({pixel_size_A}), mask_diameter_A ({mask_diameter_A}), "
                                f"tau2_fudge ({tau2_fudge}), batch_size ({batch_size}) and n_iterations "
                                f"({n_iterations}) must be > 0")
    return n


def _random_blob(n: int, radius_px: float, mask: torch.Tensor, generator: torch.Generator | None,
                 device) -> torch.Tensor:
    """The mask times (1 + half a unit of random density low-passed to ``radius_px``): a random start."""
    noise = torch.randn((n, n, n), generator=generator, dtype=torch.float32).to(device)
    spectrum = torch.fft.rfftn(noise)
    sh = _shells(n, radius_px, device)
    keep = torch.zeros(spectrum.numel(), dtype=torch.bool, device=device)
    keep[sh.index] = True
    smooth = torch.fft.irfftn(torch.where(keep.reshape(spectrum.shape), spectrum, 0), s=(n, n, n))
    return mask * (1.0 + 0.5 * smooth / smooth.std().clamp(min=1e-12))


def _resolution_schedule(initial_A: float, final_A: float, count: int) -> list[float]:
    """``count`` resolutions from ``initial_A`` to ``final_A``, linear in spatial frequency."""
    if count == 1:
        return [final_A]
    return [1.0 / (1.0 / initial_A + (1.0 / final_A - 1.0 / initial_A) * i / (count - 1)) for i in range(count)]


def _angular_step(mask_diameter_A: float, resolution_A: float) -> float:
    low, high = _STEP_RANGE_DEG
    return min(max(crowther_angular_step_deg(mask_diameter_A, resolution_A), low), high)


def _perturbed_grid(step_deg: float, symmetry: str, generator: torch.Generator | None, device) -> torch.Tensor:
    """The asymmetric-unit grid turned by a random rotation of up to half a step (a fresh grid each mini-batch)."""
    omega = torch.randn(3, generator=generator, dtype=torch.float64)
    omega = omega / torch.linalg.norm(omega) * math.radians(0.5 * step_deg) * float(torch.rand(1, generator=generator))
    return (so3_grid_asymmetric(step_deg, symmetry) @ rotation_vector_to_matrix(omega)).to(device, torch.float32)


class _Model:
    """The state of the refinement: reference, its padded spectrum, noise spectrum, moments (module docstring)."""

    def __init__(self, n: int, volume: torch.Tensor, sigma2: torch.Tensor, mask: torch.Tensor, pad: int = 2):
        self.n, self.pad, self.mask = n, pad, mask
        self.sigma2 = sigma2
        size = n * n * (n // 2 + 1)
        device = volume.device
        self.moments = _Moments(torch.zeros(size, dtype=torch.complex64, device=device),
                                torch.zeros(size, device=device), torch.zeros(size, device=device))
        self.set_volume(volume)

    def set_volume(self, volume: torch.Tensor) -> None:
        self.volume = volume
        self.spectrum = _padded_spectrum(volume, self.pad)
        flat = torch.fft.rfftn(torch.fft.ifftshift(volume)).reshape(-1)
        sh = _shells(self.n, self.n // 2, volume.device)
        self.power = _shell_mean(flat[sh.index].abs().square(), sh.shell, self.n // 2 + 1, sh.half)

    def rotated(self, sh: _Shells, rotations: torch.Tensor) -> torch.Tensor:
        return _rotated(self.spectrum, self.n, self.pad, sh.k, rotations)


def _full_channels(data: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Flat half spectra D (complex) and W ``[b, V]`` -> full spectra ``[b, 3 (re D, im D, W), N, N, N]``."""
    shape = (data.shape[0], n, n, n // 2 + 1)
    full_d = _full_spectra(data.reshape(shape))
    return torch.stack([full_d.real, full_d.imag, _full_spectra(weights.reshape(shape).to(full_d.dtype)).real], 1)


def _symmetrised(numerator: torch.Tensor, denominator: torch.Tensor, sh: _Shells, group: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_g U(g·k)`` of the gradient's parts U on the shells' voxels (each pose A then counts with all its mates
    A·g, since the particle's D(A·g·k) is U(g·k)); trilinear on the N grid, exact for groups of signed
    permutations (O and its subgroups in RELION's setting map grid points to grid points)."""
    flat = torch.zeros((2, n * n * (n // 2 + 1)), dtype=numerator.dtype, device=numerator.device)
    flat[0, sh.index] = numerator
    flat[1, sh.index] = denominator.to(numerator.dtype)
    full = _full_channels(flat[:1], flat[1:].real, n)
    q = sh.k[None] @ group.transpose(-1, -2)  # rows of g·k: [G, S, 3]
    values = _sample(full, q.reshape(1, -1, 3))[0].reshape(3, group.shape[0], -1).sum(1)
    return torch.complex(values[0], values[1]), values[2]


def _gather(full: torch.Tensor, sh: _Shells, poses: torch.Tensor, offsets_px: torch.Tensor,
            pose_weights: torch.Tensor, inv_sigma2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over one particle's poses ``[K, 3, 3]`` of ``w·D(A·k)·e^{2πi A·k·t/N}/σ²`` and
    ``w·W(A·k)/σ²`` at the reference-frame voxels k of the shells; ``full`` ``[3 (re D, im D, W), N, N, N]``."""
    q = sh.k[None] @ poses.transpose(-1, -2)  # rows of A·k: [K, S, 3]
    values = _sample(full[None], q.reshape(1, -1, 3))[0].reshape(3, *q.shape[:2])
    phase = torch.polar(torch.ones((), device=q.device), (2.0 * math.pi / n) * (q @ offsets_px[:, :, None])[..., 0])
    d = torch.complex(values[0], values[1]) * phase
    scale = inv_sigma2[sh.shell]
    return (d * pose_weights[:, None]).sum(0) * scale, (values[2] * pose_weights[:, None]).sum(0) * scale


def initial_model(data_ft: torch.Tensor, weights: torch.Tensor, pixel_size_A: float, *, mask_diameter_A: float,
                  symmetry: str = "O", n_iterations: int = 40, batch_size: int = 64, tau2_fudge: float = 4.0,
                  initial_resolution_A: float | None = None, final_resolution_A: float | None = None,
                  max_offset_px: int = 2, max_poses: int = 10, anneal_temperature: float = 30.0, momentum: float = 0.7,
                  tilt_prior_deg: torch.Tensor | None = None, sigma_tilt_deg: float = 0.0,
                  generator: torch.Generator | None = None, device=None) -> InitialModelResult:
    """De novo model from pseudo-subtomograms (module docstring), starting from a random low-pass blob.

    ``n_iterations`` mini-batches of ``batch_size`` particles (drawn without replacement, a new
    permutation per pass); the resolution goes from ``initial_resolution_A`` (default 60 Å or
    8 px, the coarser: starts at 45 Å got stuck in a wrong pose set on the tests' data) to
    ``final_resolution_A`` (default the coarser of 20 Å and 2.5 px, never coarser than the start),
    linear in frequency, and sets the angular step (Crowther's rule on
    ``mask_diameter_A``, 3-30°). Offsets: integers within ``max_offset_px``; ``max_poses`` poses per
    particle share its posterior, their log-likelihoods divided by a temperature that falls linearly
    from ``anneal_temperature`` to 1 over the first half of the mini-batches (deterministic
    annealing: soft assignments while the model is poor; without it, and with 3 poses, 1 of 5
    random starts on the tests' data locked into a wrong pose set, 0 of 11 with it);
    ``momentum`` caps the moving averages' decay (module docstring).
    Tilt prior: ``tilt_prior_deg`` ``[m]`` and ``sigma_tilt_deg`` > 0. Then every particle's pose is
    searched once more against the final model. ``generator`` (a CPU generator: it draws the start,
    the mini-batches and the grid perturbations) makes it reproducible; all the work runs on
    ``device`` (default: the data's).
    """
    n = _check_inputs(data_ft, weights, pixel_size_A, mask_diameter_A, batch_size, n_iterations, tau2_fudge)
    device = torch.device(device) if device is not None else data_ft.device
    group = symmetry_group(symmetry).to(device, torch.float32)
    m = data_ft.shape[0]
    batch_size = min(int(batch_size), m)
    if tilt_prior_deg is not None and tuple(torch.as_tensor(tilt_prior_deg).shape) != (m,):
        raise InitialModelError(f"initial_model: tilt_prior_deg needs one angle per particle ({m}), got shape "
                                f"{tuple(torch.as_tensor(tilt_prior_deg).shape)}")
    mask = spherical_mask(n, pixel_size_A, mask_diameter_A, _MASK_EDGE_PX * pixel_size_A).to(device)
    start_A = initial_resolution_A or max(60.0, 8.0 * pixel_size_A)
    end_A = final_resolution_A or min(max(20.0, 2.5 * pixel_size_A), start_A)
    schedule = _resolution_schedule(start_A, end_A, n_iterations)
    flat_data = data_ft.reshape(m, -1).to(device, torch.complex64)
    flat_weights = weights.reshape(m, -1).to(device, torch.float32)
    offsets = _offset_grid(int(max_offset_px), device)
    model = _initial_state(flat_data, flat_weights, n, pixel_size_A, start_A, mask, generator, device)
    poses = torch.eye(3, device=device).repeat(m, 1, 1)
    shifts = torch.zeros((m, 3), device=device)
    seen = torch.zeros(m, dtype=torch.bool, device=device)
    order = torch.zeros(0, dtype=torch.long)
    log = []
    for iteration, resolution_A in enumerate(schedule):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(m, generator=generator)])
        batch, order = order[:batch_size].to(device), order[batch_size:]
        step = _angular_step(mask_diameter_A, resolution_A)
        grid = _perturbed_grid(step, symmetry, generator, device)
        sh = _shells(n, min(n * pixel_size_A / resolution_A, n // 2 - 1.0), device)
        prior = _batch_prior(tilt_prior_deg, sigma_tilt_deg, batch, grid, group, device)
        temperature = 1.0 + (anneal_temperature - 1.0) * max(0.0, 1.0 - 2.0 * iteration / n_iterations)
        best_r, best_t, top = _e_step(model, flat_data[batch], flat_weights[batch], sh, grid, offsets, prior,
                                      max_poses, temperature)
        moved = seen[batch]
        rotation_change = misorientation_deg(poses[batch][moved], best_r[moved], group) if moved.any() else None
        offset_change = torch.linalg.norm(shifts[batch][moved] - best_t[moved], dim=1) * pixel_size_A
        poses[batch], shifts[batch], seen[batch] = best_r, best_t, True
        _m_step(model, flat_data[batch], flat_weights[batch], sh, top, group, m / batch.numel(), tau2_fudge,
                min(momentum, iteration / (iteration + 1.0)))
        log.append(IterationLog(iteration, resolution_A, step, grid.shape[0], float(top.best_score.mean()),
                                float(rotation_change.mean()) if rotation_change is not None else math.nan,
                                float(offset_change.mean()) if moved.any() else math.nan))
    rotations, offsets_px = _final_poses(model, flat_data, flat_weights, n, pixel_size_A, end_A, mask_diameter_A,
                                         symmetry, offsets, tilt_prior_deg, sigma_tilt_deg, group, batch_size, device)
    return InitialModelResult(volume=model.volume, rotations=rotations, offsets_A=offsets_px * pixel_size_A, log=log,
                              symmetry=symmetry)


def _initial_state(flat_data: torch.Tensor, flat_weights: torch.Tensor, n: int, pixel_size_A: float,
                   start_A: float, mask: torch.Tensor, generator: torch.Generator | None, device) -> _Model:
    """A random blob scaled to the data's power (|D|²/W² per shell, poses unknown) and σ² = |D|²/W per shell."""
    sh = _shells(n, n // 2, device)
    d, w = flat_data[:, sh.index], flat_weights[:, sh.index]
    shells = n // 2 + 1
    power_d = _shell_mean(d.abs().square().sum(0), sh.shell, shells, sh.half)
    power_w = _shell_mean(w.sum(0), sh.shell, shells, sh.half)
    power_w2 = _shell_mean(w.square().sum(0), sh.shell, shells, sh.half)
    sigma2 = torch.where(power_w > 0, power_d / power_w.clamp(min=1e-30), 1.0).clamp(min=1e-30)
    blob = _random_blob(n, min(n * pixel_size_A / start_A, n // 2 - 1.0), mask, generator, device)
    model = _Model(n, blob, sigma2, mask)
    low = slice(1, max(2, round(n * pixel_size_A / start_A)) + 1)
    target = (power_d[low] / power_w2[low].clamp(min=1e-30)).sum()
    model.set_volume(blob * torch.sqrt(target / model.power[low].sum().clamp(min=1e-30)))
    return model


def _batch_prior(tilt_prior_deg: torch.Tensor | None, sigma_tilt_deg: float, batch: torch.Tensor,
                 grid: torch.Tensor, group: torch.Tensor, device) -> torch.Tensor | None:
    if tilt_prior_deg is None or sigma_tilt_deg <= 0:
        return None
    prior = torch.as_tensor(tilt_prior_deg, dtype=torch.float32, device=device)[batch]
    return _tilt_log_prior(grid, group, prior, float(sigma_tilt_deg))


@dataclass(frozen=True)
class _TopPoses:
    """Each particle's ``max_poses`` best rotations ``[b, K, 3, 3]``, offsets ``[b, K, 3]`` px, posterior
    weights ``[b, K]`` and best log-likelihood ``[b]``."""

    rotations: torch.Tensor
    offsets_px: torch.Tensor
    weights: torch.Tensor
    best_score: torch.Tensor


def _e_step(model: _Model, data: torch.Tensor, weights: torch.Tensor, sh: _Shells, grid: torch.Tensor,
            offsets: torch.Tensor, prior: torch.Tensor | None, max_poses: int, temperature: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor, _TopPoses]:
    """Pose search of a batch (flat spectra [b, V]); updates σ² from the best poses' residuals."""
    inv_sigma2 = 1.0 / model.sigma2
    d, w = data[:, sh.index], weights[:, sh.index]
    score, t_index = _search(model.spectrum, model.n, model.pad, d, w, sh, inv_sigma2, grid, offsets, prior)
    k = min(max_poses, grid.shape[0])
    top_score, top_r = score.topk(k, dim=1)
    top = _TopPoses(rotations=grid[top_r], offsets_px=offsets[t_index.gather(1, top_r)],
                    weights=torch.softmax(top_score / temperature, dim=1), best_score=top_score[:, 0])
    best_r, best_t = top.rotations[:, 0], top.offsets_px[:, 0]
    residual = d - w * model.rotated(sh, best_r) * _phases(sh.k, best_t, model.n).conj()
    shells = model.n // 2 + 1
    noise = _shell_mean(residual.abs().square().sum(0), sh.shell, shells, sh.half)
    total_w = _shell_mean(w.sum(0), sh.shell, shells, sh.half)
    measured = torch.unique(sh.shell)
    model.sigma2[measured] = 0.5 * model.sigma2[measured] + 0.5 * (noise / total_w.clamp(min=1e-30))[measured]
    return best_r, best_t, top


def _m_step(model: _Model, data: torch.Tensor, weights: torch.Tensor, sh: _Shells, top: _TopPoses,
            group: torch.Tensor, scale: float, tau2_fudge: float, beta: float) -> None:
    """Gradient parts of the batch (all symmetry mates), moving averages, regularised step, mask."""
    n = model.n
    inv_sigma2 = 1.0 / model.sigma2
    numerator = torch.zeros(sh.index.numel(), dtype=torch.complex64, device=data.device)
    denominator = torch.zeros(sh.index.numel(), device=data.device)
    full = _full_channels(data, weights, n)
    for i in range(data.shape[0]):
        keep = top.weights[i] >= _MIN_POSE_WEIGHT * top.weights[i].max()
        num, den = _gather(full[i], sh, top.rotations[i][keep], top.offsets_px[i][keep],
                           top.weights[i][keep] / top.weights[i][keep].sum(), inv_sigma2, n)
        numerator += num
        denominator += den
    if group.shape[0] > 1:
        numerator, denominator = _symmetrised(numerator, denominator, sh, group, n)
    model.moments.update(sh.index, scale * numerator, scale * denominator, beta)
    age = model.moments.age[sh.index]
    tau2 = tau2_fudge * model.power[sh.shell]
    spectrum = torch.zeros(n * n * (n // 2 + 1), dtype=torch.complex64, device=data.device)
    spectrum[sh.index] = (model.moments.numerator[sh.index] / age) / (
        model.moments.denominator[sh.index] / age + 1.0 / tau2.clamp(min=1e-30))
    volume = torch.fft.fftshift(torch.fft.irfftn(spectrum.reshape(n, n, n // 2 + 1), s=(n, n, n)))
    model.set_volume(volume * model.mask)


def _final_poses(model: _Model, flat_data: torch.Tensor, flat_weights: torch.Tensor, n: int, pixel_size_A: float,
                 resolution_A: float, mask_diameter_A: float, symmetry: str, offsets: torch.Tensor,
                 tilt_prior_deg: torch.Tensor | None, sigma_tilt_deg: float, group: torch.Tensor, batch_size: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pose of every particle against the final model (no update), on the unperturbed grid."""
    grid = so3_grid_asymmetric(_angular_step(mask_diameter_A, resolution_A), symmetry).to(device, torch.float32)
    sh = _shells(n, min(n * pixel_size_A / resolution_A, n // 2 - 1.0), device)
    inv_sigma2 = 1.0 / model.sigma2
    rotations, shifts = [], []
    for start in range(0, flat_data.shape[0], batch_size):
        batch = torch.arange(start, min(start + batch_size, flat_data.shape[0]), device=device)
        prior = _batch_prior(tilt_prior_deg, sigma_tilt_deg, batch, grid, group, device)
        d, w = flat_data[batch][:, sh.index], flat_weights[batch][:, sh.index]
        score, t_index = _search(model.spectrum, n, model.pad, d, w, sh, inv_sigma2, grid, offsets, prior)
        best = score.argmax(dim=1)
        rotations.append(grid[best])
        shifts.append(offsets[t_index.gather(1, best[:, None])[:, 0]])
    return torch.cat(rotations), torch.cat(shifts)


# ----------------------------------------------------------------------------- volume alignment
def _mirrored(volume: torch.Tensor) -> torch.Tensor:
    """``V(-x, y, z)`` about the centre voxel N//2."""
    return torch.roll(torch.flip(volume, dims=(-1,)), 1, dims=-1)


def _subpixel(cc: torch.Tensor, index: int, n: int) -> torch.Tensor:
    """Peak position (x, y, z) px of a periodic map ``cc`` [N³ flat] near its maximum ``index``: a parabola
    through the maximum and its two neighbours along each axis (wrapped to -N/2 .. N/2)."""
    volume = cc.reshape(n, n, n)
    peak = [index // (n * n), (index // n) % n, index % n]  # z, y, x
    position = []
    for axis in (2, 1, 0):
        values = []
        for step in (-1, 0, 1):
            at = list(peak)
            at[axis] = (at[axis] + step) % n
            values.append(float(volume[tuple(at)]))
        curvature = values[0] - 2.0 * values[1] + values[2]
        offset = 0.5 * (values[0] - values[2]) / curvature if curvature < 0 else 0.0
        position.append(peak[axis] + max(-0.5, min(0.5, offset)))
    p = torch.tensor(position, dtype=torch.float32, device=cc.device)
    return torch.where(p > n / 2, p - n, p)


def _correlation_maps(spectrum: torch.Tensor, n: int, pad: int, reference: torch.Tensor, sh: _Shells,
                      rotations: torch.Tensor) -> torch.Tensor:
    """Normalised correlation ``[R, N³]`` (flat z, y, x) of the rotated volume shifted by every integer
    offset with the reference (flat N half spectrum), on the shells' voxels."""
    root_half = sh.half.sqrt()
    ref_norm = torch.linalg.norm(reference[sh.index] * root_half)
    x = _rotated(spectrum, n, pad, sh.k, rotations)
    product = torch.zeros((x.shape[0], n * n * (n // 2 + 1)), dtype=torch.complex64, device=x.device)
    product[:, sh.index] = reference[sh.index] * x.conj()
    # N³·irfftn = 2 Σ_half h·Re(...): the full spectrum's sum, as are twice the half norms below
    cc = torch.fft.irfftn(product.reshape(-1, n, n, n // 2 + 1), s=(n, n, n)).reshape(x.shape[0], -1) * n**3
    return cc / (2.0 * ref_norm * torch.linalg.norm(x * root_half, dim=1, keepdim=True)).clamp(min=1e-30)


def _coarse_to_fine(score_block, rotations: torch.Tensor, step_deg: float, n: int, max_radius_px: float | None):
    """Best of ``rotations`` by ``score_block(rotations, shells) -> (values [R], extra per rotation or None)``,
    then two local searches at a third of the step each. Each stage uses the frequencies up to
    ``1 / step`` (rad) px (Crowther's rule for an object as wide as the box), at most ``max_radius_px``
    (default N//2 - 1). Returns (value, rotation, extra of the winner)."""
    limit = min(max_radius_px or n // 2 - 1.0, n // 2 - 1.0)
    step = step_deg
    for _ in range(3):
        sh = _shells(n, min(limit, max(4.0, 1.0 / math.radians(step))), rotations.device)
        value = -math.inf
        for start in range(0, rotations.shape[0], 256):
            values, extra = score_block(rotations[start:start + 256], sh)
            best = int(values.argmax())
            if float(values[best]) > value:
                value, rotation = float(values[best]), rotations[start + best]
                winner = None if extra is None else extra(best)
        rotations = local_so3_grid(rotation.double(), step / 3.0, step).to(rotations.device, torch.float32)
        step /= 3.0
    return value, rotation, winner


def _search_hand(moving: torch.Tensor, reference_ft: torch.Tensor, step_deg: float, symmetry: str, pad: int,
                 max_radius_px: float | None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Rotation search of one hand (:func:`_coarse_to_fine`): (correlation, rotation, sub-pixel shift)."""
    n = moving.shape[-1]
    spectrum = _padded_spectrum(moving, pad)

    def score_block(rotations, sh):
        maps = _correlation_maps(spectrum, n, pad, reference_ft, sh, rotations)
        values, peaks = maps.max(dim=1)
        return values, lambda i: _subpixel(maps[i], int(peaks[i]), n)

    grid = so3_grid_asymmetric(step_deg, symmetry).to(moving.device, torch.float32)
    return _coarse_to_fine(score_block, grid, step_deg, n, max_radius_px)


def rotate_and_shift(volume: torch.Tensor, rotation: torch.Tensor, shift_px: torch.Tensor, pad: int = 2
                     ) -> torch.Tensor:
    """``V(Rᵀ(x - t))`` on the same grid (``[N, N, N]``, centre N//2; x, t as (x, y, z), voxels): the
    padded spectrum sampled trilinearly, nothing beyond Nyquist."""
    n = volume.shape[-1]
    sh = _shells(n, n // 2, volume.device)
    x = _rotated(_padded_spectrum(volume, pad), n, pad, sh.k, rotation[None])[0]
    spectrum = torch.zeros(n * n * (n // 2 + 1), dtype=torch.complex64, device=volume.device)
    spectrum[sh.index] = x * _phases(sh.k, shift_px[None], n)[0].conj()
    spectrum[0] = torch.fft.rfftn(volume).reshape(-1)[0]
    return torch.fft.fftshift(torch.fft.irfftn(spectrum.reshape(n, n, n // 2 + 1), s=(n, n, n)))


def align_volumes(moving: torch.Tensor, reference: torch.Tensor, *, step_deg: float = 10.0, symmetry: str = "C1",
                  max_radius_px: float | None = None, try_mirror: bool = True, pad: int = 2) -> VolumeAlignment:
    """Rotation, shift (and hand) that best superimpose ``moving`` on ``reference`` (both ``[N, N, N]``, centre N//2).

    Search: the normalised correlation over all integer shifts (FFT; the peak refined to sub-pixel)
    for each rotation of a grid of ``step_deg`` (the asymmetric unit of ``symmetry``, the
    reference's point group), refined by :func:`_coarse_to_fine`. With ``try_mirror`` the mirror
    image of ``moving`` is searched too and the better hand kept. Returns :class:`VolumeAlignment`
    with the aligned volume.
    """
    if moving.shape != reference.shape or moving.ndim != 3 or len(set(moving.shape)) != 1 or moving.shape[0] % 2:
        raise ValueError(f"align_volumes: need two cubic volumes of the same even size, got {tuple(moving.shape)} "
                         f"and {tuple(reference.shape)}")
    reference_ft = torch.fft.rfftn(torch.fft.ifftshift(reference.float())).reshape(-1)
    hands = [False, True] if try_mirror else [False]
    found = [_search_hand(_mirrored(moving) if mirror else moving.float(), reference_ft, step_deg, symmetry, pad,
                          max_radius_px) for mirror in hands]
    pick = max(range(len(found)), key=lambda i: found[i][0])
    score, rotation, shift = found[pick]
    other = found[1 - pick][0] if try_mirror else math.nan
    source = _mirrored(moving) if hands[pick] else moving.float()
    aligned = rotate_and_shift(source, rotation, shift, pad)
    return VolumeAlignment(rotation=rotation, shift_px=shift, mirrored=hands[pick], correlation=score,
                           other_hand_correlation=other, aligned=aligned)


def _mate_correlations(spectrum: torch.Tensor, n: int, pad: int, own: torch.Tensor, sh: _Shells,
                       frames: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean normalised correlation ``[Q]`` of a volume with itself turned by ``Qᵀ·g·Q`` over g ≠ 1 (no shift)."""
    mates = (frames.transpose(-1, -2)[:, None] @ group[None, 1:] @ frames[:, None]).reshape(-1, 3, 3)
    # V∘M (y -> V(M·y)) has the spectrum F(M·k): sample at Mk, i.e. "rotated by Mᵀ"
    x = _rotated(spectrum, n, pad, sh.k, mates.transpose(-1, -2))
    cross = (own.conj()[None] * x * sh.half).real.sum(-1)
    norms = torch.sqrt((x.abs().square() * sh.half).sum(-1) * (own.abs().square() * sh.half).sum())
    return (cross / norms.clamp(min=1e-30)).reshape(frames.shape[0], -1).mean(-1)


def align_symmetry(volume: torch.Tensor, symmetry: str, *, step_deg: float = 10.0, max_radius_px: float | None = None,
                   pad: int = 2) -> SymmetryFrame:
    """Find the frame in which a (C1) map best has the point group ``symmetry`` and impose it (as
    ``relion_align_symmetry`` then symmetrisation): frames Q on a grid of ``step_deg`` over the
    cosets G·Q (Q and g·Q give the same axes), refined by :func:`_coarse_to_fine`, scored by
    :func:`_mate_correlations`; rotations about the box centre (N//2) only."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1 or volume.shape[0] % 2:
        raise ValueError(f"align_symmetry: need a cubic volume of even size, got {tuple(volume.shape)}")
    n = volume.shape[-1]
    group = symmetry_group(symmetry).to(volume.device, torch.float32)
    spectrum = _padded_spectrum(volume, pad)
    own = torch.fft.rfftn(torch.fft.ifftshift(volume.float())).reshape(-1)

    def score_block(frames, sh):
        return _mate_correlations(spectrum, n, pad, own[sh.index], sh, frames, group), None

    frames = so3_grid_asymmetric(step_deg, symmetry).transpose(-1, -2).to(volume.device, torch.float32)
    score, frame, _ = _coarse_to_fine(score_block, frames, step_deg, n, max_radius_px)
    zero = torch.zeros(3, device=volume.device)
    turned = rotate_and_shift(volume, frame, zero, pad)
    symmetrised = torch.stack([rotate_and_shift(turned, g, zero, pad) for g in group]).mean(0)
    return SymmetryFrame(rotation=frame, correlation=score, symmetrised=symmetrised)
