"""The viewers' API: tilt series (views, images raw or aligned), CTF (per-tilt table, power
spectra with the fit and its zero rings, subsets), tomograms (slices as PNG, picks, edits of picks) and maps
(orthogonal slices, a small volume for the iso-surface, FSC curves).

Everything is addressed by set id and item (tilt series + view, map name): no path from a
request ever reaches the file system. Views are numbered from 1 in requests that make subsets (as
``tomopipe exclude``) and by their 0-based ``tilt_index`` elsewhere. Pick positions go to the
page in 0-based voxels of the tomogram (x, y, z) and come back the same way.
"""

from __future__ import annotations

import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tomopipe.edits import edit_picks, exclude_tilts
from tomopipe.model.particles import XYZ_A, tomogram_frames
from tomopipe.project.store import Project

from . import images
from .common import (
    ApiError,
    finished_set,
    float_query,
    int_query,
    json_body,
    json_response,
    mapped_array,
    mapped_mrc,
    open_project,
    run_name,
)
from .overlays import ctf_zero_rings_px

MAX_SIDE_LIMIT_PX = 2048
EDIT_TIMEOUT_S = 300.0


def list_sets(request: Request):
    """Finished sets, newest first, optionally of one ``kind``."""
    kind = request.query_params.get("kind") or None
    with open_project(request) as project:
        records = [{"set_id": s.id, "name": s.name, "kind": s.kind, "n_items": s.n_items, "run_id": s.run_id,
                    "run_name": project.get_run(s.run_id).name} for s in reversed(project.finished_sets(kind))]
    return json_response({"sets": records})


def _png(png: bytes, started: float, **headers) -> Response:
    elapsed_ms = (time.perf_counter() - started) * 1e3
    extra = {"X-Elapsed-ms": f"{elapsed_ms:.1f}", "Cache-Control": "no-store",
             **{f"X-{key.replace('_', '-')}": str(value) for key, value in headers.items()}}
    return Response(png, media_type="image/png", headers=extra)


def _view_row(items, ts_id: str, tilt_index: int):
    rows = items[(items["ts_id"] == ts_id) & (items["tilt_index"] == tilt_index)]
    if rows.empty:
        raise ApiError(f"no view {tilt_index} of tilt series {ts_id!r} in this set", 404)
    return rows.iloc[0]


# --------------------------------------------------------------------------- tilt series
def tilt_series(request: Request):
    """Per tilt series its views: angle, dose, excluded flag, alignment when present."""
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "tilt_series")
        items = project.read_items(record.id)
    columns = [c for c in ("tilt_index", "tilt_angle_deg", "dose_e_per_A2", "pre_exposure_e_per_A2",
                           "acquisition_order", "enabled", "rot_z_deg", "rot_y_deg", "shift_x_A", "shift_y_A")
               if c in items.columns]
    series = {str(ts): group.sort_values("tilt_index")[columns].to_dict("records")
              for ts, group in items.groupby("ts_id", sort=True)}
    return json_response({"set_id": record.id, "run_id": record.run_id, "series": series,
                          "has_aligned_images": bool("aligned_image_path" in items.columns
                                                     and items["aligned_image_path"].notna().any())})


def tilt_image(request: Request):
    """One view as PNG (``ts``, ``tilt`` = tilt_index, ``aligned=1`` for the aligned stack, ``max_px``)."""
    started = time.perf_counter()
    ts_id = request.query_params.get("ts", "")
    tilt_index = int_query(request, "tilt")
    aligned = request.query_params.get("aligned") in ("1", "true")
    max_px = int_query(request, "max_px", 768, 16, MAX_SIDE_LIMIT_PX)
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "tilt_series")
        row = _view_row(project.read_items(record.id), ts_id, tilt_index)
        path_column, section_column = ("aligned_image_path", "aligned_image_section") if aligned \
            else ("image_path", "image_section")
        if path_column not in row.index or not isinstance(row[path_column], str):
            raise ApiError(f"{ts_id} view {tilt_index} has no {'aligned ' if aligned else ''}image in set {record.id}",
                           404)
        stack = mapped_array(project, row[path_column])
    image = stack[int(row[section_column])] if stack.ndim == 3 else stack
    png, factor = images.image_png(image, max_px)
    return _png(png, started, Downsample=factor)


async def exclude_views(request: Request):
    """A new subset (tilt series and CTF of the set's run) with views excluded:
    ``{"exclude": {"TS_01": [3, 5]}, "name": "exclude"}``, views 1-based. Nothing is deleted."""
    set_id = request.path_params["set_id"]
    body = await json_body(request)
    selection = body.get("exclude")
    if not isinstance(selection, dict) or not selection:
        raise ApiError("'exclude' must map tilt-series ids to lists of 1-based views")
    parts = []
    for ts_id, views in selection.items():
        if not isinstance(views, list) or not views or not all(isinstance(v, int) and v >= 1 for v in views):
            raise ApiError(f"exclude[{ts_id!r}]: expected a list of 1-based view numbers, got {views!r}")
        parts.append(f"{ts_id}:{','.join(map(str, sorted(set(views))))}")
    name = run_name(body.get("name"), "exclude")
    with open_project(request) as project:
        record = finished_set(project, set_id, ("tilt_series", "ctf"))

    def job(project: Project):
        outcome, _ = exclude_tilts(project, record.run_id, ";".join(parts), name)
        return outcome

    return _wait(request, f"{name} (exclude_views)", "exclude_views", job)


def _wait(request: Request, label: str, step_type: str, function):
    """Run a write through the job queue and wait for it: the new run and its output sets."""
    job = request.app.state.jobs.submit(label, step_type, function)
    if not job.done.wait(EDIT_TIMEOUT_S):
        return json_response({"job": job.to_json()}, status=202)
    if job.status != "finished":
        raise ApiError(job.message or f"{label} failed", 400, {"job": job.to_json()})
    with open_project(request) as project:
        outputs = {name: {"set_id": s.id, "kind": s.kind, "n_items": s.n_items}
                   for name, s in project.sets_of_run(job.run_id).items()}
    return json_response({"job": job.to_json(), "run_id": job.run_id, "outputs": outputs}, status=201)


# --------------------------------------------------------------------------- CTF
def ctf_table(request: Request):
    """Per tilt series and tilt: defocus (mean, U, V), astigmatism |U − V|, fit resolution, flags."""
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "ctf")
        items = project.read_items(record.id)
    items = items.assign(defocus_mean_A=0.5 * (items["defocus_u_A"] + items["defocus_v_A"]),
                         astigmatism_A=(items["defocus_u_A"] - items["defocus_v_A"]).abs(),
                         has_spectrum=items["diagnostic_path"].notna() if "diagnostic_path" in items.columns
                         else False)
    columns = [c for c in ("tilt_index", "tilt_angle_deg", "defocus_mean_A", "defocus_u_A", "defocus_v_A",
                           "defocus_angle_deg", "astigmatism_A", "fit_resolution_A", "fit_score", "enabled",
                           "has_spectrum") if c in items.columns]
    series = {str(ts): group.sort_values("tilt_index")[columns].to_dict("records")
              for ts, group in items.groupby("ts_id", sort=True)}
    return json_response({"set_id": record.id, "run_id": record.run_id, "series": series})


def ctf_spectrum(request: Request):
    """A tilt's diagnostic power spectrum (observed left half, fitted model right half) as PNG."""
    started = time.perf_counter()
    ts_id = request.query_params.get("ts", "")
    tilt_index = int_query(request, "tilt")
    max_px = int_query(request, "max_px", 512, 16, MAX_SIDE_LIMIT_PX)
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "ctf")
        row = _view_row(project.read_items(record.id), ts_id, tilt_index)
        if "diagnostic_path" not in row.index or not isinstance(row["diagnostic_path"], str):
            raise ApiError(f"{ts_id} tilt {tilt_index}: this CTF set keeps no spectra", 404)
        stack = mapped_array(project, row["diagnostic_path"])
    image = stack[int(row["diagnostic_section"])] if stack.ndim == 3 else stack
    png, factor = images.image_png(image, max_px, 1.0, 99.0)
    return _png(png, started, Downsample=factor)


def ctf_rings(request: Request):
    """The fitted CTF's zeros for a tilt's spectrum (``ts``, ``tilt``) as polylines in the spectrum's
    pixels: ``{"size_px": w, "rings": [[[x, y], ...], ...]}`` (empty, with ``reason``, when the set
    does not record the acquisition's voltage, Cs and amplitude contrast)."""
    ts_id = request.query_params.get("ts", "")
    tilt_index = int_query(request, "tilt")
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "ctf")
        row = _view_row(project.read_items(record.id), ts_id, tilt_index)
        if "diagnostic_path" not in row.index or not isinstance(row["diagnostic_path"], str):
            raise ApiError(f"{ts_id} tilt {tilt_index}: this CTF set keeps no spectra", 404)
        stack, pixel_size_A = mapped_mrc(project, row["diagnostic_path"])
    size_px = int(stack.shape[-1])
    acquisition = (record.attrs.get("tilt_series") or {}).get(ts_id) or {}
    needed = ("voltage_kV", "spherical_aberration_mm", "amplitude_contrast")
    missing = [key for key in needed if acquisition.get(key) is None]
    if missing:
        return json_response({"size_px": size_px, "rings": [], "reason": f"the set records no {', '.join(missing)}"})
    phase = row["phase_shift_deg"] if "phase_shift_deg" in row.index and np.isfinite(row["phase_shift_deg"]) else 0.0
    rings = ctf_zero_rings_px(size_px, pixel_size_A, float(row["defocus_u_A"]), float(row["defocus_v_A"]),
                              float(row["defocus_angle_deg"]), float(acquisition["voltage_kV"]),
                              float(acquisition["spherical_aberration_mm"]), float(acquisition["amplitude_contrast"]),
                              float(phase))
    return json_response({"size_px": size_px, "rings": rings})


# --------------------------------------------------------------------------- tomograms and picks
def _particle_sets_on(project: Project, tomograms_set_id: int) -> list[dict]:
    """Finished particle sets whose runs took (directly or up the provenance) this tomograms set."""
    from tomopipe.export import lineage

    found = []
    for record in reversed(project.finished_sets("particles")):
        related = lineage(project, record)
        if "tomograms" in related and related["tomograms"].id == tomograms_set_id:
            found.append({"set_id": record.id, "run_id": record.run_id, "name": record.name,
                          "run_name": project.get_run(record.run_id).name, "n_items": record.n_items})
    return found


def tomograms(request: Request):
    """The tomograms of a set (size, voxel size) and the particle sets picked on them (newest first)."""
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "tomograms")
        items = project.read_items(record.id)
        particle_sets = _particle_sets_on(project, record.id)
    rows = [{"ts_id": str(r.ts_id), "size_xyz_px": [int(r.size_x_px), int(r.size_y_px), int(r.size_z_px)],
             "voxel_size_A": float(r.voxel_size_A), "enabled": bool(r.enabled)} for r in items.itertuples()]
    return json_response({"set_id": record.id, "run_id": record.run_id, "tomograms": rows,
                          "particle_sets": particle_sets})


def tomogram_slice(request: Request):
    """Section ``z`` (or ``y``/``x`` with ``axis``) of tomogram ``ts`` as PNG, binned to ``max_px``,
    averaged over ``thickness`` sections, contrast from the ``low``/``high`` percentiles."""
    started = time.perf_counter()
    ts_id = request.query_params.get("ts", "")
    axis = request.query_params.get("axis", "z")
    max_px = int_query(request, "max_px", 768, 16, MAX_SIDE_LIMIT_PX)
    thickness = int_query(request, "thickness", 1, 1, 64)
    low, high = float_query(request, "low", 0.5), float_query(request, "high", 99.5)
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "tomograms")
        items = project.read_items(record.id)
        rows = items[items["ts_id"] == ts_id]
        if rows.empty:
            raise ApiError(f"no tomogram {ts_id!r} in set {record.id}", 404)
        volume = mapped_array(project, rows.iloc[0]["tomogram_path"])
    n = volume.shape[{"z": 0, "y": 1, "x": 2}.get(axis, 0)]
    index = int_query(request, "index", n // 2)
    section = images.volume_slice(volume, axis, index, thickness)
    png, factor = images.image_png(section, max_px, low, high)
    return _png(png, started, Downsample=factor)


def particles(request: Request):
    """Picks of a particle set (all items, with their 0-based item number and ``enabled``), optionally
    of one tomogram ``ts``, in 0-based voxels of the tomogram."""
    ts_id = request.query_params.get("ts")
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], ("particles", "subtomograms"))
        items = project.read_items(record.id)
    frames = {ts: frame for ts, frame in _frames_from_attrs(record.attrs).items()}
    picks = []
    for index, row in enumerate(items.itertuples()):
        if ts_id is not None and row.ts_id != ts_id:
            continue
        frame = frames.get(str(row.ts_id))
        xyz_A = np.array([getattr(row, c) for c in XYZ_A], dtype=np.float64)
        xyz_px = frame.to_voxels(xyz_A) if frame is not None else np.full(3, np.nan)
        picks.append({"index": index, "ts_id": str(row.ts_id), "xyz_A": xyz_A, "xyz_px": xyz_px,
                      "enabled": bool(row.enabled), "score": getattr(row, "score", None)})
    return json_response({"set_id": record.id, "run_id": record.run_id, "picks": picks})


def _frames_from_attrs(attrs: dict) -> dict:
    """Tomogram frames a particle set's attributes record (``particle_set_attrs``)."""
    import pandas as pd

    rows = [{"ts_id": ts, "size_x_px": v["size_xyz_px"][0], "size_y_px": v["size_xyz_px"][1],
             "size_z_px": v["size_xyz_px"][2], "voxel_size_A": v["voxel_size_A"]}
            for ts, v in (attrs.get("tomograms") or {}).items()]
    return tomogram_frames(pd.DataFrame(rows)) if rows else {}


async def save_picks(request: Request):
    """A new coordinate set: ``{"source_set_id": particles or tomograms set, "ts_id",
    "add_px": [[x, y, z], ...] (0-based voxels), "remove_index": [item numbers of the source set],
    "name": "picks"}``."""
    body = await json_body(request)
    ts_id = str(body.get("ts_id") or "")
    add = body.get("add_px") or []
    remove = body.get("remove_index") or []
    if not isinstance(add, list) or not all(isinstance(p, list) and len(p) == 3 for p in add):
        raise ApiError("'add_px' must be a list of [x, y, z] voxel positions")
    if not isinstance(remove, list) or not all(isinstance(i, int) and i >= 0 for i in remove):
        raise ApiError("'remove_index' must be a list of item numbers")
    if not add and not remove:
        raise ApiError("nothing to save: no pick added or removed")
    if add and not ts_id:
        raise ApiError("'ts_id' names the tomogram of the added picks")
    try:
        source_id = int(body.get("source_set_id"))
    except (TypeError, ValueError):
        raise ApiError("'source_set_id' must be the id of a particles or tomograms set") from None
    with open_project(request) as project:
        source = finished_set(project, source_id, ("particles", "tomograms"))
    if remove and source.kind != "particles":
        raise ApiError("picks can be removed only from a particles set")
    values = {"units": "px", "add": ";".join(f"{ts_id}:{','.join(f'{float(v):.3f}' for v in p)}" for p in add),
              "remove_index": ",".join(map(str, sorted(set(remove))))}
    name = run_name(body.get("name"), "picks")

    def job(project: Project):
        return edit_picks(project, source.run_id, values, name)

    return _wait(request, f"{name} (edit_picks)", "edit_picks", job)


# --------------------------------------------------------------------------- maps
def _fsc_curves(attrs: dict) -> dict:
    """FSC curves a maps set's attributes carry (post-processing, reconstruction or refinement)."""
    curves, resolution = {}, None
    post = attrs.get("postprocess")
    if isinstance(post, dict) and post.get("shell_frequencies_per_A"):
        frequency = post["shell_frequencies_per_A"]
        for name in ("fsc_unmasked", "fsc_masked", "fsc_randomised_masked", "fsc_corrected"):
            if post.get(name):
                curves[name] = post[name]
        resolution = post.get("resolution_A")
    elif isinstance(attrs.get("fsc"), dict) and attrs["fsc"].get("shell_frequencies_per_A"):
        frequency = attrs["fsc"]["shell_frequencies_per_A"]
        curves = {k: v for k, v in attrs["fsc"].items() if k.startswith("fsc") and isinstance(v, list)}
        resolution = attrs.get("resolution_A")
    else:
        return {"frequency_per_A": [], "curves": {}, "resolution_A": None}
    return {"frequency_per_A": frequency, "curves": curves, "resolution_A": resolution}


def maps(request: Request):
    """The maps of a set (name, box, voxel size) and its FSC curves with the resolution."""
    with open_project(request) as project:
        record = finished_set(project, request.path_params["set_id"], "maps")
        items = project.read_items(record.id)
    rows = [{"map_name": str(r.map_name), "box_px": int(r.box_px), "voxel_size_A": float(r.voxel_size_A),
             "enabled": bool(r.enabled)} for r in items.itertuples()]
    return json_response({"set_id": record.id, "run_id": record.run_id, "maps": rows, "fsc": _fsc_curves(record.attrs),
                          "symmetry": record.attrs.get("symmetry")})


def _map_volume(project: Project, set_id: int, map_name: str) -> np.ndarray:
    record = finished_set(project, set_id, "maps")
    items = project.read_items(record.id)
    rows = items[items["map_name"] == map_name]
    if rows.empty:
        raise ApiError(f"no map {map_name!r} in set {record.id} (have {', '.join(items['map_name'])})", 404)
    return mapped_array(project, rows.iloc[0]["map_path"])


def map_slice(request: Request):
    """An orthogonal section of a map as PNG (``map``, ``axis`` z/y/x, ``index``, default the centre)."""
    started = time.perf_counter()
    axis = request.query_params.get("axis", "z")
    max_px = int_query(request, "max_px", 512, 16, MAX_SIDE_LIMIT_PX)
    with open_project(request) as project:
        volume = _map_volume(project, request.path_params["set_id"], request.query_params.get("map", ""))
    n = volume.shape[{"z": 0, "y": 1, "x": 2}.get(axis, 0)]
    index = int_query(request, "index", n // 2)
    png, factor = images.image_png(images.volume_slice(volume, axis, index), max_px, 0.5, 99.9)
    return _png(png, started, Downsample=factor)


def map_volume(request: Request):
    """A map binned to at most ``max_px`` (≤ 128) a side, uint8 ``[z, y, x]`` bytes (C order) for
    the WebGL iso-surface; ``X-Shape`` is ``z,y,x``, ``X-Value-Range`` the values of 0 and 255 and ``X-Iso-Level``
    a first level (:func:`images.iso_level_uint8`)."""
    max_px = int_query(request, "max_px", 64, 8, 128)
    with open_project(request) as project:
        volume = _map_volume(project, request.path_params["set_id"], request.query_params.get("map", ""))
    block, factor, (low, high) = images.volume_uint8(np.asarray(volume), max_px)
    return Response(block.tobytes(), media_type="application/octet-stream",
                    headers={"X-Shape": ",".join(map(str, block.shape)), "X-Downsample": str(factor),
                             "X-Iso-Level": str(images.iso_level_uint8(block)),
                             "X-Value-Range": f"{low:.6g},{high:.6g}", "Cache-Control": "no-store"})


ROUTES = [
    Route("/api/sets", list_sets),
    Route("/api/tilt-series/{set_id:int}", tilt_series),
    Route("/api/tilt-series/{set_id:int}/image", tilt_image),
    Route("/api/tilt-series/{set_id:int}/exclude", exclude_views, methods=["POST"]),
    Route("/api/ctf/{set_id:int}", ctf_table),
    Route("/api/ctf/{set_id:int}/spectrum", ctf_spectrum),
    Route("/api/ctf/{set_id:int}/rings", ctf_rings),
    Route("/api/ctf/{set_id:int}/subset", exclude_views, methods=["POST"]),
    Route("/api/tomograms/{set_id:int}", tomograms),
    Route("/api/tomograms/{set_id:int}/slice", tomogram_slice),
    Route("/api/particles/{set_id:int}", particles),
    Route("/api/picks", save_picks, methods=["POST"]),
    Route("/api/maps/{set_id:int}", maps),
    Route("/api/maps/{set_id:int}/slice", map_slice),
    Route("/api/maps/{set_id:int}/volume", map_volume),
]
