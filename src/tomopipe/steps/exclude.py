"""Seed step "Excluding views and CTFs": flag tilts as excluded, by hand or by rule, in a new
subset; nothing is deleted and the input sets are not changed (as Scipion does).

A tilt excluded here is flagged in every set given (tilt series and CTF), so that alignment,
reconstruction, extraction and the exports leave it out. Views are numbered from 1 in the
angle-sorted stack, as IMOD and the viewers show them.
"""

from __future__ import annotations

import logging

import numpy as np

from tomopipe.algorithms.exclusion import dark_or_empty_views, defocus_outliers, high_astigmatism, poor_fit_resolution
from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc
from tomopipe.model.sets import CTF, TILT_SERIES

log = logging.getLogger("tomopipe")


def parse_tilt_selection(text: str) -> dict[str, list[int]]:
    """``"TS_01:3,5-7;TS_02:1"`` -> ``{"TS_01": [3, 5, 6, 7], "TS_02": [1]}`` (1-based views)."""
    selection: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if ":" not in part:
            raise TomopipeError(f"exclude_tilts {part!r}: expected TS:VIEWS, e.g. TS_01:3,5-7")
        ts_id, views = part.split(":", 1)
        numbers: list[int] = []
        for piece in filter(None, (v.strip() for v in views.split(","))):
            first, _, last = piece.partition("-")
            try:
                start, stop = int(first), int(last or first)
            except ValueError:
                raise TomopipeError(f"exclude_tilts {part!r}: {piece!r} is not a view number or range") from None
            if start < 1 or stop < start:
                raise TomopipeError(f"exclude_tilts {part!r}: {piece!r}: views are numbered from 1, ranges go up")
            numbers.extend(range(start, stop + 1))
        selection.setdefault(ts_id.strip(), []).extend(numbers)
    return selection


def view_statistics(task: dict) -> dict:
    """Mean and SD of every view of one tilt-series stack (one executor task)."""
    stack, _ = read_mrc(task["image_path"], mmap=True)
    sections = np.asarray(task["sections"])
    views = np.asarray(stack[sections], dtype=np.float64)
    return {"ts_id": task["ts_id"], "means": views.mean(axis=(1, 2)).tolist(), "sds": views.std(axis=(1, 2)).tolist()}


@register
class ExcludeViews(Step):
    type_name = "exclude_views"
    title = "Excluding views and CTFs"
    description = ("Flag tilts as excluded (by hand and/or by rule) in new subsets of the tilt series and CTFs; "
                   "later steps and the exports leave excluded tilts out.")
    params = (
        Param("exclude_tilts", "str", "by hand: TS:VIEWS;TS:VIEWS with 1-based views, e.g. 'TS_01:3,5-7;TS_02:1'",
              default=""),
        Param("max_astigmatism_A", "float", "exclude CTFs with |defocus U - V| above this (empty: no rule)", min=0),
        Param("max_fit_resolution_A", "float", "exclude CTFs fitted only to a resolution worse than this "
                                               "(empty: no rule)", min=0),
        Param("max_defocus_deviation_A", "float", "exclude CTFs whose defocus is further than this from the "
                                                  "median of its 4 nearest tilts (empty: no rule)", min=0),
        Param("exclude_dark_views", "bool", "exclude views darker than dark_view_fraction x the series' median, "
                                            "and empty views", default=False),
        Param("dark_view_fraction", "float", "dark-view threshold (fraction of the median view mean)", default=0.3,
              min=0, max=1),
    )
    inputs = (
        Port("tilt_series", TILT_SERIES.name, "tilt series whose views are flagged", optional=True),
        Port("ctf", CTF.name, "per-tilt CTF estimates whose entries are flagged", optional=True),
    )
    outputs = (
        Port("tilt_series", TILT_SERIES.name, "subset: the same tilts with the excluded ones disabled", optional=True),
        Port("ctf", CTF.name, "subset: the same CTFs with the excluded ones disabled", optional=True),
    )

    def run(self, ctx):
        params = ctx.params
        if not ctx.inputs:
            raise TomopipeError("exclude_views needs a tilt_series and/or a ctf input")
        tables = {port: ctx.input_items(port) for port in ctx.inputs}
        reference = tables.get("tilt_series", tables.get("ctf"))
        reasons: dict[tuple[str, int], list[str]] = {}

        def flag(ts_id: str, tilt_indices, reason: str) -> None:
            for tilt_index in tilt_indices:
                reasons.setdefault((ts_id, int(tilt_index)), []).append(reason)

        by_hand = parse_tilt_selection(params["exclude_tilts"])
        for ts_id, views in by_hand.items():
            indices = set(reference.loc[reference["ts_id"] == ts_id, "tilt_index"])
            if not indices:
                raise TomopipeError(f"exclude_tilts: no tilt series {ts_id!r} (have: "
                                    f"{', '.join(sorted(set(reference['ts_id'])))})")
            unknown = [v for v in views if v - 1 not in indices]
            if unknown:
                raise TomopipeError(f"exclude_tilts: {ts_id} has views 1..{len(indices)}, not {unknown}")
            flag(ts_id, [v - 1 for v in views], "by hand")

        if "ctf" in tables:
            for ts_id, group in tables["ctf"].groupby("ts_id", sort=True):
                group = group.sort_values("tilt_index")
                indices = group["tilt_index"].to_numpy()
                if params["max_astigmatism_A"] is not None:
                    mask = high_astigmatism(group["defocus_u_A"], group["defocus_v_A"], params["max_astigmatism_A"])
                    flag(ts_id, indices[mask], "astigmatism")
                if params["max_fit_resolution_A"] is not None:
                    mask = poor_fit_resolution(group["fit_resolution_A"], params["max_fit_resolution_A"])
                    flag(ts_id, indices[mask], "fit resolution")
                if params["max_defocus_deviation_A"] is not None:
                    mean_defocus = 0.5 * (group["defocus_u_A"].to_numpy() + group["defocus_v_A"].to_numpy())
                    mask = defocus_outliers(mean_defocus, params["max_defocus_deviation_A"])
                    flag(ts_id, indices[mask], "defocus outlier")
        elif any(params[k] is not None
                 for k in ("max_astigmatism_A", "max_fit_resolution_A", "max_defocus_deviation_A")):
            raise TomopipeError("CTF rules (astigmatism, fit resolution, defocus outliers) need a ctf input")

        if params["exclude_dark_views"]:
            if "tilt_series" not in tables:
                raise TomopipeError("exclude_dark_views needs a tilt_series input")
            series = tables["tilt_series"]
            tasks = []
            for ts_id, group in series.groupby("ts_id", sort=True):
                group = group.sort_values("tilt_index")
                paths = set(group["image_path"])
                if len(paths) != 1:
                    raise TomopipeError(f"{ts_id}: views are spread over several stacks; expected one")
                tasks.append({"ts_id": ts_id, "image_path": str(ctx.resolve(paths.pop())),
                              "sections": group["image_section"].tolist(),
                              "tilt_indices": group["tilt_index"].tolist()})
            for task, stats in zip(tasks, ctx.map(view_statistics, tasks, desc="view statistics")):
                mask = dark_or_empty_views(stats["means"], stats["sds"], params["dark_view_fraction"])
                flag(task["ts_id"], np.asarray(task["tilt_indices"])[mask], "dark or empty")

        newly = 0
        for port, items in tables.items():
            items = items.copy()
            hit = np.array([(ts, int(index)) in reasons for ts, index in zip(items["ts_id"], items["tilt_index"])],
                           dtype=bool)
            newly = max(newly, int((hit & items["enabled"].to_numpy(bool)).sum()))
            items.loc[hit, "enabled"] = False
            ctx.add_output(port, items, ctx.input_attrs(port), parent=ctx.inputs[port])
        for (ts_id, tilt_index), why in sorted(reasons.items()):
            log.info("%s view %d excluded: %s", ts_id, tilt_index + 1, ", ".join(why))
        return {"excluded_now": newly,
                "excluded": {f"{ts}:{index + 1}": why for (ts, index), why in sorted(reasons.items())}}
