"""Fuzz of the readers behind ``tomopipe inspect``: deterministic mutants of real files (truncated
at several points, bytes flipped with a fixed seed, size fields and numbers made huge, lines
deleted or duplicated). Each read must end within seconds in a summary or a TomopipeError: no
other exception, no hang. Seeds: every file of ``tests/data`` whose type ``inspect`` knows, and
files of the types that do not ship there written by tomopipe's writers. Regression: the damaged
IMOD model on which imodmodel looped forever (``tests/data/fuzz``)."""

from __future__ import annotations

import re
import signal
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA
from tomopipe.errors import InputFileError, TomopipeError
from tomopipe.io.inspect import _BY_SUFFIX, format_inspect, inspect_file

READ_TIMEOUT_S = 5.0
REAL_SEEDS = sorted(str(p.relative_to(SHARED_DATA)) for p in SHARED_DATA.rglob("*")
                    if p.is_file() and p.suffix.lower() in _BY_SUFFIX and p.parent.name != "fuzz")
REFUSED_SEEDS = {"mdoc/montage_section.mdoc"}  # read, and refused by design (a montage, not a tilt series)
MADE_SEEDS = ["stack.mrc", "movie.tif", "movie.eer", "TS_01.star", "TS_01.defocus", "tilt.com"]
# a tilt.com as etomo writes it (PIP -StandardInput format)
TILT_COM = """# Command file to run Tilt
#
####CreatedVersion####4.11.12
$tilt -StandardInput
InputProjections TS_01_ali.mrc
OutputFile TS_01_full_rec.mrc
IMAGEBINNED 1
TILTFILE TS_01.tlt
THICKNESS 300
RADIAL 0.35 0.035
FalloffIsTrueSigma 1
XAXISTILT 0.0
SCALE 0.0 1000.0
PERPENDICULAR
MODE 2
FULLIMAGE 924 958
SUBSETSTART 0 0
AdjustOrigin
ActionIfGPUFails 1,2
XTILTFILE TS_01.xtilt
OFFSET 0.0
SHIFT 0.0 0.0
UseGPU 0
$if (-e ./savework) ./savework
"""


class ReadTimeout(Exception):
    pass


def _within(call, seconds: float = READ_TIMEOUT_S):
    """``call()``, or ReadTimeout when it still runs after ``seconds`` (SIGALRM: stops a reader that
    loops in Python, as imodmodel did)."""
    def timeout(signum, frame):
        raise ReadTimeout(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _inspect_outcome(path: Path) -> str:
    """``"summary"`` (the text the CLI prints) or ``"error"`` (a TomopipeError); anything else raises."""
    try:
        _within(lambda: format_inspect(inspect_file(path)))
        return "summary"
    except TomopipeError:
        return "error"


def _binary_mutants(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """4-byte fields made huge (both byte orders) at the MRC size fields (nx, ny, nz, extended
    header), after IMOD chunk ids (counts), and at random aligned offsets of the first KiB."""
    offsets = {0, 4, 8, 92} | {m.end() for m in re.finditer(rb"CONT|MESH|SIZE|IMAT|OBJT", data)}
    offsets |= set((rng.integers(0, max(1, min(len(data), 1024) // 4), 6) * 4).tolist())
    out = []
    for offset in sorted(o for o in offsets if o + 4 <= len(data)):
        for order in ("little", "big"):
            out.append((f"huge {order}-endian int at byte {offset}",
                        data[:offset] + (2**31 - 1).to_bytes(4, order) + data[offset + 4:]))
    return out


def _text_mutants(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Numbers made huge, negative or not a number; a line deleted, a line duplicated."""
    numbers = list(re.finditer(rb"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", data))
    out = []
    for replacement in (b"2147483647", b"1e308", b"-1", b"nan", b"99999999999999999999"):
        if numbers:
            m = numbers[int(rng.integers(len(numbers)))]
            out.append((f"number at byte {m.start()} -> {replacement.decode()}",
                        data[:m.start()] + replacement + data[m.end():]))
    lines = data.splitlines(keepends=True)
    if lines:
        k = int(rng.integers(len(lines)))
        out.append((f"line {k + 1} deleted", b"".join(lines[:k] + lines[k + 1:])))
        out.append((f"line {k + 1} duplicated", b"".join(lines[:k + 1] + lines[k:])))
    return out


def mutants(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """Deterministic mutants of a file (seeded by its name)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    out = [(f"truncated to {n} bytes", data[:n])
           for n in sorted({0, len(data) // 20, len(data) // 3, 2 * len(data) // 3, len(data) - 1})]
    for k in range(4):
        flipped = bytearray(data)
        for position in rng.integers(0, len(data), int(rng.integers(1, 9))):
            flipped[position] ^= int(rng.integers(1, 256))
        out.append((f"bytes flipped (draw {k})", bytes(flipped)))
    is_binary = b"\x00" in data[:4096]
    return out + (_binary_mutants(data, rng) if is_binary else _text_mutants(data, rng))


@pytest.fixture(scope="module")
def made_seeds(tmp_path_factory) -> Path:
    """Files of the types that do not ship in tests/data, written by tomopipe's own writers."""
    from test_io_movies import _write_eer
    from tomopipe.io.imod import write_defocus
    from tomopipe.io.movies import write_movie
    from tomopipe.io.mrc import write_mrc
    from tomopipe.io.star import write_tilt_series_star

    folder = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    write_mrc(folder / "stack.mrc", rng.normal(size=(3, 16, 16)).astype(np.float32), 2.5, stack=True)
    write_movie(folder / "movie.tif", rng.poisson(1.0, (3, 16, 16)).astype(np.uint8))
    _write_eer(folder / "movie.eer", [np.sort(rng.choice(256, 10, replace=False)) for _ in range(3)], 16, 16)
    angles = np.array([0.0, 3.0, -3.0])
    write_tilt_series_star(folder / "TS_01.star", pd.DataFrame({
        "rlnMicrographMovieName": [f"TS_01_{i:03d}.tif" for i in range(3)], "rlnTomoNominalStageTiltAngle": angles,
        "rlnTomoNominalTiltAxisAngle": 85.3, "rlnMicrographPreExposure": [0.0, 3.0, 6.0],
        "rlnDefocusU": [25000.0, 25100.0, 24900.0], "rlnDefocusV": [24800.0, 24900.0, 24700.0]}), tomo_name="TS_01")
    write_defocus(folder / "TS_01.defocus", pd.DataFrame({
        "start_view": [1, 2, 3], "end_view": [1, 2, 3], "tilt1_deg": angles, "tilt2_deg": angles,
        "defocus1_nm": [2500.0, 2510.0, 2490.0], "defocus2_nm": [2480.0, 2490.0, 2470.0],
        "astigmatism_angle_deg": [30.0, 31.0, 29.0]}))
    (folder / "tilt.com").write_text(TILT_COM)
    return folder


def _fuzz(seed: Path, tmp_path: Path, expected: str = "summary") -> None:
    data = seed.read_bytes()
    assert _inspect_outcome(seed) == expected  # the unmutated file
    target = tmp_path / seed.name
    failures = []
    for what, mutant in mutants(seed.name, data):
        target.write_bytes(mutant)
        try:
            _inspect_outcome(target)
        except Exception as exc:  # anything but a summary or a TomopipeError, a timeout included
            failures.append(f"{seed.name}, {what}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("relative", REAL_SEEDS)
def test_mutants_of_real_files(relative, tmp_path):
    _fuzz(SHARED_DATA / relative, tmp_path, "error" if relative in REFUSED_SEEDS else "summary")


@pytest.mark.parametrize("name", MADE_SEEDS)
def test_mutants_of_written_files(name, made_seeds, tmp_path):
    _fuzz(made_seeds / name, tmp_path)


def test_the_seeds_cover_every_reader_of_inspect(made_seeds):
    """Each file type inspect reads (the summary's file_type) is fuzzed from at least one seed."""
    seeds = [SHARED_DATA / r for r in REAL_SEEDS if r not in REFUSED_SEEDS] + [made_seeds / n for n in MADE_SEEDS]
    covered = {inspect_file(p)["file_type"] for p in seeds}
    assert {"mdoc", "mrc", "tiff_movie", "eer_movie", "star", "imod_xf", "imod_angles", "imod_model",
            "imod_defocus", "imod_com", "warp_tiltseries_xml"} <= covered


def test_damaged_imod_model_that_hung_the_reader(shared_data):
    """imodmodel loops forever on this file (reads past the end); the chunk check stops it first."""
    path = shared_data / "fuzz" / "imod_model_hangs_reader.mod"
    with pytest.raises(InputFileError, match="damaged IMOD model") as info:
        _within(lambda: inspect_file(path))
    assert str(path) in str(info.value)
