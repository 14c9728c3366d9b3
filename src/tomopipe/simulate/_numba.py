"""numba for the simulator's compiled CPU kernels: the shim lives in :mod:`tomopipe.algorithms._numba`."""

from tomopipe.algorithms._numba import HAVE_NUMBA, numba

__all__ = ["numba", "HAVE_NUMBA"]
