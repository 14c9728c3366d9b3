"""Seed step "reliontomo - reconstruct particle": the half maps and the full map of the extracted
particles with their poses (RELION 5 ``relion_tomo_reconstruct_particle``).

Input: a ``subtomograms`` set of 2-D extractions (:data:`tomopipe.model.sets.SUBTOMOGRAMS`, layout in
:mod:`tomopipe.model.subtomograms`): per particle, the crops of its tilts, CTF-premultiplied and
dose-weighted (−CTF·D·image with RELION's contrast inversion), and its pose. Each crop is zero-padded
to the padded box before its FFT (the exact path of :mod:`tomopipe.algorithms.subtomo.backproject`;
``exact_insertion = no``: the box-size spectrum, as RELION does) and inserted with the rotation
``R_tilt · A`` (reference -> tilt image: the particle is the reference rotated by
``A = euler_relion_to_matrix(rot, tilt, psi)``, the tilt projects it by ``R_tilt``), with the weight
``(CTF·D)²`` of that tilt at the particle's defocus computed on the same grid. One accumulator per
half set (``half_set`` 1 or 2, gold standard), filled per tilt series on ``ctx.map``, then summed,
symmetrised and reconstructed: ``Σ CTF·F / (Σ CTF² + 1/SSNR)``. With ``regularisation = "fsc"``
(RELION) a first pass with the Wiener constant ``1 / wiener_snr`` gives the half-map FSC, whose SSNR
(``FSC / (1 − FSC)`` per half, twice that for the full map) regularises the maps written.

Output: ``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc`` and ``run_class001.mrc``
(voxel size of the crops, centre voxel ``box // 2``) and a ``maps`` set (half1, half2, full) whose
attributes hold the FSC between the halves and the resolution at FSC 0.143 (and, with
``particle_diameter_A``, the FSC inside a soft sphere of that diameter: not corrected for the mask,
which the postprocess step does), the symmetry and the particles per half.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from tomopipe.algorithms.fourier import crop_centered, embed_centered
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_frequencies_per_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.algorithms.subtomo.backproject import FourierAccumulator, centred_rfft2, projected_shifts_px, shift_phases
from tomopipe.algorithms.subtomo.extract import TiltCtfWeights, TiltGeometry, particle_tilt_positions
from tomopipe.algorithms.subtomo.half_maps import reconstruct_maps, sum_accumulators
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import write_mrc
from tomopipe.io.subtomograms import read_crops, tilt_sections
from tomopipe.model.sets import MAPS, SUBTOMOGRAMS
from tomopipe.model.subtomograms import geometry_from_attrs, particle_shifts_A
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

MAP_FILES = {"half1": "run_half1_class001_unfil.mrc", "half2": "run_half2_class001_unfil.mrc",
             "full": "run_class001.mrc"}
POSE_COLUMNS = ("x_A", "y_A", "z_A", "rot_deg", "tilt_deg", "psi_deg", "half_set")
FSC_THRESHOLD = 0.143
MASK_EDGE_PX = 3.0  # soft edge of the FSC mask, voxels


@dataclass(frozen=True)
class InsertTask:
    """The particles of one tilt series to insert: ``particles`` rows (absolute ``data_path``,
    ``data_section``, ``n_sections``, ``tilts_used`` and the pose columns), ``geometry`` the
    :class:`TiltGeometry` the crops were cut with, ``binning`` and ``apply_ctf`` of the extraction."""

    ts_id: str
    geometry: TiltGeometry
    particles: list[dict]
    binning: float
    apply_ctf: bool
    box_px: int
    pad_factor: int
    exact_insertion: bool
    device: str
    batch_slices: int = 256


def _fit_box(crops: torch.Tensor, box_px: int) -> torch.Tensor:
    """Crops cut or zero-padded about their centre ``c//2`` to ``box_px``."""
    c = crops.shape[-1]
    shape = (*crops.shape[:-2], box_px, box_px)
    return crop_centered(crops, shape) if box_px <= c else embed_centered(crops, shape)


def insert_tilt_series(task: InsertTask) -> dict:
    """Fill one accumulator per half set with the particles of a tilt series (module docstring);
    returns ``{"ts_id", "accumulators": {1: ..., 2: ...}, "slices": {1: n, 2: n}}``."""
    device = compute_device(task.device)
    g = task.geometry
    rows = task.particles
    shifts_A = torch.from_numpy(particle_shifts_A(rows))  # crop position -> particle centre
    positions = torch.tensor([[r["x_A"], r["y_A"], r["z_A"]] for r in rows], dtype=torch.float64) + shifts_A
    poses = euler_relion_to_matrix(*(torch.tensor([r[c] for r in rows], dtype=torch.float64)
                                     for c in ("rot_deg", "tilt_deg", "psi_deg")))
    defocus = particle_tilt_positions(g, positions, 2, task.binning).defocus_A  # [m, n, 3]; box unused
    shifted = bool(shifts_A.abs().max() > 0) if len(rows) else False
    shifts_px = projected_shifts_px(g.rotations, g.magnification, shifts_A, g.pixel_size_A * task.binning)
    accumulators = {half: FourierAccumulator(task.box_px, task.pad_factor, device=device) for half in (1, 2)}
    size = accumulators[1].p if task.exact_insertion else task.box_px  # the grid of the inserted spectra
    weights = TiltCtfWeights(g, g.pixel_size_A * task.binning, size, task.apply_ctf, device)
    slices = {1: 0, 2: 0}
    pending = {1: [], 2: []}
    cache: dict = {}

    def flush(half: int) -> None:
        if not pending[half]:
            return
        crops, tilts, which = (torch.cat([p[j] for p in pending[half]]) for j in range(3))
        acc = accumulators[half]
        spectra = centred_rfft2(_fit_box(crops, task.box_px).to(device), size)
        if shifted:
            spectra = spectra * shift_phases(shifts_px[which, tilts].to(device), size)
        acc.insert(spectra, (g.rotations[tilts] @ poses[which]).float(), weights(tilts, defocus[which, tilts, 0]))
        slices[half] += int(tilts.numel())
        pending[half] = []

    for index, row in enumerate(rows):
        half = int(row["half_set"])
        tilts, sections = tilt_sections(row, g.n_tilts)
        if tilts.size == 0:
            continue
        t = torch.from_numpy(tilts)
        pending[half].append((read_crops(row, sections, cache), t, torch.full_like(t, index)))
        if sum(p[1].numel() for p in pending[half]) >= task.batch_slices:
            flush(half)
    for half in (1, 2):
        flush(half)
    # results travel between processes on the CPU
    return {"ts_id": task.ts_id, "slices": slices,
            "accumulators": {h: acc if acc.device.type == "cpu" else sum_accumulators([acc], "cpu")
                             for h, acc in accumulators.items()}}


@register
class ReconstructParticle(Step):
    type_name = "reconstruct_particle"
    version = 2  # the crops moved by their RELION origins
    title = "reliontomo - reconstruct particle"
    description = ("Fourier insertion of every tilt crop of every particle with its pose (particle pose, then the "
                   "tilt's projection) into one reconstruction per half set, symmetrised, divided by the CTF² "
                   "weights regularised by the SSNR from the half-map FSC; half maps, full map and their FSC.")
    params = (
        Param("symmetry", "str", "point group (RELION: C1, Cn, Dn, T, O, I)", default="C1"),
        Param("box_px", "int", "box of the maps (0: the extraction's crop size); crops are cut or zero-padded "
                               "about their centre", default=0, min=0),
        Param("particle_diameter_A", "float", "diameter of the soft spherical mask for the half-map FSC "
                                              "(0: no mask)", default=0.0, min=0),
        Param("regularisation", "str", "fsc: 1/SSNR from the half-map FSC (RELION); wiener: the constant "
                                       "1/wiener_snr only", default="fsc", choices=("fsc", "wiener")),
        Param("wiener_snr", "float", "SNR of the Wiener constant 1/SNR added to the CTF² weights (the first "
                                     "pass of 'fsc', every pass of 'wiener')", default=1.0, min=1e-9),
        Param("pad_factor", "int", "oversampling of the Fourier grid", default=2, min=1, max=4),
        Param("exact_insertion", "bool", "zero-pad each crop to the padded grid before its FFT (exact); no: "
                                         "insert the box-size spectra as RELION does (pad_factor² times less work, "
                                         "less exact at high resolution)", default=True),
        DEVICE_PARAM,
    )
    inputs = (Port("subtomograms", SUBTOMOGRAMS.name, "extracted particles (2-D crops) with their poses"),)
    outputs = (Port("maps", MAPS.name, "half maps and the full map"),)

    def run(self, ctx):
        p = ctx.params
        try:
            point_group = symmetry_group(p["symmetry"])
        except TomopipeError as error:
            ctx.fail(str(error))
        items = ctx.input_items("subtomograms", enabled_only=True)
        if items.empty:
            ctx.fail("the input set 'subtomograms' has no enabled particles")
        attrs = ctx.input_attrs("subtomograms")
        extraction = attrs.get("extraction", {})
        if int(extraction.get("dimensions", 2)) != 2:
            ctx.fail("only 2-D extractions (per-tilt crops) can be reconstructed; the input set holds 3-D "
                     "pseudo-subtomograms: extract the particles with dimensions = 2")
        missing = [c for c in ("ts_id", "data_path", "data_section", "n_sections", "tilts_used", *POSE_COLUMNS)
                   if c not in items.columns]
        if missing:
            ctx.fail(f"the input set 'subtomograms' has no column(s) {', '.join(missing)}")
        pixel_A, crop_px = float(extraction.get("pixel_size_A", 0)), int(extraction.get("crop_px", 0))
        if not pixel_A > 0 or crop_px < 2:
            ctx.fail(f"the input set's attributes lack the extraction's pixel_size_A and crop_px (got {extraction})")
        box_px = p["box_px"] or crop_px
        if box_px % 2 or box_px < 4:
            ctx.fail(f"box_px must be even and >= 4, got {box_px}")
        mask = None
        if p["particle_diameter_A"] > 0:
            try:
                mask = spherical_mask(box_px, pixel_A, p["particle_diameter_A"], MASK_EDGE_PX * pixel_A)
            except TomopipeError as error:
                ctx.fail(str(error))
        bad = sorted(set(items["half_set"].tolist()) - {1, 2})
        if bad:
            ctx.fail(f"half_set must be 1 or 2, found {bad}")
        counts = {h: int((items["half_set"] == h).sum()) for h in (1, 2)}
        if min(counts.values()) < 2:
            ctx.fail(f"too few particles for two half sets: {counts[1]} in half 1, {counts[2]} in half 2 (at least "
                     f"2 in each)")
        tasks = []
        for ts_id, group in items.groupby("ts_id", sort=True):
            try:
                geometry = geometry_from_attrs(attrs, str(ts_id)).geometry
            except TomopipeError as error:
                ctx.fail(str(error))
            rows = group.to_dict("records")
            for row in rows:
                row["data_path"] = str(ctx.resolve(row["data_path"]))
            tasks.append(InsertTask(str(ts_id), geometry, rows, float(extraction.get("binning", 1.0)),
                                    bool(extraction.get("apply_ctf", True)), box_px,
                                    p["pad_factor"], p["exact_insertion"], p["device"]))
        start = time.perf_counter()
        results = ctx.map(insert_tilt_series, tasks, desc="reconstruct particle")
        insert_s = time.perf_counter() - start
        device = compute_device(p["device"])
        halves = {h: sum_accumulators((r["accumulators"][h] for r in results), device) for h in (1, 2)}
        for acc in halves.values():
            if point_group.shape[0] > 1:  # C1 leaves the grids as they are
                acc.symmetrise(point_group)
        maps, curve = reconstruct_maps(halves, p["regularisation"], p["wiener_snr"])
        resolution_A = fsc_resolution_A(curve, pixel_A, FSC_THRESHOLD, box_px)
        curves = {"shell_frequencies_per_A": shell_frequencies_per_A(box_px, pixel_A).tolist(), "fsc": curve.tolist()}
        if mask is not None:
            masked = fsc(maps["half1"].double(), maps["half2"].double(), mask)
            curves["fsc_masked"] = masked.tolist()
            curves["resolution_masked_A"] = fsc_resolution_A(masked, pixel_A, FSC_THRESHOLD, box_px)
        rows = []
        for name, volume in maps.items():
            path = Path(ctx.folder) / MAP_FILES[name]
            write_mrc(path, volume.cpu().numpy(), pixel_A)
            rows.append({"map_name": name, "map_path": ctx.stored_path(path), "voxel_size_A": pixel_A,
                         "box_px": box_px, "enabled": True})
        out_attrs = {"tilt_series": copy.deepcopy(attrs.get("tilt_series", {})),
                     "reconstruction": {name: p[name] for name in p if name != "device"},
                     "fsc": curves,
                     "resolution_A": resolution_A, "symmetry": p["symmetry"],
                     "particles_per_half": {"1": counts[1], "2": counts[2]}}
        ctx.add_output("maps", pd.DataFrame(rows), out_attrs)
        slices = {h: sum(r["slices"][h] for r in results) for h in (1, 2)}
        log.info("reconstruct particle: %d + %d particles (%d + %d tilt images), %.2f A at FSC 0.143",
                 counts[1], counts[2], slices[1], slices[2], resolution_A)
        return {"particles_per_half": [counts[1], counts[2]], "tilt_images_per_half": [slices[1], slices[2]],
                "resolution_A": resolution_A, "box_px": box_px, "voxel_size_A": pixel_A, "insert_s": insert_s}
