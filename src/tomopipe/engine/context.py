"""What a running step sees: its parameters, its input sets, its folder, the executor."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tomopipe.engine.executors import Executor
from tomopipe.errors import TomopipeError
from tomopipe.model.sets import set_kind
from tomopipe.project.store import Project, RunRecord, SetRecord


@dataclass
class RunContext:
    project: Project
    run: RunRecord
    step_name: str
    params: dict[str, Any]
    inputs: dict[str, SetRecord]
    output_kinds: dict[str, str]
    executor: Executor
    log: logging.Logger
    verbose: bool = False
    outputs: dict[str, SetRecord] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The run's own folder (absolute); every file the step writes goes here."""
        return self.project.absolute_path(self.run.folder)

    @property
    def log_path(self) -> Path:
        return self.project.absolute_path(self.run.log_path)

    def input_items(self, port: str, enabled_only: bool = False) -> pd.DataFrame:
        return self.project.read_items(self.inputs[port].id, enabled_only=enabled_only)

    def input_attrs(self, port: str) -> dict:
        return self.inputs[port].attrs

    def stored_path(self, path: str | Path) -> str:
        """How a path is written into items: relative to the project when inside it."""
        return self.project.relative_path(path)

    def resolve(self, stored: str | Path) -> Path:
        return self.project.absolute_path(stored)

    def add_output(self, name: str, items: pd.DataFrame, attrs: dict | None = None,
                   parent: SetRecord | None = None) -> SetRecord:
        if name not in self.output_kinds:
            raise RuntimeError(f"step {self.step_name!r} declares no output {name!r}")
        if name in self.outputs:
            raise RuntimeError(f"step {self.step_name!r} wrote output {name!r} twice")
        self._check_schema(name, items)
        record = self.project.add_set(self.run.id, name, self.output_kinds[name], items, attrs,
                                      parent_set_id=parent.id if parent else None)
        self.outputs[name] = record
        return record

    def _check_schema(self, name: str, items: pd.DataFrame) -> None:
        """Items of output ``name`` against the schema of its kind (model/sets.py), when declared."""
        kind = set_kind(self.output_kinds[name])
        problems = kind.problems(items) if kind else []
        if problems:
            self.fail(f"output {name!r} (kind {kind.name!r}): " + "; ".join(problems))

    def map(self, function: Callable, tasks: list, desc: str = "") -> list:
        """Run ``function(task)`` for every task on the executor (per tilt series, typically)."""
        return self.executor.map(function, tasks, desc=desc or self.step_name, log_path=str(self.log_path),
                                 verbose=self.verbose)

    @property
    def task_placement(self) -> str:
        """Where :meth:`map` runs tasks (:attr:`tomopipe.engine.executors.Executor.task_placement`)."""
        return self.executor.task_placement

    @property
    def executor_description(self) -> str:
        """The executor in words, for logs (e.g. ``local (2 processes)``)."""
        return self.executor.describe()

    def fail(self, message: str) -> None:
        raise TomopipeError(f"step {self.step_name!r}: {message}")
