"""Pick particles with a small 3-D network trained on this data set's own picks (template
matching or hand picks), in the spirit of DeepFinder and the CZII cryo-ET challenge solutions
(:mod:`tomopipe.algorithms.picking.network`, :mod:`tomopipe.algorithms.picking.train`).

The tomograms are binned so that a particle is about 8 voxels across (or by ``binning``) and
normalised one by one; the network learns a heatmap of the picks' centres on the tomograms that
have picks, holding out the last fifth of each along y to keep the best weights; it then
predicts every tomogram by overlapping tiles, and the picks are the heatmap's peaks above
``threshold``, at least a particle diameter apart. Coordinates ``x_A, y_A, z_A`` are in Å from
the tomogram centre (voxel ``n // 2``, RELION 5); orientations are unknown (0, and the set
attribute ``picking.orientation_known`` is False, as template matching writes it); ``score`` is
the network's probability; ``half_set`` alternates 1/2 over a seeded random order. The trained
weights are saved as ``picker.pt`` in the run folder, the training log goes to the run summary.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.picking.network import (
    bin_volume,
    heatmap_peaks,
    normalise_volume,
    parameter_count,
    predict_heatmap,
)
from tomopipe.algorithms.picking.train import TrainingConfig, train_picker
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError
from tomopipe.io.mrc import read_mrc
from tomopipe.model.particles import (
    XYZ_A,
    TomogramFrame,
    check_particles,
    particle_set_attrs,
    particles_table,
    tomogram_frames,
)
from tomopipe.model.sets import PARTICLES, TOMOGRAMS
from tomopipe.steps.base import DEVICE_PARAM, compute_device

log = logging.getLogger("tomopipe")

TARGET_DIAMETER_PX = 8.0  # automatic binning brings the particle diameter near this many voxels


def auto_binning(particle_diameter_A: float, voxel_size_A: float) -> int:
    """The binning factor that makes the particle about ``TARGET_DIAMETER_PX`` voxels across (>= 1)."""
    return max(1, round(particle_diameter_A / voxel_size_A / TARGET_DIAMETER_PX))


def read_tomogram(path, frame: TomogramFrame) -> torch.Tensor:
    """A tomogram ``[z, y, x]`` float32, checked against the size and voxel size of its set item."""
    volume, file_voxel_A = read_mrc(path)
    if volume.shape != frame.size_xyz_px[::-1]:
        raise InputFileError(path, f"shape (z, y, x) {volume.shape}, the tomograms set says {frame.size_xyz_px[::-1]}")
    if abs(file_voxel_A - frame.voxel_size_A) > 1e-3 * frame.voxel_size_A:
        raise InputFileError(path, f"voxel size {file_voxel_A:g} Å in the header, {frame.voxel_size_A:g} Å in the "
                                   f"tomograms set")
    volume = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    if not bool(torch.isfinite(volume).all()) or float(volume.std()) == 0.0:
        raise InputFileError(path, "the tomogram is empty (constant) or has NaN/infinite values: nothing to pick")
    return volume


def binned_zyx_px(frame: TomogramFrame, xyz_A: np.ndarray, binning: int) -> torch.Tensor:
    """Å from the tomogram centre ``(x, y, z)`` -> voxel indices ``[z, y, x]`` of the volume binned
    by ``binning`` (binned voxel ``i`` is centred on voxel ``i·binning + (binning − 1)/2``)."""
    return torch.from_numpy(((frame.to_voxels(xyz_A) - (binning - 1) / 2) / binning)[:, ::-1].copy())


def centred_A(frame: TomogramFrame, binned_zyx: np.ndarray, binning: int) -> np.ndarray:
    """Inverse of :func:`binned_zyx_px`."""
    return frame.to_centred_A(binned_zyx[:, ::-1] * binning + (binning - 1) / 2)


@register
class PickNetwork(Step):
    type_name = "pick_network"
    title = "pick particles with a network trained on the data set"
    description = ("Train a small 3-D U-Net (< 1 M parameters) on the given picks (template matching or by hand) "
                   "and pick every tomogram with it: heatmap by overlapping tiles, peaks a particle diameter apart.")
    params = (
        Param("particle_diameter_A", "float", "particle diameter", required=True, min=1),
        Param("training_time_s", "float", "training time budget (seconds)", default=300.0, min=1),
        Param("max_training_steps", "int", "stop training after this many steps (empty: the time budget "
                                           "alone; a step limit makes training reproducible)", min=1),
        Param("binning", "int", "binning of the tomograms for the network (0: the particle ~8 voxels across)",
              default=0, min=0),
        Param("patch_px", "int", "edge of training patches and prediction tiles (binned voxels)", default=48,
              min=8),
        Param("threshold", "float", "keep peaks of the network's probability above this", default=0.5, min=0,
              max=1),
        Param("min_picks", "int", "fail when a tomogram has fewer picks than this", default=1, min=0),
        Param("max_picks", "int", "at most this many picks per tomogram, best first (empty: no limit)", min=1),
        Param("seed", "int", "seed of the network's initial weights, the patch draws and the half sets",
              default=0),
        DEVICE_PARAM,
    )
    inputs = (Port("tomograms", TOMOGRAMS.name, "the tomograms to pick"),
              Port("particles", PARTICLES.name, "training picks (e.g. template matching or by hand)"))
    outputs = (Port("particles", PARTICLES.name, "the network's picks, orientations unknown"),)

    def run(self, ctx):
        p = ctx.params
        tomograms = ctx.input_items("tomograms", enabled_only=True)
        picks = ctx.input_items("particles", enabled_only=True)
        if tomograms.empty:
            ctx.fail("the input set 'tomograms' has no enabled items")
        if picks.empty:
            ctx.fail("the input set 'particles' has no enabled picks to train on")
        frames = tomogram_frames(tomograms)
        check_particles(picks, frames, "the training picks (input 'particles')")
        voxel_sizes = sorted({round(f.voxel_size_A, 6) for f in frames.values()})
        if len(voxel_sizes) != 1:
            ctx.fail(f"the tomograms have different voxel sizes ({voxel_sizes} Å): reconstruct them alike first")
        binning = p["binning"] or auto_binning(p["particle_diameter_A"], voxel_sizes[0])
        diameter_px = p["particle_diameter_A"] / (voxel_sizes[0] * binning)
        volumes = {row.ts_id: normalise_volume(bin_volume(read_tomogram(ctx.resolve(row.tomogram_path),
                                                                        frames[row.ts_id]), binning))
                   for row in tomograms.itertuples(index=False)}
        training = sorted(set(picks["ts_id"]))
        centres = [binned_zyx_px(frames[ts], picks.loc[picks["ts_id"] == ts, list(XYZ_A)].to_numpy(float), binning)
                   for ts in training]
        config = TrainingConfig(patch_px=p["patch_px"], time_s=p["training_time_s"],
                                max_steps=p["max_training_steps"], seed=p["seed"], threshold=p["threshold"])
        started = time.monotonic()
        try:
            model, training_log = train_picker([volumes[ts] for ts in training], centres, diameter_px, config,
                                               compute_device(p["device"]))
        except ValueError as error:
            ctx.fail(str(error))
        training_s = time.monotonic() - started
        weights_path = ctx.folder / "picker.pt"
        torch.save({"state_dict": model.state_dict(), "network": asdict(config.network), "binning": binning,
                    "voxel_size_A": voxel_sizes[0], "particle_diameter_A": p["particle_diameter_A"]}, weights_path)
        tables = []
        for ts_id, volume in volumes.items():
            heatmap = predict_heatmap(model, volume, p["patch_px"]).cpu()
            peaks, scores = heatmap_peaks(heatmap, diameter_px, p["threshold"], p["max_picks"])
            if len(peaks) < p["min_picks"]:
                ctx.fail(f"tomogram {ts_id}: {len(peaks)} pick(s) above threshold {p['threshold']} (the network's "
                         f"highest probability is {float(heatmap.max()):.3f}), fewer than min_picks = "
                         f"{p['min_picks']}: lower the threshold or train longer")
            tables.append(particles_table(ts_id, centred_A(frames[ts_id], peaks.numpy(), binning),
                                          np.zeros((len(peaks), 3)), scores.numpy()))
            log.info("%s: %d picks", ts_id, len(peaks))
        out = pd.concat(tables, ignore_index=True)
        out["half_set"] = np.random.default_rng(p["seed"]).permutation(np.arange(len(out)) % 2 + 1)
        attrs = {**particle_set_attrs(tomograms, copy.deepcopy(ctx.input_attrs("tomograms"))),
                 "picking": {"method": "pick_network", "orientation_known": False, "binning": binning,
                             "voxel_size_A": voxel_sizes[0], "particle_diameter_A": p["particle_diameter_A"],
                             "weights": ctx.stored_path(weights_path)}}
        ctx.add_output("particles", out, attrs)
        return {"picks": {ts: int((out["ts_id"] == ts).sum()) for ts in volumes}, "binning": binning,
                "parameters": parameter_count(model), "training_seconds": round(training_s, 1),
                "training_tomograms": training, "training_log": training_log,
                "weights": ctx.stored_path(weights_path)}
