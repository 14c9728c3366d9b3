"""Edits a user makes by hand, shared by the command line (``tomopipe exclude``, ``tomopipe picks``)
and the browser UI (``tomopipe serve``): each is a new run whose output sets are subsets or edits
of earlier ones; nothing is deleted and no set is changed in place.

Views are numbered from 1 (as IMOD and the viewers show them); pick positions are Å from the
tomogram centre (``units = "A"``) or 0-based voxels (``units = "px"``).
"""

from __future__ import annotations

from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import StepOutcome, run_on_outputs, run_on_sets
from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project, SetRecord


def exclude_tilts(project: Project, source_run: str | int, tilts: str, name: str = "exclude",
                  verbose: bool = False) -> tuple[StepOutcome, dict[str, SetRecord]]:
    """Run ``exclude_views`` on the tilt series and CTFs of a finished run, flagging ``tilts``
    (``"TS_01:3,5-7;TS_02:1"``, 1-based views). Returns the outcome and the input sets."""
    from tomopipe.steps.exclude import ExcludeViews

    return run_on_outputs(project, source_run, ExcludeViews, name, {"exclude_tilts": tilts}, LocalExecutor(1),
                          verbose=verbose)


def picks_sets(project: Project, run_key: str | int, need_particles: bool) -> dict[str, SetRecord]:
    """``{"tomograms": set, "particles": set}`` of a finished run: its own outputs first, then
    those of the runs it came from."""
    from tomopipe.export import lineage

    run = project.find_run(str(run_key))
    outputs = list(project.sets_of_run(run.id).values())
    if run.status != "finished" or not outputs:
        raise TomopipeError(f"run {run.id} ({run.name}) is {run.status} and has {len(outputs)} output(s): "
                            f"picks need a finished run")
    related = lineage(project, outputs[0])
    sets = {kind: related[kind] for kind in ("tomograms", "particles") if kind in related}
    wanted = ("tomograms", "particles") if need_particles else ("tomograms",)
    missing = [kind for kind in wanted if kind not in sets]
    if missing:
        raise TomopipeError(f"run {run.id} ({run.name}) has no {' or '.join(missing)} (nor do the runs it came from)")
    return sets


def edit_picks(project: Project, run_key: str | int, values: dict, name: str = "picks",
               verbose: bool = False) -> StepOutcome:
    """Run ``edit_picks`` with ``values`` (its parameters: ``add``, ``remove_near``, ``radius_A``,
    ``remove_index``, ``units``) on the picks and tomograms of a finished run (or its lineage).
    Bad input is refused before a run is recorded."""
    from tomopipe.steps.picks import EditPicks, edit_particles

    removing = bool(values.get("remove_near") or values.get("remove_index"))
    sets = picks_sets(project, run_key, need_particles=removing)
    particles = project.read_items(sets["particles"].id) if "particles" in sets else None
    edit_particles(particles, project.read_items(sets["tomograms"].id),
                   EditPicks.validate_params(name, values))  # refuse bad input before a run is recorded
    inputs = {port.name: sets[port.kind] for port in EditPicks.inputs if port.kind in sets}
    return run_on_sets(project, EditPicks, name, values, inputs, LocalExecutor(1), verbose=verbose)
