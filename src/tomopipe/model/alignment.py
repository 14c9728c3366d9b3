"""The alignment of a tilt series as item columns, and its IMOD form.

Columns of a ``tilt_series`` set once aligned (RELION 5 semantics; declared in model/sets.py):
``rot_z_deg`` (tilt axis), ``rot_y_deg`` (refined tilt), ``rot_x_deg``, ``shift_x_A``, ``shift_y_A`` (specimen shifts, Å
from the image centre N//2) and ``magnification`` m, the image scale of the view:
``x_img = m·[Rz·Ry·Rx·X]_xy + shift``. Excluded views keep NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tomopipe.algorithms.geometry import xf_from_alignment


def xf_for_views(views: pd.DataFrame, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """IMOD ``.xf`` ``(A [n, 2, 2], d [n, 2])`` of aligned views for images of ``pixel_size_A``
    (``d`` in those pixels): ``A = R2(−rot_z)/m`` maps the raw view onto the aligned one."""
    shifts_px = views[["shift_x_A", "shift_y_A"]].to_numpy(dtype=np.float64, copy=True) / float(pixel_size_A)
    magnification = (views["magnification"].fillna(1.0).to_numpy(np.float64, copy=True)
                     if "magnification" in views else 1.0)
    a, d = xf_from_alignment(views["rot_z_deg"].to_numpy(np.float64, copy=True), shifts_px, 1.0 / magnification)
    return a.numpy(), d.numpy()
