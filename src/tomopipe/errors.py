"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

from pathlib import Path


class TomopipeError(Exception):
    """An error caused by the user's input or settings, with a message that says what to fix."""


class InputFileError(TomopipeError):
    """A file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
