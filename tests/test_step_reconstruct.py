"""The ``reconstruct_tomogram`` step through the engine, on a phantom tilt series with alignment.

A test-only step (``test_tilt_series_table``, registered here) turns a CSV of views, a JSON of
acquisitions and MRC stacks into a tilt-series set, as an import (and an alignment) would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_reconstruct import SIGMA, TILTS, TRIAD, blobs_volume, corr, peak_positions, random_centres
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.algorithms.reconstruct import ReconstructionParams, reconstruct_volume
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.step_api import REGISTRY, Param, Port, Step, register, step_class
from tomopipe.engine.workflow import load_workflow
from tomopipe.io.mrc import read_mrc, read_mrc_header, write_mrc
from tomopipe.project.store import Project

pytestmark = pytest.mark.usefixtures("one_thread")


class TiltSeriesTable(Step):
    """Test-only import: ``folder/NAME.csv`` (one row per view; ``image_path`` relative to the
    folder) and ``folder/NAME.json`` (acquisition per ts_id) become a tilt-series set."""

    type_name = "test_tilt_series_table"
    title = "test - tilt series from a table"
    params = (Param("folder", "path", "folder of the files", required=True),
              Param("name", "str", "base name of the CSV and JSON", required=True))
    outputs = (Port("tilt_series", "tilt_series"),)

    def run(self, ctx):
        folder = Path(ctx.params["folder"])
        table = pd.read_csv(folder / f"{ctx.params['name']}.csv")
        table["image_path"] = [ctx.stored_path(folder / p) for p in table["image_path"]]
        table["enabled"] = table["enabled"].astype(bool)
        acquisitions = json.loads((folder / f"{ctx.params['name']}.json").read_text())
        ctx.add_output("tilt_series", table, {"tilt_series": acquisitions})
        return {"tilts": len(table)}


class CtfTable(Step):
    """Test-only CTF estimation: ``folder/NAME.csv`` (one row per view) and ``folder/NAME.json``
    (the set's attributes, e.g. the defocus hand per tilt series) become a ctf set."""

    type_name = "test_ctf_table"
    title = "test - ctf set from a table"
    params = (Param("folder", "path", "folder of the files", required=True),
              Param("name", "str", "base name of the CSV and JSON", required=True))
    outputs = (Port("ctf", "ctf"),)

    def run(self, ctx):
        folder = Path(ctx.params["folder"])
        table = pd.read_csv(folder / f"{ctx.params['name']}.csv")
        table["enabled"] = True
        ctx.add_output("ctf", table, json.loads((folder / f"{ctx.params['name']}.json").read_text()))
        return {"tilts": len(table)}


for _step in (TiltSeriesTable, CtfTable):
    if _step.type_name not in REGISTRY:
        register(_step)

N = len(TILTS)
AXIS_DEG = 85.0
PIXEL_A = 2.0


def alignment(seed=0):
    g = torch.Generator().manual_seed(seed)
    shifts_A = (torch.rand((N, 2), generator=g, dtype=torch.float64) - 0.5) * 8 * PIXEL_A
    return torch.full((N,), AXIS_DEG, dtype=torch.float64), TILTS.double(), shifts_A


def phantom_stack(centres, pixel_size_A, size_px, rot_z, rot_y, shifts_A):
    """Views of Gaussian blobs (centres in Å from the tomogram centre, sigma SIGMA·2 Å)."""
    sigma_px = SIGMA * PIXEL_A / pixel_size_A
    r = projection_rotations(rot_z, rot_y, 0.0)
    pts = project_points(torch.tensor(centres, dtype=torch.float64), r, shifts_A) / pixel_size_A
    yy = torch.arange(size_px, dtype=torch.float64)[:, None] - size_px // 2
    xx = torch.arange(size_px, dtype=torch.float64)[None, :] - size_px // 2
    images = torch.zeros((N, size_px, size_px), dtype=torch.float64)
    for j in range(len(centres)):
        images += sigma_px * math.sqrt(2 * math.pi) * torch.exp(
            -((xx[None] - pts[:, j, 0, None, None]) ** 2 + (yy[None] - pts[:, j, 1, None, None]) ** 2)
            / (2 * sigma_px**2))
    return images.float().numpy()


def write_set(folder: Path, name: str, pixel_size_A: float, size_px: int, aligned: bool, angle_error_deg=0.0,
              n_views=N, disabled=(), mdoc="TS_01.mdoc", drop_acquisition=()):
    """One tilt series TS_01 (views of the triad and a few blobs; sections reversed) as NAME.csv/json."""
    folder.mkdir(parents=True, exist_ok=True)
    rot_z, rot_y, shifts_A = alignment()
    centres_A = [tuple(PIXEL_A * c for c in p) for p in TRIAD + random_centres(5, seed=11)]
    stack = phantom_stack(centres_A, pixel_size_A, size_px, rot_z, rot_y, shifts_A)[:n_views]
    write_mrc(folder / f"{name}.mrc", stack[::-1].copy(), pixel_size_A, stack=True)
    rows = []
    for i in range(n_views):
        row = {"ts_id": "TS_01", "tilt_index": i,
               "tilt_angle_deg": float(TILTS[i]) + (angle_error_deg if i == 3 else 0),
               "acquisition_order": (i * 7) % N, "dose_e_per_A2": 3.0, "pre_exposure_e_per_A2": 3.0 * ((i * 7) % N),
               "image_path": f"{name}.mrc", "image_section": n_views - 1 - i, "enabled": i not in disabled}
        if aligned:
            row.update({"rot_z_deg": float(rot_z[i]), "rot_y_deg": float(rot_y[i]), "rot_x_deg": 0.0,
                        "shift_x_A": float(shifts_A[i, 0]), "shift_y_A": float(shifts_A[i, 1]),
                        "magnification": 1.0})
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / f"{name}.csv", index=False)
    acq = {"TS_01": {"pixel_size_A": pixel_size_A, "voltage_kV": 300.0, "spherical_aberration_mm": 2.7,
                     "amplitude_contrast": 0.1, "tilt_axis_angle_deg": AXIS_DEG, "image_size_px": [size_px, size_px],
                     "n_tilts": n_views, "mdoc_path": mdoc}}
    for key in drop_acquisition:
        del acq["TS_01"][key]
    (folder / f"{name}.json").write_text(json.dumps(acq))
    return centres_A


def run(tmp_path: Path, text: str):
    workflow = tmp_path / "wf.toml"
    workflow.write_text(text)
    with Project.open_or_init(tmp_path / "project") as project:
        return run_workflow(project, load_workflow(workflow, []), LocalExecutor(1), echo=lambda *_: None)


def tomograms(tmp_path: Path, step: str):
    with Project.open(tmp_path / "project") as project:
        run_record = project.find_run(step)
        record = project.sets_of_run(run_record.id)["tomograms"]
        items = project.read_items(record.id)
        items["tomogram_path"] = [str(project.absolute_path(p)) for p in items["tomogram_path"]]
        return items, record.attrs, run_record.summary


def test_seed_defaults():
    step = step_class("reconstruct_tomogram")
    assert step.title == "imod - reconstruct tomogram"
    d = {p.name: p.default for p in step.params}
    assert d["thickness_px"] == 128 and d["width_px"] == 0 and d["shift_x_px"] == 0 and d["shift_z_px"] == 0
    assert d["tilt_angle_offset_deg"] == 0 and d["tilt_axis_offset_deg"] == 0 and d["super_sampling"] == 2
    assert d["sirt_like_iterations"] == 0 and d["radial_cutoff"] == 0.35 and d["radial_falloff"] == 0.035


def test_reconstruct_step_writes_the_tomogram(tmp_path):
    data = tmp_path / "data"
    centres_A = write_set(data, "aligned", PIXEL_A, 64, aligned=True, disabled=(5,))
    report = run(tmp_path, f"""
[workflow]
name = "reconstruct_test"
[steps.source]
type = "test_tilt_series_table"
folder = "{data}"
name = "aligned"
[steps.rec]
type = "reconstruct_tomogram"
tilt_series = "source.tilt_series"
thickness_px = 32
super_sampling = 1
exclude_tilt_indices = [6]
device = "cpu"
""")
    assert [o.status for o in report.outcomes] == ["finished"] * 2, [o.message for o in report.outcomes]
    items, attrs, summary = tomograms(tmp_path, "rec")
    assert items[["ts_id", "voxel_size_A", "size_x_px", "size_y_px", "size_z_px"]].values.tolist() == \
        [["TS_01", PIXEL_A, 64, 64, 32]]
    assert summary["views"] == {"TS_01": N - 2}  # disabled view 5 and excluded view 6 left out
    volume, voxel = read_mrc(items["tomogram_path"][0])
    assert voxel == pytest.approx(PIXEL_A) and volume.shape == (32, 64, 64)
    header = read_mrc_header(items["tomogram_path"][0])
    assert header["voxel_size_xyz_A"] == pytest.approx((PIXEL_A,) * 3)
    # the same numbers as the algorithm on the kept views
    keep = [i for i in range(N) if i not in (5, 6)]
    rot_z, rot_y, shifts_A = alignment()
    stack = phantom_stack(centres_A, PIXEL_A, 64, rot_z, rot_y, shifts_A)
    expected = reconstruct_volume(torch.from_numpy(stack[keep]), rot_z[keep], rot_y[keep], 0.0, shifts_A[keep], PIXEL_A,
                                  ReconstructionParams(thickness_px=32, super_sampling=1))
    torch.testing.assert_close(torch.from_numpy(volume.copy()), expected, rtol=0, atol=1e-5)
    # handedness and position in the file: the triad's third blob at +z (toward the source)
    truth = blobs_volume([tuple(c / PIXEL_A for c in p) for p in centres_A], (32, 64, 64))
    assert corr(torch.from_numpy(volume.copy()), truth) > 0.8
    found = peak_positions(torch.from_numpy(volume.copy()), TRIAD)
    for want, got in zip(TRIAD, found):
        assert max(abs(w - g) for w, g in zip(want, got)) <= 1
    assert attrs["reconstruction"]["thickness_px"] == 32


def test_reconstruct_refuses_unaligned_tilt_series(tmp_path):
    data = tmp_path / "data"
    write_set(data, "raw", PIXEL_A, 32, aligned=False)
    report = run(tmp_path, f"""
[workflow]
name = "reconstruct_unaligned"
[steps.source]
type = "test_tilt_series_table"
folder = "{data}"
name = "raw"
[steps.rec]
type = "reconstruct_tomogram"
tilt_series = "source.tilt_series"
thickness_px = 8
""")
    outcome = report.outcomes[1]
    assert outcome.status == "failed"
    assert "rot_z_deg" in outcome.message and "not aligned" in outcome.message


DEFOCUS_A = 20000.0


def write_ctf_set(folder: Path, name: str, attrs: dict):
    """A ctf set for TS_01: 20000 Å at every view, no astigmatism; ``attrs`` as the set's attributes."""
    pd.DataFrame({"ts_id": "TS_01", "tilt_index": range(N), "defocus_u_A": DEFOCUS_A, "defocus_v_A": DEFOCUS_A,
                  "defocus_angle_deg": 0.0}).to_csv(folder / f"{name}.csv", index=False)
    (folder / f"{name}.json").write_text(json.dumps(attrs))


PHASE_FLIP_WORKFLOW = """
[workflow]
name = "reconstruct_phase_flip"
[steps.source]
type = "test_tilt_series_table"
folder = "{data}"
name = "aligned"
[steps.ctf]
type = "test_ctf_table"
folder = "{data}"
name = "{ctf}"
[steps.rec]
type = "reconstruct_tomogram"
tilt_series = "source.tilt_series"
ctf = "ctf.ctf"
thickness_px = 32
super_sampling = 1
ctf_correction = "phase_flip"
ctf_strip_width_px = 8
device = "cpu"
"""


def test_phase_flip_uses_the_defocus_hand_of_the_ctf_set(tmp_path):
    """Strips follow the defocus gradient of the hand in the ctf set's attributes (+1 here): the
    tomogram equals the algorithm's with hand +1 and differs from the one with -1."""
    from tomopipe.algorithms.reconstruct import CtfParams

    data = tmp_path / "data"
    centres_A = write_set(data, "aligned", PIXEL_A, 64, aligned=True)
    write_ctf_set(data, "ctf", {"tilt_series": {"TS_01": {"defocus_hand": 1}}})
    report = run(tmp_path, PHASE_FLIP_WORKFLOW.format(data=data, ctf="ctf"))
    assert [o.status for o in report.outcomes] == ["finished"] * 3, [o.message for o in report.outcomes]
    items, _, _ = tomograms(tmp_path, "rec")
    volume = torch.from_numpy(read_mrc(items["tomogram_path"][0])[0].copy())
    rot_z, rot_y, shifts_A = alignment()
    stack = torch.from_numpy(phantom_stack(centres_A, PIXEL_A, 64, rot_z, rot_y, shifts_A))
    params = ReconstructionParams(thickness_px=32, super_sampling=1)
    expected = {}
    for hand in (-1, 1):
        ctf = CtfParams(torch.full((N,), DEFOCUS_A), torch.full((N,), DEFOCUS_A), torch.zeros(N), 300.0, 2.7, 0.1,
                        defocus_hand=hand, strip_width_px=8.0)
        expected[hand] = reconstruct_volume(stack, rot_z, rot_y, 0.0, shifts_A, PIXEL_A, params, ctf=ctf)
    torch.testing.assert_close(volume, expected[1], rtol=0, atol=1e-5)
    assert float((volume - expected[-1]).abs().max()) > 1e-3


@pytest.mark.parametrize("case", ["no hand", "no voltage", "no voltage, dose weighting"])
def test_missing_ctf_or_acquisition_values_are_errors(tmp_path, case):
    """No assumed values: a ctf set without the defocus hand, or an acquisition without the
    voltage, stops the step with a message naming what is missing (it used to take -1 / 300 kV)."""
    data = tmp_path / "data"
    write_set(data, "aligned", PIXEL_A, 32, aligned=True, drop_acquisition=() if case == "no hand" else ("voltage_kV",))
    write_ctf_set(data, "ctf", {"tilt_series": {"TS_01": {} if case == "no hand" else {"defocus_hand": -1}}})
    text = PHASE_FLIP_WORKFLOW.format(data=data, ctf="ctf").replace("thickness_px = 32", "thickness_px = 8")
    if case == "no voltage, dose weighting":
        text = text.replace('ctf_correction = "phase_flip"', "dose_weighting = true").replace('ctf = "ctf.ctf"\n', "")
    report = run(tmp_path, text)
    outcome = report.outcomes[-1]
    assert outcome.status == "failed"
    expected = {"no hand": "tilt series 'TS_01': the input set 'ctf' has no defocus handedness (defocus_hand",
                "no voltage": "has no voltage_kV (needed by phase_flip)",
                "no voltage, dose weighting": "has no voltage_kV (needed by dose_weighting)"}[case]
    assert expected in outcome.message, outcome.message


def test_the_algorithm_assumes_no_voltage_or_hand():
    """Dose weighting without a voltage and a CTF without a valid hand are errors, not 300 kV / -1."""
    from tomopipe.algorithms.reconstruct import CtfParams, filter_tilt_images

    images = torch.zeros((2, 16, 16))
    with pytest.raises(ValueError, match="needs voltage_kV"):
        filter_tilt_images(images, 0.0, torch.tensor([0.0, 30.0]), 2.0, 8, pre_exposure_e_per_A2=torch.zeros(2))
    with pytest.raises(TypeError, match="defocus_hand"):
        CtfParams(torch.zeros(2), torch.zeros(2), torch.zeros(2), 300.0, 2.7, 0.1)
    with pytest.raises(ValueError, match="defocus_hand must be -1 or \\+1"):
        CtfParams(torch.zeros(2), torch.zeros(2), torch.zeros(2), 300.0, 2.7, 0.1, defocus_hand=0)
