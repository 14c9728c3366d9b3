"""Atomic file writing: write to a temporary name in the target folder, then ``os.replace``.

A reader never sees a half-written file: either the old file (or none) or the complete new one.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _temporary_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that keeps its suffix (some writers look at it)."""
    token = secrets.token_hex(6)
    return path.with_name(f".{path.stem}.{token}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` atomically.

    The caller writes the complete file to the yielded path. If the block raises, the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write, folder {path.parent} does not exist")
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{path}: the writer produced no file")
        with open(tmp, "rb+") as fh:  # flush the data to disk before the rename
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line endings) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
