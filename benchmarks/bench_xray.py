"""X-ray eraser on simulated tilt images, scored against the simulator's truth.

Two acquisitions are simulated with the same seed (``tomopipe simulate``, preset ``tiny`` made
larger): one with X-ray hits, one without. X-ray hits come from their own random stream, so the two
differ only by the hits (``truth/TS_xx_xrays.csv``: frame, pixel, counts added). Every tilt's frames
are gain-corrected and summed without alignment (the hits stay on their truth pixels), and the
eraser runs with the seed's (Scipion's ccderaser) defaults on the sum with hits.

Scores, per hit (one event: 1-3 pixels in one frame):
- ``removed``: every pixel of the hit that stands out (excess >= 5 SD of the background there, the
  SD being sqrt of the hit-free image's local mean) is replaced; pixels with less excess are inside
  the noise and are not counted; hits whose brightest pixel is >= 10 SD out are also scored apart
  (the seed's criteria, 6 SD on differences and 8 SD on peaks, cannot find 5-7 SD hits reliably);
- ``left_outliers``: hits where some pixel still exceeds the hit-free image by >= 5 SD after erasing;
- false positives: replaced pixels that are neither a hit pixel nor next to one, nor a hot pixel,
  per pixel of the images (with hits), and all replaced pixels of the hit-free images;
- unchanged: the pixels not replaced are bit-identical to the input.
Hits within ``edge_exclusion_width_px`` of the border are never searched (ccderaser's -edge);
they are counted apart (``edge_hits``) and the row with ``edge 0`` searches them too. Two more rows
lower the difference (and peak) criteria below the seed's, to show what finding weaker hits costs.

    python benchmarks/bench_xray.py [--size 1024] [--tilt-series 2] [--seed 0] [--work DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

from tomopipe.algorithms.xray import XrayParams, erase_xrays  # noqa: E402
from tomopipe.cli import main as tomopipe_main  # noqa: E402
from tomopipe.io.movies import read_gain, read_movie  # noqa: E402

EXCESS_SD = 5.0  # a hit pixel "stands out" from this excess on (SD of the expected background)
STRONG_SD = 10.0  # hits with a pixel this far out: the range the tests inject (10-100 SD)


def simulate(out: Path, size: int, n_tilt_series: int, seed: int, xrays: bool) -> None:
    if (out / "truth" / "truth.json").is_file():
        return
    args = ["simulate", "--preset", "tiny", "--out", str(out), "--seed", str(seed), "--quiet",
            "--image-width-px", str(size), "--image-height-px", str(size), "--n-tilt-series", str(n_tilt_series)]
    if not xrays:
        args += ["--xray-hits-per-megapixel-per-tilt", "0"]
    if tomopipe_main(args) != 0:
        raise SystemExit(f"tomopipe simulate failed for {out}")


def tilt_sums(folder: Path) -> dict[str, np.ndarray]:
    """Gain-corrected frame sums (float32) by movie name."""
    gain = read_gain(folder / "gain_ref.mrc")
    return {path.name: (read_movie(path).astype(np.float32) * gain).sum(0)
            for path in sorted(folder.glob("TS_*.tif"))}


def hit_events(truth: Path) -> pd.DataFrame:
    """Hit pixels with an event number: a hit is its first pixel and the neighbours (x+1, y) and
    (x, y+1) that follow it in the table with half its counts, in the same frame."""
    rows = []
    for csv in sorted(truth.glob("TS_*_xrays.csv")):
        table = pd.read_csv(csv)
        event, primary = -1, None
        for row in table.itertuples(index=False):
            secondary = (primary is not None and row.movie == primary.movie and row.frame == primary.frame
                         and (row.x, row.y) in ((primary.x + 1, primary.y), (primary.x, primary.y + 1))
                         and row.counts == primary.counts // 2)
            if not secondary:
                event += 1
                primary = row
            rows.append({"movie": row.movie, "event": f"{csv.stem}:{event}", "x": row.x, "y": row.y,
                         "counts": row.counts})
    return pd.DataFrame(rows)


def background_sd(reference: np.ndarray, box: int = 7) -> np.ndarray:
    """SD of the background counts: sqrt of the hit-free image's local mean (``box`` x ``box``)."""
    t = torch.from_numpy(reference)[None, None].double()
    mean = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(t, (box // 2,) * 4, mode="replicate"), box, 1)
    return np.sqrt(np.maximum(mean[0, 0].numpy(), 1.0))


def score(images, references, events, hot, params: XrayParams, label: str) -> dict:
    n_pixels = n_false = n_hits = n_removed = n_left = n_edge = n_edge_removed = 0
    strong = {"hits": 0, "removed": 0}  # hits of >= STRONG_SD
    hot_found = hot_total = 0
    unchanged = True
    seconds = 0.0
    edge = params.edge_exclusion_width_px
    for movie, image in images.items():
        reference = references[movie]
        tensor = torch.from_numpy(image)
        start = time.perf_counter()
        result = erase_xrays(tensor, params)
        seconds += time.perf_counter() - start
        unchanged &= bool(torch.equal(result.image[~result.mask], tensor[~result.mask]))
        mask = result.mask.numpy()
        cleaned = result.image.numpy()
        ny, nx = image.shape
        sd = background_sd(reference)
        near = np.zeros_like(mask)
        here = events[events.movie == movie]
        for _, hit in here.groupby("event"):
            ys, xs = hit.y.to_numpy(), hit.x.to_numpy()
            excess = (image[ys, xs] - reference[ys, xs]) / sd[ys, xs]
            standing = excess >= EXCESS_SD
            for y, x in zip(ys, xs):
                near[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
            if not standing.any():
                continue  # lost in the noise (or clipped): nothing to remove
            removed = bool(mask[ys[standing], xs[standing]].all())
            at_edge = bool(((ys < edge) | (ys >= ny - edge) | (xs < edge) | (xs >= nx - edge)).any())
            if at_edge:
                n_edge += 1
                n_edge_removed += removed
                continue
            n_hits += 1
            n_removed += removed
            if excess.max() >= STRONG_SD:
                strong["hits"] += 1
                strong["removed"] += removed
            n_left += bool((((cleaned[ys, xs] - reference[ys, xs]) / sd[ys, xs]) >= EXCESS_SD).any())
        is_hot = np.zeros_like(mask)
        is_hot[hot.y.to_numpy(), hot.x.to_numpy()] = True
        n_false += int((mask & ~near & ~is_hot).sum())
        hot_found += int((mask & is_hot).sum())
        hot_total += int(is_hot.sum())
        n_pixels += mask.size
    clean_false = clean_pixels = 0
    for movie, reference in references.items():
        result = erase_xrays(torch.from_numpy(reference), params)
        clean_false += result.n_pixels
        clean_pixels += reference.size
    return {"run": label, "images": len(images), "hits": n_hits, "removed_fraction": n_removed / max(1, n_hits),
            f"hits_{STRONG_SD:g}sd_up": strong["hits"],
            f"removed_fraction_{STRONG_SD:g}sd_up": strong["removed"] / max(1, strong["hits"]),
            "left_outliers": n_left, "edge_hits": n_edge, "edge_removed": n_edge_removed,
            "false_positive_fraction": n_false / n_pixels,
            "false_positive_fraction_hit_free": clean_false / clean_pixels,
            "rest_unchanged": unchanged, "hot_pixels_replaced": f"{hot_found}/{hot_total}",
            "s_per_Mpx": seconds / (n_pixels / 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image size (px)")
    parser.add_argument("--tilt-series", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the simulations (kept; reused if there)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_xray_"))
    with_hits, without = work / "with_xrays", work / "without_xrays"
    start = time.perf_counter()
    simulate(with_hits, args.size, args.tilt_series, args.seed, True)
    simulate(without, args.size, args.tilt_series, args.seed, False)
    simulated_s = time.perf_counter() - start
    images, references = tilt_sums(with_hits), tilt_sums(without)
    events = hit_events(with_hits / "truth")
    hot = pd.read_csv(with_hits / "truth" / "hot_pixels.csv")
    background = np.mean([float(r.mean()) for r in references.values()])
    rows = [score(images, references, events, hot, XrayParams(), "seed defaults (edge 4)"),
            score(images, references, events, hot, XrayParams(edge_exclusion_width_px=0), "edge 0"),
            score(images, references, events, hot, XrayParams(diff_criterion_sd=5.0), "diff 5 SD"),
            score(images, references, events, hot, XrayParams(diff_criterion_sd=5.0, peak_criterion_sd=6.0),
                  "diff 5 SD, peak 6 SD")]
    notes = (f"simulated {len(images)} tilt images of {args.size} x {args.size} px (preset tiny, seed {args.seed}, "
             f"{simulated_s:.0f} s), background {background:.1f} counts/px; hits counted where a pixel stands "
             f">= {EXCESS_SD:g} SD out; {args.threads} thread(s); work folder {work}")
    report("xray", rows, notes)


if __name__ == "__main__":
    main()
