"""Tilt-aware per-tilt CTF estimation (issue 4): defocus U/V/angle, phase shift, fit resolution.

Conventions (``docs/conventions.md`` §4, §7): defocus in Å, underfocus positive;
DefocusU along ``defocus_angle_deg`` measured from +x toward +y (index space, +y = increasing
row index), reported CTFFIND-style with U ≥ V and angle in (−90, 90]; the defocus of a point
is ``Δf = Δf_centre + hand·z_P`` (RELION ``rlnTomoHand``), z_P = depth of the point after the
projection rotation ``Rz(axis)·Ry(tilt)`` (:mod:`tomopipe.algorithms.geometry`). Image positions
are measured from the FFT centre ``N // 2`` of the image.

Method, per tilt image:

1. Periodograms of overlapping windows (``window_px``, 50 % overlap, cosine edge taper; frame
   periodograms summed for ``[n, frames, h, w]`` input). The specimen is taken as a flat slab
   (z = 0): each window centre has a known depth z_P, so its defocus is ``Δf_centre + hand·z_P``.
2. Each window's spectrum is reduced to azimuthal sectors (5°) × 1-pixel radial bins, whitened by
   a smooth background (``P / bg − 1``; a log-polynomial fitted to the fit range alone, so that
   the amorphous-ice ring at 3.7 Å or the detector fall-off cannot bend it there) and detrended (a quadratic
   in k is projected out of data
   and model alike, so that a residual background cannot favour any defocus).
3. Score = weighted normalised cross-correlation (CTFFIND-style) between these profiles and the
   model CTF² (averaged over each radial bin) within the fit range. The score is linear in the
   data, so correlation tables ``N(Δf)`` are computed once by a matrix product and shifted by
   each window group's defocus offset: the exhaustive search over the centre defocus (50 Å
   steps), astigmatism ((U − V)/2 up to 2300 Å × 15° angles) and phase shift (15° steps, with
   ``fit_phase``) is table look-ups.
4. Local refinement of (defocus, astigmatism vector, phase) by Nelder–Mead on the same score
   tabulated on a 5 Å defocus grid (2.5° phase grid) and interpolated linearly.
5. Second pass: background and envelope are fitted by least squares against the first model
   (``P ≈ bg(k) + A·exp(−B·k²/4)·CTF²``, piecewise-linear bg with knots 0.4 Thon-ring periods
   apart in the fit range, B on a grid; rejected when A is not significant, i.e. when the
   background took up the rings); the search and
   refinement are repeated with the data whitened by ``bg`` and the oscillation of the model
   (CTF² − ½) weighted by the signal-to-noise envelope ``env / bg`` (a matched filter, which keeps
   noise-dominated high frequencies from creating false maxima). The envelope is used only when
   its amplitude is ≥ 3 standard errors above zero.

Tilt series:

* Handedness: every tilt with |tilt| ≥ ``HAND_MIN_TILT_DEG`` is fitted (second pass) with
  ``hand = −1`` and ``+1``: the two hands predict opposite defocus gradients across the tilt axis,
  and the wrong one smears the Thon rings. The per-tilt differences d = score(+1) − score(−1)
  decide: the data's hand is the sign of their mean, *clear* when most tilts agree with it and
  the p-value is ≤ ``HAND_MAX_P``: the smaller of a two-sided sign test (how many tilts agree:
  8 of 8, 11 of 12, 14 of 16, 17 of 20 suffice; robust to the magnitudes of d, which grow with
  the tilt) and a one-sample t-test of mean(d) = 0 (t = mean(d) / (SD(d)/√n); decides with
  few tilts whose differences are consistent).
  ``hand="auto"`` fits with the data's hand when it is clear and with −1 (RELION's default)
  otherwise, which ``handedness["source"]`` records. Independently, ``gradient_slope``
  regresses local defocus values (fitted per grid cell without any hand assumption) on the
  plane depth z_P: ≈ +1 or −1.
* Astigmatism is one vector for the whole series (an objective-lens property), found by
  maximising the summed scores of all tilts (each with its own defocus) — it pools the SNR of
  all tilts; ``astigmatism_per_tilt=True`` keeps each tilt's own value instead.
* Consistency: every tilt's score curve over the whole defocus range is expressed in units of
  its noise level (sandwich estimate, z-scores). Each tilt takes the one of its 6 best maxima (or
  its best value within 1500 Å of a series trend) that maximises z − 1 per 1000 Å of distance
  to the trend beyond 1500 Å (at most 8); the trend is the constant that maximises the sum of
  these values (scanned over the whole range), refined to a robust quadratic in the tilt angle
  from 8 tilts on. A weak maximum far from the series gives way, a strong genuine jump stays.
* A ``gy × gx`` grid of local defocus values (the windows of each cell, offsets relative to the
  cell centre) is fitted per tilt.

Fit resolution (documented rule): the whitened spectrum and the model are averaged in bins of
the CTF phase χ (π/12 wide, over all sectors and windows, so astigmatism and tilt are
corrected), and for every Thon ring n (χ from nπ to (n+1)π) the weighted correlation between
data and model (each with a linear trend in χ removed) is computed over rings n−1..n+1. Going
outward from the first ring inside the fit range, the fit resolution is 1/k (at the mean
defocus) of the outer zero of the last ring of the first run of rings with correlation ≥
``FIT_RESOLUTION_THRESHOLD`` (0.5, and ≥ 3/√bins so that a short window of noise cannot pass);
the run must start within the first three rings and ends at two consecutive rings below the
threshold (single dips are tolerated); k is evaluated up to ``0.96 × Nyquist``. If no ring
passes, the low-resolution limit of the fit range is reported.

Modules: ``setup`` (constants, input checks, grids), ``spectra`` (window periodograms, sector
profiles, depth groups, whitening), ``background`` (pass-1 / pass-2 backgrounds), ``search``
(scores, exhaustive search, refinement), ``resolution`` (fit resolution), ``consistency``
(tilt-series trend), ``handedness`` (hand evidence and decision), ``diagnostic`` (diagnostic
image), ``fit_1d`` (rotational-average fit) and ``series`` (the per-tilt-series fit).
"""

from tomopipe.algorithms.ctf_estimate.fit_1d import Fit1d, fit_ctf_1d
from tomopipe.algorithms.ctf_estimate.handedness import HandDecision, HandednessEvidence, handedness_evidence
from tomopipe.algorithms.ctf_estimate.resolution import fit_resolution_from_phase_profile
from tomopipe.algorithms.ctf_estimate.series import (
    CtfSeriesPlan,
    TiltSeriesCtf,
    estimate_tilt_series_ctf,
    fit_tilt_series_ctf,
    plan_tilt_series_ctf,
    tilt_spectra,
)
from tomopipe.algorithms.ctf_estimate.setup import (
    FIT_RESOLUTION_THRESHOLD,
    HAND_MAX_P,
    HAND_MIN_TILT_DEG,
    CtfEstimationError,
)
from tomopipe.algorithms.ctf_estimate.spectra import power_spectrum_tiles, specimen_plane_depth_A, tile_origins_px

__all__ = [
    "CtfEstimationError",
    "FIT_RESOLUTION_THRESHOLD",
    "HAND_MIN_TILT_DEG",
    "HAND_MAX_P",
    "Fit1d",
    "HandDecision",
    "HandednessEvidence",
    "TiltSeriesCtf",
    "handedness_evidence",
    "tile_origins_px",
    "power_spectrum_tiles",
    "specimen_plane_depth_A",
    "fit_ctf_1d",
    "fit_resolution_from_phase_profile",
    "estimate_tilt_series_ctf",
    "fit_tilt_series_ctf",
    "plan_tilt_series_ctf",
    "tilt_spectra",
    "CtfSeriesPlan",
]
