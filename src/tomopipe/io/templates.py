"""Template files for template matching, read by suffix: a density map (MRC: ``.mrc``, ``.map``,
``.mrcs``) or an atomic model (``.pdb``, ``.cif``, ``.mmcif``, ``.ent``, each optionally ``.gz``).

A map comes back as a :class:`TemplateMap` (volume ``[z, y, x]`` float32, density positive =
protein, isotropic voxel size in Å from the header or given), an atomic model as an
:class:`~tomopipe.algorithms.potential.AtomicModel`; :mod:`tomopipe.algorithms.picking.template`
turns either into a template at the tomogram's voxel size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tomopipe.algorithms.potential import AtomicModel
from tomopipe.errors import InputFileError
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.io.mrc import read_mrc, read_mrc_header

__all__ = ["MAP_SUFFIXES", "MODEL_SUFFIXES", "TemplateMap", "read_template"]

MAP_SUFFIXES = (".mrc", ".map", ".mrcs")
MODEL_SUFFIXES = (".pdb", ".cif", ".mmcif", ".ent")
#: Header voxel sizes that mean "not set": 0 (no cell) and 1.0 (many programs' default).
_UNSET_VOXEL_SIZES_A = (0.0, 1.0)


@dataclass(frozen=True)
class TemplateMap:
    """A density map read from ``source``: ``volume`` ``[z, y, x]`` float32 at ``voxel_size_A`` (Å)."""

    volume: torch.Tensor
    voxel_size_A: float
    source: str


def _kind(path: Path) -> str:
    """``"map"`` or ``"model"`` from the file name; InputFileError for any other suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in MAP_SUFFIXES:
        return "map"
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in MODEL_SUFFIXES:
        return "model"
    raise InputFileError(path, f"unknown template file type {''.join(path.suffixes) or '(no suffix)'}: expected a "
                               f"map ({', '.join(MAP_SUFFIXES)}) or an atomic model ({', '.join(MODEL_SUFFIXES)}, "
                               f"optionally gzipped)")


def _map_voxel_size_A(path: Path, template_voxel_size_A: float | None) -> float:
    """The given voxel size, else the header's (isotropic, set); InputFileError otherwise."""
    if template_voxel_size_A is not None:
        if not template_voxel_size_A > 0:
            raise ValueError(f"template_voxel_size_A must be > 0, got {template_voxel_size_A!r}")
        return float(template_voxel_size_A)
    sizes = read_mrc_header(path)["voxel_size_xyz_A"]
    if len(set(sizes)) != 1:
        raise InputFileError(path, f"anisotropic voxel size {sizes} Å in the header; a template needs cubic voxels")
    if sizes[0] in _UNSET_VOXEL_SIZES_A:
        raise InputFileError(path, f"the header's voxel size is {sizes[0]:g} Å, which usually means it was never set; "
                                   f"set template_voxel_size_A to the map's voxel size")
    return float(sizes[0])


def _read_map(path: Path, template_voxel_size_A: float | None) -> TemplateMap:
    voxel_size_A = _map_voxel_size_A(path, template_voxel_size_A)
    data, _ = read_mrc(path)
    if data.ndim != 3:
        raise InputFileError(path, f"a template map must be a 3-D volume, got shape {list(data.shape)}")
    if np.iscomplexobj(data) or not np.all(np.isfinite(data)):
        raise InputFileError(path, "a template map must hold finite real values")
    return TemplateMap(torch.from_numpy(data.astype(np.float32)), voxel_size_A, str(path))


def read_template(path: str | os.PathLike, template_voxel_size_A: float | None = None) -> TemplateMap | AtomicModel:
    """Read a template file by its suffix: an MRC map as a :class:`TemplateMap` (voxel size from the
    header unless ``template_voxel_size_A`` is given; a header voxel size of 0 or 1.0 is refused as
    unset), an atomic model as an :class:`AtomicModel` (biological assembly, implicit hydrogens;
    ``template_voxel_size_A`` does not apply and must be None). Raises InputFileError naming the file
    for an unknown suffix or an unreadable file."""
    path = Path(path)
    if _kind(path) == "map":
        return _read_map(path, template_voxel_size_A)
    if template_voxel_size_A is not None:
        raise InputFileError(path, "template_voxel_size_A applies to maps only: an atomic model has no voxels")
    return read_atomic_model(path)
