"""The trained picker: its size, its targets, and that a network trained on one synthetic
tomogram's picks finds the particles of another (F1 at half the particle radius), also as the
`pick_network` step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.optimize import linear_sum_assignment

from tomopipe.algorithms.picking.network import (
    HeatmapUNet,
    UNetConfig,
    bin_volume,
    heatmap_peaks,
    normalise_volume,
    parameter_count,
    predict_heatmap,
)
from tomopipe.algorithms.picking.template import shell_template
from tomopipe.algorithms.picking.train import TrainingConfig, heatmap_target, train_picker
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_step
from tomopipe.engine.workflow import WorkflowStep
from tomopipe.io.mrc import write_mrc
from tomopipe.project.store import Project
from tomopipe.steps.pick_network import PickNetwork

VOXEL_A = 8.0
SHAPE = (64, 96, 96)
DIAMETER_A = 120.0
MATCH_A = 30.0


pytestmark = pytest.mark.usefixtures("one_thread")


def _place(rng, n, min_distance_px, margin_px, taken):
    """``n`` random centres ``[z, y, x]`` at least ``min_distance_px`` from each other and ``taken``."""
    centres = list(taken)
    placed = []
    while len(placed) < n:
        c = np.array([rng.uniform(margin_px, s - margin_px) for s in SHAPE])
        if all(np.linalg.norm(c - o) >= min_distance_px for o in centres):
            centres.append(c)
            placed.append(c)
    return np.array(placed)


def _add(volume, template, centre):
    box = template.shape[0]
    corner = np.round(centre).astype(int) - box // 2
    region = tuple(slice(a, a + box) for a in corner)
    volume[region] += template


def synthetic_tomogram(seed: int, n_particles: int = 25, n_distractors: int = 6, snr: float = 0.7):
    """Hollow shells (120 Å outer, 80 Å inner) and smaller solid blobs (60 Å), low-passed, in
    Gaussian noise at ``snr`` (signal variance over noise variance); returns the volume and the
    shells' centres ``[k, 3]`` (voxels ``[z, y, x]``)."""
    rng = np.random.default_rng(seed)
    shell = shell_template(19, VOXEL_A, DIAMETER_A, 80.0).numpy()
    blob = shell_template(19, VOXEL_A, 60.0).numpy()
    centres = _place(rng, n_particles, DIAMETER_A / VOXEL_A + 1, 10, [])
    distractors = _place(rng, n_distractors, DIAMETER_A / VOXEL_A, 10, centres)
    volume = np.zeros(SHAPE, np.float32)
    for c in centres:
        _add(volume, shell, c)
    for c in distractors:
        _add(volume, 1.5 * blob, c)
    volume = gaussian_filter(volume, 1.0)
    noise = rng.normal(0.0, np.sqrt(volume.var() / snr), SHAPE)
    return torch.from_numpy((volume + noise).astype(np.float32)), centres


def f1_score(found: np.ndarray, truth: np.ndarray, max_distance: float) -> float:
    """F1 of a one-to-one (Hungarian) matching within ``max_distance``."""
    distance = np.linalg.norm(found[:, None] - truth[None], axis=2)
    rows, cols = linear_sum_assignment(np.where(distance <= max_distance, distance, 1e6))
    matched = int((distance[rows, cols] <= max_distance).sum())
    return 2.0 * matched / (len(found) + len(truth))


def test_network_has_at_most_a_million_parameters_and_keeps_the_shape():
    model = HeatmapUNet()
    assert parameter_count(model) <= 1_000_000
    assert model(torch.zeros(1, 1, 16, 24, 32)).shape == (1, 1, 16, 24, 32)


def test_target_is_one_on_a_centre_and_half_at_the_radius():
    target = heatmap_target((20, 20, 20), torch.tensor([[10.0, 10.0, 10.0]]), 3.0)
    assert target[10, 10, 10] == pytest.approx(1.0)
    assert target[10, 10, 13] == pytest.approx(0.5, abs=1e-6)
    assert target[0, 0, 0] < 1e-6


def test_tiled_prediction_matches_one_pass_on_the_whole_volume():
    torch.manual_seed(0)
    model = HeatmapUNet(UNetConfig(base_channels=4, levels=2)).eval()
    volume = torch.randn(12, 20, 16)
    whole = torch.sigmoid(model(volume[None, None]))[0, 0]
    tiled = predict_heatmap(model, volume, tile_px=64)
    assert torch.allclose(tiled, whole, atol=1e-5)
    small = predict_heatmap(model, volume, tile_px=8)  # 3 x 5 x 4 overlapping tiles, weights summed to 1
    assert small.shape == volume.shape and bool(((small > 0) & (small < 1)).all())


def test_picker_trained_on_one_tomogram_picks_another():
    train_volume, train_centres = synthetic_tomogram(1)
    test_volume, test_centres = synthetic_tomogram(2)
    binning = 2
    diameter_px = DIAMETER_A / (VOXEL_A * binning)
    to_binned = lambda c: (c - (binning - 1) / 2) / binning  # noqa: E731
    config = TrainingConfig(patch_px=32, time_s=60.0, max_steps=50, validate_every=25, seed=0)
    model, log = train_picker([normalise_volume(bin_volume(train_volume, binning))],
                              [torch.from_numpy(to_binned(train_centres))], diameter_px, config)
    assert log[-1]["best_step"] > 0
    heatmap = predict_heatmap(model, normalise_volume(bin_volume(test_volume, binning)), 32)
    peaks, scores = heatmap_peaks(heatmap, diameter_px, 0.5)
    found = peaks.numpy() * binning + (binning - 1) / 2
    assert len(found) > 0 and torch.all(scores > 0.5)
    f1 = f1_score(found * VOXEL_A, test_centres * VOXEL_A, MATCH_A)
    assert f1 >= 0.8, (f1, len(found), len(test_centres), log)


def test_peaks_a_diameter_apart_along_a_diagonal_are_both_kept():
    heatmap = torch.zeros(24, 24, 24)
    heatmap[8, 8, 8], heatmap[8, 14, 14] = 0.9, 0.8  # 8.5 voxels apart, in one 15-voxel cube
    peaks, scores = heatmap_peaks(heatmap, 7.5, 0.5)
    assert peaks.round().tolist() == [[8, 8, 8], [8, 14, 14]] and scores.tolist() == pytest.approx([0.9, 0.8])


def _centred_A(centres_zyx_px):
    """Voxel indices ``[z, y, x]`` of a SHAPE volume -> Å ``(x, y, z)`` from the centre voxel ``n // 2``."""
    return (centres_zyx_px - np.array([n // 2 for n in SHAPE]))[:, ::-1] * VOXEL_A


def _project_with_tomograms_and_picks(tmp_path, picks_of=("TS_01",), pick_ts_id=None):
    """A finished 'reconstruct' run with two synthetic tomograms, and a 'picks' run with the true
    centres of the tomograms ``picks_of`` (as hand picks, named ``pick_ts_id`` when given)."""
    project = Project.init(tmp_path / "p")
    run = project.create_run("reconstruct", "reconstruct_tomogram", {}, {}, "signature")
    rows, picks, truth = [], [], {}
    for seed, ts_id in enumerate(("TS_01", "TS_02"), start=1):
        volume, centres = synthetic_tomogram(seed)
        path = project.folder / run.folder / f"{ts_id}.mrc"
        write_mrc(path, volume.numpy(), VOXEL_A)
        rows.append({"ts_id": ts_id, "tomogram_path": project.relative_path(path), "voxel_size_A": VOXEL_A,
                     "size_x_px": SHAPE[2], "size_y_px": SHAPE[1], "size_z_px": SHAPE[0], "enabled": True})
        truth[ts_id] = _centred_A(centres)
        if ts_id in picks_of:
            picks += [{"ts_id": pick_ts_id or ts_id, "x_A": x, "y_A": y, "z_A": z, "rot_deg": np.nan,
                       "tilt_deg": np.nan, "psi_deg": np.nan, "score": np.nan, "half_set": 1 + i % 2,
                       "enabled": True} for i, (x, y, z) in enumerate(truth[ts_id])]
    project.add_set(run.id, "tomograms", "tomograms", pd.DataFrame(rows), {"tilt_series": {}})
    project.finish_run(run.id)
    hand = project.create_run("hand", "picks", {}, {}, "hand-signature")
    project.add_set(hand.id, "particles", "particles", pd.DataFrame(picks), {"tilt_series": {}})
    project.finish_run(hand.id)
    inputs = {"tomograms": project.sets_of_run(run.id)["tomograms"],
              "particles": project.sets_of_run(hand.id)["particles"]}
    return project, inputs, truth


def _pick(project, inputs, **params):
    step = WorkflowStep("pick_network", PickNetwork, PickNetwork.validate_params("pick_network", params), {})
    return run_step(project, step, inputs, repr(params), LocalExecutor(1))


def test_step_trains_on_one_tomogram_and_picks_both(tmp_path):
    project, inputs, truth = _project_with_tomograms_and_picks(tmp_path)
    outcome = _pick(project, inputs, particle_diameter_A=DIAMETER_A, training_time_s=60.0, max_training_steps=50,
                    patch_px=32, device="cpu")
    assert outcome.status == "finished", outcome.message
    record = project.sets_of_run(outcome.run.id)["particles"]
    picks = project.read_items(record.id)
    assert record.attrs["picking"]["orientation_known"] is False and record.attrs["picking"]["binning"] == 2
    for ts_id in ("TS_01", "TS_02"):
        found = picks.loc[picks["ts_id"] == ts_id, ["x_A", "y_A", "z_A"]].to_numpy(float)
        assert f1_score(found, truth[ts_id], MATCH_A) >= 0.8, ts_id
    assert sorted(np.bincount(picks["half_set"])[1:]) in ([len(picks) // 2] * 2, [len(picks) // 2,
                                                                                   len(picks) // 2 + 1])
    assert picks["score"].between(0.5, 1.0).all() and (picks[["rot_deg", "tilt_deg", "psi_deg"]] == 0).all().all()
    summary = outcome.run.summary
    assert summary["training_tomograms"] == ["TS_01"] and summary["parameters"] <= 1_000_000
    assert summary["training_log"][-1]["best_step"] > 0
    saved = torch.load(project.absolute_path(summary["weights"]), weights_only=True)
    model = HeatmapUNet(UNetConfig(**saved["network"]))
    model.load_state_dict(saved["state_dict"])


def test_step_refuses_picks_of_an_unknown_tomogram_and_a_threshold_that_keeps_nothing(tmp_path):
    project, inputs, _ = _project_with_tomograms_and_picks(tmp_path, pick_ts_id="TS_09")
    outcome = _pick(project, inputs, particle_diameter_A=DIAMETER_A, max_training_steps=1, patch_px=32)
    assert outcome.status == "failed" and "TS_09" in outcome.message
    project, inputs, _ = _project_with_tomograms_and_picks(tmp_path / "b")
    outcome = _pick(project, inputs, particle_diameter_A=DIAMETER_A, max_training_steps=1, patch_px=32,
                    threshold=1.0)
    assert outcome.status == "failed" and "fewer than min_picks" in outcome.message


def test_training_with_a_step_limit_is_reproducible_and_seeded():
    volume = normalise_volume(torch.randn(16, 32, 16, generator=torch.Generator().manual_seed(3)))
    centres = [torch.tensor([[8.0, 8.0, 8.0], [8.0, 20.0, 8.0]])]
    config = TrainingConfig(patch_px=16, max_steps=3, validate_every=2, network=UNetConfig(base_channels=4))
    runs = [train_picker([volume], centres, 6.0, replace(config, seed=seed))[0]
            for seed in (0, 0, 1)]
    weights = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
