"""Seed step "tomo - import tilt series movies": SerialEM mdoc files + the movies beside them.

Every acquisition value comes from the mdoc unless the user sets it (the user's value wins,
so that mdoc errors can be corrected). The acquisition order, and from it the dose each tilt
received before it was recorded, comes from the sections' DateTime (section order when there is
none), never from an assumed tilt scheme.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.mdoc import dose_per_tilt_e_per_A2, read_mdoc
from tomopipe.io.movies import movie_info, read_gain
from tomopipe.io.mrc import write_mrc
from tomopipe.model.acquisition import acquisition_order_and_pre_exposure, mdoc_axis_for_movies
from tomopipe.model.sets import TILT_SERIES_MOVIES

log = logging.getLogger("tomopipe")


def tilt_series_id(mdoc_path: Path) -> str:
    """``TS_01.mrc.mdoc`` / ``TS_01.mdoc`` / ``TS_01.st.mdoc`` -> ``TS_01``."""
    name = mdoc_path.name[: -len(".mdoc")] if mdoc_path.name.lower().endswith(".mdoc") else mdoc_path.stem
    for suffix in (".mrc", ".st", ".tif", ".tiff", ".eer"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def matching_mdocs(files_directory: str, pattern: str) -> list[Path]:
    folder = Path(files_directory)
    if not folder.is_dir():
        raise InputFileError(folder, "files directory does not exist or is not a folder")
    found = sorted(Path(p) for p in glob.glob(str(folder / pattern)))
    if not found:
        raise InputFileError(folder, f"no file matches the pattern {pattern!r}")
    return found


def _user_or_mdoc(user_value, mdoc_value, name: str, mdoc_path: Path, param: str):
    value = user_value if user_value is not None else mdoc_value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise InputFileError(mdoc_path, f"{name} is missing from the mdoc and not given (set {param})")
    return float(value)


def read_tilt_series(task: dict) -> dict:
    """Read one mdoc and check its movies (one task of the executor). Returns the tilt table and
    the acquisition of this tilt series; raises InputFileError naming the file on bad input."""
    mdoc_path = Path(task["mdoc_path"])
    params = task["params"]
    mdoc = read_mdoc(mdoc_path, require_tilt_series=True)  # refuses sections without TiltAngle, frame mdocs
    sections = mdoc.sections
    pixel_size_A = _user_or_mdoc(params["pixel_size_A"], mdoc.pixel_size_A, "pixel size", mdoc_path, "pixel_size_A")
    voltage_kV = _user_or_mdoc(params["voltage_kV"], mdoc.voltage_kV, "voltage", mdoc_path, "voltage_kV")
    if params["tilt_axis_angle_deg"] is None:
        _user_or_mdoc(None, mdoc.tilt_axis_angle_deg, "tilt axis angle", mdoc_path, "tilt_axis_angle_deg")
    magnification = params["magnification"] if params["magnification"] is not None else mdoc.magnification

    if params["dose_per_tilt_e_per_A2"] is not None:
        doses = np.full(len(sections), params["dose_per_tilt_e_per_A2"], dtype=float)
    else:
        camera_pixel_A = mdoc.unbinned_pixel_size_A or pixel_size_A  # DoseRate is per unbinned camera pixel
        doses = np.array([dose_per_tilt_e_per_A2(row, camera_pixel_A) for _, row in sections.iterrows()],
                         dtype=object)
        if any(dose is None for dose in doses):
            raise InputFileError(mdoc_path, "no dose in the mdoc (ExposureDose, FrameDosesAndNumber or DoseRate "
                                            "with ExposureTime); set dose_per_tilt_e_per_A2")
        doses = doses.astype(float)
    order, pre_exposure = acquisition_order_and_pre_exposure(
        sections["tilt_angle_deg"].to_numpy(float), sections["date_time"], doses)
    pre_exposure = np.asarray(pre_exposure, dtype=float) + params["initial_dose_e_per_A2"]

    folder = mdoc_path.parent
    rows = []
    first = None  # (n_frames, ny, nx, movie name) of the first tilt
    for index, section in enumerate(sections.itertuples(index=False)):
        name = section.movie_name
        if not isinstance(name, str) or not name:
            raise InputFileError(mdoc_path, f"section ZValue = {section.z_value} has no SubFramePath")
        movie_path = folder / name
        if not movie_path.is_file():
            raise InputFileError(mdoc_path, f"movie {name} (section ZValue = {section.z_value}) is missing: "
                                            f"movies must be in the same folder as their mdoc ({folder})")
        n_frames, ny, nx, _ = movie_info(movie_path)
        first = first or (n_frames, ny, nx, name)
        if (n_frames, ny, nx) != first[:3]:
            raise InputFileError(movie_path, f"{n_frames} frames of {nx} x {ny} px, but {first[3]} has {first[0]} "
                                             f"frames of {first[2]} x {first[1]} px: all tilts of a tilt series "
                                             f"must match")
        expected = section.num_sub_frames
        if expected is not None and not pd.isna(expected) and int(expected) != n_frames:
            raise InputFileError(movie_path,
                                 f"holds {n_frames} frames but the mdoc says NumSubFrames = {int(expected)}")
        rows.append({
            "tilt_angle_deg": float(section.tilt_angle_deg),
            "acquisition_order": int(order[index]),
            "z_value": int(section.z_value),
            "dose_e_per_A2": float(doses[index]),
            "pre_exposure_e_per_A2": float(pre_exposure[index]),
            "accumulated_dose_e_per_A2": float(pre_exposure[index] + doses[index]),
            "movie_path": str(movie_path.resolve()),
            "frame_count": n_frames,
            "date_time": "" if pd.isna(section.date_time) else pd.Timestamp(section.date_time).isoformat(),
            "target_defocus_um": float(section.target_defocus_um),  # NaN when the mdoc has none
        })
    _, ny, nx, _ = first
    if params["tilt_axis_angle_deg"] is not None:
        tilt_axis_angle_deg = params["tilt_axis_angle_deg"]
    else:
        tilt_axis_angle_deg = mdoc_axis_for_movies(mdoc.tilt_axis_angle_deg, Path(first[3]), params["tomo5_mdoc"])
    acquisition = {
        "mdoc_path": str(mdoc_path.resolve()),
        "pixel_size_A": pixel_size_A,
        "voltage_kV": voltage_kV,
        "spherical_aberration_mm": params["spherical_aberration_mm"],
        "amplitude_contrast": params["amplitude_contrast"],
        "magnification": None if magnification is None or pd.isna(magnification) else float(magnification),
        "tilt_axis_angle_deg": float(tilt_axis_angle_deg),
        "image_size_px": [nx, ny],
        "frame_count": rows[0]["frame_count"],
        "n_tilts": len(rows),
    }
    log.info("%s: %d tilts %.1f..%.1f deg, %d frames of %d x %d px, %.3f A/px", mdoc_path.name, len(rows),
             min(r["tilt_angle_deg"] for r in rows), max(r["tilt_angle_deg"] for r in rows),
             acquisition["frame_count"], nx, ny, pixel_size_A)
    return {"ts_id": tilt_series_id(mdoc_path), "rows": rows, "acquisition": acquisition}


@register
class ImportMovies(Step):
    type_name = "import_movies"
    title = "tomo - import tilt series movies"
    description = ("Import tilt-series movies and their SerialEM mdoc files (movies must be in the folder of "
                   "their mdoc). Values left empty are read from the mdoc; a value given here wins.")
    params = (
        Param("files_directory", "path", "folder holding the mdoc files and the movies", required=True),
        Param("pattern", "str", "glob pattern of the mdoc files inside the folder", default="*.mdoc"),
        Param("tomo5_mdoc", "bool", "mdoc written by Thermo Tomography 5: its tilt axis becomes -axis - 90",
              default=False),
        Param("voltage_kV", "float", "microscope voltage (empty: from the mdoc)", min=1),
        Param("spherical_aberration_mm", "float", "spherical aberration Cs", default=2.7, min=0),
        Param("amplitude_contrast", "float", "amplitude contrast fraction", default=0.1, min=0, max=1),
        Param("magnification", "float", "nominal magnification (empty: from the mdoc)", min=0),
        Param("pixel_size_A", "float", "pixel size of the movies (empty: PixelSpacing of the mdoc)", min=1e-6),
        Param("tilt_axis_angle_deg", "float", "tilt axis angle of the movies as read, from +Y counterclockwise "
                                              "(empty: from the mdoc; 180 - mdoc angle for TIFF movies)"),
        Param("initial_dose_e_per_A2", "float", "dose received before the first tilt", default=0.0, min=0),
        Param("dose_per_tilt_e_per_A2", "float", "dose per tilt (empty: from the mdoc)", min=0),
        Param("gain_image", "path", "gain reference (MRC or TIFF) that multiplies the frames"),
        Param("gain_flip_x", "bool", "flip the gain left-right", default=False),
        Param("gain_flip_y", "bool", "flip the gain upside down", default=False),
        Param("gain_transpose", "bool", "transpose the gain (applied before the flips)", default=False),
    )
    outputs = (Port("movies", TILT_SERIES_MOVIES.name, "one tilt-series movie set per mdoc, one item per tilt"),)

    @classmethod
    def fingerprint(cls, params):
        files = matching_mdocs(params["files_directory"], params["pattern"])
        if params["gain_image"]:
            files.append(Path(params["gain_image"]))
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]

    def run(self, ctx):
        params = ctx.params
        mdocs = matching_mdocs(params["files_directory"], params["pattern"])
        results = ctx.map(read_tilt_series, [{"mdoc_path": str(m), "params": params} for m in mdocs],
                          desc="reading mdocs")
        ids = [r["ts_id"] for r in results]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise TomopipeError(f"several mdoc files give the tilt-series name(s) {', '.join(duplicates)}")
        tables = []
        for result in results:
            table = pd.DataFrame(result["rows"]).sort_values("tilt_angle_deg", kind="stable")
            table.insert(0, "tilt_index", np.arange(len(table)))
            table.insert(0, "ts_id", result["ts_id"])
            tables.append(table)
        items = pd.concat(tables, ignore_index=True)
        attrs = {"tilt_series": {r["ts_id"]: r["acquisition"] for r in results}}
        if params["gain_image"]:
            attrs["gain_path"] = ctx.stored_path(self._oriented_gain(ctx, results))
        ctx.add_output("movies", items, attrs)
        return {"tilt_series": len(results), "tilts": len(items),
                "pixel_size_A": sorted({r["acquisition"]["pixel_size_A"] for r in results}),
                "tilt_axis_angle_deg": sorted({r["acquisition"]["tilt_axis_angle_deg"] for r in results})}

    @staticmethod
    def _oriented_gain(ctx, results) -> Path:
        """The gain with the user's flips/transpose applied, checked against the movie size and
        written to the run folder, so later steps just multiply."""
        params = ctx.params
        gain_path = Path(params["gain_image"])
        gain = read_gain(gain_path, flip_x=params["gain_flip_x"], flip_y=params["gain_flip_y"],
                         transpose=params["gain_transpose"])
        sizes = {tuple(r["acquisition"]["image_size_px"]) for r in results}
        for nx, ny in sizes:
            if gain.shape != (ny, nx):
                raise InputFileError(gain_path, f"gain is {gain.shape[1]} x {gain.shape[0]} px (after flips/transpose) "
                                                f"but the movies are {nx} x {ny} px")
        if not np.all(np.isfinite(gain)) or (gain <= 0).mean() > 0.5:
            raise InputFileError(gain_path, "gain has non-finite values or is mostly <= 0: not a gain reference")
        out = ctx.folder / "gain.mrc"
        write_mrc(out, gain.astype(np.float32), voxel_size_A=results[0]["acquisition"]["pixel_size_A"])
        return out
