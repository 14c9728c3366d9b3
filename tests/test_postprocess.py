"""Post-processing (issue 12): mask-corrected FSC, B-factor fit, sharpening, auto mask, local resolution.

Half maps are a known signal plus independent white noise of standard deviation sigma, so the
expected FSC of each shell is ``P_S / (P_S + P_N)`` (SNR/(1 + SNR)), with P_S the signal's mean
power in the shell and P_N = sigma² · Σ mask² the power of masked white noise per coefficient.
"""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms import postprocess as pp
from tomopipe.algorithms.filters import radial_frequency_grid
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_indices
from tomopipe.algorithms.picking.template import shell_template, spherical_mask, template_from_atomic_model
from tomopipe.data import APOFERRITIN_MODEL
from tomopipe.errors import TomopipeError
from tomopipe.io.atomic_model import read_atomic_model

pytestmark = pytest.mark.usefixtures("one_thread")

N, PIX = 64, 2.0
F64 = torch.float64


def _k_per_A() -> torch.Tensor:
    return radial_frequency_grid((N, N, N), torch.tensor(PIX, dtype=F64))


def _field(b_factor_A2: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian random field whose amplitudes fall as exp(-B k²/4) (white for B = 0)."""
    white = torch.randn(N, N, N, generator=gen, dtype=F64)
    return torch.fft.irfftn(torch.fft.rfftn(white) * torch.exp(-0.25 * b_factor_A2 * _k_per_A() ** 2), s=(N,) * 3)


def _shell_mean_power(volume: torch.Tensor) -> torch.Tensor:
    idx = shell_indices(N, 3).reshape(-1)
    keep = idx <= N // 2
    power = torch.fft.rfftn(volume).abs().square().reshape(-1)
    return torch.bincount(idx[keep], power[keep], N // 2 + 1) / torch.bincount(idx[keep], minlength=N // 2 + 1)


def _expected_fsc(signal: torch.Tensor, sigma: float, mask: torch.Tensor | None) -> torch.Tensor:
    noise_power = sigma**2 * (float((mask**2).sum()) if mask is not None else N**3)
    power = _shell_mean_power(signal if mask is None else signal * mask)
    return power / (power + noise_power)


def _halves(signal: torch.Tensor, sigma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple((signal + sigma * torch.randn(N, N, N, generator=gen, dtype=F64)).float() for _ in range(2))


def _shell(resolution_A: float) -> float:
    return N * PIX / resolution_A


def test_randomise_phases_keeps_amplitudes_and_low_shells():
    gen = torch.Generator().manual_seed(3)
    volume = _field(100.0, gen).float()
    beyond = 10
    out = pp.randomise_phases(volume, beyond, gen)
    assert out.dtype == torch.float32 and out.shape == volume.shape
    f_in, f_out = torch.fft.rfftn(volume.double()), torch.fft.rfftn(out.double())
    torch.testing.assert_close(f_out.abs(), f_in.abs(), rtol=1e-4, atol=1e-4 * float(f_in.abs().max()))
    low = shell_indices(N, 3) <= beyond
    torch.testing.assert_close(f_out[low], f_in[low], rtol=1e-4, atol=1e-4 * float(f_in.abs().max()))
    curve = fsc(volume, out)
    assert curve[1:beyond + 1].min() > 0.999  # untouched shells
    assert curve[beyond + 2:].abs().max() < 0.1  # phases beyond are unrelated to the input


def test_corrected_fsc_matches_the_snr_model():
    """Object inside a soft mask: the corrected FSC's 0.143 resolution is the expected one within a shell."""
    gen = torch.Generator().manual_seed(1)
    signal = _field(300.0, gen) * spherical_mask(N, PIX, 80.0, 8.0).double()
    signal = signal / signal.std()
    sigma = 3.0
    mask = spherical_mask(N, PIX, 96.0, 12.0)
    half1, half2 = _halves(signal, sigma, gen)
    result = pp.postprocess(half1, half2, PIX, mask, generator=gen)
    expected_A = fsc_resolution_A(_expected_fsc(signal, sigma, mask.double()), PIX)
    assert 5.0 < expected_A < 7.0  # the test data reach a mid-range resolution
    assert abs(_shell(result.resolution_A) - _shell(expected_A)) <= 1.0
    assert result.randomise_from_shell is not None and result.fsc_randomised_masked is not None
    for curve in (result.fsc_unmasked, result.fsc_masked, result.fsc_randomised_masked, result.fsc_corrected):
        assert curve.dtype == F64 and curve.shape == (N // 2 + 1,)
    assert result.map_sharpened.dtype == torch.float32 and result.map_masked.dtype == torch.float32
    torch.testing.assert_close(result.map_masked, result.map_sharpened * mask)


def test_sharp_mask_inflation_is_removed_by_phase_randomisation():
    """A hard mask cutting through the density makes the masked FSC correlate to Nyquist; the corrected
    FSC is back at the SNR model of the unmasked maps (within one shell) and near 0 beyond it."""
    gen = torch.Generator().manual_seed(1)
    signal = _field(300.0, gen) + 1.0
    signal = signal / signal.std()
    sigma = 1.0
    hard_mask = spherical_mask(N, PIX, 64.0, 0.0)
    half1, half2 = _halves(signal, sigma, gen)
    result = pp.postprocess(half1, half2, PIX, hard_mask, b_factor_A2=0.0, generator=gen)
    truth_A = fsc_resolution_A(_expected_fsc(signal, sigma, None), PIX)
    masked_A = fsc_resolution_A(result.fsc_masked, PIX)
    assert _shell(masked_A) > _shell(truth_A) + 3  # the mask's edge inflates the masked FSC
    assert abs(_shell(result.resolution_A) - _shell(truth_A)) <= 1.0
    beyond = math.ceil(_shell(truth_A)) + 3
    assert result.fsc_masked[beyond:].min() > 0.3  # where the maps share no signal
    assert result.fsc_corrected[beyond:].abs().max() < 0.15


@pytest.mark.parametrize("b_blur_A2", [100.0, 250.0])
def test_b_factor_fit_and_sharpening_restore_the_amplitudes(b_blur_A2):
    """A white-spectrum object blurred by exp(-B k²/4): the Guinier fit gives -B (±15 %), and the
    sharpened map's shell amplitudes between 10 Å and the resolution are the unblurred object's."""
    gen = torch.Generator().manual_seed(7)
    obj = _field(0.0, gen) * spherical_mask(N, PIX, 80.0, 8.0).double()
    blurred = torch.fft.irfftn(torch.fft.rfftn(obj) * torch.exp(-0.25 * b_blur_A2 * _k_per_A() ** 2), s=(N,) * 3)
    half1, half2 = _halves(blurred, 0.02 * float(blurred.std()), gen)
    mask = spherical_mask(N, PIX, 96.0, 12.0)
    result = pp.postprocess(half1, half2, PIX, mask, generator=gen)
    assert abs(result.b_factor_A2 / -b_blur_A2 - 1.0) < 0.15
    guinier = result.guinier
    assert guinier is not None and guinier.correlation < -0.95
    assert int(guinier.fit_used.sum()) >= 3
    torch.testing.assert_close(guinier.fit_line()[guinier.fit_used], guinier.ln_amplitude[guinier.fit_used],
                               atol=0.3, rtol=0)
    shells = torch.arange(N // 2 + 1)
    band = (shells >= _shell(10.0)) & (shells <= 0.8 * _shell(result.resolution_A))
    ratio = torch.sqrt(_shell_mean_power(result.map_masked.double()) / _shell_mean_power(obj))[band]
    assert ((ratio - 1.0).abs() < 0.25).all(), ratio


def test_fsc_weighting_given_b_factor_and_lowpass():
    """The sharpened map is the half maps' average times sqrt(2·FSC/(1+FSC)) · exp(-B k²/4) per
    coefficient below the resolution, and 0 beyond it (low-pass edge two shells wide)."""
    gen = torch.Generator().manual_seed(2)
    obj = _field(300.0, gen)
    half1, half2 = _halves(obj / obj.std(), 1.0, gen)
    plain = pp.postprocess(half1, half2, PIX, b_factor_A2=0.0, generator=gen)
    sharp = pp.postprocess(half1, half2, PIX, b_factor_A2=-80.0, generator=gen)
    assert plain.guinier is None and sharp.b_factor_A2 == -80.0
    shells = shell_indices(N, 3)
    cut = _shell(plain.resolution_A)
    assert 10 < cut < 28  # the FSC falls inside the box's shells
    f_average = torch.fft.rfftn(0.5 * (half1.double() + half2.double()))
    f_plain, f_sharp = (torch.fft.rfftn(r.map_sharpened.double()) for r in (plain, sharp))
    below = (shells >= 1) & (shells <= cut - 1.5)
    c = plain.fsc_unmasked.clamp_min(0)[shells.clamp(max=N // 2)]
    atol = 1e-4 * float(f_average.abs().max())
    torch.testing.assert_close(f_plain[below], (f_average * torch.sqrt(2 * c / (1 + c)))[below], rtol=1e-4, atol=atol)
    torch.testing.assert_close(f_sharp[below], (f_plain * torch.exp(80.0 / 4 * _k_per_A() ** 2))[below],
                               rtol=1e-4, atol=atol)
    assert f_plain[shells >= cut + 1.5].abs().max() < atol


def test_auto_mask_covers_the_object_with_a_cosine_edge():
    extend_px, soft_px = 2.0, 5.0
    outer_A = 80.0
    density = shell_template(N, PIX, outer_A, 40.0, edge_A=0.0)
    mask = pp.auto_mask(density, 0.5, extend_px, soft_px)
    assert mask.dtype == torch.float32 and mask.shape == density.shape
    assert (mask[density >= 0.5] == 1.0).all()
    r_px = torch.arange(N, dtype=F64) - N // 2
    r_px = torch.sqrt(r_px[:, None, None] ** 2 + r_px[None, :, None] ** 2 + r_px[None, None, :] ** 2)
    edge_px = 0.5 * outer_A / PIX + extend_px  # the grown mask's border
    assert (mask[(r_px >= 10.0 - extend_px + 1.0) & (r_px <= edge_px - 1.0)] == 1.0).all()  # the grown wall
    assert (mask[r_px >= edge_px + soft_px + 1.0] == 0.0).all()
    ring = (r_px > edge_px + 0.5) & (r_px < edge_px + soft_px - 0.5)
    d = (r_px[ring] - edge_px).clamp(0, soft_px)
    expected = 0.5 + 0.5 * torch.cos(math.pi * d / soft_px)
    assert (mask[ring].double() - expected).abs().max() < 0.3  # the voxelised sphere's border is up to ~1 px off
    inside_first = mask[N // 2, N // 2, N // 2 + int(edge_px) + 1:].double()
    assert (inside_first[1:] <= inside_first[:-1] + 1e-6).all()  # falls monotonically from 1 to 0
    with pytest.raises(TomopipeError, match="threshold"):
        pp.auto_mask(density, 2.0)


@pytest.mark.parametrize("extend_px", [2.5, -1.0])
def test_auto_mask_matches_brute_force_distances(extend_px):
    """The mask from the exact Euclidean distance of every voxel to the (grown or shrunk) object,
    by brute force over all voxel pairs."""
    n, soft_px = 16, 3.0
    gen = torch.Generator().manual_seed(4)
    blob = torch.zeros(n, n, n)
    blob[5:11, 6:9, 4:12] = 1.0
    blob[7:9, 9:12, 7:9] = 1.0
    blob += 0.2 * torch.rand(n, n, n, generator=gen)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = (blob >= 0.5).reshape(-1)
    if extend_px < 0:  # shrink: keep voxels farther than |extend| from every outside voxel
        inside = inside & (torch.cdist(grid, grid[~inside]).min(1).values > -extend_px)
    distance = torch.cdist(grid, grid[inside]).min(1).values - max(extend_px, 0.0)
    expected = 0.5 + 0.5 * torch.cos(math.pi * (distance / soft_px).clamp(0, 1))
    mask = pp.auto_mask(blob, 0.5, extend_px, soft_px)
    torch.testing.assert_close(mask.double().reshape(-1), expected, atol=1e-6, rtol=0)
    assert 0 < int((mask == 1).sum()) < n**3 and int(((mask > 0) & (mask < 1)).sum()) > 0


def test_postprocess_with_auto_mask_and_bad_input():
    gen = torch.Generator().manual_seed(5)
    obj = _field(200.0, gen) * spherical_mask(N, PIX, 60.0, 8.0).double()
    obj = obj - obj.min() * spherical_mask(N, PIX, 60.0, 8.0).double()  # positive density, zero solvent
    half1, half2 = _halves(obj, 0.05 * float(obj.std()), gen)
    result = pp.postprocess(half1, half2, PIX, auto_mask_threshold=0.3 * float(obj.max()), generator=gen)
    assert result.mask is not None and float(result.mask[N // 2, N // 2, N // 2]) == 1.0
    assert float(result.mask[0, 0, 0]) == 0.0
    with pytest.raises(TomopipeError, match="shape"):
        pp.postprocess(half1, half2[:-1, :-1, :-1], PIX)
    with pytest.raises(TomopipeError, match="mask"):
        pp.postprocess(half1, half2, PIX, torch.ones(N, N, N) * 2)
    with pytest.raises(TomopipeError, match="do not correlate"):
        pp.postprocess(half1, -half1, PIX)  # FSC = -1
    unfitted = pp.postprocess(half1, half2, PIX, fit_low_A=1.02 * result.resolution_A, generator=gen)
    assert unfitted.guinier is None and unfitted.b_factor_A2 == 0.0  # too few shells to fit: no sharpening
    with pytest.raises(TomopipeError, match="Guinier fit needs 3"):
        pp.guinier_plot(torch.fft.rfftn(half1), N, PIX, 1.02 * result.resolution_A, result.resolution_A)


def test_local_resolution_follows_the_local_noise():
    """Less noise in one half of the box: the local resolution there is the SNR model's for that noise."""
    gen = torch.Generator().manual_seed(1)
    signal = _field(300.0, gen)
    signal = signal / signal.std()
    sigma_low, sigma_high, window = 0.5, 3.0, 16
    sigma = torch.full((N, N, N), sigma_low, dtype=F64)
    sigma[:, :, N // 2:] = sigma_high
    half1, half2 = ((signal + sigma * torch.randn(N, N, N, generator=gen, dtype=F64)).float() for _ in range(2))
    mask = spherical_mask(N, PIX, 100.0, 10.0)
    local = pp.local_resolution(half1, half2, mask, PIX, window_px=window, step_px=8, generator=gen)
    assert local.dtype == torch.float32 and local.shape == mask.shape
    assert (local[mask == 0] == 0).all() and (local[mask > 0] >= 2 * PIX).all()
    core = mask > 0.99
    x = torch.arange(N)
    for region, s in ((x < N // 2 - window // 2, sigma_low), (x >= N // 2 + window // 2, sigma_high)):
        expected_A = fsc_resolution_A(_expected_fsc(signal, s, None), PIX)
        measured_A = float(local[core & region].median())
        assert abs(measured_A / expected_A - 1) < 0.15, (s, measured_A, expected_A)
    with pytest.raises(TomopipeError, match="window_px"):
        pp.local_resolution(half1, half2, mask, PIX, window_px=15)


@pytest.fixture(scope="module")
def apoferritin_map() -> torch.Tensor:
    """The 6Z6U potential at 2.5 Å per voxel in a 64³ box (float64)."""
    return template_from_atomic_model(read_atomic_model(APOFERRITIN_MODEL), 2.5, 64).double()


def test_apoferritin_auto_mask_resolution_and_b_factor(apoferritin_map):
    """On a real structure: with the auto mask the corrected resolution is the SNR model's within a
    shell, and blurring the map by B = 150 Å² moves the fitted B-factor by -150 Å² (±15 %)."""
    pix, gen = 2.5, torch.Generator().manual_seed(0)
    n = apoferritin_map.shape[0]
    threshold = 0.2 * float(apoferritin_map.max())

    def halves(volume, sigma):
        return [(volume + sigma * torch.randn(volume.shape, generator=gen, dtype=F64)).float() for _ in range(2)]

    sigma = 3.0 * float(apoferritin_map.std())
    noisy = pp.postprocess(*halves(apoferritin_map, sigma), pix, auto_mask_threshold=threshold, generator=gen)
    mask = noisy.mask.double()
    assert float(mask[apoferritin_map >= threshold].min()) > 0.9 and float(mask.mean()) < 0.6  # made at 15 Å
    expected_A = fsc_resolution_A(_expected_fsc(apoferritin_map, sigma, mask), pix)
    assert abs(n * pix / noisy.resolution_A - n * pix / expected_A) <= 1.0
    assert n * pix / fsc_resolution_A(noisy.fsc_unmasked, pix) < n * pix / expected_A - 3  # the mask helps

    k_per_A = radial_frequency_grid((n,) * 3, torch.tensor(pix, dtype=F64))
    blurred = torch.fft.irfftn(torch.fft.rfftn(apoferritin_map) * torch.exp(-150.0 / 4 * k_per_A**2), s=(n,) * 3)
    fitted = [pp.postprocess(*halves(v, 0.3 * float(apoferritin_map.std())), pix, auto_mask_threshold=threshold,
                             generator=gen).b_factor_A2 for v in (apoferritin_map, blurred)]
    assert abs((fitted[1] - fitted[0]) / -150.0 - 1) < 0.15, fitted


def test_no_b_factor_fit_below_the_fit_range_leaves_the_map_unsharpened():
    """A map at ~16 Å (bin 10) has no shell between 10 Å and its resolution: B = 0, no Guinier plot."""
    gen = torch.Generator().manual_seed(11)
    signal = _field(0.0, gen)
    half1, half2 = (signal + 0.05 * torch.randn(signal.shape, generator=gen) for _ in range(2))
    result = pp.postprocess(half1, half2, 8.0, generator=gen)
    assert result.resolution_A > 10.0
    assert result.guinier is None and result.b_factor_A2 == 0.0
