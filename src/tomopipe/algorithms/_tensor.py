"""Tensor helpers shared by the numeric modules: result dtype, device and float64 inputs.

Functions of physical quantities accept Python numbers, arrays or tensors, compute in float64 on
the device of their tensor arguments and return the floating dtype of the first floating tensor.
"""

from __future__ import annotations

import torch

__all__ = ["as_f64", "out_dtype", "tensor_device"]


def out_dtype(*values) -> torch.dtype:
    """Floating dtype of the first floating tensor among ``values``, else the default dtype."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return torch.get_default_dtype()


def tensor_device(*values) -> torch.device:
    """Device of the first tensor among ``values``, else the CPU."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def as_f64(value, device: torch.device) -> torch.Tensor:
    """``value`` (number, array or tensor) as a float64 tensor on ``device``."""
    return torch.as_tensor(value, dtype=torch.float64, device=device)
