"""End to end: a real headless Chromium (Debian's ``chromium``, driven by Playwright) against ``tomopipe serve`` on a
small simulated project: the whole tutorial workflow on two tilt series of the tiny preset (``tests/tiny_tutorial.py``).
Every page loads, a CTF is excluded with the keyboard and a subset generated (checked in the database), a pick of the
pick step is removed and one added by clicks on the reconstructed tomogram (checked in the database, to the voxel),
the post-processed map and its FSC show, a run launched from a form finishes. Screenshots of every viewer go to
``tests/artefacts/ui/``.

Skipped, with the reason, only when Chromium or Playwright is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_tutorial import TINY_TOMOGRAM_XYZ_PX, copy_project
from tomopipe.model.particles import XYZ_A, tomogram_frames
from tomopipe.project.store import Project

ARTEFACTS = Path(__file__).resolve().parent / "artefacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    pytest.skip("browser tests need Debian's chromium (apt-get install chromium); not found on PATH",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package "
                                                             "(pip install -e '.[test]')")


@pytest.fixture(scope="module")
def project_dir(tiny_tutorial_project, tmp_path_factory) -> Path:
    """This module's copy of the tiny tutorial's project (the pages write to it)."""
    return copy_project(tiny_tutorial_project, tmp_path_factory.mktemp("ui") / "project")


@pytest.fixture(scope="module")
def server(project_dir):
    """``tomopipe serve --port 0`` in a subprocess; yields its URL."""
    process = subprocess.Popen([sys.executable, "-m", "tomopipe.cli", "serve", "--project", str(project_dir),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, lines = None, []
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"open (http://\S+)", line)
        url = found.group(1) if found else None
    if url is None:
        process.kill()
        pytest.fail("tomopipe serve did not print its URL:\n" + "".join(lines))
    yield url.rstrip("/")
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--use-angle=swiftshader",
                                                                              "--enable-unsafe-swiftshader"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the pages' CSP forbids
    context = browser.new_context(viewport={"width": 1500, "height": 950}, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def _shot(page, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000
    return path


def _sets(project_dir, kind: str):
    with Project.open(project_dir) as project:
        return [(record, project.read_items(record.id)) for record in project.finished_sets(kind)]


def _output(project_dir, run_name: str, set_name: str):
    """The output set ``set_name`` of the run ``run_name`` and its items."""
    with Project.open(project_dir) as project:
        record = project.sets_of_run(project.find_run(run_name).id)[set_name]
        return record, project.read_items(record.id)


def test_project_page_shows_the_graph_and_a_runs_detail(page, server, project_dir):
    page.goto(f"{server}/")
    page.wait_for_selector("g.run-node")
    with Project.open(project_dir) as project:
        n_runs = len(project.runs())
    assert page.locator("g.run-node").count() == n_runs
    # the tutorial's 20 runs make a graph wider than the window: it scrolls in its panel, the page keeps its width
    assert page.evaluate("document.getElementById('graph').getBoundingClientRect().width") > 1500
    assert page.evaluate("document.documentElement.scrollWidth") <= 1500
    page.locator("g.run-node", has_text="motion").first.click()
    page.wait_for_selector("#log")
    assert "motion_ctf" in page.inner_text("#detail")
    assert page.locator("#detail a.view-link").count() == 2  # tilt series and CTF viewers
    _shot(page, "project")


def test_ctf_viewer_excludes_with_the_keyboard_and_generates_a_subset(page, server, project_dir):
    motion_ctf, before = _output(project_dir, "motion", "ctf")
    page.goto(f"{server}/static/ctf.html?set={motion_ctf.id}")
    page.wait_for_selector("#table tr[data-tilt]")
    page.wait_for_function("document.getElementById('spectrum').complete && "
                           "document.getElementById('spectrum').naturalWidth > 0")
    page.wait_for_selector("#rings polyline.ring")  # the fitted CTF's zeros over the spectrum
    assert page.input_value("#ts") == "TS_01"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Space")          # view 2
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Space")          # view 4
    assert page.locator("#table tr.marked").count() == 2
    page.wait_for_selector("#rings polyline.ring")
    page.wait_for_function("document.getElementById('spectrum').complete")
    _shot(page, "ctf-viewer")
    page.click("#subset")
    page.wait_for_selector("#new-set", timeout=60_000)
    newest, items = _sets(project_dir, "ctf")[-1]
    assert newest.parent_set_id == motion_ctf.id and len(items) == len(before)
    excluded = items.loc[~items["enabled"], ["ts_id", "tilt_index"]].to_numpy().tolist()
    assert excluded == [["TS_01", 1], ["TS_01", 3]]
    page.click("#new-set")
    page.wait_for_selector("#table tr.excluded")
    assert page.locator("#table tr.excluded").count() == 2


def test_tilt_series_viewer_steps_with_the_keyboard(page, server, project_dir):
    record, _ = _output(project_dir, "motion", "tilt_series")
    page.goto(f"{server}/static/tilt.html?set={record.id}")
    page.wait_for_function("document.getElementById('view').naturalWidth > 0")
    first = page.inner_text("#info")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"!document.getElementById('info').innerText.startsWith({first[:12]!r})")
    assert "view 2/" in page.inner_text("#info")
    page.keyboard.press("Space")
    assert page.inner_text("#state") == "to exclude"
    page.wait_for_function("document.getElementById('view').complete")
    _shot(page, "tilt-series-viewer")


def _free_spot_px(picks_xyz_px: np.ndarray, size_xy_px, margin_px: int = 12) -> np.ndarray:
    """The ``(x, y)`` voxel farthest (in x, y) from every pick, at least ``margin_px`` from the edges."""
    x, y = np.meshgrid(np.arange(margin_px, size_xy_px[0] - margin_px), np.arange(margin_px, size_xy_px[1] - margin_px))
    spots = np.stack([x.ravel(), y.ravel()], axis=1)
    distance = np.linalg.norm(spots[:, None, :] - picks_xyz_px[None, :, :2], axis=2).min(axis=1)
    return spots[np.argmax(distance)]


def test_tomogram_viewer_removes_and_adds_a_pick(page, server, project_dir):
    """On the pick step's picks over the reconstructed tomogram TS_01 (the page opens its central section): a click on a
    pick's centre removes it, a click on the centre of a voxel where nothing was picked adds a pick exactly there."""
    tomograms, tomogram_items = _output(project_dir, "reconstruct", "tomograms")
    picks_set, picks = _output(project_dir, "pick", "particles")
    nx, ny, nz = TINY_TOMOGRAM_XYZ_PX
    z_page = nz // 2
    frame = tomogram_frames(tomogram_items)["TS_01"]
    mine = np.flatnonzero(picks["ts_id"].to_numpy() == "TS_01")
    xyz_px = frame.to_voxels(picks.loc[mine, list(XYZ_A)].to_numpy(float))
    radius_px = round(60 / frame.voxel_size_A)  # the page's pick radius (apoferritin's)
    shown = np.flatnonzero(np.abs(xyz_px[:, 2] - z_page) <= radius_px)
    assert len(shown) >= 5  # the section shows picks to click
    # remove the shown pick farthest from the others (a click on it hits no other)
    separation = [np.delete(np.linalg.norm(xyz_px[:, :2] - xyz_px[i, :2], axis=1), i).min() for i in shown]
    remove = shown[int(np.argmax(separation))]
    assert max(separation) > radius_px
    add_x, add_y = _free_spot_px(xyz_px, (nx, ny))

    page.goto(f"{server}/static/tomogram.html?set={tomograms.id}")
    page.wait_for_function(f"document.getElementById('view').dataset.loadedZ === '{z_page}'")
    assert page.input_value("#picks") == str(picks_set.id)
    timings_ms = page.evaluate("""async ([setId, nz]) => {
        const times = [];
        for (let z = 0; z < nz; z += 2) {
            const started = performance.now();
            const response = await fetch(`/api/tomograms/${setId}/slice?ts=TS_01&axis=z&index=${z}&max_px=768`);
            await response.blob();
            times.push(performance.now() - started);
        }
        return times;
    }""", [tomograms.id, nz])
    median_ms = float(np.median(timings_ms))
    print(f"\nbrowser fetch of a {nx}x{ny} slice of the {tomograms.n_items}-tomogram set over HTTP: "
          f"median {median_ms:.1f} ms, max {max(timings_ms):.1f} ms ({len(timings_ms)} slices)")
    assert median_ms <= 100.0
    page.select_option("#zoom", "3")
    canvas = page.locator("#view")
    assert page.evaluate("document.getElementById('view').width") == 3 * nx  # not binned: a voxel is 3 canvas pixels
    # the centre of voxel (x, y) is 3 (x + 0.5) canvas pixels from the canvas's content edge
    canvas.click(position={"x": 3 * (xyz_px[remove, 0] + 0.5), "y": 3 * (xyz_px[remove, 1] + 0.5)})
    canvas.click(position={"x": 3 * (add_x + 0.5), "y": 3 * (add_y + 0.5)})
    assert "1 to add · 1 to remove" in page.inner_text("#pending")
    _shot(page, "tomogram-viewer")
    page.click("#save")
    page.wait_for_selector("#result.ok", timeout=60_000)
    record, items = _sets(project_dir, "particles")[-1]
    assert record.parent_set_id == picks_set.id and len(items) == len(picks) + 1
    assert np.flatnonzero(~items["enabled"].to_numpy()).tolist() == [int(mine[remove])]
    added = items.iloc[-1]
    assert added["ts_id"] == "TS_01"
    # to a sixth of a voxel: Chromium places the click on a whole CSS pixel, a third of a voxel at zoom 3
    np.testing.assert_allclose(frame.to_voxels(added[list(XYZ_A)].to_numpy(float)), [add_x, add_y, z_page], atol=0.2)


def test_map_viewer_shows_slices_iso_surface_and_fsc(page, server, project_dir):
    maps, items = _output(project_dir, "postprocess", "maps")
    page.goto(f"{server}/static/map.html?set={maps.id}")
    for axis in "zyx":
        page.wait_for_function(f"document.getElementById('slice-{axis}').naturalWidth > 0")
    assert page.input_value("#map") == "sharpened"  # the post-processed map, not a half map
    page.wait_for_selector("#fsc polyline")
    resolution_A = maps.attrs["postprocess"]["resolution_A"]
    assert f"resolution (FSC 0.143): {resolution_A:.2f} Å" in page.inner_text("#resolution")
    page.wait_for_function("document.getElementById('iso').dataset.rendered === '1' || "
                           "document.getElementById('gl-status').innerText.includes('WebGL')", timeout=30_000)
    volume = page.request.get(f"{server}/api/maps/{maps.id}/volume?map=sharpened&max_px=64")
    assert page.input_value("#level") == volume.headers["x-iso-level"]  # the map's own first level, not a fixed one
    _shot(page, "map-viewer")


def test_a_run_launched_from_a_form_finishes(page, server, project_dir):
    page.goto(f"{server}/static/run.html?step=exclude_views")
    page.wait_for_selector("#param-dark_view_fraction")
    page.fill("#param-dark_view_fraction", "2")
    page.click("#launch")
    page.wait_for_selector("#error-dark_view_fraction:not(:empty)")
    assert "maximum" in page.inner_text("#error-dark_view_fraction")
    _shot(page, "run-form-error")
    page.fill("#param-dark_view_fraction", "0.3")
    page.fill("#run-name", "by_form")
    page.fill("#param-exclude_tilts", "TS_01:5")
    page.click("#launch")
    page.wait_for_selector("#status[data-state]", timeout=60_000)
    assert page.get_attribute("#status", "data-state") == "finished", page.inner_text("#status")
    with Project.open(project_dir) as project:
        run = project.find_run("by_form")
        assert run.status == "finished" and run.params["exclude_tilts"] == "TS_01:5"
        ctf = project.read_items(project.sets_of_run(run.id)["ctf"].id)
    assert ctf.loc[(ctf["ts_id"] == "TS_01") & (ctf["tilt_index"] == 4), "enabled"].tolist() == [False]
    assert ctf.loc[ctf["ts_id"] == "TS_02", "enabled"].all()
    _shot(page, "run-form")
    page.goto(f"{server}/")
    page.wait_for_selector("g.run-node >> text=by_form")
    page.goto(f"{server}/static/run.html?from={run.id}")  # re-run with changes: the form starts from the run
    page.wait_for_selector("#param-exclude_tilts")
    assert page.input_value("#param-exclude_tilts") == "TS_01:5" and page.input_value("#run-name") == "by_form"
