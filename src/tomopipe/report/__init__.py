"""``tomopipe report``: one self-contained HTML file of a project: its runs, per tilt series the motion,
CTF, alignment and tomogram figures, picking, each map-making run's FSC curves, resolution per iteration,
map sections and Guinier plot, every step's parameters, and a methods paragraph with its references.

:mod:`~tomopipe.report.collect` reads the project, :mod:`~tomopipe.report.figures` draws (arrays -> inline
SVG), :mod:`~tomopipe.report.methods` writes the methods, :mod:`~tomopipe.report.html` assembles the page.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tomopipe.errors import TomopipeError

__all__ = ["DEFAULT_REPORT_NAME", "write_report"]

DEFAULT_REPORT_NAME = "report.html"


def write_report(project_folder: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the report of the project in ``project_folder`` to ``out_path`` (default
    ``PROJECT/report.html``) and return its path. The file is written under a temporary name in the same
    folder and renamed into place, so a reader never sees half a report. Raises :class:`TomopipeError`
    for a folder that holds no project or an ``out_path`` that cannot be written."""
    from tomopipe import __version__
    from tomopipe.project.store import Project
    from tomopipe.report.collect import collect
    from tomopipe.report.html import render

    out = Path(project_folder) / DEFAULT_REPORT_NAME if out_path is None else Path(out_path)
    with Project.open(project_folder) as project:
        if out.is_dir():
            raise TomopipeError(f"{out}: is a folder; give the report's file name (e.g. {out / DEFAULT_REPORT_NAME})")
        if not out.parent.is_dir():
            raise TomopipeError(f"{out}: cannot write the report there: the folder {out.parent} does not exist")
        page = render(collect(project), __version__)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as error:
        raise TomopipeError(f"{out}: cannot write the report there ({error.strerror})") from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise TomopipeError(f"{out}: cannot write the report ({error.strerror})") from error
    return out.resolve()
