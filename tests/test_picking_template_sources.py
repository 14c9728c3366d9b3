"""Templates from an atomic model or a map file (issue 11): the packaged 6Z6U at the tomogram's voxel
size, map -> template round trip, template files read by suffix with clear errors."""

from __future__ import annotations

import dataclasses
import gzip
import zlib

import numpy as np
import pytest
import torch

from tomopipe.algorithms.filters import fast_fft_size
from tomopipe.algorithms.picking.template import (
    default_template_box_px,
    shell_template,
    template_from_atomic_model,
    template_from_map,
)
from tomopipe.algorithms.potential import AtomicModel
from tomopipe.data import APOFERRITIN_MODEL
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.mrc import write_mrc
from tomopipe.io.templates import TemplateMap, read_template

pytestmark = pytest.mark.usefixtures("one_thread")

VOXEL_A = 7.9


@pytest.fixture(scope="module")
def model() -> AtomicModel:
    return read_template(APOFERRITIN_MODEL)


@pytest.fixture(scope="module")
def template(model) -> torch.Tensor:
    return template_from_atomic_model(model, VOXEL_A)


def _radius_A(box: int, voxel_A: float) -> torch.Tensor:
    c = (torch.arange(box, dtype=torch.float64) - box // 2) * voxel_A
    return torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def _centre_of_density_px(volume: torch.Tensor) -> torch.Tensor:
    """Density-weighted centre (z, y, x) in voxels."""
    v = volume.double()
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in v.shape), indexing="ij")
    return torch.stack([(g * v).sum() / v.sum() for g in grids])


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (a.double() - a.double().mean()).flatten(), (b.double() - b.double().mean()).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_atomic_model_template_box_is_documented(model, template):
    diameter_A = 2 * model.radius_A  # 6Z6U: the centroid is the centre of mass (24-fold symmetric)
    box = template.shape[0]
    assert template.shape == (box,) * 3 and template.dtype == torch.float32
    assert box == default_template_box_px(diameter_A, VOXEL_A) == 24  # 1.2 × 134 Å / 7.9 Å = 20.4 -> 24
    assert box % 2 == 0 and box == fast_fft_size(box) and box * VOXEL_A >= 1.2 * diameter_A
    smaller = [b for b in range(2, box, 2) if fast_fft_size(b) == b]
    assert smaller and all(b * VOXEL_A < 1.2 * diameter_A for b in smaller)  # the smallest such box


def test_atomic_model_template_is_centred_on_the_centre_of_mass(model, template):
    box = template.shape[0]
    assert torch.allclose(_centre_of_density_px(template), torch.full((3,), box / 2 // 1, dtype=torch.float64),
                          atol=0.5)
    # a model whose atoms sit off their origin gives the same template: it is centred on its centre of mass
    moved = dataclasses.replace(model, positions_A=model.positions_A + torch.tensor([17.0, -9.0, 5.0],
                                                                                    dtype=torch.float64))
    assert torch.allclose(template_from_atomic_model(moved, VOXEL_A), template, atol=1e-3 * float(template.max()))


def test_atomic_model_template_is_a_hollow_shell(template):
    r_A = _radius_A(template.shape[0], VOXEL_A)
    v = template.double()
    cavity, wall = float(v[r_A < 35].mean()), float(v[(r_A > 45) & (r_A < 65)].mean())
    assert wall > 3.0  # volts: protein is positive
    assert cavity < 0.05 * wall  # apoferritin is hollow
    assert abs(float(v[r_A > 75].mean())) < 0.05 * wall  # nothing outside the 134 Å particle


def test_model_too_large_for_the_box_is_refused(model):
    with pytest.raises(TomopipeError, match="does not fit"):
        template_from_atomic_model(model, VOXEL_A, box_px=12)


def test_map_file_round_trip_to_the_atomic_model_template(model, template, tmp_path):
    """A map written at 3.95 Å and read back as a template at 7.9 Å equals the model's template at 7.9 Å."""
    box = template.shape[0]
    fine = template_from_atomic_model(model, VOXEL_A / 2, box_px=2 * box)
    path = tmp_path / "apoferritin.mrc"
    write_mrc(path, fine.numpy(), VOXEL_A / 2)
    source = read_template(path)
    assert isinstance(source, TemplateMap) and source.voxel_size_A == pytest.approx(VOXEL_A / 2)
    from_map = template_from_map(source.volume, source.voxel_size_A, VOXEL_A, box_px=box)
    assert from_map.shape == (box,) * 3
    assert _correlation(from_map, template) >= 0.98
    assert float(from_map.double().mean()) == pytest.approx(float(fine.double().mean()), rel=1e-4)  # mean kept


def test_map_template_pads_and_crops_about_the_centre():
    """Odd, non-cubic map: padding keeps the integral and the centre voxel; cropping back is the identity."""
    voxel = 4.0
    shell = shell_template(31, voxel, 80.0, 40.0)[:, 2:29, 1:30]  # 31 x 27 x 29, centre voxel still n//2
    padded = template_from_map(shell, voxel, voxel, box_px=40)
    assert padded.shape == (40,) * 3
    assert float(padded.double().sum()) == pytest.approx(float(shell.double().sum()), rel=1e-6)
    assert torch.allclose(_centre_of_density_px(padded), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-3)
    assert template_from_map(shell, voxel, voxel).shape == (32,) * 3  # default: fast even size holding the map
    coarse = template_from_map(shell_template(64, voxel, 80.0, 40.0), voxel, 2 * voxel)  # resampled: 32
    expected = shell_template(32, 2 * voxel, 80.0, 40.0, edge_A=2 * voxel)
    assert coarse.shape == (32,) * 3 and _correlation(coarse, expected) > 0.97


def test_template_files_by_suffix(tmp_path):
    volume = shell_template(16, 5.0, 60.0, 30.0).numpy()
    for suffix in (".mrc", ".map", ".mrcs"):
        write_mrc(tmp_path / f"t{suffix}", volume, 5.0)
        source = read_template(tmp_path / f"t{suffix}")
        assert source.voxel_size_A == 5.0 and np.array_equal(source.volume.numpy(), volume)
    gz = tmp_path / "model.PDB.gz"
    gz.write_bytes(APOFERRITIN_MODEL.read_bytes())
    assert isinstance(read_template(gz), AtomicModel)


def test_unset_header_voxel_size_asks_for_template_voxel_size_A(tmp_path):
    path = tmp_path / "unset.mrc"
    write_mrc(path, np.ones((8, 8, 8), np.float32), 1.0)
    with pytest.raises(InputFileError, match="unset.mrc.*set template_voxel_size_A"):
        read_template(path)
    assert read_template(path, template_voxel_size_A=3.2).voxel_size_A == 3.2


@pytest.mark.parametrize("name, content, problem", [
    ("notes.mrc", b"this is a text file, not an MRC map\n" * 40, "not a readable MRC"),
    ("template.xyz", b"1 2 3\n", "unknown template file type"),
    ("template", b"1 2 3\n", "unknown template file type"),
    ("garbage.pdb", b"\x00\xff not a structure \x13" * 30, "no atoms|not a readable"),
])
def test_bad_template_files_name_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=problem) as info:
        read_template(path)
    assert info.value.path == path and str(path) in str(info.value)


def test_image_and_model_voxel_size_are_refused(tmp_path):
    image = tmp_path / "image.mrc"
    write_mrc(image, np.ones((8, 8), np.float32), 4.0)
    with pytest.raises(InputFileError, match="3-D volume"):
        read_template(image)
    with pytest.raises(InputFileError, match="maps only"):
        read_template(APOFERRITIN_MODEL, template_voxel_size_A=4.0)


def test_damaged_atomic_model_files_give_a_model_or_an_input_file_error(tmp_path):
    """Mutants of the head of 6Z6U (truncated, bytes flipped with a fixed seed): each read ends in an
    AtomicModel or an InputFileError, nothing else."""
    lines = gzip.decompress(APOFERRITIN_MODEL.read_bytes()).splitlines(keepends=True)
    text = b"".join(line for line in lines if line.startswith((b"CRYST1", b"ATOM", b"HETATM")))[:120_000]
    rng = np.random.default_rng(zlib.crc32(b"atomic-model-fuzz"))
    mutants = [text[: int(f * len(text))] for f in (0.0, 0.01, 0.3, 0.77)]
    for _ in range(6):
        data = bytearray(text)
        for i in rng.integers(0, len(data), 200):
            data[i] = int(rng.integers(0, 256))
        mutants.append(bytes(data))
    outcomes = set()
    for i, data in enumerate(mutants):
        path = tmp_path / f"mutant{i}.pdb"
        path.write_bytes(data)
        try:
            outcomes.add(type(read_template(path)).__name__)
        except InputFileError as exc:
            assert exc.path == path
            outcomes.add("InputFileError")
    assert outcomes == {"AtomicModel", "InputFileError"}
