"""numba, when installed, for the compiled CPU kernels (torch is the reference path).

The kernels run in numba's ``workqueue`` threading layer unless ``NUMBA_THREADING_LAYER`` says
otherwise: the OpenMP layer keeps its worker threads spinning after each parallel loop, and on a
machine whose cores are shared that spinning took the core from the FFTs that follow (a tiny
simulation ran 3.5× slower).
"""

from __future__ import annotations

import os

try:
    import numba

    HAVE_NUMBA = True
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover - depends on the environment
    numba = None
    HAVE_NUMBA = False

__all__ = ["numba", "HAVE_NUMBA"]
