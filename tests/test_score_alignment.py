"""score_alignment against a small hand-made truth: the 3-D translation gauge is removed, known
shift, axis and offset errors come back, views pair by tilt angle (not by order), excluded views
are left out, and the frame-content reference is the truth shift plus the frames' mean motion."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.geometry import projection_rotations, rotation_2d
from tomopipe.errors import TomopipeError
from tomopipe.io.star import write_tomograms_star
from tomopipe.validate.score_alignment import score_alignment
from tomopipe.validate.truth import Truth

PIXEL_A = 10.0  # pixel size of the scored items
AXIS_DEG = -85.6
STAGE = np.arange(-40.0, 40.1, 4.0)


@pytest.fixture
def truth(tmp_path) -> Truth:
    rng = np.random.default_rng(3)
    order = np.argsort(np.abs(STAGE) + 0.1 * (STAGE < 0), kind="stable")  # dose-symmetric-like acquisition order
    stage = STAGE[order]
    n = len(stage)
    tilts = pd.DataFrame({"acquisition_index": np.arange(n), "movie": [f"TS_01_{i:03d}.tif" for i in range(n)],
                          "stage_tilt_deg": stage + rng.normal(0, 0.002, n),
                          "true_tilt_deg": stage + 0.5 + rng.normal(0, 0.03, n),
                          "tilt_axis_deg": AXIS_DEG, "shift_x_A": rng.normal(0, 60, n),
                          "shift_y_A": rng.normal(0, 60, n), "magnification": 1 + rng.normal(0, 5e-4, n)})
    folder = tmp_path / "truth"
    folder.mkdir()
    tilts.to_csv(folder / "TS_01_tilts.csv", index=False)
    frames = pd.DataFrame([{"acquisition_index": i, "frame": f, "shift_x_A": 0.4 * f * (1 + i % 3),
                            "shift_y_A": -0.2 * f} for i in range(n) for f in range(6)])
    frames.to_csv(folder / "TS_01_frame_shifts.csv", index=False)
    write_tomograms_star(folder / "tomograms.star", pd.DataFrame({"rlnTomoName": ["TS_01"],
                                                                 "rlnTomoTiltSeriesPixelSize": [1.0]}))
    (folder / "truth.json").write_text(json.dumps({"tomopipe_simulation": 1}))
    return Truth.find(tmp_path)


def _perfect_items(truth: Truth) -> pd.DataFrame:
    """Our items in tilt order with the true alignment (magnification relative to the truth's)."""
    t = truth.tilts("TS_01").sort_values("stage_tilt_deg").reset_index(drop=True)
    return pd.DataFrame({"ts_id": "TS_01", "tilt_index": np.arange(len(t)),
                         "tilt_angle_deg": np.round(t["stage_tilt_deg"], 2),
                         "enabled": True, "rot_z_deg": t["tilt_axis_deg"], "rot_y_deg": t["true_tilt_deg"],
                         "rot_x_deg": 0.0, "shift_x_A": t["shift_x_A"], "shift_y_A": t["shift_y_A"],
                         "magnification": t["magnification"]})


ATTRS = {"tilt_series": {"TS_01": {"pixel_size_A": PIXEL_A}}}


def _translated(items: pd.DataFrame, t_px) -> pd.DataFrame:
    """The same alignment with the tomogram origin moved by ``t_px`` (a gauge: no projection changes)."""
    rot = projection_rotations(torch.tensor(items["rot_z_deg"].to_numpy(float)),
                               torch.tensor(items["rot_y_deg"].to_numpy(float))).numpy()
    moved = items["magnification"].to_numpy()[:, None] * (rot[:, :2, :] @ np.asarray(t_px, float))
    out = items.copy()
    out[["shift_x_A", "shift_y_A"]] += moved * PIXEL_A
    return out


def test_a_translated_origin_scores_zero_and_angles_are_exact(truth):
    items = _translated(_perfect_items(truth), [6.0, -4.0, 12.0])
    raw = np.hypot(*(items[["shift_x_A", "shift_y_A"]].to_numpy() - _perfect_items(truth)[["shift_x_A", "shift_y_A"]]
                     .to_numpy()).T) / PIXEL_A
    assert raw.mean() > 5.0  # the gauge is large: only its removal makes the score zero
    score = score_alignment(items, ATTRS, truth)["tilt_series"]["TS_01"]
    assert score["views"] == len(STAGE)
    assert score["shift_rms_px"] < 1e-6 and score["shift_rms_A"] < 1e-5
    assert abs(score["axis_error_deg"]) < 1e-9 and abs(score["offset_error_deg"]) < 1e-9
    assert score["tilt_rms_error_deg"] < 1e-9


def test_known_errors_come_back(truth):
    items = _perfect_items(truth)
    sign = np.where(np.arange(len(items)) % 2 == 0, 1.0, -1.0)
    across = np.stack([0.3 * sign, np.zeros(len(items))], -1)  # ±0.3 px across the axis, alternating
    raw = np.einsum("nij,nj->ni", rotation_2d(torch.tensor(items["rot_z_deg"].to_numpy())).numpy(), across)
    items[["shift_x_A", "shift_y_A"]] += raw * PIXEL_A
    items["rot_z_deg"] += 0.2
    items["rot_y_deg"] -= 0.3
    summary = score_alignment(items, ATTRS, truth)
    score = summary["tilt_series"]["TS_01"]
    assert score["shift_rms_px"] == pytest.approx(0.3, abs=0.02)  # an alternating error is no translation
    assert score["shift_rms_A"] == pytest.approx(score["shift_rms_px"] * PIXEL_A)
    assert score["axis_error_deg"] == pytest.approx(0.2, abs=1e-9)
    assert score["offset_error_deg"] == pytest.approx(-0.3, abs=1e-9)
    assert summary["max_abs_offset_error_deg"] == pytest.approx(0.3, abs=1e-9)
    binned = score_alignment(items, ATTRS, truth, binning=2.5)["tilt_series"]["TS_01"]  # pixels of 2.5 Å
    assert binned["shift_rms_px"] == pytest.approx(score["shift_rms_A"] / 2.5, rel=1e-9)


def test_views_pair_by_angle_and_excluded_views_are_left_out(truth):
    items = _perfect_items(truth).sample(frac=1.0, random_state=1).reset_index(drop=True)  # any row order
    items.loc[3, ["shift_x_A", "shift_y_A", "rot_z_deg"]] = [500.0, -500.0, 10.0]
    items.loc[3, "enabled"] = False
    score = score_alignment(items, ATTRS, truth)["tilt_series"]["TS_01"]
    assert score["views"] == len(STAGE) - 1 and score["shift_rms_px"] < 1e-6 and abs(score["axis_error_deg"]) < 1e-9


def test_content_reference_adds_the_mean_frame_motion(truth):
    items = _perfect_items(truth)
    frames = truth.frame_shifts("TS_01").groupby("acquisition_index")[["shift_x_A", "shift_y_A"]].mean()
    t = truth.tilts("TS_01").sort_values("stage_tilt_deg").reset_index(drop=True)
    items[["shift_x_A", "shift_y_A"]] += frames.loc[t["acquisition_index"]].to_numpy()  # the sums' content
    score = score_alignment(items, ATTRS, truth)["tilt_series"]["TS_01"]
    assert score["shift_rms_content_px"] < 1e-6
    assert score["shift_rms_px"] > 0.02  # the mean frame motion differs between tilts (period 3)


def test_unaligned_items_are_refused(truth):
    items = _perfect_items(truth).drop(columns=["rot_z_deg"])
    with pytest.raises(TomopipeError, match="rot_z_deg"):
        score_alignment(items, ATTRS, truth)
    with pytest.raises(TomopipeError, match="pixel_size_A"):
        score_alignment(_perfect_items(truth), {"tilt_series": {}}, truth)
