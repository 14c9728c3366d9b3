"""The twin is as hard as real data where the pipeline leans on it: the mdoc's tilt axis is off by
a calibration error, the dose grows with the tilt (SerialEM's cosine rule) and the counts follow
it, frames jitter on top of the smooth drift, the specimen has a pretilt, the ice is uneven (the
counts follow its thickness, the particles stay inside it), and X-ray hits have a realistic
spectrum (spots up to 8 px, streaks, heavy-tailed counts from the noise level up, some in two
frames), every hit recorded in the truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import STRUCTURE
from tomopipe.io.mdoc import read_mdoc
from tomopipe.io.movies import read_gain, read_movie
from tomopipe.simulate import config_from_preset, simulate
from tomopipe.simulate.detector import XraySpectrum, draw_xray_hits
from tomopipe.simulate.imaging import ice_thickness_image
from tomopipe.simulate.plan import mdoc_tilt_axis_error_deg, plan_tilt_series
from tomopipe.steps.import_movies import ImportMovies, read_tilt_series

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**changes):
    """A fast acquisition: 128 px at 3.16 Å, two frames, two particles."""
    settings = dict(structure=str(STRUCTURE), image_width_px=128, image_height_px=128, frames_per_tilt=2,
                    particles_per_tilt_series=2, truth_binnings=(1,), threads=1)
    settings.update(changes)
    return config_from_preset("tiny", **settings)


def test_mdoc_tilt_axis_is_off_by_the_drawn_calibration_error(tmp_path):
    config = small_config(tilt_min_deg=0.0, tilt_max_deg=0.0, mdoc_tilt_axis_error_sigma_deg=2.0, seed=5)
    simulate(config, tmp_path, progress=False)
    error = json.loads((tmp_path / "truth" / "truth.json").read_text())["mdoc_tilt_axis_error_deg"]
    assert error == pytest.approx(mdoc_tilt_axis_error_deg(config)) and abs(error) > 0.05
    params = {p.name: p.default for p in ImportMovies.params}
    params.update(files_directory=str(tmp_path))
    imported = read_tilt_series({"mdoc_path": str(tmp_path / "TS_01.mdoc"), "params": params})["acquisition"]
    # the importer gets the truth plus the error (to the mdoc title's 0.1°); the truth keeps the axis
    assert imported["tilt_axis_angle_deg"] == pytest.approx(config.tilt_axis_angle_deg + error, abs=0.051)
    assert (pd.read_csv(tmp_path / "truth" / "TS_01_tilts.csv")["tilt_axis_deg"] == config.tilt_axis_angle_deg).all()
    # one draw per session, N(0, sigma) over sessions; sigma 0 gives the exact axis
    draws = np.array([mdoc_tilt_axis_error_deg(config.replace(seed=s)) for s in range(400)])
    assert draws.std() == pytest.approx(2.0, rel=0.1) and abs(draws.mean()) < 0.3
    assert mdoc_tilt_axis_error_deg(config.replace(mdoc_tilt_axis_error_sigma_deg=0.0)) == 0.0


def test_dose_grows_with_the_tilt_and_the_counts_follow(tmp_path):
    config = small_config(tilt_min_deg=-50.0, tilt_max_deg=50.0, tilt_step_deg=50.0, exposure_cosine_power=1.0,
                          ice_thickness_variation=0.0, seed=2)
    simulate(config, tmp_path, progress=False)
    mdoc = read_mdoc(tmp_path / "TS_01.mdoc")
    sections = mdoc.sections.set_index("movie_name")
    tilts = pd.read_csv(tmp_path / "truth" / "TS_01_tilts.csv").set_index("movie")
    gain = read_gain(tmp_path / "gain_ref.mrc", flip_y=True)
    hot = pd.read_csv(tmp_path / "truth" / "hot_pixels.csv")
    xrays = pd.read_csv(tmp_path / "truth" / "TS_01_xrays.csv")
    per_count = {}
    for movie, section in sections.iterrows():
        growth = 1.0 / math.cos(math.radians(section.tilt_angle_deg))
        assert section.exposure_dose_e_per_A2 == pytest.approx(2.64 * growth, abs=1e-4)
        assert section.exposure_time_s == pytest.approx(config.exposure_time_s * growth, abs=1e-4)
        assert tilts.loc[movie, "dose_e_per_A2"] == pytest.approx(section.exposure_dose_e_per_A2)
        frames = read_movie(tmp_path / movie).astype(np.float64) * gain
        mask = np.ones(gain.shape, dtype=bool)
        mask[hot.y, hot.x] = False
        mask[xrays[xrays.movie == movie].y, xrays[xrays.movie == movie].x] = False
        # mean corrected counts per frame / (dose per frame · pixel² · zero-loss transmission) = 1
        expected = section.exposure_dose_e_per_A2 / 2 * 3.16**2 * tilts.loc[movie, "transmission_mean"]
        per_count[movie] = frames[:, mask].mean() / expected
    assert max(sections.exposure_dose_e_per_A2) > 1.5 * 2.64  # 50°: 1/cos = 1.56
    assert list(per_count.values()) == pytest.approx([1.0] * 3, abs=0.02)
    # pre-exposures accumulate the grown doses in acquisition order
    order = tilts.sort_values("acquisition_index")
    assert order.pre_exposure_e_per_A2.to_numpy() == pytest.approx(
        np.concatenate([[0.0], np.cumsum(order.dose_e_per_A2.to_numpy())[:-1]]))


def test_frame_jitter_on_top_of_the_smooth_drift():
    base = small_config(frames_per_tilt=40, tilt_min_deg=-40.0, tilt_max_deg=40.0, tilt_step_deg=4.0, seed=4)
    jittery = plan_tilt_series(base.replace(frame_jitter_A=0.5), 0, 60.0)
    smooth = plan_tilt_series(base.replace(frame_jitter_A=0.0), 0, 60.0)
    jitter = torch.stack([t.frame_jitter_A for t in jittery.tilts])  # [tilts, frames, 2]
    assert (jitter[:, 0] == 0).all()  # frame 0 is the reference of the truth's shifts
    assert float(jitter[:, 1:].std()) == pytest.approx(0.5, rel=0.08)
    assert abs(float(jitter[:, 1:].mean())) < 0.03
    # the jitter adds to the same smooth trajectory (its own random stream)
    for a, b in zip(jittery.tilts, smooth.tilts):
        assert torch.allclose(a.frame_shifts_A - a.frame_jitter_A, b.frame_shifts_A)
    # frame-to-frame steps are no longer smooth: their second differences carry the jitter (2·3·σ²)
    second = torch.stack([t.frame_shifts_A for t in jittery.tilts]).diff(n=2, dim=1)
    assert float(second[:, 1:].square().mean()) == pytest.approx(6 * 0.25, rel=0.15)
    # the truth records it
    assert all(t.frame_jitter_A.abs().sum() == 0 for t in smooth.tilts)


def test_specimen_pretilt_is_a_tilt_angle_offset_in_the_truth(tmp_path):
    config = small_config(specimen_pretilt_deg=4.0, tilt_angle_offset_deg=0.5, seed=6)
    simulate(config, tmp_path, progress=False)
    tilts = pd.read_csv(tmp_path / "truth" / "TS_01_tilts.csv")
    offset = tilts.true_tilt_deg - tilts.stage_tilt_deg
    assert offset.mean() == pytest.approx(4.5, abs=3 * config.tilt_angle_sigma_deg)
    assert (tilts.specimen_pretilt_deg == 4.0).all()
    # the mdoc has the stage readings only
    mdoc = read_mdoc(tmp_path / "TS_01.mdoc")
    assert sorted(mdoc.tilt_angles_deg) == pytest.approx(sorted(tilts.stage_tilt_deg), abs=1e-4)


def test_uneven_ice_counts_follow_the_thickness_and_particles_stay_inside():
    config = small_config(image_width_px=256, image_height_px=256, ice_thickness_variation=0.4,
                          inelastic_mean_free_path_A=800.0, tilt_min_deg=-12.0, tilt_max_deg=12.0,
                          particles_per_tilt_series=12, seed=8)
    plan = plan_tilt_series(config, 0, 60.0)
    ice = plan.ice
    x, y, z = plan.positions_A.T
    assert bool((z.abs() <= ice.thickness_A(x, y) / 2 - 60.0 + 1e-9).all())
    grid = torch.linspace(-400.0, 400.0, 41, dtype=torch.float64)
    thickness = ice.thickness_A(*torch.meshgrid(grid, grid, indexing="xy"))
    assert float(thickness.max() - thickness.min()) > 0.4 * config.ice_thickness_A  # a real variation
    assert float((thickness / config.ice_thickness_A - 1).abs().max()) <= 0.4 + 1e-9
    # the image sees the slab's thickness where the pixel's ray crosses the mid-plane
    tilt = plan.tilts[-1]
    image = ice_thickness_image(tilt, ice, (256, 256), config.pixel_size_A)
    a, theta = math.radians(tilt.axis_deg), math.radians(tilt.tilt_deg)
    for row, col in ((10, 20), (128, 128), (200, 240)):
        dx = (col - 128) * config.pixel_size_A - tilt.shift_A[0]
        dy = (row - 128) * config.pixel_size_A - tilt.shift_A[1]
        u = (math.cos(a) * dx + math.sin(a) * dy) / tilt.magnification / math.cos(theta)
        v = (-math.sin(a) * dx + math.cos(a) * dy) / tilt.magnification
        expected = float(ice.thickness_A(torch.tensor(u), torch.tensor(v)))
        assert float(image[row, col]) == pytest.approx(expected, rel=2e-3)


def test_uneven_ice_shows_in_the_counts(tmp_path):
    config = small_config(image_width_px=256, image_height_px=256, ice_thickness_variation=0.4,
                          inelastic_mean_free_path_A=800.0, tilt_min_deg=0.0, tilt_max_deg=0.0, frames_per_tilt=4,
                          dose_per_tilt_e_per_A2=20.0, particles_per_tilt_series=0, seed=8,
                          xray_hits_per_megapixel_per_tilt=0.0)
    simulate(config, tmp_path, progress=False)
    movie = sorted(tmp_path.glob("TS_01_001_*.tif"))[0]
    counts = read_movie(movie).astype(np.float64).sum(0) * read_gain(tmp_path / "gain_ref.mrc", flip_y=True)
    plan = plan_tilt_series(config, 0, 60.0)
    thickness = ice_thickness_image(plan.tilts[0], plan.ice, (256, 256), config.pixel_size_A).double().numpy()
    blocks = lambda a: a.reshape(16, 16, 16, 16).mean((1, 3)).ravel()  # noqa: E731
    log_counts = np.log(blocks(counts))
    slope = np.polyfit(blocks(thickness), log_counts, 1)[0]
    # ln(counts) = const − t / λ_in at 0° tilt
    assert slope == pytest.approx(-1.0 / 800.0, rel=0.15)
    assert np.corrcoef(blocks(thickness), log_counts)[0, 1] < -0.95


def test_xray_hits_have_a_realistic_spectrum():
    spectrum = XraySpectrum(max_size_px=8.0, streak_fraction=0.3, two_frame_fraction=0.1, snr_tail=0.6)
    background = torch.full((512, 512), 0.2)
    props, pixels = draw_xray_hits(spectrum, 6000.0, 8, background, torch.Generator().manual_seed(1))
    hits = pd.DataFrame(props)
    assert len(hits) == pytest.approx(6000 * 0.262144, abs=4 * math.sqrt(6000 * 0.262144))  # Poisson
    assert (hits["shape"] == "streak").mean() == pytest.approx(0.3, abs=0.03)
    assert (hits.second_frame >= 0).mean() == pytest.approx(0.1, abs=0.02)
    assert hits.size_px.max() <= 8.0 and hits.size_px.max() > 7.5 and hits.size_px.min() < 1.1
    assert hits[hits["shape"] == "spot"].n_pixels.max() >= 30  # big blobs
    streaks = hits[(hits["shape"] == "streak") & (hits.size_px > 6) & (hits.peak_counts >= 10)]
    assert len(streaks) > 10 and (streaks.n_pixels >= 6).all()  # elongated tracks (weak ones fade below 1 count)
    # heavy-tailed strength from the noise level up: P(SNR > s) ≈ s^-0.6 above the 1-count floor
    snr = hits.peak_counts / np.sqrt(0.2)
    assert hits.peak_counts.min() == 1
    for s in (10.0, 50.0):
        assert (snr > s).mean() == pytest.approx(s**-0.6, rel=0.2)
    assert (hits.peak_counts == 255).any()  # the brightest saturate the 8-bit counts
    # each hit's frame-pixels hold its counts, in its frame(s)
    for hit, (frame, y, x, counts) in zip(props[:200], pixels[:200]):
        assert int(counts.sum()) == hit["total_counts"] and int(counts.max()) <= hit["peak_counts"]
        assert set(frame.tolist()) <= {hit["frame"], hit["second_frame"]}
        assert bool(((x - hit["x"]).abs() <= hit["size_px"] / 2 + 3).all())


def test_every_hit_is_in_the_truth_and_in_the_frames(tmp_path):
    config = small_config(image_width_px=256, image_height_px=256, frames_per_tilt=4, tilt_min_deg=-6.0,
                          tilt_max_deg=6.0, xray_hits_per_megapixel_per_tilt=200.0, seed=9)
    simulate(config, tmp_path, progress=False)
    hits = pd.read_csv(tmp_path / "truth" / "TS_01_xray_hits.csv")
    pixels = pd.read_csv(tmp_path / "truth" / "TS_01_xrays.csv")
    assert len(hits) > 20 and set(hits["shape"]) == {"spot", "streak"}
    totals = pixels.groupby(["movie", "hit"]).counts.sum()
    clipped = hits.set_index(["movie", "hit"]).total_counts
    assert (totals <= clipped).all() and (totals >= 0.9 * clipped).mean() > 0.95  # below 255 only on saturation
    for movie, group in pixels.groupby("movie"):
        frames = read_movie(tmp_path / movie)
        assert (frames[group.frame, group.y, group.x] >= group.counts).all()
    summary = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert summary["tilt_series"][0]["n_xray_hits"] == len(hits)


def test_truth_reader_gives_the_new_fields(tmp_path):
    from tomopipe.validate.truth import Truth

    config = small_config(tilt_min_deg=0.0, tilt_max_deg=0.0, xray_hits_per_megapixel_per_tilt=300.0, seed=12)
    simulate(config, tmp_path, progress=False)
    truth = Truth.find(tmp_path)
    assert truth.mdoc_tilt_axis_error_deg == pytest.approx(mdoc_tilt_axis_error_deg(config))
    hits = truth.xray_hits("TS_01")
    assert len(hits) > 0 and set(truth.xrays("TS_01").hit) == set(hits.hit)
    ice = truth.ice_thickness("TS_01")
    assert len(ice) == 81 and ice.thickness_A.between(0.9 * 400.0 - 1e-6, 1.1 * 400.0 + 1e-6).all()
