"""Writing the simulated acquisition as a microscope would, and the ground truth.

Acquisition folder (``DIR``): one movie per tilt (``TS_01_001_0.0.tif``: tilt series,
acquisition number from 1, stage angle), one SerialEM-style ``TS_01.mdoc`` per tilt series
(sections in acquisition order), and ``gain_ref.mrc``. Truth folder ``DIR/truth``: see
:data:`TRUTH_README` (written there as README.md).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.geometry import wrap_angle_deg, xf_from_alignment
from tomopipe.io._atomic import write_text_atomic
from tomopipe.io.imod import write_tlt, write_xf
from tomopipe.io.mdoc import SERIALEM_DATE_FORMAT, write_mdoc
from tomopipe.io.movies import write_movie
from tomopipe.io.mrc import write_mrc
from tomopipe.io.star import write_particles_star, write_tilt_series_star, write_tomograms_star
from tomopipe.simulate.config import SimulationConfig
from tomopipe.simulate.plan import TiltSeriesPlan, frame_local_displacements_px, mdoc_tilt_axis_error_deg

__all__ = [
    "GAIN_FILE_NAME",
    "mdoc_tilt_axis_deg",
    "write_movie_frames",
    "write_gain_file",
    "write_tilt_series_mdoc",
    "write_tilt_series_truth",
    "write_global_truth",
    "TRUTH_README",
]

GAIN_FILE_NAME = "gain_ref.mrc"
XRAY_HIT_COLUMNS = ["acquisition_index", "movie", "hit", "frame", "second_frame", "shape", "x", "y", "size_px",
                    "angle_deg", "peak_counts", "background_counts", "snr", "n_pixels", "total_counts"]


def mdoc_tilt_axis_deg(config: SimulationConfig) -> float:
    """Tilt-axis angle the mdoc states: the axis in the stored row order of the movie files, with
    the session's calibration error ``e`` (:func:`tomopipe.simulate.plan.mdoc_tilt_axis_error_deg`).

    tomopipe (like IMOD, RELION and MotionCor2) reads TIFF movies flipped along Y, and a Y flip
    turns an axis angle α into 180° − α. The truth axis is defined for the arrays as read, so a
    TIFF acquisition's mdoc says ``wrap(180° − (α + e))`` (−85.6° -> −94.4° when e = 0, as
    EMPIAR-10491's mdoc says −93.5° where Warp/RELION find −85.6°); MRC movies are read as
    stored: the mdoc says ``α + e``. An importer that applies the flip rule gets ``α + e``.
    """
    alpha = config.tilt_axis_angle_deg + mdoc_tilt_axis_error_deg(config)
    stored = 180.0 - alpha if config.movie_format == "tif" else alpha
    return round(float(wrap_angle_deg(torch.tensor(stored, dtype=torch.float64))), 6)


def write_movie_frames(path: Path, frames: torch.Tensor, pixel_size_A: float) -> None:
    """Integer counts via :func:`tomopipe.io.movies.write_movie` (TIFF Y-flip rule); float
    expected counts (shot noise off) as a float32 MRC stack."""
    data = frames.detach().cpu().numpy()
    if np.issubdtype(data.dtype, np.integer):
        write_movie(path, data, pixel_size_A=pixel_size_A)
    else:
        write_mrc(path, data.astype(np.float32), pixel_size_A, stack=True)


def write_gain_file(out_dir: Path, gain: torch.Tensor, pixel_size_A: float) -> Path:
    """``gain_ref.mrc``: the gain of the movies as read, stored flipped upside down (rows
    reversed), as EMPIAR-10491's gain reference is relative to its movies."""
    path = out_dir / GAIN_FILE_NAME
    write_mrc(path, np.ascontiguousarray(gain.detach().cpu().numpy()[::-1]), pixel_size_A)
    return path


def _windows_path(config: SimulationConfig, plan: TiltSeriesPlan, name: str) -> str:
    return f"X:\\tomopipe_sim\\seed{config.seed}\\{plan.name}\\{name}"


def write_tilt_series_mdoc(out_dir: Path, config: SimulationConfig, plan: TiltSeriesPlan, stats: list[dict]) -> Path:
    """SerialEM-style mdoc ``<TS>.mdoc`` next to the movies; ``stats[j]`` holds the per-tilt
    ``min``, ``max``, ``mean`` of the summed frames (MinMaxMean)."""
    axis = mdoc_tilt_axis_deg(config)
    p = config.pixel_size_A
    sections = []
    dose_rate = config.dose_per_tilt_e_per_A2 * p * p / config.exposure_time_s  # the cosine rule varies the time
    for t, st in zip(plan.tilts, stats):
        sections.append(
            {
                "TiltAngle": round(t.stage_deg, 5),
                "StagePosition": [round(t.stage_position_um[0], 3), round(t.stage_position_um[1], 3)],
                "StageZ": 12.345,
                "Magnification": config.magnification,
                "Intensity": 0.0932,
                "ExposureDose": round(t.dose_e_per_A2, 4),
                "DoseRate": round(dose_rate, 5),
                "PixelSpacing": p,
                "SpotSize": config.spot_size,
                "Defocus": round(t.scope_defocus_um, 5),
                "ImageShift": [0.0, 0.0],
                "RotationAngle": round(float(wrap_angle_deg(axis + 90.0)), 3),
                "ExposureTime": t.exposure_time_s,
                "Binning": 1,
                "CameraIndex": 0,
                "DividedBy2": 0,
                "MagIndex": 31,
                "CountsPerElectron": 1,
                "MinMaxMean": [st["min"], st["max"], round(st["mean"], 4)],
                "TargetDefocus": t.target_defocus_um,
                "PriorRecordDose": round(t.pre_exposure_e_per_A2, 4),
                "SubFramePath": _windows_path(config, plan, t.movie_name),
                "NumSubFrames": config.frames_per_tilt,
                "FrameDosesAndNumber": [round(t.dose_e_per_A2 / config.frames_per_tilt, 5), config.frames_per_tilt],
                "DateTime": t.time.strftime(SERIALEM_DATE_FORMAT),
                "FilterSlitAndLoss": [20, 0],
            }
        )
    first = plan.tilts[0].time.strftime(SERIALEM_DATE_FORMAT)
    titles = [
        f"[T = SerialEM: Digitized on tomopipe digital twin (simulated, seed {config.seed})   {first}]",
        f"[T =     Tilt axis angle = {axis:.1f}, binning = 1  spot = {config.spot_size}  camera = 0]",
    ]
    global_fields = {
        "PixelSpacing": p,
        "Voltage": int(round(config.voltage_kV)),
        "ImageFile": f"{plan.name}.mrc",
        "ImageSize": [config.image_width_px, config.image_height_px],
        "DataMode": 1,
    }
    path = out_dir / f"{plan.name}.mdoc"
    write_mdoc(path, global_fields, titles, sections)
    return path


def _csv(path: Path, df: pd.DataFrame, float_format: str = "%.6f") -> None:
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, float_format=float_format)
    write_text_atomic(path, buffer.getvalue())


def write_tilt_series_truth(
    truth_dir: Path,
    config: SimulationConfig,
    plan: TiltSeriesPlan,
    particle_rows: list[dict],
    xray_rows: list[dict],
    hit_rows: list[dict] = (),
) -> dict:
    """Per-tilt-series truth files (see the README); returns a summary."""
    p = config.pixel_size_A
    w, h = config.image_width_px, config.image_height_px
    by_angle = plan.tilts_by_angle()

    # IMOD .xf / .tlt in the order of the tilt angle (the order of a sorted tilt-series stack)
    rot = torch.tensor([t.axis_deg for t in by_angle], dtype=torch.float64)
    shifts_px = torch.tensor([t.shift_A for t in by_angle], dtype=torch.float64) / p
    mags = torch.tensor([1.0 / t.magnification for t in by_angle], dtype=torch.float64)
    A, d = xf_from_alignment(rot, shifts_px, mags)
    write_xf(truth_dir / f"{plan.name}.xf", A.numpy(), d.numpy())
    write_tlt(truth_dir / f"{plan.name}.tlt", np.array([t.tilt_deg for t in by_angle]), decimals=3)

    # RELION 5 tilt-series star (sorted by tilt angle, as RELION's importer writes it)
    star = pd.DataFrame(
        {
            "rlnMicrographMovieName": [t.movie_name for t in by_angle],
            "rlnTomoTiltMovieFrameCount": [config.frames_per_tilt] * len(by_angle),
            "rlnTomoNominalStageTiltAngle": [t.stage_deg for t in by_angle],
            "rlnTomoNominalTiltAxisAngle": [t.axis_deg for t in by_angle],
            "rlnMicrographPreExposure": [t.pre_exposure_e_per_A2 for t in by_angle],
            "rlnTomoNominalDefocus": [t.target_defocus_um for t in by_angle],
            "rlnDefocusU": [t.defocus_u_A for t in by_angle],
            "rlnDefocusV": [t.defocus_v_A for t in by_angle],
            "rlnCtfAstigmatism": [abs(t.defocus_u_A - t.defocus_v_A) for t in by_angle],
            "rlnDefocusAngle": [t.astigmatism_angle_deg for t in by_angle],
            "rlnTomoXTilt": [0.0] * len(by_angle),
            "rlnTomoYTilt": [t.tilt_deg for t in by_angle],
            "rlnTomoZRot": [t.axis_deg for t in by_angle],
            "rlnTomoXShiftAngst": [t.shift_A[0] for t in by_angle],
            "rlnTomoYShiftAngst": [t.shift_A[1] for t in by_angle],
            "rlnCtfScalefactor": [math.cos(math.radians(t.tilt_deg)) for t in by_angle],
        }
    )
    write_tilt_series_star(truth_dir / f"{plan.name}.star", star, tomo_name=plan.name)

    # everything per tilt, acquisition order
    tilts = pd.DataFrame(
        {
            "acquisition_index": [t.index for t in plan.tilts],
            "movie": [t.movie_name for t in plan.tilts],
            "date_time": [t.time.isoformat() for t in plan.tilts],
            "nominal_tilt_deg": [t.nominal_deg for t in plan.tilts],
            "stage_tilt_deg": [t.stage_deg for t in plan.tilts],
            "true_tilt_deg": [t.tilt_deg for t in plan.tilts],
            "specimen_pretilt_deg": [config.specimen_pretilt_deg] * len(plan.tilts),
            "tilt_axis_deg": [t.axis_deg for t in plan.tilts],
            "shift_x_A": [t.shift_A[0] for t in plan.tilts],
            "shift_y_A": [t.shift_A[1] for t in plan.tilts],
            "magnification": [t.magnification for t in plan.tilts],
            "defocus_u_A": [t.defocus_u_A for t in plan.tilts],
            "defocus_v_A": [t.defocus_v_A for t in plan.tilts],
            "defocus_angle_deg": [t.astigmatism_angle_deg for t in plan.tilts],
            "defocus_centre_A": [t.defocus_centre_A for t in plan.tilts],
            "pre_exposure_e_per_A2": [t.pre_exposure_e_per_A2 for t in plan.tilts],
            "dose_e_per_A2": [t.dose_e_per_A2 for t in plan.tilts],
            "exposure_time_s": [t.exposure_time_s for t in plan.tilts],
            **pd.DataFrame(plan.extras.get("transmission", [{"transmission": 1.0}] * len(plan.tilts))).to_dict("list"),
        }
    )
    _csv(truth_dir / f"{plan.name}_tilts.csv", tilts)

    # per-frame global shifts
    rows = []
    for t in plan.tilts:
        for f in range(config.frames_per_tilt):
            sx, sy = (float(v) for v in t.frame_shifts_A[f])
            jx, jy = (float(v) for v in t.frame_jitter_A[f]) if t.frame_jitter_A is not None else (0.0, 0.0)
            rows.append(
                {
                    "acquisition_index": t.index,
                    "movie": t.movie_name,
                    "frame": f,
                    "shift_x_A": sx,
                    "shift_y_A": sy,
                    "shift_x_px": sx / p,
                    "shift_y_px": sy / p,
                    "jitter_x_A": jx,
                    "jitter_y_A": jy,
                    "accumulated_dose_mid_e_per_A2": (
                        t.pre_exposure_e_per_A2 + (f + 0.5) * t.dose_e_per_A2 / config.frames_per_tilt
                    ),
                }
            )
    _csv(truth_dir / f"{plan.name}_frame_shifts.csv", pd.DataFrame(rows))

    # local deformation on a 5 x 5 grid of pixel positions
    gx = torch.linspace(0, w - 1, 5, dtype=torch.float64)
    gy = torch.linspace(0, h - 1, 5, dtype=torch.float64)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    rows = []
    for t in plan.tilts:
        disp = frame_local_displacements_px(t, xx - w // 2, yy - h // 2)  # [F, 5, 5, 2]
        for f in range(config.frames_per_tilt):
            for i in range(5):
                for k in range(5):
                    rows.append(
                        {
                            "acquisition_index": t.index,
                            "frame": f,
                            "x_px": float(xx[i, k]),
                            "y_px": float(yy[i, k]),
                            "dx_px": float(disp[f, i, k, 0]),
                            "dy_px": float(disp[f, i, k, 1]),
                        }
                    )
    _csv(truth_dir / f"{plan.name}_local_motion.csv", pd.DataFrame(rows))

    _csv(
        truth_dir / f"{plan.name}_xrays.csv",
        pd.DataFrame(xray_rows, columns=["acquisition_index", "movie", "hit", "frame", "x", "y", "counts"]),
        float_format="%.3f",
    )
    _csv(
        truth_dir / f"{plan.name}_xray_hits.csv",
        pd.DataFrame(list(hit_rows), columns=XRAY_HIT_COLUMNS),
        float_format="%.4f",
    )
    if plan.ice is not None:  # the slab's thickness on a 9 x 9 grid of the tomogram's field
        sx, sy = plan.tomogram_size_px[0] * p / 2, plan.tomogram_size_px[1] * p / 2
        ix = torch.linspace(-sx, sx, 9, dtype=torch.float64)
        iy = torch.linspace(-sy, sy, 9, dtype=torch.float64)
        gy_A, gx_A = torch.meshgrid(iy, ix, indexing="ij")
        _csv(truth_dir / f"{plan.name}_ice_thickness.csv", pd.DataFrame({
            "x_A": gx_A.reshape(-1).numpy(), "y_A": gy_A.reshape(-1).numpy(),
            "thickness_A": plan.ice.thickness_A(gx_A, gy_A).reshape(-1).numpy()}))
    _csv(
        truth_dir / f"{plan.name}_particle_projections.csv",
        pd.DataFrame(
            particle_rows,
            columns=["particle", "acquisition_index", "tilt_deg", "x_px", "y_px", "depth_A", "defocus_A"],
        ),
    )
    return {
        "name": plan.name,
        "n_tilts": len(plan.tilts),
        "n_particles": int(plan.positions_A.shape[0]),
        "target_defocus_um": plan.target_defocus_um,
        "tomogram_size_px": list(plan.tomogram_size_px),
        "n_xray_pixels": len(xray_rows),
        "n_xray_hits": len(hit_rows),
    }


def write_global_truth(
    truth_dir: Path,
    config: SimulationConfig,
    plans: list[TiltSeriesPlan],
    hot_pixels: torch.Tensor,
    summary: dict,
) -> None:
    """tomograms.star, particles.star, hot_pixels.csv, truth.json and README.md."""
    p = config.pixel_size_A
    tomos = pd.DataFrame(
        {
            "rlnTomoName": [pl.name for pl in plans],
            "rlnVoltage": [config.voltage_kV] * len(plans),
            "rlnSphericalAberration": [config.cs_mm] * len(plans),
            "rlnAmplitudeContrast": [config.amplitude_contrast] * len(plans),
            "rlnMicrographOriginalPixelSize": [p] * len(plans),
            "rlnTomoHand": [float(config.defocus_handedness)] * len(plans),
            "rlnOpticsGroupName": ["optics1"] * len(plans),
            "rlnTomoTiltSeriesPixelSize": [p] * len(plans),
            "rlnTomoTiltSeriesStarFile": [f"{pl.name}.star" for pl in plans],
            "rlnTomoSizeX": [pl.tomogram_size_px[0] for pl in plans],
            "rlnTomoSizeY": [pl.tomogram_size_px[1] for pl in plans],
            "rlnTomoSizeZ": [pl.tomogram_size_px[2] for pl in plans],
        }
    )
    write_tomograms_star(truth_dir / "tomograms.star", tomos)

    rows = []
    for pl in plans:
        for i in range(pl.positions_A.shape[0]):
            x, y, z = (float(v) for v in pl.positions_A[i])
            rot, tilt, psi = (float(v) for v in pl.euler_deg[i])
            rows.append(
                {
                    "rlnTomoName": pl.name,
                    "rlnCenteredCoordinateXAngst": x,
                    "rlnCenteredCoordinateYAngst": y,
                    "rlnCenteredCoordinateZAngst": z,
                    "rlnAngleRot": rot,
                    "rlnAngleTilt": tilt,
                    "rlnAnglePsi": psi,
                    "rlnOpticsGroup": 1,
                    "rlnRandomSubset": 1 + (len(rows) % 2),
                }
            )
    columns = ["rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
               "rlnCenteredCoordinateZAngst", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOpticsGroup",
               "rlnRandomSubset"]
    particles = pd.DataFrame(rows, columns=columns)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["optics1"],
            "rlnSphericalAberration": [config.cs_mm],
            "rlnVoltage": [config.voltage_kV],
            "rlnAmplitudeContrast": [config.amplitude_contrast],
            "rlnTomoTiltSeriesPixelSize": [p],
        }
    )
    write_particles_star(truth_dir / "particles.star", particles, optics)
    _csv(truth_dir / "hot_pixels.csv", pd.DataFrame(hot_pixels.numpy(), columns=["x", "y"]))
    write_text_atomic(truth_dir / "truth.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_text_atomic(truth_dir / "README.md", TRUTH_README.format(
        axis=config.tilt_axis_angle_deg,
        mdoc_axis=mdoc_tilt_axis_deg(config),
        axis_error=mdoc_tilt_axis_error_deg(config),
        fmt=config.movie_format,
        hand=config.defocus_handedness,
        gain=GAIN_FILE_NAME,
    ))


TRUTH_README = """# Ground truth of a tomopipe simulated acquisition

Conventions are those of tomopipe (`docs/conventions.md` §7): images `[y, x]` with x =
column (fast axis), y = row; angles counter-clockwise with +y drawn upward (3dmod); lengths in Å,
pixel positions 0-based with pixel centres on integers; defocus in Å, underfocus positive.

## Frames, gain and the tilt axis

* All pixel positions and the tilt-axis angle refer to the **movie arrays as tomopipe reads
  them** (`tomopipe.io.movies.read_movie`): TIFF movies are flipped along Y on read (IMOD,
  RELION and MotionCor2 do the same); MRC movies are read as stored.
* True tilt-axis angle: **{axis}°** (from +y, CCW), = `rlnTomoZRot` below.
* The mdoc title says `Tilt axis angle = {mdoc_axis:.1f}` (and `RotationAngle` = that + 90): it
  states the axis for the frames **as stored in the files** ({fmt}), and like a real SerialEM
  calibration it is off: the session's calibration error is **{axis_error:+.3f}°**
  (`mdoc_tilt_axis_error_deg` in truth.json; drawn with SD `mdoc_tilt_axis_error_sigma_deg`), so
  an importer that reads the mdoc gets `{axis} + error` and alignment has to find the truth.
  For TIFF the stored row order is the reverse of the array as read, and a Y flip turns an axis
  α into 180° − α, so an importer that flips TIFF on read must use `180 − mdoc angle`. This is
  why EMPIAR-10491's mdoc says −93.5° where Warp/RELION find −85.6°. The seed imports 85°: about
  the stored-frame angle + 180° (86.5° there), i.e. the stored frames' axis in the opposite
  direction; used with the read (flipped) arrays it would mirror the geometry. For MRC movies
  the mdoc angle is the read angle (plus the error).
* `../{gain}` (float32 MRC, mean 1) is the multiplicative gain: `corrected = raw × gain`. It is
  stored **flipped upside down** relative to the movies as read (rows reversed), as in
  EMPIAR-10491. Undo it with a Y flip: `read_gain(path, flip_y=True)` in tomopipe, RELION
  `--gain_flip 1` ("Flip upside down"). Raw counts are Poisson with mean
  `dose_per_frame·pixel²·transmission·(1 + contrast) / gain`, with the tilt's dose per frame
  (`FrameDosesAndNumber`; the dose grows as `1/cos(stage tilt)^exposure_cosine_power`, SerialEM's
  cosine rule, by exposure time: `ExposureDose`, `ExposureTime` per section) and the zero-loss
  transmission through the ice under the pixel (uneven ice: below).

## Per tilt series (`TS_xx`)

* `TS_xx.xf`, `TS_xx.tlt`: IMOD alignment of the tilt series **sorted by tilt angle**
  (ascending), one line per view. `.xf` maps raw -> aligned about the centre (IMOD), built with
  `tomopipe.algorithms.geometry.xf_from_alignment(ZRot, shifts/pixel, 1/magnification)`:
  `A = R2(−ZRot)/m`, `d = −A·shift_px`. Like RELION 5's IMOD importer it has no half-pixel term,
  so IMOD's centre (N−1)/2 and RELION's N/2 differ by 0.5 px. `.tlt` holds the **true** tilt
  angles (stage reading + offset + the specimen's pretilt + error), IMOD sign.
* `TS_xx.star`: RELION 5 tilt-series star (sorted by tilt angle): true `rlnDefocusU/V/Angle`
  (CTFFIND/RELION convention: U along the angle from +x toward +y; U − V = astigmatism, not
  reordered), `rlnMicrographPreExposure` (e/Å² before this tilt, from the acquisition order),
  `rlnTomoXTilt = 0`, `rlnTomoYTilt` (true tilt), `rlnTomoZRot` (true axis),
  `rlnTomoX/YShiftAngst` (specimen shifts, Å). RELION 5 projection model:
  `x_img = m·[Rz(ZRot)·Ry(YTilt)·X]_xy + shift` Å from the image centre (W//2, H//2); m is the
  per-tilt magnification (in `TS_xx_tilts.csv`; RELION has no column for it).
* Defocus of a point: `Δf = Δf_centre + rlnTomoHand·z_P`, `z_P = [Rz·Ry·X]_z`, hand = {hand}
  (`tomograms.star`); Δf_centre = (U + V)/2.
* `TS_xx_tilts.csv`: everything per tilt in acquisition order (nominal, stage and true tilt,
  the specimen's pretilt about the tilt axis (part of true − stage, with
  `tilt_angle_offset_deg` and the random error), axis, shifts, magnification, defocus, dose,
  exposure time, pre-exposure; `transmission`: zero-loss fraction through the mean ice
  thickness, `transmission_mean`: its mean over the image, which the counts follow;
  `ice_thickness_min_A`/`max_A`: the thinnest and thickest ice under the image).
* `TS_xx_ice_thickness.csv`: the ice slab's thickness (Å) on a 9 × 9 grid of specimen positions
  (Å from the tomogram centre, tomogram x and y); the slab is symmetric about z = 0 and its
  thickness varies smoothly (`ice_thickness_variation`, relative).
* `TS_xx_frame_shifts.csv`: per frame, the global displacement of the image content (Å and
  px, x and y of the arrays as read) relative to the projection model; frame 0 has none, so a
  motion correction that aligns to the first frame recovers the projection model. It is a
  smooth drift plus a random jitter (`jitter_x_A`, `jitter_y_A`: the jitter alone, SD
  `frame_jitter_A` per axis).
* `TS_xx_local_motion.csv`: local deformation (px) added to the global shift, on a 5 × 5 grid.
* `TS_xx_xray_hits.csv`: X-ray hits, one row each (per movie `hit` 0, 1, ...): `frame` and
  `second_frame` (−1: one frame only), `shape` (spot, streak, or simple), centre `x`, `y` (px),
  `size_px` (spot diameter or streak length), `angle_deg` (streak direction from +x),
  `peak_counts` (largest counts added to one frame-pixel), `background_counts` (the frame's
  expected counts there), `snr` (peak / sqrt(background)), `n_pixels`, `total_counts`.
* `TS_xx_xrays.csv`: their frame-pixels (acquisition index, hit, frame, pixel x, y, counts
  added, after the 255 clip).
* `TS_xx_particle_projections.csv`: each particle's centre in each tilt image (px), its depth
  z_P and defocus.

## Shared files

* `tomograms.star`: RELION 5 tomogram table (voltage, Cs, amplitude contrast, pixel size,
  `rlnTomoHand`, tomogram size in unbinned pixels: x across the tilt axis, y along it, z).
* `particles.star`: RELION 5 particles: `rlnCenteredCoordinateX/Y/ZAngst` (Å from the tomogram
  centre, z toward the electron source) and `rlnAngleRot/Tilt/Psi` (ZYZ; the matrix
  `(Rz(rot)Ry(tilt)Rz(psi))ᵀ` rotates the true map onto the particle).
* `hot_pixels.csv`: hot pixels (x, y), the same in every movie.
* `maps/true_map_binN.mrc`: the particle's potential relative to the ice around it (V, solvent
  excluded; the potential in vacuo when solvent exclusion is off), independent atom model with
  5-Gaussian electron form factors and the model's B-factors (plus united-atom hydrogens when
  the model has none), band-limited at Nyquist, centred on voxel N//2, at N × the raw pixel
  size, in the orientation of the model file (the reference of `particles.star`). Multiply by
  the interaction constant (truth.json) and the voxel size to get the phase per voxel.
* `truth.json`: settings, seed, summary numbers (mean inner potential of ice, interaction
  constant, timings).
"""
