"""Shared output of the benchmark scripts: a printed table and a JSON file in benchmarks/results/."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, rows: list[dict], notes: str = "") -> Path:
    """Print ``rows`` as an aligned table and write them (with machine info) to results/NAME.json."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    if notes:
        print(notes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
                "processor": platform.processor(), "rows": rows, "notes": notes}
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"wrote {path}")
    return path


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
