"""The import step: values against the files, user overrides, acquisition order, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import write_acquisition
from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_workflow
from tomopipe.engine.workflow import load_workflow
from tomopipe.io.movies import write_movie
from tomopipe.io.mrc import write_mrc
from tomopipe.project.store import Project

ACQUISITION_ORDER = (0.0, 3.0, -3.0, -6.0, 6.0)  # dose-symmetric in groups of one


def _import(tmp_path, data, **params):
    lines = ['[steps.import]', 'type = "import_movies"', f'files_directory = "{data}"']
    lines += [f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
              for key, value in params.items()]
    workflow = tmp_path / "wf.toml"
    workflow.write_text("\n".join(lines) + "\n")
    project_dir = tmp_path / "project"
    if project_dir.exists():
        shutil.rmtree(project_dir)
    with Project.init(project_dir) as project:
        report = run_workflow(project, load_workflow(workflow), LocalExecutor(1), echo=lambda *_: None)
        outcome = report.outcomes[0]
        if outcome.status != "finished":
            return outcome, None, None
        record = project.sets_of_run(outcome.run.id)["movies"]
        return outcome, project.read_items(record.id), record.attrs


def test_values_come_from_the_mdoc(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_angles=ACQUISITION_ORDER, dose_per_tilt=2.64,
                             pixel_size_A=0.79, tilt_axis_deg=-94.4)
    outcome, items, attrs = _import(tmp_path, data)
    assert outcome.status == "finished", outcome.message
    assert sorted(attrs["tilt_series"]) == ["TS_01", "TS_02"]
    acquisition = attrs["tilt_series"]["TS_01"]
    assert acquisition["pixel_size_A"] == 0.79 and acquisition["voltage_kV"] == 300
    # TIFF frames are flipped along Y on read: the axis of the arrays is 180 - the mdoc's angle
    assert acquisition["tilt_axis_angle_deg"] == pytest.approx(-85.6)
    assert acquisition["image_size_px"] == [32, 32] and acquisition["frame_count"] == 2
    ts = items[items["ts_id"] == "TS_01"]
    # items are sorted by tilt angle; the order of acquisition comes from DateTime
    assert ts["tilt_angle_deg"].tolist() == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert ts["tilt_index"].tolist() == [0, 1, 2, 3, 4]
    assert ts["acquisition_order"].tolist() == [3, 2, 0, 1, 4]
    np.testing.assert_allclose(ts["pre_exposure_e_per_A2"], np.array([3, 2, 0, 1, 4]) * 2.64)
    np.testing.assert_allclose(ts["accumulated_dose_e_per_A2"], (np.array([3, 2, 0, 1, 4]) + 1) * 2.64)
    assert ts["movie_path"].str.endswith(".tif").all() and (ts["frame_count"] == 2).all()
    assert outcome.summary["tilts"] == 10


def test_user_values_win(tmp_path):
    data = write_acquisition(tmp_path / "data", pixel_size_A=0.79, dose_per_tilt=2.64)
    outcome, items, attrs = _import(tmp_path, data, pixel_size_A=1.5, tilt_axis_angle_deg=85.0, voltage_kV=200.0,
                                    dose_per_tilt_e_per_A2=3.0, initial_dose_e_per_A2=1.0)
    acquisition = attrs["tilt_series"]["TS_02"]
    assert (acquisition["pixel_size_A"], acquisition["tilt_axis_angle_deg"],
            acquisition["voltage_kV"]) == (1.5, 85.0, 200.0)
    assert np.allclose(items["dose_e_per_A2"], 3.0) and items["pre_exposure_e_per_A2"].min() == 1.0


def test_mrc_movies_keep_the_mdoc_axis(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_axis_deg=-85.6, movie_suffix=".mrc")
    outcome, items, attrs = _import(tmp_path, data)
    assert outcome.status == "finished", outcome.message
    assert attrs["tilt_series"]["TS_01"]["tilt_axis_angle_deg"] == pytest.approx(-85.6)
    assert items["movie_path"].str.endswith(".mrc").all()


def test_tomo5_axis_conversion(tmp_path):
    data = write_acquisition(tmp_path / "data", tilt_axis_deg=-4.0, movie_suffix=".mrc")
    _, _, attrs = _import(tmp_path, data, tomo5_mdoc=True)
    assert attrs["tilt_series"]["TS_01"]["tilt_axis_angle_deg"] == pytest.approx(-86.0)


def test_gain_is_oriented_and_checked(tmp_path):
    data = write_acquisition(tmp_path / "data", size=32)
    gain = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1024 + 0.5
    write_mrc(tmp_path / "gain.mrc", gain, voxel_size_A=2.0)
    outcome, _, attrs = _import(tmp_path, data, gain_image=str(tmp_path / "gain.mrc"), gain_flip_y=True)
    assert outcome.status == "finished", outcome.message
    from tomopipe.io.mrc import read_mrc

    with Project.open(tmp_path / "project") as project:
        stored, _ = read_mrc(project.absolute_path(attrs["gain_path"]))
    np.testing.assert_array_equal(stored, gain[::-1])
    write_mrc(tmp_path / "small_gain.mrc", gain[:16], voxel_size_A=2.0)
    outcome, _, _ = _import(tmp_path, data, gain_image=str(tmp_path / "small_gain.mrc"))
    assert outcome.status == "failed" and "small_gain.mrc" in outcome.message and "32 x 16" in outcome.message


@pytest.mark.parametrize("damage, expected", [
    ("missing_movie", "is missing"),
    ("frame_mismatch", "all tilts of a tilt series must match"),
    ("size_mismatch", "all tilts of a tilt series must match"),
    ("no_tilt_angle", "TiltAngle"),
    ("corrupt_movie", "TS_01_001_0.0.tif"),
    ("no_pixel_size", "pixel size"),
])
def test_bad_input_is_named_and_leaves_the_project_clean(tmp_path, damage, expected):
    data = write_acquisition(tmp_path / "data", ts_names=("TS_01",), tilt_angles=(0.0, 3.0, -3.0))
    mdoc = data / "TS_01.mdoc"
    if damage == "missing_movie":
        (data / "TS_01_002_3.0.tif").unlink()
    elif damage == "frame_mismatch":
        write_movie(data / "TS_01_002_3.0.tif", np.ones((3, 32, 32), np.uint8))
    elif damage == "size_mismatch":
        write_movie(data / "TS_01_002_3.0.tif", np.ones((2, 32, 16), np.uint8))
    elif damage == "no_tilt_angle":
        mdoc.write_text("\n".join(line for line in mdoc.read_text().splitlines()
                                  if not line.startswith("TiltAngle = 3")) + "\n")
    elif damage == "corrupt_movie":
        (data / "TS_01_001_0.0.tif").write_bytes(b"not a tiff at all")
    elif damage == "no_pixel_size":
        mdoc.write_text("\n".join(line for line in mdoc.read_text().splitlines()
                                  if not line.startswith("PixelSpacing")) + "\n")
    outcome, _, _ = _import(tmp_path, data)
    assert outcome.status == "failed"
    assert expected in outcome.message, outcome.message
    with Project.open(tmp_path / "project") as project:
        assert project.finished_sets() == []
        assert [run.status for run in project.runs()] == ["failed"]


# ----------------------------------------------------------------------------- real mdocs, one key left out
# Older SerialEM versions and other writers leave many keys out. Each key of a real mdoc is removed in
# turn; only a tilt angle and a movie name per section (and a pixel size from somewhere) are needed.

TILT_SERIES_HEADER_KEYS = ["PixelSpacing", "ImageFile", "ImageSize", "DataMode"]
TILT_SERIES_SECTION_KEYS = [
    "TiltAngle", "StagePosition", "StageZ", "Magnification", "Intensity", "ExposureDose", "PixelSpacing", "SpotSize",
    "Defocus", "ImageShift", "RotationAngle", "ExposureTime", "Binning", "CameraIndex", "DividedBy2", "MagIndex",
    "MinMaxMean", "TargetDefocus", "SubFramePath", "NumSubFrames", "DateTime"]
# the [FrameSet] record of a SerialEM 4 K3 frame mdoc, read as the section of a one-tilt series
FRAME_SECTION_KEYS = [
    "GainReference", "TiltAngle", "StagePosition", "StageZ", "Magnification", "Intensity", "ExposureDose", "DoseRate",
    "PixelSpacing", "SpotSize", "Defocus", "ImageShift", "RotationAngle", "ExposureTime", "Binning", "CameraIndex",
    "DividedBy2", "OperatingMode", "UsingCDS", "MagIndex", "LowDoseConSet", "CountsPerElectron", "TargetDefocus",
    "SubFramePath", "NumSubFrames", "FrameDosesAndNumber", "DateTime", "FilterSlitAndLoss", "UncroppedSize"]
REQUIRED_KEYS = {"TiltAngle": "no TiltAngle in section(s) ZValue = [0",
                 "SubFramePath": "section ZValue = 0 has no SubFramePath"}
FRAME_DOSE_E_PER_A2 = 7.65892  # ExposureDose of frame_set_single.mdoc; FrameDosesAndNumber: 0.63824 x 12


def _key(line: str) -> str | None:
    """The key of a ``Key = value`` line; None for section headers and titles (frame mdocs: ``T = ...``)."""
    key = line.split("=", 1)[0].strip() if "=" in line and not line.startswith("[") else None
    return None if key == "T" else key


def _sections(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header lines and the lines of each section (from its [ZValue]/[FrameSet] line on)."""
    starts = [i for i, line in enumerate(lines) if line.startswith(("[ZValue", "[FrameSet"))]
    return lines[:starts[0]], [lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)])]


def _without(lines: list[str], key: str, where: str) -> str:
    header, sections = _sections(lines)
    drop = lambda block: [line for line in block if _key(line) != key]  # noqa: E731
    if where == "header":
        header = drop(header)
    else:
        sections = [drop(s) if where == "all sections" or i == 0 else s for i, s in enumerate(sections)]
    return "\n".join(header + [line for s in sections for line in s]) + "\n"


@pytest.fixture(scope="module")
def real_mdocs(shared_data, tmp_path_factory):
    """A folder with dummy movies for the real tilt-series mdoc (41 MRC movies of 8 frames) and for
    frame_set_single.mdoc (a TIFF of 12 frames), and the text lines of both mdocs, the frame mdoc's
    [FrameSet] turned into a [ZValue] section."""
    from tomopipe.io.mdoc import movie_name_from_path

    folder = tmp_path_factory.mktemp("real_mdocs")
    tilt_series = (shared_data / "mdoc" / "tilt_series.mdoc").read_text().splitlines()
    frame = (shared_data / "mdoc" / "frame_set_single.mdoc").read_text().splitlines()
    frame = [line.replace("[FrameSet = 0]", "[ZValue = 0]") for line in frame]
    for lines in (tilt_series, frame):
        _, sections = _sections(lines)
        for section in sections:
            values = {_key(line): line.split("=", 1)[1].strip() for line in section if _key(line)}
            name = movie_name_from_path(values["SubFramePath"])
            write_movie(folder / name, np.ones((int(values["NumSubFrames"]), 8, 8), np.uint8))
    return folder, tilt_series, frame


def test_the_key_lists_are_those_of_the_real_mdocs(real_mdocs):
    _, tilt_series, frame = real_mdocs
    header, sections = _sections(tilt_series)
    assert [_key(line) for line in header if _key(line)] == TILT_SERIES_HEADER_KEYS
    assert all([_key(line) for line in s if _key(line)] == TILT_SERIES_SECTION_KEYS for s in sections)
    header, (section,) = _sections(frame)
    assert [_key(line) for line in header if _key(line)] == ["Voltage"]
    assert [_key(line) for line in section if _key(line)] == FRAME_SECTION_KEYS


def _import_text(tmp_path, folder, name: str, text: str, **params):
    (folder / name).write_text(text)
    return _import(tmp_path, folder, pattern=name, **params)


@pytest.mark.parametrize("key, where", [(k, "header") for k in TILT_SERIES_HEADER_KEYS]
                         + [(k, w) for k in TILT_SERIES_SECTION_KEYS for w in ("all sections", "first section")])
def test_real_tilt_series_mdoc_without_a_key(real_mdocs, tmp_path, key, where):
    """tilt_series.mdoc (EMBL Krios 2015; ExposureDose = 0, so the dose is given, as is the voltage it
    lacks). Defect: without TargetDefocus (or NumSubFrames, DateTime) in the sections the import crashed."""
    folder, lines, _ = real_mdocs
    name = f"TS_{key}_{where.replace(' ', '_')}.mdoc"
    outcome, items, attrs = _import_text(tmp_path, folder, name, _without(lines, key, where),
                                         voltage_kV=300.0, dose_per_tilt_e_per_A2=3.0)
    if key in REQUIRED_KEYS and where != "header":
        assert outcome.status == "failed" and REQUIRED_KEYS[key] in outcome.message, outcome.message
        assert str(folder / name) in outcome.message
        return
    assert outcome.status == "finished", outcome.message
    acquisition = attrs["tilt_series"][name[:-len(".mdoc")]]
    assert acquisition["pixel_size_A"] == 5.4 and acquisition["tilt_axis_angle_deg"] == pytest.approx(85.3)
    in_file_order = items.sort_values("z_value")
    assert len(items) == 41 and (items["frame_count"] == 8).all()
    # DateTime (where there is one) and section order agree in this file
    assert in_file_order["acquisition_order"].tolist() == list(range(41))
    np.testing.assert_allclose(in_file_order["pre_exposure_e_per_A2"], 3.0 * np.arange(41))
    target = in_file_order["target_defocus_um"].to_numpy()
    removed = np.arange(41) == 0 if where == "first section" else np.full(41, where == "all sections")
    if key == "TargetDefocus":
        assert np.isnan(target[removed]).all() and (target[~removed] == -4.0).all()
    else:
        assert (target == -4.0).all()


@pytest.mark.parametrize("key", ["Voltage", *FRAME_SECTION_KEYS])
def test_real_frame_record_without_a_key(real_mdocs, tmp_path, key):
    """The [FrameSet] record of a SerialEM 4 K3 frame mdoc as a one-tilt series (no tilt axis in it:
    given; voltage given as the tutorial does). The dose comes from ExposureDose, FrameDosesAndNumber
    or DoseRate, whichever is there; the pixel size only from its PixelSpacing."""
    folder, _, lines = real_mdocs
    name = f"TS_frame_{key}.mdoc"
    outcome, items, attrs = _import_text(tmp_path, folder, name, _without(lines, key, "all sections" if key != "Voltage"
                                                                          else "header"),
                                         voltage_kV=300.0, tilt_axis_angle_deg=-85.0)
    if key in REQUIRED_KEYS or key == "PixelSpacing":
        expected = REQUIRED_KEYS.get(key, "pixel size is missing from the mdoc and not given (set pixel_size_A)")
        assert outcome.status == "failed" and expected in outcome.message, outcome.message
        assert str(folder / name) in outcome.message
        return
    assert outcome.status == "finished", outcome.message
    assert attrs["tilt_series"][name[:-len(".mdoc")]]["pixel_size_A"] == 1.2827
    assert items["tilt_angle_deg"].tolist() == [32.984] and items["frame_count"].tolist() == [12]
    np.testing.assert_allclose(items["dose_e_per_A2"], FRAME_DOSE_E_PER_A2, atol=1e-3)


def test_pixel_size_from_the_user_when_the_mdoc_has_none(real_mdocs, tmp_path):
    folder, lines, _ = real_mdocs
    text = _without(_without(lines, "PixelSpacing", "header").splitlines(), "PixelSpacing", "all sections")
    outcome, _, _ = _import_text(tmp_path, folder, "TS_no_pixel.mdoc", text, voltage_kV=300.0,
                                 dose_per_tilt_e_per_A2=3.0)
    assert outcome.status == "failed" and "TS_no_pixel.mdoc: pixel size is missing" in outcome.message
    outcome, _, attrs = _import_text(tmp_path, folder, "TS_no_pixel.mdoc", text, voltage_kV=300.0,
                                     dose_per_tilt_e_per_A2=3.0, pixel_size_A=5.4)
    assert outcome.status == "finished" and attrs["tilt_series"]["TS_no_pixel"]["pixel_size_A"] == 5.4


def test_frame_mdocs_are_refused_by_name(shared_data, tmp_path):
    """A folder of per-movie frame mdocs is not a tilt series: the error says what the file is."""
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(shared_data / "mdoc" / "frame_set_single.mdoc", folder / "movie.tif.mdoc")
    outcome, _, _ = _import(tmp_path, folder, voltage_kV=300.0)
    assert outcome.status == "failed" and "movie.tif.mdoc: a per-exposure frame mdoc" in outcome.message
