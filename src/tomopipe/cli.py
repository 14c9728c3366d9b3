"""The ``tomopipe`` command: one entry point, one subcommand per job, ``--help`` everywhere."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tomopipe import __version__
from tomopipe.errors import TomopipeError

log = logging.getLogger("tomopipe")


def _add_project_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", "-p", default=".", type=Path,
                        help="project folder (default: the current folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomopipe",
        description="Cryo-ET from tilt-series movies to subtomogram averages, in one package.",
    )
    parser.add_argument("--version", action="version", version=f"tomopipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages on the terminal and in logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    project = commands.add_parser("project", help="create a project")
    project_commands = project.add_subparsers(dest="project_command", required=True, metavar="ACTION")
    init = project_commands.add_parser("init", help="create a project folder with its database")
    init.add_argument("folder", type=Path)

    run = commands.add_parser("run", help="run a workflow file (resumes: finished, unchanged steps are skipped)")
    run.add_argument("workflow", type=Path, help="workflow TOML file, e.g. workflows/apoferritin_tutorial.toml")
    _add_project_argument(run)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP.PARAM=VALUE",
                     help="override a parameter of the file (repeatable), e.g. import.files_directory=/data/TS")
    run.add_argument("--until", metavar="STEP", help="stop after this step")
    run.add_argument("--jobs", "-j", type=int, default=1, help="local worker processes (work is split per tilt series)")
    run.add_argument("--dask", metavar="SCHEDULER", help="run tasks on Dask: a scheduler address, or 'local'")
    _add_wait_argument(run)

    status = commands.add_parser("status", help="list the runs of a project")
    _add_project_argument(status)

    show = commands.add_parser("show", help="show one run: parameters, inputs, outputs, log")
    show.add_argument("run", help="run id or step name (the newest run of that name)")
    _add_project_argument(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")

    exclude = commands.add_parser("exclude", help="exclude tilts by hand: a new run whose subsets flag them")
    exclude.add_argument("--run", required=True, help="run (id or step name) whose tilt series / CTFs to subset")
    exclude.add_argument("--tilts", required=True, action="append", metavar="TS:VIEWS",
                         help="tilt series and 1-based views, e.g. TS_01:3,5-7 (repeatable, or joined with ';')")
    exclude.add_argument("--name", default="exclude", help="name of the new run (default: exclude)")
    _add_project_argument(exclude)

    _add_picks_parser(commands)

    export = commands.add_parser("export", help="write the project's data in another tool's layout")
    export.add_argument("format", choices=["relion5", "imod"])
    _add_project_argument(export)
    export.add_argument("--out", required=True, type=Path, help="output folder")

    report = commands.add_parser("report", help="write a self-contained HTML report of a project (figures, "
                                                "parameters, methods)")
    _add_project_argument(report)
    report.add_argument("--out", type=Path, help="HTML file to write (default: PROJECT/report.html)")

    inspect = commands.add_parser("inspect", help="print what tomopipe reads from a file "
                                                  "(mdoc, MRC, STAR, IMOD, Warp XML, movie)")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON (keys carry their units)")

    steps = commands.add_parser("steps", help="list step types, or show one step's parameters")
    steps.add_argument("type", nargs="?", help="a step type, e.g. import_movies")

    from tomopipe.simulate.command import add_arguments as add_simulate_arguments

    simulate = commands.add_parser("simulate", help="simulate a tilt-series acquisition (movies + mdoc + truth)")
    add_simulate_arguments(simulate)

    demo = commands.add_parser("demo", help="simulate the small apoferritin data set and run the tutorial workflow")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the data and the project")
    demo.add_argument("--preset", default="small", help="simulation preset (small; tiny for a quick look)")
    demo.add_argument("--seed", type=int, default=4,
                      help="random seed of the simulation (default 4: its mdoc tilt axis is 1.8° off the truth, "
                           "as a SerialEM calibration can be)")
    demo.add_argument("--jobs", "-j", type=int, default=1)
    demo.add_argument("--until", metavar="STEP", help="stop after this step of the tutorial workflow")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP.PARAM=VALUE",
                      help="override a parameter of the tutorial workflow (repeatable)")
    demo.add_argument("--simulate-device", default="cpu", metavar="DEVICE",
                      help="device of the simulation: cpu (default) or cuda[:N] (the steps pick theirs: device = auto)")
    _add_wait_argument(demo)

    serve = commands.add_parser("serve", help="browse the project in a web browser: workflow, run forms, viewers")
    _add_project_argument(serve)
    serve.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; any other address needs the printed token)")
    return parser


def _add_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", nargs="?", type=float, const=float("inf"), metavar="SECONDS",
                        help="when another tomopipe command is writing to the project, wait for it (for at most "
                             "SECONDS; without a number, as long as it takes) instead of refusing at once")


#: the end of the refusal of ``run`` and ``demo`` when another command holds the project
_WAIT_HINT = "Wait for it to end, or add --wait [SECONDS] to wait for it"


def _wait_s(args) -> float | None:
    """The lock's ``wait_s`` from ``--wait``: 0 (refuse at once), seconds, or None (as long as it takes)."""
    if args.wait is None:
        return 0.0
    return None if args.wait == float("inf") else max(0.0, args.wait)


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_picks_parser(commands) -> None:
    from tomopipe.io.picks import FORMATS, UNITS

    picks = commands.add_parser("picks", help="add, remove, import and export particle picks (each edit is a new run)")
    actions = picks.add_subparsers(dest="picks_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add picks by hand: a new run with a new particle set")
    add.add_argument("--xyz", required=True, action="append", metavar="X,Y,Z",
                     help="a point (repeatable; a negative X as --xyz=-1,2,3)")
    remove = actions.add_parser("remove", help="remove picks: a new run whose set flags them as excluded")
    remove.add_argument("--near", action="append", default=[], metavar="X,Y,Z",
                        help="remove the nearest pick to this point (repeatable; a negative X as --near=-1,2,3)")
    remove.add_argument("--radius-A", type=float, default=30.0, help="how far a removed pick may be (default 30 Å)")
    remove.add_argument("--index", action="append", default=[], metavar="N",
                        help="remove the pick at this 0-based item number of the set (repeatable or N,M)")
    for action in (add, remove):
        action.add_argument("--run", required=True, help="run (id or name) holding the picks, or the tomograms")
        action.add_argument("--ts", required=True, help="tilt series (tomogram) of the points")
        action.add_argument("--units", choices=UNITS, default="A",
                            help="A: Å from the tomogram centre (default); px: 0-based voxels")
    imported = actions.add_parser("import", help="import picks from a file or folder: a new run")
    imported.add_argument("file", type=Path, help="particles.star, .mod (or a folder of them), copick JSON "
                                                  "(or overlay folder), or text")
    imported.add_argument("--tomograms", required=True, help="run (id or name) whose tomograms the picks are on")
    imported.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    imported.add_argument("--ts-id", default="", help="tomogram of a single IMOD model (default: its file name)")
    imported.add_argument("--units", choices=UNITS, default="A", help="units of a text file without a header")
    imported.add_argument("--coordinate-pixel-size-A", type=float,
                          help="pixel size of RELION 4 rlnCoordinateX/Y/Z (default: from the optics table)")
    exported = actions.add_parser("export", help="write a run's enabled picks in another program's format")
    exported.add_argument("--run", required=True, help="run (id or name) holding the picks")
    exported.add_argument("--format", required=True, choices=list(FORMATS))
    exported.add_argument("--out", required=True, type=Path, help="file (relion5, text) or folder (imod, copick)")
    exported.add_argument("--min-score", type=float, help="keep picks scoring at least this")
    exported.add_argument("--max-number", type=int, help="keep at most this many, the best scoring")
    exported.add_argument("--units", choices=UNITS, default="A", help="text format: A or px")
    for action in (add, remove, imported):
        action.add_argument("--name", default="picks", help="name of the new run (default: picks)")
    for action in (add, remove, imported, exported):
        _add_project_argument(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    log.addHandler(handler)
    try:
        return COMMANDS[args.command](args)
    except TomopipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)


def cmd_project(args) -> int:
    from tomopipe.project.store import Project

    with Project.init(args.folder) as project:
        print(f"created project {project.folder}")
    return 0


def cmd_run(args) -> int:
    from tomopipe.engine.executors import make_executor
    from tomopipe.engine.runner import run_workflow
    from tomopipe.engine.workflow import load_workflow
    from tomopipe.project.lock import project_lock
    from tomopipe.project.store import Project

    workflow = load_workflow(args.workflow, args.overrides)
    with project_lock(args.project, wait_s=_wait_s(args), echo=_print_to_stderr, hint=_WAIT_HINT):
        executor = make_executor(args.jobs, args.dask)
        try:
            with Project.open_or_init(args.project) as project:
                print(f"project {project.folder} · workflow {workflow.name} · {executor.describe()}")
                report = run_workflow(project, workflow, executor, until=args.until, verbose=args.verbose)
        finally:
            executor.close()
    return 0 if report.ok else 1


def cmd_status(args) -> int:
    from tomopipe.project.store import Project

    with Project.open(args.project) as project:
        runs = project.runs()
        if not runs:
            print("no runs yet")
            return 0
        print(f"{'id':>4}  {'name':20s} {'type':20s} {'status':9s} {'time':>8s}  outputs")
        for run in runs:
            outputs = ", ".join(f"{name}({record.n_items})" for name, record in project.sets_of_run(run.id).items())
            elapsed = f"{run.elapsed_s:.1f}s" if run.elapsed_s is not None else "-"
            print(f"{run.id:>4}  {run.name:20s} {run.step_type:20s} {run.status:9s} {elapsed:>8s}  {outputs}")
    return 0


def cmd_show(args) -> int:
    from tomopipe.project.store import Project

    with Project.open(args.project) as project:
        run = project.find_run(args.run)
        outputs = {name: {"set_id": s.id, "kind": s.kind, "items": s.n_items}
                   for name, s in project.sets_of_run(run.id).items()}
        inputs = {port: set_id for role, port, set_id in project.provenance(run.id) if role == "input"}
        document = {
            "id": run.id, "name": run.name, "step_type": run.step_type, "status": run.status,
            "workflow": run.workflow, "params": run.params, "inputs": inputs, "outputs": outputs,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at)) if run.started_at else None,
            "elapsed_s": run.elapsed_s, "error": run.error, "summary": run.summary,
            "folder": str(project.absolute_path(run.folder)), "log": str(project.absolute_path(run.log_path)),
        }
        if args.json:
            print(json.dumps(document, indent=2, default=str))
        else:
            for key, value in document.items():
                if isinstance(value, dict):
                    print(f"{key}:")
                    for sub_key, sub_value in value.items():
                        print(f"  {sub_key} = {sub_value}")
                else:
                    print(f"{key}: {value}")
    return 0


def cmd_exclude(args) -> int:
    from tomopipe.edits import exclude_tilts
    from tomopipe.project.store import Project

    with Project.open(args.project) as project:
        outcome, input_sets = exclude_tilts(project, args.run, ";".join(args.tilts), args.name, verbose=args.verbose)
    if outcome.status != "finished":
        print(f"error: {outcome.message}", file=sys.stderr)
        return 1
    print(f"run {outcome.run.id} ({args.name}): {outcome.summary['excluded_now']} tilt(s) newly excluded; "
          f"outputs {', '.join(input_sets)}")
    return 0


def _picks_sets(project, run_key: str, need_particles: bool) -> dict:
    """``{"tomograms": set, "particles": set}`` of a finished run: its own outputs first, then
    those of the runs it came from (:func:`tomopipe.edits.picks_sets`)."""
    from tomopipe.edits import picks_sets

    return picks_sets(project, run_key, need_particles)


def _edit_values(args) -> dict:
    points = args.xyz if args.picks_command == "add" else args.near
    values = {"units": args.units, ("add" if args.picks_command == "add" else "remove_near"):
              ";".join(f"{args.ts}:{point}" for point in points)}
    if args.picks_command == "remove":
        if not args.near and not args.index:
            raise TomopipeError("picks remove: give --near X,Y,Z or --index N")
        values.update(radius_A=args.radius_A, remove_index=",".join(args.index))
    return values


def cmd_picks(args) -> int:
    from tomopipe.engine.executors import LocalExecutor
    from tomopipe.engine.runner import run_on_sets
    from tomopipe.io.picks import PicksOptions, read_picks, write_picks
    from tomopipe.model.particles import best_particles
    from tomopipe.project.store import Project
    from tomopipe.steps.picks import ImportPicks, import_options

    with Project.open(args.project) as project:
        if args.picks_command == "export":
            sets = _picks_sets(project, args.run, need_particles=True)
            particles = best_particles(project.read_items(sets["particles"].id, enabled_only=True),
                                       args.min_score, args.max_number)
            written = write_picks(args.out, particles, project.read_items(sets["tomograms"].id), args.format,
                                  PicksOptions(units=args.units))
            print(f"{len(particles)} pick(s) written: {', '.join(map(str, written)) or 'no file'}")
            return 0
        if args.picks_command == "import":
            sets = {"tomograms": _picks_sets(project, args.tomograms, need_particles=False)["tomograms"]}
            step, values = ImportPicks, {"path": str(args.file.resolve()), "format": args.format, "ts_id": args.ts_id,
                                         "units": args.units, "coordinate_pixel_size_A": args.coordinate_pixel_size_A}
            params = step.validate_params(args.name, values)
            read_picks(params["path"], project.read_items(sets["tomograms"].id), params["format"],
                       import_options(params))  # refuse bad input before a run is recorded
        else:
            from tomopipe.edits import edit_picks

            outcome = edit_picks(project, args.run, _edit_values(args), args.name, verbose=args.verbose)
        if args.picks_command == "import":
            inputs = {port.name: sets[port.kind] for port in step.inputs if port.kind in sets}
            outcome = run_on_sets(project, step, args.name, values, inputs, LocalExecutor(1), verbose=args.verbose)
    if outcome.status != "finished":
        print(f"error: {outcome.message}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{key} {value}" for key, value in outcome.summary.items() if key != "seconds")
    print(f"run {outcome.run.id} ({args.name}): {counts}")
    return 0


def cmd_report(args) -> int:
    from tomopipe.report import write_report

    print(f"report: {write_report(args.project, args.out)}")
    return 0


def cmd_export(args) -> int:
    from tomopipe.export import export_project
    from tomopipe.project.store import Project

    with Project.open(args.project) as project:
        written = export_project(project, args.format, args.out)
    for path in written:
        print(path)
    return 0


def cmd_inspect(args) -> int:
    from tomopipe.io.inspect import format_inspect, inspect_file

    summary = inspect_file(args.file)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_inspect(summary))
    return 0


def cmd_steps(args) -> int:
    from tomopipe.engine.step_api import REGISTRY, render_step_help, step_class

    if args.type:
        print(render_step_help(step_class(args.type)))
        return 0
    step_class("import_movies")  # loads the registry
    for name, cls in REGISTRY.items():
        print(f"{name:24s} {cls.title}")
    return 0


def cmd_simulate(args) -> int:
    from tomopipe.simulate.command import run_from_args

    return run_from_args(args)


def cmd_demo(args) -> int:
    from tomopipe.demo import run_demo

    return run_demo(args.out, preset=args.preset, seed=args.seed, jobs=args.jobs, until=args.until,
                    simulate_device=args.simulate_device,
                    overrides=args.overrides, wait_s=_wait_s(args), echo=_print_to_stderr, hint=_WAIT_HINT)



def cmd_serve(args) -> int:
    from tomopipe.serve.server import serve

    return serve(args.project, host=args.host, port=args.port)


COMMANDS = {
    "project": cmd_project,
    "run": cmd_run,
    "status": cmd_status,
    "show": cmd_show,
    "exclude": cmd_exclude,
    "picks": cmd_picks,
    "export": cmd_export,
    "report": cmd_report,
    "inspect": cmd_inspect,
    "steps": cmd_steps,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "serve": cmd_serve,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
