"""Figures of the report: pure functions from arrays to an inline SVG string (matplotlib's SVG
backend, no pyplot state; images inside an SVG are embedded as base64 PNG, so the SVG needs no
other file).

Conventions: tilt angles in degrees, resolutions in Å, spatial frequencies in 1/Å; images are
``[y, x]`` arrays drawn with row 0 at the bottom (+y up, as IMOD and RELION show them). Every id
inside a figure's SVG starts with the ``id_prefix`` given (one page holds many figures, and
matplotlib numbers ids from 1 in each). Artists that tests look for carry a ``gid`` (an SVG
``<g id=PREFIX-...>``): ``curve-<label>``, ``threshold-<label>``.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.patches import Circle

__all__ = ["ctf_figure", "fsc_figure", "guinier_figure", "iteration_figure", "motion_figure",
           "orthogonal_slices_figure", "per_view_figure", "scoped_ids", "score_histogram_figure", "slice_figure",
           "slug", "svg_of"]

FSC_THRESHOLDS = (0.143, 0.5)
EXCLUDED_STYLE = {"marker": "x", "color": "tab:red", "linestyle": "none", "label": "excluded"}
_TILT_CMAP = colormaps["viridis"]
#: Style of every figure: text stays text in the SVG (searchable, small), ids do not depend on chance.
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "tomopipe-report", "font.size": 8, "axes.titlesize": 9}

_ID = re.compile(r'\bid="([^"]+)"')


def slug(text: str) -> str:
    """``text`` as a piece of an HTML id: letters, digits, ``_``, ``.`` and ``-`` kept, the rest ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def scoped_ids(svg: str, prefix: str) -> str:
    """Prefix every id defined in ``svg`` (and every ``#id`` reference to it) with ``prefix-``, so that many
    SVGs can share one HTML page without their ids colliding; an id defined again gets ``-2``, ``-3``... (the
    references keep the first)."""
    defined = set(_ID.findall(svg))
    if not defined:
        return svg

    def rename(name: str) -> str:
        return f"{prefix}-{name}" if name in defined else name

    seen: dict[str, int] = {}

    def define(match) -> str:  # matplotlib names an image by its content: two equal images share an id
        name = rename(match.group(1))
        seen[name] = seen.get(name, 0) + 1
        return f'id="{name}"' if seen[name] == 1 else f'id="{name}-{seen[name]}"'

    svg = _ID.sub(define, svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{rename(m.group(1))})", svg)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{rename(m.group(1))}"', svg)


def svg_of(figure: Figure, id_prefix: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog, no DOCTYPE), text kept as text, ids scoped."""
    buffer = io.StringIO()
    with rc_context(STYLE):
        FigureCanvasSVG(figure).print_svg(buffer)
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg"):], flags=re.DOTALL)  # date, URLs
    return scoped_ids(text, slug(id_prefix))


def _styled(function):
    """Build the figure under :data:`STYLE` (font sizes are read when text is made, not when it is saved)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with rc_context(STYLE):
            return function(*args, **kwargs)
    return wrapper


def _figure(width_in: float = 6.0, height_in: float = 3.2, ncols: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _mark_excluded(axis, x: np.ndarray, y: np.ndarray, enabled: np.ndarray) -> None:
    if (~enabled).any():
        axis.plot(x[~enabled], y[~enabled], **EXCLUDED_STYLE)


@_styled
def motion_figure(traces: Mapping[float, np.ndarray], tilt_angles_deg: np.ndarray, total_A: np.ndarray,
                  id_prefix: str) -> str:
    """Left: each tilt's frame trajectory (``traces[tilt_angle_deg]``: ``[frames, 2]`` shifts (x, y) in Å,
    first frame marked), coloured by tilt angle; right: the total motion per tilt (Å) against tilt angle."""
    figure, (paths, totals) = _figure(7.5, 3.2, 2)
    angles = np.array(sorted(traces), float)
    low = float(angles.min()) if len(angles) else 0.0
    span = max(float(np.ptp(angles)), 1e-6) if len(angles) else 1.0
    for angle in angles:
        shifts = np.asarray(traces[angle], float).reshape(-1, 2)
        colour = _TILT_CMAP((angle - low) / span)
        paths.plot(shifts[:, 0], shifts[:, 1], "-", color=colour, lw=0.8)
        paths.plot(shifts[:1, 0], shifts[:1, 1], "o", color=colour, ms=2.5)
    paths.set(xlabel="shift x (Å)", ylabel="shift y (Å)", title="frame trajectories (o: first frame)", aspect="equal")
    tilt = np.asarray(tilt_angles_deg, float)
    order = np.argsort(tilt)
    totals.plot(tilt[order], np.asarray(total_A, float)[order], ".-", gid="curve-motion-total")
    totals.set(xlabel="tilt angle (°)", ylabel="total motion (Å)", title="motion per tilt")
    return svg_of(figure, id_prefix)


@_styled
def ctf_figure(tilt_angles_deg: np.ndarray, defocus_u_A: np.ndarray, defocus_v_A: np.ndarray,
               enabled: np.ndarray, id_prefix: str) -> str:
    """Defocus (mean of u and v, µm, underfocus positive) and astigmatism (|u − v|, Å) against tilt angle,
    excluded views marked with a red x."""
    figure, (defocus, astigmatism) = _figure(7.5, 3.0, 2)
    tilt, enabled = np.asarray(tilt_angles_deg, float), np.asarray(enabled, bool)
    u, v = np.asarray(defocus_u_A, float), np.asarray(defocus_v_A, float)
    order = np.argsort(tilt)
    for axis, values, label, name in ((defocus, 0.5 * (u + v) / 1e4, "defocus (µm)", "defocus"),
                                      (astigmatism, np.abs(u - v), "astigmatism |u − v| (Å)", "astigmatism")):
        axis.plot(tilt[order], values[order], ".-", gid=f"curve-{name}")
        _mark_excluded(axis, tilt, values, enabled)
        axis.set(xlabel="tilt angle (°)", ylabel=label)
    if (~enabled).any():
        defocus.legend(loc="best")
    return svg_of(figure, id_prefix)


@_styled
def per_view_figure(tilt_angles_deg: np.ndarray, values: np.ndarray, enabled: np.ndarray, ylabel: str,
                    title: str, id_prefix: str) -> str:
    """One per-view quantity against tilt angle (NaN views left as gaps), excluded views marked."""
    figure, (axis,) = _figure(5.0, 2.8)
    tilt, values, enabled = np.asarray(tilt_angles_deg, float), np.asarray(values, float), np.asarray(enabled, bool)
    order = np.argsort(tilt)
    axis.plot(tilt[order], values[order], ".-", gid="curve-per-view")
    _mark_excluded(axis, tilt, values, enabled)
    if (~enabled).any():
        axis.legend(loc="best")
    axis.set(xlabel="tilt angle (°)", ylabel=ylabel, title=title)
    return svg_of(figure, id_prefix)


def _image(axis, image: np.ndarray) -> None:
    """Draw ``image`` ``[y, x]`` in grey, row 0 at the bottom, contrast clipped to the 0.5–99.5 percentiles
    of its finite values."""
    image = np.asarray(image, np.float32)
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    axis.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=high if high > low else low + 1,
                interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


@_styled
def slice_figure(image: np.ndarray, circles_px: np.ndarray, title: str, xlabel: str, ylabel: str,
                 id_prefix: str) -> str:
    """A tomogram slice ``[rows, columns]`` with circles (``[n, 3]``: column, row, radius in pixels of
    ``image``); circle i carries the gid ``pick-i``."""
    rows, columns = np.asarray(image).shape
    width_in = 6.0
    figure, (axis,) = _figure(width_in, min(8.0, max(1.6, width_in * rows / columns + 0.5)))
    _image(axis, image)
    for index, (column, row, radius) in enumerate(np.asarray(circles_px, float).reshape(-1, 3)):
        axis.add_patch(Circle((column, row), radius, fill=False, color="yellow", lw=0.8, gid=f"pick-{index}"))
    axis.set(xlim=(-0.5, columns - 0.5), ylim=(-0.5, rows - 0.5), xlabel=xlabel, ylabel=ylabel, title=title)
    return svg_of(figure, id_prefix)


@_styled
def score_histogram_figure(background: np.ndarray, picks: np.ndarray, threshold: float | None, title: str,
                           id_prefix: str) -> str:
    """Histogram (log counts) of the score map's values (``background``; may be empty) and of the picks'
    scores, the threshold (when known) as a dashed line."""
    figure, (axis,) = _figure(5.5, 3.0)
    values = np.asarray(background, float).reshape(-1)
    values = values[np.isfinite(values)]
    picks = np.asarray(picks, float).reshape(-1)
    picks = picks[np.isfinite(picks)]
    every = np.concatenate([values, picks, [] if threshold is None else [float(threshold)]])
    low, high = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 80)
    if values.size:
        axis.hist(values, bins=bins, color="0.6", label="score map", log=True)
    axis.hist(picks, bins=bins, color="tab:blue", alpha=0.8, label="picks", log=True)
    if threshold is not None:
        axis.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.3g}", gid="threshold-pick")
    axis.set(xlabel="score", ylabel="count", title=title)
    axis.legend(loc="best")
    return svg_of(figure, id_prefix)


@_styled
def fsc_figure(frequencies_per_A: np.ndarray, curves: Mapping[str, np.ndarray], title: str, id_prefix: str,
               resolutions_A: Mapping[str, float] | None = None) -> str:
    """FSC curves against spatial frequency (1/Å; top axis in Å) with the 0.143 and 0.5 lines; shell 0
    (the mean) is left out. ``resolutions_A`` (by curve label) are marked with a dotted vertical line and
    written in the legend."""
    figure, (axis,) = _figure(6.0, 3.4)
    k = np.asarray(frequencies_per_A, float)
    resolutions_A = resolutions_A or {}
    for label, curve in curves.items():
        curve = np.asarray(curve, float)[:len(k)]
        shown = label if label not in resolutions_A else f"{label}: {resolutions_A[label]:.2f} Å"
        line, = axis.plot(k[1:len(curve)], curve[1:], "-", lw=1.2, label=shown, gid=f"curve-{slug(label)}")
        if label in resolutions_A and resolutions_A[label] > 0:
            axis.axvline(1.0 / resolutions_A[label], color=line.get_color(), ls=":", lw=0.8)
    for value in FSC_THRESHOLDS:
        axis.axhline(value, color="0.4", ls=":", lw=0.8, gid=f"threshold-{value}")
        axis.text(k[-1], value, f" {value}", va="center", fontsize=7)
    axis.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), xlim=(0, k[-1]), title=title)
    top = axis.secondary_xaxis("top")  # the same frequencies, labelled as resolutions (1/0 has no place)
    ticks = np.linspace(0.0, k[-1], 6)[1:]
    top.set_xticks(ticks, labels=[f"{1.0 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    axis.legend(loc="lower left")
    return svg_of(figure, id_prefix)


@_styled
def iteration_figure(iterations: Sequence[int], resolution_A: Sequence[float], title: str, id_prefix: str,
                     ylabel: str = "resolution (Å)") -> str:
    """Resolution (Å) per iteration."""
    figure, (axis,) = _figure(4.5, 2.8)
    axis.plot(iterations, resolution_A, "o-", ms=3, gid="curve-resolution")
    axis.set(xlabel="iteration", ylabel=ylabel, title=title)
    return svg_of(figure, id_prefix)


@_styled
def orthogonal_slices_figure(volume: np.ndarray, title: str, id_prefix: str) -> str:
    """The central XY, XZ and YZ sections of a ``[z, y, x]`` map (centre voxel ``n // 2``)."""
    volume = np.asarray(volume)
    nz, ny, nx = volume.shape
    figure, axes = _figure(7.5, 2.8, 3)
    sections = ((volume[nz // 2], "XY (z centre)"), (volume[:, ny // 2, :], "XZ (y centre)"),
                (volume[:, :, nx // 2], "YZ (x centre)"))
    for axis, (section, label) in zip(axes, sections):
        _image(axis, section)
        axis.set_title(label)
    figure.suptitle(title)
    return svg_of(figure, id_prefix)


@_styled
def guinier_figure(inv_resolution_sq_per_A2: np.ndarray, ln_amplitude: np.ndarray, fit_used: np.ndarray,
                   slope_A2: float, intercept: float, title: str, id_prefix: str) -> str:
    """ln of the mean |F| per shell against 1/d² (1/Å²; shell 0 left out), the shells of the fit highlighted
    and the fitted line with its B-factor (4 × slope, Å²)."""
    figure, (axis,) = _figure(5.5, 3.0)
    k2 = np.asarray(inv_resolution_sq_per_A2, float)
    ln_f = np.asarray(ln_amplitude, float)
    used = np.asarray(fit_used, bool)
    axis.plot(k2[1:], ln_f[1:], ".-", color="0.5", lw=0.8, ms=3, label="ln |F|", gid="curve-guinier")
    axis.plot(k2[used], ln_f[used], "o", color="tab:blue", ms=3, label="fitted shells")
    axis.plot(k2[used], intercept + slope_A2 * k2[used], "-", color="tab:red",
              label=f"fit, B = {4 * slope_A2:.0f} Å²", gid="curve-guinier-fit")
    axis.set(xlabel="1/d² (1/Å²)", ylabel="ln |F|", title=title)
    axis.legend(loc="best")
    return svg_of(figure, id_prefix)
