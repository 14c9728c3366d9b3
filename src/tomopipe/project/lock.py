"""One writer per project: an OS advisory lock on ``PROJECT/tomopipe.lock``.

Every command that records runs (``tomopipe run``, ``demo``, ``exclude``, ``picks add|remove|import``,
and the engine's :func:`~tomopipe.engine.runner.run_step` for callers of the Python API) holds an
exclusive ``flock`` on the lock file for as long as it writes. The operating system releases the lock
when the process ends, however it ends (SIGKILL, power loss of a client), so a killed command never
leaves a stale lock behind; the holder's pid, host, command and start time are written into the file
only so that a refused second writer can say who holds the project. Readers (``status``, ``show``,
``export``, reports, the web viewer) never take the lock: SQLite in WAL mode lets them read while a
writer writes.

The lock is re-entrant within a process (a command that holds it can call the engine, which takes it
again), and the lock file's descriptor is not inherited by worker processes (PEP 446), so orphaned
workers of a killed command do not keep the project locked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tomopipe.errors import TomopipeError

try:  # POSIX (Linux, macOS): flock, released by the kernel when the descriptor's last holder ends
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt byte-range lock, released when the process ends
    fcntl = None
    import msvcrt

LOCK_NAME = "tomopipe.lock"
#: seconds between two attempts while waiting for the lock
POLL_INTERVAL_S = 0.2

_held: dict[str, list] = {}  # resolved project folder -> [file descriptor, depth]
_held_guard = threading.Lock()


class ProjectLockedError(TomopipeError):
    """Another process holds the project's write lock (and we did not wait, or waited long enough)."""

    def __init__(self, message: str, holder: dict | None):
        super().__init__(message)
        self.holder = holder


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder).resolve() / LOCK_NAME


def read_holder(folder: str | os.PathLike) -> dict | None:
    """What the holder of the lock wrote about itself (pid, host, command, since_unix_s), or None when
    the file is missing, empty or being written. Tells nothing about whether the lock is held now."""
    try:
        text = lock_path(folder).read_text(encoding="utf-8")
        holder = json.loads(text)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet said who it is"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since_unix_s", 0))))
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}: "
            f"{holder.get('command', '?')!s}")


def describe_os_error(path: str | os.PathLike | None, error: OSError, doing: str) -> str:
    """``PATH: cannot DOING: No space left on device (ENOSPC)``: the path (the error's own when it
    names one), what failed, the system's words and the errno's name."""
    name = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
    where = error.filename if error.filename else path
    return f"{where}: cannot {doing}: {error.strerror or error} ({name})"


def _os_error(path: Path, error: OSError, doing: str) -> TomopipeError:
    return TomopipeError(describe_os_error(path, error, doing))


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _write_holder(fd: int, command: str) -> None:
    """Say who holds the lock (best effort: a full disk must not stop the command from being refused
    or run, and the lock itself does not depend on this text)."""
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since_unix_s": round(time.time(), 3)})
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode("utf-8"))
    except OSError:
        pass


def _default_command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return " ".join(argv)[:500]


def holds_lock(folder: str | os.PathLike) -> bool:
    """Whether this process holds the project's write lock now."""
    with _held_guard:
        return str(Path(folder).resolve()) in _held


@contextmanager
def project_lock(folder: str | os.PathLike, wait_s: float | None = 0.0, command: str | None = None,
                 echo: Callable[[str], None] | None = None, hint: str = "") -> Iterator[None]:
    """Hold the write lock of the project in ``folder`` (created when missing) for the block.

    ``wait_s``: 0 refuses at once when another process holds it (:class:`ProjectLockedError`, naming
    the holder), a number of seconds waits that long, None waits as long as it takes. ``echo`` is told
    once that we wait, and for whom. ``hint`` ends the refusal message (how to wait, for a command)."""
    folder = Path(folder).resolve()
    key = str(folder)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            acquired = True
        else:
            acquired = False
    if not acquired:
        fd = _acquire(folder, wait_s, command, echo, hint)
        with _held_guard:
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        _release(key)


def _acquire(folder: Path, wait_s: float | None, command: str | None, echo, hint: str) -> int:
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise _os_error(path, error, "open the project's lock file") from None
    try:
        deadline = None if wait_s is None else time.monotonic() + max(0.0, float(wait_s))
        told = None
        while not _try_lock(fd):
            holder = read_holder(folder)
            if deadline is not None and time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise ProjectLockedError(
                    f"{folder}: the project is in use by another tomopipe command{waited} "
                    f"({describe_holder(holder)}); one command at a time may write to a project"
                    + (f". {hint}" if hint else ""), holder)
            if echo is not None and holder != told:
                echo(f"waiting for project {folder}: in use by {describe_holder(holder)}")
                told = holder
            time.sleep(POLL_INTERVAL_S)
        _write_holder(fd, command or _default_command())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(key: str) -> None:
    """One level less; the last one out unlocks and closes the file."""
    with _held_guard:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
    try:
        _unlock(entry[0])
    finally:
        os.close(entry[0])
