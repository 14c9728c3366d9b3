"""Vector overlays the viewers draw over images: the fitted CTF's zero rings on a power spectrum.

Pure functions. A spectrum image is ``[w, w]`` with the DC at ``(w // 2, w // 2)`` and frequencies as
``torch.fft`` with ``fftshift`` (one pixel = ``1 / (w · pixel_size_A)`` cycles/Å); x is the column,
y the row (+y = increasing row), and defocus U lies along ``angle`` from +x toward +y
(:func:`tomopipe.algorithms.ctf.ctf_2d`'s convention).
"""

from __future__ import annotations

import numpy as np
import torch

from tomopipe.algorithms.ctf import ctf_zero_frequencies_per_A, defocus_at_azimuth_A


def ctf_zero_rings_px(window_px: int, pixel_size_A: float, defocus_u_A: float, defocus_v_A: float,
                      defocus_angle_deg: float, voltage_kV: float, cs_mm: float, amplitude_contrast: float,
                      phase_shift_deg: float = 0.0, n_rings: int = 12,
                      n_azimuths: int = 180) -> list[list[list[float]]]:
    """The first ``n_rings`` zeros of the CTF as closed polylines ``[[x, y], ...]`` in the spectrum's
    pixel coordinates, innermost first; from the first ring that reaches beyond the spectrum's edge
    (``w / 2`` from the centre) on, rings are left out."""
    azimuth_deg = torch.linspace(0.0, 360.0, n_azimuths + 1, dtype=torch.float64)
    defocus_A = defocus_at_azimuth_A(defocus_u_A, defocus_v_A, defocus_angle_deg, azimuth_deg)
    k_per_A = ctf_zero_frequencies_per_A(defocus_A.clamp(min=1.0), voltage_kV, cs_mm, amplitude_contrast, n_rings,
                                         phase_shift_deg).numpy()  # [azimuths, rings]
    radius_px = k_per_A * window_px * pixel_size_A
    centre = window_px // 2
    angle = np.deg2rad(azimuth_deg.numpy())
    rings = []
    for n in range(n_rings):
        r = radius_px[:, n]
        if not np.isfinite(r).all() or r.max() > window_px / 2:
            break
        rings.append(np.stack([centre + r * np.cos(angle), centre + r * np.sin(angle)], axis=1).round(2).tolist())
    return rings
