"""Seed step "reliontomo - 3D auto-refine": gold-standard refinement of the particles' poses and the map
(RELION 5 ``relion_refine --auto_refine --ios`` on 2-D pseudo-subtomograms; the loop in
:mod:`tomopipe.algorithms.subtomo.auto_refine`).

Inputs: a ``subtomograms`` set of 2-D extractions (crops CTF-premultiplied and dose-weighted,
:mod:`tomopipe.model.subtomograms`) with ``half_set`` 1/2, and a ``maps`` set that gives the reference on
absolute greyscale (not rescaled): its ``half1`` and ``half2`` maps, one per half set, when it has both
(a reconstruction or refinement of the same half sets: the halves stay independent), else its ``full``
map (else its ``initial`` map) for both. A reference of another voxel
size is Fourier-resampled to the crops' (noted in the log and the attributes); its box must then equal
the crops' (a clear error otherwise). The crops are masked with zeros outside a soft disc of
``mask_diameter_A`` (RELION ``--zero_mask``) and the references with the soft sphere of that diameter.

``tilt_prior_deg``: RELION's prior on the particle's tilt angle is the width of the Gaussian prior on the
previous orientation; the picks carry no orientation, so the first (global) iteration has none and the
local iterations use this width around the previous pose.

Outputs: a ``maps`` set (``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``,
``run_class001.mrc``) whose attributes hold the per-iteration log (resolution, half-map FSC, angular step,
mean pose changes), the final FSC curve and resolution; and the ``subtomograms`` with the refined poses: angles
(``rot_deg``, ``tilt_deg``, ``psi_deg``) and origins (``origin_x_A``...: RELION's ``rlnOriginX/Y/ZAngst``,
particle centre = position − origin, Å, tomogram frame), the positions and crops left as extracted.
Input origins (a refined set refined again) are the starting shifts.

Where it runs: on a Dask executor (``--dask``) the pose searches of each iteration fan out over its
workers, one task per tilt series and half (:func:`~tomopipe.algorithms.subtomo.auto_refine.search_task`):
the task carries a :class:`HalfLoader` (the half's rows, the extraction's attributes, the mask) that reads
that half's crops in the worker, kept there for the next iterations in a small per-process cache (the last
``LOADED_HALVES_KEPT`` halves). The poses are those of the in-process search (the same computation per tilt
series and half); reconstruction, references and noise stay in the step's process, which holds every tilt
series. A local pool (``--jobs`` > 1) is started anew for every map call, so for every iteration, and its
workers keep nothing: the searches stay in the step's process there unless ``FAN_OUT_ON_LOCAL_POOLS``.
Measured on the reduced demo's bin-4 refinement (``benchmarks/bench_averaging_chain.py --steps refine_bin4``,
2 CPU cores shared with other work, so wide ranges; the same poses and maps every time): in the step's
process 16–73 s, searches on a local pool of 2 (``--jobs 2 --fan-out-local``) 55–106 s (a pool start and the
halves read again per iteration), on a Dask LocalCluster of 2 workers (``--dask local``) 35–48 s. Without
Dask everything runs in the step's process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import pickle
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from tomopipe.algorithms.fsc import shell_frequencies_per_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix, matrix_to_euler_relion
from tomopipe.algorithms.picking.template import resample_volume, spherical_mask
from tomopipe.algorithms.so3 import crowther_angular_step_deg
from tomopipe.algorithms.subtomo.auto_refine import RefineSeries, RefineSettings, auto_refine, search_task
from tomopipe.algorithms.subtomo.backproject import centred_rfft2
from tomopipe.algorithms.subtomo.extract import TiltCtfWeights, circle_crop, particle_tilt_positions
from tomopipe.algorithms.subtomo.pose_search import ParticleStacks
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.io.subtomograms import read_crops, tilt_sections
from tomopipe.model.sets import MAPS, SUBTOMOGRAMS
from tomopipe.model.subtomograms import ORIGIN_COLUMNS, geometry_from_attrs, particle_shifts_A
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

MAP_FILES = {"half1": "run_half1_class001_unfil.mrc", "half2": "run_half2_class001_unfil.mrc",
             "full": "run_class001.mrc"}
POSE_COLUMNS = ("x_A", "y_A", "z_A", "rot_deg", "tilt_deg", "psi_deg", "half_set")
MASK_EDGE_PX = 3.0  # soft edge of the masks, pixels
LOADED_HALVES_KEPT = 2  # halves a worker process keeps between iterations (bin 2: ~0.3 GB each)
FAN_OUT_ON_LOCAL_POOLS = False  # pose searches on local pools of --jobs > 1 too (module docstring: slower on 2 cores)
_loaded: OrderedDict[str, RefineSeries] = OrderedDict()  # per process: HalfLoader.key -> its particles


def refine_series(resolve, rows: list[dict], attrs: dict, ts_id: str, mask_diameter_px: float, device
                  ) -> RefineSeries:
    """One tilt series' particles as the loop reads them: masked crops' spectra and their (CTF·D)², the
    poses and shifts of the rows (``resolve`` maps a stored path to a file)."""
    extraction = attrs["extraction"]
    g = geometry_from_attrs(attrs, ts_id).geometry
    pixel_A, c = float(extraction["pixel_size_A"]), int(extraction["crop_px"])
    m, n = len(rows), g.n_tilts
    crops = torch.zeros((m, n, c, c), dtype=torch.float32)
    used = torch.zeros((m, n), dtype=torch.bool)
    cache: dict = {}
    for j, row in enumerate(rows):
        row = dict(row, data_path=str(resolve(row["data_path"])))
        tilts, sections = tilt_sections(row, n)
        crops[j, tilts] = read_crops(row, sections, cache)
        used[j, tilts] = True
    shifts_A = torch.from_numpy(particle_shifts_A(rows))
    positions = torch.tensor([[r["x_A"], r["y_A"], r["z_A"]] for r in rows], dtype=torch.float64) + shifts_A
    defocus = particle_tilt_positions(g, positions, 2, float(extraction.get("binning", 1.0))).defocus_A[..., 0]
    weights = TiltCtfWeights(g, pixel_A, c, bool(extraction.get("apply_ctf", True)), device)
    tilt_index = torch.arange(n).repeat(m)
    ctf2 = weights(tilt_index, defocus.reshape(-1)).reshape(m, n, c, c // 2 + 1) * used.to(device)[..., None, None]
    spectra = centred_rfft2(circle_crop(crops.to(device), mask_diameter_px, MASK_EDGE_PX))
    stacks = ParticleStacks(spectra, ctf2, g.rotations.float(), pixel_A, torch.ones(c // 2 + 1), g.magnification)
    poses = euler_relion_to_matrix(*(torch.tensor([r[k] for r in rows], dtype=torch.float64)
                                     for k in ("rot_deg", "tilt_deg", "psi_deg")))
    return RefineSeries(stacks, torch.tensor([int(r["half_set"]) for r in rows]), poses, shifts_A.clone())


@dataclass(frozen=True)
class HalfLoader:
    """Builds one half of one tilt series' particles where a search task runs (:func:`refine_series` on
    ``rows``, their ``data_path`` absolute), cached per process under ``key`` (a digest of the rest)."""

    rows: tuple[dict, ...]
    attrs: dict
    ts_id: str
    mask_diameter_px: float
    device: str
    key: str = field(default="", compare=False)

    @classmethod
    def of(cls, resolve, rows: list[dict], attrs: dict, ts_id: str, mask_diameter_px: float, device
           ) -> "HalfLoader":
        """The loader of ``rows`` (one half of ``ts_id``), stored paths resolved now by ``resolve``; only the
        extraction and this tilt series' geometry are kept of ``attrs``."""
        rows = tuple(dict(r, data_path=str(resolve(r["data_path"]))) for r in rows)
        attrs = {"extraction": attrs["extraction"], "geometry": {ts_id: attrs.get("geometry", {}).get(ts_id)}}
        content = (rows, attrs, ts_id, float(mask_diameter_px), str(device))
        return cls(*content, key=hashlib.sha256(pickle.dumps(content)).hexdigest())

    def __call__(self) -> RefineSeries:
        series = _loaded.get(self.key)
        if series is None:
            series = refine_series(Path, list(self.rows), self.attrs, self.ts_id, self.mask_diameter_px,
                                   torch.device(self.device))
            _loaded[self.key] = series
            while len(_loaded) > LOADED_HALVES_KEPT:
                _loaded.popitem(last=False)
        _loaded.move_to_end(self.key)
        return series


def _searches_in_workers(task_placement: str) -> bool:
    """Whether the pose searches go to the executor's workers (module docstring): to persistent (Dask)
    workers, and to fresh local ones only with ``FAN_OUT_ON_LOCAL_POOLS``."""
    return task_placement == "persistent workers" or (FAN_OUT_ON_LOCAL_POOLS and task_placement == "fresh workers")


def _reference(ctx, pixel_A: float, crop_px: int) -> tuple[dict[int, torch.Tensor] | torch.Tensor, str]:
    """The reference on the crops' grid (the half maps when the set has both, else its 'full' or 'initial'
    map) and a note of what was done to it."""
    items = ctx.input_items("reference", enabled_only=True)
    names = items["map_name"].tolist() if "map_name" in items.columns else []
    if {"half1", "half2"} <= set(names):
        wanted = {1: "half1", 2: "half2"}
    else:
        name = next((k for k in ("full", "initial") if k in names), None)
        if name is None:
            ctx.fail(f"the input set 'reference' needs maps named 'half1' and 'half2', 'full' or 'initial', it has "
                     f"{names or 'none'}")
        wanted = {0: name}
    volumes, notes = {}, []
    for key, name in wanted.items():
        path = ctx.resolve(items.loc[items["map_name"] == name, "map_path"].iloc[0])
        volume, voxel_A = read_mrc(path)
        volume = torch.from_numpy(volume).float()
        notes.append(f"{path.name} ({name}), {voxel_A:.4g} A voxels")
        if abs(voxel_A - pixel_A) > 1e-3 * pixel_A:
            volume = resample_volume(volume, voxel_A, pixel_A)
            notes[-1] += f", resampled to {pixel_A:.4g} A"
        if tuple(volume.shape) != (crop_px,) * 3:
            ctx.fail(f"the reference {path} is a box of {tuple(volume.shape)} at the crops' {pixel_A:.4g} A voxels; "
                     f"the particles' crops are {crop_px} px: re-extract or resize the reference to {crop_px} px")
        volumes[key] = volume
    return volumes.get(0, volumes), "reference " + "; ".join(notes)


def _checked_items(ctx) -> tuple[pd.DataFrame, dict]:
    items = ctx.input_items("subtomograms", enabled_only=True)
    attrs = ctx.input_attrs("subtomograms")
    extraction = attrs.get("extraction", {})
    if int(extraction.get("dimensions", 2)) != 2:
        ctx.fail("auto-refine needs 2-D extractions (per-tilt crops): extract the particles with dimensions = 2")
    missing = [c for c in ("ts_id", "data_path", "data_section", "n_sections", "tilts_used", *POSE_COLUMNS)
               if c not in items.columns]
    if missing:
        ctx.fail(f"the input set 'subtomograms' has no column(s) {', '.join(missing)}")
    if not float(extraction.get("pixel_size_A", 0)) > 0 or int(extraction.get("crop_px", 0)) < 4:
        ctx.fail(f"the input set's attributes lack the extraction's pixel_size_A and crop_px (got {extraction})")
    bad = sorted(set(items["half_set"].tolist()) - {1, 2})
    if bad:
        ctx.fail(f"half_set must be 1 or 2, found {bad}")
    counts = {h: int((items["half_set"] == h).sum()) for h in (1, 2)}
    if min(counts.values()) < 2:
        ctx.fail(f"too few particles for two half sets: {counts[1]} in half 1, {counts[2]} in half 2 (at least 2 "
                 f"in each)")
    return items, attrs


@register
class AutoRefine(Step):
    type_name = "auto_refine"
    version = 2  # RELION origins, auto-sampling, per-half references, alternating local searches
    title = "reliontomo - 3D auto-refine"
    description = ("Gold-standard refinement: two half sets, each searched (global on the asymmetric unit, then "
                   "local with finer steps and a prior on the previous pose) against its own reference, "
                   "reconstructed, FSC-filtered and masked, until the resolution stops improving.")
    params = (
        Param("symmetry", "str", "point group (RELION: C1, Cn, Dn, T, O, I)", default="O"),
        Param("initial_lowpass_A", "float", "low-pass of the initial reference (Å)", default=60.0, min=1e-3),
        Param("mask_diameter_A", "float", "diameter of the soft mask of the particles and references (Å)",
              default=150.0, min=1e-3),
        Param("initial_angular_step_deg", "float", "angular step of the first, global search", default=7.5,
              min=0.1, max=30.0),
        Param("offset_range_px", "float", "offset search range (crop pixels)", default=5.0, min=0.0),
        Param("offset_step_px", "float", "offset step of the first search (crop pixels)", default=1.0, min=1e-3),
        Param("local_searches_from_deg", "float", "global searches while the angular step is coarser, then local "
                                                  "searches around the previous pose (deg); the finest step is at "
                                                  "most this", default=1.8, min=0.05),
        Param("tilt_prior_deg", "float", "width of the Gaussian prior on the previous orientation in local "
                                         "searches (deg)", default=10.0, min=1e-3),
        Param("max_iterations", "int", "stop after this many iterations", default=10, min=1),
        DEVICE_PARAM,
    )
    inputs = (Port("subtomograms", SUBTOMOGRAMS.name, "extracted particles (2-D crops) with half sets"),
              Port("reference", MAPS.name, "the initial reference: its 'full' or 'initial' map"))
    outputs = (Port("maps", MAPS.name, "half maps and the full map"),
               Port("subtomograms", SUBTOMOGRAMS.name, "the particles with their refined poses"))

    def run(self, ctx):
        p = ctx.params
        try:
            symmetry_group(p["symmetry"])
        except TomopipeError as error:
            ctx.fail(str(error))
        items, attrs = _checked_items(ctx)
        pixel_A, crop_px = float(attrs["extraction"]["pixel_size_A"]), int(attrs["extraction"]["crop_px"])
        try:
            mask = spherical_mask(crop_px, pixel_A, p["mask_diameter_A"], MASK_EDGE_PX * pixel_A)
        except TomopipeError as error:
            ctx.fail(str(error))
        reference, note = _reference(ctx, pixel_A, crop_px)
        device = compute_device(p["device"])
        groups = [(str(ts), g.to_dict("records")) for ts, g in items.groupby("ts_id", sort=True)]
        try:
            series = [refine_series(ctx.resolve, rows, attrs, ts, p["mask_diameter_A"] / pixel_A, device)
                      for ts, rows in groups]
        except TomopipeError as error:
            ctx.fail(str(error))
        finest = min(p["local_searches_from_deg"], 0.5 * crowther_angular_step_deg(p["mask_diameter_A"], 2 * pixel_A))
        settings = RefineSettings(p["symmetry"], p["initial_lowpass_A"], p["initial_angular_step_deg"], finest,
                                  p["local_searches_from_deg"], p["offset_range_px"] * pixel_A,
                                  p["offset_step_px"] * pixel_A, p["tilt_prior_deg"], p["max_iterations"])
        log.info("auto-refine: %s", note)
        search_map, loaders = None, None
        if _searches_in_workers(ctx.task_placement):
            halves = [{h: [r for r in rows if int(r["half_set"]) == h] for h in (1, 2)} for _, rows in groups]
            loaders = [{h: HalfLoader.of(ctx.resolve, half[h], attrs, ts, p["mask_diameter_A"] / pixel_A, device)
                        for h in (1, 2)} for (ts, _), half in zip(groups, halves)]

            def search_map(tasks):
                return ctx.map(search_task, tasks, desc="auto-refine search")

            log.info("auto-refine: pose searches on %s, one task per tilt series and half",
                     ctx.executor_description)
        start = time.perf_counter()
        result = auto_refine(series, reference, mask, settings, device, search_map=search_map, loaders=loaders)
        seconds = time.perf_counter() - start
        rows = []
        for name, volume in result.maps.items():
            path = Path(ctx.folder) / MAP_FILES[name]
            write_mrc(path, volume.cpu().numpy(), pixel_A)
            rows.append({"map_name": name, "map_path": ctx.stored_path(path), "voxel_size_A": pixel_A,
                         "box_px": crop_px, "enabled": True})
        refine_attrs = {"iterations": result.iterations, "resolution_A": result.resolution_A,
                        "fsc": {"shell_frequencies_per_A": shell_frequencies_per_A(crop_px, pixel_A).tolist(),
                                "fsc": result.fsc.tolist()},
                        "finest_step_deg": finest, "reference": note, "symmetry": p["symmetry"]}
        ctx.add_output("maps", pd.DataFrame(rows), {"tilt_series": copy.deepcopy(attrs.get("tilt_series", {})),
                                                   "refinement": {k: p[k] for k in p if k != "device"},
                                                   **refine_attrs})
        ctx.add_output("subtomograms", _refined_items(groups, result.series),
                       {**copy.deepcopy(attrs), "refined": {"resolution_A": result.resolution_A,
                                                            "symmetry": p["symmetry"]}})
        log.info("auto-refine: %d iterations, %.2f A in %.1f s", len(result.iterations), result.resolution_A, seconds)
        return {"iterations": len(result.iterations), "resolution_A": result.resolution_A, "seconds": seconds,
                "nyquist_A": 2 * pixel_A}


def _refined_items(groups: list[tuple[str, list[dict]]], series: list[RefineSeries]) -> pd.DataFrame:
    """The input rows with the refined angles and origins (RELION: centre = position − origin; the
    positions stay where the crops were cut; stored paths kept)."""
    out = []
    for (_, rows), s in zip(groups, series):
        rot, tilt, psi = matrix_to_euler_relion(s.rotations)
        for j, row in enumerate(rows):
            row = dict(row, rot_deg=float(rot[j]), tilt_deg=float(tilt[j]), psi_deg=float(psi[j]))
            row.update({name: -float(s.shifts_A[j, k]) for k, name in enumerate(ORIGIN_COLUMNS)})
            out.append(row)
    return pd.DataFrame(out)
