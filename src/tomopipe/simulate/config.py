"""Settings of the digital twin: one dataclass with every physical setting, presets, TOML, checks.

Units are in the names (Å, degrees, e⁻/Å², µm for the defocus range as microscopists give it).
Defaults describe EMPIAR-10491 (the seed's data set): 300 kV, Cs 2.7 mm, amplitude contrast 0.1,
0.79 Å/px, −40…+40° in 2° steps, dose-symmetric in groups of two, 2.64 e⁻/Å² per tilt, tilt axis
−85.6° (truth, in the frame of the movie arrays as tomopipe reads them), defocus 2.2–2.9 µm.

The twin is as hard as real data where the pipeline leans on it (each effect has a setting; 0 or
"simple" turns it off): the mdoc's tilt axis is off by a calibration error (SD 1°), the specimen
has a pretilt (2°), the dose grows with the tilt (SerialEM's cosine rule, power 0.5), frames jitter
(0.3 Å) on top of the smooth drift, the ice thickness varies by up to 10 % across the field, and
X-ray hits have a realistic spectrum (spots up to 8 px, streaks, counts from the noise level up).

Presets (:data:`PRESETS`) only change sizes: ``tiny`` (unit tests: one tilt series of five
tilts, 256² px at 3.16 Å, six particles; ~2 s), ``small`` (the seed's small data set: two tilt
series of 41 tilts at 0.79 Å/px on a 1920 × 1440 detector, 8 frames, 150 particles each in 800 Å
of ice; ~3 min on 2 CPU cores), ``reduced`` (the small data set cut down for CI: one tilt series
of 21 tilts in 4° steps, 6 frames; the same field, pixel size and particles), ``tutorial``
(EMPIAR-10491 size: five tilt series on a K3
5760 × 4092, 10 frames, 400 particles each in 1000 Å of ice, projector padding 4; for a GPU
machine).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tomopipe.errors import InputFileError, TomopipeError

__all__ = [
    "SimulationConfig",
    "SimulationConfigError",
    "PRESETS",
    "config_from_preset",
    "load_toml",
    "default_structure_path",
    "nominal_tilt_angles_deg",
]


class SimulationConfigError(TomopipeError):
    """A simulation setting that cannot be used; the message names the setting."""


@dataclass
class SimulationConfig:
    """Every setting of a simulated acquisition (see the module docstring for the units)."""

    # --- run ----------------------------------------------------------------------------------
    structure: str | None = None  #: PDB/mmCIF file; None -> :func:`default_structure_path`
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  #: CPU threads for torch (0 = torch's default)
    n_tilt_series: int = 5
    tilt_series_prefix: str = "TS"
    # --- camera -------------------------------------------------------------------------------
    image_width_px: int = 5760
    image_height_px: int = 4092
    pixel_size_A: float = 0.79
    frames_per_tilt: int = 10
    movie_format: str = "tif"  #: "tif" (LZW, integer counts) or "mrc"
    exposure_time_s: float = 0.6
    magnification: int = 105000  #: nominal magnification written to the mdoc
    spot_size: int = 8
    # --- optics -------------------------------------------------------------------------------
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    cc_mm: float = 2.7
    energy_spread_eV: float = 0.8  #: FWHM of the source energy spread (temporal coherence)
    illumination_semi_angle_mrad: float = 0.01  #: spatial coherence
    coherence_envelopes: bool = True
    detector_mtf: bool = True  #: pixel-aperture MTF sinc(kx·p)·sinc(ky·p) on the signal
    # --- tilt scheme --------------------------------------------------------------------------
    tilt_min_deg: float = -40.0
    tilt_max_deg: float = 40.0
    tilt_step_deg: float = 2.0
    tilt_start_deg: float = 0.0  #: first tilt (dose-symmetric centre / bidirectional start)
    tilt_scheme: str = "dose_symmetric"  #: "dose_symmetric" or "bidirectional"
    dose_symmetric_group_size: int = 2
    dose_per_tilt_e_per_A2: float = 2.64  #: dose of the tilt at 0° (the others: see exposure_cosine_power)
    exposure_cosine_power: float = 0.5  #: SerialEM's cosine rule: dose and exposure time ∝ 1/cos(stage tilt)^power
    # --- geometry truth and stage errors ------------------------------------------------------
    tilt_axis_angle_deg: float = -85.6  #: true axis of the movie arrays as read (RELION rlnTomoZRot)
    tilt_angle_offset_deg: float = 0.5  #: true tilt − stage reading
    specimen_pretilt_deg: float = 2.0  #: specimen slab tilted about the tilt axis: adds to every true tilt
    mdoc_tilt_axis_error_sigma_deg: float = 1.0  #: SD of the mdoc's tilt-axis calibration error (one draw per session)
    tilt_angle_sigma_deg: float = 0.03  #: per-tilt random error of the stage angle
    stage_shift_sigma_A: float = 60.0  #: per-tilt specimen shift (tracking error), each axis
    magnification_sigma: float = 0.0005  #: per-tilt relative magnification change
    # --- defocus ------------------------------------------------------------------------------
    defocus_min_um: float = 2.2
    defocus_max_um: float = 2.9
    defocus_sigma_um: float = 0.05  #: per-tilt autofocus scatter
    astigmatism_A: float = 300.0  #: DefocusU − DefocusV
    astigmatism_sigma_A: float = 40.0
    defocus_handedness: int = -1  #: RELION rlnTomoHand
    defocus_layer_A: float = 50.0  #: depth layers for the defocus gradient
    # --- specimen -----------------------------------------------------------------------------
    particles_per_tilt_series: int = 400
    ice_thickness_A: float = 1000.0  #: mean thickness
    ice_thickness_variation: float = 0.1  #: largest relative deviation of the smooth thickness field (0 = flat)
    ice_density_g_per_cm3: float = 0.94  #: low-density amorphous ice
    ice_mean_potential_V: float | None = None  #: None -> independent-atom value from the density
    solvent_exclusion: bool = True
    implicit_hydrogens: bool = True  #: add united-atom hydrogens to models that have none
    ice_structure: bool = True  #: amorphous-ice potential fluctuations (non-white background)
    ice_sublayers: int = 3
    extra_b_factor_A2: float = 0.0
    particle_gap_A: float = 4.0  #: smallest surface-to-surface distance between particles
    # --- beam, damage, detector ---------------------------------------------------------------
    beam_induced_motion: bool = True
    drift_A: float = 3.0  #: typical global drift over one tilt's exposure
    frame_jitter_A: float = 0.3  #: SD (each axis) of random per-frame displacements on top of the smooth drift
    local_motion: bool = True
    local_motion_A: float = 0.6  #: largest local deformation at the end of an exposure
    local_motion_knots: int = 3
    radiation_damage: bool = True
    inelastic_loss: bool = True  #: zero-loss filtered: intensity × exp(−t / (λ_in·cos θ))
    inelastic_mean_free_path_A: float = 3500.0
    shot_noise: bool = True
    gain_reference: bool = True
    gain_sigma: float = 0.03
    hot_pixels_per_megapixel: float = 2.0
    hot_pixel_rate_counts: float = 3.0  #: extra counts per frame on a hot pixel
    xray_hits_per_megapixel_per_tilt: float = 0.5
    #: "realistic" (spots, streaks, heavy-tailed counts) or "simple" (1–3 px, 30–200 counts)
    xray_spectrum: str = "realistic"
    xray_max_size_px: float = 8.0  #: realistic: largest spot diameter / streak length
    xray_streak_fraction: float = 0.3  #: realistic: share of hits that are streaks (elongated tracks)
    xray_two_frame_fraction: float = 0.1  #: realistic: share of hits split between two consecutive frames
    xray_snr_tail: float = 0.6  #: realistic: peak counts / frame noise SD is Pareto(1, this) (smaller = heavier tail)
    # --- numerics and output ------------------------------------------------------------------
    projector_pad_factor: int = 3
    max_layer_stack_GB: float = 2.0  #: memory for depth layers held at once (processed in blocks)
    truth_binnings: tuple[int, ...] = (1, 2, 4, 6, 10)
    truth_map_box_A: float = 189.0
    acquisition_start: str = "2026-01-15T09:00:00"

    # ------------------------------------------------------------------------------- helpers
    def replace(self, **changes: Any) -> "SimulationConfig":
        """A copy with ``changes`` applied (unknown names raise SimulationConfigError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SimulationConfigError(f"unknown simulation setting(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["truth_binnings"] = list(self.truth_binnings)
        return d

    @property
    def structure_path(self) -> Path:
        """The structure file: the setting, else :func:`default_structure_path`."""
        return Path(self.structure) if self.structure else default_structure_path()

    @property
    def tilt_series_names(self) -> list[str]:
        return [f"{self.tilt_series_prefix}_{i + 1:02d}" for i in range(self.n_tilt_series)]

    def validate(self) -> "SimulationConfig":
        """Raise SimulationConfigError (or InputFileError for the structure) on bad settings."""
        err = SimulationConfigError

        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                    or (value == 0 and not allow_zero)):
                raise err(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("pixel_size_A", "dose_per_tilt_e_per_A2", "voltage_kV", "tilt_step_deg", "exposure_time_s",
                     "defocus_layer_A", "inelastic_mean_free_path_A", "truth_map_box_A", "ice_density_g_per_cm3",
                     "max_layer_stack_GB"):
            positive(name)
        for name in ("cs_mm", "cc_mm", "energy_spread_eV", "illumination_semi_angle_mrad", "stage_shift_sigma_A",
                     "magnification_sigma", "tilt_angle_sigma_deg", "defocus_sigma_um", "astigmatism_sigma_A",
                     "drift_A", "local_motion_A", "gain_sigma", "hot_pixels_per_megapixel", "hot_pixel_rate_counts",
                     "xray_hits_per_megapixel_per_tilt", "extra_b_factor_A2", "particle_gap_A", "astigmatism_A",
                     "exposure_cosine_power", "mdoc_tilt_axis_error_sigma_deg", "frame_jitter_A", "xray_snr_tail",
                     "xray_streak_fraction", "xray_two_frame_fraction"):
            positive(name, allow_zero=True)
        for name in ("image_width_px", "image_height_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 32 or value % 2:
                raise err(f"{name} must be an even number of pixels >= 32, got {value!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise err(f"threads must be an integer >= 0 (0 = default), got {self.threads!r}")
        for name, low in (("frames_per_tilt", 1), ("n_tilt_series", 1), ("ice_sublayers", 1),
                          ("local_motion_knots", 2), ("dose_symmetric_group_size", 1), ("projector_pad_factor", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise err(f"{name} must be an integer >= {low}, got {value!r}")
        if self.n_tilt_series > 99:
            raise err(f"n_tilt_series must be <= 99, got {self.n_tilt_series}")
        if not isinstance(self.particles_per_tilt_series, int) or self.particles_per_tilt_series < 0:
            raise err(f"particles_per_tilt_series must be an integer >= 0, got {self.particles_per_tilt_series!r}")
        if not 0 <= self.amplitude_contrast < 1:
            raise err(f"amplitude_contrast must be in [0, 1), got {self.amplitude_contrast!r}")
        if self.tilt_min_deg > self.tilt_max_deg:
            raise err(f"empty tilt range: tilt_min_deg ({self.tilt_min_deg}) > tilt_max_deg ({self.tilt_max_deg})")
        if not (-90 < self.tilt_min_deg and self.tilt_max_deg < 90):
            raise err(f"tilt angles must lie in (-90, 90), got {self.tilt_min_deg}..{self.tilt_max_deg}")
        if not self.tilt_min_deg <= self.tilt_start_deg <= self.tilt_max_deg:
            raise err(f"empty tilt range: tilt_start_deg ({self.tilt_start_deg}) is outside "
                      f"{self.tilt_min_deg}..{self.tilt_max_deg}")
        if self.tilt_scheme not in ("dose_symmetric", "bidirectional"):
            raise err(f"tilt_scheme must be 'dose_symmetric' or 'bidirectional', got {self.tilt_scheme!r}")
        if not nominal_tilt_angles_deg(self):
            raise err("empty tilt range: no tilt angle between tilt_min_deg and tilt_max_deg")
        if not 0 < self.defocus_min_um <= self.defocus_max_um:
            raise err(f"defocus range must satisfy 0 < defocus_min_um <= defocus_max_um (underfocus positive), "
                      f"got {self.defocus_min_um}..{self.defocus_max_um}")
        if self.defocus_handedness not in (-1, 1):
            raise err(f"defocus_handedness must be -1 or 1, got {self.defocus_handedness!r}")
        if self.movie_format not in ("tif", "mrc"):
            raise err(f"movie_format must be 'tif' or 'mrc', got {self.movie_format!r}")
        if not self.shot_noise and self.movie_format != "mrc":
            raise err("shot_noise = false writes float expected counts, which only MRC movies hold: "
                      "set movie_format = 'mrc'")
        if self.xray_spectrum not in ("realistic", "simple"):
            raise err(f"xray_spectrum must be 'realistic' or 'simple', got {self.xray_spectrum!r}")
        if self.xray_spectrum == "realistic" and not self.xray_snr_tail > 0:
            raise err(f"xray_snr_tail must be > 0, got {self.xray_snr_tail!r}")
        for name in ("xray_streak_fraction", "xray_two_frame_fraction"):
            if getattr(self, name) > 1:
                raise err(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not (isinstance(self.xray_max_size_px, (int, float)) and 1 <= self.xray_max_size_px <= 64):
            raise err(f"xray_max_size_px must be in [1, 64] px, got {self.xray_max_size_px!r}")
        if not (isinstance(self.ice_thickness_variation, (int, float)) and 0 <= self.ice_thickness_variation <= 0.5):
            raise err(f"ice_thickness_variation must be in [0, 0.5] (relative), got {self.ice_thickness_variation!r}")
        if not abs(self.specimen_pretilt_deg) < 30:
            raise err(f"specimen_pretilt_deg must lie in (-30, 30), got {self.specimen_pretilt_deg!r}")
        if self.exposure_cosine_power > 0 and max(abs(self.tilt_min_deg), abs(self.tilt_max_deg)) > 80:
            raise err("exposure_cosine_power > 0 needs tilts within ±80° (1/cos grows without bound)")
        if self.ice_thickness_A <= 0:
            raise err(f"ice_thickness_A must be > 0, got {self.ice_thickness_A!r}")
        if self.ice_mean_potential_V is not None and not (0 <= self.ice_mean_potential_V < 50):
            raise err(f"ice_mean_potential_V must be in [0, 50) V, got {self.ice_mean_potential_V!r}")
        if not self.truth_binnings or any((not isinstance(b, int)) or b < 1 for b in self.truth_binnings):
            raise err(f"truth_binnings must be positive integers, got {self.truth_binnings!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise err(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise err(f"device {self.device!r} requested but CUDA is not available")
        try:
            from datetime import datetime

            datetime.fromisoformat(self.acquisition_start)
        except ValueError:
            raise err(f"acquisition_start must be an ISO date-time, got {self.acquisition_start!r}") from None
        path = self.structure_path
        if not path.is_file():
            raise InputFileError(path, "structure file not found (pass a PDB or mmCIF file with --structure)")
        return self


def nominal_tilt_angles_deg(config: SimulationConfig) -> list[float]:
    """Nominal tilt angles in acquisition order.

    ``dose_symmetric``: the start angle, then alternately ``dose_symmetric_group_size`` steps
    toward positive and negative angles (Hagen et al. 2017), the remaining side last.
    ``bidirectional``: start angle up to the maximum, then from start − step down to the minimum.
    """
    step = config.tilt_step_deg
    if step <= 0:
        return []
    start = config.tilt_start_deg
    eps = 1e-6 * step
    up = [start + k * step for k in range(1, int(math.floor((config.tilt_max_deg - start) / step + 1e-6)) + 1)]
    down = [start - k * step for k in range(1, int(math.floor((start - config.tilt_min_deg) / step + 1e-6)) + 1)]
    if not (config.tilt_min_deg - eps <= start <= config.tilt_max_deg + eps):
        return []
    order = [start]
    if config.tilt_scheme == "bidirectional":
        return [round(a, 6) for a in order + up + down]
    g = max(1, int(config.dose_symmetric_group_size))
    i = j = 0
    while i < len(up) or j < len(down):
        order += up[i : i + g]
        i += g
        order += down[j : j + g]
        j += g
    return [round(a, 6) for a in order]


def default_structure_path() -> Path:
    """Default apoferritin model: ``$TOMOPIPE_STRUCTURE``, else the PDB 6Z6U model shipped in
    the package (:data:`tomopipe.data.APOFERRITIN_MODEL`, gzipped PDB).

    Raises SimulationConfigError telling the user to pass ``--structure`` when neither exists.
    """
    from tomopipe.data import APOFERRITIN_MODEL

    env = os.environ.get("TOMOPIPE_STRUCTURE")
    if env:
        return Path(env)
    if APOFERRITIN_MODEL.is_file():
        return APOFERRITIN_MODEL
    raise SimulationConfigError(
        "no structure given and the packaged apoferritin model (6Z6U) is missing "
        f"({APOFERRITIN_MODEL}; a broken install?); pass --structure MODEL.pdb|.cif or set TOMOPIPE_STRUCTURE"
    )


#: Preset overrides of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        n_tilt_series=1,
        image_width_px=256,
        image_height_px=256,
        pixel_size_A=3.16,
        frames_per_tilt=4,
        tilt_min_deg=-12.0,
        tilt_max_deg=12.0,
        tilt_step_deg=6.0,
        dose_per_tilt_e_per_A2=2.64,
        particles_per_tilt_series=6,
        ice_thickness_A=400.0,
        ice_sublayers=2,
        stage_shift_sigma_A=20.0,
        local_motion_knots=2,
        truth_binnings=(1, 2),
        hot_pixels_per_megapixel=60.0,
        xray_hits_per_megapixel_per_tilt=30.0,
    ),
    "small": dict(
        n_tilt_series=2,
        image_width_px=1920,
        image_height_px=1440,
        pixel_size_A=0.79,
        frames_per_tilt=8,
        particles_per_tilt_series=150,
        ice_thickness_A=800.0,
        ice_sublayers=2,
    ),
    "reduced": dict(
        n_tilt_series=1,
        image_width_px=1920,
        image_height_px=1440,
        pixel_size_A=0.79,
        frames_per_tilt=6,
        tilt_step_deg=4.0,
        particles_per_tilt_series=150,
        ice_thickness_A=800.0,
        ice_sublayers=2,
    ),
    "tutorial": dict(
        n_tilt_series=5,
        image_width_px=5760,
        image_height_px=4092,
        pixel_size_A=0.79,
        frames_per_tilt=10,
        particles_per_tilt_series=400,
        ice_thickness_A=1000.0,
        projector_pad_factor=4,
    ),
}


def config_from_preset(name: str, **overrides: Any) -> SimulationConfig:
    """The preset ``name`` with ``overrides`` applied (not validated)."""
    if name not in PRESETS:
        raise SimulationConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return SimulationConfig().replace(**PRESETS[name]).replace(**overrides)


def _coerce(name: str, value: Any, default: Any, annotation: str) -> Any:
    """Value from TOML converted to the setting's type, or SimulationConfigError."""
    err = SimulationConfigError
    if name == "truth_binnings":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise err(f"{name} must be a list of integers, got {value!r}")
        return tuple(value)
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise err(f"{name} must be true or false, got {value!r}")
        return value
    if value is None:
        raise err(f"{name} cannot be empty")
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise err(f"{name} must be an integer, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise err(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise err(f"{name} must be a string, got {value!r}")
        return value
    return value


def settings_from_mapping(mapping: dict[str, Any], where: str) -> dict[str, Any]:
    """Checked, typed settings from a mapping (TOML table); unknown keys raise."""
    by_name = {f.name: f for f in fields(SimulationConfig)}
    out = {}
    for key, value in mapping.items():
        if key not in by_name:
            raise SimulationConfigError(f"{where}: unknown simulation setting {key!r}; known settings: "
                                        f"{', '.join(sorted(by_name))}")
        f = by_name[key]
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out[key] = _coerce(key, value, f.default, annotation)
    return out


def load_toml(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """Read a TOML file of settings: ``(preset or None, settings)``.

    Settings may sit at the top level or in a ``[simulate]`` table; ``preset = "small"`` selects
    the base preset. Raises InputFileError for a missing or unparseable file and
    SimulationConfigError for unknown or mistyped settings.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "TOML settings file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"not valid TOML ({exc})") from exc
    table = data.get("simulate", data)
    if not isinstance(table, dict):
        raise InputFileError(path, "[simulate] must be a table")
    table = dict(table)
    preset = table.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise InputFileError(path, f"preset must be a string, got {preset!r}")
    return preset, settings_from_mapping(table, str(path))
