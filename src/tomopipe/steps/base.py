"""Helpers shared by the step modules: the ``device`` parameter and its torch device, and the
check of the acquisition values a step needs. The step API itself (Step, Param, Port, register)
is the engine's: :mod:`tomopipe.engine.step_api`.
"""

from __future__ import annotations

import math

from tomopipe.engine.step_api import Param
from tomopipe.errors import TomopipeError

DEVICE_PARAM = Param("device", "str", "where to compute: auto (a CUDA GPU when there is one), cpu or cuda",
                     default="auto", choices=("auto", "cpu", "cuda"))


def compute_device(name: str):
    """The torch device for a step's ``device`` parameter (one code path on CPU and CUDA)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TomopipeError("device = 'cuda' but torch sees no CUDA GPU on this machine; use 'auto' or 'cpu'")
    return torch.device(name)


def missing_numbers(values: dict, names) -> list[str]:
    """Those of ``names`` whose value in ``values`` is absent or not a finite number (for a
    step's check of the acquisition values it needs, before it falls back on nothing)."""
    missing = []
    for name in names:
        try:
            if math.isfinite(float(values.get(name))):
                continue
        except (TypeError, ValueError):
            pass
        missing.append(name)
    return missing
