"""Single-frame outliers (X-ray hits) in movie frames: detection against injected truth at the
seed's low dose and at a dose where a hit is a weak outlier, the false-positive rate on hit-free
movies, hot pixels spared, untouched frame-pixels bit-identical, the replacement value, the units
(gain, count scale, unequal frame doses), the tail bound against scipy, and bad input.

Movies: Poisson counts of a smooth specimen (±20 %) divided by a gain (raw counts; the frames
given to the algorithm are raw × gain), hot pixels with 3 extra counts in every frame, and hits
as the simulator makes them: one frame, 1-3 pixels (x, y), (x+1, y), (x, y+1) of 30-200 counts,
the second and third with half the first's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from tomopipe.algorithms.frame_outliers import (
    binomial_log_tail_bound,
    find_frame_outliers,
    remove_frame_outliers,
    replace_frame_outliers,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_movie(ny: int, nx: int, n_frames: int, counts_per_frame: float, n_hits: int, seed: int,
               n_hot: int = 0, shares=None, gain_spread: float = 0.2):
    """(frames = raw × gain float32 [F, y, x], gain [y, x], hits [(frame, [(y, x), ...])], hot [(y, x)],
    raw uint8 counts). Hits lie on a jittered grid (never touching each other)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx]
    specimen = 1 + 0.2 * np.sin(2 * np.pi * x / 37.0) * np.cos(2 * np.pi * y / 23.0)
    gain = rng.uniform(1 - gain_spread, 1 + gain_spread, size=(ny, nx))
    shares = np.full(n_frames, 1.0 / n_frames) if shares is None else np.asarray(shares, dtype=float)
    expected = counts_per_frame * n_frames * shares[:, None, None] * specimen[None] / gain[None]
    raw = rng.poisson(expected).astype(np.int64)
    cells = [(cy, cx) for cy in range(6, ny - 6, 12) for cx in range(6, nx - 6, 12)]
    order = rng.permutation(len(cells))
    hot = [cells[i] for i in order[n_hits:n_hits + n_hot]]
    for hy, hx in hot:
        raw[:, hy, hx] += rng.poisson(3.0, size=n_frames)
    hits = []
    for i in order[:n_hits]:
        cy, cx = cells[i][0] + rng.integers(-3, 4), cells[i][1] + rng.integers(-3, 4)
        frame, value, n_pix = int(rng.integers(n_frames)), int(rng.integers(30, 201)), int(rng.integers(1, 4))
        pixels = [(cy, cx, value), (cy, cx + 1, value // 2), (cy + 1, cx, value // 2)][:n_pix]
        for py, px, v in pixels:
            raw[frame, py, px] += v
        hits.append((frame, [(py, px) for py, px, _ in pixels]))
    raw = np.minimum(raw, 255).astype(np.uint8)
    frames = torch.from_numpy(raw.astype(np.float32) * gain.astype(np.float32)[None])
    return frames, torch.from_numpy(gain.astype(np.float32)), hits, hot, raw


def score(outliers, hits, n_pixels: int) -> tuple[float, float]:
    """(fraction of hits with every pixel found, frame-pixels found farther than 1 px from a hit
    pixel of their frame per image pixel)."""
    found = set(zip(outliers.frame.tolist(), outliers.y.tolist(), outliers.x.tolist()))
    complete = np.mean([all((f, py, px) in found for py, px in pixels) for f, pixels in hits])
    near = {(f, py + dy, px + dx) for f, pixels in hits for py, px in pixels for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)}
    return float(complete), len(found - near) / n_pixels


@pytest.mark.parametrize("n_frames, counts_per_frame", [(8, 0.2), (4, 5.0)], ids=["low_dose", "high_count"])
def test_injected_hits_are_removed_and_nothing_else_changes(n_frames, counts_per_frame):
    frames, gain, hits, hot, raw = make_movie(512, 512, n_frames, counts_per_frame, n_hits=500, seed=1, n_hot=40)
    cleaned, outliers = remove_frame_outliers(frames, gain)
    complete, false_rate = score(outliers, hits, 512 * 512)
    assert complete >= 0.995, complete
    assert false_rate < 2e-5  # neighbours of a hit join at a loose threshold (its rim): a few more than 1 px away
    replaced = outliers.mask(tuple(frames.shape))
    assert torch.equal(cleaned[~replaced], frames[~replaced])  # bit-identical
    assert not any(replaced[:, hy, hx].any() for hy, hx in hot)  # bright in every frame: not a frame outlier
    # a hit pixel gets the pixel's counts in its other frames per dose, times the frame's dose share
    share = outliers.dose_share.numpy()
    assert share == pytest.approx(np.full(n_frames, 1 / n_frames), abs=0.01)
    for frame, pixels in hits:
        for py, px in (p for p in pixels if replaced[frame, p[0], p[1]]):
            clean = ~replaced[:, py, px].numpy()  # the pixel's frames not replaced (all but the hit's)
            rate = raw[clean, py, px].sum() / share[clean].sum()
            assert float(cleaned[frame, py, px]) == pytest.approx(rate * share[frame] * float(gain[py, px]), rel=1e-4)
    assert float(replaced.sum(0).max()) < n_frames
    assert outliers.count_scale == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("n_frames, counts_per_frame", [(8, 0.2), (4, 5.0)], ids=["low_dose", "high_count"])
def test_false_positive_rate_on_hit_free_movies(n_frames, counts_per_frame):
    frames, gain, _, hot, _ = make_movie(1024, 1024, n_frames, counts_per_frame, n_hits=0, seed=2, n_hot=200)
    pixels = 1024 * 1024
    assert find_frame_outliers(frames, gain).n_pixels / pixels < 1e-5  # default: 1e-7 expected at most
    # the rate is a bound: asking for 1e-3 false seeds per pixel gives no more than that
    loose = find_frame_outliers(frames, gain, false_positive_rate=1e-3, max_grow_px=0)
    assert 0 < loose.n_pixels / pixels <= 1e-3
    assert not any(((loose.y == hy) & (loose.x == hx)).any() for hy, hx in hot)


def test_replacement_is_the_pixels_other_frames_scaled_to_the_frame_dose():
    """Frame doses 1 : 1 : 1 : 0.5 (an EER remainder); one pixel holds a hit in frame 1 and another
    in frame 3 (two frames of one pixel); the replacement is the clean frames' counts per dose."""
    frames, gain, _, _, raw = make_movie(128, 128, 4, 2.0, n_hits=0, seed=3, shares=[2 / 7, 2 / 7, 2 / 7, 1 / 7],
                                         gain_spread=0.0)
    frames[1, 40, 50] += 150.0
    frames[3, 40, 50] += 90.0
    outliers = find_frame_outliers(frames, gain)
    assert outliers.dose_share.numpy() == pytest.approx([2 / 7, 2 / 7, 2 / 7, 1 / 7], abs=0.01)
    at = {(int(f), int(y), int(x)): float(v) for f, y, x, v in
          zip(outliers.frame, outliers.y, outliers.x, outliers.value)}
    assert (1, 40, 50) in at and (3, 40, 50) in at
    share = outliers.dose_share.double()
    rate = (float(frames[0, 40, 50]) + float(frames[2, 40, 50])) / float(share[0] + share[2])
    assert at[(1, 40, 50)] == pytest.approx(rate * float(share[1]), rel=1e-5)
    assert at[(3, 40, 50)] == pytest.approx(rate * float(share[3]), rel=1e-5)
    # nothing else, except perhaps a neighbour of the hit in its frame (the loose growth threshold)
    assert all(key[0] in (1, 3) and abs(key[1] - 40) <= 1 and abs(key[2] - 50) <= 1 for key in at) and len(at) <= 4


def test_units_gain_and_count_scale_do_not_change_what_is_found():
    frames, gain, hits, _, raw = make_movie(256, 256, 6, 1.0, n_hits=120, seed=4)
    with_gain = find_frame_outliers(frames, gain)
    counts = torch.from_numpy(raw.astype(np.float32))
    without_gain = find_frame_outliers(counts)  # the raw counts themselves
    scaled = find_frame_outliers(frames * 3.0, gain)  # frames in units of 1/3 count
    key = lambda o: set(zip(o.frame.tolist(), o.y.tolist(), o.x.tolist()))  # noqa: E731
    assert key(with_gain) == key(scaled)
    # without the gain (±20 % here) the neighbourhood test compares raw counts of pixels of unequal
    # gain: the same hits, and at most a few other frame-pixels
    assert len(key(with_gain) ^ key(without_gain)) <= 10
    assert score(with_gain, hits, 256 * 256)[0] == 1.0 and score(without_gain, hits, 256 * 256)[0] == 1.0
    assert scaled.count_scale == pytest.approx(3.0 * with_gain.count_scale, rel=1e-3)
    assert scaled.value.numpy() == pytest.approx(3.0 * with_gain.value.numpy(), rel=1e-4)
    both = sorted(key(with_gain) & key(without_gain))
    value = {name: dict(zip(zip(o.frame.tolist(), o.y.tolist(), o.x.tolist()), o.value.tolist()))
             for name, o in (("with", with_gain), ("without", without_gain))}
    assert [value["without"][k] * float(gain[k[1], k[2]]) for k in both] == pytest.approx(
        [value["with"][k] for k in both], rel=1e-4)


def test_binomial_tail_bound_is_an_upper_bound_tight_in_the_far_tail():
    n = np.array([10, 30, 50, 200, 1000, 40, 12])
    p = np.array([0.125, 0.25, 0.125, 0.1, 0.01, 0.5, 0.125])
    for k_offset in (3, 6, 10):
        k = np.minimum(np.ceil(n * p + k_offset * np.sqrt(n * p * (1 - p))), n)
        exact = binom.sf(k - 1, n, p)  # P(K >= k)
        bound = np.exp(binomial_log_tail_bound(torch.from_numpy(k), torch.from_numpy(n.astype(float)),
                                               torch.from_numpy(p)).numpy())
        assert np.all(bound >= exact * (1 - 1e-9))
        assert np.all(bound <= exact * (1.5 if k_offset >= 6 else 3.0))
    below = binomial_log_tail_bound(torch.tensor([2.0]), torch.tensor([20.0]), torch.tensor([0.25]))
    assert float(below) == 0.0  # k under the mean: no bound below 1


def test_integer_frames_in_place_and_bad_input():
    frames, gain, hits, _, raw = make_movie(96, 96, 5, 0.5, n_hits=20, seed=5, gain_spread=0.0)
    integer = torch.from_numpy(raw)
    outliers = find_frame_outliers(integer)
    cleaned = replace_frame_outliers(integer, outliers)
    assert cleaned.dtype == torch.float32 and torch.equal(integer, torch.from_numpy(raw))  # input untouched
    assert score(outliers, hits, 96 * 96)[0] == 1.0
    same = frames.clone()
    assert replace_frame_outliers(same, outliers, in_place=True) is same
    assert torch.equal(same, cleaned * gain)
    with pytest.raises(ValueError, match="floating-point"):
        replace_frame_outliers(integer, outliers, in_place=True)
    with pytest.raises(ValueError, match="3-D"):
        find_frame_outliers(frames[0])
    with pytest.raises(ValueError, match="at least 2 frames"):
        find_frame_outliers(frames[:1])
    with pytest.raises(ValueError, match="gain must be"):
        find_frame_outliers(frames, gain[:50])
    broken = frames.clone()
    broken[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        find_frame_outliers(broken)
    with pytest.raises(ValueError, match="false_positive_rate"):
        find_frame_outliers(frames, false_positive_rate=0.0)
    empty = find_frame_outliers(torch.zeros(4, 16, 16))  # no counts: nothing to test
    assert empty.n_pixels == 0


def test_realistic_hits_are_removed_whole_at_a_low_dose():
    """The twin's realistic hits (spots up to 8 px, streaks, heavy-tailed counts from the noise level
    up) in a low-dose movie (0.2 counts per pixel and frame): every hit whose strongest pixel noise
    cannot explain (Poisson tail <= 1e-8, 'detectable') is found and nearly all its counts are
    replaced, large weak spots included (their pixels of 5-9 counts are 1e-8 events against the
    pixel's own 7 other frames, 1e-14 against its neighbourhood); few other frame-pixels change."""
    from scipy.stats import poisson

    from tomopipe.simulate.detector import XraySpectrum, draw_xray_hits

    frames, gain, _, _, raw = make_movie(512, 512, 8, 0.2, n_hits=0, seed=11, gain_spread=0.05)
    spectrum = XraySpectrum(max_size_px=8.0, streak_fraction=0.3, two_frame_fraction=0.0, snr_tail=0.6)
    background = torch.full((512, 512), 0.2) / gain
    props, pixels = draw_xray_hits(spectrum, 800.0, 8, background, torch.Generator().manual_seed(2))
    hit_raw = torch.from_numpy(raw.astype(np.int64))
    for frame, y, x, counts in pixels:
        hit_raw[frame, y, x] += counts
    frames = hit_raw.clamp_max(255).to(torch.float32) * gain
    outliers = find_frame_outliers(frames, gain)
    replaced = outliers.mask(tuple(frames.shape))
    lam = np.array([h["background_counts"] for h in props])
    peak = np.array([h["peak_counts"] for h in props])
    detectable = poisson.sf(np.floor(lam + 0.5) + peak - 1, lam) <= 1e-8  # the hit's pixel as observed
    assert detectable.sum() > 40, detectable.sum()
    share, large_found = [], []
    for hit, (frame, y, x, counts), strong in zip(props, pixels, detectable):
        if not strong:
            continue
        found = replaced[frame, y, x]
        share.append(float(counts[found].sum()) / float(counts.sum()))
        if hit["shape"] == "spot" and hit["size_px"] >= 5:
            large_found.append(bool(found.any()))
    assert np.mean(np.array(share) >= 0.8) >= 0.85, sorted(share)[:10]
    assert np.mean(share) >= 0.88
    assert len(large_found) >= 5 and all(large_found)
    hit_pixels = torch.zeros_like(replaced)
    for frame, y, x, _ in pixels:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                hit_pixels[frame, (y + dy).clamp(0, 511), (x + dx).clamp(0, 511)] = True
    assert int((replaced & ~hit_pixels).sum()) == 0
