"""A step type used only by the engine tests: it reads a movies set and writes one row per tilt
series (tilt count, total dose). ``TOMOPIPE_TEST_HOLD`` makes it wait for a file to appear, so a
test can kill it mid-way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from tomopipe.engine.step_api import REGISTRY, Param, Port, Step, register


def summarise(task: dict) -> dict:
    return {"ts_id": task["ts_id"], "n_tilts": task["n"], "total_dose_e_per_A2": task["dose"] * task["scale"]}


class DoseSummary(Step):
    type_name = "test_dose_summary"
    title = "test - dose summary per tilt series"
    params = (Param("scale", "float", "factor applied to the total dose", default=1.0),)
    inputs = (Port("movies", "tilt_series_movies"),)
    outputs = (Port("summary", "dose_summary"),)

    def run(self, ctx):
        items = ctx.input_items("movies", enabled_only=True)
        partial = ctx.folder / "partial.txt"
        partial.write_text("started")
        hold = os.environ.get("TOMOPIPE_TEST_HOLD")
        while hold and not Path(hold).exists():
            time.sleep(0.05)
        tasks = [{"ts_id": ts, "n": len(group), "dose": float(group["dose_e_per_A2"].sum()),
                  "scale": ctx.params["scale"]}
                 for ts, group in items.groupby("ts_id", sort=True)]
        rows = ctx.map(summarise, tasks)
        ctx.add_output("summary", pd.DataFrame(rows))
        return {"tilt_series": len(rows)}


if DoseSummary.type_name not in REGISTRY:
    register(DoseSummary)
