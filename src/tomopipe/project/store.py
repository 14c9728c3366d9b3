"""The project store: one folder with an embedded SQLite database (WAL mode) and per-run folders.

The database holds
- ``runs``: one row per execution of a step (step type, workflow name, parameters, inputs,
  signature, status, timings, log path, folder);
- ``sets``: data objects produced by runs (a tilt-series set, a CTF set, particles ...),
  each with set-level attributes (JSON) and a table of items;
- ``items``: the items of every set (a tilt image, a particle ...), one row per item, stored
  columnar as Apache Arrow record batches (chunks of up to a million items), with an
  ``enabled`` flag per item;
- ``provenance``: which sets a run read and wrote.

Items are written and read in bulk (a whole DataFrame per set, one transaction), never one
Python object per item: a million particles write and read back in well under a second
(``benchmarks/bench_project_store.py``), where a row-per-item SQL table took 5 s each way.
Nothing is modified in place: a subset is a new set whose items are copied with their flags
changed. Arrays live as files in per-run folders; paths stored in
items are relative to the project folder when they lie inside it.

A run is recorded as ``running`` when it starts and ``finished`` only after all of its outputs
are complete; sets of runs that are not finished are invisible to queries.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from tomopipe.errors import TomopipeError
from tomopipe.project.lock import describe_os_error

DATABASE_NAME = "tomopipe.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    step_type TEXT NOT NULL,
    params_json TEXT NOT NULL,
    inputs_json TEXT NOT NULL,
    signature TEXT NOT NULL,
    workflow TEXT,
    status TEXT NOT NULL,
    folder TEXT NOT NULL,
    log_path TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    elapsed_s REAL,
    error TEXT,
    host TEXT,
    pid INTEGER,
    summary_json TEXT
);
CREATE INDEX IF NOT EXISTS runs_signature ON runs(signature, status);
CREATE TABLE IF NOT EXISTS sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    attrs_json TEXT NOT NULL,
    n_items INTEGER NOT NULL,
    parent_set_id INTEGER REFERENCES sets(id),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    set_id INTEGER NOT NULL REFERENCES sets(id),
    chunk INTEGER NOT NULL,
    n_rows INTEGER NOT NULL,
    arrow_ipc BLOB NOT NULL,
    PRIMARY KEY (set_id, chunk)
);
CREATE TABLE IF NOT EXISTS provenance (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    set_id INTEGER NOT NULL REFERENCES sets(id),
    role TEXT NOT NULL CHECK (role IN ('input', 'output')),
    port TEXT NOT NULL
);
"""

RUN_STATES = ("running", "finished", "failed", "killed")
ITEMS_PER_CHUNK = 1_000_000


@dataclass(frozen=True)
class RunRecord:
    """One row of the ``runs`` table."""

    id: int
    name: str
    step_type: str
    params: dict
    inputs: dict
    signature: str
    workflow: str | None
    status: str
    folder: str
    log_path: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    elapsed_s: float | None
    error: str | None
    host: str | None
    pid: int | None
    summary: dict


@dataclass(frozen=True)
class SetRecord:
    """One row of the ``sets`` table (the items are read separately, in bulk)."""

    id: int
    run_id: int
    name: str
    kind: str
    attrs: dict
    n_items: int
    parent_set_id: int | None


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in project metadata")


def dumps(value: Any) -> str:
    """JSON text for database columns (sorted keys, so equal values give equal text)."""
    return json.dumps(value, sort_keys=True, default=_json_default)


class Project:
    """A tomopipe project folder. Open it with :meth:`init` or :meth:`open`."""

    def __init__(self, folder: Path, connection: sqlite3.Connection):
        self.folder = folder
        self._db = connection

    # ------------------------------------------------------------------ opening
    @classmethod
    def init(cls, folder: str | Path) -> "Project":
        """Create a project in ``folder`` (created if missing); refuse to overwrite one."""
        folder = Path(folder).resolve()
        if (folder / DATABASE_NAME).exists():
            raise TomopipeError(f"{folder}: a tomopipe project already exists here")
        if folder.exists() and not folder.is_dir():
            raise TomopipeError(f"{folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "runs").mkdir(exist_ok=True)
        connection = cls._connect(folder / DATABASE_NAME)
        with connection:
            connection.executescript(_SCHEMA)
            connection.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?), ('created_at', ?)",
                (str(SCHEMA_VERSION), str(time.time())),
            )
        return cls(folder, connection)

    @classmethod
    def open(cls, folder: str | Path) -> "Project":
        """Open an existing project; a clear error if ``folder`` holds none."""
        folder = Path(folder).resolve()
        database = folder / DATABASE_NAME
        if not database.is_file():
            raise TomopipeError(
                f"{folder}: not a tomopipe project (no {DATABASE_NAME}); create one with "
                f"'tomopipe project init {folder}'"
            )
        connection = None
        try:
            connection = cls._connect(database)
            version = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as error:  # not SQLite, or a 'project init' killed before its schema
            if connection is not None:
                connection.close()
            raise TomopipeError(f"{database}: not a tomopipe project database ({error}); if 'tomopipe project "
                                f"init' was interrupted, remove the file and create the project again") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise TomopipeError(f"{database}: unsupported project schema version {version}")
        return cls(folder, connection)

    @classmethod
    def open_or_init(cls, folder: str | Path) -> "Project":
        folder = Path(folder)
        return cls.open(folder) if (folder / DATABASE_NAME).exists() else cls.init(folder)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=60.0, isolation_level="DEFERRED")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    def relative_path(self, path: str | Path) -> str:
        """Store paths inside the project relative to it, others absolute."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)

    def absolute_path(self, stored: str | Path) -> Path:
        stored = Path(stored)
        return stored if stored.is_absolute() else self.folder / stored

    # ------------------------------------------------------------------ runs
    def create_run(
        self,
        name: str,
        step_type: str,
        params: dict,
        inputs: dict[str, int],
        signature: str,
        workflow: str | None = None,
    ) -> RunRecord:
        """Record a new run as 'running' and create its folder (``runs/NNNN_name``)."""
        now = time.time()
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO runs(name, step_type, params_json, inputs_json, signature, workflow,"
                " status, folder, log_path, created_at, started_at, host, pid, summary_json)"
                " VALUES (?, ?, ?, ?, ?, ?, 'running', '', '', ?, ?, ?, ?, '{}')",
                (name, step_type, dumps(params), dumps(inputs), signature, workflow, now, now,
                 socket.gethostname(), os.getpid()),
            )
            run_id = cursor.lastrowid
            folder = Path("runs") / f"{run_id:04d}_{name}"
            log_path = folder / "run.log"
            self._db.execute(
                "UPDATE runs SET folder=?, log_path=? WHERE id=?", (str(folder), str(log_path), run_id)
            )
            for port, set_id in inputs.items():
                self._db.execute(
                    "INSERT INTO provenance(run_id, set_id, role, port) VALUES (?, ?, 'input', ?)",
                    (run_id, set_id, port),
                )
        try:
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:  # an unwritable project, a full disk: the run is failed, never finished
            message = describe_os_error(self.folder / folder, error, "create the run's folder")
            self.fail_run(run_id, message)
            raise TomopipeError(message) from None
        return self.get_run(run_id)

    def finish_run(self, run_id: int, summary: dict | None = None) -> None:
        """Mark a run finished: from now on its outputs are visible."""
        now = time.time()
        with self._db:
            row = self._db.execute("SELECT started_at, status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row[1] != "running":
                raise TomopipeError(f"run {run_id} is {row[1]}, cannot be finished")
            self._db.execute(
                "UPDATE runs SET status='finished', finished_at=?, elapsed_s=?, summary_json=? WHERE id=?",
                (now, now - row[0], dumps(summary or {}), run_id),
            )

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        now = time.time()
        with self._db:
            row = self._db.execute("SELECT started_at FROM runs WHERE id=?", (run_id,)).fetchone()
            self._db.execute(
                "UPDATE runs SET status=?, finished_at=?, elapsed_s=?, error=? WHERE id=?",
                (status, now, now - row[0], error, run_id),
            )

    def mark_stale_runs(self, writer_lock_held: bool = False, executing: Iterable[int] = ()) -> list[int]:
        """Runs left 'running' by a process that no longer exists on this host become 'killed'.

        With ``writer_lock_held`` (the caller holds :func:`tomopipe.project.lock.project_lock`, which
        every writer takes) every run left 'running' but those ``executing`` in this process now is
        stale, whatever its host and even when its pid has been reused since."""
        host, executing = socket.gethostname(), set(executing)
        stale = []
        for run_id, run_host, pid in self._db.execute(
            "SELECT id, host, pid FROM runs WHERE status='running'"
        ).fetchall():
            if writer_lock_held:
                if run_id not in executing:
                    stale.append(run_id)
            elif run_host == host and not _pid_alive(pid):
                stale.append(run_id)
        for run_id in stale:
            self.fail_run(run_id, "the process running this step ended before it finished", status="killed")
        return stale

    def get_run(self, run_id: int) -> RunRecord:
        row = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise TomopipeError(f"{self.folder}: no run with id {run_id}")
        return _run_from_row(row)

    def runs(self) -> list[RunRecord]:
        rows = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id").fetchall()
        return [_run_from_row(row) for row in rows]

    def find_run(self, key: str) -> RunRecord:
        """A run by id, or the newest finished run of a workflow step name."""
        if str(key).isdigit():
            return self.get_run(int(key))
        row = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE name=? ORDER BY (status='finished') DESC, id DESC LIMIT 1",
            (key,),
        ).fetchone()
        if row is None:
            names = sorted({r.name for r in self.runs()})
            raise TomopipeError(f"{self.folder}: no run named {key!r}; runs are: {', '.join(names) or 'none'}")
        return _run_from_row(row)

    def finished_run_with_signature(self, signature: str) -> RunRecord | None:
        row = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE signature=? AND status='finished' ORDER BY id DESC LIMIT 1",
            (signature,),
        ).fetchone()
        return None if row is None else _run_from_row(row)

    # ------------------------------------------------------------------ sets
    def add_set(
        self,
        run_id: int,
        name: str,
        kind: str,
        items: pd.DataFrame,
        attrs: dict | None = None,
        parent_set_id: int | None = None,
    ) -> SetRecord:
        """Store a set produced by ``run_id``: its attributes and all its items in one transaction.

        An ``enabled`` column (bool) is added when the items have none, and cast to numpy bool.
        """
        items = items.reset_index(drop=True)
        enabled = _enabled_flags(items["enabled"], f"set {name!r}") if "enabled" in items.columns else True
        items = items.assign(enabled=enabled)
        try:
            table = pa.Table.from_pandas(items, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise TomopipeError(f"set {name!r}: items cannot be stored ({error})") from error
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO sets(run_id, name, kind, attrs_json, n_items, parent_set_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, kind, dumps(attrs or {}), len(items), parent_set_id, time.time()),
            )
            set_id = cursor.lastrowid
            for chunk, start in enumerate(range(0, max(len(items), 1), ITEMS_PER_CHUNK)):
                part = table.slice(start, ITEMS_PER_CHUNK)
                self._db.execute(
                    "INSERT INTO items(set_id, chunk, n_rows, arrow_ipc) VALUES (?, ?, ?, ?)",
                    (set_id, chunk, part.num_rows, _to_ipc(part)),
                )
            self._db.execute(
                "INSERT INTO provenance(run_id, set_id, role, port) VALUES (?, ?, 'output', ?)",
                (run_id, set_id, name),
            )
        return self.get_set(set_id, include_unfinished=True)

    def get_set(self, set_id: int, include_unfinished: bool = False) -> SetRecord:
        row = self._db.execute(
            "SELECT s.id, s.run_id, s.name, s.kind, s.attrs_json, s.n_items, s.parent_set_id, r.status"
            " FROM sets s JOIN runs r ON r.id = s.run_id WHERE s.id=?",
            (set_id,),
        ).fetchone()
        if row is None or (row[7] != "finished" and not include_unfinished):
            raise TomopipeError(f"{self.folder}: no finished set with id {set_id}")
        return SetRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6])

    def sets_of_run(self, run_id: int) -> dict[str, SetRecord]:
        rows = self._db.execute("SELECT id, name FROM sets WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        return {name: self.get_set(set_id, include_unfinished=True) for set_id, name in rows}

    def finished_sets(self, kind: str | None = None) -> list[SetRecord]:
        query = (
            "SELECT s.id FROM sets s JOIN runs r ON r.id = s.run_id WHERE r.status='finished'"
            + (" AND s.kind=?" if kind else "")
            + " ORDER BY s.id"
        )
        rows = self._db.execute(query, (kind,) if kind else ()).fetchall()
        return [self.get_set(row[0]) for row in rows]

    def read_items(self, set_id: int, enabled_only: bool = False) -> pd.DataFrame:
        """All items of a set as a DataFrame (columns with the dtypes they were written with)."""
        rows = self._db.execute(
            "SELECT arrow_ipc FROM items WHERE set_id=? ORDER BY chunk", (set_id,)
        ).fetchall()
        if not rows:
            raise TomopipeError(f"{self.folder}: set {set_id} has no items table")
        table = pa.concat_tables([_from_ipc(blob) for (blob,) in rows])
        items = table.to_pandas()
        items["enabled"] = _enabled_flags(items["enabled"], f"set {set_id}")
        if enabled_only:
            items = items[items["enabled"].to_numpy(dtype=bool)].reset_index(drop=True)
        return items

    def provenance(self, run_id: int) -> list[tuple[str, str, int]]:
        return self._db.execute(
            "SELECT role, port, set_id FROM provenance WHERE run_id=? ORDER BY role, port", (run_id,)
        ).fetchall()


def _enabled_flags(values: pd.Series, where: str) -> np.ndarray:
    """The ``enabled`` column as numpy bool, whatever bool-like dtype it came with (numpy bool,
    Python bools in an object column, pandas nullable boolean); missing or non-bool values are errors."""
    if values.dtype == np.bool_:
        return values.to_numpy()
    if values.isna().any() or not all(isinstance(v, (bool, np.bool_)) for v in values.tolist()):
        raise TomopipeError(f"{where}: column 'enabled' must hold only True/False, found "
                            f"{sorted({repr(v) for v in values.tolist()} - {'True', 'False'})[:5]}")
    return values.to_numpy(dtype=bool)


_RUN_COLUMNS = (
    "id, name, step_type, params_json, inputs_json, signature, workflow, status, folder, log_path,"
    " created_at, started_at, finished_at, elapsed_s, error, host, pid, summary_json"
)


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def _run_from_row(row: Iterable) -> RunRecord:
    row = list(row)
    row[3] = json.loads(row[3])
    row[4] = json.loads(row[4])
    row[17] = json.loads(row[17] or "{}")
    return RunRecord(*row)


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return True
