"""Read what the report shows from a project (read only): runs, sets, items and their files, turned into
plain data (numpy arrays, floats, strings) for :mod:`tomopipe.report.figures` and :mod:`tomopipe.report.html`.

Which run is shown: for each run name (a workflow step) the newest run; its figures when it finished,
its error when it failed. Data of a kind come from the newest finished set of that kind that has them (the
CTF with the exclusions of a later ``exclude_views``, the alignment residuals of ``align_tilt_series``...).
Anything absent (a project stopped after the tomograms, a file deleted since) is left out, never an error:
:attr:`ReportData.notes` says what was left out and why.

Units: Å, degrees, 1/Å for spatial frequencies; tomogram slices are ``[rows, columns]`` with row 0 at the
bottom (XY: rows = y; XZ: rows = z), downsampled by an integer factor to at most :data:`MAX_SLICE_PX` per side;
pick circles are (column, row, radius) in pixels of that slice: the particle sphere's section by the slice's
plane.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.io.mrc import read_mrc
from tomopipe.model.sets import CTF, MAPS, PARTICLES, TILT_SERIES, TOMOGRAMS
from tomopipe.project.store import Project, RunRecord, SetRecord

__all__ = ["MapView", "PickingView", "ReportData", "TiltSeriesView", "collect", "downsample", "pick_circles",
           "MAX_SLICE_PX", "MAP_STEP_TYPES", "PICK_STEP_TYPES"]

MAX_SLICE_PX = 512  #: tomogram slices are binned (integer factor, block mean) to at most this many pixels a side
MAX_HISTOGRAM_VALUES = 1_000_000  #: score-map values histogrammed at most (an even stride over the voxels)
DEFAULT_PARTICLE_DIAMETER_A = 150.0  #: circle size of picks when no step gives a diameter
PICK_STEP_TYPES = ("pick_template_matching", "pick_network")
MAP_STEP_TYPES = ("initial_model", "reconstruct_particle", "auto_refine", "postprocess")


@dataclass
class TiltSeriesView:
    """Per-view data of one tilt series; any part may be missing (None)."""

    ts_id: str
    motion: dict | None = None  #: tilt_angle_deg, total_A, traces {tilt angle: [frames, 2] Å}
    ctf: dict | None = None  #: tilt_angle_deg, defocus_u_A, defocus_v_A, fit_resolution_A, enabled
    alignment: dict | None = None  #: tilt_angle_deg, residual_px, enabled
    tomogram: dict | None = None  #: xy, xz slices, circles_xy, circles_xz, voxel_size_A, binning, size_xyz_px


@dataclass
class PickingView:
    run_name: str
    step_type: str
    ts_id: str
    picks_scores: np.ndarray
    background_scores: np.ndarray  #: score-map values inside the searched region (empty without a score map)
    threshold: float | None


@dataclass
class MapView:
    """A map-making run: FSC curves over ``frequencies_per_A`` (shell 0 = the mean), the resolutions that go with
    them, the per-iteration log, the map to slice and, for a post-processing, its Guinier plot."""

    run_name: str
    step_type: str
    voxel_size_A: float
    frequencies_per_A: np.ndarray | None = None
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    resolutions_A: dict[str, float] = field(default_factory=dict)
    iterations: list[int] = field(default_factory=list)
    iteration_resolution_A: list[float] = field(default_factory=list)
    iteration_label: str = "resolution (Å)"
    iteration_curves: dict[str, np.ndarray] = field(default_factory=dict)
    volume: np.ndarray | None = None
    volume_name: str = ""
    guinier: dict | None = None
    facts: dict[str, object] = field(default_factory=dict)  #: numbers shown as text (resolution, B-factor ...)


@dataclass
class ReportData:
    project_folder: Path
    runs: list[RunRecord]
    shown: dict[str, RunRecord]  #: the newest run of each name, in workflow (run id) order
    outputs: dict[int, dict[str, SetRecord]]  #: output sets of each shown run
    tilt_series: list[TiltSeriesView]
    picking: list[PickingView]
    maps: list[MapView]
    truth_folder: Path | None
    scores: list[dict]  #: the demo's scores.json beside the project, when there is one
    notes: list[str]


def downsample(image: np.ndarray, max_px: int = MAX_SLICE_PX) -> tuple[np.ndarray, int]:
    """``image`` ``[rows, columns]`` binned by the smallest integer factor that brings both sides to at most
    ``max_px`` (block mean; rows and columns that do not fill a block are dropped); returns (image, factor)."""
    image = np.asarray(image, np.float32)
    factor = max(1, math.ceil(max(image.shape) / max_px))
    if factor == 1:
        return image, 1
    rows, columns = (n // factor * factor for n in image.shape)
    blocks = image[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    return blocks.mean(axis=(1, 3)), factor


def pick_circles(centres_px: np.ndarray, plane_px: float, radius_px: float) -> np.ndarray:
    """The sections of spheres by a plane: ``centres_px`` ``[n, 3]`` (column, row, depth) in pixels, the plane
    at depth ``plane_px``; returns ``[m, 3]`` (column, row, section radius) of the spheres it cuts."""
    centres = np.asarray(centres_px, float).reshape(-1, 3)
    depth = np.abs(centres[:, 2] - plane_px)
    cut = depth < radius_px
    return np.column_stack([centres[cut, 0], centres[cut, 1], np.sqrt(radius_px**2 - depth[cut] ** 2)])


# ----------------------------------------------------------------------------- runs and sets
def _shown_runs(runs: list[RunRecord]) -> dict[str, RunRecord]:
    newest: dict[str, RunRecord] = {}
    for run in runs:
        newest[run.name] = run  # runs() is ordered by id
    return dict(sorted(newest.items(), key=lambda item: item[1].id))


def _newest_set(shown: dict[str, RunRecord], outputs: dict[int, dict[str, SetRecord]], kind: str,
                step_types: tuple[str, ...] | None = None) -> tuple[RunRecord, SetRecord] | None:
    """The newest set of ``kind`` written by a shown, finished run (of one of ``step_types``)."""
    found = None
    for run in shown.values():
        if run.status != "finished" or (step_types and run.step_type not in step_types):
            continue
        for record in outputs.get(run.id, {}).values():
            if record.kind == kind and (found is None or record.id > found[1].id):
                found = (run, record)
    return found


# ----------------------------------------------------------------------------- tilt series
def _motion(project: Project, items: pd.DataFrame, notes: list[str]) -> dict:
    traces: dict[float, np.ndarray] = {}
    for path in items["motion_path"].dropna().unique() if "motion_path" in items else ():
        file = project.absolute_path(path)
        try:
            document = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            notes.append(f"motion trajectories left out: {file} cannot be read ({error})")
            continue
        angle_of = dict(zip(items["tilt_index"].astype(int), items["tilt_angle_deg"].astype(float)))
        for tilt in document.get("tilts", []):
            if int(tilt["tilt_index"]) in angle_of and tilt.get("shifts_A"):
                traces[angle_of[int(tilt["tilt_index"])]] = np.asarray(tilt["shifts_A"], float)
    return {"tilt_angle_deg": items["tilt_angle_deg"].to_numpy(float),
            "total_A": items["motion_total_A"].to_numpy(float), "traces": traces}


def _enabled_views(items: pd.DataFrame, later: pd.DataFrame | None) -> np.ndarray:
    """A view is excluded when any of the two sets disables it (the later set keyed by tilt_index)."""
    enabled = items["enabled"].to_numpy(bool)
    if later is not None:
        flags = dict(zip(later["tilt_index"].astype(int), later["enabled"].astype(bool)))
        enabled = enabled & np.array([flags.get(int(i), True) for i in items["tilt_index"]], bool)
    return enabled


def _binned_px(coordinate_px: np.ndarray, factor: int) -> np.ndarray:
    """Pixel coordinate (pixel i centred at i) after a block mean by ``factor``."""
    return (np.asarray(coordinate_px, float) - 0.5 * (factor - 1)) / factor


def _tomogram(project: Project, row: pd.Series, picks: pd.DataFrame | None, diameter_A: float,
              notes: list[str]) -> dict | None:
    from tomopipe.algorithms.geometry import centred_A_to_pixels

    path = project.absolute_path(row["tomogram_path"])
    try:
        volume, voxel_A = read_mrc(path, mmap=True)
        nz, ny, nx = volume.shape
        xy, factor_xy = downsample(np.asarray(volume[nz // 2]))
        xz, factor_xz = downsample(np.asarray(volume[:, ny // 2, :]))
    except Exception as error:  # noqa: BLE001 - any unreadable file is left out, with the reason
        notes.append(f"tomogram {row['ts_id']} left out: {path} cannot be read ({error})")
        return None
    radius_px = 0.5 * diameter_A / voxel_A
    circles_xy = circles_xz = np.zeros((0, 3))
    if picks is not None and len(picks):
        x, y, z = centred_A_to_pixels(np.array(picks[["x_A", "y_A", "z_A"]], np.float64), (nx, ny, nz),
                                      voxel_A).numpy().T
        circles_xy = pick_circles(np.column_stack([x, y, z]), nz // 2, radius_px)
        circles_xz = pick_circles(np.column_stack([x, z, y]), ny // 2, radius_px)
        for circles, factor in ((circles_xy, factor_xy), (circles_xz, factor_xz)):
            circles[:, :2] = _binned_px(circles[:, :2], factor)
            circles[:, 2] /= factor
    return {"xy": xy, "xz": xz, "circles_xy": circles_xy, "circles_xz": circles_xz, "voxel_size_A": voxel_A,
            "binning_xy": factor_xy, "binning_xz": factor_xz, "size_xyz_px": (nx, ny, nz),
            "slice_z_px": nz // 2, "slice_y_px": ny // 2, "picks": 0 if picks is None else len(picks)}


def _picks_and_diameter(project, shown, outputs) -> tuple[pd.DataFrame | None, float]:
    found = _newest_set(shown, outputs, PARTICLES.name)
    if found is None:
        return None, DEFAULT_PARTICLE_DIAMETER_A
    run, record = found
    diameter = (record.attrs.get("picking") or {}).get("particle_diameter_A") or run.params.get(
        "particle_diameter_A") or DEFAULT_PARTICLE_DIAMETER_A
    return project.read_items(record.id, enabled_only=True), float(diameter)


def _tilt_series(project: Project, shown, outputs, notes: list[str]) -> list[TiltSeriesView]:
    views: dict[str, TiltSeriesView] = {}

    def view(ts_id) -> TiltSeriesView:
        return views.setdefault(str(ts_id), TiltSeriesView(str(ts_id)))

    latest_ts = _newest_set(shown, outputs, TILT_SERIES.name)
    latest = project.read_items(latest_ts[1].id) if latest_ts else None

    def later_of(ts_id):
        return None if latest is None else latest[latest["ts_id"] == ts_id]

    motion = _newest_set(shown, outputs, TILT_SERIES.name, ("motion_ctf",))
    if motion is not None:
        items = project.read_items(motion[1].id)
        if "motion_total_A" in items:
            for ts_id, group in items.groupby("ts_id", sort=True):
                view(ts_id).motion = _motion(project, group.sort_values("tilt_index"), notes)
    ctf = _newest_set(shown, outputs, CTF.name)
    if ctf is not None:
        items = project.read_items(ctf[1].id)
        for ts_id, group in items.groupby("ts_id", sort=True):
            group = group.sort_values("tilt_index")
            if "tilt_angle_deg" not in group or group["tilt_angle_deg"].isna().all():
                continue
            view(ts_id).ctf = {
                "tilt_angle_deg": group["tilt_angle_deg"].to_numpy(float),
                "defocus_u_A": group["defocus_u_A"].to_numpy(float),
                "defocus_v_A": group["defocus_v_A"].to_numpy(float),
                "fit_resolution_A": group["fit_resolution_A"].to_numpy(float) if "fit_resolution_A" in group else None,
                "enabled": _enabled_views(group, later_of(ts_id))}
    aligned = _newest_set(shown, outputs, TILT_SERIES.name, ("align_tilt_series",))
    if aligned is not None:
        items = project.read_items(aligned[1].id)
        if "align_residual_px" in items and items["align_residual_px"].notna().any():
            for ts_id, group in items.groupby("ts_id", sort=True):
                group = group.sort_values("tilt_index")
                view(ts_id).alignment = {"tilt_angle_deg": group["tilt_angle_deg"].to_numpy(float),
                                         "residual_px": group["align_residual_px"].to_numpy(float),
                                         "enabled": _enabled_views(group, later_of(ts_id))}
    tomograms = _newest_set(shown, outputs, TOMOGRAMS.name)
    if tomograms is not None:
        picks, diameter_A = _picks_and_diameter(project, shown, outputs)
        for _, row in project.read_items(tomograms[1].id, enabled_only=True).iterrows():
            mine = None if picks is None else picks[picks["ts_id"] == row["ts_id"]]
            view(row["ts_id"]).tomogram = _tomogram(project, row, mine, diameter_A, notes)
    return [views[name] for name in sorted(views)]


# ----------------------------------------------------------------------------- picking
def _picking(project: Project, shown, outputs, notes: list[str]) -> list[PickingView]:
    found = []
    for run in shown.values():
        if run.step_type not in PICK_STEP_TYPES or run.status != "finished":
            continue
        record = next((r for r in outputs.get(run.id, {}).values() if r.kind == PARTICLES.name), None)
        if record is None:
            continue
        picks = project.read_items(record.id)
        score_maps = (record.attrs.get("picking") or {}).get("score_maps") or {}
        per_ts = (run.summary or {}).get("picks") or {}
        for ts_id, group in picks.groupby("ts_id", sort=True):
            summary = per_ts.get(str(ts_id)) if isinstance(per_ts, dict) else None
            threshold = (summary or {}).get("threshold") if isinstance(summary, dict) else None
            if threshold is None and run.step_type == "pick_network":
                threshold = run.params.get("threshold")
            background = np.zeros(0, np.float32)
            if str(ts_id) in score_maps:
                path = project.absolute_path(score_maps[str(ts_id)])
                try:
                    values = np.asarray(read_mrc(path, mmap=True)[0]).reshape(-1)
                    values = values[:: max(1, values.size // MAX_HISTOGRAM_VALUES)]
                    background = values[values != 0]  # the step writes 0 outside the searched region
                except Exception as error:  # noqa: BLE001
                    notes.append(f"score map of {ts_id} ({run.name}) left out: {path} cannot be read ({error})")
            found.append(PickingView(run.name, run.step_type, str(ts_id), group["score"].to_numpy(float),
                                     np.asarray(background, np.float32),
                                     None if threshold is None else float(threshold)))
    return found


# ----------------------------------------------------------------------------- maps
def _map_volume(project: Project, items: pd.DataFrame, names: tuple[str, ...], run_name: str,
                notes: list[str]) -> tuple[np.ndarray | None, str]:
    """The first map of ``names`` the set has, read (None and a note when its file cannot be read)."""
    for name in names:
        rows = items[items["map_name"] == name]
        if len(rows):
            path = project.absolute_path(rows["map_path"].iloc[0])
            try:
                return np.array(read_mrc(path)[0], np.float32), name
            except Exception as error:  # noqa: BLE001 - the curves stay; the map's figures go, with the reason
                notes.append(f"{run_name}: the {name} map left out: {path} cannot be read ({error})")
                return None, ""
    return None, ""


def _truth_curve(project: Project, view: MapView, run: RunRecord, outputs, record: SetRecord, truth) -> None:
    """The refined map on the truth's frame and its FSC against the true map, as the demo scores it
    (:mod:`tomopipe.validate.refinement`: the frame from every refined particle; a subset moves the map's centre
    by tenths of an Å and the FSC 0.5 resolution by up to 3 % on the reduced demo, so none is taken)."""
    import torch

    from tomopipe.validate.map_score import score_map
    from tomopipe.validate.refinement import pose_errors

    particles = outputs[run.id].get("subtomograms")
    if particles is None or view.volume is None or view.frequencies_per_A is None:
        return
    rows = project.read_items(particles.id, enabled_only=True)
    errors = pose_errors(rows, truth, record.attrs.get("symmetry", "C1"))
    mask_A = float(record.attrs["refinement"]["mask_diameter_A"])
    moved = errors.map_in_truth_frame(torch.from_numpy(np.ascontiguousarray(view.volume)), view.voxel_size_A)
    score = score_map(moved, view.voxel_size_A, truth, mask_A)
    view.curves["against the truth"] = np.asarray(score.fsc_truth, float)
    view.facts["FSC 0.5 against the truth (Å)"] = round(float(score.resolution_fsc_0_5_A), 2)
    view.facts["orientation error, median (°)"] = errors.summary()["orientation_error_median_deg"]


def _guinier(project: Project, items: pd.DataFrame, result: dict) -> dict | None:
    """The Guinier plot the post-processing fitted, computed again from its half maps, mask and corrected FSC
    (the FSC-weighted, masked average; :func:`tomopipe.algorithms.postprocess.guinier_plot`)."""
    import torch

    from tomopipe.algorithms.postprocess import _fsc_weights, _shell_lookup, guinier_plot

    fit = result.get("guinier")
    if not fit or not result.get("fsc_corrected"):
        return None
    volumes = {}
    for name in ("half1", "half2", "mask"):
        rows = items[items["map_name"] == name]
        if not len(rows):
            return None
        volumes[name] = torch.from_numpy(np.array(read_mrc(project.absolute_path(rows["map_path"].iloc[0]))[0],
                                                  np.float32)).double()
    n = int(volumes["half1"].shape[0])
    voxel_A = float(items["voxel_size_A"].iloc[0])
    fitted = 0.5 * (volumes["half1"] + volumes["half2"]) * volumes["mask"]
    weights = _shell_lookup(_fsc_weights(torch.tensor(result["fsc_corrected"], dtype=torch.float64)), n)
    fit_low_A = float((result.get("params") or {}).get("fit_low_A", 10.0))
    plot = guinier_plot(torch.fft.rfftn(fitted) * weights, n, voxel_A, fit_low_A, float(result["resolution_A"]))
    return {"inv_resolution_sq_per_A2": plot.inv_resolution_sq_per_A2.numpy(),
            "ln_amplitude": plot.ln_amplitude.numpy(), "fit_used": plot.fit_used.numpy(),
            "slope_A2": float(fit["slope_A2"]), "intercept": float(fit["intercept"]),
            "recomputed_slope_A2": plot.slope_A2}


def _map_view(project: Project, run: RunRecord, record: SetRecord, outputs, truth, notes: list[str]) -> MapView:
    items = project.read_items(record.id, enabled_only=True)
    attrs = record.attrs
    view = MapView(run.name, run.step_type, float(items["voxel_size_A"].iloc[0]))
    summary = run.summary or {}
    if run.step_type == "initial_model":
        log = (attrs.get("initial_model") or {}).get("log") or []
        view.iterations = [int(entry["iteration"]) for entry in log]
        view.iteration_resolution_A = [float(entry["resolution_A"]) for entry in log]
        view.iteration_label = "resolution used (Å)"
        view.facts["final resolution used (Å)"] = summary.get("final_resolution_A")
        view.volume, view.volume_name = _map_volume(project, items, ("full", "initial"), run.name, notes)
    elif run.step_type in ("auto_refine", "reconstruct_particle"):
        curves = attrs.get("fsc") or {}
        if curves.get("fsc"):
            view.frequencies_per_A = np.asarray(curves["shell_frequencies_per_A"], float)
            view.curves["gold standard"] = np.asarray(curves["fsc"], float)
            view.resolutions_A["gold standard"] = float(attrs["resolution_A"])
        if curves.get("fsc_masked"):
            view.curves["gold standard, masked"] = np.asarray(curves["fsc_masked"], float)
            if curves.get("resolution_masked_A"):
                view.resolutions_A["gold standard, masked"] = float(curves["resolution_masked_A"])
        view.facts["gold-standard resolution (Å)"] = round(float(attrs["resolution_A"]), 2)
        view.facts["Nyquist (Å)"] = round(2 * view.voxel_size_A, 2)
        for entry in attrs.get("iterations") or []:
            view.iterations.append(int(entry["iteration"]))
            view.iteration_resolution_A.append(float(entry["resolution_A"]))
            if entry.get("fsc"):
                view.iteration_curves[f"iteration {int(entry['iteration'])}"] = np.asarray(entry["fsc"], float)
        view.volume, view.volume_name = _map_volume(project, items, ("full",), run.name, notes)
        if run.step_type == "auto_refine" and truth is not None:
            try:
                _truth_curve(project, view, run, outputs, record, truth)
            except Exception as error:  # noqa: BLE001 - the truth is a bonus: say why it is missing
                notes.append(f"{run.name}: FSC against the truth left out ({error})")
    elif run.step_type == "postprocess":
        result = attrs.get("postprocess") or {}
        view.frequencies_per_A = np.asarray(result.get("shell_frequencies_per_A") or [], float)
        for key, label in (("fsc_unmasked", "unmasked"), ("fsc_masked", "masked"),
                           ("fsc_randomised_masked", "phase-randomised, masked"), ("fsc_corrected", "corrected")):
            if result.get(key):
                view.curves[label] = np.asarray(result[key], float)
        if "corrected" in view.curves:
            view.resolutions_A["corrected"] = float(result["resolution_A"])
        view.facts["resolution, corrected FSC 0.143 (Å)"] = round(float(result["resolution_A"]), 2)
        view.facts["B-factor (Å²)"] = round(float(result.get("b_factor_A2", 0.0)), 1)
        view.facts["mask"] = result.get("mask")
        try:
            view.guinier = _guinier(project, items, result)
        except Exception as error:  # noqa: BLE001
            notes.append(f"{run.name}: Guinier plot left out ({error})")
        view.volume, view.volume_name = _map_volume(project, items, ("masked", "sharpened", "full"), run.name, notes)
    if view.frequencies_per_A is not None and not len(view.frequencies_per_A):
        view.frequencies_per_A = None
    return view


def _maps(project: Project, shown, outputs, truth, notes: list[str]) -> list[MapView]:
    views = []
    for run in shown.values():
        if run.step_type not in MAP_STEP_TYPES or run.status != "finished":
            continue
        record = next((r for r in outputs.get(run.id, {}).values() if r.kind == MAPS.name), None)
        if record is None:
            continue
        try:
            views.append(_map_view(project, run, record, outputs, truth, notes))
        except Exception as error:  # noqa: BLE001 - a damaged run is left out, with the reason
            notes.append(f"{run.name}: maps left out ({type(error).__name__}: {error})")
    return views


# ----------------------------------------------------------------------------- the whole project
def _truth_folder(shown: dict[str, RunRecord]):
    """The simulator's truth of the data the import read (``files_directory``), when there is one."""
    from tomopipe.validate.truth import Truth

    for run in shown.values():
        if run.step_type == "import_movies" and run.params.get("files_directory"):
            try:
                return Truth.find(run.params["files_directory"])
            except Exception:  # noqa: BLE001 - real data have no truth
                return None
    return None


def collect(project: Project) -> ReportData:
    """Everything the report shows, read from ``project``."""
    runs = project.runs()
    shown = _shown_runs(runs)
    outputs = {run.id: project.sets_of_run(run.id) for run in shown.values()}
    notes: list[str] = []
    truth = _truth_folder(shown)
    scores_path = project.folder.parent / "scores.json"
    scores = []
    if scores_path.is_file():
        try:
            scores = [r for r in json.loads(scores_path.read_text(encoding="utf-8")) if isinstance(r, dict)]
        except ValueError as error:
            notes.append(f"{scores_path} left out: not JSON ({error})")
    return ReportData(
        project_folder=project.folder, runs=runs, shown=shown, outputs=outputs,
        tilt_series=_guarded(notes, "tilt-series figures", _tilt_series, project, shown, outputs, notes),
        picking=_guarded(notes, "picking figures", _picking, project, shown, outputs, notes),
        maps=_guarded(notes, "map figures", _maps, project, shown, outputs, truth, notes),
        truth_folder=None if truth is None else truth.folder, scores=scores, notes=notes)


def _guarded(notes: list[str], what: str, function, *args) -> list:
    """``function(*args)``, or an empty list and a note when the project holds something it cannot read (a
    damaged or hand-edited project still gets the rest of its report)."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - the report shows what it can and says what it left out
        notes.append(f"{what} left out ({type(error).__name__}: {error})")
        return []
