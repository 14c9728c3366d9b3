"""The ``import_alignment`` step: an alignment made elsewhere (IMOD .xf/.tlt, AreTomo .aln) put on a
tilt-series set.

* Round trip on the digital twin: tomopipe's own alignment of a simulated ``tiny`` tilt series,
  written out with ``tomopipe export imod`` (and as a binned .xf, and as an AreTomo .aln with a
  dark view and a local alignment), imported back: the alignment columns agree to the files'
  precision, the tomogram reconstructed from the import equals the one from the alignment, and
  assign_alignment and the RELION export run on it.
* Real files: IMOD's TS_001.xf/.tlt (tilt offset 2.85 deg) and a real AreTomo3 .aln.
* A hand-made AreTomo worked example (dark views, binning 2, views not in tilt order).
* Mismatches fail naming the file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import real_file
from test_io_aretomo import ROW, WORKED
from tomopipe.cli import main
from tomopipe.engine.step_api import step_class
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.imod import format_tlt, read_tlt, read_xf, write_xf
from tomopipe.io.mrc import read_mrc
from tomopipe.io.star import read_tilt_series_star
from tomopipe.model.sets import ALIGNMENT_GEOMETRY
from tomopipe.project.store import Project
from tomopipe.steps.import_alignment import import_one

pytestmark = pytest.mark.usefixtures("one_thread")

STEP = step_class("import_alignment")


def params(**values) -> dict:
    return STEP.validate_params("import", values)


def views(tilts_deg, enabled=None, ts_id="TS_01") -> pd.DataFrame:
    """A tilt series' items: ``tilt_index`` in the order of ``tilts_deg``."""
    n = len(tilts_deg)
    return pd.DataFrame({"ts_id": ts_id, "tilt_index": np.arange(n), "tilt_angle_deg": np.asarray(tilts_deg, float),
                         "image_path": "TS.mrc", "image_section": np.arange(n),
                         "enabled": np.ones(n, bool) if enabled is None else np.asarray(enabled, bool)})


def acquisition(pixel_size_A=2.0, size=(400, 200)) -> dict:
    return {"pixel_size_A": pixel_size_A, "image_size_px": list(size)}


# ----------------------------------------------------------------------------- AreTomo, worked example

# tilt_index in acquisition order: nominal tilts 0, 5, -5, 10, -10, 15 (tilt order: 4, 2, 0, 1, 3, 5)
WORKED_TILTS = [0.0, 5.0, -5.0, 10.0, -10.0, 15.0]


def test_aretomo_worked_example_gives_rot_tilt_and_shifts_in_A(tmp_path):
    (tmp_path / "TS_01.aln").write_text(WORKED)
    out, notes = import_one(params(files_directory=str(tmp_path), pattern="{ts_id}.aln"), "TS_01",
                            views(WORKED_TILTS), acquisition())
    out = out.set_index("tilt_index")
    # RawSize 200 x 100 against 400 x 200 px at 2 A/px: aligned at binning 2, 4 A/px
    assert notes["format"] == "aretomo" and notes["alignment_pixel_size_A"] == pytest.approx(4.0)
    assert notes["dark_tilt_indices"] == [4, 1] and notes["local_alignment_patches"] == 1
    assert notes["tilt_offset_deg"] == pytest.approx(1.5) and notes["alpha_offset_deg"] == 1.5
    expected = {2: (85.3, -3.5, 12.0, -8.0), 0: (85.2, 1.5, -5.0, 2.0), 3: (85.1, 11.5, 0.0, 0.0),
                5: (85.0, 16.5, 18.0, 28.5)}
    for tilt_index, (rot_z, rot_y, sx, sy) in expected.items():
        row = out.loc[tilt_index]
        assert row["enabled"]
        assert (row["rot_z_deg"], row["rot_y_deg"], row["rot_x_deg"]) == pytest.approx((rot_z, rot_y, 0.0))
        assert (row["shift_x_A"], row["shift_y_A"], row["magnification"]) == pytest.approx((sx, sy, 1.0))
    for dark in (4, 1):
        assert not out.loc[dark, "enabled"] and out.loc[dark, list(ALIGNMENT_GEOMETRY)].isna().all()


@pytest.mark.parametrize("change, message", [
    (dict(tilts=WORKED_TILTS[:5]), "6 views (RawSize: 4 aligned + 2 dark), but the tilt series has 5"),
    (dict(binning=3.0), "is not the tilt series' field of view"),
    (dict(size=(300, 200)), "is not the tilt series' field of view"),
    (dict(tilts=[0.0, 8.0, -5.0, 10.0, -10.0, 15.0]), "dark frame at tilt position 3 has tilt 5.00 deg"),
    (dict(tilts=[0.0, 5.0, -5.0, 10.0, -10.0, 19.0]), "not belong to these views"),
])
def test_aretomo_mismatches_name_the_file(tmp_path, change, message):
    path = tmp_path / "TS_01.aln"
    path.write_text(WORKED)
    p = params(pattern=str(path), alignment_binning=change.get("binning"))
    with pytest.raises(InputFileError, match=re.escape(message)) as error:
        import_one(p, "TS_01", views(change.get("tilts", WORKED_TILTS)),
                   acquisition(size=change.get("size", (400, 200))))
    assert str(path) in str(error.value)


def test_real_aretomo3_file_imports():
    path = real_file("aretomo/test_data_no_local.aln")
    rows = pd.read_csv(path, sep=r"\s+", comment="#", header=None).to_numpy()
    nominal = rows[:, 9] + 7.0  # TILT includes the AlphaOffset (-7)
    out, notes = import_one(params(pattern=str(path)), "TS_01", views(nominal[::-1]), acquisition(0.8, (4096, 4096)))
    out = out.sort_values("tilt_angle_deg")
    assert notes["alignment_pixel_size_A"] == pytest.approx(0.8) and notes["tilt_offset_deg"] == pytest.approx(-7.0)
    np.testing.assert_allclose(out["rot_z_deg"], -95.404)
    np.testing.assert_allclose(out["rot_y_deg"], rows[:, 9])
    np.testing.assert_allclose(out[["shift_x_A", "shift_y_A"]], rows[:, 3:5] * 0.8)


# ----------------------------------------------------------------------------- IMOD, real files


def test_real_imod_alignment_with_tilt_offset(tmp_path):
    folder = real_file("imod/TS_001/TS_001.xf").parent
    nominal = read_tlt(folder / "TS_001.rawtlt")
    a, d = read_xf(folder / "TS_001.xf")
    rot_z = np.degrees(np.arctan2(-a[:, 1, 0], a[:, 0, 0]))
    shifts_px = -np.linalg.solve(a, d[..., None])[..., 0]
    scale = np.sqrt(np.linalg.det(a))
    for binning in (None, 4.0):
        p = params(files_directory=str(folder), pattern="{ts_id}.xf", alignment_binning=binning)
        out, notes = import_one(p, "TS_001", views(nominal, ts_id="TS_001"), acquisition(1.5, (4096, 4096)))
        out = out.sort_values("tilt_index")
        factor = 1.5 * (binning or 1.0)
        assert notes["format"] == "imod" and notes["alignment_pixel_size_A"] == pytest.approx(factor)
        assert notes["tilt_offset_deg"] == pytest.approx(2.85, abs=0.1)  # tiltalign's AngleOffset
        np.testing.assert_allclose(out["rot_z_deg"], rot_z, atol=1e-9)
        np.testing.assert_allclose(out["rot_y_deg"], read_tlt(folder / "TS_001.tlt"))
        np.testing.assert_allclose(out["rot_x_deg"], read_tlt(folder / "TS_001.xtilt"))
        np.testing.assert_allclose(out[["shift_x_A", "shift_y_A"]], shifts_px * factor, atol=1e-9)
        np.testing.assert_allclose(out["magnification"], 1 / scale, rtol=1e-12)
        assert out["enabled"].all()


def _copy_imod(folder: Path, keep: np.ndarray | slice, name="TS_001") -> Path:
    """TS_001.xf/.tlt of the real files, only the lines ``keep``, as ``folder/NAME.xf``."""
    source = real_file("imod/TS_001/TS_001.xf").parent
    a, d = read_xf(source / "TS_001.xf")
    folder.mkdir(parents=True, exist_ok=True)
    write_xf(folder / f"{name}.xf", a[keep], d[keep])
    (folder / f"{name}.tlt").write_text(format_tlt(read_tlt(source / "TS_001.tlt")[keep]))
    return folder / f"{name}.xf"


def test_imod_file_of_the_enabled_views_only(tmp_path):
    nominal = read_tlt(real_file("imod/TS_001/TS_001.rawtlt"))
    enabled = np.ones(40, bool)
    enabled[[0, 17]] = False
    path = _copy_imod(tmp_path, enabled)
    out, notes = import_one(params(pattern=str(path)), "TS_001", views(nominal, enabled, "TS_001"), acquisition())
    assert out["enabled"].tolist() == enabled.tolist() and notes["aligned_views"] == 38
    assert out.loc[~enabled, "rot_z_deg"].isna().all() and out.loc[enabled, "rot_z_deg"].notna().all()
    np.testing.assert_allclose(out.loc[enabled, "rot_y_deg"], read_tlt(path.with_suffix(".tlt")))


def test_imod_mismatches_name_the_file(tmp_path):
    nominal = read_tlt(real_file("imod/TS_001/TS_001.rawtlt"))
    short = _copy_imod(tmp_path / "short", slice(0, 39))
    with pytest.raises(InputFileError, match="39 transforms, but the tilt series has 40 views") as error:
        import_one(params(pattern=str(short)), "TS_001", views(nominal, ts_id="TS_001"), acquisition())
    assert str(short) in str(error.value)
    full = _copy_imod(tmp_path / "full", slice(None))
    with pytest.raises(InputFileError, match="not belong to these views"):  # a 2-degree scheme is not this one
        import_one(params(pattern=str(full)), "TS_001", views(np.arange(-40.0, 40.0, 2.0), ts_id="TS_001"),
                   acquisition())
    full.with_suffix(".tlt").unlink()
    with pytest.raises(InputFileError, match=r"TS_001\.tlt: file not found"):
        import_one(params(pattern=str(full)), "TS_001", views(nominal, ts_id="TS_001"), acquisition())
    with pytest.raises(InputFileError, match=r"no alignment file for tilt series 'TS_01' \(files matching the "
                                             r"pattern: TS_001\.xf\)"):
        import_one(params(files_directory=str(tmp_path / "full"), pattern="{ts_id}.xf"), "TS_01",
                   views(nominal), acquisition())
    with pytest.raises(InputFileError, match="cannot tell the alignment format"):
        (tmp_path / "TS_01.txt").write_text("1 0 0 1 0 0\n")
        import_one(params(pattern=str(tmp_path / "TS_01.txt")), "TS_01", views(nominal), acquisition())
    with pytest.raises(TomopipeError, match="set files_directory"):
        import_one(params(pattern="{ts_id}.xf"), "TS_01", views(nominal), acquisition())


# ----------------------------------------------------------------------------- round trip on the twin

WORKFLOW = """
[steps.import]
type = "import_movies"
files_directory = "{data}"
[steps.motion]
type = "motion_ctf"
movies = "import.movies"
estimate_ctf = false
[steps.align]
type = "align_tilt_series"
tilt_series = "motion.tilt_series"
patch_size_A = 300.0
point_tracking = false
min_contours = 5
[steps.rec_align]
type = "reconstruct_tomogram"
tilt_series = "align.tilt_series"
thickness_px = 48
super_sampling = 1
device = "cpu"
"""

IMPORTS = """
[steps.from_imod]
type = "import_alignment"
tilt_series = "motion.tilt_series"
files_directory = "{imod}"
pattern = "{{ts_id}}/{{ts_id}}.xf"
[steps.from_binned_imod]
type = "import_alignment"
tilt_series = "motion.tilt_series"
pattern = "{binned}/{{ts_id}}.xf"
alignment_binning = 2.0
[steps.from_aretomo]
type = "import_alignment"
tilt_series = "motion.tilt_series"
pattern = "{aretomo}/{{ts_id}}.aln"
[steps.assign]
type = "assign_alignment"
source = "from_imod.tilt_series"
target = "motion.tilt_series"
[steps.rec_import]
type = "reconstruct_tomogram"
tilt_series = "from_imod.tilt_series"
thickness_px = 48
super_sampling = 1
device = "cpu"
"""


def _items(project_dir: Path, step: str, kind: str = "tilt_series") -> pd.DataFrame:
    with Project.open(project_dir) as project:
        record = project.sets_of_run(project.find_run(step).id)[kind]
        items = project.read_items(record.id)
        if kind == "tomograms":
            items["tomogram_path"] = [str(project.absolute_path(p)) for p in items["tomogram_path"]]
            return items
        return items.sort_values("tilt_index").reset_index(drop=True)


def _write_aln(path: Path, aligned: pd.DataFrame, pixel_size_A: float, binning: int, size_px, dark_position: int):
    """An AreTomo3-style .aln (AreTomo's row formats) of ``aligned`` (views in tilt order) for the stack
    binned by ``binning``: the view at ``dark_position`` dark (its nominal tilt, as AreTomo3 writes it), one
    local patch, AlphaOffset the rows' tilt offset."""
    kept = aligned.drop(index=aligned.index[dark_position])
    dark = aligned.iloc[dark_position]
    px = pixel_size_A * binning
    lines = ["# AreTomo Alignment / Priims bprmMn", f"# RawSize = {size_px[0] // binning} {size_px[1] // binning} "
             f"{len(aligned)}", "# NumPatches = 1",
             "# DarkFrame =  %4d %4d %8.2f" % (dark_position, dark_position + 1, dark["tilt_angle_deg"]),
             "# AlphaOffset = %8.2f" % np.median(kept["rot_y_deg"] - kept["tilt_angle_deg"]),
             "# BetaOffset = %8.2f" % 0.0, "# Thickness = 100",
             "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT"]
    lines += [ROW % (i + 1, r.rot_z_deg, 1.0, r.shift_x_A / px, r.shift_y_A / px, 1, 1, 1, 0, r.rot_y_deg)
              for i, r in enumerate(kept.itertuples())]
    lines += ["# Local Alignment"] + ["%4d %3d %8.2f  %8.2f  %8.2f  %8.2f  %4.1f" % (t, 0, 0, 0, 0.1, -0.1, 1)
                                      for t in range(len(kept))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_round_trip_of_tomopipes_alignment_of_the_twin(tmp_path):
    from tomopipe.simulate import config_from_preset, simulate

    data, project = tmp_path / "data", tmp_path / "project"
    simulate(config_from_preset("tiny", seed=3, dose_per_tilt_e_per_A2=40.0), data, progress=False)
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.format(data=data))
    assert main(["run", str(workflow), "--project", str(project)]) == 0
    assert main(["export", "imod", "--project", str(project), "--out", str(tmp_path / "imod")]) == 0
    aligned = _items(project, "align")
    with Project.open(project) as p:
        acq = p.sets_of_run(p.find_run("align").id)["tilt_series"].attrs["tilt_series"]["TS_01"]
    pixel_size_A, size_px = acq["pixel_size_A"], acq["image_size_px"]
    a, d = read_xf(tmp_path / "imod" / "TS_01" / "TS_01.xf")
    (tmp_path / "binned").mkdir()
    write_xf(tmp_path / "binned" / "TS_01.xf", a, d / 2)
    (tmp_path / "binned" / "TS_01.tlt").write_text((tmp_path / "imod" / "TS_01" / "TS_01.tlt").read_text())
    by_tilt = aligned.sort_values("tilt_angle_deg").reset_index(drop=True)
    _write_aln(tmp_path / "aretomo" / "TS_01.aln", by_tilt, pixel_size_A, 2, size_px, dark_position=4)
    workflow.write_text(WORKFLOW.format(data=data) + IMPORTS.format(imod=tmp_path / "imod", binned=tmp_path / "binned",
                                                                    aretomo=tmp_path / "aretomo"))
    assert main(["run", str(workflow), "--project", str(project)]) == 0

    # IMOD: the files' precision (.xf %12.7f, DX/DY %12.3f px: up to sqrt(2)·0.0005 px per shift component
    # after the rotation; .tlt %7.2f)
    for step, shift_tol_A in (("from_imod", 7.5e-4 * pixel_size_A), ("from_binned_imod", 2 * 7.5e-4 * pixel_size_A)):
        imported = _items(project, step)
        assert imported["enabled"].all() and imported["image_path"].tolist() == aligned["image_path"].tolist()
        np.testing.assert_allclose(imported["rot_z_deg"], aligned["rot_z_deg"], atol=2e-5)
        np.testing.assert_allclose(imported["rot_y_deg"], aligned["rot_y_deg"], atol=0.0051)
        np.testing.assert_allclose(imported["rot_x_deg"], aligned["rot_x_deg"], atol=0.0051)
        np.testing.assert_allclose(imported[["shift_x_A", "shift_y_A"]], aligned[["shift_x_A", "shift_y_A"]],
                                   atol=shift_tol_A)
        np.testing.assert_allclose(imported["magnification"], aligned["magnification"], atol=1e-6)
    assert np.abs(aligned[["shift_x_A", "shift_y_A"]].to_numpy()).max() > 5 * pixel_size_A  # not trivially 0
    assert (aligned["magnification"] - 1).abs().max() > 1e-4  # the magnification round trip is tested

    # AreTomo: ROT %9.4f, TILT %8.2f, TX/TY %9.3f px at binning 2; the dark view disabled
    imported = _items(project, "from_aretomo").set_index("tilt_index")
    dark_index = int(by_tilt["tilt_index"].iloc[4])
    assert not imported.loc[dark_index, "enabled"] and imported.loc[dark_index, list(ALIGNMENT_GEOMETRY)].isna().all()
    kept = aligned.set_index("tilt_index").drop(index=dark_index)
    got = imported.drop(index=dark_index)
    assert got["enabled"].all()
    np.testing.assert_allclose(got["rot_z_deg"], kept["rot_z_deg"], atol=6e-5)
    np.testing.assert_allclose(got["rot_y_deg"], kept["rot_y_deg"], atol=0.0051)
    np.testing.assert_allclose(got[["shift_x_A", "shift_y_A"]], kept[["shift_x_A", "shift_y_A"]],
                               atol=6e-4 * 2 * pixel_size_A)
    with Project.open(project) as p:
        summary = p.find_run("from_aretomo").summary
    assert summary["alignment_pixel_size_A"]["TS_01"] == pytest.approx(2 * pixel_size_A)
    assert "local alignment (1 patches per view)" in summary["not_imported"]["TS_01"]

    # the same tomogram from the imported alignment; assign_alignment and the RELION export run on it
    rec_align, rec_import = (read_mrc(_items(project, s, "tomograms")["tomogram_path"][0])[0]
                             for s in ("rec_align", "rec_import"))
    assert np.corrcoef(rec_align.ravel(), rec_import.ravel())[0, 1] > 0.9999
    assigned = _items(project, "assign")
    np.testing.assert_array_equal(assigned["rot_z_deg"], _items(project, "from_imod")["rot_z_deg"])
    assert main(["export", "relion5", "--project", str(project), "--out", str(tmp_path / "relion")]) == 0
    star = read_tilt_series_star(tmp_path / "relion" / "tilt_series" / "TS_01.star").sort_values(
        "rlnTomoNominalStageTiltAngle")
    np.testing.assert_allclose(star["rlnTomoZRot"], _items(project, "from_imod")["rot_z_deg"], atol=1e-4)
    assert math.isfinite(float(star["rlnTomoXShiftAngst"].abs().max()))
