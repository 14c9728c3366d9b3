"""Seed step "reliontomo - 3D initial model": a de novo map from 3-D pseudo-subtomograms by stochastic
gradient descent in mini-batches (RELION 5 ``relion_refine --grad``, VDAM-like;
:func:`tomopipe.algorithms.subtomo.initial_model.initial_model`), with no outside reference.

Input: a ``subtomograms`` set of 3-D extractions (:data:`tomopipe.model.sets.SUBTOMOGRAMS`, layout in
:mod:`tomopipe.model.subtomograms`): per particle its data volume (Σ CTF·image inserted, tomogram
frame, centre voxel crop//2) and its weights (Σ CTF², half spectrum). They are read in chunks of
``batch_size`` particles from the memory-mapped files and turned into the spectra the algorithm takes
(``rfftn(ifftshift(data))``).

Output: ``initial_model.mrc`` (voxel size of the crops, protein positive, written atomically) and a
``maps`` set with one map (``full``) whose attributes hold, under ``initial_model``, the per-mini-batch
log, the symmetry and the resolution schedule; and a ``subtomograms`` set: the input items with the
poses found, as RELION's ``_data.star``: ``rot/tilt/psi`` of the rotation A (reference -> particle)
and the position moved by the offset t (the particle centre = pick + t, Å). The data files are the
input's, cut at the old centres: re-extract the set to cut them at the new ones.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.geometry import matrix_to_euler_relion
from tomopipe.algorithms.picking.template import check_mask_fits
from tomopipe.algorithms.subtomo.initial_model import initial_model
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.model.sets import MAPS, SUBTOMOGRAMS
from tomopipe.model.subtomograms import weights_first_section
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

MAP_FILE = "initial_model.mrc"
NEEDED_COLUMNS = ("ts_id", "x_A", "y_A", "z_A", "tilt_deg", "data_path", "data_section", "n_sections",
                  "weights_path")


def _sections(cache: dict, path: Path, first: int, count: int, shape: tuple[int, int], what: str) -> np.ndarray:
    """Sections ``first .. first + count`` of a (memory-mapped) MRC file, checked against ``shape`` [y, x]."""
    if path not in cache:
        cache[path] = read_mrc(path, mmap=True)[0]
    stack = cache[path]
    if stack.ndim != 3 or tuple(stack.shape[1:]) != shape or first + count > stack.shape[0]:
        raise InputFileError(path, f"{what}: expected sections {first} .. {first + count - 1} of {shape[0]} x "
                                   f"{shape[1]} px, the file holds shape {stack.shape}")
    block = np.asarray(stack[first:first + count], dtype=np.float32)
    if not np.isfinite(block).all():
        raise InputFileError(path, f"{what}: sections {first} .. {first + count - 1} have NaN or infinite values")
    return block


def read_spectra(rows: list[dict], crop_px: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectra ``[m, N, N, N//2+1]`` of the particles' data volumes (``rfftn(ifftshift(data))``) and their
    Σ CTF² weights, read ``chunk`` particles at a time from the files (absolute paths in ``rows``)."""
    n = crop_px
    data_ft = torch.empty((len(rows), n, n, n // 2 + 1), dtype=torch.complex64)
    weights = torch.empty((len(rows), n, n, n // 2 + 1), dtype=torch.float32)
    cache: dict = {}
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk]
        volumes = np.stack([_sections(cache, Path(r["data_path"]), int(r["data_section"]), n, (n, n), "data volume")
                            for r in block])
        data_ft[start:start + len(block)] = torch.fft.rfftn(torch.fft.ifftshift(torch.from_numpy(volumes),
                                                                                dim=(-3, -2, -1)), dim=(-3, -2, -1))
        weights[start:start + len(block)] = torch.from_numpy(np.stack([
            _sections(cache, Path(r["weights_path"]), weights_first_section(int(r["data_section"])), n,
                      (n, n // 2 + 1), "CTF² weights") for r in block]))
    return data_ft, weights


@register
class InitialModel(Step):
    type_name = "initial_model"
    title = "reliontomo - 3D initial model"
    description = ("De novo map from 3-D pseudo-subtomograms: stochastic gradient descent in mini-batches over "
                   "orientations and offsets, regularised (T), with the point-group symmetry, a soft spherical "
                   "mask and a tilt prior; the particles' poses against the final map.")
    params = (
        Param("n_iterations", "int", "mini-batches (RELION --iter; the seed: 40 for the small data set)", default=40,
              min=1),
        Param("regularisation_T", "float", "regularisation parameter T (RELION --tau2_fudge): larger trusts the "
                                           "data more", default=4.0, min=1e-6),
        Param("mask_diameter_A", "float", "diameter of the soft spherical mask, Å (must fit in the crop)",
              default=150.0, min=1e-6),
        Param("symmetry", "str", "point group imposed (RELION: C1, Cn, Dn, T, O, I)", default="O"),
        Param("tilt_prior_deg", "float", "width of the Gaussian prior on each particle's tilt Euler angle about its "
                                         "tilt from picking (RELION --sigma_tilt; 0: none). It applies only when "
                                         "the picks carry orientations (picking.orientation_known); particles "
                                         "without a prior tilt are searched freely", default=15.0, min=0.0),
        Param("batch_size", "int", "particles per mini-batch (also the chunk the data are read in)", default=64,
              min=1),
        Param("seed", "int", "random seed (start model, mini-batches, grid perturbations)", default=0),
        DEVICE_PARAM,
    )
    inputs = (Port("subtomograms", SUBTOMOGRAMS.name, "3-D pseudo-subtomograms (extract with write_2d = false)"),)
    outputs = (Port("maps", MAPS.name, "the initial model (full)"),
               Port("subtomograms", SUBTOMOGRAMS.name, "the input particles with the poses found"))

    def run(self, ctx):
        p = ctx.params
        items = ctx.input_items("subtomograms", enabled_only=True).reset_index(drop=True)
        attrs = ctx.input_attrs("subtomograms")
        pixel_A, crop_px = self._check(ctx, items, attrs)
        rows = items.to_dict("records")
        for row in rows:
            row["data_path"], row["weights_path"] = (str(ctx.resolve(row[c])) for c in ("data_path", "weights_path"))
        start = time.perf_counter()
        data_ft, weights = read_spectra(rows, crop_px, p["batch_size"])
        read_s = time.perf_counter() - start
        oriented = bool((attrs.get("picking") or {}).get("orientation_known", False))
        prior = torch.tensor(items["tilt_deg"].to_numpy(np.float32)) if oriented and p["tilt_prior_deg"] > 0 else None
        result = initial_model(data_ft, weights, pixel_A, mask_diameter_A=p["mask_diameter_A"],
                               symmetry=p["symmetry"], n_iterations=p["n_iterations"], batch_size=p["batch_size"],
                               tau2_fudge=p["regularisation_T"], tilt_prior_deg=prior,
                               sigma_tilt_deg=p["tilt_prior_deg"], generator=torch.Generator().manual_seed(p["seed"]),
                               device=compute_device(p["device"]))
        model_s = time.perf_counter() - start - read_s
        # the extraction inverts the contrast by default (protein positive); without it the map is negated
        sign = 1.0 if bool(attrs.get("extraction", {}).get("invert_contrast", True)) else -1.0
        path = Path(ctx.folder) / MAP_FILE
        write_mrc(path, (sign * result.volume).cpu().numpy().astype(np.float32), pixel_A)
        history = [dataclasses.asdict(entry) for entry in result.log]
        summary = {"symmetry": result.symmetry, "resolution_schedule_A": [e.resolution_A for e in result.log],
                   "log": history, "prior_tilt": prior is not None, "params": {k: p[k] for k in p if k != "device"}}
        maps = pd.DataFrame([{"map_name": "full", "map_path": ctx.stored_path(path), "voxel_size_A": pixel_A,
                              "box_px": crop_px, "enabled": True}])
        ctx.add_output("maps", maps, {"tilt_series": copy.deepcopy(attrs.get("tilt_series", {})),
                                      "initial_model": summary, "symmetry": result.symmetry})
        ctx.add_output("subtomograms", self._posed(items, result), {**copy.deepcopy(attrs), "initial_model": summary})
        last = result.log[-1]
        log.info("initial model: %d particles, %d mini-batches, final %.1f A, %.1f s", len(items), len(result.log),
                 last.resolution_A, model_s)
        return {"particles": len(items), "final_resolution_A": last.resolution_A,
                "last_rotation_change_deg": last.mean_rotation_change_deg, "prior_tilt": prior is not None,
                "read_s": round(read_s, 3), "model_s": round(model_s, 3)}

    @staticmethod
    def _check(ctx, items: pd.DataFrame, attrs: dict) -> tuple[float, int]:
        """Bad input before any work: 2-D data, columns, sizes, mask, symmetry, particle count."""
        p = ctx.params
        extraction = attrs.get("extraction", {})
        if int(extraction.get("dimensions", 0)) != 3:
            ctx.fail(f"the initial model needs 3-D pseudo-subtomograms; the input set holds "
                     f"{extraction.get('dimensions', 'unknown')}-D extractions: extract the particles with "
                     f"write_2d = false")
        missing = [c for c in NEEDED_COLUMNS if c not in items.columns]
        if missing:
            ctx.fail(f"the input set 'subtomograms' has no column(s) {', '.join(missing)}")
        pixel_A, crop_px = float(extraction.get("pixel_size_A", 0)), int(extraction.get("crop_px", 0))
        if not pixel_A > 0 or crop_px < 8 or crop_px % 2:
            ctx.fail(f"the input set's extraction attributes need pixel_size_A > 0 and an even crop_px >= 8 (got "
                     f"pixel_size_A = {pixel_A}, crop_px = {crop_px})")
        bad = items.loc[items["n_sections"] != crop_px, "data_path"]
        if len(bad):
            ctx.fail(f"{len(bad)} particles have n_sections != crop_px = {crop_px} (e.g. in {bad.iloc[0]})")
        try:
            symmetry_group(p["symmetry"])
            check_mask_fits(crop_px, pixel_A, p["mask_diameter_A"])
        except TomopipeError as error:
            ctx.fail(str(error))
        if len(items) < max(2, p["batch_size"]):
            ctx.fail(f"too few particles: {len(items)} enabled, fewer than one mini-batch of batch_size = "
                     f"{p['batch_size']} (and at least 2): give more particles or a smaller batch_size")
        return pixel_A, crop_px

    @staticmethod
    def _posed(items: pd.DataFrame, result) -> pd.DataFrame:
        """The items with the poses found: Euler angles of A, the centre moved by the offset (pick + t)."""
        rot, tilt, psi = (v.cpu().numpy() for v in matrix_to_euler_relion(result.rotations.double().cpu()))
        offsets = result.offsets_A.double().cpu().numpy()
        return items.assign(rot_deg=rot, tilt_deg=tilt, psi_deg=psi, x_A=items["x_A"] + offsets[:, 0],
                            y_A=items["y_A"] + offsets[:, 1], z_A=items["z_A"] + offsets[:, 2])
