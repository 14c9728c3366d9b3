"""The house as drawn in docs/architecture.md: which layer may import which.

- algorithms import nothing above them (only algorithms and errors);
- io imports only io, model, algorithms (the tensor records it returns, e.g. AtomicModel) and
  errors; model only model, algorithms and errors; project only project and errors;
- a step never imports another step (only ``steps.base`` and the tilt-series plumbing
  ``steps._tilt_series``), and of the engine only the step API and the run context;
- nothing imports ``simulate`` or ``validate`` but the demo, the CLI, the report (the FSC against the
  truth, when the data are a twin's), themselves (and tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tomopipe"

ALLOWED_LAYERS = {
    "algorithms": {"algorithms", "errors"},
    "io": {"io", "model", "algorithms", "errors"},
    "model": {"model", "algorithms", "errors"},
    "project": {"project", "errors"},
}
STEP_MODULES_ALLOWED = {"tomopipe.steps.base", "tomopipe.steps._tilt_series"}
ENGINE_MODULES_FOR_STEPS = {"tomopipe.engine.step_api", "tomopipe.engine.context"}
TWIN_LAYERS = {"simulate", "validate"}
TWIN_IMPORTERS = {"demo", "cli", "simulate", "validate", "report"}  # report: the FSC against a twin's truth


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every tomopipe module ``path`` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tomopipe"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tomopipe"))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges() -> list[tuple[str, str]]:
    return [(_module_name(path), target) for path in sorted(SRC.rglob("*.py")) for target in sorted(_imports(path))]


def broken_rules(edges: list[tuple[str, str]]) -> list[str]:
    broken = []
    for source, target in edges:
        layer, target_layer = _layer(source), _layer(target)
        if layer in ALLOWED_LAYERS and target_layer not in ALLOWED_LAYERS[layer]:
            broken.append(f"{source} imports {target} ({layer} may import only {sorted(ALLOWED_LAYERS[layer])})")
        if layer == "steps" and source != "tomopipe.steps" and target_layer == "steps" \
                and target not in STEP_MODULES_ALLOWED:
            broken.append(f"{source} imports the step {target} (steps never import steps)")
        if layer == "steps" and target_layer == "engine" and target not in ENGINE_MODULES_FOR_STEPS:
            broken.append(f"{source} imports {target} (steps use only {sorted(ENGINE_MODULES_FOR_STEPS)})")
        if target_layer in TWIN_LAYERS and layer not in TWIN_IMPORTERS:
            broken.append(f"{source} imports {target} (only {sorted(TWIN_IMPORTERS)} may)")
    return broken


def test_the_package_keeps_the_import_rules():
    edges = _edges()
    assert len(edges) > 100  # the scan sees the package
    broken = broken_rules(edges)
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("edge", [
    ("tomopipe.algorithms.align", "tomopipe.io.mrc"),
    ("tomopipe.io.mdoc", "tomopipe.steps.base"),
    ("tomopipe.steps.align", "tomopipe.steps.xray_eraser"),
    ("tomopipe.steps.align", "tomopipe.engine.runner"),
    ("tomopipe.export.relion5", "tomopipe.validate.truth"),
    ("tomopipe.steps.reconstruct", "tomopipe.simulate.projector"),
])
def test_each_rule_catches_its_breach(edge):
    assert len(broken_rules([edge])) == 1
    assert broken_rules([("tomopipe.steps.align", "tomopipe.steps._tilt_series")]) == []
