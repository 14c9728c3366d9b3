"""``tomopipe serve``'s HTTP API through Starlette's TestClient, on a real project: the whole tutorial workflow on two
simulated tilt series of the tiny preset (``tests/tiny_tutorial.py``). Every endpoint answers what the project holds
(the motion sums, the CTF fits and their spectra, the reconstructed tomograms, the picks of the pick step, the
post-processed map and its FSC), the CTF subset and the pick edits are new runs in the database (nothing deleted), a
run launched from a form finishes, and the security rules refuse what they should (no token off localhost,
cross-origin writes, DNS-rebinding Host names, path traversal)."""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tiny_tutorial import TINY_N_TILTS, TINY_TOMOGRAM_VOXEL_A, TINY_TOMOGRAM_XYZ_PX, copy_project
from tomopipe.errors import TomopipeError
from tomopipe.model.particles import XYZ_A, tomogram_frames
from tomopipe.project.store import Project

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette 1.x would rather have httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from tomopipe.serve.app import create_app  # noqa: E402
from tomopipe.serve.security import host_name, is_loopback  # noqa: E402

ORIGIN = "http://127.0.0.1:8765"
#: the run that :func:`add_interpolated_alignment` adds to the tutorial's runs
ALIGNED_RUN = "align_interpolated"


def add_interpolated_alignment(project: Project) -> None:
    """The workflow's alignment run again, with ``interpolated_stack`` on (the tiny tutorial turns it off): a real
    aligned stack for the tilt-series viewer's "aligned" switch, which the workflow's project does not have."""
    from tomopipe.engine.executors import LocalExecutor
    from tomopipe.engine.runner import run_on_sets
    from tomopipe.steps.align import AlignTiltSeries

    align = project.find_run("align")
    inputs = {port: project.get_set(set_id) for role, port, set_id in project.provenance(align.id) if role == "input"}
    outcome = run_on_sets(project, AlignTiltSeries, ALIGNED_RUN, {**align.params, "interpolated_stack": True}, inputs,
                          LocalExecutor(1))
    assert outcome.status == "finished", outcome.message


@pytest.fixture(scope="module")
def project_dir(tiny_tutorial_project, tmp_path_factory) -> Path:
    """This module's copy of the tiny tutorial's project, with :func:`add_interpolated_alignment`."""
    folder = copy_project(tiny_tutorial_project, tmp_path_factory.mktemp("serve") / "project")
    with Project.open(folder) as project:
        add_interpolated_alignment(project)
    return folder


@pytest.fixture(scope="module")
def client(project_dir):
    app = create_app(project_dir)
    with TestClient(app, base_url=ORIGIN, client=("127.0.0.1", 50000)) as test_client:
        yield test_client


def _set_id(client, kind: str, run_name: str | None = None) -> int:
    sets = client.get(f"/api/sets?kind={kind}").json()["sets"]
    return next(s["set_id"] for s in sets if run_name is None or s["run_name"] == run_name)


def _post(client, url: str, body: dict, **headers):
    return client.post(url, json=body, headers={"Origin": ORIGIN, **headers})


def _db_items(project_dir, set_id):
    with Project.open(project_dir) as project:
        return project.read_items(set_id), project.get_set(set_id)


def _png(response) -> np.ndarray:
    import imagecodecs

    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text[:200]
    return imagecodecs.png_decode(response.content)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(float), np.ravel(b).astype(float))[0, 1])


def _ring_mean(image: np.ndarray, centre_xy, r_min: float, r_max: float) -> float:
    """Mean of an ``[y, x]`` image between two radii (pixels) around ``centre_xy``."""
    y, x = np.indices(image.shape)
    r = np.hypot(x - centre_xy[0], y - centre_xy[1])
    return float(image[(r >= r_min) & (r < r_max)].mean())


# ----------------------------------------------------------------------------- read endpoints
def test_project_overview_lists_runs_with_their_provenance(client):
    from tomopipe.demo import tutorial_workflow_path
    from tomopipe.engine.workflow import load_workflow

    data = client.get("/api/project").json()
    assert [run["name"] for run in data["runs"]] == [*load_workflow(tutorial_workflow_path()).step_names(),
                                                     ALIGNED_RUN]
    assert all(run["status"] == "finished" for run in data["runs"])
    ids = {run["name"]: run["id"] for run in data["runs"]}
    assert [ids["reconstruct"], ids["pick"]] in data["edges"]  # pick read the tomograms
    assert [ids["refine_bin2"], ids["postprocess"]] in data["edges"]
    assert [ids["preprocess"], ids[ALIGNED_RUN]] in data["edges"]
    motion = next(run for run in data["runs"] if run["name"] == "motion")
    assert {o["kind"] for o in motion["outputs"]} == {"tilt_series", "ctf"}


def test_run_detail_log_and_step_schema(client, project_dir):
    with Project.open(project_dir) as project:
        motion = project.find_run("motion")
        log = project.absolute_path(motion.log_path).read_bytes()
    detail = client.get(f"/api/runs/{motion.id}").json()
    assert detail["name"] == "motion" and detail["step_type"] == "motion_ctf"
    assert detail["params"]["ctf_window_px"] == 128  # the tiny tutorial's override
    assert len(log) > 200 and client.get(f"/api/runs/{motion.id}/log").text == log.decode()
    assert client.get(f"/api/runs/{motion.id}/log?tail_bytes=40").text == log[-40:].decode(errors="replace")
    assert client.get("/api/runs/999").status_code == 404
    steps = {s["type"] for s in client.get("/api/steps").json()["steps"]}
    assert {"exclude_views", "reconstruct_tomogram", "postprocess"} <= steps
    schema = client.get("/api/steps/exclude_views").json()
    params = {p["name"]: p for p in schema["params"]}
    assert params["max_astigmatism_A"]["unit"] == "Å" and params["dark_view_fraction"]["max"] == 1
    ctf_port = next(port for port in schema["inputs"] if port["name"] == "ctf")
    assert ctf_port["candidates"] and ctf_port["optional"]
    assert client.get("/api/steps/no_such_step").status_code == 404


def test_tilt_series_views_raw_and_aligned(client, project_dir):
    ts_set = _set_id(client, "tilt_series", "motion")
    answer = client.get(f"/api/tilt-series/{ts_set}").json()
    assert sorted(answer["series"]) == ["TS_01", "TS_02"] and not answer["has_aligned_images"]
    series = answer["series"]["TS_01"]
    angles = [v["tilt_angle_deg"] for v in series]
    assert len(series) == TINY_N_TILTS and all(v["enabled"] for v in series)
    assert angles == sorted(angles) and angles[0] == pytest.approx(-12.0, abs=0.1)
    small = client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3&max_px=48")
    assert small.headers["x-downsample"] == "6" and _png(small).shape == (42, 42)  # the 256² px sum binned by 6
    assert _png(client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3")).shape == (256, 256)
    assert client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=30").status_code == 404
    assert client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3&aligned=1").status_code == 404

    from tomopipe.io.mrc import read_mrc
    from tomopipe.serve.images import block_mean

    aligned_set = _set_id(client, "tilt_series", ALIGNED_RUN)
    assert client.get(f"/api/tilt-series/{aligned_set}").json()["has_aligned_images"]
    view = _png(client.get(f"/api/tilt-series/{aligned_set}/image?ts=TS_01&tilt=2&aligned=1&max_px=64"))
    items, _ = _db_items(project_dir, aligned_set)
    row = items[(items["ts_id"] == "TS_01") & (items["tilt_index"] == 2)].iloc[0]
    with Project.open(project_dir) as project:
        aligned = read_mrc(project.absolute_path(row["aligned_image_path"]))[0][row["aligned_image_section"]]
        raw = read_mrc(project.absolute_path(row["image_path"]))[0][row["image_section"]]
    assert view.shape == (64, 64)  # 128² px at bin 2, binned by 2
    # the aligned view (rotated by the ~86° tilt axis), not the raw one
    assert _corr(view, block_mean(aligned, 2)) > 0.95 and abs(_corr(view, block_mean(raw, 2))) < 0.3


def test_ctf_table_spectra_and_the_fits_zero_rings(client, project_dir):
    ctf_set = _set_id(client, "ctf", "motion")
    items, _ = _db_items(project_dir, ctf_set)
    answer = client.get(f"/api/ctf/{ctf_set}").json()["series"]
    assert sorted(answer) == ["TS_01", "TS_02"] and len(answer["TS_01"]) == TINY_N_TILTS
    for ts_id, rows in answer.items():
        fits = items[items["ts_id"] == ts_id].sort_values("tilt_index")
        np.testing.assert_allclose([r["defocus_mean_A"] for r in rows],
                                   (fits["defocus_u_A"] + fits["defocus_v_A"]) / 2, rtol=1e-6)
        np.testing.assert_allclose([r["astigmatism_A"] for r in rows],
                                   (fits["defocus_u_A"] - fits["defocus_v_A"]).abs(), rtol=1e-6)
        assert all(10_000 < r["defocus_mean_A"] < 40_000 and r["has_spectrum"] for r in rows)
    spectrum = _png(client.get(f"/api/ctf/{ctf_set}/spectrum?ts=TS_01&tilt=2"))
    assert spectrum.shape == (128, 128)  # the fit's window (motion.ctf_window_px)
    assert client.get(f"/api/ctf/{ctf_set}/spectrum?ts=TS_09&tilt=2").status_code == 404
    rings = client.get(f"/api/ctf/{ctf_set}/rings?ts=TS_01&tilt=2").json()
    assert rings["size_px"] == 128 and len(rings["rings"]) >= 3
    # the first zero lies at k² ∝ 1 / defocus: its ellipse's axes are in the ratio √(U / V) of the fit
    fit = answer["TS_01"][2]
    radius = np.hypot(*(np.array(rings["rings"][0]) - 64).T)
    assert radius.max() / radius.min() - 1 == pytest.approx(np.sqrt(fit["defocus_u_A"] / fit["defocus_v_A"]) - 1,
                                                            rel=0.1)
    ts_set = _set_id(client, "tilt_series", "motion")
    assert client.get(f"/api/ctf/{ts_set}").status_code == 400  # a tilt-series set is not a CTF set


def test_the_post_processed_map_its_sections_volume_and_fsc(client):
    maps_set = _set_id(client, "maps", "postprocess")
    maps = client.get(f"/api/maps/{maps_set}").json()
    assert [m["map_name"] for m in maps["maps"]] == ["half1", "half2", "full", "sharpened", "masked", "mask"]
    box_px, voxel_A = maps["maps"][0]["box_px"], maps["maps"][0]["voxel_size_A"]
    assert (box_px, voxel_A) == (24, TINY_TOMOGRAM_VOXEL_A)  # the tiny tutorial's crop at bin 2
    fsc = maps["fsc"]
    assert {"fsc_masked", "fsc_corrected"} <= set(fsc["curves"])
    assert len(fsc["curves"]["fsc_corrected"]) == len(fsc["frequency_per_A"]) == box_px // 2 + 1
    assert fsc["curves"]["fsc_corrected"][1] > 0.9  # the two halves agree at low resolution
    assert 2 * voxel_A <= fsc["resolution_A"] < 40.0
    for axis in "zyx":
        assert _png(client.get(f"/api/maps/{maps_set}/slice?map=sharpened&axis={axis}")).shape == (box_px, box_px)
    volume = client.get(f"/api/maps/{maps_set}/volume?map=sharpened&max_px=12")
    shape = tuple(map(int, volume.headers["x-shape"].split(",")))
    assert shape == (12, 12, 12) and volume.headers["x-downsample"] == "2" and len(volume.content) == 12 ** 3
    full = client.get(f"/api/maps/{maps_set}/volume?map=sharpened&max_px=64")
    block = np.frombuffer(full.content, np.uint8).reshape((box_px,) * 3).astype(float)
    # apoferritin: a hollow shell of ~40-62 Å radius (6-10 voxels of 6.32 Å), bright, around a dark inside
    r = np.sqrt(((np.indices(block.shape) - box_px // 2) ** 2).sum(axis=0))
    inside, shell = block[r < 3].mean(), block[(r >= 6.5) & (r < 8.5)].mean()
    assert shell > inside + 100, (inside, shell)
    # the first iso level wraps that shell, not the sharpened map's ringing beyond it (r > 10 voxels)
    enclosed = block >= int(full.headers["x-iso-level"])
    assert enclosed.mean() == pytest.approx(0.1, abs=0.03) and (r[enclosed] <= 10).mean() > 0.9
    assert client.get(f"/api/maps/{maps_set}/slice?map=nope").status_code == 404


def test_tomogram_slice_is_binned_fast_and_picks_come_in_voxels(client, project_dir, capsys):
    tomo_set = _set_id(client, "tomograms")
    info = client.get(f"/api/tomograms/{tomo_set}").json()
    assert [t["ts_id"] for t in info["tomograms"]] == ["TS_01", "TS_02"]
    assert all(t["size_xyz_px"] == list(TINY_TOMOGRAM_XYZ_PX) for t in info["tomograms"])
    assert info["particle_sets"][0]["run_name"] == "pick"
    picks_set = info["particle_sets"][0]["set_id"]
    picks = client.get(f"/api/particles/{picks_set}?ts=TS_01").json()["picks"]
    stored, _ = _db_items(project_dir, picks_set)
    frame = tomogram_frames(_db_items(project_dir, tomo_set)[0])["TS_01"]
    expected_px = frame.to_voxels(stored.loc[stored["ts_id"] == "TS_01", list(XYZ_A)].to_numpy(float))
    assert len(picks) == len(expected_px) >= 10
    np.testing.assert_allclose([p["xyz_px"] for p in picks], expected_px, atol=1e-6)

    nx, ny, nz = TINY_TOMOGRAM_XYZ_PX
    client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index={nz // 2}")  # first touch maps the file
    timings_ms = []
    for index in range(0, nz, 2):
        started = time.perf_counter()
        response = client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index={index}&max_px=768")
        timings_ms.append((time.perf_counter() - started) * 1e3)
        assert response.status_code == 200
    median_ms = float(np.median(timings_ms))
    with capsys.disabled():
        print(f"\ntomogram slice {nx}x{ny} px (of {TINY_TOMOGRAM_XYZ_PX}): "
              f"median {median_ms:.1f} ms, max {max(timings_ms):.1f} ms over {len(timings_ms)} requests")
    assert median_ms <= 100.0

    small = _png(client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index={nz // 2}&max_px=64"))
    assert small.shape == (ny // 2, nx // 2)
    # each pick sits on a particle: in the section through its centre, the protein shell (~40-62 Å, 6-10 voxels)
    # is darker than the section (cryo-ET contrast), the binned PNG's rows and columns are the tomogram's y and x
    contrast = []
    for pick in picks:
        x, y, z = pick["xyz_px"]
        if not 8 <= z <= nz - 8:
            continue
        section = _png(client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index={round(z)}")).astype(float)
        contrast.append(section.mean() - _ring_mean(section, (x, y), 6.0, 8.5))
    assert len(contrast) >= 5 and np.median(contrast) > 30.0, contrast
    assert client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index=500").status_code == 400


# ----------------------------------------------------------------------------- writes
def test_ctf_subset_is_a_new_set_in_the_database(client, project_dir):
    ctf_set = _set_id(client, "ctf", "motion")
    answer = _post(client, f"/api/ctf/{ctf_set}/subset", {"exclude": {"TS_01": [2, 4]}, "name": "exclude"})
    assert answer.status_code == 201, answer.text
    new_ctf = answer.json()["outputs"]["ctf"]["set_id"]
    items, record = _db_items(project_dir, new_ctf)
    assert record.parent_set_id == ctf_set and record.kind == "ctf"
    assert items.loc[~items["enabled"], "tilt_index"].tolist() == [1, 3]
    original, _ = _db_items(project_dir, ctf_set)
    assert original["enabled"].all() and len(original) == len(items) == 2 * TINY_N_TILTS  # nothing deleted or changed
    assert items.loc[~items["enabled"], "ts_id"].tolist() == ["TS_01", "TS_01"]
    tilt_series = answer.json()["outputs"]["tilt_series"]["set_id"]
    assert (~_db_items(project_dir, tilt_series)[0]["enabled"]).sum() == 2
    bad = _post(client, f"/api/ctf/{ctf_set}/subset", {"exclude": {"TS_01": [99]}})
    assert bad.status_code == 400 and f"views 1..{TINY_N_TILTS}" in bad.json()["error"]


def test_picks_add_and_remove_make_new_coordinate_sets(client, project_dir):
    tomo_set = _set_id(client, "tomograms")
    picks_set = client.get(f"/api/tomograms/{tomo_set}").json()["particle_sets"][0]["set_id"]
    picked, _ = _db_items(project_dir, picks_set)
    added = _post(client, "/api/picks", {"source_set_id": picks_set, "ts_id": "TS_01",
                                         "add_px": [[100.0, 50.0, 16.0]], "remove_index": [1]})
    assert added.status_code == 201, added.text
    new_set = added.json()["outputs"]["particles"]["set_id"]
    items, record = _db_items(project_dir, new_set)
    assert len(items) == len(picked) + 1 and np.flatnonzero(~items["enabled"].to_numpy()).tolist() == [1]
    kept_A = items.loc[:len(picked) - 1, list(XYZ_A)].to_numpy()
    np.testing.assert_allclose(kept_A, picked[list(XYZ_A)].to_numpy())  # the picks are kept, none moved
    frame = tomogram_frames(_db_items(project_dir, tomo_set)[0])["TS_01"]
    assert items.loc[len(picked), "ts_id"] == "TS_01"
    np.testing.assert_allclose(frame.to_voxels(items.loc[len(picked), list(XYZ_A)].to_numpy(float)),
                               [100.0, 50.0, 16.0], atol=1e-3)
    assert record.parent_set_id == picks_set
    listed = client.get(f"/api/tomograms/{tomo_set}").json()["particle_sets"]
    assert listed[0]["set_id"] == new_set  # the viewer finds the new set on the same tomograms
    outside = _post(client, "/api/picks", {"source_set_id": new_set, "ts_id": "TS_01", "add_px": [[500, 0, 0]]})
    assert outside.status_code == 400 and "outside" in outside.json()["error"]
    assert _post(client, "/api/picks", {"source_set_id": new_set}).status_code == 400


@pytest.mark.parametrize("url", ["/api/runs", "/api/ctf/{ctf}/subset", "/api/picks"])
def test_run_names_cannot_leave_the_runs_folder(client, project_dir, url):
    ctf_set = _set_id(client, "ctf", "motion")
    body = {"step_type": "exclude_views", "inputs": {"ctf": ctf_set}, "exclude": {"TS_01": [1]},
            "source_set_id": _set_id(client, "tomograms"), "ts_id": "TS_01", "add_px": [[10, 10, 10]],
            "name": "../../escape"}
    answer = _post(client, url.format(ctf=ctf_set), body)
    assert answer.status_code == 422 and "run name" in answer.json()["error"]
    assert not (project_dir.parent / "escape").exists() and not (project_dir / "runs" / "escape").exists()


def test_launch_a_run_from_a_form_and_see_it_finish(client, project_dir):
    ctf_set = _set_id(client, "ctf", "motion")
    invalid = _post(client, "/api/runs", {"step_type": "exclude_views", "name": "rule",
                                          "params": {"max_astigmatism_A": "lots", "dark_view_fraction": "2"},
                                          "inputs": {"ctf": ctf_set}})
    assert invalid.status_code == 422
    errors = invalid.json()["errors"]
    assert set(errors) == {"max_astigmatism_A", "dark_view_fraction"} and "maximum" in errors["dark_view_fraction"]
    missing = _post(client, "/api/runs", {"step_type": "reconstruct_tomogram", "params": {}, "inputs": {}})
    assert missing.status_code == 422 and "tilt_series" in missing.json()["errors"]

    # a threshold between the two tilt series' fitted astigmatisms: the rule excludes the views above it
    fits, _ = _db_items(project_dir, ctf_set)
    astigmatism_A = (fits["defocus_u_A"] - fits["defocus_v_A"]).abs()
    threshold_A = round(float(astigmatism_A.min() + astigmatism_A.max()) / 2, 1)
    expected = fits.loc[astigmatism_A > threshold_A, ["ts_id", "tilt_index"]].to_numpy().tolist()
    assert 0 < len(expected) < len(fits)
    answer = _post(client, "/api/runs", {"step_type": "exclude_views", "name": "rule",
                                         "params": {"max_astigmatism_A": str(threshold_A), "exclude_tilts": ""},
                                         "inputs": {"ctf": ctf_set}})
    assert answer.status_code == 202, answer.text
    job = answer.json()["job"]
    for _ in range(200):
        job = client.get(f"/api/jobs/{job['id']}").json()
        if job["status"] in ("finished", "failed"):
            break
        time.sleep(0.05)
    assert job["status"] == "finished", job
    run = client.get(f"/api/runs/{job['run_id']}").json()
    assert run["status"] == "finished" and run["params"]["max_astigmatism_A"] == threshold_A
    ctf_out = next(o["set_id"] for o in run["outputs"] if o["kind"] == "ctf")
    excluded = _db_items(project_dir, ctf_out)[0].loc[lambda t: ~t["enabled"], ["ts_id", "tilt_index"]]
    assert excluded.to_numpy().tolist() == expected

    again = _post(client, f"/api/runs/{job['run_id']}/rerun", {})
    assert again.status_code == 202
    rerun_job = again.json()["job"]
    for _ in range(200):
        rerun_job = client.get(f"/api/jobs/{rerun_job['id']}").json()
        if rerun_job["status"] in ("finished", "failed"):
            break
        time.sleep(0.05)
    assert rerun_job["status"] == "finished" and rerun_job["run_id"] > job["run_id"]


# ----------------------------------------------------------------------------- security
def test_writes_from_another_origin_are_refused(client, project_dir):
    ctf_set = _set_id(client, "ctf", "motion")
    n_runs = len(client.get("/api/project").json()["runs"])
    body = {"exclude": {"TS_01": [1]}}
    assert _post(client, f"/api/ctf/{ctf_set}/subset", body, Origin="http://evil.example").status_code == 403
    assert client.post(f"/api/ctf/{ctf_set}/subset", json=body).status_code == 403  # no Origin at all
    form = client.post(f"/api/ctf/{ctf_set}/subset", content=b"exclude=1",
                       headers={"Origin": ORIGIN, "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 403 and "JSON" in form.json()["error"]
    cross_site = _post(client, f"/api/ctf/{ctf_set}/subset", body, **{"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403
    assert len(client.get("/api/project").json()["runs"]) == n_runs  # nothing was written


def test_dns_rebinding_hosts_and_remote_clients_are_refused_without_a_token(project_dir):
    app = create_app(project_dir)
    rebinding = TestClient(app, base_url="http://attacker.example:8765", client=("127.0.0.1", 50000))
    answer = rebinding.get("/api/project")
    assert answer.status_code == 403 and "DNS rebinding" in answer.json()["error"]
    remote = TestClient(app, base_url=ORIGIN, client=("192.168.1.20", 50000))
    assert remote.get("/api/project").status_code == 403
    assert TestClient(app, base_url="http://localhost:8765", client=("::1", 1)).get("/api/project").status_code == 200


def test_a_token_is_required_off_localhost(project_dir):
    app = create_app(project_dir, token="s3cret-token")
    remote = TestClient(app, base_url="http://192.168.1.5:8765", client=("192.168.1.20", 50000))
    assert remote.get("/api/project").status_code == 401
    assert remote.get("/static/index.html").status_code == 401
    assert remote.get("/api/project?token=wrong").status_code == 401
    assert remote.get("/api/project", headers={"X-Tomopipe-Token": "s3cret-token"}).status_code == 200
    first = remote.get("/static/index.html?token=s3cret-token")
    assert first.status_code == 200 and "HttpOnly" in first.headers["set-cookie"]
    assert remote.get("/api/project").status_code == 200  # the cookie now carries the token
    write = remote.post("/api/runs", json={}, headers={"Origin": "http://evil.example"})
    assert write.status_code == 403  # the token does not excuse a cross-origin write


@pytest.mark.parametrize("path", ["/static/../tomopipe.sqlite", "/static/%2e%2e/tomopipe.sqlite",
                                  "/static/..%2ftomopipe.sqlite", "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                                  "/static/app.py", "/static/runs", "/tomopipe.sqlite", "/runs/0002_motion/TS_01.mrc",
                                  "/api/tilt-series/..%2f..%2fetc/image"])
def test_path_traversal_is_refused(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert b"SQLite" not in answer.content and b"root:" not in answer.content


def test_pages_are_served_by_name_only(client):
    page = client.get("/")
    assert page.status_code == 200 and "<svg id=\"graph\"" in page.text
    for name in ("run.html", "tilt.html", "ctf.html", "tomogram.html", "map.html", "common.js", "style.css"):
        answer = client.get(f"/static/{name}")
        assert answer.status_code == 200 and len(answer.content) > 200, name
    assert client.get("/static/index.html").headers["x-frame-options"] == "DENY"


def test_security_helpers():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.0.1") and not is_loopback("localhost.evil.com")
    assert host_name("127.0.0.1:8000") == "127.0.0.1" and host_name("[::1]:80") == "[::1]"
    assert host_name("example.org") == "example.org"


def test_the_printed_url_carries_the_token_off_localhost():
    from tomopipe.serve.server import bind_socket, url_of

    assert url_of("127.0.0.1", 8765, None) == "http://127.0.0.1:8765/"
    assert url_of("::1", 80, None) == "http://[::1]:80/"
    assert url_of("0.0.0.0", 8000, "abc").endswith(":8000/?token=abc")
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # keep-alive responses without ~45 ms
        port = sock.getsockname()[1]
        with pytest.raises(TomopipeError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_writes_run_one_at_a_time_and_show_as_queued(client):
    import threading

    jobs = client.app.state.jobs
    gate = threading.Event()
    first = jobs.submit("hold", "test_hold", lambda project: gate.wait(30) and None)
    second = jobs.submit("after", "test_after", lambda project: None)
    for _ in range(200):
        if first.status == "running":
            break
        time.sleep(0.02)
    statuses = {job["label"]: job["status"] for job in client.get("/api/project").json()["jobs"]}
    assert statuses["hold"] == "running" and statuses["after"] == "queued"
    gate.set()
    assert second.done.wait(30) and first.status == second.status == "finished"
    assert client.get(f"/api/jobs/{second.id}").json()["status"] == "finished"
    assert client.get("/api/jobs/9999").status_code == 404


def test_ctf_rings_lie_on_the_zeros_of_the_ctf():
    from scipy.ndimage import map_coordinates

    from tomopipe.algorithms.ctf import ctf_2d
    from tomopipe.serve.overlays import ctf_zero_rings_px

    w, pixel_A, u, v, angle = 128, 3.16, 26600.0, 25700.0, -59.1
    rings = ctf_zero_rings_px(w, pixel_A, u, v, angle, 300.0, 2.7, 0.1)
    ctf = ctf_2d((w, w), pixel_A, u, v, angle, 300.0, 2.7, 0.1, rfft=False, fftshift=True).numpy()
    assert 5 <= len(rings) <= 12
    for ring in rings:
        x, y = np.array(ring).T
        assert np.hypot(x - w // 2, y - w // 2).max() <= w / 2
        assert np.abs(map_coordinates(ctf, [y, x], order=1)).mean() < 0.03  # |CTF| averages 0.64 off the zeros
    x, y = np.array(rings[0]).T
    along_u = np.hypot(x - w // 2, y - w // 2)[np.argmin(np.abs(np.arange(len(x)) * 2.0 - (angle % 360)))]
    assert along_u == pytest.approx(np.hypot(x - w // 2, y - w // 2).min(), rel=0.02)  # more defocus: nearer zero
