"""The block-copy cyclic shift behind :func:`tomopipe.algorithms.filters.fourier_crop_bin`."""

from __future__ import annotations

import pytest
import torch

from tomopipe.algorithms.filters import _cyclic_shift


@pytest.mark.parametrize(("shape", "shifts", "dims"), [((6, 7), (-3, 2), (-2, -1)),
                                                      ((2, 5, 4, 9), (11, 0, -4), (1, 2, 3)), ((8,), (3,), (0,))])
def test_cyclic_shift_is_torch_roll(shape, shifts, dims):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    assert torch.equal(_cyclic_shift(x, shifts, dims), torch.roll(x, shifts, dims))
