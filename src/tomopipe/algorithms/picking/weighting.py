"""Per-tilt weighting of a template's Fourier transform, as pytom-match-pick does it.

The tomogram's 3-D spectrum holds, for every tilt, the central slice normal to that tilt's beam
direction (the missing wedge lies between the slices). The weight is the sum over tilts of these
slices, each a slab one Fourier voxel thick, times

* the CTF of the tilt's defocus (:func:`tomopipe.algorithms.ctf.ctf_1d`, RELION sign): signed when
  the tomogram was not phase flipped (``phase_flipped=False``, the default: its 3-D spectrum carries
  every tilt's CTF with its sign, so the weighted template gets the tomogram's contrast), ``|CTF|``
  when it was (``phase_flipped=True``, pytom's ``flip_phase`` assumption),
* the Grant & Grigorieff (2015) exposure filter of the dose received before the tilt
  (:func:`tomopipe.algorithms.filters.exposure_filter`; pytom uses a 4 Å²/(e/Å²) B-factor instead),
* ``cos(tilt)`` (thicker specimen path at high tilt, as pytom),
* a ramp ``min(|k_x'| · Δθ · D, 1)`` across the tilt axis that removes the overlap of adjacent slices
  at low frequency (Crowther: slices overlap below ``1 / (Δθ · D)``, D the box in Å; pytom's ramp),

and 0 beyond Nyquist. Geometry: tilt about the tomogram's Y axis, RELION 5 ``Ry(tilt)`` of
``tomopipe.algorithms.geometry``: a tilt's image plane is spanned by rows 0 and 1 of ``Ry(tilt)``
and its beam direction is row 2, ``(-sin θ, 0, cos θ)`` in (x, y, z).
Grids are ``torch.fft.rfftn`` layouts of a cubic ``[z, y, x]`` box.
"""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms.ctf import ctf_1d
from tomopipe.algorithms.filters import exposure_filter, frequency_grid
from tomopipe.algorithms.geometry import rotation_y

__all__ = ["tilt_weight_rfftn", "tilt_weighted_template_ft"]


def _ramp_width_rad(tilt_angles_deg: torch.Tensor) -> float:
    """Smallest tilt increment (radians); 0 for a single tilt (no overlap to correct)."""
    if tilt_angles_deg.numel() < 2:
        return 0.0
    steps = torch.diff(torch.sort(tilt_angles_deg).values).abs()
    return math.radians(float(steps[steps > 0].min())) if bool((steps > 0).any()) else 0.0


def tilt_weight_rfftn(box_px: int, voxel_size_A: float, tilt_angles_deg, defocus_A, pre_exposure_e_per_A2,
                      voltage_kV: float, cs_mm: float, amplitude_contrast: float,
                      phase_flipped: bool = False) -> torch.Tensor:
    """The 3-D weight ``[box, box, box//2+1]`` (float32, rfftn layout of a ``[z, y, x]`` box) of a
    tilt series: ``Σ_tilts slab · CTF(defocus) · exposure_filter(pre-exposure) · cos θ · ramp``
    (see the module docstring), ``|CTF|`` when the tomogram was ``phase_flipped``. ``defocus_A``
    (underfocus > 0) and ``pre_exposure_e_per_A2`` (dose received before each tilt) give one value
    per tilt."""
    tilts = torch.as_tensor(tilt_angles_deg, dtype=torch.float64).reshape(-1)
    defocus = torch.as_tensor(defocus_A, dtype=torch.float64).reshape(-1).expand(tilts.numel())
    dose = torch.as_tensor(pre_exposure_e_per_A2, dtype=torch.float64).reshape(-1).expand(tilts.numel())
    kz, ky, kx = frequency_grid((box_px,) * 3, float(voxel_size_A))
    k = torch.sqrt(kx**2 + ky**2 + kz**2)
    box_A = box_px * float(voxel_size_A)
    step_rad = _ramp_width_rad(tilts)
    weight = torch.zeros(k.shape, dtype=torch.float64)
    for tilt, df, pre_dose in zip(tilts, defocus, dose):
        r = rotation_y(tilt)
        kx_img = r[0, 0] * kx + r[0, 2] * kz  # frequency across the tilt axis in the tilt image
        depth = r[2, 0] * kx + r[2, 2] * kz  # component along the beam: distance to the slice
        slab = torch.clamp(1.0 - depth.abs() * box_A, min=0.0)
        k_img = torch.sqrt(kx_img**2 + ky**2)
        ctf = ctf_1d(k_img, df, voltage_kV, cs_mm, amplitude_contrast)
        ctf = ctf.abs() if phase_flipped else ctf
        ramp = torch.clamp(kx_img.abs() * step_rad * box_A, max=1.0) if step_rad > 0 else 1.0
        weight = weight + slab * ctf * exposure_filter(k, pre_dose, voltage_kV) * torch.cos(torch.deg2rad(tilt)) * ramp
    weight = torch.where(k <= 0.5 / float(voxel_size_A), weight, torch.zeros_like(weight))
    return weight.to(torch.float32)


def tilt_weighted_template_ft(template: torch.Tensor, voxel_size_A: float, tilt_angles_deg, defocus_A,
                              pre_exposure_e_per_A2, voltage_kV: float, cs_mm: float,
                              amplitude_contrast: float, phase_flipped: bool = False) -> torch.Tensor:
    """``rfftn(template) · tilt_weight_rfftn(...)`` for a cubic template ``[z, y, x]`` (complex64)."""
    if template.ndim != 3 or len(set(template.shape)) != 1:
        raise ValueError(f"tilt_weighted_template_ft: expected a cubic template [z, y, x], got {tuple(template.shape)}")
    weight = tilt_weight_rfftn(template.shape[0], voxel_size_A, tilt_angles_deg, defocus_A, pre_exposure_e_per_A2,
                               voltage_kV, cs_mm, amplitude_contrast, phase_flipped)
    return torch.fft.rfftn(template.to(torch.float32)) * weight.to(template.device)
