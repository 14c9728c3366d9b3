"""Rules that flag bad tilts (pure functions on per-tilt values; no files).

Each rule returns a boolean mask, True = exclude. Tilts are given in stack (angle) order.
"""

from __future__ import annotations

import numpy as np


def high_astigmatism(defocus_u_A: np.ndarray, defocus_v_A: np.ndarray, max_astigmatism_A: float) -> np.ndarray:
    """|U − V| above ``max_astigmatism_A``."""
    return np.abs(np.asarray(defocus_u_A) - np.asarray(defocus_v_A)) > max_astigmatism_A


def poor_fit_resolution(fit_resolution_A: np.ndarray, max_fit_resolution_A: float) -> np.ndarray:
    """CTF fitted only to a resolution worse (larger in Å) than ``max_fit_resolution_A``;
    a fit without a resolution (NaN) is excluded too."""
    values = np.asarray(fit_resolution_A, dtype=float)
    return ~(values <= max_fit_resolution_A)


def defocus_outliers(defocus_A: np.ndarray, max_deviation_A: float, n_neighbours: int = 4) -> np.ndarray:
    """Mean defocus further than ``max_deviation_A`` from the median of its ``n_neighbours``
    nearest tilts in the stack (the window slides inward at the ends; the tilt itself is left
    out). Defocus varies smoothly along a tilt series, so a jump is a failed fit or a bad view."""
    values = np.asarray(defocus_A, dtype=float)
    n = len(values)
    flags = np.zeros(n, dtype=bool)
    for index in range(n):
        others = np.delete(np.arange(n), index)
        nearest = others[np.argsort(np.abs(others - index), kind="stable")[:n_neighbours]]
        neighbours = values[nearest][np.isfinite(values[nearest])]
        if len(neighbours):
            flags[index] = not abs(values[index] - np.median(neighbours)) <= max_deviation_A
    return flags


def dark_or_empty_views(view_means: np.ndarray, view_sds: np.ndarray, dark_fraction: float) -> np.ndarray:
    """Views whose mean is below ``dark_fraction`` × the median of the series' view means (a
    grid bar or a lost beam), or that hold no signal (zero SD: an empty or blanked frame).
    Works on counts (positive images); a series of normalised images has no meaningful dark rule."""
    means = np.asarray(view_means, dtype=float)
    sds = np.asarray(view_sds, dtype=float)
    reference = np.median(means)
    empty = ~(sds > 1e-6 * max(np.median(sds), 1e-30))
    return (means < dark_fraction * reference) | empty
