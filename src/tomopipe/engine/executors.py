"""Where the per-tilt-series work of a step runs: in local processes or on a Dask cluster.

A step calls ``ctx.map(function, tasks)``; the executor runs ``function(task)`` for every task
and returns the results in task order. ``function`` must be a module-level function (it is
pickled), each task a picklable value. Log records of the tasks go to the run's log file.

Dask on a SLURM/PBS cluster: start a scheduler with dask-jobqueue and pass its address, e.g.

```python
from dask_jobqueue import SLURMCluster
cluster = SLURMCluster(cores=8, memory="64GB", walltime="04:00:00", job_extra_directives=["--gres=gpu:1"])
cluster.scale(jobs=4)
print(cluster.scheduler_address)   # tomopipe run wf.toml --project P --dask tcp://...
```
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import os
import threading
import time
from typing import Any, Callable

from tqdm import tqdm

from tomopipe.engine.memory import peak_rss_bytes, reset_peak_rss
from tomopipe.errors import TomopipeError

LOGGER_NAME = "tomopipe"
_configured_log_paths: set[str] = set()


def _task_with_log(function: Callable, task: Any, log_path: str | None, verbose: bool) -> tuple[Any, int]:
    """Run one task in a worker, sending its log records to the run's log file (appended); returns
    its result and the worker's peak resident memory (bytes) during the task."""
    if log_path and log_path not in _configured_log_paths:
        logger = logging.getLogger(LOGGER_NAME)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [worker {os.getpid()}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        _configured_log_paths.add(log_path)
    reset_peak_rss()
    result = function(task)
    return result, peak_rss_bytes()


def _start_worker(threads: int, parent_pid: int) -> None:
    """A pool worker's start: ``threads`` torch threads, and a watchdog that ends the worker when its
    parent is gone (a SIGKILLed ``tomopipe run`` leaves no orphaned workers computing)."""
    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


class Executor:
    """Runs tasks; subclasses decide where. Executors that run tasks in worker processes keep the
    largest peak resident memory of a worker during one task (:meth:`take_worker_peak_rss`)."""

    name = "executor"
    #: where ``map`` runs tasks: "this process", "fresh workers" (new processes per call) or
    #: "persistent workers" (processes that keep their memory between calls)
    task_placement = "this process"
    _worker_peak_rss_bytes = 0

    def _note_worker_peak(self, peak_bytes: int) -> None:
        self._worker_peak_rss_bytes = max(self._worker_peak_rss_bytes, int(peak_bytes))

    def take_worker_peak_rss(self) -> int:
        """The largest peak resident memory (bytes) of a worker during one task since the last call;
        0 when no task ran in a worker process."""
        peak, self._worker_peak_rss_bytes = self._worker_peak_rss_bytes, 0
        return peak

    def map(self, function: Callable, tasks: list, desc: str = "", log_path: str | None = None,
            verbose: bool = False) -> list:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


class LocalExecutor(Executor):
    """``jobs`` worker processes on this machine (``jobs=1``: in this process, no pool)."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise TomopipeError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.name = f"local ({jobs} process{'es' if jobs > 1 else ''})"
        self.task_placement = "fresh workers" if jobs > 1 else "this process"

    def map(self, function, tasks, desc="", log_path=None, verbose=False):
        tasks = list(tasks)
        if self.jobs == 1 or len(tasks) <= 1:
            return [function(task) for task in tqdm(tasks, desc=desc, disable=None, leave=False)]
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        context = multiprocessing.get_context("spawn")
        results: list = [None] * len(tasks)
        with futures.ProcessPoolExecutor(min(self.jobs, len(tasks)), mp_context=context,
                                         initializer=_start_worker, initargs=(threads, os.getpid())) as pool:
            pending = {pool.submit(_task_with_log, function, task, log_path, verbose): index
                       for index, task in enumerate(tasks)}
            for future in tqdm(futures.as_completed(pending), total=len(tasks), desc=desc, disable=None,
                               leave=False):
                results[pending[future]], peak_bytes = future.result()
                self._note_worker_peak(peak_bytes)
        return results


class DaskExecutor(Executor):
    """Tasks on a Dask cluster: ``address`` of a running scheduler, or ``"local"`` for a LocalCluster."""

    task_placement = "persistent workers"

    def __init__(self, address: str, workers: int | None = None):
        from distributed import Client, LocalCluster

        self._cluster = None
        if address == "local":
            n_workers = workers or max(1, min(4, os.cpu_count() or 1))
            self._cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            self.client = Client(self._cluster)
        else:
            try:
                self.client = Client(address, timeout="20s")
            except OSError as error:
                raise TomopipeError(f"--dask {address}: cannot reach the Dask scheduler ({error})") from None
        self.name = f"dask ({self.client.scheduler.address})"

    def map(self, function, tasks, desc="", log_path=None, verbose=False):
        from distributed import as_completed

        tasks = list(tasks)
        submitted = [self.client.submit(_task_with_log, function, task, log_path, verbose, pure=False)
                     for task in tasks]
        for _ in tqdm(as_completed(submitted), total=len(submitted), desc=desc, disable=None, leave=False):
            pass
        results = []
        for result, peak_bytes in self.client.gather(submitted):
            results.append(result)
            self._note_worker_peak(peak_bytes)
        return results

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(jobs: int = 1, dask: str | None = None) -> Executor:
    return DaskExecutor(dask) if dask else LocalExecutor(jobs)
