"""Atomic models as tensors and their electrostatic potential on a voxel grid, in volts (independent
atom model). Pure tensor code; the files are read by :mod:`tomopipe.io.atomic_model`.

Physics (Kirkland, *Advanced Computing in Electron Microscopy*, ch. 5; ITC Vol. C 4.3.2.2):

* An atom with electron scattering factor ``f(s) = Σ a_i exp(−b_i s²)`` (s = |q|/2, q = 1/d)
  and isotropic B has the potential
  ``V(r) = K · Σ_i a_i (4π/β_i)^{3/2} exp(−4π² r² / β_i)``, ``β_i = b_i + B``, where
  ``K = h² / (2π m₀ e) = 47.878 V·Å²`` (``POTENTIAL_CONSTANT_V_A2``). Its integral is
  ``K·f(0)`` V·Å³ (carbon: 120 V·Å³).
* Voxel values are point samples of the potential **band-limited to the grid's Nyquist
  frequency** (not aliased): atoms are drawn on a grid ``oversampling`` (1.5) times finer,
  Fourier-transformed and cropped to the target grid. A blur is added to every Gaussian so that
  the finer grid's aliases into the kept band stay below ``tolerance``, and removed again in
  Fourier space; each Gaussian is cut where it falls below ``tolerance`` of its peak.
* Solvent exclusion (optional): each atom displaces ice with a Gaussian of volume ``v`` (Fraser,
  MacRae & Suzuki 1978, as in CRYSOL): ``−V_ice · exp(−π r² / v^{2/3})``, so the map is the
  contrast of the molecule *relative to the ice* around it. ``v`` are Bondi van-der-Waals
  volumes scaled so that they add up to the volume of the protein at 1.23 Å³/Da (partial
  specific volume 0.74 cm³/g) including ~7.5 % hydrogen mass.
* The phase shift of a projected potential ``V_p`` (V·Å) is ``σ·V_p`` with the interaction
  constant ``σ = 2π m e λ / h²`` (relativistic mass), 6.5e-4 rad/(V·Å) at 300 kV
  (:func:`interaction_constant_rad_per_V_A`).

Volumes are ``[z, y, x]``; voxel ``(k, j, i)`` sits at ``((i − nx//2)·p, (j − ny//2)·p,
(k − nz//2)·p)`` Å from the model centre. An :class:`AtomicModel` holds coordinates in Å, (x, y, z)
in the model's frame, centred on the centroid of the atoms (the symmetry centre of a complete
point-group assembly such as apoferritin): a particle with RELION angles (rot, tilt, psi) is this
model rotated by ``A = (Rz(rot)·Ry(tilt)·Rz(psi))ᵀ`` about its centre and placed at its position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gemmi
import torch

from tomopipe.algorithms.ctf import electron_wavelength_A

__all__ = [
    "AtomicModel",
    "HYDROGEN_SMEAR_B_A2",
    "POTENTIAL_CONSTANT_V_A2",
    "PROTEIN_VOLUME_A3_PER_DA",
    "HYDROGEN_MASS_FRACTION",
    "scattering_coefficients",
    "interaction_constant_rad_per_V_A",
    "excluded_volumes_A3",
    "atomic_potential_volume",
    "fourier_crop_volume",
]

#: Extra B-factor of an implicit hydrogen placed on its carrier atom: a hydrogen ~1.05 Å from the
#: carrier in a random direction has <u²> = d²/3 per axis, B = 8π²·<u²> ≈ 29 Å².
HYDROGEN_SMEAR_B_A2 = 8.0 * 3.141592653589793**2 * 1.05**2 / 3.0


@dataclass(frozen=True)
class AtomicModel:
    """Atoms of one (assembled) structure, centred on their centroid.

    ``positions_A`` [n, 3] (x, y, z) in Å; ``element_index`` [n] into ``element_symbols``;
    ``b_factors_A2`` [n] isotropic B (Å²); ``occupancies`` [n]; ``centre_A`` the centroid that
    was subtracted (file frame); ``n_chains`` chains after assembly; ``hydrogens`` [n] the
    implicit hydrogens carried by each atom (None when the file has its own or they are off).
    """

    positions_A: torch.Tensor
    element_index: torch.Tensor
    element_symbols: tuple[str, ...]
    b_factors_A2: torch.Tensor
    occupancies: torch.Tensor
    centre_A: tuple[float, float, float]
    n_chains: int
    source: str
    hydrogens: torch.Tensor | None = None  #: [n] implicit (united-atom) hydrogens on each atom

    @property
    def n_implicit_hydrogens(self) -> float:
        return 0.0 if self.hydrogens is None else float(self.hydrogens.sum())

    @property
    def n_atoms(self) -> int:
        return int(self.positions_A.shape[0])

    @property
    def radius_A(self) -> float:
        """Largest distance of an atom centre from the model centre (Å)."""
        return float(torch.linalg.norm(self.positions_A, dim=1).max()) if self.n_atoms else 0.0

    def atom_masses_Da(self) -> torch.Tensor:
        """[n] float64 mass (Da) of each atom weighted by its occupancy, plus its implicit hydrogens."""
        masses = torch.tensor([gemmi.Element(s).weight for s in self.element_symbols], dtype=torch.float64)
        per_atom = masses[self.element_index] * self.occupancies.double()
        if self.hydrogens is not None:
            per_atom = per_atom + self.hydrogens.double() * gemmi.Element("H").weight
        return per_atom

    def mass_Da(self) -> float:
        """Sum of the atomic masses (Da) weighted by occupancy (hydrogens only if modelled)."""
        return float(self.atom_masses_Da().sum())

    def centre_of_mass_A(self) -> torch.Tensor:
        """Mass-weighted centre (x, y, z) in Å in the model's frame (0 for a symmetric assembly), float64 [3]."""
        masses = self.atom_masses_Da()
        return (self.positions_A.double() * masses[:, None]).sum(0) / masses.sum()


def scattering_coefficients(symbols) -> tuple[torch.Tensor, torch.Tensor]:
    """Electron scattering factors of ITC Vol. C Table 4.3.2.2 (5 Gaussians), via gemmi.

    ``f(s) = Σ_i a_i·exp(−b_i·s²)`` with ``s = sinθ/λ = |q|/2`` (q = 1/d in 1/Å), a_i in Å, b_i in Å².
    Returns ``(a [n, 5], b [n, 5])`` float64 for the element symbols given.
    """
    a, b = [], []
    for s in symbols:
        el = gemmi.Element(s)
        if el.atomic_number == 0:
            raise ValueError(f"unknown chemical element {s!r}")
        coef = el.c4322
        if coef is None or len(coef.a) != 5:
            raise ValueError(f"no electron scattering factors for element {s!r}")
        a.append(list(coef.a))
        b.append(list(coef.b))
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


_PLANCK_J_S = 6.62607015e-34
_ELECTRON_MASS_KG = 9.1093837015e-31
_ELEMENTARY_CHARGE_C = 1.602176634e-19
_SPEED_OF_LIGHT_M_S = 299792458.0

#: h²/(2π m₀ e) in V·Å²: converts a scattering factor (Å) into a potential integral (V·Å³).
POTENTIAL_CONSTANT_V_A2 = _PLANCK_J_S**2 / (2.0 * math.pi * _ELECTRON_MASS_KG * _ELEMENTARY_CHARGE_C) * 1e20
#: Protein volume per dalton (partial specific volume 0.74 cm³/g).
PROTEIN_VOLUME_A3_PER_DA = 0.74 * 1.66053906660  # cm³/g × g/Da -> Å³/Da
#: Hydrogen mass as a fraction of the heavy-atom mass of a protein (≈ 8 H per 110 Da residue).
HYDROGEN_MASS_FRACTION = 0.075


def interaction_constant_rad_per_V_A(voltage_kV: float) -> float:
    """Interaction constant ``σ = 2π·γ·m₀·e·λ / h²`` in rad/(V·Å) (300 kV: 6.53e-4)."""
    v = float(voltage_kV) * 1e3
    if v <= 0:
        raise ValueError(f"voltage_kV must be > 0, got {voltage_kV!r}")
    lam_m = float(electron_wavelength_A(float(voltage_kV))) * 1e-10
    gamma = 1.0 + _ELEMENTARY_CHARGE_C * v / (_ELECTRON_MASS_KG * _SPEED_OF_LIGHT_M_S**2)
    sigma_per_V_m = 2.0 * math.pi * gamma * _ELECTRON_MASS_KG * _ELEMENTARY_CHARGE_C * lam_m / _PLANCK_J_S**2
    return sigma_per_V_m * 1e-10


def excluded_volumes_A3(model: AtomicModel) -> torch.Tensor:
    """Per-atom solvent-excluded volume (Å³) of the heavy atoms: Bondi vdW sphere volumes scaled so
    that their sum is the protein volume ``1.23 Å³/Da × mass``, the mass including hydrogens (the
    model's, implicit ones, or ``HYDROGEN_MASS_FRACTION`` of the heavy-atom mass when there are
    none). Explicit hydrogen atoms get 0 (their volume is in their carrier's share)."""
    radii = torch.tensor([gemmi.Element(s).vdw_r for s in model.element_symbols], dtype=torch.float64)
    v_el = 4.0 / 3.0 * math.pi * radii**3
    is_h = torch.tensor([s == "H" for s in model.element_symbols])[model.element_index]
    v = torch.where(is_h, torch.zeros_like(model.occupancies), v_el[model.element_index] * model.occupancies)
    has_h = bool(is_h.any()) or model.n_implicit_hydrogens > 0
    target = PROTEIN_VOLUME_A3_PER_DA * model.mass_Da() * (1.0 if has_h else 1.0 + HYDROGEN_MASS_FRACTION)
    return v * (target / float(v.sum()))


def _shape3(box) -> tuple[int, int, int]:
    if isinstance(box, int):
        shape = (box, box, box)
    else:
        shape = tuple(int(b) for b in box)
    if len(shape) != 3 or min(shape) < 2 or any(s % 2 for s in shape):
        raise ValueError(f"box must be an even size or (nz, ny, nx) of even sizes >= 2, got {box!r}")
    return shape  # type: ignore[return-value]


def fourier_crop_volume(volume_ft: torch.Tensor, fine_shape, shape) -> torch.Tensor:
    """Crop an rfftn spectrum of a ``fine_shape`` grid to the band of ``shape`` (same spacing in
    Fourier space) and return the rfftn spectrum of the coarser grid, scaled so that the
    inverse transform keeps real-space values."""
    nz, ny, nx = shape
    fz, fy, fx = fine_shape
    v = volume_ft[:, :, : nx // 2 + 1]
    v = torch.cat([v[: nz // 2], v[fz - nz // 2 :]], dim=0)
    v = torch.cat([v[:, : ny // 2], v[:, fy - ny // 2 :]], dim=1)
    return v * (nz * ny * nx / (fz * fy * fx))


def atomic_potential_volume(
    model: AtomicModel,
    box,
    pixel_size_A: float,
    *,
    ice_potential_V: float = 0.0,
    extra_b_factor_A2: float = 0.0,
    device: str | torch.device = "cpu",
    oversampling: float = 1.5,
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Potential (V) of ``model`` on a ``box`` grid (even size or (nz, ny, nx)) at ``pixel_size_A``.

    ``ice_potential_V`` > 0 subtracts the displaced ice (solvent exclusion, see the module
    docstring); 0 gives the potential in vacuo. ``extra_b_factor_A2`` is added to every atom's B.
    Returns float32 ``[nz, ny, nx]`` on ``device``; the model centre sits at voxel ``n//2``.
    """
    if pixel_size_A <= 0:
        raise ValueError(f"pixel_size_A must be > 0, got {pixel_size_A!r}")
    shape = _shape3(box)
    device = torch.device(device)
    if oversampling < 1.25:
        raise ValueError(f"oversampling must be >= 1.25, got {oversampling}")
    fine = tuple(int(round(oversampling * s)) for s in shape)
    if len({f / s for f, s in zip(fine, shape)}) != 1:
        raise ValueError(f"oversampling {oversampling} does not give the same fine spacing on every axis of {shape}")
    pf = pixel_size_A * shape[0] / fine[0]

    a_el, b_el = scattering_coefficients(model.element_symbols)
    a = a_el[model.element_index]  # [n, 5]
    b_atom = model.b_factors_A2 + extra_b_factor_A2
    bb = b_el[model.element_index] + b_atom[:, None]
    amp = POTENTIAL_CONSTANT_V_A2 * model.occupancies[:, None] * a * (4.0 * math.pi / bb.clamp_min(1e-6)) ** 1.5
    if model.hydrogens is not None:  # united-atom hydrogens: 5 more Gaussians on their carriers
        a_h, b_h = scattering_coefficients(["H"])
        bh = b_h + (b_atom + HYDROGEN_SMEAR_B_A2)[:, None]
        amp_h = (POTENTIAL_CONSTANT_V_A2 * (model.occupancies * model.hydrogens)[:, None] * a_h
                 * (4.0 * math.pi / bh) ** 1.5)
        bb = torch.cat([bb, bh], dim=1)
        amp = torch.cat([amp, amp_h], dim=1)
    if ice_potential_V:
        # displaced ice: peak −V_ice, width from the excluded volume v (occupancy included), so
        # that the term integrates to −V_ice·v; hydrogen entries (v = 0) displace nothing here
        v = excluded_volumes_A3(model)
        bx = 4.0 * math.pi * v.clamp_min(1e-3) ** (2.0 / 3.0)
        bb = torch.cat([bb, bx[:, None]], dim=1)
        amp = torch.cat([amp, torch.where(v > 0, -float(ice_potential_V), 0.0)[:, None].double()], dim=1)
    if float(bb.min()) <= 0:
        raise ValueError("atom B-factors make a Gaussian width <= 0")
    # blur so that the narrowest Gaussian aliases < tolerance into the kept band (removed below):
    # the nearest replica of the fine grid lies at 1/pf − q_max from the band edge q_max = 1/(2p)
    q_max = 0.5 / pixel_size_A
    q_rep = 1.0 / pf - q_max
    beta_needed = 4.0 * math.log(1.0 / tolerance) / (q_rep**2 - q_max**2)
    blur = max(0.0, beta_needed - float(bb.min()))
    if blur > 0:
        ratio = (bb / (bb + blur)) ** 1.5
        amp = amp * ratio
        bb = bb + blur

    fine_vol = _draw_gaussians(model.positions_A / pf, bb / pf**2, amp, fine, device, tolerance)
    spectrum = torch.fft.rfftn(fine_vol)  # origin at index 0 (wrapped)
    del fine_vol
    spectrum = fourier_crop_volume(spectrum, fine, shape)
    if blur > 0:
        kz = torch.fft.fftfreq(shape[0], d=pixel_size_A, device=device)
        ky = torch.fft.fftfreq(shape[1], d=pixel_size_A, device=device)
        kx = torch.fft.rfftfreq(shape[2], d=pixel_size_A, device=device)
        q2 = kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2
        spectrum = spectrum * torch.exp(0.25 * blur * q2)
    return torch.fft.fftshift(torch.fft.irfftn(spectrum, s=shape)).to(torch.float32)


def _draw_gaussians(
    positions_px: torch.Tensor,
    beta_px2: torch.Tensor,
    amplitude: torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device,
    cutoff: float,
    chunk_atoms: int = 512,
) -> torch.Tensor:
    """Sum of isotropic Gaussians ``amp·exp(−4π² |x − c|² / β)`` sampled on a ``[z, y, x]`` grid.

    ``positions_px`` [n, 3] (x, y, z) in voxels from the grid origin, index 0 (the grid is
    periodic: negative positions wrap to the end, as for an FFT); ``beta_px2``
    and ``amplitude`` [n, t] (t Gaussians per atom, β in voxel²). Each atom is evaluated in a
    cube reaching to where its widest Gaussian falls below ``cutoff`` of its peak, as a separable
    sum (one small matrix product per atom) scattered into the grid; atoms are grouped by cube
    size. Periodic boundaries.
    """
    nz, ny, nx = shape
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    flat = out.view(-1)
    centres = positions_px.to(torch.float64)  # (x, y, z) index, origin at 0
    reach = torch.sqrt(beta_px2.max(dim=1).values * math.log(1.0 / cutoff)) / (2.0 * math.pi)
    half = torch.ceil(reach).to(torch.int64).clamp_min(1)
    dims = torch.tensor([nx, ny, nz], dtype=torch.int64, device=device)
    strides = torch.tensor([1, nx, nx * ny], dtype=torch.int64, device=device)
    for h in torch.unique(half).tolist():
        sel = torch.nonzero(half == h).flatten()
        k = 2 * h + 1
        offsets = torch.arange(-h, h + 1, dtype=torch.int64, device=device)
        for start in range(0, sel.numel(), chunk_atoms):
            idx = sel[start : start + chunk_atoms]
            c = centres[idx].to(device)
            nearest = torch.round(c).to(torch.int64)
            grid = nearest[:, :, None] + offsets  # [m, 3, k] voxel indices
            d2 = (grid.to(torch.float64) - c[:, :, None]) ** 2  # [m, 3, k]
            coef = (-4.0 * math.pi**2 / beta_px2[idx]).to(device)  # [m, t]
            g = torch.exp(coef[:, :, None, None] * d2[:, None, :, :]).to(torch.float32)  # [m, t, 3, k]
            gz = g[:, :, 2, :] * amplitude[idx].to(device=device, dtype=torch.float32)[:, :, None]
            gyx = (g[:, :, 1, :, None] * g[:, :, 0, None, :]).reshape(len(idx), -1, k * k)  # [m, t, k²]
            vals = torch.bmm(gz.transpose(1, 2), gyx)  # [m, k(z), k²(y, x)]
            wrapped = torch.remainder(grid, dims[None, :, None]) * strides[None, :, None]
            lin = wrapped[:, 2, :, None, None] + wrapped[:, 1, None, :, None] + wrapped[:, 0, None, None, :]
            flat.index_add_(0, lin.reshape(-1), vals.reshape(-1))
    return out

