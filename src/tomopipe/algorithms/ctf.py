"""The contrast transfer function (CTF) model of tomopipe (``docs/conventions.md`` §4, §7).

Conventions:

* Defocus in Å, **underfocus positive**; astigmatism as (U, V, angle) with DefocusU along the
  azimuth ``angle`` measured from +x toward +y (index space, +y = increasing row index), V
  perpendicular: ``Δf(φ) = ½[U + V + (U − V)·cos 2(φ − angle)]``, ``φ = atan2(ky, kx)``
  (CTFFIND / RELION).
* Phase ``χ(k) = π·λ·Δf·k² − (π/2)·Cs·λ³·k⁴ + phase_shift + atan(w / √(1 − w²))``.
* Sign: RELION / Warp, ``CTF = +sin χ`` (positive first peak; the DC value equals the
  amplitude contrast w). CTFFIND's ``−sin χ`` is available with ``convention="ctffind"``.
* B-factor envelope ``exp(−B·k²/4)`` (RELION).
* Defocus handedness: RELION ``rlnTomoHand`` semantics, ``Δf = Δf_centre + hand·z_P``.

All functions are pure torch, broadcast over leading dimensions of their parameters, keep the
parameters' device, compute in float64 and return float32 unless a float64 tensor is given.
"""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms._tensor import as_f64, out_dtype, tensor_device

__all__ = [
    "electron_wavelength_A",
    "amplitude_contrast_phase_rad",
    "defocus_at_azimuth_A",
    "ctf_2d",
    "ctf_1d",
    "ctf_zero_frequencies_per_A",
    "enforce_ctffind_convention",
    "defocus_with_handedness",
    "phase_flip",
    "ctf_premultiply",
]

# CODATA 2018 exact / recommended values
_PLANCK_J_S = 6.62607015e-34
_ELECTRON_MASS_KG = 9.1093837015e-31
_ELEMENTARY_CHARGE_C = 1.602176634e-19
_SPEED_OF_LIGHT_M_S = 299792458.0

_SIGN = {"relion": 1.0, "warp": 1.0, "ctffind": -1.0}


def _sign(convention: str) -> float:
    try:
        return _SIGN[convention.lower()]
    except KeyError:
        raise ValueError(f"CTF convention must be one of {sorted(_SIGN)}, got {convention!r}") from None


def electron_wavelength_A(voltage_kV) -> torch.Tensor:
    """Relativistic electron wavelength in Å: ``h / sqrt(2·m·e·V·(1 + e·V / (2·m·c²)))`` (300 kV -> 0.019687)."""
    dtype, device = out_dtype(voltage_kV), tensor_device(voltage_kV)
    v = as_f64(voltage_kV, device) * 1e3
    if bool((v <= 0).any()):
        raise ValueError(f"electron_wavelength_A: voltage_kV must be > 0, got {voltage_kV!r}")
    m, e, c, h = _ELECTRON_MASS_KG, _ELEMENTARY_CHARGE_C, _SPEED_OF_LIGHT_M_S, _PLANCK_J_S
    lam_m = h / torch.sqrt(2.0 * m * e * v * (1.0 + e * v / (2.0 * m * c * c)))
    return (lam_m * 1e10).to(dtype)


def amplitude_contrast_phase_rad(amplitude_contrast) -> torch.Tensor:
    """Phase ``atan(w / sqrt(1 − w²))`` (= asin w) that puts an amplitude-contrast fraction w into χ."""
    dtype, device = out_dtype(amplitude_contrast), tensor_device(amplitude_contrast)
    w = as_f64(amplitude_contrast, device)
    if bool(((w < 0) | (w >= 1)).any()):
        raise ValueError(f"amplitude_contrast must be in [0, 1), got {amplitude_contrast!r}")
    return torch.atan(w / torch.sqrt(1.0 - w * w)).to(dtype)


def defocus_at_azimuth_A(defocus_u_A, defocus_v_A, astigmatism_angle_deg, azimuth_deg) -> torch.Tensor:
    """Defocus along an azimuth: ``½[U + V + (U − V)·cos 2(φ − angle)]`` (CTFFIND ``DefocusGivenAzimuth``)."""
    dtype = out_dtype(defocus_u_A, defocus_v_A, azimuth_deg)
    device = tensor_device(defocus_u_A, defocus_v_A, astigmatism_angle_deg, azimuth_deg)
    u, v = as_f64(defocus_u_A, device), as_f64(defocus_v_A, device)
    phi = torch.deg2rad(as_f64(azimuth_deg, device) - as_f64(astigmatism_angle_deg, device))
    return (0.5 * (u + v + (u - v) * torch.cos(2.0 * phi))).to(dtype)


def _chi(k2, defocus_A, lam, cs_A, phase0):
    """χ for squared spatial frequency k² (1/Å²); all float64 tensors that broadcast."""
    return math.pi * lam * defocus_A * k2 - 0.5 * math.pi * cs_A * lam**3 * k2 * k2 + phase0


def _params(device, voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg):
    lam = electron_wavelength_A(as_f64(voltage_kV, device))
    cs_A = as_f64(cs_mm, device) * 1e7
    phase0 = amplitude_contrast_phase_rad(as_f64(amplitude_contrast, device)) + torch.deg2rad(
        as_f64(phase_shift_deg, device)
    )
    return lam, cs_A, phase0


def ctf_1d(
    frequency_per_A,
    defocus_A,
    voltage_kV,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    b_factor_A2=0.0,
    *,
    convention: str = "relion",
) -> torch.Tensor:
    """Radial CTF at spatial frequencies ``frequency_per_A`` (cycles/Å); all arguments broadcast."""
    dtype = out_dtype(frequency_per_A, defocus_A)
    device = tensor_device(frequency_per_A, defocus_A, voltage_kV, cs_mm, amplitude_contrast)
    k = as_f64(frequency_per_A, device)
    lam, cs_A, phase0 = _params(device, voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg)
    k2 = k * k
    out = _sign(convention) * torch.sin(_chi(k2, as_f64(defocus_A, device), lam, cs_A, phase0))
    out = out * torch.exp(-0.25 * as_f64(b_factor_A2, device) * k2)
    return out.to(dtype)


def _frequency_grid_2d(image_shape, pixel_size_A, rfft: bool, fftshift: bool, device):
    """(ky, kx) grids in cycles/Å, broadcast over the leading dims of ``pixel_size_A``."""
    h, w = (int(s) for s in image_shape)
    if h < 1 or w < 1:
        raise ValueError(f"image_shape must be positive (h, w), got {image_shape!r}")
    ky = torch.fft.fftfreq(h, dtype=torch.float64, device=device)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(w, dtype=torch.float64, device=device)
    if fftshift:
        ky = torch.fft.fftshift(ky)
        if not rfft:
            kx = torch.fft.fftshift(kx)
    p = as_f64(pixel_size_A, device)
    if bool((p <= 0).any()):
        raise ValueError(f"pixel_size_A must be > 0, got {pixel_size_A!r}")
    p = p[..., None, None]
    return ky[:, None] / p, kx[None, :] / p


def ctf_2d(
    image_shape,
    pixel_size_A,
    defocus_u_A,
    defocus_v_A,
    astigmatism_angle_deg,
    voltage_kV,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    b_factor_A2=0.0,
    rfft: bool = True,
    fftshift: bool = False,
    *,
    convention: str = "relion",
) -> torch.Tensor:
    """2-D CTF ``[..., h, w//2+1]`` (``rfft``) or ``[..., h, w]``, batched over the parameters' leading dims.

    Frequencies follow ``torch.fft``: rows ky = ``fftfreq(h)/pixel``, columns kx =
    ``rfftfreq(w)/pixel`` (``fftshift`` shifts the full axes, so the DC sits at ``h // 2``).
    DefocusU lies along ``astigmatism_angle_deg`` from +x toward +y (+y = increasing row index).
    """
    dtype = out_dtype(defocus_u_A, defocus_v_A, pixel_size_A)
    device = tensor_device(defocus_u_A, defocus_v_A, astigmatism_angle_deg, pixel_size_A, voltage_kV)
    params = [
        as_f64(x, device)
        for x in (pixel_size_A, defocus_u_A, defocus_v_A, astigmatism_angle_deg, voltage_kV, cs_mm,
                  amplitude_contrast, phase_shift_deg, b_factor_A2)
    ]
    params = torch.broadcast_tensors(*params)
    pix, du, dv, ang, kv, cs, w, ps, bf = params
    ky, kx = _frequency_grid_2d(image_shape, pix, rfft, fftshift, device)
    k2 = kx * kx + ky * ky
    phi = torch.atan2(ky, kx)
    e = lambda t: t[..., None, None]  # noqa: E731  (parameter -> broadcast over the grid)
    defocus = 0.5 * (e(du) + e(dv) + (e(du) - e(dv)) * torch.cos(2.0 * (phi - torch.deg2rad(e(ang)))))
    lam, cs_A, phase0 = _params(device, e(kv), e(cs), e(w), e(ps))
    out = _sign(convention) * torch.sin(_chi(k2, defocus, lam, cs_A, phase0))
    if bool((bf != 0).any()):
        out = out * torch.exp(-0.25 * e(bf) * k2)
    return out.to(dtype)


def ctf_zero_frequencies_per_A(
    defocus_A, voltage_kV, cs_mm, amplitude_contrast, n_zeros: int, phase_shift_deg=0.0
) -> torch.Tensor:
    """The first ``n_zeros`` zeros of the CTF (cycles/Å), analytic: ``χ(k) = n·π``, n = 1..n_zeros.

    Solves ``(π/2)·Cs·λ³·u² − π·λ·Δf·u + (n·π − φ0) = 0`` for u = k² (the low-frequency root,
    in a form stable for Cs = 0). Zeros beyond the Cs turnover (χ never reaches n·π) are NaN.
    Requires underfocus (``defocus_A > 0``). Output ``[..., n_zeros]``.
    """
    if n_zeros < 1:
        raise ValueError(f"n_zeros must be >= 1, got {n_zeros}")
    dtype = out_dtype(defocus_A)
    device = tensor_device(defocus_A, voltage_kV, cs_mm, amplitude_contrast)
    df = as_f64(defocus_A, device)
    if bool((df <= 0).any()):
        raise ValueError(f"ctf_zero_frequencies_per_A: defocus_A must be > 0 (underfocus), got {defocus_A!r}")
    lam, cs_A, phase0 = _params(device, voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg)
    n = torch.arange(1, n_zeros + 1, dtype=torch.float64, device=device)
    a = (0.5 * math.pi * cs_A * lam**3)[..., None]
    b = (math.pi * lam * df)[..., None]
    c = n * math.pi - phase0[..., None]
    disc = b * b - 4.0 * a * c
    u = 2.0 * c / (b + torch.sqrt(torch.clamp(disc, min=0.0)))
    u = torch.where(disc >= 0, u, torch.full_like(u, float("nan")))
    return torch.sqrt(u).to(dtype)


def enforce_ctffind_convention(defocus_u_A, defocus_v_A, angle_deg):
    """CTFFIND ``EnforceConvention``: return ``(U, V, angle)`` with U ≥ V and angle in (−90, 90].

    Swapping U and V turns the angle by 90°; the defocus at every azimuth is unchanged.
    """
    dtype = out_dtype(defocus_u_A, defocus_v_A, angle_deg)
    device = tensor_device(defocus_u_A, defocus_v_A, angle_deg)
    u, v, a = torch.broadcast_tensors(as_f64(defocus_u_A, device), as_f64(defocus_v_A, device),
                                      as_f64(angle_deg, device))
    swap = u < v
    u2, v2 = torch.where(swap, v, u), torch.where(swap, u, v)
    a2 = torch.where(swap, a + 90.0, a)
    a2 = a2 - 180.0 * torch.ceil((a2 - 90.0) / 180.0)
    return u2.to(dtype), v2.to(dtype), a2.to(dtype)


def defocus_with_handedness(defocus_centre_A, depth_A, hand: int) -> torch.Tensor:
    """Per-point defocus ``Δf = Δf_centre + hand · depth`` (RELION ``rlnTomoHand``).

    ``depth_A`` is z_P (column 2 of :func:`tomopipe.algorithms.geometry.project_points`) in Å.
    ``hand`` has no default: it is a property of the data. ``hand = -1`` (RELION's default, =
    IMOD ctfphaseflip without ``-invert``): at a positive tilt the +x side of the aligned image is
    more underfocused and +z (toward the source) less.
    """
    if hand not in (-1, 1):
        raise ValueError(f"defocus handedness must be -1 or +1, got {hand!r}")
    dtype = out_dtype(defocus_centre_A, depth_A)
    device = tensor_device(defocus_centre_A, depth_A)
    return (as_f64(defocus_centre_A, device) + hand * as_f64(depth_A, device)).to(dtype)


def phase_flip(images_fft: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply Fourier coefficients by the sign of the CTF (+1 where ``ctf >= 0``, −1 elsewhere)."""
    sign = torch.where(ctf >= 0, 1.0, -1.0).to(ctf.dtype)
    return images_fft * sign


def ctf_premultiply(images_fft: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply Fourier coefficients by the CTF (RELION/Warp CTF-premultiplied particles)."""
    return images_fft * ctf
