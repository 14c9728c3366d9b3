"""Which scores against the simulator's truth an output set gets: a registry of scorers by set kind
and the type of the step that wrote the set. A new step's scorer is one function decorated with
:func:`scorer` here; :func:`scores_of_set` looks it up (a set without a scorer has no scores)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tomopipe.io.mrc import read_mrc
from tomopipe.model.sets import CTF, MAPS, PARTICLES, TILT_SERIES, TILT_SERIES_MOVIES, TOMOGRAMS
from tomopipe.project.store import Project, SetRecord
from tomopipe.steps.auto_refine import refine_series
from tomopipe.validate.aligned_map_score import score_aligned_map_file
from tomopipe.validate.map_score import score_map
from tomopipe.validate.picking import score_picks
from tomopipe.validate.refinement import pose_errors, true_pose_reconstruction, true_pose_scores
from tomopipe.validate.score_alignment import score_alignment
from tomopipe.validate.scores import score_ctf, score_import, score_motion
from tomopipe.validate.tomogram import score_tomogram_set
from tomopipe.validate.truth import Truth

__all__ = ["Score", "Scorer", "scorer", "scorer_for", "scores_of_set", "TOMOGRAM_SCORE_RESOLUTION_A"]


@dataclass(frozen=True)
class Score:
    """One score of a set: ``subject`` a tilt series, or empty for the whole set."""

    subject: str
    name: str
    value: object


#: a scorer: (project, the set's record, its enabled items, the truth) -> its scores
Scorer = Callable[[Project, SetRecord, pd.DataFrame, Truth], list[Score]]

_SCORERS: dict[tuple[str, str], Scorer] = {}

TOMOGRAM_SCORE_RESOLUTION_A = 30.0  #: low-pass (Å) of the tomogram–truth correlation


def scorer(kind: str, *step_types: str) -> Callable[[Scorer], Scorer]:
    """Register the decorated function as the scorer of sets of ``kind`` written by steps of
    ``step_types`` (at least one); a (kind, step type) pair has at most one scorer."""
    if not step_types:
        raise ValueError(f"scorer({kind!r}): name the step types whose sets it scores")

    def register(function: Scorer) -> Scorer:
        for step_type in step_types:
            if (kind, step_type) in _SCORERS:
                raise ValueError(f"a scorer for {kind!r} sets of {step_type!r} is already registered")
            _SCORERS[(kind, step_type)] = function
        return function

    return register


def scorer_for(kind: str, step_type: str) -> Scorer | None:
    """The scorer of ``kind`` sets written by a ``step_type`` step, or None."""
    return _SCORERS.get((kind, step_type))


def scores_of_set(project: Project, record: SetRecord, step_type: str, truth: Truth) -> list[Score]:
    """The scores against the truth of one output set of a ``step_type`` step; empty without a scorer."""
    score_set = scorer_for(record.kind, step_type)
    if score_set is None:
        return []
    return score_set(project, record, project.read_items(record.id, enabled_only=True), truth)


def _whole_set(numbers: dict, shown: tuple[str, ...] | None = None) -> list[Score]:
    return [Score("", name, value) for name, value in numbers.items() if shown is None or name in shown]


@scorer(TILT_SERIES_MOVIES.name, "import_movies")
def _imported_movies(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    return _whole_set(score_import(items, record.attrs, truth))


@scorer(TILT_SERIES.name, "motion_ctf")
def _motion_corrected(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    return _whole_set(score_motion(items, project, truth))


@scorer(CTF.name, "motion_ctf")
def _ctf_estimates(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    return _whole_set(score_ctf(items, truth))


@scorer(TILT_SERIES.name, "align_tilt_series")
def _aligned(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """Pixels of the aligned (binned) views."""
    shown = ("max_shift_rms_px", "max_shift_rms_content_px", "max_abs_axis_error_deg", "max_abs_offset_error_deg")
    return _whole_set(score_alignment(items, record.attrs, truth), shown)


@scorer(TILT_SERIES.name, "assign_alignment")
def _assigned(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """Å: the assigned views have another pixel size than the aligned ones."""
    return _whole_set(score_alignment(items, record.attrs, truth), ("max_shift_rms_A", "max_shift_rms_content_A"))


@scorer(TOMOGRAMS.name, "reconstruct_tomogram")
def _tomograms(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """Per tilt series: correlation, FSC 0.143 and the mirror image's correlation (handedness)."""
    per_ts = score_tomogram_set(items, project, truth, resolution_A=TOMOGRAM_SCORE_RESOLUTION_A)
    return [Score(ts_id, name, value) for ts_id, score in per_ts.items()
            for name, value in (("correlation", score.correlation), ("fsc_0_143_A", score.fsc_0_143_A),
                                ("mirrored_correlation", score.mirrored_correlation))]


PICK_MATCH_DISTANCE_A = 30.0  #: the CZII challenge's match distance for apoferritin (half its radius)


@scorer(PARTICLES.name, "pick_template_matching", "pick_network")
def _picks(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """Per tomogram: precision, recall, F1, F-beta 4 at 30 Å after the free translation (against the
    true particles inside the tomogram when the set's attributes give its size); the median
    orientation error modulo the template's symmetry when the picks have orientations."""
    picking = record.attrs.get("picking", {})
    true_particles = truth.particles
    scores = []
    tomograms = record.attrs.get("tomograms", {})
    for ts_id, mine in items.groupby("ts_id", sort=True):
        frame = tomograms.get(ts_id)
        half_size_A = (tuple(0.5 * n * frame["voxel_size_A"] for n in frame["size_xyz_px"]) if frame else None)
        score = score_picks(mine, true_particles[true_particles["rlnTomoName"] == ts_id], PICK_MATCH_DISTANCE_A,
                            picking.get("symmetry", "C1"), bool(picking.get("orientation_known", False)),
                            half_size_A)
        shown = {"true_particles": score.n_true, "precision": score.precision, "recall": score.recall, "f1": score.f1,
                 "f_beta4": score.f_beta4, "median_position_error_A": score.median_position_error_A}
        if score.median_orientation_error_deg is not None:
            shown["median_orientation_error_deg"] = score.median_orientation_error_deg
        scores.extend(Score(str(ts_id), name, value) for name, value in shown.items())
    return scores


@scorer(MAPS.name, "initial_model")
def _initial_model(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """The de novo map superimposed on the true map first (it has no frame of its own): FSC 0.5 against the
    truth, and the hand (the map, not its mirror image, fits better)."""
    model = record.attrs.get("initial_model", {})
    path = project.absolute_path(items.loc[items["map_name"] == "full", "map_path"].iloc[0])
    score = score_aligned_map_file(path, truth, model.get("symmetry", "C1"), model.get("params", {}).get(
        "mask_diameter_A"))
    return _whole_set({"fsc_0_5_truth_A": score.resolution_fsc_0_5_A, "right_hand": score.right_hand,
                       "map_correlation": score.correlation,
                       "other_hand_map_correlation": score.other_hand_correlation})


@scorer(MAPS.name, "auto_refine")
def _refined_map(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """Gold-standard resolution against Nyquist; the refined particles' orientation and offset errors; the
    map put on the truth's frame by the frame those give (more precise than a map-to-map search: the mean
    of every particle's) and scored (FSC 0.5, hand); the map the same crops give with the true poses and
    the ratios to it (:mod:`tomopipe.validate.refinement`)."""
    attrs = record.attrs
    symmetry, mask_A = attrs.get("symmetry", "C1"), float(attrs["refinement"]["mask_diameter_A"])
    full = items.loc[items["map_name"] == "full"].iloc[0]
    voxel_A = float(full["voxel_size_A"])
    particles = project.sets_of_run(record.run_id)["subtomograms"]
    rows = project.read_items(particles.id, enabled_only=True)
    errors = pose_errors(rows, truth, symmetry)
    volume = torch.from_numpy(np.ascontiguousarray(read_mrc(project.absolute_path(full["map_path"]))[0], np.float32))
    score = score_map(errors.map_in_truth_frame(volume, voxel_A), voxel_A, truth, mask_A)
    groups = [(str(ts_id), group) for ts_id, group in rows.groupby("ts_id", sort=True)]
    series = [refine_series(project.absolute_path, group.to_dict("records"), particles.attrs, ts_id, mask_A / voxel_A,
                            "cpu") for ts_id, group in groups]
    maps, curve = true_pose_reconstruction(series, [g for _, g in groups], truth, symmetry, 2, "cpu")
    limit = true_pose_scores(maps, curve, voxel_A, truth, mask_A)
    gold_A = float(attrs["resolution_A"])
    return _whole_set({"gold_standard_A": round(gold_A, 2), "nyquist_A": round(2 * voxel_A, 2),
                       "gold_over_nyquist": round(gold_A / (2 * voxel_A), 3),
                       "fsc_0_5_truth_A": score.resolution_fsc_0_5_A, "right_hand": score.right_hand,
                       "gold_truth_disagreement": round(abs(gold_A / score.resolution_fsc_0_5_A - 1.0), 3),
                       **errors.summary(), **limit,
                       "truth_resolution_over_true_pose_map": round(
                           score.resolution_fsc_0_5_A / limit["true_pose_fsc_0_5_truth_A"], 3)})


@scorer(MAPS.name, "postprocess")
def _postprocessed_map(project: Project, record: SetRecord, items: pd.DataFrame, truth: Truth) -> list[Score]:
    """The masked, phase-randomisation-corrected gold-standard resolution and the B-factor (the map against
    the truth is the refinement's row: the same half maps)."""
    result = record.attrs["postprocess"]
    return _whole_set({"resolution_A": round(float(result["resolution_A"]), 2),
                       "b_factor_A2": result.get("b_factor_A2")})
