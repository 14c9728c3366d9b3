"""Template construction and per-tilt weighting for template matching (issue 11)."""

from __future__ import annotations

import math

import pytest
import torch

from tomopipe.algorithms.ctf import ctf_1d, ctf_zero_frequencies_per_A
from tomopipe.algorithms.fourier import crop_centered, embed_centered
from tomopipe.algorithms.picking.template import (
    MaskDoesNotFitError,
    check_mask_fits,
    resample_volume,
    shell_template,
    spherical_mask,
)
from tomopipe.algorithms.picking.weighting import tilt_weight_rfftn, tilt_weighted_template_ft
from tomopipe.errors import TomopipeError

CTF = dict(voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.07)


def _radius_px(box: int) -> torch.Tensor:
    r = torch.arange(box, dtype=torch.float64) - box // 2
    return torch.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)


def test_shell_radial_profile_and_volume():
    box, voxel, outer, inner = 64, 2.5, 125.0, 80.0
    shell = shell_template(box, voxel, outer, inner, edge_A=5.0)
    assert shell.dtype == torch.float32 and shell.shape == (box,) * 3
    r_A = _radius_px(box) * voxel
    assert shell[r_A < 0.5 * inner - 5].abs().max() < 1e-6  # the hole
    assert shell[r_A > 0.5 * outer + 5].abs().max() < 1e-6  # outside
    assert (shell[(r_A > 0.5 * inner + 5) & (r_A < 0.5 * outer - 5)] > 0.999).all()  # the wall
    volume_A3 = float(shell.double().sum()) * voxel**3
    analytic_A3 = math.pi / 6 * (outer**3 - inner**3)
    assert abs(volume_A3 / analytic_A3 - 1) < 0.02
    assert int(torch.argmax(shell[box // 2, box // 2])) != box // 2  # hollow: no maximum at the centre


def test_solid_sphere_volume():
    sphere = shell_template(48, 3.0, 100.0)
    assert abs(float(sphere.double().sum()) * 27.0 / (math.pi / 6 * 100.0**3) - 1) < 0.02
    assert float(sphere[24, 24, 24]) == pytest.approx(1.0)


def _centre_of_mass_px(volume: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in volume.shape], indexing="ij")
    v = volume.double()
    return torch.stack([(g * v).sum() / v.sum() for g in grids])


@pytest.mark.parametrize("box", [48, 47])
@pytest.mark.parametrize("target_voxel_A", [4.0, 1.0])
def test_resample_keeps_centre_and_integral(box, target_voxel_A):
    voxel = 2.0
    r_A = _radius_px(box) * voxel
    blob = torch.exp(-0.5 * (r_A / 10.0) ** 2).to(torch.float32)
    out = resample_volume(blob, voxel, target_voxel_A)
    n_new = round(box * voxel / target_voxel_A)
    assert out.shape == (n_new,) * 3
    assert torch.allclose(_centre_of_mass_px(out), torch.full((3,), float(n_new // 2), dtype=torch.float64),
                          atol=1e-3)
    exact_voxel = voxel * box / n_new
    integral_in, integral_out = float(blob.double().sum()) * voxel**3, float(out.double().sum()) * exact_voxel**3
    assert abs(integral_out / integral_in - 1) < 0.01
    assert float(out.max()) == pytest.approx(1.0, abs=0.02)  # density values kept, peak at the centre


def test_crop_centered_inverts_embed_centered():
    a = torch.randn(5, 6, 7)
    for shape in [(9, 9, 9), (8, 10, 7)]:
        assert torch.equal(crop_centered(embed_centered(a, shape), a.shape), a)
    big = torch.arange(10.0)
    assert float(crop_centered(big, (4,))[4 // 2]) == 10 // 2  # centre sample stays the centre
    with pytest.raises(ValueError, match="cannot crop"):
        crop_centered(a, (6, 6, 6))


def test_mask_larger_than_box_refused():
    check_mask_fits(40, 5.0, 200.0)
    with pytest.raises(MaskDoesNotFitError, match=r"mask of 210 Å does not fit in a box of 40 × 5 Å") as info:
        spherical_mask(40, 5.0, 210.0, 10.0)
    assert isinstance(info.value, TomopipeError)
    mask = spherical_mask(40, 5.0, 150.0, 10.0)
    assert float(mask[20, 20, 20]) == 1.0 and float(mask[0, 0, 0]) == 0.0
    assert float(mask[20, 20, 20 + 15]) == pytest.approx(0.5)  # 0.5 on the nominal radius (75 Å = 15 px)


def test_wedge_covers_the_tilt_planes_only():
    box, voxel = 32, 10.0
    tilts = torch.arange(-40.0, 40.1, 5.0)
    w = tilt_weight_rfftn(box, voxel, tilts, 1.0, 0.0, 300.0, 0.0, 0.999)  # CTF ≈ 1 (all amplitude contrast)
    assert w.shape == (box, box, box // 2 + 1)
    kz_axis = w[2 : box // 2, 0, 0]  # along Z beyond one Fourier voxel: inside the missing wedge
    assert float(kz_axis.abs().max()) < 1e-6
    ky, kx = torch.meshgrid(torch.fft.fftfreq(box) * box, torch.arange(box // 2 + 1.0), indexing="ij")
    in_xy_plane = (ky**2 + kx**2 <= (box // 2 - 1) ** 2) & (kx >= 1)
    assert (w[0][in_xy_plane] > 0.1).all()  # the XY plane (kz = 0) is covered up to Nyquist
    # the direction 70° from X towards Z (beyond the 40° tilt) gets nothing beyond the first shells
    for radius in range(4, box // 2):
        i = round(radius * math.sin(math.radians(70)))
        j = round(radius * math.cos(math.radians(70)))
        assert float(w[i, 0, j]) < 1e-6
    # and a direction inside the tilt range (20° from X towards Z) is covered
    assert float(w[round(10 * math.sin(math.radians(20))), 0, round(10 * math.cos(math.radians(20)))]) > 0.1


def test_ctf_weight_has_the_ctf_zeros_of_a_zero_tilt():
    box, voxel, defocus = 128, 3.0, 5000.0
    w = tilt_weight_rfftn(box, voxel, [0.0], defocus, 0.0, **CTF, phase_flipped=True)
    kx = torch.fft.rfftfreq(box, dtype=torch.float64) / voxel
    on_axis = w[0, 0, :].double()
    expected = ctf_1d(kx, defocus, **CTF).abs()
    assert torch.allclose(on_axis, expected, atol=1e-5)  # phase flipped: the weight is |CTF| along kx
    signed = tilt_weight_rfftn(box, voxel, [0.0], defocus, 0.0, **CTF)[0, 0, :].double()
    assert torch.allclose(signed, ctf_1d(kx, defocus, **CTF), atol=1e-5)  # not flipped: the signed CTF
    assert float(signed.min()) < -0.5  # the sign flips beyond the first zero
    zeros = ctf_zero_frequencies_per_A(defocus, **CTF, n_zeros=2)
    for k0 in zeros:
        i = int(torch.argmin((kx - k0).abs()))
        assert float(on_axis[i]) < 0.1 * float(on_axis[i - 6 : i + 7].max())


def test_dose_weighting_attenuates_high_frequencies_and_template_product():
    box, voxel = 32, 4.0
    clean = tilt_weight_rfftn(box, voxel, [0.0], 20000.0, 0.0, **CTF, phase_flipped=True)
    dosed = tilt_weight_rfftn(box, voxel, [0.0], 20000.0, 60.0, **CTF, phase_flipped=True)
    ratio = dosed[0, 0, 1:] / clean[0, 0, 1:].clamp(min=1e-6)
    keep = clean[0, 0, 1:] > 0.05
    assert bool((torch.diff(ratio[keep]) <= 1e-4).all()) and float(ratio[keep][-1]) < 0.5
    template = shell_template(box, voxel, 125.0, 80.0)
    ft = tilt_weighted_template_ft(template, voxel, [0.0], 20000.0, 60.0, **CTF, phase_flipped=True)
    assert torch.allclose(ft, torch.fft.rfftn(template) * dosed)
