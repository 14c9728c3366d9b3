"""Reading a 2-D ``subtomograms`` set's crops back (layout in :mod:`tomopipe.model.subtomograms`): a
particle's tilts and sections, and its crops from the memory-mapped MRC stack, with clear errors."""

from __future__ import annotations

import numpy as np
import torch

from tomopipe.errors import InputFileError
from tomopipe.io.mrc import read_mrc
from tomopipe.model.subtomograms import tilts_used_mask

__all__ = ["tilt_sections", "read_crops"]


def tilt_sections(row: dict, n_tilts: int) -> tuple[np.ndarray, np.ndarray]:
    """(tilt indices used, their sections in the particle's stack): the stack holds every tilt of the
    geometry (``n_sections`` = n tilts, :mod:`tomopipe.model.subtomograms`)."""
    used = tilts_used_mask(row["tilts_used"])
    if used.size != n_tilts or int(row["n_sections"]) != n_tilts:
        raise InputFileError(f"{row['data_path']} (particle at section {row['data_section']})",
                             f"tilts_used names {used.size} tilts and n_sections is {row['n_sections']}, the tilt "
                             f"geometry has {n_tilts}")
    tilts = np.nonzero(used)[0]
    return tilts, tilts + int(row["data_section"])


def read_crops(row: dict, sections: np.ndarray, cache: dict) -> torch.Tensor:
    """The particle's crops ``[k, c, c]`` float32 from its (memory-mapped) MRC stack ``row["data_path"]``
    (absolute); ``cache`` keeps the open stacks by path."""
    path = row["data_path"]
    if path not in cache:
        cache[path] = read_mrc(path, mmap=True)[0]
    stack = cache[path]
    if stack.ndim != 3 or stack.shape[-1] != stack.shape[-2] or sections.size and sections.max() >= stack.shape[0]:
        raise InputFileError(path, f"expected a stack of square crops holding sections {sections.min()} .. "
                                   f"{sections.max()}, got shape {stack.shape}")
    crops = torch.from_numpy(np.asarray(stack[sections], dtype=np.float32))
    if not bool(torch.isfinite(crops).all()):
        raise InputFileError(path, f"the crops at sections {sections.min()} .. {sections.max()} have NaN or "
                                   f"infinite values")
    return crops
