"""End to end: a real headless Chromium (Debian's ``chromium``, driven by Playwright) against
``tomopipe serve`` on a small simulated project (the tiny preset through import and motion + CTF,
plus a tomogram with picks and a map): every page loads, a CTF is excluded with the keyboard and a
subset generated (checked in the database), a pick is added and one removed, a run launched from
a form finishes. Screenshots of every viewer go to ``tests/artefacts/ui/``.

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

from tomopipe.project.store import Project

ARTEFACTS = Path(__file__).resolve().parent / "artefacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None:
    pytest.skip("browser tests need Debian's chromium (apt-get install chromium); not found on PATH",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package "
                                                             "(pip install -e '.[test]')")

from test_serve_api import PARTICLES_XYZ_PX, add_tomogram_picks_and_map  # noqa: E402


def _simulated_project(folder: Path) -> Path:
    """The tiny preset simulated and run through import + motion/CTF (real tilt series, CTF fits and
    spectra), then a tomogram with picks and a post-processed map added by hand."""
    from tomopipe.demo import run_demo

    code = run_demo(folder, preset="tiny", until="motion", overrides=["motion.ctf_window_px=128"])
    assert code == 0
    with Project.open(folder / "project") as project:
        motion = project.find_run("motion")
        tilt_series = project.sets_of_run(motion.id)["tilt_series"]
        add_tomogram_picks_and_map(project, {"tilt_series": tilt_series.id})
    return folder / "project"


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory) -> Path:
    """A copy of the simulated project for this module (pytest-xdist workers build it once, under a
    lock in their common temporary folder, and each writes to its own copy)."""
    import fcntl

    session_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders share this session's parent
        session_root = session_root.parent
    shared = session_root / "serve_browser_project"
    with open(str(shared) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            _simulated_project(shared)
            (shared / "done").write_text("ok")
    copy = tmp_path_factory.mktemp("ui") / "project"
    shutil.copytree(shared / "project", copy)
    return copy


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


def test_project_page_shows_the_graph_and_a_runs_detail(page, server, project_dir):
    page.goto(f"{server}/")
    page.wait_for_selector("g.run-node")
    with Project.open(project_dir) as project:
        n_runs = len(project.runs())
    assert page.locator("g.run-node").count() == n_runs
    page.locator("g.run-node", has_text="motion").first.click()
    page.wait_for_selector("#log")
    assert "motion_ctf" in page.inner_text("#detail")
    assert page.locator("#detail a.view-link").count() == 2  # tilt series and CTF viewers
    _shot(page, "project")


def test_ctf_viewer_excludes_with_the_keyboard_and_generates_a_subset(page, server, project_dir):
    (motion_ctf, before), = [(r, items) for r, items in _sets(project_dir, "ctf")
                             if Project.open(project_dir).get_run(r.run_id).name == "motion"]
    page.goto(f"{server}/static/ctf.html?set={motion_ctf.id}")
    page.wait_for_selector("#table tr[data-tilt]")
    page.wait_for_function("document.getElementById('spectrum').complete && "
                           "document.getElementById('spectrum').naturalWidth > 0")
    page.wait_for_selector("#rings polyline.ring")  # the fitted CTF's zeros over the spectrum
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
    excluded = sorted(items.loc[~items["enabled"], "tilt_index"].tolist())
    assert excluded == [1, 3]
    page.click("#new-set")
    page.wait_for_selector("#table tr.excluded")
    assert page.locator("#table tr.excluded").count() == 2


def test_tilt_series_viewer_steps_with_the_keyboard(page, server, project_dir):
    (record, items), = [(r, i) for r, i in _sets(project_dir, "tilt_series")
                        if Project.open(project_dir).get_run(r.run_id).name == "motion"]
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


def test_tomogram_viewer_adds_and_removes_a_pick(page, server, project_dir):
    (tomograms, _), = _sets(project_dir, "tomograms")
    before = _sets(project_dir, "particles")
    page.goto(f"{server}/static/tomogram.html?set={tomograms.id}")
    page.wait_for_function("document.getElementById('view').dataset.loadedZ === '64'")
    timings_ms = page.evaluate("""async (setId) => {
        const times = [];
        for (let z = 0; z < 128; z += 8) {
            const started = performance.now();
            const response = await fetch(`/api/tomograms/${setId}/slice?ts=TS_01&axis=z&index=${z}&max_px=768`);
            await response.blob();
            times.push(performance.now() - started);
        }
        return times;
    }""", tomograms.id)
    median_ms = float(np.median(timings_ms))
    print(f"\nbrowser fetch of a 192x144 slice of the {tomograms.n_items}-tomogram set over HTTP: "
          f"median {median_ms:.1f} ms, max {max(timings_ms):.1f} ms ({len(timings_ms)} slices)")
    assert median_ms <= 100.0
    page.select_option("#zoom", "3")
    canvas = page.locator("#view")
    assert page.evaluate("document.getElementById('view').width") == 3 * 192  # 192 x 144 voxels, not binned
    # remove the pick at (40, 40, 64) voxels, add one at (100, 60, 64); a canvas pixel is a third of a voxel
    canvas.click(position={"x": 40.5 * 3, "y": 40.5 * 3})
    canvas.click(position={"x": 100.5 * 3, "y": 60.5 * 3})
    assert "1 to add · 1 to remove" in page.inner_text("#pending")
    _shot(page, "tomogram-viewer")
    page.click("#save")
    page.wait_for_selector("#result.ok", timeout=60_000)
    after = _sets(project_dir, "particles")
    assert len(after) == len(before) + 1
    record, items = after[-1]
    assert items["enabled"].tolist() == [False, True, True, True, True]
    with Project.open(project_dir) as project:
        tomogram = project.read_items(tomograms.id)
    from tomopipe.model.particles import tomogram_frames

    added_px = tomogram_frames(tomogram)["TS_01"].to_voxels(items.loc[4, ["x_A", "y_A", "z_A"]].to_numpy(float))
    np.testing.assert_allclose(added_px, [100.0, 60.0, 64.0], atol=1.0)
    assert np.allclose(PARTICLES_XYZ_PX[0], [40, 40, 64])


def test_map_viewer_shows_slices_iso_surface_and_fsc(page, server, project_dir):
    (maps, _), = _sets(project_dir, "maps")
    page.goto(f"{server}/static/map.html?set={maps.id}")
    for axis in "zyx":
        page.wait_for_function(f"document.getElementById('slice-{axis}').naturalWidth > 0")
    page.wait_for_selector("#fsc polyline")
    assert "resolution (FSC 0.143)" in page.inner_text("#resolution")
    page.wait_for_function("document.getElementById('iso').dataset.rendered === '1' || "
                           "document.getElementById('gl-status').innerText.includes('WebGL')", timeout=30_000)
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
    assert ctf.loc[ctf["tilt_index"] == 4, "enabled"].tolist() == [False]
    _shot(page, "run-form")
    page.goto(f"{server}/")
    page.wait_for_selector("g.run-node >> text=by_form")
    page.goto(f"{server}/static/run.html?from={run.id}")  # re-run with changes: the form starts from the run
    page.wait_for_selector("#param-exclude_tilts")
    assert page.input_value("#param-exclude_tilts") == "TS_01:5" and page.input_value("#run-name") == "by_form"
