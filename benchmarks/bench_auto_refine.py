"""3D auto-refine (step ``auto_refine``) on a finished demo's bin-10 2-D extraction (run ``extract2d``).

The reference is the TRUE map at the extraction's voxel size (validate: ``true_map_like``), which the step
low-passes to 60 Å: a benchmark-only shortcut standing in for the initial model (the workflow uses the
initial-model step's map, made from the data and so on their greyscale). The step takes the reference on
absolute greyscale (seed), so the true map (about 100 times the data's scale) is first put on the data's
greyscale without the truth's poses: the least-squares factor between the radial profiles (60 Å) of the
true map and of the particles reconstructed with the orientations they carry (step
``reconstruct_particle``, symmetry O: an orientation-blurred map whose radial profile is the data's).
Writes into the project given, so pass a copy of the demo (``cp -r DEMO /tmp/O_work``). Reports
iterations, time, peak memory, the gold-standard resolution against Nyquist, the map's FSC 0.5 against
the true map and its hand, and the particles' orientation error modulo the symmetry and offset error
against the truth (:func:`tomopipe.validate.refinement.pose_errors`, as the demo scores them).

    python benchmarks/bench_auto_refine.py --demo /tmp/O_work [--threads 2] [--max-iterations 8]
                                           [--initial-lowpass 60]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from bench_true_pose_map import _finished_sets  # noqa: E402
from tomopipe.algorithms.filters import bandpass  # noqa: E402
from tomopipe.engine.executors import LocalExecutor  # noqa: E402
from tomopipe.engine.runner import run_on_sets  # noqa: E402
from tomopipe.io.mrc import read_mrc, write_mrc  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.steps.auto_refine import AutoRefine  # noqa: E402
from tomopipe.steps.reconstruct_particle import ReconstructParticle  # noqa: E402
from tomopipe.validate.map_score import score_map, true_map_like  # noqa: E402
from tomopipe.validate.refinement import pose_errors  # noqa: E402
from tomopipe.validate.truth import Truth  # noqa: E402


def _reference_set(project: Project, truth: Truth, subtomograms, voxel_A: float, box_px: int, radius_A: float):
    true_map = true_map_like(truth, voxel_A, box_px).numpy().astype(np.float64)
    scale = _data_greyscale(project, subtomograms, true_map, voxel_A, radius_A)
    run = project.create_run("true_reference", "benchmark_truth", {"scale": scale}, {}, "benchmark-true-reference")
    path = project.absolute_path(run.folder) / "true_map.mrc"
    write_mrc(path, (scale * true_map).astype(np.float32), voxel_A)
    rows = pd.DataFrame([{"map_name": "full", "map_path": project.relative_path(path), "voxel_size_A": voxel_A,
                          "box_px": box_px, "enabled": True}])
    record = project.add_set(run.id, "maps", "maps", rows, {})
    project.finish_run(run.id)
    return record


def _radial_profile(volume: np.ndarray, voxel_A: float, radius_A: float) -> np.ndarray:
    """Mean per 1-voxel shell of the volume low-passed to 60 Å, out to ``radius_A``."""
    n = volume.shape[0]
    spectrum = np.fft.rfftn(volume) * bandpass(volume.shape, voxel_A, high_A=60.0).numpy()
    smooth = np.fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2))
    axis = np.arange(n) - n // 2
    radius = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    shell = np.round(radius).astype(int).ravel()
    keep = shell <= radius_A / voxel_A
    return np.bincount(shell[keep], smooth.ravel()[keep]) / np.bincount(shell[keep])


def _data_greyscale(project: Project, subtomograms, true_map: np.ndarray, voxel_A: float, radius_A: float
                    ) -> float:
    """The factor putting the true map on the data's greyscale (module docstring)."""
    outcome = run_on_sets(project, ReconstructParticle, "reconstruct_start", {"symmetry": "O"},
                          {"subtomograms": subtomograms}, LocalExecutor(1))
    if outcome.status != "finished":
        raise SystemExit(f"reconstruct_start: {outcome.message}")
    items = project.read_items(project.sets_of_run(outcome.run.id)["maps"].id).set_index("map_name")
    data_map = read_mrc(project.absolute_path(items.loc["full", "map_path"]))[0].astype(np.float64)
    a, b = _radial_profile(true_map, voxel_A, radius_A), _radial_profile(data_map, voxel_A, radius_A)
    return float((a * b).sum() / (a * a).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a COPY of the output folder of `tomopipe demo`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--symmetry", default="O")
    parser.add_argument("--mask-diameter", type=float, default=150.0)
    parser.add_argument("--max-iterations", type=int, default=8)
    parser.add_argument("--initial-lowpass", type=float, default=60.0, help="Å (seed: 60)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = Truth.find(args.demo / "data")
    with Project.open(args.demo / "project") as project:
        subtomograms = _finished_sets(project, "extract2d")["subtomograms"]
        extraction = subtomograms.attrs["extraction"]
        voxel_A, crop = float(extraction["pixel_size_A"]), int(extraction["crop_px"])
        reference = _reference_set(project, truth, subtomograms, voxel_A, crop, args.mask_diameter / 2)
        started = time.perf_counter()
        outcome = run_on_sets(project, AutoRefine, "auto_refine",
                              {"symmetry": args.symmetry, "mask_diameter_A": args.mask_diameter,
                               "max_iterations": args.max_iterations, "device": args.device,
                               "initial_lowpass_A": args.initial_lowpass},
                              {"subtomograms": subtomograms, "reference": reference}, LocalExecutor(1))
        seconds = time.perf_counter() - started
        if outcome.status != "finished":
            raise SystemExit(f"auto_refine: {outcome.message}")
        sets = project.sets_of_run(outcome.run.id)
        attrs = sets["maps"].attrs
        errors = pose_errors(project.read_items(sets["subtomograms"].id), truth, args.symmetry).summary()
        items = project.read_items(sets["maps"].id).set_index("map_name")
        full, _ = read_mrc(project.absolute_path(items.loc["full", "map_path"]))
    score = score_map(torch.from_numpy(np.ascontiguousarray(full, np.float32)), voxel_A, truth, args.mask_diameter)
    rows = [{"iteration": it["iteration"], "resolution_A": round(it["resolution_A"], 2),
             "angular_step_deg": round(it["angular_step_deg"], 3),
             "mean_angle_change_deg": round(it["mean_angle_change_deg"], 2),
             "mean_offset_change_A": round(it["mean_offset_change_A"], 2)} for it in attrs["iterations"]]
    rows.append({"iteration": "final", "resolution_A": round(attrs["resolution_A"], 2),
                 "nyquist_A": round(2 * voxel_A, 2), "truth_fsc_0_5_A": score.resolution_fsc_0_5_A,
                 "right_hand": score.right_hand, "seconds": round(seconds, 1),
                 "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2), **errors})
    report("auto_refine", rows, f"bin 10 (box {crop}, {voxel_A:.3g} Å), {args.threads} torch threads, "
                                f"{args.device}; reference: the TRUE map low-passed to {args.initial_lowpass:g} Å "
                                f"(benchmark only)")


if __name__ == "__main__":
    main()
