"""Run a workflow against a project: resume what is up to date, run what changed, stop dependents
of a failed step.

A step's signature is a hash of its type and version, its validated parameters, the
fingerprint of the files it reads from outside the project (``Step.fingerprint``) and the
signatures of the runs that produced its inputs. A finished run with the same signature is
reused; a changed parameter changes the signature of that step and of every step after it.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from dataclasses import dataclass, field

from tomopipe.engine.context import RunContext
from tomopipe.engine.executors import LOGGER_NAME, Executor
from tomopipe.engine.step_api import Step
from tomopipe.engine.workflow import Workflow, WorkflowStep
from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project, RunRecord, SetRecord, dumps


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
    """Run the steps in file order (up to and including ``until``) and report each one."""
    if until is not None and until not in workflow.step_names():
        raise TomopipeError(f"--until {until!r}: no such step in {workflow.path} "
                            f"(steps: {', '.join(workflow.step_names())})")
    for run_id in project.mark_stale_runs():
        echo(f"note: run {run_id} was interrupted earlier and is marked killed")
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


def run_step(project: Project, step: WorkflowStep, input_sets: dict[str, SetRecord], signature: str,
             executor: Executor, workflow_name: str | None = None, verbose: bool = False) -> StepOutcome:
    """Run one step now as a new run: recorded 'running', 'finished' only once its outputs are
    complete; any error makes it 'failed' with the message and the log path."""
    run = project.create_run(step.name, step.step.type_name, step.params,
                             {port: record.id for port, record in input_sets.items()}, signature, workflow_name)
    log_path = project.absolute_path(run.log_path)
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    ctx = RunContext(project, run, step.name, step.params, input_sets,
                     {port.name: port.kind for port in step.step.outputs}, executor, logger, verbose)
    started = time.time()
    logger.info("run %d: step %s (%s) with %s on %s", run.id, step.name, step.step.type_name,
                dumps(step.params), executor.describe())
    try:
        summary = step.step().run(ctx) or {}
        missing = [p.name for p in step.step.outputs if not p.optional and p.name not in ctx.outputs]
        if missing:
            raise RuntimeError(f"step {step.name!r} finished without writing output(s) {', '.join(missing)}")
        summary = {"seconds": round(time.time() - started, 3), **summary}
        project.finish_run(run.id, summary)
        logger.info("run %d finished in %.1f s", run.id, time.time() - started)
    except KeyboardInterrupt:
        project.fail_run(run.id, "interrupted by the user", status="killed")
        raise
    except TomopipeError as error:
        logger.error("%s", error)
        project.fail_run(run.id, str(error))
        return StepOutcome(step.name, "failed", run=project.get_run(run.id),
                           message=f"{error} (log: {log_path})")
    except Exception as error:  # a bug or an unexpected failure: keep the traceback in the log
        logger.error("%s", traceback.format_exc())
        project.fail_run(run.id, f"{type(error).__name__}: {error}")
        return StepOutcome(step.name, "failed", run=project.get_run(run.id),
                           message=f"{type(error).__name__}: {error} (log: {log_path})")
    finally:
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
