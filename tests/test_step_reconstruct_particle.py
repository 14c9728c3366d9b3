"""The reconstruct-particle step end to end: tilt series of a known chiral volume (Gaussian blobs at a
subset of the apoferritin model's atoms) made in closed form — each blob projects to a 2-D Gaussian at
``[R_tilt·(p + A·x)]_xy`` — independently of the Fourier-slice code, then cut by the REAL extraction
(:func:`tomopipe.algorithms.subtomo.extract.extract_crops`) and reconstructed by the step. Noise-free and
without a CTF the map matches the truth to near Nyquist and is not its mirror image: this pins the
rotation and hand conventions of extraction and insertion together. Then the CTF with noise, and the
clear errors the issue asks for."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.filters import exposure_filter, radial_frequency_grid
from tomopipe.algorithms.fsc import fsc, fsc_resolution_A
from tomopipe.algorithms.geometry import euler_relion_to_matrix
from tomopipe.algorithms.subtomo.extract import TiltGeometry, extract_crops, particle_tilt_positions
from tomopipe.data import APOFERRITIN_MODEL
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.model.subtomograms import ORIGIN_COLUMNS, geometry_attrs, tilts_used_string
from tomopipe.project.store import Project
from tomopipe.steps.reconstruct_particle import ReconstructParticle

pytestmark = pytest.mark.usefixtures("one_thread")

PIXEL_A = 5.0
CROP_PX, BOX_PX = 40, 64           # crop of the map; box of the CTF handling (room for delocalisation)
IMAGE_PX = 352
SIGMA_PX = 1.0                     # blob width
TILTS_DEG = np.arange(-60.0, 60.1, 3.0)
DOSE_PER_TILT = 1.0
ACQUISITION = dict(voltage_kV=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07)


@pytest.fixture(scope="module")
def blobs_A() -> torch.Tensor:
    """Every 20th atom of apoferritin (6Z6U, chiral), ``[b, 3]`` Å about the centroid."""
    return read_atomic_model(APOFERRITIN_MODEL, implicit_hydrogens=False).positions_A[::20].double()


def _volume(blobs_A: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """The truth ``[N, N, N]`` (z, y, x) on the crop grid, centre N//2: Σ exp(−|x − b|²/2σ²) (x mirrored)."""
    b = blobs_A / PIXEL_A * torch.tensor([-1.0 if mirror else 1.0, 1.0, 1.0], dtype=torch.float64)
    ax = torch.arange(CROP_PX, dtype=torch.float64) - CROP_PX // 2
    g = torch.exp(-(ax[None, None, :] - b[:, :, None]) ** 2 / (2 * SIGMA_PX**2))  # [b, (x, y, z), N]
    return torch.einsum("bz,by,bx->zyx", g[:, 2], g[:, 1], g[:, 0])


def _patch(blobs_A: torch.Tensor, rotation: torch.Tensor, offset_px: torch.Tensor, size: int) -> torch.Tensor:
    """Line sums ``[size, size]`` of the volume rotated by ``rotation`` (x_image = R·x), its centre at
    ``size//2 + offset_px`` (x, y): separable 2-D Gaussians of weight √(2π)·σ."""
    moved = (blobs_A @ rotation.T)[:, :2] / PIXEL_A + offset_px
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    gx = torch.exp(-(ax[None, :] - moved[:, 0, None]) ** 2 / (2 * SIGMA_PX**2))
    gy = torch.exp(-(ax[None, :] - moved[:, 1, None]) ** 2 / (2 * SIGMA_PX**2))
    return math.sqrt(2 * math.pi) * SIGMA_PX * gy.T @ gx


def _geometry(seed: int) -> TiltGeometry:
    generator = torch.Generator().manual_seed(seed)
    n = len(TILTS_DEG)
    order = np.argsort(np.abs(TILTS_DEG), kind="stable")  # dose-symmetric-like: low tilts first
    pre = np.empty(n)
    pre[order] = np.arange(n) * DOSE_PER_TILT
    defocus = 8000.0 + 12000.0 * torch.rand(n, generator=generator, dtype=torch.float64)  # fills the CTF zeros
    return TiltGeometry.from_alignment(
        torch.full((n,), 85.0, dtype=torch.float64), torch.tensor(TILTS_DEG), 0.0,
        10.0 * (torch.rand((n, 2), generator=generator, dtype=torch.float64) - 0.5),
        defocus_u_A=defocus, defocus_v_A=defocus - 300.0, defocus_angle_deg=30.0, pre_exposure_e_per_A2=pre,
        defocus_hand=-1, pixel_size_A=PIXEL_A, image_size_px=(IMAGE_PX, IMAGE_PX), **ACQUISITION)


def _positions_A() -> torch.Tensor:
    """20 particles on a grid, far enough apart that no neighbour enters a crop at 60°."""
    generator = torch.Generator().manual_seed(7)
    x, y = np.meshgrid([-540.0, -180.0, 180.0, 540.0], np.arange(-440.0, 441.0, 220.0))
    z = 60.0 * (torch.rand(x.size, generator=generator, dtype=torch.float64) - 0.5)
    return torch.stack([torch.tensor(x.ravel()), torch.tensor(y.ravel()), z], dim=1)


def _tilt_series(blobs_A, geometry: TiltGeometry, positions_A, poses, with_ctf: bool, noise_sd: float,
                 seed: int) -> torch.Tensor:
    """Tilt images ``[n, ny, nx]`` (protein dark): each particle's patch, filtered by CTF·D of its tilt at
    its defocus (D alone without CTF), negated and added at its projected position; then white noise."""
    where = particle_tilt_positions(geometry, positions_A, BOX_PX)
    images = torch.zeros((geometry.n_tilts, IMAGE_PX, IMAGE_PX), dtype=torch.float64)
    k = radial_frequency_grid((BOX_PX, BOX_PX), torch.tensor(PIXEL_A, dtype=torch.float64))
    h = BOX_PX // 2
    for i in range(geometry.n_tilts):
        dose = exposure_filter(k, float(geometry.pre_exposure_e_per_A2[i]), ACQUISITION["voltage_kV"])
        for j in range(positions_A.shape[0]):
            centre = torch.floor(where.xy_px[j, i] + 0.5)
            patch = _patch(blobs_A, geometry.rotations[i] @ poses[j], where.xy_px[j, i] - centre, BOX_PX)
            filt = dose
            if with_ctf:
                u, v, angle = (float(a) for a in where.defocus_A[j, i])
                filt = dose * ctf_2d((BOX_PX, BOX_PX), PIXEL_A, u, v, angle, **{
                    "voltage_kV": ACQUISITION["voltage_kV"], "cs_mm": ACQUISITION["spherical_aberration_mm"],
                    "amplitude_contrast": ACQUISITION["amplitude_contrast"]})
            patch = torch.fft.irfft2(torch.fft.rfft2(patch) * filt, s=patch.shape)
            cx, cy = int(centre[0]), int(centre[1])
            images[i, cy - h:cy + h, cx - h:cx + h] -= patch
    if noise_sd > 0:
        generator = torch.Generator().manual_seed(seed)
        images += noise_sd * torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return images.float()


def _subtomograms(tmp_path, blobs_A, n_series: int = 2, with_ctf: bool = False, noise_sd: float = 0.0,
                  particles: int = 20, crop_px: int = CROP_PX, origin_A: tuple[float, float, float] | None = None):
    """A project holding a subtomograms set (2-D crops of the real extraction), and the poses. With
    ``origin_A`` the crops are cut that far from the particles' centres and the rows say so (RELION
    origins: centre = position − origin)."""
    project = Project.init(tmp_path / "p")
    run = project.create_run("extract", "extract_subtomos", {}, {}, "subtomograms")
    folder = project.absolute_path(run.folder)
    generator = torch.Generator().manual_seed(11)
    rows, geometries, poses_all = [], {}, []
    for s in range(n_series):
        ts_id = f"TS_{s + 1:02d}"
        geometry = _geometry(s)
        positions = _positions_A()[:particles]
        angles = torch.rand((particles, 3), generator=generator, dtype=torch.float64) * torch.tensor([360.0, 180.0,
                                                                                                      360.0])
        poses = euler_relion_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        images = _tilt_series(blobs_A, geometry, positions, poses, with_ctf, noise_sd, seed=s)
        if origin_A is not None:
            positions = positions + torch.tensor(origin_A, dtype=positions.dtype)
        crops = extract_crops(images, geometry, positions, BOX_PX, crop_px, apply_ctf=with_ctf)
        assert bool(crops.kept.all())
        path = folder / f"{ts_id}_crops.mrcs"
        n = geometry.n_tilts
        write_mrc(path, crops.crops.reshape(-1, crop_px, crop_px).numpy(), crops.pixel_size_A, stack=True)
        for j in range(particles):
            rows.append({"ts_id": ts_id, "x_A": float(positions[j, 0]), "y_A": float(positions[j, 1]),
                         "z_A": float(positions[j, 2]), "rot_deg": float(angles[j, 0]),
                         "tilt_deg": float(angles[j, 1]), "psi_deg": float(angles[j, 2]), "score": 1.0,
                         "half_set": 1 + (j + s) % 2, "data_path": project.relative_path(path),
                         "data_section": j * n, "n_sections": n,
                         "tilts_used": tilts_used_string(crops.visible[j].numpy()),
                         **({} if origin_A is None else dict(zip(ORIGIN_COLUMNS, map(float, origin_A))))})
        geometries[ts_id] = geometry_attrs(geometry, range(n))
        poses_all.append(poses)
    attrs = {"tilt_series": {}, "geometry": geometries,
             "extraction": {"dimensions": 2, "pixel_size_A": PIXEL_A, "binning": 1.0, "box_px": BOX_PX,
                            "crop_px": crop_px, "apply_ctf": with_ctf}}
    record = project.add_set(run.id, "subtomograms", "subtomograms", pd.DataFrame(rows), attrs)
    project.finish_run(run.id)
    return project, record


def _reconstruct(project, record, **params):
    return run_on_sets(project, ReconstructParticle, "reconstruct_particle", params, {"subtomograms": record},
                       LocalExecutor(1))


def _maps(project, outcome) -> dict[str, torch.Tensor]:
    items = project.read_items(project.sets_of_run(outcome.run.id)["maps"].id)
    out = {}
    for row in items.itertuples():
        data, voxel = read_mrc(project.absolute_path(row.map_path))
        assert voxel == pytest.approx(PIXEL_A)
        out[row.map_name] = torch.from_numpy(data).double()
    return out


def test_noise_free_particles_reconstruct_the_truth_not_its_mirror(tmp_path, blobs_A):
    project, record = _subtomograms(tmp_path, blobs_A)
    with project:
        outcome = _reconstruct(project, record, regularisation="wiener", wiener_snr=1e6)
        assert outcome.status == "finished", outcome.message
        maps = _maps(project, outcome)
        maps_record = project.sets_of_run(outcome.run.id)["maps"]
        names = [project.absolute_path(p).name for p in project.read_items(maps_record.id)["map_path"]]
        attrs = maps_record.attrs
    assert sorted(names) == ["run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"]
    truth, mirror = _volume(blobs_A), _volume(blobs_A, mirror=True)
    curve, mirrored = fsc(maps["full"], truth), fsc(maps["full"], mirror)
    print("FSC vs truth:", [round(float(c), 3) for c in curve])
    print("FSC vs mirror:", [round(float(c), 3) for c in mirrored])
    near_nyquist = slice(1, int(0.9 * CROP_PX // 2) + 1)
    assert float(curve[near_nyquist].min()) >= 0.9
    fine = slice(8, near_nyquist.stop)  # a roughly spherical shell: its mirror differs beyond 25 Å
    assert float(mirrored[fine].max()) < 0.5
    assert attrs["particles_per_half"] == {"1": 20, "2": 20}
    assert attrs["resolution_A"] == pytest.approx(2 * PIXEL_A, rel=0.1)  # the halves agree to Nyquist
    with Project.open(project.folder) as project:  # RELION's box-size spectra: less exact near Nyquist
        outcome = _reconstruct(project, record, regularisation="wiener", wiener_snr=1e6, exact_insertion=False)
        unpadded = fsc(_maps(project, outcome)["full"], truth)
    print("FSC vs truth, box-size spectra:", [round(float(c), 3) for c in unpadded])
    assert float(unpadded[1:int(0.75 * CROP_PX // 2) + 1].min()) >= 0.95
    assert float(unpadded[near_nyquist].min()) < float(curve[near_nyquist].min())


def test_relion_origins_move_the_crops_to_the_particle_centres(tmp_path, blobs_A):
    """Crops cut 6.5 Å (1.3 px) and −4 Å off the particles, with RELION origins saying so, reconstruct the
    truth as well as centred crops do; the same crops with the origins dropped do not."""
    project, record = _subtomograms(tmp_path, blobs_A, origin_A=(6.5, -4.0, 3.0))
    truth = _volume(blobs_A)
    with project:
        items = project.read_items(record.id)
        shifted = _maps(project, _reconstruct(project, record, regularisation="wiener", wiener_snr=1e6))["full"]
        run = project.create_run("no_origins", "extract_subtomos", {}, {}, "origins dropped")
        dropped = project.add_set(run.id, "subtomograms", "subtomograms", items.drop(columns=list(ORIGIN_COLUMNS)),
                                  record.attrs)
        project.finish_run(run.id)
        ignored = _maps(project, _reconstruct(project, dropped, regularisation="wiener", wiener_snr=1e6))["full"]
    with_origins, without = fsc(shifted, truth), fsc(ignored, truth)
    print("FSC vs truth with origins:", [round(float(c), 3) for c in with_origins])
    print("FSC vs truth without:", [round(float(c), 3) for c in without])
    near_nyquist = slice(1, int(0.9 * CROP_PX // 2) + 1)
    assert float(with_origins[near_nyquist].min()) >= 0.9
    assert float(without[near_nyquist].min()) < 0.5


def test_ctf_and_noise_gold_standard_agrees_with_the_truth(tmp_path, blobs_A):
    project, record = _subtomograms(tmp_path, blobs_A, with_ctf=True, noise_sd=40.0)
    with project:
        outcome = _reconstruct(project, record, particle_diameter_A=150.0)
        assert outcome.status == "finished", outcome.message
        maps = _maps(project, outcome)
        attrs = project.sets_of_run(outcome.run.id)["maps"].attrs
    truth = _volume(blobs_A)
    curve, mirrored = fsc(maps["full"], truth), fsc(maps["full"], _volume(blobs_A, mirror=True))
    print("gold standard", attrs["resolution_A"], "FSC vs truth:", [round(float(c), 3) for c in curve])
    print("FSC vs mirror:", [round(float(c), 3) for c in mirrored])
    truth_resolution_A = fsc_resolution_A(curve, PIXEL_A, 0.5)
    assert bool((curve[8:11] > mirrored[8:11] + 0.3).all())
    assert attrs["resolution_A"] == pytest.approx(truth_resolution_A, rel=0.1)  # an honest gold standard
    assert "fsc_masked" in attrs["fsc"]


@pytest.fixture(scope="module")
def small_project(tmp_path_factory, blobs_A):
    """The folder of a project with one tilt series of 4 particles (2 per half set), and the set."""
    project, record = _subtomograms(tmp_path_factory.mktemp("small"), blobs_A, n_series=1, particles=4)
    project.close()
    return project.folder, record


@pytest.mark.parametrize("params, message", [
    ({"symmetry": "X5"}, "unknown symmetry 'X5'"),
    ({"particle_diameter_A": 250.0}, "does not fit in a box of 40"),
    ({"box_px": 42, "particle_diameter_A": 250.0}, "does not fit in a box of 42"),
    ({"box_px": 41}, "box_px must be even"),
])
def test_bad_parameters_are_refused(small_project, params, message):
    folder, record = small_project
    with Project.open(folder) as project:
        outcome = _reconstruct(project, record, **params)
    assert outcome.status == "failed"
    assert message in outcome.message


def test_too_few_particles_for_two_half_sets_and_3d_are_refused(small_project):
    folder, record = small_project
    with Project.open(folder) as project:
        items = project.read_items(record.id)
        run = project.create_run("extract2", "extract_subtomos", {}, {}, "subtomograms")
        one_sided = project.add_set(run.id, "subtomograms", "subtomograms", items.assign(half_set=[1, 1, 1, 2]),
                                    record.attrs)
        volumes = project.add_set(run.id, "volumes", "subtomograms", items, {
            **record.attrs, "extraction": {**record.attrs["extraction"], "dimensions": 3}})
        project.finish_run(run.id)
        few = _reconstruct(project, one_sided)
        three_d = _reconstruct(project, volumes)
    assert few.status == "failed" and "too few particles for two half sets: 3 in half 1, 1 in half 2" in few.message
    assert three_d.status == "failed" and "only 2-D extractions" in three_d.message
