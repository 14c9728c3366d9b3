"""The whole tutorial workflow (``workflows/apoferritin_tutorial.toml``: import → motion/CTF → exclude → X-ray
eraser → preprocess → align → assign → reconstruct → pick → extract → initial model → refine at bin 10, 4, 2 →
postprocess) on a tiny simulated acquisition, shared by the engine's and the browser UI's tests.

The acquisition is the ``tiny`` preset (256² px at 3.16 Å, five tilts of ±12°) with enough dose and particles to be
aligned and averaged; the overrides bring the tutorial's sizes down to it: tilt series binned by 2 (6.32 Å), a
tomogram of 128 × 128 × 32 voxels, boxes of 48 px cropped to 24 px, two refinement iterations per binning.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

#: overrides that let the tutorial workflow run end to end on a reduced tiny preset (bin 2, patches
#: that fit its 128-px binned views, no point-tracking stage, a thin tomogram)
TINY_WORKFLOW_OVERRIDES = ("motion.ctf_window_px=128", "preprocess.binning=2", "align.patch_size_A=300",
                           "align.point_tracking=false", "align.interpolated_stack=false",
                           "reconstruct.thickness_px=32", "extract3d.binning=2", "extract3d.box_px=48",
                           "extract2d.binning=2", "extract2d.box_px=48")

#: the rest of the tutorial (averaging) on the tiny acquisition: bin 2, small boxes, 2 iterations
TINY_AVERAGING_OVERRIDES = (*(f"{step}.{value}" for step in ("extract_bin4", "extract_bin2")
                              for value in ("binning=2", "box_px=48", "crop_px=24")),
                            "initial_model.batch_size=8",
                            *(f"{step}.max_iterations=2" for step in ("refine_bin10", "refine_bin4", "refine_bin2")),
                            "postprocess.mask_diameter_A=140")

#: the tomogram that the overrides give: (x, y, z) voxels of 6.32 Å (the tiny preset's 256² px at 3.16 Å, binned by 2)
TINY_TOMOGRAM_XYZ_PX = (128, 128, 32)
TINY_TOMOGRAM_VOXEL_A = 6.32
#: tilts per tilt series of the tiny preset (−12° to 12° in steps of 6°)
TINY_N_TILTS = 5


def tiny_acquisition(folder: Path, n_tilt_series: int) -> Path:
    """Tilt series of the tiny preset with enough dose (10 e⁻/Å² per tilt) and particles (20 per tilt series) to be
    aligned and averaged, simulated into ``folder`` (movies, mdoc, gain ``gain_ref.mrc``, truth)."""
    from tomopipe.simulate import config_from_preset, simulate

    config = config_from_preset("tiny", seed=3, n_tilt_series=n_tilt_series, dose_per_tilt_e_per_A2=10.0,
                                particles_per_tilt_series=20)
    simulate(config, folder, overwrite=True)
    return folder


def tutorial_overrides(data: Path) -> list[str]:
    """``--set`` overrides that run the tutorial workflow on :func:`tiny_acquisition`'s ``data`` folder."""
    return [f'import.files_directory="{data}"', f'import.gain_image="{data / "gain_ref.mrc"}"',
            "import.gain_flip_y=true", *TINY_WORKFLOW_OVERRIDES, *TINY_AVERAGING_OVERRIDES]


def run_tutorial(project_dir: Path, data: Path, executor):
    """The whole tutorial workflow on ``data`` into the project ``project_dir`` (made when missing); the run report."""
    from tomopipe.demo import tutorial_workflow_path
    from tomopipe.engine.runner import run_workflow
    from tomopipe.engine.workflow import load_workflow
    from tomopipe.project.store import Project

    workflow = load_workflow(tutorial_workflow_path(), tutorial_overrides(data))
    with Project.open_or_init(project_dir) as project:
        return run_workflow(project, workflow, executor, echo=lambda *_: None)


def shared_tutorial_project(tmp_path_factory, n_tilt_series: int = 2) -> Path:
    """The tutorial workflow's project on :func:`tiny_acquisition` (``n_tilt_series`` tilt series), built once per
    test session: pytest-xdist workers share it, the first builds it under a lock in their common temporary folder.
    Treat it as read-only; copy it (:func:`copy_project`) to write. Built on one torch thread: on a shared 2-core
    machine the tiny tensors run several times faster than on threads that wait for each other."""
    import torch

    from tomopipe.engine.executors import LocalExecutor

    session_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders share this session's parent
        session_root = session_root.parent
    shared = session_root / f"tiny_tutorial_{n_tilt_series}ts"
    with open(str(shared) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                data = tiny_acquisition(shared / "data", n_tilt_series)
                report = run_tutorial(shared / "project", data, LocalExecutor(1))
            finally:
                torch.set_num_threads(threads)
            failed = [f"{o.name}: {o.status} {o.message}" for o in report.outcomes if o.status != "finished"]
            assert not failed, f"the tutorial workflow on the tiny acquisition in {shared} failed: {failed}"
            (shared / "done").write_text("ok")
    return shared / "project"


def copy_project(project_dir: Path, destination: Path) -> Path:
    """A copy of a project folder (its runs point to the simulated movies outside it, which stay shared)."""
    shutil.copytree(project_dir, destination)
    return destination
