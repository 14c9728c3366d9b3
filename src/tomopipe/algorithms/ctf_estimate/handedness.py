"""Evidence for the defocus hand from per-tilt fit scores with hand −1 and +1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy.stats import binomtest
from scipy.stats import t as student_t

from tomopipe.algorithms.ctf_estimate.setup import F64, HAND_MAX_P, HAND_MIN_TILT_DEG


@dataclass(frozen=True)
class HandednessEvidence:
    """What the per-tilt score differences d = score(+1) − score(−1) say about the defocus hand."""

    hand: int  # sign of mean(d); 0 without an informative tilt
    clear: bool  # more than half of the tilts agree and p_value <= HAND_MAX_P
    p_value: float  # the smaller of the two-sided sign test and t-test p-values; 1 without evidence
    t_statistic: float  # mean(d) / (SD(d)/√n); NaN below 2 tilts
    tilts_used: int  # tilts with |tilt| >= min_tilt_deg
    tilts_agreeing: int  # tilts whose d has the sign of hand
    score_difference_mean: float
    score_difference_sd: float
    score_minus_one: float  # mean score with hand −1 over the tilts used
    score_plus_one: float
    min_tilt_deg: float


@dataclass(frozen=True)
class HandDecision:
    """The hand a tilt series was fitted with, and why."""

    evidence: HandednessEvidence
    hand_used: int  # the hand of the reported defocus values (RELION rlnTomoHand)
    source: str  # "given", "detected" or "default" (auto without a clear hand: −1)
    gradient_slope: float  # slope of locally fitted defocus against the plane depth z_P: ≈ the data's hand

    def to_dict(self) -> dict:
        """Flat plain dict: the evidence's fields, then ``hand_used``, ``source``, ``gradient_slope``."""
        return {**asdict(self.evidence), "hand_used": self.hand_used, "source": self.source,
                "gradient_slope": self.gradient_slope}


def decide_hand(requested, evidence: HandednessEvidence) -> tuple[int, str]:
    """``(hand_used, source)`` for a requested hand −1 / +1 (``"given"``) or ``"auto"``: the data's
    hand when it is clear (``"detected"``), else −1, RELION's default (``"default"``)."""
    if requested != "auto":
        return int(requested), "given"
    if evidence.clear:
        return evidence.hand, "detected"
    return -1, "default"


def handedness_evidence(tilt_angles_deg, scores_minus_one, scores_plus_one,
                        min_tilt_deg: float = HAND_MIN_TILT_DEG) -> HandednessEvidence:
    """Which defocus hand the per-tilt best fit scores (one per tilt, for hand −1 and +1) support.

    Only tilts with ``|tilt| ≥ min_tilt_deg`` count (near 0° both hands predict the same spectra).
    d = score(+1) − score(−1) per tilt; the hand is the sign of mean(d) (see
              :class:`HandednessEvidence` for the fields).
    """
    tilts = torch.as_tensor(tilt_angles_deg, dtype=F64).reshape(-1)
    minus = torch.as_tensor(scores_minus_one, dtype=F64).reshape(-1)
    plus = torch.as_tensor(scores_plus_one, dtype=F64).reshape(-1)
    used = tilts.abs() >= min_tilt_deg
    d = (plus - minus)[used]
    n = int(d.numel())
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std()) if n >= 2 else math.nan
    hand = int(math.copysign(1, mean)) if n and mean != 0 else 0
    agreeing = int((torch.sign(d) == hand).sum()) if hand else 0
    t, p = math.nan, 1.0
    if hand:
        p = float(binomtest(agreeing, n).pvalue)
    if hand and n >= 2:
        t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean)
        p = min(p, float(2.0 * student_t.sf(abs(t), n - 1)))
    return HandednessEvidence(
        hand=hand, clear=bool(hand != 0 and 2 * agreeing > n and p <= HAND_MAX_P), p_value=p, t_statistic=t,
                              tilts_used=n, tilts_agreeing=agreeing, score_difference_mean=mean, score_difference_sd=sd,
                              score_minus_one=float(minus[used].mean()) if n else math.nan,
        score_plus_one=float(plus[used].mean()) if n else math.nan, min_tilt_deg=float(min_tilt_deg))
