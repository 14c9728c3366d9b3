"""The best map the data allow: the simulated particles with their TRUE poses, through the pipeline's
own extraction, reconstruction and post-processing (issue 12's limit for refinement).

On a finished demo (``tomopipe demo --out DIR``): the true particles (``truth/particles.star``) are
moved into the frame of the demo's tomograms by the one translation per tilt series that the
alignment leaves free (found from the workflow's picks, :func:`tomopipe.validate.picking.
free_translation_A`), keep their true orientations and half sets, and go through the steps
``extract_subtomos`` (2-D stacks, per binning), ``reconstruct_particle`` (symmetry O) and
``postprocess`` (soft spherical mask) on the engine, as in the workflow, in a copy of the project.
Each row: the gold-standard resolution (corrected FSC 0.143 of postprocess; the half maps' unmasked
FSC too), the resolution where the map's FSC against the true map crosses 0.5 (the two should agree
within 10 %), the hand (FSC against the truth above that against its mirror image), and each step's
time and the process's peak memory.

    python benchmarks/bench_true_pose_map.py --demo DIR [--binnings 10:64:24,4:128:64,2:256:128]
                                             [--threads 2] [--symmetry O] [--mask-diameter 160]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import report  # noqa: E402
from tomopipe.engine.executors import LocalExecutor  # noqa: E402
from tomopipe.engine.runner import run_on_sets  # noqa: E402
from tomopipe.io.mrc import read_mrc  # noqa: E402
from tomopipe.model.particles import particle_set_attrs, tomogram_frames  # noqa: E402
from tomopipe.project.store import Project  # noqa: E402
from tomopipe.steps.extract_subtomos import ExtractSubtomos  # noqa: E402
from tomopipe.steps.postprocess import Postprocess  # noqa: E402
from tomopipe.steps.reconstruct_particle import ReconstructParticle  # noqa: E402
from tomopipe.validate.map_score import score_map  # noqa: E402
from tomopipe.validate.picking import TRUTH_EULER, TRUTH_XYZ, free_translation_A  # noqa: E402
from tomopipe.validate.truth import Truth  # noqa: E402

DIAMETER_A = 125.0


def _finished_sets(project: Project, run_name: str) -> dict:
    run = [r for r in project.runs() if r.name == run_name and r.status == "finished"][-1]
    return project.sets_of_run(run.id)


def true_particles_set(project: Project, truth: Truth):
    """A particles set of the true particles inside the project's tomograms, in their frame."""
    tomograms = _finished_sets(project, "reconstruct")["tomograms"]
    picks = project.read_items(_finished_sets(project, "pick")["particles"].id, enabled_only=True)
    true = truth.particles
    frames = tomogram_frames(project.read_items(tomograms.id))
    rows = []
    for ts_id, mine in true.groupby("rlnTomoName", sort=True):
        picked = picks.loc[picks["ts_id"] == ts_id, ["x_A", "y_A", "z_A"]].to_numpy(np.float64)
        xyz = mine[list(TRUTH_XYZ)].to_numpy(np.float64) - free_translation_A(picked, mine[list(TRUTH_XYZ)].to_numpy())
        table = mine[list(TRUTH_EULER)].set_axis(["rot_deg", "tilt_deg", "psi_deg"], axis=1)
        table.insert(0, "ts_id", ts_id)
        table[["x_A", "y_A", "z_A"]] = xyz
        table["score"] = 1.0
        table["half_set"] = mine["rlnRandomSubset"].astype(int).to_numpy()
        table["enabled"] = True
        rows.append(table[frames[ts_id].inside(xyz)])
    run = project.create_run("true_particles", "benchmark_truth", {}, {}, "benchmark-true-poses")
    items = pd.concat(rows, ignore_index=True)
    record = project.add_set(run.id, "particles", "particles", items,
                             particle_set_attrs(project.read_items(tomograms.id), tomograms.attrs))
    project.finish_run(run.id)
    return record


def _run(project, step, name, params, inputs):
    started = time.perf_counter()
    outcome = run_on_sets(project, step, name, params, inputs, LocalExecutor(1))
    if outcome.status != "finished":
        raise SystemExit(f"{name}: {outcome.message}")
    return outcome, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `tomopipe demo`")
    parser.add_argument("--binnings", default="10:64:24,4:128:64,2:256:128", help="binning:box:crop, ...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--symmetry", default="O")
    parser.add_argument("--mask-diameter", type=float, default=160.0, help="Å, postprocess and truth FSC mask")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = Truth.find(args.demo / "data")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(args.demo / "project", Path(folder) / "project")
        with Project.open(Path(folder) / "project") as project:
            particles = true_particles_set(project, truth)
            inputs = {"tilt_series": _finished_sets(project, "assign")["tilt_series"],
                      "ctf": _finished_sets(project, "exclude")["ctf"], "particles": particles}
            for spec in args.binnings.split(","):
                binning, box, crop = (float(v) for v in spec.split(":"))
                extract, extract_s = _run(project, ExtractSubtomos, f"extract_bin{binning:g}",
                                          {"binning": binning, "box_px": int(box), "crop_px": int(crop),
                                           "particle_diameter_A": DIAMETER_A}, inputs)
                subtomograms = project.sets_of_run(extract.run.id)["subtomograms"]
                recon, recon_s = _run(project, ReconstructParticle, f"reconstruct_bin{binning:g}",
                                      {"symmetry": args.symmetry, "particle_diameter_A": args.mask_diameter},
                                      {"subtomograms": subtomograms})
                maps = project.sets_of_run(recon.run.id)["maps"]
                post, post_s = _run(project, Postprocess, f"postprocess_bin{binning:g}",
                                    {"mask_diameter_A": args.mask_diameter}, {"maps": maps})
                items = project.read_items(maps.id).set_index("map_name")
                full, voxel_A = read_mrc(project.absolute_path(items.loc["full", "map_path"]))
                score = score_map(torch.from_numpy(np.ascontiguousarray(full, np.float32)), float(voxel_A), truth,
                                  args.mask_diameter)
                result = project.sets_of_run(post.run.id)["maps"].attrs["postprocess"]
                gold = float(result["resolution_A"])
                rows.append({"binning": binning, "box": int(box), "crop": int(crop), "pixel_A": round(voxel_A, 3),
                             "particles": len(project.read_items(subtomograms.id)),
                             "nyquist_A": round(2 * voxel_A, 2),
                             "gold_standard_A": gold,
                             "unmasked_fsc_0_143_A": float(maps.attrs["resolution_A"]),
                             "truth_fsc_0_5_A": score.resolution_fsc_0_5_A,
                             "gold_vs_truth": round(gold / score.resolution_fsc_0_5_A, 3),
                             "right_hand": score.right_hand,
                             "fsc_truth_vs_mirror": f"{score.mean_fsc_truth:.3f} / {score.mean_fsc_mirror:.3f}",
                             "b_factor_A2": result.get("b_factor_A2"),
                             "extract_s": round(extract_s, 1), "reconstruct_s": round(recon_s, 1),
                             "postprocess_s": round(post_s, 1),
                             "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)})
    report("true_pose_map", rows, f"{args.threads} torch threads; CPU; symmetry {args.symmetry}; "
                                  f"mask {args.mask_diameter} Å; demo {args.demo}")


if __name__ == "__main__":
    main()
