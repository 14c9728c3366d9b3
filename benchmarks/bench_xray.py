"""X-ray removal along the whole chain, scored against the simulator's truth.

Chain (as the pipeline runs it): the gain-corrected frames of each tilt movie lose their
single-frame outliers (:func:`tomopipe.algorithms.frame_outliers.find_frame_outliers`, the
``motion_ctf`` step's ``remove_frame_outliers``), the frames are aligned and summed with dose
weighting (``estimate_motion`` / ``align_and_sum`` with the step's defaults), and the X-ray eraser
(ccderaser -find with Scipion's defaults, plus its shot-noise test) runs on the sum. Baseline: the
same without the frame step (the eraser alone on the motion-corrected sum, where sub-pixel shifts
and the dose-weighting filters have spread each hit over a few pixels with ringing around them).

Truth. Each regime is simulated twice with the same seed (``tomopipe simulate``, preset ``tiny``
made larger, more X-ray hits, the twin's realistic hit spectrum: spots up to 8 px, streaks,
heavy-tailed counts from the noise level up, some hits split over two frames): with hits and
without. Hits come from their own random stream, so the two differ only by the hits
(``truth/TS_xx_xray_hits.csv``: one row per hit; ``TS_xx_xrays.csv``: its frame-pixels and the
counts added). The hit-free movie, aligned with the motion model found on the cleaned movie with
hits, gives the truth ``R`` of every sum (alignment and summation are linear in the frames).
Regimes: ``low dose`` (0.79 Å/px, 8 frames, ~0.16 counts/px/frame, the ``small`` preset's and the
seed's regime) and ``tiny`` (3.16 Å/px, 4 frames, ~6 counts/px/frame: a hit is a weaker outlier).

Scores, per hit (one event: all its frame-pixels):
- strength: its frame SNR (peak counts / sqrt of the frame's expected counts there, from the
  truth), binned ``<3, 3-5, 5-10, 10-30, >=30``; and its peak in the motion-corrected sum without
  any removal, ``before_sd`` = max (S - R) / SD over its window (``SD`` = sqrt of R's local mean, 7 x 7);
- ``detectable``: its strongest frame-pixel is less probable than ``DETECTABLE_P`` as Poisson noise
  around the frame's expected counts there (``P(K >= round(λ̄) + peak) <= 1e-8``, the pixel as observed:
  noise makes such a
  pixel about once in 10^8 frame-pixels, ~5 movies of the small preset). Weaker hits lie in the
  noise: no method can tell them from it at a useful false-positive rate; they are reported (all
  hits) but their misses are not misses of the detectable class;
- ``removed``: after the chain no pixel of its window (every pixel of the hit moved by its frame's
  shift, 2 px around) stands >= 3 SD above the truth, (A - R) / SD: a large spot or a streak must
  be removed whole; ``residual``: what is left of its counts, sum over the window of (A - R) / its
  total counts; ``frame_found``: all its pixels 3 noise SDs above the frame (counts >= 3·sqrt(λ̄), at
  least 3) were replaced in their frames;
- false positives per pixel of the images: frame-pixels replaced farther than 1 px from a hit pixel
  of their frame, plus pixels the eraser replaced outside every hit window and hot-pixel trail
  (for the baseline these include a hit's ringing beyond its window); the same on the hit-free
  movies and sums (``fp_hit_free``);
- unchanged: frame-pixels not replaced are bit-identical, and so are the sum's pixels the eraser
  did not replace (``rest_unchanged``); ``rest_max_dev_sd`` / ``rest_rms_dev_sd``: |A - R| / SD more
  than 6 px from every hit, hot-pixel trail and replaced pixel (the far field that sub-pixel shifts
  spread a hit, or its removal, into: the rest of the image against the truth);
- ``frames_s_per_movie``: seconds of the frame step per tilt movie; ``eraser_s_per_image``.

    python benchmarks/bench_xray.py [--size 1024] [--tilt-series 2] [--hits-per-megapixel 100]
                                    [--regimes low_dose,tiny] [--seed 0] [--work DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scipy.stats import poisson  # noqa: E402

from _report import report  # noqa: E402
from tomopipe.algorithms.frame_outliers import find_frame_outliers, replace_frame_outliers  # noqa: E402
from tomopipe.algorithms.motion import align_and_sum, estimate_motion, frame_dose_e_per_A2  # noqa: E402
from tomopipe.algorithms.xray import XrayParams, erase_xrays  # noqa: E402
from tomopipe.cli import main as tomopipe_main  # noqa: E402
from tomopipe.io.movies import read_gain, read_movie  # noqa: E402

REMOVED_SD = 3.0  # a hit is removed when no pixel of its window stands this far above the truth
CLASSES = ((-np.inf, 5.0, "<5"), (5.0, 10.0, "5-10"), (10.0, 20.0, "10-20"), (20.0, np.inf, ">=20"))
SNR_BINS = ((0.0, 3.0, "<3"), (3.0, 5.0, "3-5"), (5.0, 10.0, "5-10"), (10.0, 30.0, "10-30"), (30.0, np.inf, ">=30"))
DETECTABLE_P = 1e-8  # a hit is detectable when noise makes its strongest frame-pixel less often than this
FOUND_SD = 3.0  # frame_found: every pixel of the hit this many SDs of the frame noise above it was replaced
WINDOW_PX = 2  # half-size of a hit's window in the sum (Chebyshev)
REST_PX = 6  # "the rest of the image": farther than this from every hit window and hot-pixel trail
REGIMES = {
    "low_dose": ["--pixel-size-A", "0.79", "--frames-per-tilt", "8"],
    "tiny": [],
}


def simulate(out: Path, size: int, n_tilt_series: int, seed: int, hits_per_megapixel: float, extra: list[str]) -> None:
    if (out / "truth" / "truth.json").is_file():
        return
    args = ["simulate", "--preset", "tiny", "--out", str(out), "--seed", str(seed), "--quiet",
            "--image-width-px", str(size), "--image-height-px", str(size), "--n-tilt-series", str(n_tilt_series),
            "--xray-hits-per-megapixel-per-tilt", str(hits_per_megapixel), *extra]
    if tomopipe_main(args) != 0:
        raise SystemExit(f"tomopipe simulate failed for {out}")


def detectable(hits: pd.DataFrame) -> np.ndarray:
    """Per hit: its strongest frame-pixel is less probable than ``DETECTABLE_P`` as Poisson noise
    around the frame's expected counts there (the truth's ``background_counts``)."""
    lam = hits.background_counts.to_numpy(float)
    k = np.floor(lam + 0.5) + hits.peak_counts.to_numpy(float)  # the pixel as observed: background + hit
    return poisson.sf(k - 1, np.maximum(lam, 1e-12)) <= DETECTABLE_P


def local_sd(reference: torch.Tensor, box: int = 7) -> torch.Tensor:
    """SD of the sum's background: sqrt of the hit-free sum's local mean (``box`` x ``box``)."""
    t = reference[None, None].double()
    mean = F.avg_pool2d(F.pad(t, (box // 2,) * 4, mode="replicate"), box, 1)[0, 0]
    return torch.sqrt(mean.clamp_min(0.25))


def window(points_yx: np.ndarray, half: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels within ``half`` (Chebyshev) of the rounded points, wrapped (the Fourier shifts are periodic)."""
    offsets = np.arange(-half, half + 1)
    ys = (np.rint(points_yx[:, 0])[:, None, None] + offsets[None, :, None]).astype(np.int64) % shape[0]
    xs = (np.rint(points_yx[:, 1])[:, None, None] + offsets[None, None, :]).astype(np.int64) % shape[1]
    ys, xs = np.broadcast_arrays(ys, xs)
    return ys.reshape(-1), xs.reshape(-1)


def score_movie(path: Path, clean_path: Path, gain: torch.Tensor, table: pd.DataFrame, hit_table: pd.DataFrame,
                hot: np.ndarray, tilt: pd.Series, pixel_size_A: float) -> dict:
    """Everything measured on one tilt movie (see the module docstring)."""
    movie = torch.from_numpy(read_movie(path).astype(np.float32)) * gain
    clean = torch.from_numpy(read_movie(clean_path).astype(np.float32)) * gain
    n_frames, ny, nx = movie.shape
    start = time.perf_counter()
    outliers = find_frame_outliers(movie, gain)
    cleaned = replace_frame_outliers(movie, outliers)
    frames_s = time.perf_counter() - start
    replaced = outliers.mask(tuple(movie.shape))
    frames_unchanged = bool(torch.equal(cleaned[~replaced], movie[~replaced]))
    clean_outliers = find_frame_outliers(clean, gain).n_pixels

    model = estimate_motion(cleaned, pixel_size_A)  # the motion_ctf step's defaults
    doses = frame_dose_e_per_A2(float(tilt.pre_exposure_e_per_A2), float(tilt.dose_e_per_A2), n_frames)
    sums = {name: align_and_sum(m, pixel_size_A, model, frame_dose_e_per_A2=doses)["sum"]
            for name, m in (("chain", cleaned), ("base", movie), ("truth", clean))}
    params = XrayParams()
    start = time.perf_counter()
    erased = {name: erase_xrays(sums[name], params) for name in ("chain", "base")}
    eraser_s = (time.perf_counter() - start) / 2
    erased_truth = erase_xrays(sums["truth"], params)
    truth = sums["truth"]
    sd = local_sd(truth)
    shifts_px = (model.shifts_A.double() / pixel_size_A).numpy()  # (x, y) per frame: content moves by -shift

    def aligned(frame: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return np.stack([ys - shifts_px[frame, 1], xs - shifts_px[frame, 0]], 1)

    near_hits = np.zeros((ny, nx), dtype=bool)  # every hit's window
    flagged = set(zip(outliers.frame.tolist(), outliers.y.tolist(), outliers.x.tolist()))
    hit_pixels = set()
    rows = []
    excess = {"chain": (erased["chain"].image - truth) / sd, "base": (erased["base"].image - truth) / sd,
              "none": (sums["base"] - truth) / sd}
    strong = detectable(hit_table)
    for (hit, event), is_detectable in zip(table.groupby("hit", sort=True), strong):
        props = hit_table.iloc[int(hit)]
        assert int(props.hit) == int(hit), (props.hit, hit)
        frame = event.frame.to_numpy()
        ys, xs = event.y.to_numpy(), event.x.to_numpy()
        hit_pixels.update(zip(frame.tolist(), ys.tolist(), xs.tolist()))
        wy, wx = window(aligned(frame, ys, xs), WINDOW_PX, (ny, nx))
        near_hits[wy, wx] = True
        unique = np.unique(wy * nx + wx)
        uy, ux = unique // nx, unique % nx
        bright = event.counts.to_numpy() >= max(3.0, FOUND_SD * np.sqrt(float(props.background_counts)))
        rows.append({"shape": props["shape"], "size_px": float(props.size_px), "snr": float(props.snr),
                     "two_frames": int(props.second_frame) >= 0, "detectable": bool(is_detectable),
                     "before_sd": float(excess["none"][wy, wx].max()),
                     "chain_sd": float(excess["chain"][wy, wx].max()),
                     "base_sd": float(excess["base"][wy, wx].max()),
                     "chain_residual": float((erased["chain"].image - truth)[uy, ux].sum()) / float(props.total_counts),
                     "base_residual": float((erased["base"].image - truth)[uy, ux].sum()) / float(props.total_counts),
                     "frame_found": all((int(f), int(y), int(x)) in flagged
                                        for f, y, x in zip(frame[bright], ys[bright], xs[bright]))})
    # frame-level false positives: replaced farther than 1 px from a hit pixel of the same frame
    near_hit_pixel = {(f, y + dy, x + dx) for f, y, x in hit_pixels for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    frame_false = len(flagged - near_hit_pixel)
    # hot pixels trail through the aligned sum
    near_hot = np.zeros((ny, nx), dtype=bool)
    if len(hot):
        for f in range(n_frames):
            hy, hx = window(aligned(np.full(len(hot), f), hot[:, 1], hot[:, 0]), WINDOW_PX, (ny, nx))
            near_hot[hy, hx] = True
    spared = torch.from_numpy(near_hits | near_hot)
    frame_replaced = np.zeros((ny, nx), dtype=bool)  # where the frame step's replacements land in the sum
    if outliers.n_pixels:
        fy, fx = window(aligned(outliers.frame.numpy(), outliers.y.numpy(), outliers.x.numpy()), 0, (ny, nx))
        frame_replaced[fy, fx] = True
    out = {"hits": pd.DataFrame(rows), "pixels": ny * nx, "frame_pixels": n_frames * ny * nx,
           "frame_false": frame_false, "frame_false_hit_free": clean_outliers,
           "eraser_false_hit_free": int((erased_truth.mask & ~torch.from_numpy(near_hot)).sum()),
           "frames_s": frames_s, "eraser_s": eraser_s, "frames_unchanged": frames_unchanged,
           "frame_pixels_replaced": outliers.n_pixels, "count_scale": outliers.count_scale}
    for name in ("chain", "base"):
        result = erased[name]
        out[f"{name}_eraser_false"] = int((result.mask & ~spared).sum())
        out[f"{name}_unchanged"] = bool(torch.equal(result.image[~result.mask], sums[name][~result.mask]))
        touched = spared | result.mask | (torch.from_numpy(frame_replaced) if name == "chain" else False)
        rest = F.max_pool2d(touched[None, None].float(), 2 * REST_PX + 1, 1, REST_PX)[0, 0] == 0
        deviation = ((result.image - truth).abs() / sd)[rest]
        out[f"{name}_rest_max_dev_sd"] = float(deviation.max())
        out[f"{name}_rest_rms_dev_sd"] = float(deviation.square().mean().sqrt())
    return out


def _recall(removed: pd.Series, selected: pd.Series) -> float:
    return float(removed[selected].mean()) if bool(selected.any()) else float("nan")


def summarise(regime: str, results: list[dict], name: str, label: str) -> dict:
    hits = pd.concat([r["hits"] for r in results], ignore_index=True)
    removed = hits[f"{name}_sd"] < REMOVED_SD
    pixels = sum(r["pixels"] for r in results)
    chain = name == "chain"
    false = sum(r[f"{name}_eraser_false"] for r in results) + (sum(r["frame_false"] for r in results) if chain else 0)
    false_free = sum(r["eraser_false_hit_free"] for r in results) + (
        sum(r["frame_false_hit_free"] for r in results) if chain else 0)
    strong = hits.detectable
    row = {"regime": regime, "run": label, "images": len(results), "hits": len(hits),
           "detectable": int(strong.sum()), "recall_all": float(removed.mean()),
           "recall_detectable": _recall(removed, strong)}
    for low, high, tag in SNR_BINS:
        in_bin = (hits.snr >= low) & (hits.snr < high)
        row[f"hits_snr{tag}"] = int(in_bin.sum())
        row[f"recall_snr{tag}"] = _recall(removed, in_bin)
    for shape in ("spot", "streak"):
        row[f"recall_detectable_{shape}"] = _recall(removed, strong & (hits["shape"] == shape))
    row["recall_detectable_large"] = _recall(removed, strong & (hits.size_px >= 5))
    row["recall_detectable_two_frames"] = _recall(removed, strong & hits.two_frames)
    row["residual_detectable"] = float(hits.loc[strong, f"{name}_residual"].clip(lower=0).mean())
    for low, high, tag in CLASSES:
        in_class = (hits.before_sd >= low) & (hits.before_sd < high)
        row[f"hits_{tag}sd"] = int(in_class.sum())
        row[f"removed_{tag}sd"] = _recall(removed, in_class)
    row["frame_found_detectable"] = float(hits.frame_found[strong].mean()) if chain else float("nan")
    row["false_positive_fraction"] = false / pixels
    row["fp_hit_free"] = false_free / pixels
    row["rest_unchanged"] = all(r[f"{name}_unchanged"] and (r["frames_unchanged"] or not chain) for r in results)
    row["rest_max_dev_sd"] = max(r[f"{name}_rest_max_dev_sd"] for r in results)
    row["rest_rms_dev_sd"] = float(np.sqrt(np.mean([r[f"{name}_rest_rms_dev_sd"] ** 2 for r in results])))
    row["frames_s_per_movie"] = float(np.mean([r["frames_s"] for r in results])) if chain else 0.0
    row["eraser_s_per_image"] = float(np.mean([r["eraser_s"] for r in results]))
    return row


def run_regime(regime: str, work: Path, args) -> tuple[list[dict], str]:
    with_hits, without = work / regime / "with_xrays", work / regime / "without_xrays"
    start = time.perf_counter()
    simulate(with_hits, args.size, args.tilt_series, args.seed, args.hits_per_megapixel, REGIMES[regime])
    simulate(without, args.size, args.tilt_series, args.seed, 0.0, REGIMES[regime])
    simulated_s = time.perf_counter() - start
    gain = torch.from_numpy(read_gain(with_hits / "gain_ref.mrc", flip_y=True))  # stored upside down (truth README)
    hot = pd.read_csv(with_hits / "truth" / "hot_pixels.csv")[["x", "y"]].to_numpy()
    pixel_size_A = float(json.loads((with_hits / "truth" / "truth.json").read_text())["config"]["pixel_size_A"])
    results = []
    for xrays_csv in sorted((with_hits / "truth").glob("TS_*_xrays.csv")):
        ts = xrays_csv.stem.removesuffix("_xrays")
        table = pd.read_csv(xrays_csv)
        hit_table = pd.read_csv(with_hits / "truth" / f"{ts}_xray_hits.csv")
        tilts = pd.read_csv(with_hits / "truth" / f"{ts}_tilts.csv")
        for tilt in tilts.itertuples(index=False):
            pixels = table[table.movie == tilt.movie].reset_index(drop=True)
            hits = hit_table[hit_table.movie == tilt.movie].sort_values("hit").reset_index(drop=True)
            results.append(score_movie(with_hits / tilt.movie, without / tilt.movie, gain, pixels, hits, hot, tilt,
                                       pixel_size_A))
    counts = np.mean([r["count_scale"] for r in results])
    note = (f"{regime}: {len(results)} movies of {args.size} x {args.size} px at {pixel_size_A} Å/px, simulated in "
            f"{simulated_s:.0f} s; measured count scale {counts:.4f}; frame-pixels replaced per movie "
            f"{np.mean([r['frame_pixels_replaced'] for r in results]):.0f}")
    return [summarise(regime, results, "chain", "frames + eraser"),
            summarise(regime, results, "base", "eraser only")], note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image size (px)")
    parser.add_argument("--tilt-series", type=int, default=2)
    parser.add_argument("--hits-per-megapixel", type=float, default=100.0, help="X-ray hits per megapixel per tilt")
    parser.add_argument("--regimes", default="low_dose,tiny", help=f"comma-separated, from {sorted(REGIMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the simulations (kept; reused if there)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_xray_"))
    rows, notes = [], []
    for regime in args.regimes.split(","):
        if regime not in REGIMES:
            raise SystemExit(f"unknown regime {regime!r}: choose from {sorted(REGIMES)}")
        regime_rows, note = run_regime(regime, work, args)
        rows += regime_rows
        notes.append(note)
    notes.append(f"removed: no pixel within {WINDOW_PX} px of the hit's aligned place >= {REMOVED_SD:g} SD above the "
                 f"hit-free truth; SD classes from the hit's peak in the motion-corrected sum; {args.threads} "
                 f"thread(s); work folder {work}")
    report("xray", rows, "\n".join(notes))


if __name__ == "__main__":
    main()
