"""Particle extraction from tilt series (RELION 5 ``--stack2d``): centring, defocus at the particle,
CTF premultiplication, binning, dropped particles, batching (:mod:`tomopipe.algorithms.subtomo.extract`).

The synthetic tilt series is made here without the extraction's geometry code: Gaussian blobs at
the projected particle positions, with the projection ``Rz(axis)·Ry(tilt)`` written out in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.filters import exposure_filter, radial_frequency_grid
from tomopipe.algorithms.subtomo.extract import (
    TiltGeometry,
    circle_crop,
    extract_crops,
    particle_tilt_positions,
)
from tomopipe.errors import TomopipeError

pytestmark = pytest.mark.usefixtures("one_thread")

AXIS_DEG = 85.0
TILTS_DEG = np.arange(-60.0, 60.1, 3.0)
PIXEL_A = 1.0
NX, NY = 256, 224
SIGMA_A = 4.0
# 75 Å apart along the tilt axis (specimen y), so that no blob ever enters another's box
PARTICLES_A = np.array([[-25.0, -75.0, 20.0], [20.0, 0.0, -30.0], [5.0, 75.0, 25.0]])


def _rotation(axis_deg: float, tilt_deg: float) -> np.ndarray:
    a, t = math.radians(axis_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])
    return rz @ ry


def _shifts_A(n: int) -> np.ndarray:
    return np.random.default_rng(3).uniform(-12.0, 12.0, size=(n, 2))


def _geometry(tilts_deg=TILTS_DEG, shifts_A=None, size=(NX, NY), pixel_A=PIXEL_A, hand=-1, pre_exposure=None,
              defocus=(30000.0, 29000.0, 30.0)) -> TiltGeometry:
    n = len(tilts_deg)
    shifts = torch.tensor(np.asarray(_shifts_A(n) if shifts_A is None else shifts_A))
    return TiltGeometry.from_alignment(
        AXIS_DEG, torch.tensor(tilts_deg), 0.0, shifts,
        defocus_u_A=defocus[0], defocus_v_A=defocus[1], defocus_angle_deg=defocus[2],
        pre_exposure_e_per_A2=torch.zeros(n) if pre_exposure is None else pre_exposure, defocus_hand=hand,
        pixel_size_A=pixel_A, image_size_px=size, voltage_kV=300.0, spherical_aberration_mm=2.7,
        amplitude_contrast=0.1)


def _blob_tilt_series(particles_A: np.ndarray) -> torch.Tensor:
    """Sum of Gaussians (sigma SIGMA_A) at each particle's projection ``N//2 + (R·p)_xy + shift``."""
    shifts = _shifts_A(len(TILTS_DEG))
    y, x = np.mgrid[0:NY, 0:NX].astype(np.float64)
    images = np.zeros((len(TILTS_DEG), NY, NX))
    for i, tilt in enumerate(TILTS_DEG):
        projected = particles_A @ _rotation(AXIS_DEG, tilt).T
        for px, py in (projected[:, :2] + shifts[i]) / PIXEL_A + np.array([NX // 2, NY // 2]):
            images[i] += np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2.0 * (SIGMA_A / PIXEL_A) ** 2))
    return torch.from_numpy(images.astype(np.float32))


@pytest.fixture(scope="module")
def blob_series() -> torch.Tensor:
    return _blob_tilt_series(PARTICLES_A)


def _centroids_px(crops: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (x, y) of each crop relative to its centre ``c//2``."""
    c = crops.shape[-1]
    i = torch.arange(c, dtype=torch.float64) - c // 2
    w = crops.double()
    total = w.sum(dim=(-1, -2))
    return torch.stack([(w * i[None, :]).sum(dim=(-1, -2)) / total, (w * i[:, None]).sum(dim=(-1, -2)) / total], -1)


@pytest.mark.parametrize("binning", [1.0, 2.0])
def test_every_tilt_puts_the_particle_on_the_crop_centre(blob_series, binning):
    result = extract_crops(blob_series, _geometry(), torch.tensor(PARTICLES_A), box_px=int(64 / binning),
                           crop_px=int(48 / binning), binning=binning, apply_ctf=False, circle_falloff_px=None,
                           invert_contrast=False)
    assert result.kept.all() and result.visible.all()
    assert result.pixel_size_A == pytest.approx(PIXEL_A * binning)
    error = _centroids_px(result.crops).abs().max()
    assert error < 0.05, f"max centroid offset {error:.4f} px"
    # a positive blob stays positive without inversion, mean-preserving binning keeps its integral
    total = result.crops.double().sum(dim=(-1, -2))
    assert torch.allclose(total, torch.full_like(total, 2.0 * math.pi * (SIGMA_A / (PIXEL_A * binning)) ** 2),
                          rtol=1e-3)


def test_contrast_inversion_and_circle_crop_keep_the_centre(blob_series):
    result = extract_crops(blob_series, _geometry(), torch.tensor(PARTICLES_A), box_px=48, crop_px=32,
                           apply_ctf=False)
    assert (result.crops.double().sum(dim=(-1, -2)) < 0).all()  # a dense particle comes out with inverted sign
    assert _centroids_px(result.crops).abs().max() < 0.05


def test_binning_two_halves_the_offsets_from_the_image_centre():
    geometry = _geometry()
    p = torch.tensor(PARTICLES_A)
    full = particle_tilt_positions(geometry, p, box_px=32, binning=1.0)
    half = particle_tilt_positions(geometry, p, box_px=16, binning=2.0)
    centre_full = torch.tensor([NX // 2, NY // 2], dtype=torch.float64)
    centre_half = torch.tensor([NX // 4, NY // 4], dtype=torch.float64)
    assert torch.allclose(half.xy_px - centre_half, 0.5 * (full.xy_px - centre_full), atol=1e-9)
    # a view's magnification scales the rotated position, not the shift
    shifts = torch.from_numpy(_shifts_A(len(TILTS_DEG)))
    scaled = particle_tilt_positions(
        TiltGeometry(**{**geometry.__dict__, "magnification": 1.02}), p, box_px=32, binning=1.0)
    assert torch.allclose(scaled.xy_px - centre_full - shifts, 1.02 * (full.xy_px - centre_full - shifts), atol=1e-9)
    # and the same projection as the numpy model of the synthetic series
    expected = PARTICLES_A @ _rotation(AXIS_DEG, TILTS_DEG[5]).T
    assert torch.allclose(full.xy_px[:, 5], torch.from_numpy(expected[:, :2] + _shifts_A(len(TILTS_DEG))[5])
                          + centre_full, atol=1e-9)


@pytest.mark.parametrize("hand", [-1, 1])
def test_defocus_at_the_particle_height_follows_the_hand(hand):
    """At a +60° tilt: z_P = -sin60·x + cos60·z; RELION Δf = Δf_centre + hand·z_P on U and V."""
    geometry = _geometry(tilts_deg=[60.0], shifts_A=[[0.0, 0.0]], hand=hand, defocus=(30000.0, 28000.0, 40.0))
    above, below, right = [0.0, 0.0, 500.0], [0.0, 0.0, -500.0], [1000.0, 0.0, 0.0]
    where = particle_tilt_positions(geometry, torch.tensor([above, below, right]), box_px=16)
    z_p = torch.tensor([250.0, -250.0, -1000.0 * math.sin(math.radians(60.0))], dtype=torch.float64)
    assert torch.allclose(where.defocus_A[:, 0, 0], 30000.0 + hand * z_p, atol=1e-6)
    assert torch.allclose(where.defocus_A[:, 0, 1], 28000.0 + hand * z_p, atol=1e-6)
    assert torch.allclose(where.defocus_A[:, 0, 2], torch.full((3,), 40.0, dtype=torch.float64))
    if hand == -1:  # IMOD's "no invert": at positive tilt the +x side is more underfocused, +z less
        assert where.defocus_A[2, 0, 0] > 30000.0 > where.defocus_A[0, 0, 0]


@pytest.mark.parametrize("hand", [-1, 1])
def test_ctf_premultiplied_delta_gives_ctf_squared_times_dose(hand):
    """Extracting from an image that is a CTF-convolved delta gives -CTF²·D in Fourier space (inverted)."""
    size, pixel_A, tilt_deg, p = 64, 2.0, 60.0, [0.0, 0.0, 400.0]
    projected = np.array(p) @ _rotation(AXIS_DEG, tilt_deg).T
    u, v, angle, pre = 20000.0, 18500.0, 30.0, 40.0
    geometry = _geometry(tilts_deg=[tilt_deg], shifts_A=[-projected[:2]], size=(size, size), pixel_A=pixel_A,
                         hand=hand, pre_exposure=[pre], defocus=(u, v, angle))
    depth = math.cos(math.radians(tilt_deg)) * p[2]  # the particle's z_P (x = 0)

    def ctf(delta):
        return ctf_2d((size, size), pixel_A, u + delta, v + delta, angle, 300.0, 2.7, 0.1).double()

    particle_ctf = ctf(hand * depth)
    delta_at_centre = torch.roll(torch.fft.irfft2(particle_ctf, s=(size, size)), (size // 2, size // 2), (0, 1))
    result = extract_crops(delta_at_centre[None], geometry, torch.tensor([p]), box_px=size, crop_px=size,
                           circle_falloff_px=None)
    assert result.visible.all()
    spectrum = torch.fft.rfft2(torch.fft.ifftshift(result.crops[0, 0].double()))
    dose = exposure_filter(radial_frequency_grid((size, size), pixel_A).double(), pre, 300.0).double()
    expected = -particle_ctf**2 * dose
    # the Nyquist row and column of an even box cannot hold an astigmatic CTF (not Hermitian there)
    inner = torch.ones_like(expected, dtype=torch.bool)
    inner[size // 2, :] = inner[:, size // 2] = False
    assert (spectrum - expected)[inner].abs().max() < 1e-4
    assert (result.ctf2[0, 0].double() - (particle_ctf * dose) ** 2).abs().max() < 1e-5
    wrong_hand = -ctf(-hand * depth) * particle_ctf * dose  # the test can tell the hands apart
    assert (spectrum - wrong_hand)[inner].abs().max() > 0.01  # 100x the tolerance above


def test_particles_off_the_images_are_dropped_and_counted(blob_series):
    # one particle far outside every image, one near the edge seen by the high tilts only (x·cos θ fits)
    p = torch.tensor(np.vstack([PARTICLES_A, [[0.0, 400.0, 0.0], [100.0, 40.0, 0.0]]]))
    geometry = _geometry()
    result = extract_crops(blob_series, geometry, p, box_px=40, crop_px=32, apply_ctf=False)
    assert result.kept.tolist() == [True, True, True, False, True]
    assert result.n_dropped == 1
    partial = result.visible[4]
    assert 0 < int(partial.sum()) < geometry.n_tilts
    assert (result.crops[4, ~partial] == 0).all() and (result.ctf2[4, ~partial] == 0).all()
    strict = extract_crops(blob_series, geometry, p, box_px=40, crop_px=32, apply_ctf=False,
                           min_visible_tilts=geometry.n_tilts)
    assert strict.kept.tolist() == [True, True, True, False, False] and strict.n_dropped == 2


def test_max_dose_leaves_out_the_later_tilts(blob_series):
    n = len(TILTS_DEG)
    pre = torch.arange(n, dtype=torch.float64) * 3.0
    geometry = _geometry(pre_exposure=pre)
    result = extract_crops(blob_series, geometry, torch.tensor(PARTICLES_A), box_px=40, crop_px=32,
                           max_dose_e_per_A2=60.0)
    assert result.visible.tolist() == [[d <= 60.0 for d in pre.tolist()]] * len(PARTICLES_A)
    assert (result.crops[:, pre > 60.0] == 0).all()


def test_batch_size_and_image_source_do_not_change_the_result(blob_series):
    geometry = _geometry(pre_exposure=torch.arange(len(TILTS_DEG), dtype=torch.float64) * 3.0)
    p = torch.tensor(PARTICLES_A)
    one = extract_crops(blob_series, geometry, p, box_px=40, crop_px=32, batch_size=1)
    calls = []

    def read(i):
        calls.append(i)
        return blob_series[i]

    many = extract_crops(read, geometry, p, box_px=40, crop_px=32, batch_size=64)
    assert sorted(calls) == list(range(geometry.n_tilts))  # every tilt read once
    assert torch.allclose(one.crops, many.crops, atol=1e-6) and torch.allclose(one.ctf2, many.ctf2, atol=1e-7)


def test_circle_crop_subtracts_the_background_and_zeroes_the_outside():
    boxes = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0)) + 5.0
    out = circle_crop(boxes, 24, 4)
    i = torch.arange(32) - 16
    r = torch.sqrt((i[:, None] ** 2 + i[None, :] ** 2).float())
    background = boxes[:, r >= 12].mean(dim=-1)
    assert (out[:, r >= 12] == 0).all()
    inner = r < 8
    assert torch.allclose(out[:, inner], boxes[:, inner] - background[:, None], atol=1e-5)


def test_bad_sizes_are_clear_errors(blob_series):
    geometry = _geometry()
    p = torch.tensor(PARTICLES_A)
    with pytest.raises(TomopipeError, match="does not fit"):
        extract_crops(blob_series, geometry, p, box_px=128, binning=2.0)
    with pytest.raises(TomopipeError, match="crop_px <= box_px"):
        extract_crops(blob_series, geometry, p, box_px=32, crop_px=48)
    with pytest.raises(TomopipeError, match="shape"):
        extract_crops(blob_series[:, :100], geometry, p, box_px=32)
    with pytest.raises(TomopipeError, match="defocus_hand"):
        _geometry(hand=0)
