"""Score a tilt-series alignment (the ``align_tilt_series`` output, or the same alignment after
``assign_alignment``) against the simulator's truth.

Per tilt series, our views are paired with the truth's by the stage tilt angle
(:func:`tomopipe.validate.scores._by_tilt_angle`), excluded views left out:

* ``shift_rms_px`` / ``shift_rms_A``: RMS over views of the 2-D error of the specimen shifts after
  removing the 3-D translation of the specimen that best matches the truth (a translation ``t`` of
  the tomogram origin adds ``m_i·[R_i t]_xy`` to every shift and changes no projection; it is found
  by least squares with our geometry: :func:`tomopipe.algorithms.align_fit.projected_shift_error_px`).
  Pixels are those of the images the items point to, or of the truth's pixel size × ``binning``
  when given. ``shift_max_px`` is the largest per-view error.
* ``*_content_*``: the same against where the image content actually is: the truth's shift plus
  the mean displacement of the tilt's movie frames (the truth's projection model is that of frame
  0; a motion correction that aligns the frames to their mean — as ours does — puts the sum's
  content at the frames' mean position, a per-view offset that no alignment of the sums can see).
* ``axis_error_deg``: mean over views of our tilt-axis angle minus the truth's (wrapped to ±180).
* ``offset_error_deg``: mean over views of our tilt angle minus the true tilt angle, i.e. our
  tilt-angle offset minus the true one; ``tilt_rms_error_deg``: RMS of the per-view tilt errors
  around that mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.align_fit import projected_shift_error_px
from tomopipe.algorithms.geometry import wrap_angle_deg
from tomopipe.errors import TomopipeError
from tomopipe.validate.scores import _by_tilt_angle
from tomopipe.validate.truth import Truth

REQUIRED = ("ts_id", "tilt_angle_deg", "rot_z_deg", "rot_y_deg", "shift_x_A", "shift_y_A")


def _score_one(paired: pd.DataFrame, pixel_size_A: float, frame_mean_A: np.ndarray) -> dict:
    magnification = paired["magnification"].fillna(1.0).to_numpy(float) if "magnification" in paired \
        else np.ones(len(paired))
    ours_px = paired[["shift_x_A", "shift_y_A"]].to_numpy(float) / pixel_size_A
    true_A = paired[["shift_x_A_true", "shift_y_A_true"]].to_numpy(float)
    model = projected_shift_error_px(paired["rot_z_deg"].to_numpy(float), paired["rot_y_deg"].to_numpy(float),
                                     ours_px, magnification, true_A / pixel_size_A)
    content = projected_shift_error_px(paired["rot_z_deg"].to_numpy(float), paired["rot_y_deg"].to_numpy(float),
                                       ours_px, magnification, (true_A + frame_mean_A) / pixel_size_A)
    axis_errors = wrap_angle_deg(torch.tensor(paired["rot_z_deg"].to_numpy(float)
                                              - paired["tilt_axis_deg"].to_numpy(float),
                                              dtype=torch.float64)).numpy()
    tilt_errors = paired["rot_y_deg"].to_numpy(float) - paired["true_tilt_deg"].to_numpy(float)
    return {"views": int(len(paired)), "pixel_size_A": pixel_size_A,
            "shift_rms_px": model["rms_px"], "shift_rms_A": model["rms_px"] * pixel_size_A,
            "shift_max_px": model["max_px"],
            "shift_rms_content_px": content["rms_px"], "shift_rms_content_A": content["rms_px"] * pixel_size_A,
            "axis_error_deg": float(np.mean(axis_errors)),
            "offset_error_deg": float(tilt_errors.mean()),
            "tilt_rms_error_deg": float(np.sqrt(np.mean((tilt_errors - tilt_errors.mean()) ** 2)))}


def score_alignment(items: pd.DataFrame, attrs: dict, truth: Truth, binning: float | None = None) -> dict:
    """Alignment errors per tilt series (``tilt_series``: ts_id -> numbers, see the module) and the
    worst of each over the tilt series (``max_*``, absolute values for the signed angles).

    ``items``: a ``tilt_series`` set with the alignment columns; ``attrs``: its set attributes (the
    per-tilt-series ``pixel_size_A``); ``binning``: report pixels of ``truth pixel size × binning``
    instead of the items' own pixels (Å values do not depend on it)."""
    missing = [c for c in REQUIRED if c not in items.columns]
    if missing:
        raise TomopipeError(f"score_alignment: the items have no column(s) {', '.join(missing)}: not aligned")
    acquisitions = attrs.get("tilt_series", {})
    truth_pixel_A = float(truth.tomograms["rlnTomoTiltSeriesPixelSize"].iloc[0])
    per_ts = {}
    for ts_id, group in items.groupby("ts_id", sort=True):
        if ts_id not in truth.tilt_series_names:
            raise TomopipeError(f"score_alignment: tilt series {ts_id!r} is not in the truth")
        if "enabled" in group:
            group = group[group["enabled"].astype(bool)]
        group = group.dropna(subset=["rot_z_deg", "rot_y_deg", "shift_x_A", "shift_y_A"])
        true_tilts = truth.tilts(ts_id)
        paired = _by_tilt_angle(group, true_tilts, "stage_tilt_deg")
        if len(paired) < 3:
            raise TomopipeError(f"score_alignment: {ts_id}: only {len(paired)} views pair with the truth by tilt angle")
        frames = truth.frame_shifts(ts_id).groupby("acquisition_index")[["shift_x_A", "shift_y_A"]].mean()
        frame_mean_A = frames.loc[paired["acquisition_index"].to_numpy()].to_numpy(float)
        if binning is not None:
            pixel_size_A = truth_pixel_A * float(binning)
        elif ts_id in acquisitions and "pixel_size_A" in acquisitions[ts_id]:
            pixel_size_A = float(acquisitions[ts_id]["pixel_size_A"])
        else:
            raise TomopipeError(f"score_alignment: {ts_id}: no pixel_size_A in the set attributes (give binning)")
        per_ts[ts_id] = _score_one(paired, pixel_size_A, frame_mean_A)
    if not per_ts:
        raise TomopipeError("score_alignment: no aligned tilt series in the items")
    summary = {"tilt_series": per_ts}
    for key in ("shift_rms_px", "shift_rms_A", "shift_rms_content_px", "shift_rms_content_A"):
        summary[f"max_{key}"] = max(v[key] for v in per_ts.values())
    for key in ("axis_error_deg", "offset_error_deg"):
        summary[f"max_abs_{key}"] = max(abs(v[key]) for v in per_ts.values())
    return summary
