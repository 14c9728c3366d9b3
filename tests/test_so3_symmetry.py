"""Point groups in RELION's settings, misorientation modulo symmetry, SO(3) grids (global, asymmetric, local)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tomopipe.algorithms._rotation import rotation_vector_to_matrix
from tomopipe.algorithms.geometry import random_rotations, rotation_x, rotation_y, rotation_z
from tomopipe.algorithms.so3 import (
    crowther_angular_step_deg,
    local_so3_grid,
    so3_ball_volume_fraction,
    so3_grid,
    so3_grid_asymmetric,
)
from tomopipe.algorithms.symmetry import (
    UnknownSymmetryError,
    asymmetric_unit_mask,
    misorientation_deg,
    symmetry_group,
)
from tomopipe.errors import TomopipeError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _random(n: int, seed: int) -> torch.Tensor:
    return random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _nearest_deg(x: torch.Tensor, grid: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Angle (deg) from each rotation of ``x`` to its nearest rotation of ``grid`` (chunked trace products)."""
    flat = grid.reshape(-1, 9)
    best = [(x[i:i + chunk].reshape(-1, 9) @ flat.T).amax(dim=1) for i in range(0, x.shape[0], chunk)]
    return torch.rad2deg(torch.acos((0.5 * (torch.cat(best) - 1.0)).clamp(-1.0, 1.0)))


def _contains(group: torch.Tensor, r: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool((group - r).flatten(1).abs().amax(dim=1).min() < tol)


def _axis_rotation(axis, angle_deg: float) -> torch.Tensor:
    """Rodrigues' formula, written out independently of the module under test."""
    a = torch.tensor(axis, dtype=F64)
    a = a / a.norm()
    k = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=F64)
    t = math.radians(angle_deg)
    return torch.eye(3, dtype=F64) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("symbol, order", [("C1", 1), ("c6", 6), ("C13", 13), ("D1", 2), ("D2", 4), ("d7", 14),
                                           ("T", 12), ("O", 24), ("I", 60), ("i1", 60), ("I2", 60), ("I3", 60),
                                           ("I4", 60)])
def test_group_is_closed_with_the_right_order(symbol, order):
    g = symmetry_group(symbol)
    assert g.shape == (order, 3, 3) and g.dtype == F64
    assert torch.equal(g[0], torch.eye(3, dtype=F64))
    eye = torch.eye(3, dtype=F64).expand(order, 3, 3)
    assert torch.allclose(g @ g.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(g), torch.ones(order, dtype=F64), atol=1e-12)
    products = (g[:, None] @ g[None]).reshape(-1, 9)
    distance = torch.cdist(products, g.reshape(-1, 9), compute_mode="donot_use_mm_for_euclid_dist")
    assert float(distance.amin(dim=1).max()) < 1e-9  # every product is an element
    off_diagonal = torch.cdist(g.reshape(-1, 9), g.reshape(-1, 9)) + 10 * torch.eye(order, dtype=F64)
    assert float(off_diagonal.min()) > 0.1  # no element twice


def test_groups_use_relion_axes():
    """RELION's settings (symmetries.cpp): Cn about z, Dn 2-fold about x, O 4-folds on x, y, z, I = I2."""
    assert _contains(symmetry_group("C6"), rotation_z(torch.tensor(60.0, dtype=F64)))
    d3 = symmetry_group("D3")
    assert _contains(d3, rotation_x(torch.tensor(180.0, dtype=F64)))
    assert not _contains(d3, rotation_y(torch.tensor(180.0, dtype=F64)))
    o = symmetry_group("O")
    for rot in (rotation_x, rotation_y, rotation_z):
        assert _contains(o, rot(torch.tensor(90.0, dtype=F64)))
    assert _contains(o, _axis_rotation((1, 1, 1), 120))
    t = symmetry_group("T")
    assert _contains(t, rotation_z(torch.tensor(120.0, dtype=F64)))
    assert _contains(t, _axis_rotation((0, 0.816496, 0.577350), 180), tol=1e-5)
    i2 = symmetry_group("I")
    assert torch.equal(i2, symmetry_group("I2"))
    assert _contains(i2, rotation_z(torch.tensor(180.0, dtype=F64)))
    assert _contains(i2, _axis_rotation((0.525731114, 0, 0.850650807), 72), tol=1e-7)
    assert _contains(i2, _axis_rotation((0, 0.356822076, 0.934172364), 120), tol=1e-7)
    i1 = symmetry_group("I1")
    assert _contains(i1, rotation_x(torch.tensor(180.0, dtype=F64)))
    assert _contains(i1, _axis_rotation((0.85065080702670, 0, -0.5257311142635), 72), tol=1e-7)
    assert _contains(i1, _axis_rotation((0.9341723640, 0.3568220765, 0), 120), tol=1e-7)
    assert not _contains(i1, _axis_rotation((0.525731114, 0, 0.850650807), 72), tol=1e-3)
    i3, i4 = symmetry_group("I3"), symmetry_group("I4")
    assert _contains(i3, rotation_z(torch.tensor(72.0, dtype=F64)))
    assert _contains(i3, _axis_rotation((-0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 120), tol=1e-7)
    assert _contains(i4, _axis_rotation((0.8944271932547096, 0, 0.4472135909903704), 72), tol=1e-7)
    assert _contains(i4, _axis_rotation((0.4911234778630044, 0.3568220764705179, 0.7946544753759428), 120), tol=1e-7)


@pytest.mark.parametrize("symbol", ["X3", "C0", "D", "C", "Q", "", "I5", "C2x", "D1001"])
def test_unknown_symmetry_is_refused_by_name(symbol):
    with pytest.raises(UnknownSymmetryError, match="valid forms") as info:
        symmetry_group(symbol)
    assert repr(symbol) in str(info.value)
    assert isinstance(info.value, TomopipeError)


# ----------------------------------------------------------------------------- misorientation
def test_misorientation_known_values_and_symmetry():
    a = _random(6, 0)
    assert torch.allclose(misorientation_deg(a, a @ rotation_z(torch.tensor(30.0, dtype=F64))),
                          torch.full((6,), 30.0, dtype=F64), atol=1e-10)
    # C6: 70° about z is 10° from the nearest symmetry mate
    assert float(misorientation_deg(torch.eye(3, dtype=F64), rotation_z(torch.tensor(70.0, dtype=F64)), "C6")) \
        == pytest.approx(10.0, abs=1e-10)
    # A and A·g are the same particle: a 5° perturbation of A·g is 5° from A modulo O
    o = symmetry_group("O")
    b = a @ o[torch.arange(6) + 3] @ _axis_rotation((1, 2, 3), 5.0)
    assert torch.allclose(misorientation_deg(a, b, o), torch.full((6,), 5.0, dtype=F64), atol=1e-10)
    assert float(misorientation_deg(a, b).min()) > 30.0
    # symmetric in its arguments; broadcast [6] x [1]
    assert torch.allclose(misorientation_deg(b, a, "O"), misorientation_deg(a, b, "O"), atol=1e-10)
    assert misorientation_deg(a, torch.eye(3, dtype=F64)[None]).shape == (6,)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 3, 3\]"):
        misorientation_deg(a, torch.eye(4))


@pytest.mark.parametrize("angle_deg", [1e-7, 1e-4, 179.9999, 180.0])
def test_misorientation_is_accurate_near_0_and_180(angle_deg):
    """acos of the trace would give ~1e-6° errors near 0° and 180°; atan2 stays at rounding level."""
    a = _random(4, 1)
    b = a @ _axis_rotation((0.3, -0.5, 0.8), angle_deg)
    assert torch.allclose(misorientation_deg(a, b), torch.full((4,), angle_deg, dtype=F64), rtol=1e-6, atol=1e-12)


def test_misorientation_keeps_float32():
    a = _random(3, 2).float()
    out = misorientation_deg(a, a, "D2")
    assert out.dtype == torch.float32 and float(out.max()) < 0.05


# ----------------------------------------------------------------------------- asymmetric unit
@pytest.mark.parametrize("symbol", ["C4", "D2", "O", "I"])
def test_asymmetric_unit_keeps_one_member_of_each_orbit(symbol):
    g = symmetry_group(symbol)
    r = _random(500, 3)
    orbits = (r[:, None] @ g[None]).reshape(-1, 3, 3)
    kept = asymmetric_unit_mask(orbits, g).reshape(500, g.shape[0])
    assert torch.equal(kept.sum(dim=1), torch.ones(500, dtype=torch.int64))


def test_asymmetric_unit_breaks_ties_deterministically():
    """Rotations exactly on the domain's boundary: 90° about z under C2, 45° about z under C4."""
    for symbol, angle in (("C2", 90.0), ("C4", 45.0), ("D2", 90.0)):
        g = symmetry_group(symbol)
        orbit = rotation_z(torch.tensor(angle, dtype=F64)) @ g
        kept = asymmetric_unit_mask(orbit, g)
        assert int(kept.sum()) == 1
        assert torch.equal(asymmetric_unit_mask(orbit.flip(0), g), kept.flip(0))


def test_asymmetric_unit_margin_keeps_a_band():
    r = _random(5000, 4)
    exact = asymmetric_unit_mask(r, "O")
    band = asymmetric_unit_mask(r, "O", margin_deg=5.0)
    assert bool((band | ~exact).all())  # a superset
    assert 1 / 24 < float(exact.double().mean()) * 1.15 and float(exact.double().mean()) < 1.15 / 24
    assert float(band.double().mean()) > float(exact.double().mean()) * 1.05


# ----------------------------------------------------------------------------- grids
def test_crowther_step_is_resolution_over_diameter():
    # apoferritin (120 Å) at a 10 Å voxel: resolution 2 x 10 Å -> 1/6 rad
    assert crowther_angular_step_deg(120.0, 20.0) == pytest.approx(math.degrees(1 / 6))
    with pytest.raises(ValueError, match="must be > 0"):
        crowther_angular_step_deg(0.0, 20.0)


def test_ball_volume_fraction():
    assert so3_ball_volume_fraction(180.0) == pytest.approx(1.0)
    r = _random(40000, 5)
    inside = float((misorientation_deg(torch.eye(3, dtype=F64), r) <= 60.0).double().mean())
    assert inside == pytest.approx(so3_ball_volume_fraction(60.0), abs=0.01)


@pytest.mark.parametrize("step_deg", [30.0, 10.0])
def test_so3_grid_covers_uniformly(step_deg):
    grid = so3_grid(step_deg)
    assert torch.allclose(grid @ grid.transpose(1, 2), torch.eye(3, dtype=F64).expand_as(grid), atol=1e-12)
    assert torch.equal(grid, so3_grid(step_deg))
    nearest = _nearest_deg(_random(20000, 6), grid)
    optimal = 1.0 / so3_ball_volume_fraction(step_deg)
    print(f"step {step_deg}°: {grid.shape[0]} rotations = {grid.shape[0] / optimal:.2f} x 8π²/ball(step); "
          f"covering {float(nearest.max()) / step_deg:.3f} x step, mean {float(nearest.mean()) / step_deg:.3f} x step")
    assert float(nearest.max()) <= step_deg
    assert float(nearest.mean()) <= 0.6 * step_deg
    # a covering needs >= 1.46 x optimal rotations (bcc lattice); the spiral needs 3.6 x
    assert 1.46 * optimal < grid.shape[0] < 4.0 * optimal


def test_so3_grid_is_fast():
    start = time.perf_counter()
    grid = so3_grid(3.0)
    elapsed = time.perf_counter() - start
    print(f"so3_grid(3°): {grid.shape[0]} rotations in {elapsed:.2f} s")
    assert elapsed < 2.0
    with pytest.raises(ValueError, match="step_deg must be in"):
        so3_grid(0.0)


def test_so3_grid_asymmetric_o_is_24_times_smaller_and_still_covers():
    step = 10.0
    full, asym = so3_grid(step), so3_grid_asymmetric(step, "O")
    ratio = full.shape[0] / asym.shape[0]
    g = symmetry_group("O")
    nearest = _nearest_deg(_random(20000, 7), (asym[:, None] @ g[None]).reshape(-1, 3, 3))
    print(f"O at {step}°: {full.shape[0]} -> {asym.shape[0]} rotations ({ratio:.1f}x fewer); "
          f"covering {float(nearest.max()) / step:.3f} x step")
    assert 20.0 <= ratio <= 28.0
    assert float(nearest.max()) <= step
    assert torch.equal(so3_grid_asymmetric(step, "C1"), full)


def test_local_so3_grid_stays_within_the_ball_and_covers_it():
    center = _random(1, 8)[0]
    step, max_angle = 2.0, 10.0
    local = local_so3_grid(center, step, max_angle)
    assert torch.allclose(local[0], center, atol=1e-15)
    distance = misorientation_deg(center, local)
    assert float(distance.max()) <= max_angle + 1e-9
    assert torch.all(distance[1:] >= distance[:-1] - 1e-9)  # sorted by distance from the centre
    expected = 4 / 3 * math.pi * (max_angle / step) ** 3  # cubic grid points in the ball
    assert local.shape[0] == pytest.approx(expected, rel=0.15)
    # rotations within (max_angle - step) of the centre have a grid rotation within √3/2 x step
    cube = torch.rand(4000, 3, generator=torch.Generator().manual_seed(10), dtype=F64) * 2 - 1
    omega = cube[cube.norm(dim=1) <= 1] * math.radians(max_angle - step)
    near = center @ rotation_vector_to_matrix(omega)
    assert float(_nearest_deg(near, local).max()) <= math.sqrt(3) / 2 * step * 1.02
    assert local_so3_grid(center, 5.0, 0.0).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="center must have shape"):
        local_so3_grid(torch.eye(4), 1.0, 5.0)
