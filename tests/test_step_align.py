"""The ``align_tilt_series`` step through the engine: a synthetic tilt series with a known alignment
(one view excluded) and an intensity reference whose mean intensities follow the slab transmission
(the tilt-angle offset comes from it), a pure-noise series that must fail with a clear message, and
a transmission offset asked for without its input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.align_fit import projected_shift_error_px
from tomopipe.algorithms.geometry import alignment_from_xf
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.step_api import REGISTRY, Param, Port, Step, register
from tomopipe.engine.workflow import load_workflow
from tomopipe.io.imod import read_tlt, read_xf
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.project.store import Project
from tomopipe.simulate.blob_tilt_series import blob_tilt_series

PIXEL_A = 8.0
AXIS_DEG = -85.6
TILTS = np.arange(-60.0, 60.1, 4.0)
DISABLED_TILT_INDEX = 3
OFFSET_DEG = -0.8  # true tilt = nominal + offset
TAU = 0.03  # slab thickness in mean free paths (~100 A of specimen layer, a mean free path of ~3500 A)
DOSE = 3.0  # e/A2 per view

pytestmark = pytest.mark.usefixtures("one_thread")


def _series_rows(ts_id: str, image_path: str, disabled_index: int | None = None, doses=None) -> list[dict]:
    doses = np.full(len(TILTS), DOSE) if doses is None else doses
    return [{"ts_id": ts_id, "tilt_index": i, "tilt_angle_deg": float(angle), "image_path": image_path,
             "image_section": i, "enabled": i != disabled_index, "dose_e_per_A2": float(dose)}
            for i, (angle, dose) in enumerate(zip(TILTS, doses))]


class AlignTestStacks(Step):
    """Test-only import of ``TS_*.mrc`` stacks (tilt order), nominal axis 85.6 + 0.7 deg."""

    type_name = "test_align_stacks"
    title = "test - tilt series for alignment"
    params = (Param("folder", "path", "folder of the stacks", required=True),)
    outputs = (Port("tilt_series", "tilt_series"),)

    def series(self, ctx, path: Path, data) -> tuple[list[dict], dict]:
        """The rows and the acquisition of one tilt series made from the stack ``path``."""
        return _series_rows(path.stem, ctx.stored_path(path), DISABLED_TILT_INDEX), {
            "pixel_size_A": PIXEL_A, "tilt_axis_angle_deg": AXIS_DEG + 0.7,
            "image_size_px": [int(data.shape[2]), int(data.shape[1])], "n_tilts": int(data.shape[0])}

    def run(self, ctx):
        rows, acquisitions = [], {}
        for path in sorted(Path(ctx.params["folder"]).glob("TS_*.mrc")):
            data, _ = read_mrc(path, mmap=True)
            series_rows, acquisitions[path.stem] = self.series(ctx, path, data)
            rows += series_rows
        ctx.add_output("tilt_series", pd.DataFrame(rows), {"tilt_series": acquisitions})
        return {}


class AlignTestIntensities(AlignTestStacks):
    """Test-only tilt series of the same acquisitions as ``test_align_stacks`` (same field of view at
    4x the pixel size) whose views are flat with the mean intensity of a slab of TAU mean free paths
    whose normal is at nominal tilt -OFFSET_DEG."""

    type_name = "test_align_intensities"
    title = "test - transmission images"

    def series(self, ctx, path: Path, data) -> tuple[list[dict], dict]:
        size = (int(data.shape[2]) // 4, int(data.shape[1]) // 4)
        means = 20000.0 * np.exp(-TAU / np.cos(np.radians(TILTS + OFFSET_DEG)))
        stack = np.random.default_rng(1).poisson(means[:, None, None], (len(TILTS), size[1], size[0]))
        out = ctx.folder / f"{path.stem}_counts.mrc"
        write_mrc(out, stack.astype(np.float32), 4 * PIXEL_A, stack=True)
        return _series_rows(path.stem, ctx.stored_path(out)), {
            "pixel_size_A": 4 * PIXEL_A, "tilt_axis_angle_deg": AXIS_DEG + 0.7, "image_size_px": list(size),
            "n_tilts": len(TILTS)}


for _step in (AlignTestStacks, AlignTestIntensities):
    if _step.type_name not in REGISTRY:
        register(_step)

WORKFLOW = """
[workflow]
name = "align_test"

[steps.source]
type = "test_align_stacks"
folder = "{data}"

[steps.counts]
type = "test_align_intensities"
folder = "{data}"

[steps.align]
type = "align_tilt_series"
tilt_series = "source.tilt_series"
interpolated_stack = true
interpolated_binning = 2
{extra}
"""


def _run(tmp_path: Path, extra: str = 'intensity_reference = "counts.tilt_series"'):
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.format(data=tmp_path / "data", extra=extra))
    with Project.open_or_init(tmp_path / "project") as project:
        return run_workflow(project, load_workflow(workflow, []), LocalExecutor(1), echo=lambda *_: None)


def test_align_step_writes_the_alignment_and_leaves_excluded_views_out(tmp_path):
    ts = blob_tilt_series(size_px=192, tilt_angles_deg=TILTS, tilt_axis_deg=AXIS_DEG, tilt_offset_deg=OFFSET_DEG,
                          shift_sd_px=2.0, slab_thickness_px=12.0, blobs=2200, noise_sd=0.5, seed=11)
    (tmp_path / "data").mkdir()
    write_mrc(tmp_path / "data" / "TS_01.mrc", ts.images.numpy(), PIXEL_A, stack=True)
    report = _run(tmp_path)
    assert [o.status for o in report.outcomes] == ["finished"] * 3, [o.message for o in report.outcomes]
    with Project.open(tmp_path / "project") as project:
        run = project.find_run("align")
        record = project.sets_of_run(run.id)["tilt_series"]
        items = project.read_items(record.id).sort_values("tilt_index").reset_index(drop=True)
        folder = project.absolute_path(items["aligned_image_path"].dropna().iloc[0]).parent
        summary = run.summary
    enabled = items["enabled"].to_numpy()
    assert not enabled[DISABLED_TILT_INDEX] and enabled.sum() == len(TILTS) - 1
    assert items.loc[DISABLED_TILT_INDEX, ["rot_z_deg", "rot_y_deg", "shift_x_A"]].isna().all()
    used = items[enabled]
    shifts_px = used[["shift_x_A", "shift_y_A"]].to_numpy() / PIXEL_A
    error = projected_shift_error_px(used["rot_z_deg"].to_numpy(), used["rot_y_deg"].to_numpy(), shifts_px,
                                     used["magnification"].to_numpy(), ts.shifts_px[torch.from_numpy(enabled.copy())])
    assert error["rms_px"] <= 0.5, error
    assert abs(float(used["rot_z_deg"].mean()) - AXIS_DEG) <= 0.3
    offset = float((used["rot_y_deg"] - TILTS[enabled]).mean())
    assert abs(offset - OFFSET_DEG) <= 0.1, offset  # from the transmission of the reference views
    assert summary["tilt_offset_method"]["TS_01"] == "transmission" and summary["stage"]["TS_01"] == "points"
    assert 0 < summary["tilt_offset_uncertainty_deg"]["TS_01"] < 0.1 and (used["align_view_method"] == "contours").all()
    assert (used["rot_x_deg"] == 0).all() and (used["align_residual_px"] < 1.0).all()
    # IMOD files: one line per enabled view in tilt order, consistent with the columns
    a, d = read_xf(folder / "TS_01.xf")
    assert a.shape == (len(TILTS) - 1, 2, 2)
    rot, shifts = alignment_from_xf(torch.from_numpy(a / np.sqrt(np.linalg.det(a))[:, None, None]),
                                    torch.from_numpy(d / np.sqrt(np.linalg.det(a))[:, None]))
    assert np.allclose(rot.numpy(), used["rot_z_deg"].to_numpy(), atol=1e-4)
    assert np.allclose(read_tlt(folder / "TS_01.tlt"), used["rot_y_deg"].to_numpy(), atol=0.006)
    assert np.allclose(read_tlt(folder / "TS_01.xtilt"), 0.0)
    contours = pd.read_csv(folder / "TS_01_contours.csv")
    assert {"stage", "residual_px", "x_A", "z_A"} <= set(contours.columns)
    assert set(contours["stage"]) == {"patch", "point"}
    assert (contours.groupby("stage")["used"].sum() >= 10).all()
    # interpolated stack: binned by 2, enabled views only; the zero tilt matches the raw view binned and shifted
    aligned, pixel_A = read_mrc(folder / "TS_01_ali.mrc")
    assert aligned.shape == (len(TILTS) - 1, 96, 96) and pixel_A == pytest.approx(2 * PIXEL_A)
    assert summary["rms_residual_px"]["TS_01"] < 0.6 and len(summary["residual_per_view_px"]["TS_01"]) == len(TILTS) - 1
    # the aligned views agree with each other near the axis: neighbouring zero-tilt views correlate highly
    k = int(np.argmin(np.abs(TILTS[enabled])))
    centre = aligned[:, 24:72, 24:72]
    corr = np.corrcoef(centre[k].ravel(), centre[k + 1].ravel())[0, 1]
    assert corr > 0.8


def test_align_step_fails_clearly_on_noise(tmp_path):
    (tmp_path / "data").mkdir()
    noise = np.random.default_rng(0).normal(size=(len(TILTS), 128, 128)).astype(np.float32)
    write_mrc(tmp_path / "data" / "TS_02.mrc", noise, PIXEL_A, stack=True)
    report = _run(tmp_path)
    assert [o.status for o in report.outcomes] == ["finished", "finished", "failed"]
    assert "TS_02: alignment failed:" in report.outcomes[2].message
    assert "too few contours" in report.outcomes[2].message or "fewer than" in report.outcomes[2].message
    with Project.open(tmp_path / "project") as project:
        run = project.find_run("align")
        assert run.status == "failed" and not project.sets_of_run(run.id)  # no alignment written


def test_transmission_offset_needs_its_input(tmp_path):
    (tmp_path / "data").mkdir()
    write_mrc(tmp_path / "data" / "TS_03.mrc", np.zeros((len(TILTS), 32, 32), np.float32), PIXEL_A, stack=True)
    report = _run(tmp_path, extra='tilt_offset_method = "transmission"')
    assert report.outcomes[2].status == "failed" and "intensity_reference" in report.outcomes[2].message


def test_a_missing_tilt_axis_is_an_error_not_zero(tmp_path):
    class NoAxisStacks(AlignTestStacks):
        type_name = "test_align_stacks_no_axis"

        def series(self, ctx, path, data):
            rows, acquisition = super().series(ctx, path, data)
            return rows, {k: v for k, v in acquisition.items() if k != "tilt_axis_angle_deg"}

    if NoAxisStacks.type_name not in REGISTRY:
        register(NoAxisStacks)
    (tmp_path / "data").mkdir()
    write_mrc(tmp_path / "data" / "TS_04.mrc", np.zeros((len(TILTS), 32, 32), np.float32), PIXEL_A, stack=True)
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.replace('type = "test_align_stacks"', 'type = "test_align_stacks_no_axis"').format(
        data=tmp_path / "data", extra=""))
    with Project.open_or_init(tmp_path / "project") as project:
        report = run_workflow(project, load_workflow(workflow, []), LocalExecutor(1), echo=lambda *_: None)
    assert report.outcomes[2].status == "failed"
    assert "TS_04" in report.outcomes[2].message and "tilt-axis angle" in report.outcomes[2].message
