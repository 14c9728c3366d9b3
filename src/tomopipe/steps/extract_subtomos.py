"""Seed step "reliontomo - extract subtomos": RELION 5 pseudo-subtomograms of picked or refined
particles, straight from the aligned tilt series (:mod:`tomopipe.algorithms.subtomo.extract`).

Inputs: ``tilt_series`` with alignment columns (any pixel size: the binning is relative to it),
``ctf`` (defocus per tilt; the defocus hand of each tilt series in its attributes) and the
particles: a ``particles`` set (picks) or a ``subtomograms`` set (a refined set re-extracted at
another binning keeps its poses and half sets; each particle is cut at its centre, the position minus
its RELION origin, and written with none). The tilts used are those enabled in
both the tilt series and the CTF set (excluded views are left out), in ``tilt_index`` order.

Per particle and tilt (RELION 5 ``relion_tomo_subtomo``): a ``box_px`` box at the particle's
projected position (sub-pixel), multiplied by −CTF·dose filter (the tilt's CTF at the particle's
defocus, the defocus hand from the CTF step; ``invert_contrast`` off keeps +CTF), cropped to
``crop_px``. 2-D (``write_2d``, RELION's ``--stack2d``): the crops; 3-D: the pseudo-subtomogram
(Σ CTF·crop inserted in Fourier space in the tomogram's frame, Σ CTF² and multiplicity). Tilts
whose box leaves the image or whose pre-exposure is above ``max_dose_e_per_A2`` are not used;
particles with fewer than ``min_visible_tilts`` used tilts are dropped and counted per tilt
series in the summary. One MRC per tilt series (and one of weights in 3-D), layout in
:mod:`tomopipe.model.subtomograms`; particles are processed in chunks within ``memory_budget_mb``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.subtomo.backproject import centred_rfft2, pseudo_subtomogram
from tomopipe.algorithms.subtomo.extract import (
    TiltGeometry,
    binned_image_shape,
    extract_crops,
    particle_tilt_positions,
)
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.io.mrc import write_mrc
from tomopipe.model.particles import XYZ_A, TomogramFrame, check_particles
from tomopipe.model.sets import ALIGNMENT_REQUIRED_NAMES, CTF, DEFOCUS_NAMES, PARTICLES, SUBTOMOGRAMS, TILT_SERIES
from tomopipe.model.subtomograms import geometry_attrs, geometry_from_attrs, particle_shifts_A, tilts_used_string
from tomopipe.steps._tilt_series import View, acquisition_of, ctf_hand, read_views, tilt_series_items, views_of
from tomopipe.steps.base import DEVICE_PARAM, compute_device, missing_numbers

log = logging.getLogger("tomopipe")

CTF_ACQUISITION = ("pixel_size_A", "voltage_kV", "spherical_aberration_mm", "amplitude_contrast")
CIRCLE_FALLOFF_PX = 5.0  # RELION's cropCircle edge


@dataclass(frozen=True)
class ExtractTask:
    """One tilt series: the views of its geometry's tilts (same order), the geometry as plain
    values (:func:`~tomopipe.model.subtomograms.geometry_attrs`), the particles' positions
    ``[m, 3]`` Å, the step's parameters and the run folder."""

    ts_id: str
    views: tuple[View, ...]
    geometry: dict
    positions_A: np.ndarray
    params: dict
    folder: str


@dataclass(frozen=True)
class ExtractResult:
    """``kept`` ``[m]`` and, for the kept particles in order, ``tilts_used`` ``[k, n]``; the files
    written (``data_path``, and ``weights_path`` in 3-D; none when no particle is kept)."""

    ts_id: str
    kept: np.ndarray
    tilts_used: np.ndarray
    files: dict
    seconds: float


def _visible(geometry: TiltGeometry, positions_A: np.ndarray, p: dict) -> torch.Tensor:
    """``[m, n]``: the tilts each particle uses (box inside the binned image, pre-exposure <= max dose)."""
    where = particle_tilt_positions(geometry, torch.tensor(positions_A), p["box_px"], p["binning"])
    visible = where.visible
    if p["max_dose_e_per_A2"] > 0:
        visible = visible & (geometry.pre_exposure_e_per_A2 <= p["max_dose_e_per_A2"])[None, :]
    return visible


def _chunk_size(n_tilts: int, p: dict) -> int:
    """Particles per chunk: their crops and CTF² (and a 3-D particle's grids) within the memory budget."""
    c = p["crop_px"]
    per_particle = 4 * n_tilts * (c * c + c * (c // 2 + 1))
    return max(1, (int(p["memory_budget_mb"]) << 20) // per_particle)


def extract_tilt_series(task: ExtractTask) -> ExtractResult:
    """Extract the particles of one tilt series and write its MRC file(s) (module docstring)."""
    start = time.perf_counter()
    p, ts_id = task.params, task.ts_id
    device = compute_device(p["device"])
    geometry = geometry_from_attrs({"geometry": {ts_id: task.geometry}}, ts_id).geometry
    visible = _visible(geometry, task.positions_A, p)
    kept = (visible.sum(dim=1) >= p["min_visible_tilts"]).numpy()
    index = np.flatnonzero(kept)
    n, c = geometry.n_tilts, p["crop_px"]
    if index.size == 0:
        return ExtractResult(ts_id, kept, np.zeros((0, n), dtype=bool), {}, time.perf_counter() - start)
    image_size = geometry.image_size_px

    def image(i: int) -> torch.Tensor:
        return torch.from_numpy(read_views(task.views[i:i + 1], "image_path", image_size)[0].astype(np.float32))

    folder = Path(task.folder)
    two_d = p["write_2d"]
    outputs = {"data_path": (folder / f"{ts_id}_{'stack2d' if two_d else 'data'}.mrc",
                             (index.size * (n if two_d else c), c, c))}
    if not two_d:
        outputs["weights_path"] = (folder / f"{ts_id}_weights.mrc", (index.size * 2 * c, c, c // 2 + 1))
    scratch = {name: folder / f".{ts_id}.{name}.extract-scratch.npy" for name in outputs}
    try:
        arrays = {name: np.lib.format.open_memmap(scratch[name], mode="w+", dtype=np.float32, shape=shape)
                  for name, (_, shape) in outputs.items()}
        used = np.zeros((index.size, n), dtype=bool)
        chunk = _chunk_size(n, p)
        for first in range(0, index.size, chunk):
            rows = index[first:first + chunk]
            crops = extract_crops(image, geometry, torch.tensor(task.positions_A[rows]), p["box_px"], c,
                                  binning=p["binning"], max_dose_e_per_A2=p["max_dose_e_per_A2"] or None,
                                  min_visible_tilts=p["min_visible_tilts"], invert_contrast=p["invert_contrast"],
                                  circle_falloff_px=CIRCLE_FALLOFF_PX, device=device)
            used[first:first + rows.size] = crops.visible.numpy()
            if two_d:
                arrays["data_path"][first * n:(first + rows.size) * n] = crops.crops.reshape(-1, c, c).numpy()
            else:
                _write_pseudo_subtomograms(crops.crops, crops.ctf2, crops.visible, geometry.rotations, first,
                                           arrays, device)
        pixel_A = geometry.pixel_size_A * p["binning"]
        files = {}
        for name, (path, _) in outputs.items():
            arrays[name].flush()
            write_mrc(path, arrays[name], pixel_A, stack=two_d)
            files[name] = str(path)
        del arrays
    finally:
        for path in scratch.values():
            if path.exists():
                os.unlink(path)
    log.info("%s: %d of %d particles extracted (%s, crop %d px of %.4g A), %d dropped", ts_id, index.size,
             kept.size, "2-D" if two_d else "3-D", c, geometry.pixel_size_A * p["binning"], kept.size - index.size)
    return ExtractResult(ts_id, kept, used, files, time.perf_counter() - start)


def _write_pseudo_subtomograms(crops: torch.Tensor, ctf2: torch.Tensor, visible: torch.Tensor,
                               rotations: torch.Tensor, first: int, arrays: dict, device) -> None:
    """3-D: each particle's crops of its used tilts inserted at the tilts' rotations (tomogram frame)."""
    c = crops.shape[-1]
    for j in range(crops.shape[0]):
        use = visible[j]
        slices = centred_rfft2(crops[j, use].to(device))
        sub = pseudo_subtomogram(slices, ctf2[j, use].to(device), rotations[use].to(device), device=device)
        k = first + j
        arrays["data_path"][k * c:(k + 1) * c] = sub.data.cpu().numpy()
        arrays["weights_path"][2 * k * c:(2 * k + 1) * c] = sub.weights.cpu().numpy()
        arrays["weights_path"][(2 * k + 1) * c:(2 * k + 2) * c] = sub.multiplicity.cpu().numpy()


def _tilt_geometry(group: pd.DataFrame, acquisition: dict, hand: int) -> TiltGeometry:
    """The geometry of one tilt series' used views (alignment, CTF and dose columns merged)."""
    col = lambda name: torch.tensor(group[name].to_numpy(np.float64))  # noqa: E731
    return TiltGeometry.from_alignment(
        col("rot_z_deg"), col("rot_y_deg"), col("rot_x_deg"), torch.stack([col("shift_x_A"), col("shift_y_A")], 1),
        defocus_u_A=col("defocus_u_A"), defocus_v_A=col("defocus_v_A"), defocus_angle_deg=col("defocus_angle_deg"),
        pre_exposure_e_per_A2=col("pre_exposure_e_per_A2"), defocus_hand=hand,
        pixel_size_A=float(acquisition["pixel_size_A"]), image_size_px=tuple(acquisition["image_size_px"]),
        voltage_kV=float(acquisition["voltage_kV"]),
        spherical_aberration_mm=float(acquisition["spherical_aberration_mm"]),
        amplitude_contrast=float(acquisition["amplitude_contrast"]), phase_shift_deg=col("phase_shift_deg"),
        magnification=col("magnification"))


@register
class ExtractSubtomos(Step):
    type_name = "extract_subtomos"
    version = 2  # re-extraction cuts at the centre: position minus the RELION origin
    title = "reliontomo - extract subtomos"
    description = ("RELION 5 pseudo-subtomograms: per particle, the CTF-premultiplied, dose-weighted crops of its "
                   "tilts (2-D stacks) or their Fourier insertion with the CTF² and multiplicity weights (3-D), "
                   "from the aligned tilt series; re-extraction of a subtomograms set keeps its poses.")
    params = (
        Param("binning", "float", "binning relative to the tilt series (RELION --bin)", default=10.0, min=1.0),
        Param("box_px", "int", "box for the CTF handling, binned pixels (RELION --b)", default=64, min=2),
        Param("crop_px", "int", "cropped box: the output size, binned pixels (RELION --crop)", default=24, min=2),
        Param("max_dose_e_per_A2", "float", "leave out tilts with a larger pre-exposure (0: use all)", default=0.0,
              min=0.0),
        Param("write_2d", "bool", "2-D stacks (RELION --stack2d); no: 3-D pseudo-subtomograms", default=True),
        Param("min_visible_tilts", "int", "drop particles seen by fewer tilts (RELION --min_frames)", default=1,
              min=1),
        Param("invert_contrast", "bool", "particles white on black (RELION's default; no: --no_ic)", default=True),
        Param("particle_diameter_A", "float", "particle diameter for the size checks (0: from the particles' "
                                              "attributes, when known)", default=0.0, min=0.0),
        Param("memory_budget_mb", "int", "working memory of the crops of one chunk of particles", default=256,
              min=16),
        DEVICE_PARAM,
    )
    inputs = (Port("tilt_series", TILT_SERIES.name, "aligned tilt series (alignment columns)"),
              Port("ctf", CTF.name, "CTF estimates with the excluded views and the defocus hand"),
              Port("particles", PARTICLES.name, "picks (or give 'subtomograms')", optional=True),
              Port("subtomograms", SUBTOMOGRAMS.name, "extracted particles to re-extract with their poses",
                   optional=True))
    outputs = (Port("subtomograms", SUBTOMOGRAMS.name, "pseudo-subtomograms, one item per kept particle"),)

    def run(self, ctx):
        p = ctx.params
        port = self._particle_port(ctx)
        particles = ctx.input_items(port, enabled_only=True)
        if particles.empty:
            ctx.fail(f"the input set {port!r} has no enabled particle")
        shifts_A = particle_shifts_A(particles)  # RELION origins: the crops are cut at the centres
        particles = particles[[c.name for c in PARTICLES.columns]].reset_index(drop=True)
        particle_attrs = ctx.input_attrs(port)
        self._check_sizes(ctx, particle_attrs)
        views = self._views(ctx)
        unknown = sorted(set(particles["ts_id"]) - set(views["ts_id"]))
        if unknown:
            ctx.fail(f"particles of tilt series {', '.join(map(repr, unknown))} but the input 'tilt_series' has no "
                     f"enabled view of it (tilt series: {', '.join(sorted(views['ts_id'].unique())) or 'none'})")
        if particle_attrs.get("tomograms") and port == "particles":  # refined centres may sit past an edge
            frames = {ts_id: TomogramFrame(ts_id, tuple(f["size_xyz_px"]), float(f["voxel_size_A"]))
                      for ts_id, f in particle_attrs["tomograms"].items()}
            check_particles(particles, frames, f"input {port!r}")
        particles[list(XYZ_A)] = particles[list(XYZ_A)].to_numpy(np.float64) + shifts_A
        pixels = {round(float(a["pixel_size_A"]), 6) for ts_id, a in ctx.input_attrs("tilt_series").get(
            "tilt_series", {}).items() if ts_id in set(particles["ts_id"]) and "pixel_size_A" in a}
        if len(pixels) > 1:
            ctx.fail(f"the particles' tilt series have several pixel sizes {sorted(pixels)} Å: extract each in its "
                     f"own run")
        tasks, geometries = [], {}
        for ts_id, group in particles.groupby("ts_id", sort=True):
            mine = views[views["ts_id"] == ts_id]
            geometry = self._geometry(ctx, ts_id, mine)
            geometries[ts_id] = geometry_attrs(geometry, mine["tilt_index"].tolist())
            tasks.append(ExtractTask(str(ts_id), views_of(ctx, mine), geometries[ts_id],
                                     group[list(XYZ_A)].to_numpy(np.float64), dict(p), str(ctx.folder)))
        results = ctx.map(extract_tilt_series, tasks, desc="extract subtomos")
        items = self._items(ctx, particles, results)
        attrs = {key: value for key, value in particle_attrs.items()
                 if key not in ("extraction", "geometry", "refined")}
        attrs.update({"tilt_series": ctx.input_attrs("tilt_series").get("tilt_series", {}),
                      "extraction": self._extraction_attrs(ctx, particle_attrs, tasks),
                      "geometry": geometries})
        ctx.add_output("subtomograms", items, attrs)
        counts = {r.ts_id: {"particles": int(r.kept.size), "kept": int(r.kept.sum()),
                            "dropped": int((~r.kept).sum()), "seconds": round(r.seconds, 3)} for r in results}
        return {"particles": counts, "kept": len(items), "dropped": sum(c["dropped"] for c in counts.values()),
                "dimensions": 2 if p["write_2d"] else 3, "pixel_size_A": attrs["extraction"]["pixel_size_A"]}

    @staticmethod
    def _particle_port(ctx) -> str:
        given = [name for name in ("particles", "subtomograms") if name in ctx.inputs]
        if len(given) != 1:
            ctx.fail(f"give the particles either as 'particles' (picks) or as 'subtomograms' (to re-extract), "
                     f"exactly one; got {', '.join(given) or 'none'}")
        return given[0]

    @staticmethod
    def _check_sizes(ctx, particle_attrs: dict) -> None:
        """Box, crop and the particle diameter (param, else the particles' attributes when known)."""
        p = ctx.params
        if p["box_px"] < p["crop_px"]:
            ctx.fail(f"box_px ({p['box_px']}) is smaller than crop_px ({p['crop_px']}): the box handles the CTF, "
                     f"the crop is cut from it")
        if not p["write_2d"] and (p["crop_px"] % 2 or p["crop_px"] < 4):
            ctx.fail(f"3-D pseudo-subtomograms need an even crop_px >= 4, got {p['crop_px']}")
        diameter_A = p["particle_diameter_A"] or _known_diameter_A(particle_attrs)
        if not diameter_A:
            return
        acquisitions = ctx.input_attrs("tilt_series").get("tilt_series", {})
        pixels = {float(a["pixel_size_A"]) * p["binning"] for a in acquisitions.values() if "pixel_size_A" in a}
        for pixel_A in sorted(pixels):
            for name in ("box_px", "crop_px"):
                if p[name] * pixel_A < diameter_A:
                    ctx.fail(f"{name} = {p[name]} px of {pixel_A:.4g} Å (binning {p['binning']:g}) is "
                             f"{p[name] * pixel_A:.1f} Å, smaller than the particle diameter {diameter_A:g} Å: "
                             f"use a larger {name} or less binning")

    @staticmethod
    def _views(ctx) -> pd.DataFrame:
        """The used views: enabled in the tilt series and the CTF set, with alignment and CTF columns."""
        items = tilt_series_items(ctx, "tilt_series")
        missing = [c for c in ALIGNMENT_REQUIRED_NAMES if c not in items.columns]
        if missing:
            ctx.fail(f"the input set 'tilt_series' has no column(s) {', '.join(missing)}: the tilt series are not "
                     f"aligned (run align_tilt_series, or assign_alignment from an aligned set, first)")
        if "pre_exposure_e_per_A2" not in items.columns:
            ctx.fail("the input set 'tilt_series' has no pre_exposure_e_per_A2 column (needed for dose weighting)")
        items = items.assign(rot_x_deg=items.get("rot_x_deg", pd.Series(0.0, index=items.index)).fillna(0.0),
                             magnification=items.get("magnification", pd.Series(1.0, index=items.index)).fillna(1.0))
        ctf = ctx.input_items("ctf", enabled_only=True)
        absent = [c for c in ("ts_id", "tilt_index", *DEFOCUS_NAMES) if c not in ctf.columns]
        if absent:
            ctx.fail(f"the input set 'ctf' has no column(s) {', '.join(absent)}")
        ctf = ctf[["ts_id", "tilt_index", *DEFOCUS_NAMES, *(["phase_shift_deg"] if "phase_shift_deg" in ctf else [])]]
        items = items[items["enabled"].astype(bool)].drop(
            columns=[c for c in ctf.columns if c not in ("ts_id", "tilt_index") and c in items.columns])
        merged = items.merge(ctf, on=["ts_id", "tilt_index"], how="inner", validate="one_to_one")
        merged["phase_shift_deg"] = merged.get("phase_shift_deg", pd.Series(0.0, index=merged.index)).fillna(0.0)
        return merged.sort_values(["ts_id", "tilt_index"], kind="stable").reset_index(drop=True)

    @staticmethod
    def _geometry(ctx, ts_id: str, group: pd.DataFrame) -> TiltGeometry:
        p = ctx.params
        acquisition = acquisition_of(ctx, "tilt_series", ts_id)
        missing = missing_numbers(acquisition, CTF_ACQUISITION)
        if missing or "image_size_px" not in acquisition:
            ctx.fail(f"tilt series {ts_id!r}: the acquisition in the attributes of the input set 'tilt_series' has "
                     f"no {', '.join(missing + ([] if 'image_size_px' in acquisition else ['image_size_px']))}")
        columns = [*ALIGNMENT_REQUIRED_NAMES, *DEFOCUS_NAMES, "pre_exposure_e_per_A2"]
        bad = group[columns].isna().any(axis=1)
        if bad.any():
            ctx.fail(f"tilt series {ts_id!r}: used views without alignment, CTF or pre-exposure (tilt_index "
                     f"{group.loc[bad, 'tilt_index'].tolist()}); disable them or run those steps again")
        geometry = _tilt_geometry(group, acquisition, ctf_hand(ctx, ts_id))
        ny, nx = binned_image_shape(geometry, p["binning"])
        if p["box_px"] > min(nx, ny):
            ctx.fail(f"tilt series {ts_id!r}: a box of {p['box_px']} px does not fit in its images binned by "
                     f"{p['binning']:g} ({nx} x {ny} px): use a smaller box or less binning")
        return geometry

    @staticmethod
    def _items(ctx, particles: pd.DataFrame, results: list[ExtractResult]) -> pd.DataFrame:
        p = ctx.params
        tables = []
        for result in results:
            rows = particles[particles["ts_id"] == result.ts_id].reset_index(drop=True)[result.kept]
            if rows.empty:
                continue
            n, c = result.tilts_used.shape[1], p["crop_px"]
            per = n if p["write_2d"] else c
            rows = rows.assign(data_path=ctx.stored_path(result.files["data_path"]),
                               data_section=np.arange(len(rows), dtype=np.int64) * per, n_sections=per,
                               tilts_used=[tilts_used_string(u) for u in result.tilts_used])
            if not p["write_2d"]:
                rows["weights_path"] = ctx.stored_path(result.files["weights_path"])
            tables.append(rows)
        if not tables:
            total = sum(r.kept.size for r in results)
            ctx.fail(f"no particle kept: all {total} particles are seen by fewer than min_visible_tilts = "
                     f"{p['min_visible_tilts']} tilts (the {p['box_px']} px box leaves every image, or the dose "
                     f"limit leaves no tilt): check the particles' tilt series and coordinates")
        return pd.concat(tables, ignore_index=True)

    @staticmethod
    def _extraction_attrs(ctx, particle_attrs: dict, tasks: list[ExtractTask]) -> dict:
        p = ctx.params
        pixels = sorted({t.geometry["pixel_size_A"] for t in tasks})
        return {"dimensions": 2 if p["write_2d"] else 3, "pixel_size_A": pixels[0] * p["binning"],
                "tilt_series_pixel_size_A": pixels[0], "binning": p["binning"], "box_px": p["box_px"],
                "crop_px": p["crop_px"], "max_dose_e_per_A2": p["max_dose_e_per_A2"],
                "min_visible_tilts": p["min_visible_tilts"], "invert_contrast": p["invert_contrast"],
                "apply_ctf": True, "dose_weighted": True, "circle_falloff_px": CIRCLE_FALLOFF_PX,
                "particle_diameter_A": p["particle_diameter_A"] or _known_diameter_A(particle_attrs)}


def _known_diameter_A(attrs: dict) -> float:
    """The particle diameter a particles or subtomograms set's attributes give (0: unknown)."""
    for key in ("extraction", "picking"):
        value = (attrs.get(key) or {}).get("particle_diameter_A")
        if value and math.isfinite(float(value)):
            return float(value)
    return 0.0

