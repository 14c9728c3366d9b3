"""Tilt-series views straight from a simulated data set, for testing and benchmarking the steps
that follow motion correction (alignment) against the twin's truth without running the steps
before them.

A view is the sum of its movie's frames divided by the gain reference (no motion correction: the
twin should be simulated without beam-induced motion for that to be a good sum), binned as
``preprocess`` bins (:func:`tomopipe.algorithms.normalize.bin_image`). The tilt angles, the tilt
axis of the arrays and the doses are read from the mdoc as ``import_movies`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.normalize import bin_image
from tomopipe.errors import InputFileError
from tomopipe.io.mdoc import dose_per_tilt_e_per_A2, read_mdoc
from tomopipe.io.movies import read_gain, read_movie
from tomopipe.model.acquisition import mdoc_axis_for_movies

__all__ = ["TwinViews", "twin_views"]


@dataclass
class TwinViews:
    ts_id: str
    images: torch.Tensor  #: [n, y, x] float32, sorted by tilt angle
    tilt_angles_deg: torch.Tensor  #: [n] the mdoc's (stage) tilt angles, sorted
    tilt_axis_deg: float  #: the mdoc's axis for the arrays as read (not the truth)
    dose_e_per_A2: torch.Tensor  #: [n] per-view dose from the mdoc
    pixel_size_A: float  #: of ``images`` (raw pixel size × the actual binning)

    def items(self, fit) -> pd.DataFrame:
        """A ``tilt_series`` item table with the alignment columns of ``fit``
        (:class:`~tomopipe.algorithms.align_fit.FitResult`), for
        :func:`tomopipe.validate.score_alignment.score_alignment`."""
        shifts_A = fit.shifts_px.numpy() * self.pixel_size_A
        return pd.DataFrame({"ts_id": self.ts_id, "tilt_angle_deg": self.tilt_angles_deg.numpy(),
                             "enabled": True, "rot_z_deg": fit.rot_z_deg.numpy(), "rot_y_deg": fit.tilt_deg.numpy(),
                             "rot_x_deg": 0.0, "shift_x_A": shifts_A[:, 0], "shift_y_A": shifts_A[:, 1],
                             "magnification": fit.magnification.numpy()})

    @property
    def attrs(self) -> dict:
        return {"tilt_series": {self.ts_id: {"pixel_size_A": self.pixel_size_A}}}


def twin_views(data_dir: str | Path, ts_id: str, binning: float = 1.0) -> TwinViews:
    """Views of tilt series ``ts_id`` of the simulated data set in ``data_dir`` (its mdoc, movies and
    ``gain_ref.mrc``), binned by ``binning``."""
    folder = Path(data_dir)
    mdoc_path = folder / f"{ts_id}.mdoc"
    mdoc = read_mdoc(mdoc_path)
    sections = mdoc.sections.sort_values("tilt_angle_deg").reset_index(drop=True)
    gain_path = folder / "gain_ref.mrc"
    gain = read_gain(gain_path).astype(np.float64) if gain_path.is_file() else None
    views, doses = [], []
    for section in sections.itertuples(index=False):
        movie = folder / Path(str(section.movie_name).replace("\\", "/")).name
        frames = read_movie(movie).astype(np.float64)
        total = frames.sum(0)
        if gain is not None:
            if gain.shape != total.shape:
                raise InputFileError(gain_path, f"gain of {gain.shape} px does not match {movie.name} ({total.shape})")
            total = total / np.where(gain > 0, gain, 1.0)
        views.append(bin_image(torch.from_numpy(total), binning).to(torch.float32))
        dose = dose_per_tilt_e_per_A2(section._asdict(), mdoc.pixel_size_A)
        if dose is None:
            raise InputFileError(mdoc_path, f"no dose for the section of {movie.name}")
        doses.append(dose)
    images = torch.stack(views)
    factor = float(frames.shape[-1]) / images.shape[-1]
    axis = mdoc_axis_for_movies(mdoc.tilt_axis_angle_deg, movie, tomo5=False)
    return TwinViews(ts_id, images, torch.tensor(sections["tilt_angle_deg"].to_numpy(float), dtype=torch.float64),
                     axis, torch.tensor(doses, dtype=torch.float64), float(mdoc.pixel_size_A) * factor)
