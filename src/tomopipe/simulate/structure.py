"""Atomic models for the simulator: read a PDB/mmCIF file with gemmi, build the biological
assembly, and return the atoms as tensors.

Coordinates are Å, (x, y, z) in the model's frame, centred on the centroid of the atoms (the
symmetry centre of a complete point-group assembly such as apoferritin). The centred model is
the simulator's reference: a particle with RELION angles (rot, tilt, psi) is this model rotated by
``A = (Rz(rot)·Ry(tilt)·Rz(psi))ᵀ`` about its centre and placed at its position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch

from tomopipe.errors import InputFileError

__all__ = ["AtomicModel", "read_atomic_model", "scattering_coefficients", "element_symbol", "HYDROGEN_SMEAR_B_A2"]

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

    def mass_Da(self) -> float:
        """Sum of the atomic masses (Da) weighted by occupancy (hydrogens only if modelled)."""
        masses = torch.tensor([gemmi.Element(s).weight for s in self.element_symbols], dtype=torch.float64)
        total = float((masses[self.element_index] * self.occupancies.double()).sum())
        return total + self.n_implicit_hydrogens * gemmi.Element("H").weight


def element_symbol(name: str) -> str:
    """Canonical element symbol (``'CA'`` -> ``'Ca'``); raises ValueError for unknown elements."""
    el = gemmi.Element(name)
    if el.atomic_number == 0:
        raise ValueError(f"unknown chemical element {name!r}")
    return el.name


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


def _has_real_operators(structure: gemmi.Structure, assembly: gemmi.Assembly) -> bool:
    """True when the assembly adds chains: some operator is not the identity or not all chains listed."""
    for gen in assembly.generators:
        for op in gen.operators:
            if not op.transform.is_identity():
                return True
    return False


def _assembled(structure: gemmi.Structure, path: Path) -> gemmi.Structure:
    """The biological assembly when the file defines one with non-identity operators; NCS
    (MTRIX) copies are expanded; otherwise the model as deposited."""
    st = structure
    if len(st.ncs) and not all(op.given for op in st.ncs):
        st = st.clone()
        st.expand_ncs(gemmi.HowToNameCopiedChain.AddNumber)
    for assembly in st.assemblies:
        if _has_real_operators(st, assembly):
            try:
                model = gemmi.make_assembly(assembly, st[0], gemmi.HowToNameCopiedChain.AddNumber)
            except Exception as exc:  # gemmi raises RuntimeError for broken operator lists
                raise InputFileError(path, f"cannot build biological assembly {assembly.name!r}: {exc}") from exc
            out = gemmi.Structure()
            out.cell = st.cell
            out.spacegroup_hm = st.spacegroup_hm
            out.add_model(model)
            return out
    return st


def read_atomic_model(
    path: str | Path,
    *,
    build_assembly: bool = True,
    remove_waters: bool = True,
    implicit_hydrogens: bool = True,
) -> AtomicModel:
    """Read a PDB or mmCIF file into an :class:`AtomicModel` (first model only).

    With ``build_assembly`` a file holding one asymmetric unit plus assembly operators
    (PDB ``REMARK 350``, mmCIF ``pdbx_struct_assembly_gen``) or NCS operators becomes the
    full assembly; a file that already holds all chains (e.g. 6Z6U) is used as is. Waters are
    removed by default (the ice is simulated separately).

    ``implicit_hydrogens`` (for models without hydrogens, as most cryo-EM and X-ray models):
    each residue gets the hydrogens of its chemical component (gemmi's table; two fewer for an
    amino acid in a chain, lost to the peptide bonds) as united atoms: shared equally among its
    carbon and nitrogen atoms (``AtomicModel.hydrogens``), drawn at their carrier's position
    and smeared by :data:`HYDROGEN_SMEAR_B_A2`. Hydrogens carry ~18 %
    of a protein's scattering in the independent atom model, i.e. most of its contrast against
    ice. Raises InputFileError naming the file when it is missing, unreadable, or holds no atoms.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "structure file not found (pass a PDB or mmCIF file with --structure)")
    if not path.is_file():
        raise InputFileError(path, "structure path is not a file")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own message
        raise InputFileError(path, f"not a readable PDB/mmCIF structure ({exc})") from exc
    if len(st) == 0:
        raise InputFileError(path, "structure file holds no model")
    if remove_waters:
        st.remove_waters()
    st.remove_empty_chains()
    if build_assembly:
        st = _assembled(st, path)
    model = st[0]
    has_hydrogens = model.has_hydrogen()
    xyz, elements, bfac, occ, h_count = [], [], [], [], []
    n_chains = 0
    for chain in model:
        n_chains += 1
        for residue in chain:
            carriers = []
            for atom in residue:
                if atom.element.atomic_number == 0:
                    raise InputFileError(
                        path, f"atom {atom.name!r} of residue {residue.name} {residue.seqid} has an unknown element"
                    )
                xyz.append(atom.pos.tolist())
                elements.append(atom.element.name)
                bfac.append(atom.b_iso)
                occ.append(atom.occ)
                h_count.append(0.0)
                if atom.element.name in ("C", "N"):
                    carriers.append(len(xyz) - 1)
            if implicit_hydrogens and not has_hydrogens and carriers:
                info = gemmi.find_tabulated_residue(residue.name)
                n_h = info.hydrogen_count - (2 if info.is_amino_acid() else 0) if info is not None else 0
                for index in carriers:
                    h_count[index] = max(n_h, 0) / len(carriers)
    if not xyz:
        raise InputFileError(path, "structure file holds no atoms")
    positions = np.asarray(xyz, dtype=np.float64)
    centre = positions.mean(axis=0)
    symbols = tuple(sorted(set(elements)))
    lookup = {s: i for i, s in enumerate(symbols)}
    b = np.asarray(bfac, dtype=np.float64)
    if not np.all(np.isfinite(b)) or b.min() < 0:
        raise InputFileError(path, "negative or non-finite B-factors")
    return AtomicModel(
        positions_A=torch.from_numpy(positions - centre),
        element_index=torch.tensor([lookup[e] for e in elements], dtype=torch.int64),
        element_symbols=symbols,
        b_factors_A2=torch.from_numpy(b),
        occupancies=torch.tensor(occ, dtype=torch.float64).clamp(0.0, 1.0),
        centre_A=tuple(float(c) for c in centre),
        n_chains=n_chains,
        source=str(path),
        hydrogens=torch.tensor(h_count, dtype=torch.float64) if any(h_count) else None,
    )
