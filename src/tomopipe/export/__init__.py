"""Export what a project holds in another tool's own layout (RELION 5, IMOD).

Each exporter takes the newest finished set of every kind it knows and writes what exists;
items whose ``enabled`` flag is off are left out the way the tool expects (RELION: the rows are
not written; IMOD: the views stay in the stack and are named in the exclude list).
"""

from __future__ import annotations

from pathlib import Path

from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project, SetRecord


def lineage(project: Project, record: SetRecord) -> dict[str, SetRecord]:
    """The sets a set belongs with, one per kind, nearest first: the outputs of its own run,
    then those of the runs that produced its inputs, and so on up the provenance."""
    found: dict[str, SetRecord] = {}
    queue, seen = [record.run_id], set()
    while queue:
        run_id = queue.pop(0)
        if run_id in seen:
            continue
        seen.add(run_id)
        for role, _, set_id in project.provenance(run_id):
            related = project.get_set(set_id, include_unfinished=True)
            if role == "output":
                found.setdefault(related.kind, related)
            else:
                queue.append(related.run_id)
    return found


def sets_to_export(project: Project) -> dict[str, SetRecord]:
    """The newest finished set and its lineage (so that all exported data belong together)."""
    finished = project.finished_sets()
    return lineage(project, finished[-1]) if finished else {}


def export_project(project: Project, fmt: str, out: str | Path) -> list[Path]:
    from tomopipe.export import imod, relion5

    exporters = {"relion5": relion5.export, "imod": imod.export}
    if fmt not in exporters:
        raise TomopipeError(f"unknown export format {fmt!r} (known: {', '.join(exporters)})")
    sets = sets_to_export(project)
    if not sets:
        raise TomopipeError(f"{project.folder}: nothing to export yet (no finished run has outputs)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return exporters[fmt](project, sets, out)
