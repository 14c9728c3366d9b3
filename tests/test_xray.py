"""X-ray and hot-pixel removal (ccderaser -find in torch): detection against injected truth, false
positives on clean images, the untouched rest of the image, the extra-large peak test (X-rays
erased, gold beads spared), the difference test's patch size limit, and the polynomial fill.

Images: a smooth textured background of tens of counts (like a motion-corrected sum) with Poisson
noise; hits are single pixels or 8-connected blobs of 2-6 pixels, each pixel 10-100 SD (SD = the
Poisson SD of the background there) above the background; hot pixels sit at the same place in
every image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tomopipe.algorithms.xray import XrayParams, count_scale, erase_xrays, fill_patches, find_xrays, label_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


def textured_background(ny: int, nx: int, mean_counts: float, seed: int) -> np.ndarray:
    """Expected counts: mean x (1 + smooth texture of +-25 % + a gentle ramp), float64."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(ny, nx, generator=g, dtype=torch.float64)
    k2 = (torch.fft.fftfreq(ny, dtype=torch.float64)[:, None] ** 2
          + torch.fft.rfftfreq(nx, dtype=torch.float64)[None] ** 2)
    spectrum = torch.fft.rfft2(noise) * (torch.exp(-k2 * 1600) + 0.15 * torch.exp(-k2 * 36))
    texture = torch.fft.irfft2(spectrum, s=(ny, nx))
    texture = (texture / texture.std()).clamp(-3, 3) / 3
    ramp = torch.linspace(-1, 1, nx, dtype=torch.float64)[None] * 0.1
    return (mean_counts * (1 + 0.25 * texture + ramp)).numpy()


def inject_hits(expected: np.ndarray, counts: np.ndarray, rng, n_hits: int, spacing: int = 18,
                hot: list | None = None) -> list[list[tuple[int, int]]]:
    """Add hits (in place) on a jittered grid, ``spacing`` apart; returns each hit's pixels."""
    ny, nx = counts.shape
    sd = np.sqrt(expected)
    cells = np.stack(np.meshgrid(np.arange(spacing, ny - spacing, spacing), np.arange(spacing, nx - spacing, spacing),
                                 indexing="ij"), -1).reshape(-1, 2)
    hits = []
    for cy, cx in cells[rng.choice(len(cells), size=min(n_hits, len(cells)), replace=False)]:
        cy, cx = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
        size = int(rng.choice([1, 1, 2, 3, 4, 5, 6]))
        pixels = [(cy, cx)]
        while len(pixels) < size:
            py, px = pixels[rng.integers(len(pixels))]
            step = tuple(rng.integers(-1, 2, size=2))
            if (py + step[0], px + step[1]) not in pixels:
                pixels.append((py + step[0], px + step[1]))
        amplitude = rng.uniform(10, 100)
        for py, px in pixels:
            counts[py, px] += rng.uniform(max(10, amplitude / 2), amplitude) * sd[py, px]
        hits.append(pixels)
    for py, px, amplitude in hot or []:
        counts[py, px] += amplitude * sd[py, px]
        hits.append([(py, px)])
    return hits


def _truth_mask(shape, hits):
    truth = np.zeros(shape, dtype=bool)
    for hit in hits:
        for p in hit:
            truth[p] = True
    return truth


def test_injected_hits_are_removed_and_other_pixels_stay_identical():
    rng = np.random.default_rng(1)
    ny = nx = 768
    hot = [(int(y), int(x), float(a)) for y, x, a in zip(rng.integers(20, ny - 20, 20), rng.integers(20, nx - 20, 20),
                                                         rng.uniform(15, 60, 20))]
    n_hits = removed = good_values = n_hit_pixels = 0
    for index, mean_counts in enumerate((15.0, 30.0, 60.0)):
        expected = textured_background(ny, nx, mean_counts, seed=index)
        counts = rng.poisson(expected).astype(np.float32)
        hits = inject_hits(expected, counts, rng, n_hits=150, hot=hot)
        image = torch.from_numpy(counts)
        result = erase_xrays(image)
        mask = result.mask.numpy()
        truth = _truth_mask(mask.shape, hits)
        n_hits += len(hits)
        removed += sum(all(mask[p] for p in hit) for hit in hits)
        # replaced values are back to the background: within 5 SD of the expected counts
        z = np.abs(result.image.numpy() - expected) / np.sqrt(expected)
        good_values += int((z[truth] < 5).sum())
        n_hit_pixels += int(truth.sum())
        # everything not replaced is bit-identical; the output keeps the dtype
        assert result.image.dtype == image.dtype
        assert torch.equal(result.image[~result.mask], image[~result.mask])
        # pixels replaced beyond the hits only touch them (noise pixels joined to a hit), and are few
        extra = mask & ~truth
        dilated = torch.nn.functional.max_pool2d(torch.from_numpy(truth)[None, None].float(), 3, 1, 1)
        near_hit = dilated[0, 0].numpy() > 0
        assert not (extra & ~near_hit).any()
        assert extra.sum() <= 0.02 * truth.sum()
        assert result.n_patches == pytest.approx(len(hits), rel=0.05)
    assert removed / n_hits >= 0.995, (removed, n_hits)
    assert good_values / n_hit_pixels >= 0.99


def test_no_false_positives_on_clean_images():
    rng = np.random.default_rng(2)
    n_pixels = n_false = 0
    for index, (mean_counts, size) in enumerate(((10.0, 1024), (40.0, 1024), (25.0, 512))):
        expected = textured_background(size, size, mean_counts, seed=10 + index)
        image = torch.from_numpy(rng.poisson(expected).astype(np.float32))
        result = erase_xrays(image)
        n_pixels += image.numel()
        n_false += result.n_pixels
        if result.n_pixels == 0:
            assert torch.equal(result.image, image) and result.passes == 1
    assert n_pixels >= 2_000_000
    assert n_false / n_pixels < 1e-5, n_false


def test_extra_large_xrays_are_erased_but_gold_beads_spared():
    rng = np.random.default_rng(3)
    ny = nx = 512
    expected = textured_background(ny, nx, 30.0, seed=4)
    yy, xx = np.mgrid[:ny, :nx]
    beads = [(100, 100, 7.0), (100, 300, 9.0), (300, 120, 6.0), (400, 400, 8.0)]
    for cy, cx, r in beads:  # dark gold beads with soft edges
        expected *= 1 - 0.7 / (1 + np.exp(np.clip((np.hypot(yy - cy, xx - cx) - r) / 0.8, -50, 50)))
    counts = rng.poisson(expected).astype(np.float32)
    blobs = [(250, 250, 4.5, 40.0), (420, 200, 6.0, 60.0), (200, 420, 5.5, 80.0)]
    for cy, cx, r, amplitude in blobs:  # X-rays wider than maximum_radius_px
        disc = np.hypot(yy - cy, xx - cx) <= r
        counts[disc] += amplitude * np.sqrt(expected[disc])
    result = erase_xrays(torch.from_numpy(counts))
    mask = result.mask.numpy()
    for cy, cx, r in beads:
        assert not mask[np.hypot(yy - cy, xx - cx) <= r + 4].any()
    for cy, cx, r, _ in blobs:
        disc = np.hypot(yy - cy, xx - cx) <= r
        assert mask[disc].all()
        assert not (mask & ~disc & (np.hypot(yy - cy, xx - cx) < r + 6)).any()
    # without the extra-large test these blobs are too wide for the peak test (ccderaser's behaviour)
    without = erase_xrays(torch.from_numpy(counts), XrayParams(giant_criterion_sd=0))
    assert without.n_pixels == 0


def _flat_noise(size=256, mean_counts=30.0, seed=5):
    rng = np.random.default_rng(seed)
    return rng.poisson(np.full((size, size), mean_counts)).astype(np.float32)


def test_difference_test_erases_patches_of_at_most_two_pixels():
    counts = _flat_noise()
    sd = np.sqrt(30.0)
    single, pair, triple = [(60, 60)], [(60, 150), (60, 151)], [(150, 60), (150, 61), (151, 60)]
    for hit in (single, pair, triple):
        for p in hit:
            counts[p] += 25 * sd
    diff_only = XrayParams(peak_criterion_sd=1000.0, giant_criterion_sd=0.0)
    mask = erase_xrays(torch.from_numpy(counts), diff_only).mask.numpy()
    assert all(mask[p] for p in single + pair)
    assert not any(mask[p] for p in triple)
    assert mask.sum() == 3
    larger = erase_xrays(torch.from_numpy(counts), XrayParams(peak_criterion_sd=1000.0, giant_criterion_sd=0.0,
                                                              max_pixels_in_diff_patch=3)).mask.numpy()
    assert all(larger[p] for p in single + pair + triple) and larger.sum() == 6


def test_peak_test_finds_blobs_and_dark_defects_and_respects_the_edge():
    counts = _flat_noise(seed=6)
    sd = np.sqrt(30.0)
    blob = [(80, 80), (80, 81), (81, 80), (81, 81), (82, 81)]
    for p in blob:
        counts[p] += 30 * sd
    counts[160, 160] = 0.0  # a dead pixel: 5.5 SD below, too weak
    dark = [(200, 100), (200, 101), (201, 100), (201, 101)]
    for p in dark:
        counts[p] -= 30 * sd  # a dark 2 x 2 defect, 30 SD below
    counts[2, 128] += 50 * sd  # inside the 4-px edge exclusion
    counts[128, 5] += 50 * sd  # just outside it
    peak_only = XrayParams(diff_criterion_sd=1000.0)
    mask = erase_xrays(torch.from_numpy(counts), peak_only).mask.numpy()
    assert all(mask[p] for p in blob) and all(mask[p] for p in dark)
    assert not mask[160, 160] and not mask[2, 128] and mask[128, 5]
    assert mask.sum() == len(blob) + len(dark) + 1


def test_fill_patches_reproduces_a_smooth_surface_and_keeps_the_dtype():
    ny, nx = 96, 128
    yy, xx = np.mgrid[:ny, :nx].astype(np.float64)
    surface = 1000 + 3.0 * xx - 2.0 * yy + 0.05 * xx * yy - 0.02 * yy**2 + 0.01 * xx**2
    image = torch.from_numpy(surface.astype(np.float32))
    mask = torch.zeros(ny, nx, dtype=torch.bool)
    mask[10:13, 20:22] = True  # a 3 x 2 patch
    mask[50, 60] = True
    mask[0:2, 0:3] = True  # at the corner: fitted from the pixels that exist
    mask[40, 100] = mask[41, 101] = True  # diagonal neighbours form one patch
    corrupted = image.clone()
    corrupted[mask] = 1e6
    filled = fill_patches(corrupted, mask)
    assert torch.equal(filled[~mask], corrupted[~mask])
    assert torch.allclose(filled[mask].double(), torch.from_numpy(surface)[mask], atol=2e-3)
    # integer images: rounded fitted values, the rest untouched; order 0 = the ring's mean
    as_int = torch.from_numpy(np.round(surface).astype(np.int16))
    filled_int = fill_patches(as_int, mask, polynomial_order=0)
    assert filled_int.dtype == torch.int16 and torch.equal(filled_int[~mask], as_int[~mask])
    ring = as_int[48:53, 58:63].double()  # the 5 x 5 neighbourhood (border 2) less its centre
    ring_mean = (ring.sum() - ring[2, 2]) / 24
    assert int(filled_int[50, 60]) == int(torch.round(ring_mean))


def test_label_pixels_eight_connected_components():
    ys = torch.tensor([0, 0, 1, 5, 6, 7, 7, 3])
    xs = torch.tensor([0, 1, 2, 5, 6, 7, 0, 9])
    labels, n = label_pixels(ys, xs, (8, 10))
    assert n == 4
    assert labels[0] == labels[1] == labels[2]  # (0,1)-(1,2) touch diagonally
    assert labels[3] == labels[4] == labels[5]
    assert len({int(labels[6]), int(labels[7]), int(labels[0]), int(labels[3])}) == 4
    empty, none = label_pixels(ys[:0], xs[:0], (8, 10))
    assert none == 0 and empty.numel() == 0


def test_integer_images_and_bad_input():
    counts = _flat_noise(size=128, seed=7)
    counts[64, 64] += 40 * np.sqrt(30.0)
    as_uint16 = torch.from_numpy(counts.astype(np.uint16))
    result = erase_xrays(as_uint16)
    assert result.image.dtype == torch.uint16 and bool(result.mask[64, 64]) and result.n_pixels == 1
    assert torch.equal(result.image[~result.mask], as_uint16[~result.mask])
    assert abs(int(result.image[64, 64]) - 30) < 4 * np.sqrt(30.0)
    with pytest.raises(ValueError, match="2-D"):
        find_xrays(torch.zeros(3, 64, 64))
    bad = torch.from_numpy(counts.copy())
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        erase_xrays(bad)
    with pytest.raises(ValueError, match="peak_criterion_sd"):
        XrayParams(peak_criterion_sd=0)
    with pytest.raises(ValueError, match="polynomial_order"):
        XrayParams(polynomial_order=4)


def test_shot_noise_test_spares_poisson_noise_at_one_or_two_counts_per_pixel():
    """At a tilt image's dose (about 1.5 counts per pixel) Poisson noise is skewed: ccderaser's SD
    criteria take 1e-5 of the pixels for X-rays; the shot-noise test keeps them and still lets
    every injected hit (10-100 SD, i.e. 12-150 counts) be replaced."""
    rng = np.random.default_rng(8)
    expected = textured_background(1024, 1024, 1.5, seed=20)
    counts = rng.poisson(expected).astype(np.float32)
    ccderaser = erase_xrays(torch.from_numpy(counts), XrayParams(shot_noise_probability=0.0))
    assert ccderaser.n_pixels >= 5  # false positives of the Gaussian criteria (14 here)
    assert erase_xrays(torch.from_numpy(counts)).n_pixels == 0
    hits = inject_hits(expected, counts, rng, n_hits=300)
    result = erase_xrays(torch.from_numpy(counts))
    mask = result.mask.numpy()
    truth = _truth_mask(mask.shape, hits)
    assert sum(all(mask[p] for p in hit) for hit in hits) == len(hits)
    near_hit = torch.nn.functional.max_pool2d(torch.from_numpy(truth)[None, None].float(), 3, 1, 1)[0, 0].numpy() > 0
    assert not (mask & ~near_hit).any()


def test_count_scale_from_the_noise_of_adjacent_pixels():
    rng = np.random.default_rng(9)
    expected = textured_background(512, 512, 1.5, seed=21)
    counts = rng.poisson(expected).astype(np.float32)
    assert count_scale(torch.from_numpy(counts)) == pytest.approx(1.0, abs=0.03)
    assert count_scale(torch.from_numpy(counts * 4)) == pytest.approx(4.0, abs=0.12)  # e.g. 2 x 2 binned means / 4
    hits = inject_hits(expected, counts, rng, n_hits=300, spacing=14)  # ~3 hits in every tile
    assert count_scale(torch.from_numpy(counts)) == pytest.approx(1.0, abs=0.05)
    assert len(hits) == 300
    # strong contrast at 100 counts (x 0.5 .. 1.5 over 125 px, and the texture): the image's variance is
    # mostly specimen, the differences of adjacent pixels mostly shot noise
    contrast = textured_background(512, 512, 100.0, seed=22) * (1 + 0.5 * np.sin(np.arange(512) / 20.0))[None]
    image = rng.poisson(contrast).astype(np.float32)
    assert image.var() / image.mean() > 10
    assert count_scale(torch.from_numpy(image)) == pytest.approx(1.0, abs=0.15)
    assert count_scale(torch.from_numpy(counts - 10)) is None  # not counts: the shot-noise test is skipped
    with pytest.raises(ValueError, match="shot_noise_probability"):
        XrayParams(shot_noise_probability=1.0)
