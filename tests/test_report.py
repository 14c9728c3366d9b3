"""``tomopipe report``: the HTML report of a project. The tutorial workflow runs once on a tiny twin (the
parameters of tests/test_export.py's STAGE_OVERRIDES; ~30 s on 2 cores), first until the tomograms (a report
of a project stopped there), then to the post-processed map; a failed run is added by hand. The page is
parsed: every figure by its id with an inline SVG, no external resource, the parameters, the methods and their
references, and numbers against what the project stores. The figure helpers and the errors are tested alone."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from test_export import STAGE_OVERRIDES
from tomopipe.cli import main
from tomopipe.project.store import Project
from tomopipe.report import write_report
from tomopipe.report.collect import downsample, pick_circles
from tomopipe.report.figures import scoped_ids, score_histogram_figure, slice_figure

pytestmark = pytest.mark.usefixtures("one_thread")

TS = "TS_01"
REFINEMENTS = ("refine_bin10", "refine_bin4", "refine_bin2")
RECONSTRUCTIONS = ("reconstruct_bin4", "reconstruct_bin2")
#: figures of a project stopped after the tomograms (one tilt series, one view excluded by hand)
TILT_SERIES_FIGURES = [f"motion-{TS}", f"ctf-{TS}", f"ctf-fit-{TS}", f"alignment-{TS}", f"tomogram-xy-{TS}",
                       f"tomogram-xz-{TS}"]
#: figures the whole tutorial adds
AVERAGING_FIGURES = ([f"picking-pick-{TS}", "iterations-initial_model", "map-initial_model"]
                     + [f"{kind}-{name}" for name in REFINEMENTS for kind in ("fsc", "fsc-iterations", "iterations",
                                                                              "map")]
                     + [f"{kind}-{name}" for name in RECONSTRUCTIONS for kind in ("fsc", "map")]
                     + ["fsc-postprocess", "map-postprocess", "guinier-postprocess"])


class Page(HTMLParser):
    """The parts of a report page the tests look at: each figure's inner HTML by id, every element id, and
    every attribute that can load a resource."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.text = text
        self.figures: dict[str, str] = {}
        self.ids: list[str] = []
        self.resources: list[str] = []
        self.tags: set[str] = set()
        self._open: list[tuple[str, int]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for name in ("src", "href", "xlink:href", "data", "srcset", "action"):
            if attrs.get(name) is not None:
                self.resources.append(attrs[name])
        if tag == "figure":
            self._open.append((attrs["id"], self._offset() + len(self.get_starttag_text())))

    def handle_endtag(self, tag):
        if tag == "figure":
            figure_id, start = self._open.pop()
            self.figures[figure_id] = self.text[start:self._offset()]

    def _offset(self) -> int:
        line, column = self.getpos()
        return sum(len(x) + 1 for x in self.text.split("\n")[:line - 1]) + column


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """(project folder, the report of the project stopped after the tomograms). The twin of test_export."""
    from tomopipe.demo import tutorial_workflow_path
    from tomopipe.engine.executors import LocalExecutor
    from tomopipe.engine.runner import run_workflow
    from tomopipe.engine.workflow import load_workflow
    from tomopipe.simulate import config_from_preset, simulate

    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    config = config_from_preset("tiny", seed=3, tilt_min_deg=-30.0, tilt_max_deg=30.0, dose_per_tilt_e_per_A2=20.0,
                                particles_per_tilt_series=20, threads=1)
    simulate(config, data, progress=False)
    overrides = [f"import.files_directory={json.dumps(str(data))}",
                 f"import.gain_image={json.dumps(str(data / 'gain_ref.mrc'))}", "import.gain_flip_y=true",
                 *STAGE_OVERRIDES, "postprocess.fit_low_A=40"]  # a Guinier fit at the tiny twin's resolution
    workflow = load_workflow(tutorial_workflow_path(), overrides)
    with Project.open_or_init(root / "project") as project:
        assert run_workflow(project, workflow, LocalExecutor(), until="reconstruct", echo=lambda *a: None).ok
        partial = write_report(root / "project", root / "partial.html").read_text(encoding="utf-8")
        assert run_workflow(project, workflow, LocalExecutor(), echo=lambda *a: None).ok
        failed = project.create_run("postprocess_again", "postprocess", {"mask_diameter_A": 90.0}, {}, "by hand")
        project.fail_run(failed.id, "the half maps do not correlate")
    return root / "project", partial


@pytest.fixture(scope="module")
def report(tutorial, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tutorial.html"
    assert main(["report", "--project", str(tutorial[0]), "--out", str(out)]) == 0
    return Page(out.read_text(encoding="utf-8"))


def _self_contained(page: Page) -> None:
    assert page.text.startswith("<!DOCTYPE html>")
    assert not {"script", "link", "iframe", "img", "object", "embed"} & page.tags
    outside = [value for value in page.resources if not value.startswith(("#", "data:image/png;base64,"))]
    assert not outside, outside[:5]
    assert not re.search(r"url\((?!#)", page.text), "a CSS url() to something else than an anchor of the page"
    anchors = {value[1:] for value in page.resources if value.startswith("#")}
    assert anchors <= set(page.ids), sorted(anchors - set(page.ids))[:5]  # every link and SVG reference lands
    assert len(page.ids) == len(set(page.ids)), "ids repeat: the inline SVGs must not share ids"


def test_report_of_a_project_stopped_after_the_tomograms(tutorial):
    page = Page(tutorial[1])
    _self_contained(page)
    assert sorted(page.figures) == sorted(TILT_SERIES_FIGURES)
    assert "Averaging" not in page.text and 'id="picking"' not in page.text
    assert 'id="methods"' in page.text and "Mastronarde DN, Held SR (2017)" in page.text
    assert "Scheres SHW, Chen S (2012)" not in page.text  # nothing was averaged: not cited


def test_every_figure_is_there_with_an_inline_svg(report):
    _self_contained(report)
    assert sorted(report.figures) == sorted(TILT_SERIES_FIGURES + AVERAGING_FIGURES)
    for figure_id, inner in report.figures.items():
        assert inner.lstrip().startswith("<svg") and "</svg>" in inner and "<figcaption>" in inner, figure_id
        assert f'id="{figure_id}-figure_1"' in inner, figure_id  # ids inside are scoped by the figure's
    for figure_id in (f"tomogram-xy-{TS}", f"tomogram-xz-{TS}", "map-refine_bin2", "map-postprocess"):
        assert "data:image/png;base64," in report.figures[figure_id]
    # the FSC against the truth (the twin's) next to the gold standard, the 0.143 line, the excluded view
    for name in REFINEMENTS:
        fsc = report.figures[f"fsc-{name}"]
        assert f"fsc-{name}-curve-gold-standard" in fsc and f"fsc-{name}-curve-against-the-truth" in fsc
        assert f"fsc-{name}-threshold-0.143" in fsc
    assert "excluded" in report.figures[f"ctf-{TS}"] and "1 excluded view(s)" in report.figures[f"ctf-{TS}"]
    assert "threshold" in report.figures[f"picking-pick-{TS}"]


def test_the_picks_drawn_are_those_the_slice_cuts(tutorial, report):
    """One circle per pick whose sphere the central XY plane cuts, counted from the project's own numbers."""
    with Project.open(tutorial[0]) as project:
        pick = project.find_run("pick")
        picks = project.read_items(project.sets_of_run(pick.id)["particles"].id, enabled_only=True)
        tomogram = project.read_items(project.sets_of_run(project.find_run("reconstruct").id)["tomograms"].id)
    nz = int(tomogram["size_z_px"].iloc[0])
    voxel_A = float(tomogram["voxel_size_A"].iloc[0])
    z_px = picks["z_A"].to_numpy() / voxel_A + nz / 2
    radius_px = 0.5 * pick.params["particle_diameter_A"] / voxel_A
    expected = int((np.abs(z_px - nz // 2) < radius_px).sum())
    drawn = re.findall(rf'id="tomogram-xy-{TS}-pick-(\d+)"', report.figures[f"tomogram-xy-{TS}"])
    assert expected > 0 and len(drawn) == expected


def test_numbers_shown_are_those_the_project_stores(tutorial, report):
    with Project.open(tutorial[0]) as project:
        summaries = {name: project.find_run(name).summary for name in (*REFINEMENTS, "postprocess")}
        post = project.sets_of_run(project.find_run("postprocess").id)["maps"].attrs["postprocess"]
    for name in REFINEMENTS:
        section = report.text.split(f'<section id="averaging-{name}">')[1].split("</section>")[0]
        shown = re.search(r'<span class="resolution" data-curve="gold-standard">([0-9.]+) Å</span>', section)
        assert shown and shown.group(1) == f"{summaries[name]['resolution_A']:.2f}", name
        truth = re.search(r"FSC 0.5 against the truth \(Å\)</td><td><span class=\"value\">([0-9.]+)<", section)
        assert truth and summaries[name]["nyquist_A"] - 0.01 <= float(truth.group(1)) < 60.0, name
    section = report.text.split('<section id="averaging-postprocess">')[1].split("</section>")[0]
    assert f"{summaries['postprocess']['resolution_A']:.2f} Å" in section
    slope = post["guinier"]["slope_A2"]
    assert post["guinier"] is not None and f"B = {4 * slope:.0f} Å²" in report.figures["guinier-postprocess"]


def test_the_fsc_against_the_truth_is_the_demo_score(tutorial, report):
    """The refined map's FSC 0.5 resolution against the twin's truth is the number the demo's scorer gives."""
    from tomopipe.validate.registry import scores_of_set
    from tomopipe.validate.truth import Truth

    with Project.open(tutorial[0]) as project:
        run = project.find_run("refine_bin2")
        truth = Truth.find(project.find_run("import").params["files_directory"])
        scores = {score.name: score.value for score in scores_of_set(project, project.sets_of_run(run.id)["maps"],
                                                                      "auto_refine", truth)}
    section = report.text.split('<section id="averaging-refine_bin2">')[1].split("</section>")[0]
    shown = re.search(r"FSC 0.5 against the truth \(Å\)</td><td><span class=\"value\">([0-9.]+)<", section)
    assert float(shown.group(1)) == round(scores["fsc_0_5_truth_A"], 2)


def test_the_guinier_plot_is_the_one_the_postprocessing_fitted(tutorial):
    """Computed again from the stored half maps, mask and corrected FSC, its fit has the stored slope."""
    from tomopipe.report.collect import collect

    with Project.open(tutorial[0]) as project:
        guinier = next(view.guinier for view in collect(project).maps if view.run_name == "postprocess")
    assert guinier["recomputed_slope_A2"] == pytest.approx(guinier["slope_A2"], rel=1e-6, abs=1e-9)
    assert int(np.asarray(guinier["fit_used"]).sum()) >= 3


def test_runs_parameters_and_methods(report):
    runs = report.text.split('<section id="runs">')[1].split("</section>")[0]
    assert runs.count('<span class="status-finished">finished</span>') == 20
    assert '<span class="status-failed">failed</span>' in runs and "the half maps do not correlate" in runs
    assert "postprocess_again (postprocess) failed: the half maps do not correlate" in runs
    for name in ("import", "motion", "pick", "refine_bin2", "postprocess", "postprocess_again"):
        assert f'id="params-{name}"' in report.text
    params = report.text.split('id="params-postprocess"')[1].split("</details>")[0]
    assert "<td>mask_diameter_A</td><td><code>140.0</code></td>" in params
    methods = report.text.split('<section id="methods">')[1].split("</section>")[0]
    references = report.text.split('<section id="references">')[1].split("</section>")[0]
    for cited in ("Zheng SQ", "Rohou A, Grigorieff N (2015)", "Kremer JR", "Mastronarde DN, Held SR (2017)",
                  "Zivanov J", "Burt A", "Scheres SHW, Chen S (2012)", "Rosenthal PB, Henderson R (2003)",
                  "Chen S, McMullan G", "Rickgauer JP", "Kimanius D"):
        assert cited in references, cited
    for not_used in ("Wagner", "crYOLO", "Moebel"):  # the tutorial picked by template matching, not with these
        assert not_used not in references
    numbers = [int(n) for n in re.findall(r'<a href="#ref-[A-Za-z0-9]+">(\d+)</a>', methods)]
    assert sorted(set(numbers)) == list(range(1, references.count("<li ") + 1))
    assert "symmetry O" in methods and "mask 150 Å" in methods


def test_files_gone_from_a_project_are_left_out_and_named(tutorial, tmp_path):
    """A project copied without its tomogram and a refined map: the rest of the report (the refinement's FSC
    too), and what was left out, with the file."""
    import shutil

    project_dir = tmp_path / "project"
    shutil.copytree(tutorial[0], project_dir)
    with Project.open(project_dir) as project:
        tomogram = project.read_items(project.sets_of_run(project.find_run("reconstruct").id)["tomograms"].id)
        maps = project.read_items(project.sets_of_run(project.find_run("refine_bin4").id)["maps"].id)
    gone = [project_dir / tomogram["tomogram_path"].iloc[0],
            project_dir / maps.loc[maps["map_name"] == "full", "map_path"].iloc[0]]
    for path in gone:
        path.unlink()
    page = Page(write_report(project_dir).read_text(encoding="utf-8"))
    expected = set(TILT_SERIES_FIGURES + AVERAGING_FIGURES) - {f"tomogram-xy-{TS}", f"tomogram-xz-{TS}"}
    assert set(page.figures) == expected - {"map-refine_bin4"}  # its FSC curves are in the project's database
    assert "fsc-refine_bin4-curve-gold-standard" in page.figures["fsc-refine_bin4"]
    notes = page.text.split('<section id="notes">')[1].split("</section>")[0]
    assert f"tomogram {TS} left out" in notes and str(gone[0]) in notes
    assert f"refine_bin4: the full map left out: {gone[1]}" in notes


def test_report_errors_name_what_is_wrong(tmp_path, capsys):
    assert main(["report", "--project", str(tmp_path / "nothing")]) == 2
    assert "not a tomopipe project" in capsys.readouterr().err
    Project.init(tmp_path / "empty").close()
    assert main(["report", "--project", str(tmp_path / "empty"), "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "--project", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # an empty project is reported (runs: none), atomically: no temporary file is left beside it
    assert main(["report", "--project", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {(tmp_path / 'empty' / 'report.html').resolve()}"
    assert [p.name for p in (tmp_path / "empty").iterdir() if p.name.startswith(".")] == []
    _self_contained(Page((tmp_path / "empty" / "report.html").read_text(encoding="utf-8")))


def test_the_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--preset", "tiny", "--seed", "3", "--until", "import"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("report: ")]
    assert printed == [f"report: {(out / 'project' / 'report.html').resolve()}"]
    page = Page((out / "project" / "report.html").read_text(encoding="utf-8"))
    assert page.figures == {} and "import_movies" in page.text
    assert 'id="scores"' in page.text and "max_tilt_angle_error_deg" in page.text  # the demo's scores.json


# ----------------------------------------------------------------------------- the helpers alone
def test_scoped_ids_keep_every_reference_pointing_at_its_own_figure():
    svg = slice_figure(np.arange(12.0).reshape(3, 4), np.array([[1.0, 1.0, 0.5]]), "t", "x", "y", "a b")
    defined = set(re.findall(r'\bid="([^"]+)"', svg))
    used = set(re.findall(r'url\(#([^)]+)\)', svg)) | set(re.findall(r'href="#([^"]+)"', svg))
    assert defined and all(i.startswith("a-b-") for i in defined) and used <= defined
    assert "a-b-pick-0" in defined
    assert scoped_ids('<g id="x"><use href="#x"/><use href="#y"/><g id="x"/></g>', "p") == \
        '<g id="p-x"><use href="#p-x"/><use href="#y"/><g id="p-x-2"/></g>'


def test_downsample_and_pick_circles():
    image = np.arange(1200.0 * 700.0).reshape(1200, 700)
    small, factor = downsample(image, 512)
    assert factor == 3 and small.shape == (400, 233) and small[0, 0] == pytest.approx(image[:3, :3].mean())
    assert downsample(image[:512, :300], 512)[1] == 1
    circles = pick_circles(np.array([[10.0, 20.0, 5.0], [0.0, 0.0, 50.0], [3.0, 4.0, 8.0]]), 5.0, 4.0)
    np.testing.assert_allclose(circles, [[10.0, 20.0, 4.0], [3.0, 4.0, math.sqrt(16.0 - 9.0)]])


def test_score_histogram_spans_the_scores_and_the_threshold():
    """The bins cover the data and the threshold, not a fixed [0, 1] (scores of 0.1 would be one bar)."""
    svg = score_histogram_figure(np.random.default_rng(0).normal(0.0, 0.01, 10_000), np.array([0.08, 0.09]),
                                 0.05, "t", "h")
    assert 'id="h-threshold-pick"' in svg and "threshold 0.05" in svg
    ticks = [float(t.replace("−", "-")) for t in re.findall(r">(−?[0-9.]+)</text>", svg)]
    assert max(ticks) < 0.2
