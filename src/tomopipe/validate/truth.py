"""Read the ground truth that ``tomopipe simulate`` writes to ``DIR/truth`` (see its README)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from tomopipe.errors import InputFileError
from tomopipe.io.star import read_particles_star, read_tilt_series_star, read_tomograms_star


@dataclass(frozen=True)
class Truth:
    """Lazy access to the truth files of one simulated data set."""

    folder: Path

    @classmethod
    def find(cls, data_dir: str | Path) -> "Truth":
        """The truth of a simulated data set, given its folder (``DIR``) or ``DIR/truth``."""
        data_dir = Path(data_dir)
        for folder in (data_dir / "truth", data_dir):
            if (folder / "truth.json").is_file():
                return cls(folder)
        raise InputFileError(data_dir, "no simulation truth here (expected truth/truth.json)")

    @cached_property
    def summary(self) -> dict:
        return json.loads((self.folder / "truth.json").read_text())

    @cached_property
    def tomograms(self) -> pd.DataFrame:
        return read_tomograms_star(self.folder / "tomograms.star")

    @property
    def tilt_series_names(self) -> list[str]:
        return self.tomograms["rlnTomoName"].tolist()

    def tilts(self, ts_id: str) -> pd.DataFrame:
        """Everything per tilt, in acquisition order (``TS_tilts.csv``)."""
        return pd.read_csv(self.folder / f"{ts_id}_tilts.csv")

    def tilt_series_star(self, ts_id: str) -> pd.DataFrame:
        """True RELION 5 tilt-series table, sorted by tilt angle."""
        return read_tilt_series_star(self.folder / f"{ts_id}.star")

    def frame_shifts(self, ts_id: str) -> pd.DataFrame:
        return pd.read_csv(self.folder / f"{ts_id}_frame_shifts.csv")

    def xrays(self, ts_id: str) -> pd.DataFrame:
        """The X-ray hits' frame-pixels (``hit``, ``frame``, ``x``, ``y``, counts added)."""
        return pd.read_csv(self.folder / f"{ts_id}_xrays.csv")

    def xray_hits(self, ts_id: str) -> pd.DataFrame:
        """One row per X-ray hit: frame(s), shape, centre, size, peak counts, background, SNR."""
        return pd.read_csv(self.folder / f"{ts_id}_xray_hits.csv")

    def ice_thickness(self, ts_id: str) -> pd.DataFrame:
        """The ice slab's thickness (Å) on a grid of specimen positions (``x_A``, ``y_A``)."""
        return pd.read_csv(self.folder / f"{ts_id}_ice_thickness.csv")

    @property
    def mdoc_tilt_axis_error_deg(self) -> float:
        """The session's tilt-axis calibration error in the mdoc (°; the mdoc says truth + this)."""
        return float(self.summary.get("mdoc_tilt_axis_error_deg", 0.0))

    @cached_property
    def particles(self) -> pd.DataFrame:
        return read_particles_star(self.folder / "particles.star")[0]
