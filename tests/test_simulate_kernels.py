"""The compiled CPU kernels of the simulator give what the torch reference code gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tomopipe.algorithms import fourier_slice
from tomopipe.simulate import detector, imaging
from tomopipe.simulate.projector import FourierSliceProjector


def test_numba_is_installed_for_the_cpu_kernels():
    assert fourier_slice._HAVE_NUMBA and detector._HAVE_NUMBA and imaging._HAVE_NUMBA


def test_projector_kernels_agree():
    g = torch.Generator().manual_seed(0)
    r = (torch.arange(24, dtype=torch.float64) - 12) * 2.0
    d2 = r[:, None, None] ** 2 + (r[None, :, None] - 4) ** 2 + (r[None, None, :] + 6) ** 2
    d2b = (r[:, None, None] + 5) ** 2 + r[None, :, None] ** 2 + (r[None, None, :] - 3) ** 2
    volume = (torch.exp(-d2 / 40.0) + 0.5 * torch.exp(-d2b / 10.0)).float()  # two compact blobs
    q, _ = torch.linalg.qr(torch.randn(6, 3, 3, generator=g, dtype=torch.float64))
    fast = FourierSliceProjector(volume, 2.0, pad_factor=2, use_compiled=True)
    slow = FourierSliceProjector(volume, 2.0, pad_factor=2, use_compiled=False)
    shifts = torch.rand(6, 2, generator=g) - 0.5
    a = fast.project(q.float(), shifts, 1.002)
    b = slow.project(q.float(), shifts, 1.002)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    # identity projection = the sum along z times the pixel size (V·Å); grid-aligned slices are
    # not interpolated, so the gridding correction overshoots by up to 1/sinc²(x/(pad·N)) (5 % here)
    flat = slow.project(torch.eye(3)[None])[0]
    assert torch.allclose(flat, volume.sum(0) * 2.0, atol=0.05 * float(flat.max()))


def test_slices_at_points_are_the_full_slices_within_each_radius():
    """``slices_at`` (the pose search's band, each slice within its own radius): the full slices' values at
    the points within the radius, zero beyond, on the compiled and the torch paths."""
    g = torch.Generator().manual_seed(2)
    volume = torch.randn((16, 16, 16), generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 3, 3, generator=g, dtype=torch.float64))
    ky = torch.fft.fftfreq(16, d=1 / 16)[:, None].expand(16, 9).reshape(-1)
    kx = torch.fft.rfftfreq(16, d=1 / 16)[None, :].expand(16, 9).reshape(-1)
    radius = torch.tensor([2.5, 4.0, 5.5, 7.0, 0.0])
    inside = (kx**2 + ky**2)[None] <= radius[:, None] ** 2
    for compiled in (True, False):
        projector = FourierSliceProjector(volume, 2.0, pad_factor=2, use_compiled=compiled)
        full = projector.slices(q.float(), torch.ones(5)).reshape(5, -1)
        points = projector.slices_at(q.float(), torch.ones(5), kx, ky, radius)
        assert torch.allclose(points[inside], full[inside], atol=1e-5)
        assert bool((points[~inside] == 0).all()) and bool((full[~inside] != 0).any())


def test_layer_accumulation_kernel_agrees():
    g = torch.Generator().manual_seed(1)
    shape = (32, 17)
    spec = torch.randn(shape, dtype=torch.complex64, generator=g)
    a = torch.rand(shape, generator=g)
    step = torch.polar(torch.ones(shape), a)
    phasor = torch.polar(torch.ones(shape), 2 * a)
    acc = [torch.randn(shape, dtype=torch.complex64, generator=g) for _ in range(2)]
    expected_plus = acc[0] + phasor * spec
    expected_minus = acc[1] + phasor.conj() * spec
    expected_next = phasor * step
    nxt = imaging._accumulate(spec, phasor.clone(), step, acc[0], acc[1])
    assert torch.allclose(acc[0], expected_plus, atol=1e-5) and torch.allclose(acc[1], expected_minus, atol=1e-5)
    assert torch.allclose(nxt, expected_next, atol=1e-6)


@pytest.mark.parametrize("rate", [0.2, 3.7, 45.0])
def test_poisson_sampler_distribution(rate):
    n = 200_000
    contrast = torch.zeros(n)
    scale = torch.full((n,), rate)
    counts = detector._poisson_counts(contrast, scale, torch.Generator().manual_seed(2), 255).numpy()
    again = detector._poisson_counts(contrast, scale, torch.Generator().manual_seed(2), 255).numpy()
    assert np.array_equal(counts, again)  # reproducible from the seed
    assert counts.mean() == pytest.approx(rate, rel=4 * math.sqrt(rate / n) / rate + 1e-9)
    assert counts.var() == pytest.approx(rate, rel=0.03)
    k = np.arange(int(rate + 5 * math.sqrt(rate) + 3))
    observed = np.bincount(counts, minlength=k.size)[: k.size]
    expected = stats.poisson.pmf(k, rate) * n
    keep = expected > 20
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1)
    # the rate follows the contrast: (1 + c)·scale
    darker = detector._poisson_counts(torch.full((n,), -0.5), scale, torch.Generator().manual_seed(3), 255).numpy()
    assert darker.mean() == pytest.approx(rate / 2, rel=0.02)


def test_ice_spreading_kernel_agrees():
    g = torch.Generator().manual_seed(4)
    field = torch.randn(40, 52, generator=g)
    fast = torch.zeros(9, 40, 52)
    slow = torch.zeros(9, 40, 52)
    lo, hi = imaging._spread(field, fast, 1.3, 0.11, -0.02)
    saved = imaging._HAVE_NUMBA
    imaging._HAVE_NUMBA = False
    try:
        lo2, hi2 = imaging._spread(field, slow, 1.3, 0.11, -0.02)
    finally:
        imaging._HAVE_NUMBA = saved
    assert (lo, hi) == (lo2, hi2) == (0, 7)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert torch.allclose(fast.sum(0), field, atol=1e-5)  # the weights of every pixel add up to 1
    assert float(fast[8].abs().max()) == 0.0


def test_layer_blocks_give_the_same_image():
    """Processing the depth layers in blocks (bounded memory) changes nothing."""
    from datetime import datetime

    from tomopipe.simulate.imaging import IceModel, Optics, render_tilt_contrast
    from tomopipe.simulate.plan import TiltPlan

    r = (torch.arange(16, dtype=torch.float64) - 8) * 8.0
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    proj = FourierSliceProjector((5.0 * torch.exp(-d2 / 300.0)).float(), 8.0, pad_factor=2)
    tilt = TiltPlan(index=0, nominal_deg=40.0, stage_deg=40.0, tilt_deg=40.0, axis_deg=-85.6, shift_A=(10.0, -5.0),
                    magnification=1.0, defocus_u_A=20000.0, defocus_v_A=19800.0, astigmatism_angle_deg=20.0,
                    target_defocus_um=-2.0, scope_defocus_um=-2.0, pre_exposure_e_per_A2=0.0, dose_e_per_A2=2.64,
                    time=datetime(2026, 1, 1), frame_shifts_A=torch.zeros((1, 2)), local_profile=torch.zeros(1),
                    local_field=None)
    positions = torch.tensor([[0.0, 0.0, 0.0], [300.0, 100.0, 150.0], [-200.0, 50.0, -150.0]], dtype=torch.float64)
    kwargs = dict(projector=proj, positions_A=positions, rotations=torch.eye(3, dtype=torch.float64).expand(3, 3, 3),
                  ice=IceModel(400.0, sublayers=2))
    whole, info = render_tilt_contrast(tilt, (128, 128), 8.0, Optics(), 6.5e-4,
                                       generator=torch.Generator().manual_seed(1),
                                       max_stack_bytes=1e12, **kwargs)
    blocks, info_b = render_tilt_contrast(tilt, (128, 128), 8.0, Optics(), 6.5e-4,
                                          generator=torch.Generator().manual_seed(1),
                                          max_stack_bytes=3 * 4 * 128 * 128, **kwargs)
    assert info["n_layers"] > 6 and info_b["layer_block"] == 3
    assert torch.allclose(whole, blocks, atol=1e-5 * float(whole.abs().max()))
