"""What the API modules share: opening the project per request, JSON that survives NaN, reading
arrays of a set's items by id (never by a path from the request), and errors as JSON."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from tomopipe.errors import TomopipeError
from tomopipe.io.mrc import read_mrc
from tomopipe.project.store import Project, SetRecord


class ApiError(TomopipeError):
    """A refusal with an HTTP status (400 bad input, 404 unknown id, 409 wrong state, 422 invalid form)."""

    def __init__(self, message: str, status: int = 400, details: dict | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or {}


@contextlib.contextmanager
def open_project(request: Request):
    """The project of the app, opened for this request (SQLite connections are per thread)."""
    with Project.open(request.app.state.project_folder) as project:
        yield project


def clean(value):
    """``value`` with numpy scalars made Python numbers and NaN/inf made None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def json_response(value, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(clean(value), status_code=status, headers=headers)


def finished_set(project: Project, set_id: int, kind: str | tuple[str, ...]) -> SetRecord:
    """A finished set of one of the ``kind`` s, or a 404/400 naming what was wrong."""
    try:
        record = project.get_set(set_id)
    except TomopipeError:
        raise ApiError(f"no finished set with id {set_id}", 404) from None
    kinds = (kind,) if isinstance(kind, str) else kind
    if record.kind not in kinds:
        raise ApiError(f"set {set_id} is a {record.kind} set, not {' or '.join(kinds)}")
    return record


def int_query(request: Request, name: str, default: int | None = None, low: int | None = None,
              high: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None:
        if default is None:
            raise ApiError(f"query parameter {name!r} is required")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(f"query parameter {name}={text!r} is not a whole number") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(f"query parameter {name}={value} is outside {low}..{high}")
    return value


def float_query(request: Request, name: str, default: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ApiError(f"query parameter {name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ApiError(f"query parameter {name}={text!r} is not finite")
    return value


@functools.lru_cache(maxsize=32)
def _mapped(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, float]:
    return read_mrc(path, mmap=True)


def mapped_mrc(project: Project, stored_path: str) -> tuple[np.ndarray, float]:
    """The MRC file a set's item names (a stored path), memory-mapped and cached while unchanged,
    with its voxel size (Å)."""
    path = Path(project.absolute_path(stored_path))
    try:
        stat = os.stat(path)
    except OSError:
        raise ApiError(f"{path}: the file of this item is missing", 404) from None
    return _mapped(str(path), stat.st_mtime_ns, stat.st_size)


def mapped_array(project: Project, stored_path: str) -> np.ndarray:
    """:func:`mapped_mrc` without the voxel size."""
    return mapped_mrc(project, stored_path)[0]


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def run_name(value, default: str) -> str:
    """A run name from a request: letters, digits, ``_`` and ``-`` only (it names the run's folder)."""
    name = str(value or default).strip()
    if not name or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name) or len(name) > 64:
        raise ApiError(f"run name {name!r}: use up to 64 letters, digits, '_' and '-'", 422,
                       {"errors": {"name": "letters, digits, _ and - only"}})
    return name
