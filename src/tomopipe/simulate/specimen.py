"""The specimen: particles at random non-overlapping positions in an ice slab, and amorphous ice.

Ice (independent atom model, same constants as :mod:`tomopipe.algorithms.potential`):

* Number density of water ``n = ρ·N_A / M_w`` (0.94 g/cm³ -> 0.0314 molecules/Å³); mean inner
  potential ``V̄ = K·n·f_w(0)`` with ``f_w = f_O + 2·f_H`` (≈ 4.6 V; measured values for vitreous
  ice are 3.5–4.5 V because bonding lowers it; override with ``ice_mean_potential_V``). A
  uniform potential only adds a constant phase and is invisible; it matters through solvent
  exclusion (the particle maps are contrasts relative to the ice, see :mod:`tomopipe.algorithms.potential`).
* Fluctuations: water molecules with the molecular form factor ``|F_w(q)|²`` (O + 2 H at the
  water geometry, d_OH = 0.96 Å, d_HH = 1.51 Å) and the structure factor ``S(q)`` of
  low-density amorphous ice give the power spectrum of the projected potential through a
  path length t: ``PSD(q) = t·n·K²·|F_w(q)|²·S(q)`` (V²·Å⁴). ``S`` is a parametric form with
  S(0) = 0.05 (low compressibility), the first sharp diffraction peak at Q = 1.69 Å⁻¹
  (q = 0.269 Å⁻¹, the 3.7 Å "water ring") and the second at Q ≈ 3.0 Å⁻¹ (Bowron et al.,
  J. Chem. Phys. 125, 194502, 2006). Projections at different tilts through ≥ 100 Å of ice are
  uncorrelated at these frequencies, so each tilt gets an independent Gaussian field.

Thickness (:class:`IceThickness`): the slab is symmetric about its mid-plane ``z = 0`` and its
thickness varies smoothly across the field, ``t(x, y) = t̄·(1 + a·φ(x, y))`` with ``φ`` a few
low-frequency cosine modes scaled to ``max |φ| = 1`` over the field: real ice is thinner at the
centre of a hole, thicker at its rim. Particles stay inside the local slab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gemmi
import torch

from tomopipe.algorithms.potential import POTENTIAL_CONSTANT_V_A2

__all__ = [
    "WATER_MOLAR_MASS_G",
    "water_number_density_per_A3",
    "ice_mean_potential_V",
    "water_form_factor_sq_A2",
    "amorphous_ice_structure_factor",
    "ice_projected_potential_psd",
    "ice_potential_field",
    "place_particles",
    "IceThickness",
    "draw_ice_thickness",
]

WATER_MOLAR_MASS_G = 18.015
_AVOGADRO = 6.02214076e23
_D_OH_A = 0.9572
_D_HH_A = 1.5139


def water_number_density_per_A3(density_g_per_cm3: float) -> float:
    """Water molecules per Å³ at a mass density in g/cm³."""
    return density_g_per_cm3 / WATER_MOLAR_MASS_G * _AVOGADRO * 1e-24


def _scattering(symbol: str, q: torch.Tensor) -> torch.Tensor:
    coef = gemmi.Element(symbol).c4322
    s2 = (q / 2.0) ** 2
    out = torch.zeros_like(q)
    for a, b in zip(coef.a, coef.b):
        out = out + a * torch.exp(-b * s2)
    return out


def water_form_factor_sq_A2(q_per_A: torch.Tensor) -> torch.Tensor:
    """Orientation-averaged |F_w(q)|² (Å²) of one water molecule (Debye formula), q = 1/d in 1/Å."""
    q = q_per_A.double()
    fo, fh = _scattering("O", q), _scattering("H", q)
    # Debye: sin(2πqd) / (2πqd) = torch.sinc(2qd) (torch.sinc is the normalised sinc)
    x_oh, x_hh = 2 * q * _D_OH_A, 2 * q * _D_HH_A
    return fo * fo + 2 * fh * fh + 4 * fo * fh * torch.sinc(x_oh) + 2 * fh * fh * torch.sinc(x_hh)


def ice_mean_potential_V(density_g_per_cm3: float) -> float:
    """Mean inner potential (V) of ice of this density in the independent atom model."""
    f0 = float(water_form_factor_sq_A2(torch.zeros(1))[0]) ** 0.5  # = f_O(0) + 2 f_H(0)
    return POTENTIAL_CONSTANT_V_A2 * water_number_density_per_A3(density_g_per_cm3) * f0


def amorphous_ice_structure_factor(q_per_A: torch.Tensor) -> torch.Tensor:
    """Parametric S(q) of low-density amorphous ice (see the module docstring), q = 1/d in 1/Å."""
    q = q_per_A.double()
    s0, q_c = 0.05, 0.2
    base = 1.0 + (s0 - 1.0) * torch.exp(-((q / q_c) ** 2))
    peak1 = 1.4 * torch.exp(-((q - 0.269) ** 2) / (2 * 0.015**2))
    peak2 = 0.3 * torch.exp(-((q - 0.48) ** 2) / (2 * 0.04**2))
    return base + peak1 + peak2


def ice_projected_potential_psd(q_per_A: torch.Tensor, path_length_A: float, density_g_per_cm3: float) -> torch.Tensor:
    """Power spectral density (V²·Å⁴) of the projected potential fluctuations through ``path_length_A`` of ice."""
    n = water_number_density_per_A3(density_g_per_cm3)
    return (
        path_length_A * n * POTENTIAL_CONSTANT_V_A2**2 * water_form_factor_sq_A2(q_per_A)
        * amorphous_ice_structure_factor(q_per_A)
    )


def ice_potential_field(
    shape: tuple[int, int],
    pixel_size_A: float,
    path_length_A: float,
    density_g_per_cm3: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    psd_sqrt: torch.Tensor | None = None,
) -> torch.Tensor:
    """A zero-mean Gaussian field of projected ice potential (V·Å) on an ``[h, w]`` grid.

    ``psd_sqrt``: optionally the precomputed ``sqrt(PSD for 1 Å)/pixel`` on the rfft grid (it
    only depends on the grid), scaled here by ``sqrt(path_length_A)``.
    """
    h, w = shape
    device = torch.device(device)
    if psd_sqrt is None:
        psd_sqrt = ice_psd_sqrt_grid(shape, pixel_size_A, density_g_per_cm3, device)
    noise = torch.randn((h, w), generator=generator, device=device)
    spec = torch.fft.rfft2(noise) * (psd_sqrt * math.sqrt(path_length_A))
    return torch.fft.irfft2(spec, s=(h, w))


def ice_psd_sqrt_grid(shape: tuple[int, int], pixel_size_A: float, density_g_per_cm3: float, device) -> torch.Tensor:
    """``sqrt(PSD(q) for a 1 Å path) / pixel_size`` on the rfft grid of ``shape``, DC set to 0."""
    h, w = shape
    ky = torch.fft.fftfreq(h, d=pixel_size_A, dtype=torch.float64)
    kx = torch.fft.rfftfreq(w, d=pixel_size_A, dtype=torch.float64)
    q = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    amp = torch.sqrt(ice_projected_potential_psd(q, 1.0, density_g_per_cm3)) / pixel_size_A
    amp[0, 0] = 0.0
    return amp.to(device=torch.device(device), dtype=torch.float32)


@dataclass
class IceThickness:
    """Thickness of the ice slab ``t(x, y) = mean_A·(1 + variation·φ(x, y))`` (Å) at specimen
    positions x, y (Å from the tomogram centre): ``φ = scale·Σ_m a_m·cos(2π(kx_m·x + ky_m·y)/L + φ_m)``,
    L the field's larger side (module docstring)."""

    mean_A: float
    variation: float
    kx: torch.Tensor  # [m] cycles per L
    ky: torch.Tensor
    amp: torch.Tensor
    phase: torch.Tensor
    length_A: float
    scale: float = 1.0

    @property
    def max_A(self) -> float:
        """An upper bound of the thickness."""
        return self.mean_A * (1.0 + self.variation)

    def thickness_A(self, x_A: torch.Tensor, y_A: torch.Tensor) -> torch.Tensor:
        """Thickness (Å, float64) at the points (x, y)."""
        x, y = x_A.double(), y_A.double()
        arg = 2 * math.pi * (x[..., None] * self.kx + y[..., None] * self.ky) / self.length_A + self.phase
        phi = (self.amp * torch.cos(arg)).sum(-1) * self.scale
        return self.mean_A * (1.0 + self.variation * phi)

    def half_thickness_A(self, x_A: torch.Tensor, y_A: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.thickness_A(x_A, y_A)


def draw_ice_thickness(mean_A: float, variation: float, field_A: tuple[float, float],
                       generator: torch.Generator, modes: int = 3) -> IceThickness:
    """A random thickness field over a ``field_A`` (x, y) wide specimen: ``modes`` cosines of up to
    one cycle over the field, normalised on a 33 x 33 grid so that the largest deviation is
    ``variation·mean_A``."""
    k = (torch.rand((modes, 2), generator=generator, dtype=torch.float64) * 2 - 1)
    amp = torch.rand(modes, generator=generator, dtype=torch.float64) + 0.3
    phase = torch.rand(modes, generator=generator, dtype=torch.float64) * 2 * math.pi
    ice = IceThickness(mean_A, variation, k[:, 0], k[:, 1], amp, phase, float(max(field_A)))
    xs = torch.linspace(-field_A[0] / 2, field_A[0] / 2, 33, dtype=torch.float64)
    ys = torch.linspace(-field_A[1] / 2, field_A[1] / 2, 33, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    peak = float((ice.thickness_A(gx, gy) / mean_A - 1.0).abs().max()) / max(variation, 1e-300)
    ice.scale = 1.0 / max(peak, 1e-12)
    return ice


def place_particles(
    count: int,
    half_extent_A: tuple[float, float, float],
    radius_A: float,
    gap_A: float,
    generator: torch.Generator,
    max_attempts: int = 200,
    half_thickness_A=None,
) -> torch.Tensor:
    """``count`` centres (x, y, z) in Å, uniform in the box ``|x_i| <= half_extent_i − radius``,
    at least ``2·radius + gap`` apart (random sequential addition); with ``half_thickness_A``
    (a function of x, y tensors, Å) also ``|z| <= half_thickness_A(x, y) − radius``. Raises
    ValueError when the box is too small or too crowded for that many particles."""
    if count == 0:
        return torch.zeros((0, 3), dtype=torch.float64)
    room = torch.tensor(half_extent_A, dtype=torch.float64) - radius_A
    if bool((room < 0).any()):
        raise ValueError(
            f"a particle of radius {radius_A:.1f} Å does not fit in a specimen of half-extent "
            f"{tuple(round(h, 1) for h in half_extent_A)} Å (x, y, z)"
        )
    min_dist = 2.0 * radius_A + gap_A
    placed = torch.zeros((0, 3), dtype=torch.float64)
    batch = 64
    tries = 0
    while placed.shape[0] < count:
        tries += 1
        if tries > max_attempts * max(1, count // batch + 1):
            raise ValueError(
                f"could only place {placed.shape[0]} of {count} non-overlapping particles of radius "
                f"{radius_A:.1f} Å; lower the number of particles or enlarge the specimen"
            )
        cand = (torch.rand((batch, 3), generator=generator, dtype=torch.float64) * 2 - 1) * room
        if half_thickness_A is not None:
            cand = cand[cand[:, 2].abs() <= half_thickness_A(cand[:, 0], cand[:, 1]) - radius_A]
        for c in cand:
            if placed.shape[0] and float(torch.linalg.norm(placed - c, dim=1).min()) < min_dist:
                continue
            placed = torch.cat([placed, c[None]])
            if placed.shape[0] == count:
                break
    return placed
