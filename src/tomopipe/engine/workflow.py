"""Workflow files: an ordered list of named steps, each with a type, parameters and inputs.

```toml
[workflow]
name = "apoferritin_tutorial"

[steps.import]                       # the step's name, used by later steps and by --set/--until
type = "import_movies"               # the step type (``tomopipe steps`` lists them)
files_directory = "data/"            # parameters, by the names ``tomopipe steps TYPE`` shows
pattern = "*.mdoc"

[steps.motion]
type = "motion_ctf"
movies = "import.movies"             # an input: STEP.OUTPUT of an earlier step
```

Relative paths in ``path`` parameters are taken relative to the folder the command runs in.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomopipe.engine.step_api import Step, step_class
from tomopipe.errors import InputFileError, TomopipeError


@dataclass(frozen=True)
class InputRef:
    """An input of a step: ``step.output`` of an earlier step."""

    step: str
    output: str


@dataclass
class WorkflowStep:
    name: str
    step: type[Step]
    params: dict[str, Any]
    inputs: dict[str, InputRef]


@dataclass
class Workflow:
    name: str
    path: Path
    steps: list[WorkflowStep]

    def step_names(self) -> list[str]:
        return [step.name for step in self.steps]


def parse_override(text: str) -> tuple[str, str, Any]:
    """``STEP.PARAM=VALUE`` -> (step, param, value); the value is read as TOML (numbers, booleans,
    lists, quoted strings), otherwise kept as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise TomopipeError(f"--set {text!r}: expected STEP.PARAM=VALUE, e.g. import.files_directory=/data/TS")
    key, raw = text.split("=", 1)
    step, param = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return step, param.strip(), value


def load_workflow(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> Workflow:
    """Read, override and validate a workflow file; every error names the file and the problem."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputFileError(path, "workflow file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputFileError(path, f"not a valid TOML workflow file ({error})") from None
    tables = document.get("steps")
    if not isinstance(tables, dict) or not tables:
        raise InputFileError(path, "no [steps.NAME] tables")
    base_dir = Path.cwd() if base_dir is None else base_dir

    raw_steps: dict[str, dict] = {name: dict(table) for name, table in tables.items()}
    for text in overrides:
        step_name, param, value = parse_override(text)
        if step_name not in raw_steps:
            raise TomopipeError(f"--set {text!r}: no step named {step_name!r} in {path} "
                                f"(steps: {', '.join(raw_steps)})")
        raw_steps[step_name][param] = value

    steps: list[WorkflowStep] = []
    outputs_so_far: dict[str, type[Step]] = {}
    for name, table in raw_steps.items():
        if "." in name:
            raise InputFileError(path, f"step name {name!r} must not contain '.'")
        if "type" not in table:
            raise InputFileError(path, f"[steps.{name}] has no 'type'")
        try:
            cls = step_class(table.pop("type"))
        except TomopipeError as error:
            raise InputFileError(path, f"[steps.{name}]: {error}") from None
        input_names = {port.name for port in cls.inputs}
        inputs: dict[str, InputRef] = {}
        params: dict[str, Any] = {}
        for key, value in table.items():
            if key in input_names:
                inputs[key] = _resolve_input(path, name, key, value, outputs_so_far)
            else:
                params[key] = value
        for port in cls.inputs:
            if port.name not in inputs and not port.optional:
                raise InputFileError(path, f"[steps.{name}] needs input {port.name!r} ({port.kind}), "
                                           f"e.g. {port.name} = \"STEP.OUTPUT\"")
            if port.name in inputs:
                producer = outputs_so_far[inputs[port.name].step]
                kind = {p.name: p.kind for p in producer.outputs}[inputs[port.name].output]
                if kind != port.kind:
                    raise InputFileError(path, f"[steps.{name}] input {port.name!r} needs a {port.kind} set, "
                                               f"but {inputs[port.name].step}.{inputs[port.name].output} is {kind}")
        try:
            validated = cls.validate_params(name, params)
        except TomopipeError as error:
            raise InputFileError(path, str(error)) from None
        for param in cls.params:
            if param.type == "path" and validated[param.name] is not None:
                validated[param.name] = str((base_dir / validated[param.name]).resolve())
        steps.append(WorkflowStep(name, cls, validated, inputs))
        outputs_so_far[name] = cls
    workflow_name = document.get("workflow", {}).get("name", path.stem)
    return Workflow(workflow_name, path, steps)


def _resolve_input(path: Path, step_name: str, port: str, value: Any,
                   outputs_so_far: dict[str, type[Step]]) -> InputRef:
    if not isinstance(value, str):
        raise InputFileError(path, f"[steps.{step_name}] input {port!r} must be \"STEP.OUTPUT\", got {value!r}")
    source, _, output = value.partition(".")
    if source not in outputs_so_far:
        raise InputFileError(path, f"[steps.{step_name}] input {port!r} refers to {source!r}, "
                                   f"which is not an earlier step")
    producer = outputs_so_far[source]
    names = [p.name for p in producer.outputs]
    if not output:
        if len(names) != 1:
            raise InputFileError(path, f"[steps.{step_name}] input {port!r}: say which output of {source!r} "
                                       f"({', '.join(names)})")
        output = names[0]
    if output not in names:
        raise InputFileError(path, f"[steps.{step_name}] input {port!r}: {source!r} has no output {output!r} "
                                   f"(outputs: {', '.join(names)})")
    return InputRef(source, output)
