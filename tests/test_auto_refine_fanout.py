"""The pose searches of auto-refine fanned out over the executor give the in-process results: the same
synthetic particles as tests/test_step_auto_refine.py (two tilt series of an O-symmetric chiral blob volume,
cut by the real extraction, poses randomised), refined in this process, through ``search_map`` in this
process, on a local pool of two spawned workers (``FAN_OUT_ON_LOCAL_POOLS``; by default a local pool keeps
the searches in the step's process) and on a Dask LocalCluster of two workers: the same poses (1e-4 degrees,
1e-4 Å) and the same maps (float32 rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_step_auto_refine import (
    CROP_PX,
    PARAMS,
    _angles,
    _lowpass,
    _reference,
    _with_random_poses,
    blobs_A,  # noqa: F401 (the module's fixture)
)
from test_step_reconstruct_particle import _maps, _subtomograms, _volume
from tomopipe.algorithms.fourier import crop_centered
from tomopipe.algorithms.picking.template import spherical_mask
from tomopipe.algorithms.subtomo.auto_refine import RefineSettings, auto_refine, search_task
from tomopipe.algorithms.symmetry import misorientation_deg
from tomopipe.engine.executors import DaskExecutor, LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.model.subtomograms import ORIGIN_COLUMNS
from tomopipe.steps import auto_refine as step_module
from tomopipe.steps.auto_refine import AutoRefine, HalfLoader, refine_series

pytestmark = pytest.mark.usefixtures("one_thread")  # as in the workers: the same sums in the same order

# global iterations at 7.5° and then a local one at 3.75° (< 4°): both kinds of search go through the workers
FANOUT_PARAMS = {**PARAMS, "initial_angular_step_deg": 7.5, "local_searches_from_deg": 4.0, "max_iterations": 3}
PARTICLES = 8  # per tilt series
MASK_DIAMETER_A = PARAMS["mask_diameter_A"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory, blobs_A):  # noqa: F811
    """A project (open) with two tilt series of 8 particles (randomised poses) and the reference (35 Å)."""
    project, record = _subtomograms(tmp_path_factory.mktemp("fanout"), blobs_A, n_series=2, with_ctf=True,
                                    noise_sd=2.0, particles=PARTICLES, crop_px=CROP_PX)
    truth = crop_centered(_volume(blobs_A), (CROP_PX,) * 3)
    with project:
        yield project, _with_random_poses(project, record), _reference(project, _lowpass(truth, 35.0)), truth


def _refined(project, subtomograms, reference, executor):
    """Refined items, maps and the run's log text of one auto-refine run on ``executor``."""
    outcome = run_on_sets(project, AutoRefine, "auto_refine", FANOUT_PARAMS,
                          {"subtomograms": subtomograms, "reference": reference}, executor)
    assert outcome.status == "finished", outcome.message
    items = project.read_items(project.sets_of_run(outcome.run.id)["subtomograms"].id)
    maps = _maps(project, outcome)
    log_text = project.absolute_path(outcome.run.log_path).read_text()
    iterations = project.sets_of_run(outcome.run.id)["maps"].attrs["iterations"]
    return items, maps, log_text, iterations


def _assert_same(a, b):
    (items_a, maps_a, _, iterations_a), (items_b, maps_b, _, iterations_b) = a, b
    assert len(items_a) == len(items_b) == 2 * PARTICLES
    angle_deg = misorientation_deg(_angles(items_a), _angles(items_b), "C1")
    assert float(angle_deg.max()) < 1e-4
    origins = [items[list(ORIGIN_COLUMNS)].to_numpy() for items in (items_a, items_b)]
    assert float(np.abs(origins[0] - origins[1]).max()) < 1e-4  # Å
    for name in ("half1", "half2", "full"):
        x, y = maps_a[name].numpy(), maps_b[name].numpy()
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * float(np.abs(x).max()), err_msg=name)
    assert [it["resolution_A"] for it in iterations_a] == pytest.approx([it["resolution_A"] for it in iterations_b],
                                                                         rel=1e-6)
    assert [it["angular_step_deg"] for it in iterations_a] == [it["angular_step_deg"] for it in iterations_b]


@pytest.fixture(scope="module")
def in_process(particles):
    project, shuffled, reference, _ = particles
    return _refined(project, shuffled, reference, LocalExecutor(1))


def test_in_process_run_refines_and_searches_both_ways(particles, in_process):
    """The baseline is a real refinement: the poses move from random towards the truth, the searches are
    global and then local, and the searches ran in the step's process."""
    project, shuffled, _, _ = particles
    items, _, log_text, iterations = in_process
    start = project.read_items(shuffled.id)
    moved = misorientation_deg(_angles(items), _angles(start), "O")
    assert float(moved.median()) > 5.0
    assert iterations[0]["angular_step_deg"] == 7.5
    assert iterations[-1]["angular_step_deg"] < 4.0  # local searches in the last iteration
    assert "pose searches on" not in log_text


def test_two_local_workers_give_the_in_process_poses_and_maps(particles, in_process, monkeypatch):
    project, shuffled, reference, _ = particles
    monkeypatch.setattr(step_module, "FAN_OUT_ON_LOCAL_POOLS", True)
    fanned = _refined(project, shuffled, reference, LocalExecutor(2))
    assert "pose searches on local (2 processes)" in fanned[2]
    _assert_same(in_process, fanned)


def test_a_dask_cluster_gives_the_in_process_poses_and_maps(particles, in_process):
    project, shuffled, reference, _ = particles
    dask = DaskExecutor("local", workers=2)
    try:
        fanned = _refined(project, shuffled, reference, dask)
        kept = dask.client.run(lambda: len(__import__("tomopipe.steps.auto_refine", fromlist=["_loaded"])._loaded))
    finally:
        dask.close()
    assert "pose searches on dask" in fanned[2]
    assert 1 <= max(kept.values()) <= step_module.LOADED_HALVES_KEPT  # the workers keep their halves, bounded
    _assert_same(in_process, fanned)


def test_search_map_with_loaders_gives_the_same_poses_in_process(particles):
    """The algorithm with a ``search_map`` in this process and the step's loaders (halves read from the files):
    the poses of the default path; and bad loaders or a short map are clear errors."""
    project, shuffled, reference, truth = particles
    items, attrs, resolve = project.read_items(shuffled.id), shuffled.attrs, project.absolute_path
    groups = [(str(ts), g.to_dict("records")) for ts, g in items.groupby("ts_id", sort=True)]
    pixel_A = float(attrs["extraction"]["pixel_size_A"])
    mask_px = MASK_DIAMETER_A / pixel_A
    mask = spherical_mask(CROP_PX, pixel_A, MASK_DIAMETER_A, 3.0 * pixel_A)
    settings = RefineSettings("O", 60.0, 7.5, 3.75, 4.0, 5.0 * pixel_A, pixel_A, 10.0, 3)
    start = _lowpass(truth, 35.0).float()

    def series():
        return [refine_series(resolve, rows, attrs, ts, mask_px, "cpu") for ts, rows in groups]

    default = auto_refine(series(), start, mask, settings)
    assert [it["angular_step_deg"] for it in default.iterations] == [7.5, 7.5, 3.75]  # global, then local
    loaders = [{h: HalfLoader.of(resolve, [r for r in rows if r["half_set"] == h], attrs, ts, mask_px, "cpu")
                for h in (1, 2)} for ts, rows in groups]
    seen = []

    def search_map(tasks):
        seen.append(len(tasks))
        return [search_task(task) for task in tasks]

    step_module._loaded.clear()
    mapped = auto_refine(series(), start, mask, settings, search_map=search_map, loaders=loaders)
    assert seen == [4] * len(default.iterations)
    assert len(step_module._loaded) == step_module.LOADED_HALVES_KEPT  # bounded: the last halves only
    for a, b in zip(default.series, mapped.series):
        assert torch.equal(a.rotations, b.rotations) and torch.equal(a.shifts_A, b.shifts_A)
    for name, volume in default.maps.items():
        torch.testing.assert_close(mapped.maps[name], volume, rtol=0, atol=1e-5 * float(volume.abs().max()))
    without_loaders = auto_refine(series(), start, mask, settings, search_map=search_map)
    for a, b in zip(default.series, without_loaders.series):
        assert torch.equal(a.rotations, b.rotations) and torch.equal(a.shifts_A, b.shifts_A)
    with pytest.raises(Exception, match="loaders must give"):
        auto_refine(series(), start, mask, settings, search_map=search_map, loaders=loaders[:1])
    with pytest.raises(Exception, match="returned 0 results for 4 tasks"):
        auto_refine(series(), start, mask, settings, search_map=lambda tasks: [])


def test_half_loader_is_cached_per_process_and_bounded(particles):
    project, shuffled, _, _ = particles
    items, resolve = project.read_items(shuffled.id), project.absolute_path
    rows = {ts: g.to_dict("records") for ts, g in items.groupby("ts_id", sort=True)}
    loaders = [HalfLoader.of(resolve, [r for r in rows[ts] if r["half_set"] == h], shuffled.attrs, ts, 28.0, "cpu")
               for ts in sorted(rows) for h in (1, 2)]
    assert len({loader.key for loader in loaders}) == 4
    assert all(str(resolve("x")).rsplit("/", 1)[0] in loader.rows[0]["data_path"] for loader in loaders)
    step_module._loaded.clear()
    first = loaders[0]()
    assert loaders[0]() is first  # kept between iterations
    assert int(first.half.numel()) == PARTICLES // 2 and bool((first.half == loaders[0].rows[0]["half_set"]).all())
    for loader in loaders[1:]:
        loader()
    assert list(step_module._loaded) == [loaders[2].key, loaders[3].key]
    assert loaders[0]() is not first  # evicted, rebuilt from the files
    assert torch.equal(loaders[0]().stacks.crops_ft, first.stacks.crops_ft)


def test_a_local_pool_keeps_the_searches_in_process_by_default(tmp_path, blobs_A):  # noqa: F811
    """A local pool is started per map call (per iteration): the searches stay in the step's process."""
    assert step_module.FAN_OUT_ON_LOCAL_POOLS is False
    project, record = _subtomograms(tmp_path, blobs_A, n_series=2, particles=4, crop_px=CROP_PX)
    truth = crop_centered(_volume(blobs_A), (CROP_PX,) * 3)
    with project:
        outcome = run_on_sets(project, AutoRefine, "auto_refine", {**PARAMS, "max_iterations": 1},
                              {"subtomograms": record, "reference": _reference(project, _lowpass(truth, 35.0))},
                              LocalExecutor(2))
        assert outcome.status == "finished", outcome.message
        assert "pose searches on" not in project.absolute_path(outcome.run.log_path).read_text()
