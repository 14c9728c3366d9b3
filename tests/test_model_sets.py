"""Set kinds declared once in model/sets.py: every step's output has a schema, outputs are checked
against it when added, and ``enabled`` comes back from the store as numpy bool."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import tomopipe.steps  # noqa: F401  (registers the step types)
from tomopipe.engine.context import RunContext
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.step_api import REGISTRY
from tomopipe.errors import TomopipeError
from tomopipe.export import relion5
from tomopipe.model.sets import ALIGNMENT_COLUMNS, PARTICLES, SET_KINDS, TILT_SERIES, TOMOGRAMS, set_kind
from tomopipe.project.store import Project


def _tomograms(n: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"ts_id": [f"TS_{i:02d}" for i in range(n)], "tomogram_path": [f"t{i}.mrc" for i in range(n)],
                         "voxel_size_A": [10.0] * n, "size_x_px": [64] * n, "size_y_px": [64] * n,
                         "size_z_px": [32] * n})


def _context(project: Project) -> RunContext:
    run = project.create_run("rec", "reconstruct_tomogram", {}, {}, "sig")
    return RunContext(project, run, "rec", {}, {}, {"tomograms": TOMOGRAMS.name}, LocalExecutor(1),
                      logging.getLogger("test"))


def test_every_step_output_kind_has_a_schema():
    steps = [s for s in REGISTRY.values() if s.__module__.startswith("tomopipe.steps.")]
    assert len(steps) >= 9
    for step in steps:
        for port in (*step.inputs, *step.outputs):
            assert set_kind(port.kind) is not None, f"{step.type_name}: port {port.name!r} kind {port.kind!r}"
    assert {c.name for c in ALIGNMENT_COLUMNS if c.required} == {"rot_z_deg", "rot_y_deg", "shift_x_A", "shift_y_A"}
    assert all(not TILT_SERIES.column(c.name).required for c in ALIGNMENT_COLUMNS)


def test_relion_export_maps_declared_columns():
    declared = {c.name for kind in SET_KINDS.values() for c in kind.columns}
    assert set(relion5.ALIGNMENT_COLUMNS) <= declared and set(relion5.CTF_COLUMNS) <= declared


def test_output_missing_a_required_column_or_of_wrong_dtype_is_refused(tmp_path):
    with Project.init(tmp_path / "p") as project:
        ctx = _context(project)
        with pytest.raises(TomopipeError, match=r"step 'rec': output 'tomograms'.*missing required column "
                                                r"'tomogram_path'"):
            ctx.add_output("tomograms", _tomograms().drop(columns="tomogram_path"))
        with pytest.raises(TomopipeError, match=r"output 'tomograms'.*column 'size_z_px' has dtype float64"):
            ctx.add_output("tomograms", _tomograms().assign(size_z_px=[31.5, 32.0]))
        with pytest.raises(TomopipeError, match=r"column 'voxel_size_A' has dtype .*expected float"):
            ctx.add_output("tomograms", _tomograms().assign(voxel_size_A=["10", "10"]))
        assert not ctx.outputs and not project.finished_sets()
        record = ctx.add_output("tomograms", _tomograms().assign(extra_note=["a", "b"]))  # undeclared: allowed
        assert record.kind == "tomograms" and record.n_items == 2


@pytest.mark.parametrize("enabled", [
    np.array([True, False, True]),
    pd.Series([True, False, True], dtype=object),
    pd.array([True, False, True], dtype="boolean"),
], ids=["numpy", "python", "nullable"])
def test_enabled_and_dtypes_round_trip_through_the_store(tmp_path, enabled):
    items = _tomograms(3).assign(enabled=enabled, rot_deg=[1.0, 2.0, np.nan])
    with Project.init(tmp_path / "p") as project:
        run = project.create_run("rec", "reconstruct_tomogram", {}, {}, "sig")
        record = project.add_set(run.id, "tomograms", TOMOGRAMS.name, items)
        back = project.read_items(record.id)
        assert back["enabled"].dtype == np.bool_ and back["enabled"].tolist() == [True, False, True]
        assert project.read_items(record.id, enabled_only=True)["ts_id"].tolist() == ["TS_00", "TS_02"]
        assert TOMOGRAMS.problems(back) == []
        assert back["size_x_px"].dtype == np.int64 and back["voxel_size_A"].dtype == np.float64
        np.testing.assert_array_equal(back["rot_deg"].to_numpy(), items["rot_deg"].to_numpy())


def test_enabled_with_missing_values_is_refused(tmp_path):
    items = _tomograms(2).assign(enabled=pd.array([True, None], dtype="boolean"))
    with Project.init(tmp_path / "p") as project:
        run = project.create_run("rec", "reconstruct_tomogram", {}, {}, "sig")
        with pytest.raises(TomopipeError, match="set 'tomograms': column 'enabled' must hold only True/False"):
            project.add_set(run.id, "tomograms", TOMOGRAMS.name, items)


def test_particle_schema_accepts_a_valid_table_and_names_problems():
    rng = np.random.default_rng(0)
    n = 5
    particles = pd.DataFrame({
        "ts_id": ["TS_01"] * n, **{c: rng.uniform(-500, 500, n) for c in ("x_A", "y_A", "z_A")},
        **{c: rng.uniform(-180, 180, n) for c in ("rot_deg", "tilt_deg", "psi_deg")},
        "score": rng.uniform(0, 1, n), "half_set": [1, 2, 1, 2, 1], "enabled": [True] * n,
    })
    assert PARTICLES.problems(particles) == []
    assert PARTICLES.problems(particles.drop(columns="half_set")) == ["missing required column 'half_set'"]
    assert PARTICLES.problems(particles.assign(enabled=[1] * n)) == [
        "column 'enabled' has dtype int64, expected bool"]
    assert PARTICLES.problems(particles.assign(ts_id=np.arange(n))) == [
        "column 'ts_id' has dtype int64, expected str"]
