"""Scores of a step's outputs against the simulator's truth (numbers for the demo and benchmarks)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tomopipe.algorithms.geometry import wrap_angle_deg
from tomopipe.report.truth import Truth


def _axis_line_error_deg(estimated_deg: float, true_deg: float) -> float:
    """Angle between two tilt-axis directions, and the same for the opposite direction (α ± 180
    is the same line with the other handedness): the smaller of the two."""
    difference = float(wrap_angle_deg(estimated_deg - true_deg))
    return min(abs(difference), 180.0 - abs(difference))


def score_import(items: pd.DataFrame, attrs: dict, truth: Truth) -> dict:
    """Imported tilt angles, doses and tilt axis against the simulation: maximum errors over
    all tilts, and whether the axis has the true direction or the opposite one."""
    angle_errors, dose_errors, axis_errors, same_direction = [], [], [], []
    for ts_id in truth.tilt_series_names:
        true_tilts = truth.tilts(ts_id)
        ours = items[items["ts_id"] == ts_id]
        merged = ours.assign(movie=ours["movie_path"].map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])) \
            .merge(true_tilts, on="movie", how="inner")
        if len(merged) != len(true_tilts):
            raise ValueError(f"{ts_id}: imported {len(ours)} tilts, the truth has {len(true_tilts)}")
        angle_errors.append(np.abs(merged["tilt_angle_deg"] - merged["stage_tilt_deg"]).max())
        dose_errors.append(np.abs(merged["pre_exposure_e_per_A2_x"] - merged["pre_exposure_e_per_A2_y"]).max())
        axis = attrs["tilt_series"][ts_id]["tilt_axis_angle_deg"]
        true_axis = float(true_tilts["tilt_axis_deg"].median())
        axis_errors.append(_axis_line_error_deg(axis, true_axis))
        same_direction.append(abs(float(wrap_angle_deg(axis - true_axis))) < 90.0)
    return {
        "tilt_series": len(angle_errors),
        "max_tilt_angle_error_deg": float(max(angle_errors)),
        "max_pre_exposure_error_e_per_A2": float(max(dose_errors)),
        "max_tilt_axis_line_error_deg": float(max(axis_errors)),
        "tilt_axis_direction": "as the truth" if all(same_direction) else "opposite to the truth (other hand)",
    }


def _by_tilt_angle(ours: pd.DataFrame, true_table: pd.DataFrame, angle_column: str) -> pd.DataFrame:
    """Pair our per-tilt rows with the truth's by the (stage) tilt angle, which the mdoc carries."""
    ours = ours.assign(_angle=np.round(ours["tilt_angle_deg"].to_numpy(float), 2))
    true_table = true_table.assign(_angle=np.round(true_table[angle_column].to_numpy(float), 2))
    return ours.merge(true_table, on="_angle", how="inner", suffixes=("", "_true"))


def score_motion(items: pd.DataFrame, project, truth: Truth) -> dict:
    """RMS error (Å) of the estimated per-frame shifts against the truth, both taken relative
    to their mean over the frames of a movie."""
    import json

    squared, frames = 0.0, 0
    for ts_id, group in items.groupby("ts_id"):
        document = json.loads(project.absolute_path(group["motion_path"].iloc[0]).read_text())
        estimated = {t["tilt_index"]: np.asarray(t["shifts_A"], dtype=float) for t in document["tilts"]}
        true_tilts = truth.tilts(ts_id)
        true_shifts = truth.frame_shifts(ts_id)
        paired = _by_tilt_angle(group, true_tilts, "stage_tilt_deg")
        for row in paired.itertuples(index=False):
            true = true_shifts[true_shifts["acquisition_index"] == row.acquisition_index].sort_values("frame")
            true_xy = true[["shift_x_A", "shift_y_A"]].to_numpy(float)
            ours = estimated[row.tilt_index]
            difference = (ours - ours.mean(0)) - (true_xy - true_xy.mean(0))
            squared += float((difference ** 2).sum())
            frames += len(difference)
    return {"motion_shift_rms_error_A": float(np.sqrt(squared / frames)) if frames else float("nan"),
            "frames_scored": frames}


def score_ctf(items: pd.DataFrame, truth: Truth) -> dict:
    """Defocus errors (Å) against the truth: |mean defocus error| median and 95th percentile,
    astigmatism (U − V) error median; fit resolutions reported."""
    defocus_errors, astigmatism_errors = [], []
    for ts_id, group in items.groupby("ts_id"):
        paired = _by_tilt_angle(group, truth.tilt_series_star(ts_id), "rlnTomoNominalStageTiltAngle")
        ours_mean = 0.5 * (paired["defocus_u_A"] + paired["defocus_v_A"])
        true_mean = 0.5 * (paired["rlnDefocusU"] + paired["rlnDefocusV"])
        defocus_errors.append(np.abs(ours_mean - true_mean).to_numpy())
        astigmatism_errors.append(np.abs(np.abs(paired["defocus_u_A"] - paired["defocus_v_A"])
                                         - np.abs(paired["rlnDefocusU"] - paired["rlnDefocusV"])).to_numpy())
    defocus = np.concatenate(defocus_errors) if defocus_errors else np.array([np.nan])
    astigmatism = np.concatenate(astigmatism_errors) if astigmatism_errors else np.array([np.nan])
    resolution = items["fit_resolution_A"].to_numpy(float)
    return {"defocus_error_median_A": float(np.median(defocus)),
            "defocus_error_p95_A": float(np.percentile(defocus, 95)),
            "astigmatism_error_median_A": float(np.median(astigmatism)),
            "fit_resolution_median_A": float(np.nanmedian(resolution)) if np.isfinite(resolution).any() else None,
            "tilts_scored": int(defocus.size)}
