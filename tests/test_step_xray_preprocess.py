"""The ``xray_eraser`` and ``preprocess`` steps through the engine, and the binning / density
functions they use (:mod:`tomopipe.algorithms.normalize`).

A tilt-series set enters the project through a test-only step (``test_tilt_series_stacks``,
registered here) that reads MRC stacks from a folder, as a tilt-series import would: the stacks
hold the views in acquisition order, so ``image_section`` differs from ``tilt_index``. TS_01 is
float32 with even/odd halves (full = even + odd), TS_02 int16; one view of TS_01 is disabled.
X-rays (single pixels and small blobs) are injected in known places.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.normalize import bin_image, binned_geometry, scale_densities
from tomopipe.algorithms.xray import XrayParams
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.step_api import REGISTRY, Param, Port, Step, register, step_class
from tomopipe.engine.workflow import load_workflow
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.project.store import Project

PIXEL_A = 2.0
ANGLES_IN_ACQUISITION_ORDER = (0.0, 3.0, -3.0, 6.0, -6.0)
DISABLED = {("TS_01", 1)}  # (ts_id, tilt_index)


pytestmark = pytest.mark.usefixtures("one_thread")


class TiltSeriesStacks(Step):
    """Test-only import: every ``TS.mrc`` in ``folder`` (with ``TS_even.mrc`` / ``TS_odd.mrc`` when
    present) becomes a tilt series of the angles above, sections in acquisition order."""

    type_name = "test_tilt_series_stacks"
    title = "test - tilt series from MRC stacks"
    params = (Param("folder", "path", "folder of the stacks", required=True),)
    outputs = (Port("tilt_series", "tilt_series"),)

    def run(self, ctx):
        folder = Path(ctx.params["folder"])
        rows, acquisitions = [], {}
        for path in sorted(folder.glob("TS_??.mrc")):
            ts_id = path.stem
            data, _ = read_mrc(path, mmap=True)
            order = np.argsort(ANGLES_IN_ACQUISITION_ORDER, kind="stable")  # tilt_index -> section
            for tilt_index, section in enumerate(order):
                row = {"ts_id": ts_id, "tilt_index": tilt_index,
                       "tilt_angle_deg": ANGLES_IN_ACQUISITION_ORDER[section], "acquisition_order": int(section),
                       "dose_e_per_A2": 3.0, "pre_exposure_e_per_A2": 3.0 * section,
                       "image_path": ctx.stored_path(path), "image_section": int(section),
                       "enabled": (ts_id, tilt_index) not in DISABLED}
                for half in ("even", "odd"):
                    if (folder / f"{ts_id}_{half}.mrc").exists():
                        row[f"image_{half}_path"] = ctx.stored_path(folder / f"{ts_id}_{half}.mrc")
                rows.append(row)
            acquisitions[ts_id] = {"pixel_size_A": PIXEL_A, "voltage_kV": 300.0, "spherical_aberration_mm": 2.7,
                                   "amplitude_contrast": 0.1, "tilt_axis_angle_deg": 85.0,
                                   "image_size_px": [int(data.shape[2]), int(data.shape[1])],
                                   "n_tilts": int(data.shape[0])}
        ctx.add_output("tilt_series", pd.DataFrame(rows), {"tilt_series": acquisitions, "dose_weighted": True})
        return {"tilt_series": len(acquisitions)}


if TiltSeriesStacks.type_name not in REGISTRY:
    register(TiltSeriesStacks)

WORKFLOW = """
[workflow]
name = "xray_preprocess_test"

[steps.source]
type = "test_tilt_series_stacks"
folder = "{data}"

[steps.xray]
type = "xray_eraser"
tilt_series = "source.tilt_series"

[steps.pre]
type = "preprocess"
tilt_series = "xray.tilt_series"
binning = 2.5
density_mode = "scaled_mean_sd"
mean = 0.0
sd = 1.0
"""


def _background(ny, nx, mean_counts, seed):
    g = torch.Generator().manual_seed(seed)
    k2 = (torch.fft.fftfreq(ny, dtype=torch.float64)[:, None] ** 2
          + torch.fft.rfftfreq(nx, dtype=torch.float64)[None] ** 2)
    texture = torch.fft.irfft2(torch.fft.rfft2(torch.randn(ny, nx, generator=g, dtype=torch.float64))
                               * torch.exp(-k2 * 900), s=(ny, nx))
    return (mean_counts * (1 + 0.2 * (texture / texture.std()).clamp(-3, 3) / 3)).numpy()


def write_stacks(folder: Path, ny: int = 200, nx: int = 240, seed: int = 0) -> dict:
    """TS_01 (float32, with halves) and TS_02 (int16) in acquisition order; returns the injected hits
    per (ts_id, section) and the expected counts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for ts_number, ts_id in enumerate(("TS_01", "TS_02")):
        views, evens, odds = [], [], []
        for section in range(len(ANGLES_IN_ACQUISITION_ORDER)):
            expected = _background(ny, nx, 30.0, seed=100 * seed + 10 * ts_number + section)
            even = rng.poisson(expected / 2).astype(np.float32)
            odd = rng.poisson(expected / 2).astype(np.float32)
            hits = []
            for k in range(6):
                cy, cx = 12 + (ny - 30) * k // 6, 12 + (nx - 40) * k // 6 + 3 * section
                pixels = [(cy, cx)] if k % 2 == 0 else [(cy, cx), (cy, cx + 1), (cy + 1, cx)]
                for p in pixels:
                    (even if k % 3 else odd)[p] += rng.uniform(20, 60) * math.sqrt(expected[p])
                hits.append(pixels)
            truth[(ts_id, section)] = {"hits": hits, "expected": expected}
            views.append(even + odd)
            evens.append(even)
            odds.append(odd)
        if ts_id == "TS_01":
            write_mrc(folder / "TS_01.mrc", np.stack(views), PIXEL_A, stack=True)
            write_mrc(folder / "TS_01_even.mrc", np.stack(evens), PIXEL_A, stack=True)
            write_mrc(folder / "TS_01_odd.mrc", np.stack(odds), PIXEL_A, stack=True)
        else:
            write_mrc(folder / "TS_02.mrc", np.stack(views).astype(np.int16), PIXEL_A, stack=True)
    return truth


def _run(tmp_path: Path, overrides=()):
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.format(data=tmp_path / "data"))
    with Project.open_or_init(tmp_path / "project") as project:
        return run_workflow(project, load_workflow(workflow, list(overrides)), LocalExecutor(1),
                            echo=lambda *_: None)


def _output(project_dir: Path, step: str):
    with Project.open(project_dir) as project:
        record = project.sets_of_run(project.find_run(step).id)["tilt_series"]
        items = project.read_items(record.id)
        items["image_path"] = [str(project.absolute_path(p)) for p in items["image_path"]]
        for column in ("image_even_path", "image_odd_path", "xray_table_path"):
            if column in items.columns:
                items[column] = [str(project.absolute_path(p)) if isinstance(p, str) else None for p in items[column]]
        return items, record.attrs, project.find_run(step).summary


def test_seed_defaults_are_scipions_ccderaser_and_newstack_settings():
    xray = step_class("xray_eraser")
    assert xray.title == "imod - Xray eraser"
    defaults = {p.name: p.default for p in xray.params}
    assert defaults["peak_criterion_sd"] == 8.0 and defaults["diff_criterion_sd"] == 6.0
    assert defaults["grow_criterion_sd"] == 4.0 and defaults["scan_criterion_sd"] == 3.0
    assert defaults["maximum_radius_px"] == 4.2 and defaults["giant_criterion_sd"] == 12.0
    assert defaults["extra_large_radius_px"] == 8.0 and defaults["big_diff_criterion_sd"] == 19.0
    assert defaults["annulus_width_px"] == 2.0 and defaults["xy_scan_size_px"] == 100
    assert defaults["edge_exclusion_width_px"] == 4 and defaults["border_size_px"] == 2
    assert defaults["polynomial_order"] == 2 and defaults["max_pixels_in_diff_patch"] == 2
    for name in XrayParams.names():  # every criterion of the algorithm is a parameter of the step
        assert name in defaults and defaults[name] == getattr(XrayParams(), name)
    pre = step_class("preprocess")
    assert pre.title == "imod - preprocess tilt series"
    defaults = {p.name: p.default for p in pre.params}
    assert defaults["density_mode"] == "scaled_mean_sd" and defaults["mean"] == 0.0 and defaults["sd"] == 1.0


def test_xray_eraser_and_preprocess_through_the_engine(tmp_path):
    truth = write_stacks(tmp_path / "data")
    report = _run(tmp_path)
    assert [o.status for o in report.outcomes] == ["finished"] * 3, [o.message for o in report.outcomes]
    project_dir = tmp_path / "project"
    source, _, _ = _output(project_dir, "source")
    items, attrs, summary = _output(project_dir, "xray")

    # items: every view, flags and other columns copied, new stacks in the run folder, in tilt_index order
    assert len(items) == 10
    assert items[["ts_id", "tilt_index"]].values.tolist() == source[["ts_id", "tilt_index"]].values.tolist()
    assert items["enabled"].tolist() == source["enabled"].tolist() and not items["enabled"].all()
    for column in ("tilt_angle_deg", "acquisition_order", "dose_e_per_A2", "pre_exposure_e_per_A2"):
        assert items[column].tolist() == source[column].tolist()
    assert items["image_section"].tolist() == items["tilt_index"].tolist()
    assert all("runs/" in p and p.endswith(f"{ts}.mrc") for p, ts in zip(items["image_path"], items["ts_id"]))
    assert attrs["tilt_series"] == _output(project_dir, "source")[1]["tilt_series"] and attrs["dose_weighted"]

    replaced_total = 0
    for ts_id, group in items.groupby("ts_id"):
        new_stack, voxel_A = read_mrc(group["image_path"].iloc[0])
        old_stack, _ = read_mrc(tmp_path / "data" / f"{ts_id}.mrc")
        assert voxel_A == pytest.approx(PIXEL_A) and new_stack.dtype == old_stack.dtype
        table = pd.read_csv(group["xray_table_path"].iloc[0])
        assert len(table) == group["xray_pixels"].sum() == summary["pixels_replaced"][ts_id]
        replaced_total += len(table)
        for row in group.itertuples():
            section = int(source[(source.ts_id == ts_id) & (source.tilt_index == row.tilt_index)].image_section.iloc[0])
            old, new = old_stack[section], new_stack[row.image_section]
            listed = np.zeros(old.shape, dtype=bool)
            here = table[table.tilt_index == row.tilt_index]
            listed[here.y_px, here.x_px] = True
            assert np.array_equal(old[~listed], new[~listed])  # bit-identical outside the listed pixels
            view = truth[(ts_id, section)]
            for hit in view["hits"]:  # every hit replaced by background values
                assert all(listed[p] for p in hit), (ts_id, row.tilt_index, hit)
                z = [abs(float(new[p]) - view["expected"][p]) / math.sqrt(view["expected"][p]) for p in hit]
                assert max(z) < 5
            assert listed.sum() <= sum(len(h) for h in view["hits"]) + 2
        if ts_id == "TS_01":  # halves: the same pixels replaced in each, fitted from each half
            for half in ("even", "odd"):
                new_half, _ = read_mrc(group[f"image_{half}_path"].iloc[0])
                old_half, _ = read_mrc(tmp_path / "data" / f"TS_01_{half}.mrc")
                for row in group.itertuples():
                    section = ANGLES_IN_ACQUISITION_ORDER.index(row.tilt_angle_deg)
                    here = table[table.tilt_index == row.tilt_index]
                    listed = np.zeros(old_half.shape[1:], dtype=bool)
                    listed[here.y_px, here.x_px] = True
                    assert np.array_equal(old_half[section][~listed], new_half[row.image_section][~listed])
                    expected = truth[("TS_01", section)]["expected"] / 2
                    z = np.abs(new_half[row.image_section][listed] - expected[listed]) / np.sqrt(expected[listed])
                    assert z.max() < 5
    assert summary["fraction_replaced"] == pytest.approx(replaced_total / (10 * 200 * 240))

    # preprocess: binning 2.5 (not an integer), every view to mean 0 and SD 1
    pre_items, pre_attrs, pre_summary = _output(project_dir, "pre")
    geometry = binned_geometry((200, 240), 2.5)
    assert geometry["new_shape"] == (80, 96)
    for ts_id in ("TS_01", "TS_02"):
        acquisition = pre_attrs["tilt_series"][ts_id]
        assert acquisition["pixel_size_A"] == pytest.approx(PIXEL_A * 240 / 96)
        assert acquisition["image_size_px"] == [96, 80]
        assert acquisition["voltage_kV"] == 300.0
    assert pre_attrs["preprocess"]["binning"] == 2.5
    assert pre_items["enabled"].tolist() == items["enabled"].tolist()
    assert pre_items["xray_pixels"].tolist() == items["xray_pixels"].tolist()  # earlier columns carried on
    assert pre_items["image_section"].tolist() == pre_items["tilt_index"].tolist()
    for ts_id, group in pre_items.groupby("ts_id"):
        stack, voxel_A = read_mrc(group["image_path"].iloc[0])
        assert stack.shape == (5, 80, 96) and stack.dtype == np.float32 and voxel_A == pytest.approx(5.0)
        means, sds = stack.mean((1, 2), dtype=np.float64), stack.std((1, 2), dtype=np.float64)
        assert np.allclose(means, 0, atol=1e-5) and np.allclose(sds, 1, atol=1e-5)
        erased, _ = read_mrc(items[items.ts_id == ts_id]["image_path"].iloc[0])
        again = scale_densities(bin_image(torch.from_numpy(erased.astype(np.float32)), 2.5), "scaled_mean_sd")
        assert np.allclose(stack, again.numpy(), atol=1e-5)
        if ts_id == "TS_01":
            for half in ("even", "odd"):
                half_stack, _ = read_mrc(group[f"image_{half}_path"].iloc[0])
                assert half_stack.shape == (5, 80, 96)
                assert np.allclose(half_stack.std((1, 2), dtype=np.float64), 1, atol=1e-5)
    assert pre_summary["pixel_size_A"] == [pytest.approx(5.0)]


def test_preprocess_rerun_integer_binning_keeps_the_mean(tmp_path):
    write_stacks(tmp_path / "data", ny=128, nx=160, seed=1)
    assert all(o.status == "finished" for o in _run(tmp_path).outcomes)
    rerun = _run(tmp_path, ["pre.binning=4", "pre.density_mode='none'"])
    assert [o.status for o in rerun.outcomes] == ["skipped", "skipped", "finished"]
    items, _, _ = _output(tmp_path / "project", "xray")
    with Project.open(tmp_path / "project") as project:  # the newest preprocess run
        runs = [r for r in project.runs() if r.name == "pre" and r.status == "finished"]
        record = project.sets_of_run(runs[-1].id)["tilt_series"]
        pre_items = project.read_items(record.id)
        pre_attrs = record.attrs
        path = project.absolute_path(pre_items["image_path"].iloc[0])
    assert pre_attrs["tilt_series"]["TS_01"]["pixel_size_A"] == pytest.approx(4 * PIXEL_A)
    assert pre_attrs["tilt_series"]["TS_01"]["image_size_px"] == [40, 32]
    binned, _ = read_mrc(path)
    erased, _ = read_mrc(items["image_path"].iloc[0])
    assert binned.shape == (5, 32, 40)
    assert np.allclose(binned.mean((1, 2), dtype=np.float64), erased.mean((1, 2), dtype=np.float64), rtol=1e-5)


def test_bad_stack_and_bad_binning_fail_with_clear_messages(tmp_path):
    write_stacks(tmp_path / "data", ny=64, nx=64, seed=2)
    report = _run(tmp_path, ["pre.binning=40"])
    assert [o.status for o in report.outcomes] == ["finished", "finished", "failed"]
    assert "binning 40.0 leaves less than 2 pixels of the 64 x 64 px images" in report.outcomes[2].message
    # the stack changes under the project: the eraser names it
    write_mrc(tmp_path / "data" / "TS_02.mrc", np.zeros((5, 32, 32), np.int16), PIXEL_A, stack=True)
    report = _run(tmp_path, ["xray.peak_criterion_sd=9"])
    assert [o.status for o in report.outcomes] == ["skipped", "failed", "blocked"]
    message = report.outcomes[1].message
    assert "TS_02.mrc: images are 32 x 32 px but the tilt series' acquisition says 64 x 64 px" in message


# ------------------------------------------------------------------------ binning and densities


def test_binning_keeps_the_mean_centre_and_band_below_the_new_nyquist():
    ny, nx = 240, 256
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    low = np.cos(2 * np.pi * 12 / 256 * xx)  # 0.047 cycles/px: kept by binning 4 (new Nyquist 0.125)
    high = np.cos(2 * np.pi * 72 / 240 * yy)  # 0.3 cycles/px, above the new Nyquist: removed, not aliased
    image = torch.from_numpy(10 + low + high)
    binned = bin_image(image, 4)
    assert tuple(binned.shape) == (60, 64) and binned.dtype == torch.float64
    assert float(binned.mean()) == pytest.approx(10.0, abs=1e-9)
    expected_low = 10 + np.cos(2 * np.pi * 12 / 64 * np.arange(64))[None, :]  # the same wave, 4x denser
    assert np.allclose(binned.numpy(), np.broadcast_to(expected_low, (60, 64)), atol=1e-9)
    # a spot at the centre n // 2 stays at the centre n_new // 2, also for a non-integer factor
    spot = torch.from_numpy(np.exp(-((yy - ny // 2) ** 2 + (xx - nx // 2) ** 2) / (2 * 6.0**2)))
    for factor in (2.0, 2.5, 3.3):
        out = bin_image(spot, factor)
        peak = np.unravel_index(int(out.argmax()), tuple(out.shape))
        assert peak == (out.shape[0] // 2, out.shape[1] // 2)
        assert float(out.sum()) * np.prod(binned_geometry((ny, nx), factor)["pixel_factor"]) == pytest.approx(
            float(spot.sum()), rel=1e-6)
    # geometry: integer factors exact; others within 1/n_new of the factor on both axes
    geometry = binned_geometry((4092, 5760), 10)
    assert geometry["new_shape"] == (409, 576) and geometry["crop_shape"] == (4090, 5760)
    assert geometry["pixel_factor"] == (10.0, 10.0)
    for factor in (1.7, 2.3, 7.77):
        geometry = binned_geometry((4092, 5760), factor)
        for n_new, pixel_factor in zip(geometry["new_shape"], geometry["pixel_factor"]):
            assert abs(pixel_factor - factor) < factor / n_new
    assert torch.equal(bin_image(image.float(), 1.0), image.float())
    with pytest.raises(ValueError, match=">= 1"):
        bin_image(image, 0.5)


def test_density_scaling_modes():
    rng = np.random.default_rng(0)
    values = rng.normal(50, 7, size=(3, 64, 80)) * np.array([1, 2, 3])[:, None, None]
    images = torch.from_numpy(values.astype(np.float32))
    scaled = scale_densities(images, "scaled_mean_sd", mean=0.0, sd=1.0)
    assert scaled.dtype == torch.float32
    assert torch.allclose(scaled.double().mean((1, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(scaled.double().std((1, 2), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)
    other = scale_densities(images, "scaled_mean_sd", mean=100.0, sd=5.0)
    assert torch.allclose(other.double().mean((1, 2)), torch.full((3,), 100.0, dtype=torch.float64), atol=1e-3)
    shifted = scale_densities(images, "shifted_mean", mean=-2.0)
    assert torch.allclose(shifted.double().mean((1, 2)), torch.full((3,), -2.0, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(shifted.std((1, 2)), images.std((1, 2)), rtol=1e-5)
    assert torch.equal(scale_densities(images, "none"), images)
    with pytest.raises(ValueError, match="constant value"):
        scale_densities(torch.ones(2, 8, 8), "scaled_mean_sd")
    with pytest.raises(ValueError, match="density mode"):
        scale_densities(images, "minmax")
