"""Acquisition order and pre-exposure (tomopipe.model.acquisition): synthetic schemes with known
answers, fall-backs, errors, and agreement with RELION 5's rlnMicrographPreExposure on real data."""

from __future__ import annotations

from pathlib import PureWindowsPath

import numpy as np
import pandas as pd
import pytest

from conftest import real_file
from tomopipe.io.mdoc import read_mdoc
from tomopipe.io.star import read_tilt_series_star
from tomopipe.model.acquisition import acquisition_order_and_pre_exposure


def _times(minutes):
    return [pd.Timestamp("2026-11-24 10:00:00") + pd.Timedelta(minutes=m) for m in minutes]


def test_bidirectional_scheme_listed_in_angle_order():
    # sections sorted by angle (-6..6); acquired 0, 3, 6 then -3, -6 (bidirectional)
    angles = [-6.0, -3.0, 0.0, 3.0, 6.0]
    times = _times([4, 3, 0, 1, 2])
    order, pre = acquisition_order_and_pre_exposure(angles, times, 2.0)
    assert order.tolist() == [4, 3, 0, 1, 2]
    assert pre.tolist() == [8.0, 6.0, 0.0, 2.0, 4.0]


def test_per_tilt_doses_and_stable_ties():
    angles = [0.0, 2.0, -2.0, 4.0]
    times = _times([0, 1, 1, 2])  # two tilts share a time stamp: section order breaks the tie
    order, pre = acquisition_order_and_pre_exposure(angles, times, [1.0, 2.0, 3.0, 4.0])
    assert order.tolist() == [0, 1, 2, 3]
    assert pre.tolist() == [0.0, 1.0, 3.0, 6.0]


def test_without_complete_date_times_section_order_is_used():
    angles = [0.0, 3.0, -3.0]
    for times in (None, [pd.NaT] * 3, _times([2, 1, 0])[:2] + [pd.NaT]):
        order, pre = acquisition_order_and_pre_exposure(angles, times, 3.0)
        assert order.tolist() == [0, 1, 2]
        assert pre.tolist() == [0.0, 3.0, 6.0]
    order, _ = acquisition_order_and_pre_exposure(
        angles, ["30-Nov-15 15:00:02", "30-Nov-15 15:00:01", "30-Nov-15 15:00:00"], 1.0)
    assert order.tolist() == [2, 1, 0]


def test_errors():
    with pytest.raises(ValueError, match="no tilts"):
        acquisition_order_and_pre_exposure([], None, 1.0)
    with pytest.raises(ValueError, match="2 doses for 3 tilts"):
        acquisition_order_and_pre_exposure([0, 1, 2], None, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown for tilt"):
        acquisition_order_and_pre_exposure([0, 1], None, [1.0, None])
    with pytest.raises(ValueError, match="non-negative"):
        acquisition_order_and_pre_exposure([0, 1], None, -1.0)
    with pytest.raises(ValueError, match="date_times"):
        acquisition_order_and_pre_exposure([0, 1], _times([0]), 1.0)


def test_pre_exposure_matches_relion5_on_empiar_10164_ts01(shared_data):
    """RELION 5 imported TS_01 with 3 e/A^2 per tilt; its pre-exposures must equal ours
    computed from the mdoc DateTimes, tilt by tilt (RELION dropped one tilt, -60)."""
    doc = read_mdoc(shared_data / "mdoc" / "tilt_series.mdoc")
    order, pre = acquisition_order_and_pre_exposure(doc.tilt_angles_deg, doc.sections["date_time"], 3.0)
    ours = dict(zip(doc.sections["movie_name"], pre))
    relion = read_tilt_series_star(real_file("star/relion5_EMPIAR-10164/tilt_series/TS_01.star"))
    names = [PureWindowsPath(p).name for p in relion["rlnMicrographMovieName"]]
    assert len(names) == 40
    np.testing.assert_array_equal([ours[n] for n in names], relion["rlnMicrographPreExposure"].to_numpy())
    assert sorted(order.tolist()) == list(range(41))
