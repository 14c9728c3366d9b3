"""Templates and masks for template matching: from shapes, maps and atomic models, resampled to the
tomogram's voxel size.

Conventions: volumes ``[z, y, x]`` float32, cubic boxes, centre voxel at ``box // 2`` (the FFT /
RELION centre); lengths in Å; density positive = protein; soft edges are raised cosines ``edge_A``
wide, centred on the nominal radius (value 0.5 there).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tomopipe.algorithms.filters import fast_fft_size
from tomopipe.algorithms.fourier import crop_centered, embed_centered
from tomopipe.algorithms.potential import AtomicModel, atomic_potential_volume
from tomopipe.errors import TomopipeError

__all__ = ["MaskDoesNotFitError", "check_mask_fits", "default_template_box_px", "resample_volume",
           "shell_template", "spherical_mask", "template_from_atomic_model", "template_from_map"]

#: Default template box: this many times the particle's diameter (room for the mask's soft edge).
BOX_PER_DIAMETER = 1.2


class MaskDoesNotFitError(TomopipeError):
    """A template mask larger than the template box."""


def _radius_A(box_px: int, voxel_size_A: float) -> torch.Tensor:
    """Distance (Å, float64) of every voxel of a ``box_px``³ box from the centre voxel ``box_px // 2``."""
    if box_px < 1 or voxel_size_A <= 0:
        raise ValueError(f"box_px must be >= 1 and voxel_size_A > 0, got {box_px}, {voxel_size_A}")
    r = (torch.arange(box_px, dtype=torch.float64) - box_px // 2) * voxel_size_A
    return torch.sqrt(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2)


def _inside(radius_A: torch.Tensor, edge_radius_A: float, edge_A: float) -> torch.Tensor:
    """Raised-cosine step: 1 well inside ``edge_radius_A``, 0 well outside, 0.5 on it."""
    if edge_A <= 0:
        return (radius_A <= edge_radius_A).to(torch.float64)
    x = torch.clamp((radius_A - edge_radius_A) / edge_A + 0.5, 0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * x)


def shell_template(box_px: int, voxel_size_A: float, outer_diameter_A: float, inner_diameter_A: float = 0.0,
                   edge_A: float | None = None) -> torch.Tensor:
    """Uniform density 1 between ``inner_diameter_A`` and ``outer_diameter_A`` (a solid sphere when
    the inner diameter is 0), soft edges ``edge_A`` wide (default two voxels). Apoferritin: a shell of
    ~125 Å outer, ~80 Å inner diameter. ``[z, y, x]`` float32, centred on ``box_px // 2``."""
    if not 0.0 <= inner_diameter_A < outer_diameter_A:
        raise ValueError(f"shell_template: need 0 <= inner ({inner_diameter_A} Å) < outer ({outer_diameter_A} Å)")
    edge_A = 2.0 * voxel_size_A if edge_A is None else float(edge_A)
    r = _radius_A(box_px, voxel_size_A)
    density = _inside(r, 0.5 * outer_diameter_A, edge_A)
    if inner_diameter_A > 0:
        density = density - _inside(r, 0.5 * inner_diameter_A, edge_A)
    return density.to(torch.float32)


def check_mask_fits(box_px: int, voxel_size_A: float, diameter_A: float) -> None:
    """Raise :class:`MaskDoesNotFitError` when a mask of ``diameter_A`` is wider than the box."""
    if diameter_A > box_px * voxel_size_A:
        raise MaskDoesNotFitError(
            f"mask of {diameter_A:g} Å does not fit in a box of {box_px} × {voxel_size_A:g} Å "
            f"(= {box_px * voxel_size_A:g} Å): use a larger box or a smaller mask diameter")


def spherical_mask(box_px: int, voxel_size_A: float, diameter_A: float, edge_A: float) -> torch.Tensor:
    """Soft spherical mask (1 inside ``diameter_A``, raised-cosine edge ``edge_A`` wide), float32
    ``[z, y, x]`` centred on ``box_px // 2``; refused when it does not fit (:func:`check_mask_fits`)."""
    check_mask_fits(box_px, voxel_size_A, diameter_A)
    return _inside(_radius_A(box_px, voxel_size_A), 0.5 * diameter_A, edge_A).to(torch.float32)


def resample_volume(volume: torch.Tensor, voxel_size_A: float, target_voxel_size_A: float) -> torch.Tensor:
    """Fourier crop (coarser target) or zero-pad (finer target) a volume ``[z, y, x]`` to
    ``target_voxel_size_A``. Each axis of n voxels becomes ``round(n · voxel / target)``; the centre
    voxel ``n // 2`` stays at the new ``n // 2`` and density values (the mean) are preserved, so the
    integral × voxel volume is kept. Returns float32; the exact new voxel size per axis is
    ``voxel_size_A · n / n_new``."""
    if volume.ndim != 3:
        raise ValueError(f"resample_volume: expected a volume [z, y, x], got shape {tuple(volume.shape)}")
    if voxel_size_A <= 0 or target_voxel_size_A <= 0:
        raise ValueError(f"resample_volume: voxel sizes must be > 0, got {voxel_size_A}, {target_voxel_size_A}")
    shape = tuple(volume.shape)
    new_shape = tuple(max(1, round(n * voxel_size_A / target_voxel_size_A)) for n in shape)
    if new_shape == shape:
        return volume.to(torch.float32).clone()
    dims = (0, 1, 2)
    # centre n//2 -> index 0, so that the spectrum carries no phase ramp; DC -> n//2 for the crop/pad
    spectrum = torch.fft.fftshift(
        torch.fft.fftn(torch.roll(volume.to(torch.float64), [-(n // 2) for n in shape], dims)), dims)
    spectrum = crop_centered(embed_centered(spectrum, [max(a, b) for a, b in zip(shape, new_shape)]), new_shape)
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dims)).real
    out = torch.roll(out, [n // 2 for n in new_shape], dims)
    return (out * (math.prod(new_shape) / math.prod(shape))).to(torch.float32)


def default_template_box_px(diameter_A: float, voxel_size_A: float) -> int:
    """Smallest even fast-FFT box (factors 2, 3, 5) of at least ``BOX_PER_DIAMETER`` × ``diameter_A``."""
    if diameter_A <= 0 or voxel_size_A <= 0:
        raise ValueError(f"diameter_A and voxel_size_A must be > 0, got {diameter_A}, {voxel_size_A}")
    return fast_fft_size(math.ceil(BOX_PER_DIAMETER * diameter_A / voxel_size_A), even=True)


def template_from_atomic_model(model: AtomicModel, voxel_size_A: float, box_px: int | None = None, *,
                               extra_b_factor_A2: float = 0.0, ice_potential_V: float = 0.0,
                               device: str | torch.device = "cpu") -> torch.Tensor:
    """The potential (V, positive = protein) of ``model`` at the tomogram's ``voxel_size_A`` on an even
    ``box_px``³ grid, the model's centre of mass on voxel ``box_px // 2``; float32 ``[z, y, x]``.

    ``box_px`` defaults to :func:`default_template_box_px` of the model's diameter (twice the largest
    atom distance from the centre of mass). ``extra_b_factor_A2`` blurs every atom;
    ``ice_potential_V`` > 0 gives the contrast against the displaced ice
    (:func:`~tomopipe.algorithms.potential.atomic_potential_volume`). A box narrower than the model
    raises :class:`TomopipeError` (the grid is periodic: the model would wrap around).
    """
    if voxel_size_A <= 0:
        raise ValueError(f"template_from_atomic_model: voxel_size_A must be > 0, got {voxel_size_A}")
    positions_A = model.positions_A - model.centre_of_mass_A().to(model.positions_A.dtype)
    diameter_A = 2.0 * float(torch.linalg.norm(positions_A, dim=1).max())
    box_px = default_template_box_px(diameter_A, voxel_size_A) if box_px is None else int(box_px)
    if box_px * voxel_size_A < diameter_A:
        raise TomopipeError(
            f"atomic model {model.source} ({diameter_A:.0f} Å across) does not fit in a template box of {box_px} × "
            f"{voxel_size_A:g} Å: use a box of at least {math.ceil(diameter_A / voxel_size_A)} voxels")
    centred = dataclasses.replace(model, positions_A=positions_A)
    return atomic_potential_volume(centred, box_px, voxel_size_A, ice_potential_V=ice_potential_V,
                                   extra_b_factor_A2=extra_b_factor_A2, device=device)


def template_from_map(volume: torch.Tensor, voxel_size_A: float, target_voxel_size_A: float,
                      box_px: int | None = None) -> torch.Tensor:
    """A map ``[z, y, x]`` at ``voxel_size_A`` as a template at ``target_voxel_size_A`` in a cubic
    ``box_px``³ box: Fourier-resampled (:func:`resample_volume`, values and so the mean kept), then
    zero-padded or cropped about the centre voxel (``n // 2`` stays on ``box_px // 2``; the integral is
    kept while the density lies inside the box). ``box_px`` defaults to the smallest even fast-FFT size
    holding the resampled map. A box too small for the template's mask is refused where the mask is
    made (:func:`check_mask_fits`). Float32."""
    resampled = resample_volume(torch.as_tensor(volume), voxel_size_A, target_voxel_size_A)
    box_px = fast_fft_size(max(resampled.shape), even=True) if box_px is None else int(box_px)
    if box_px < 1:
        raise ValueError(f"template_from_map: box_px must be >= 1, got {box_px}")
    padded = embed_centered(resampled, [max(n, box_px) for n in resampled.shape])
    return crop_centered(padded, (box_px,) * 3).contiguous()
