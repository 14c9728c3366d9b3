"""``tomopipe serve``'s HTTP API through Starlette's TestClient: every endpoint answers what the
project holds, the CTF subset and the pick edits are new runs in the database (nothing deleted),
a run launched from a form finishes, and the security rules refuse what they should (no token
off localhost, cross-origin writes, DNS-rebinding Host names, path traversal)."""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.fsc import fsc, fsc_resolution_A, shell_frequencies_per_A
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import write_mrc
from tomopipe.model.particles import particle_set_attrs, particles_table, tomogram_frames
from tomopipe.project.store import Project

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette 1.x would rather have httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from tomopipe.serve.app import create_app  # noqa: E402
from tomopipe.serve.security import host_name, is_loopback  # noqa: E402

ORIGIN = "http://127.0.0.1:8765"
#: the small preset's tomogram at bin 10 (x, y, z voxels): 1920 × 1440 px at 0.79 Å, thickness 128
TOMOGRAM_XYZ_PX = (192, 144, 128)
TOMOGRAM_VOXEL_A = 7.9
N_TILTS = 7
PARTICLES_XYZ_PX = np.array([[40.0, 40.0, 64.0], [120.0, 90.0, 64.0], [150.0, 30.0, 70.0], [60.0, 110.0, 50.0]])
MAP_BOX_PX = 40
MAP_VOXEL_A = 3.0


def _sphere_shells(shape_zyx, centres_xyz, radius_px: float, width_px: float = 2.0) -> np.ndarray:
    """Hollow shells (apoferritin-like) at voxel centres ``(x, y, z)`` in a ``[z, y, x]`` volume."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape_zyx), indexing="ij")
    volume = np.zeros(shape_zyx, np.float32)
    for cx, cy, cz in centres_xyz:
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        volume += np.exp(-((r - radius_px) / width_px) ** 2)
    return volume


def add_tilt_series_and_ctf(project: Project) -> None:
    """A finished 'motion' run with a tilt_series set (one MRC stack) and a ctf set whose items
    point to a stack of diagnostic spectra (rings whose spacing follows the defocus)."""
    run = project.create_run("motion", "motion_ctf", {}, {}, "motion-signature")
    folder = project.absolute_path(run.folder)
    rng = np.random.default_rng(0)
    angles = np.linspace(-18.0, 18.0, N_TILTS)
    stack = rng.normal(0.0, 1.0, (N_TILTS, 96, 96)).astype(np.float32)
    stack[:, 30:60, 30:60] += 3.0  # something to see
    write_mrc(folder / "TS_01.mrc", stack, 4.0, stack=True)
    aligned = np.ascontiguousarray(np.rot90(stack[:, :, :64], axes=(1, 2)))  # stands for an interpolated stack
    write_mrc(folder / "TS_01_ali.mrc", aligned, 4.0, stack=True)
    k = np.hypot(*np.meshgrid(np.arange(-32, 32), np.arange(-32, 32), indexing="ij")) / 64.0
    defocus_A = 25000.0 + 150.0 * np.arange(N_TILTS)
    spectra = np.stack([np.sin(np.pi * 0.0197 * d * (k / 4.0) ** 2) ** 2 for d in defocus_A]).astype(np.float32)
    write_mrc(folder / "TS_01_ctf_spectra.mrc", spectra, 4.0, stack=True)
    series = pd.DataFrame({"ts_id": "TS_01", "tilt_index": np.arange(N_TILTS), "tilt_angle_deg": angles,
                           "image_path": project.relative_path(folder / "TS_01.mrc"),
                           "image_section": np.arange(N_TILTS), "dose_e_per_A2": 3.0,
                           "pre_exposure_e_per_A2": 3.0 * np.abs(np.arange(N_TILTS) - N_TILTS // 2),
                           "aligned_image_path": project.relative_path(folder / "TS_01_ali.mrc"),
                           "aligned_image_section": np.arange(N_TILTS)})
    astigmatism = np.where(np.arange(N_TILTS) == 5, 900.0, 200.0)
    ctf = pd.DataFrame({"ts_id": "TS_01", "tilt_index": np.arange(N_TILTS), "tilt_angle_deg": angles,
                        "defocus_u_A": defocus_A + astigmatism / 2, "defocus_v_A": defocus_A - astigmatism / 2,
                        "defocus_angle_deg": 10.0, "fit_resolution_A": 7.0,
                        "diagnostic_path": project.relative_path(folder / "TS_01_ctf_spectra.mrc"),
                        "diagnostic_section": np.arange(N_TILTS)})
    project.add_set(run.id, "tilt_series", "tilt_series", series, {"tilt_series": {}})
    acquisition = {"voltage_kV": 300.0, "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.07, "pixel_size_A": 4.0}
    project.add_set(run.id, "ctf", "ctf", ctf, {"tilt_series": {"TS_01": acquisition}})
    project.finish_run(run.id)


def add_tomogram_picks_and_map(project: Project, inputs: dict[str, int] | None = None) -> None:
    """A 'reconstruct' run (one tomogram of the small preset's size with hollow shells), a 'pick'
    run (the shells' centres) and a 'postprocess' run (half maps of a shell with noise, their FSC)."""
    nx, ny, nz = TOMOGRAM_XYZ_PX
    run = project.create_run("reconstruct", "reconstruct_tomogram", {}, inputs or {}, "tomograms")
    folder = project.absolute_path(run.folder)
    volume = _sphere_shells((nz, ny, nx), PARTICLES_XYZ_PX, 7.0)
    volume += np.random.default_rng(1).normal(0.0, 0.3, volume.shape).astype(np.float32)
    write_mrc(folder / "TS_01.mrc", volume, TOMOGRAM_VOXEL_A)
    tomograms = pd.DataFrame([{"ts_id": "TS_01", "tomogram_path": project.relative_path(folder / "TS_01.mrc"),
                               "voxel_size_A": TOMOGRAM_VOXEL_A, "size_x_px": nx, "size_y_px": ny, "size_z_px": nz}])
    attrs = {"tilt_series": {"TS_01": {"pixel_size_A": 0.79}}}
    tomogram_set = project.add_set(run.id, "tomograms", "tomograms", tomograms, attrs)
    project.finish_run(run.id)

    pick = project.create_run("pick", "pick_template_matching", {}, {"tomograms": tomogram_set.id}, "picks")
    frame = tomogram_frames(tomograms)["TS_01"]
    table = particles_table(["TS_01"] * len(PARTICLES_XYZ_PX), frame.to_centred_A(PARTICLES_XYZ_PX))
    table["score"] = np.linspace(1.0, 0.5, len(table))
    table["half_set"] = [1, 2, 1, 2]
    project.add_set(pick.id, "particles", "particles", table, particle_set_attrs(tomograms, attrs))
    project.finish_run(pick.id)

    post = project.create_run("postprocess", "postprocess", {}, {}, "maps")
    folder = project.absolute_path(post.folder)
    shell = _sphere_shells((MAP_BOX_PX,) * 3, [(MAP_BOX_PX / 2,) * 3], 12.0, 2.5)
    rng = np.random.default_rng(2)
    halves = [shell + rng.normal(0.0, 0.2, shell.shape).astype(np.float32) for _ in range(2)]
    rows = []
    for name, data in (("half1", halves[0]), ("half2", halves[1]), ("sharpened", shell)):
        write_mrc(folder / f"{name}.mrc", data, MAP_VOXEL_A)
        rows.append({"map_name": name, "map_path": project.relative_path(folder / f"{name}.mrc"),
                     "voxel_size_A": MAP_VOXEL_A, "box_px": MAP_BOX_PX})
    curve = fsc(torch.from_numpy(halves[0]).double(), torch.from_numpy(halves[1]).double())
    project.add_set(post.id, "maps", "maps", pd.DataFrame(rows), {"postprocess": {
        "shell_frequencies_per_A": shell_frequencies_per_A(MAP_BOX_PX, MAP_VOXEL_A).tolist(),
        "fsc_corrected": curve.tolist(), "resolution_A": fsc_resolution_A(curve, MAP_VOXEL_A, 0.143, MAP_BOX_PX)}})
    project.finish_run(post.id)


def build_project(folder: Path) -> Path:
    """A small project: tilt series + CTF, a tomogram of the small preset's size with picks, a map."""
    with Project.init(folder) as project:
        add_tilt_series_and_ctf(project)
        add_tomogram_picks_and_map(project)
    return folder


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory) -> Path:
    return build_project(tmp_path_factory.mktemp("serve") / "project")


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


# ----------------------------------------------------------------------------- read endpoints
def test_project_overview_lists_runs_with_their_provenance(client):
    data = client.get("/api/project").json()
    assert [run["name"] for run in data["runs"]] == ["motion", "reconstruct", "pick", "postprocess"]
    assert all(run["status"] == "finished" for run in data["runs"])
    ids = {run["name"]: run["id"] for run in data["runs"]}
    assert [ids["reconstruct"], ids["pick"]] in data["edges"]  # pick read the tomograms
    motion = data["runs"][0]
    assert {o["kind"] for o in motion["outputs"]} == {"tilt_series", "ctf"}


def test_run_detail_log_and_step_schema(client, project_dir):
    detail = client.get("/api/runs/1").json()
    assert detail["name"] == "motion" and detail["params"] == {}
    (project_dir / "runs" / "0001_motion" / "run.log").write_text("line one\nline two\n")
    assert client.get("/api/runs/1/log?tail_bytes=9").text == "line two\n"
    assert client.get("/api/runs/99").status_code == 404
    steps = {s["type"] for s in client.get("/api/steps").json()["steps"]}
    assert {"exclude_views", "reconstruct_tomogram", "postprocess"} <= steps
    schema = client.get("/api/steps/exclude_views").json()
    params = {p["name"]: p for p in schema["params"]}
    assert params["max_astigmatism_A"]["unit"] == "Å" and params["dark_view_fraction"]["max"] == 1
    ctf_port = next(port for port in schema["inputs"] if port["name"] == "ctf")
    assert ctf_port["candidates"] and ctf_port["optional"]
    assert client.get("/api/steps/no_such_step").status_code == 404


def test_viewer_data_endpoints(client):
    ts_set, ctf_set = _set_id(client, "tilt_series"), _set_id(client, "ctf")
    series = client.get(f"/api/tilt-series/{ts_set}").json()["series"]["TS_01"]
    assert len(series) == N_TILTS and series[0]["tilt_angle_deg"] == -18.0 and all(v["enabled"] for v in series)
    image = client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3&max_px=48")
    assert image.headers["content-type"] == "image/png" and image.headers["x-downsample"] == "2"
    import imagecodecs
    aligned = client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3&aligned=1&max_px=256")
    assert imagecodecs.png_decode(aligned.content).shape == (64, 96)  # the aligned stack, not the raw one
    assert imagecodecs.png_decode(client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=3").content).shape \
        == (96, 96)
    assert client.get(f"/api/tilt-series/{ts_set}").json()["has_aligned_images"]
    assert client.get(f"/api/tilt-series/{ts_set}/image?ts=TS_01&tilt=30").status_code == 404
    ctf = client.get(f"/api/ctf/{ctf_set}").json()["series"]["TS_01"]
    assert ctf[5]["astigmatism_A"] == pytest.approx(900.0) and ctf[0]["defocus_mean_A"] == pytest.approx(25000.0)
    spectrum = client.get(f"/api/ctf/{ctf_set}/spectrum?ts=TS_01&tilt=2")
    assert spectrum.status_code == 200 and spectrum.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/ctf/{ctf_set}/spectrum?ts=TS_09&tilt=2").status_code == 404
    rings = client.get(f"/api/ctf/{ctf_set}/rings?ts=TS_01&tilt=5").json()
    assert rings["size_px"] == 64 and len(rings["rings"]) >= 3
    first = np.array(rings["rings"][0]) - 32
    radius = np.hypot(first[:, 0], first[:, 1])
    assert radius.max() - radius.min() > 0.1  # tilt 5 is astigmatic (900 Å): an ellipse, not a circle
    assert client.get(f"/api/ctf/{ts_set}").status_code == 400  # a tilt-series set is not a CTF set

    maps_set = _set_id(client, "maps")
    maps = client.get(f"/api/maps/{maps_set}").json()
    assert [m["map_name"] for m in maps["maps"]] == ["half1", "half2", "sharpened"]
    assert len(maps["fsc"]["curves"]["fsc_corrected"]) == len(maps["fsc"]["frequency_per_A"]) > 10
    assert 2 * MAP_VOXEL_A <= maps["fsc"]["resolution_A"] < 40.0
    for axis in "zyx":
        assert client.get(f"/api/maps/{maps_set}/slice?map=sharpened&axis={axis}").status_code == 200
    volume = client.get(f"/api/maps/{maps_set}/volume?map=sharpened&max_px=20")
    shape = tuple(map(int, volume.headers["x-shape"].split(",")))
    assert shape == (20, 20, 20) and len(volume.content) == 20 ** 3
    block = np.frombuffer(volume.content, np.uint8).reshape(shape)
    assert block[10, 10, 10] < block[10, 10, 16]  # the shell is bright, its inside dark
    assert client.get(f"/api/maps/{maps_set}/slice?map=nope").status_code == 404


def test_tomogram_slice_is_binned_fast_and_picks_come_in_voxels(client, capsys):
    tomo_set = _set_id(client, "tomograms")
    info = client.get(f"/api/tomograms/{tomo_set}").json()
    assert info["tomograms"][0]["size_xyz_px"] == list(TOMOGRAM_XYZ_PX)
    picks_set = info["particle_sets"][0]["set_id"]
    picks = client.get(f"/api/particles/{picks_set}?ts=TS_01").json()["picks"]
    np.testing.assert_allclose([p["xyz_px"] for p in picks], PARTICLES_XYZ_PX, atol=1e-6)

    url = f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index=64&max_px=96"
    client.get(url)  # first touch maps the file
    timings_ms = []
    for index in range(0, 128, 8):
        started = time.perf_counter()
        response = client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index={index}&max_px=768")
        timings_ms.append((time.perf_counter() - started) * 1e3)
        assert response.status_code == 200
    median_ms = float(np.median(timings_ms))
    with capsys.disabled():
        print(f"\ntomogram slice {TOMOGRAM_XYZ_PX[0]}x{TOMOGRAM_XYZ_PX[1]} px (of {TOMOGRAM_XYZ_PX}): "
              f"median {median_ms:.1f} ms, max {max(timings_ms):.1f} ms over {len(timings_ms)} requests")
    assert median_ms <= 100.0

    import imagecodecs
    small = imagecodecs.png_decode(client.get(url).content)
    assert small.shape == (72, 96)  # 192 x 144 binned by 2
    assert int(small[20, 23]) > int(small[20, 20]) + 40  # the shell at x = 40 + 7 voxels is bright, its inside dark
    assert client.get(f"/api/tomograms/{tomo_set}/slice?ts=TS_01&index=500").status_code == 400


# ----------------------------------------------------------------------------- writes
def test_ctf_subset_is_a_new_set_in_the_database(client, project_dir):
    ctf_set = _set_id(client, "ctf", "motion")
    answer = _post(client, f"/api/ctf/{ctf_set}/subset", {"exclude": {"TS_01": [2, 6]}, "name": "exclude"})
    assert answer.status_code == 201, answer.text
    new_ctf = answer.json()["outputs"]["ctf"]["set_id"]
    items, record = _db_items(project_dir, new_ctf)
    assert record.parent_set_id == ctf_set and record.kind == "ctf"
    assert items.loc[~items["enabled"], "tilt_index"].tolist() == [1, 5]
    original, _ = _db_items(project_dir, ctf_set)
    assert original["enabled"].all() and len(original) == len(items) == N_TILTS  # nothing deleted or changed
    tilt_series = answer.json()["outputs"]["tilt_series"]["set_id"]
    assert (~_db_items(project_dir, tilt_series)[0]["enabled"]).sum() == 2
    bad = _post(client, f"/api/ctf/{ctf_set}/subset", {"exclude": {"TS_01": [99]}})
    assert bad.status_code == 400 and "views 1..7" in bad.json()["error"]


def test_picks_add_and_remove_make_new_coordinate_sets(client, project_dir):
    tomo_set = _set_id(client, "tomograms")
    picks_set = client.get(f"/api/tomograms/{tomo_set}").json()["particle_sets"][0]["set_id"]
    added = _post(client, "/api/picks", {"source_set_id": picks_set, "ts_id": "TS_01",
                                         "add_px": [[100.0, 50.0, 60.0]], "remove_index": [1]})
    assert added.status_code == 201, added.text
    new_set = added.json()["outputs"]["particles"]["set_id"]
    items, record = _db_items(project_dir, new_set)
    assert len(items) == 5 and items["enabled"].tolist() == [True, False, True, True, True]
    frame = tomogram_frames(_db_items(project_dir, tomo_set)[0])["TS_01"]
    np.testing.assert_allclose(frame.to_voxels(items.loc[4, ["x_A", "y_A", "z_A"]].to_numpy(float)),
                               [100.0, 50.0, 60.0], atol=1e-3)
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

    answer = _post(client, "/api/runs", {"step_type": "exclude_views", "name": "rule",
                                         "params": {"max_astigmatism_A": "500", "exclude_tilts": ""},
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
    assert run["status"] == "finished" and run["params"]["max_astigmatism_A"] == 500.0
    ctf_out = next(o["set_id"] for o in run["outputs"] if o["kind"] == "ctf")
    assert _db_items(project_dir, ctf_out)[0].loc[lambda t: ~t["enabled"], "tilt_index"].tolist() == [5]

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
                                  "/static/app.py", "/static/runs", "/tomopipe.sqlite", "/runs/0001_motion/TS_01.mrc",
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
