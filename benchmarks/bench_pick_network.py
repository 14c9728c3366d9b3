"""The trained picker (step ``pick_network``) on reconstructed tomograms of a simulated data set.

Training picks are truth-free: the peaks of a normalised cross-correlation with a hollow shell
(apoferritin's diameters, protein dark; one rotation, since a shell is round) on the training
tomogram, above the false-alarm threshold of 1 (Rickgauer) inside the specimen slab. The step
trains on them, on CPU with the given thread count, and picks every tomogram; the picks are then
scored against the simulator's truth (F1 at 30 Å after removing the one free translation per
tomogram, :mod:`tomopipe.validate.picking`). The truth is read only here, for the scores.

    python benchmarks/bench_pick_network.py --tomograms PROJECT/runs/0008_reconstruct \\
        --truth DATA/truth/particles.star [--train TS_01] [--time 300] [--threads 1]
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
from tomopipe.algorithms.picking.extract import extract_peaks, false_alarm_threshold, specimen_slab_z  # noqa: E402
from tomopipe.algorithms.picking.match import match_template  # noqa: E402
from tomopipe.algorithms.picking.template import shell_template, spherical_mask  # noqa: E402
from tomopipe.engine.executors import LocalExecutor  # noqa: E402
from tomopipe.engine.runner import run_step  # noqa: E402
from tomopipe.engine.workflow import WorkflowStep  # noqa: E402
from tomopipe.io.mrc import read_mrc  # noqa: E402
from tomopipe.io.star import read_particles_star  # noqa: E402
from tomopipe.model.particles import particles_table, tomogram_frames  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.steps.pick_network import PickNetwork  # noqa: E402
from tomopipe.validate.picking import score_picks  # noqa: E402

OUTER_A, INNER_A = 125.0, 80.0


def shell_picks(path: Path, frame) -> pd.DataFrame:
    """Truth-free picks of one tomogram: shell-template NCC peaks above 1 false alarm in the slab."""
    volume = torch.from_numpy(read_mrc(path)[0].astype(np.float32))
    box = int(np.ceil(1.3 * OUTER_A / frame.voxel_size_A)) | 1
    template = -shell_template(box, frame.voxel_size_A, OUTER_A, INNER_A)
    mask = spherical_mask(box, frame.voxel_size_A, 1.1 * OUTER_A, 2 * frame.voxel_size_A)
    result = match_template(volume, template, mask, torch.eye(3)[None], background_correction=False)
    z_range = specimen_slab_z(volume, feature_px=OUTER_A / frame.voxel_size_A)
    inside = result.scores[z_range[0]:z_range[1]]
    inside = inside[torch.isfinite(inside)]
    threshold = false_alarm_threshold(float(inside.std()), inside.numel(), 1)
    peaks = extract_peaks(result.scores, result.rotation_index, min_distance_px=OUTER_A / frame.voxel_size_A,
                          threshold=threshold, z_range=z_range, edge_px=box // 2)
    xyz_A = frame.to_centred_A(peaks.positions_zyx_px.numpy()[:, ::-1])
    return particles_table(frame.ts_id, xyz_A, score=peaks.scores.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tomograms", type=Path, required=True, help="folder of TS_*.mrc")
    parser.add_argument("--truth", type=Path, required=True, help="the simulator's particles.star")
    parser.add_argument("--train", default="TS_01", help="tomogram whose shell picks train the network")
    parser.add_argument("--time", type=float, default=300.0, help="training time budget (s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth, _ = read_particles_star(args.truth)
    with tempfile.TemporaryDirectory() as folder:
        project = Project.init(Path(folder) / "p")
        run = project.create_run("reconstruct", "reconstruct_tomogram", {}, {}, "benchmark")
        rows = []
        for path in sorted(args.tomograms.glob("TS_*.mrc")):
            volume, voxel_size_A = read_mrc(path, mmap=True)
            rows.append({"ts_id": path.stem, "tomogram_path": str(path.resolve()), "voxel_size_A": voxel_size_A,
                         "size_x_px": volume.shape[2], "size_y_px": volume.shape[1], "size_z_px": volume.shape[0],
                         "enabled": True})
        tomograms = pd.DataFrame(rows)
        project.add_set(run.id, "tomograms", "tomograms", tomograms, {"tilt_series": {}})
        project.finish_run(run.id)
        frame = tomogram_frames(tomograms)[args.train]
        started = time.perf_counter()
        training_picks = shell_picks(Path(tomograms.set_index("ts_id").loc[args.train, "tomogram_path"]), frame)
        shell_s = time.perf_counter() - started
        picks_run = project.create_run("shell_picks", "picks", {}, {}, "benchmark-picks")
        project.add_set(picks_run.id, "particles", "particles", training_picks, {"tilt_series": {}})
        project.finish_run(picks_run.id)
        params = PickNetwork.validate_params("pick_network", {"particle_diameter_A": OUTER_A,
                                                               "training_time_s": args.time, "device": "cpu"})
        inputs = {"tomograms": project.sets_of_run(run.id)["tomograms"],
                  "particles": project.sets_of_run(picks_run.id)["particles"]}
        outcome = run_step(project, WorkflowStep("pick_network", PickNetwork, params, {}), inputs, "benchmark",
                           LocalExecutor(1))
        if outcome.status != "finished":
            raise SystemExit(outcome.message)
        picks = project.read_items(project.sets_of_run(outcome.run.id)["particles"].id)
        summary = outcome.run.summary
    table_rows = []
    for name, table in (("shell NCC (training picks)", training_picks), ("pick_network", picks)):
        for ts_id, group in table.groupby("ts_id", sort=True):
            score = score_picks(group, truth[truth["rlnTomoName"] == ts_id], 30.0, orientations_known=False)
            table_rows.append({"picker": name, "ts_id": ts_id, "trained_on": args.train, "picks": score.n_picks,
                               "true": score.n_true, "precision": score.precision, "recall": score.recall,
                               "f1": score.f1, "f_beta4": score.f_beta4,
                               "shift_A": [round(v, 1) for v in score.translation_removed_A],
                               "median_error_A": score.median_position_error_A})
    notes = (f"threads {args.threads}; shell NCC {shell_s:.1f} s; step {summary['seconds']:.1f} s of which training "
             f"{summary['training_seconds']:.1f} s; binning {summary['binning']}; {summary['parameters']} parameters; "
             f"training log {summary['training_log']}")
    report("pick_network", table_rows, notes)


if __name__ == "__main__":
    main()
