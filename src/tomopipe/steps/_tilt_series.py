"""Per-tilt-series plumbing of the steps that read the views of tilt series and write new files:
typed task and result records (plain values, so that the workers passed to ``ctx.map`` pickle to
Dask and local processes), reading the sections of a tilt series, and the one way per-view
results are merged back into an output set.

A view is one section of an MRC stack (absolute paths), with its even/odd half sums when every
view of its tilt series has both (``image_even_path``, ``image_odd_path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tomopipe.errors import InputFileError
from tomopipe.io.mrc import read_mrc

HALF_COLUMNS = ("image_even_path", "image_odd_path")  # even/odd sums of the motion step, same sections
VIEW_COLUMNS = ("ts_id", "tilt_index", "image_path", "image_section")  # what makes a set a tilt-series set


@dataclass(frozen=True)
class View:
    """One view: ``image_section`` (0-based) of the stack ``image_path``; ``half_paths`` maps
    ``image_even_path`` / ``image_odd_path`` to their stacks (same section); ``values`` holds the
    item's other columns (``enabled``, ``tilt_angle_deg``, alignment, CTF, ...) as plain values."""

    tilt_index: int
    image_path: str
    image_section: int
    half_paths: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def path(self, column: str) -> str:
        """The stack of the view's full sum (``image_path``) or of one of its halves."""
        return self.image_path if column == "image_path" else self.half_paths[column]


@dataclass(frozen=True)
class TiltSeriesTask:
    """The work on one tilt series: its views (in tilt_index order), its acquisition (from the
    input set's attributes), the step's parameters, the run folder to write in and the device
    parameter (auto, cpu, cuda)."""

    ts_id: str
    acquisition: dict
    views: tuple[View, ...]
    params: dict
    folder: str
    device: str = "auto"

    @property
    def has_halves(self) -> bool:
        return bool(self.views) and all(c in v.half_paths for v in self.views for c in HALF_COLUMNS)


@dataclass(frozen=True)
class TiltSeriesResult:
    """What a worker did for one tilt series: ``views`` are per-view rows (each with ``tilt_index``)
    to merge into the items, ``files`` the files it wrote (name -> absolute path) and ``summary``
    its numbers for the run summary."""

    ts_id: str
    views: tuple[dict, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (bools stay bools, numbers become float or int)."""
    return value.item() if isinstance(value, np.generic) else value


def views_of(ctx, rows: pd.DataFrame) -> tuple[View, ...]:
    """Views of the item rows of one tilt series (absolute paths); halves only when every row has both."""
    views = []
    for row in rows.to_dict("records"):
        halves = {c: str(ctx.resolve(row[c])) for c in HALF_COLUMNS if isinstance(row.get(c), str) and row[c]}
        values = {k: _plain(v) for k, v in row.items() if k not in (*VIEW_COLUMNS, *HALF_COLUMNS)}
        views.append(View(int(row["tilt_index"]), str(ctx.resolve(row["image_path"])), int(row["image_section"]),
                          halves, values))
    if not all(c in v.half_paths for v in views for c in HALF_COLUMNS):
        views = [View(v.tilt_index, v.image_path, v.image_section, {}, v.values) for v in views]
    return tuple(views)


def tilt_series_items(ctx, port: str) -> pd.DataFrame:
    """All items of a tilt-series input set (every view, sorted by ts_id and tilt_index); a clear
    error when the set is empty or lacks the view columns."""
    items = ctx.input_items(port, enabled_only=False)
    if items.empty:
        ctx.fail(f"the input set {port!r} has no items")
    for column in VIEW_COLUMNS:
        if column not in items.columns:
            ctx.fail(f"the input set {port!r} has no {column!r} column: not a tilt-series set")
    return items.sort_values(["ts_id", "tilt_index"], kind="stable").reset_index(drop=True)


def acquisition_of(ctx, port: str, ts_id: str) -> dict:
    """The acquisition of one tilt series in the attributes of an input set (a clear error when absent)."""
    acquisitions = ctx.input_attrs(port).get("tilt_series", {})
    if ts_id not in acquisitions:
        ctx.fail(f"tilt series {ts_id!r} has no acquisition in the attributes of the input set {port!r}")
    return acquisitions[ts_id]


def ctf_hand(ctx, ts_id: str) -> int:
    """The defocus handedness (RELION ``rlnTomoHand``) of a tilt series: ``defocus_hand`` of its
    acquisition in the attributes of the input set 'ctf' (written by motion_ctf); a clear error
    when it is not there."""
    hand = ctx.input_attrs("ctf").get("tilt_series", {}).get(ts_id, {}).get("defocus_hand")
    if hand not in (-1, 1):
        ctx.fail(f"tilt series {ts_id!r}: the input set 'ctf' has no defocus handedness (defocus_hand = -1 or 1 in "
                 f"its attributes, RELION rlnTomoHand; got {hand!r}): estimate the CTF again with motion_ctf")
    return int(hand)


def tilt_series_tasks(ctx, port: str, task_type: type[TiltSeriesTask] = TiltSeriesTask
                      ) -> tuple[pd.DataFrame, list[TiltSeriesTask]]:
    """All items of the input set (see :func:`tilt_series_items`) and one task per tilt series
    with every view, the step's parameters and device."""
    items = tilt_series_items(ctx, port)
    tasks = [task_type(str(ts_id), acquisition_of(ctx, port, ts_id), views_of(ctx, group), dict(ctx.params),
                       str(ctx.folder), ctx.params.get("device", "auto"))
             for ts_id, group in items.groupby("ts_id", sort=True)]
    return items, tasks


def read_views(views: Sequence[View], column: str, image_size_px) -> np.ndarray:
    """The sections of ``views`` (column ``image_path`` or a half) as one array ``[n, y, x]``, input dtype.

    Raises InputFileError naming the stack when a section is missing or has the wrong size.
    """
    nx, ny = (int(v) for v in image_size_px)
    opened: dict[str, np.ndarray] = {}
    out = None
    for index, view in enumerate(views):
        path = view.path(column)
        if path not in opened:
            data, _ = read_mrc(path, mmap=True)
            opened[path] = data if data.ndim == 3 else data[np.newaxis]
        stack = opened[path]
        if not 0 <= view.image_section < stack.shape[0]:
            raise InputFileError(path, f"has {stack.shape[0]} sections; tilt_index {view.tilt_index} refers to "
                                       f"section {view.image_section}")
        if stack.shape[1:] != (ny, nx):
            raise InputFileError(path, f"images are {stack.shape[2]} x {stack.shape[1]} px but the tilt series' "
                                       f"acquisition says {nx} x {ny} px")
        if out is None:
            out = np.empty((len(views), ny, nx), dtype=stack.dtype.newbyteorder("="))
        out[index] = stack[view.image_section]
    return out


def merge_views(ctx, items: pd.DataFrame, results: Sequence[TiltSeriesResult], file_columns: Sequence[str] = (),
                drop: Sequence[str] = ()) -> pd.DataFrame:
    """The items of the tilt series in ``results`` with their per-view rows merged in on
    ``tilt_index`` (replacing columns of the same name), the columns ``drop`` removed, and each of
    ``file_columns`` (keys of ``result.files``) set to the file's stored path on the views the
    result lists (None on the others)."""
    tables = []
    for result in results:
        group = items[items["ts_id"] == result.ts_id]
        per_view = pd.DataFrame(list(result.views))
        replaced = [c for c in (*per_view.columns, *drop) if c != "tilt_index" and c in group.columns]
        group = group.drop(columns=replaced).merge(per_view, on="tilt_index", how="left", validate="one_to_one")
        listed = set(per_view["tilt_index"]) if "tilt_index" in per_view else set()
        for column in file_columns:
            if column in result.files:
                stored = ctx.stored_path(result.files[column])
                group[column] = [stored if index in listed else None for index in group["tilt_index"]]
        tables.append(group)
    return pd.concat(tables, ignore_index=True)


def check_same_acquisition(ts_id: str, source: pd.DataFrame, target: pd.DataFrame, source_acq: dict,
                           target_acq: dict, angle_tolerance_deg: float) -> list[str]:
    """Why the two tilt series are not the same acquisition (empty list: they are)."""
    problems = []
    if len(source) != len(target):
        return [f"{len(source)} views in the source but {len(target)} in the target"]
    if not np.array_equal(source["tilt_index"].to_numpy(), target["tilt_index"].to_numpy()):
        return ["the tilt indices differ"]
    if "tilt_angle_deg" in source and "tilt_angle_deg" in target:
        diff = np.abs(source["tilt_angle_deg"].to_numpy(float) - target["tilt_angle_deg"].to_numpy(float))
        if np.nanmax(diff) > angle_tolerance_deg:
            i = int(np.nanargmax(diff))
            problems.append(f"tilt angles differ by up to {diff[i]:.3f} deg (tilt_index "
                            f"{int(target['tilt_index'].iloc[i])}: {source['tilt_angle_deg'].iloc[i]:.3f} vs "
                            f"{target['tilt_angle_deg'].iloc[i]:.3f}) > {angle_tolerance_deg} deg")
    if "acquisition_order" in source and "acquisition_order" in target and not np.array_equal(
            source["acquisition_order"].to_numpy(), target["acquisition_order"].to_numpy()):
        problems.append("the acquisition orders differ")
    s_mdoc, t_mdoc = source_acq.get("mdoc_path"), target_acq.get("mdoc_path")
    if s_mdoc and t_mdoc and s_mdoc != t_mdoc:
        problems.append(f"different mdoc files ({s_mdoc} vs {t_mdoc})")
    try:
        s_fov = np.asarray(source_acq["image_size_px"], float) * float(source_acq["pixel_size_A"])
        t_fov = np.asarray(target_acq["image_size_px"], float) * float(target_acq["pixel_size_A"])
    except (KeyError, TypeError, ValueError):
        problems.append("image_size_px or pixel_size_A missing from an acquisition")
    else:
        # binning by a factor that does not divide the image drops less than one coarse pixel
        coarse_pixel_A = max(float(source_acq["pixel_size_A"]), float(target_acq["pixel_size_A"]))
        if np.any(np.abs(s_fov - t_fov) > coarse_pixel_A + 0.01 * np.maximum(s_fov, t_fov)):
            problems.append(f"different fields of view ({s_fov[0]:.0f} x {s_fov[1]:.0f} A vs "
                            f"{t_fov[0]:.0f} x {t_fov[1]:.0f} A)")
    return problems
