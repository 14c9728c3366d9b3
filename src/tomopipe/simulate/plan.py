"""The random truth of an acquisition, drawn before any image is made.

Per tilt series: particles (positions in Å from the tomogram centre, x, y, z with z the
thickness toward the source; uniform random orientations as RELION matrices
``A = (Rz(rot)Ry(tilt)Rz(psi))ᵀ``, reference -> particle), the tilt order, the stage errors, the
defocus and astigmatism of every tilt, and the motion of every frame.

Geometry of tilt j (RELION 5 projection model, ``docs/conventions.md`` §7, plus a
magnification): a point X of the specimen appears in the raw tilt image (the movie arrays as
tomopipe reads them, +y = increasing row) at ``x = m_j·[Rz(axis)·Ry(θ_j)·X]_xy + s_j`` Å from the
image centre ``(W//2, H//2)`` px, at depth ``z_P = [Rz·Ry·X]_z``; its defocus is
``Δf = Δf_centre,j + hand·z_P``. Frame f of the movie shows that image moved by the frame's
global shift ``d_f`` (``d_0 = 0``: a smooth drift plus a random jitter per frame) plus the local
deformation ``u_f(x)``.

What a real session gets wrong, drawn here too: the true tilt is the stage reading plus an offset,
the specimen's pretilt about the tilt axis and a random error; the mdoc's tilt-axis angle is off
by a calibration error (one draw per session, :func:`mdoc_tilt_axis_error_deg`); the dose of a
tilt grows as ``1/cos(stage tilt)^exposure_cosine_power`` (SerialEM's cosine rule, by exposure
time at a constant dose rate); the ice thickness varies smoothly across the field
(:class:`tomopipe.simulate.specimen.IceThickness`).

Randomness: every component draws from its own generator, derived from the seed and the
component's name (:func:`generator_for`), so switching one effect off leaves the others' draws
unchanged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import torch

from tomopipe.algorithms.geometry import matrix_to_euler_relion, random_rotations
from tomopipe.simulate.config import SimulationConfig, nominal_tilt_angles_deg
from tomopipe.simulate.specimen import IceThickness, draw_ice_thickness, place_particles

__all__ = [
    "generator_for",
    "TiltPlan",
    "TiltSeriesPlan",
    "plan_tilt_series",
    "tomogram_size_px",
    "LocalField",
    "frame_local_displacements_px",
    "mdoc_tilt_axis_error_deg",
    "exposure_factor",
]


def generator_for(seed: int, *keys, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from ``seed`` and the component ``keys`` (stable across runs)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys]).encode()
    value = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(value)
    return g


@dataclass
class LocalField:
    """Smooth local deformation ``D(x, y)`` (px per unit of the temporal profile), a sum of
    low-frequency cosine modes: ``D_c = Σ_m a_cm·cos(2π(kx_m·x + ky_m·y)/L + φ_cm)``, x, y in px
    from the image centre, L = the larger image side; normalised so that ``max |D| = amplitude``."""

    kx: torch.Tensor  # [m]
    ky: torch.Tensor  # [m]
    amp: torch.Tensor  # [2, m] (x component, y component)
    phase: torch.Tensor  # [2, m]
    length_px: float
    scale: float = 1.0

    def evaluate(self, x_px: torch.Tensor, y_px: torch.Tensor) -> torch.Tensor:
        """Displacement ``[..., 2]`` (dx, dy) in px at points (x, y) px from the image centre."""
        arg = 2 * math.pi * (x_px[..., None] * self.kx.to(x_px) + y_px[..., None] * self.ky.to(x_px)) / self.length_px
        dx = (self.amp[0].to(x_px) * torch.cos(arg + self.phase[0].to(x_px))).sum(-1)
        dy = (self.amp[1].to(x_px) * torch.cos(arg + self.phase[1].to(x_px))).sum(-1)
        return torch.stack([dx, dy], -1) * self.scale

    def evaluate_grid(self, x_px: torch.Tensor, y_px: torch.Tensor) -> torch.Tensor:
        """Displacement ``[len(y), len(x), 2]`` on the grid of 1-D coordinates x [W], y [H] (px from
        the image centre), float32; separable: cos(a·x + b·y + φ) = cos(a·x)·cos(b·y + φ) − sin(a·x)·sin(b·y + φ)."""
        x = x_px.double()
        y = y_px.double()
        out = torch.zeros((y.numel(), x.numel(), 2), dtype=torch.float32, device=x_px.device)
        for mode in range(self.kx.numel()):
            ax = 2 * math.pi * x * float(self.kx[mode]) / self.length_px
            cx, sx = torch.cos(ax).float(), torch.sin(ax).float()
            for c in range(2):
                by = 2 * math.pi * y * float(self.ky[mode]) / self.length_px + float(self.phase[c, mode])
                cy, sy = torch.cos(by).float(), torch.sin(by).float()
                a = float(self.amp[c, mode]) * self.scale
                out[:, :, c] += a * (cy[:, None] * cx[None, :] - sy[:, None] * sx[None, :])
        return out


@dataclass
class TiltPlan:
    """One tilt image (acquisition order ``index``, 0-based)."""

    index: int
    nominal_deg: float
    stage_deg: float  #: the stage reading written to the mdoc (TiltAngle)
    tilt_deg: float  #: the true tilt (RELION rlnTomoYTilt, IMOD .tlt)
    axis_deg: float  #: the true tilt-axis angle (rlnTomoZRot)
    shift_A: tuple[float, float]  #: specimen shift (rlnTomoX/YShiftAngst)
    magnification: float  #: relative magnification m (1 = nominal)
    defocus_u_A: float
    defocus_v_A: float
    astigmatism_angle_deg: float
    target_defocus_um: float  #: SerialEM TargetDefocus (negative = underfocus)
    scope_defocus_um: float  #: SerialEM Defocus reading (negative = underfocus)
    pre_exposure_e_per_A2: float
    dose_e_per_A2: float
    time: datetime
    frame_shifts_A: torch.Tensor  #: [frames, 2] global content displacement per frame (x, y)
    local_profile: torch.Tensor  #: [frames] temporal profile g_f of the local deformation (0 at f = 0)
    local_field: LocalField | None
    movie_name: str = ""
    stage_position_um: tuple[float, float] = (0.0, 0.0)
    exposure_time_s: float = 0.0  #: the mdoc's ExposureTime of this tilt
    frame_jitter_A: torch.Tensor | None = None  #: [frames, 2] the random part of frame_shifts_A (x, y)

    @property
    def defocus_centre_A(self) -> float:
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)


@dataclass
class TiltSeriesPlan:
    name: str
    index: int
    tilts: list[TiltPlan]
    positions_A: torch.Tensor  #: [n, 3] float64 (x, y, z) from the tomogram centre
    rotations: torch.Tensor  #: [n, 3, 3] float64, reference -> particle
    euler_deg: torch.Tensor  #: [n, 3] (rot, tilt, psi) RELION
    tomogram_size_px: tuple[int, int, int]  #: (x, y, z) unbinned, RELION rlnTomoSizeX/Y/Z
    target_defocus_um: float
    ice: IceThickness | None = None  #: the slab's thickness field (None: flat, ``ice_thickness_A``)
    extras: dict = field(default_factory=dict)

    def tilts_by_angle(self) -> list[TiltPlan]:
        return sorted(self.tilts, key=lambda t: t.nominal_deg)


def tomogram_size_px(config: SimulationConfig) -> tuple[int, int, int]:
    """Tomogram (x, y, z) in unbinned pixels: the detector rotated into the aligned frame (sides
    swapped when the axis is nearer to x than to y) and the thickest ice plus 20 % margin."""
    w, h = config.image_width_px, config.image_height_px
    a = abs(((config.tilt_axis_angle_deg + 90.0) % 180.0) - 90.0)  # 0 = axis along y
    sx, sy = (h, w) if a > 45.0 else (w, h)
    thickest_A = config.ice_thickness_A * (1.0 + config.ice_thickness_variation)
    sz = int(math.ceil(thickest_A * 1.2 / config.pixel_size_A / 2.0)) * 2
    return sx, sy, sz


def mdoc_tilt_axis_error_deg(config: SimulationConfig) -> float:
    """The session's tilt-axis calibration error (°): the mdoc states the true axis plus this (in
    the frame of the movies as read), ``N(0, mdoc_tilt_axis_error_sigma_deg)`` from the seed."""
    g = generator_for(config.seed, "mdoc_axis")
    return float(torch.randn((), generator=g, dtype=torch.float64)) * config.mdoc_tilt_axis_error_sigma_deg


def exposure_factor(config: SimulationConfig, stage_deg: float) -> float:
    """Dose (and exposure time) of a tilt relative to the 0° tilt: ``1/cos(stage)^exposure_cosine_power``."""
    return math.cos(math.radians(stage_deg)) ** -config.exposure_cosine_power


def _frame_jitter(config: SimulationConfig, g: torch.Generator) -> torch.Tensor:
    """Random per-frame displacements [frames, 2] Å, ``N(0, frame_jitter_A)`` each axis; frame 0 has none."""
    n = config.frames_per_tilt
    jitter = torch.randn((n, 2), generator=g, dtype=torch.float64) * config.frame_jitter_A
    jitter[0] = 0.0
    return jitter if config.beam_induced_motion else torch.zeros_like(jitter)


def _frame_trajectory(config: SimulationConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth global shifts [frames, 2] Å (first frame 0) and the local temporal profile [frames] (0..1).

    Beam-induced motion: an initial burst that decays with a time constant of 1.5 frames plus a
    slow linear drift, in independent random directions; the total is ~``drift_A``.
    """
    n = config.frames_per_tilt
    t = torch.arange(n, dtype=torch.float64)
    tau = 1.5
    burst = 1.0 - torch.exp(-t / tau)
    end = max(float(burst[-1]), 1e-12)
    if not config.beam_induced_motion or n == 1:
        return torch.zeros((n, 2), dtype=torch.float64), burst / end if n > 1 else torch.zeros(n, dtype=torch.float64)
    total = config.drift_A * (0.5 + torch.rand((), generator=g, dtype=torch.float64))
    ang1, ang2 = torch.rand(2, generator=g, dtype=torch.float64) * 2 * math.pi
    share = 0.6
    b = burst / end * share * total
    d = t / max(n - 1, 1) * (1 - share) * total
    shifts = torch.stack([b * torch.cos(ang1) + d * torch.cos(ang2), b * torch.sin(ang1) + d * torch.sin(ang2)], -1)
    return shifts, burst / end


def _local_field(config: SimulationConfig, g: torch.Generator) -> LocalField | None:
    if not (config.beam_induced_motion and config.local_motion and config.local_motion_A > 0):
        return None
    m = 4
    k = (torch.rand((m, 2), generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    amp = torch.rand((2, m), generator=g, dtype=torch.float64) + 0.2
    phase = torch.rand((2, m), generator=g, dtype=torch.float64) * 2 * math.pi
    length = float(max(config.image_width_px, config.image_height_px))
    field_ = LocalField(k[:, 0], k[:, 1], amp, phase, length)
    # normalise on a coarse grid of the image
    xs = torch.linspace(-config.image_width_px / 2, config.image_width_px / 2, 33, dtype=torch.float64)
    ys = torch.linspace(-config.image_height_px / 2, config.image_height_px / 2, 33, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    peak = float(torch.linalg.norm(field_.evaluate(gx, gy), dim=-1).max())
    field_.scale = (config.local_motion_A / config.pixel_size_A) / max(peak, 1e-12)
    return field_


def plan_tilt_series(config: SimulationConfig, ts_index: int, particle_radius_A: float) -> TiltSeriesPlan:
    """Draw the truth of tilt series ``ts_index`` (0-based) from ``config.seed``."""
    name = config.tilt_series_names[ts_index]
    seed = config.seed
    size = tomogram_size_px(config)
    p = config.pixel_size_A

    # particles
    gp = generator_for(seed, "particles", ts_index)
    ice = draw_ice_thickness(config.ice_thickness_A, config.ice_thickness_variation, (size[0] * p, size[1] * p),
                             generator_for(seed, "ice_thickness", ts_index))
    half = (size[0] * p / 2.0, size[1] * p / 2.0, ice.max_A / 2.0)
    positions = place_particles(config.particles_per_tilt_series, half, particle_radius_A, config.particle_gap_A, gp,
                                half_thickness_A=ice.half_thickness_A)
    rotations = random_rotations(positions.shape[0], generator=gp, dtype=torch.float64)
    rot, tilt, psi = matrix_to_euler_relion(rotations) if positions.shape[0] else (torch.zeros(0),) * 3
    euler = torch.stack([rot, tilt, psi], -1) if positions.shape[0] else torch.zeros((0, 3), dtype=torch.float64)

    # tilt order and per-tilt geometry
    nominal = nominal_tilt_angles_deg(config)
    n = len(nominal)
    gs = generator_for(seed, "stage", ts_index)
    readback = torch.randn(n, generator=gs, dtype=torch.float64) * 0.002
    tilt_error = torch.randn(n, generator=gs, dtype=torch.float64) * config.tilt_angle_sigma_deg
    shifts = torch.randn((n, 2), generator=gs, dtype=torch.float64) * config.stage_shift_sigma_A
    mags = 1.0 + torch.randn(n, generator=gs, dtype=torch.float64) * config.magnification_sigma
    stage_xy = torch.randn(2, generator=gs, dtype=torch.float64) * 300.0

    gd = generator_for(seed, "defocus", ts_index)
    if config.n_tilt_series > 1:
        target = (config.defocus_min_um
                  + (config.defocus_max_um - config.defocus_min_um) * ts_index / (config.n_tilt_series - 1))
    else:
        target = 0.5 * (config.defocus_min_um + config.defocus_max_um)
    defocus_um = target + torch.randn(n, generator=gd, dtype=torch.float64) * config.defocus_sigma_um
    astig_angle_ts = float(torch.rand((), generator=gd, dtype=torch.float64)) * 180.0 - 90.0
    astig = (config.astigmatism_A
             + torch.randn(n, generator=gd, dtype=torch.float64) * config.astigmatism_sigma_A).clamp_min(0.0)
    astig_angle = astig_angle_ts + torch.randn(n, generator=gd, dtype=torch.float64) * 3.0
    scope_error_um = torch.randn(n, generator=gd, dtype=torch.float64) * 0.1

    start = datetime.fromisoformat(config.acquisition_start) + timedelta(minutes=35 * ts_index)
    time = start
    tilts: list[TiltPlan] = []
    previous, previous_exposure_s = None, 0.0
    pre_exposure = 0.0
    for j, angle in enumerate(nominal):
        gm = generator_for(seed, "motion", ts_index, j)
        frame_shifts, profile = _frame_trajectory(config, gm)
        jitter = _frame_jitter(config, generator_for(seed, "jitter", ts_index, j))
        local = _local_field(config, generator_for(seed, "local", ts_index, j))
        stage = angle + float(readback[j])
        factor = exposure_factor(config, stage)
        dose = round(config.dose_per_tilt_e_per_A2 * factor, 4)  # as the mdoc states it
        exposure_s = round(config.exposure_time_s * factor, 4)
        if previous is not None:
            jump = abs(angle - previous)
            time = time + timedelta(seconds=previous_exposure_s + 9.0 + 0.8 * jump)
        previous, previous_exposure_s = angle, exposure_s
        d_um = float(defocus_um[j])
        ast = float(astig[j])
        tilts.append(
            TiltPlan(
                index=j,
                nominal_deg=float(angle),
                stage_deg=round(stage, 5),
                tilt_deg=stage + config.tilt_angle_offset_deg + config.specimen_pretilt_deg + float(tilt_error[j]),
                axis_deg=config.tilt_axis_angle_deg,
                shift_A=(float(shifts[j, 0]), float(shifts[j, 1])),
                magnification=float(mags[j]),
                defocus_u_A=d_um * 1e4 + ast / 2.0,
                defocus_v_A=d_um * 1e4 - ast / 2.0,
                astigmatism_angle_deg=float(astig_angle[j]),
                target_defocus_um=-round(target, 4),
                scope_defocus_um=-round(d_um + float(scope_error_um[j]), 5),
                pre_exposure_e_per_A2=pre_exposure,
                dose_e_per_A2=dose,
                time=time,
                frame_shifts_A=frame_shifts + jitter,
                local_profile=profile,
                local_field=local,
                stage_position_um=(float(stage_xy[0]), float(stage_xy[1])),
                exposure_time_s=exposure_s,
                frame_jitter_A=jitter,
            )
        )
        pre_exposure += dose
    for t in tilts:
        # SerialEM-style names: <TS>_<acquisition number, 1-based>_<stage angle>.<ext>
        t.movie_name = f"{name}_{t.index + 1:03d}_{t.stage_deg:.1f}.{config.movie_format}"
    return TiltSeriesPlan(
        name=name,
        index=ts_index,
        tilts=tilts,
        positions_A=positions,
        rotations=rotations,
        euler_deg=euler,
        tomogram_size_px=size,
        target_defocus_um=target,
        ice=ice,
    )


def frame_local_displacements_px(tilt: TiltPlan, x_px: torch.Tensor, y_px: torch.Tensor) -> torch.Tensor:
    """True local displacement ``[frames, ..., 2]`` (px) at points (px from the image centre)."""
    if tilt.local_field is None:
        return torch.zeros((tilt.local_profile.shape[0],) + tuple(x_px.shape) + (2,), dtype=torch.float64)
    d = tilt.local_field.evaluate(x_px.double(), y_px.double())
    return tilt.local_profile.reshape((-1,) + (1,) * x_px.ndim + (1,)) * d[None]

