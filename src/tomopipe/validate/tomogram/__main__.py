"""``python -m tomopipe.validate.tomogram PROJECT RUN TRUTH_DIR [--resolution-A 30]``: the scores of a
run's tomograms against the simulator's truth, as JSON on stdout."""

from __future__ import annotations

import argparse
import json

import torch

from tomopipe.errors import TomopipeError
from tomopipe.project.store import Project
from tomopipe.validate.tomogram.score import score_tomogram_set
from tomopipe.validate.truth import Truth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tomopipe.validate.tomogram",
                                     description="Score the tomograms of a run against the simulator's truth.")
    parser.add_argument("project")
    parser.add_argument("run", type=int, help="run id of a reconstruct_tomogram run")
    parser.add_argument("truth", help="simulated data folder (or its truth/ folder)")
    parser.add_argument("--resolution-A", type=float, default=30.0, help="low-pass of the correlation (Å)")
    parser.add_argument("--contrast-sign", type=int, default=-1, choices=(-1, 1))
    parser.add_argument("--tilt-offset-search-deg", type=float, default=0.0,
                        help="also search a turn of the truth about the tilt axis within +-this (degrees)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    project = Project.open(args.project)
    sets = project.sets_of_run(args.run)
    if "tomograms" not in sets:
        raise TomopipeError(f"run {args.run} has no 'tomograms' output (it has {sorted(sets)})")
    scores = score_tomogram_set(project.read_items(sets["tomograms"].id), project, Truth.find(args.truth),
                                args.resolution_A, args.contrast_sign, args.tilt_offset_search_deg)
    print(json.dumps({ts_id: score.summary() for ts_id, score in scores.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
