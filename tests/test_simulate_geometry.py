"""The simulator's geometry against the conventions sheet (``docs/conventions.md``),
not against the pipeline, so that an error cannot cancel itself out between the two.

Worked examples used: §2b/§3b (α = 85.3°, .xf d = (12, −7), θ = +30°, point (100, 50, 20) px ->
raw (1997.624, 2136.489) with IMOD's centre, + 0.5 px with RELION's N//2), §4b (hand −1:
30500 Å at X = 1000 Å, θ = +30°, Δf_c = 30000 Å), §5 (A(30, 60, 90)). A chiral triad of blobs is
imaged and triangulated back with the sheet's formulas; a chiral molecule (apoferritin) is
compared with its mirror image.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import STRUCTURE, gemmi_potential_V
from tomopipe.algorithms.ctf import ctf_2d
from tomopipe.algorithms.potential import atomic_potential_volume, interaction_constant_rad_per_V_A
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.io.imod import read_tlt, read_xf
from tomopipe.io.star import read_tilt_series_star
from tomopipe.simulate.config import config_from_preset
from tomopipe.simulate.imaging import Optics, project_particles, render_tilt_contrast
from tomopipe.simulate.plan import TiltPlan, TiltSeriesPlan
from tomopipe.simulate.projector import FourierSliceProjector
from tomopipe.simulate.writer import write_tilt_series_truth

pytestmark = pytest.mark.usefixtures("one_thread")


def tilt_plan(axis_deg: float, tilt_deg: float, shift_A=(0.0, 0.0), defocus_A: float = 30000.0, frames: int = 1,
              magnification: float = 1.0) -> TiltPlan:
    return TiltPlan(
        index=0, nominal_deg=tilt_deg, stage_deg=tilt_deg, tilt_deg=tilt_deg, axis_deg=axis_deg,
        shift_A=tuple(shift_A), magnification=magnification, defocus_u_A=defocus_A, defocus_v_A=defocus_A,
        astigmatism_angle_deg=0.0, target_defocus_um=-defocus_A / 1e4, scope_defocus_um=-defocus_A / 1e4,
        pre_exposure_e_per_A2=0.0, dose_e_per_A2=2.64, time=datetime(2026, 1, 1),
        frame_shifts_A=torch.zeros((frames, 2), dtype=torch.float64),
        local_profile=torch.zeros(frames, dtype=torch.float64),
        local_field=None, movie_name="TS_01_001_30.0.tif",
    )


# the sheet's worked example (§2b, §2c, §3b)
ALPHA, THETA = 85.3, 30.0
XF_A = np.array([[0.081939, 0.996637], [-0.996637, 0.081939]])
XF_D = np.array([12.0, -7.0])


def sheet_specimen_shift_px() -> np.ndarray:
    """RELION specimen shift from the .xf: ``−A⁻¹·d`` (§3b), = (−7.960, −11.386) px."""
    return -np.linalg.solve(XF_A, XF_D)


def test_projection_matches_the_worked_example():
    s_px = sheet_specimen_shift_px()
    assert s_px == pytest.approx([-7.960, -11.386], abs=1e-3)
    tilt = tilt_plan(ALPHA, THETA, shift_A=s_px)  # pixel size 1 Å
    point = torch.tensor([[100.0, 50.0, 20.0]], dtype=torch.float64)
    _, _, px = project_particles(tilt, point, (4096, 4096), 1.0)
    # IMOD chain (§2c): aligned = (cosθ·X + sinθ·Z, Y) about (N−1)/2; raw = A⁻¹(aligned − d) + centre
    aligned = np.array([math.cos(math.radians(THETA)) * 100 + math.sin(math.radians(THETA)) * 20, 50.0])
    raw_imod = np.linalg.solve(XF_A, aligned - XF_D) + 2047.5
    assert raw_imod == pytest.approx([1997.624, 2136.489], abs=2e-3)
    # tomopipe/RELION put the image centre at N//2 = 2048: the only difference is the half pixel
    assert px[0].numpy() == pytest.approx(raw_imod + 0.5, abs=2e-3)


def test_truth_xf_tlt_and_star_match_the_worked_example(tmp_path):
    config = config_from_preset("tiny", pixel_size_A=1.0, frames_per_tilt=1, image_width_px=4096, image_height_px=4096)
    s_px = sheet_specimen_shift_px()
    tilt = tilt_plan(ALPHA, THETA, shift_A=s_px * config.pixel_size_A)
    plan = TiltSeriesPlan(
        name="TS_01", index=0, tilts=[tilt], positions_A=torch.zeros((0, 3), dtype=torch.float64),
        rotations=torch.zeros((0, 3, 3), dtype=torch.float64), euler_deg=torch.zeros((0, 3), dtype=torch.float64),
        tomogram_size_px=(4096, 4096, 512), target_defocus_um=3.0,
    )
    write_tilt_series_truth(tmp_path, config, plan, [], [])
    A, d = read_xf(tmp_path / "TS_01.xf")
    assert A[0] == pytest.approx(XF_A, abs=1e-6)
    assert d[0] == pytest.approx(XF_D, abs=1e-3)
    assert read_tlt(tmp_path / "TS_01.tlt")[0] == pytest.approx(THETA)
    star = read_tilt_series_star(tmp_path / "TS_01.star").iloc[0]
    assert star.rlnTomoZRot == pytest.approx(ALPHA) and star.rlnTomoYTilt == pytest.approx(THETA)
    assert [star.rlnTomoXShiftAngst, star.rlnTomoYShiftAngst] == pytest.approx(s_px, abs=1e-4)
    # the axis lands on +y after the .xf (§2b)
    axis_dir = np.array([-math.sin(math.radians(ALPHA)), math.cos(math.radians(ALPHA))])
    assert A[0] @ axis_dir == pytest.approx([0.0, 1.0], abs=1e-5)


def blob_projector(pixel_A: float, sigma_A: float = 12.0, box: int = 32) -> FourierSliceProjector:
    """A Gaussian blob of 1 V·Å³ per Å³·… (any scale) as the particle."""
    r = (torch.arange(box, dtype=torch.float64) - box // 2) * pixel_A
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return FourierSliceProjector((20.0 * torch.exp(-d2 / (2 * sigma_A**2))).float(), pixel_A, pad_factor=2)


def test_defocus_gradient_matches_the_worked_example():
    tilt = tilt_plan(ALPHA, THETA, defocus_A=30000.0)
    positions = torch.tensor([[1000.0, 0.0, 0.0], [-1000.0, 0.0, 0.0], [0.0, 0.0, 200.0]], dtype=torch.float64)
    _, info = render_tilt_contrast(
        tilt, (256, 256), 8.0, Optics(hand=-1), 6.5e-4, projector=blob_projector(8.0),
        positions_A=positions, rotations=torch.eye(3, dtype=torch.float64).expand(3, 3, 3),
    )
    defocus = info["defocus_A"].numpy()
    assert defocus[0] == pytest.approx(30500.0, abs=0.01)  # +x side more underfocused at +θ (hand −1)
    assert defocus[1] == pytest.approx(29500.0, abs=0.01)
    assert defocus[2] == pytest.approx(30000.0 - 200.0 * math.cos(math.radians(THETA)), abs=0.01)  # +z: nearer focus
    _, info = render_tilt_contrast(
        tilt, (256, 256), 8.0, Optics(hand=1), 6.5e-4, projector=blob_projector(8.0),
        positions_A=positions[:1], rotations=torch.eye(3, dtype=torch.float64)[None],
    )
    assert float(info["defocus_A"][0]) == pytest.approx(29500.0, abs=0.01)


def sheet_raw_px(point_A, axis_deg, tilt_deg, shift_A, pixel_A, shape) -> np.ndarray:
    """§7 projection model written out: raw = (W//2, H//2) + (R2(α)·(cosθX + sinθZ, Y) + s) / p."""
    x, y, z = point_A
    c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    a = math.radians(axis_deg)
    r2 = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    img = r2 @ np.array([c * x + s * z, y]) + np.asarray(shift_A)
    h, w = shape
    return np.array([w // 2, h // 2]) + img / pixel_A


def blob_centres(contrast: np.ndarray, expected_px: np.ndarray, radius: int = 6) -> np.ndarray:
    """Sub-pixel minimum (dark blob) near each expected position: parabola fit per axis."""
    out = []
    for ex, ey in expected_px:
        x0, y0 = int(round(ex)), int(round(ey))
        patch = contrast[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        jy, jx = np.unravel_index(np.argmin(patch), patch.shape)
        cy, cx = y0 - radius + jy, x0 - radius + jx

        def vertex(m, c0, p):
            den = m - 2 * c0 + p
            return 0.0 if den == 0 else 0.5 * (m - p) / den

        dx = vertex(contrast[cy, cx - 1], contrast[cy, cx], contrast[cy, cx + 1])
        dy = vertex(contrast[cy - 1, cx], contrast[cy, cx], contrast[cy + 1, cx])
        out.append((cx + dx, cy + dy))
    return np.array(out)


def test_chiral_triad_keeps_its_handedness():
    """Image a right-handed triad of blobs at three tilts, triangulate with the sheet's formulas."""
    pixel, shape, axis = 4.0, (256, 256), -85.6
    p0 = np.array([-150.0, -120.0, -40.0])
    triad = np.stack([p0, p0 + [260.0, 0, 0], p0 + [0, 300.0, 0], p0 + [0, 0, 180.0]])
    positions = torch.tensor(triad, dtype=torch.float64)
    rotations = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    projector = blob_projector(pixel)
    shifts = {-40.0: (24.0, -16.0), 0.0: (-8.0, 12.0), 40.0: (10.0, 30.0)}
    rows, rhs = [[] for _ in range(4)], [[] for _ in range(4)]
    for theta, shift in shifts.items():
        tilt = tilt_plan(axis, theta, shift_A=shift, defocus_A=1000.0)
        spectrum, info = render_tilt_contrast(
            tilt, shape, pixel, Optics(envelopes=False, detector_mtf=False), 6.5e-4,
            projector=projector, positions_A=positions, rotations=rotations,
        )
        contrast = torch.fft.irfft2(spectrum, s=shape).numpy()
        expected = np.array([sheet_raw_px(p, axis, theta, shift, pixel, shape) for p in triad])
        found = blob_centres(contrast, expected)
        assert np.abs(found - expected).max() < 0.25, (theta, found - expected)
        c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
        a = math.radians(axis)
        r2 = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        m = r2 @ np.array([[c, 0.0, s], [0.0, 1.0, 0.0]]) / pixel
        for i in range(4):
            rows[i].append(m)
            rhs[i].append(found[i] - np.array([shape[1] // 2, shape[0] // 2]) - np.asarray(shift) / pixel)
    recovered = np.stack([np.linalg.lstsq(np.concatenate(rows[i]), np.concatenate(rhs[i]), rcond=None)[0]
                          for i in range(4)])
    assert np.abs(recovered - triad).max() < 6.0  # Å: sub-pixel blob centres, ±40° tilts
    handedness = np.linalg.det(np.stack([recovered[1] - recovered[0], recovered[2] - recovered[0],
                                         recovered[3] - recovered[0]]))
    assert handedness > 0  # right-handed triad stays right-handed (a mirror would flip the sign)


def gemmi_projection(rotation: np.ndarray, centre_A, box: int, pixel_A: float, mirror: bool = False) -> np.ndarray:
    """Projected phase (rad) of the rotated (optionally mirrored) atoms, gemmi potential at 4× then cropped."""
    potential_V = gemmi_potential_V(box, pixel_A, centre_A, rotation, mirror=mirror)
    return (potential_V.sum(0) * pixel_A * interaction_constant_rad_per_V_A(300.0)).numpy()


def test_particle_orientation_is_not_a_mirror_image():
    """Apoferritin (chiral) at RELION angles (30, 60, 90) seen at +30° tilt: the simulator's image
    matches the sheet's rotation (A = (Rz Ry Rz)ᵀ, §5; projection Rz(α)Ry(θ), §7) and not the mirror."""
    assert STRUCTURE.is_file()
    model = read_atomic_model(STRUCTURE, implicit_hydrogens=False)  # gemmi sees the file's atoms
    pixel, box, shape = 3.16, 56, (96, 96)
    projector = FourierSliceProjector(atomic_potential_volume(model, box, pixel), pixel, pad_factor=3)
    a = Rotation.from_euler("ZYZ", [30.0, 60.0, 90.0], degrees=True).as_matrix().T
    assert a == pytest.approx(np.array([[-0.5, 0.866, 0], [-0.433, -0.25, 0.866], [0.75, 0.433, 0.5]]), abs=1e-3)
    axis, theta = -85.6, 30.0
    tilt = tilt_plan(axis, theta, defocus_A=15000.0)
    spectrum, _ = render_tilt_contrast(
        tilt, shape, pixel, Optics(envelopes=False, detector_mtf=False), interaction_constant_rad_per_V_A(300.0),
        projector=projector, positions_A=torch.zeros((1, 3), dtype=torch.float64),
        rotations=torch.tensor(a, dtype=torch.float64)[None],
    )
    simulated = torch.fft.irfft2(spectrum, s=shape).numpy()
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    ca, sa = math.cos(math.radians(axis)), math.sin(math.radians(axis))
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    ctf = ctf_2d(shape, pixel, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1).double().numpy()
    q = np.sqrt(np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None, :] ** 2)

    def image(mirror: bool) -> np.ndarray:
        phase = np.zeros(shape)
        proj = gemmi_projection(rz @ ry @ a, model.centre_A, box, pixel, mirror=mirror)
        o = shape[0] // 2 - box // 2
        phase[o : o + box, o : o + box] = proj
        return np.fft.irfft2(-2.0 * np.fft.rfft2(phase) * ctf * (q <= 0.5), s=shape)

    right = np.corrcoef(simulated.ravel(), image(False).ravel())[0, 1]
    mirrored = np.corrcoef(simulated.ravel(), image(True).ravel())[0, 1]
    assert right > 0.99, right
    assert mirrored < right - 0.1, (right, mirrored)
