"""AreTomo alignment files (``.aln``, AreTomo 1.x, AreTomo2, AreTomo3), read as AreTomo reads them.

Layout (writers: AreTomo2 ``MrcUtil/CSaveAlnFile.cpp``, AreTomo3
``AreTomo/MrcUtil/CSaveAlignFile.cpp``; readers: ``CLoadAlnFile`` / ``CLoadAlignFile``)::

    # AreTomo Alignment / Priims bprmMn
    # RawSize = NX NY NZ              input stack: pixels, views (dark ones included)
    # NumPatches = P                  local-alignment patches (0: global alignment only)
    # DarkFrame =  I  S  TILT         one line per view AreTomo removed as dark
    # AlphaOffset = A                 AreTomo3 only: tilt offset added to TILT
    # BetaOffset = B                  AreTomo3 only
    # Thickness = T                   AreTomo3 only: specimen thickness (pixels)
    # SEC  ROT  GMAG  TX  TY  SMEAN  SFIT  SCALE  BASE  TILT
    one row per kept view, in ascending tilt
    # Local Alignment
    P rows per kept view: VIEW PATCH X Y SX SY GOOD

Meaning of the columns (``notes/conventions.md`` §7 frame: x = fast axis, angles CCW):

* ``ROT``: the view's tilt-axis angle in degrees, CCW from +y: RELION 5's ``rlnTomoZRot``
  (3dem/relion ``align_tilt_series/aretomo/utils.py`` reads ZRot = ROT, YTilt = TILT, XTilt = 0
  and the shifts in Å = (TX, TY) × the pixel size of the stack given to AreTomo).
* ``TX, TY``: specimen shift in pixels of the input stack (the size in ``RawSize``), applied
  after the rotation: AreTomo's own IMOD export (AreTomo2 ``ImodUtil/CSaveXF.cpp``) writes the
  ``.xf`` ``A = R2(−ROT)``, ``D = A·(−TX, −TY)``, which is
  :func:`tomopipe.algorithms.geometry.xf_from_alignment` of ``(ROT, (TX, TY))``; so ROT is
  tomopipe's ``rot_z_deg`` and (TX, TY) its ``shift_x/y`` in those pixels, both about the
  image centre as in IMOD (``GShiftRotate2D.cu``: centre ``(N − 1) / 2``).
* ``TILT``: tilt angle in degrees with the IMOD/SerialEM sign (``rot_y_deg``), the alpha
  (tilt) offset included when AreTomo corrected it (AreTomo3 ``CAlignParam::AddAlphaOffset``
  adds it to every tilt and records it as ``AlphaOffset``; AreTomo2 ``-TiltCor`` adds it
  without recording it).
* ``GMAG``: image magnification; every AreTomo version writes 1.0.
  ``SMEAN SFIT SCALE BASE`` are written as the constants 1, 1, 1, 0.
* ``SEC``: the view's section; its meaning changed between versions (0-based position in the
  raw stack in AreTomo 1.x/2, 1-based in AreTomo3 — whose reader converts older files,
  ``CLoadAlignFile::mToOneBased``: "older version is zero based" — and some AreTomo3 builds
  number the views after removing the dark ones). Rows are therefore tied to views by tilt
  order (:meth:`AlnFile.view_positions`), not by SEC.
* ``DarkFrame = I S TILT``: ``I`` = the view's 0-based position among all views sorted by
  tilt ("When tilt images are sorted by tilt angles, iDarkFm shows which tilt image is dark"),
  ``S`` its section (AreTomo3 ``CDarkFrames::AddDark``: "iFrmIdx is zero based, iSecIdx is 1
  based"; 0-based in older files), ``TILT`` its tilt angle (AreTomo3: as acquired; AreTomo2
  adds the tilt offset to it too, ``CDarkFrames::AddTiltOffset``).
* ``AlphaOffset`` / ``BetaOffset``: recorded "for determine per-particle defocus" (AreTomo3
  comment); BetaOffset does not enter the projection geometry (TomoBabel/cets-aretomo3
  ``to_cets.py``: "CTF-only in AreTomo3").
* Local alignment: per kept view and patch, the patch centre (``X, Y``, pixels from the image
  centre), its residual shift (``SX, SY``) and whether it was reliable (``GOOD``).

Some AreTomo3 builds write a stray first line (``Hello``) before the header: text before the
``# AreTomo Alignment`` line is skipped, as AreTomo's own reader skips lines it cannot parse.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tomopipe.errors import InputFileError

GLOBAL_COLUMNS = ("sec", "rot_deg", "gmag", "tx_px", "ty_px", "smean", "sfit", "scale", "base", "tilt_deg")
LOCAL_COLUMNS = ("view", "patch", "x_px", "y_px", "shift_x_px", "shift_y_px", "good")
_HEADER = "# AreTomo Alignment"
_MAX_LINES_BEFORE_HEADER = 5


@dataclass(frozen=True)
class AlnFile:
    """The content of an ``.aln`` file. ``global_alignment``: one row per kept view (columns
    :data:`GLOBAL_COLUMNS`, ascending tilt); ``dark_frames``: ``tilt_position`` (0-based among
    all views sorted by tilt), ``section``, ``tilt_deg``; ``local_alignment``: columns
    :data:`LOCAL_COLUMNS` (empty without patches). ``alpha_offset_deg``, ``beta_offset_deg``,
    ``thickness_px`` are None when the file has no such line."""

    path: Path
    raw_size_px: tuple[int, int, int]
    num_patches: int
    dark_frames: pd.DataFrame
    global_alignment: pd.DataFrame
    local_alignment: pd.DataFrame
    alpha_offset_deg: float | None
    beta_offset_deg: float | None
    thickness_px: float | None

    @property
    def n_views(self) -> int:
        """Views of the input stack, dark ones included."""
        return self.raw_size_px[2]

    def view_positions(self) -> np.ndarray:
        """For each row of ``global_alignment``, the 0-based position of its view among all
        views sorted by tilt: the positions that are not dark, in order."""
        return np.setdiff1d(np.arange(self.n_views), self.dark_frames["tilt_position"].to_numpy(int))


def _numbers(path: Path, number: int, text: str, count: int, what: str) -> list[float]:
    fields = text.split()
    try:
        values = [float(f) for f in fields]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputFileError(path, f"line {number}: expected {count} finite numbers ({what}), got {text.strip()!r}")
    return values


def _tag(line: str, tag: str) -> str | None:
    """The text after ``# TAG =`` on a header line, else None."""
    match = re.match(rf"#\s*{tag}\s*=(.*)$", line.strip())
    return match.group(1) if match else None


def _lines_after_header(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        raise InputFileError(path, "file not found")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc})") from exc
    for i, line in enumerate(lines[:_MAX_LINES_BEFORE_HEADER + 1]):
        if line.strip().startswith(_HEADER):
            return [(n + 1, text) for n, text in enumerate(lines) if n > i and text.strip()]
    raise InputFileError(path, f"not an AreTomo alignment file: no {_HEADER!r} line at the top")


def read_aln(path: str | os.PathLike) -> AlnFile:
    """Read an AreTomo ``.aln`` (see the module docstring). Raises InputFileError naming the
    file and line for anything AreTomo would not read back: no RawSize, rows that are not 10
    numbers, a number of rows other than ``RawSize`` views − dark frames, local-alignment rows
    that are not ``NumPatches`` per view, dark-frame positions outside the stack or repeated."""
    path = Path(path)
    raw_size = None
    scalars: dict[str, float] = {}
    darks, rows, local = [], [], []
    section = "header"
    for number, line in _lines_after_header(path):
        text = line.strip()
        if text.startswith("#"):
            if re.match(r"#\s*SEC\s", text):
                section = "global"
            elif text.lower().startswith("# local alignment"):
                section = "local"
            elif (value := _tag(text, "RawSize")) is not None:
                size = _numbers(path, number, value, 3, "RawSize: nx ny views")
                if min(size) < 1 or any(v != int(v) for v in size):
                    raise InputFileError(path, f"line {number}: RawSize must be 3 positive integers, "
                                               f"got {value.strip()!r}")
                raw_size = tuple(int(v) for v in size)
            elif (value := _tag(text, "DarkFrame")) is not None:
                darks.append(_numbers(path, number, value, 3, "DarkFrame: tilt position, section, tilt"))
            else:
                for tag in ("NumPatches", "AlphaOffset", "BetaOffset", "Thickness"):
                    if (value := _tag(text, tag)) is not None:
                        scalars[tag] = _numbers(path, number, value, 1, tag)[0]
            continue
        if section == "global":
            rows.append(_numbers(path, number, text, 10, " ".join(c.upper() for c in GLOBAL_COLUMNS)))
        elif section == "local":
            local.append(_numbers(path, number, text, 7, "view patch x y shift_x shift_y good"))
        else:
            raise InputFileError(path, f"line {number}: data before the '# SEC ...' column header: {text!r}")
    if raw_size is None:
        raise InputFileError(path, "no '# RawSize = nx ny views' line (AreTomo needs it to read the file back)")
    n_patches = scalars.get("NumPatches", 0.0)
    if n_patches < 0 or n_patches != int(n_patches):
        raise InputFileError(path, f"NumPatches must be a whole number >= 0, got {n_patches}")
    dark = pd.DataFrame(darks, columns=["tilt_position", "section", "tilt_deg"]).astype(
        {"tilt_position": int, "section": int, "tilt_deg": float})
    positions = dark["tilt_position"].to_numpy(int)
    if len(positions) and (positions.min() < 0 or positions.max() >= raw_size[2]
                           or len(set(positions)) < len(positions)):
        raise InputFileError(path, f"DarkFrame tilt positions {positions.tolist()} are not distinct views of the "
                                   f"{raw_size[2]} in RawSize")
    if len(rows) != raw_size[2] - len(dark):
        raise InputFileError(path, f"{len(rows)} alignment rows, but RawSize has {raw_size[2]} views and "
                                   f"{len(dark)} are dark: {raw_size[2] - len(dark)} rows expected")
    if len(local) != int(n_patches) * len(rows):
        raise InputFileError(path, f"{len(local)} local-alignment rows; NumPatches {int(n_patches)} x {len(rows)} "
                                   f"views = {int(n_patches) * len(rows)} expected")
    table = pd.DataFrame(rows, columns=list(GLOBAL_COLUMNS)).astype({"sec": int})
    if not table["tilt_deg"].is_monotonic_increasing:  # AreTomo sorts the views by tilt before writing
        i = int(np.flatnonzero(np.diff(table["tilt_deg"].to_numpy()) < 0)[0])
        raise InputFileError(path, f"alignment rows are not in ascending tilt (row {i + 2}: {table['tilt_deg'][i + 1]} "
                                   f"after {table['tilt_deg'][i]}), as AreTomo writes them")
    return AlnFile(path=path, raw_size_px=raw_size, num_patches=int(n_patches), dark_frames=dark,
                   global_alignment=table,
                   local_alignment=pd.DataFrame(local, columns=list(LOCAL_COLUMNS)).astype({"view": int, "patch": int}),
                   alpha_offset_deg=scalars.get("AlphaOffset"), beta_offset_deg=scalars.get("BetaOffset"),
                   thickness_px=scalars.get("Thickness"))
