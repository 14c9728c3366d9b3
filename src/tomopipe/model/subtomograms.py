"""A ``subtomograms`` set's layout (model/sets.py ``SUBTOMOGRAMS``), shared by the steps that write
and read it: the tilt geometry each tilt series' crops were cut with, and where a particle's data lie.

Set attributes: ``"extraction"`` (dimensions 2 or 3, ``pixel_size_A`` of the crops, binning,
box_px, crop_px, ...) and ``"geometry"`` ``{ts_id: {field of TiltGeometry: plain values,
"tilt_index": [...]}}``: the tilts of the geometry (enabled, not excluded, in ``tilt_index``
order), their projection rotations, shifts, CTF and dose at the tilt series' own pixel size.

Files (one per tilt series; a particle's rows name the file, its first section and count):

* 2-D: an MRC stack of ``crop × crop`` sections, the particle's sections being the tilts of the
  geometry in order (``n_sections`` = n tilts); a tilt it does not use (``tilts_used`` '0') is zero.
* 3-D: ``data_path`` holds the particles' ``crop³`` volumes one after the other along z
  (``n_sections`` = crop); ``weights_path`` per particle the Σ CTF² volume then the
  multiplicity volume, each ``[crop, crop, crop//2+1]`` (half spectra, DC at index 0; RELION's
  ``*_weights.mrc``), so the particle's weights start at section ``2 · data_section``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from tomopipe.algorithms.subtomo.extract import TiltGeometry
from tomopipe.errors import TomopipeError


@dataclass(frozen=True)
class SubtomogramGeometry:
    """The tilt geometry of one tilt series' crops and the ``tilt_index`` of each of its tilts."""

    geometry: TiltGeometry
    tilt_index: tuple[int, ...]


def geometry_attrs(geometry: TiltGeometry, tilt_index) -> dict:
    """The ``"geometry"`` entry of one tilt series: every field of ``geometry`` as plain values."""
    out = {}
    for item in fields(TiltGeometry):
        value = getattr(geometry, item.name)
        out[item.name] = value.tolist() if isinstance(value, torch.Tensor) else value
    out["image_size_px"] = list(geometry.image_size_px)
    out["tilt_index"] = [int(i) for i in tilt_index]
    if len(out["tilt_index"]) != geometry.n_tilts:
        raise ValueError(f"geometry_attrs: {len(out['tilt_index'])} tilt indices for {geometry.n_tilts} tilts")
    return out


def geometry_from_attrs(attrs: dict, ts_id: str) -> SubtomogramGeometry:
    """The inverse of :func:`geometry_attrs`, from a subtomograms set's attributes (a clear error
    when the tilt series has no geometry there)."""
    entry = dict(attrs.get("geometry", {}).get(ts_id) or {})
    if not entry:
        raise TomopipeError(f"subtomograms: the set's attributes have no tilt geometry for {ts_id!r} "
                            f"(tilt series: {', '.join(sorted(attrs.get('geometry', {}))) or 'none'})")
    try:
        tilt_index = tuple(int(i) for i in entry.pop("tilt_index"))
        geometry = TiltGeometry(**entry)
    except (KeyError, TypeError) as error:
        raise TomopipeError(f"subtomograms: the tilt geometry of {ts_id!r} in the set's attributes is "
                            f"incomplete ({error})") from None
    if len(tilt_index) != geometry.n_tilts:
        raise TomopipeError(f"subtomograms: the tilt geometry of {ts_id!r} has {geometry.n_tilts} tilts but "
                            f"{len(tilt_index)} tilt indices")
    return SubtomogramGeometry(geometry, tilt_index)


def tilts_used_string(used) -> str:
    """A row's ``tilts_used``: '1' for each tilt of the geometry the particle uses, else '0'."""
    return "".join("1" if u else "0" for u in np.asarray(used, dtype=bool).reshape(-1))


def tilts_used_mask(text: str) -> np.ndarray:
    """``tilts_used`` back to a bool array (one per tilt of the geometry)."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise TomopipeError(f"subtomograms: tilts_used must be a string of 0 and 1, got {text!r}")
    return np.array([c == "1" for c in text], dtype=bool)


def weights_first_section(data_section: int) -> int:
    """3-D: the first section of a particle's weights (Σ CTF² then multiplicity) in ``weights_path``."""
    return 2 * int(data_section)


ORIGIN_COLUMNS = ("origin_x_A", "origin_y_A", "origin_z_A")


def particle_shifts_A(rows) -> np.ndarray:
    """``[m, 3]`` shifts (Å, tomogram frame) from the positions the crops were cut at to the particles'
    centres: minus the RELION origins of the rows (dicts or a table), zero where a set has none."""
    table = rows if hasattr(rows, "columns") else None
    if table is None:
        return np.array([[-float(r.get(c, 0.0) or 0.0) for c in ORIGIN_COLUMNS] for r in rows], dtype=np.float64)
    present = [c for c in ORIGIN_COLUMNS if c in table.columns]
    out = np.zeros((len(table), 3), dtype=np.float64)
    for c in present:
        out[:, ORIGIN_COLUMNS.index(c)] = -table[c].fillna(0.0).to_numpy(np.float64)
    return out
