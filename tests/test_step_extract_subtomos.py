"""The ``extract_subtomos`` step through the engine, on a synthetic aligned tilt series of Gaussian
blobs at known positions (test-only import steps make the tilt series, CTF and particle sets),
and its RELION 5 export (per-particle files, particles.star, optimisation_set.star)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_step_reconstruct import CtfTable, TiltSeriesTable  # noqa: F401  (registers the test import steps)
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.algorithms.subtomo.backproject import centred_rfft2, pseudo_subtomogram
from tomopipe.algorithms.subtomo.extract import extract_crops
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.step_api import REGISTRY, Param, Port, Step, register, step_class
from tomopipe.engine.workflow import load_workflow
from tomopipe.export import export_project
from tomopipe.io.mrc import read_mrc, read_mrc_header, write_mrc
from tomopipe.io.star import read_particles_star, read_star, read_tilt_series_star
from tomopipe.model.subtomograms import geometry_from_attrs, tilts_used_mask, weights_first_section
from tomopipe.project.store import Project

pytestmark = pytest.mark.usefixtures("one_thread")


class ParticlesTable(Step):
    """Test-only picking: ``folder/NAME.csv`` (particles columns) and ``folder/NAME.json`` (attributes)."""

    type_name = "test_particles_table"
    title = "test - particles from a table"
    params = (Param("folder", "path", "folder of the files", required=True),
              Param("name", "str", "base name of the CSV and JSON", required=True))
    outputs = (Port("particles", "particles"),)

    def run(self, ctx):
        folder = Path(ctx.params["folder"])
        table = pd.read_csv(folder / f"{ctx.params['name']}.csv")
        table["enabled"] = True
        ctx.add_output("particles", table, json.loads((folder / f"{ctx.params['name']}.json").read_text()))
        return {"particles": len(table)}


if ParticlesTable.type_name not in REGISTRY:
    register(ParticlesTable)

PIXEL_A = 2.0
SIZE_PX = 192
TILTS = torch.arange(-60.0, 60.1, 6.0, dtype=torch.float64)
N = TILTS.numel()
AXIS_DEG = 85.0
SIGMA_A = 4.0
# x, y, z Å from the tomogram centre; the last one projects within a box of the x edge of every image
CENTRES_A = [(-110.0, -90.0, 12.0), (100.0, -100.0, -20.0), (-95.0, 105.0, -8.0), (105.0, 95.0, 16.0),
             (0.0, 170.0, 0.0)]
DIAMETER_A = 30.0


def shifts_A() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand((N, 2), generator=g, dtype=torch.float64) - 0.5) * 10.0


def tilt_images(centres_A) -> np.ndarray:
    """Views of Gaussian blobs (sigma SIGMA_A) at the projections of ``centres_A``, RELION 5 model."""
    points = project_points(torch.tensor(centres_A, dtype=torch.float64),
                            projection_rotations(torch.full((N,), AXIS_DEG), TILTS, 0.0), shifts_A()) / PIXEL_A
    grid = torch.arange(SIZE_PX, dtype=torch.float64) - SIZE_PX // 2
    sigma = SIGMA_A / PIXEL_A
    images = torch.zeros((N, SIZE_PX, SIZE_PX), dtype=torch.float64)
    for j in range(len(centres_A)):
        x, y = points[:, j, 0, None, None], points[:, j, 1, None, None]
        images += torch.exp(-((grid[None, None, :] - x) ** 2 + (grid[None, :, None] - y) ** 2) / (2 * sigma**2))
    return images.float().numpy()


def write_inputs(folder: Path, centres_A=CENTRES_A, ts_ids=None, disabled=(7,)):
    """Tilt series 'ts' (one stack, sections reversed; view ``disabled`` off), CTF 'ctf' (hand -1) and picks 'picks'."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "ts.mrc", tilt_images(centres_A)[::-1].copy(), PIXEL_A, stack=True)
    shifts = shifts_A()
    pd.DataFrame([{"ts_id": "TS_01", "tilt_index": i, "tilt_angle_deg": float(TILTS[i]), "image_path": "ts.mrc",
                   "image_section": N - 1 - i, "pre_exposure_e_per_A2": 3.0 * abs(float(TILTS[i])) / 6.0,
                   "rot_z_deg": AXIS_DEG, "rot_y_deg": float(TILTS[i]), "rot_x_deg": 0.0,
                   "shift_x_A": float(shifts[i, 0]), "shift_y_A": float(shifts[i, 1]), "magnification": 1.0,
                   "enabled": i not in disabled} for i in range(N)]).to_csv(folder / "ts.csv", index=False)
    acquisition = {"pixel_size_A": PIXEL_A, "voltage_kV": 300.0, "spherical_aberration_mm": 2.7,
                   "amplitude_contrast": 0.1, "image_size_px": [SIZE_PX, SIZE_PX], "n_tilts": N}
    (folder / "ts.json").write_text(json.dumps({"TS_01": acquisition}))
    pd.DataFrame({"ts_id": "TS_01", "tilt_index": range(N), "defocus_u_A": 12000.0, "defocus_v_A": 11000.0,
                  "defocus_angle_deg": 30.0}).to_csv(folder / "ctf.csv", index=False)
    (folder / "ctf.json").write_text(json.dumps({"tilt_series": {"TS_01": {"defocus_hand": -1}}}))
    m = len(centres_A)
    pd.DataFrame({"ts_id": ts_ids or ["TS_01"] * m, "x_A": [c[0] for c in centres_A],
                  "y_A": [c[1] for c in centres_A], "z_A": [c[2] for c in centres_A],
                  "rot_deg": np.linspace(-170, 170, m), "tilt_deg": np.linspace(10, 170, m),
                  "psi_deg": np.linspace(-90, 90, m), "score": np.arange(m) + 0.5,
                  "half_set": np.arange(m) % 2 + 1}).to_csv(folder / "picks.csv", index=False)
    (folder / "picks.json").write_text(json.dumps({
        "tomograms": {"TS_01": {"size_xyz_px": [SIZE_PX, SIZE_PX, 32], "voxel_size_A": PIXEL_A}},
        "picking": {"particle_diameter_A": DIAMETER_A}}))


WORKFLOW = """
[workflow]
name = "extract_test"
[steps.ts]
type = "test_tilt_series_table"
folder = "{data}"
name = "ts"
[steps.ctf]
type = "test_ctf_table"
folder = "{data}"
name = "ctf"
[steps.picks]
type = "test_particles_table"
folder = "{data}"
name = "picks"
[steps.ext]
type = "extract_subtomos"
tilt_series = "ts.tilt_series"
ctf = "ctf.ctf"
particles = "picks.particles"
{sizes}
device = "cpu"
{extra}
"""
SIZES = "binning = 1\nbox_px = 48\ncrop_px = 32"


def run(tmp_path: Path, extra: str = "", particles: bool = True, sizes: str = SIZES, **inputs):
    data = tmp_path / "data"
    write_inputs(data, **inputs)
    workflow = tmp_path / "wf.toml"
    text = WORKFLOW.format(data=data, extra=extra, sizes=sizes)
    workflow.write_text(text if particles else text.replace('particles = "picks.particles"\nbinning', "binning"))
    with Project.open_or_init(tmp_path / "project") as project:
        return run_workflow(project, load_workflow(workflow, []), LocalExecutor(1), echo=lambda *_: None)


def output(tmp_path: Path, step: str):
    with Project.open(tmp_path / "project") as project:
        record = project.sets_of_run(project.find_run(step).id)["subtomograms"]
        items = project.read_items(record.id)
        for column in ("data_path", "weights_path"):
            if column in items:
                items[column] = [str(project.absolute_path(p)) for p in items[column]]
        return items, record.attrs


def centroid_offsets(volume: np.ndarray) -> np.ndarray:
    """Energy centroid minus the centre ``n//2``, per axis (last axis first: x, y[, z])."""
    energy = volume.astype(np.float64) ** 2
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in volume.shape], indexing="ij")
    return np.array([(g * energy).sum() / energy.sum() for g in grids][::-1])


def test_seed_defaults():
    step = step_class("extract_subtomos")
    assert step.title == "reliontomo - extract subtomos"
    d = {p.name: p.default for p in step.params}
    assert (d["binning"], d["box_px"], d["crop_px"], d["max_dose_e_per_A2"]) == (10.0, 64, 24, 0.0)


def test_2d_and_3d_extraction_centres_particles_and_counts_the_dropped(tmp_path):
    """2-D: every used tilt's crop has its blob on the crop centre (sub-pixel: the projected
    positions are not on pixels), unused tilts are zero; the particle at the image edge is dropped
    and counted; 3-D: the pseudo-subtomogram's blob is on the box centre, weights and multiplicity
    are in the weights file. The geometry in the attributes rebuilds the tilts used (view 7 off)."""
    extra = """[steps.ext3]
type = "extract_subtomos"
tilt_series = "ts.tilt_series"
ctf = "ctf.ctf"
particles = "picks.particles"
binning = 1
box_px = 48
crop_px = 32
write_2d = false
device = "cpu"
"""
    report = run(tmp_path, extra)
    assert [o.status for o in report.outcomes] == ["finished"] * 5, [o.message for o in report.outcomes]
    summary = report.outcomes[3].summary
    assert summary["particles"]["TS_01"] | {"seconds": 0} == {"particles": 5, "kept": 4, "dropped": 1, "seconds": 0}
    items, attrs = output(tmp_path, "ext")
    assert len(items) == 4 and items[["x_A", "y_A", "z_A"]].values.tolist() == [list(c) for c in CENTRES_A[:4]]
    assert attrs["extraction"]["dimensions"] == 2 and attrs["extraction"]["pixel_size_A"] == PIXEL_A
    sub = geometry_from_attrs(attrs, "TS_01")
    assert sub.tilt_index == tuple(i for i in range(N) if i != 7) and sub.geometry.defocus_hand == -1
    torch.testing.assert_close(sub.geometry.rotations,
                               projection_rotations(torch.full((N - 1,), AXIS_DEG), TILTS[TILTS != TILTS[7]], 0.0))
    stack, voxel = read_mrc(items["data_path"][0])
    assert voxel == pytest.approx(PIXEL_A) and stack.shape == (4 * (N - 1), 32, 32)
    for row in items.itertuples():
        used = tilts_used_mask(row.tilts_used)
        crops = stack[row.data_section:row.data_section + row.n_sections]
        assert row.n_sections == N - 1 and used.sum() >= 1
        assert np.all(crops[~used] == 0)
        for crop in crops[used]:
            assert np.abs(centroid_offsets(crop)).max() < 0.05
    # the particle of the edge would be used by no tilt: it is not in the file
    items3, attrs3 = output(tmp_path, "ext3")
    assert attrs3["extraction"]["dimensions"] == 3 and len(items3) == 4
    data, _ = read_mrc(items3["data_path"][0])
    weights, _ = read_mrc(items3["weights_path"][0])
    assert data.shape == (4 * 32, 32, 32) and weights.shape == (4 * 2 * 32, 32, 17)
    for row in items3.itertuples():
        assert np.abs(centroid_offsets(data[row.data_section:row.data_section + 32])).max() < 0.1
    # the file layout: particle 2's data, CTF² and multiplicity are the algorithms' on its crops
    geometry = geometry_from_attrs(attrs3, "TS_01").geometry
    images = torch.from_numpy(tilt_images(CENTRES_A)[[i for i in range(N) if i != 7]])
    crops = extract_crops(images, geometry, torch.tensor([CENTRES_A[2]]), 48, 32)
    use = crops.visible[0]
    expected = pseudo_subtomogram(centred_rfft2(crops.crops[0, use]), crops.ctf2[0, use], geometry.rotations[use])
    row = items3.iloc[2]
    first = weights_first_section(row.data_section)
    np.testing.assert_allclose(data[row.data_section:row.data_section + 32], expected.data, atol=1e-5)
    np.testing.assert_allclose(weights[first:first + 32], expected.weights, rtol=1e-6)
    np.testing.assert_allclose(weights[first + 32:first + 64], expected.multiplicity, rtol=1e-6)
    assert expected.multiplicity[0, 0, 0] >= use.sum() > 0


def test_reextraction_of_extracted_particles_keeps_their_poses(tmp_path):
    """A subtomograms set re-extracted at binning 2 keeps ts_id, positions, angles, half sets, scores."""
    extra = """[steps.rex]
type = "extract_subtomos"
tilt_series = "ts.tilt_series"
ctf = "ctf.ctf"
subtomograms = "ext.subtomograms"
binning = 2
box_px = 24
crop_px = 16
max_dose_e_per_A2 = 10
device = "cpu"
"""
    report = run(tmp_path, extra)
    assert [o.status for o in report.outcomes] == ["finished"] * 5, [o.message for o in report.outcomes]
    first, _ = output(tmp_path, "ext")
    second, attrs = output(tmp_path, "rex")
    columns = ["ts_id", "x_A", "y_A", "z_A", "rot_deg", "tilt_deg", "psi_deg", "half_set", "score"]
    pd.testing.assert_frame_equal(first[columns], second[columns])
    assert attrs["extraction"]["pixel_size_A"] == 2 * PIXEL_A and attrs["picking"]["particle_diameter_A"] == DIAMETER_A
    stack, voxel = read_mrc(second["data_path"][0])
    assert voxel == pytest.approx(2 * PIXEL_A) and stack.shape[1:] == (16, 16)
    # the dose limit: tilts with a pre-exposure (0.5 e/Å² per degree here) above 10 e/Å² are not used
    low_dose = [i for i in range(N) if i != 7 and abs(float(TILTS[i])) <= 20]
    tilt_index = geometry_from_attrs(attrs, "TS_01").tilt_index
    for row in second.itertuples():
        used = tilts_used_mask(row.tilts_used)
        assert [tilt_index[k] for k in np.flatnonzero(used)] == low_dose
        assert np.all(stack[row.data_section:row.data_section + row.n_sections][~used] == 0)


@pytest.mark.parametrize("dimensions", [2, 3])
def test_relion5_export_of_subtomograms(tmp_path, dimensions):
    """particles.star names each particle's own file(s) holding its sections (2-D: the stack of its
    tilts; 3-D: data, and CTF² + multiplicity as rlnCtfImage); optimisation_set.star names
    particles.star and tomograms.star; the optics say CTF-premultiplied images at the crop size."""
    report = run(tmp_path, "" if dimensions == 2 else "write_2d = false")
    assert report.ok, [o.message for o in report.outcomes]
    items, _ = output(tmp_path, "ext")
    out = tmp_path / "relion"
    with Project.open(tmp_path / "project") as project:
        export_project(project, "relion5", out)
    particles, optics = read_particles_star(out / "particles.star")
    assert read_star(out / "particles.star")["general"]["rlnTomoSubTomosAre2DStacks"].iloc[0] == int(dimensions == 2)
    assert optics[["rlnImageDimensionality", "rlnImageSize", "rlnCtfDataAreCtfPremultiplied"]].values.tolist() == \
        [[dimensions, 32, 1]]
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(PIXEL_A)
    assert particles["rlnTomoParticleName"].tolist() == ["TS_01/1", "TS_01/2", "TS_01/3", "TS_01/4"]
    np.testing.assert_allclose(particles["rlnCenteredCoordinateYAngst"], items["y_A"])
    assert len(read_tilt_series_star(out / "tilt_series" / "TS_01.star")) == len(items["tilts_used"][0]) == N - 1
    data, _ = read_mrc(items["data_path"][0])
    suffix = "_stack2d.mrcs" if dimensions == 2 else "_data.mrc"
    for row, star in zip(items.itertuples(), particles.itertuples()):
        assert star.rlnTomoVisibleFrames == "[" + ",".join(row.tilts_used) + "]"
        image, _ = read_mrc(star.rlnImageName)
        np.testing.assert_array_equal(image, data[row.data_section:row.data_section + row.n_sections])
        assert star.rlnImageName.endswith(f"Subtomograms/TS_01/{star.rlnTomoParticleName[6:]}{suffix}")
        if dimensions == 3:
            weights, _ = read_mrc(row.weights_path)
            first = weights_first_section(row.data_section)
            np.testing.assert_array_equal(read_mrc(star.rlnCtfImage)[0], weights[first:first + 2 * row.n_sections])
    optimisation = read_star(out / "optimisation_set.star")["optimisation_set"].iloc[0]
    assert Path(optimisation["rlnTomoParticlesFile"]) == (out / "particles.star").resolve()
    assert Path(optimisation["rlnTomoTomogramsFile"]) == (out / "tomograms.star").resolve()
    assert read_mrc_header(particles["rlnImageName"].iloc[0])["voxel_size_xyz_A"] == pytest.approx((PIXEL_A,) * 3)


@pytest.mark.parametrize("case", ["box below crop", "crop below diameter", "binning too coarse", "outside tomogram",
                                  "no tilt series", "outside every image", "no particles input"])
def test_bad_input_fails_with_a_clear_message(tmp_path, case):
    """Each stops the step with a message saying what is wrong; no subtomograms set is finished."""
    inputs = {"outside tomogram": {"centres_A": CENTRES_A[:4] + [(0.0, 0.0, 400.0)]},
              "no tilt series": {"ts_ids": ["TS_01"] * 4 + ["TS_99"]},
              "outside every image": {"centres_A": [(0.0, 170.0, 0.0)]},
              "no particles input": {"particles": False}}.get(case, {})
    sizes = {"box below crop": "binning = 1\nbox_px = 24\ncrop_px = 32",
             "crop below diameter": SIZES + "\nparticle_diameter_A = 80",
             "binning too coarse": "binning = 12\nbox_px = 14\ncrop_px = 12\nparticle_diameter_A = 400"}
    report = run(tmp_path, sizes=sizes.get(case, SIZES), **inputs)
    outcome = report.outcomes[-1]
    assert outcome.status == "failed", outcome
    expected = {"box below crop": "box_px (24) is smaller than crop_px (32)",
                "crop below diameter": "crop_px = 32 px of 2 Å (binning 1) is 64.0 Å, smaller than the particle "
                                       "diameter 80 Å",
                "binning too coarse": "box_px = 14 px of 24 Å (binning 12) is 336.0 Å",
                "outside tomogram": "is outside the tomogram",
                "no tilt series": "particles of tilt series 'TS_99' but the input 'tilt_series' has no enabled view",
                "outside every image": "no particle kept: all 1 particles are seen by fewer than",
                "no particles input": "exactly one; got none"}[case]
    assert expected in outcome.message, outcome.message
    with Project.open(tmp_path / "project") as project:
        assert not project.finished_sets("subtomograms")


def test_geometry_attrs_round_trip():
    from tomopipe.algorithms.subtomo.extract import TiltGeometry
    from tomopipe.model.subtomograms import geometry_attrs

    geometry = TiltGeometry.from_alignment(
        80.0, torch.tensor([-3.0, 0.0, 3.0]), 0.5, torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 3.0]]),
        defocus_u_A=torch.tensor([1e4, 1.1e4, 1.2e4]), defocus_v_A=9e3, defocus_angle_deg=20.0,
        pre_exposure_e_per_A2=torch.tensor([3.0, 0.0, 6.0]), defocus_hand=1, pixel_size_A=1.5,
        image_size_px=(100, 80), voltage_kV=200.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07,
        magnification=torch.tensor([1.0, 1.01, 0.99]))
    attrs = json.loads(json.dumps({"geometry": {"TS": geometry_attrs(geometry, [4, 5, 6])}}))
    back = geometry_from_attrs(attrs, "TS")
    assert back.tilt_index == (4, 5, 6) and back.geometry.image_size_px == (100, 80)
    for name in ("rotations", "shifts_A", "defocus_u_A", "defocus_v_A", "magnification", "pre_exposure_e_per_A2"):
        torch.testing.assert_close(getattr(back.geometry, name), getattr(geometry, name), rtol=0, atol=0)
    assert math.isclose(back.geometry.amplitude_contrast, 0.07)
    with pytest.raises(Exception, match="no tilt geometry for 'XX'"):
        geometry_from_attrs(attrs, "XX")
