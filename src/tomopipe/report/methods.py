"""The methods paragraph of the report: one sentence per finished step, with its parameters, citing the
method the step implements (and only that), and the reference list of what was cited.

:func:`methods` takes the shown runs (name -> :class:`~tomopipe.project.store.RunRecord`) and returns
``(sentences, references)``: sentences as (step name, text with ``[key]`` citations), references as
(key, full reference) in order of first citation. Steps without a sentence (unknown types) are named
without a citation.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["REFERENCES", "methods", "sentence"]

REFERENCES = {
    "Zheng2017": "Zheng SQ, Palovcak E, Armache J-P, Verba KA, Cheng Y, Agard DA (2017). MotionCor2: anisotropic "
                 "correction of beam-induced motion for improved cryo-electron microscopy. Nat Methods 14:331–332. "
                 "doi:10.1038/nmeth.4193",
    "Tegunov2019": "Tegunov D, Cramer P (2019). Real-time cryo-electron microscopy data preprocessing with Warp. "
                   "Nat Methods 16:1146–1152. doi:10.1038/s41592-019-0580-y",
    "Grant2015": "Grant T, Grigorieff N (2015). Measuring the optimal exposure for single particle cryo-EM using a "
                 "2.6 Å reconstruction of rotavirus VP6. eLife 4:e06980. doi:10.7554/eLife.06980",
    "Rohou2015": "Rohou A, Grigorieff N (2015). CTFFIND4: fast and accurate defocus estimation from electron "
                 "micrographs. J Struct Biol 192:216–221. doi:10.1016/j.jsb.2015.08.008",
    "Kremer1996": "Kremer JR, Mastronarde DN, McIntosh JR (1996). Computer visualization of three-dimensional image "
                  "data using IMOD. J Struct Biol 116:71–76. doi:10.1006/jsbi.1996.0013",
    "Mastronarde2017": "Mastronarde DN, Held SR (2017). Automated tilt series alignment and tomographic "
                       "reconstruction in IMOD. J Struct Biol 197:102–113. doi:10.1016/j.jsb.2016.07.011",
    "Chaillet2023": "Chaillet ML, van der Schot G, Gubins I, Roet S, Veltkamp RC, Förster F (2023). Extensive "
                    "angular sampling enables the sensitive localization of macromolecules in electron tomograms. "
                    "Int J Mol Sci 24:13375. doi:10.3390/ijms241713375",
    "Rickgauer2017": "Rickgauer JP, Grigorieff N, Denk W (2017). Single-protein detection in crowded molecular "
                     "environments in cryo-EM images. eLife 6:e25648. doi:10.7554/eLife.25648",
    "Moebel2021": "Moebel E, Martinez-Sanchez A, Lamm L, Righetto RD, Wietrzynski W, Albert S, Larivière D, "
                  "Fourmentin E, Pfeffer S, Ortiz J, Baumeister W, Peng T, Engel BD, Kervrann C (2021). Deep learning "
                  "improves macromolecule identification in 3D cellular cryo-electron tomograms. Nat Methods "
                  "18:1386–1394. doi:10.1038/s41592-021-01275-4",
    "Zivanov2022": "Zivanov J, Otón J, Ke Z, von Kügelgen A, Pyle E, Qu K, Morado D, Castaño-Díez D, Zanetti G, "
                   "Bharat TAM, Briggs JAG, Scheres SHW (2022). A Bayesian approach to single-particle electron "
                   "cryo-tomography in RELION-4.0. eLife 11:e83724. doi:10.7554/eLife.83724",
    "Burt2024": "Burt A, Toader B, Warshamanage R, von Kügelgen A, Pyle E, Zivanov J, Kimanius D, Bharat TAM, "
                "Scheres SHW (2024). An image processing pipeline for electron cryo-tomography in RELION-5. FEBS Open "
                "Bio 14:1788–1804. doi:10.1002/2211-5463.13873",
    "Kimanius2021": "Kimanius D, Dong L, Sharov G, Nakane T, Scheres SHW (2021). New tools for automated cryo-EM "
                    "single-particle analysis in RELION-4.0. Biochem J 478:4169–4185. doi:10.1042/BCJ20210708",
    "Scheres2012": "Scheres SHW, Chen S (2012). Prevention of overfitting in cryo-EM structure determination. Nat "
                   "Methods 9:853–854. doi:10.1038/nmeth.2115",
    "Rosenthal2003": "Rosenthal PB, Henderson R (2003). Optimal determination of particle orientation, absolute hand, "
                     "and contrast loss in single-particle electron cryomicroscopy. J Mol Biol 333:721–745. "
                     "doi:10.1016/j.jmb.2003.07.013",
    "Chen2013": "Chen S, McMullan G, Faruqi AR, Murshudov GN, Short JL, Scheres SHW, Henderson R (2013). "
                "High-resolution noise substitution to measure overfitting and validate resolution in 3D structure "
                "determination by single particle electron cryomicroscopy. Ultramicroscopy 135:24–35. "
                "doi:10.1016/j.ultramic.2013.06.004",
}


def _g(params: dict, name: str, unit: str = "", missing: str = "default") -> str:
    value = params.get(name)
    if value is None or value == "":
        return missing
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{value}{unit}"


def _motion_ctf(p: dict, s: dict) -> str:
    text = (f"Frames of each tilt were aligned with a {_g(p, 'motion_grid_x')} × {_g(p, 'motion_grid_y')} × "
            f"{_g(p, 'motion_grid_temporal')} (x × y × time) motion model fitted between "
            f"{_g(p, 'fit_resolution_min_A')} and {_g(p, 'fit_resolution_max_A')} Å, as in MotionCor2 [Zheng2017] "
            f"and Warp [Tegunov2019]")
    text += ", and summed with dose weighting [Grant2015]" if p.get("dose_weighting", True) else ", and summed"
    if p.get("estimate_ctf", True):
        text += (f". Defocus and astigmatism of every tilt were fitted to its power spectrum "
                 f"({_g(p, 'ctf_window_px')}-px windows, {_g(p, 'ctf_resolution_min_A')}–"
                 f"{_g(p, 'ctf_resolution_max_A')} Å, defocus {_g(p, 'defocus_min_um')}–{_g(p, 'defocus_max_um')} µm) "
                 f"as CTFFIND4 does [Rohou2015], with the defocus gradient across each tilted view as in Warp "
                 f"[Tegunov2019]")
    return text + "."


def _exclude(p: dict, s: dict) -> str:
    rules = [f"{label} {p[name]:g} Å" for name, label in (
        ("max_defocus_deviation_A", "defocus further from the series' trend than"),
        ("max_astigmatism_A", "astigmatism above"), ("max_fit_resolution_A", "a CTF fit worse than"))
        if isinstance(p.get(name), (int, float))]
    if p.get("exclude_dark_views"):
        rules.append("dark views")
    by_rule = f" and by rule ({'; '.join(rules)})" if rules else ""
    return (f"Views were excluded by hand ({_g(p, 'exclude_tilts', missing='none')}){by_rule}; excluded views are "
            f"flagged, not deleted.")


def _template(p: dict, s: dict) -> str:
    return (f"Particles were picked by template matching with a {_g(p, 'template')} template "
            f"({_g(p, 'particle_diameter_A', ' Å')} diameter, symmetry {_g(p, 'symmetry')}), weighted per tilt "
            f"by the CTF, the dose and the missing wedge, as pytom-match-pick does [Chaillet2023]; peaks above the "
            f"false-alarm threshold of {_g(p, 'false_alarms')} expected false pick(s) per tomogram were kept "
            f"[Rickgauer2017].")


def _auto_refine(p: dict, s: dict) -> str:
    result = f" ({s['resolution_A']:.2f} Å)" if isinstance(s.get("resolution_A"), (int, float)) else ""
    return (f"Poses and map were refined by gold-standard 3-D auto-refinement [Scheres2012] of the "
            f"pseudo-subtomograms as in RELION 4/5 [Zivanov2022; Burt2024]: symmetry {_g(p, 'symmetry')}, initial "
            f"low-pass {_g(p, 'initial_lowpass_A', ' Å')}, mask {_g(p, 'mask_diameter_A', ' Å')}, angular "
            f"sampling from {_g(p, 'initial_angular_step_deg', '°')} with local searches from "
            f"{_g(p, 'local_searches_from_deg', '°')}, offsets ±{_g(p, 'offset_range_px', ' px')}; resolution at "
            f"FSC 0.143 [Rosenthal2003]{result}.")


def _postprocess(p: dict, s: dict) -> str:
    resolution = f" ({s['resolution_A']:.2f} Å)" if isinstance(s.get("resolution_A"), (int, float)) else ""
    if p.get("b_factor_A2") is not None:
        sharpening = f"then sharpened with the B-factor given, {p['b_factor_A2']:g} Å²"
    elif s.get("b_factor_A2") == 0.0:
        sharpening = (f"not sharpened (fewer than 3 shells between {_g(p, 'fit_low_A', ' Å', '10 Å')} and the "
                      f"resolution for a Guinier fit)")
    else:
        sharpening = (f"then sharpened with the B-factor of the Guinier plot of the FSC-weighted map "
                      f"[Rosenthal2003] ({s.get('b_factor_A2', 0.0):.0f} Å²)")
    return (f"The half maps were post-processed: a soft mask ({s.get('mask') or 'none'}), the FSC corrected for the "
            f"mask by phase randomisation [Chen2013], the resolution at FSC 0.143 [Rosenthal2003]{resolution}, "
            f"{sharpening}.")


SENTENCES: dict[str, Callable[[dict, dict], str]] = {
    "import_movies": lambda p, s: (
        f"Tilt-series movies and their SerialEM mdoc files were imported ({_g(p, 'voltage_kV', ' kV')}, Cs "
        f"{_g(p, 'spherical_aberration_mm', ' mm')}, amplitude contrast {_g(p, 'amplitude_contrast')})."),
    "motion_ctf": _motion_ctf,
    "exclude_views": _exclude,
    "xray_eraser": lambda p, s: "X-ray hits and hot pixels were found and replaced, as IMOD's ccderaser does "
                                "[Kremer1996].",
    "preprocess": lambda p, s: (
        f"The tilt series were binned by {_g(p, 'binning')} (Fourier cropping) and their densities scaled "
        f"({_g(p, 'density_mode')}), as IMOD's newstack does [Kremer1996]."),
    "align_tilt_series": lambda p, s: (
        f"The tilt series were aligned without fiducials by patch tracking ({_g(p, 'patch_size_A', ' Å')} patches, "
        f"{_g(p, 'patch_overlap_percent', ' %')} overlap) and a projection-model fit (tilt-axis angle, shifts, "
        f"tilt-angle offset), as IMOD's batchruntomo does [Mastronarde2017]."),
    "import_alignment": lambda p, s: f"An alignment made elsewhere ({_g(p, 'format')}) was imported.",
    "assign_alignment": lambda p, s: "The alignment was transferred to the unbinned tilt series.",
    "reconstruct_tomogram": lambda p, s: (
        f"Tomograms were reconstructed by weighted back-projection (thickness {_g(p, 'thickness_px', ' px')}, "
        f"radial filter cut-off {_g(p, 'radial_cutoff')} and fall-off {_g(p, 'radial_falloff')}, super-sampling "
        f"{_g(p, 'super_sampling')}, SIRT-like iterations {_g(p, 'sirt_like_iterations')}) as IMOD's tilt does "
        f"[Kremer1996; Mastronarde2017]."),
    "pick_template_matching": _template,
    "pick_network": lambda p, s: (
        f"Particles were picked by a 3-D U-Net trained on this data set's own picks "
        f"({_g(p, 'particle_diameter_A', ' Å')} diameter, threshold {_g(p, 'threshold')}), in the spirit of "
        f"DeepFinder [Moebel2021]."),
    "edit_picks": lambda p, s: "Picks were edited by hand.",
    "import_picks": lambda p, s: f"Picks were imported ({_g(p, 'format')}).",
    "extract_subtomos": lambda p, s: (
        f"{'2-D' if p.get('write_2d') else '3-D'} pseudo-subtomograms were extracted at binning {_g(p, 'binning')} "
        f"(box {_g(p, 'box_px', ' px')}, cropped to {_g(p, 'crop_px', ' px')}), CTF-premultiplied and dose-weighted, "
        f"as in RELION 4/5 [Zivanov2022; Burt2024]."),
    "initial_model": lambda p, s: (
        f"A de novo initial model was made by gradient-driven refinement (VDAM) [Kimanius2021] of the 3-D "
        f"pseudo-subtomograms [Zivanov2022]: {_g(p, 'n_iterations')} mini-batches, regularisation T = "
        f"{_g(p, 'regularisation_T')}, mask {_g(p, 'mask_diameter_A', ' Å')}, symmetry {_g(p, 'symmetry')}."),
    "auto_refine": _auto_refine,
    "reconstruct_particle": lambda p, s: (
        f"The particles were reconstructed from their pseudo-subtomograms with their poses, each half set "
        f"separately (gold standard [Scheres2012]), with symmetry {_g(p, 'symmetry')}, as RELION's reconstruct "
        f"particle does [Zivanov2022]."),
    "postprocess": _postprocess,
}


def sentence(step_type: str, params: dict, summary: dict) -> str | None:
    """The methods sentence of a finished run of ``step_type`` (None for a type without one)."""
    make = SENTENCES.get(step_type)
    return None if make is None else make(params or {}, summary or {})


def methods(runs) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(step name, sentence) per finished run, in run order, and the references they cite in order of first
    citation (key, text)."""
    import re

    sentences, cited = [], []
    for run in runs:
        if run.status != "finished":
            continue
        text = sentence(run.step_type, run.params, run.summary)
        if text is None or any(text == said for _, said in sentences):  # a step repeated with the same values
            continue
        sentences.append((run.name, text))
        for group in re.findall(r"\[([A-Za-z0-9; ]+)\]", text):
            for key in (k.strip() for k in group.split(";")):
                if key in REFERENCES and key not in cited:
                    cited.append(key)
    return sentences, [(key, REFERENCES[key]) for key in cited]
