"""Image formation of one tilt: projected potential -> CTF with a defocus gradient -> contrast.

Weak-phase image (relative intensity ``I/I₀ = 1 + c``):
``c = −2·F⁻¹[ Σ_l CTF_l(k)·Φ̂_l(k) ]·E(k)``, where Φ_l is the phase ``σ·V_p`` (rad) of everything
in depth layer l, ``CTF_l`` the RELION-sign CTF (``+sin χ``, positive first peak) of
:func:`tomopipe.algorithms.ctf.ctf_2d` at the layer's defocus, and ``E`` the optional envelopes
(temporal and spatial coherence, Frank 2006 ch. 2) times the detector's pixel-aperture MTF. With
this sign a particle denser than the ice is dark, as in raw cryo-EM images.

Defocus gradient (multi-layer weak-phase approximation): the specimen is cut into layers of
``defocus_layer_A`` along the beam; a particle goes to the layer of its defocus
``Δf_centre + hand·z_P``; each ice sub-slab (a tilted plane) is split between the two layers
around its local defocus with linear weights. The CTF of layer l is the central CTF with the
defocus offset δ_l added to U and V: ``χ_l = χ_c + π·λ·δ_l·k²``, so
``Σ_l sin(χ_l)·Φ̂_l = [e^{iχ_c}·Σ_l e^{iπλδ_l k²}Φ̂_l − e^{−iχ_c}·Σ_l e^{−iπλδ_l k²}Φ̂_l] / 2i``
(two accumulators, one FFT per layer). The CTF is evaluated at the effective pixel size p/m
(the magnification scales the specimen frequencies).

Uneven ice (:class:`tomopipe.simulate.specimen.IceThickness`): each image pixel sees the slab's
thickness ``t`` at the point of the mid-plane that projects onto it
(:func:`ice_thickness_image`); the ice fluctuations scale with ``sqrt(t / t̄)`` (their power
grows with the path length); the sub-slab depths stay those of the mean slab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms.ctf import ctf_2d, defocus_with_handedness, electron_wavelength_A
from tomopipe.algorithms.geometry import project_points, projection_rotations
from tomopipe.simulate._numba import HAVE_NUMBA as _HAVE_NUMBA
from tomopipe.simulate._numba import numba
from tomopipe.simulate.plan import TiltPlan
from tomopipe.simulate.projector import FourierSliceProjector
from tomopipe.simulate.specimen import ice_potential_field

__all__ = [
    "Optics",
    "IceModel",
    "project_particles",
    "ctf_phasor",
    "coherence_envelope",
    "pixel_mtf",
    "render_tilt_contrast",
    "ice_thickness_image",
]


@dataclass(frozen=True)
class Optics:
    """Microscope optics (units in the names)."""

    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    cc_mm: float = 2.7
    energy_spread_eV: float = 0.8
    illumination_semi_angle_mrad: float = 0.01
    envelopes: bool = True
    detector_mtf: bool = True
    hand: int = -1
    layer_A: float = 50.0


@dataclass(frozen=True)
class IceModel:
    """Amorphous ice slab ``|z| <= thickness/2`` (specimen frame), split into ``sublayers``."""

    thickness_A: float
    density_g_per_cm3: float = 0.94
    sublayers: int = 3
    fluctuations: bool = True


def project_particles(tilt: TiltPlan, positions_A: torch.Tensor, image_shape: tuple[int, int], pixel_size_A: float):
    """Image positions of particle centres at this tilt.

    Returns ``(xy_A [n, 2] from the image centre, z_P [n] Å, xy_px [n, 2])`` with the pixel
    position ``xy_px = xy_A / pixel + (W//2, H//2)``.
    """
    h, w = image_shape
    rot = projection_rotations(tilt.axis_deg, tilt.tilt_deg).double()
    pts = project_points(positions_A.double().reshape(-1, 3), rot)[0]
    xy = pts[:, :2] * tilt.magnification + torch.tensor(tilt.shift_A, dtype=torch.float64)
    px = xy / pixel_size_A + torch.tensor([w // 2, h // 2], dtype=torch.float64)
    return xy, pts[:, 2], px


def ice_thickness_image(tilt: TiltPlan, ice, image_shape: tuple[int, int], pixel_size_A: float,
                        device="cpu", step_px: int = 8) -> torch.Tensor:
    """Ice thickness (Å, float32 ``[H, W]``) under every pixel of this tilt's image: the pixel
    ``x_img`` sees the mid-plane point ``(u / cos θ, v)``, ``(u, v) = R2(−axis)·(x_img − s)/m``
    (the projection model of :mod:`tomopipe.simulate.plan` at z = 0). Evaluated every ``step_px``
    pixels and interpolated (the field varies over the whole image)."""
    h, w = image_shape
    ys = torch.arange(0, h + step_px, step_px, dtype=torch.float64)
    xs = torch.arange(0, w + step_px, step_px, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    dx = (gx - w // 2) * pixel_size_A - tilt.shift_A[0]
    dy = (gy - h // 2) * pixel_size_A - tilt.shift_A[1]
    a = math.radians(tilt.axis_deg)
    u = (math.cos(a) * dx + math.sin(a) * dy) / tilt.magnification
    v = (-math.sin(a) * dx + math.cos(a) * dy) / tilt.magnification
    coarse = ice.thickness_A(u / math.cos(math.radians(tilt.tilt_deg)), v).float()
    size = ((ys.numel() - 1) * step_px + 1, (xs.numel() - 1) * step_px + 1)  # pixel i at coarse i / step
    fine = torch.nn.functional.interpolate(coarse[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
    return fine[:h, :w].contiguous().to(device)


def _k_grid(image_shape, pixel_size_A, device):
    h, w = image_shape
    ky = torch.fft.fftfreq(h, d=pixel_size_A, dtype=torch.float64, device=device)
    kx = torch.fft.rfftfreq(w, d=pixel_size_A, dtype=torch.float64, device=device)
    return ky[:, None], kx[None, :]


def ctf_phasor(image_shape, pixel_size_A, defocus_u_A, defocus_v_A, angle_deg, optics: Optics, device) -> torch.Tensor:
    """``exp(i·ψ)`` with ``sin ψ`` = :func:`ctf_2d` (RELION sign) on the rfft grid, complex64.

    Built from two calls of ``ctf_2d`` (phase shift 0 and 90°), so astigmatism, amplitude
    contrast and sign follow tomopipe's CTF module exactly.
    """
    pix = torch.tensor(pixel_size_A, dtype=torch.float64, device=device)
    both = ctf_2d(
        image_shape, pix, defocus_u_A, defocus_v_A, angle_deg, optics.voltage_kV, optics.cs_mm,
        optics.amplitude_contrast, phase_shift_deg=torch.tensor([0.0, 90.0], dtype=torch.float64, device=device),
    )
    return torch.complex(both[1].float(), both[0].float())


def coherence_envelope(image_shape, pixel_size_A, defocus_A, optics: Optics, device) -> torch.Tensor:
    """Temporal × spatial coherence envelope on the rfft grid (Frank 2006):
    ``exp(−½(π·λ·Δ·k²)²)·exp(−(π·α/λ)²·(Cs·λ³·k³ − Δf·λ·k)²)``, focal spread
    ``Δ = Cc·(σ_E / E)·(1 + 2ε)/(1 + ε)``, σ_E = FWHM/2.355, ε = eV/(2mc²)."""
    ky, kx = _k_grid(image_shape, pixel_size_A, device)
    k2 = kx * kx + ky * ky
    k = torch.sqrt(k2)
    lam = float(electron_wavelength_A(float(optics.voltage_kV)))
    eps = optics.voltage_kV / (2.0 * 510.99895)
    sigma_e = optics.energy_spread_eV / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    focal_spread_A = optics.cc_mm * 1e7 * sigma_e / (optics.voltage_kV * 1e3) * (1 + 2 * eps) / (1 + eps)
    temporal = torch.exp(-0.5 * (math.pi * lam * focal_spread_A * k2) ** 2)
    alpha = optics.illumination_semi_angle_mrad * 1e-3
    cs_A = optics.cs_mm * 1e7
    spatial = torch.exp(-((math.pi * alpha / lam) ** 2) * (cs_A * lam**3 * k**3 - defocus_A * lam * k) ** 2)
    return (temporal * spatial).float()


def pixel_mtf(image_shape, device) -> torch.Tensor:
    """Pixel-aperture MTF ``sinc(fx)·sinc(fy)`` (f in cycles/pixel) on the rfft grid."""
    h, w = image_shape
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)
    return (torch.sinc(fy)[:, None] * torch.sinc(fx)[None, :]).float()


@contextlib.contextmanager
def single_thread():
    """Run small tensor ops on one thread: with other processes on the cores, torch's intra-op
    parallelism makes a 200 × 200 add 50× slower than serial."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _add_box(layer: torch.Tensor, box: torch.Tensor, x0: int, y0: int) -> None:
    """``layer[y0:y0+n, x0:x0+n] += box`` clipped to the layer."""
    h, w = layer.shape
    n = box.shape[-1]
    ya, yb = max(0, y0), min(h, y0 + n)
    xa, xb = max(0, x0), min(w, x0 + n)
    if ya >= yb or xa >= xb:
        return
    layer[ya:yb, xa:xb] += box[ya - y0 : yb - y0, xa - x0 : xb - x0]


if _HAVE_NUMBA:

    @numba.njit(cache=True, parallel=True, fastmath=True)
    def _accumulate_numba(spec, phasor, step, acc_plus, acc_minus):  # pragma: no cover - compiled
        """acc_plus += phasor·spec; acc_minus += conj(phasor)·spec; phasor *= step (one pass)."""
        rows, cols = spec.shape
        for i in numba.prange(rows):
            for j in range(cols):
                s = spec[i, j]
                p = phasor[i, j]
                acc_plus[i, j] += p * s
                acc_minus[i, j] += p.conjugate() * s
                phasor[i, j] = p * step[i, j]

    @numba.njit(cache=True, parallel=True, fastmath=True)
    def _spread_numba(field, stack, u0, ux, uy, n_layers, first):  # pragma: no cover - compiled
        """Add ``field`` to the layers around u = u0 + ux·column + uy·row (linear weights); the
        stack holds layers ``first .. first + len(stack) − 1`` of ``n_layers``."""
        count, rows, cols = stack.shape
        for i in numba.prange(rows):
            for j in range(cols):
                u = u0 + ux * j + uy * i
                l0 = int(math.floor(u))
                if l0 < 0:
                    l0 = 0
                elif l0 > n_layers - 2:
                    l0 = n_layers - 2
                w1 = u - l0
                if w1 < 0.0:
                    w1 = 0.0
                elif w1 > 1.0:
                    w1 = 1.0
                f = field[i, j]
                k = l0 - first
                if 0 <= k < count:
                    stack[k, i, j] += (1.0 - w1) * f
                if 0 <= k + 1 < count:
                    stack[k + 1, i, j] += w1 * f


def _spread(field: torch.Tensor, stack: torch.Tensor, u0: float, ux: float, uy: float,
            n_layers: int | None = None, first: int = 0) -> tuple[int, int]:
    """Split ``field`` between the two layers around the plane ``u = u0 + ux·x + uy·y`` (layer
    units, x = column, y = row), clamped to layers 0 .. n_layers − 1. ``stack`` holds layers
    ``first .. first + len(stack) − 1`` (all of them by default). Returns the range of layers the
    plane touches (whether or not they are in ``stack``)."""
    count, h, w = stack.shape
    n_layers = count if n_layers is None else n_layers
    corners = [u0, u0 + ux * (w - 1), u0 + uy * (h - 1), u0 + ux * (w - 1) + uy * (h - 1)]
    lo = min(max(int(math.floor(min(corners))), 0), n_layers - 2)
    hi = min(max(int(math.floor(max(corners))), 0), n_layers - 2) + 1
    if hi < first or lo >= first + count:
        return lo, hi
    if _HAVE_NUMBA and stack.device.type == "cpu":
        _spread_numba(field.contiguous().numpy(), stack.numpy(), u0, ux, uy, n_layers, first)
        return lo, hi
    ys = torch.arange(h, dtype=torch.float64, device=stack.device)[:, None]
    xs = torch.arange(w, dtype=torch.float64, device=stack.device)[None, :]
    u = (u0 + ux * xs + uy * ys).float()
    l0 = torch.floor(u).clamp(0, n_layers - 2).to(torch.int64)
    w1 = (u - l0).clamp(0, 1)
    for offset, weight in ((0, 1 - w1), (1, w1)):
        k = l0 + offset - first
        inside = (k >= 0) & (k < count)
        stack.scatter_add_(0, k.clamp(0, count - 1)[None], (weight * field * inside)[None])
    return lo, hi


def _accumulate(spec, phasor, step, acc_plus, acc_minus) -> torch.Tensor:
    """One depth layer into the two CTF accumulators; returns the phasor of the next layer."""
    if _HAVE_NUMBA and spec.device.type == "cpu":
        _accumulate_numba(spec.numpy(), phasor.numpy(), step.numpy(), acc_plus.numpy(), acc_minus.numpy())
        return phasor
    acc_plus.addcmul_(phasor, spec)
    acc_minus.addcmul_(phasor.conj(), spec)
    return phasor * step


def _layer_stack(workspace: dict | None, n_layers: int, h: int, w: int, device) -> torch.Tensor:
    """A zeroed ``[n_layers, h, w]`` float32 stack, reusing ``workspace['stack']`` when it is large enough."""
    if workspace is None:
        return torch.zeros((n_layers, h, w), dtype=torch.float32, device=device)
    buf = workspace.get("stack")
    if buf is None or buf.shape[0] < n_layers or buf.shape[1:] != (h, w) or buf.device != torch.device(device):
        buf = torch.zeros((n_layers, h, w), dtype=torch.float32, device=device)
        workspace["stack"] = buf
    stack = buf[:n_layers]
    stack.zero_()
    return stack


def render_tilt_contrast(
    tilt: TiltPlan,
    image_shape: tuple[int, int],
    pixel_size_A: float,
    optics: Optics,
    interaction_rad_per_V_A: float,
    *,
    projector: FourierSliceProjector | None = None,
    positions_A: torch.Tensor | None = None,
    rotations: torch.Tensor | None = None,
    ice: IceModel | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    ice_psd_sqrt: torch.Tensor | None = None,
    workspace: dict | None = None,
    max_stack_bytes: float = 2e9,
    particle_share: bool = False,
    ice_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Noise-free contrast spectrum ``rfft2(c)`` of one tilt image (before damage and motion).

    Returns ``(spectrum [H, W//2+1] complex64, info)`` with ``info`` holding the particles'
    pixel positions (``xy_px``), depths ``z_P_A``, defocus ``defocus_A`` and the number of
    depth layers; with ``particle_share``, also ``particle_spectrum``: the particles' part of
    ``spectrum`` alone (the part that radiation damage fades, see
    :func:`tomopipe.simulate.detector.render_frames`). ``ice_scale`` ``[H, W]``: the ice
    fluctuations' amplitude relative to the mean slab, ``sqrt(t / t̄)`` (None: 1).
    ``workspace``: a dict kept by the caller between tilts, so that the layer stack
    (layers × H × W float32) is allocated once; at most ``max_stack_bytes`` of layers are held at
    a time (blocks of layers are processed in turn).
    """
    device = torch.device(device)
    h, w = image_shape
    p = pixel_size_A
    m = tilt.magnification
    hand = optics.hand
    dz = optics.layer_A
    info: dict = {}

    n_particles = 0 if positions_A is None else int(positions_A.shape[0])
    if n_particles:
        xy_A, z_p, xy_px = project_particles(tilt, positions_A, image_shape, p)
        delta_particles = defocus_with_handedness(0.0, z_p, hand).double()
        info.update(xy_px=xy_px, z_P_A=z_p, defocus_A=tilt.defocus_centre_A + delta_particles)
    else:
        delta_particles = torch.zeros(0, dtype=torch.float64)

    # ice sub-slab planes: z_P(x) = −tanθ·x_ali + z_k / cosθ, x_ali = [R2(−axis)·(x − s)/m]_x,
    # linear in the pixel position: z_P = zp0 + zpx·column + zpy·row + z_k / cosθ
    theta = math.radians(tilt.tilt_deg)
    alpha = math.radians(tilt.axis_deg)
    use_ice = ice is not None and ice.fluctuations
    if use_ice:
        n_sub = ice.sublayers
        z_k = [(-0.5 + (k + 0.5) / n_sub) * ice.thickness_A for k in range(n_sub)]
        slope = -math.tan(theta) / m
        zpx = slope * math.cos(alpha) * p
        zpy = slope * math.sin(alpha) * p
        zp0 = slope * (math.cos(alpha) * (-(w // 2) * p - tilt.shift_A[0])
                       + math.sin(alpha) * (-(h // 2) * p - tilt.shift_A[1]))
        corner_zp = [zp0, zp0 + zpx * (w - 1), zp0 + zpy * (h - 1), zp0 + zpx * (w - 1) + zpy * (h - 1)]
        ice_deltas = []
        for zk in z_k:
            for c in corner_zp:
                ice_deltas.append(float(defocus_with_handedness(0.0, c + zk / math.cos(theta), hand)))
        ice_deltas_t = torch.tensor(ice_deltas, dtype=torch.float64)
    else:
        ice_deltas_t = torch.zeros(0, dtype=torch.float64)

    all_deltas = torch.cat([delta_particles, ice_deltas_t])
    if all_deltas.numel() == 0:
        info["n_layers"] = 0
        empty = torch.zeros((h, w // 2 + 1), dtype=torch.complex64, device=device)
        if particle_share:
            info["particle_spectrum"] = empty.clone()
        return empty, info
    d_min = float(all_deltas.min())
    n_layers = int(math.floor((float(all_deltas.max()) - d_min) / dz)) + 2
    info["n_layers"] = n_layers
    # particles: projections (phase, rad) and their layers
    boxes, placements = None, []
    if n_particles:
        n_box = projector.n
        ix = torch.floor(xy_px).to(torch.int64)
        frac = (xy_px - ix).float()
        inside = (
            (ix[:, 0] + n_box // 2 > 0) & (ix[:, 0] - n_box // 2 < w)
            & (ix[:, 1] + n_box // 2 > 0) & (ix[:, 1] - n_box // 2 < h)
        )
        sel = torch.nonzero(inside).flatten()
        if sel.numel():
            rot = projection_rotations(tilt.axis_deg, tilt.tilt_deg).double()[0]
            m_total = (rot[None] @ rotations[sel].double()).float()
            layer_index = torch.round((delta_particles[sel] - d_min) / dz).to(torch.int64).tolist()
            boxes = (projector.project(m_total, frac[sel], m) * interaction_rad_per_V_A).to(device)
            placements = [(layer_index[b], int(ix[i, 0]) - n_box // 2, int(ix[i, 1]) - n_box // 2)
                          for b, i in enumerate(sel.tolist())]

    # ice sub-slabs: one Gaussian field each, on a plane of layer coordinate u = u0 + ux·col + uy·row
    ice_planes = []
    if use_ice:
        path = ice.thickness_A / ice.sublayers / math.cos(theta)
        for zk in z_k:
            field = ice_potential_field(
                (h, w), p, path, ice.density_g_per_cm3, generator, device, psd_sqrt=ice_psd_sqrt
            ) * interaction_rad_per_V_A
            if ice_scale is not None:
                field = field * ice_scale
            u0 = (hand * (zp0 + zk / math.cos(theta)) - d_min) / dz
            ice_planes.append((field, u0, hand * zpx / dz, hand * zpy / dz))

    # CTF per layer through the two phasor accumulators, a block of layers at a time
    p_eff = p / m
    ky, kx = _k_grid(image_shape, p_eff, device)
    lam = float(electron_wavelength_A(float(optics.voltage_kV)))
    a = (math.pi * lam * (kx * kx + ky * ky)).float()  # rad per Å of defocus
    acc_plus = torch.zeros((h, w // 2 + 1), dtype=torch.complex64, device=device)
    acc_minus = torch.zeros_like(acc_plus)
    if particle_share:
        particles_plus, particles_minus = torch.zeros_like(acc_plus), torch.zeros_like(acc_plus)
    step = torch.polar(torch.ones_like(a), a * dz)
    phasor = torch.polar(torch.ones_like(a), a * d_min)
    block = max(2, min(n_layers, int(max_stack_bytes // (4 * h * w))))
    info["layer_block"] = block
    for first in range(0, n_layers, block):
        count = min(block, n_layers - first)
        stack = _layer_stack(workspace, count, h, w, device)
        filled = [False] * count
        if placements:
            with single_thread():
                for b, (layer, x0, y0) in enumerate(placements):
                    if first <= layer < first + count:
                        _add_box(stack[layer - first], boxes[b], x0, y0)
                        filled[layer - first] = True
        if particle_share:  # the particle layers alone, before the ice is added to them
            for k in sorted({layer - first for layer, _, _ in placements if first <= layer < first + count}):
                layer_phasor = torch.polar(torch.ones_like(a), a * (d_min + (first + k) * dz))
                spec = torch.fft.rfft2(stack[k])
                particles_plus.addcmul_(layer_phasor, spec)
                particles_minus.addcmul_(layer_phasor.conj(), spec)
        for field, u0, ux, uy in ice_planes:
            lo, hi = _spread(field, stack, u0, ux, uy, n_layers, first)
            for layer in range(max(lo, first), min(hi, first + count - 1) + 1):
                filled[layer - first] = True
        for k in range(count):
            layer = first + k
            if layer % 16 == 0:  # exact phasor now and then: no drift from the repeated products
                phasor = torch.polar(torch.ones_like(a), a * (d_min + layer * dz))
            if not filled[k]:
                phasor = phasor * step
                continue
            phasor = _accumulate(torch.fft.rfft2(stack[k]), phasor, step, acc_plus, acc_minus)
        del stack
    centre = ctf_phasor(image_shape, p_eff, tilt.defocus_u_A, tilt.defocus_v_A, tilt.astigmatism_angle_deg,
                        optics, device)
    envelope = torch.ones_like(a)
    if optics.envelopes:
        envelope = envelope * coherence_envelope(image_shape, p_eff, tilt.defocus_centre_A, optics, device)
    if optics.detector_mtf:
        envelope = envelope * pixel_mtf(image_shape, device)

    def contrast(plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        return (-2.0 * (centre * plus - centre.conj() * minus) / 2j * envelope).to(torch.complex64)

    if particle_share:
        info["particle_spectrum"] = contrast(particles_plus, particles_minus)
    return contrast(acc_plus, acc_minus), info
