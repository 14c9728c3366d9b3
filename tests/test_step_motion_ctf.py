"""The ``motion_ctf`` step end to end: movies + mdoc + gain on disk -> import_movies -> motion_ctf.

The movies are a CTF-modulated random texture (Thon rings at a known defocus) moved by a known
sub-pixel trajectory per tilt, divided by a gain and sampled with Poisson noise, so that the
gain-corrected frames have the expected counts. The step's stored trajectories are compared
with the truth; its stacks, items and attributes are checked against the project contracts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.motion import MotionModel, fourier_shift_2d, frame_times
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.mdoc import write_mdoc
from tomopipe.io.movies import write_movie
from tomopipe.io.mrc import read_mrc, write_mrc
from tomopipe.project.store import Project
from tomopipe.steps.motion_ctf import process_tilt_series

PIXEL_A = 1.0
DEFOCUS_A = 10000.0
TILTS_DEG = (0.0, 3.0, -3.0)  # acquisition order


def _texture(size: int, seed: int) -> torch.Tensor:
    """Zero-mean unit-SD texture: low-pass noise (for the alignment) + CTF-filtered noise (Thon rings)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.fft.rfft2(torch.randn(size, size, generator=g, dtype=torch.float64))
    k = torch.sqrt(torch.fft.fftfreq(size, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(size, dtype=torch.float64)[None, :] ** 2) / PIXEL_A
    ctf = ctf_2d((size, size), PIXEL_A, DEFOCUS_A, DEFOCUS_A, 0.0, 300.0, 2.7, 0.1, rfft=True).to(torch.float64)
    texture = torch.fft.irfft2(spectrum * (torch.exp(-((k * 40.0) ** 2)) * 3.0 + ctf), s=(size, size))
    return (texture - texture.mean()) / texture.std()


def _trajectory_px(n_frames: int, scale: float) -> torch.Tensor:
    t = frame_times(n_frames)
    traj = torch.stack([scale * 3.5 * (1 - torch.exp(-t / 0.4)), -scale * 2.0 * t - 0.5 * t**2], dim=-1)
    return traj - traj.mean(0)


def write_synthetic_acquisition(folder: Path, size: int = 256, n_frames: int = 6, counts: float = 1.5,
                                dose_per_tilt: float = 3.0, gain_size: int | None = None, seed: int = 0) -> dict:
    """One tilt series TS_01 (movies, mdoc, gain) and its true per-frame shifts (x, y) Å by tilt angle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gain_size = gain_size or size
    gain = rng.uniform(0.8, 1.25, size=(gain_size, gain_size)).astype(np.float32)
    write_mrc(folder / "gain.mrc", gain, PIXEL_A)
    truth, sections = {}, []
    for index, angle in enumerate(TILTS_DEG):
        frames_here = n_frames
        texture = _texture(size, seed + index)
        trajectory = _trajectory_px(frames_here, 1.0 + 0.4 * index)
        expected = [counts * (1 + 0.25 * fourier_shift_2d(texture, trajectory[f])).clamp_min(0)
                    for f in range(frames_here)]
        expected = torch.stack(expected).numpy()
        raw = rng.poisson(expected / gain[:size, :size] if gain_size == size else expected).astype(np.uint8)
        name = f"TS_01_{index + 1:03d}_{angle:.1f}.tif"
        write_movie(folder / name, raw)
        truth[angle] = (trajectory * PIXEL_A).float()
        sections.append({"TiltAngle": angle, "ExposureDose": dose_per_tilt, "PixelSpacing": PIXEL_A,
                         "NumSubFrames": frames_here, "SubFramePath": f"X:\\frames\\{name}",
                         "DateTime": f"24-Nov-26  10:{index:02d}:00", "TargetDefocus": -DEFOCUS_A / 1e4})
    write_mdoc(folder / "TS_01.mdoc", {"PixelSpacing": PIXEL_A, "Voltage": 300, "ImageFile": "TS_01.mrc",
                                       "ImageSize": [size, size]},
               ["[T = SerialEM: synthetic]", "[T =     Tilt axis angle = 85.0, binning = 1  spot = 8  camera = 0]"],
               sections)
    return truth


WORKFLOW = """
[workflow]
name = "motion_test"

[steps.import]
type = "import_movies"
files_directory = "{data}"
gain_image = "{data}/gain.mrc"

[steps.motion]
type = "motion_ctf"
movies = "import.movies"
{motion}
"""


def run_steps(tmp_path: Path, data: Path, motion_params: str):
    workflow = tmp_path / "wf.toml"
    workflow.write_text(WORKFLOW.format(data=data, motion=motion_params))
    with Project.open_or_init(tmp_path / "project") as project:
        report = run_workflow(project, load_workflow(workflow), LocalExecutor(1), echo=lambda *_: None)
    return report, tmp_path / "project"


def _rms_A(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum(-1).mean().sqrt())


def test_motion_step_matches_the_true_trajectories(tmp_path):
    data = tmp_path / "data"
    truth = write_synthetic_acquisition(data)
    report, project_dir = run_steps(tmp_path, data, "binning_factor = 2.0\neven_odd = true\nestimate_ctf = false")
    assert [o.status for o in report.outcomes] == ["finished", "finished"], report.outcomes[-1].message
    with Project.open(project_dir) as project:
        run = project.find_run("motion")
        sets = project.sets_of_run(run.id)
        assert set(sets) == {"tilt_series"}  # no ctf set without estimate_ctf
        record = sets["tilt_series"]
        items = project.read_items(record.id)
        stack_path = project.absolute_path(items["image_path"].iloc[0])
        motion_path = project.absolute_path(items["motion_path"].iloc[0])
        even_path = project.absolute_path(items["image_even_path"].iloc[0])
        odd_path = project.absolute_path(items["image_odd_path"].iloc[0])
        attrs = record.attrs
    # items: sorted by tilt angle, movie columns gone, the per-tilt columns kept
    assert items["tilt_angle_deg"].tolist() == [-3.0, 0.0, 3.0]
    assert items["image_section"].tolist() == [0, 1, 2] and items["tilt_index"].tolist() == [0, 1, 2]
    assert "movie_path" not in items.columns and "frame_count" not in items.columns
    for column in ("acquisition_order", "pre_exposure_e_per_A2", "accumulated_dose_e_per_A2", "dose_e_per_A2",
                   "motion_total_A", "motion_significant"):
        assert column in items.columns
    assert items["motion_significant"].all()
    acquisition = attrs["tilt_series"]["TS_01"]
    assert acquisition["pixel_size_A"] == pytest.approx(2.0) and acquisition["image_size_px"] == [128, 128]
    assert "frame_count" not in acquisition and attrs["dose_weighted"] is True
    # the stack: binned sums, one per tilt, in tilt_index order
    stack, voxel_A = read_mrc(stack_path)
    assert stack.shape == (3, 128, 128) and voxel_A == pytest.approx(2.0)
    even, _ = read_mrc(even_path)
    odd, _ = read_mrc(odd_path)
    assert np.allclose(even + odd, stack, atol=1e-3 * float(np.abs(stack).max()))
    assert float(stack.mean()) == pytest.approx(6 * 1.5, rel=0.05)  # 6 frames x 1.5 counts/px after the gain
    # trajectories vs the truth, read from the stored model and the CSV table
    document = json.loads(motion_path.read_text())
    table = pd.read_csv(motion_path.with_suffix(".csv"))
    for entry, (_, row) in zip(document["tilts"], items.iterrows()):
        model = MotionModel.from_dict(entry)
        true_A = truth[row["tilt_angle_deg"]]
        assert _rms_A(model.shifts_A, true_A) <= 0.5, (row["tilt_angle_deg"], model.shifts_A, true_A)
        rows = table[table["tilt_index"] == row["tilt_index"]]
        assert np.allclose(rows[["shift_x_A", "shift_y_A"]].to_numpy(), model.shifts_A.numpy(), atol=1e-4)
        assert row["motion_total_A"] > 3.0
    # frame doses: pre-exposure of the tilt + 0.5 e/Å² per frame (3 e/Å² over 6 frames), end of frame
    first = items[items["tilt_angle_deg"] == 3.0].iloc[0]  # acquired second: 3 e/Å² before it
    doses = table[table["tilt_index"] == first["tilt_index"]]["accumulated_dose_e_per_A2"].to_numpy()
    assert np.allclose(doses, 3.0 + 0.5 * np.arange(1, 7))


def test_one_frame_movie_fails_naming_the_movie(tmp_path):
    data = tmp_path / "data"
    write_synthetic_acquisition(data, size=128, n_frames=1)  # the import accepts it, motion correction cannot
    report, _ = run_steps(tmp_path, data, "estimate_ctf = false")
    assert [o.status for o in report.outcomes] == ["finished", "failed"]
    message = report.outcomes[1].message
    assert "TS_01_003_-3.0.tif: holds 1 frame: motion correction needs a movie of at least 2 frames" in message


def test_gain_of_the_wrong_size_is_refused(tmp_path):
    data = tmp_path / "data"
    write_synthetic_acquisition(data, size=128, gain_size=160)
    wrong_gain = data / "gain.mrc"
    task = {"ts_id": "TS_01",
            "tilts": [{"tilt_index": 0, "tilt_angle_deg": 0.0, "movie_path": str(data / "TS_01_001_0.0.tif"),
                       "dose_e_per_A2": 3.0, "pre_exposure_e_per_A2": 0.0}],
            "acquisition": {"pixel_size_A": PIXEL_A, "voltage_kV": 300.0, "tilt_axis_angle_deg": 85.0,
                            "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.1},
            "gain_path": str(wrong_gain), "folder": str(tmp_path),
            "params": {"device": "cpu", "estimate_ctf": False, "use_movie_average": False, "motion_grid_x": 1,
                       "motion_grid_y": 1, "motion_grid_temporal": 3, "fit_resolution_min_A": 500.0,
                       "fit_resolution_max_A": 10.0, "b_factor_A2": -500.0, "dose_weighting": True,
                       "binning_factor": 1.0, "even_odd": False}}
    with pytest.raises(InputFileError, match=r"gain\.mrc: gain is 160 x 160 px but the frames of "
                                             r"TS_01_001_0\.0\.tif are 128 x 128 px"):
        process_tilt_series(task)
    # the import step refuses it too, before any motion correction
    report, _ = run_steps(tmp_path, data, "estimate_ctf = false")
    assert report.outcomes[0].status == "failed" and "gain is 160 x 160 px" in report.outcomes[0].message


def test_parameter_checks(tmp_path):
    data = tmp_path / "data"
    write_synthetic_acquisition(data, size=64, n_frames=2)
    report, _ = run_steps(tmp_path, data, "fit_resolution_min_A = 5.0\nfit_resolution_max_A = 10.0")
    assert report.outcomes[1].status == "failed"
    assert "fit_resolution_min_A (5.0) must be larger" in report.outcomes[1].message


def test_defocus_hand_parameter_and_needed_acquisition_values(tmp_path):
    from tomopipe.steps.motion_ctf import missing_acquisition_values

    data = tmp_path / "data"
    write_synthetic_acquisition(data, size=64, n_frames=2)
    with pytest.raises(InputFileError, match="'defocus_hand': '2' is not one of 'auto', '-1', '1'"):
        run_steps(tmp_path, data, "defocus_hand = 2")
    acquisition = {"pixel_size_A": 1.0, "voltage_kV": 300.0, "tilt_axis_angle_deg": None,
                   "spherical_aberration_mm": float("nan"), "amplitude_contrast": 0.1}
    assert missing_acquisition_values(acquisition, {"estimate_ctf": True}) == ["tilt_axis_angle_deg",
                                                                               "spherical_aberration_mm"]
    assert missing_acquisition_values(acquisition, {"estimate_ctf": False}) == []
    assert missing_acquisition_values({"pixel_size_A": 1.0}, {"estimate_ctf": False}) == ["voltage_kV"]


def test_hand_summary_warnings():
    """Warnings: a given hand against a clear detection, auto without a clear hand, tilt series
    that clearly disagree; none for a clear detection that was used."""
    from tomopipe.steps.motion_ctf import hand_summary

    def evidence(hand, clear, used, source, n=12):
        return {"hand": hand, "clear": clear, "hand_used": used, "source": source, "p_value": 0.001 if clear else 0.3,
                "t_statistic": 5.0 * hand, "tilts_agreeing": n if clear else n // 2 + 1, "tilts_used": n,
                "min_tilt_deg": 9.5}

    entries, warnings = hand_summary({"TS_01": evidence(1, True, 1, "detected")}, "auto")
    assert warnings == [] and entries["TS_01"]["used"] == 1 and entries["TS_01"]["tilts_agreeing"] == 12
    _, warnings = hand_summary({"TS_01": evidence(1, True, -1, "given")}, "-1")
    assert warnings == ["TS_01: defocus_hand = -1 was used, but the data clearly support +1 (p = 0.001, t = 5.0, "
                        "12 of 12 tilts with |tilt| >= 9.5 deg agree)"]
    _, warnings = hand_summary({"TS_01": evidence(1, False, -1, "given")}, "-1")
    assert warnings == []  # unclear data do not contradict a given hand
    unclear = {"TS_01": evidence(1, False, -1, "default"), "TS_02": evidence(0, False, -1, "default", 0),
               "TS_03": evidence(0, False, -1, "default", 2)}
    _, warnings = hand_summary(unclear, "auto")
    assert warnings[0].startswith("TS_01: the defocus handedness is not clear from the data (p = 0.3")
    assert "(no tilt with |tilt| >= 9.5 deg)" in warnings[1] and len(warnings) == 3
    assert "(both hands fit the 2 tilts with |tilt| >= 9.5 deg equally)" in warnings[2]
    _, warnings = hand_summary({"TS_01": evidence(1, True, 1, "detected"), "TS_02": evidence(-1, True, -1, "detected")},
                               "auto")
    assert warnings == ["the tilt series clearly disagree on the defocus handedness ({'TS_01': 1, 'TS_02': -1}), a "
                        "property of the microscope: check their tilt angles and tilt axes"]


def test_eer_grouping_and_frame_dose_fractions(tmp_path):
    from tomopipe.steps.motion_ctf import eer_frames_per_group, read_frames

    assert eer_frames_per_group(400, 4.0, 16, None) == 16  # the seed's EER fraction
    assert eer_frames_per_group(10, 4.0, 16, None) == 10  # never more than the movie has
    assert eer_frames_per_group(400, 4.0, 16, 0.2) == 20  # 0.01 e/Å² per EER frame -> 20 per 0.2 e/Å² group
    assert eer_frames_per_group(400, 4.0, 16, 100.0) == 400
    with pytest.raises(TomopipeError, match="needs the dose of the tilt"):
        eer_frames_per_group(400, 0.0, 16, 0.2)
    movie = tmp_path / "m.mrc"
    write_movie(movie, np.ones((4, 16, 16), dtype=np.uint8))
    frames, fraction = read_frames(movie, 3.0, {"eer_fraction": 16, "eer_group_exposure_e_per_A2": None})
    assert frames.shape == (4, 16, 16) and np.allclose(fraction, [0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("use_movie_average", [False, True])
def test_ctf_of_the_aligned_tilts(tmp_path, use_movie_average):
    """The ctf set: one row per enabled tilt in tilt order, the seed's settings passed through to
    ``estimate_tilt_series_ctf``, the diagnostic spectra written. (Accuracy against a true defocus:
    the simulated-tiny test below.)"""
    from tomopipe.algorithms.ctf_estimate import estimate_tilt_series_ctf

    data = tmp_path / "data"
    write_synthetic_acquisition(data, n_frames=4, counts=2.0)
    report, project_dir = run_steps(tmp_path, data, f"ctf_window_px = 128\nuse_movie_average = "
                                                    f"{str(use_movie_average).lower()}")
    assert [o.status for o in report.outcomes] == ["finished", "finished"], report.outcomes[-1].message
    with Project.open(project_dir) as project:
        sets = project.sets_of_run(project.find_run("motion").id)
        ctf = project.read_items(sets["ctf"].id)
        tilt_series = project.read_items(sets["tilt_series"].id)
        spectra_path = project.absolute_path(ctf["diagnostic_path"].iloc[0])
        stack_path = project.absolute_path(tilt_series["image_path"].iloc[0])
        attrs = sets["ctf"].attrs
    assert ctf["tilt_angle_deg"].tolist() == tilt_series["tilt_angle_deg"].tolist() == [-3.0, 0.0, 3.0]
    assert ctf["tilt_index"].tolist() == [0, 1, 2] and ctf["diagnostic_section"].tolist() == [0, 1, 2]
    for column in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "fit_resolution_A", "fit_score"):
        assert np.all(np.isfinite(ctf[column])), column
    assert np.all(ctf["defocus_u_A"] >= ctf["defocus_v_A"]) and np.all(ctf["phase_shift_deg"] == 0)
    assert np.all((ctf["defocus_v_A"] >= 5000) & (ctf["defocus_u_A"] <= 80000))  # the seed's 0.5-8 µm
    assert np.array(json.loads(ctf["defocus_grid_A"].iloc[0])).shape == (2, 2)  # the seed's 2 x 2 grid
    assert attrs["tilt_series"]["TS_01"]["pixel_size_A"] == pytest.approx(1.0)
    # tilts of 0 and ±3° cannot tell the defocus hand: auto fits with -1 and says so
    hand = attrs["handedness"]["TS_01"]
    assert hand["source"] == "default" and hand["tilts_used"] == 0 and not hand["clear"]
    assert ctf["defocus_hand"].tolist() == [-1, -1, -1] and attrs["tilt_series"]["TS_01"]["defocus_hand"] == -1
    summary = report.outcomes[1].summary
    assert summary["defocus_hand"]["TS_01"]["used"] == -1 and summary["defocus_hand"]["TS_01"]["source"] == "default"
    assert any("TS_01: the defocus handedness is not clear" in w and "no tilt with |tilt| >= 9.5 deg" in w
               for w in summary["warnings"])
    spectra, _ = read_mrc(spectra_path)
    assert spectra.shape == (3, 128, 128)
    if use_movie_average:  # the step fitted exactly the stored sums with the seed's settings
        stack, _ = read_mrc(stack_path)
        direct = estimate_tilt_series_ctf(torch.from_numpy(stack), PIXEL_A, torch.tensor([-3.0, 0.0, 3.0]), 85.0,
                                          300.0, 2.7, 0.1, window_px=128, resolution_range_A=(30.0, 7.0),
                                          defocus_range_A=(5000.0, 80000.0), defocus_grid=(2, 2), fit_phase=False)
        assert np.allclose(ctf["defocus_u_A"], direct.defocus_u_A.numpy(), rtol=1e-4)
        assert np.allclose(ctf["defocus_v_A"], direct.defocus_v_A.numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def simulated_tiny(tmp_path_factory):
    """The digital twin's ``tiny`` preset: 3 tilts, a larger drift (so that 'no motion' is clearly
    wrong) and 8 e/Å² per tilt: at the preset's 2.64 e/Å² a 256² px frame of 4 frames holds too
    little signal to align single frames (the step then reports the motion as not significant)."""
    from tomopipe.simulate import config_from_preset, simulate

    folder = tmp_path_factory.mktemp("tiny")
    simulate(config_from_preset("tiny", tilt_min_deg=-6.0, tilt_max_deg=6.0, drift_A=8.0, dose_per_tilt_e_per_A2=8.0),
             folder, progress=False)
    return folder


def test_simulated_tiny_import_then_motion_ctf(tmp_path, simulated_tiny):
    truth_dir = simulated_tiny / "truth"
    workflow = tmp_path / "wf.toml"
    workflow.write_text(f"""
[steps.import]
type = "import_movies"
files_directory = "{simulated_tiny}"
gain_image = "{simulated_tiny}/gain_ref.mrc"
gain_flip_y = true          # the twin stores its gain upside down (truth/README.md)
tilt_axis_angle_deg = -85.6

[steps.motion]
type = "motion_ctf"
movies = "import.movies"
ctf_window_px = 128
use_movie_average = true    # at tiny's dose the summed frame spectra have 4x weaker Thon rings
""")
    with Project.open_or_init(tmp_path / "project") as project:
        report = run_workflow(project, load_workflow(workflow), LocalExecutor(1), echo=lambda *_: None)
        assert [o.status for o in report.outcomes] == ["finished", "finished"], report.outcomes[-1].message
        sets = project.sets_of_run(project.find_run("motion").id)
        items = project.read_items(sets["tilt_series"].id)
        ctf = project.read_items(sets["ctf"].id)
        document = json.loads(project.absolute_path(items["motion_path"].iloc[0]).read_text())
    shifts = pd.read_csv(truth_dir / "TS_01_frame_shifts.csv")
    tilts = pd.read_csv(truth_dir / "TS_01_tilts.csv")
    errors, still = [], []
    for entry, (_, row) in zip(document["tilts"], items.iterrows()):
        truth = shifts[shifts["acquisition_index"] == row["acquisition_order"]].sort_values("frame")
        true_tilt = tilts[tilts["acquisition_index"] == row["acquisition_order"]].iloc[0]
        assert row["tilt_angle_deg"] == pytest.approx(true_tilt["nominal_tilt_deg"], abs=0.01)
        true_A = truth[["shift_x_A", "shift_y_A"]].to_numpy()
        true_A = true_A - true_A.mean(0)  # the twin refers to frame 0, we to the mean position
        model = MotionModel.from_dict(entry)
        assert model.significant
        errors.append(((model.shifts_A.numpy() - true_A) ** 2).sum(1))
        still.append((true_A**2).sum(1))
    rms_A = float(np.sqrt(np.mean(errors)))
    no_motion_rms_A = float(np.sqrt(np.mean(still)))
    # tiny is 256 px at 3.16 Å/px with 4 frames: shot noise limits the precision to ~0.4-0.8 Å here
    # (the small preset reaches ~0.2 Å at its own dose, benchmarks/bench_motion.py)
    assert rms_A <= 1.0 and rms_A < 0.5 * no_motion_rms_A, (rms_A, no_motion_rms_A)
    # the CTF of each tilt (fitted on the aligned sum) lands on the true defocus at its centre
    true_defocus = [float(tilts[tilts["acquisition_index"] == a]["defocus_centre_A"].iloc[0])
                    for a in items["acquisition_order"]]
    fitted = ((ctf["defocus_u_A"] + ctf["defocus_v_A"]) / 2).to_numpy()
    assert ctf["tilt_angle_deg"].tolist() == items["tilt_angle_deg"].tolist()
    assert np.all(np.abs(fitted - true_defocus) < 1000), (fitted, true_defocus)


@pytest.mark.slow
@pytest.mark.parametrize("true_hand", [-1, 1])
def test_defocus_hand_auto_finds_the_twins_hand(tmp_path, one_thread, true_hand):
    """The digital twin with either defocus handedness (tiny, but 512² px and tilts to ±60° in 10°
    steps: the defocus varies by ±900 Å across the field at 60°): ``defocus_hand = auto`` finds
    it clearly and fits with it (and the RELION export says so); the hand fixed to the other sign
    is used as given, with a warning that the data clearly support the true one."""
    from tomopipe.export import export_project
    from tomopipe.io.star import read_star
    from tomopipe.simulate import config_from_preset, simulate

    data = tmp_path / "twin"
    simulate(config_from_preset("tiny", image_width_px=512, image_height_px=512, tilt_min_deg=-60.0,
                                tilt_max_deg=60.0, tilt_step_deg=10.0, dose_per_tilt_e_per_A2=8.0,
                                defocus_handedness=true_hand), data, progress=False)
    workflow = tmp_path / "wf.toml"
    workflow.write_text(f"""
[steps.import]
type = "import_movies"
files_directory = "{data}"
gain_image = "{data}/gain_ref.mrc"
gain_flip_y = true          # the twin stores its gain upside down (truth/README.md)
[steps.motion_fixed]
type = "motion_ctf"
movies = "import.movies"
ctf_window_px = 128
use_movie_average = true
defocus_hand = "{-true_hand}"
[steps.motion]
type = "motion_ctf"
movies = "import.movies"
ctf_window_px = 128
use_movie_average = true
""")
    with Project.open_or_init(tmp_path / "project") as project:
        report = run_workflow(project, load_workflow(workflow), LocalExecutor(1), echo=lambda *_: None)
        assert [o.status for o in report.outcomes] == ["finished"] * 3, [o.message for o in report.outcomes]
        sets = {step: project.sets_of_run(project.find_run(step).id) for step in ("motion", "motion_fixed")}
        ctf = {step: project.read_items(s["ctf"].id) for step, s in sets.items()}
        export_project(project, "relion5", tmp_path / "relion5")  # the newest sets: the auto run's
    assert read_star(tmp_path / "relion5" / "tilt_series.star")["global"]["rlnTomoHand"].tolist() == [true_hand]
    summary = {o.name: o.summary for o in report.outcomes}
    hand = sets["motion"]["ctf"].attrs["handedness"]["TS_01"]
    assert hand["hand"] == hand["hand_used"] == true_hand and hand["source"] == "detected"
    assert hand["clear"] and hand["p_value"] <= 0.01 and hand["tilts_used"] == 12
    assert hand["tilts_agreeing"] >= 11  # the sign test's p <= 0.01 needs 11 of 12
    assert ctf["motion"]["defocus_hand"].eq(true_hand).all()
    for kind in ("ctf", "tilt_series"):  # the attribute the later steps read
        assert sets["motion"][kind].attrs["tilt_series"]["TS_01"]["defocus_hand"] == true_hand
    assert summary["motion"]["defocus_hand"]["TS_01"]["used"] == true_hand and "warnings" not in summary["motion"]
    # the opposite hand, given: used, reported against the data, warned about
    fixed = sets["motion_fixed"]["ctf"].attrs["handedness"]["TS_01"]
    assert fixed["hand_used"] == -true_hand and fixed["source"] == "given" and fixed["hand"] == true_hand
    assert ctf["motion_fixed"]["defocus_hand"].eq(-true_hand).all()
    assert summary["motion_fixed"]["warnings"] == [
        f"TS_01: defocus_hand = {-true_hand} was used, but the data clearly support {true_hand:+d} "
        f"(p = {fixed['p_value']:.2g}, t = {fixed['t_statistic']:.1f}, {fixed['tilts_agreeing']} of 12 tilts with "
        f"|tilt| >= 9.5 deg agree)"]
    # fitted with the detected hand, the defocus lands on the truth
    with Project.open(tmp_path / "project") as project:
        items = project.read_items(sets["motion"]["tilt_series"].id)
    tilts = pd.read_csv(data / "truth" / "TS_01_tilts.csv")
    merged = ctf["motion"].merge(items[["tilt_index", "acquisition_order"]], on="tilt_index").merge(
        tilts[["acquisition_index", "defocus_centre_A"]], left_on="acquisition_order", right_on="acquisition_index")
    error_A = ((merged["defocus_u_A"] + merged["defocus_v_A"]) / 2 - merged["defocus_centre_A"]).abs()
    assert len(merged) == 13 and error_A.median() < 200.0, error_A


def test_xray_hits_are_replaced_in_the_frames_before_the_alignment(tmp_path):
    """Hits injected into single frames of one movie: with ``remove_frame_outliers`` (default) the step
    replaces exactly their pixels (``frame_outlier_pixels``) and the sum shows no trace of them; turned
    off, they stay in the sum."""
    from tomopipe.io.movies import read_movie

    data = tmp_path / "data"
    write_synthetic_acquisition(data, size=128, n_frames=6)
    movie = data / "TS_01_002_3.0.tif"
    frames = read_movie(movie).astype(np.int64)
    hits = [(1, 40, 50, 120), (1, 40, 51, 60), (4, 90, 30, 200), (2, 70, 100, 80)]  # frame, y, x, counts
    for frame, y, x, counts in hits:
        frames[frame, y, x] += counts
    write_movie(movie, np.minimum(frames, 255).astype(np.uint8))
    sums = {}
    for flag in ("true", "false"):
        (tmp_path / flag).mkdir()
        report, project_dir = run_steps(tmp_path / flag, data, f"estimate_ctf = false\nremove_frame_outliers = {flag}")
        assert [o.status for o in report.outcomes] == ["finished", "finished"], report.outcomes[-1].message
        with Project.open(project_dir) as project:
            items = project.read_items(project.sets_of_run(project.find_run("motion").id)["tilt_series"].id)
            stack, _ = read_mrc(project.absolute_path(items["image_path"].iloc[0]))
        section = int(items.loc[items["tilt_angle_deg"] == 3.0, "image_section"].iloc[0])
        sums[flag] = stack[section].astype(np.float64)
        pixels = dict(zip(items["tilt_angle_deg"], items["frame_outlier_pixels"]))
        if flag == "true":  # the hits' pixels, and perhaps a neighbour (the frame step grows hits loosely)
            assert pixels[-3.0] == pixels[0.0] == 0 and len(hits) <= pixels[3.0] <= len(hits) + 2, pixels
        else:
            assert pixels == {-3.0: 0, 0.0: 0, 3.0: 0}
    background_sd = np.sqrt(6 * 1.5)  # 6 frames of 1.5 counts
    for _, y, x, counts in hits:  # the hits move with their frame's shift (<= 5 px) in the aligned sum
        window = (slice(y - 6, y + 7), slice(x - 6, x + 7))
        assert (sums["false"] - sums["true"])[window].max() > 0.3 * counts  # it was there ...
        assert (sums["true"][window] - sums["true"].mean()).max() < 6 * background_sd  # ... and is gone
