"""Seed step "tomo - tilt-series assign alignment": attach the alignment found on one tilt-series
set (e.g. binned by 10) to another set of the same acquisition (e.g. the unbinned, X-ray-erased
one).

Alignment columns (RELION 5 semantics, :mod:`tomopipe.algorithms.geometry`): ``rot_z_deg,
rot_y_deg, rot_x_deg`` (angles: unchanged by binning), ``shift_x_A, shift_y_A`` (specimen shifts
in Å: unchanged too; in pixels of the target they are the source's pixel shifts times
``source pixel size / target pixel size``, which is what an IMOD ``.xf`` written from the target
gets, see :func:`tomopipe.model.alignment.xf_for_views`) and ``magnification``. They are copied per ``tilt_index``.

Refused, with an error naming the tilt series: a target tilt series missing from the source, a
different number of views, tilt angles that differ by more than ``angle_tolerance_deg``,
different acquisition orders or mdoc files, or a different field of view (image size x pixel
size, 1 % tolerance). A view stays enabled only if it is enabled in both sets.
"""

from __future__ import annotations

import copy

import pandas as pd

from tomopipe.engine.step_api import Param, Port, Step, register
from tomopipe.model.sets import ALIGNMENT_GEOMETRY, TILT_SERIES
from tomopipe.steps._tilt_series import check_same_acquisition

REQUIRED = ("rot_z_deg", "rot_y_deg", "shift_x_A", "shift_y_A")


@register
class AssignAlignment(Step):
    type_name = "assign_alignment"
    title = "tomo - tilt-series assign alignment"
    description = ("Copy the alignment (tilt axis, refined tilts, specimen shifts in Å, magnification) of one "
                   "tilt-series set onto another set of the same acquisition at another pixel size.")
    params = (
        Param("angle_tolerance_deg", "float", "largest tilt-angle difference accepted between the two sets",
              default=0.05, min=0),
    )
    inputs = (Port("source", TILT_SERIES.name, "aligned tilt series (alignment columns)"),
              Port("target", TILT_SERIES.name, "tilt series of the same acquisitions to get the alignment"))
    outputs = (Port("tilt_series", TILT_SERIES.name, "the target with the source's alignment"),)

    def run(self, ctx):
        source = ctx.input_items("source", enabled_only=False)
        target = ctx.input_items("target", enabled_only=False)
        missing = [c for c in ("ts_id", "tilt_index", *REQUIRED) if c not in source.columns]
        if missing:
            ctx.fail(f"the 'source' set has no column(s) {', '.join(missing)}: it is not aligned")
        for column in ("ts_id", "tilt_index"):
            if column not in target.columns:
                ctx.fail(f"the 'target' set has no {column!r} column: not a tilt-series set")
        source_acqs = ctx.input_attrs("source").get("tilt_series", {})
        target_acqs = ctx.input_attrs("target").get("tilt_series", {})
        tables, ratios = [], {}
        for ts_id, views in target.sort_values(["ts_id", "tilt_index"]).groupby("ts_id", sort=True):
            src = source[source["ts_id"] == ts_id].sort_values("tilt_index")
            if src.empty:
                ctx.fail(f"tilt series {ts_id!r} of the target is not in the source set")
            if ts_id not in source_acqs or ts_id not in target_acqs:
                ctx.fail(f"tilt series {ts_id!r} has no acquisition in the attributes of the source or target set")
            problems = check_same_acquisition(ts_id, src, views, source_acqs[ts_id], target_acqs[ts_id],
                                              ctx.params["angle_tolerance_deg"])
            if problems:
                ctx.fail(f"tilt series {ts_id!r}: the source and target are not the same acquisition: "
                         + "; ".join(problems))
            columns = [c for c in ALIGNMENT_GEOMETRY if c in src.columns]
            merged = views.drop(columns=[c for c in ALIGNMENT_GEOMETRY if c in views.columns]).merge(
                src[["tilt_index", *columns, "enabled"]].rename(columns={"enabled": "_source_enabled"}),
                on="tilt_index", how="left", validate="one_to_one")
            merged["enabled"] = merged["enabled"].astype(bool) & merged["_source_enabled"].astype(bool)
            tables.append(merged.drop(columns="_source_enabled"))
            ratios[ts_id] = float(source_acqs[ts_id]["pixel_size_A"]) / float(target_acqs[ts_id]["pixel_size_A"])
        out = pd.concat(tables, ignore_index=True)
        attrs = copy.deepcopy(ctx.input_attrs("target"))
        source_attrs = ctx.input_attrs("source")
        if "alignment" in source_attrs:
            attrs["alignment"] = copy.deepcopy(source_attrs["alignment"])
        attrs["assigned_alignment"] = {"pixel_size_ratio": ratios}
        ctx.add_output("tilt_series", out, attrs)
        return {"tilt_series": len(tables), "tilts": len(out), "enabled": int(out["enabled"].sum()),
                "pixel_size_ratio": ratios}
