"""Speed of the ``reconstruct_particle`` step (reading the crops, CTF² weights, Fourier insertion of
both half sets, symmetrisation, the two reconstruction passes, writing the maps).

A synthetic ``subtomograms`` set in a temporary project: PARTICLES particles with random poses in one
tilt series of 41 tilts (±60°, 3° steps), random crops of CROP px (the work does not depend on the
content), the CTF on. Runs the step through the engine once per (exact_insertion, threads) and prints
the seconds and the microseconds per inserted tilt image; the issue's goal is the small data set
(~300 particles × 41 tilts at box 128) in ≤ 30 s with the extraction, so the per-image cost × 12,300
is what counts, plus a fixed cost per run (two reconstruction passes on the padded grid; symmetrisation
for groups other than C1).

    python benchmarks/bench_reconstruct_particle_step.py [--particles 40] [--crop 128] [--threads 1,2]
        [--device cpu] [--symmetry C1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.algorithms.subtomo.extract import TiltGeometry  # noqa: E402
from tomopipe.engine.executors import LocalExecutor  # noqa: E402
from tomopipe.engine.runner import run_on_sets  # noqa: E402
from tomopipe.io.mrc import write_mrc  # noqa: E402
from tomopipe.model.subtomograms import geometry_attrs, tilts_used_string  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.steps.reconstruct_particle import ReconstructParticle  # noqa: E402

PIXEL_A = 2.0 * 1.35  # bin 2 of the seed's 1.35 Å


def _project(folder: Path, particles: int, crop: int):
    tilts = np.arange(-60.0, 60.1, 3.0)
    n = tilts.size
    geometry = TiltGeometry.from_alignment(
        torch.full((n,), 85.0, dtype=torch.float64), torch.tensor(tilts), 0.0, torch.zeros((n, 2)),
        defocus_u_A=30000.0, defocus_v_A=29500.0, defocus_angle_deg=20.0,
        pre_exposure_e_per_A2=torch.tensor(np.argsort(np.argsort(np.abs(tilts))) * 3.0), defocus_hand=-1,
        pixel_size_A=PIXEL_A, image_size_px=(2048, 2048), voltage_kV=300.0, spherical_aberration_mm=2.7,
        amplitude_contrast=0.07)
    project = Project.init(folder / "p")
    run = project.create_run("extract", "extract_subtomos", {}, {}, "subtomograms")
    path = project.absolute_path(run.folder) / "TS_01_stack2d.mrc"
    generator = torch.Generator().manual_seed(0)
    write_mrc(path, torch.randn((particles * n, crop, crop), generator=generator).numpy(), PIXEL_A, stack=True)
    angles = torch.rand((particles, 3), generator=generator, dtype=torch.float64).numpy() * [360, 180, 360]
    positions = (torch.rand((particles, 3), generator=generator, dtype=torch.float64).numpy() - 0.5) * [2000, 2000, 300]
    items = pd.DataFrame({"ts_id": "TS_01", "x_A": positions[:, 0], "y_A": positions[:, 1], "z_A": positions[:, 2],
                          "rot_deg": angles[:, 0], "tilt_deg": angles[:, 1], "psi_deg": angles[:, 2], "score": 1.0,
                          "half_set": np.arange(particles) % 2 + 1, "data_path": project.relative_path(path),
                          "data_section": np.arange(particles) * n, "n_sections": n,
                          "tilts_used": tilts_used_string(np.ones(n, dtype=bool))})
    attrs = {"geometry": {"TS_01": geometry_attrs(geometry, range(n))},
             "extraction": {"dimensions": 2, "pixel_size_A": PIXEL_A, "binning": 1.0, "box_px": crop,
                            "crop_px": crop, "apply_ctf": True}}
    record = project.add_set(run.id, "subtomograms", "subtomograms", items, attrs)
    project.finish_run(run.id)
    return project, record, particles * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=40)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--symmetry", default="C1")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        project, record, images = _project(Path(folder), args.particles, args.crop)
        with project:
            for exact in (True, False):
                for threads in [int(t) for t in args.threads.split(",")]:
                    torch.set_num_threads(threads)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    # wiener_snr differs per thread count only so that the engine does not skip a repeat
                    params = {"exact_insertion": exact, "device": args.device, "wiener_snr": 1.0 + threads,
                              "symmetry": args.symmetry}
                    outcome = run_on_sets(project, ReconstructParticle, f"rec_{exact}_{threads}", params,
                                          {"subtomograms": record}, LocalExecutor(1))
                    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
                    if outcome.status != "finished":
                        raise SystemExit(outcome.message)
                    rows.append({"exact_insertion": exact, "crop": args.crop, "symmetry": args.symmetry,
                                 "tilt_images": images, "device": args.device, "threads": threads,
                                 "seconds": seconds, "cpu_s": cpu_s, "insert_s": outcome.summary["insert_s"],
                                 "us_per_image": 1e6 * outcome.summary["insert_s"] / images})
    report("reconstruct_particle_step", rows, notes="insert_s: reading, weighting and inserting the tilt images; "
                                                    "the rest of seconds is the fixed cost of the maps; cpu_s: "
                                                    "process CPU time (all threads), steadier than the wall "
                                                    "time on a shared machine")


if __name__ == "__main__":
    main()
