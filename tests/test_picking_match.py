"""Template matching search and peak extraction (issue 11) on synthetic tomograms with known particles.

The particles are an asymmetric template of four Gaussians, rendered analytically at known positions
with known orientations A (Gaussian i at ``position + A · offset_i``), independently of the code under
test, so the rotation convention of ``match_template`` is checked, not assumed.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from tomopipe.algorithms.geometry import random_rotations
from tomopipe.algorithms.picking.extract import extract_peaks, false_alarm_threshold, specimen_slab_z
from tomopipe.algorithms.picking.match import (
    _oversampled,
    is_spherical,
    match_template,
    phase_randomized,
    rotate_volumes,
)
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.algorithms.picking.weighting import tilt_weight_rfftn

BOX = 24
VOXEL_A = 8.0
SHAPE = (64, 96, 96)
OFFSETS_XYZ = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 3.5, 0.0], [-1.5, -2.0, -3.5]],
                           dtype=torch.float64)
SIGMAS_PX = (2.2, 1.6, 1.6, 1.4)
AMPLITUDES = (1.0, 0.9, 0.7, 0.8)
CENTRES_ZYX = [(30, 30, 30), (34, 62, 28), (28, 40, 70), (33, 70, 66)]
TRUE_INDEX = [2, 9, 15, 21]


pytestmark = pytest.mark.usefixtures("one_thread")


def render(shape, centres_zyx, rotations) -> torch.Tensor:
    """The asymmetric particle at every centre (voxels, z y x) with orientation A: V(A^T (x - p))."""
    volume = torch.zeros(shape, dtype=torch.float64)
    for centre, rotation in zip(centres_zyx, rotations):
        c = torch.as_tensor(centre, dtype=torch.float64)
        lo = [max(0, int(c[i]) - 12) for i in range(3)]
        hi = [min(shape[i], int(c[i]) + 13) for i in range(3)]
        z, y, x = torch.meshgrid(*[torch.arange(a, b, dtype=torch.float64) for a, b in zip(lo, hi)], indexing="ij")
        for offset, sigma, amplitude in zip(OFFSETS_XYZ, SIGMAS_PX, AMPLITUDES):
            qx, qy, qz = (c.flip(0) + rotation.to(torch.float64) @ offset).tolist()
            volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += amplitude * torch.exp(
                -((x - qx) ** 2 + (y - qy) ** 2 + (z - qz) ** 2) / (2 * sigma**2))
    return volume.to(torch.float32)


def template() -> torch.Tensor:
    return render((BOX,) * 3, [(BOX // 2,) * 3], [torch.eye(3)])


def mask() -> torch.Tensor:
    return spherical_mask(BOX, VOXEL_A, 22 * VOXEL_A, 2 * VOXEL_A)


def missing_wedge(volume: torch.Tensor, max_tilt_deg: float = 60.0) -> torch.Tensor:
    """Zero the Fourier components outside ±max_tilt of the XY plane about Y (a tilt series about Y)."""
    kz = torch.fft.fftfreq(volume.shape[0])[:, None, None]
    kx = torch.fft.rfftfreq(volume.shape[2])[None, None, :]
    keep = (kz.abs() <= math.tan(math.radians(max_tilt_deg)) * kx.abs() + 1e-9) | ((kz == 0) & (kx == 0))
    return torch.fft.irfftn(torch.fft.rfftn(volume) * keep, s=volume.shape)


def wedge_weight() -> torch.Tensor:
    """The ±60° tilt series' weight on the template box, CTF ≈ 1 (all amplitude contrast, no Cs)."""
    return tilt_weight_rfftn(BOX, VOXEL_A, torch.arange(-60.0, 60.1, 3.0), 1.0, 0.0, 300.0, 0.0, 0.999)


def test_rotation_is_exact_at_identity_and_follows_the_convention():
    t = template()
    fine = _oversampled(t[None])
    assert torch.allclose(rotate_volumes(fine, torch.eye(3)[None], BOX)[0, 0], t, atol=1e-5)
    rotation = random_rotations(1, torch.Generator().manual_seed(4))[0]
    rotated = rotate_volumes(fine, torch.stack([rotation, rotation.T]), BOX)[:, 0]
    truth = render((BOX,) * 3, [(BOX // 2,) * 3], [rotation])  # V(A^T x)
    assert float((rotated[0] - truth).abs().max()) < 0.04 * float(truth.max())
    assert float((rotated[1] - truth).abs().max()) > 0.3 * float(truth.max())  # A^T is another particle


def test_spherical_mask_detection():
    assert is_spherical(mask())
    assert not is_spherical(template())
    r = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    ellipsoid = ((r[:, None, None] / 6) ** 2 + (r[None, :, None] / 9) ** 2 + (r[None, None, :] / 9) ** 2 <= 1)
    assert not is_spherical(ellipsoid.float())


def test_phase_randomised_template_keeps_the_amplitudes():
    t = template()
    randomised = phase_randomized(t, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.fft.rfftn(randomised).abs(), torch.fft.rfftn(t).abs(), atol=1e-3)
    assert float(torch.corrcoef(torch.stack([t.flatten(), randomised.flatten()]))[0, 1]) < 0.5


def test_ncc_of_the_template_with_itself_is_one_at_the_centre():
    t = template()
    tomogram = torch.zeros(40, 44, 48)
    tomogram[8:32, 10:34, 12:36] = t  # template centre at (20, 22, 24)
    rotations = torch.cat([torch.eye(3)[None], random_rotations(5, torch.Generator().manual_seed(1))])
    result = match_template(tomogram, t, mask(), rotations, background_correction=False)
    assert float(result.scores[20, 22, 24]) == pytest.approx(1.0, abs=1e-4)
    assert int(result.rotation_index[20, 22, 24]) == 0
    assert float(result.scores.max()) <= 1.0 + 1e-4


def test_a_particle_cut_by_the_edge_scores_from_its_inside_part_without_wrapping():
    """The tomogram is zero-padded: a particle whose centre lies 3 voxels from the edge is found
    where it is, with about sqrt(fraction inside) of its full score, and nothing wraps to the far side."""
    t = template()
    tomogram = torch.zeros(40, 44, 48)
    tomogram[8:32, 10:34, :15] = t[:, :, 9:]  # template centre at x = 3
    tomogram += 0.02 * torch.randn(tomogram.shape, generator=torch.Generator().manual_seed(2))
    result = match_template(tomogram, t, mask(), torch.eye(3)[None], background_correction=False)
    peak = divmod(int(torch.argmax(result.scores[20])), 48)
    assert peak == (22, 3)
    assert 0.5 < float(result.scores[20, 22, 3]) < 0.99
    assert float(result.scores[20, 22, 40:].max()) < 0.3  # the far edge does not see it


def test_recovers_positions_and_orientations_through_the_missing_wedge():
    generator = torch.Generator().manual_seed(3)
    rotations = random_rotations(24, generator)
    clean = render(SHAPE, CENTRES_ZYX, rotations[TRUE_INDEX])
    tomogram = missing_wedge(clean + 0.5 * torch.randn(SHAPE, generator=generator))
    weighted = match_template(tomogram, template(), mask(), rotations, wedge_weight(), background_correction=True,
                              generator=torch.Generator().manual_seed(0))
    peaks = extract_peaks(weighted.scores, weighted.rotation_index, min_distance_px=10, max_peaks=len(CENTRES_ZYX),
                          edge_px=BOX // 2)
    assert len(peaks) == len(CENTRES_ZYX)
    for centre, index in zip(CENTRES_ZYX, TRUE_INDEX):
        distance = (peaks.positions_zyx_px - torch.tensor(centre, dtype=torch.float64)).norm(dim=1)
        k = int(distance.argmin())
        assert float(distance[k]) < 1.0 and int(peaks.rotation_index[k]) == index
    # the wedge weight makes the template look like the particles in this tomogram: higher scores
    plain = match_template(tomogram, template(), mask(), rotations, background_correction=False)
    raw = match_template(tomogram, template(), mask(), rotations, wedge_weight(), background_correction=False)
    for centre in CENTRES_ZYX:
        assert float(raw.scores[centre]) > float(plain.scores[centre]) * 1.03


def test_rotating_mask_gives_the_ncc_of_a_rotated_particle():
    rotations = random_rotations(6, torch.Generator().manual_seed(7))
    tomogram = render((48, 48, 48), [(24, 24, 24)], [rotations[4]])
    r = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    ellipsoid = ((r[:, None, None] / 9) ** 2 + (r[None, :, None] / 11) ** 2 + (r[None, None, :] / 11) ** 2 <= 1)
    result = match_template(tomogram, template(), ellipsoid.float(), rotations, background_correction=False,
                            batch_size=4)
    assert int(result.rotation_index[24, 24, 24]) == 4
    assert float(result.scores[24, 24, 24]) > 0.98
    assert float(result.scores.max()) <= 1.0 + 1e-4


def test_noise_scores_and_false_alarm_threshold():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    rotations = random_rotations(20, torch.Generator().manual_seed(6))
    result = match_template(noise, template(), mask(), rotations, background_correction=False)
    n_valid = result.scores.numel()
    mean = float(result.score_sum.sum()) / (n_valid * result.n_rotations)
    sigma = result.score_std()
    expected = 1.0 / math.sqrt(float(mask().sum()))  # white noise: σ of the NCC = 1 / sqrt(N_mask)
    assert abs(mean) < 0.05 * sigma and 0.8 * expected < sigma < 1.2 * expected
    threshold = false_alarm_threshold(sigma, n_valid, result.n_rotations)
    peaks = extract_peaks(result.scores, result.rotation_index, min_distance_px=10, threshold=threshold)
    assert len(peaks) <= 1
    upper = torch.zeros(SHAPE, dtype=torch.bool)
    upper[SHAPE[0] // 2:] = True
    assert result.score_std(upper) == pytest.approx(sigma, rel=0.1)


def test_false_alarm_threshold_known_values():
    # √2 · erfcinv(2e-6) = Φ⁻¹(1 − 1e-6) = 4.753424
    assert false_alarm_threshold(0.1, 10**5, 10, 1.0) == pytest.approx(0.4753424, rel=1e-6)
    assert false_alarm_threshold(1.0, 10**6, 10**4, 2.0) == pytest.approx(-NormalDist().inv_cdf(2e-10), rel=1e-12)
    assert false_alarm_threshold(1.0, 10**6, 100, 10.0) < false_alarm_threshold(1.0, 10**6, 100, 1.0)
    with pytest.raises(ValueError, match="score_std > 0"):
        false_alarm_threshold(0.0, 10, 10)


def test_background_correction_lowers_a_membrane_relative_to_the_particles():
    """A thin high-contrast plane (a membrane or a carbon edge) correlates with any template that has
    the same spectrum: the random-phase correction removes most of its score, not the particles'."""
    rotations = random_rotations(24, torch.Generator().manual_seed(3))
    x = torch.arange(SHAPE[2], dtype=torch.float32)
    membrane = 2.0 * torch.exp(-0.5 * (x - 85.0) ** 2)
    volume = render(SHAPE, CENTRES_ZYX, rotations[TRUE_INDEX]) + membrane
    tomogram = volume + 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ratios = []
    for correction in (False, True):
        result = match_template(tomogram, template(), mask(), rotations, background_correction=correction,
                                generator=torch.Generator().manual_seed(0))
        particles = min(float(result.scores[c]) for c in CENTRES_ZYX)
        inner = result.scores[BOX // 2:-(BOX // 2), BOX // 2:-(BOX // 2), 80:SHAPE[2] - BOX // 2]  # away from the edges
        ratios.append(float(inner.max()) / particles)
    assert ratios[0] > 0.7 and ratios[1] < 0.5 * ratios[0]


def test_specimen_slab():
    generator = torch.Generator().manual_seed(2)
    n = 40
    centres = torch.stack([24 + 16 * torch.rand(n, generator=generator), 12 + 72 * torch.rand(n, generator=generator),
                           12 + 72 * torch.rand(n, generator=generator)], 1)
    particles = render(SHAPE, centres.tolist(), random_rotations(n, generator))
    z_min, z_max = specimen_slab_z(particles + 0.5 * torch.randn(SHAPE, generator=generator))
    assert abs(z_min - float(centres[:, 0].min())) <= 3 and abs(z_max - 1 - float(centres[:, 0].max())) <= 3
    assert specimen_slab_z(torch.randn(SHAPE, generator=generator)) == (0, SHAPE[0])  # nothing stands out
    everywhere = torch.stack([-4 + 72 * torch.rand(4 * n, generator=generator),
                              4 + 88 * torch.rand(4 * n, generator=generator),
                              4 + 88 * torch.rand(4 * n, generator=generator)], 1)  # also cut by the faces
    filled = render(SHAPE, everywhere.tolist(), random_rotations(4 * n, generator))
    z_min, z_max = specimen_slab_z(filled + 0.5 * torch.randn(SHAPE, generator=generator))
    assert z_min <= 2 and z_max >= SHAPE[0] - 2


def test_extract_peaks_distance_edges_threshold_and_subvoxel():
    shape = (40, 50, 60)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    truth = [((20.3, 25.0, 30.6), 1.0), ((20.0, 25.0, 36.0), 0.8), ((3.0, 25.0, 30.0), 2.0), ((30.2, 10.4, 12.0), 0.6)]
    scores = torch.zeros(shape, dtype=torch.float64)
    for (pz, py, px), height in truth:
        scores += height * torch.exp(-((z - pz) ** 2 + (y - py) ** 2 + (x - px) ** 2) / (2 * 1.5**2))
    scores = scores.float()
    index = torch.arange(scores.numel()).reshape(shape)
    peaks = extract_peaks(scores, index, min_distance_px=8, threshold=0.1, edge_px=5)
    # the peak at z = 3 is at the edge (and leaves no peak on the border); the 0.8 one is 6 px from the 1.0 one
    assert len(peaks) == 2 and bool((peaks.scores[:-1] >= peaks.scores[1:]).all())
    assert torch.allclose(peaks.positions_zyx_px[0], torch.tensor([20.3, 25.0, 30.6], dtype=torch.float64),
                          atol=0.1)
    assert torch.allclose(peaks.positions_zyx_px[1], torch.tensor([30.2, 10.4, 12.0], dtype=torch.float64),
                          atol=0.1)
    assert int(peaks.rotation_index[0]) == int(index[20, 25, 31])
    assert len(extract_peaks(scores, index, min_distance_px=5, threshold=0.1, edge_px=2)) == 4  # closer allowed
    assert len(extract_peaks(scores, index, min_distance_px=8, threshold=0.7, edge_px=5)) == 1
    assert len(extract_peaks(scores, index, min_distance_px=8, threshold=0.1, z_range=(0, 25), edge_px=5)) == 1
    assert len(extract_peaks(scores, index, min_distance_px=8, max_peaks=1, edge_px=5)) == 1
    empty = extract_peaks(scores, index, min_distance_px=8, threshold=5.0)
    assert len(empty) == 0 and empty.positions_zyx_px.shape == (0, 3)


def test_bad_inputs_are_refused():
    t, m = template(), mask()
    with pytest.raises(ValueError, match="larger than the tomogram"):
        match_template(torch.randn(20, 40, 40), t, m, torch.eye(3)[None])
    with pytest.raises(ValueError, match="mask"):
        match_template(torch.randn(40, 40, 40), t, m[:-1], torch.eye(3)[None])
    with pytest.raises(ValueError, match="weight_rfftn"):
        match_template(torch.randn(40, 40, 40), t, m, torch.eye(3)[None], torch.ones(BOX, BOX, BOX))
    with pytest.raises(ValueError, match="constant"):
        match_template(torch.ones(40, 40, 40), t, m, torch.eye(3)[None])
