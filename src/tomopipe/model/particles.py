"""Particles in their tomogram's frame: the one place that converts a ``particles`` set's
coordinates and angles to voxels and rotation matrices and back.

Conventions (``model/sets.py``, docs/architecture.md): a tomogram is ``[z, y, x]`` with voxel
centres on integer 0-based indices; ``x_A, y_A, z_A`` are Å from the centre ``n / 2`` of each axis
(RELION 5 centred coordinates, :func:`tomopipe.algorithms.geometry.relion_coordinate_centre`; the
centre voxel ``n // 2`` for even sizes), so ``voxel = x_A / voxel_size_A + n / 2``. A point is
inside the tomogram when every voxel coordinate lies in ``[-0.5, n - 0.5]``. Orientations are
RELION ZYZ angles; ``A = euler_relion_to_matrix(rot, tilt, psi)`` maps reference -> particle
(copick's ``transformation_`` rotation, RELION's Euler matrix). Unknown angles and scores
(hand picks) are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tomopipe.algorithms.geometry import euler_relion_to_matrix, matrix_to_euler_relion, relion_coordinate_centre
from tomopipe.errors import TomopipeError
from tomopipe.model.sets import PARTICLES

XYZ_A = ("x_A", "y_A", "z_A")
ANGLES_DEG = ("rot_deg", "tilt_deg", "psi_deg")


@dataclass(frozen=True)
class TomogramFrame:
    """Size (x, y, z voxels) and voxel size of one tomogram: what places a particle in it."""

    ts_id: str
    size_xyz_px: tuple[int, int, int]
    voxel_size_A: float

    @property
    def centre_px(self) -> np.ndarray:
        return np.array([relion_coordinate_centre(int(n)) for n in self.size_xyz_px], dtype=np.float64)

    def to_voxels(self, xyz_A) -> np.ndarray:
        """Å from the centre -> 0-based voxel coordinates (x, y, z), ``[..., 3]``."""
        return np.asarray(xyz_A, dtype=np.float64) / self.voxel_size_A + self.centre_px

    def to_centred_A(self, voxels_xyz) -> np.ndarray:
        """0-based voxel coordinates (x, y, z) -> Å from the centre, ``[..., 3]``."""
        return (np.asarray(voxels_xyz, dtype=np.float64) - self.centre_px) * self.voxel_size_A

    def inside(self, xyz_A) -> np.ndarray:
        """Whether each point (Å from the centre) lies within the volume's voxels."""
        voxels = self.to_voxels(xyz_A)
        size = np.asarray(self.size_xyz_px, dtype=np.float64)
        return np.all((voxels >= -0.5) & (voxels <= size - 0.5), axis=-1)


def tomogram_frames(tomograms: pd.DataFrame) -> dict[str, TomogramFrame]:
    """``{ts_id: TomogramFrame}`` of the items of a ``tomograms`` set."""
    return {str(row.ts_id): TomogramFrame(str(row.ts_id), (int(row.size_x_px), int(row.size_y_px),
                                                            int(row.size_z_px)), float(row.voxel_size_A))
            for row in tomograms.itertuples()}


def particle_set_attrs(tomograms: pd.DataFrame, tomograms_attrs: dict) -> dict:
    """Attributes of a particles set picked in ``tomograms`` (a tomograms set's items and
    attributes): the tilt-series acquisitions, and each tomogram's size (x, y, z voxels) and voxel
    size, so that exports and viewers place the particles without the tomograms set."""
    return {"tilt_series": tomograms_attrs.get("tilt_series", {}),
            "tomograms": {ts_id: {"size_xyz_px": list(frame.size_xyz_px), "voxel_size_A": frame.voxel_size_A}
                          for ts_id, frame in tomogram_frames(tomograms).items()}}


def check_particles(particles: pd.DataFrame, frames: dict[str, TomogramFrame], where: str) -> None:
    """Raise a TomopipeError naming ``where`` (a file, a parameter) for a particle of a tomogram
    that is not there or a point outside its tomogram."""
    unknown = sorted(set(particles["ts_id"]) - set(frames))
    if unknown:
        raise TomopipeError(f"{where}: no tomogram for {', '.join(map(repr, unknown))} "
                            f"(tomograms: {', '.join(sorted(frames)) or 'none'})")
    for ts_id, group in particles.groupby("ts_id", sort=True):
        frame = frames[ts_id]
        xyz = group[list(XYZ_A)].to_numpy(np.float64)
        outside = ~frame.inside(xyz) | ~np.isfinite(xyz).all(axis=1)
        if outside.any():
            index = int(np.flatnonzero(outside)[0])
            voxel = frame.to_voxels(xyz[index])
            raise TomopipeError(
                f"{where}: point {index + 1} of {ts_id} at ({', '.join(f'{v:.1f}' for v in xyz[index])}) Å = voxel "
                f"({', '.join(f'{v:.1f}' for v in voxel)}) is outside the tomogram of "
                f"{' x '.join(map(str, frame.size_xyz_px))} voxels ({int(outside.sum())} point(s) outside)")


def orientation_matrices(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION ZYZ angles -> reference-to-particle matrices ``[n, 3, 3]`` (NaN angles give NaN)."""
    angles = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in (rot_deg, tilt_deg, psi_deg)]
    return euler_relion_to_matrix(*angles).numpy()


def angles_from_matrices(matrices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference-to-particle matrices ``[n, 3, 3]`` -> RELION ZYZ ``(rot, tilt, psi)`` in degrees."""
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    if not len(matrices):
        return (np.zeros(0),) * 3
    return tuple(a.numpy() for a in matrix_to_euler_relion(torch.from_numpy(matrices)))


def fill_half_sets(half_set) -> np.ndarray:
    """Half sets (1 or 2) with the missing ones (NaN, 0) assigned alternately, starting with the
    half that has fewer particles, so that the halves stay balanced."""
    values = pd.to_numeric(pd.Series(half_set, dtype="float64"), errors="coerce").to_numpy()
    values = np.where(np.isin(values, (1.0, 2.0)), values, np.nan)
    missing = np.isnan(values)
    first = 1 if np.sum(values == 1) <= np.sum(values == 2) else 2
    values[missing] = np.where(np.arange(int(missing.sum())) % 2 == 0, first, 3 - first)
    return values.astype(np.int64)


def particles_table(ts_id, xyz_A, angles_deg=None, score=None, half_set=None) -> pd.DataFrame:
    """A ``particles`` table with every column of the kind: ``ts_id`` (one or per row),
    ``xyz_A`` ``[n, 3]``, optional angles ``[n, 3]``, scores and half sets (missing: NaN, assigned)."""
    xyz_A = np.asarray(xyz_A, dtype=np.float64).reshape(-1, 3)
    n = len(xyz_A)
    angles = np.full((n, 3), np.nan) if angles_deg is None else np.asarray(angles_deg, np.float64).reshape(n, 3)
    table = pd.DataFrame({"ts_id": pd.Series(np.broadcast_to(np.asarray(ts_id, dtype=object), (n,)), dtype=object),
                          **{c: xyz_A[:, i] for i, c in enumerate(XYZ_A)},
                          **{c: angles[:, i] for i, c in enumerate(ANGLES_DEG)},
                          "score": np.full(n, np.nan) if score is None else np.asarray(score, np.float64),
                          "half_set": fill_half_sets(np.full(n, np.nan) if half_set is None else half_set),
                          "enabled": np.ones(n, dtype=bool)})
    return table[[c.name for c in PARTICLES.columns]]


def best_particles(particles: pd.DataFrame, min_score: float | None = None,
                   max_number: int | None = None) -> pd.DataFrame:
    """The picks with ``score >= min_score`` (picks without a score fail it), then the
    ``max_number`` highest-scoring ones (ties in the set's order; picks without a score last)."""
    kept = particles
    if min_score is not None:
        kept = kept[kept["score"].to_numpy(np.float64) >= min_score]
    if max_number is not None:
        kept = kept.sort_values("score", ascending=False, kind="stable", na_position="last").head(max_number)
        kept = kept.sort_index()
    return kept.reset_index(drop=True)
