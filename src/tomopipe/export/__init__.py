"""Export what a project holds in another tool's own layout (RELION 5, IMOD).

Each exporter takes the newest finished set of every kind it knows and writes what exists;
items whose ``enabled`` flag is off are left out the way the tool expects (RELION: the rows are
not written; IMOD: the views stay in the stack and are named in the exclude list).
"""

from __future__ import annotations

from pathlib import Path

from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project, SetRecord


def newest_sets(project: Project) -> dict[str, SetRecord]:
    """The newest finished set of each kind."""
    newest: dict[str, SetRecord] = {}
    for record in project.finished_sets():
        newest[record.kind] = record
    return newest


def export_project(project: Project, fmt: str, out: str | Path) -> list[Path]:
    from tomopipe.export import imod, relion5

    exporters = {"relion5": relion5.export, "imod": imod.export}
    if fmt not in exporters:
        raise TomopipeError(f"unknown export format {fmt!r} (known: {', '.join(exporters)})")
    sets = newest_sets(project)
    if not sets:
        raise TomopipeError(f"{project.folder}: nothing to export yet (no finished run has outputs)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return exporters[fmt](project, sets, out)
