"""Seed step "picking" by template matching (the default picker; the seed's alternatives are
crYOLO, Emantomo/GAPSTOP template matching and DeepFinder).

Per tomogram: the template (a map, an atomic model, or a sphere / hollow shell for a user who
has no map yet) at the tomogram's voxel size, weighted per tilt as pytom-match-pick does (each
tilt's CTF at its defocus, the exposure filter of its pre-exposure, the missing wedge) from the
tilt series and CTF estimates that made the tomogram; a search over a uniform SO(3) grid reduced
by the template's symmetry (step from the Crowther criterion unless given); normalised cross-
correlation under the mask with the random-phase background subtracted; peaks with non-maximum
suppression at the particle diameter, inside the specimen slab and away from the edges, above
the false-alarm threshold of Rickgauer et al. (2017) (and a user cut-off or a number of
particles). Output: a ``particles`` set (coordinates in Å from the tomogram centre, RELION ZYZ
orientations, scores, random half sets) and, per tomogram, the score map (MRC) for the viewers.

Contrast: tomograms reconstructed from raw images show protein darker than the solvent
(``tomogram_contrast = dark``): the template (protein positive) is negated. The CTF of the
weighting is RELION's (positive first peak); with ``phase_flipped`` tomograms its absolute value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.geometry import matrix_to_euler_relion, pixels_to_centred_A
from tomopipe.algorithms.picking.extract import extract_peaks, false_alarm_threshold, specimen_slab_z
from tomopipe.algorithms.picking.match import match_template
from tomopipe.algorithms.picking.template import (
    default_template_box_px,
    shell_template,
    spherical_mask,
    template_from_atomic_model,
    template_from_map,
)
from tomopipe.algorithms.picking.weighting import tilt_weight_rfftn
from tomopipe.algorithms.so3 import crowther_angular_step_deg, so3_grid_asymmetric
from tomopipe.algorithms.symmetry import symmetry_group
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.io.templates import TemplateMap, read_template
from tomopipe.model.particles import particle_set_attrs
from tomopipe.model.sets import CTF, PARTICLES, TILT_SERIES, TOMOGRAMS
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

SHAPES = ("shell", "sphere")


@dataclass(frozen=True)
class TiltWeighting:
    """What the per-tilt weight of one tomogram's template needs (one value per tilt used)."""

    tilt_angles_deg: tuple[float, ...]
    defocus_A: tuple[float, ...]
    pre_exposure_e_per_A2: tuple[float, ...]
    voltage_kV: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    phase_flipped: bool


@dataclass(frozen=True)
class PickTask:
    ts_id: str
    tomogram_path: str
    voxel_size_A: float
    template: np.ndarray  # [b, b, b] at the tomogram's voxel size, protein positive
    mask: np.ndarray  # [b, b, b]
    rotations: np.ndarray  # [n, 3, 3]
    weighting: TiltWeighting | None
    params: dict
    folder: str
    seed: int


@dataclass(frozen=True)
class PickResult:
    ts_id: str
    picks: pd.DataFrame
    score_map_path: str
    summary: dict


def pick_tomogram(task: PickTask) -> PickResult:
    """Template matching and peak extraction on one tomogram."""
    p = task.params
    device = compute_device(p["device"])
    tomogram = torch.from_numpy(np.asarray(read_mrc(task.tomogram_path)[0], dtype=np.float32)).to(device)
    if not bool(torch.isfinite(tomogram).all()) or float(tomogram.std()) == 0.0:
        raise TomopipeError(f"{task.tomogram_path}: the tomogram is empty (constant) or holds non-finite values")
    template = torch.from_numpy(task.template).to(device)
    if p["tomogram_contrast"] == "dark":
        template = -template
    weight = None
    if task.weighting is not None:
        w = task.weighting
        weight = tilt_weight_rfftn(template.shape[0], task.voxel_size_A, w.tilt_angles_deg, w.defocus_A,
                                   w.pre_exposure_e_per_A2, w.voltage_kV, w.spherical_aberration_mm,
                                   w.amplitude_contrast, phase_flipped=w.phase_flipped).to(device)
    generator = torch.Generator(device=device).manual_seed(task.seed)
    result = match_template(tomogram, template, torch.from_numpy(task.mask).to(device),
                            torch.from_numpy(task.rotations).to(device), weight,
                            background_correction=p["background_correction"], batch_size=p["rotation_batch"],
                            generator=generator)
    diameter_px = p["particle_diameter_A"] / task.voxel_size_A
    nz = tomogram.shape[0]
    slab = (specimen_slab_z(tomogram, feature_px=max(2, round(diameter_px / 2))) if p["restrict_to_slab"]
            else (0, nz))
    region = torch.zeros(tomogram.shape, dtype=torch.bool, device=device)
    region[slab[0]:slab[1]] = True
    sigma = float(result.score_std(region))
    far = false_alarm_threshold(sigma, int(region.sum()), result.n_rotations, p["false_alarms"])
    threshold = max(far, p["min_score"])
    # the slab's edges lie near the outermost particle centres: picks may lie a radius beyond them
    margin = math.ceil(diameter_px / 2)
    z_range = (max(0, slab[0] - margin), min(nz, slab[1] + margin))
    peaks = extract_peaks(result.scores, result.rotation_index, min_distance_px=diameter_px, threshold=threshold,
                          max_peaks=p["max_particles"] or None, z_range=z_range,
                          edge_px=round(p["edge_exclusion_A"] / task.voxel_size_A))
    score_map = Path(task.folder) / f"{task.ts_id}_scores.mrc"
    scores = result.scores.cpu()
    write_mrc(score_map, torch.where(torch.isfinite(scores), scores, 0.0).numpy().astype(np.float32),
              task.voxel_size_A)
    positions_xyz = peaks.positions_zyx_px.flip(-1).to(torch.float64).cpu()
    centred = pixels_to_centred_A(positions_xyz, tuple(reversed(tomogram.shape)), task.voxel_size_A)
    rotations = torch.from_numpy(task.rotations)[peaks.rotation_index.cpu()]
    rot, tilt, psi = matrix_to_euler_relion(rotations) if len(rotations) else (torch.zeros(0),) * 3
    picks = pd.DataFrame({"ts_id": task.ts_id, "x_A": centred[:, 0].numpy(), "y_A": centred[:, 1].numpy(),
                          "z_A": centred[:, 2].numpy(), "rot_deg": rot.numpy(), "tilt_deg": tilt.numpy(),
                          "psi_deg": psi.numpy(), "score": peaks.scores.cpu().numpy().astype(np.float64)})
    summary = {"picks": len(picks), "score_sigma": sigma, "false_alarm_threshold": far, "threshold": threshold,
               "slab_z_px": [int(slab[0]), int(slab[1])], "rotations": int(result.n_rotations),
               "median_score": float(picks["score"].median()) if len(picks) else None}
    return PickResult(task.ts_id, picks, str(score_map), summary)


def _tilt_weighting(ctx, ts_id: str, tilts: pd.DataFrame | None, ctf: pd.DataFrame | None,
                    tomogram_attrs: dict) -> TiltWeighting | None:
    """The tilts that made tomogram ``ts_id`` (enabled, not excluded by the reconstruction) with
    their defocus (mean of U and V) and pre-exposure; None when the weighting is off."""
    if tilts is None:
        return None
    acquisition = tomogram_attrs.get("tilt_series", {}).get(ts_id, {})
    reconstruction = tomogram_attrs.get("reconstruction", {})
    mine = tilts[(tilts["ts_id"] == ts_id) & tilts["enabled"].astype(bool)]
    mine = mine[~mine["tilt_index"].isin(reconstruction.get("exclude_tilt_indices") or [])]
    if mine.empty:
        ctx.fail(f"tilt series {ts_id!r}: no enabled tilt in the input 'tilt_series' to weight the template with")
    angle = mine["rot_y_deg"] if "rot_y_deg" in mine else mine["tilt_angle_deg"]
    angles = (angle.to_numpy(np.float64) + float(reconstruction.get("tilt_angle_offset_deg", 0.0)))
    mine_ctf = ctf[ctf["ts_id"] == ts_id].set_index("tilt_index")
    missing = sorted(set(mine["tilt_index"]) - set(mine_ctf.index))
    if missing:
        ctx.fail(f"tilt series {ts_id!r}: tilts {missing} have no CTF estimate in the input 'ctf'")
    rows = mine_ctf.loc[mine["tilt_index"]]
    defocus = 0.5 * (rows["defocus_u_A"].to_numpy(np.float64) + rows["defocus_v_A"].to_numpy(np.float64))
    pre = (mine["pre_exposure_e_per_A2"].to_numpy(np.float64) if "pre_exposure_e_per_A2" in mine
           else np.zeros(len(mine)))
    needed = ("voltage_kV", "spherical_aberration_mm", "amplitude_contrast")
    absent = [name for name in needed if not isinstance(acquisition.get(name), (int, float))]
    if absent:
        ctx.fail(f"tilt series {ts_id!r}: the tomograms' attributes have no {', '.join(absent)} for the CTF weighting")
    if not np.all(np.isfinite(defocus)) or not np.all(np.isfinite(pre)):
        ctx.fail(f"tilt series {ts_id!r}: defocus or pre-exposure missing for some tilts")
    return TiltWeighting(tuple(angles), tuple(defocus), tuple(pre), float(acquisition["voltage_kV"]),
                         float(acquisition["spherical_aberration_mm"]), float(acquisition["amplitude_contrast"]),
                         reconstruction.get("ctf_correction", "none") == "phase_flip")


def _template_and_mask(ctx, voxel_size_A: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The template (protein positive) and its soft spherical mask at ``voxel_size_A``, and whether
    the template has an orientation (False for a sphere or shell: rotation-invariant)."""
    p = ctx.params
    diameter_A = p["particle_diameter_A"]
    mask_diameter_A = p["mask_diameter_A"] or 1.15 * diameter_A
    edge_A = 2.0 * voxel_size_A
    box = p["box_px"] or default_template_box_px(mask_diameter_A, voxel_size_A)
    mask = spherical_mask(box, voxel_size_A, mask_diameter_A, edge_A)
    if p["template"] in SHAPES:
        inner = p["inner_diameter_A"] if p["template"] == "shell" else 0.0
        if p["template"] == "shell" and not 0 < inner < diameter_A:
            ctx.fail(f"template = 'shell' needs 0 < inner_diameter_A < particle_diameter_A, got {inner} and "
                     f"{diameter_A} Å (apoferritin: about 80 and 125 Å)")
        return shell_template(box, voxel_size_A, diameter_A, inner), mask, False
    source = read_template(p["template"], p["template_voxel_size_A"] or None)
    if isinstance(source, TemplateMap):
        return template_from_map(source.volume, source.voxel_size_A, voxel_size_A, box), mask, True
    return template_from_atomic_model(source, voxel_size_A, box), mask, True


@register
class PickTemplateMatching(Step):
    type_name = "pick_template_matching"
    title = "picking - template matching"
    description = ("Template matching on the tomograms (pytom-match-pick's method): per-tilt CTF, dose and "
                   "missing-wedge weighting, a uniform SO(3) search reduced by the symmetry, local normalised "
                   "cross-correlation with the random-phase background removed, peaks above the false-alarm "
                   "threshold inside the specimen slab.")
    params = (
        Param("template", "str", "'shell' or 'sphere' of the particle's diameters, or a map (MRC) or atomic model "
                                 "(PDB/mmCIF) file", default="shell"),
        Param("template_voxel_size_A", "float", "voxel size of a template map when its header has none (0: from "
                                                "the header)", default=0.0, min=0.0),
        Param("particle_diameter_A", "float", "particle diameter: the shape's outer diameter and the distance "
                                              "between picks", required=True, min=1.0),
        Param("inner_diameter_A", "float", "inner diameter of a 'shell' template (apoferritin: ~80 Å)", default=0.0,
              min=0.0),
        Param("mask_diameter_A", "float", "diameter of the soft spherical mask (0: 1.15 × the particle diameter)",
              default=0.0, min=0.0),
        Param("box_px", "int", "template box in tomogram voxels (0: the mask plus a margin)", default=0, min=0),
        Param("symmetry", "str", "point-group symmetry of the template (C1, Cn, Dn, T, O, I): the angular search "
                                 "covers its asymmetric unit", default="C1"),
        Param("angular_step_deg", "float", "angular step of the search (0: Crowther's criterion for the particle "
                                           "diameter at the tomogram's Nyquist resolution)", default=0.0, min=0.0),
        Param("tomogram_contrast", "str", "protein 'dark' (tomograms of raw images) or 'bright' in the tomograms",
              default="dark", choices=("dark", "bright")),
        Param("ctf_weighting", "bool", "weight the template per tilt (CTF, dose, missing wedge); needs the "
                                       "tilt_series and ctf inputs", default=True),
        Param("background_correction", "bool", "subtract the scores of a phase-randomised template", default=True),
        Param("restrict_to_slab", "bool", "pick and compute the score statistics inside the specimen slab only",
              default=True),
        Param("false_alarms", "float", "expected false picks per tomogram at the threshold (Rickgauer et al. "
                                       "2017)", default=1.0, min=1e-6),
        Param("edge_exclusion_A", "float", "no pick closer than this to the tomogram's x, y and z edges (the "
                                           "correlation is computed up to the edges)", default=0.0, min=0.0),
        Param("min_score", "float", "keep picks scoring at least this too (0: the false-alarm threshold only)",
              default=0.0, min=0.0),
        Param("max_particles", "int", "at most this many picks per tomogram, best first (0: no limit)", default=0,
              min=0),
        Param("rotation_batch", "int", "rotations matched at once", default=8, min=1),
        Param("seed", "int", "seed of the random-phase template and of the half sets", default=0),
        DEVICE_PARAM,
    )
    inputs = (Port("tomograms", TOMOGRAMS.name, "tomograms to pick"),
              Port("tilt_series", TILT_SERIES.name, "the aligned tilt series that made them (for the weighting)",
                   optional=True),
              Port("ctf", CTF.name, "their CTF estimates (for the weighting)", optional=True))
    outputs = (Port("particles", PARTICLES.name, "picks: positions, orientations, scores, half sets"),)

    def run(self, ctx):
        p = ctx.params
        try:
            group = symmetry_group(p["symmetry"])
        except TomopipeError as error:
            ctx.fail(str(error))
        tomograms = ctx.input_items("tomograms", enabled_only=True)
        if tomograms.empty:
            ctx.fail("the input set 'tomograms' has no enabled tomogram")
        voxel_sizes = sorted({round(float(v), 4) for v in tomograms["voxel_size_A"]})
        if len(voxel_sizes) > 1:
            ctx.fail(f"the tomograms have several voxel sizes {voxel_sizes} Å: pick each voxel size in its own run")
        voxel_size_A = float(tomograms["voxel_size_A"].iloc[0])
        template, mask, oriented = _template_and_mask(ctx, voxel_size_A)
        if oriented:
            step = p["angular_step_deg"] or crowther_angular_step_deg(p["particle_diameter_A"], 2.0 * voxel_size_A)
            rotations = so3_grid_asymmetric(step, p["symmetry"])
        else:
            step, rotations = 0.0, torch.eye(3, dtype=torch.float64)[None]
        tilts = ctf = None
        if p["ctf_weighting"]:
            absent = [port for port in ("tilt_series", "ctf") if port not in ctx.inputs]
            if absent:
                ctx.fail(f"ctf_weighting needs the input(s) {', '.join(absent)} (or set ctf_weighting = false)")
            tilts, ctf = ctx.input_items("tilt_series"), ctx.input_items("ctf")
        attrs = ctx.input_attrs("tomograms")
        tasks = []
        for index, row in enumerate(tomograms.sort_values("ts_id").to_dict("records")):
            for axis in ("x", "y", "z"):
                if int(row[f"size_{axis}_px"]) < template.shape[0]:
                    ctx.fail(f"tomogram {row['ts_id']!r}: {row[f'size_{axis}_px']} voxels along {axis}, smaller than "
                             f"the template box of {template.shape[0]}")
            tasks.append(PickTask(str(row["ts_id"]), str(ctx.resolve(row["tomogram_path"])), voxel_size_A,
                                  template.numpy(), mask.numpy(), rotations.numpy(),
                                  _tilt_weighting(ctx, row["ts_id"], tilts, ctf, attrs), dict(p), str(ctx.folder),
                                  p["seed"] + index))
        results = ctx.map(pick_tomogram, tasks, desc="template matching")
        empty = [r.ts_id for r in results if r.picks.empty]
        if len(empty) == len(results):
            thresholds = ", ".join(f"{r.ts_id}: {r.summary['threshold']:.4f}" for r in results)
            ctx.fail(f"no pick in any tomogram above the threshold ({thresholds}): lower min_score or raise "
                     f"false_alarms")
        picks = pd.concat([r.picks for r in results], ignore_index=True)
        rng = np.random.default_rng(p["seed"])
        picks["half_set"] = rng.permutation(np.arange(len(picks)) % 2 + 1)
        picks["enabled"] = True
        if not oriented:
            picks[["rot_deg", "tilt_deg", "psi_deg"]] = 0.0
        out_attrs = {**particle_set_attrs(tomograms, attrs),
                     "picking": {"method": "template_matching", "template": p["template"], "symmetry": p["symmetry"],
                                 "orientation_known": oriented, "angular_step_deg": step,
                                 "rotations": int(rotations.shape[0]), "symmetry_order": int(group.shape[0]),
                                 "voxel_size_A": voxel_size_A, "particle_diameter_A": p["particle_diameter_A"],
                                 "score_maps": {r.ts_id: ctx.stored_path(r.score_map_path) for r in results}}}
        ctx.add_output("particles", picks, out_attrs)
        return {"picks": {r.ts_id: r.summary for r in results}, "total_picks": len(picks),
                "rotations": int(rotations.shape[0]), "angular_step_deg": step,
                "empty_tomograms": empty}
