"""The postprocess step on half maps made of a known particle plus independent noise: the corrected
FSC is the FSC the maps would have without the solvent's noise, the files and curves are where RELION
puts them, and bad input is refused clearly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.fsc import fsc, fsc_resolution_A
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.export import export_project
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.io.star import read_star
from tomopipe.project.store import Project
from tomopipe.steps.postprocess import Postprocess

pytestmark = pytest.mark.usefixtures("one_thread")

N, PIXEL_A = 48, 2.0
MASK_DIAMETER_A, EDGE_PX = 64.0, 6.0


def _particle(generator: torch.Generator) -> torch.Tensor:
    """A random field with amplitudes falling as exp(−100·k²/4) on a positive mean (protein denser than the
    solvent), inside a soft 50 Å sphere: ``[N, N, N]``."""
    k2 = sum(torch.fft.fftfreq(N, PIXEL_A, dtype=torch.float64).reshape(s) ** 2 for s in ((N, 1, 1), (1, N, 1)))
    k2 = k2 + torch.fft.rfftfreq(N, PIXEL_A, dtype=torch.float64) ** 2
    field = torch.fft.irfftn(torch.fft.rfftn(torch.randn((N,) * 3, generator=generator, dtype=torch.float64))
                             * torch.exp(-25.0 * k2), s=(N,) * 3)
    return (field + 2.0 * field.std()) * spherical_mask(N, PIXEL_A, 50.0, 4.0).double()


def _maps_project(tmp_path, volumes: dict[str, torch.Tensor], voxels: dict[str, float] | None = None):
    project = Project.init(tmp_path / "p")
    run = project.create_run("reconstruct", "reconstruct_particle", {}, {}, "maps")
    rows = []
    for name, volume in volumes.items():
        path = project.absolute_path(run.folder) / f"{name}.mrc"
        voxel = (voxels or {}).get(name, PIXEL_A)
        write_mrc(path, volume.float().numpy(), voxel)
        rows.append({"map_name": name, "map_path": project.relative_path(path), "voxel_size_A": voxel,
                     "box_px": volume.shape[0]})
    record = project.add_set(run.id, "maps", "maps", pd.DataFrame(rows), {"resolution_A": 0.0})
    project.finish_run(run.id)
    return project, record


def _postprocess(project, record, **params):
    return run_on_sets(project, Postprocess, "postprocess", params, {"maps": record}, LocalExecutor(1))


@pytest.fixture(scope="module")
def noisy_halves():
    """(truth, half 1, half 2, noise 1, noise 2): the particle plus white noise everywhere in the box."""
    generator = torch.Generator().manual_seed(0)
    truth = _particle(generator)
    sd = 2.0 * float(truth[truth != 0].std())
    noise = [sd * torch.randn((N,) * 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    return truth, truth + noise[0], truth + noise[1], noise[0], noise[1]


def test_corrected_fsc_is_the_fsc_without_the_solvent_noise(tmp_path, noisy_halves):
    truth, half1, half2, noise1, noise2 = noisy_halves
    project, record = _maps_project(tmp_path, {"half1": half1, "half2": half2, "full": 0.5 * (half1 + half2)})
    with project:
        outcome = _postprocess(project, record, mask_diameter_A=MASK_DIAMETER_A, auto_mask_soft_edge_px=EDGE_PX,
                               local_resolution=True, local_window_px=16)
        assert outcome.status == "finished", outcome.message
        out = project.sets_of_run(outcome.run.id)["maps"]
        items = project.read_items(out.id)
        maps = {row.map_name: read_mrc(project.absolute_path(row.map_path)) for row in items.itertuples()}
    result = out.attrs["postprocess"]
    assert sorted(maps) == ["full", "half1", "half2", "local_resolution", "mask", "masked", "sharpened"]
    assert {project.absolute_path(p).name for p in items["map_path"]} >= {"postprocess.mrc",
                                                                         "postprocess_masked.mrc"}
    assert all(voxel == pytest.approx(PIXEL_A) for _, voxel in maps.values())
    for name in ("fsc_unmasked", "fsc_masked", "fsc_randomised_masked", "fsc_corrected"):
        assert len(result[name]) == N // 2 + 1
    # the truth: the same particle with its noise only where the mask is (no solvent noise), unmasked FSC
    mask = torch.from_numpy(maps["mask"][0]).double()
    ideal = fsc(truth + mask * noise1, truth + mask * noise2)
    ideal_A = fsc_resolution_A(ideal, PIXEL_A)
    unmasked_A = fsc_resolution_A(torch.tensor(result["fsc_unmasked"]), PIXEL_A)
    print(f"resolution: step {result['resolution_A']:.2f} Å, ideal {ideal_A:.2f} Å, unmasked {unmasked_A:.2f} Å")
    # the mask covers the particle: the masked FSC is that FSC; the correction only adds the random
    # phases' shell-to-shell scatter (one draw, as RELION), a shell or two in the resolution
    torch.testing.assert_close(torch.tensor(result["fsc_masked"], dtype=torch.float64), ideal, atol=1e-4, rtol=0)
    assert float((torch.tensor(result["fsc_corrected"]) - ideal).abs().max()) < 0.12
    assert result["resolution_A"] == pytest.approx(ideal_A, rel=0.15)
    assert unmasked_A > 1.5 * ideal_A
    masked = torch.from_numpy(maps["masked"][0]).double()
    sharpened = torch.from_numpy(maps["sharpened"][0]).double()
    torch.testing.assert_close(masked, sharpened * mask, atol=1e-5, rtol=1e-4)
    locres = torch.from_numpy(maps["local_resolution"][0])
    assert float(locres[mask > 0.99].median()) == pytest.approx(result["resolution_A"], rel=0.3)


def test_given_b_factor_on_identical_halves_gives_back_the_map(tmp_path):
    """Noise-free halves: FSC 1 to Nyquist, weights 1, B = 0: the sharpened map is the map (but for the
    low-pass edge at Nyquist)."""
    truth = _particle(torch.Generator().manual_seed(1))
    project, record = _maps_project(tmp_path, {"half1": truth, "half2": truth})
    with project:
        outcome = _postprocess(project, record, b_factor_A2=0.0)
        assert outcome.status == "finished", outcome.message
        out = project.sets_of_run(outcome.run.id)["maps"]
        items = project.read_items(out.id).set_index("map_name")
        sharpened = torch.from_numpy(read_mrc(project.absolute_path(items.loc["sharpened", "map_path"]))[0])
    result = out.attrs["postprocess"]
    assert result["resolution_A"] == pytest.approx(2 * PIXEL_A)
    assert result["b_factor_A2"] == 0.0 and result["mask"] == "none"
    curve = fsc(sharpened.double(), truth)
    assert float(curve[1:N // 2 - 2].min()) > 0.999


@pytest.mark.parametrize("case, message", [
    ("size", "the half maps differ in size"),
    ("voxel", "the half maps differ in voxel size"),
    ("missing", "needs exactly one map named half2"),
    ("two_masks", "give one mask: auto_mask_threshold, mask_diameter_A"),
    ("big_mask", "does not fit in a box of 48"),
    ("mask_file", "the mask is (40, 40, 40) voxels"),
])
def test_bad_input_is_refused(tmp_path, noisy_halves, case, message):
    _, half1, half2, _, _ = noisy_halves
    volumes = {"half1": half1, "half2": half2}
    voxels, params = None, {}
    if case == "size":
        volumes["half2"] = half2[:40, :40, :40]
    elif case == "voxel":
        voxels = {"half2": 2.5}
    elif case == "missing":
        del volumes["half2"]
    elif case == "two_masks":
        params = {"auto_mask_threshold": 0.1, "mask_diameter_A": 50.0}
    elif case == "big_mask":
        params = {"mask_diameter_A": 200.0}
    else:
        bad = tmp_path / "small_mask.mrc"
        write_mrc(bad, torch.ones((40, 40, 40)).numpy(), PIXEL_A)
        params = {"mask_path": str(bad)}
    project, record = _maps_project(tmp_path, volumes, voxels)
    with project:
        outcome = _postprocess(project, record, **params)
    assert outcome.status == "failed"
    assert message in outcome.message
    if case == "mask_file":
        assert "small_mask.mrc" in outcome.message


def test_relion5_export_writes_the_maps_and_postprocess_star(tmp_path, noisy_halves):
    _, half1, half2, _, _ = noisy_halves
    project, record = _maps_project(tmp_path, {"half1": half1, "half2": half2, "full": 0.5 * (half1 + half2)})
    with project:
        outcome = _postprocess(project, record, mask_diameter_A=MASK_DIAMETER_A)
        assert outcome.status == "finished", outcome.message
        result = project.sets_of_run(outcome.run.id)["maps"].attrs["postprocess"]
        written = export_project(project, "relion5", tmp_path / "relion")
    out = tmp_path / "relion"
    names = {path.relative_to(out).as_posix() for path in written}
    assert names >= {"Refine3D/run_half1_class001_unfil.mrc", "Refine3D/run_half2_class001_unfil.mrc",
                     "Refine3D/run_class001.mrc", "PostProcess/postprocess.mrc", "PostProcess/postprocess_masked.mrc",
                     "PostProcess/postprocess.star"}
    exported, voxel = read_mrc(out / "Refine3D/run_half1_class001_unfil.mrc")
    assert voxel == pytest.approx(PIXEL_A)
    torch.testing.assert_close(torch.from_numpy(exported), half1.float())
    star = read_star(out / "PostProcess/postprocess.star")
    general, table = star["general"].iloc[0], star["fsc"]
    assert general["rlnFinalResolution"] == pytest.approx(result["resolution_A"], rel=1e-5)
    assert general["rlnBfactorUsedForSharpening"] == pytest.approx(result["b_factor_A2"], rel=1e-5)
    assert general["rlnUnfilteredMapHalf1"] == "Refine3D/run_half1_class001_unfil.mrc"
    assert list(table.columns) == [
        "rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]
    assert len(table) == N // 2 + 1
    assert table["rlnAngstromResolution"].iloc[4] == pytest.approx(N * PIXEL_A / 4)
    np.testing.assert_allclose(table["rlnFourierShellCorrelationCorrected"], result["fsc_corrected"], atol=1e-5)
