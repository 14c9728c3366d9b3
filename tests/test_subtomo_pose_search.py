"""Pose search on 2-D pseudo-subtomograms (:mod:`tomopipe.algorithms.subtomo.pose_search`).

Particles of a known volume (asymmetric Gaussian blobs in a 32-px box; an O-symmetrised copy) with random
known poses A and small 3-D shifts t: each tilt's crop is made exactly as the model says — the central
slice at ``R_tilt·A`` (:class:`FourierSliceProjector`), moved by the projected shift, times ``(CTF·D)²``,
plus the image noise times ``CTF·D`` at a stated SNR (per tilt: variance of the projection over the noise
variance). The search must find A modulo the symmetry within the grid's step and t within the shift
step; crops made with another convention (``A·R_tilt``) or scored against the mirror image must fail.
An end-to-end case through the REAL extraction pins the sign and premultiplication of the crops
(``−CTF·D·image``, protein dark) and the frame of the shift.
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.filters import exposure_filter, radial_frequency_grid
from tomopipe.algorithms.fourier_slice import FourierSliceProjector
from tomopipe.algorithms.geometry import projection_rotations, random_rotations
from tomopipe.algorithms.so3 import so3_grid
from tomopipe.algorithms.subtomo.backproject import centred_rfft2
from tomopipe.algorithms.subtomo.extract import TiltCtfWeights, TiltGeometry, extract_crops, particle_tilt_positions
from tomopipe.algorithms.subtomo.pose_search import (
    ParticleStacks,
    PosePrior,
    coarse_to_fine_search,
    estimate_noise_power,
    local_search,
    search_poses,
    shift_grid_A,
)
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group
from tomopipe.errors import TomopipeError

pytestmark = pytest.mark.usefixtures("one_thread")

BOX = 32
PIXEL_A = 10.0
TILTS_DEG = torch.arange(-60.0, 60.1, 3.0, dtype=torch.float64)
ACQUISITION = dict(voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.07)
SNR = 0.25                    # per tilt: variance of the projection / variance of the noise
MAX_FREQUENCY_PX = 10         # 32 Å
SHIFT_RANGE_A, SHIFT_STEP_A = 10.0, 5.0


def _blobs(centres_px: torch.Tensor, sigma_px: float = 1.5) -> torch.Tensor:
    """``[BOX]³`` (z, y, x) Σ of Gaussians at ``centres_px`` ``[b, 3]`` (x, y, z) from the centre ``BOX//2``."""
    ax = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    g = torch.exp(-(ax[None, None, :] - centres_px[:, :, None]) ** 2 / (2 * sigma_px**2))  # [b, (x, y, z), N]
    return torch.einsum("bz,by,bx->zyx", g[:, 2], g[:, 1], g[:, 0]).float()


@pytest.fixture(scope="module")
def blob_centres_px() -> torch.Tensor:
    """12 blob centres (px), their centroid on the box centre (as a refined reference's)."""
    generator = torch.Generator().manual_seed(0)
    centres = (torch.rand((12, 3), generator=generator, dtype=torch.float64) - 0.5) * 18.0
    return centres - centres.mean(dim=0)


@pytest.fixture(scope="module")
def projector(blob_centres_px) -> FourierSliceProjector:
    return FourierSliceProjector(_blobs(blob_centres_px), PIXEL_A, pad_factor=2)


@pytest.fixture(scope="module")
def mirror_projector(blob_centres_px) -> FourierSliceProjector:
    return FourierSliceProjector(_blobs(blob_centres_px * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)),
                                 PIXEL_A, pad_factor=2)


@pytest.fixture(scope="module")
def o_projector(blob_centres_px) -> FourierSliceProjector:
    """The blobs under all 24 rotations of O: ``V(g·x) = V(x)``."""
    group = symmetry_group("O")
    return FourierSliceProjector(_blobs((blob_centres_px[:4] @ group.transpose(-1, -2)).reshape(-1, 3)), PIXEL_A,
                                 pad_factor=2)


def _tilt_rotations() -> torch.Tensor:
    n = TILTS_DEG.numel()
    return projection_rotations(torch.full((n,), 85.0, dtype=torch.float64), TILTS_DEG, 0.0)


def _ctf2(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(CTF·D)²`` ``[n, BOX, BOX//2+1]``: defocus 2-4 µm, 3 e/Å² per tilt."""
    k = radial_frequency_grid((BOX, BOX), torch.tensor(PIXEL_A, dtype=torch.float64))
    defocus = 20000.0 + 20000.0 * torch.rand(n, generator=generator, dtype=torch.float64)
    ctf = ctf_2d((BOX, BOX), PIXEL_A, defocus, defocus - 300.0, 30.0, **ACQUISITION)
    dose = torch.stack([exposure_filter(k, 3.0 * i, ACQUISITION["voltage_kV"]) for i in range(n)])
    return ((ctf * dose) ** 2).float()


def _signal(projector: FourierSliceProjector, tilts: torch.Tensor, poses: torch.Tensor, shifts_A: torch.Tensor,
            wrong_order: bool = False) -> torch.Tensor:
    """Noise-free crop spectra before the CTF ``[m, n, BOX, BOX//2+1]``: the slices at ``R_tilt·A``
    (``A·R_tilt`` with ``wrong_order``) moved by ``[R_tilt·t]_xy``."""
    m, n = poses.shape[0], tilts.shape[0]
    composite = poses[:, None] @ tilts[None] if wrong_order else tilts[None] @ poses[:, None]
    slices = projector.slices(composite.reshape(-1, 3, 3).float(), torch.ones(m * n)).reshape(m, n, BOX, -1)
    moved_px = torch.einsum("iab,mb->mia", tilts[:, :2], shifts_A) / PIXEL_A
    ky = torch.fft.fftfreq(BOX, d=1.0 / BOX, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(BOX, d=1.0 / BOX, dtype=torch.float64)[None, :]
    angle = (-2.0 * math.pi / BOX) * (moved_px[..., 0, None, None] * kx + moved_px[..., 1, None, None] * ky)
    return slices * torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def _particles(projector: FourierSliceProjector, m: int, seed: int, snr: float = SNR, wrong_order: bool = False):
    """(ParticleStacks, poses A ``[m, 3, 3]``, shifts t ``[m, 3]`` Å): crops = (CTF·D)²·signal + CTF·D·noise."""
    generator = torch.Generator().manual_seed(seed)
    tilts = _tilt_rotations()
    n = tilts.shape[0]
    poses = random_rotations(m, generator=generator, dtype=torch.float64)
    shifts_A = (torch.rand((m, 3), generator=generator, dtype=torch.float64) - 0.5) * (2 * SHIFT_STEP_A)
    signal = _signal(projector, tilts, poses, shifts_A, wrong_order)
    sd = math.sqrt(float(torch.fft.irfft2(signal, s=(BOX, BOX)).var()) / snr)
    ctf2 = _ctf2(n, generator).expand(m, -1, -1, -1)
    noise = torch.fft.rfft2(sd * torch.randn((m, n, BOX, BOX), generator=generator))
    crops_ft = ctf2 * signal + ctf2.sqrt() * noise
    noise_power = torch.full((BOX // 2 + 1,), BOX * BOX * sd * sd)  # E|rfft2(noise)|² of white noise
    return ParticleStacks(crops_ft, ctf2, tilts.float(), PIXEL_A, noise_power), poses, shifts_A


def _fraction(errors: torch.Tensor, limit: float) -> float:
    return float((errors <= limit).double().mean())


def test_global_search_finds_poses_within_the_grid_step(projector):
    step_deg = 15.0
    data, poses, shifts_A = _particles(projector, 24, seed=1)
    result = search_poses(projector, data, so3_grid(step_deg), shift_grid_A(SHIFT_RANGE_A, SHIFT_STEP_A),
                          MAX_FREQUENCY_PX)
    angle = misorientation_deg(result.best_rotations, poses)
    offset = (result.best_shifts_A - shifts_A).abs().amax(dim=1)  # per axis
    assert _fraction(angle, step_deg) >= 0.95, angle
    assert _fraction(offset, SHIFT_STEP_A) >= 0.95, offset
    assert bool((result.angular_spread_deg < step_deg).all()) and bool((result.offset_spread_A < SHIFT_STEP_A).all())


def test_local_search_refines_to_the_fine_step_and_the_prior_pulls(projector):
    """From previous poses 4° off: a local grid of 1.875° finds the pose within that step (at an SNR where
    the grid, not the noise, limits it); a tight prior holds the previous pose, a wide one lets the data win."""
    m, fine_deg, max_frequency_px = 16, 1.875, 14
    data, poses, shifts_A = _particles(projector, m, seed=2, snr=2.0)
    previous = poses @ _small_rotations(m, 4.0, torch.Generator().manual_seed(3))
    origin = torch.zeros((m, 3), dtype=torch.float64)
    search = dict(step_deg=fine_deg, max_angle_deg=3 * fine_deg, offset_range_A=2 * SHIFT_STEP_A,
                  offset_step_A=SHIFT_STEP_A / 2, max_frequency_px=max_frequency_px)
    result = local_search(projector, data, previous[:, None], origin, **search)
    assert _fraction(misorientation_deg(result.best_rotations, poses), fine_deg) >= 0.95
    assert _fraction((result.best_shifts_A - shifts_A).abs().amax(dim=1), SHIFT_STEP_A / 2) >= 0.95
    held = local_search(projector, data, previous[:, None], origin, **search,
                        prior=PosePrior(previous, origin, 0.01, math.inf))
    assert float(misorientation_deg(held.best_rotations, previous).max()) < 1e-6
    free = local_search(projector, data, previous[:, None], origin, **search,
                        prior=PosePrior(previous, origin, 30.0, 100.0))
    assert _fraction(misorientation_deg(free.best_rotations, poses), fine_deg) >= 0.95


def _small_rotations(m: int, angle_deg: float, generator: torch.Generator) -> torch.Tensor:
    """Rotations by exactly ``angle_deg`` about random axes ``[m, 3, 3]``."""
    axis = torch.randn((m, 3), generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True)
    k = torch.zeros((m, 3, 3), dtype=torch.float64)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    a = math.radians(angle_deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def test_coarse_to_fine_with_symmetry_o(o_projector):
    data, poses, shifts_A = _particles(o_projector, 16, seed=4, snr=0.5)  # a rounder object: shifts need more
    result = coarse_to_fine_search(o_projector, data, symmetry="O", global_step_deg=7.5, local_steps_deg=(3.75,),
                                   offset_range_A=SHIFT_RANGE_A, offset_step_A=SHIFT_STEP_A, max_frequency_px=14)
    angle = misorientation_deg(result.best_rotations, poses, "O")
    assert _fraction(angle, 7.5) >= 0.95, angle
    assert _fraction((result.best_shifts_A - shifts_A).abs().amax(dim=1), SHIFT_STEP_A) >= 0.95


def test_a_wrong_convention_or_hand_fails(projector, mirror_projector):
    """Crops made with ``A·R_tilt`` are not found by the search (so the tests above can fail), and the
    mirror image of the reference explains the right crops worse than the reference: the hand shows."""
    grid, shifts = so3_grid(15.0), shift_grid_A(SHIFT_RANGE_A, SHIFT_STEP_A)
    data, poses, _ = _particles(projector, 12, seed=5, wrong_order=True)
    wrong = search_poses(projector, data, grid, shifts, MAX_FREQUENCY_PX)
    assert _fraction(misorientation_deg(wrong.best_rotations, poses), 15.0) <= 0.25
    data, poses, _ = _particles(projector, 12, seed=6)
    right = search_poses(projector, data, grid, shifts, MAX_FREQUENCY_PX)
    mirrored = search_poses(mirror_projector, data, grid, shifts, MAX_FREQUENCY_PX)
    assert bool((right.scores[:, 0] > mirrored.scores[:, 0]).all())


def test_noise_power_estimate_matches_the_noise(projector):
    data, poses, shifts_A = _particles(projector, 8, seed=7)
    predicted = _signal(projector, _tilt_rotations(), poses, shifts_A)
    estimate = estimate_noise_power(data.crops_ft, data.ctf2, predicted)
    truth = data.noise_power[0]
    assert torch.allclose(estimate[2:MAX_FREQUENCY_PX], truth[2:MAX_FREQUENCY_PX], rtol=0.1)
    with_signal = estimate_noise_power(data.crops_ft, data.ctf2)  # RELION's first iteration: the signal counts
    assert bool((with_signal[1:MAX_FREQUENCY_PX] > estimate[1:MAX_FREQUENCY_PX]).all())


def test_centre_shifts_and_the_torch_path_give_the_same_scores(blob_centres_px, projector):
    """A particle's centre shift c with offsets δ scores as the shifts c + δ (the phase factorises), and
    the torch projector (the GPU path) ranks as the compiled one."""
    data, poses, shifts_A = _particles(projector, 4, seed=10)
    offsets = shift_grid_A(SHIFT_STEP_A, SHIFT_STEP_A)
    grid = so3_grid(30.0)
    centred = search_poses(projector, data, grid, offsets, MAX_FREQUENCY_PX, centre_shifts_A=shifts_A, keep=5)
    for j in range(4):
        one = ParticleStacks(data.crops_ft[j:j + 1], data.ctf2[j:j + 1], data.tilt_rotations, PIXEL_A,
                             data.noise_power)
        direct = search_poses(projector, one, grid, shifts_A[j] + offsets, MAX_FREQUENCY_PX, keep=5)
        assert torch.allclose(direct.scores[0], centred.scores[j], rtol=1e-4, atol=1e-2)
        assert torch.allclose(direct.shifts_A[0], centred.shifts_A[j])
    torch_path = FourierSliceProjector(_blobs(blob_centres_px), PIXEL_A, pad_factor=2, use_compiled=False)
    other = search_poses(torch_path, data, grid, offsets, MAX_FREQUENCY_PX, centre_shifts_A=shifts_A, keep=5)
    assert torch.allclose(other.scores, centred.scores, rtol=1e-4, atol=1e-2)
    assert torch.allclose(other.rotations, centred.rotations)


def test_bad_input_is_refused(projector):
    data, _, _ = _particles(projector, 2, seed=8)
    with pytest.raises(TomopipeError, match="max_frequency_px"):
        search_poses(projector, data, so3_grid(30.0), shift_grid_A(0.0, 1.0), BOX // 2)
    with pytest.raises(TomopipeError, match="voxel size"):
        search_poses(FourierSliceProjector(torch.zeros((BOX,) * 3), 2 * PIXEL_A), data, so3_grid(30.0),
                     shift_grid_A(0.0, 1.0), 4)
    with pytest.raises(TomopipeError, match="ctf2"):
        ParticleStacks(data.crops_ft, data.ctf2[:1], data.tilt_rotations, PIXEL_A, data.noise_power[0])
    with pytest.raises(TomopipeError, match="noise_power"):
        ParticleStacks(data.crops_ft, data.ctf2, data.tilt_rotations, PIXEL_A, torch.zeros(BOX // 2 + 1))


# ---- end to end through the real extraction: sign, premultiplication and the frame of the shift ----

IMAGE_PX = 192
EXTRACT_BOX_PX = 48


def _geometry() -> TiltGeometry:
    n = TILTS_DEG.numel()
    defocus = 25000.0 + 1000.0 * torch.sin(torch.arange(n, dtype=torch.float64))
    return TiltGeometry.from_alignment(
        torch.full((n,), 85.0, dtype=torch.float64), TILTS_DEG, 0.0, torch.zeros((n, 2), dtype=torch.float64),
        defocus_u_A=defocus, defocus_v_A=defocus - 300.0, defocus_angle_deg=30.0,
        pre_exposure_e_per_A2=3.0 * torch.arange(n, dtype=torch.float64), defocus_hand=-1, pixel_size_A=PIXEL_A,
        image_size_px=(IMAGE_PX, IMAGE_PX), voltage_kV=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07)


def _tilt_images(projector, geometry, centres_A, poses, noise_sd, generator) -> torch.Tensor:
    """Images ``[n, ny, nx]``: −CTF·D (at each particle's defocus) applied to the line sums of the particles
    (protein dark), each at its true centre; white noise of ``noise_sd``."""
    where = particle_tilt_positions(geometry, centres_A, EXTRACT_BOX_PX)
    images = torch.zeros((geometry.n_tilts, IMAGE_PX, IMAGE_PX))
    k = radial_frequency_grid((EXTRACT_BOX_PX, EXTRACT_BOX_PX), torch.tensor(PIXEL_A, dtype=torch.float64))
    h = EXTRACT_BOX_PX // 2
    for i in range(geometry.n_tilts):
        nearest = torch.floor(where.xy_px[:, i] + 0.5)
        patches = projector.project(geometry.rotations[i] @ poses, where.xy_px[:, i] - nearest) / PIXEL_A
        patches = torch.nn.functional.pad(patches, [(EXTRACT_BOX_PX - BOX) // 2] * 4)
        u, v, angle = where.defocus_A[:, i].unbind(-1)
        ctf = ctf_2d((EXTRACT_BOX_PX, EXTRACT_BOX_PX), PIXEL_A, u, v, angle, **ACQUISITION)
        dose = exposure_filter(k, float(geometry.pre_exposure_e_per_A2[i]), 300.0)
        patches = torch.fft.irfft2(torch.fft.rfft2(patches) * (ctf * dose).float(), s=patches.shape[-2:])
        for j, (x, y) in enumerate(nearest.long().tolist()):
            images[i, y - h:y + h, x - h:x + h] -= patches[j]
    return images + noise_sd * torch.randn(images.shape, generator=generator)


def test_through_the_real_extraction_the_sign_and_the_shift_frame_hold(projector):
    generator = torch.Generator().manual_seed(9)
    geometry = _geometry()
    picks_A = torch.tensor([[-450.0, -450.0, 30.0], [450.0, -450.0, -30.0], [-450.0, 450.0, 0.0],
                            [450.0, 450.0, 50.0]], dtype=torch.float64)
    m = picks_A.shape[0]
    poses = random_rotations(m, generator=generator, dtype=torch.float64)
    shifts_A = torch.tensor([[6.0, -4.0, 5.0], [-5.0, 3.0, -6.0], [4.0, 6.0, 3.0], [-3.0, -6.0, -4.0]],
                            dtype=torch.float64)
    images = _tilt_images(projector, geometry, picks_A + shifts_A, poses, 0.05, generator)
    crops = extract_crops(images, geometry, picks_A, EXTRACT_BOX_PX, BOX)
    assert bool(crops.kept.all())
    crops_ft = centred_rfft2(crops.crops)
    # the weights a step computes for crops read back from disk are the extraction's own
    tilts = torch.arange(geometry.n_tilts).repeat(m)
    weights = TiltCtfWeights(geometry, crops.pixel_size_A, BOX, True, "cpu")(tilts, crops.defocus_A[..., 0].reshape(-1))
    assert torch.allclose(weights.reshape(crops.ctf2.shape), crops.ctf2, atol=1e-6)
    noise = torch.full((BOX // 2 + 1,), BOX * BOX * 0.05**2)
    data = ParticleStacks(crops_ft, crops.ctf2, geometry.rotations.float(), crops.pixel_size_A, noise)
    result = local_search(projector, data, poses[:, None], torch.zeros((m, 3), dtype=torch.float64), 2.5, 5.0,
                          10.0, 2.0, MAX_FREQUENCY_PX)
    assert float(misorientation_deg(result.best_rotations, poses).max()) <= 2.5
    assert float((result.best_shifts_A - shifts_A).abs().max()) <= 1.0  # half the shift step, per axis
    flipped = ParticleStacks(-crops_ft, crops.ctf2, geometry.rotations.float(), crops.pixel_size_A, noise)
    again = search_poses(projector, flipped, result.best_rotations[:, None], shift_grid_A(0.0, 1.0), MAX_FREQUENCY_PX,
                         centre_shifts_A=result.best_shifts_A)
    assert bool((again.scores[:, 0] < result.scores[:, 0]).all())
