"""``simulate(config, out_dir)``: the whole digital twin, from the atomic model to files on disk."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from functools import reduce
from pathlib import Path

import torch
from tqdm import tqdm

from tomopipe.algorithms.filters import fourier_crop_bin
from tomopipe.algorithms.potential import AtomicModel, atomic_potential_volume, interaction_constant_rad_per_V_A
from tomopipe.io.atomic_model import read_atomic_model
from tomopipe.io.mrc import write_mrc
from tomopipe.simulate.config import SimulationConfig, SimulationConfigError
from tomopipe.simulate.detector import (
    DetectorModel,
    XraySpectrum,
    exposure_rate_grid,
    gain_reference,
    hot_pixel_positions,
    render_frames,
    transmission,
)
from tomopipe.simulate.imaging import IceModel, Optics, ice_thickness_image, render_tilt_contrast
from tomopipe.simulate.plan import generator_for, mdoc_tilt_axis_error_deg, plan_tilt_series
from tomopipe.simulate.projector import FourierSliceProjector
from tomopipe.simulate.specimen import ice_mean_potential_V, ice_psd_sqrt_grid
from tomopipe.simulate.writer import (
    GAIN_FILE_NAME,
    write_gain_file,
    write_global_truth,
    write_movie_frames,
    write_tilt_series_mdoc,
    write_tilt_series_truth,
)

__all__ = ["simulate", "reference_boxes", "optics_from_config", "ice_potential_from_config"]

log = logging.getLogger(__name__)


def _lcm(values) -> int:
    return reduce(lambda a, b: a * b // math.gcd(a, b), values, 1)


def reference_boxes(config: SimulationConfig, radius_A: float) -> tuple[int, int]:
    """``(truth box, projector box)`` in raw pixels.

    Truth box: at least ``truth_map_box_A`` and the particle diameter + 20 Å, a multiple of
    2·lcm(truth_binnings) so that every binned map has an even integer box. Projector box: the
    particle diameter + 20 Å rounded up to a multiple of 8 (at most the truth box).
    """
    p = config.pixel_size_A
    need_A = max(config.truth_map_box_A, 2.0 * (radius_A + 10.0))
    step = 2 * _lcm(config.truth_binnings)
    truth_box = int(math.ceil(need_A / p / step - 1e-9)) * step
    proj_box = int(math.ceil(2.0 * (radius_A + 10.0) / p / 8.0)) * 8
    return truth_box, min(proj_box, truth_box)


def optics_from_config(config: SimulationConfig) -> Optics:
    return Optics(
        voltage_kV=config.voltage_kV,
        cs_mm=config.cs_mm,
        amplitude_contrast=config.amplitude_contrast,
        cc_mm=config.cc_mm,
        energy_spread_eV=config.energy_spread_eV,
        illumination_semi_angle_mrad=config.illumination_semi_angle_mrad,
        envelopes=config.coherence_envelopes,
        detector_mtf=config.detector_mtf,
        hand=config.defocus_handedness,
        layer_A=config.defocus_layer_A,
    )


def ice_potential_from_config(config: SimulationConfig) -> float:
    """Mean inner potential of the ice (V): the setting, else the independent-atom value."""
    if config.ice_mean_potential_V is not None:
        return float(config.ice_mean_potential_V)
    return ice_mean_potential_V(config.ice_density_g_per_cm3)


_REFERENCE_CACHE: dict[tuple, torch.Tensor] = {}
_REFERENCE_CACHE_SIZE = 4


def reference_map(config: SimulationConfig, model: AtomicModel, box: int, device) -> torch.Tensor:
    """The particle's potential relative to the ice (V) on a ``box``³ grid at the raw pixel size.

    Kept in a small in-process cache keyed by the structure file (path, size, mtime) and the
    physical settings, so repeated simulations in one process (tests) compute it once.
    """
    v_ice = ice_potential_from_config(config) if config.solvent_exclusion else 0.0
    path = Path(model.source)
    stat = path.stat() if path.exists() else None
    key = (str(path.resolve()) if stat else model.source, stat.st_size if stat else None,
           stat.st_mtime_ns if stat else None, model.n_atoms, int(box), float(config.pixel_size_A), float(v_ice),
           float(config.extra_b_factor_A2), str(device))
    cached = _REFERENCE_CACHE.get(key)
    if cached is not None:
        return cached.clone()
    volume = atomic_potential_volume(
        model, box, config.pixel_size_A, ice_potential_V=v_ice, extra_b_factor_A2=config.extra_b_factor_A2,
        device=device
    )
    if len(_REFERENCE_CACHE) >= _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
    _REFERENCE_CACHE[key] = volume.clone()
    return volume


def _clear_previous(out: Path, overwrite: bool) -> None:
    """Refuse to mix two simulations in one folder; with ``overwrite`` remove the earlier one's
    files (movies and mdocs of its tilt series, the gain, ``truth/``) and nothing else."""
    previous = out / "truth" / "truth.json"
    if not previous.exists():
        return
    if not overwrite:
        raise SimulationConfigError(
            f"{out} already holds a simulated acquisition ({previous}); choose another folder or overwrite it"
        )
    try:
        names = [ts["name"] for ts in json.loads(previous.read_text())["tilt_series"]]
    except (ValueError, KeyError, TypeError):
        raise SimulationConfigError(f"{previous} is not a tomopipe truth file; remove the folder by hand") from None
    for name in names:
        for path in list(out.glob(f"{name}_*.tif")) + list(out.glob(f"{name}_*.mrc")) + [out / f"{name}.mdoc"]:
            path.unlink(missing_ok=True)
    (out / GAIN_FILE_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / "truth")


def simulate(config: SimulationConfig, out_dir: str | Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Simulate the acquisition described by ``config`` into ``out_dir``; return a summary.

    Writes the movies, one mdoc per tilt series and ``gain_ref.mrc`` in ``out_dir`` and the
    ground truth in ``out_dir/truth`` (see ``truth/README.md``). Raises TomopipeError
    subclasses for bad settings, unreadable structure files, or a folder that already holds a
    simulation (unless ``overwrite``, which removes that simulation's files first).
    """
    config.validate()
    _clear_previous(Path(out_dir), overwrite)
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _simulate(config, out_dir, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _simulate(config: SimulationConfig, out_dir: str | Path, progress: bool) -> dict:
    t_start = time.perf_counter()
    out = Path(out_dir)
    truth = out / "truth"
    maps_dir = truth / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    p = config.pixel_size_A
    shape = (config.image_height_px, config.image_width_px)
    timings: dict[str, float] = {}

    model = read_atomic_model(config.structure_path, implicit_hydrogens=config.implicit_hydrogens)
    radius_A = model.radius_A + 2.0
    truth_box, proj_box = reference_boxes(config, model.radius_A)
    t0 = time.perf_counter()
    ref = reference_map(config, model, proj_box, device)  # the molecule fits; zero-padded for the truth
    timings["potential_s"] = time.perf_counter() - t0
    s = truth_box // 2 - proj_box // 2
    full = torch.zeros((truth_box,) * 3, dtype=ref.dtype, device=ref.device)
    full[s : s + proj_box, s : s + proj_box, s : s + proj_box] = ref
    for b in config.truth_binnings:
        binned = full if b == 1 else fourier_crop_bin(full, float(b), ndim=3)
        write_mrc(maps_dir / f"true_map_bin{b}.mrc", binned.detach().cpu().numpy(), p * b)
    del full
    t0 = time.perf_counter()
    projector = FourierSliceProjector(ref, p, pad_factor=config.projector_pad_factor)
    del ref
    timings["projector_setup_s"] = time.perf_counter() - t0

    sigma = interaction_constant_rad_per_V_A(config.voltage_kV)
    optics = optics_from_config(config)
    ice = IceModel(config.ice_thickness_A, config.ice_density_g_per_cm3, config.ice_sublayers, config.ice_structure)
    psd_sqrt = ice_psd_sqrt_grid(shape, p, config.ice_density_g_per_cm3, device) if config.ice_structure else None
    exposure = exposure_rate_grid(shape, p, config.voltage_kV, device) if config.radiation_damage else None

    gain = gain_reference(shape, config.gain_sigma, generator_for(config.seed, "gain", device=device), device) \
        if config.gain_reference else None
    hot = hot_pixel_positions(shape, config.hot_pixels_per_megapixel if config.shot_noise else 0.0,
                              generator_for(config.seed, "hot_pixels"))
    detector = DetectorModel(gain=gain, hot_pixels=hot, hot_pixel_rate_counts=config.hot_pixel_rate_counts,
                             xray_hits_per_megapixel_per_tilt=(config.xray_hits_per_megapixel_per_tilt
                                                               if config.shot_noise else 0.0),
                             shot_noise=config.shot_noise,
                             xray_spectrum=XraySpectrum(config.xray_spectrum, config.xray_max_size_px,
                                                        config.xray_streak_fraction, config.xray_two_frame_fraction,
                                                        config.xray_snr_tail))
    if gain is not None:
        write_gain_file(out, gain, p)

    plans = [plan_tilt_series(config, i, radius_A) for i in range(config.n_tilt_series)]
    n_total = sum(len(pl.tilts) for pl in plans)
    bar = tqdm(total=n_total, desc="simulate", unit="tilt", disable=not progress)
    ts_summaries = []
    t_images = t_frames = t_write = 0.0
    n_layers_max = 0
    workspace: dict = {}
    for plan in plans:
        stats, particle_rows, xray_rows, hit_rows, transmissions = [], [], [], [], []
        for tilt in plan.tilts:
            t0 = time.perf_counter()
            thickness = None  # flat ice: the mean thickness everywhere
            if config.ice_thickness_variation > 0:
                thickness = ice_thickness_image(tilt, plan.ice, shape, p, device)
            spectrum, info = render_tilt_contrast(
                tilt, shape, p, optics, sigma,
                projector=projector, positions_A=plan.positions_A, rotations=plan.rotations,
                ice=ice, generator=generator_for(config.seed, "ice", plan.index, tilt.index, device=device),
                device=device, ice_psd_sqrt=psd_sqrt, workspace=workspace,
                max_stack_bytes=config.max_layer_stack_GB * 1e9, particle_share=config.radiation_damage,
                ice_scale=None if thickness is None else torch.sqrt(thickness / config.ice_thickness_A),
            )
            n_layers_max = max(n_layers_max, info.get("n_layers", 0))
            t1 = time.perf_counter()
            trans = transmission(config.ice_thickness_A if thickness is None else thickness, tilt.tilt_deg,
                                 config.inelastic_mean_free_path_A, config.inelastic_loss)
            transmissions.append({
                "transmission": transmission(config.ice_thickness_A, tilt.tilt_deg, config.inelastic_mean_free_path_A,
                                             config.inelastic_loss),
                "transmission_mean": float(trans.mean()) if thickness is not None else trans,
                "ice_thickness_min_A": float(thickness.min()) if thickness is not None else config.ice_thickness_A,
                "ice_thickness_max_A": float(thickness.max()) if thickness is not None else config.ice_thickness_A,
            })
            del thickness
            frames, xrays, hits = render_frames(
                spectrum, tilt, shape, p, config.frames_per_tilt, tilt.dose_e_per_A2 / config.frames_per_tilt, trans,
                detector,
                generator_for(config.seed, "shot_noise", plan.index, tilt.index, device=device),
                exposure_rate=exposure, damaged_spectrum=info.pop("particle_spectrum", None),
                local_motion_knots=config.local_motion_knots,
                xray_generator=generator_for(config.seed, "xray", plan.index, tilt.index), device=device,
            )
            t2 = time.perf_counter()
            write_movie_frames(out / tilt.movie_name, frames, p)
            total = frames.sum(0, dtype=torch.float32 if not config.shot_noise else torch.int32)
            stats.append({"min": float(total.min()), "max": float(total.max()), "mean": float(total.float().mean())})
            for x in xrays:
                xray_rows.append({"acquisition_index": tilt.index, "movie": tilt.movie_name, **x})
            for hit in hits:
                hit_rows.append({"acquisition_index": tilt.index, "movie": tilt.movie_name, **hit})
            if "xy_px" in info:
                for i in range(info["xy_px"].shape[0]):
                    particle_rows.append({
                        "particle": i, "acquisition_index": tilt.index, "tilt_deg": tilt.tilt_deg,
                        "x_px": float(info["xy_px"][i, 0]), "y_px": float(info["xy_px"][i, 1]),
                        "depth_A": float(info["z_P_A"][i]), "defocus_A": float(info["defocus_A"][i]),
                    })
            t3 = time.perf_counter()
            t_images += t1 - t0
            t_frames += t2 - t1
            t_write += t3 - t2
            bar.update(1)
        plan.extras["transmission"] = transmissions
        write_tilt_series_mdoc(out, config, plan, stats)
        ts_summaries.append(write_tilt_series_truth(truth, config, plan, particle_rows, xray_rows, hit_rows))
    bar.close()
    timings.update(image_formation_s=t_images, frames_s=t_frames, writing_s=t_write)
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "tomopipe_simulation": 1,
        "out_dir": str(out.resolve()),
        "structure": str(config.structure_path),
        "n_atoms": model.n_atoms,
        "n_implicit_hydrogens": model.n_implicit_hydrogens,
        "particle_radius_A": model.radius_A,
        "truth_map_box_px": truth_box,
        "projector_box_px": proj_box,
        "interaction_constant_rad_per_V_A": sigma,
        "ice_mean_potential_V": ice_potential_from_config(config),
        "max_depth_layers": n_layers_max,
        "tilt_series": ts_summaries,
        "n_hot_pixels": int(hot.shape[0]),
        "mdoc_tilt_axis_error_deg": mdoc_tilt_axis_error_deg(config),
        "timings": timings,
        "config": config.to_dict(),
    }
    write_global_truth(truth, config, plans, hot, summary)
    return summary
