"""Scores of a tomogram against the simulator's true specimen: :mod:`.render` (the true specimen on
the tomogram's grid), :mod:`.register` (translation search), :mod:`.score` (correlation, FSC,
mirror image; :class:`TomogramScore`). ``python -m tomopipe.validate.tomogram`` scores a run."""

from tomopipe.validate.tomogram.render import (
    fourier_upsample,
    specimen_volume,
    true_specimen_for_tomogram,
    truth_map_for_voxel_size,
)
from tomopipe.validate.tomogram.score import (
    TomogramScore,
    score_tomogram,
    score_tomogram_against_truth,
    score_tomogram_set,
)

__all__ = [
    "TomogramScore",
    "fourier_upsample",
    "score_tomogram",
    "score_tomogram_against_truth",
    "score_tomogram_set",
    "specimen_volume",
    "true_specimen_for_tomogram",
    "truth_map_for_voxel_size",
]
