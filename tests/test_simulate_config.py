"""Settings of the digital twin: presets, validation messages, TOML, tilt schemes, CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from conftest import STRUCTURE
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.simulate.command import add_arguments, config_from_args
from tomopipe.simulate.config import (
    PRESETS,
    SimulationConfig,
    SimulationConfigError,
    config_from_preset,
    default_structure_path,
    load_toml,
    nominal_tilt_angles_deg,
)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_structure_file_is_present():
    assert STRUCTURE.is_file(), f"the apoferritin model is expected at {STRUCTURE}"


def test_presets_validate_and_match_the_seed():
    for name in PRESETS:
        config = config_from_preset(name, structure=str(STRUCTURE)).validate()
        assert config.voltage_kV == 300 and config.cs_mm == 2.7 and config.amplitude_contrast == 0.1
        assert config.tilt_axis_angle_deg == -85.6 and config.dose_per_tilt_e_per_A2 == 2.64
    small = config_from_preset("small")
    assert small.n_tilt_series == 2 and small.pixel_size_A == 0.79
    assert nominal_tilt_angles_deg(small) == nominal_tilt_angles_deg(SimulationConfig())
    tutorial = config_from_preset("tutorial")
    assert (tutorial.image_width_px, tutorial.image_height_px, tutorial.n_tilt_series) == (5760, 4092, 5)
    assert tutorial.truth_binnings == (1, 2, 4, 6, 10)


def test_dose_symmetric_order_groups_of_two():
    angles = nominal_tilt_angles_deg(SimulationConfig())
    assert len(angles) == 41 and sorted(angles) == [float(a) for a in range(-40, 42, 2)]
    assert angles[:9] == [0.0, 2.0, 4.0, -2.0, -4.0, 6.0, 8.0, -6.0, -8.0]
    # the dose grows symmetrically: the n-th pair of tilts on each side is acquired together
    assert angles[-4:] == [38.0, 40.0, -38.0, -40.0]


def test_bidirectional_order():
    config = SimulationConfig(tilt_scheme="bidirectional", tilt_min_deg=-6, tilt_max_deg=6, tilt_step_deg=3)
    assert nominal_tilt_angles_deg(config) == [0.0, 3.0, 6.0, -3.0, -6.0]


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(tilt_min_deg=10.0, tilt_max_deg=-10.0), "empty tilt range"),
        (dict(tilt_min_deg=5.0, tilt_max_deg=10.0, tilt_start_deg=0.0), "empty tilt range"),
        (dict(pixel_size_A=0.0), "pixel_size_A must be > 0"),
        (dict(pixel_size_A=-1.0), "pixel_size_A must be > 0"),
        (dict(tilt_step_deg=0.0), "tilt_step_deg must be > 0"),
        (dict(amplitude_contrast=1.0), "amplitude_contrast"),
        (dict(defocus_min_um=3.0, defocus_max_um=2.0), "defocus range"),
        (dict(image_width_px=101), "image_width_px"),
        (dict(movie_format="eer"), "movie_format"),
        (dict(shot_noise=False), "movie_format = 'mrc'"),
        (dict(defocus_handedness=0), "defocus_handedness"),
        (dict(tilt_scheme="random"), "tilt_scheme"),
        (dict(truth_binnings=(1, 0)), "truth_binnings"),
    ],
)
def test_bad_settings_raise_clear_errors(changes, words):
    config = config_from_preset("tiny", structure=str(STRUCTURE)).replace(**changes)
    with pytest.raises(SimulationConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config.validate()


def test_unknown_structure_file(tmp_path):
    missing = tmp_path / "no_such_model.cif"
    with pytest.raises(InputFileError, match="no_such_model.cif: structure file not found"):
        config_from_preset("tiny", structure=str(missing)).validate()


def test_unknown_setting_names_the_setting():
    with pytest.raises(SimulationConfigError, match="pixel_size"):
        SimulationConfig().replace(pixel_size=1.0)


def test_default_structure_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TOMOPIPE_STRUCTURE", raising=False)
    assert default_structure_path().resolve() == STRUCTURE.resolve()
    monkeypatch.setenv("TOMOPIPE_STRUCTURE", str(tmp_path / "model.pdb"))
    assert default_structure_path() == tmp_path / "model.pdb"
    with pytest.raises(InputFileError, match="model.pdb"):
        config_from_preset("tiny").validate()


def test_toml_settings_and_errors(tmp_path):
    good = tmp_path / "sim.toml"
    good.write_text('[simulate]\npreset = "tiny"\npixel_size_A = 2.5\nshot_noise = false\ntruth_binnings = [1, 3]\n')
    preset, settings = load_toml(good)
    assert preset == "tiny" and settings == {"pixel_size_A": 2.5, "shot_noise": False, "truth_binnings": (1, 3)}
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("pixel_size = 2.5\n")
    with pytest.raises(SimulationConfigError, match="unknown simulation setting 'pixel_size'"):
        load_toml(unknown)
    mistyped = tmp_path / "mistyped.toml"
    mistyped.write_text('frames_per_tilt = "eight"\n')
    with pytest.raises(SimulationConfigError, match="frames_per_tilt must be an integer"):
        load_toml(mistyped)
    broken = tmp_path / "broken.toml"
    broken.write_text("pixel_size_A = = 2\n")
    with pytest.raises(InputFileError, match="broken.toml: not valid TOML"):
        load_toml(broken)
    with pytest.raises(InputFileError, match="not found"):
        load_toml(tmp_path / "absent.toml")


def test_every_setting_has_a_flag_and_precedence(tmp_path):
    toml = tmp_path / "sim.toml"
    toml.write_text('preset = "tiny"\ndose_per_tilt_e_per_A2 = 3.0\nframes_per_tilt = 6\n')
    args = _parse("--out", str(tmp_path / "o"), "--config", str(toml), "--frames-per-tilt", "5",
                  "--no-shot-noise", "--movie-format", "mrc", "--truth-binnings", "1", "2", "--seed", "7")
    config = config_from_args(args)
    assert config.image_width_px == PRESETS["tiny"]["image_width_px"]  # preset from the TOML file
    assert config.dose_per_tilt_e_per_A2 == 3.0  # TOML over preset
    assert config.frames_per_tilt == 5  # flag over TOML
    assert config.shot_noise is False and config.movie_format == "mrc" and config.truth_binnings == (1, 2)
    assert config.seed == 7
    # one flag per setting, one on/off switch per effect
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(SimulationConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
        if f.type == "bool":
            assert "--no-" + f.name.replace("_", "-") in flags, f.name
    for required in ("--structure", "--preset", "--seed", "--out", "--config"):
        assert required in flags
    assert config_from_args(_parse("--out", "x")).n_tilt_series == PRESETS["small"]["n_tilt_series"]


def test_config_error_is_a_tomopipe_error():
    assert issubclass(SimulationConfigError, TomopipeError)
