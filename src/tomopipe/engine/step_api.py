"""The step API the engine runs: what a step is (typed parameters, named inputs and outputs, and a
``run`` that does the work) and the registry of step types.

A step module declares a subclass of :class:`Step` and decorates it with :func:`register`.
Parameter names are the seed's (the Scipion form labels) in snake case with their unit in the
name (``tilt_axis_angle_deg``, ``pixel_size_A``); values are validated before anything runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tomopipe.errors import TomopipeError

if TYPE_CHECKING:  # pragma: no cover
    from tomopipe.engine.context import RunContext


@dataclass(frozen=True)
class Param:
    """A typed step parameter. ``type`` is one of float, int, bool, str, path (or a list of those
    written as ``list[float]``); ``default=None`` with ``required=False`` means "not set" (for
    example: read it from the mdoc)."""

    name: str
    type: str
    help: str
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    length: int | None = None  # for list types: the number of values

    def validate(self, value: Any, step_name: str) -> Any:
        """Convert and check a value; raise a clear error naming the step and the parameter."""
        where = f"step {step_name!r}, parameter {self.name!r}"
        if value is None:
            if self.required:
                raise TomopipeError(f"{where}: a value is required ({self.help})")
            return None
        if self.type.startswith("list["):
            element = self.type[5:-1]
            if not isinstance(value, (list, tuple)):
                raise TomopipeError(f"{where}: expected a list of {element}, got {value!r}")
            if self.length is not None and len(value) != self.length:
                raise TomopipeError(f"{where}: expected {self.length} values, got {len(value)}")
            converted = [self._convert(item, element, where) for item in value]
            for item in converted:
                self._check_range(item, where)
            return converted
        converted = self._convert(value, self.type, where)
        if self.choices is not None and converted not in self.choices:
            raise TomopipeError(f"{where}: {converted!r} is not one of {', '.join(map(repr, self.choices))}")
        self._check_range(converted, where)
        return converted

    @staticmethod
    def _convert(value: Any, type_name: str, where: str) -> Any:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("yes", "true", "1", "no", "false", "0"):
                return value.lower() in ("yes", "true", "1")
            raise TomopipeError(f"{where}: expected yes/no (true/false), got {value!r}")
        if type_name in ("float", "int"):
            if isinstance(value, bool):
                raise TomopipeError(f"{where}: expected a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TomopipeError(f"{where}: expected a number, got {value!r}") from None
            if type_name == "int":
                if number != int(number):
                    raise TomopipeError(f"{where}: expected a whole number, got {value!r}")
                return int(number)
            return number
        if type_name == "path":
            return str(Path(str(value)).expanduser())
        return str(value)

    def _check_range(self, value: Any, where: str) -> None:
        if self.min is not None and value < self.min:
            raise TomopipeError(f"{where}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise TomopipeError(f"{where}: {value} is above the maximum {self.max}")


def params_from_fields(dataclass_type: type) -> tuple[Param, ...]:
    """One :class:`Param` per field of a dataclass of parameters, in field order: the field's name,
    type (float, int, bool, str), default, and ``help`` (required), ``min``, ``max``, ``choices``
    from its metadata — so that a parameter of an algorithm is declared once."""
    params = []
    for item in fields(dataclass_type):
        type_name = item.type if isinstance(item.type, str) else item.type.__name__
        if type_name not in ("float", "int", "bool", "str") or "help" not in item.metadata:
            raise TypeError(f"{dataclass_type.__name__}.{item.name}: a step parameter needs a float, int, bool or "
                            f"str field with 'help' in its metadata (got {type_name!r}, {dict(item.metadata)!r})")
        params.append(Param(item.name, type_name, item.metadata["help"], default=item.default,
                            choices=item.metadata.get("choices"), min=item.metadata.get("min"),
                            max=item.metadata.get("max")))
    return tuple(params)


@dataclass(frozen=True)
class Port:
    """A named input or output of a step, carrying a set of one kind."""

    name: str
    kind: str
    help: str = ""
    optional: bool = False


class Step:
    """Base class of pipeline steps. Subclasses set the class attributes and implement ``run``."""

    type_name: ClassVar[str]
    title: ClassVar[str]  # the seed's protocol name, e.g. "tomo - import tilt series movies"
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when outputs change for the same parameters
    params: ClassVar[tuple[Param, ...]] = ()
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()

    @classmethod
    def param(cls, name: str) -> Param:
        for param in cls.params:
            if param.name == name:
                return param
        raise KeyError(name)

    @classmethod
    def validate_params(cls, step_name: str, values: dict[str, Any]) -> dict[str, Any]:
        """All parameters with defaults filled in; unknown names are refused with suggestions."""
        known = {param.name for param in cls.params}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
                raise TomopipeError(f"step {step_name!r} ({cls.type_name}): unknown parameter {key!r}{hint}")
        return {
            param.name: param.validate(values.get(param.name, param.default), step_name) for param in cls.params
        }

    @classmethod
    def fingerprint(cls, params: dict[str, Any]) -> Any:
        """What the step reads from outside the project (file names, sizes, times), so that a
        re-run notices new or changed input files. Steps that read only project sets return None."""
        return None

    def run(self, ctx: "RunContext") -> dict | None:  # pragma: no cover - abstract
        """Do the work; write outputs through ``ctx``; return a summary (numbers for the report)."""
        raise NotImplementedError


REGISTRY: dict[str, type[Step]] = {}


def register(step_class: type[Step]) -> type[Step]:
    """Class decorator adding a step type to the registry."""
    if step_class.type_name in REGISTRY:
        raise RuntimeError(f"step type {step_class.type_name!r} registered twice")
    REGISTRY[step_class.type_name] = step_class
    return step_class


def step_class(type_name: str) -> type[Step]:
    import tomopipe.steps  # noqa: F401  (the step modules register themselves when imported)

    if type_name not in REGISTRY:
        close = difflib.get_close_matches(type_name, sorted(REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TomopipeError(f"unknown step type {type_name!r}{hint}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[type_name]


def render_step_help(step: type[Step]) -> str:
    """Text for ``tomopipe steps TYPE``: inputs, parameters with types and defaults, outputs."""
    out = [f"{step.type_name}  —  {step.title}", ""]
    if step.description:
        out += [step.description, ""]
    if step.inputs:
        out.append("inputs:")
        out += [f"  {p.name:32s} {p.kind}{' (optional)' if p.optional else ''}  {p.help}" for p in step.inputs]
    out.append("parameters:")
    for p in step.params:
        default = "required" if p.required else f"default {p.default!r}"
        extra = f" one of {p.choices}" if p.choices else ""
        out.append(f"  {p.name:32s} {p.type:12s} {default}{extra}\n      {p.help}")
    out.append("outputs:")
    out += [f"  {p.name:32s} {p.kind}  {p.help}" for p in step.outputs]
    return "\n".join(out)
