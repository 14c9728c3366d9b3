"""Seed step "warp - tilt-series motion and ctf estimation": align the frames of every tilt,
sum them with dose weighting, and estimate each tilt's CTF (tilt-aware).

Per tilt series (one task of the executor): the movies are read (EER: grouped by ``eer_fraction``
or ``eer_group_exposure_e_per_A2``), multiplied by the import step's oriented gain, cleared of
single-frame outliers (X-ray hits: ``remove_frame_outliers``,
:func:`tomopipe.algorithms.frame_outliers.find_frame_outliers`), their motion is estimated
(:func:`tomopipe.algorithms.motion.estimate_motion`, the seed's grid X x Y x temporal), and the
aligned, dose-weighted sums are written as one MRC stack sorted by ``tilt_index`` (even/odd half
sums as two more stacks). Frame doses: the tilt's pre-exposure plus
the part of its dose received by the end of each frame.

Trajectories per tilt series: ``TS_motion.csv`` (per frame: global shift (x, y) in Å, content
displacement relative to the mean position, the unsmoothed measurement, the accumulated dose) and
``TS_motion.json`` (the complete models, local fields included; ``MotionModel.from_dict``).
Item columns added to the tilt-series set: ``image_path``, ``image_section``, ``motion_path``,
``motion_total_A`` (path length), ``motion_iterations``, ``motion_significant`` (False: no
significant motion signal, frames summed unshifted), ``frame_outlier_pixels`` (frame-pixels
replaced as single-frame outliers) and, with ``even_odd``,
``image_even_path`` / ``image_odd_path``.

CTF: ``use_movie_average = false`` (the seed's choice, Warp's default) fits the sum of the
aligned frames' power spectra (each tilt's window spectra are made as soon as it is aligned: one
tilt's frames in memory at a time, the sums streamed to their stacks); ``true`` fits the
spectrum of the aligned, dose-weighted sum, whose Thon rings are F times stronger relative to
the shot noise (better at tomography's low dose per tilt).

Defocus handedness (RELION ``rlnTomoHand``, ``Δf = Δf_centre + hand·z_P``): every tilt with
|tilt| ≥ 9.5° is fitted with both hands and the fit scores decide
(:func:`tomopipe.algorithms.ctf_estimate.handedness_evidence`). ``defocus_hand = auto`` fits with
the data's hand when it is clear, else with −1 and a warning; ``-1`` / ``1`` fit with that hand and
warn when the data clearly support the other. The hand used is the ctf items' ``defocus_hand`` and
``defocus_hand`` of each tilt series' acquisition in the attributes of both output sets (the later
steps read it there); the evidence is in the ctf set's ``handedness`` attribute and the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.ctf_estimate import CtfSeriesPlan, fit_tilt_series_ctf, plan_tilt_series_ctf, tilt_spectra
from tomopipe.algorithms.frame_outliers import find_frame_outliers, replace_frame_outliers
from tomopipe.algorithms.motion import align_and_sum, apply_gain, estimate_motion
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.movies import EER_SUFFIXES, movie_info, read_movie
from tomopipe.io.mrc import mrc_stack_writer, read_mrc, write_mrc
from tomopipe.model.sets import CTF, TILT_SERIES, TILT_SERIES_MOVIES
from tomopipe.steps.base import DEVICE_PARAM, compute_device, missing_numbers

log = logging.getLogger("tomopipe")

MOVIE_COLUMNS = ("movie_path", "frame_count")


def _read_gain(gain_path: str | None) -> torch.Tensor | None:
    if not gain_path:
        return None
    gain, _ = read_mrc(gain_path)
    if gain.ndim == 3:
        gain = gain[0]
    return torch.from_numpy(np.ascontiguousarray(gain, dtype=np.float32))


def eer_frames_per_group(n_eer_frames: int, tilt_dose_e_per_A2: float, eer_fraction: int,
                         group_exposure_e_per_A2: float | None) -> int:
    """EER frames summed into one movie frame: ``eer_fraction``, or, when a group exposure is given,
    the number of EER frames that receive that exposure (at least 1, at most all of them)."""
    if group_exposure_e_per_A2 is None:
        return max(1, min(int(eer_fraction), n_eer_frames))
    if tilt_dose_e_per_A2 <= 0:
        raise TomopipeError("eer_group_exposure_e_per_A2 needs the dose of the tilt, but the tilt's dose is 0")
    per_eer_frame = tilt_dose_e_per_A2 / n_eer_frames
    return max(1, min(n_eer_frames, int(round(group_exposure_e_per_A2 / per_eer_frame))))


def read_frames(movie_path: Path, tilt_dose_e_per_A2: float, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``[n, y, x]`` of one tilt movie and the fraction of the tilt's dose received by the
    end of each frame ``[n]`` (EER: frames grouped as the parameters say, the last group takes the
    remainder, RELION style)."""
    if movie_path.suffix.lower() in EER_SUFFIXES:
        n_eer = movie_info(movie_path)[0]
        group = eer_frames_per_group(n_eer, tilt_dose_e_per_A2, params["eer_fraction"],
                                     params["eer_group_exposure_e_per_A2"])
        frames = read_movie(movie_path, eer_frames_per_group=group)
        ends = np.array([(i + 1) * group for i in range(frames.shape[0])], dtype=float)
        ends[-1] = n_eer
        return frames, ends / n_eer
    frames = read_movie(movie_path)
    return frames, np.arange(1, frames.shape[0] + 1, dtype=float) / max(frames.shape[0], 1)


def _trajectory_length_A(shifts_A: torch.Tensor) -> float:
    """Total path length of a trajectory [frames, 2] (Å)."""
    return float((shifts_A[1:] - shifts_A[:-1]).norm(dim=-1).sum())


def process_tilt_series(task: dict) -> dict:
    """Motion-correct (and CTF-estimate) the tilts of one tilt series; write its files.

    ``task``: ``ts_id``, ``tilts`` (list of dicts with tilt_index, tilt_angle_deg, movie_path,
    dose_e_per_A2, pre_exposure_e_per_A2), ``acquisition``, ``gain_path`` (absolute or None),
    ``params`` (the step's), ``folder`` (absolute). Returns per-tilt results and file paths.
    """
    start_s = time.perf_counter()
    ts_id = task["ts_id"]
    params = task["params"]
    acquisition = task["acquisition"]
    folder = Path(task["folder"])
    device = compute_device(params["device"])
    pixel_size_A = float(acquisition["pixel_size_A"])
    voltage_kV = float(acquisition["voltage_kV"])
    gain = _read_gain(task["gain_path"])
    tilts = sorted(task["tilts"], key=lambda t: t["tilt_index"])
    keep_frames = params["estimate_ctf"] and not params["use_movie_average"]
    grid = (params["motion_grid_x"], params["motion_grid_y"], params["motion_grid_temporal"])

    models, frame_doses, results, ctf_tilts = [], [], [], []
    files = {"image_path": folder / f"{ts_id}.mrc"}
    if params["even_odd"]:
        files.update({"even_path": folder / f"{ts_id}_even.mrc", "odd_path": folder / f"{ts_id}_odd.mrc"})
    writers, plan, image_shape = {}, None, None
    out_pixel_A = pixel_size_A
    with contextlib.ExitStack() as open_stacks:  # one tilt in memory at a time: sums go to the files as they come
        for position, tilt in enumerate(tilts):
            movie_path = Path(tilt["movie_path"])
            frames, dose_fraction = read_frames(movie_path, float(tilt["dose_e_per_A2"]), params)
            if frames.shape[0] < 2:
                raise InputFileError(movie_path, f"holds {frames.shape[0]} frame: motion correction needs a movie "
                                                 f"of at least 2 frames")
            if gain is not None and tuple(gain.shape) != tuple(frames.shape[1:]):
                raise InputFileError(task["gain_path"], f"gain is {gain.shape[1]} x {gain.shape[0]} px but the frames "
                                                        f"of {movie_path.name} are {frames.shape[2]} x "
                                                        f"{frames.shape[1]} px")
            movie = apply_gain(torch.from_numpy(np.ascontiguousarray(frames)).to(device), gain)
            outlier_pixels = 0
            if params.get("remove_frame_outliers", True):  # X-ray hits, while each is still one frame's outlier
                try:
                    outliers = find_frame_outliers(movie, None if gain is None else gain.to(device))
                except ValueError as error:
                    raise InputFileError(movie_path, f"single-frame outliers: {error}") from None
                replace_frame_outliers(movie, outliers, in_place=True)
                outlier_pixels = outliers.n_pixels
            try:
                model = estimate_motion(
                    movie, pixel_size_A, fit_resolution_min_A=params["fit_resolution_min_A"],
                    fit_resolution_max_A=params["fit_resolution_max_A"], b_factor_A2=params["b_factor_A2"], grid=grid)
            except ValueError as error:
                raise InputFileError(movie_path, f"motion estimation impossible: {error}") from None
            doses = torch.as_tensor(float(tilt["pre_exposure_e_per_A2"]) + float(tilt["dose_e_per_A2"]) * dose_fraction)
            out = align_and_sum(movie, pixel_size_A, model,
                                frame_dose_e_per_A2=doses if params["dose_weighting"] else None, voltage_kV=voltage_kV,
                                binning_factor=params["binning_factor"], even_odd=params["even_odd"],
                                keep_frames=keep_frames)
            out_pixel_A = out["pixel_size_A"]
            if not writers:  # the first tilt gives the output size
                image_shape = tuple(int(n) for n in out["sum"].shape)
                writers = {key: open_stacks.enter_context(mrc_stack_writer(path, len(tilts), image_shape, out_pixel_A))
                           for key, path in files.items()}
                if params["estimate_ctf"]:
                    plan = _ctf_plan(image_shape, out_pixel_A, tilts, acquisition, params)
            writers["image_path"](position, out["sum"].cpu())
            if params["even_odd"]:
                writers["even_path"](position, out["even"].cpu())
                writers["odd_path"](position, out["odd"].cpu())
            if plan is not None:  # the tilt's window spectra (of its aligned frames, or of the sum); then drop them
                ctf_tilts.append(tilt_spectra(plan, position, out["frames"] if keep_frames else out["sum"]))
            models.append(model)
            frame_doses.append(doses)
            results.append({
                "tilt_index": int(tilt["tilt_index"]),
                "image_section": position,
                "motion_total_A": _trajectory_length_A(model.shifts_A.cpu()),
                "motion_iterations": int(model.iterations),
                "motion_significant": bool(model.significant),
                "frame_outlier_pixels": outlier_pixels,
            })
            log.info("%s tilt %d (%.1f deg): %d frames, trajectory %.2f A, %d iterations", ts_id, tilt["tilt_index"],
                     tilt["tilt_angle_deg"], movie.shape[0], results[-1]["motion_total_A"], model.iterations)
            if not model.significant:
                log.warning("%s tilt %d (%.1f deg): no significant motion signal in %s (too little contrast or dose); "
                            "frames summed without shifts", ts_id, tilt["tilt_index"], tilt["tilt_angle_deg"],
                            movie_path.name)
            del movie, frames, out

    files["motion_path"] = folder / f"{ts_id}_motion.json"
    files["motion_table_path"] = folder / f"{ts_id}_motion.csv"
    _write_motion(files, ts_id, tilts, models, frame_doses, params["dose_weighting"])

    seconds = {"motion": time.perf_counter() - start_s, "ctf": 0.0}
    ctf = None
    if plan is not None:
        ctf = _fit_ctf(plan, ctf_tilts, params)
        files["ctf_spectra_path"] = folder / f"{ts_id}_ctf_spectra.mrc"
        write_mrc(files["ctf_spectra_path"], ctf.pop("power_spectra"), out_pixel_A, stack=True)
        seconds["ctf"] = time.perf_counter() - start_s - seconds["motion"]
    ny, nx = image_shape
    return {"ts_id": ts_id, "tilts": results, "files": {k: str(v) for k, v in files.items()},
            "pixel_size_A": out_pixel_A, "image_size_px": [int(nx), int(ny)], "ctf": ctf, "seconds": seconds}


def _write_motion(files: dict, ts_id: str, tilts: list[dict], models: list, frame_doses: list,
                  dose_weighted: bool) -> None:
    rows = []
    for tilt, model, doses in zip(tilts, models, frame_doses):
        shifts = model.shifts_A.cpu().double()
        raw = model.raw_shifts_A.cpu().double()
        for f in range(model.n_frames):
            rows.append({"ts_id": ts_id, "tilt_index": int(tilt["tilt_index"]), "frame": f,
                         "shift_x_A": float(shifts[f, 0]), "shift_y_A": float(shifts[f, 1]),
                         "raw_shift_x_A": float(raw[f, 0]), "raw_shift_y_A": float(raw[f, 1]),
                         "accumulated_dose_e_per_A2": float(doses[f])})
    write_text_atomic(files["motion_table_path"], pd.DataFrame(rows).to_csv(index=False, float_format="%.5f"))
    document = {
        "ts_id": ts_id,
        "convention": "shifts (x, y) in A: content displacement of each frame relative to the mean position over "
                      "the frames; frame time t = f/(n-1); temporal model: clamped uniform B-spline of degree "
                      "min(3, temporal-1); local field: tensor-product B-spline over (t, y/(ny-1), x/(nx-1)), "
                      "residual on top of the global shifts",
        "frame_dose": "accumulated dose at the end of each frame: pre-exposure + the tilt's dose received so far",
        "dose_weighted": bool(dose_weighted),
        "tilts": [{"tilt_index": int(t["tilt_index"]), **m.to_dict()} for t, m in zip(tilts, models)],
    }
    write_text_atomic(files["motion_path"], json.dumps(document, indent=1))


def _ctf_plan(image_shape: tuple[int, int], pixel_size_A: float, tilts: list[dict], acquisition: dict,
              params: dict) -> CtfSeriesPlan:
    """The CTF estimation's plan for the tilt series' aligned images of ``image_shape`` (px)."""
    if params["defocus_grid_temporal"] != 1:
        raise TomopipeError(f"defocus_grid_temporal = {params['defocus_grid_temporal']}: a defocus that changes "
                            f"during a tilt's exposure is not modelled; use 1 (the seed's value)")
    return plan_tilt_series_ctf(
        image_shape, pixel_size_A, torch.tensor([float(t["tilt_angle_deg"]) for t in tilts], dtype=torch.float64),
        float(acquisition["tilt_axis_angle_deg"]), float(acquisition["voltage_kV"]),
        float(acquisition["spherical_aberration_mm"]), float(acquisition["amplitude_contrast"]),
        window_px=params["ctf_window_px"],
        resolution_range_A=(params["ctf_resolution_min_A"], params["ctf_resolution_max_A"]),
        defocus_range_A=(params["defocus_min_um"] * 1e4, params["defocus_max_um"] * 1e4),
        defocus_grid=(params["defocus_grid_y"], params["defocus_grid_x"]),  # (gy, gx)
        hand=_hand(params))


def _hand(params: dict):
    return "auto" if params["defocus_hand"] == "auto" else int(params["defocus_hand"])


def _fit_ctf(plan: CtfSeriesPlan, tilts: list, params: dict) -> dict:
    """The tilt series' CTF from its tilts' window spectra, as the step stores it."""
    result = fit_tilt_series_ctf(plan, tilts, defocus_grid=(params["defocus_grid_y"], params["defocus_grid_x"]),
                                 fit_phase=params["fit_phase"], hand=_hand(params))
    per_tilt = {"defocus_u_A": result.defocus_u_A, "defocus_v_A": result.defocus_v_A,
                "defocus_angle_deg": result.defocus_angle_deg, "phase_shift_deg": result.phase_shift_deg,
                "fit_resolution_A": result.fit_resolution_A, "fit_score": result.fit_score}
    out = {"power_spectra": result.power_spectra.detach().cpu().float(),
           "handedness": _plain(result.handedness.to_dict()),
           "defocus_grid_A": [json.dumps(_plain(g)) for g in result.defocus_grid_A.detach().cpu().double()]}
    for key, values in per_tilt.items():
        out[key] = [float(v) for v in values.detach().cpu().reshape(-1)]
    return out


def _plain(value):
    """JSON-able copy of a result value (tensors -> lists / floats)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def missing_acquisition_values(acquisition: dict, params: dict) -> list[str]:
    """Names of the acquisition values this step needs (pixel size and voltage; for the CTF also
    the tilt axis, Cs and amplitude contrast) that are absent or not a number."""
    needed = ["pixel_size_A", "voltage_kV"]
    if params["estimate_ctf"]:
        needed += ["tilt_axis_angle_deg", "spherical_aberration_mm", "amplitude_contrast"]
    return missing_numbers(acquisition, needed)


def hand_summary(handedness: dict, requested: str) -> tuple[dict, list[str]]:
    """Summary entries of the defocus hand per tilt series (``handedness``: ts_id -> the CTF
    estimation's ``handedness``) and warnings: a given hand that the data clearly contradict,
    ``auto`` without a clear hand (−1 used), tilt series that clearly disagree."""
    entries, warnings = {}, []
    for ts_id, e in handedness.items():
        entries[ts_id] = {"used": e["hand_used"], "source": e["source"], "detected": e["hand"], "clear": e["clear"],
                          "p_value": e["p_value"], "t_statistic": e["t_statistic"],
                          "tilts_agreeing": e["tilts_agreeing"], "tilts_used": e["tilts_used"]}
        evidence = (f"p = {e['p_value']:.2g}, t = {e['t_statistic']:.1f}, {e['tilts_agreeing']} of {e['tilts_used']} "
                    f"tilts with |tilt| >= {e['min_tilt_deg']:g} deg agree")
        if e["clear"] and e["hand"] != e["hand_used"]:
            warnings.append(f"{ts_id}: defocus_hand = {requested} was used, but the data clearly support "
                            f"{e['hand']:+d} ({evidence})")
        elif e["source"] == "default":
            if not e["tilts_used"]:
                why = f"no tilt with |tilt| >= {e['min_tilt_deg']:g} deg"
            elif not e["hand"]:
                why = f"both hands fit the {e['tilts_used']} tilts with |tilt| >= {e['min_tilt_deg']:g} deg equally"
            else:
                why = evidence
            warnings.append(f"{ts_id}: the defocus handedness is not clear from the data ({why}); fitted with -1 "
                            f"(RELION's default); set defocus_hand if the microscope's hand is known")
    clear = {ts_id: e["hand"] for ts_id, e in handedness.items() if e["clear"]}
    if len(set(clear.values())) > 1:
        warnings.append(f"the tilt series clearly disagree on the defocus handedness ({clear}), a property of the "
                        f"microscope: check their tilt angles and tilt axes")
    return entries, warnings


@register
class MotionCtf(Step):
    type_name = "motion_ctf"
    title = "warp - tilt-series motion and ctf estimation"
    description = ("Align the frames of every tilt (global trajectory, optionally a local X x Y field), sum them with "
                   "dose weighting (Grant & Grigorieff exposure filter), and estimate each tilt's defocus and "
                   "astigmatism with the tilt of the specimen taken into account.")
    params = (
        Param("binning_factor", "float", "Fourier-crop binning of the aligned sums", default=1.0, min=1),
        Param("eer_fraction", "int", "EER movies: EER frames summed into one frame", default=16, min=1),
        Param("eer_group_exposure_e_per_A2", "float", "EER movies: exposure per frame group, instead of "
                                                       "eer_fraction (empty: use eer_fraction)", min=0),
        Param("fit_resolution_min_A", "float", "resolution to fit, low end (Å)", default=500.0, min=0),
        Param("fit_resolution_max_A", "float", "resolution to fit, high end (Å)", default=10.0, min=0),
        Param("b_factor_A2", "float", "B-factor weighting of the alignment (negative damps high frequencies)",
              default=-500.0),
        Param("motion_grid_x", "int", "motion model grid X (local field control points; 1 = global only)",
              default=1, min=1),
        Param("motion_grid_y", "int", "motion model grid Y", default=1, min=1),
        Param("motion_grid_temporal", "int", "motion model grid temporal (trajectory control points)", default=3,
              min=1),
        Param("remove_frame_outliers", "bool", "replace single-frame outliers (X-ray hits) before the alignment: a "
                                               "pixel whose count in one frame is improbable (Poisson) given its "
                                               "other frames gets its mean over them; hot pixels (bright in every "
                                               "frame) are left to the X-ray eraser", default=True),
        Param("even_odd", "bool", "also write the sums of even and of odd frames", default=False),
        Param("dose_weighting", "bool", "weight frames by their accumulated dose (exposure filter)", default=True),
        Param("estimate_ctf", "bool", "estimate the CTF of every tilt", default=True),
        Param("ctf_window_px", "int", "CTF: window (px) of the power spectra", default=512, min=32),
        Param("ctf_resolution_min_A", "float", "CTF: resolution range, low end (Å)", default=30.0, min=0),
        Param("ctf_resolution_max_A", "float", "CTF: resolution range, high end (Å)", default=7.0, min=0),
        Param("defocus_min_um", "float", "CTF: defocus search range, low end (µm, underfocus positive)",
              default=0.5),
        Param("defocus_max_um", "float", "CTF: defocus search range, high end (µm)", default=8.0),
        Param("defocus_grid_x", "int", "CTF: defocus model grid X", default=2, min=1),
        Param("defocus_grid_y", "int", "CTF: defocus model grid Y", default=2, min=1),
        Param("defocus_grid_temporal", "int", "CTF: defocus model grid temporal (only 1 is supported)", default=1,
              min=1, max=1),
        Param("fit_phase", "bool", "CTF: fit a phase shift (phase plate)", default=False),
        Param("defocus_hand", "str", "CTF: defocus handedness (RELION rlnTomoHand): auto (from the data's tilted "
                                     "views; -1 with a warning when unclear), -1 or 1", default="auto",
              choices=("auto", "-1", "1")),
        Param("use_movie_average", "bool", "CTF: fit the spectrum of the aligned sum instead of the sum of the "
                                           "frames' spectra", default=False),
        DEVICE_PARAM,
    )
    inputs = (Port("movies", TILT_SERIES_MOVIES.name, "tilt-series movies from the import step"),)
    outputs = (
        Port("tilt_series", TILT_SERIES.name, "aligned, dose-weighted sums: one MRC stack per tilt series"),
        Port("ctf", CTF.name, "per-tilt CTF estimates (only when estimate_ctf)", optional=True),
    )

    def run(self, ctx):
        params = ctx.params
        if params["fit_resolution_min_A"] <= params["fit_resolution_max_A"]:
            ctx.fail(f"fit_resolution_min_A ({params['fit_resolution_min_A']}) must be larger than "
                     f"fit_resolution_max_A ({params['fit_resolution_max_A']})")
        if params["estimate_ctf"] and params["ctf_resolution_min_A"] <= params["ctf_resolution_max_A"]:
            ctx.fail(f"ctf_resolution_min_A ({params['ctf_resolution_min_A']}) must be larger than "
                     f"ctf_resolution_max_A ({params['ctf_resolution_max_A']})")
        if params["estimate_ctf"] and not 0 < params["defocus_min_um"] < params["defocus_max_um"]:
            ctx.fail(f"the defocus search range {params['defocus_min_um']}..{params['defocus_max_um']} µm must be "
                     f"increasing and positive (underfocus)")
        items = ctx.input_items("movies", enabled_only=True)
        if items.empty:
            ctx.fail("no enabled tilt in the input movies")
        short = items[items["frame_count"] < 2].sort_values(["ts_id", "tilt_index"])
        if not short.empty:  # before any work: motion correction needs two frames or more
            row = short.iloc[0]
            raise InputFileError(ctx.resolve(row["movie_path"]), f"holds {int(row['frame_count'])} frame: motion "
                                                                 f"correction needs a movie of at least 2 frames")
        attrs = ctx.input_attrs("movies")
        gain_path = str(ctx.resolve(attrs["gain_path"])) if attrs.get("gain_path") else None
        tasks = []
        for ts_id, group in items.groupby("ts_id", sort=True):
            missing = missing_acquisition_values(attrs["tilt_series"].get(ts_id, {}), params)
            if missing:
                ctx.fail(f"tilt series {ts_id!r}: the acquisition of the input movies has no {', '.join(missing)} "
                         f"(set it in the import step)")
            tilts = group[["tilt_index", "tilt_angle_deg", "movie_path", "dose_e_per_A2",
                           "pre_exposure_e_per_A2"]].to_dict("records")
            no_dose = [t["tilt_index"] for t in tilts
                       if missing_numbers(t, ("dose_e_per_A2", "pre_exposure_e_per_A2"))]
            if params["dose_weighting"] and no_dose:
                ctx.fail(f"tilt series {ts_id!r}: dose weighting needs dose_e_per_A2 and pre_exposure_e_per_A2, "
                         f"missing for tilt_index {no_dose} (set dose_per_tilt_e_per_A2 in the import step, or "
                         f"dose_weighting = false)")
            for tilt in tilts:
                tilt["movie_path"] = str(ctx.resolve(tilt["movie_path"]))
            tasks.append({"ts_id": ts_id, "tilts": tilts, "acquisition": attrs["tilt_series"][ts_id],
                          "gain_path": gain_path, "params": params, "folder": str(ctx.folder)})
        results = ctx.map(process_tilt_series, tasks, desc="motion + ctf")

        ts_tables, ctf_tables, acquisitions, handedness = [], [], {}, {}
        for result in results:
            ts_id = result["ts_id"]
            group = items[items["ts_id"] == ts_id].sort_values("tilt_index")
            per_tilt = pd.DataFrame(result["tilts"])
            table = group.drop(columns=[c for c in (*MOVIE_COLUMNS, "enabled") if c in group.columns])
            table = table.merge(per_tilt, on="tilt_index", how="left", validate="one_to_one")
            files = result["files"]
            table["image_path"] = ctx.stored_path(files["image_path"])
            for key in ("even_path", "odd_path"):
                if key in files:
                    table[f"image_{key}"] = ctx.stored_path(files[key])
            table["motion_path"] = ctx.stored_path(files["motion_path"])
            ts_tables.append(table)
            acquisition = {k: v for k, v in attrs["tilt_series"][ts_id].items() if k != "frame_count"}
            acquisition.update(pixel_size_A=result["pixel_size_A"], image_size_px=result["image_size_px"],
                               n_tilts=len(table))
            acquisitions[ts_id] = acquisition
            if result["ctf"] is not None:
                ctf = result["ctf"]
                hand = ctf["handedness"]["hand_used"]
                acquisition["defocus_hand"] = int(hand)
                ctf_tables.append(pd.DataFrame({
                    "ts_id": ts_id,
                    "tilt_index": table["tilt_index"].to_numpy(),
                    "tilt_angle_deg": table["tilt_angle_deg"].to_numpy(),
                    **{key: ctf[key] for key in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg",
                                                 "fit_resolution_A", "fit_score")},
                    "defocus_hand": int(hand),
                    "defocus_grid_A": ctf["defocus_grid_A"],
                    "diagnostic_path": ctx.stored_path(files["ctf_spectra_path"]),
                    "diagnostic_section": np.arange(len(table)),
                }))
                handedness[ts_id] = ctf["handedness"]
        ts_items = pd.concat(ts_tables, ignore_index=True)
        ts_attrs = {"tilt_series": acquisitions, "dose_weighted": bool(params["dose_weighting"]),
                    "motion_grid": [params["motion_grid_x"], params["motion_grid_y"], params["motion_grid_temporal"]]}
        ctx.add_output("tilt_series", ts_items, ts_attrs)
        summary = {"tilt_series": len(results), "tilts": len(ts_items),
                   "motion_total_A_median": float(np.median(ts_items["motion_total_A"])),
                   "tilts_without_significant_motion": int((~ts_items["motion_significant"]).sum()),
                   "pixel_size_A": sorted({r["pixel_size_A"] for r in results}),
                   # compute seconds per tilt movie, summed over the workers
                   "motion_s_per_tilt": sum(r["seconds"]["motion"] for r in results) / len(ts_items)}
        if ctf_tables:
            summary["ctf_s_per_tilt"] = sum(r["seconds"]["ctf"] for r in results) / len(ts_items)
            ctf_items = pd.concat(ctf_tables, ignore_index=True)
            ctx.add_output("ctf", ctf_items, {"tilt_series": acquisitions, "handedness": handedness})
            summary["defocus_hand"], warnings = hand_summary(handedness, params["defocus_hand"])
            for warning in warnings:
                log.warning("%s", warning)
            if warnings:
                summary["warnings"] = warnings
            summary["defocus_um_median"] = float(np.median((ctf_items["defocus_u_A"] + ctf_items["defocus_v_A"]) / 2e4))
            finite = ctf_items["fit_resolution_A"][np.isfinite(ctf_items["fit_resolution_A"])]
            summary["fit_resolution_A_median"] = float(np.median(finite)) if len(finite) else math.nan
        return summary
