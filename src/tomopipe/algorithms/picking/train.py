"""Training of the heatmap picker (:mod:`tomopipe.algorithms.picking.network`) on picks of the
data set itself (template-matching or hand picks): targets, patch sampling, loss, validation.

Conventions: volumes ``[z, y, x]`` float32, already binned and normalised per tomogram; particle
centres in voxel indices ``[z, y, x]`` of those volumes (float). The last ``validation_fraction``
of every volume along y is held out: training patches lie wholly before it, and the weights
kept are those with the lowest loss on the held-out slabs (the F1 of their peaks against their
picks is logged too; with few held-out picks it is too coarse to choose by). Augmentation
is by flips of z, y and x (and so 180° rotations about any axis), which leave the missing
wedge (tilt axis y) where it is; 90° rotations about z would turn it, so there are none.
Training is seeded: for a fixed ``max_steps`` it is reproducible on CPU; with a time budget the
number of steps depends on the machine (the log says how many were made).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from tomopipe.algorithms.picking.network import HeatmapUNet, UNetConfig, heatmap_peaks, predict_heatmap

__all__ = ["TrainingConfig", "heatmap_target", "matched_pairs", "train_picker"]


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: patch edge (voxels of the binned volumes), time budget (s) and/or step
    limit, batch size, Adam learning rate, held-out fraction of y, steps between validations,
    seed, the largest positive/negative loss weight, the probability threshold of validation peaks."""

    patch_px: int = 48
    time_s: float = 300.0
    max_steps: int | None = None
    batch_size: int = 2
    learning_rate: float = 1e-2
    validation_fraction: float = 0.2
    validate_every: int = 25
    seed: int = 0
    max_positive_weight: float = 20.0
    threshold: float = 0.5
    network: UNetConfig = UNetConfig()


def heatmap_target(shape: tuple[int, int, int], centres_px: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Target heatmap ``[z, y, x]``: at every voxel the largest ``exp(-ln 2 · (d / radius_px)²)`` over
    the centres (``[k, 3]`` voxel indices), so 1 on a centre and 0.5 at ``radius_px`` from it."""
    if radius_px <= 0:
        raise ValueError(f"radius_px must be > 0, got {radius_px}")
    target = torch.zeros(shape, dtype=torch.float32)
    reach = math.ceil(3 * radius_px)
    for centre in centres_px.to(torch.float64):
        low = [max(0, math.floor(c) - reach) for c in centre.tolist()]
        high = [min(n, math.floor(c) + reach + 1) for c, n in zip(centre.tolist(), shape)]
        if any(h <= lo for lo, h in zip(low, high)):
            continue
        grids = torch.meshgrid(*(torch.arange(lo, h, dtype=torch.float64) - c
                                 for lo, h, c in zip(low, high, centre.tolist())), indexing="ij")
        bump = torch.exp(-math.log(2) * sum(g ** 2 for g in grids) / radius_px ** 2).to(torch.float32)
        region = tuple(slice(lo, h) for lo, h in zip(low, high))
        target[region] = torch.maximum(target[region], bump)
    return target


def matched_pairs(found: np.ndarray, reference: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches (Hungarian, least total distance) between ``found`` ``[n, d]`` and
    ``reference`` ``[m, d]`` no further apart than ``max_distance``: index arrays into each."""
    found, reference = np.asarray(found, float).reshape(-1, 3), np.asarray(reference, float).reshape(-1, 3)
    if not len(found) or not len(reference):
        return np.zeros(0, int), np.zeros(0, int)
    distance = np.linalg.norm(found[:, None] - reference[None], axis=2)
    cost = np.where(distance <= max_distance, distance, 1e6)
    rows, cols = linear_sum_assignment(cost)
    keep = distance[rows, cols] <= max_distance
    return rows[keep], cols[keep]


def _f1(n_found: int, n_reference: int, n_matched: int) -> float:
    return 2.0 * n_matched / (n_found + n_reference) if n_found + n_reference else 1.0


@dataclass
class _Volume:
    data: torch.Tensor  # normalised [z, y, x]
    target: torch.Tensor  # heatmap [z, y, x]
    centres: torch.Tensor  # [k, 3]
    y_split: int  # y >= y_split is held out


def _patch_shape(volumes: list[_Volume], patch_px: int, multiple: int) -> tuple[int, int, int]:
    """The training patch: ``patch_px`` per axis, clipped to the smallest training region,
    rounded down to the network's size multiple."""
    limits = [min(v.data.shape[0] for v in volumes), min(v.y_split for v in volumes),
              min(v.data.shape[2] for v in volumes)]
    shape = tuple(min(patch_px, n) // multiple * multiple for n in limits)
    if min(shape) < multiple:
        raise ValueError(f"the training region ({limits} voxels z, y, x) is smaller than the network's size "
                         f"multiple {multiple}: use larger tomograms or less binning")
    return shape


def _sample_batch(volumes: list[_Volume], shape: tuple[int, int, int], batch_size: int,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches of the training regions, half of them centred (with jitter) on a pick,
    each flipped at random along z, y and x; returns inputs and targets ``[batch, 1, z, y, x]``."""
    inputs, targets = [], []
    for index in range(batch_size):
        volume = volumes[rng.integers(len(volumes))]
        region = (volume.data.shape[0], volume.y_split, volume.data.shape[2])
        training_centres = volume.centres[volume.centres[:, 1] < volume.y_split]
        if index % 2 == 0 and len(training_centres):
            centre = training_centres[rng.integers(len(training_centres))].numpy()
            centre = centre + rng.uniform(-0.5, 0.5, 3) * np.array(shape)
            start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, shape, region)]
        else:
            start = [int(rng.integers(0, n - s + 1)) for s, n in zip(shape, region)]
        crop = tuple(slice(a, a + s) for a, s in zip(start, shape))
        flips = [axis for axis in range(3) if rng.random() < 0.5]
        inputs.append(volume.data[crop].flip(flips) if flips else volume.data[crop])
        targets.append(volume.target[crop].flip(flips) if flips else volume.target[crop])
    return torch.stack(inputs)[:, None], torch.stack(targets)[:, None]


def _weighted_loss(logits: torch.Tensor, target: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """Binary cross-entropy with soft targets, voxels weighted ``1 + (positive_weight − 1)·target``
    (class balance: particle centres are a small fraction of the voxels)."""
    weight = 1.0 + (positive_weight - 1.0) * target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def _validate(model: HeatmapUNet, volumes: list[_Volume], config: TrainingConfig, diameter_px: float,
              match_px: float, positive_weight: float) -> tuple[float, float, int]:
    """Weighted loss of the held-out slabs' heatmaps, F1 of their peaks against their picks, and
    the number of held-out picks."""
    found = reference = matched = 0
    losses = []
    for volume in volumes:
        context = min(volume.y_split, config.patch_px // 2)  # predicted too, for the slab's border
        heatmap = predict_heatmap(model, volume.data[:, volume.y_split - context:], config.patch_px).cpu()
        heatmap = heatmap[:, context:]
        target = volume.target[:, volume.y_split:]
        losses.append(F.binary_cross_entropy(heatmap.clamp(1e-6, 1 - 1e-6), target,
                                             weight=1.0 + (positive_weight - 1.0) * target))
        peaks = heatmap_peaks(heatmap, diameter_px, config.threshold)[0].numpy()
        picks = volume.centres[volume.centres[:, 1] >= volume.y_split].numpy() - [0.0, volume.y_split, 0.0]
        rows, _ = matched_pairs(peaks, picks, match_px)
        found, reference, matched = found + len(peaks), reference + len(picks), matched + len(rows)
    return float(torch.stack(losses).mean()), _f1(found, reference, matched), reference


def train_picker(volumes: list[torch.Tensor], centres_px: list[torch.Tensor], diameter_px: float,
                 config: TrainingConfig = TrainingConfig(), device: torch.device | str = "cpu",
                 ) -> tuple[HeatmapUNet, list[dict]]:
    """Train a :class:`HeatmapUNet` to find the centres ``centres_px[i]`` (``[k, 3]`` voxels) in
    the normalised volumes ``volumes[i]`` for particles ``diameter_px`` across (target radius =
    a quarter of the diameter; validation matches within half the particle radius). Stops after
    ``config.time_s`` seconds or ``config.max_steps`` steps, whichever comes first, and returns the
    model with the weights of the lowest validation loss (on ``device``) and the log: one entry
    per validation (step, seconds, mean training loss since the last one, validation loss and F1)."""
    if len(volumes) != len(centres_px) or not volumes:
        raise ValueError("train_picker needs one array of centres per volume, and at least one volume")
    if not 0 < config.validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {config.validation_fraction}")
    if sum(len(c) for c in centres_px) == 0:
        raise ValueError("no training picks: the picker needs particle positions to learn from")
    radius_px = diameter_px / 4.0
    train_volumes = []
    for data, centres in zip(volumes, centres_px):
        centres = centres.to(torch.float64).reshape(-1, 3)
        y_split = int(round(data.shape[1] * (1.0 - config.validation_fraction)))
        train_volumes.append(_Volume(data.to(torch.float32).cpu(), heatmap_target(tuple(data.shape), centres,
                                                                                  radius_px), centres, y_split))
    positive = sum(float((v.target > 0.5).sum()) for v in train_volumes)
    total = sum(v.target.numel() for v in train_volumes)
    positive_weight = float(np.clip((total - positive) / max(positive, 1.0), 1.0, config.max_positive_weight))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = HeatmapUNet(config.network).to(device)
    shape = _patch_shape(train_volumes, config.patch_px, config.network.size_multiple)
    rng = np.random.default_rng(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    started = time.monotonic()
    log: list[dict] = []
    best = (math.inf, None, 0)
    losses: list[float] = []
    step = 0
    while True:
        out_of_time = time.monotonic() - started >= config.time_s
        done = out_of_time or (config.max_steps is not None and step >= config.max_steps)
        if step and (done or step % config.validate_every == 0):
            loss, f1, n_reference = _validate(model, train_volumes, config, diameter_px, diameter_px / 4.0,
                                              positive_weight)
            log.append({"step": step, "seconds": round(time.monotonic() - started, 2),
                        "train_loss": round(float(np.mean(losses)), 5), "validation_loss": round(loss, 5),
                        "validation_f1": round(f1, 4), "validation_picks": n_reference})
            losses = []
            if loss < best[0]:
                best = (loss, copy.deepcopy(model.state_dict()), step)
        if done:
            break
        model.train()
        inputs, targets = _sample_batch(train_volumes, shape, config.batch_size, rng)
        loss = _weighted_loss(model(inputs.to(device)), targets.to(device), positive_weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
    if best[1] is None:
        raise ValueError(f"no training step fitted in the time budget of {config.time_s} s")
    model.load_state_dict(best[1])
    model.eval()
    log.append({"best_step": best[2], "best_validation_loss": round(best[0], 5), "positive_weight": positive_weight,
                "patch_px": list(shape)})
    return model, log
