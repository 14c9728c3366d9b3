"""Import a tilt-series alignment made by another program: IMOD (``TS.xf`` with ``TS.tlt``
beside it, and ``TS.xtilt`` when there is one) or AreTomo (``TS.aln``, :mod:`tomopipe.io.aretomo`).

The output is an aligned tilt-series set like ``align_tilt_series`` writes (the same images,
the alignment columns of :mod:`tomopipe.model.alignment`, RELION 5 semantics), so that
``assign_alignment``, ``reconstruct_tomogram`` and the exports work after it:

* IMOD: ``rot_z_deg = atan2(−A21, A11)``, specimen shift ``−A⁻¹·D`` and magnification
  ``1 / sqrt(det A)`` (the inverse of :func:`tomopipe.model.alignment.xf_for_views`), tilt
  ``rot_y_deg`` from the ``.tlt``, ``rot_x_deg`` from the ``.xtilt`` (0 without one).
* AreTomo: ``rot_z_deg = ROT``, ``rot_y_deg = TILT``, shift ``(TX, TY)``, magnification 1,
  ``rot_x_deg = 0`` (as RELION 5 imports it). A local alignment in the file is not imported
  (the summary says so); views AreTomo found dark are excluded.

Files: ``pattern`` names the file of each tilt series, ``{ts_id}`` standing for its name,
relative to ``files_directory`` (or absolute); a pattern without ``{ts_id}`` is one explicit
file, for a set of one tilt series. The format follows the extension (``.xf``, ``.aln``)
unless ``format`` says otherwise. Shifts are in pixels of the stack that was aligned: an
``.aln`` says its size (RawSize), so its binning follows from the tilt series' image size;
IMOD files do not, and are taken to be in the tilt series' pixels unless
``alignment_binning`` or ``alignment_pixel_size_A`` says otherwise.

Views: file rows are tied to views by tilt order (IMOD lines sorted by their ``.tlt`` angle;
AreTomo rows and dark frames by their position in tilt order), after which every refined tilt
must lie within ``angle_tolerance_deg`` of its nominal tilt plus the common offset. An IMOD
file has one line per view of the tilt series, or one per enabled view. Views that are not
enabled (or dark in AreTomo) keep NaN alignment columns and are disabled. Any mismatch (file
missing, views, tilts, field of view) fails the step naming the file and the tilt series.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.geometry import alignment_from_xf, xf_scale_and_distortion
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.aretomo import AlnFile, read_aln
from tomopipe.io.imod import read_tlt, read_xf
from tomopipe.model.sets import ALIGNMENT_GEOMETRY, TILT_SERIES

FORMATS = {".xf": "imod", ".aln": "aretomo"}
#: Columns of an aligned set that an imported alignment replaces (the aligner's own extras too).
REPLACED_COLUMNS = (*ALIGNMENT_GEOMETRY, "align_residual_px", "aligned_image_path", "aligned_image_section")


def alignment_path(params: dict, ts_id: str) -> Path:
    """The alignment file of tilt series ``ts_id``: ``pattern`` with ``{ts_id}`` replaced,
    under ``files_directory`` unless absolute."""
    path = Path(params["pattern"].replace("{ts_id}", ts_id)).expanduser()
    if not path.is_absolute():
        if not params["files_directory"]:
            raise TomopipeError(f"pattern {params['pattern']!r} is relative: set files_directory")
        path = Path(params["files_directory"]) / path
    return path


def alignment_format(params: dict, path: Path) -> str:
    if params["format"] != "auto":
        return params["format"]
    if path.suffix.lower() not in FORMATS:
        raise InputFileError(path, f"cannot tell the alignment format from the extension {path.suffix!r} "
                                   f"(known: {', '.join(FORMATS)}); set format = imod or aretomo")
    return FORMATS[path.suffix.lower()]


def check_tilts(path: Path, nominal_deg: np.ndarray, refined_deg: np.ndarray, tolerance_deg: float) -> float:
    """The common offset (median of refined − nominal); raises InputFileError naming ``path``
    when a view's refined tilt differs from its nominal one plus that offset by more than
    ``tolerance_deg``."""
    residual = np.asarray(refined_deg, np.float64) - np.asarray(nominal_deg, np.float64)
    offset = float(np.median(residual))
    error = np.abs(residual - offset)
    if error.max() > tolerance_deg:
        i = int(error.argmax())
        raise InputFileError(path, f"the tilt {refined_deg[i]:.2f} deg (view {i + 1} in tilt order) is "
                                   f"{error[i]:.2f} deg from its nominal tilt {nominal_deg[i]:.2f} deg plus the "
                                   f"common offset {offset:.2f} deg (tolerance {tolerance_deg} deg): the file does "
                                   "not belong to these views")
    return offset


def imod_alignment(by_tilt: pd.DataFrame, xf_path: Path, pixel_size_A: float, tolerance_deg: float):
    """Alignment table (``tilt_index`` + alignment columns) and notes from ``TS.xf``/``TS.tlt``
    (/``TS.xtilt``) for the views ``by_tilt`` (one tilt series, sorted by nominal tilt)."""
    a, d = read_xf(xf_path)
    tlt_path = xf_path.with_suffix(".tlt")
    tilts = read_tlt(tlt_path)
    if len(tilts) != len(a):
        raise InputFileError(tlt_path, f"{len(tilts)} angles, but {xf_path.name} has {len(a)} transforms")
    xtilt_path = xf_path.with_suffix(".xtilt")
    xtilts = read_tlt(xtilt_path) if xtilt_path.exists() else np.zeros(len(a))
    if len(xtilts) != len(a):
        raise InputFileError(xtilt_path, f"{len(xtilts)} angles, but {xf_path.name} has {len(a)} transforms")
    enabled = by_tilt["enabled"].to_numpy(bool)
    if len(a) == len(by_tilt):
        targets = by_tilt
    elif len(a) == enabled.sum():
        targets = by_tilt[enabled]
    else:
        raise InputFileError(xf_path, f"{len(a)} transforms, but the tilt series has {len(by_tilt)} views "
                                      f"({int(enabled.sum())} enabled): one line per view, or per enabled view, is "
                                      "expected (exclude the same views in tomopipe before importing)")
    order = np.argsort(tilts, kind="stable")
    offset = check_tilts(tlt_path, targets["tilt_angle_deg"].to_numpy(np.float64), tilts[order], tolerance_deg)
    a, d = torch.from_numpy(a), torch.from_numpy(d)  # float64 in, float64 out
    try:
        rot_z, shifts_px = (t.numpy() for t in alignment_from_xf(a, d))
    except ValueError as error:
        raise InputFileError(xf_path, str(error)) from None
    scale = xf_scale_and_distortion(a)[0].numpy()
    table = pd.DataFrame({"tilt_index": targets["tilt_index"].to_numpy(), "rot_z_deg": rot_z[order],
                          "rot_y_deg": tilts[order], "rot_x_deg": xtilts[order],
                          "shift_x_A": shifts_px[order, 0] * pixel_size_A,
                          "shift_y_A": shifts_px[order, 1] * pixel_size_A,
                          "magnification": 1.0 / scale[order]})
    return table, {"tilt_offset_deg": offset, "files": [str(xf_path), str(tlt_path)]
                   + ([str(xtilt_path)] if xtilt_path.exists() else [])}


def aretomo_alignment(by_tilt: pd.DataFrame, aln: AlnFile, pixel_size_A: float, tolerance_deg: float):
    """Alignment table and notes from an AreTomo ``.aln`` for the views ``by_tilt`` (one tilt
    series, sorted by nominal tilt)."""
    if aln.n_views != len(by_tilt):
        raise InputFileError(aln.path, f"{aln.n_views} views (RawSize: {len(aln.global_alignment)} aligned + "
                                       f"{len(aln.dark_frames)} dark), but the tilt series has {len(by_tilt)}")
    rows = aln.global_alignment
    if np.any(np.abs(rows["gmag"].to_numpy() - 1.0) > 1e-6):
        raise InputFileError(aln.path, "GMAG other than 1: every AreTomo version writes 1.0 and the meaning of "
                                       "another value is not documented")
    kept = by_tilt.iloc[aln.view_positions()]
    offset = check_tilts(aln.path, kept["tilt_angle_deg"].to_numpy(np.float64), rows["tilt_deg"].to_numpy(),
                         tolerance_deg)
    dark = by_tilt.iloc[aln.dark_frames["tilt_position"].to_numpy(int)]
    residual = aln.dark_frames["tilt_deg"].to_numpy() - dark["tilt_angle_deg"].to_numpy(np.float64)
    error = np.minimum(np.abs(residual), np.abs(residual - offset))  # written without (AreTomo3) or with the offset
    if len(error) and error.max() > tolerance_deg:
        i = int(error.argmax())
        raise InputFileError(aln.path, f"dark frame at tilt position {int(aln.dark_frames['tilt_position'].iloc[i])} "
                                       f"has tilt {aln.dark_frames['tilt_deg'].iloc[i]:.2f} deg, "
                                       "but that view's nominal "
                                       f"tilt is {dark['tilt_angle_deg'].iloc[i]:.2f} deg")
    table = pd.DataFrame({"tilt_index": kept["tilt_index"].to_numpy(), "rot_z_deg": rows["rot_deg"].to_numpy(),
                          "rot_y_deg": rows["tilt_deg"].to_numpy(), "rot_x_deg": 0.0,
                          "shift_x_A": rows["tx_px"].to_numpy() * pixel_size_A,
                          "shift_y_A": rows["ty_px"].to_numpy() * pixel_size_A, "magnification": 1.0})
    notes = {"tilt_offset_deg": offset, "files": [str(aln.path)], "dark_tilt_indices": dark["tilt_index"].tolist(),
             "alpha_offset_deg": aln.alpha_offset_deg, "beta_offset_deg": aln.beta_offset_deg,
             "local_alignment_patches": aln.num_patches}
    return table, notes


def alignment_pixel_size_A(params: dict, acquisition: dict, path: Path, raw_size_px=None) -> float:
    """Pixel size (Å) of the stack that was aligned: from the parameters, else from the file's
    own image size (``raw_size_px``, AreTomo) against the tilt series', else the tilt series'.
    With ``raw_size_px``, the two fields of view must agree to one pixel of the coarser one."""
    pixel_size_A = float(acquisition["pixel_size_A"])
    size_px = np.asarray(acquisition["image_size_px"], np.float64)
    if params["alignment_pixel_size_A"] is not None:
        result = params["alignment_pixel_size_A"]
    elif params["alignment_binning"] is not None:
        result = pixel_size_A * params["alignment_binning"]
    elif raw_size_px is not None:
        result = pixel_size_A * size_px[0] / raw_size_px[0]
    else:
        return pixel_size_A
    if raw_size_px is not None:
        fov_A, file_fov_A = size_px * pixel_size_A, np.asarray(raw_size_px[:2], np.float64) * result
        if np.any(np.abs(fov_A - file_fov_A) > max(result, pixel_size_A) + 1e-6):
            raise InputFileError(path, f"its stack of {raw_size_px[0]} x {raw_size_px[1]} px at {result:.4g} A/px "
                                       f"({file_fov_A[0]:.0f} x {file_fov_A[1]:.0f} A) is not the tilt series' field "
                                       f"of view ({fov_A[0]:.0f} x {fov_A[1]:.0f} A at {pixel_size_A:.4g} A/px): "
                                       "check alignment_binning / alignment_pixel_size_A")
    return float(result)


def import_one(params: dict, ts_id: str, views: pd.DataFrame, acquisition: dict) -> tuple[pd.DataFrame, dict]:
    """The views of one tilt series with the imported alignment, and the notes for the summary."""
    path = alignment_path(params, ts_id)
    if not path.is_file():
        others = sorted(Path(p).name for p in glob.glob(str(alignment_path(params, "*"))))
        raise InputFileError(path, f"no alignment file for tilt series {ts_id!r}"
                                   + (f" (files matching the pattern: {', '.join(others[:10])})" if others else ""))
    fmt = alignment_format(params, path)
    by_tilt = views.sort_values(["tilt_angle_deg", "tilt_index"], kind="stable").reset_index(drop=True)
    if fmt == "imod":
        pixel_size_A = alignment_pixel_size_A(params, acquisition, path)
        table, notes = imod_alignment(by_tilt, path, pixel_size_A, params["angle_tolerance_deg"])
    else:
        aln = read_aln(path)
        pixel_size_A = alignment_pixel_size_A(params, acquisition, path, aln.raw_size_px)
        table, notes = aretomo_alignment(by_tilt, aln, pixel_size_A, params["angle_tolerance_deg"])
    out = views.drop(columns=[c for c in REPLACED_COLUMNS if c in views.columns])
    out = out.merge(table, on="tilt_index", how="left", validate="one_to_one")
    enabled = out["enabled"].astype(bool).to_numpy() & out["rot_z_deg"].notna().to_numpy()
    out.loc[~enabled, list(ALIGNMENT_GEOMETRY)] = np.nan
    out["enabled"] = enabled
    notes.update({"format": fmt, "alignment_pixel_size_A": pixel_size_A, "aligned_views": int(enabled.sum()),
                  "tilt_axis_deg": float(np.median(table["rot_z_deg"]))})
    return out, notes


@register
class ImportAlignment(Step):
    type_name = "import_alignment"
    title = "tomo - import tilt-series alignment (IMOD / AreTomo)"
    description = ("Attach an alignment made elsewhere (IMOD .xf + .tlt, AreTomo .aln) to a tilt-series set: "
                   "tilt axis, refined tilts, specimen shifts in Å and magnification per view, as align_tilt_series "
                   "writes them.")
    params = (
        Param("files_directory", "path", "folder of the alignment files (for a relative pattern)"),
        Param("pattern", "str", "alignment file of each tilt series, {ts_id} standing for its name (e.g. "
                                "'{ts_id}/{ts_id}.xf', '{ts_id}.aln'); relative to files_directory or absolute",
              required=True),
        Param("format", "str", "file format: auto (from the extension: .xf imod, .aln aretomo), imod or aretomo",
              default="auto", choices=("auto", "imod", "aretomo")),
        Param("alignment_binning", "float", "binning of the aligned stack relative to the tilt series (default: "
                                            "from the .aln's RawSize; 1 for IMOD files)", min=0.01),
        Param("alignment_pixel_size_A", "float", "pixel size of the aligned stack (Å), instead of "
                                                 "alignment_binning", min=1e-3),
        Param("angle_tolerance_deg", "float", "largest difference between a refined tilt and its nominal tilt plus "
                                              "the common offset", default=2.0, min=0),
    )
    inputs = (Port("tilt_series", TILT_SERIES.name, "tilt series of the acquisitions that were aligned"),)
    outputs = (Port("tilt_series", TILT_SERIES.name, "the same images with the imported alignment columns"),)

    @classmethod
    def fingerprint(cls, params):
        try:
            pattern = alignment_path(params, "*")
        except TomopipeError:
            return None
        files = [Path(p) for p in sorted(glob.glob(str(pattern)))]
        files += [f.with_suffix(s) for f in files for s in (".tlt", ".xtilt") if f.with_suffix(s).exists()]
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    def run(self, ctx):
        params = ctx.params
        if params["alignment_binning"] is not None and params["alignment_pixel_size_A"] is not None:
            ctx.fail("give alignment_binning or alignment_pixel_size_A, not both")
        items = ctx.input_items("tilt_series", enabled_only=False)
        for column in ("ts_id", "tilt_index", "tilt_angle_deg", "enabled"):
            if column not in items.columns:
                ctx.fail(f"the input set has no {column!r} column: not a tilt-series set")
        acquisitions = ctx.input_attrs("tilt_series").get("tilt_series", {})
        groups = list(items.groupby("ts_id", sort=True))
        if "{ts_id}" not in params["pattern"] and len(groups) > 1:
            ctx.fail(f"pattern {params['pattern']!r} names one file but the set has {len(groups)} tilt series: "
                     "put {ts_id} in it")
        tables, notes = [], {}
        for ts_id, views in groups:
            if ts_id not in acquisitions:
                ctx.fail(f"tilt series {ts_id!r} has no acquisition in the attributes of the input set")
            try:
                table, notes[ts_id] = import_one(params, ts_id, views, acquisitions[ts_id])
            except TomopipeError as error:
                ctx.fail(f"tilt series {ts_id!r}: {error}")
            tables.append(table)
        attrs = copy.deepcopy(ctx.input_attrs("tilt_series"))
        attrs["alignment"] = {ts_id: {"imported": True, **n} for ts_id, n in notes.items()}
        ctx.add_output("tilt_series", pd.concat(tables, ignore_index=True), attrs)
        summary = {key: {ts_id: n[key] for ts_id, n in notes.items()}
                   for key in ("format", "aligned_views", "tilt_axis_deg", "tilt_offset_deg", "alignment_pixel_size_A")}
        summary["tilt_series"] = len(notes)
        not_imported = {ts_id: f"local alignment ({n['local_alignment_patches']} patches per view): only the global "
                               "alignment is imported"
                        for ts_id, n in notes.items() if n.get("local_alignment_patches")}
        if not_imported:
            ctx.log.warning("; ".join(f"{k}: {v}" for k, v in not_imported.items()))
            summary["not_imported"] = not_imported
        return summary
