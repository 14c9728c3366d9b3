"""Acquisition order and accumulated dose of a tilt series (pure functions, no files).

Real data mix dose-symmetric, bidirectional and unidirectional schemes, so nothing here
assumes a scheme: the order in which tilts were exposed comes from their time stamps
(mdoc ``DateTime``); without time stamps for every tilt it falls back to the section order
(mdoc ``ZValue``), which is the order SerialEM writes them in.

The pre-exposure of a tilt is the dose it received before its own exposure started: the
sum of the doses of all tilts exposed earlier (RELION ``rlnMicrographPreExposure``).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tomopipe.algorithms.geometry import wrap_angle_deg

SERIALEM_DATE_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")


def parse_serialem_datetime(value: Any) -> pd.Timestamp:
    """SerialEM ``DateTime`` text (``30-Nov-15  15:21:38``, day-month-year) or a datetime ->
    Timestamp; NaT when absent or not in a known form (no guessing of day/month order)."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return pd.NaT
    if isinstance(value, (pd.Timestamp, datetime, np.datetime64)):
        return pd.Timestamp(value)
    text = " ".join(str(value).split())
    for fmt in SERIALEM_DATE_FORMATS:
        try:
            return pd.Timestamp(datetime.strptime(text, fmt))
        except ValueError:
            continue
    return pd.NaT


def _times(date_times: Sequence[Any] | None, n: int) -> pd.DatetimeIndex | None:
    if date_times is None:
        return None
    times = pd.Series([parse_serialem_datetime(t) for t in list(date_times)], dtype="datetime64[ns]")
    if len(times) != n:
        raise ValueError(f"got {len(times)} date_times for {n} tilts")
    if times.isna().any():
        return None
    return pd.DatetimeIndex(times)


def acquisition_order_and_pre_exposure(
    tilt_angles: Sequence[float],
    date_times: Sequence[Any] | None,
    dose_per_tilt: float | Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """``(order, pre_exposure)`` for tilts listed in file (section) order.

    ``order[i]``: 0-based rank of tilt i in time. Ranked by ``date_times`` (datetimes or
    SerialEM DateTime text) when every tilt has one (equal times keep section order);
    otherwise section order (``order = 0..n-1``).
    ``pre_exposure[i]``: e/Å² received before tilt i = sum of ``dose_per_tilt`` (one value,
    or one per tilt in file order, e/Å²) over the tilts exposed earlier.
    ``tilt_angles`` (degrees, file order) fixes the number of tilts; no scheme is assumed.
    """
    angles = np.asarray(tilt_angles, dtype=np.float64).reshape(-1)
    n = angles.size
    if n == 0:
        raise ValueError("no tilts")
    if not np.all(np.isfinite(angles)):
        raise ValueError("tilt angles must be finite")
    if np.ndim(dose_per_tilt) == 0:
        if dose_per_tilt is None:
            raise ValueError("dose_per_tilt is None: the dose of each tilt must be known")
        doses = np.full(n, float(dose_per_tilt))
    else:
        values = list(dose_per_tilt)
        if any(v is None for v in values):
            missing = [i for i, v in enumerate(values) if v is None]
            raise ValueError(f"dose_per_tilt is unknown for tilt(s) {missing[:10]}")
        doses = np.asarray(values, dtype=np.float64).reshape(-1)
        if doses.size != n:
            raise ValueError(f"got {doses.size} doses for {n} tilts")
    if not np.all(np.isfinite(doses)) or np.any(doses < 0):
        raise ValueError("doses must be finite and non-negative")

    times = _times(date_times, n)
    if times is None:
        sequence = np.arange(n)  # section order
    else:
        sequence = np.argsort(times.values.astype("datetime64[ns]").astype(np.int64), kind="stable")
    order = np.empty(n, dtype=np.int64)
    order[sequence] = np.arange(n)
    cumulative = np.concatenate([[0.0], np.cumsum(doses[sequence])[:-1]])
    pre_exposure = np.empty(n, dtype=np.float64)
    pre_exposure[sequence] = cumulative
    return order, pre_exposure


def mdoc_axis_for_movies(mdoc_axis_deg: float, movie_name: Path, tomo5: bool) -> float:
    """The tilt-axis angle of the movie arrays as tomopipe reads them, from the mdoc's angle.

    Tomography 5 writes its axis in another convention (Scipion's rule: −axis − 90). SerialEM
    states the axis for the frames as stored; TIFF movies are flipped along Y on read (as IMOD,
    RELION and MotionCor2 do), and a Y flip turns an axis α into 180° − α (conventions sheet;
    EMPIAR-10491: mdoc −93.5°, refined −85.6°). MRC and EER frames are read as stored.
    """
    axis = -mdoc_axis_deg - 90.0 if tomo5 else mdoc_axis_deg
    if movie_name.suffix.lower() in (".tif", ".tiff"):
        axis = 180.0 - axis
    return float(wrap_angle_deg(axis))
