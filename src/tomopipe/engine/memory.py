"""Peak resident memory of a process over a stretch of work (a step, a task).

Linux keeps a process's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``)
and lets the process reset it to its current size (``5`` written to ``/proc/self/clear_refs``), so
a step's peak is read as: reset, run, read. Elsewhere the reset is not available and the peak is
the process's lifetime peak (``getrusage``), an upper bound.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def reset_peak_rss() -> bool:
    """Set this process's peak resident memory to its current resident memory; False where the
    system cannot (the peak then stays the lifetime peak)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes since the last :func:`reset_peak_rss`."""
    try:
        match = _HWM.search(_STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024
