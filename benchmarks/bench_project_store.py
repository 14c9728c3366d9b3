"""Write and read back a set of 1,000,000 particles in a project (the store's hot path)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402


def particles(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "ts_id": np.array([f"TS_{i:03d}" for i in rng.integers(0, 300, n)], dtype=object),
        "x_A": rng.uniform(-5000, 5000, n), "y_A": rng.uniform(-5000, 5000, n), "z_A": rng.uniform(-800, 800, n),
        "rot_deg": rng.uniform(-180, 180, n), "tilt_deg": rng.uniform(0, 180, n), "psi_deg": rng.uniform(-180, 180, n),
        "score": rng.normal(size=n), "half_set": rng.integers(1, 3, n), "enabled": rng.random(n) > 0.05,
    })


def main() -> None:
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        items = particles(n)
        with tempfile.TemporaryDirectory() as folder:
            project = Project.init(folder)
            run = project.create_run("bench", "bench", {}, {}, "sig")
            start = time.perf_counter()
            record = project.add_set(run.id, "particles", "particles", items)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            back = project.read_items(record.id)
            read_s = time.perf_counter() - start
            start = time.perf_counter()
            enabled = project.read_items(record.id, enabled_only=True)
            read_enabled_s = time.perf_counter() - start
            assert back.equals(items.astype(back.dtypes.to_dict())) and len(enabled) == int(items["enabled"].sum())
            size_MB = sum(p.stat().st_size for p in Path(folder).glob("tomopipe.sqlite*")) / 1e6
            project.close()
        rows.append({"particles": n, "columns": items.shape[1], "write_s": write_s, "read_s": read_s,
                     "read_enabled_s": read_enabled_s, "database_MB": size_MB})
    report("project_store", rows, "one set of particles written in one transaction and read back whole")


if __name__ == "__main__":
    main()
