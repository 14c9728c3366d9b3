"""Run a workflow against a project: resume what is up to date, run what changed, stop dependents
of a failed step.

A step's signature is a hash of its type and version, its validated parameters, the
fingerprint of the files it reads from outside the project (``Step.fingerprint``) and the
signatures of the runs that produced its inputs. A finished run with the same signature is
reused; a changed parameter changes the signature of that step and of every step after it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tomopipe.engine.context import RunContext
from tomopipe.engine.executors import LOGGER_NAME, Executor
from tomopipe.engine.memory import peak_rss_bytes, reset_peak_rss
from tomopipe.engine.step_api import Step
from tomopipe.engine.workflow import Workflow, WorkflowStep
from tomopipe.errors import TomopipeError
from tomopipe.project.lock import describe_os_error, project_lock
from tomopipe.project.store import Project, RunRecord, SetRecord, dumps

#: the end of the refusal when another process holds the project (callers of the API and edits);
#: ``tomopipe run`` and ``demo`` take the lock themselves and offer ``--wait``
LOCK_HINT = "Wait for it to end and try again"
#: errors of a write that no retry fixes: the message says "cannot write" (others "cannot read or write")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
#: names of the temporary files of :func:`tomopipe.io._atomic.atomic_path` (``.STEM.TOKEN.tmp.SUFFIX``),
#: left behind by a process killed while it wrote
_TEMPORARY_NAME = re.compile(r"^\..*\.[0-9a-f]{12}\.tmp(\.[^.]+)?$")


_executing: dict[str, set[int]] = {}  # project folder -> ids of the runs this process executes now
_executing_guard = threading.Lock()


def remove_partial_files(folder: Path) -> int:
    """Remove the temporary files of interrupted atomic writes under ``folder``; returns how many."""
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if _TEMPORARY_NAME.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


@dataclass
class StepOutcome:
    name: str
    status: str  # finished (ran now), skipped (up to date), failed, blocked
    run: RunRecord | None = None
    message: str = ""
    summary: dict = field(default_factory=dict)


@dataclass
class WorkflowReport:
    outcomes: list[StepOutcome]

    @property
    def ok(self) -> bool:
        return all(outcome.status in ("finished", "skipped") for outcome in self.outcomes)


def step_signature(step: WorkflowStep, input_signatures: dict[str, str]) -> str:
    try:
        fingerprint = step.step.fingerprint(step.params)
    except TomopipeError as error:  # the run itself will fail with this error, in its log
        fingerprint = {"error": str(error)}
    document = {
        "type": step.step.type_name,
        "version": step.step.version,
        "params": step.params,
        "fingerprint": fingerprint,
        "inputs": input_signatures,
    }
    return hashlib.sha256(dumps(document).encode()).hexdigest()


def run_workflow(project: Project, workflow: Workflow, executor: Executor, until: str | None = None,
                 verbose: bool = False, echo=print) -> WorkflowReport:
    """Run the steps in file order (up to and including ``until``) and report each one.

    Holds the project's write lock throughout (:mod:`tomopipe.project.lock`; refused at once when
    another process holds it: a caller that wants to wait takes the lock first). Runs left 'running'
    by a killed process are marked killed and their temporary files removed; they run again."""
    if until is not None and until not in workflow.step_names():
        raise TomopipeError(f"--until {until!r}: no such step in {workflow.path} "
                            f"(steps: {', '.join(workflow.step_names())})")
    with project_lock(project.folder, hint=LOCK_HINT):
        return _run_workflow_locked(project, workflow, executor, until, verbose, echo)


def _run_workflow_locked(project: Project, workflow: Workflow, executor: Executor, until: str | None,
                         verbose: bool, echo) -> WorkflowReport:
    with _executing_guard:
        executing = set(_executing.get(str(project.folder), ()))
    for run_id in project.mark_stale_runs(writer_lock_held=True, executing=executing):
        removed = remove_partial_files(project.absolute_path(project.get_run(run_id).folder))
        echo(f"note: run {run_id} was interrupted earlier and is marked killed"
             + (f" ({removed} partial file(s) removed)" if removed else ""))
    produced: dict[str, tuple[str, dict[str, SetRecord]]] = {}  # step -> (signature, outputs)
    broken: set[str] = set()
    outcomes: list[StepOutcome] = []
    for step in workflow.steps:
        upstream = {ref.step for ref in step.inputs.values()}
        if upstream & broken:
            broken.add(step.name)
            outcome = StepOutcome(step.name, "blocked",
                                  message=f"not run: depends on {', '.join(sorted(upstream & broken))}")
        else:
            outcome = _run_one(project, workflow, step, produced, executor, verbose, echo)
            if outcome.status not in ("finished", "skipped"):
                broken.add(step.name)
        outcomes.append(outcome)
        echo(_outcome_line(outcome))
        if step.name == until:
            break
    return WorkflowReport(outcomes)


def _outcome_line(outcome: StepOutcome) -> str:
    if outcome.status == "skipped":
        return f"[{outcome.name}] up to date (run {outcome.run.id}), skipped"
    if outcome.status == "finished":
        return f"[{outcome.name}] finished in {outcome.run.elapsed_s:.1f} s (run {outcome.run.id})"
    return f"[{outcome.name}] {outcome.status.upper()}: {outcome.message}"


def _run_one(project: Project, workflow: Workflow, step: WorkflowStep,
             produced: dict[str, tuple[str, dict[str, SetRecord]]], executor: Executor,
             verbose: bool, echo) -> StepOutcome:
    missing = [f"{ref.step}.{ref.output}" for ref in step.inputs.values() if ref.output not in produced[ref.step][1]]
    if missing:
        return StepOutcome(step.name, "failed", message=f"input(s) {', '.join(missing)} were not produced "
                                                        f"(an optional output of that step)")
    input_sets = {port: produced[ref.step][1][ref.output] for port, ref in step.inputs.items()}
    input_signatures = {port: f"{produced[ref.step][0]}:{ref.output}" for port, ref in step.inputs.items()}
    signature = step_signature(step, input_signatures)
    previous = project.finished_run_with_signature(signature)
    if previous is not None:
        produced[step.name] = (signature, project.sets_of_run(previous.id))
        return StepOutcome(step.name, "skipped", run=previous, summary=previous.summary)
    outcome = run_step(project, step, input_sets, signature, executor, workflow.name, verbose)
    if outcome.status == "finished":
        produced[step.name] = (signature, project.sets_of_run(outcome.run.id))
    return outcome


def peak_memory_summary(executor: Executor) -> dict:
    """The step's peak resident memory in GB: of this process (``peak_rss_GB``) and, when tasks ran
    in worker processes, of the largest worker during one task (``peak_rss_worker_GB``)."""
    summary = {"peak_rss_GB": round(peak_rss_bytes() / 1e9, 3)}
    worker_bytes = executor.take_worker_peak_rss()
    if worker_bytes:
        summary["peak_rss_worker_GB"] = round(worker_bytes / 1e9, 3)
    return summary


def run_step(project: Project, step: WorkflowStep, input_sets: dict[str, SetRecord], signature: str,
             executor: Executor, workflow_name: str | None = None, verbose: bool = False) -> StepOutcome:
    """Run one step now as a new run: recorded 'running', 'finished' only once its outputs are
    complete; any error makes it 'failed' with the message and the log path. A file that cannot be
    written (full disk, unwritable folder) fails the run with the path and the system's reason.
    Holds the project's write lock (re-entrant: a no-op under :func:`run_workflow` or a command)."""
    with project_lock(project.folder, hint=LOCK_HINT):
        return _run_step_locked(project, step, input_sets, signature, executor, workflow_name, verbose)


def _record_failure(project: Project, run_id: int, message: str, status: str = "failed") -> None:
    """Mark a run failed; when the database cannot take even that (a full disk), say so: the run stays
    'running' in the database and the next run of the project marks it killed."""
    try:
        project.fail_run(run_id, message, status=status)
    except sqlite3.Error as error:
        raise TomopipeError(f"{message}; moreover the project database {project.folder} could not record the "
                            f"failure ({error}): run {run_id} is marked killed when the project is next run") from None


def _run_step_locked(project: Project, step: WorkflowStep, input_sets: dict[str, SetRecord], signature: str,
                     executor: Executor, workflow_name: str | None, verbose: bool) -> StepOutcome:
    run = project.create_run(step.name, step.step.type_name, step.params,
                             {port: record.id for port, record in input_sets.items()}, signature, workflow_name)
    with _executing_guard:
        _executing.setdefault(str(project.folder), set()).add(run.id)
    try:
        return _execute(project, step, input_sets, executor, verbose, run)
    finally:
        with _executing_guard:
            _executing[str(project.folder)].discard(run.id)


def _execute(project: Project, step: WorkflowStep, input_sets: dict[str, SetRecord], executor: Executor,
             verbose: bool, run: RunRecord) -> StepOutcome:
    log_path = project.absolute_path(run.log_path)
    logger = logging.getLogger(LOGGER_NAME)
    handler = None
    previous_level = logger.level
    started = time.time()
    reset_peak_rss()
    executor.take_worker_peak_rss()
    try:
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        ctx = RunContext(project, run, step.name, step.params, input_sets,
                         {port.name: port.kind for port in step.step.outputs}, executor, logger, verbose)
        logger.info("run %d: step %s (%s) with %s on %s", run.id, step.name, step.step.type_name,
                    dumps(step.params), executor.describe())
        summary = step.step().run(ctx) or {}
        missing = [p.name for p in step.step.outputs if not p.optional and p.name not in ctx.outputs]
        if missing:
            raise RuntimeError(f"step {step.name!r} finished without writing output(s) {', '.join(missing)}")
        summary = {"seconds": round(time.time() - started, 3), **peak_memory_summary(executor), **summary}
        project.finish_run(run.id, summary)
        logger.info("run %d finished in %.1f s", run.id, time.time() - started)
    except KeyboardInterrupt:
        _record_failure(project, run.id, "interrupted by the user", status="killed")
        raise
    except TomopipeError as error:
        logger.error("%s", error)
        _record_failure(project, run.id, str(error))
        return StepOutcome(step.name, "failed", run=project.get_run(run.id),
                           message=f"{error} (log: {log_path})")
    except OSError as error:  # a full disk, an unwritable or vanished folder: name the file and the reason
        doing = "write" if error.errno in _WRITE_ERRNOS else "read or write"
        message = f"step {step.name!r}: " + describe_os_error(project.absolute_path(run.folder), error, doing)
        logger.error("%s\n%s", message, traceback.format_exc())
        _record_failure(project, run.id, message)
        return StepOutcome(step.name, "failed", run=project.get_run(run.id), message=f"{message} (log: {log_path})")
    except Exception as error:  # a bug or an unexpected failure: keep the traceback in the log
        logger.error("%s", traceback.format_exc())
        _record_failure(project, run.id, f"{type(error).__name__}: {error}")
        return StepOutcome(step.name, "failed", run=project.get_run(run.id),
                           message=f"{type(error).__name__}: {error} (log: {log_path})")
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)
    return StepOutcome(step.name, "finished", run=project.get_run(run.id), summary=summary)


def run_on_outputs(project: Project, source_run: str | int, step_type: type[Step], name: str, values: dict,
                   executor: Executor, verbose: bool = False) -> tuple[StepOutcome, dict[str, SetRecord]]:
    """Run one step outside a workflow, as a new run named ``name``, on the outputs of a finished
    run (``source_run``: its id or name): each input port gets the source's output set of the
    port's kind. Returns the outcome and the input sets (port -> set)."""
    source = project.find_run(source_run)
    if source.status != "finished":
        raise TomopipeError(f"run {source.id} ({source.name}) is {source.status}, not finished")
    kinds = {port.kind: port.name for port in step_type.inputs}
    input_sets = {kinds[record.kind]: record for record in project.sets_of_run(source.id).values()
                  if record.kind in kinds}
    if not input_sets:
        raise TomopipeError(f"run {source.id} ({source.name}) has no {' or '.join(kinds)} output for a "
                            f"{step_type.type_name} step")
    return run_on_sets(project, step_type, name, values, input_sets, executor, verbose), input_sets


def run_on_sets(project: Project, step_type: type[Step], name: str, values: dict, input_sets: dict[str, SetRecord],
                executor: Executor, verbose: bool = False) -> StepOutcome:
    """Run one step outside a workflow, as a new run named ``name``, on finished sets (port -> set)."""
    step = WorkflowStep(name, step_type, step_type.validate_params(name, values), {})
    signature = step_signature(step, {port: f"{project.get_run(record.run_id).signature}:{record.name}"
                                      for port, record in input_sets.items()})
    return run_step(project, step, input_sets, signature, executor, verbose=verbose)
