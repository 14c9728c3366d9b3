"""Shared fixtures: paths to the real metadata files, and a small hand-made acquisition on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tomopipe.data import APOFERRITIN_MODEL

REPO = Path(__file__).resolve().parents[1]
#: Real files from public repositories, in the layout of the project's ``shared/data``
#: (origin, licence and sha256 of each in ``tests/data/SOURCES.md``).
SHARED_DATA = REPO / "tests" / "data"
#: The apoferritin model (PDB 6Z6U) shipped inside the package, gzipped PDB.
STRUCTURE = APOFERRITIN_MODEL
#: Files of ``shared/data`` that do not ship (licence unknown or not checked) and why.
NOT_SHIPPED = {
    **dict.fromkeys(
        ["imod/IMOD_tutorial_BB/BBa.xf", "imod/IMOD_tutorial_BB/BBa_fid.tlt",
         "imod/IMOD_tutorial_BB/aligna.com", "imod/IMOD_tutorial_BB/tilta.com"],
        "IMOD tutorial data copied in tacyas/Eos, licence not checked"),
    "imod/etomo_uitest_midzone2/tilt.com": "IMOD Etomo UI test data in LabShare-Archive/IMOD, licence not checked",
    **dict.fromkeys(
        ["star/relion5_EMPIAR-10164/tomograms.star", "star/relion5_EMPIAR-10164/tilt_series/TS_01.star"],
        "RELION 5 run in TomoBabel/cets-relion, a repository without a licence"),
}


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one torch thread is faster and steadier.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the real metadata files are expected in {SHARED_DATA}"
    return SHARED_DATA


def real_file(relative: str) -> Path:
    """``SHARED_DATA / relative``; skips the test, naming the file and why, for a file that
    cannot ship (:data:`NOT_SHIPPED`)."""
    if relative in NOT_SHIPPED:
        pytest.skip(f"{relative} is not shipped in tests/data: {NOT_SHIPPED[relative]}")
    return SHARED_DATA / relative


def write_acquisition(folder: Path, ts_names=("TS_01", "TS_02"), tilt_angles=(0.0, 3.0, -3.0, 6.0, -6.0),
                      frames: int = 2, size: int = 32, dose_per_tilt: float = 3.0, pixel_size_A: float = 2.0,
                      tilt_axis_deg: float = -94.4, seed: int = 0, movie_suffix: str = ".tif") -> Path:
    """Movies (LZW TIFF, integer counts) and a SerialEM-style mdoc per tilt series, in ``folder``.
    Sections are written in acquisition order (the order of ``tilt_angles``) with DateTime.
    ``tilt_axis_deg`` is the mdoc's angle (for the frames as stored)."""
    from tomopipe.io.mdoc import write_mdoc
    from tomopipe.io.movies import write_movie

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for ts in ts_names:
        sections = []
        for index, angle in enumerate(tilt_angles):
            name = f"{ts}_{index + 1:03d}_{angle:.1f}{movie_suffix}"
            write_movie(folder / name, rng.poisson(1.0, size=(frames, size, size)).astype(np.uint8))
            sections.append({
                "TiltAngle": angle,
                "StagePosition": [10.0, -5.0],
                "Magnification": 64000,
                "ExposureDose": dose_per_tilt,
                "PixelSpacing": pixel_size_A,
                "ExposureTime": 1.0,
                "NumSubFrames": frames,
                "TargetDefocus": -2.5,
                "SubFramePath": f"X:\\frames\\{name}",
                "DateTime": f"24-Nov-26  10:{index:02d}:00",
            })
        write_mdoc(folder / f"{ts}.mdoc",
                   {"PixelSpacing": pixel_size_A, "Voltage": 300, "ImageFile": f"{ts}.mrc",
                    "ImageSize": [size, size], "DataMode": 1},
                   ["[T = SerialEM: test acquisition]",
                    f"[T =     Tilt axis angle = {tilt_axis_deg}, binning = 1  spot = 8  camera = 0]"],
                   sections)
    return folder


def gemmi_potential_V(box: int, pixel_A: float, centre_A=None, rotation=None, mirror: bool = False,
                      oversampling: int = 4, cutoff: float = 1e-6):
    """Independent reference map of the apoferritin model (``STRUCTURE``): gemmi
    DensityCalculatorE (ITC 4.3.2.2 electron form factors) on a grid ``oversampling`` times finer,
    Fourier-cropped to ``box`` (band-limited like ours); ``[z, y, x]`` float64 tensor in V.

    Each atom goes to ``rotation·(x − centre) + box·pixel/2`` (``centre`` default: the atoms'
    mean; ``mirror`` negates x before the rotation)."""
    import gemmi
    import torch

    from tomopipe.algorithms.potential import POTENTIAL_CONSTANT_V_A2, fourier_crop_volume

    st = gemmi.read_structure(str(STRUCTURE))
    st.remove_waters()
    atoms = [a for ch in st[0] for r in ch for a in r]
    xyz = np.array([a.pos.tolist() for a in atoms])
    centre = xyz.mean(0) if centre_A is None else np.asarray(centre_A, dtype=float)
    v = xyz - centre
    if mirror:
        v[:, 0] = -v[:, 0]
    if rotation is not None:
        v = v @ np.asarray(rotation, dtype=float).T
    length = box * pixel_A
    v = v + length / 2
    for atom, p in zip(atoms, v):
        atom.pos = gemmi.Position(*p)
    st.cell = gemmi.UnitCell(length, length, length, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    calc.grid.set_unit_cell(st.cell)
    fine = oversampling * box
    calc.grid.set_size(fine, fine, fine)
    calc.blur = 0
    calc.cutoff = cutoff
    calc.put_model_density_on_grid(st[0])
    density = torch.from_numpy(np.array(calc.grid, copy=True).transpose(2, 1, 0)).double()  # x,y,z -> z,y,x
    cropped = fourier_crop_volume(torch.fft.rfftn(density), (fine,) * 3, (box,) * 3)
    return torch.fft.irfftn(cropped, s=(box,) * 3) * POTENTIAL_CONSTANT_V_A2


def assert_same_document(a, b, where: str, rel: float = 1e-5, abs: float = 1e-6) -> None:
    """Equal JSON-like documents (dicts, lists, numbers, strings), floats to ``rel``/``abs`` (the order of
    sums on threads or processes moves the last digits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_document(a[key], b[key], f"{where}.{key}", rel, abs)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_document(x, y, f"{where}[{index}]", rel, abs)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rel, abs=abs, nan_ok=True), where
    else:
        assert a == b, where


@pytest.fixture(scope="session")
def tiny_tutorial_project(tmp_path_factory) -> Path:
    """The whole tutorial workflow's project on two tilt series of the tiny preset (``tests/tiny_tutorial.py``),
    built once per test session and shared by pytest-xdist's workers: read-only, copy it to write."""
    from tiny_tutorial import shared_tutorial_project

    return shared_tutorial_project(tmp_path_factory)
