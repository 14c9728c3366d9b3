"""De novo initial model from synthetic 3-D pseudo-subtomograms of a known O-symmetric, chiral volume.

The data are made with the repo's own functions: projections of the rotated, shifted volume
(:class:`FourierSliceProjector`) over ±60° (a missing wedge), white noise, and the
pseudo-subtomogram insertion (:func:`pseudo_subtomogram`). Criterion: after aligning the result
to the truth (:func:`align_volumes`, both hands tried), the FSC against the truth stays ≥ 0.5 up
to shell N/3 (1.5 × the Nyquist resolution; the map made with the true poses reaches
shell 9 of 12 here), the poses agree with the truth modulo O and the hand is right; the
same for a C1 model once its O axes are found and O imposed (:func:`align_symmetry`).
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.fourier_slice import FourierSliceProjector
from tomopipe.algorithms.fsc import fsc
from tomopipe.algorithms.geometry import euler_relion_to_matrix, projection_rotations, random_rotations
from tomopipe.algorithms.picking.template import MaskDoesNotFitError
from tomopipe.algorithms.subtomo.backproject import centred_rfft2, pseudo_subtomogram
from tomopipe.algorithms.subtomo.initial_model import (
    InitialModelError,
    _tilt_log_prior,
    align_symmetry,
    align_volumes,
    initial_model,
    rotate_and_shift,
)
from tomopipe.algorithms.symmetry import UnknownSymmetryError, misorientation_deg, symmetry_group

N = 24
PIXEL_A = 7.9
TILTS_DEG = torch.arange(-60.0, 61.0, 4.0)


def chiral_o_volume(n: int = N, generator_seed: int = 3) -> torch.Tensor:
    """Sum of Gaussians at the O orbits of three random points (O-symmetric, no mirror symmetry)."""
    g = torch.Generator().manual_seed(generator_seed)
    points = torch.randn((3, 3), generator=g, dtype=torch.float64)
    points = points / torch.linalg.norm(points, dim=1, keepdim=True) * torch.tensor([[4.5], [6.0], [7.0]])
    amplitudes = torch.tensor([1.0, 0.7, 0.5], dtype=torch.float64)
    group = symmetry_group("O")
    centres = torch.einsum("gij,pj->gpi", group, points).reshape(-1, 3)
    weights = amplitudes.repeat(group.shape[0])
    r = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    grid = torch.stack([x, y, z], -1)
    volume = torch.zeros((n, n, n), dtype=torch.float64)
    for c, a in zip(centres, weights):
        volume += a * torch.exp(-((grid - c) ** 2).sum(-1) / (2 * 1.3**2))
    return volume.float()


def synthetic_particles(volume: torch.Tensor, count: int, snr: float, seed: int = 0, pixel_size_A: float = PIXEL_A,
                        tilts_deg: torch.Tensor = TILTS_DEG):
    """Pseudo-subtomogram spectra ``[m, N, N, N//2+1]`` (tomogram frame), weights, true poses (reference ->
    particle) and offsets (px, uniform in ±1 per axis) of ``count`` particles; ``snr``: per image, the
    signal's variance (of the first particle's images) over the white noise's."""
    g = torch.Generator().manual_seed(seed)
    poses = random_rotations(count, generator=g, dtype=torch.float32)
    offsets = (torch.rand((count, 3), generator=g) * 2.0 - 1.0)
    views = projection_rotations(85.0, tilts_deg).float()
    projector = FourierSliceProjector(volume, pixel_size_A, pad_factor=2)
    signal_std = projector.project(views @ poses[0]).std()
    data, weights = [], []
    for pose, offset in zip(poses, offsets):
        rotations = views @ pose
        shifts = (views @ offset)[:, :2]
        images = projector.project(rotations, shifts)
        images = images + torch.randn(images.shape, generator=g) * signal_std / math.sqrt(snr)
        slices = centred_rfft2(images)
        sub = pseudo_subtomogram(slices, torch.ones(slices.shape), views)  # inserted in the tomogram frame
        data.append(torch.fft.rfftn(torch.fft.ifftshift(sub.data)))
        weights.append(sub.weights)
    return torch.stack(data), torch.stack(weights), poses, offsets


@pytest.fixture(scope="module")
def o_particles():
    torch.set_num_threads(1)
    volume = chiral_o_volume()
    data, weights, poses, offsets = synthetic_particles(volume, 120, snr=0.5)
    return volume, data, weights, poses, offsets


def _fsc_shell_half(curve: torch.Tensor) -> float:
    below = torch.nonzero(curve[1:] < 0.5)
    return float(below[0]) + 1 if below.numel() else float(curve.numel())


def test_align_volumes_recovers_a_known_rotation_shift_and_mirror():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    truth = chiral_o_volume()
    rotation = random_rotations(1, generator=g, dtype=torch.float32)[0]
    moved = torch.roll(torch.flip(truth, dims=(-1,)), 1, dims=-1)  # the mirror image
    moved = rotate_and_shift(moved, rotation, torch.tensor([1.0, -2.0, 0.0]), pad=2)
    result = align_volumes(moved, truth, symmetry="O", step_deg=10.0)
    assert result.mirrored
    assert result.correlation > 0.99 > result.other_hand_correlation + 0.01
    assert float(fsc(result.aligned, truth)[1:N // 2 - 2].min()) > 0.95


def test_initial_model_recovers_an_o_symmetric_volume(o_particles):
    volume, data, weights, poses, offsets = o_particles
    result = initial_model(data, weights, PIXEL_A, mask_diameter_A=170.0, symmetry="O", n_iterations=20,
                           batch_size=30, initial_resolution_A=60.0, final_resolution_A=20.0, max_offset_px=1,
                           generator=torch.Generator().manual_seed(0))
    assert result.volume.shape == (N, N, N) and len(result.log) == 20
    assert result.log[0].resolution_A == 60.0 and result.log[-1].resolution_A == pytest.approx(20.0)
    alignment = align_volumes(result.volume, volume, symmetry="O", step_deg=10.0)
    curve = fsc(alignment.aligned, volume)
    assert not alignment.mirrored  # 3-D data fix the hand
    assert alignment.correlation > alignment.other_hand_correlation
    assert _fsc_shell_half(curve) >= N / 3  # FSC 0.5 at ≤ 1.5 × the Nyquist resolution (23.7 Å)
    # poses in the truth's frame (aligned(x) = result(Rᵀx): A_true = A·Rᵀ), modulo O, within the final 7° step
    in_truth_frame = result.rotations.double() @ alignment.rotation.double().T
    assert float(misorientation_deg(in_truth_frame, poses.double(), "O").median()) < 7.0


def test_tilt_prior_counts_the_closest_symmetry_mate():
    """``-(tilt - prior)²/(2σ²)`` of RELION's tilt Euler angle; with O, a mate 90° away can meet the prior."""
    rotation = euler_relion_to_matrix(30.0, 80.0, -20.0).float()[None]
    c1 = symmetry_group("C1").float()
    prior = torch.tensor([80.0, 90.0, 60.0])
    assert _tilt_log_prior(rotation, c1, prior, 10.0)[:, 0].tolist() == pytest.approx([0.0, -0.5, -2.0], abs=1e-4)
    untilted = torch.eye(3)[None]  # tilt 0; the O mates about x and y have tilt 90°
    assert float(_tilt_log_prior(untilted, symmetry_group("O").float(), torch.tensor([90.0]), 5.0)) == pytest.approx(
        0.0, abs=1e-4)
    assert float(_tilt_log_prior(untilted, c1, torch.tensor([90.0]), 5.0)) == pytest.approx(-0.5 * 18.0**2, rel=1e-4)


def test_bad_input_is_named():
    data = torch.zeros((4, N, N, N // 2 + 1), dtype=torch.complex64)
    weights = torch.ones(data.shape)
    with pytest.raises(MaskDoesNotFitError, match="does not fit"):
        initial_model(data, weights, PIXEL_A, mask_diameter_A=250.0)
    with pytest.raises(UnknownSymmetryError, match="unknown symmetry"):
        initial_model(data, weights, PIXEL_A, mask_diameter_A=150.0, symmetry="Q2")
    with pytest.raises(InitialModelError, match="weights must be real"):
        initial_model(data, weights[..., :-1], PIXEL_A, mask_diameter_A=150.0)
    with pytest.raises(InitialModelError, match="data_ft must be"):
        initial_model(data.real, weights, PIXEL_A, mask_diameter_A=150.0)
    with pytest.raises(InitialModelError, match="tilt_prior_deg needs one angle per particle"):
        initial_model(data, weights, PIXEL_A, mask_diameter_A=150.0, tilt_prior_deg=torch.zeros(3), sigma_tilt_deg=5.0)
    with pytest.raises(InitialModelError, match="at least 2 particles"):
        initial_model(data[:1], weights[:1], PIXEL_A, mask_diameter_A=150.0)


def test_c1_model_of_o_data_symmetrised_in_its_found_frame(o_particles):
    """RELION's other route: a C1 model, then the frame of its O axes found and O imposed (align_symmetry)."""
    volume, data, weights, poses, offsets = o_particles
    result = initial_model(data, weights, PIXEL_A, mask_diameter_A=170.0, symmetry="C1", n_iterations=30,
                           batch_size=30, initial_resolution_A=60.0, final_resolution_A=30.0, max_offset_px=1,
                           generator=torch.Generator().manual_seed(0))
    frame = align_symmetry(result.volume, "O")
    assert frame.correlation > 0.9
    alignment = align_volumes(frame.symmetrised, volume, symmetry="O", step_deg=10.0)
    assert not alignment.mirrored
    assert _fsc_shell_half(fsc(alignment.aligned, volume)) >= N / 4  # FSC 0.5 at ≤ 31.6 Å (final limit 30 Å)
