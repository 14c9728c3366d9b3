"""Data shipped inside the package (package data, see ``pyproject.toml``; origins in ``SOURCES.md``).

``APOFERRITIN_MODEL``: human apoferritin, PDB 6Z6U (full 24-mer, 1.25 Å cryo-EM model; wwPDB
data, CC0 1.0), the deposited PDB-format file gzip-compressed. gemmi (and so
:func:`tomopipe.io.atomic_model.read_atomic_model`) reads it as it is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["APOFERRITIN_MODEL"]

APOFERRITIN_MODEL = Path(__file__).resolve().with_name("6z6u.pdb.gz")
