"""Rotation-matrix helpers shared by ``so3`` and ``symmetry``: quaternions, rotation vectors, angles.

Conventions as in ``geometry.py``: active right-handed rotations acting on column vectors
(x, y, z); quaternions ``(w, x, y, z)`` with ``w = cos(θ/2)``; float64 in, float64 out.
"""

from __future__ import annotations

import torch

__all__ = ["quaternion_to_matrix", "rotation_vector_to_matrix", "rotation_angle_deg"]


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``[..., 4]`` ``(w, x, y, z)`` -> rotation matrices ``[..., 3, 3]``."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def rotation_vector_to_matrix(omega_rad: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``[..., 3]`` (axis · angle in radians, right-handed) -> ``[..., 3, 3]`` (exp map)."""
    angle = torch.linalg.norm(omega_rad, dim=-1, keepdim=True)
    half = 0.5 * angle
    # sin(θ/2)/θ, with its limit 1/2 at θ = 0
    scale = torch.where(angle > 1e-12, torch.sin(half) / angle.clamp(min=1e-300), torch.full_like(angle, 0.5))
    return quaternion_to_matrix(torch.cat([torch.cos(half), scale * omega_rad], -1))


def rotation_angle_deg(r: torch.Tensor) -> torch.Tensor:
    """Rotation angle in [0, 180] degrees of matrices ``[..., 3, 3]``.

    ``atan2(|axial vector|, (trace - 1) / 2)``: accurate to float64 rounding at 0° and 180°,
    where ``acos`` of the trace loses half the digits; the cosine is clamped to [-1, 1].
    """
    axial = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin = 0.5 * torch.linalg.norm(axial, dim=-1)
    cos = (0.5 * (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.atan2(sin, cos))
