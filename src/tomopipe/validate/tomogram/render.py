"""The true specimen on a tomogram's grid: the simulator's particles (``particles.star``, the
truth map ``maps/true_map_binN.mrc``) rotated and placed as the simulator did.

The true specimen is the particles' potential relative to the ice: the truth map ``V`` (solvent
excluded, the reference of ``particles.star``) rotated by ``A = (Rz(rot)·Ry(tilt)·Rz(psi))ᵀ``
(reference -> particle, :func:`tomopipe.algorithms.geometry.euler_relion_to_matrix`, as the
simulator applies it: ``particle(x) = map(Aᵀ·(x - c))``) and centred at
``rlnCenteredCoordinateX/Y/ZAngst`` (Å from the tomogram centre, z = thickness toward the source).
The ice is left out on purpose: its mean potential projects to a constant in every view and its
fluctuations are drawn independently per tilt, so they have no 3-D structure a tomogram could
recover.

Frames: volumes ``[z, y, x]``; the tomogram's centre voxel ``N//2`` is the centre of the RELION 5
projection model (``docs/architecture.md``), so a point at ``p`` Å from the centre sits at voxel
``p / voxel_size_A + N//2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tomopipe.algorithms.filters import bandpass
from tomopipe.algorithms.geometry import euler_relion_to_matrix, rotation_y
from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc, read_mrc_header

__all__ = ["fourier_upsample", "specimen_volume", "truth_map_for_voxel_size", "true_specimen_for_tomogram"]


def fourier_upsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Band-limited interpolation of a cubic ``[n, n, n]`` volume onto a grid ``factor`` times finer
    (zero-padding its spectrum), keeping the centre voxel ``n//2`` on ``(factor·n)//2`` and the
    values (not the sum). The Nyquist plane of an even n is split between +n/2 and -n/2."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"fourier_upsample: factor must be >= 1, got {factor}")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"fourier_upsample: need a cubic volume [n, n, n], got {tuple(volume.shape)}")
    if factor == 1:
        return volume.clone()
    n = int(volume.shape[0])
    n_fine = n * factor
    work_dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.fftn(torch.roll(volume.to(work_dtype), shifts=(-(n // 2),) * 3, dims=(0, 1, 2)))
    frequencies = torch.fft.fftfreq(n, d=1.0 / n, device=volume.device).round().long()  # signed integers
    if n % 2 == 0:  # split the Nyquist bin symmetrically so the result stays real
        for axis in range(3):
            nyquist_half = spectrum.narrow(axis, n // 2, 1) * 0.5
            spectrum = torch.cat([spectrum.narrow(axis, 0, n // 2), nyquist_half,
                                  spectrum.narrow(axis, n // 2 + 1, n - n // 2 - 1), nyquist_half], dim=axis)
        frequencies = torch.cat([frequencies[: n // 2], torch.tensor([-(n // 2)], device=frequencies.device),
                                 frequencies[n // 2 + 1:], torch.tensor([n // 2], device=frequencies.device)])
    fine_index = torch.remainder(frequencies, n_fine)
    fine_spectrum = torch.zeros((n_fine, n_fine, n_fine), dtype=spectrum.dtype, device=volume.device)
    fine_spectrum[fine_index[:, None, None], fine_index[None, :, None], fine_index[None, None, :]] = spectrum
    fine = torch.fft.ifftn(fine_spectrum).real * factor**3
    return torch.roll(fine, shifts=(n_fine // 2,) * 3, dims=(0, 1, 2)).to(volume.dtype)


def _fine_reference(reference: torch.Tensor, reference_voxel_size_A: float, voxel_size_A: float,
                    oversampling: int, max_box_px: int) -> tuple[torch.Tensor, float]:
    """The reference low-passed to the output Nyquist (when finer) and Fourier-upsampled:
    ``(volume [m, m, m] float32, its voxel size Å)``."""
    fine = reference.to(torch.float32)
    n = int(fine.shape[0])
    if reference_voxel_size_A < voxel_size_A * (1 - 1e-6):
        lowpass = bandpass((n, n, n), reference_voxel_size_A, high_A=2.0 * voxel_size_A).to(fine.device)
        fine = torch.fft.irfftn(torch.fft.rfftn(fine) * lowpass, s=(n, n, n))
    factor = max(1, min(int(math.ceil(oversampling * reference_voxel_size_A / voxel_size_A - 1e-9)), max_box_px // n))
    return fourier_upsample(fine, factor), reference_voxel_size_A / factor


def _reach_A(fine: torch.Tensor, fine_voxel_A: float) -> float:
    """Radius (Å) beyond which ``|fine| < 1e-4`` of its maximum, plus 2 voxels (at most the cube's
    half-diagonal): the rotated reference fits in a box of that half-width."""
    n = int(fine.shape[0])
    squared = (torch.arange(n, dtype=torch.float32, device=fine.device) - n // 2) ** 2
    radius2 = squared[:, None, None] + squared[None, :, None] + squared[None, None, :]
    significant = fine.abs() >= 1e-4 * float(fine.abs().max())
    if not bool(significant.any()):
        return 0.0
    return (math.sqrt(float(radius2[significant].max())) + 2.0) * fine_voxel_A


def specimen_volume(
    reference: torch.Tensor,
    reference_voxel_size_A: float,
    positions_A: torch.Tensor,
    rotations: torch.Tensor,
    shape: tuple[int, int, int],
    voxel_size_A: float,
    oversampling: int = 4,
    max_box_px: int = 256,
) -> torch.Tensor:
    """Volume ``[nz, ny, nx]`` (float32) holding ``reference(Aᵀ·(x - c))`` for every particle.

    ``reference`` ``[n, n, n]`` (centre voxel n//2) at ``reference_voxel_size_A``; ``positions_A``
    ``[P, 3]`` (x, y, z) Å from the volume centre (voxel N//2); ``rotations`` ``[P, 3, 3]``
    reference -> particle (RELION ``A``). The reference is first low-passed to the output grid's
    Nyquist when it is finer (no aliasing), then Fourier-interpolated ``oversampling`` times finer
    (at most ``max_box_px`` voxels) and sampled trilinearly at the output voxels (the trilinear
    attenuation at the output Nyquist is ``sinc²(1/(2·oversampling))`` ≈ 0.95 for 4).
    """
    if reference.ndim != 3 or len(set(reference.shape)) != 1:
        raise TomopipeError(f"specimen_volume: the reference must be a cubic volume, got {tuple(reference.shape)}")
    if reference_voxel_size_A <= 0 or voxel_size_A <= 0:
        raise TomopipeError(f"specimen_volume: voxel sizes must be > 0, got {reference_voxel_size_A}, {voxel_size_A}")
    positions = torch.as_tensor(positions_A, dtype=torch.float64).reshape(-1, 3)
    matrices = torch.as_tensor(rotations, dtype=torch.float64).reshape(-1, 3, 3)
    if matrices.shape[0] != positions.shape[0]:
        raise TomopipeError(f"specimen_volume: {positions.shape[0]} positions but {matrices.shape[0]} rotations")
    nz, ny, nx = (int(s) for s in shape)
    device = reference.device
    volume = torch.zeros((nz, ny, nx), dtype=torch.float32, device=device)
    fine, fine_voxel_A = _fine_reference(reference, reference_voxel_size_A, voxel_size_A, oversampling, max_box_px)
    if positions.shape[0] == 0:
        return volume
    half_box = int(math.ceil(_reach_A(fine, fine_voxel_A) / voxel_size_A)) + 1
    n_fine = int(fine.shape[0])
    centre_xyz = torch.tensor([nx // 2, ny // 2, nz // 2], dtype=torch.float64)
    to_grid_units = 2.0 / max(n_fine - 1, 1)  # fine voxels -> grid_sample's [-1, 1]
    for particle in range(positions.shape[0]):
        centre_vox = positions[particle] / voxel_size_A + centre_xyz  # (x, y, z) voxel of the particle centre
        low = [max(0, int(math.floor(float(centre_vox[a]))) - half_box) for a in range(3)]
        high = [min(size, int(math.floor(float(centre_vox[a]))) + half_box + 1) for a, size in enumerate((nx, ny, nz))]
        if any(h <= lo for lo, h in zip(low, high)):
            continue
        # reference-frame voxel index of every output voxel: Aᵀ·(x - c) / step + n_fine//2, built
        # separably from the three axes (row a of A weights offset component a)
        rows = (matrices[particle] * (to_grid_units / fine_voxel_A)).to(device=device, dtype=torch.float32)
        offset_x, offset_y, offset_z = (
            ((torch.arange(low[a], high[a], dtype=torch.float64) - centre_xyz[a]) * voxel_size_A
             - positions[particle, a]).to(device, torch.float32) for a in range(3))
        grid = (offset_z[:, None, None, None] * rows[2] + offset_y[None, :, None, None] * rows[1]
                + offset_x[None, None, :, None] * rows[0] + (n_fine // 2) * to_grid_units - 1.0)[None]
        sampled = F.grid_sample(fine[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        volume[low[2]:high[2], low[1]:high[1], low[0]:high[0]] += sampled[0, 0]
    return volume


def truth_map_for_voxel_size(truth, voxel_size_A: float) -> tuple[torch.Tensor, float]:
    """The coarsest ``maps/true_map_binN.mrc`` whose voxel is not larger than ``voxel_size_A``:
    ``(map [n, n, n] float32, its voxel size Å)``."""
    candidates = [(float(read_mrc_header(path)["voxel_size_A"]), path)
                  for path in sorted((Path(truth.folder) / "maps").glob("true_map_bin*.mrc"))]
    usable = [(voxel_A, path) for voxel_A, path in candidates if voxel_A <= voxel_size_A * (1 + 1e-4)]
    if not usable:
        raise TomopipeError(f"{truth.folder}/maps: no true map with a voxel size <= {voxel_size_A} Å "
                            f"(have {sorted(voxel_A for voxel_A, _ in candidates)})")
    _, path = max(usable)
    data, map_voxel_A = read_mrc(path)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), float(map_voxel_A)


def true_specimen_for_tomogram(truth, ts_id: str, shape, voxel_size_A: float, tilt_offset_deg: float = 0.0,
                               device="cpu") -> torch.Tensor:
    """The true specimen of tilt series ``ts_id`` on a tomogram grid ``[nz, ny, nx]`` at ``voxel_size_A``
    (particles of ``particles.star`` rotated and placed as the simulator did), optionally turned by
    ``Ry(tilt_offset_deg)`` about the tilt axis (y) through the tomogram centre."""
    particles = truth.particles
    mine = particles[particles["rlnTomoName"] == ts_id]
    if mine.empty:
        raise TomopipeError(f"{truth.folder}/particles.star: no particle of tilt series {ts_id!r}")
    positions = torch.tensor(mine[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                                   "rlnCenteredCoordinateZAngst"]].to_numpy(float), dtype=torch.float64)
    rotations = euler_relion_to_matrix(*(torch.tensor(mine[c].to_numpy(float), dtype=torch.float64)
                                         for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    if tilt_offset_deg:
        turn = rotation_y(torch.tensor(float(tilt_offset_deg), dtype=torch.float64))
        positions, rotations = positions @ turn.T, turn @ rotations
    reference, reference_voxel_A = truth_map_for_voxel_size(truth, voxel_size_A)
    return specimen_volume(reference.to(device), reference_voxel_A, positions, rotations, tuple(shape), voxel_size_A)
