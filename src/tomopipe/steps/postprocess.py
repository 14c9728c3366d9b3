"""Seed step "relion - postprocess": masked, phase-randomisation-corrected FSC of two half maps, the
resolution at FSC 0.143, a B-factor from the Guinier plot, and the sharpened, FSC-weighted map
low-passed at the resolution (:func:`tomopipe.algorithms.postprocess.postprocess`, RELION's
``relion_postprocess``); local resolution as an option.

Input: a ``maps`` set with ``half1`` and ``half2`` (e.g. from reconstruct_particle), same box and
voxel size. The mask is one of: a file (``mask_path``, an MRC of the maps' size with values in
[0, 1]), one made from the average of the half maps (``auto_mask_threshold``, grown by
``auto_mask_extend_px`` and given a raised-cosine edge ``auto_mask_soft_edge_px`` wide, after a
low-pass at ``auto_mask_lowpass_A``), a soft sphere (``mask_diameter_A``, same edge), or none.

Output: a ``maps`` set with the input's half maps and full map (their files are not copied) and
``sharpened`` (``postprocess.mrc``), ``masked`` (``postprocess_masked.mrc``), ``mask``
(``postprocess_mask.mrc``) and, if asked, ``local_resolution`` (``relion_locres.mrc``, Å). Its
attributes hold, under ``postprocess``, every FSC curve (unmasked, masked, phase-randomised
masked, corrected) per shell, the resolution, the B-factor and the Guinier fit.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.algorithms.postprocess import local_resolution, postprocess
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.model.sets import MAPS
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

OUTPUT_FILES = {"sharpened": "postprocess.mrc", "masked": "postprocess_masked.mrc", "mask": "postprocess_mask.mrc",
                "local_resolution": "relion_locres.mrc"}
PASSED_THROUGH = ("half1", "half2", "full")


def _read_volume(path: Path, what: str) -> tuple[torch.Tensor, float]:
    data, voxel_size_A = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputFileError(path, f"{what}: expected a cubic volume, got shape {data.shape}")
    volume = torch.from_numpy(np.asarray(data, dtype=np.float32))
    if not bool(torch.isfinite(volume).all()):
        raise InputFileError(path, f"{what}: the volume has NaN or infinite values")
    return volume, float(voxel_size_A)


def half_maps(ctx, items: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, float, list[Path]]:
    """The two half maps of the input set, checked to share their box and voxel size."""
    rows = {name: items[items["map_name"] == name] for name in ("half1", "half2")}
    absent = [name for name, row in rows.items() if len(row) != 1]
    if absent:
        ctx.fail(f"the input set 'maps' needs exactly one map named {' and '.join(absent)} "
                 f"(it has {sorted(items['map_name'])})")
    paths = [ctx.resolve(rows[name]["map_path"].iloc[0]) for name in ("half1", "half2")]
    (h1, v1), (h2, v2) = (_read_volume(path, name) for path, name in zip(paths, ("half map 1", "half map 2")))
    if h1.shape != h2.shape:
        ctx.fail(f"the half maps differ in size: {paths[0]} is {tuple(h1.shape)}, {paths[1]} is {tuple(h2.shape)}")
    if not np.isclose(v1, v2, rtol=1e-4):
        ctx.fail(f"the half maps differ in voxel size: {paths[0]} has {v1:g} Å, {paths[1]} has {v2:g} Å")
    return h1, h2, v1, paths


def make_mask(ctx, shape: tuple[int, ...], voxel_size_A: float) -> tuple[torch.Tensor | None, str]:
    """The mask the parameters ask for (a file or a sphere; None for none or auto) and how it was made."""
    p = ctx.params
    chosen = [name for name in ("mask_path", "auto_mask_threshold", "mask_diameter_A") if p[name] is not None]
    if len(chosen) > 1:
        ctx.fail(f"give one mask: {', '.join(chosen)} are all set")
    if p["mask_path"] is not None:
        path = Path(p["mask_path"])
        mask, _ = _read_volume(path, "mask")
        if tuple(mask.shape) != shape:
            raise InputFileError(path, f"the mask is {tuple(mask.shape)} voxels, the half maps {shape}")
        if float(mask.min()) < -1e-3 or float(mask.max()) > 1 + 1e-3 or float(mask.max()) <= 0:
            raise InputFileError(path, f"a mask must lie in [0, 1] and be non-zero somewhere, got "
                                       f"{float(mask.min()):g} .. {float(mask.max()):g}")
        return mask, str(path)
    if p["mask_diameter_A"] is not None:
        try:
            sphere = spherical_mask(shape[0], voxel_size_A, p["mask_diameter_A"],
                                    p["auto_mask_soft_edge_px"] * voxel_size_A)
        except TomopipeError as error:
            ctx.fail(str(error))
        return sphere, f"sphere of {p['mask_diameter_A']:g} Å"
    if p["auto_mask_threshold"] is not None:
        return None, f"auto (threshold {p['auto_mask_threshold']:g})"
    return None, "none"


def _curves(result) -> dict:
    """The FSC curves of a :class:`~tomopipe.algorithms.postprocess.PostprocessResult` as lists (None when absent)."""
    as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
    return {"shell_frequencies_per_A": as_list(result.shell_frequencies_per_A),
            "fsc_unmasked": as_list(result.fsc_unmasked), "fsc_masked": as_list(result.fsc_masked),
            "fsc_randomised_masked": as_list(result.fsc_randomised_masked),
            "fsc_corrected": as_list(result.fsc_corrected)}


@register
class Postprocess(Step):
    type_name = "postprocess"
    title = "relion - postprocess"
    description = ("Masked FSC of the half maps corrected by phase randomisation, resolution at FSC 0.143, "
                   "B-factor from the Guinier plot, sharpened FSC-weighted map low-passed at the resolution; "
                   "optionally local resolution.")
    params = (
        Param("mask_path", "path", "soft mask (MRC, values in [0, 1], the maps' size)"),
        Param("auto_mask_threshold", "float", "make the mask from the half maps' average at this threshold"),
        Param("auto_mask_extend_px", "float", "grow the auto mask by this many voxels", default=3.0),
        Param("auto_mask_soft_edge_px", "float", "raised-cosine edge of the auto or spherical mask, voxels",
              default=6.0, min=0),
        Param("auto_mask_lowpass_A", "float", "low-pass the average at this resolution before thresholding",
              default=15.0, min=0),
        Param("mask_diameter_A", "float", "a soft spherical mask of this diameter instead", min=0),
        Param("b_factor_A2", "float", "B-factor to apply (negative sharpens); not set: fitted (Guinier)"),
        Param("fit_low_A", "float", "the Guinier fit runs from this resolution to the map's", default=10.0, min=0),
        Param("local_resolution", "bool", "also compute a local resolution map (RELION --locres)", default=False),
        Param("local_window_px", "int", "window of the local FSC, voxels (even)", default=24, min=8),
        Param("seed", "int", "seed of the random phases", default=0),
        DEVICE_PARAM,
    )
    inputs = (Port("maps", MAPS.name, "half maps (half1, half2)"),)
    outputs = (Port("maps", MAPS.name, "the half maps, the sharpened and masked maps, the mask"),)

    def run(self, ctx):
        p = ctx.params
        items = ctx.input_items("maps", enabled_only=True)
        h1, h2, voxel_size_A, paths = half_maps(ctx, items)
        mask, mask_source = make_mask(ctx, tuple(h1.shape), voxel_size_A)
        device = compute_device(p["device"])
        generator = torch.Generator().manual_seed(p["seed"])
        result = postprocess(h1.to(device), h2.to(device), voxel_size_A, None if mask is None else mask.to(device),
                             auto_mask_threshold=p["auto_mask_threshold"],
                             auto_mask_extend_px=p["auto_mask_extend_px"],
                             auto_mask_soft_edge_px=p["auto_mask_soft_edge_px"],
                             auto_mask_lowpass_A=p["auto_mask_lowpass_A"] or None, b_factor_A2=p["b_factor_A2"],
                             fit_low_A=p["fit_low_A"], generator=generator)
        volumes = {"sharpened": result.map_sharpened, "masked": result.map_masked, "mask": result.mask}
        if p["local_resolution"]:
            if result.mask is None:
                ctx.fail("local_resolution needs a mask (mask_path, auto_mask_threshold or mask_diameter_A)")
            volumes["local_resolution"] = local_resolution(h1.to(device), h2.to(device), result.mask,
                                                           voxel_size_A, window_px=p["local_window_px"],
                                                           generator=generator)
        box_px = int(h1.shape[0])
        rows = items[items["map_name"].isin(PASSED_THROUGH)].to_dict("records")
        for name, volume in volumes.items():
            if volume is None:
                continue
            path = Path(ctx.folder) / OUTPUT_FILES[name]
            write_mrc(path, volume.cpu().numpy(), voxel_size_A)
            rows.append({"map_name": name, "map_path": ctx.stored_path(path), "voxel_size_A": voxel_size_A,
                         "box_px": box_px, "enabled": True})
        guinier = None if result.guinier is None else {
            "slope_A2": result.guinier.slope_A2, "intercept": result.guinier.intercept,
            "correlation": result.guinier.correlation}
        shell = result.randomise_from_shell
        attrs = copy.deepcopy(ctx.input_attrs("maps"))
        attrs["postprocess"] = {
            **_curves(result), "resolution_A": result.resolution_A, "b_factor_A2": result.b_factor_A2,
            "randomise_from_shell": shell,
            "randomise_from_A": None if shell is None else box_px * voxel_size_A / shell,
            "guinier": guinier, "mask": mask_source, "half_maps": [str(path) for path in paths],
            "params": {name: p[name] for name in p if name != "device"}}
        ctx.add_output("maps", pd.DataFrame(rows), attrs)
        log.info("postprocess: %.2f A at FSC 0.143 (mask: %s), B = %.1f A^2", result.resolution_A, mask_source,
                 result.b_factor_A2)
        return {"resolution_A": result.resolution_A, "b_factor_A2": result.b_factor_A2, "mask": mask_source}
