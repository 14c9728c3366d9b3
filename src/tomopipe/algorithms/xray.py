"""Hot-pixel and X-ray removal, in the manner of IMOD ``ccderaser -find`` (Mastronarde, IMOD).

What ccderaser's automatic peak search does (IMOD man page ``ccderaser``), and how it is done here
with whole-image tensor operations instead of a per-pixel scan:

1. The image (less ``edge_exclusion_width_px`` on every side) is divided into scan areas of about
   ``xy_scan_size_px``; the mean and SD of each area are computed. ccderaser uses slightly
   overlapping areas; here they tile the image without overlap.
2. Peak test. Pixels more than ``scan_criterion_sd`` SDs from their scan area's mean are walked
   uphill to their local extremum. Such extrema are exactly the 3 x 3 local maxima (minima for
   dark defects) beyond the scan criterion, which are all taken at once. For each, the mean and
   SD of an annulus (``maximum_radius_px`` < r <= ``maximum_radius_px + annulus_width_px``) are
   computed; the peak is kept when it deviates from the annulus mean by more than
   ``peak_criterion_sd`` annulus SDs. The patch to replace is every pixel closer than
   ``maximum_radius_px`` to the peak that deviates from the annulus mean by more than
   ``grow_criterion_sd`` annulus SDs (for peaks beyond ``giant_criterion_sd``, the patch centre is
   moved to the patch centroid, up to 3 times). Unlike ccderaser, such pixels must also connect to
   the peak (8-neighbours) through pixels of the patch: isolated noise pixels in the disc are spared.
3. Extra-large peaks: a peak that fails step 2 but lies beyond ``scan_criterion_sd + 1`` scan SDs is
   tested again with an annulus from ``extra_large_radius_px`` to ``extra_large_radius_px +
   annulus_width_px`` and ``giant_criterion_sd``; its patch (within ``extra_large_radius_px``, centre
   refined 3 times) is replaced only if the largest absolute difference between each patch pixel
   and its 4 neighbours, averaged over the most extreme quarter (at least 3) of the patch pixels,
   lies more than ``big_diff_criterion_sd`` SDs above the scan area's mean absolute difference
   between adjacent pixels (this spares gold beads).
4. Difference test (better for small X-rays and hot pixels): the difference between each pixel and
   the mean of its 8 neighbours, with the mean and SD of that difference per scan area (computed
   again without the values beyond ``diff_criterion_sd``, as ccderaser's statistics no longer hold
   the patches it has erased). Pixels beyond ``diff_criterion_sd`` seed a patch, grown through
   8-connected pixels beyond ``grow_criterion_sd`` (within a diameter of ``2 * maximum_radius_px``).
   The patch's polarity is that of its strongest pixel; the other pixels stay in the patch only if
   their difference from their neighbours outside the patch still passes the grow criterion.
   Patches of more than ``max_pixels_in_diff_patch`` pixels are left to the peak test.
5. Replacement: each connected patch is replaced by a polynomial of ``polynomial_order`` (2: terms
   1, x, y, x², xy, y²) fitted to the ring of pixels within ``border_size_px`` (Chebyshev distance)
   around it, pixels of other patches excluded; lower orders are used when the ring has too few
   pixels (order 0 = the ring's mean). No other pixel is touched: they stay bit-identical.

6. Shot noise (a tomopipe addition, ``shot_noise_probability``; 0 turns it off). The SD criteria assume
   nearly Gaussian noise; a tomogram's tilt image holds one or two counts per pixel, where Poisson
   noise is skewed and a 6-SD pixel is a 1e-5 event, not 1e-9: ccderaser's defaults then erase about
   1e-5 of all pixels. So, on images of counts (:func:`count_scale` measures the image units per
   count from the noise of adjacent pixels), a patch is replaced only if one of its pixels, in
   counts, is less probable than ``shot_noise_probability`` as Poisson noise around the local level
   (Poisson tail bound on the side of the pixel's polarity; the level is the less extreme of the
   replacement value and the mean of the 9 x 9 box around the pixel without the patches). Where
   counts are many, Poisson noise is nearly Gaussian and the SD criteria pass only far rarer
   pixels: nothing changes there.

ccderaser erases patches one after the other, so a later test sees the earlier replacements. Here a
pass tests the whole image at once; passes are repeated on the cleaned image (at most
``max_passes``), around the pixels the previous pass found, until no new pixel is found, and every
patch is then fitted from the original pixels around it. Cost: about 0.1 s per megapixel and pass
on one CPU core.

Defaults are those of ccderaser as Scipion's imod plugin runs it (``ProtImodXraysEraser``,
scipion-em-imod ``imod/protocols/protocol_xRaysEraser.py``: -FindPeaks, -PeakCriterion 8.0,
-DiffCriterion 6.0, -GrowCriterion 4, -ScanCriterion 3, -MaximumRadius 4.2, -GiantCriterion 12,
-ExtraLargeRadius 8, -BigDiffCriterion 19, -AnnulusWidth 2.0, -XYScanSize 100,
-EdgeExclusionWidth 4, -BorderSize 2, -PolynomialOrder 2); options it does not pass keep IMOD's
defaults (IMOD ``autodoc/ccderaser.adoc``: MaxPixelsInDiffPatch 2; IMOD's own defaults differ
for PeakCriterion 10, DiffCriterion 10, MaximumRadius 2.1, EdgeExclusionWidth 0). Details not in
the man page follow IMOD's ``ccderaser.f90`` (``searchPeaks``, ``computeDiffs``): the annulus of
the extra-large test ends at ``extra_large_radius_px + annulus_width_px``, the scan criterion + 1
gate, the quarter of the patch in the big-difference test, SDs with n - 1.

Images are ``[y, x]`` tensors (any real dtype, any device). Pure torch, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

__all__ = ["XrayParams", "XrayResult", "count_scale", "find_xrays", "fill_patches", "erase_xrays", "label_pixels"]

_CANDIDATE_CHUNK = 4096  # candidates (or patches) handled per batch: bounds the window memory
_TRIM_SD = 6.0  # count scale: adjacent-pixel differences beyond this many SDs are left out
_LEVEL_BOX_HALF = 4  # shot-noise test: the local level is the mean of a 9 x 9 box
_FRACTION_BIG_DIFF = 0.25  # ccderaser: big differences averaged over the most extreme quarter of the patch


@dataclass(frozen=True)
class XrayParams:
    """Criteria of the automatic X-ray search (ccderaser option names in snake case, SD = standard deviations).

    Each field's metadata holds its ``help`` and the ``min`` / ``max`` a user may set: the
    ``xray_eraser`` step's parameters are made from these fields."""

    peak_criterion_sd: float = field(default=8.0, metadata={
        "help": "peak criterion: SDs above the local (annulus) mean to erase a peak", "min": 0.001})
    diff_criterion_sd: float = field(default=6.0, metadata={
        "help": "difference criterion: SDs above the mean pixel-to-neighbours difference", "min": 0.001})
    maximum_radius_px: float = field(default=4.2, metadata={
        "help": "maximum radius of a peak area to erase", "min": 0.5, "max": 10})
    big_diff_criterion_sd: float = field(default=19.0, metadata={
        "help": "extra-large peaks are erased only if their adjacent-pixel differences exceed this many SDs",
        "min": 0})
    grow_criterion_sd: float = field(default=4.0, metadata={
        "help": "SDs above the local mean to add pixels to a peak", "min": 0.001})
    scan_criterion_sd: float = field(default=3.0, metadata={
        "help": "SDs above the scan area's mean to look for a peak", "min": 0.001})
    giant_criterion_sd: float = field(default=12.0, metadata={
        "help": "SDs above the local mean to erase an extra-large peak (0: off)", "min": 0})
    extra_large_radius_px: float = field(default=8.0, metadata={
        "help": "maximum radius of an extra-large peak area", "min": 0.5})
    annulus_width_px: float = field(default=2.0, metadata={
        "help": "width of the annulus giving the local mean and SD", "min": 0.5})
    max_pixels_in_diff_patch: int = field(default=2, metadata={
        "help": "largest patch the difference criterion erases", "min": 1})
    xy_scan_size_px: int = field(default=100, metadata={
        "help": "size of the scan areas for the mean and SD", "min": 8})
    edge_exclusion_width_px: int = field(default=4, metadata={
        "help": "width of the border not searched, on every edge", "min": 0})
    border_size_px: int = field(default=2, metadata={
        "help": "width of the ring of pixels the replacement is fitted to", "min": 1, "max": 5})
    polynomial_order: int = field(default=2, metadata={
        "help": "order of the polynomial fitted to the ring (0: its mean)", "min": 0, "max": 3})
    max_passes: int = field(default=3, metadata={"help": "search passes on the cleaned image, at most", "min": 1})
    shot_noise_probability: float = field(default=1e-6, metadata={
        "help": "tomopipe: on images of counts, replace a patch only if it is less probable than this as Poisson "
                "shot noise (at one or two counts per pixel the SD criteria mistake noise for X-rays); 0: off, as "
                "ccderaser", "min": 0, "max": 0.5})

    def __post_init__(self):
        for name in ("peak_criterion_sd", "diff_criterion_sd", "grow_criterion_sd", "scan_criterion_sd",
                     "maximum_radius_px", "extra_large_radius_px", "annulus_width_px"):
            if not getattr(self, name) > 0:
                raise ValueError(f"XrayParams.{name} must be > 0, got {getattr(self, name)!r}")
        if self.giant_criterion_sd < 0 or self.big_diff_criterion_sd < 0:
            raise ValueError("XrayParams: giant_criterion_sd and big_diff_criterion_sd must be >= 0")
        if self.xy_scan_size_px < 8:
            raise ValueError(f"XrayParams.xy_scan_size_px must be >= 8, got {self.xy_scan_size_px}")
        if self.edge_exclusion_width_px < 0 or self.max_pixels_in_diff_patch < 1 or self.max_passes < 1:
            raise ValueError("XrayParams: edge_exclusion_width_px >= 0, max_pixels_in_diff_patch >= 1 and "
                             "max_passes >= 1 are required")
        if not 1 <= self.border_size_px <= 5:
            raise ValueError(f"XrayParams.border_size_px must be 1..5, got {self.border_size_px}")
        if not 0 <= self.polynomial_order <= 3:
            raise ValueError(f"XrayParams.polynomial_order must be 0..3, got {self.polynomial_order}")
        if not 0 <= self.shot_noise_probability < 1:
            raise ValueError(f"XrayParams.shot_noise_probability must be in [0, 1), got {self.shot_noise_probability}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class XrayResult:
    """``image``: the cleaned image (input dtype); ``mask``: pixels replaced (bool [y, x]);
    ``n_patches``: connected patches replaced; ``passes``: detection passes run."""

    image: torch.Tensor
    mask: torch.Tensor
    n_patches: int
    passes: int

    @property
    def n_pixels(self) -> int:
        return int(self.mask.sum())


# ----------------------------------------------------------------------------------- helpers


def _check_image(image: torch.Tensor, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [y, x], got {getattr(image, 'shape', type(image))}")
    if image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"{name} must be real, got {image.dtype}")
    if min(image.shape) < 3:
        raise ValueError(f"{name} must be at least 3 x 3 px, got {tuple(image.shape)}")


def _work(image: torch.Tensor) -> torch.Tensor:
    """float32 (float64 kept) copy for computing; integer images convert exactly below 2^24."""
    return image if image.dtype in (torch.float32, torch.float64) else image.to(torch.float32)


def _tile_index(n: int, edge: int, size: int, device) -> tuple[torch.Tensor, int]:
    """Scan area index of every row (or column): ``round((n - 2 edge) / size)`` areas, as equal as possible."""
    n_use = max(1, n - 2 * edge)
    n_tiles = max(1, int(round(n_use / size)))
    bounds = edge + torch.round(torch.linspace(0, n_use, n_tiles + 1, dtype=torch.float64, device=device)).long()
    index = torch.bucketize(torch.arange(n, device=device), bounds[1:-1], right=True)
    return index.clamp_(0, n_tiles - 1), n_tiles


def _tile_sums(v: torch.Tensor, tile_y: torch.Tensor, tile_x: torch.Tensor, n_ty: int, n_tx: int,
               reference: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-area sums of ``v - reference`` and of its square (float64, ``[n_ty, n_tx]``); the sums
    along columns of an area (about ``xy_scan_size_px`` values) are taken in the image's precision."""
    w = v - reference
    s1 = torch.zeros(n_ty, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, tile_y, w)
    s2 = torch.zeros(n_ty, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, tile_y, w * w)
    s1 = torch.zeros(n_ty, n_tx, dtype=torch.float64, device=v.device).index_add_(1, tile_x, s1.to(torch.float64))
    s2 = torch.zeros(n_ty, n_tx, dtype=torch.float64, device=v.device).index_add_(1, tile_x, s2.to(torch.float64))
    return s1, s2


def _mean_sd(s1, s2, n, reference):
    mean = s1 / n.clamp_min(1)
    var = (s2 - n * mean * mean) / (n - 1).clamp_min(1)
    sd = torch.sqrt(var.clamp_min(0))
    sd = torch.where(n >= 2, sd, torch.full_like(sd, math.inf))
    return mean + reference, sd


def _tile_stats(v: torch.Tensor, tile_y: torch.Tensor, tile_x: torch.Tensor, n_ty: int, n_tx: int,
                clip_sd: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and SD (n - 1) of ``v`` in every scan area (``[n_ty, n_tx]``, float64). With ``clip_sd``,
    values beyond ``clip_sd`` SDs are then left out (once): strong X-rays do not inflate the SD."""
    reference = float(v.mean())
    s1, s2 = _tile_sums(v, tile_y, tile_x, n_ty, n_tx, reference)
    n = (torch.bincount(tile_y, minlength=n_ty)[:, None] * torch.bincount(tile_x, minlength=n_tx)[None, :])
    n = n.to(torch.float64)
    mean, sd = _mean_sd(s1, s2, n, reference)
    if clip_sd is None:
        return mean, sd
    oy, ox, _ = _beyond(v, tile_y, tile_x, mean - clip_sd * sd, mean + clip_sd * sd)
    if oy.numel() == 0:
        return mean, sd
    w = v[oy, ox].to(torch.float64) - reference
    flat = tile_y[oy] * n_tx + tile_x[ox]
    s1 = s1.reshape(-1).index_add(0, flat, -w).reshape(n_ty, n_tx)
    s2 = s2.reshape(-1).index_add(0, flat, -w * w).reshape(n_ty, n_tx)
    n = n.reshape(-1).index_add(0, flat, -torch.ones_like(w)).reshape(n_ty, n_tx)
    return _mean_sd(s1, s2, n, reference)


def _beyond(v: torch.Tensor, tile_y: torch.Tensor, tile_x: torch.Tensor, low_t: torch.Tensor,
            high_t: torch.Tensor):
    """Pixels (ys, xs) of ``v`` above their area's ``high_t`` (sign +1) or below its ``low_t`` (-1).

    Sparse: a first cut with the most permissive thresholds of all areas, then each pixel against
    its own area (the per-pixel threshold image is built only when the first cut is not sparse).
    """
    n_tx = low_t.shape[1]
    lo, hi = float(low_t.max()), float(high_t.min())
    ys, xs = torch.nonzero((v > hi) | (v < lo), as_tuple=True)
    if ys.numel() > 0.05 * v.numel():
        high = high_t.to(v.dtype)[tile_y][:, tile_x]
        low = low_t.to(v.dtype)[tile_y][:, tile_x]
        ys, xs = torch.nonzero((v > high) | (v < low), as_tuple=True)
        del high, low
    values = v[ys, xs].to(torch.float64)
    t = tile_y[ys] * n_tx + tile_x[xs]
    above = values > high_t.reshape(-1)[t]
    below = values < low_t.reshape(-1)[t]
    keep = above | below
    sign = torch.where(above, 1.0, -1.0).to(torch.float64)
    return ys[keep], xs[keep], sign[keep]


def _offsets(half: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-half, half + 1, device=device)
    return r[:, None].expand(2 * half + 1, 2 * half + 1), r[None, :].expand(2 * half + 1, 2 * half + 1)


def label_pixels(ys: torch.Tensor, xs: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """8-connected components of the pixels (ys, xs) of an image of ``shape``: a label 0..n-1 per
    pixel (labels follow the first pixel of each component in row-major order) and n.

    Sparse: neighbours are found by binary search in the sorted pixel indices, labels by min-label
    propagation with pointer jumping, so the cost grows with the number of pixels, not the image.
    """
    m = ys.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=ys.device), 0
    ny, nx = shape
    linear = ys.long() * nx + xs.long()
    linear_sorted, order = torch.sort(linear)
    ys_s, xs_s = ys[order].long(), xs[order].long()
    src, dst = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # half of the 8-neighbourhood; edges are symmetric
        ty, tx = ys_s + dy, xs_s + dx
        ok = (tx >= 0) & (tx < nx) & (ty < ny)
        target = ty * nx + tx
        pos = torch.searchsorted(linear_sorted, target).clamp_(max=m - 1)
        hit = ok & (linear_sorted[pos] == target)
        src.append(torch.nonzero(hit).reshape(-1))
        dst.append(pos[hit])
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    labels = torch.arange(m, device=ys.device)
    while True:
        smallest = torch.minimum(labels[src_t], labels[dst_t])
        new = labels.clone()
        new.scatter_reduce_(0, src_t, smallest, reduce="amin")
        new.scatter_reduce_(0, dst_t, smallest, reduce="amin")
        new = new[new]
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    _, compact = torch.unique(labels, return_inverse=True)
    out = torch.empty_like(compact)
    out[order] = compact
    return out, int(compact.max()) + 1


# ----------------------------------------------------------------------------------- detection


def _gather(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, half: int):
    """``[K, 2h+1, 2h+1]`` windows of ``x`` centred on (ys, xs) (float64) and their in-image mask."""
    ny, nx = x.shape
    dy, dx = _offsets(half, x.device)
    gy = ys[:, None, None] + dy
    gx = xs[:, None, None] + dx
    inside = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
    values = x[gy.clamp(0, ny - 1), gx.clamp(0, nx - 1)].to(torch.float64)
    return values, inside


def _gather_points(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor):
    """Values of ``x`` at offsets (oy, ox) ``[n]`` around each point: ``[K, n]`` (float64) and their in-image mask."""
    ny, nx = x.shape
    gy = ys[:, None] + oy
    gx = xs[:, None] + ox
    inside = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
    return x[gy.clamp(0, ny - 1), gx.clamp(0, nx - 1)].to(torch.float64), inside


def _is_extremum(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, polarity: torch.Tensor) -> torch.Tensor:
    """True where (ys, xs) is a 3 x 3 local maximum (polarity +1) or minimum (-1), ties allowed."""
    dy, dx = _offsets(1, x.device)
    values, inside = _gather_points(x, ys, xs, dy.reshape(-1), dx.reshape(-1))
    signed = torch.where(inside, polarity[:, None] * values, torch.full_like(values, -math.inf))
    return signed[:, 4] >= signed.amax(1)


def _annulus_test(x, ys, xs, polarity, radius, outer, criterion):
    """Mean and SD of the annulus radius < r <= outer around each peak; the peaks deviating from
    the annulus mean by more than ``criterion`` SDs (towards their polarity)."""
    dy, dx = _offsets(int(math.ceil(outer)), x.device)
    r2 = dy * dy + dx * dx
    on_ring = (r2 > radius * radius) & (r2 <= outer * outer)
    ring, inside = _gather_points(x, ys, xs, dy[on_ring], dx[on_ring])
    count = inside.sum(1).to(torch.float64)
    centre = x[ys, xs].to(torch.float64)
    rel = torch.where(inside, ring - centre[:, None], torch.zeros_like(ring))
    mean_rel = rel.sum(1) / count.clamp_min(1)
    var = torch.where(inside, (rel - mean_rel[:, None]) ** 2, torch.zeros_like(ring)).sum(1)
    ring_sd = torch.sqrt(var / (count - 1).clamp_min(1))
    deviation_sd = -polarity * mean_rel / ring_sd
    keep = (count >= 3) & (deviation_sd > criterion)
    return keep, centre + mean_rel, ring_sd, deviation_sd


def _grow_patch(x, ys, xs, polarity, ring_mean, ring_sd, radius, grow_sd, refine):
    """Pixels closer than ``radius`` to the (refined) peak centre that deviate from the annulus mean by
    more than ``grow_sd`` SDs and connect (8-neighbours) to the peak through such pixels. ``refine``:
    move the centre to the patch centroid (up to 3 times).
    Returns the window half size and the patch masks ``[K, 2h+1, 2h+1]``."""
    half = 2 * int(math.ceil(radius)) + 1
    win, inside = _gather(x, ys, xs, half)
    dy, dx = _offsets(half, x.device)
    dyf, dxf = dy.to(torch.float64), dx.to(torch.float64)
    above = inside & (polarity[:, None, None] * (win - ring_mean[:, None, None])
                      > grow_sd * ring_sd[:, None, None])
    cy = torch.zeros_like(ring_mean)
    cx = torch.zeros_like(ring_mean)
    for iteration in range(3):
        allowed = above & (((dyf - cy[:, None, None]) ** 2 + (dxf - cx[:, None, None]) ** 2) < radius * radius)
        patch = _connected_to_centre(allowed)
        if iteration == 2 or not bool(refine.any()):
            break
        n = patch.sum((1, 2)).to(torch.float64)
        moved = refine & (n > 0)
        cy = torch.where(moved, (patch * dyf).sum((1, 2)) / n.clamp_min(1), cy)
        cx = torch.where(moved, (patch * dxf).sum((1, 2)) / n.clamp_min(1), cx)
    return half, patch


def _dilate(mask: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Binary dilation of ``[..., h, w]`` masks by a 3 x 3 square, ``steps`` times (separable shifts)."""
    for _ in range(steps):
        horizontal = mask.clone()
        horizontal[..., :, 1:] |= mask[..., :, :-1]
        horizontal[..., :, :-1] |= mask[..., :, 1:]
        mask = horizontal.clone()
        mask[..., 1:, :] |= horizontal[..., :-1, :]
        mask[..., :-1, :] |= horizontal[..., 1:, :]
    return mask


def _connected_to_centre(allowed: torch.Tensor) -> torch.Tensor:
    """The 8-connected part of each window mask ``[K, h, w]`` that holds the window's centre pixel."""
    k, h, w = allowed.shape
    grown = torch.zeros_like(allowed)
    grown[:, h // 2, w // 2] = allowed[:, h // 2, w // 2]
    for _ in range(h * w):
        wider = _dilate(grown) & allowed
        if torch.equal(wider, grown):
            break
        grown = wider
    return grown


def _patch_pixels(ys, xs, half, patch):
    k, wy, wx = torch.nonzero(patch, as_tuple=True)
    return ys[k] + wy - half, xs[k] + wx - half


def _big_differences(x, ys, xs, half, patch, abs_mean, abs_sd, params):
    """ccderaser's extra-large peak check: the largest absolute difference between each patch pixel
    and its 4 neighbours, in SDs from the mean adjacent-pixel difference, averaged over the most
    extreme quarter (at least 3) of the patch, must reach ``big_diff_criterion_sd``."""
    ny, nx = x.shape
    k, wy, wx = torch.nonzero(patch, as_tuple=True)
    py, px = ys[k] + wy - half, xs[k] + wx - half
    centre = x[py, px].to(torch.float64)
    largest = torch.zeros_like(centre)
    for oy, ox in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        q = x[(py + oy).clamp(0, ny - 1), (px + ox).clamp(0, nx - 1)].to(torch.float64)
        largest = torch.maximum(largest, (centre - q).abs())
    z = (largest - abs_mean[k]).abs() / abs_sd[k]
    n = patch.sum((1, 2))
    # sort every patch's values, largest first: order by (patch, -z)
    order = torch.argsort(-z, stable=True)
    order = order[torch.argsort(k[order], stable=True)]
    z_sorted, k_sorted = z[order], k[order]
    starts = torch.cumsum(n, 0) - n
    rank = torch.arange(k.numel(), device=x.device) - starts[k_sorted]
    take = torch.minimum(n, torch.clamp(torch.round(_FRACTION_BIG_DIFF * n.to(torch.float64)), min=3).long())
    top = rank < take[k_sorted]
    total = torch.zeros(n.numel(), dtype=torch.float64, device=x.device).index_add_(0, k_sorted[top], z_sorted[top])
    return (n > 0) & (total / take.clamp_min(1) >= params.big_diff_criterion_sd)


def _diff_patches(x, ys, xs, z, d_mean, d_sd, params):
    """ccderaser's difference test on the pixels (ys, xs) beyond the grow criterion (``z``: their
    difference from the 8-neighbour mean in SDs): patches seeded beyond ``diff_criterion_sd``, of at
    most ``max_pixels_in_diff_patch`` pixels. ``d_mean, d_sd``: the area statistics at each pixel."""
    ny, nx = x.shape
    device = x.device
    empty = (ys[:0], xs[:0])
    if ys.numel() == 0 or not bool((z.abs() > params.diff_criterion_sd).any()):
        return empty
    labels, n = label_pixels(ys, xs, (ny, nx))
    strength = z.abs()
    has_seed = torch.zeros(n, dtype=torch.uint8, device=device).scatter_reduce_(  # CUDA has no bool scatter
        0, labels, (strength > params.diff_criterion_sd).to(torch.uint8), reduce="amax").bool()
    best = torch.full((n,), -math.inf, dtype=strength.dtype, device=device).scatter_reduce_(
        0, labels, strength, reduce="amax")
    index = torch.arange(ys.numel(), device=device)
    candidates = torch.where(strength == best[labels], index, torch.full_like(index, ys.numel()))
    first = torch.full((n,), ys.numel(), dtype=torch.long, device=device).scatter_reduce_(
        0, labels, candidates, reduce="amin")
    strongest = torch.zeros(ys.numel(), dtype=torch.bool, device=device)
    strongest[first] = True
    polarity = torch.sign(z[first])  # the patch takes the strongest pixel's sign
    big = torch.iinfo(torch.long).max
    y0 = torch.full((n,), big, device=device).scatter_reduce_(0, labels, ys, reduce="amin")
    y1 = torch.full((n,), -1, device=device).scatter_reduce_(0, labels, ys, reduce="amax")
    x0 = torch.full((n,), big, device=device).scatter_reduce_(0, labels, xs, reduce="amin")
    x1 = torch.full((n,), -1, device=device).scatter_reduce_(0, labels, xs, reduce="amax")
    compact = ((y1 - y0) ** 2 + (x1 - x0) ** 2) <= 4.0 * params.maximum_radius_px**2
    # pixels of that sign, and their difference from the neighbours outside that set
    pol = polarity[labels]
    same = pol * z > params.grow_criterion_sd
    linear = ys * nx + xs
    same_sorted = torch.sort(linear[same]).values
    sum_out = torch.zeros(ys.numel(), dtype=torch.float64, device=device)
    n_out = torch.zeros(ys.numel(), dtype=torch.float64, device=device)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if oy == 0 and ox == 0:
                continue
            qy, qx = (ys + oy).clamp(0, ny - 1), (xs + ox).clamp(0, nx - 1)
            q = qy * nx + qx
            if same_sorted.numel():
                pos = torch.searchsorted(same_sorted, q).clamp_(max=same_sorted.numel() - 1)
                outside = same_sorted[pos] != q
            else:
                outside = torch.ones_like(q, dtype=torch.bool)
            sum_out += torch.where(outside, x[qy, qx].to(torch.float64), torch.zeros_like(sum_out))
            n_out += outside.to(torch.float64)
    recomputed = (x[ys, xs].to(torch.float64) - sum_out / n_out.clamp_min(1) - d_mean) / d_sd
    accepted = strongest | (same & (n_out > 0) & (pol * recomputed > params.grow_criterion_sd))
    size = torch.zeros(n, dtype=torch.long, device=device).scatter_add_(0, labels, accepted.long())
    good = has_seed & compact & (size <= params.max_pixels_in_diff_patch)
    take = accepted & good[labels]
    return ys[take], xs[take]


def find_xrays(image: torch.Tensor, params: XrayParams = XrayParams()) -> torch.Tensor:
    """One detection pass over ``image`` ``[y, x]``: the bool mask of pixels to replace."""
    _check_image(image)
    x = _work(image)
    device = x.device
    ny, nx = x.shape
    edge = min(params.edge_exclusion_width_px, (min(ny, nx) - 1) // 3)
    tile_y, n_ty = _tile_index(ny, edge, params.xy_scan_size_px, device)
    tile_x, n_tx = _tile_index(nx, edge, params.xy_scan_size_px, device)
    mask = torch.zeros((ny, nx), dtype=torch.bool, device=device)

    # peak test: candidates are the 3 x 3 extrema beyond the scan criterion in the scan areas
    scan_y, scan_x = tile_y[edge:ny - edge], tile_x[edge:nx - edge]
    scan = x[edge:ny - edge, edge:nx - edge]
    mean_t, sd_t = _tile_stats(scan, scan_y, scan_x, n_ty, n_tx)
    cy, cx, polarity = _beyond(scan, scan_y, scan_x, mean_t - params.scan_criterion_sd * sd_t,
                               mean_t + params.scan_criterion_sd * sd_t)
    cy, cx = cy + edge, cx + edge
    if cy.numel():
        extremum = _is_extremum(x, cy, cx, polarity)
        cy, cx, polarity = cy[extremum], cx[extremum], polarity[extremum]
    radius = params.maximum_radius_px
    outer = radius + params.annulus_width_px
    giant = []
    for start in range(0, cy.numel(), _CANDIDATE_CHUNK):
        ys, xs = cy[start:start + _CANDIDATE_CHUNK], cx[start:start + _CANDIDATE_CHUNK]
        pol = polarity[start:start + _CANDIDATE_CHUNK]
        keep, ring_mean, ring_sd, deviation = _annulus_test(x, ys, xs, pol, radius, outer, params.peak_criterion_sd)
        if bool(keep.any()):
            refine = (deviation[keep] > params.giant_criterion_sd) if params.giant_criterion_sd > 0 \
                else torch.zeros_like(deviation[keep], dtype=torch.bool)
            half, patch = _grow_patch(x, ys[keep], xs[keep], pol[keep], ring_mean[keep], ring_sd[keep], radius,
                                      params.grow_criterion_sd, refine)
            py, px = _patch_pixels(ys[keep], xs[keep], half, patch)
            mask[py, px] = True
        if params.giant_criterion_sd > 0:
            t = tile_y[ys] * n_tx + tile_x[xs]
            z_scan = pol * (x[ys, xs].to(torch.float64) - mean_t.reshape(-1)[t]) / sd_t.reshape(-1)[t]
            strong = ~keep & (z_scan > params.scan_criterion_sd + 1.0)
            giant.append((ys[strong], xs[strong], pol[strong]))

    # extra-large peaks (the differences check needs adjacent-pixel statistics: only computed if needed)
    gy = torch.cat([g[0] for g in giant]) if giant else cy[:0]
    if gy.numel():
        gx, gpol = torch.cat([g[1] for g in giant]), torch.cat([g[2] for g in giant])
        big_radius = params.extra_large_radius_px
        keep, ring_mean, ring_sd, _ = _annulus_test(x, gy, gx, gpol, big_radius, big_radius + params.annulus_width_px,
                                                    params.giant_criterion_sd)
        if bool(keep.any()):
            gy, gx, gpol = gy[keep], gx[keep], gpol[keep]
            half, patch = _grow_patch(x, gy, gx, gpol, ring_mean[keep], ring_sd[keep], big_radius,
                                      params.grow_criterion_sd, torch.ones_like(gpol, dtype=torch.bool))
            e = max(edge, 1)
            inner_y, inner_x = tile_y[e:ny - e], tile_x[e:nx - e]
            centre = x[e:ny - e, e:nx - e]
            a_mean, a_sd = _tile_stats_pairs(centre, x[e:ny - e, e - 1:nx - e - 1], x[e - 1:ny - e - 1, e:nx - e],
                                             inner_y, inner_x, n_ty, n_tx)
            t = tile_y[gy] * n_tx + tile_x[gx]
            big_enough = _big_differences(x, gy, gx, half, patch, a_mean.reshape(-1)[t], a_sd.reshape(-1)[t], params)
            if bool(big_enough.any()):
                py, px = _patch_pixels(gy[big_enough], gx[big_enough], half, patch[big_enough])
                mask[py, px] = True

    # difference test: pixel minus the mean of its 8 neighbours, statistics per scan area
    e = max(edge, 1)
    inner_y, inner_x = tile_y[e:ny - e], tile_x[e:nx - e]
    context = x[e - 1:ny - e + 1, e - 1:nx - e + 1]
    rows3 = context[:, :-2] + context[:, 1:-1] + context[:, 2:]
    box = rows3[:-2] + rows3[1:-1] + rows3[2:]
    del rows3
    d = (x[e:ny - e, e:nx - e] * 9.0 - box) / 8.0  # x - (sum of the 8 neighbours) / 8
    del box
    d_mean_t, d_sd_t = _tile_stats(d, inner_y, inner_x, n_ty, n_tx, clip_sd=params.diff_criterion_sd)
    gy_, gx_, _ = _beyond(d, inner_y, inner_x, d_mean_t - params.grow_criterion_sd * d_sd_t,
                          d_mean_t + params.grow_criterion_sd * d_sd_t)
    t = inner_y[gy_] * n_tx + inner_x[gx_]
    dm, ds = d_mean_t.reshape(-1)[t], d_sd_t.reshape(-1)[t]
    z = (d[gy_, gx_].to(torch.float64) - dm) / ds
    py, px = _diff_patches(x, gy_ + e, gx_ + e, z, dm, ds, params)
    if py.numel():
        mask[py, px] = True
    return mask


def _tile_stats_pairs(centre, left, below, tile_y, tile_x, n_ty, n_tx):
    """Mean and SD of |centre - left| and |centre - below| pooled, per scan area."""
    a = (centre - left).abs()
    b = (centre - below).abs()
    reference = float(a.mean())
    s1a, s2a = _tile_sums(a, tile_y, tile_x, n_ty, n_tx, reference)
    s1b, s2b = _tile_sums(b, tile_y, tile_x, n_ty, n_tx, reference)
    n = (torch.bincount(tile_y, minlength=n_ty)[:, None] * torch.bincount(tile_x, minlength=n_tx)[None, :]) * 2
    return _mean_sd(s1a + s1b, s2a + s2b, n.to(torch.float64), reference)



# ----------------------------------------------------------------------------------- replacement


def _poly_terms(u: torch.Tensor, v: torch.Tensor, order: int) -> torch.Tensor:
    """Polynomial terms of total degree <= order in (u, v), stacked on a last axis (1, u, v, u², uv, v², ...)."""
    terms = [torch.ones_like(u)]
    for degree in range(1, order + 1):
        for k in range(degree + 1):
            terms.append(u ** (degree - k) * v**k)
    return torch.stack(terms, -1)


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def fill_patches(image: torch.Tensor, mask: torch.Tensor, border_size_px: int = 2,
                 polynomial_order: int = 2) -> torch.Tensor:
    """Replace the pixels of ``mask`` by a polynomial fitted to the ring around each 8-connected patch.

    The ring: pixels within ``border_size_px`` (Chebyshev distance) of the patch, inside the image
    and outside every patch. The polynomial order is lowered when the ring has fewer than twice as
    many pixels as the order has terms (order 0: the ring's mean). Returns a new image of the input
    dtype (integers rounded and clipped); pixels outside ``mask`` are bit-identical to the input.
    """
    _check_image(image)
    if mask.shape != image.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the image's shape {tuple(image.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not 0 <= polynomial_order <= 3 or border_size_px < 1:
        raise ValueError(f"polynomial_order must be 0..3 and border_size_px >= 1, got {polynomial_order}, "
                         f"{border_size_px}")
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return image.clone()
    # torch cannot index-assign unsigned 16/32/64-bit tensors: work on int64, convert back (exact)
    limited = image.dtype in (torch.uint16, torch.uint32, torch.uint64)
    out = image.to(torch.int64) if limited else image.clone()
    device = image.device
    ny, nx = image.shape
    x = _work(image)
    labels, n = label_pixels(ys, xs, (ny, nx))
    big = torch.iinfo(torch.long).max
    y0 = torch.full((n,), big, device=device).scatter_reduce_(0, labels, ys, reduce="amin")
    y1 = torch.full((n,), -1, device=device).scatter_reduce_(0, labels, ys, reduce="amax")
    x0 = torch.full((n,), big, device=device).scatter_reduce_(0, labels, xs, reduce="amin")
    x1 = torch.full((n,), -1, device=device).scatter_reduce_(0, labels, xs, reduce="amax")
    extent = torch.maximum(y1 - y0, x1 - x0) + 1
    label_map = torch.full((ny, nx), -1, dtype=torch.int32 if n < 2**31 else torch.long, device=device)
    label_map[ys, xs] = labels.to(label_map.dtype)
    b = int(border_size_px)
    order_by_size = torch.argsort(extent)
    for start in range(0, n, _CANDIDATE_CHUNK):
        chunk = order_by_size[start:start + _CANDIDATE_CHUNK]
        size = int(extent[chunk].max()) + 2 * b
        oy, ox = y0[chunk] - b, x0[chunk] - b
        r = torch.arange(size, device=device)
        gy = (oy[:, None, None] + r[None, :, None]).expand(len(chunk), size, size)
        gx = (ox[:, None, None] + r[None, None, :]).expand(len(chunk), size, size)
        valid = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
        gyc, gxc = gy.clamp(0, ny - 1), gx.clamp(0, nx - 1)
        values = x[gyc, gxc].to(torch.float64)
        owner = label_map[gyc, gxc].long()
        own = valid & (owner == chunk[:, None, None])
        near = _dilate(own, b)
        fit = near & valid & (owner < 0)
        n_fit = fit.sum((1, 2))
        # coordinates relative to the patch centre, scaled for a well-conditioned fit
        cy = ((y0[chunk] + y1[chunk]).to(torch.float64) / 2 - oy)[:, None, None]
        cx = ((x0[chunk] + x1[chunk]).to(torch.float64) / 2 - ox)[:, None, None]
        scale = max(1.0, size / 2.0)
        u = (r[None, :, None].to(torch.float64) - cy) / scale
        v = (r[None, None, :].to(torch.float64) - cx) / scale
        u, v = torch.broadcast_tensors(u, v)
        design = _poly_terms(u, v, polynomial_order).reshape(len(chunk), size * size, -1)
        n_all = design.shape[-1]
        order = torch.full_like(n_fit, polynomial_order)
        for o in range(polynomial_order, 0, -1):
            order = torch.where((order == o) & (n_fit < 2 * _n_terms(o)), order - 1, order)
        term_degree = torch.tensor([d for d in range(polynomial_order + 1) for _ in range(d + 1)], device=device)
        used = term_degree[None, :] <= order[:, None]  # [K, T]
        w = fit.reshape(len(chunk), -1).to(torch.float64)
        a = design * used[:, None, :]
        normal = torch.einsum("kpt,kp,kps->kts", a, w, a)
        normal = normal + torch.diag_embed((~used).to(torch.float64))  # unused terms: coefficient 0
        ridge = 1e-10 * normal.diagonal(dim1=1, dim2=2).sum(-1)
        normal = normal + ridge[:, None, None] * torch.eye(n_all, dtype=torch.float64, device=device)
        rhs = torch.einsum("kpt,kp,kp->kt", a, w, values.reshape(len(chunk), -1))
        coef = torch.linalg.solve(normal, rhs[..., None])[..., 0]
        surface = (a @ coef[..., None])[..., 0].reshape(len(chunk), size, size)
        no_ring = n_fit == 0
        if bool(no_ring.any()):  # a patch filling its whole neighbourhood: nothing to fit, values kept
            surface[no_ring] = values[no_ring]
        k, wy, wx = torch.nonzero(own, as_tuple=True)
        fitted = surface[k, wy, wx]
        if image.is_floating_point():
            fitted = fitted.to(image.dtype)
        else:
            info = torch.iinfo(image.dtype)
            fitted = torch.round(fitted).clamp_(info.min, info.max).to(out.dtype)
        out[gy[k, wy, wx], gx[k, wy, wx]] = fitted
    return out.to(image.dtype) if limited else out


def _find_near(image: torch.Tensor, changed: torch.Tensor, params: XrayParams) -> torch.Tensor:
    """:func:`find_xrays` repeated only where ``changed`` pixels can alter the result: on crops made
    of the 64-px blocks holding a change and their neighbour blocks, with a 32-px margin of context
    (larger than the reach of every test); the whole image when those blocks cover over 30 % of it."""
    ny, nx = image.shape
    block, margin = 64, 32
    nby, nbx = -(-ny // block), -(-nx // block)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    blocks = torch.zeros((nby, nbx), dtype=torch.bool, device=image.device)
    blocks[ys // block, xs // block] = True
    blocks = _dilate(blocks)
    if float(blocks.float().mean()) > 0.3:
        return find_xrays(image, params)
    by, bx = torch.nonzero(blocks, as_tuple=True)
    labels, n = label_pixels(by, bx, (nby, nbx))
    big = torch.iinfo(torch.long).max
    y0 = torch.full((n,), big, device=image.device).scatter_reduce_(0, labels, by, reduce="amin").tolist()
    y1 = torch.full((n,), -1, device=image.device).scatter_reduce_(0, labels, by, reduce="amax").tolist()
    x0 = torch.full((n,), big, device=image.device).scatter_reduce_(0, labels, bx, reduce="amin").tolist()
    x1 = torch.full((n,), -1, device=image.device).scatter_reduce_(0, labels, bx, reduce="amax").tolist()
    found = torch.zeros((ny, nx), dtype=torch.bool, device=image.device)
    for k in range(n):  # one crop per cluster of blocks
        core_y0, core_y1 = y0[k] * block, min((y1[k] + 1) * block, ny)
        core_x0, core_x1 = x0[k] * block, min((x1[k] + 1) * block, nx)
        crop_y0, crop_y1 = max(0, core_y0 - margin), min(ny, core_y1 + margin)
        crop_x0, crop_x1 = max(0, core_x0 - margin), min(nx, core_x1 + margin)
        local = find_xrays(image[crop_y0:crop_y1, crop_x0:crop_x1], params)
        found[core_y0:core_y1, core_x0:core_x1] |= local[core_y0 - crop_y0:core_y1 - crop_y0,
                                                         core_x0 - crop_x0:core_x1 - crop_x0]
    return found


def count_scale(image: torch.Tensor, tile_px: int = 100) -> float | None:
    """Image units per detector count, from the shot noise: the median over ``tile_px`` tiles of
    ``var(x[y, x+1] − x[y, x]) / 2 / mean(x)`` (differences of adjacent pixels cancel the smooth
    specimen contrast; white noise of variance ``scale · mean``, as a sum of counting-mode frames
    has, aligned and dose-weighted or not). Differences and values beyond 6 SDs of what the scale
    predicts (hits, hot pixels) are left out, iterating from all of them. None when the image does
    not look like counts (most tiles with a mean <= 0, or no noise)."""
    _check_image(image)
    x = _work(image).to(torch.float64)
    ny, nx = x.shape
    t = max(2, min(int(tile_px), ny, nx - 1))
    h, w = ny // t * t, (nx - 1) // t * t

    def tiles(a: torch.Tensor) -> torch.Tensor:  # [tiles, t * t]
        return a.reshape(ny // t, t, w // t, t).permute(0, 2, 1, 3).reshape((ny // t) * (w // t), -1)

    values, steps = tiles(x[:h, :w]), tiles(x[:h, 1:w + 1] - x[:h, :w])
    mean = values.mean(1)
    positive = mean > 0
    if float(positive.double().mean()) < 0.5:
        return None
    values, steps, mean = values[positive], steps[positive], mean[positive]
    keep_steps = torch.ones_like(steps, dtype=torch.bool)
    scale = 0.0
    for _ in range(6):
        count = keep_steps.sum(1).clamp_min(1)
        noise = (steps.square() * keep_steps).sum(1) / count - ((steps * keep_steps).sum(1) / count).square()
        previous, scale = scale, float((noise / 2 / mean).median())
        if not scale > 0 or not math.isfinite(scale):
            return None
        if abs(scale - previous) <= 1e-3 * scale:
            break
        limit = _TRIM_SD * torch.sqrt(scale * mean.clamp_min(scale))[:, None]
        keep_values = (values - mean[:, None]).abs() <= limit
        mean = (values * keep_values).sum(1) / keep_values.sum(1).clamp_min(1)
        keep_steps = steps.abs() <= limit * math.sqrt(2)
    return scale


def _poisson_log_tail(value: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """log of an upper bound of the Poisson tail beyond ``value`` on the side away from ``mean``
    (``P(K >= k)`` above the mean, ``P(K <= k)`` below): ``pmf(k) / (1 − r)``, r the ratio of the
    next term to this one, ``mean / (k + 1)`` above and ``k / mean`` below; real ``k`` through the
    gamma function; 0 where the bound says nothing, −inf below 0 counts. float64."""
    k, mu = value.to(torch.float64), mean.to(torch.float64).clamp_min(1e-12)
    log_pmf = k.clamp_min(0) * torch.log(mu) - mu - torch.lgamma(k.clamp_min(0) + 1)
    upper = k > mu
    ratio = torch.where(upper, mu / (k + 1), k.clamp_min(0) / mu)
    bound = torch.where(ratio < 1, log_pmf - torch.log1p(-ratio.clamp(max=1 - 1e-12)), torch.zeros_like(k))
    bound = bound.clamp(max=0.0)
    return torch.where(k < 0, torch.full_like(k, -math.inf), bound)


def _significant_patches(image: torch.Tensor, filled: torch.Tensor, mask: torch.Tensor, probability: float,
                         tile_px: int) -> torch.Tensor:
    """``mask`` less the patches that shot noise explains: every pixel's value, in counts, is at
    least ``probability`` likely as a Poisson draw around the local level (module docstring, step
    6). Unchanged when the image does not look like counts (:func:`count_scale`)."""
    scale = count_scale(image, tile_px)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if scale is None or ys.numel() == 0:
        return mask
    labels, n = label_pixels(ys, xs, tuple(mask.shape))
    x = _work(image)
    value, fill = x[ys, xs].to(torch.float64), _work(filled)[ys, xs].to(torch.float64)
    # the local level: the mean of the 9 x 9 box around the pixel, patches left out (a fit to a
    # thin ring of one or two counts per pixel is too noisy alone); the less extreme of the two
    ny, nx = mask.shape
    offsets = torch.arange(-_LEVEL_BOX_HALF, _LEVEL_BOX_HALF + 1, device=mask.device)
    by = (ys[:, None, None] + offsets[None, :, None]).expand(-1, offsets.numel(), offsets.numel())
    bx = (xs[:, None, None] + offsets[None, None, :]).expand(-1, offsets.numel(), offsets.numel())
    inside = (by >= 0) & (by < ny) & (bx >= 0) & (bx < nx)
    by, bx = by.clamp(0, ny - 1), bx.clamp(0, nx - 1)
    use = inside & ~mask[by, bx]
    level = (x[by, bx].to(torch.float64) * use).sum((1, 2)) / use.sum((1, 2)).clamp_min(1)
    level = torch.where(use.any(2).any(1), level, fill)
    expected = torch.where(value > fill, torch.maximum(fill, level), torch.minimum(fill, level))
    log_tail = _poisson_log_tail(value / scale, expected / scale)
    strongest = torch.zeros(n, dtype=torch.float64, device=mask.device).scatter_reduce_(0, labels, log_tail, "amin")
    kept = mask.clone()
    dropped = strongest[labels] > math.log(probability)
    kept[ys[dropped], xs[dropped]] = False
    return kept


def erase_xrays(image: torch.Tensor, params: XrayParams = XrayParams()) -> XrayResult:
    """Find and replace X-rays and hot pixels in ``image`` ``[y, x]`` (ccderaser -find).

    A first pass of :func:`find_xrays` covers the whole image; the next passes (at most
    ``params.max_passes`` in all) test again, on the image cleaned so far, the neighbourhood of the
    pixels found by the previous pass, until a pass adds no pixel. The union of the patches is
    then replaced in the original image by :func:`fill_patches`. Pixels outside the returned mask
    are bit-identical to the input. With ``params.shot_noise_probability`` > 0, patches that shot
    noise explains are then kept as they are (module docstring, step 6).
    """
    _check_image(image)
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError("image has non-finite values (NaN or infinity)")
    total = torch.zeros(image.shape, dtype=torch.bool, device=image.device)
    cleaned = image
    new = find_xrays(image, params)
    passes = 1
    while bool(new.any()):
        total |= new
        cleaned = fill_patches(image, total, params.border_size_px, params.polynomial_order)
        if passes == params.max_passes:
            break
        passes += 1
        new = _find_near(cleaned, new, params) & ~total
    if params.shot_noise_probability > 0 and bool(total.any()):
        kept = _significant_patches(image, cleaned, total, params.shot_noise_probability, params.xy_scan_size_px)
        if not torch.equal(kept, total):
            total = kept
            cleaned = fill_patches(image, total, params.border_size_px, params.polynomial_order)
    if cleaned is image:
        cleaned = image.clone()
    ys, xs = torch.nonzero(total, as_tuple=True)
    n_patches = label_pixels(ys, xs, tuple(image.shape))[1]
    return XrayResult(cleaned, total, n_patches, passes)
