"""The simulator's projector: :class:`tomopipe.algorithms.fourier_slice.FourierSliceProjector`
(central-slice extraction, shared with the averaging code)."""

from tomopipe.algorithms.fourier_slice import FourierSliceProjector

__all__ = ["FourierSliceProjector"]
