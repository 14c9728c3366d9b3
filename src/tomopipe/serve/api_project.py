"""The project page's API: runs as a graph (provenance edges), a run's details and log, the step
types with their parameter schemas (for generated forms), and writes that launch runs (a form,
a re-run) through the job queue."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tomopipe.engine.executors import LocalExecutor
from tomopipe.engine.runner import run_on_sets
from tomopipe.engine.step_api import REGISTRY, Param, Step, step_class
from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project, RunRecord

from .common import ApiError, int_query, json_body, json_response, open_project, run_name

UNITS = (("_e_per_A2", "e⁻/Å²"), ("_A2", "Å²"), ("_A", "Å"), ("_deg", "°"), ("_px", "px"), ("_kV", "kV"),
         ("_mm", "mm"), ("_um", "µm"), ("_s", "s"), ("_percent", "%"))
LOG_TAIL_BYTES = 20_000


def unit_of(name: str) -> str:
    """The unit a parameter's name carries (``pixel_size_A`` -> ``Å``), or ``""``."""
    return next((unit for suffix, unit in UNITS if name.endswith(suffix)), "")


def run_json(project: Project, run: RunRecord) -> dict:
    outputs = [{"set_id": s.id, "name": name, "kind": s.kind, "n_items": s.n_items}
               for name, s in project.sets_of_run(run.id).items()]
    inputs = []
    for role, port, set_id in project.provenance(run.id):
        if role == "input":
            record = project.get_set(set_id, include_unfinished=True)
            inputs.append({"port": port, "set_id": set_id, "kind": record.kind, "run_id": record.run_id})
    elapsed = run.elapsed_s if run.elapsed_s is not None else (
        time.time() - run.started_at if run.status == "running" and run.started_at else None)
    return {"id": run.id, "name": run.name, "step_type": run.step_type, "status": run.status,
            "workflow": run.workflow, "elapsed_s": elapsed, "error": run.error, "summary": run.summary,
            "inputs": inputs, "outputs": outputs, "started_at": run.started_at}


def project_overview(request: Request):
    """Runs (with inputs and outputs), the provenance edges between them, and the queued jobs."""
    with open_project(request) as project:
        runs = [run_json(project, run) for run in project.runs()]
    edges = sorted({(item["run_id"], run["id"]) for run in runs for item in run["inputs"]})
    jobs = [job.to_json() for job in request.app.state.jobs.jobs()]
    return json_response({"project": str(request.app.state.project_folder.name), "runs": runs,
                          "edges": [list(edge) for edge in edges], "jobs": jobs})


def run_detail(request: Request):
    with open_project(request) as project:
        run = _get_run(project, request.path_params["run_id"])
        document = run_json(project, run)
        document["params"] = run.params
    return json_response(document)


def run_log(request: Request):
    """The end of a run's log (``tail_bytes``, default 20 kB), as text."""
    tail = int_query(request, "tail_bytes", LOG_TAIL_BYTES, 1, 10_000_000)
    with open_project(request) as project:
        run = _get_run(project, request.path_params["run_id"])
        path = project.absolute_path(run.log_path)
    if not path.is_file():
        return PlainTextResponse("")
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - tail))
        return PlainTextResponse(handle.read().decode("utf-8", errors="replace"))


def _get_run(project: Project, run_id: int) -> RunRecord:
    try:
        return project.get_run(run_id)
    except TomopipeError:
        raise ApiError(f"no run with id {run_id}", 404) from None


def param_json(param: Param) -> dict:
    return {"name": param.name, "type": param.type, "help": param.help, "default": param.default,
            "required": param.required, "choices": list(param.choices) if param.choices else None,
            "min": param.min, "max": param.max, "length": param.length, "unit": unit_of(param.name)}


def list_steps(request: Request):
    step_class("import_movies")  # loads the registry
    return json_response({"steps": [{"type": name, "title": cls.title} for name, cls in sorted(REGISTRY.items())
                                    if not name.startswith("test_")]})


def step_schema(request: Request):
    """A step type's form: parameters (type, unit, default, help, limits) and inputs with the
    finished sets that fit each (newest first)."""
    cls = _step(request.path_params["step_type"])
    with open_project(request) as project:
        inputs = []
        for port in cls.inputs:
            candidates = [{"set_id": s.id, "label": f"set {s.id}: {s.name} of run {s.run_id} "
                                                    f"({project.get_run(s.run_id).name}), {s.n_items} items"}
                          for s in reversed(project.finished_sets(port.kind))]
            inputs.append({"name": port.name, "kind": port.kind, "help": port.help, "optional": port.optional,
                           "candidates": candidates})
    return json_response({"type": cls.type_name, "title": cls.title, "description": cls.description,
                          "params": [param_json(p) for p in cls.params], "inputs": inputs,
                          "outputs": [{"name": p.name, "kind": p.kind, "help": p.help} for p in cls.outputs]})


def _step(type_name: str) -> type[Step]:
    try:
        return step_class(type_name)
    except TomopipeError as error:
        raise ApiError(str(error), 404) from None


def form_values(cls: type[Step], name: str, raw: dict) -> tuple[dict, dict[str, str]]:
    """Form fields (strings, numbers, booleans; ``""`` or None: the default) to parameter values,
    and the error of each field that does not validate (``{param: message}``)."""
    values, errors = {}, {}
    known = {p.name: p for p in cls.params}
    for key in raw:
        if key not in known:
            errors[key] = f"unknown parameter {key!r} of {cls.type_name}"
    for param in cls.params:
        value = raw.get(param.name)
        if isinstance(value, str) and value.strip() == "":
            value = None
        if value is None:
            value = param.default
        if isinstance(value, str) and param.type.startswith("list["):
            value = [v.strip() for v in value.split(",") if v.strip()]
        try:
            values[param.name] = param.validate(value, name)
        except TomopipeError as error:
            errors[param.name] = str(error)
    return values, errors


async def launch_run(request: Request):
    """Queue a run of a step on finished sets: ``{"step_type", "name", "params": {...},
    "inputs": {port: set_id}}``. Invalid fields answer 422 with ``errors`` per field."""
    body = await json_body(request)
    cls = _step(str(body.get("step_type", "")))
    name = run_name(body.get("name"), cls.type_name)
    raw_params = body.get("params") or {}
    raw_inputs = body.get("inputs") or {}
    if not isinstance(raw_params, dict) or not isinstance(raw_inputs, dict):
        raise ApiError("'params' and 'inputs' must be JSON objects")
    values, errors = form_values(cls, name, raw_params)
    inputs = {}
    with open_project(request) as project:
        ports = {port.name: port for port in cls.inputs}
        for port_name, set_id in raw_inputs.items():
            if port_name not in ports:
                errors[port_name] = f"{cls.type_name} has no input {port_name!r}"
                continue
            if set_id in (None, ""):
                continue
            try:
                record = project.get_set(int(set_id))
            except (TomopipeError, ValueError, TypeError):
                errors[port_name] = f"no finished set {set_id!r}"
                continue
            if record.kind != ports[port_name].kind:
                errors[port_name] = f"set {record.id} is {record.kind}, the input needs {ports[port_name].kind}"
            inputs[port_name] = record.id
        for port in cls.inputs:
            if not port.optional and port.name not in inputs and port.name not in errors:
                errors[port.name] = f"choose a {port.kind} set"
    if errors:
        raise ApiError(f"the form of {cls.type_name} has {len(errors)} error(s)", 422, {"errors": errors})
    return _queue_run(request, cls, name, values, inputs)


def _queue_run(request: Request, cls: type[Step], name: str, values: dict, inputs: dict[str, int]):
    def job(project: Project):
        sets = {port: project.get_set(set_id) for port, set_id in inputs.items()}
        return run_on_sets(project, cls, name, values, sets, LocalExecutor(1))

    queued = request.app.state.jobs.submit(f"{name} ({cls.type_name})", cls.type_name, job)
    return json_response({"job": queued.to_json()}, status=202)


async def rerun(request: Request):
    """Queue a new run with the same step, parameters and input sets as run ``run_id`` (re-run a
    finished run, or continue after a failed or killed one)."""
    with open_project(request) as project:
        run = _get_run(project, request.path_params["run_id"])
        inputs = {role_port: set_id for role, role_port, set_id in project.provenance(run.id) if role == "input"}
    cls = _step(run.step_type)
    values, errors = form_values(cls, run.name, run.params)
    if errors:
        raise ApiError(f"run {run.id}'s parameters no longer validate", 409, {"errors": errors})
    return _queue_run(request, cls, run.name, values, inputs)


def job_detail(request: Request):
    try:
        job = request.app.state.jobs.get(request.path_params["job_id"])
    except TomopipeError:
        raise ApiError(f"no job {request.path_params['job_id']}", 404) from None
    return json_response(job.to_json())


ROUTES = [
    Route("/api/project", project_overview),
    Route("/api/runs/{run_id:int}", run_detail),
    Route("/api/runs/{run_id:int}/log", run_log),
    Route("/api/runs/{run_id:int}/rerun", rerun, methods=["POST"]),
    Route("/api/runs", launch_run, methods=["POST"]),
    Route("/api/steps", list_steps),
    Route("/api/steps/{step_type:str}", step_schema),
    Route("/api/jobs/{job_id:int}", job_detail),
]
