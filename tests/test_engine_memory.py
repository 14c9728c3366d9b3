"""Peak resident memory per step (tomopipe.engine.memory): a known allocation is seen, a reset forgets
it, and worker processes report their own peaks through the executor."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.memory import peak_rss_bytes, reset_peak_rss

ALLOCATED = 300_000_000  # bytes


def _touch(n_bytes: int) -> int:
    """Allocate and write ``n_bytes`` (resident), return their sum so nothing is optimised away."""
    block = np.ones(n_bytes, dtype=np.uint8)
    return int(block[:: 4096].sum())


def _task_allocating(n_bytes: int) -> int:
    return _touch(n_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-step reset needs Linux /proc")
def test_a_known_allocation_is_measured_and_a_reset_forgets_it():
    assert reset_peak_rss()
    before = peak_rss_bytes()
    _touch(ALLOCATED)
    peak = peak_rss_bytes()
    assert peak - before >= 0.95 * ALLOCATED
    assert reset_peak_rss()
    assert peak_rss_bytes() < peak - 0.9 * ALLOCATED


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-step reset needs Linux /proc")
def test_workers_report_their_peaks_through_the_executor():
    executor = LocalExecutor(2)
    assert executor.map(_task_allocating, [ALLOCATED, 1000]) == [ALLOCATED // 4096 + 1, 1]
    worker_peak = executor.take_worker_peak_rss()
    assert ALLOCATED <= worker_peak < ALLOCATED + 1_000_000_000  # the allocation plus an interpreter with torch
    assert executor.take_worker_peak_rss() == 0  # taken: the next step starts from nothing
