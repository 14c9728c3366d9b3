"""``tomopipe simulate``: command-line flags for every simulation setting.

Precedence: preset < TOML file (``--config``) < flags. Every setting of
:class:`~tomopipe.simulate.config.SimulationConfig` has a flag named after it
(``--pixel-size-A``, ``--dose-per-tilt-e-per-A2`` ...); every effect has an on/off switch
(``--shot-noise`` / ``--no-shot-noise`` ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from tomopipe.simulate.config import PRESETS, SimulationConfig, SimulationConfigError, config_from_preset, load_toml

__all__ = ["add_arguments", "config_from_args", "run_from_args"]

_EXPLICIT = {"structure", "seed", "device", "threads"}
_HELP = {
    "n_tilt_series": "number of tilt series",
    "image_width_px": "detector width (px)",
    "image_height_px": "detector height (px)",
    "pixel_size_A": "pixel size (Å)",
    "frames_per_tilt": "movie frames per tilt",
    "movie_format": "movie format: tif (LZW, integer counts) or mrc",
    "tilt_scheme": "dose_symmetric or bidirectional",
    "tilt_axis_angle_deg": "true tilt-axis angle of the movies as read (from +y, CCW)",
    "dose_per_tilt_e_per_A2": "dose per tilt image (e/Å²)",
    "defocus_min_um": "smallest target defocus (µm, underfocus positive)",
    "defocus_max_um": "largest target defocus (µm)",
    "particles_per_tilt_series": "particles per tilt series",
    "ice_thickness_A": "ice thickness (Å)",
    "truth_binnings": "binnings of the true map written to truth/maps",
    "mdoc_tilt_axis_error_sigma_deg": "SD of the mdoc tilt axis's calibration error "
                                      "(°, one draw per session; 0 = exact)",
    "specimen_pretilt_deg": "pretilt of the specimen slab about the tilt axis (°, adds to the true tilts)",
    "exposure_cosine_power": "dose and exposure time grow as 1/cos(tilt)^this (SerialEM's cosine rule; 0 = constant)",
    "frame_jitter_A": "SD of random per-frame displacements on top of the smooth drift (Å, each axis)",
    "ice_thickness_variation": "largest relative deviation of the smooth ice thickness across the field (0 = flat)",
    "xray_spectrum": "X-ray hits: realistic (spots, streaks, heavy-tailed counts) or simple (1–3 px, 30–200 counts)",
    "xray_max_size_px": "largest X-ray spot diameter / streak length (px)",
    "xray_streak_fraction": "share of X-ray hits that are streaks",
    "xray_two_frame_fraction": "share of X-ray hits split between two consecutive frames",
    "xray_snr_tail": "X-ray peak / frame noise SD is Pareto with this exponent (smaller = heavier tail)",
}


_CHOICES = {"movie_format": ["tif", "mrc"], "tilt_scheme": ["dose_symmetric", "bidirectional"],
            "xray_spectrum": ["realistic", "simple"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulate flags to ``parser`` (no defaults: unset flags keep preset/TOML values)."""
    parser.add_argument("--structure", metavar="MODEL",
                        help="PDB or mmCIF file, may be gzipped (default: $TOMOPIPE_STRUCTURE, else the "
                             "apoferritin model 6Z6U shipped with tomopipe)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="size preset (default: small, or the TOML file's 'preset')")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (movies, mdoc, gain, truth/)")
    parser.add_argument("--config", type=Path, metavar="TOML", help="TOML file of settings (top level or [simulate])")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a simulation already in --out (its movies, mdocs, gain and truth/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    group = parser.add_argument_group("physical settings (override the preset and the TOML file)")
    for f in fields(SimulationConfig):
        if f.name in _EXPLICIT:
            continue
        kind = f.type if isinstance(f.type, str) else str(f.type)
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if kind == "bool":
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (switch the effect on/off)")
        elif f.name == "truth_binnings":
            group.add_argument(_flag(f.name), dest=f.name, type=int, nargs="+", default=None, help=help_text)
        elif kind.startswith("int"):
            group.add_argument(_flag(f.name), dest=f.name, type=int, default=None, help=help_text)
        elif kind.startswith("float"):
            group.add_argument(_flag(f.name), dest=f.name, type=float, default=None, help=help_text)
        else:
            choices = _CHOICES.get(f.name)
            group.add_argument(_flag(f.name), dest=f.name, default=None, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """Resolve preset, TOML file and flags into a :class:`SimulationConfig` (not validated)."""
    toml_preset, toml_settings = (None, {})
    if getattr(args, "config", None) is not None:
        toml_preset, toml_settings = load_toml(args.config)
    preset = args.preset or toml_preset or "small"
    if preset not in PRESETS:
        raise SimulationConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    config = config_from_preset(preset).replace(**toml_settings)
    changes = {}
    for f in fields(SimulationConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        changes[f.name] = tuple(value) if f.name == "truth_binnings" else value
    return config.replace(**changes)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulation for parsed ``args``; prints where the data went. Returns 0."""
    from tomopipe.simulate.run import simulate

    config = config_from_args(args)
    if getattr(args, "print_config", False):
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    summary = simulate(config, args.out, progress=not getattr(args, "quiet", False),
                       overwrite=getattr(args, "overwrite", False))
    n_tilts = sum(ts["n_tilts"] for ts in summary["tilt_series"])
    n_particles = sum(ts["n_particles"] for ts in summary["tilt_series"])
    print(
        f"simulated {len(summary['tilt_series'])} tilt series ({n_tilts} tilts, {n_particles} particles) in "
        f"{summary['timings']['total_s']:.1f} s -> {Path(args.out)} (truth in {Path(args.out) / 'truth'})",
        file=sys.stdout,
    )
    return 0
