"""Assemble the report page from :class:`~tomopipe.report.collect.ReportData`: a table of contents, the runs
(status, time, outputs, errors), per tilt series its figures, picking, each map-making run (FSC, resolution per
iteration, map sections, Guinier plot), the parameters of every step, the methods paragraph and its references.

The page is one self-contained HTML5 document: inline CSS, inline SVG figures (images inside them as base64
PNG), no script, no link to any other file or URL (``href`` only to ``#anchors`` of the page). Every figure is a
``<figure id="KIND-NAME">`` with a stable id: ``motion-TS``, ``ctf-TS``, ``ctf-fit-TS``, ``alignment-TS``,
``tomogram-xy-TS``, ``tomogram-xz-TS``, ``picking-RUN-TS``, ``fsc-RUN``, ``fsc-iterations-RUN``, ``iterations-RUN``,
``map-RUN``, ``guinier-RUN`` (TS a tilt series, RUN a step name, both through :func:`~tomopipe.report.figures.slug`).
"""

from __future__ import annotations

import datetime
import html
import json

import numpy as np

from tomopipe.report import figures
from tomopipe.report.collect import MapView, PickingView, ReportData, TiltSeriesView
from tomopipe.report.figures import slug
from tomopipe.report.methods import methods

__all__ = ["render", "resolution_text"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:70em;padding:1em 2em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figure svg{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555;max-width:40em}.failed{color:#b00020;font-weight:bold}
.status-finished{color:#1b7f2a}.status-failed,.status-killed{color:#b00020;font-weight:bold}
.status-running{color:#a66b00}nav ol{columns:2}code{font-size:.9em}.note{color:#666;font-size:.9em}
details{margin:.3em 0}summary{cursor:pointer}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, float):
        return "NaN" if not np.isfinite(value) else f"{value:.4g}"
    return _e(value)


def _figure(figure_id: str, svg: str, caption: str) -> str:
    return f'<figure id="{_e(figure_id)}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_number(v)}</td>' if i in numeric else f"<td>{v}</td>" for i, v in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def resolution_text(value_A: float) -> str:
    """How the report writes a resolution: two decimals and the unit."""
    return f"{value_A:.2f} Å"


# ----------------------------------------------------------------------------- sections
def _time(timestamp) -> str:
    if not timestamp:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _runs_section(data: ReportData) -> str:
    rows = []
    for run in data.runs:
        outputs = data.outputs.get(run.id, {})
        made = ", ".join(f"{_e(name)} ({record.n_items})" for name, record in outputs.items())
        shown = data.shown.get(run.name) is run
        rows.append([run.id, _e(run.name) + ("" if shown else " <span class='note'>(superseded)</span>"),
                     _e(run.step_type), f'<span class="status-{_e(run.status)}">{_e(run.status)}</span>',
                     _e(_time(run.started_at)), run.elapsed_s if run.elapsed_s is not None else "", made,
                     _e(run.error or "")])
    failed = [run for run in data.shown.values() if run.status in ("failed", "killed")]
    text = ""
    if failed:
        text = "<p class='failed'>" + "; ".join(f"{_e(run.name)} ({_e(run.step_type)}) {_e(run.status)}: "
                                                  f"{_e(run.error or 'no message')}" for run in failed) + "</p>"
    return (f'<section id="runs"><h2>Runs</h2>{text}' + _table(
        ["id", "name", "step type", "status", "started (UTC)", "time (s)", "outputs (items)", "error"], rows, {0, 5})
        + "</section>")


def _scores_section(data: ReportData) -> str:
    if not data.scores:
        return ""
    rows = [[_e(r.get("step", "")), _e(r.get("subject", "")), _e(r.get("score", "")), r.get("value"),
             _e(r.get("unit", "") or ""), _e(r.get("goal") or ""),
             {True: "✓", False: "✗"}.get(r.get("met"), "—")] for r in data.scores]
    return ('<section id="scores"><h2>Scores against the simulator\'s truth</h2><p class="note">From the demo\'s '
            'scores.json beside the project.</p>'
            + _table(["step", "subject", "score", "value", "unit", "goal", "met"], rows, {3}) + "</section>")


def _tilt_series_section(view: TiltSeriesView) -> str:
    ts = slug(view.ts_id)
    parts = [f'<section id="ts-{ts}"><h3>Tilt series {_e(view.ts_id)}</h3>']
    if view.motion is not None:
        m = view.motion
        parts.append(_figure(f"motion-{ts}", figures.motion_figure(m["traces"], m["tilt_angle_deg"], m["total_A"],
                                                                   f"motion-{ts}"),
                             f"{view.ts_id}: frame trajectories and total motion per tilt."))
    if view.ctf is not None:
        c = view.ctf
        excluded = int((~c["enabled"]).sum())
        parts.append(_figure(f"ctf-{ts}", figures.ctf_figure(c["tilt_angle_deg"], c["defocus_u_A"], c["defocus_v_A"],
                                                             c["enabled"], f"ctf-{ts}"),
                             f"{view.ts_id}: defocus and astigmatism against tilt; {excluded} excluded view(s) "
                             f"marked ×."))
        if c["fit_resolution_A"] is not None and np.isfinite(c["fit_resolution_A"]).any():
            parts.append(_figure(f"ctf-fit-{ts}", figures.per_view_figure(
                c["tilt_angle_deg"], c["fit_resolution_A"], c["enabled"], "CTF fit resolution (Å)",
                "CTF fit resolution", f"ctf-fit-{ts}"), f"{view.ts_id}: resolution the CTF fit reaches per tilt."))
    if view.alignment is not None:
        a = view.alignment
        parts.append(_figure(f"alignment-{ts}", figures.per_view_figure(
            a["tilt_angle_deg"], a["residual_px"], a["enabled"], "residual (px, aligned binning)",
            "alignment residual per view", f"alignment-{ts}"), f"{view.ts_id}: alignment fit residual per view."))
    if view.tomogram is not None:
        t = view.tomogram
        nx, ny, nz = t["size_xyz_px"]
        voxel = t["voxel_size_A"]
        parts.append(_figure(f"tomogram-xy-{ts}", figures.slice_figure(
            t["xy"], t["circles_xy"], f"XY, z = {t['slice_z_px']} (centre)", "x", "y", f"tomogram-xy-{ts}"),
            f"{view.ts_id}: central XY slice of the {nx} × {ny} × {nz} tomogram ({voxel:.3g} Å voxels, shown "
            f"binned {t['binning_xy']}×); circles: the {t['picks']} picks' sections by the slice."))
        parts.append(_figure(f"tomogram-xz-{ts}", figures.slice_figure(
            t["xz"], t["circles_xz"], f"XZ, y = {t['slice_y_px']} (centre)", "x", "z", f"tomogram-xz-{ts}"),
            f"{view.ts_id}: central XZ slice (shown binned {t['binning_xz']}×), picks drawn likewise."))
    return "".join(parts) + "</section>"


def _picking_section(views: list[PickingView]) -> str:
    if not views:
        return ""
    parts = ['<section id="picking"><h2>Picking</h2>']
    for v in views:
        figure_id = f"picking-{slug(v.run_name)}-{slug(v.ts_id)}"
        threshold = "unknown" if v.threshold is None else f"{v.threshold:.4g}"
        parts.append(_figure(figure_id, figures.score_histogram_figure(
            v.background_scores, v.picks_scores, v.threshold, f"{v.run_name}: {v.ts_id}", figure_id),
            f"{v.run_name} ({v.step_type}), {v.ts_id}: {len(v.picks_scores)} picks; threshold {threshold}."))
    return "".join(parts) + "</section>"


def _map_section(view: MapView) -> str:
    name = slug(view.run_name)
    parts = [f'<section id="averaging-{name}"><h3>{_e(view.run_name)} <span class="note">({_e(view.step_type)})</span>'
             f"</h3>"]
    facts = [[_e(key), f'<span class="value">{_e(value)}</span>'] for key, value in view.facts.items()
             if value is not None]
    for label, value in view.resolutions_A.items():
        facts.append([f"resolution, {_e(label)} (FSC 0.143)",
                      f'<span class="resolution" data-curve="{_e(slug(label))}">{_e(resolution_text(value))}</span>'])
    if facts:
        parts.append(_table(["", "value"], facts))
    if view.frequencies_per_A is not None and view.curves:
        parts.append(_figure(f"fsc-{name}", figures.fsc_figure(view.frequencies_per_A, view.curves,
                                                              f"{view.run_name}: FSC", f"fsc-{name}",
                                                              view.resolutions_A),
                             f"{view.run_name}: Fourier shell correlation ({', '.join(view.curves)})."))
    if view.frequencies_per_A is not None and view.iteration_curves:
        parts.append(_figure(f"fsc-iterations-{name}", figures.fsc_figure(
            view.frequencies_per_A, view.iteration_curves, f"{view.run_name}: half-map FSC per iteration",
            f"fsc-iterations-{name}"), f"{view.run_name}: the half-map FSC of every iteration."))
    if view.iterations:
        parts.append(_figure(f"iterations-{name}", figures.iteration_figure(
            view.iterations, view.iteration_resolution_A, f"{view.run_name}", f"iterations-{name}",
            view.iteration_label), f"{view.run_name}: {view.iteration_label} per iteration."))
    if view.volume is not None:
        parts.append(_figure(f"map-{name}", figures.orthogonal_slices_figure(
            view.volume, f"{view.run_name}: {view.volume_name}", f"map-{name}"),
            f"{view.run_name}: central sections of the {view.volume_name} map ({view.volume.shape[0]}³, "
            f"{view.voxel_size_A:.3g} Å voxels)."))
    if view.guinier is not None:
        g = view.guinier
        parts.append(_figure(f"guinier-{name}", figures.guinier_figure(
            g["inv_resolution_sq_per_A2"], g["ln_amplitude"], g["fit_used"], g["slope_A2"], g["intercept"],
            f"{view.run_name}: Guinier plot", f"guinier-{name}"),
            f"{view.run_name}: Guinier plot of the FSC-weighted, masked map and the fit that gives "
            f"B = {4 * g['slope_A2']:.0f} Å²."))
    return "".join(parts) + "</section>"


def _parameters_section(data: ReportData) -> str:
    parts = ['<section id="parameters"><h2>Parameters</h2>']
    for run in data.shown.values():
        rows = [[_e(key), f"<code>{_e(json.dumps(value, ensure_ascii=False, default=str))}</code>"]
                for key, value in sorted(run.params.items())]
        parts.append(f'<details id="params-{slug(run.name)}" open><summary><b>{_e(run.name)}</b> '
                     f"({_e(run.step_type)}, {_e(run.status)})</summary>{_table(['parameter', 'value'], rows)}"
                     f"</details>")
    return "".join(parts) + "</section>"


def _methods_section(data: ReportData) -> str:
    sentences, references = methods(data.shown.values())
    if not sentences:
        return ""
    number = {key: i + 1 for i, (key, _) in enumerate(references)}

    def cite(text: str) -> str:
        import re

        def replace(match):
            keys = [k.strip() for k in match.group(1).split(";")]
            return "[" + ", ".join(f'<a href="#ref-{k}">{number[k]}</a>' for k in keys if k in number) + "]"

        return re.sub(r"\[([A-Za-z0-9; ]+)\]", replace, _e(text))

    paragraph = " ".join(cite(text) for _, text in sentences)
    items = "".join(f'<li id="ref-{key}">{_e(text)}</li>' for key, text in references)
    return (f'<section id="methods"><h2>Methods</h2><p>{paragraph}</p></section>'
            f'<section id="references"><h2>References</h2><ol>{items}</ol></section>')


def render(data: ReportData, version: str = "") -> str:
    """The whole page as one string."""
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [_runs_section(data), _scores_section(data)]
    toc = [("runs", "Runs")] + ([("scores", "Scores against the truth")] if data.scores else [])
    if data.tilt_series:
        body.append('<section id="tilt-series"><h2>Tilt series</h2>'
                    + "".join(_tilt_series_section(v) for v in data.tilt_series) + "</section>")
        toc.append(("tilt-series", "Tilt series"))
        toc += [(f"ts-{slug(v.ts_id)}", f"– {v.ts_id}") for v in data.tilt_series]
    if data.picking:
        body.append(_picking_section(data.picking))
        toc.append(("picking", "Picking"))
    if data.maps:
        body.append('<section id="maps"><h2>Averaging</h2>' + "".join(_map_section(v) for v in data.maps)
                    + "</section>")
        toc.append(("maps", "Averaging"))
        toc += [(f"averaging-{slug(v.run_name)}", f"– {v.run_name}") for v in data.maps]
    body.append(_parameters_section(data))
    toc.append(("parameters", "Parameters"))
    methods_html = _methods_section(data)
    if methods_html:
        body.append(methods_html)
        toc += [("methods", "Methods"), ("references", "References")]
    if data.notes:
        body.append('<section id="notes"><h2>Left out</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in data.notes)
                    + "</ul></section>")
        toc.append(("notes", "Left out"))
    nav = "<nav><h2>Contents</h2><ol>" + "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t in toc) \
        + "</ol></nav>"
    truth = f"; truth: {_e(data.truth_folder)}" if data.truth_folder else ""
    title = f"tomopipe report: {data.project_folder.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{_e(title)}</h1><p class=\"note\">Project "
            f"<code>{_e(data.project_folder)}</code>{truth}; generated {generated} by tomopipe {_e(version)}.</p>"
            f"</header>{nav}<main>{''.join(body)}</main></body></html>\n")
