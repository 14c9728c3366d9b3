"""Scoring a tomogram against the true specimen (:mod:`tomopipe.validate.tomogram`).

The placement of a rotated reference is checked against the simulator's own projector
(:class:`tomopipe.simulate.projector.FourierSliceProjector`, which images a particle as the
projection of the reference rotated by ``R·A``), so the truth volume and the simulated images
share one convention that is not re-derived here. The scores are checked on a phantom tilt
series made with that projector and reconstructed with our WBP.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from tomopipe.algorithms.geometry import euler_relion_to_matrix, projection_rotations, random_rotations, rotation_y
from tomopipe.algorithms.reconstruct import ReconstructionParams, reconstruct_volume
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import write_mrc
from tomopipe.io.star import write_particles_star
from tomopipe.simulate.projector import FourierSliceProjector
from tomopipe.validate.tomogram import (
    fourier_upsample,
    score_tomogram,
    score_tomogram_against_truth,
    specimen_volume,
)
from tomopipe.validate.truth import Truth

pytestmark = pytest.mark.usefixtures("one_thread")

VOXEL_A = 4.0
TILTS = torch.arange(-60.0, 61.0, 3.0, dtype=torch.float64)
AXIS_DEG = -85.6


def chiral_reference(n=16, voxel_A=VOXEL_A):
    """A centre blob and three distinct arms along +x, +y, +z (a right-handed triad: its mirror
    image is not a rotation of it)."""
    c = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    ref = torch.zeros((n, n, n), dtype=torch.float64)
    for (bx, by, bz), sigma, amp in (((0, 0, 0), 1.4, 1.0), ((4.0, 0, 0), 1.1, 0.8),
                                     ((0, 3.0, 0), 1.0, 0.7), ((0, 0, 2.5), 0.9, 0.6)):
        ref += amp * torch.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2 * sigma**2))
    return ref.float()


def phantom_particles(count=14, seed=0, half_xyz=(96.0, 96.0, 36.0)):
    g = torch.Generator().manual_seed(seed)
    positions = (torch.rand((count, 3), generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor(half_xyz)
    return positions, random_rotations(count, generator=g, dtype=torch.float64)


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_fourier_upsample_interpolates_through_the_samples():
    g = torch.Generator().manual_seed(1)
    volume = torch.randn((12, 12, 12), generator=g, dtype=torch.float64)
    up = fourier_upsample(volume, 2)
    assert up.shape == (24, 24, 24)
    torch.testing.assert_close(up[::2, ::2, ::2], volume, atol=1e-10, rtol=0)
    # a smooth function is interpolated between the samples too
    c = torch.arange(12, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 2 * c / 12)[None, None, :].expand(12, 12, 12)
    fine = torch.cos(2 * math.pi * 2 * (torch.arange(36, dtype=torch.float64) / 3) / 12)
    torch.testing.assert_close(fourier_upsample(wave, 3)[5, 7], fine, atol=1e-10, rtol=0)


def test_rotated_reference_lands_where_the_simulator_puts_it():
    """One particle at the centre, rotated by A: its projections along z and along x equal the
    simulator's projections of the reference with rotations A and Ry(90°)·A (reference ->
    particle, then the tilt); the mirror-image particle does not match."""
    n = 32
    reference = chiral_reference(n)
    rotation = euler_relion_to_matrix(torch.tensor(30.0), torch.tensor(60.0), torch.tensor(90.0)).double()
    projector = FourierSliceProjector(reference, VOXEL_A, pad_factor=3, use_compiled=False)
    top = projector.project(rotation[None])[0]  # image [y, x]
    side = projector.project((rotation_y(torch.tensor(90.0, dtype=torch.float64)) @ rotation)[None])[0]  # [y, z]

    def views(rot):
        volume = specimen_volume(reference, VOXEL_A, torch.zeros(1, 3), rot[None], (n, n, n), VOXEL_A)
        return volume.sum(0) * VOXEL_A, volume.sum(2).T * VOXEL_A  # projected potential, V·Å

    def error(a, b):  # relative RMS difference
        return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))

    ours_top, ours_side = views(rotation)
    assert error(ours_top, top) < 0.05 and error(ours_side, side) < 0.05
    assert float(ours_top.sum()) == pytest.approx(float(top.sum()), rel=0.02)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    for bad in (rotation @ mirror, mirror @ rotation):
        bad_top, bad_side = views(bad)
        assert max(error(bad_top, top), error(bad_side, side)) > 0.2


def test_placement_position_rotation_and_mass():
    """An off-centre blob d of the reference ends at c + A·d; the mass is kept when the output
    grid is coarser than the reference (low-passed, then sampled)."""
    n = 24
    c = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    d = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)  # reference voxels (x, y, z)
    reference = torch.exp(-((x - d[0]) ** 2 + y**2 + z**2) / (2 * 1.5**2)).float()
    ref_voxel_A, out_voxel_A = 2.0, 3.0
    rotation = euler_relion_to_matrix(torch.tensor(-40.0), torch.tensor(75.0), torch.tensor(20.0)).double()
    centre_A = torch.tensor([[10.0, -7.0, 5.0]], dtype=torch.float64)
    shape = (30, 34, 36)
    volume = specimen_volume(reference, ref_voxel_A, centre_A, rotation[None], shape, out_voxel_A).double()
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) - s // 2 for s in shape), indexing="ij")
    total = volume.sum()
    centroid_A = torch.stack([(volume * grids[2]).sum(), (volume * grids[1]).sum(),
                              (volume * grids[0]).sum()]) / total * out_voxel_A
    expected_A = centre_A[0] + rotation @ (d * ref_voxel_A)
    assert torch.allclose(centroid_A, expected_A, atol=0.1 * out_voxel_A), (centroid_A, expected_A)
    assert float(total) * out_voxel_A**3 == pytest.approx(float(reference.sum()) * ref_voxel_A**3, rel=0.01)
    # a particle whose blob sits on the last voxel plane (x = 17 voxels) is cut about in half
    edge_A = torch.tensor([[17 * out_voxel_A, 0.0, 0.0]], dtype=torch.float64) - (rotation @ (d * ref_voxel_A))[None]
    clipped = specimen_volume(reference, ref_voxel_A, edge_A, rotation[None], shape, out_voxel_A)
    assert 0.4 < float(clipped.sum()) / float(total) < 0.75


@pytest.fixture(scope="module")
def phantom():
    """A phantom specimen (positive density), its projections by the simulator's projector
    (RELION 5 model, axis -85.6°, ±60°), our WBP of them and the true volume on that grid."""
    n = 64
    positions, rotations = phantom_particles()
    reference = chiral_reference()
    cube = specimen_volume(reference, VOXEL_A, positions, rotations, (n, n, n), VOXEL_A)
    r = projection_rotations(torch.tensor(AXIS_DEG, dtype=torch.float64), TILTS)
    images = FourierSliceProjector(cube, VOXEL_A, pad_factor=2, use_compiled=False).project(r)
    params = ReconstructionParams(thickness_px=32, super_sampling=1)
    tomogram = reconstruct_volume(images, AXIS_DEG, TILTS, 0.0, torch.zeros(len(TILTS), 2), VOXEL_A, params)
    truth = specimen_volume(reference, VOXEL_A, positions, rotations, tuple(tomogram.shape), VOXEL_A)
    return tomogram, truth, reference, positions, rotations


def test_wbp_of_the_phantom_scores_well_and_beats_its_mirror(phantom):
    tomogram, truth, *_ = phantom
    score = score_tomogram(tomogram, truth, VOXEL_A, 12.0, contrast_sign=1)
    assert max(abs(v) for v in score.translation_A) < 0.3 * VOXEL_A, score.translation_A
    assert score.correlation > 0.8
    assert score.mirrored_correlation < score.correlation - 0.4
    assert score.fsc_0_143_A < 14.0  # the missing wedge (±60°) costs little at this size
    assert score.fsc_0_143_A < score.mirrored_fsc_0_143_A
    assert len(score.fsc_curve) == len(score.fsc_frequencies_per_A) == 64 // 2 + 1
    # a dark-protein tomogram (the raw contrast) scores the same with contrast_sign = -1 ...
    dark = score_tomogram(-tomogram, truth, VOXEL_A, 12.0, contrast_sign=-1, mirror=False)
    assert dark.correlation == pytest.approx(score.correlation, abs=1e-6)
    # ... and poorly with the wrong sign
    assert score_tomogram(-tomogram, truth, VOXEL_A, 12.0, contrast_sign=1, mirror=False).correlation < 0.3


def test_translation_search_recovers_a_known_shift(phantom):
    tomogram, truth, *_ = phantom
    shift_zyx = (2, -3, 5)
    moved = torch.roll(tomogram, shifts=shift_zyx, dims=(0, 1, 2))
    score = score_tomogram(moved, truth, VOXEL_A, 12.0, contrast_sign=1, mirror=False)
    want = (5 * VOXEL_A, -3 * VOXEL_A, 2 * VOXEL_A)
    assert all(abs(g - w) < 0.3 * VOXEL_A for g, w in zip(score.translation_A, want)), score.translation_A
    assert score.correlation > 0.75
    # a sub-voxel shift (Fourier shift of the truth itself): found to a tenth of a voxel
    k = [torch.fft.fftfreq(s, dtype=torch.float64) for s in truth.shape[:2]] + \
        [torch.fft.rfftfreq(truth.shape[2], dtype=torch.float64)]
    phase = -2 * math.pi * (k[0][:, None, None] * 1.4 + k[1][None, :, None] * -0.6 + k[2][None, None, :] * 2.3)
    shifted = torch.fft.irfftn(torch.fft.rfftn(truth.double()) * torch.polar(torch.ones_like(phase), phase),
                               s=truth.shape).float()
    exact = score_tomogram(shifted, truth, VOXEL_A, 2 * VOXEL_A, contrast_sign=1, mirror=False)
    for got, want in zip(exact.translation_A, (2.3 * VOXEL_A, -0.6 * VOXEL_A, 1.4 * VOXEL_A)):
        assert abs(got - want) < 0.1 * VOXEL_A, exact.translation_A
    # outside max_shift_A the true shift is not found
    limited = score_tomogram(moved, truth, VOXEL_A, 12.0, contrast_sign=1, mirror=False, max_shift_A=2 * VOXEL_A)
    assert limited.correlation < score.correlation - 0.2


def test_identical_volumes_give_perfect_scores(phantom):
    _, truth, *_ = phantom
    score = score_tomogram(truth, truth, VOXEL_A, 10.0, contrast_sign=1)
    assert score.correlation == pytest.approx(1.0, abs=1e-6)
    assert score.translation_A == (0.0, 0.0, 0.0)
    assert score.fsc_0_143_A == pytest.approx(2 * VOXEL_A) and score.fsc_0_5_A == pytest.approx(2 * VOXEL_A)


def test_bad_input_raises(phantom):
    tomogram, truth, *_ = phantom
    with pytest.raises(TomopipeError, match="one shape"):
        score_tomogram(tomogram[1:], truth, VOXEL_A, 12.0)
    with pytest.raises(TomopipeError, match="contrast_sign"):
        score_tomogram(tomogram, truth, VOXEL_A, 12.0, contrast_sign=0)
    with pytest.raises(TomopipeError, match="Nyquist"):
        score_tomogram(tomogram, truth, VOXEL_A, 5.0)
    with pytest.raises(TomopipeError, match="empty"):
        score_tomogram(tomogram, torch.zeros_like(truth), VOXEL_A, 12.0)
    with pytest.raises(TomopipeError, match="cubic"):
        specimen_volume(torch.zeros(4, 4, 5), 1.0, torch.zeros(1, 3), torch.eye(3)[None], (8, 8, 8), 1.0)


def test_wrapper_reads_the_truth_files_and_finds_a_tilt_offset(tmp_path, phantom):
    """A truth folder as the simulator writes it (particles.star, maps/true_map_binN.mrc,
    truth.json): the wrapper rebuilds the specimen from the files, and a tomogram whose specimen
    is turned by 4° about the tilt axis is found at δ ≈ 4°."""
    _, _, reference, positions, rotations = phantom
    folder = tmp_path / "truth"
    (folder / "maps").mkdir(parents=True)
    (folder / "truth.json").write_text(json.dumps({"config": {}}))
    write_mrc(folder / "maps" / "true_map_bin1.mrc", reference.numpy(), VOXEL_A)
    write_mrc(folder / "maps" / "true_map_bin2.mrc", reference.numpy()[::2, ::2, ::2].copy(), 2 * VOXEL_A)
    from tomopipe.algorithms.geometry import matrix_to_euler_relion

    rot, tilt, psi = matrix_to_euler_relion(rotations)
    particles = pd.DataFrame({"rlnTomoName": "TS_01", "rlnCenteredCoordinateXAngst": positions[:, 0].numpy(),
                              "rlnCenteredCoordinateYAngst": positions[:, 1].numpy(),
                              "rlnCenteredCoordinateZAngst": positions[:, 2].numpy(),
                              "rlnAngleRot": rot.numpy(), "rlnAngleTilt": tilt.numpy(), "rlnAnglePsi": psi.numpy(),
                              "rlnOpticsGroup": 1})
    write_particles_star(folder / "particles.star", particles, pd.DataFrame({"rlnOpticsGroup": [1],
                                                                             "rlnOpticsGroupName": ["optics1"]}))
    truth = Truth.find(tmp_path)
    turn = rotation_y(torch.tensor(4.0, dtype=torch.float64))
    shape = (32, 64, 64)
    tomogram = -specimen_volume(reference, VOXEL_A, positions @ turn.T, turn @ rotations, shape, VOXEL_A)
    plain = score_tomogram_against_truth(tomogram, VOXEL_A, truth, "TS_01", 12.0)
    searched = score_tomogram_against_truth(tomogram, VOXEL_A, truth, "TS_01", 12.0, tilt_offset_search_deg=6.0,
                                            tilt_offset_step_deg=1.5)
    assert searched.tilt_offset_deg == pytest.approx(4.0, abs=0.4)
    assert searched.correlation > 0.97
    assert plain.correlation < searched.correlation - 0.05
    assert searched.mirrored_correlation < 0.6
    with pytest.raises(TomopipeError, match="TS_09"):
        score_tomogram_against_truth(tomogram, VOXEL_A, truth, "TS_09", 12.0)


def test_register_translation_finds_a_known_sub_voxel_shift():
    """The truth moved by the registered shift lands on the tomogram: a smooth blob moved by a known
    (z, y, x) shift is found to a tenth of a voxel; a limit smaller than the shift stops the search."""
    from tomopipe.algorithms.fourier import phase_ramp_rfftn
    from tomopipe.validate.tomogram.register import register_translation

    shape = (24, 32, 28)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - n // 2 for n in shape), indexing="ij")
    truth = torch.exp(-(z**2 / 8 + (y - 2) ** 2 / 18 + (x + 1) ** 2 / 12)) - 0.5 * torch.exp(-((z - 3) ** 2 + y**2
                                                                                            + (x - 4) ** 2) / 6)
    shift = (1.5, -2.25, 3.0)
    tomogram = torch.fft.irfftn(torch.fft.rfftn(truth) * phase_ramp_rfftn(shape, shift), s=shape)
    found = register_translation(tomogram, truth, VOXEL_A, 3 * VOXEL_A, (6.0, 6.0, 6.0))
    assert found.shift_zyx_vox == pytest.approx(shift, abs=0.1)
    moved = torch.fft.irfftn(found.moved_truth_spectrum, s=found.padded_shape)[:24, :32, :28]
    assert float((moved - tomogram).abs().max()) < 0.05 * float(truth.abs().max())
    limited = register_translation(tomogram, truth, VOXEL_A, 3 * VOXEL_A, (6.0, 1.0, 6.0))
    assert abs(limited.shift_zyx_vox[1]) <= 1.5
