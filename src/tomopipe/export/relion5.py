"""RELION 5 tomography layout: ``tilt_series.star`` (one row per tilt series) and one STAR per
tilt series in ``tilt_series/`` (one row per tilt, sorted by tilt angle), with the columns of
RELION's Import, MotionCorr, CtfFind and alignment jobs as far as the project has those data.

A tilt that is excluded (``enabled`` off) in any of the sets used is not written; a column is
written only when the project holds its data (no CTF or alignment columns before those steps, no
nominal defocus when the mdoc had none). Motion-corrected images live in one MRC stack per tilt
series; ``rlnMicrographName`` names a view as ``N@stack.mrc`` (RELION's image-in-stack notation,
N from 1). Defocus handedness (``rlnTomoHand``) comes from the CTF estimation when there is one
(``defocus_hand`` of the tilt series' acquisition, or the CTF set's column), else −1 (RELION's and
the sheet's default, the only value a project without a CTF estimate can give).

When the project holds tomograms and picks, ``tomograms.star`` (the tilt-series columns plus each
tomogram's binning, size and file, as RELION 5's reconstruction writes it) and ``particles.star``
(the enabled picks of the newest particle set, ``tomopipe.io.picks``) are written beside them.
A ``subtomograms`` set (extracted particles) is written as ``relion_tomo_subtomo`` writes it: one
file per particle in ``Subtomograms/TS/`` (2-D: ``N_stack2d.mrcs``, one section per tilt of the
extraction; 3-D: ``N_data.mrc`` and ``N_weights.mrc``), ``particles.star`` naming them
(``rlnTomoParticleName`` TS/N, ``rlnTomoVisibleFrames``, ``rlnImageName``, ``rlnCtfImage``; the
optics of CTF-premultiplied images at the extraction's binning) and ``optimisation_set.star``; the
particles of an auto-refine (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/Y/ZAngst``) also as
``Refine3D/run_data.star``.
A ``maps`` set (reconstruct_particle, postprocess) is written with RELION's names:
``Refine3D/run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``, ``run_class001.mrc`` and
``PostProcess/postprocess.mrc``, ``postprocess_masked.mrc``, ``postprocess.star`` (``general``: the
resolution, B-factor, half maps, mask, randomisation resolution, Guinier fit; ``fsc``: the FSC
curves per shell, as ``relion_postprocess`` writes them; paths relative to the export folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.io.picks import relion5_particles_table
from tomopipe.io.star import write_particles_star, write_star, write_tilt_series_star, write_tomograms_star
from tomopipe.model.sets import CTF, MAPS, PARTICLES, SUBTOMOGRAMS, TILT_SERIES, TILT_SERIES_MOVIES, TOMOGRAMS
from tomopipe.model.subtomograms import tilts_used_mask, weights_first_section
from tomopipe.project.store import Project, SetRecord

DEFAULT_HAND = -1.0
KEY = ["ts_id", "tilt_index"]
# model/sets.py column names -> RELION 5 labels
ALIGNMENT_COLUMNS = {"rot_x_deg": "rlnTomoXTilt", "rot_y_deg": "rlnTomoYTilt", "rot_z_deg": "rlnTomoZRot",
                     "shift_x_A": "rlnTomoXShiftAngst", "shift_y_A": "rlnTomoYShiftAngst"}
CTF_COLUMNS = {"defocus_u_A": "rlnDefocusU", "defocus_v_A": "rlnDefocusV", "defocus_angle_deg": "rlnDefocusAngle",
               "fit_resolution_A": "rlnCtfMaxResolution", "fit_score": "rlnCtfFigureOfMerit",
               "phase_shift_deg": "rlnPhaseShift"}


def merged_tilts(project: Project, sets: dict[str, SetRecord]) -> pd.DataFrame:
    """One row per tilt enabled in every set used (movies, tilt series, CTF), columns of all."""
    tables = [project.read_items(sets[kind].id).add_prefix(f"{kind}.").rename(
        columns={f"{kind}.{k}": k for k in KEY})
        for kind in (TILT_SERIES_MOVIES.name, TILT_SERIES.name, CTF.name) if kind in sets]
    merged = tables[0]
    for table in tables[1:]:
        merged = merged.merge(table, on=KEY, how="inner")
    enabled = np.ones(len(merged), dtype=bool)
    for column in [c for c in merged.columns if c.endswith(".enabled")]:
        enabled &= merged[column].fillna(True).to_numpy(bool)
    return merged[enabled].reset_index(drop=True)


def _column(table: pd.DataFrame, name: str, kinds=(TILT_SERIES.name, TILT_SERIES_MOVIES.name, CTF.name)):
    """The values of ``name`` from the first of ``kinds`` that has any, else None."""
    for kind in kinds:
        column = table.get(f"{kind}.{name}")
        if column is not None and column.notna().any():
            return column.to_numpy()
    return None


def _image_in_stack(project: Project, group: pd.DataFrame, path_column: str, section_column: str):
    """``N@stack`` names (N from 1) when every row has a stack and a section, else None."""
    paths, sections = group.get(path_column), group.get(section_column)
    if paths is None or sections is None or paths.isna().any() or sections.isna().any():
        return None
    return [f"{int(s) + 1}@{project.absolute_path(p)}" for p, s in zip(paths, sections)]


def per_tilt_series_table(project: Project, group: pd.DataFrame, acquisition: dict) -> pd.DataFrame:
    """The rows of one tilt series; a column is written only when the project holds its data."""
    group = group.sort_values(_first_present(group, "tilt_angle_deg"), kind="stable")
    columns: dict[str, object] = {
        "rlnMicrographMovieName": _column(group, "movie_path", (TILT_SERIES_MOVIES.name,)),
        "rlnTomoTiltMovieFrameCount": _column(group, "frame_count", (TILT_SERIES_MOVIES.name,)),
        "rlnTomoNominalStageTiltAngle": _column(group, "tilt_angle_deg"),
        "rlnTomoNominalTiltAxisAngle": acquisition.get("tilt_axis_angle_deg"),
        "rlnMicrographPreExposure": _column(group, "pre_exposure_e_per_A2"),
        "rlnTomoNominalDefocus": _column(group, "target_defocus_um", (TILT_SERIES_MOVIES.name, TILT_SERIES.name)),
        "rlnMicrographName": _image_in_stack(project, group, f"{TILT_SERIES.name}.image_path",
                                            f"{TILT_SERIES.name}.image_section"),
    }
    columns.update({theirs: _column(group, ours, (CTF.name,)) for ours, theirs in CTF_COLUMNS.items()})
    if columns["rlnDefocusU"] is not None and columns["rlnDefocusV"] is not None:
        columns["rlnCtfAstigmatism"] = np.abs(columns["rlnDefocusU"] - columns["rlnDefocusV"])
    columns["rlnCtfImage"] = _image_in_stack(project, group, f"{CTF.name}.diagnostic_path",
                                            f"{CTF.name}.diagnostic_section")
    columns.update({theirs: _column(group, ours, (TILT_SERIES.name,)) for ours, theirs in ALIGNMENT_COLUMNS.items()})
    return pd.DataFrame({name: values for name, values in columns.items() if values is not None})


def _first_present(table: pd.DataFrame, name: str) -> str:
    for kind in (TILT_SERIES.name, TILT_SERIES_MOVIES.name, CTF.name):
        if f"{kind}.{name}" in table.columns:
            return f"{kind}.{name}"
    raise KeyError(name)


def _hand(acquisition: dict, tilts: pd.DataFrame, ts_id: str) -> float:
    """The CTF estimation's defocus handedness of a tilt series, else ``DEFAULT_HAND``."""
    if acquisition.get("defocus_hand") in (-1, 1):
        return float(acquisition["defocus_hand"])
    if f"{CTF.name}.defocus_hand" not in tilts.columns:
        return DEFAULT_HAND
    hands = tilts.loc[tilts["ts_id"] == ts_id, f"{CTF.name}.defocus_hand"].dropna()
    return float(hands.iloc[0]) if len(hands) else DEFAULT_HAND


def export(project: Project, sets: dict[str, SetRecord], out: Path) -> list[Path]:
    base = next((sets[k] for k in (TILT_SERIES.name, TILT_SERIES_MOVIES.name) if k in sets), None)
    picks = TOMOGRAMS.name in sets and PARTICLES.name in sets
    subtomograms = SUBTOMOGRAMS.name in sets
    if base is None and not picks and not subtomograms and MAPS.name not in sets:
        raise TomopipeError(f"{project.folder}: no tilt series to export to RELION 5")
    written, global_rows = _export_tilt_series(project, sets, base, out) if base is not None else ([], [])
    rows = {row["rlnTomoName"]: row for row in global_rows}
    if subtomograms:
        written += export_subtomograms(project, sets, out, rows)
    elif picks:
        written += export_picks(project, sets, out, rows)
    if MAPS.name in sets:
        written += export_maps(project, sets[MAPS.name], out)
    return written


def _export_tilt_series(project: Project, sets: dict[str, SetRecord], base: SetRecord,
                        out: Path) -> tuple[list[Path], list[dict]]:
    movies = sets.get(TILT_SERIES_MOVIES.name)
    tilts = merged_tilts(project, sets)
    written, global_rows = [], []
    for ts_id, group in tilts.groupby("ts_id", sort=True):
        acquisition = base.attrs["tilt_series"][ts_id]
        original = (movies.attrs["tilt_series"][ts_id] if movies and ts_id in movies.attrs["tilt_series"]
                    else acquisition)
        path = out / "tilt_series" / f"{ts_id}.star"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tilt_series_star(path, per_tilt_series_table(project, group, acquisition), tomo_name=ts_id)
        written.append(path)
        global_rows.append({
            "rlnTomoName": ts_id,
            "rlnTomoTiltSeriesStarFile": f"tilt_series/{ts_id}.star",
            "rlnVoltage": acquisition["voltage_kV"],
            "rlnSphericalAberration": acquisition["spherical_aberration_mm"],
            "rlnAmplitudeContrast": acquisition["amplitude_contrast"],
            "rlnMicrographOriginalPixelSize": original["pixel_size_A"],
            "rlnTomoTiltSeriesPixelSize": acquisition["pixel_size_A"],
            "rlnTomoHand": _hand(acquisition, tilts, ts_id),
            "rlnOpticsGroupName": "optics1",
        })
    path = out / "tilt_series.star"
    write_star(path, {"global": pd.DataFrame(global_rows)})
    return [path, *written], global_rows


def _acquisition_row(ts_id: str, acquisition: dict, voxel_size_A: float) -> dict:
    """The tilt-series columns of a tomograms.star row from a set's acquisition (no tilt series exported)."""
    pixel_size_A = acquisition.get("pixel_size_A", voxel_size_A)
    row = {"rlnTomoName": ts_id, "rlnVoltage": acquisition.get("voltage_kV"),
           "rlnSphericalAberration": acquisition.get("spherical_aberration_mm"),
           "rlnAmplitudeContrast": acquisition.get("amplitude_contrast"),
           "rlnMicrographOriginalPixelSize": pixel_size_A, "rlnTomoTiltSeriesPixelSize": pixel_size_A,
           "rlnTomoHand": float(acquisition.get("defocus_hand", DEFAULT_HAND)), "rlnOpticsGroupName": "optics1"}
    return {key: value for key, value in row.items() if value is not None}


def tomograms_table(project: Project, tomograms: SetRecord, tilt_series_rows: dict[str, dict]) -> pd.DataFrame:
    """RELION 5 ``tomograms.star`` rows: the tilt-series columns plus ``rlnTomoTomogramBinning``
    (voxel size / tilt-series pixel size), ``rlnTomoSizeX/Y/Z`` (in tilt-series pixels, as RELION 5
    gives them: the tomogram's size times its binning) and ``rlnTomoReconstructedTomogram``."""
    items = project.read_items(tomograms.id, enabled_only=True).sort_values("ts_id", kind="stable")
    acquisitions = tomograms.attrs.get("tilt_series", {})
    rows = []
    for tomogram in items.itertuples():
        row = dict(tilt_series_rows.get(tomogram.ts_id)
                   or _acquisition_row(tomogram.ts_id, acquisitions.get(tomogram.ts_id, {}), tomogram.voxel_size_A))
        binning = tomogram.voxel_size_A / row["rlnTomoTiltSeriesPixelSize"]
        row.update({"rlnTomoTomogramBinning": binning,
                    **{f"rlnTomoSize{axis}": int(round(size * binning)) for axis, size in
                       zip("XYZ", (tomogram.size_x_px, tomogram.size_y_px, tomogram.size_z_px))},
                    "rlnTomoReconstructedTomogram": str(project.absolute_path(tomogram.tomogram_path))})
        rows.append(row)
    return pd.DataFrame(rows)


def export_picks(project: Project, sets: dict[str, SetRecord], out: Path,
                 tilt_series_rows: dict[str, dict]) -> list[Path]:
    """``tomograms.star`` and the ``particles.star`` of the enabled picks of the set's tomograms,
    one optics group (``optics1``) with the first tomogram's optics."""
    tomograms = tomograms_table(project, sets[TOMOGRAMS.name], tilt_series_rows)
    particles = project.read_items(sets[PARTICLES.name].id, enabled_only=True)
    particles = particles[particles["ts_id"].isin(tomograms["rlnTomoName"])]
    paths = [out / "tomograms.star", out / "particles.star"]
    write_tomograms_star(paths[0], tomograms)
    write_particles_star(paths[1], relion5_particles_table(particles), _optics(tomograms))
    return paths


def _optics(tomograms: pd.DataFrame) -> pd.DataFrame:
    """One optics group (``optics1``) with the first tomogram's optics."""
    columns = ["rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
               "rlnTomoTiltSeriesPixelSize"]
    return tomograms[[c for c in columns if c in tomograms.columns]].head(1).assign(rlnOpticsGroup=1)


def export_subtomograms(project: Project, sets: dict[str, SetRecord], out: Path,
                        tilt_series_rows: dict[str, dict]) -> list[Path]:
    """The enabled particles of the subtomograms set as RELION 5's extraction job writes them
    (module docstring): per-particle files, ``tomograms.star`` (of the tomograms set when there is
    one, else the tilt-series rows), ``particles.star`` and ``optimisation_set.star``."""
    record = sets[SUBTOMOGRAMS.name]
    extraction = record.attrs.get("extraction", {})
    items = project.read_items(record.id, enabled_only=True)
    if TOMOGRAMS.name in sets:
        tomograms = tomograms_table(project, sets[TOMOGRAMS.name], tilt_series_rows)
    else:
        acquisitions = record.attrs.get("tilt_series", {})
        tomograms = pd.DataFrame([tilt_series_rows.get(ts_id) or _acquisition_row(
            ts_id, acquisitions.get(ts_id, {}), extraction["tilt_series_pixel_size_A"])
            for ts_id in sorted(items["ts_id"].unique())])
    items = items[items["ts_id"].isin(tomograms["rlnTomoName"])].reset_index(drop=True)
    if items.empty:
        raise TomopipeError(f"{project.folder}: no enabled extracted particle of an exported tomogram")
    numbers = items.groupby("ts_id", sort=False).cumcount().to_numpy() + 1
    table = relion5_particles_table(items)
    table["rlnTomoParticleName"] = [f"{ts_id}/{n}" for ts_id, n in zip(items["ts_id"], numbers)]
    table["rlnTomoVisibleFrames"] = ["[" + ",".join(str(int(u)) for u in tilts_used_mask(text)) + "]"
                                     for text in items["tilts_used"]]
    files = _particle_files(project, items, numbers, out / "Subtomograms", int(extraction["dimensions"]),
                            float(extraction["pixel_size_A"]))
    table["rlnImageName"] = [str(f[0]) for f in files]
    if int(extraction["dimensions"]) == 3:
        table["rlnCtfImage"] = [str(f[1]) for f in files]
    optics = _optics(tomograms).assign(
        rlnCtfDataAreCtfPremultiplied=1, rlnImageDimensionality=int(extraction["dimensions"]),
        rlnTomoSubtomogramBinning=float(extraction["binning"]), rlnImagePixelSize=float(extraction["pixel_size_A"]),
        rlnImageSize=int(extraction["crop_px"]))
    paths = [out / "tomograms.star", out / "particles.star", out / "optimisation_set.star"]
    write_tomograms_star(paths[0], tomograms)
    blocks = {"general": {"rlnTomoSubTomosAre2DStacks": int(int(extraction["dimensions"]) == 2)},
              "optics": optics, "particles": table}
    write_star(paths[1], blocks)
    if "refined" in record.attrs:  # an auto-refine's particles: also as relion_refine names them
        paths.append(out / "Refine3D" / "run_data.star")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        write_star(paths[-1], blocks)
    write_star(paths[2], {"optimisation_set": {"rlnTomoParticlesFile": str(paths[1].resolve()),
                                               "rlnTomoTomogramsFile": str(paths[0].resolve())}})
    return paths + [path for pair in files for path in pair if path is not None]


def _particle_files(project: Project, items: pd.DataFrame, numbers, folder: Path, dimensions: int,
                    pixel_size_A: float) -> list[tuple[Path, Path | None]]:
    """Each particle's sections copied to its own file(s): ``(image, weights or None)``, absolute paths."""
    opened: dict[str, np.ndarray] = {}

    def sections(stored: str, first: int, count: int) -> np.ndarray:
        if stored not in opened:
            opened[stored] = read_mrc(project.absolute_path(stored), mmap=True)[0]
        return np.asarray(opened[stored][first:first + count])

    out = []
    for row, number in zip(items.itertuples(), numbers):
        target = (folder / row.ts_id).resolve()
        target.mkdir(parents=True, exist_ok=True)
        first, count = int(row.data_section), int(row.n_sections)
        if dimensions == 2:
            image = target / f"{number}_stack2d.mrcs"
            write_mrc(image, sections(row.data_path, first, count), pixel_size_A, stack=True)
            out.append((image, None))
            continue
        image, weights = target / f"{number}_data.mrc", target / f"{number}_weights.mrc"
        write_mrc(image, sections(row.data_path, first, count), pixel_size_A)
        write_mrc(weights, sections(row.weights_path, weights_first_section(first), 2 * count), pixel_size_A)
        out.append((image, weights))
    return out


# map_name in a maps set -> RELION's file (folder, name)
MAP_FILES = {"half1": ("Refine3D", "run_half1_class001_unfil.mrc"),
             "half2": ("Refine3D", "run_half2_class001_unfil.mrc"),
             "full": ("Refine3D", "run_class001.mrc"), "sharpened": ("PostProcess", "postprocess.mrc"),
             "masked": ("PostProcess", "postprocess_masked.mrc"), "mask": ("PostProcess", "postprocess_mask.mrc"),
             "local_resolution": ("PostProcess", "relion_locres.mrc")}


def export_maps(project: Project, maps: SetRecord, out: Path) -> list[Path]:
    """The enabled maps of a ``maps`` set under RELION's names (module docstring), and
    ``PostProcess/postprocess.star`` when the set comes from the postprocess step."""
    items = project.read_items(maps.id, enabled_only=True)
    written = {}
    for row in items.itertuples():
        if row.map_name not in MAP_FILES:
            continue
        path = out.joinpath(*MAP_FILES[row.map_name])
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project.absolute_path(row.map_path), path)
        written[row.map_name] = path
    result = maps.attrs.get("postprocess")
    if result is not None:
        path = out / "PostProcess" / "postprocess.star"
        write_star(path, postprocess_star_blocks(result, {name: str(p.relative_to(out)) for name, p in written.items()},
                                                 float(items["voxel_size_A"].iloc[0]), int(items["box_px"].iloc[0])))
        written["star"] = path
    return list(written.values())


def postprocess_star_blocks(result: dict, files: dict[str, str], voxel_size_A: float, box_px: int) -> dict:
    """``general`` and ``fsc`` blocks of RELION's ``postprocess.star`` from the postprocess step's
    attributes (``result``) and the exported files by map name. Without a mask RELION writes only the
    unmasked FSC; with a mask whose unmasked FSC never fell below 0.8 nothing was randomised (0)."""
    general = {"rlnFinalResolution": result["resolution_A"], "rlnBfactorUsedForSharpening": result["b_factor_A2"],
               "rlnUnfilteredMapHalf1": files.get("half1", ""), "rlnUnfilteredMapHalf2": files.get("half2", ""),
               "rlnMaskName": files.get("mask", result.get("mask", ""))}
    if result.get("randomise_from_A") is not None:
        general["rlnRandomiseFrom"] = result["randomise_from_A"]
    if result.get("guinier"):
        general.update({"rlnFittedSlopeGuinierPlot": result["guinier"]["slope_A2"],
                        "rlnFittedInterceptGuinierPlot": result["guinier"]["intercept"],
                        "rlnCorrelationFitGuinierPlot": result["guinier"]["correlation"]})
    shells = np.arange(len(result["fsc_unmasked"]))
    frequency = shells / (box_px * voxel_size_A)
    fsc = {"rlnSpectralIndex": shells, "rlnResolution": frequency,
           "rlnAngstromResolution": np.where(shells > 0, box_px * voxel_size_A / np.maximum(shells, 1), 999.0)}
    if result.get("fsc_masked") is not None:
        fsc.update({"rlnFourierShellCorrelationCorrected": result["fsc_corrected"],
                    "rlnFourierShellCorrelationUnmaskedMaps": result["fsc_unmasked"],
                    "rlnFourierShellCorrelationMaskedMaps": result["fsc_masked"],
                    "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps":
                        result["fsc_randomised_masked"] or np.zeros(shells.size)})
    else:
        fsc["rlnFourierShellCorrelationUnmaskedMaps"] = result["fsc_unmasked"]
    return {"general": general, "fsc": pd.DataFrame(fsc)}
