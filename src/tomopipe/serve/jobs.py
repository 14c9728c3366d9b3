"""Writes made from the browser, one at a time: a queue served by one worker thread.

Every write (a run launched from a form, an exclusion subset, an edit of picks) is a job: a
function of an open :class:`~tomopipe.project.store.Project` (the worker opens its own
connection) returning a :class:`~tomopipe.engine.runner.StepOutcome`. Jobs run in the order they
were queued, so that two runs never share the engine's log handler; the project's writer lock
(``tomopipe.project.lock``) is held while a job runs, so that a
``tomopipe run`` in a terminal and the browser do not write at the same time.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project

log = logging.getLogger("tomopipe.serve")
JOB_STATES = ("queued", "running", "finished", "failed")


@dataclass
class Job:
    """A queued write; ``status`` is one of :data:`JOB_STATES`."""

    id: int
    label: str
    step_type: str
    function: Callable = field(repr=False)
    status: str = "queued"
    run_id: int | None = None
    message: str = ""
    summary: dict = field(default_factory=dict)
    queued_at: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "step_type": self.step_type, "status": self.status,
                "run_id": self.run_id, "message": self.message, "summary": self.summary,
                "queued_at": self.queued_at}


#: how long a job waits for another tomopipe command to finish writing to the project
LOCK_WAIT_S = 3600.0


def _writer_lock(folder: Path, job: "Job"):
    """The project's writer lock (``tomopipe.project.lock``), waited for up to :data:`LOCK_WAIT_S`;
    while waiting, the job's message says for whom."""
    from tomopipe.project.lock import project_lock

    def tell(message: str) -> None:
        job.message = message

    return project_lock(folder, wait_s=LOCK_WAIT_S, command=f"tomopipe serve: job {job.id} ({job.label})",
                        echo=tell)


class JobQueue:
    """One worker thread running jobs on the project in ``folder``, in order."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._jobs: dict[int, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._work, name="tomopipe-serve-jobs", daemon=True)
        self._thread.start()

    def submit(self, label: str, step_type: str, function: Callable[[Project], object]) -> Job:
        job = Job(next(self._ids), label, step_type, function)
        self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: int) -> Job:
        if job_id not in self._jobs:
            raise TomopipeError(f"no job {job_id}")
        return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda job: job.id)

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                with _writer_lock(self.folder, job), Project.open(self.folder) as project:
                    job.status, job.message = "running", ""
                    outcome = job.function(project)
                run = getattr(outcome, "run", None)
                job.run_id = None if run is None else run.id
                job.summary = dict(getattr(outcome, "summary", {}) or {})
                job.message = getattr(outcome, "message", "")
                job.status = "finished" if getattr(outcome, "status", "finished") == "finished" else "failed"
            except TomopipeError as error:
                job.status, job.message = "failed", str(error)
            except Exception as error:  # keep serving: the job reports the failure
                log.error("job %d (%s) failed:\n%s", job.id, job.label, traceback.format_exc())
                job.status, job.message = "failed", f"{type(error).__name__}: {error}"
            finally:
                job.done.set()
