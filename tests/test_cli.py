"""The command line: --help everywhere, inspect's JSON keys, clear errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tomopipe.cli import build_parser, main

SUBCOMMANDS = ["project", "run", "status", "show", "exclude", "picks", "export", "inspect", "steps", "simulate",
               "demo", "report", "serve"]


def test_every_subcommand_has_help(capsys):
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: tomopipe {command}" in capsys.readouterr().out
    choices = build_parser()._subparsers._group_actions[0].choices
    assert sorted(choices) == sorted(SUBCOMMANDS)


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "tomopipe.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("tomopipe ")


def test_inspect_mdoc_json(shared_data, capsys):
    assert main(["inspect", str(shared_data / "mdoc" / "tilt_series.mdoc"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pixel_size_A"] == 5.4 and summary["tilt_axis_angle_deg"] == 85.3
    assert len(summary["tilt_angles_deg"]) == 41 and summary["frame_counts"] == [8] * 41
    assert summary["movie_names"][0] == "TS_01_000_0.0.mrc"
    for key in ("dose_per_tilt_e_per_A2", "pre_exposure_e_per_A2", "accumulated_dose_e_per_A2", "acquisition_order"):
        assert key in summary


def test_inspect_text_and_bad_files(shared_data, tmp_path, capsys):
    assert main(["inspect", str(shared_data / "imod" / "TS_001" / "TS_001.xf")]) == 0
    assert "84.1" in capsys.readouterr().out
    assert main(["inspect", str(shared_data / "mdoc" / "montage_section.mdoc")]) == 2
    assert "montage" in capsys.readouterr().err
    (tmp_path / "junk.mrc").write_bytes(b"\0" * 100)
    assert main(["inspect", str(tmp_path / "junk.mrc")]) == 2
    assert "junk.mrc" in capsys.readouterr().err


def test_steps_lists_and_describes(capsys):
    assert main(["steps"]) == 0
    out = capsys.readouterr().out
    assert "import_movies" in out and "tomo - import tilt series movies" in out
    assert main(["steps", "import_movies"]) == 0
    assert "tilt_axis_angle_deg" in capsys.readouterr().out
    assert main(["steps", "import_movie"]) == 2
    assert "did you mean import_movies" in capsys.readouterr().err
