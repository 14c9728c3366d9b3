"""Atomic writes: a failed write leaves the previous file intact and no temporary file."""

from __future__ import annotations

import pytest

from tomopipe.io._atomic import atomic_path, write_text_atomic


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            assert tmp.parent == target.parent and tmp != target
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_successful_write_replaces(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\nlines\n")
    assert target.read_text() == "new\nlines\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_writer_that_produces_nothing_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no file"):
        with atomic_path(tmp_path / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []
