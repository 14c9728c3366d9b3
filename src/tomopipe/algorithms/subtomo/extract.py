"""Particle extraction from a tilt series as per-tilt 2-D crops (RELION 5 ``relion_tomo_subtomo --stack2d``).

Conventions (``docs/conventions.md`` §4b, §7; :mod:`tomopipe.algorithms.geometry`, :mod:`tomopipe.algorithms.ctf`):

* Particle positions ``(x, y, z)`` in Å from the tomogram centre (z = thickness, +z toward the
  electron source). In tilt image i a particle lies at ``m_i·[R_i·p]_xy + shift_i`` Å from the
  image centre ``N//2`` (RELION 5 model, :func:`~tomopipe.algorithms.geometry.project_points`),
  and its defocus is the tilt's (U, V) plus ``hand·z_P`` with ``z_P = [R_i·p]_z``
  (:func:`~tomopipe.algorithms.ctf.defocus_with_handedness`, RELION ``rlnTomoHand``).
* Binning: every tilt image is Fourier-binned first (:func:`~tomopipe.algorithms.filters.fourier_crop_bin`:
  the centre ``N//2`` is kept, the mean is preserved); its pixel is ``pixel_size_A · N / N_binned``
  per axis (``binning × pixel_size_A`` when the factor divides the size). Box and crop sizes are
  in binned pixels, as RELION's ``--b`` / ``--crop``.
* Per tilt and particle, as RELION 5 does: a ``box_px`` box around the nearest pixel, moved by a
  Fourier phase ramp so that the particle sits exactly on the box centre ``box//2``, multiplied in
  Fourier space by ``sign·CTF·D`` — the tilt's astigmatic CTF at the particle's defocus (RELION
  sign, positive first peak) times the exposure filter D at the tilt's pre-exposure (dose
  weighting is applied to the images, as RELION does); ``sign = −1`` inverts the contrast (RELION's
  default: a particle denser than the ice comes out white) — then back to real space, optionally
  cropped to a soft circle of diameter ``crop_px`` (the mean outside it subtracted, RELION's
  ``cropCircle``), and cut to ``crop_px`` around ``crop_px//2``.
* Weights for reconstruction: ``ctf2 = (CTF·D)²`` on the ``rfft2`` grid of the crop, what
  ``relion_refine`` computes for a 2-D stack of CTF-premultiplied images.
* Visibility: a tilt sees a particle when the whole box lies inside the binned image and the
  tilt's pre-exposure is at most ``max_dose_e_per_A2``; particles seen by fewer than
  ``min_visible_tilts`` tilts are not kept (``ParticleCrops.kept``; RELION drops particles that
  no tilt sees and says how many). Crops and weights of unseen tilts are zero.

Memory: tilts are binned one at a time and particles processed in batches, so at most
``batch_size`` full boxes exist at once besides the outputs (which are at the crop size).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf import ctf_2d, defocus_with_handedness, electron_wavelength_A
from tomopipe.algorithms.filters import exposure_filter, fourier_crop_bin, fourier_crop_shape, radial_frequency_grid
from tomopipe.algorithms.fourier import crop_centered, phase_ramp_2d
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.errors import TomopipeError

__all__ = ["TiltGeometry", "ParticleTiltPositions", "ParticleCrops", "TiltCtf", "TiltCtfWeights", "binned_image_shape",
           "particle_tilt_positions", "circle_crop", "extract_crops"]

TiltImages = torch.Tensor | Callable[[int], torch.Tensor]


def _per_tilt(name: str, value, n: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise TomopipeError(f"tilt geometry: {name} needs one value per tilt ({n}), got {t.numel()}")
    if not bool(torch.isfinite(t).all()):
        raise TomopipeError(f"tilt geometry: {name} has NaN or infinite values")
    return t.clone()


@dataclass(frozen=True)
class TiltGeometry:
    """The used tilts of one tilt series: projection, CTF and dose, per tilt (n tilts).

    ``rotations`` ``[n, 3, 3]`` (``Rz(rot_z)·Ry(rot_y)·Rx(rot_x)``), ``shifts_A`` ``[n, 2]``
    (image-plane shifts after the rotation), defocus U/V (Å, underfocus positive) and the
    astigmatism angle (from +x toward +y) at the image centre, ``pre_exposure_e_per_A2`` (dose
    before the tilt), ``defocus_hand`` (RELION ``rlnTomoHand``, −1 or +1); ``pixel_size_A`` and
    ``image_size_px`` ``(nx, ny)`` of the tilt images; ``magnification`` per tilt (image scale,
    default 1) and ``phase_shift_deg`` per tilt (default 0). Per-tilt values become float64 tensors.
    """

    rotations: torch.Tensor
    shifts_A: torch.Tensor
    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    pre_exposure_e_per_A2: torch.Tensor
    defocus_hand: int
    pixel_size_A: float
    image_size_px: tuple[int, int]
    voltage_kV: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    phase_shift_deg: torch.Tensor | float = 0.0
    magnification: torch.Tensor | float = 1.0

    def __post_init__(self):
        rotations = torch.as_tensor(self.rotations, dtype=torch.float64)
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or rotations.shape[0] < 1:
            raise TomopipeError(f"tilt geometry: rotations must have shape [n, 3, 3], got {tuple(rotations.shape)}")
        n = rotations.shape[0]
        shifts = torch.as_tensor(self.shifts_A, dtype=torch.float64).reshape(-1, 2)
        if shifts.shape[0] != n:
            raise TomopipeError(f"tilt geometry: shifts_A must have shape [{n}, 2], got {tuple(shifts.shape)}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        set_("rotations", rotations.clone())
        set_("shifts_A", shifts.clone())
        for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "pre_exposure_e_per_A2",
                     "phase_shift_deg", "magnification"):
            set_(name, _per_tilt(name, getattr(self, name), n))
        if self.defocus_hand not in (-1, 1):
            raise TomopipeError(f"tilt geometry: defocus_hand must be -1 or +1 (RELION rlnTomoHand), "
                                f"got {self.defocus_hand!r}")
        if not self.pixel_size_A > 0:
            raise TomopipeError(f"tilt geometry: pixel_size_A must be > 0, got {self.pixel_size_A!r}")
        size = tuple(int(s) for s in self.image_size_px)
        if len(size) != 2 or min(size) < 1:
            raise TomopipeError(f"tilt geometry: image_size_px must be (nx, ny) > 0, got {self.image_size_px!r}")
        set_("image_size_px", size)
        if bool((self.magnification <= 0).any()):
            raise TomopipeError(f"tilt geometry: magnification must be > 0, got {self.magnification.tolist()}")
        if bool((self.pre_exposure_e_per_A2 < 0).any()):
            raise TomopipeError("tilt geometry: pre_exposure_e_per_A2 must be >= 0")

    @property
    def n_tilts(self) -> int:
        return int(self.rotations.shape[0])

    @classmethod
    def from_alignment(cls, rot_z_deg, rot_y_deg, rot_x_deg, shifts_A, **fields) -> TiltGeometry:
        """Build from RELION 5 alignment angles (``rlnTomoZRot``, ``rlnTomoYTilt``, ``rlnTomoXTilt``)
        and the remaining fields by name."""
        rotations = projection_rotations(torch.as_tensor(rot_z_deg, dtype=torch.float64),
                                         torch.as_tensor(rot_y_deg, dtype=torch.float64),
                                         torch.as_tensor(rot_x_deg, dtype=torch.float64))
        return cls(rotations=rotations, shifts_A=shifts_A, **fields)


@dataclass(frozen=True)
class ParticleTiltPositions:
    """Where m particles fall in the n (binned) tilt images: ``xy_px`` ``[m, n, 2]`` (x, y) sub-pixel,
    ``defocus_A`` ``[m, n, 3]`` (U, V, angle) at the particle, ``visible`` ``[m, n]`` (the box fits)."""

    xy_px: torch.Tensor
    defocus_A: torch.Tensor
    visible: torch.Tensor


@dataclass(frozen=True)
class ParticleCrops:
    """Extracted particles: ``crops`` ``[m, n, c, c]`` float32 (CTF-premultiplied, dose-weighted,
    particle on ``c//2``), ``ctf2`` ``[m, n, c, c//2+1]`` float32 ((CTF·D)² on the crop's rfft2 grid),
    ``visible`` ``[m, n]`` (the tilts used), ``kept`` ``[m]``, the positions and defocus of
    :class:`ParticleTiltPositions`, and ``pixel_size_A`` of the crops (binned, nominal)."""

    crops: torch.Tensor
    ctf2: torch.Tensor
    visible: torch.Tensor
    kept: torch.Tensor
    xy_px: torch.Tensor
    defocus_A: torch.Tensor
    pixel_size_A: float

    @property
    def n_dropped(self) -> int:
        """Particles not kept (seen by too few tilts)."""
        return int((~self.kept).sum())


def binned_image_shape(geometry: TiltGeometry, binning: float) -> tuple[int, int]:
    """``(ny, nx)`` of the tilt images after Fourier binning by ``binning`` (>= 1)."""
    if not binning >= 1.0:
        raise TomopipeError(f"extraction: binning must be >= 1 (relative to the tilt series), got {binning!r}")
    nx, ny = geometry.image_size_px
    return fourier_crop_shape((ny, nx), binning)


def _binned_pixel_xy_A(geometry: TiltGeometry, binning: float) -> torch.Tensor:
    """Exact pixel size (x, y) in Å of the binned images: ``pixel · N / N_binned`` per axis."""
    ny_b, nx_b = binned_image_shape(geometry, binning)
    nx, ny = geometry.image_size_px
    return torch.tensor([nx / nx_b, ny / ny_b], dtype=torch.float64) * geometry.pixel_size_A


def particle_tilt_positions(geometry: TiltGeometry, positions_A, box_px: int,
                            binning: float = 1.0) -> ParticleTiltPositions:
    """Project particles ``positions_A`` ``[m, 3]`` into every binned tilt image (float64 results).

    ``xy_px``: ``N_binned//2 + (m·[R·p]_xy + shift) / binned pixel``; ``defocus_A``: the tilt's
    U and V plus ``hand·z_P`` and its angle; ``visible``: the ``box_px`` box around the nearest
    pixel (:func:`_box_starts`) lies inside the binned image.
    """
    p = torch.as_tensor(positions_A, dtype=torch.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise TomopipeError(f"extraction: particle positions must have shape [m, 3] (x, y, z Å), got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise TomopipeError("extraction: particle positions have NaN or infinite values")
    g = geometry
    projected = project_points(p, g.rotations)  # [n, m, 3]
    xy_A = g.magnification[:, None, None] * projected[..., :2] + g.shifts_A[:, None, :]
    ny_b, nx_b = binned_image_shape(g, binning)
    centre = torch.tensor([nx_b // 2, ny_b // 2], dtype=torch.float64)
    xy_px = (centre + xy_A / _binned_pixel_xy_A(g, binning)).transpose(0, 1).contiguous()
    depth = projected[..., 2].transpose(0, 1)  # [m, n]
    defocus = torch.stack([defocus_with_handedness(g.defocus_u_A, depth, g.defocus_hand),
                           defocus_with_handedness(g.defocus_v_A, depth, g.defocus_hand),
                           g.defocus_angle_deg.expand_as(depth)], dim=-1)
    starts = _box_starts(xy_px, box_px)
    limit = torch.tensor([nx_b, ny_b], dtype=torch.int64)
    visible = ((starts >= 0) & (starts + box_px <= limit)).all(dim=-1)
    return ParticleTiltPositions(xy_px, defocus, visible)


def _box_starts(xy_px: torch.Tensor, box_px: int) -> torch.Tensor:
    """First pixel (x, y) of the box whose index ``box//2`` is the nearest pixel to ``xy_px``."""
    return torch.floor(xy_px + 0.5).to(torch.int64) - box_px // 2


def _disc_masks(n: int, diameter_px: float, falloff_px: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(outside ``[n, n]`` bool: r >= diameter/2 about ``n//2``; soft disc ``[n, n]``: 1 inside
    ``diameter/2 − falloff``, raised cosine to 0 at ``diameter/2``), float32."""
    i = torch.arange(n, dtype=torch.float32, device=device) - n // 2
    r = torch.sqrt(i[:, None] ** 2 + i[None, :] ** 2)
    radius = 0.5 * float(diameter_px)
    edge = torch.clamp((radius - r) / max(float(falloff_px), 1e-6), 0.0, 1.0)
    return r >= radius, 0.5 - 0.5 * torch.cos(math.pi * edge)


def circle_crop(boxes: torch.Tensor, diameter_px: float, falloff_px: float) -> torch.Tensor:
    """RELION's ``cropCircle`` on boxes ``[..., N, N]``: subtract the mean outside the circle of
    ``diameter_px`` about ``N//2`` (none when no pixel is outside), then multiply by a soft disc
    (1 inside ``diameter/2 − falloff``, raised cosine to 0 at ``diameter/2``)."""
    outside, disc = _disc_masks(boxes.shape[-1], diameter_px, falloff_px, boxes.device)
    return (boxes - _background_mean(boxes, outside)) * disc


def _background_mean(boxes: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Mean of ``boxes`` ``[..., N, N]`` over the ``outside`` pixels, ``[..., 1, 1]`` (0 if there are none)."""
    count = int(outside.sum())
    if count == 0:
        return torch.zeros(boxes.shape[:-2] + (1, 1), dtype=boxes.dtype, device=boxes.device)
    weights = (outside.to(boxes.dtype) / count).reshape(-1)
    return (boxes.reshape(boxes.shape[:-2] + (-1,)) @ weights)[..., None, None]


def _tilt_image(images: TiltImages, index: int, geometry: TiltGeometry, binning: float,
                device: torch.device) -> torch.Tensor:
    image = images(index) if callable(images) else images[index]
    image = torch.as_tensor(image)
    nx, ny = geometry.image_size_px
    if tuple(image.shape) != (ny, nx):
        raise TomopipeError(f"extraction: tilt image {index} has shape {tuple(image.shape)}, the tilt geometry "
                            f"says {ny} x {nx} (ny, nx)")
    image = fourier_crop_bin(image.to(device=device, dtype=torch.float32), binning)
    if not math.isfinite(float(image.sum())):  # a NaN or inf pixel spreads through the binning into the sum
        raise TomopipeError(f"extraction: tilt image {index} has NaN or infinite values")
    return image


@functools.lru_cache(maxsize=96)
def _tilt_ctf_grids(pixel_A: float, size: int, centre: tuple, optics: tuple, pre_exposure_e_per_A2: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(χ_c, π·λ·k², D) float32 on the rfft2 grid of ``size`` for a tilt's defocus ``centre`` (U, V Å, angle
    °), ``optics`` (kV, Cs mm, amplitude contrast, phase shift °) and pre-exposure, at the specimen pixel
    ``pixel_A``; cached, as every chunk of particles (and the reconstruction) asks for the same tilts (the
    callers must not change them in place)."""
    voltage_kV, cs_mm, amplitude, phase_deg = optics
    pixel = torch.tensor(pixel_A, dtype=torch.float64)
    sin_cos = [ctf_2d((size, size), pixel, *centre, voltage_kV, cs_mm, amplitude, phase_deg + extra)
               for extra in (0.0, 90.0)]
    k = radial_frequency_grid((size, size), pixel)
    to = dict(device=device, dtype=torch.float32)
    chi = torch.atan2(sin_cos[0].double(), sin_cos[1].double()).to(**to)
    wavelength_A = electron_wavelength_A(torch.tensor(voltage_kV, dtype=torch.float64))
    phase_per_A = (math.pi * wavelength_A * k**2).to(**to)
    return chi, phase_per_A, exposure_filter(k, pre_exposure_e_per_A2, voltage_kV).to(**to)


class TiltCtf:
    """CTF and exposure filter of one tilt on an rfft2 grid of ``size`` px, for any particle.

    A particle's defocus differs from the tilt centre's by the same δ on U and V, so its phase is
    ``χ_c + π·λ·δ·k²`` and its CTF ``sin(χ_c + π·λ·δ·k²)`` (RELION sign); ``χ_c`` (mod 2π) is
    ``atan2(sin χ_c, cos χ_c)`` with ``sin χ_c`` and ``cos χ_c = sin(χ_c + 90°)`` from
    :func:`~tomopipe.algorithms.ctf.ctf_2d`, once per tilt.
    """

    def __init__(self, geometry: TiltGeometry, i: int, pixel_A: float, size: int, device: torch.device):
        g = geometry
        centre = (float(g.defocus_u_A[i]), float(g.defocus_v_A[i]), float(g.defocus_angle_deg[i]))
        optics = (float(g.voltage_kV), float(g.spherical_aberration_mm), float(g.amplitude_contrast),
                  float(g.phase_shift_deg[i]))
        self.chi, self.phase_per_A, self.dose = _tilt_ctf_grids(
            pixel_A / float(g.magnification[i]), int(size), centre, optics, float(g.pre_exposure_e_per_A2[i]),
            torch.device(device))
        self.centre_defocus_u_A = centre[0]

    def ctf(self, defocus_u_A: torch.Tensor) -> torch.Tensor:
        """CTFs ``[b, size, size//2+1]`` at the particles' defocus U ``[b]`` (V and the angle follow)."""
        delta = (defocus_u_A - self.centre_defocus_u_A).to(self.chi)[:, None, None]
        return torch.addcmul(self.chi, delta, self.phase_per_A).sin_()


class TiltCtfWeights:
    """``(CTF·D)²`` on the rfft2 grid of ``size`` px for (tilt, particle) pairs: per tilt its CTF at the
    particle's defocus times the exposure filter D at the tilt's pre-exposure (``D²`` alone when the crops
    were extracted without the CTF), each tilt's grids computed once (:class:`TiltCtf`, the extraction's
    own CTF); what :class:`ParticleCrops` holds as ``ctf2``, for crops read back from disk."""

    def __init__(self, geometry: TiltGeometry, pixel_size_A: float, size: int, apply_ctf: bool, device):
        self.tilts = [TiltCtf(geometry, i, pixel_size_A, size, device) for i in range(geometry.n_tilts)]
        self.apply_ctf = apply_ctf

    def __call__(self, tilts: torch.Tensor, defocus_u_A: torch.Tensor) -> torch.Tensor:
        """Weights ``[k, size, size//2+1]`` of k pairs: tilt indices ``[k]``, the particles' defocus U ``[k]``."""
        first = self.tilts[0].dose
        out = torch.empty((tilts.numel(), *first.shape), dtype=first.dtype, device=first.device)
        for t in torch.unique(tilts).tolist():
            pairs = torch.nonzero(tilts == t).reshape(-1)
            ctf = self.tilts[t]
            out[pairs.to(out.device)] = ctf.ctf(defocus_u_A[pairs]).mul_(ctf.dose) if self.apply_ctf else ctf.dose
        return out.square_()


@dataclass(frozen=True)
class _BoxSettings:
    box_px: int
    crop_px: int
    sign: float
    apply_ctf: bool
    outside: torch.Tensor | None  # background pixels of the box for the circular crop (None: no circle)
    disc: torch.Tensor | None     # soft disc on the crop


def _extract_batch(image: torch.Tensor, xy_px: torch.Tensor, defocus_u_A: torch.Tensor, box: TiltCtf,
                   crop: TiltCtf, s: _BoxSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``[b, c, c]`` and weights ``[b, c, c//2+1]`` of b particles visible in one binned tilt image."""
    device = image.device
    n = s.box_px
    boxes = torch.stack([image[y:y + n, x:x + n] for x, y in _box_starts(xy_px, n).tolist()])
    # the particle sits at box//2 + (xy - nearest pixel): move it onto box//2
    fraction = (xy_px - torch.floor(xy_px + 0.5)).to(device)
    weight = box.dose * s.sign
    if s.apply_ctf:
        defocus_u_A = defocus_u_A.to(device)
        weight = weight * box.ctf(defocus_u_A)
        ctf2 = (crop.ctf(defocus_u_A) * crop.dose) ** 2
    else:
        ctf2 = (crop.dose ** 2).expand(boxes.shape[0], -1, -1)
    spectrum = torch.fft.rfft2(boxes) * (phase_ramp_2d(-fraction, (n, n)) * weight)
    real = torch.fft.irfft2(spectrum, s=(n, n))
    crops = crop_centered(real, (real.shape[0], s.crop_px, s.crop_px))
    if s.outside is not None:
        crops = (crops - _background_mean(real, s.outside)) * s.disc
    return crops, ctf2


def _check_settings(geometry: TiltGeometry, box_px: int, crop_px: int, binning: float, batch_size: int,
                    min_visible_tilts: int):
    ny_b, nx_b = binned_image_shape(geometry, binning)
    if box_px < 2 or crop_px < 2 or crop_px > box_px:
        raise TomopipeError(f"extraction: need 2 <= crop_px <= box_px, got box_px = {box_px}, crop_px = {crop_px}")
    if box_px > min(nx_b, ny_b):
        raise TomopipeError(
            f"extraction: a box of {box_px} px does not fit in the tilt images binned by {binning} "
            f"({nx_b} x {ny_b} px of {geometry.pixel_size_A * binning:.4g} Å): use a smaller box or less binning")
    if batch_size < 1 or min_visible_tilts < 1:
        raise TomopipeError(f"extraction: batch_size and min_visible_tilts must be >= 1, got {batch_size} "
                            f"and {min_visible_tilts}")


def extract_crops(images: TiltImages, geometry: TiltGeometry, positions_A, box_px: int, crop_px: int | None = None,
                  *, binning: float = 1.0, max_dose_e_per_A2: float | None = None, min_visible_tilts: int = 1,
                  batch_size: int = 64, invert_contrast: bool = True, apply_ctf: bool = True,
                  circle_falloff_px: float | None = 5.0, device=None) -> ParticleCrops:
    """Per-tilt 2-D crops of particles at ``positions_A`` ``[m, 3]`` (Å from the tomogram centre).

    ``images``: the tilt images ``[n, ny, nx]`` in the order of ``geometry`` (its pixel size), or
    a callable returning image i (each is read once). ``box_px`` / ``crop_px`` (default the box)
    in binned pixels; ``binning`` relative to the tilt images; ``max_dose_e_per_A2`` leaves out
    tilts with a larger pre-exposure; ``invert_contrast`` (RELION default) multiplies by −1;
    ``apply_ctf=False`` skips the CTF (the dose weighting stays); ``circle_falloff_px=None`` skips
    the circular crop. Computed on ``device`` (default: that of a tensor ``images``, else CPU);
    results on the CPU. See the module docstring for the conventions.
    """
    crop_px = box_px if crop_px is None else int(crop_px)
    box_px = int(box_px)
    _check_settings(geometry, box_px, crop_px, binning, batch_size, min_visible_tilts)
    n = geometry.n_tilts
    if not callable(images) and len(images) != n:
        raise TomopipeError(f"extraction: {len(images)} tilt images but the tilt geometry has {n} tilts")
    if device is None:
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    where = particle_tilt_positions(geometry, positions_A, box_px, binning)
    visible = where.visible.clone()
    if max_dose_e_per_A2 is not None:
        visible &= (geometry.pre_exposure_e_per_A2 <= max_dose_e_per_A2)[None, :]
    kept = visible.sum(dim=1) >= min_visible_tilts
    visible &= kept[:, None]
    m = visible.shape[0]
    crops = torch.zeros((m, n, crop_px, crop_px), dtype=torch.float32)
    ctf2 = torch.zeros((m, n, crop_px, crop_px // 2 + 1), dtype=torch.float32)
    pixel_A = geometry.pixel_size_A * binning
    outside = disc = None
    if circle_falloff_px is not None:
        outside = _disc_masks(box_px, crop_px, circle_falloff_px, device)[0]
        disc = _disc_masks(crop_px, crop_px, circle_falloff_px, device)[1]
    settings = _BoxSettings(box_px, crop_px, -1.0 if invert_contrast else 1.0, apply_ctf, outside, disc)
    for i in range(n):
        particles = torch.nonzero(visible[:, i]).reshape(-1)
        if particles.numel() == 0:
            continue
        image = _tilt_image(images, i, geometry, binning, device)
        box, crop = (TiltCtf(geometry, i, pixel_A, size, device) for size in (box_px, crop_px))
        for batch in particles.split(batch_size):
            c, w = _extract_batch(image, where.xy_px[batch, i], where.defocus_A[batch, i, 0], box, crop, settings)
            crops[batch, i] = c.cpu()
            ctf2[batch, i] = w.cpu()
    return ParticleCrops(crops, ctf2, visible, kept, where.xy_px, where.defocus_A, pixel_A)
