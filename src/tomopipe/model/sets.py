"""The kinds of set a project holds, each declared once with its item columns.

A :class:`SetKind` names a kind (the string stored in the project and used by step ports) and
lists its :class:`Column` s: ``required`` columns are written by every producer of the kind,
the others by some. Dtypes are kinds, not exact types: ``"float"``, ``"int"``, ``"bool"``,
``"str"``. Units follow the column names (``_A`` ångström, ``_deg`` degrees, ``_px`` pixels).
Every set has an ``enabled`` column (bool), added by the store when a producer writes none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types

DTYPES = ("float", "int", "bool", "str")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    unit: str = ""
    required: bool = True
    description: str = ""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"column {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")

    def optional(self) -> "Column":
        """The same column, not required."""
        return Column(self.name, self.dtype, self.unit, False, self.description)

    def accepts(self, values: pd.Series) -> bool:
        """Whether ``values`` has this column's dtype kind. An all-missing column passes (a
        merge fills absent values with NaN); whole-number floats pass as ``int`` for the same reason."""
        present = values.dropna()
        if present.empty:
            return True
        if self.dtype == "bool":
            return types.is_bool_dtype(values) or (values.dtype == object and
                                                   all(isinstance(v, (bool, np.bool_)) for v in present))
        if types.is_bool_dtype(values):
            return False
        if self.dtype == "float":
            return types.is_float_dtype(values) or types.is_integer_dtype(values)
        if self.dtype == "int":
            return types.is_integer_dtype(values) or (
                types.is_float_dtype(values) and bool(np.all(np.mod(present.to_numpy(np.float64), 1.0) == 0.0)))
        return types.is_string_dtype(values) or (values.dtype == object and
                                                 all(isinstance(v, str) for v in present))


ENABLED = Column("enabled", "bool", required=False,  # the store adds it (all True) when a producer writes none
                 description="whether later steps use the item")


@dataclass(frozen=True)
class SetKind:
    name: str
    description: str
    columns: tuple[Column, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def problems(self, items: pd.DataFrame) -> list[str]:
        """What makes ``items`` not a set of this kind: missing required columns and declared
        columns of the wrong dtype kind (undeclared columns are allowed)."""
        found = [f"missing required column {name!r}" for name in self.required if name not in items.columns]
        for column in self.columns:
            if column.name in items.columns and not column.accepts(items[column.name]):
                found.append(f"column {column.name!r} has dtype {items[column.name].dtype}, "
                             f"expected {column.dtype}")
        return found


def names(columns: tuple[Column, ...]) -> tuple[str, ...]:
    return tuple(c.name for c in columns)


# ---------------------------------------------------------------- column groups
TILT_VIEW_COLUMNS = (
    Column("ts_id", "str", description="tilt-series identifier (the mdoc's name)"),
    Column("tilt_index", "int", description="0-based index of the view in the tilt series, by tilt angle"),
    Column("tilt_angle_deg", "float", "deg", description="nominal stage tilt"),
)
DOSE_COLUMNS = (
    Column("acquisition_order", "int", description="0-based order in which the view was exposed"),
    Column("z_value", "int", description="the view's section in the mdoc"),
    Column("dose_e_per_A2", "float", "e/Å²", description="dose of this view"),
    Column("pre_exposure_e_per_A2", "float", "e/Å²", description="dose received before this view"),
    Column("accumulated_dose_e_per_A2", "float", "e/Å²", description="dose received by the end of this view"),
    Column("date_time", "str", required=False, description="acquisition time from the mdoc"),
    Column("target_defocus_um", "float", "µm", required=False, description="defocus the microscope aimed at"),
)
MOVIE_COLUMNS = (
    Column("movie_path", "str", description="the view's movie (stored path)"),
    Column("frame_count", "int", description="frames in the movie"),
)
IMAGE_COLUMNS = (
    Column("image_path", "str", description="MRC stack holding the view (stored path)"),
    Column("image_section", "int", description="0-based section of the view in image_path"),
)
HALF_SET_COLUMNS = (
    Column("image_even_path", "str", required=False, description="stack of the even-frame sums, same sections"),
    Column("image_odd_path", "str", required=False, description="stack of the odd-frame sums, same sections"),
)
MOTION_COLUMNS = (
    Column("motion_path", "str", required=False, description="motion model document (JSON) of the tilt series"),
    Column("motion_total_A", "float", "Å", required=False, description="length of the frame trajectory"),
    Column("motion_iterations", "int", required=False, description="iterations of the motion fit"),
    Column("motion_significant", "bool", required=False, description="whether the motion was above the noise"),
    Column("frame_outlier_pixels", "int", required=False, description="pixels replaced as frame outliers"),
)
XRAY_COLUMNS = (
    Column("xray_pixels", "int", required=False, description="pixels erased as X-ray hits"),
    Column("xray_patches", "int", required=False, description="connected X-ray patches erased"),
    Column("xray_table_path", "str", required=False, description="table of erased hits (stored path)"),
)
# RELION 5 semantics: x_img = m·[Rz·Ry·Rx·X]_xy + shift; shifts in Å from the image centre N//2;
# excluded views keep NaN. See model/alignment.py.
ALIGNMENT_REQUIRED = (
    Column("rot_z_deg", "float", "deg", description="in-plane rotation of the tilt axis"),
    Column("rot_y_deg", "float", "deg", description="refined tilt"),
    Column("shift_x_A", "float", "Å", description="specimen shift along x"),
    Column("shift_y_A", "float", "Å", description="specimen shift along y"),
)
ALIGNMENT_OPTIONAL = (
    Column("rot_x_deg", "float", "deg", required=False, description="rotation about x"),
    Column("magnification", "float", required=False, description="image scale m of the view"),
    Column("align_residual_px", "float", "px", required=False, description="fit residual of the view"),
    Column("align_view_method", "str", required=False, description="how the view was aligned"),
)
ALIGNMENT_COLUMNS = ALIGNMENT_REQUIRED + ALIGNMENT_OPTIONAL
ALIGNMENT_REQUIRED_NAMES = names(ALIGNMENT_REQUIRED)  # what reconstruct and the IMOD export need
# The geometric part: what an alignment transfers between sets (not its diagnostics); NaN when excluded.
ALIGNMENT_GEOMETRY = ALIGNMENT_REQUIRED_NAMES + ("rot_x_deg", "magnification")
ALIGNED_IMAGE_COLUMNS = (
    Column("aligned_image_path", "str", required=False, description="stack of the aligned views (stored path)"),
    Column("aligned_image_section", "int", required=False, description="section of the view in it"),
)
DEFOCUS_COLUMNS = (
    Column("defocus_u_A", "float", "Å", description="major defocus, underfocus positive"),
    Column("defocus_v_A", "float", "Å", description="minor defocus"),
    Column("defocus_angle_deg", "float", "deg", description="angle of the major axis from x"),
)
DEFOCUS_NAMES = names(DEFOCUS_COLUMNS)
CTF_FIT_COLUMNS = (
    Column("phase_shift_deg", "float", "deg", required=False, description="phase-plate shift"),
    Column("fit_resolution_A", "float", "Å", required=False, description="resolution the fit reaches"),
    Column("fit_score", "float", required=False, description="fit quality"),
    Column("defocus_hand", "int", required=False, description="defocus gradient hand (+1/−1)"),
    Column("defocus_grid_A", "str", required=False, description="per-patch defocus grid (JSON)"),
    Column("diagnostic_path", "str", required=False, description="stack of fit diagnostics (stored path)"),
    Column("diagnostic_section", "int", required=False, description="section of the view in it"),
)

# ---------------------------------------------------------------- kinds
TILT_SERIES_MOVIES = SetKind(
    "tilt_series_movies", "one item per tilt: the movie and its dose, from an mdoc",
    TILT_VIEW_COLUMNS + DOSE_COLUMNS + MOVIE_COLUMNS + (ENABLED,))
TILT_SERIES = SetKind(
    "tilt_series", "one item per view: its image section, dose, and (once aligned) its alignment",
    TILT_VIEW_COLUMNS + IMAGE_COLUMNS + tuple(c.optional() for c in DOSE_COLUMNS) + HALF_SET_COLUMNS
    + MOTION_COLUMNS + XRAY_COLUMNS + tuple(c.optional() for c in ALIGNMENT_COLUMNS) + ALIGNED_IMAGE_COLUMNS
    + (ENABLED,))
CTF = SetKind(
    "ctf", "one item per view: its CTF estimate",
    TILT_VIEW_COLUMNS[:2] + (TILT_VIEW_COLUMNS[2].optional(),) + DEFOCUS_COLUMNS + CTF_FIT_COLUMNS + (ENABLED,))
TOMOGRAMS = SetKind(
    "tomograms", "one item per tilt series: its reconstructed volume",
    (Column("ts_id", "str", description="tilt series the volume was reconstructed from"),
     Column("tomogram_path", "str", description="MRC volume (stored path)"),
     Column("voxel_size_A", "float", "Å", description="voxel size"),
     Column("size_x_px", "int", "px", description="volume size along x"),
     Column("size_y_px", "int", "px", description="volume size along y"),
     Column("size_z_px", "int", "px", description="volume size along z (thickness)"),
     ENABLED))
PARTICLES = SetKind(
    "particles", "one item per picked particle: its position and orientation in a tomogram",
    (Column("ts_id", "str", description="tilt series (and tomogram) of the particle"),
     Column("x_A", "float", "Å", description="x from the tomogram centre"),
     Column("y_A", "float", "Å", description="y from the tomogram centre"),
     Column("z_A", "float", "Å", description="z from the tomogram centre"),
     Column("rot_deg", "float", "deg", description="RELION ZYZ Euler angle rot"),
     Column("tilt_deg", "float", "deg", description="RELION ZYZ Euler angle tilt"),
     Column("psi_deg", "float", "deg", description="RELION ZYZ Euler angle psi"),
     Column("score", "float", description="picking score (higher is better)"),
     Column("half_set", "int", description="1 or 2: the independent half of the data set"),
     ENABLED))

SUBTOMOGRAMS = SetKind(
    "subtomograms", "one item per extracted particle: its pseudo-subtomogram (RELION 5): the CTF-premultiplied "
                    "crops of its tilts (2-D) or their Fourier insertion (3-D), with the particle's pose. The "
                    "set's attributes hold 'extraction' (dimensions 2 or 3, pixel_size_A, binning, box_px, "
                    "crop_px, ...) and, per tilt series, the tilt geometry the crops were cut with",
    (*PARTICLES.columns,
     Column("data_path", "str", description="MRC file holding the particle's data (stored path)"),
     Column("data_section", "int", description="0-based first section of the particle in data_path"),
     Column("n_sections", "int", description="sections of the particle: its tilts (2-D) or the box (3-D)"),
     Column("tilts_used", "str", description="per tilt of the geometry, '1' when the crop is used, else '0'"),
     Column("weights_path", "str", required=False,
            description="3-D: MRC of the CTF² weights and multiplicity volumes (stored path)"),
     *(Column(f"origin_{axis}_A", "float", "Å", required=False,
              description=f"RELION rlnOrigin{axis.upper()}Angst: the particle's centre is the position minus the "
                          f"origin (tomogram frame); the crops are cut at the position")
       for axis in "xyz")))
MAPS = SetKind(
    "maps", "one item per map: half maps, the full map, post-processed maps, masks",
    (Column("map_name", "str", description="half1, half2, full, masked, sharpened, mask, ..."),
     Column("map_path", "str", description="MRC volume (stored path)"),
     Column("voxel_size_A", "float", "Å", description="voxel size"),
     Column("box_px", "int", "px", description="cubic box size"),
     ENABLED))

SET_KINDS = {kind.name: kind for kind in (TILT_SERIES_MOVIES, TILT_SERIES, CTF, TOMOGRAMS, PARTICLES, SUBTOMOGRAMS,
                                          MAPS)}


def set_kind(name: str) -> SetKind | None:
    """The declared kind called ``name``, or None."""
    return SET_KINDS.get(name)
