"""Single-frame outliers (X-ray hits) in a movie, found and replaced before motion correction.

In one frame of a counting-mode movie an X-ray hit is an enormous outlier (tens to hundreds of
counts where a frame holds about one); once the frames are shifted by sub-pixel amounts and summed,
it is smeared over its neighbours and much harder to tell from the image. Here each pixel is
tested in every frame against the same pixel's other frames.

Model. The raw counts ``k_f`` of a pixel in frame ``f`` are Poisson with mean ``w_f·Λ``: ``Λ`` is the
pixel's expected total over the movie (it holds the specimen, the gain and any hot pixel) and
``w_f`` frame f's share of the dose (``Σ w_f = 1``, measured from the frames' total counts). Given
the pixel's total ``N = Σ_g k_g``, ``k_f`` is Binomial(N, w_f) whatever ``Λ``, so the test needs no
model of the image. The pixel's own other frames are few data, though: at a low dose (a fraction
of a count per pixel and frame) a pixel of 8 counts in one frame and none in 7 others is only a
~1e-8 event against them, while against its neighbourhood it is a ~1e-15 one. So the test pools
the 5 x 5 block around the pixel (itself included, image edges excluded) in the other frames:
``k_f`` is Binomial(k_f + T, w_f / (w_f + E)), T the block's counts and E its exposure (the
pixel-frames' dose shares, each block pixel weighted by its gain relative to the pixel's, so that
raw counts of pixels of different gain compare). A frame-pixel is an outlier ("seed") when that
tail is below ``false_positive_rate / n_frames`` (Bonferroni over the frames: at most
``false_positive_rate`` expected false positives per pixel of the image) and it is also above the
pixel's own other frames (tail below 1e-3): hot pixels, bright in every frame, pass that test and
are left to defect correction (:mod:`tomopipe.algorithms.xray` on the sums). Then:

- a pixel's frames already found are left out of the test's counts and exposure, and its other
  frames are tested again (a pixel hit in two frames);
- the 8-neighbours (same frame) of found pixels join when the same block test gives a tail below
  ``grow_probability`` and the pixel is also above its own other frames (tail below 0.1: a hot
  pixel next to a hit stays); hits cover up to tens of pixels (spots several pixels across,
  streaks) whose weaker rim pixels, a few counts each, would not pass the seed threshold alone.
  Next to a hit a pixel is likely part of it, so the threshold is loose (0.02 by default): a
  wrong join only replaces a pixel by its expected value. Repeated up to ``max_grow_px`` rings.

Tail probabilities use the bound ``P(K >= k) <= pmf(k) / (1 − r)``, ``r = (N − k)·w / ((k + 1)(1 − w))``
the ratio of the next term of the tail to the first (the terms fall at least geometrically): exact
to a few per cent where it matters (``k`` far above ``N·w``) and never below the true tail, so the
false-positive rate is an upper bound. Only frame-pixels that could reach the seed threshold are
tested: more than 3 SDs above ``N·w_f``, in a pixel whose total could give so small a tail
against a clean block (``(w_f / (w_f + 9(1 − w_f)))^N``, the smallest with the 9 pixels of a corner's
block, must lie below it).

Replacement: a found frame-pixel gets the pixel's counts over its clean frames scaled to frame f's
dose, ``w_f · Σ_clean k_g / Σ_clean w_g``; a pixel found in every frame is left alone. No other value
changes.

Units. ``frames`` are gain-corrected (``frames = raw × gain``; ``gain`` None: the frames are the raw
counts). Raw counts are recovered as ``frames / (gain · count_scale)`` where ``count_scale`` (units
of the frames per detector count, 1 for counting-mode data) is measured from the frames: the
dispersion ``Σ_f (c_f − w_f·C)² / w_f`` of a Poisson pixel is ``(n_frames − 1)·C`` in counts, so the
ratio of the two summed over pixels is the scale (pixels whose dispersion is 10 times what the
scale predicts, the outliers, left out). Movies whose
frames are not counts (integrating detectors) get a scale from their noise and the test
becomes approximate.

Frames ``[frames, y, x]`` (any real dtype, any device); pure torch, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FrameOutliers", "binomial_log_tail_bound", "find_frame_outliers", "replace_frame_outliers",
           "remove_frame_outliers"]

_SCREEN_SD = 3.0  # frame-pixels tested: more than this many binomial SDs above N·w_f
_LOG_OWN_GUARD = math.log(0.1)  # a neighbour joins only if also above its own other frames (spares hot pixels)
_LOG_SEED_OWN_GUARD = math.log(1e-3)  # a seed must also be above its own other frames (spares hot pixels)
_SMALLEST_BLOCK = 9  # pixels in the smallest block (an image corner): bounds the seed test's power
_TRIM = 10.0  # count scale: pixels whose dispersion exceeds this many times its expectation are left out
_SCALE_PIXELS = 1 << 19  # count scale: measured on at most this many pixels (every n-th)
_CHUNK_VALUES = 1 << 23  # frame-pixel values gathered at once by the screen (32 MB of float32)
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_BLOCK_RADIUS = 2  # the neighbourhood test pools the 5 x 5 block around a pixel
_BLOCK = tuple((dy, dx) for dy in range(-_BLOCK_RADIUS, _BLOCK_RADIUS + 1)
               for dx in range(-_BLOCK_RADIUS, _BLOCK_RADIUS + 1))


@dataclass
class FrameOutliers:
    """Frame-pixels to replace: ``frame``, ``y``, ``x`` (long ``[n]``) and ``value`` (float32 ``[n]``,
    in the frames' units); ``count_scale``: frames' units per detector count; ``dose_share``: each
    frame's share of the movie's counts (float64 ``[frames]``)."""

    frame: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    value: torch.Tensor
    count_scale: float
    dose_share: torch.Tensor

    @property
    def n_pixels(self) -> int:
        """Frame-pixels replaced."""
        return int(self.frame.numel())

    def mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Boolean ``[frames, y, x]`` of the replaced frame-pixels."""
        out = torch.zeros(shape, dtype=torch.bool, device=self.frame.device)
        out[self.frame, self.y, self.x] = True
        return out


def binomial_log_tail_bound(k: torch.Tensor, n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Natural log of an upper bound of ``P(K >= k)``, ``K ~ Binomial(n, p)``: ``log pmf(k) − log(1 − r)``
    with ``r = (n − k)·p / ((k + 1)(1 − p))``; 0 (probability 1) where ``r >= 1`` (``k`` not above the
    mean). Real ``k`` and ``n`` (``0 <= k <= n``) use the gamma-function extension of the pmf. float64."""
    k, n, p = (torch.as_tensor(v, dtype=torch.float64) for v in (k, n, p))
    k, n, p = torch.broadcast_tensors(k, n, p)
    p = p.clamp(1e-300, 1.0 - 1e-16)
    k = torch.minimum(k.clamp_min(0.0), n)
    log_pmf = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * torch.log(p) + (n - k) * torch.log1p(-p))
    r = (n - k) * p / ((k + 1) * (1 - p))
    bound = log_pmf - torch.log1p(-r.clamp(max=1.0 - 1e-12))
    return torch.where(r < 1, bound.clamp(max=0.0), torch.zeros_like(bound))


def _check(frames: torch.Tensor, gain: torch.Tensor | None) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 3:
        raise ValueError(f"frames must be a 3-D tensor [frames, y, x], got {getattr(frames, 'shape', type(frames))}")
    if frames.is_complex() or frames.dtype == torch.bool:
        raise ValueError(f"frames must be real, got {frames.dtype}")
    if frames.shape[0] < 2:
        raise ValueError(f"frame outliers need at least 2 frames, got {frames.shape[0]}")
    if gain is not None and (not isinstance(gain, torch.Tensor) or tuple(gain.shape) != tuple(frames.shape[1:])):
        raise ValueError(f"gain must be a tensor of the frames' size {tuple(frames.shape[1:])}, got "
                         f"{tuple(getattr(gain, 'shape', ()))}")


def _empty(device, count_scale: float, dose_share: torch.Tensor) -> FrameOutliers:
    none = torch.zeros(0, dtype=torch.long, device=device)
    return FrameOutliers(none, none, none, torch.zeros(0, dtype=torch.float32, device=device), count_scale, dose_share)


class _Pixels:
    """The pixels under test: linear index (y·nx + x), counts in every frame ``[m, frames]`` (raw units,
    float64) and the frames found ``[m, frames]``; rows are added as the search grows."""

    def __init__(self, frames: torch.Tensor, inverse_gain: torch.Tensor):
        self.frames, self.inverse_gain = frames, inverse_gain
        self.nx = frames.shape[2]
        device = frames.device
        self.linear = torch.zeros(0, dtype=torch.long, device=device)
        self.counts = torch.zeros((0, frames.shape[0]), dtype=torch.float64, device=device)
        self.found = torch.zeros((0, frames.shape[0]), dtype=torch.bool, device=device)

    def rows(self, linear: torch.Tensor) -> torch.Tensor:
        """Row of each linear index, adding the pixels not yet held."""
        order = torch.argsort(self.linear)
        known = self.linear[order]
        if known.numel():
            pos = torch.searchsorted(known, linear.contiguous()).clamp_(max=known.numel() - 1)
            held = known[pos] == linear
        else:
            pos, held = torch.zeros_like(linear), torch.zeros_like(linear, dtype=torch.bool)
        new = torch.unique(linear[~held])
        if new.numel():
            y, x = new // self.nx, new % self.nx
            values = self.frames[:, y, x].T.to(torch.float64) * self.inverse_gain[y, x, None].to(torch.float64)
            self.linear = torch.cat([self.linear, new])
            self.counts = torch.cat([self.counts, values])
            self.found = torch.cat([self.found, torch.zeros_like(values, dtype=torch.bool)])
            return self.rows(linear)
        return order[pos]


def _log_tails(counts: torch.Tensor, found: torch.Tensor, frame: torch.Tensor, share: torch.Tensor,
               scale: float) -> torch.Tensor:
    """log tail bound of ``counts[i, frame[i]]`` against the row's frames not ``found`` (plus itself)."""
    clean = (~found).to(torch.float64)
    own = counts.gather(1, frame[:, None])[:, 0]
    own_found = found.gather(1, frame[:, None])[:, 0]
    n = (counts * clean).sum(1) + torch.where(own_found, own, 0.0)
    w = share[frame]
    p = w / ((share[None, :] * clean).sum(1) + torch.where(own_found, w, 0.0))
    return binomial_log_tail_bound(own / scale, n / scale, p)


def _block_log_tails(pixels: _Pixels, rows: torch.Tensor, frame: torch.Tensor, share: torch.Tensor, scale: float,
                     ny: int, nx: int) -> torch.Tensor:
    """log tail bound of ``counts[row, frame]`` against the clean counts of the 5 x 5 block around the
    pixel (itself included, image edges excluded) in the other frames: ``k`` is Binomial(k + T, w_f /
    (w_f + E)), T the block's counts and E its exposure (pixel-frames x share x the block pixel's
    inverse gain relative to the pixel's: raw counts scale with it) — the pixel's expected count
    known from ~25 times more data than its own frames give."""
    y, x = pixels.linear[rows] // nx, pixels.linear[rows] % nx
    linear, inside = [], []
    for dy, dx in _BLOCK:
        ty, tx = y + dy, x + dx
        ok = (ty >= 0) & (ty < ny) & (tx >= 0) & (tx < nx)
        linear.append(torch.where(ok, ty * nx + tx, pixels.linear[rows]))
        inside.append(ok)
    linear, inside = torch.stack(linear, 1), torch.stack(inside, 1)
    block = pixels.rows(linear.reshape(-1)).reshape(linear.shape)  # [m, block pixels]
    other = torch.arange(share.numel(), device=frame.device)[None, :] != frame[:, None]
    use = (~pixels.found[block] & inside[..., None] & other[:, None, :]).to(torch.float64)  # [m, block, frames]
    inverse = pixels.inverse_gain.reshape(-1).to(torch.float64)
    relative = inverse[pixels.linear[block]] / inverse[pixels.linear[rows]].clamp_min(1e-30)[:, None]
    t = (pixels.counts[block] * use).sum((1, 2))
    e = (share[None, None, :] * use * relative[..., None]).sum((1, 2))
    own, w = pixels.counts[rows, frame], share[frame]
    return binomial_log_tail_bound(own / scale, (own + t) / scale, w / (w + e))


def _dispersion_scale(total: torch.Tensor, dispersion: torch.Tensor, n_frames: int) -> float:
    """Frames' units per count: ``Σ D / ((F − 1)·Σ C)`` over the pixels whose dispersion is below
    ``_TRIM`` times its expectation ``scale·(F − 1)·(C + scale)`` (outliers left out: a hit of k
    counts has k times the expectation), iterated from the median of ``D / ((F − 1)·C)``; on every
    n-th pixel, at most ``_SCALE_PIXELS``. 0 when the frames hold no noise."""
    step = max(1, total.numel() // _SCALE_PIXELS)
    total, dispersion = total[::step].to(torch.float64), dispersion[::step].to(torch.float64)
    positive = total > 0
    if not bool(positive.any()):
        return 0.0
    scale = float((dispersion[positive] / ((n_frames - 1) * total[positive])).median())  # a robust start
    for _ in range(5):
        if not scale > 0:
            return 0.0
        keep = dispersion <= _TRIM * scale * (n_frames - 1) * (total + scale)
        counted = float(torch.where(keep, total, 0.0).sum())
        if not counted > 0:
            return 0.0
        previous, scale = scale, float(torch.where(keep, dispersion, 0.0).sum()) / ((n_frames - 1) * counted)
        if abs(scale - previous) <= 1e-4 * previous:
            break
    return scale


def find_frame_outliers(frames: torch.Tensor, gain: torch.Tensor | None = None, *,
                        false_positive_rate: float = 1e-7, grow_probability: float = 0.02,
                        max_grow_px: int = 6) -> FrameOutliers:
    """Single-frame outliers of ``frames`` ``[frames, y, x]`` (gain-corrected; ``gain`` ``[y, x]`` with
    ``frames = raw × gain``, or None) and their replacement values (see the module docstring).

    ``false_positive_rate``: expected false seeds per pixel of the image (all frames together);
    ``grow_probability``: tail probability below which a neighbour of a found pixel joins it;
    ``max_grow_px``: rings of neighbours added at most.
    """
    _check(frames, gain)
    if not 0 < false_positive_rate < 1 or not 0 < grow_probability < 1:
        raise ValueError(f"false_positive_rate ({false_positive_rate}) and grow_probability ({grow_probability}) "
                         f"must lie in (0, 1)")
    if max_grow_px < 0:
        raise ValueError(f"max_grow_px must be >= 0, got {max_grow_px}")
    n_frames, ny, nx = frames.shape
    device = frames.device
    if gain is None:
        inverse = torch.ones((ny, nx), dtype=torch.float32, device=device)
    else:
        gain = gain.to(device=device, dtype=torch.float32)
        valid = torch.isfinite(gain) & (gain > 0)
        inverse = torch.where(valid, 1.0 / torch.where(valid, gain, 1.0), 0.0)  # pixels without gain: never tested

    frames_flat, inverse_flat = frames.reshape(n_frames, -1), inverse.reshape(-1)
    buffer = torch.empty(ny * nx, dtype=torch.float32, device=device)  # reused: fresh temporaries cost more

    def raw(f: int) -> torch.Tensor:  # frame f in raw units (counts x count scale), flat
        if gain is None:
            return frames_flat[f] if frames.dtype == torch.float32 else buffer.copy_(frames_flat[f])
        return torch.mul(frames_flat[f], inverse_flat, out=buffer)

    # pass 1: the frames' totals (dose shares w_f), per-pixel totals C and Q = Σ_f c_f² / w_f
    if frames.dtype == torch.float32:
        frame_totals = (frames_flat @ inverse_flat).to(torch.float64)
    else:
        frame_totals = torch.stack([raw(f).sum(dtype=torch.float64) for f in range(n_frames)])
    if not bool(torch.isfinite(frame_totals).all()):
        raise ValueError("frames hold NaN or infinite values")
    grand = float(frame_totals.sum())
    if grand <= 0 or float(frame_totals.min()) < 0:
        return _empty(device, 1.0, torch.full_like(frame_totals, 1.0 / n_frames))  # no counts, or not counts
    share = frame_totals / grand
    total = torch.zeros(ny * nx, dtype=torch.float32, device=device)
    squares = torch.zeros_like(total)
    for f in range(n_frames):
        c = raw(f)
        total += c
        if float(share[f]) > 0:
            squares.addcmul_(c, c, value=1.0 / float(share[f]))
    # per-pixel dispersion D = Σ_f (c_f − w_f C)² / w_f = Q − C²: (F − 1)·scale·C on average
    dispersion = squares.sub_(total.square()).clamp_min_(0.0)
    del squares
    scale = _dispersion_scale(total, dispersion, n_frames)
    if not scale > 0:
        return _empty(device, 1.0, share)  # identical frames: no noise to test against
    del dispersion
    log_seed = math.log(false_positive_rate / n_frames)
    pixels = _Pixels(frames, inverse)

    def screen(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, frame) of the frame-pixels that can be seeds: against a clean block, P(K >= k) >= p^N
        with p = w / (w + 9(1 − w)) needs N >= log(α)/log(p); and k must lie far above N·w,
        c_f > w_f·C + 3·sqrt(scale·w_f(1 − w_f)·C)."""
        w_max = float(share.max())
        p_best = w_max / (w_max + _SMALLEST_BLOCK * (1.0 - w_max))
        least = scale * log_seed / math.log(p_best) if w_max < 1 else math.inf
        candidates = torch.nonzero(total >= least)[:, 0]
        w = share.to(torch.float32)[:, None]
        spread = (_SCREEN_SD * torch.sqrt(scale * share * (1 - share))).to(torch.float32)[:, None]
        rows, frames_found = [], []
        for chunk in candidates.split(max(1, _CHUNK_VALUES // n_frames)):
            c = frames_flat[:, chunk].to(torch.float32) * inverse_flat[chunk]
            c_total = total[chunk]
            frame, j = torch.nonzero(c > w * c_total + spread * c_total.sqrt(), as_tuple=True)
            rows.append(pixels.rows(chunk[j]))
            frames_found.append(frame)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(rows) if rows else empty, torch.cat(frames_found) if frames_found else empty

    def seeds(rows: torch.Tensor, frame: torch.Tensor, scale: float) -> None:
        pixels.found.zero_()
        for _ in range(n_frames):  # a pixel hit in several frames: test again without the frames found
            open_ = ~pixels.found[rows, frame]
            r, f = rows[open_], frame[open_]
            new = ((_block_log_tails(pixels, r, f, share, scale, ny, nx) <= log_seed)
                   & (_log_tails(pixels.counts[r], pixels.found[r], f, share, scale) <= _LOG_SEED_OWN_GUARD))
            if not bool(new.any()):
                break
            pixels.found[r[new], f[new]] = True

    rows, frame = screen(scale)
    seeds(rows, frame, scale)

    # grow: 8-neighbours in the same frame with the looser threshold, ring by ring
    log_grow = math.log(grow_probability)
    front_rows, front_frames = torch.nonzero(pixels.found, as_tuple=True)
    for _ in range(max_grow_px):
        if front_rows.numel() == 0:
            break
        y, x = pixels.linear[front_rows] // nx, pixels.linear[front_rows] % nx
        linear, frame = [], []
        for dy, dx in _NEIGHBOURS:
            ty, tx = y + dy, x + dx
            ok = (ty >= 0) & (ty < ny) & (tx >= 0) & (tx < nx)
            linear.append(ty[ok] * nx + tx[ok])
            frame.append(front_frames[ok])
        pairs = torch.unique(torch.stack([torch.cat(linear), torch.cat(frame)], 1), dim=0)
        r, f = pixels.rows(pairs[:, 0]), pairs[:, 1]
        open_ = ~pixels.found[r, f]
        r, f = r[open_], f[open_]
        join = ((_block_log_tails(pixels, r, f, share, scale, ny, nx) <= log_grow)
                & (_log_tails(pixels.counts[r], pixels.found[r], f, share, scale) <= _LOG_OWN_GUARD))
        front_rows, front_frames = r[join], f[join]
        pixels.found[front_rows, front_frames] = True

    # replacement: the clean frames' counts scaled to the frame's dose; rows found in every frame stay
    clean = (~pixels.found).to(torch.float64)
    w_clean = (share[None, :] * clean).sum(1)
    rate = (pixels.counts * clean).sum(1) / w_clean.clamp_min(1e-300)
    row, frame = torch.nonzero(pixels.found & (w_clean > 0)[:, None], as_tuple=True)
    linear = pixels.linear[row]
    value = rate[row] * share[frame] / inverse_flat[linear].to(torch.float64)
    order = torch.argsort(frame * (ny * nx) + linear)
    row, frame, linear = row[order], frame[order], linear[order]
    return FrameOutliers(frame, linear // nx, linear % nx, value[order].to(torch.float32), float(scale), share)


def replace_frame_outliers(frames: torch.Tensor, outliers: FrameOutliers, *, in_place: bool = False) -> torch.Tensor:
    """``frames`` with the outliers' values written in (a float copy, or ``frames`` itself when
    ``in_place``; integer frames cannot be changed in place). Every other value is unchanged."""
    if in_place:
        if not frames.is_floating_point():
            raise ValueError(f"in-place replacement needs floating-point frames, got {frames.dtype}")
        out = frames
    else:
        out = frames.to(torch.float32) if not frames.is_floating_point() else frames.clone()
    if outliers.n_pixels:
        out[outliers.frame, outliers.y, outliers.x] = outliers.value.to(device=out.device, dtype=out.dtype)
    return out


def remove_frame_outliers(frames: torch.Tensor, gain: torch.Tensor | None = None,
                          **options) -> tuple[torch.Tensor, FrameOutliers]:
    """:func:`find_frame_outliers` then :func:`replace_frame_outliers` (a copy): ``(cleaned, outliers)``."""
    outliers = find_frame_outliers(frames, gain, **options)
    return replace_frame_outliers(frames, outliers), outliers
