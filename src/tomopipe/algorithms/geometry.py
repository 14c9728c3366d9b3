"""Geometry conventions of tomopipe — the one place where they are written down in code.

Conventions (``docs/conventions.md`` §7):

* Index space: x = fast axis (MRC column), y = slow axis (row), z = section; right-handed,
  0-based, pixel centres on integers; angles counter-clockwise with +y drawn upward (3dmod).
* Rotations are active, right-handed, in degrees, acting on column vectors (x, y, z):
  ``Ry(a) = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``.
* Projection model (RELION 5 / cryotypes): ``x_img = Rz(axis)·Ry(tilt)·Rx(xtilt)·p + shift``,
  p measured from the tomogram centre, shifts (Å) applied after the rotation in the image
  plane; row 2 of the rotated point is the depth z_P used for the defocus (see ``ctf.py``).
* IMOD ``.xf`` lines ``A11 A12 A21 A22 DX DY`` map raw -> aligned about the centre (N-1)/2;
  ``rot_z = atan2(-A21, A11)`` and specimen shifts ``= -A^-1·d`` (RELION 5 importer).
* RELION ZYZ Euler angles: ``A = (Rz(rot)·Ry(tilt)·Rz(psi))^T`` maps reference -> particle.
* Centres: FFT / RELION image centre ``N // 2``; IMOD ``(N - 1) / 2``; RELION centred
  coordinates ``N / 2.0``.

Every function accepts Python floats or tensors, broadcasts over leading dimensions, keeps the
input's device, computes in float64 and returns the input's floating dtype (float32 when the
input is not a floating tensor).
"""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms._tensor import as_f64, out_dtype, tensor_device

__all__ = [
    "rotation_x",
    "rotation_y",
    "rotation_z",
    "rotation_2d",
    "wrap_angle_deg",
    "tilt_axis_from_rotation_angle",
    "projection_rotations",
    "project_points",
    "xf_from_alignment",
    "alignment_from_xf",
    "xf_scale_and_distortion",
    "xf_invert",
    "xf_apply",
    "fft_centre",
    "imod_centre",
    "relion_coordinate_centre",
    "centred_A_to_pixels",
    "pixels_to_centred_A",
    "euler_relion_to_matrix",
    "matrix_to_euler_relion",
    "random_rotations",
]

# ----------------------------------------------------------------------------- helpers
def _radians(angle_deg, device) -> torch.Tensor:
    return torch.deg2rad(as_f64(angle_deg, device))


# ----------------------------------------------------------------------------- rotations
def _rotation(angle_deg, axis: int) -> torch.Tensor:
    dtype, device = out_dtype(angle_deg), tensor_device(angle_deg)
    a = _radians(angle_deg, device)
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if axis == 0:
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == 1:
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    m = torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)
    return m.to(dtype)


def rotation_x(angle_deg) -> torch.Tensor:
    """Active right-handed rotation about +x by ``angle_deg``; shape ``[..., 3, 3]``."""
    return _rotation(angle_deg, 0)


def rotation_y(angle_deg) -> torch.Tensor:
    """Active right-handed rotation about +y: ``[[c, 0, s], [0, 1, 0], [-s, 0, c]]``; ``[..., 3, 3]``."""
    return _rotation(angle_deg, 1)


def rotation_z(angle_deg) -> torch.Tensor:
    """Active right-handed rotation about +z (CCW in the x-y plane, +y up); ``[..., 3, 3]``."""
    return _rotation(angle_deg, 2)


def rotation_2d(angle_deg) -> torch.Tensor:
    """2-D CCW rotation ``[[c, -s], [s, c]]`` acting on (x, y) column vectors; ``[..., 2, 2]``."""
    return rotation_z(angle_deg)[..., :2, :2]


def wrap_angle_deg(angle_deg) -> torch.Tensor:
    """Angle wrapped into (-180, 180] degrees."""
    dtype, device = out_dtype(angle_deg), tensor_device(angle_deg)
    a = as_f64(angle_deg, device)
    return (a - 360.0 * torch.ceil((a - 180.0) / 360.0)).to(dtype)


def tilt_axis_from_rotation_angle(rotation_angle_deg) -> torch.Tensor:
    """SerialEM per-section ``RotationAngle`` (from +x, CCW) -> tilt-axis angle (from +y, CCW).

    ``alpha = RotationAngle - 90`` (SerialEM help, "in a system with no axis inversions"),
    wrapped into (-180, 180].
    """
    dtype, device = out_dtype(rotation_angle_deg), tensor_device(rotation_angle_deg)
    return wrap_angle_deg(as_f64(rotation_angle_deg, device) - 90.0).to(dtype)


# ----------------------------------------------------------------------------- projection
def projection_rotations(tilt_axis_angle_deg, tilt_angles_deg, x_tilt_deg=0.0) -> torch.Tensor:
    """Per-tilt projection rotations ``Rz(axis)·Ry(tilt)·Rx(xtilt)`` -> ``[n, 3, 3]``.

    RELION 5 ``rlnTomoZRot`` / ``rlnTomoYTilt`` / ``rlnTomoXTilt``: the tilt-axis angle is
    measured from +y, CCW; the tilt angle has the IMOD/SerialEM sign. Each argument may be a
    scalar or have one value per tilt; they are broadcast to a common length n.
    """
    dtype, device = out_dtype(tilt_angles_deg, tilt_axis_angle_deg, x_tilt_deg), tensor_device(
        tilt_angles_deg, tilt_axis_angle_deg, x_tilt_deg
    )
    axis = as_f64(tilt_axis_angle_deg, device).reshape(-1)
    tilt = as_f64(tilt_angles_deg, device).reshape(-1)
    xtilt = as_f64(x_tilt_deg, device).reshape(-1)
    try:
        axis, tilt, xtilt = torch.broadcast_tensors(axis, tilt, xtilt)
    except RuntimeError as exc:
        raise ValueError(
            f"projection_rotations: tilt_axis_angle_deg ({axis.numel()}), tilt_angles_deg "
            f"({tilt.numel()}) and x_tilt_deg ({xtilt.numel()}) must be scalars or have one value per tilt"
        ) from exc
    r = rotation_z(axis) @ rotation_y(tilt) @ rotation_x(xtilt)
    return r.to(dtype)


def project_points(points_A, rotations, shifts_A=None) -> torch.Tensor:
    """Project 3-D points into every tilt image: ``[n, m, 3]`` = (x_img, y_img, z_P).

    ``points_A`` ``[m, 3]``: (x, y, z) in Å from the tomogram centre (z = thickness, +z toward
    the electron source). ``rotations`` ``[n, 3, 3]`` from :func:`projection_rotations`.
    ``shifts_A`` ``[n, 2]``: image-plane shifts in Å added after the rotation (RELION 5
    ``rlnTomoXShiftAngst/YShiftAngst``). Output columns 0-1: image position in Å from the image
    centre; column 2: the depth z_P in Å (not shifted) used for the per-particle defocus.
    """
    dtype, device = out_dtype(points_A, rotations), tensor_device(points_A, rotations)
    p = as_f64(points_A, device)
    r = as_f64(rotations, device)
    if p.ndim != 2 or p.shape[-1] != 3:
        raise ValueError(f"project_points: points_A must have shape [m, 3], got {tuple(p.shape)}")
    if r.ndim == 2:
        r = r[None]
    if r.shape[-2:] != (3, 3) or r.ndim != 3:
        raise ValueError(f"project_points: rotations must have shape [n, 3, 3], got {tuple(r.shape)}")
    out = torch.einsum("nij,mj->nmi", r, p)
    if shifts_A is not None:
        s = as_f64(shifts_A, device).reshape(-1, 2)
        if s.shape[0] not in (1, r.shape[0]):
            raise ValueError(
                f"project_points: shifts_A must have shape [n, 2] with n = {r.shape[0]}, got {tuple(s.shape)}"
            )
        out = out.clone()
        out[..., :2] = out[..., :2] + s[:, None, :]
    return out.to(dtype)


# ----------------------------------------------------------------------------- IMOD .xf
def xf_from_alignment(rot_z_deg, specimen_shifts_px, magnification=1.0):
    """RELION-5 alignment -> IMOD ``.xf`` ``(A [n, 2, 2], d [n, 2])``.

    ``A = magnification · R2(-rot_z)`` (it rotates the tilt axis onto +y) and
    ``d = -A · shift``, the inverse of :func:`alignment_from_xf`. Shifts are in pixels of the
    aligned stack.
    """
    dtype, device = out_dtype(rot_z_deg, specimen_shifts_px), tensor_device(rot_z_deg, specimen_shifts_px)
    rot = as_f64(rot_z_deg, device).reshape(-1)
    shifts = as_f64(specimen_shifts_px, device).reshape(-1, 2)
    mag = as_f64(magnification, device).reshape(-1)
    n = max(rot.shape[0], shifts.shape[0], mag.shape[0])
    rot, mag = rot.expand(n) if rot.shape[0] == 1 else rot, mag.expand(n) if mag.shape[0] == 1 else mag
    shifts = shifts.expand(n, 2) if shifts.shape[0] == 1 else shifts
    if not (rot.shape[0] == shifts.shape[0] == mag.shape[0] == n):
        raise ValueError("xf_from_alignment: rot_z_deg, specimen_shifts_px and magnification need one value per view")
    a = mag[:, None, None] * rotation_2d(-rot)
    d = -torch.einsum("nij,nj->ni", a, shifts)
    return a.to(dtype), d.to(dtype)


def xf_scale_and_distortion(A):
    """Uniform scale of each ``.xf`` matrix and its deviation from a scaled rotation.

    Returns ``(magnification [n], distortion [n])`` with ``magnification = sqrt(det A)`` and
    ``distortion = (|A11 - A22| + |A12 + A21|) / (2·magnification)`` (0 for a pure scaled
    rotation; stretch, skew or a mirror give > 0, a mirror gives NaN magnification).
    """
    dtype, device = out_dtype(A), tensor_device(A)
    a = as_f64(A, device).reshape(-1, 2, 2)
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    mag = torch.sqrt(det)
    dist = ((a[:, 0, 0] - a[:, 1, 1]).abs() + (a[:, 0, 1] + a[:, 1, 0]).abs()) / (2.0 * mag)
    return mag.to(dtype), dist.to(dtype)


def alignment_from_xf(A, d, max_distortion: float = 0.02):
    """IMOD ``.xf`` -> RELION-5 alignment ``(rot_z_deg [n], specimen_shifts_px [n, 2])``.

    ``rot_z = atan2(-A21, A11)`` (= ``atan2(A12, A11)`` for a rotation) and
    ``shift = -A^-1 · d`` (pixels of the aligned stack), as RELION 5's importer does. The
    model has no stretch or skew: a matrix whose :func:`xf_scale_and_distortion` exceeds
    ``max_distortion`` (or that mirrors) raises ``ValueError``. A uniform magnification is
    accepted and folded into the shifts.
    """
    dtype, device = out_dtype(A, d), tensor_device(A, d)
    a = as_f64(A, device).reshape(-1, 2, 2)
    dd = as_f64(d, device).reshape(-1, 2)
    if a.shape[0] != dd.shape[0]:
        raise ValueError(f"alignment_from_xf: {a.shape[0]} matrices but {dd.shape[0]} shift vectors")
    mag, dist = xf_scale_and_distortion(a)
    bad = ~(torch.isfinite(mag) & (mag > 0) & (dist <= max_distortion))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"alignment_from_xf: view {i} is not a rotation with uniform scale "
            f"(A = {a[i].tolist()}, magnification {float(mag[i]):.6g}, distortion {float(dist[i]):.3g} "
            f"> {max_distortion}); stretch, skew and mirrors cannot be represented"
        )
    rot = torch.rad2deg(torch.atan2(-a[:, 1, 0], a[:, 0, 0]))
    shifts = -torch.linalg.solve(a, dd[..., None])[..., 0]
    return rot.to(dtype), shifts.to(dtype)


def xf_invert(A, d):
    """Inverse ``.xf`` transform (aligned -> raw): ``(A^-1, -A^-1·d)``."""
    dtype, device = out_dtype(A, d), tensor_device(A, d)
    a = as_f64(A, device)
    dd = as_f64(d, device)
    ainv = torch.linalg.inv(a)
    return ainv.to(dtype), (-(ainv @ dd[..., None])[..., 0]).to(dtype)


def _size_xy(size, device) -> torch.Tensor:
    s = as_f64(size, device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(2)
    if s.numel() != 2:
        raise ValueError(f"size must be N or (nx, ny), got {size!r}")
    return s


def xf_apply(A, d, points_px, size_in, size_out=None) -> torch.Tensor:
    """Apply IMOD ``.xf`` transforms to pixel coordinates (x, y): raw -> aligned.

    ``X' = A·(X - c_in) + d + c_out`` with IMOD centres ``c = (N - 1) / 2`` (0-based pixel
    centres). ``A`` ``[..., 2, 2]``, ``d`` ``[..., 2]``, ``points_px`` ``[..., m, 2]`` (x, y);
    ``size_in`` / ``size_out`` are N or ``(nx, ny)`` — note: x first, like the points
    (``size_out`` defaults to ``size_in``). Use :func:`xf_invert` (and swap the sizes) for
    aligned -> raw.
    """
    dtype, device = out_dtype(points_px, A, d), tensor_device(points_px, A, d)
    a, dd, p = as_f64(A, device), as_f64(d, device), as_f64(points_px, device)
    c_in = imod_centre(_size_xy(size_in, device))
    c_out = imod_centre(_size_xy(size_in if size_out is None else size_out, device))
    out = torch.einsum("...ij,...mj->...mi", a, p - c_in) + dd[..., None, :] + c_out
    return out.to(dtype)


# ----------------------------------------------------------------------------- centres
def fft_centre(n):
    """Centre index of an FFT-shifted axis / RELION image centre: ``n // 2``."""
    return n // 2


def imod_centre(n):
    """IMOD rotation centre in 0-based pixel-centre coordinates: ``(n - 1) / 2``."""
    return (n - 1) / 2


def relion_coordinate_centre(n):
    """Centre used by RELION 5 centred coordinates (``rlnCenteredCoordinate*Angst``): ``n / 2.0``."""
    return n / 2.0


def _centre_vector(size_px, centre_px, device, ndim: int) -> torch.Tensor:
    if centre_px is not None:
        c = as_f64(centre_px, device)
    else:
        c = relion_coordinate_centre(as_f64(size_px, device))
    if c.ndim == 0:
        c = c.expand(ndim)
    return c


def centred_A_to_pixels(coords_A, size_px, pixel_size_A, centre_px=None) -> torch.Tensor:
    """RELION 5 centred Å -> pixels: ``pixel = coords_A / pixel_size_A + N / 2.0``.

    ``coords_A`` ``[..., k]`` in (x, y, z) order; ``size_px`` N or ``(nx, ny, nz)`` (same order,
    at the binning of ``pixel_size_A``). ``centre_px`` overrides the centre (e.g. ``N/2 - 1``
    written by RELION 5's Python picker).
    """
    dtype, device = out_dtype(coords_A), tensor_device(coords_A)
    c = as_f64(coords_A, device)
    if float(torch.as_tensor(pixel_size_A).min()) <= 0:
        raise ValueError(f"centred_A_to_pixels: pixel_size_A must be > 0, got {pixel_size_A!r}")
    return (c / as_f64(pixel_size_A, device) + _centre_vector(size_px, centre_px, device, c.shape[-1])).to(dtype)


def pixels_to_centred_A(coords_px, size_px, pixel_size_A, centre_px=None) -> torch.Tensor:
    """Pixels -> RELION 5 centred Å: ``(pixel - N / 2.0) · pixel_size_A``; inverse of :func:`centred_A_to_pixels`."""
    dtype, device = out_dtype(coords_px), tensor_device(coords_px)
    p = as_f64(coords_px, device)
    if float(torch.as_tensor(pixel_size_A).min()) <= 0:
        raise ValueError(f"pixels_to_centred_A: pixel_size_A must be > 0, got {pixel_size_A!r}")
    return ((p - _centre_vector(size_px, centre_px, device, p.shape[-1])) * as_f64(pixel_size_A, device)).to(dtype)


# ----------------------------------------------------------------------------- Euler angles
def euler_relion_to_matrix(rot_deg, tilt_deg, psi_deg) -> torch.Tensor:
    """RELION ZYZ angles -> ``A = (Rz(rot)·Ry(tilt)·Rz(psi))^T`` ``[..., 3, 3]`` (reference -> particle).

    Equals scipy ``Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T``.
    """
    dtype, device = out_dtype(rot_deg, tilt_deg, psi_deg), tensor_device(rot_deg, tilt_deg, psi_deg)
    rot, tilt, psi = torch.broadcast_tensors(as_f64(rot_deg, device), as_f64(tilt_deg, device), as_f64(psi_deg, device))
    m = rotation_z(rot) @ rotation_y(tilt) @ rotation_z(psi)
    return m.transpose(-1, -2).to(dtype)


def matrix_to_euler_relion(matrix):
    """RELION ZYZ angles ``(rot, tilt, psi)`` in degrees of ``A = (Rz(rot)Ry(tilt)Rz(psi))^T``.

    ``tilt`` in [0, 180], ``rot`` and ``psi`` in (-180, 180]. At tilt = 0 or 180 only
    ``rot ± psi`` is defined: psi is set to 0 and rot carries the whole in-plane angle.
    """
    dtype, device = out_dtype(matrix), tensor_device(matrix)
    a = as_f64(matrix, device)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_euler_relion: expected [..., 3, 3], got {tuple(a.shape)}")
    r = a.transpose(-1, -2)  # Rz(rot) Ry(tilt) Rz(psi)
    sin_tilt = torch.sqrt(r[..., 0, 2] ** 2 + r[..., 1, 2] ** 2)
    cos_tilt = r[..., 2, 2]
    tilt = torch.atan2(sin_tilt, cos_tilt)
    rot = torch.atan2(r[..., 1, 2], r[..., 0, 2])
    # rot + psi and rot - psi from entries that stay well conditioned near tilt 0 / 180:
    # R00 + R11 = (1 + cos t) cos(rot + psi), R10 - R01 = (1 + cos t) sin(rot + psi),
    # R00 - R11 = (cos t - 1) cos(rot - psi), R10 + R01 = (cos t - 1) sin(rot - psi).
    rot_plus_psi = torch.atan2(r[..., 1, 0] - r[..., 0, 1], r[..., 0, 0] + r[..., 1, 1])
    rot_minus_psi = torch.atan2(-(r[..., 1, 0] + r[..., 0, 1]), -(r[..., 0, 0] - r[..., 1, 1]))
    psi = torch.where(cos_tilt >= 0, rot_plus_psi - rot, rot - rot_minus_psi)
    # gimbal lock (tilt = 0 or 180 to the input's precision): psi = 0, rot takes the in-plane angle
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    degenerate = sin_tilt < eps
    flat = torch.where(cos_tilt > 0, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    tilt = torch.where(degenerate, flat, tilt)
    rot = torch.where(degenerate, torch.where(cos_tilt > 0, rot_plus_psi, rot_minus_psi), rot)
    psi = torch.where(degenerate, torch.zeros_like(psi), psi)
    out = [wrap_angle_deg(torch.rad2deg(rot)), torch.rad2deg(tilt), wrap_angle_deg(torch.rad2deg(psi))]
    return tuple(x.to(dtype) for x in out)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
    """``n`` rotation matrices ``[n, 3, 3]`` drawn uniformly (Haar) on SO(3).

    Uniform unit quaternions from normalised 4-D Gaussian vectors (Shoemake); reproducible with
    a seeded ``generator`` (its device must match ``device``).
    """
    if n < 0:
        raise ValueError(f"random_rotations: n must be >= 0, got {n}")
    dtype = dtype or torch.get_default_dtype()
    device = (torch.device(device) if device is not None
              else (generator.device if generator is not None else torch.device("cpu")))
    q = torch.randn((n, 4), generator=generator, dtype=torch.float64, device=device)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    m = torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    return m.to(dtype)
