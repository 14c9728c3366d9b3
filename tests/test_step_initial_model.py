"""The ``initial_model`` step on a project holding a 3-D subtomograms set of synthetic particles of a
known O-symmetric, chiral volume (the algorithm tests' generator: projections over ±60° with white
noise, inserted as pseudo-subtomograms), written per the layout of :mod:`tomopipe.model.subtomograms`
in two files (two tilt series). Without a CTF (weights 1) Σ CTF² equals the multiplicity.

Criteria: the map aligned to the truth (:func:`align_volumes`, both hands) has FSC ≥ 0.5 up to shell
N/3 (1.5 × the Nyquist resolution), the right hand, protein positive; the output particles' poses
agree with the truth modulo O and their centres moved by the offsets found (pick + t); bad input
fails with a clear message and no finished run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from test_subtomo_initial_model import PIXEL_A, N, chiral_o_volume, synthetic_particles
from tomopipe.algorithms.fsc import fsc
from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.subtomo.initial_model import align_volumes
from tomopipe.algorithms.symmetry import misorientation_deg
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.engine.step_api import step_class
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.project.store import Project
from tomopipe.validate.aligned_map_score import score_aligned_map
from tomopipe.validate.registry import scores_of_set
from tomopipe.validate.truth import Truth

pytestmark = pytest.mark.usefixtures("one_thread")

COUNT = 120
PER_SERIES = COUNT // 2


def _subtomograms(folder, count: int = COUNT, dimensions: int = 3):
    """A project with a subtomograms set of ``count`` synthetic particles (two tilt series, one data and one
    weights file each); returns the project, the set and the truth (volume, poses, offsets px)."""
    volume = chiral_o_volume()
    data_ft, weights, poses, offsets = synthetic_particles(volume, count, snr=0.5)
    volumes = torch.fft.fftshift(torch.fft.irfftn(data_ft, s=(N, N, N)), dim=(-3, -2, -1))
    project = Project.init(folder / "p")
    run = project.create_run("extract3d", "extract_subtomos", {}, {}, "subtomograms")
    out = project.absolute_path(run.folder)
    rows, half = [], (count + 1) // 2
    positions_A = torch.randn((count, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 300.0
    for s, chunk in enumerate((slice(0, half), slice(half, count))):
        ts_id = f"TS_{s + 1:02d}"
        data_path, weights_path = out / f"{ts_id}_data.mrc", out / f"{ts_id}_weights.mrc"
        write_mrc(data_path, volumes[chunk].reshape(-1, N, N).numpy(), PIXEL_A)
        w = weights[chunk]
        write_mrc(weights_path, torch.stack([w, w], 1).reshape(-1, N, N // 2 + 1).numpy(), PIXEL_A)
        for j, i in enumerate(range(count)[chunk]):
            rows.append({"ts_id": ts_id, "x_A": float(positions_A[i, 0]), "y_A": float(positions_A[i, 1]),
                         "z_A": float(positions_A[i, 2]), "rot_deg": 0.0, "tilt_deg": 0.0, "psi_deg": 0.0,
                         "score": 1.0, "half_set": 1 + i % 2, "data_path": project.relative_path(data_path),
                         "data_section": j * N, "n_sections": N, "tilts_used": "1" * 31,
                         "weights_path": project.relative_path(weights_path)})
    attrs = {"tilt_series": {}, "picking": {"orientation_known": False},
             "extraction": {"dimensions": dimensions, "pixel_size_A": PIXEL_A, "binning": 1.0, "box_px": N,
                            "crop_px": N, "invert_contrast": True}}
    record = project.add_set(run.id, "subtomograms", "subtomograms", pd.DataFrame(rows), attrs)
    project.finish_run(run.id)
    return project, record, (volume, poses, offsets)


def _run(project, record, **params):
    return run_on_sets(project, step_class("initial_model"), "initial_model", {"device": "cpu", **params},
                       {"subtomograms": record}, LocalExecutor(1))


def test_seed_parameters():
    step = step_class("initial_model")
    assert step.title == "reliontomo - 3D initial model"
    d = {p.name: p.default for p in step.params}
    assert (d["n_iterations"], d["regularisation_T"], d["mask_diameter_A"], d["symmetry"], d["tilt_prior_deg"]) == (
        40, 4.0, 150.0, "O", 15.0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The step run once on the 120 particles: (project folder, its run id, the input set, the truth)."""
    project, record, truth = _subtomograms(tmp_path_factory.mktemp("model"))
    with project:
        outcome = _run(project, record, n_iterations=20, batch_size=30, mask_diameter_A=170.0)
    assert outcome.status == "finished", outcome.message
    return project.folder, outcome.run.id, record, truth


def test_initial_model_step_recovers_the_truth_and_the_poses(finished):
    folder, run_id, record, (truth, poses, offsets_px) = finished
    with Project.open(folder) as project:
        sets = project.sets_of_run(run_id)
        maps = project.read_items(sets["maps"].id)
        posed = project.read_items(sets["subtomograms"].id)
        before = project.read_items(record.id)
        volume, voxel = read_mrc(project.absolute_path(maps["map_path"][0]))
        attrs = sets["maps"].attrs["initial_model"]
        assert project.absolute_path(maps["map_path"][0]).name == "initial_model.mrc"
    assert maps["map_name"].tolist() == ["full"] and voxel == pytest.approx(PIXEL_A)
    assert len(attrs["log"]) == 20 and attrs["symmetry"] == "O" and not attrs["prior_tilt"]
    assert attrs["resolution_schedule_A"][-1] == pytest.approx(20.0) and attrs["resolution_schedule_A"][0] > 60.0
    alignment = align_volumes(torch.from_numpy(volume), truth, symmetry="O", step_deg=10.0)
    curve = fsc(alignment.aligned, truth)
    below = torch.nonzero(curve[1:] < 0.5)
    assert not alignment.mirrored and alignment.correlation > 0.8  # right hand, protein positive
    assert (int(below[0]) + 1 if below.numel() else curve.numel()) >= N / 3
    # poses in the truth's frame: A_true = A·Rᵀ; centre: pick + t with t = t_true + A_true·s (s the model's shift)
    found = euler_relion_to_matrix(*(torch.tensor(posed[c].to_numpy()) for c in ("rot_deg", "tilt_deg", "psi_deg")))
    in_truth = found @ alignment.rotation.double().T
    assert float(misorientation_deg(in_truth, poses.double(), "O").median()) < 7.0
    moved_px = (posed[["x_A", "y_A", "z_A"]].to_numpy() - before[["x_A", "y_A", "z_A"]].to_numpy()) / PIXEL_A
    expected_px = offsets_px.double() + (poses.double() @ alignment.shift_px.double()[:, None])[..., 0]
    error_px = np.linalg.norm(moved_px - expected_px.numpy(), axis=1)
    assert float(np.median(error_px)) < 0.75
    assert posed.drop(columns=["x_A", "y_A", "z_A", "rot_deg", "tilt_deg", "psi_deg"]).equals(
        before.drop(columns=["x_A", "y_A", "z_A", "rot_deg", "tilt_deg", "psi_deg"]))


def test_scores_against_the_truth_align_the_map_first(finished, tmp_path):
    """The registry's scorer: FSC 0.5 against the true map after the alignment, and the hand; a mirrored
    map is found mirrored."""
    folder, run_id, _, (truth, _, _) = finished
    (tmp_path / "maps").mkdir()
    write_mrc(tmp_path / "maps" / "true_map_bin1.mrc", truth.numpy(), PIXEL_A)
    with Project.open(folder) as project:
        record = project.sets_of_run(run_id)["maps"]
        scores = {s.name: s.value for s in scores_of_set(project, record, "initial_model", Truth(tmp_path))}
        volume, _ = read_mrc(project.absolute_path(project.read_items(record.id)["map_path"][0]))
    assert scores["right_hand"] and scores["map_correlation"] > scores["other_hand_map_correlation"]
    assert scores["fsc_0_5_truth_A"] <= 3.0 * PIXEL_A  # shell N/3 or finer: 1.5 × the Nyquist resolution
    mirrored = torch.flip(torch.from_numpy(volume), dims=(0,))
    assert not score_aligned_map(mirrored, PIXEL_A, Truth(tmp_path), "O", 170.0).right_hand


@pytest.fixture(scope="module")
def small_project(tmp_path_factory):
    project, record, _ = _subtomograms(tmp_path_factory.mktemp("small"), count=8)
    two_d = project.create_run("extract2d", "extract_subtomos", {}, {}, "subtomograms")
    stacks = project.add_set(two_d.id, "subtomograms", "subtomograms", project.read_items(record.id), {
        **record.attrs, "extraction": {**record.attrs["extraction"], "dimensions": 2}})
    project.finish_run(two_d.id)
    project.close()
    return project.folder, {"3d": record, "2d": stacks}


@pytest.mark.parametrize("which, params, message", [
    ("2d", {}, "extract the particles with write_2d = false"),
    ("3d", {"symmetry": "Q7", "batch_size": 4}, "unknown symmetry 'Q7'"),
    ("3d", {"mask_diameter_A": 250.0, "batch_size": 4}, "does not fit in a box of 24"),
    ("3d", {"batch_size": 16}, "too few particles: 8 enabled, fewer than one mini-batch of batch_size = 16"),
])
def test_bad_input_is_refused(small_project, which, params, message):
    folder, records = small_project
    with Project.open(folder) as project:
        outcome = _run(project, records[which], **params)
        status = project.get_run(outcome.run.id).status
    assert outcome.status == "failed" and status != "finished"
    assert message in outcome.message


def test_data_of_another_size_name_the_file(small_project):
    folder, records = small_project
    with Project.open(folder) as project:
        record = records["3d"]
        run = project.create_run("extract_bad", "extract_subtomos", {}, {}, "subtomograms")
        items = project.read_items(record.id)
        bad = project.add_set(run.id, "subtomograms", "subtomograms", items.assign(data_section=items["data_section"]
                                                                                   + N), record.attrs)
        project.finish_run(run.id)
        outcome = _run(project, bad, batch_size=4)
    assert outcome.status == "failed"
    assert "TS_01_data.mrc" in outcome.message and "expected sections 96 .. 119" in outcome.message


def test_picks_with_orientations_give_a_tilt_prior(small_project):
    """With orientations from picking (here all tilts 90°) and a narrow prior, the poses found keep
    their tilt near it; without them the prior is off (the tilts of 8 random particles spread)."""
    folder, records = small_project
    with Project.open(folder) as project:
        record = records["3d"]
        run = project.create_run("extract_oriented", "extract_subtomos", {}, {}, "subtomograms")
        oriented = project.add_set(run.id, "subtomograms", "subtomograms",
                                   project.read_items(record.id).assign(tilt_deg=90.0),
                                   {**record.attrs, "picking": {"orientation_known": True}})
        project.finish_run(run.id)
        tilts = {}
        for name, source in (("prior", oriented), ("free", record)):
            outcome = _run(project, source, symmetry="C1", tilt_prior_deg=2.0, n_iterations=2, batch_size=4,
                           mask_diameter_A=60.0)  # coarse grids: a fast search
            assert outcome.status == "finished", outcome.message
            assert outcome.summary["prior_tilt"] == (name == "prior")
            tilts[name] = project.read_items(project.sets_of_run(outcome.run.id)["subtomograms"].id)["tilt_deg"]
    assert float((tilts["prior"] - 90.0).abs().max()) < 15.0
    assert float((tilts["free"] - 90.0).abs().max()) > 15.0
