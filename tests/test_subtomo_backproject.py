"""Fourier insertion and reconstruction (:mod:`tomopipe.algorithms.subtomo.backproject`).

The test volumes are sums of Gaussian blobs, whose projections are known in closed form (a 3-D
Gaussian of width σ integrates along z to a 2-D Gaussian times √(2π)·σ): the images are
independent of the projector, so the exactness tests also check the rotation convention.
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms._numba import HAVE_NUMBA
from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.fourier import embed_centered
from tomopipe.algorithms.fourier_slice import FourierSliceProjector
from tomopipe.algorithms.fsc import fsc
from tomopipe.algorithms.geometry import random_rotations
from tomopipe.algorithms.subtomo.backproject import (
    FourierAccumulator,
    centred_rfft2,
    pseudo_subtomogram,
    ssnr_from_fsc,
)
from tomopipe.algorithms.symmetry import symmetry_group

pytestmark = pytest.mark.usefixtures("one_thread")

N = 32
SIGMA_PX = 1.3
COMPILED = [True, False] if HAVE_NUMBA else [False]


def _blob_centres(count: int, radius_px: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blob centres (x, y, z) px from the box centre inside a sphere, and amplitudes."""
    c = (torch.rand((count * 3, 3), generator=generator, dtype=torch.float64) * 2 - 1) * radius_px
    c = c[(c * c).sum(1) <= radius_px**2][:count]
    return c, torch.rand(c.shape[0], generator=generator, dtype=torch.float64) + 0.5


def _blob_volume(centres: torch.Tensor, amplitudes: torch.Tensor, n: int = N) -> torch.Tensor:
    """``[n, n, n]`` (z, y, x) float64: Σ a·exp(-|x - c|² / 2σ²), centre at voxel n//2."""
    ax = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    v = torch.zeros((n, n, n), dtype=torch.float64)
    for c, a in zip(centres, amplitudes):
        v += a * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * SIGMA_PX**2))
    return v


def _blob_projections(centres: torch.Tensor, amplitudes: torch.Tensor, rotations: torch.Tensor,
                      n: int = N) -> torch.Tensor:
    """Line sums ``[k, n, n]`` (float32) of the blob volume rotated by ``rotations`` (x_image = R·x_ref)."""
    ax = torch.arange(n, dtype=torch.float32) - n // 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    moved = torch.einsum("kij,bj->kbi", rotations.double(), centres).float()
    scale = (amplitudes * math.sqrt(2 * math.pi) * SIGMA_PX).float()
    out = torch.zeros((rotations.shape[0], n, n), dtype=torch.float32)
    for b in range(centres.shape[0]):
        dx = x - moved[:, b, 0, None, None]
        dy = y - moved[:, b, 1, None, None]
        out += scale[b] * torch.exp(-(dx * dx + dy * dy) / (2 * SIGMA_PX**2))
    return out


def _shells_up_to(fraction_of_nyquist: float, n: int = N) -> slice:
    return slice(1, int(fraction_of_nyquist * (n // 2)) + 1)


@pytest.fixture(scope="module")
def blobs_2000():
    """A 32³ map of 40 blobs, and its projections at 2000 uniformly random orientations."""
    generator = torch.Generator().manual_seed(0)
    centres, amplitudes = _blob_centres(40, 0.3 * N, generator)
    rotations = random_rotations(2000, generator=generator, dtype=torch.float32)
    return _blob_volume(centres, amplitudes), rotations, _blob_projections(centres, amplitudes, rotations)


def test_reconstruction_is_exact_to_0_9_nyquist(blobs_2000):
    volume, rotations, images = blobs_2000
    acc = FourierAccumulator(N)
    acc.insert(centred_rfft2(images, acc.p), rotations)
    reconstruction = acc.reconstruct().double()
    curve = fsc(reconstruction, volume)
    error = float((reconstruction - volume).norm() / volume.norm())
    print("FSC vs truth per shell:", [round(float(c), 4) for c in curve], f"relative error {error:.4f}")
    assert curve[_shells_up_to(0.9)].min() >= 0.99
    assert error < 0.01  # the amplitudes too: without the gridding correction 0.048


def test_round_trip_through_the_projector(blobs_2000):
    """Projections in V·Å (FourierSliceProjector, 2 Å voxels) / voxel size reconstruct the map in V;
    the residual is the projector's own side-lobe error at pad 2."""
    volume, rotations, _ = blobs_2000
    pixel_A = 2.0
    images = FourierSliceProjector(volume.float(), pixel_A, pad_factor=2).project(rotations) / pixel_A
    acc = FourierAccumulator(N)
    acc.insert(centred_rfft2(images, acc.p), rotations)
    assert float((acc.reconstruct().double() - volume).norm() / volume.norm()) < 0.03


def test_unpadded_slices_reconstruct_well_but_less_exactly(blobs_2000):
    """RELION-style insertion of the N-box spectra (holes between the low-frequency rings)."""
    volume, rotations, images = blobs_2000
    acc = FourierAccumulator(N)
    acc.insert(centred_rfft2(images), rotations)
    curve = fsc(acc.reconstruct().double(), volume)
    print("FSC vs truth per shell (N-box slices):", [round(float(c), 4) for c in curve])
    assert curve[_shells_up_to(0.75)].min() >= 0.98
    assert curve[_shells_up_to(0.9)].min() < 0.99


def test_ctf_premultiplied_reconstruction(blobs_2000):
    """Observed images CTF·F (each view its own defocus), premultiplied once more (data Σ CTF²·F,
    weights Σ CTF², both on the padded image grid, as with a CTF box larger than the crop)."""
    volume, rotations, images = blobs_2000
    pixel_A, generator = 4.0, torch.Generator().manual_seed(1)
    acc = FourierAccumulator(N)
    defocus_A = 5000.0 + 10000.0 * torch.rand(images.shape[0], generator=generator, dtype=torch.float64)
    ctf = ctf_2d((acc.p, acc.p), pixel_A, defocus_A, defocus_A * 1.05, 30.0, 300.0, 2.7, 0.07).float()
    acc.insert(centred_rfft2(images, acc.p) * ctf * ctf, rotations, ctf * ctf)
    curve = fsc(acc.reconstruct().double(), volume)
    print("FSC vs truth per shell (CTF):", [round(float(c), 4) for c in curve])
    assert curve[_shells_up_to(0.8)].min() >= 0.98


def test_symmetry_o_improves_a_sparse_reconstruction():
    generator = torch.Generator().manual_seed(2)
    group = symmetry_group("O")
    base, amplitudes = _blob_centres(5, 0.3 * N, generator)
    centres = torch.einsum("gij,bj->gbi", group, base).reshape(-1, 3)  # V(g·x) = V(x)
    amplitudes = amplitudes.repeat(group.shape[0])
    volume = _blob_volume(centres, amplitudes)
    rotations = random_rotations(100, generator=generator, dtype=torch.float32)
    spectra = centred_rfft2(_blob_projections(centres, amplitudes, rotations), 2 * N)
    plain, symmetrised = FourierAccumulator(N), FourierAccumulator(N)
    for acc in (plain, symmetrised):
        acc.insert(spectra, rotations)
    symmetrised.symmetrise("O")
    shells = _shells_up_to(0.9)
    with_o = fsc(symmetrised.reconstruct().double(), volume)[shells]
    without = fsc(plain.reconstruct().double(), volume)[shells]
    print("FSC without / with O:", [round(float(c), 3) for c in without], [round(float(c), 3) for c in with_o])
    assert bool((with_o >= without - 1e-3).all())
    assert with_o.min() >= 0.99 > without.min() + 0.05


def test_symmetrise_with_c1_keeps_the_sphere(blobs_2000):
    """C1 keeps every voxel within the insertion sphere and drops the partial ones past it."""
    _, rotations, images = blobs_2000
    acc = FourierAccumulator(N)
    acc.insert(centred_rfft2(images[:50]), rotations[:50])
    before = acc.data.clone(), acc.weight.clone(), acc.multiplicity.clone()
    acc.symmetrise("C1")
    ky = torch.fft.fftfreq(acc.p, d=1.0 / acc.p)
    radius = (ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + torch.arange(acc.p // 2 + 1) ** 2).sqrt()
    inside = radius <= acc.p // 2 - 1
    for old, new in zip(before, (acc.data, acc.weight, acc.multiplicity)):
        assert float(old[~inside].abs().max()) > 0
        torch.testing.assert_close(new, torch.where(inside, old, torch.zeros_like(old)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "size"), [(8, 8), (8, 16), (7, 7), (7, 12)])
def test_centred_rfft2_is_the_spectrum_of_the_centred_zero_padded_image(n, size):
    """Pixel N//2 at the origin: the DFT sum Σ f(j)·exp(-2πi k·(j - N//2)/size), computed directly."""
    images = torch.randn((2, n, n), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    j = torch.arange(n, dtype=torch.float64) - n // 2
    ky, kx = torch.arange(size, dtype=torch.float64), torch.arange(size // 2 + 1, dtype=torch.float64)
    ey = torch.exp(-2j * math.pi * ky[:, None] * j[None, :] / size)  # [size, n]
    ex = torch.exp(-2j * math.pi * j[:, None] * kx[None, :] / size)  # [n, size//2+1]
    expected = ey @ images.to(torch.complex128) @ ex
    torch.testing.assert_close(centred_rfft2(images, size).to(torch.complex128), expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("group", ["O", "D7"])
def test_compiled_and_torch_symmetrisation_agree(blobs_2000, group):
    """The compiled symmetrisation gives the torch path's grids (the edge shell, where the torch path's
    float32 sphere test of the rotated frequency may drop a voxel, left out)."""
    _, rotations, images = blobs_2000
    spectra = centred_rfft2(images[:64], 2 * N)
    weights = torch.rand(spectra.shape, generator=torch.Generator().manual_seed(5))
    grids = []
    for compiled in (True, False):
        acc = FourierAccumulator(N, use_compiled=compiled)
        acc.insert(spectra, rotations[:64], weights)
        acc.symmetrise(group)
        grids.append(torch.view_as_real(acc.data).clone().unbind(-1) + (acc.weight, acc.multiplicity))
    ky = torch.fft.fftfreq(2 * N, d=1.0 / (2 * N))
    radius = (ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + torch.arange(N + 1) ** 2).sqrt()
    inside = radius <= N - 1.5
    for a, b in zip(*grids):
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a[inside] / scale, b[inside] / scale, rtol=0, atol=1e-5)


def _weighted_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Re Σ conj(a)·b over half spectra (last axis = x), the plane x = 0 counted 1/2 (its mirror
    half is not stored): the full-spectrum inner product / 2."""
    w = torch.ones(a.shape[-1], dtype=torch.float64)
    w[0] = 0.5
    return float(((a.conj() * b).real.double() * w).sum())


@pytest.mark.parametrize("compiled", COMPILED)
def test_insertion_is_the_adjoint_of_the_projector(compiled):
    """<S·F, s> = <F, Sᵀ·s> for the projector's slice sampling S and the insertion Sᵀ (pad 2)."""
    generator = torch.Generator().manual_seed(3)
    n, pad = 16, 2
    volume = torch.randn((n, n, n), generator=generator)
    projector = FourierSliceProjector(volume, 1.0, pad_factor=pad)
    rotations = random_rotations(40, generator=generator, dtype=torch.float32)
    sampled = projector.slices(rotations, torch.ones(40))
    # the projector's spectrum, built here independently: gridding-corrected, padded, centre at index 0
    d = torch.arange(n, dtype=torch.float64) - n // 2
    kernel = torch.sinc(d / (pad * n)) ** 2
    corrected = volume.double() / (kernel[:, None, None] * kernel[:, None] * kernel)
    spectrum = torch.fft.rfftn(torch.fft.ifftshift(embed_centered(corrected, (pad * n,) * 3)))
    probe = torch.complex(torch.randn(sampled.shape, generator=generator), torch.randn(sampled.shape,
                                                                                    generator=generator))
    acc = FourierAccumulator(n, pad_factor=pad, density_compensation=False, use_compiled=compiled)
    acc.insert(probe, rotations)
    left = _weighted_dot(sampled.to(torch.complex128), probe.to(torch.complex128))
    right = _weighted_dot(spectrum, acc.data.to(torch.complex128))
    assert abs(left - right) <= 1e-4 * abs(left)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_and_torch_insertion_agree(blobs_2000, padded):
    if not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    _, rotations, images = blobs_2000
    spectra = centred_rfft2(images[:64], 2 * N if padded else N)
    weights = torch.rand(spectra.shape, generator=torch.Generator().manual_seed(4))
    grids = []
    for compiled in (True, False):
        acc = FourierAccumulator(N, use_compiled=compiled)
        acc.insert(spectra, rotations[:64], weights)
        grids.append((acc.data, acc.weight, acc.multiplicity))
    for a, b in zip(*grids):
        scale = float(b.abs().max())
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
def test_compiled_insertion_gives_the_same_sums_with_any_thread_count(blobs_2000):
    from tomopipe.algorithms._numba import numba

    _, rotations, images = blobs_2000
    spectra = centred_rfft2(images[:64], 2 * N)
    previous, grids = numba.get_num_threads(), []
    try:
        for threads in sorted({1, min(3, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            acc = FourierAccumulator(N)
            acc.insert(spectra, rotations[:64])
            grids.append(torch.view_as_real(acc.data).clone())
    finally:
        numba.set_num_threads(previous)
    assert torch.equal(grids[0], grids[-1])


@pytest.mark.parametrize("padded", [False, True])
def test_off_centre_blob_reconstructs_at_its_position(padded):
    generator = torch.Generator().manual_seed(5)
    offset = torch.tensor([[5.0, -3.0, 7.0]], dtype=torch.float64)  # (x, y, z) px from the centre
    rotations = random_rotations(300, generator=generator, dtype=torch.float32)
    acc = FourierAccumulator(N)
    images = _blob_projections(offset, torch.ones(1, dtype=torch.float64), rotations)
    acc.insert(centred_rfft2(images, acc.p if padded else N), rotations)
    volume = acc.reconstruct().double()
    peak = torch.nonzero(volume == volume.max())[0].tolist()
    assert peak == [N // 2 + 7, N // 2 - 3, N // 2 + 5]  # (z, y, x)
    window = volume.clamp(min=0) * (volume > 0.1 * volume.max())
    ax = torch.arange(N, dtype=torch.float64) - N // 2
    centroid = [float((window * ax.reshape(shape)).sum() / window.sum()) for shape in ((1, 1, N), (1, N, 1),
                                                                                     (N, 1, 1))]
    assert centroid == pytest.approx([5.0, -3.0, 7.0], abs=0.02)


def test_half_sets_add_and_ssnr_regularisation_lowers_the_error():
    """Two half sets joined with ``add`` equal one accumulator; with noisy images the FSC-based
    Wiener term (gold standard: SSNR from the half maps) gives a map closer to the truth."""
    generator = torch.Generator().manual_seed(6)
    centres, amplitudes = _blob_centres(40, 0.3 * N, generator)
    volume = _blob_volume(centres, amplitudes)
    rotations = random_rotations(400, generator=generator, dtype=torch.float32)
    images = _blob_projections(centres, amplitudes, rotations)
    images = images + 2.0 * images.std() * torch.randn(images.shape, generator=generator)
    spectra = centred_rfft2(images, 2 * N)
    halves = [FourierAccumulator(N), FourierAccumulator(N)]
    for i, acc in enumerate(halves):
        acc.insert(spectra[i::2], rotations[i::2])
    both = FourierAccumulator(N)
    both.insert(spectra, rotations)
    curve = fsc(halves[0].reconstruct().double(), halves[1].reconstruct().double())
    joined = FourierAccumulator(N)
    for acc in halves:
        joined.add(acc)
    torch.testing.assert_close(joined.weight, both.weight, rtol=1e-5, atol=1e-4)
    plain = joined.reconstruct().double()
    wiener = joined.reconstruct(ssnr=2.0 * ssnr_from_fsc(curve)).double()  # the full set: twice the half SSNR
    error_plain, error_wiener = (plain - volume).norm() / volume.norm(), (wiener - volume).norm() / volume.norm()
    print(f"relative error plain {float(error_plain):.3f}, with SSNR {float(error_wiener):.3f}")
    assert error_wiener < 0.8 * error_plain


def test_pseudo_subtomogram_of_one_untilted_view():
    """One view at the identity: the data term is the (band-limited) image spread along z, /N
    (the inverse 3-D FFT), the weights are CTF² on the plane kz = 0, the multiplicity 1 there."""
    generator = torch.Generator().manual_seed(7)
    n = 16
    spectrum = torch.fft.rfft2(torch.randn((n, n), generator=generator))
    ky = torch.fft.fftfreq(n, d=1.0 / n)[:, None]
    kx = torch.fft.rfftfreq(n, d=1.0 / n)[None, :]
    inside = (kx**2 + ky**2).sqrt() <= n // 2 - 2
    image = torch.fft.irfft2(spectrum * inside, s=(n, n))
    ctf = ctf_2d((n, n), 3.0, 20000.0, 21000.0, 10.0, 300.0, 2.7, 0.1).float()
    result = pseudo_subtomogram(centred_rfft2(image[None]), (ctf * ctf)[None], torch.eye(3)[None])
    torch.testing.assert_close(result.data, (image / n).expand(n, n, n), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.weights[0][inside], (ctf * ctf)[inside], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.multiplicity[0][inside], torch.ones(int(inside.sum())))
    assert float(result.weights[1:].abs().max()) == 0.0


def test_bad_input_is_named():
    acc = FourierAccumulator(N)
    with pytest.raises(ValueError, match="slices must be"):
        acc.insert(torch.zeros((2, 30, 16), dtype=torch.complex64), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="rotations"):
        acc.insert(torch.zeros((2, N, N // 2 + 1), dtype=torch.complex64), torch.eye(3)[None])
    with pytest.raises(ValueError, match="box_px"):
        FourierAccumulator(31)
    with pytest.raises(ValueError, match="differ"):
        acc.add(FourierAccumulator(N, pad_factor=3))
