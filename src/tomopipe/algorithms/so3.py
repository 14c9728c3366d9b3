"""Grids of rotations for angular searches: global (near-uniform on SO(3)), per asymmetric unit, local.

Conventions as in ``geometry.py``: active right-handed rotations acting on column vectors
(x, y, z), ``[n, 3, 3]`` float64. A rotation A of a grid maps the reference onto the particle
(``x_tomo = position + A·x_ref``). Distances between rotations are rotation angles (the geodesic
metric of SO(3)); the covering radius of a grid is the largest distance from any rotation to its
nearest grid rotation.
"""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms._rotation import quaternion_to_matrix, rotation_vector_to_matrix
from tomopipe.algorithms._tensor import as_f64, tensor_device
from tomopipe.algorithms.symmetry import asymmetric_unit_mask, symmetry_group

__all__ = [
    "crowther_angular_step_deg",
    "so3_ball_volume_fraction",
    "so3_grid",
    "so3_grid_asymmetric",
    "local_so3_grid",
]

# Root of ψ⁴ = ψ + 4 (Alexa 2022, eq. 8), the second irrational of the super-Fibonacci spiral.
_SUPER_FIBONACCI_PSI = 1.533751168755204288118041
# Rotations per "ideal ball" (see so3_grid): measured covering radius ≈ 0.9 × step, mean nearest
# distance ≈ 0.5 × step for steps of 2-30° (tests/test_so3_symmetry.py).
_POINTS_PER_BALL = 3.6
# Band (in steps) kept outside the asymmetric unit so that its symmetric copies still cover SO(3).
_BOUNDARY_BAND = 0.2


def crowther_angular_step_deg(diameter_A: float, resolution_A: float) -> float:
    """Angular step (deg) that keeps the edge of an object of diameter D sampled at resolution d.

    ``step = degrees(d / D)`` (Crowther et al. 1970): a rotation by d/D radians moves a point on
    the particle's rim by about d/2 ... d. This is pytom-match-pick's default angular search
    (``TMJob``: ``angle_increment = rad2deg(max(2·voxel_size, low_pass) / particle_diameter)``), so
    callers pass ``resolution_A = max(2·voxel_size_A, low_pass_A)``.
    """
    if not (diameter_A > 0 and resolution_A > 0):
        raise ValueError(f"crowther_angular_step_deg: diameter_A and resolution_A must be > 0, "
                         f"got {diameter_A}, {resolution_A}")
    return math.degrees(resolution_A / diameter_A)


def _check_step(step_deg: float, name: str) -> float:
    if not 0 < step_deg <= 180:
        raise ValueError(f"{name}: step_deg must be in (0, 180], got {step_deg}")
    return math.radians(step_deg)


def so3_ball_volume_fraction(radius_deg: float) -> float:
    """Fraction of SO(3) (Haar measure) within rotation angle ``radius_deg`` of a rotation: ``(r - sin r) / π``."""
    r = math.radians(min(max(radius_deg, 0.0), 180.0))
    return (r - math.sin(r)) / math.pi


def _super_fibonacci_quaternions(n: int) -> torch.Tensor:
    """``n`` unit quaternions ``[n, 4]`` (w, x, y, z) on a super-Fibonacci spiral of S³ (Alexa 2022, Alg. 1)."""
    s = torch.arange(n, dtype=torch.float64) + 0.5
    t = s / n
    r, big_r = torch.sqrt(t), torch.sqrt(1.0 - t)
    alpha = (2.0 * math.pi / math.sqrt(2.0)) * s
    beta = (2.0 * math.pi / _SUPER_FIBONACCI_PSI) * s
    return torch.stack([r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta)],
                       dim=-1)


def so3_grid(step_deg: float) -> torch.Tensor:
    """Deterministic near-uniform grid of SO(3) with covering radius about ``step_deg`` -> ``[n, 3, 3]``.

    Super-Fibonacci spiral (M. Alexa, "Super-Fibonacci Spirals: Fast, Low-Discrepancy Sampling of
    SO(3)", CVPR 2022) of ``n = ceil(3.6 / f(step))`` rotations, ``f`` the volume fraction of a
    ball of radius step (:func:`so3_ball_volume_fraction`). A perfect covering would need at least
    ``1 / f`` rotations (1.46 / f for the best lattice covering in 3-D); the spiral's covering radius is
    about 1.4 × that of ideal balls, hence the factor 3.6, which gives a covering radius ≈ 0.9 × step.
    """
    fraction = so3_ball_volume_fraction(math.degrees(_check_step(step_deg, "so3_grid")))
    n = math.ceil(_POINTS_PER_BALL / fraction)
    return quaternion_to_matrix(_super_fibonacci_quaternions(n))


def so3_grid_asymmetric(step_deg: float, symmetry: str) -> torch.Tensor:
    """:func:`so3_grid` reduced to the asymmetric unit of the point group ``symmetry`` -> ``[m, 3, 3]``.

    Keeps the grid rotations that are their orbit's member closest to the identity, plus a band
    of 0.2 × step outside that domain's boundary
    (:func:`~tomopipe.algorithms.symmetry.asymmetric_unit_mask`), so that ``{K·g}`` over the kept
    K and the group's g covers SO(3) as well as the full grid (without the band, points near the
    boundary lose their neighbours across it). About 1/|G| of the grid is kept (O: 1/22.6 at 10°).
    """
    grid = so3_grid(step_deg)
    return grid[asymmetric_unit_mask(grid, symmetry_group(symmetry), margin_deg=_BOUNDARY_BAND * step_deg)]


def local_so3_grid(center, step_deg: float, max_angle_deg: float) -> torch.Tensor:
    """Rotations ``center·exp(ω)`` within ``max_angle_deg`` of ``center`` -> ``[m, 3, 3]``, centre first.

    ω runs over a cubic grid of spacing ``step_deg`` (rotation vector, radians) inside the ball
    ``|ω| ≤ max_angle_deg``; the perturbation is applied in the reference frame (right product),
    and the angle from ``center`` of each rotation is ``|ω|``. Covering radius about ``√3/2 × step``.
    Sorted by ``|ω|`` (ties in grid order); ``center`` ``[3, 3]``, result float64 on its device.
    """
    step = _check_step(step_deg, "local_so3_grid")
    if not 0 <= max_angle_deg <= 180:
        raise ValueError(f"local_so3_grid: max_angle_deg must be in [0, 180], got {max_angle_deg}")
    device = tensor_device(center)
    c = as_f64(center, device)
    if c.shape != (3, 3):
        raise ValueError(f"local_so3_grid: center must have shape [3, 3], got {tuple(c.shape)}")
    max_angle = math.radians(max_angle_deg)
    k = math.floor(max_angle / step + 1e-9)
    axis = torch.arange(-k, k + 1, dtype=torch.float64, device=device) * step
    omega = torch.cartesian_prod(axis, axis, axis).reshape(-1, 3)
    norm = torch.linalg.norm(omega, dim=-1)
    inside = norm <= max_angle * (1.0 + 1e-9)
    order = torch.argsort(norm[inside], stable=True)
    return c @ rotation_vector_to_matrix(omega[inside][order])
