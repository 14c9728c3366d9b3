"""Atomic models from files: read a PDB/mmCIF file (optionally gzipped) with gemmi, build the
biological assembly, and return the atoms as an :class:`~tomopipe.algorithms.potential.AtomicModel`
(coordinates in Å, (x, y, z), centred on the centroid of the atoms; see that module for the frame).
"""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import torch

from tomopipe.algorithms.potential import AtomicModel
from tomopipe.errors import InputFileError

__all__ = ["read_atomic_model"]


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
        raise InputFileError(path, "structure file not found (expected a PDB or mmCIF file)")
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
    occupancies = np.asarray(occ, dtype=np.float64)
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(occupancies))):
        raise InputFileError(path, "non-finite atom coordinates or occupancies")
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
        occupancies=torch.from_numpy(occupancies).clamp(0.0, 1.0),
        centre_A=tuple(float(c) for c in centre),
        n_chains=n_chains,
        source=str(path),
        hydrogens=torch.tensor(h_count, dtype=torch.float64) if any(h_count) else None,
    )
