"""The auto-refine step end to end on synthetic 2-D subtomograms: an O-symmetric chiral volume of Gaussian
blobs (random points and their 24 images under RELION's O), tilt series made in closed form with the CTF
and noise, cut by the REAL extraction (helpers of tests/test_step_reconstruct_particle.py), the poses in
the set randomised, the reference the true volume low-passed to 35 Å. The refinement must find the poses
(modulo O) and reach, against the truth, the resolution the true poses give; bad input gives clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from test_step_reconstruct_particle import PIXEL_A, _maps, _reconstruct, _subtomograms, _volume
from tomopipe.algorithms.filters import bandpass
from tomopipe.algorithms.fourier import crop_centered
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.picking.template import resample_volume
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.io.mrc import write_mrc
from tomopipe.model.subtomograms import ORIGIN_COLUMNS
from tomopipe.project.store import Project
from tomopipe.steps.auto_refine import AutoRefine

pytestmark = pytest.mark.usefixtures("one_thread")

CROP_PX = 32
PARAMS = dict(symmetry="O", mask_diameter_A=140.0, initial_lowpass_A=60.0, max_iterations=3)


@pytest.fixture(scope="module")
def blobs_A() -> torch.Tensor:
    """20 random points 25–55 Å from the centre and their images under O: ``[480, 3]`` Å, chiral."""
    generator = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn((20, 3), generator=generator, dtype=torch.float64), dim=1)
    points = direction * (25.0 + 30.0 * torch.rand((20, 1), generator=generator, dtype=torch.float64))
    return (symmetry_group("O")[:, None] @ points[None, :, :, None]).reshape(-1, 3)


def _angles(items: pd.DataFrame) -> torch.Tensor:
    return euler_relion_to_matrix(*(torch.tensor(items[c].to_numpy(), dtype=torch.float64)
                                    for c in ("rot_deg", "tilt_deg", "psi_deg")))


def _with_random_poses(project: Project, record):
    """A copy of the set with the angles drawn at random (the truth kept aside)."""
    items = project.read_items(record.id)
    generator = np.random.default_rng(5)
    shuffled = items.assign(rot_deg=generator.uniform(-180, 180, len(items)),
                            tilt_deg=np.degrees(np.arccos(generator.uniform(-1, 1, len(items)))),
                            psi_deg=generator.uniform(-180, 180, len(items)))
    run = project.create_run("randomise", "extract_subtomos", {}, {}, "random poses")
    out = project.add_set(run.id, "subtomograms", "subtomograms", shuffled, record.attrs)
    project.finish_run(run.id)
    return out


def _reference(project: Project, volume: torch.Tensor, pixel_A: float = PIXEL_A):
    """A maps set whose 'full' map is ``volume``."""
    run = project.create_run("reference", "reconstruct_particle", {}, {}, "reference")
    path = project.absolute_path(run.folder) / "reference.mrc"
    write_mrc(path, volume.float().numpy(), pixel_A)
    rows = pd.DataFrame([{"map_name": "full", "map_path": project.relative_path(path), "voxel_size_A": pixel_A,
                          "box_px": volume.shape[0], "enabled": True}])
    record = project.add_set(run.id, "maps", "maps", rows, {})
    project.finish_run(run.id)
    return record


def _refine(project, subtomograms, reference, **params):
    return run_on_sets(project, AutoRefine, "auto_refine", {**PARAMS, **params},
                       {"subtomograms": subtomograms, "reference": reference}, LocalExecutor(1))


def _lowpass(volume: torch.Tensor, resolution_A: float) -> torch.Tensor:
    n = volume.shape[0]
    return torch.fft.irfftn(torch.fft.rfftn(volume) * bandpass((n,) * 3, PIXEL_A, high_A=resolution_A),
                            s=volume.shape)


def _resolution_vs_truth(volume: torch.Tensor, truth: torch.Tensor) -> float:
    return fsc_resolution_A(fsc(volume, truth), PIXEL_A, 0.5)


def test_auto_refine_finds_the_poses_and_the_true_pose_resolution(tmp_path, blobs_A):
    project, record = _subtomograms(tmp_path, blobs_A, with_ctf=True, noise_sd=2.0, crop_px=CROP_PX)
    truth = crop_centered(_volume(blobs_A), (CROP_PX,) * 3)  # the helper draws it in a 40-px box
    with project:
        truth_items = project.read_items(record.id)
        true_poses = _angles(truth_items)
        true_pose_map = _maps(project, _reconstruct(project, record, symmetry="O"))["full"]
        shuffled = _with_random_poses(project, record)
        assert float(misorientation_deg(_angles(project.read_items(shuffled.id)), true_poses, "O").median()) > 20
        outcome = _refine(project, shuffled, _reference(project, _lowpass(truth, 35.0)))
        assert outcome.status == "finished", outcome.message
        sets = project.sets_of_run(outcome.run.id)
        refined = project.read_items(sets["subtomograms"].id)
        attrs = sets["maps"].attrs
        maps = _maps(project, outcome)
    log = attrs["iterations"]
    print("iterations:", log)
    error = misorientation_deg(_angles(refined), true_poses, "O")
    print("misorientation vs truth (deg): median", float(error.median()), "max", float(error.max()))
    assert float(error.median()) <= 2 * log[-1]["angular_step_deg"]
    assert np.array_equal(refined[["x_A", "y_A", "z_A"]].to_numpy(), truth_items[["x_A", "y_A", "z_A"]].to_numpy())
    centres = refined[["x_A", "y_A", "z_A"]].to_numpy() - refined[list(ORIGIN_COLUMNS)].to_numpy()  # RELION
    moved_A = np.linalg.norm(centres - truth_items[["x_A", "y_A", "z_A"]].to_numpy(), axis=1)
    print("offset error (A): median", float(np.median(moved_A)))
    assert float(np.median(moved_A)) <= PIXEL_A  # the particles sat at their positions: within a pixel
    limit_A = _resolution_vs_truth(true_pose_map, truth)
    found_A = _resolution_vs_truth(maps["full"], truth)
    print(f"FSC 0.5 vs truth: refined {found_A:.2f} A, true poses {limit_A:.2f} A; gold standard "
          f"{attrs['resolution_A']:.2f} A")
    assert found_A <= 1.1 * limit_A
    assert log[0]["angular_step_deg"] == 7.5 and log[-1]["angular_step_deg"] < 7.5
    assert all(len(it["fsc"]) == CROP_PX // 2 + 1 and it["fsc"][0] > 0.99 for it in log)  # the FSC of each iteration
    assert attrs["resolution_A"] < 35.0


@pytest.mark.parametrize("params, reference_box, message", [
    ({"symmetry": "Q7"}, CROP_PX, "Q7"),
    ({"mask_diameter_A": 400.0}, CROP_PX, "mask"),
    ({}, CROP_PX + 8, "box"),
])
def test_bad_input_gives_clear_errors(tmp_path, blobs_A, params, reference_box, message):
    project, record = _subtomograms(tmp_path, blobs_A, n_series=1, particles=4, crop_px=CROP_PX)
    with project:
        outcome = _refine(project, record, _reference(project, torch.zeros((reference_box,) * 3)), **params)
    assert outcome.status == "failed"
    assert message in outcome.message


def test_too_few_particles_for_two_halves(tmp_path, blobs_A):
    project, record = _subtomograms(tmp_path, blobs_A, n_series=1, particles=3, crop_px=CROP_PX)
    with project:
        outcome = _refine(project, record, _reference(project, torch.zeros((CROP_PX,) * 3)))
    assert outcome.status == "failed"
    assert "too few particles for two half sets" in outcome.message


def test_a_reference_at_another_voxel_size_is_resampled_or_refused(tmp_path, blobs_A):
    """A reference of 16 px at twice the crops' voxel size is Fourier-padded to the crops' 32 px (noted in
    the attributes); one of 20 px at twice the size would be 40 px: refused, naming the sizes."""
    project, record = _subtomograms(tmp_path, blobs_A, n_series=1, particles=8, crop_px=CROP_PX)
    truth = crop_centered(_volume(blobs_A), (CROP_PX,) * 3)
    coarse = resample_volume(_lowpass(truth, 35.0).float(), PIXEL_A, 2 * PIXEL_A)
    assert tuple(coarse.shape) == (16, 16, 16)
    with project:
        outcome = _refine(project, record, _reference(project, coarse, 2 * PIXEL_A), max_iterations=1)
        assert outcome.status == "finished", outcome.message
        assert "resampled to 5 A" in project.sets_of_run(outcome.run.id)["maps"].attrs["reference"]
        too_big = _refine(project, record, _reference(project, torch.zeros((20,) * 3), 2 * PIXEL_A))
    assert too_big.status == "failed" and "(40, 40, 40)" in too_big.message and "32 px" in too_big.message
