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
