"""Gold-standard half maps from Fourier accumulators (shared by reconstruct particle and auto-refine):
``Σ CTF·F / (Σ CTF² + 1/SSNR)`` with the SSNR from the half-map FSC (RELION)."""

from __future__ import annotations

import torch

from tomopipe.algorithms.fsc import fsc
from tomopipe.algorithms.subtomo.backproject import FourierAccumulator, ssnr_from_fsc

__all__ = ["sum_accumulators", "reconstruct_maps"]


def sum_accumulators(parts, device) -> FourierAccumulator:
    """One accumulator on ``device`` holding all of ``parts`` (same box and padding)."""
    parts = list(parts)
    total = FourierAccumulator(parts[0].n, parts[0].pad, parts[0].density_compensation, device=device)
    for acc in parts:
        total.add(acc)
    return total


def reconstruct_maps(halves: dict[int, FourierAccumulator], regularisation: str, wiener_snr: float
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Half maps and full map (``half1``, ``half2``, ``full``) and the FSC of the half maps returned
    (unmasked: a mask would correlate the halves' noise, RELION takes the SSNR from the unmasked FSC
    too). ``regularisation`` "wiener": the constant ``1/wiener_snr`` only; "fsc": a first pass with it
    gives the FSC, whose SSNR (per half, twice that for the full map) regularises the maps returned."""
    constant = 1.0 / wiener_snr
    maps = {f"half{h}": acc.reconstruct(wiener_constant=constant) for h, acc in halves.items()}
    curve = fsc(maps["half1"].double(), maps["half2"].double())
    both = sum_accumulators(halves.values(), halves[1].device)
    if regularisation == "wiener":
        return {**maps, "full": both.reconstruct(wiener_constant=constant)}, curve
    ssnr = ssnr_from_fsc(curve)
    maps = {f"half{h}": acc.reconstruct(ssnr=ssnr) for h, acc in halves.items()}
    maps["full"] = both.reconstruct(ssnr=2.0 * ssnr)
    return maps, fsc(maps["half1"].double(), maps["half2"].double())
