"""Gold-standard 3-D auto-refine on 2-D pseudo-subtomograms (RELION 5 ``relion_refine --auto_refine --ios``).

Two half sets, each refined against its own reference; the references share only the frequencies
below ``join_below_A`` (40 Å, RELION). Per iteration:

1. pose search (:mod:`~tomopipe.algorithms.subtomo.pose_search`) of every particle against its half's
   reference up to the current resolution limit, the angular step ``initial_step_deg`` in the first
   iteration, halved (the offset step with it) down to ``finest_step_deg`` after an iteration that gained
   less than one Fourier shell of resolution or moved the particles by less than half the step on average
   (RELION's auto-sampling: a finer step only once the current one has given what it can). While the
   step is coarser than ``local_from_deg``: global searches (RELION), on the asymmetric unit's grid of
   ``initial_step_deg`` with the offsets ``offset_range_A`` / ``offset_step_A``, then local refinement of
   the best rotations down to the step (:func:`coarse_to_fine_search`; no prior: the picks carry no
   orientation); then local searches: rotations within two steps of the previous pose at its shift, then
   offsets within two offset steps of it at the best rotation, with a Gaussian prior on the previous pose
   (angle ``prior_angle_deg``, offset ``offset_range_A``);
2. each half reconstructed with the new poses (crops moved back by their shifts, inserted with
   ``R_tilt·A``, symmetrised), regularised by the SSNR of the half-map FSC (RELION), and the resolution
   at FSC 0.143 of the unmasked half maps;
3. next references: each half map with the frequencies below ``join_below_A`` averaged over the two
   halves, low-passed at the resolution, times the soft spherical mask; the noise power per tilt series
   and half re-estimated from the residual of the crops against the new references at the new poses.

Converged when the resolution has not improved (by half a Fourier shell) for two iterations with the
step at its finest (RELION's rule), or after ``max_iterations``. Shifts are 3-D, Å, tomogram frame (particle centre =
position + shift); rotations reference -> particle.

Where the searches run: by default in this process, one (tilt series, half) after the other. With a
``search_map`` (``auto_refine(..., search_map=...)``) the searches of one iteration are handed over as plain,
picklable :class:`SearchTask` values, one per tilt series and half, and ``search_map(tasks)`` returns what
:func:`search_task` returns for each (e.g. an executor's map of :func:`search_task` over worker processes): the
same computation on the same numbers, so the same poses. A task carries its half's particles
(:class:`ParticleStacks`) or, with ``loaders``, a small picklable callable that builds the tilt series
(:class:`RefineSeries`) where the task runs (the caller reads its files there; this module reads none), the
half's reference map (the projector is rebuilt from it), its noise power, the current poses of the half and the
iteration's step, offset step and band limit. Reconstruction, references and noise stay in this process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from tomopipe.algorithms.filters import bandpass
from tomopipe.algorithms.fourier_slice import FourierSliceProjector
from tomopipe.algorithms.fsc import fsc_resolution_A
from tomopipe.algorithms.subtomo.backproject import FourierAccumulator, projected_shifts_px, shift_phases
from tomopipe.algorithms.subtomo.half_maps import reconstruct_maps
from tomopipe.algorithms.subtomo.pose_search import (
    ParticleStacks,
    PosePrior,
    coarse_to_fine_search,
    estimate_noise_power,
    local_search,
)
from tomopipe.algorithms.symmetry import misorientation_deg, symmetry_group
from tomopipe.errors import TomopipeError

__all__ = ["RefineSettings", "RefineSeries", "RefineResult", "SearchTask", "auto_refine", "centring_phases",
           "reconstruct_series", "search_task"]

log = logging.getLogger("tomopipe")

FSC_THRESHOLD = 0.143
MIN_GAIN_SHELLS = 0.5  #: a smaller gain of resolution (Fourier shells) over the best so far counts as none


@dataclass(frozen=True)
class RefineSettings:
    """The loop's parameters (module docstring); lengths in Å, angles in degrees."""

    symmetry: str
    initial_lowpass_A: float
    initial_step_deg: float
    finest_step_deg: float
    local_from_deg: float
    offset_range_A: float
    offset_step_A: float
    prior_angle_deg: float
    max_iterations: int
    join_below_A: float = 40.0
    pad_factor: int = 2


@dataclass
class RefineSeries:
    """The particles of one tilt series: ``stacks`` (all of them, ``noise_power`` unused), ``half`` ``[m]``
    (1 or 2), the current ``rotations`` ``[m, 3, 3]`` and ``shifts_A`` ``[m, 3]`` (float64)."""

    stacks: ParticleStacks
    half: torch.Tensor
    rotations: torch.Tensor
    shifts_A: torch.Tensor = field(default=None)

    def __post_init__(self):
        m = self.stacks.crops_ft.shape[0]
        if self.shifts_A is None:
            self.shifts_A = torch.zeros((m, 3), dtype=torch.float64)
        if tuple(self.half.shape) != (m,) or tuple(self.rotations.shape) != (m, 3, 3):
            raise TomopipeError(f"auto-refine: {m} particles need half [{m}] and rotations [{m}, 3, 3], got "
                                f"{tuple(self.half.shape)}, {tuple(self.rotations.shape)}")


@dataclass(frozen=True)
class RefineResult:
    """Maps (``half1``, ``half2``, ``full``), the final half-map FSC and resolution (Å), the per-iteration
    log (resolution_A, fsc, angular_step_deg, mean pose changes) and the series with their refined poses."""

    maps: dict[str, torch.Tensor]
    fsc: torch.Tensor
    resolution_A: float
    iterations: list[dict]
    series: list[RefineSeries]


@dataclass(frozen=True)
class SearchTask:
    """The pose search of one half of one tilt series in one iteration, as plain picklable values.

    ``data``: the half's particles (:class:`ParticleStacks`, ``noise_power`` unused) or a loader, a picklable
    callable that returns a :class:`RefineSeries` whose particles of ``half`` are the half's, in order (it
    may hold only them); ``reference`` ``[c, c, c]`` float32: the half's reference (the projector is built
    from it, pad factor 2); ``noise_power``: σ² per shell of the half; ``rotations`` ``[m_h, 3, 3]`` and
    ``shifts_A`` ``[m_h, 3]`` (float64, Å, tomogram frame): the half's current poses; ``step_deg``,
    ``offset_step_A`` and ``max_frequency_px`` (band limit, Fourier pixels): the iteration's; ``device``: where
    the projector is built (the loaded particles stay where the loader puts them)."""

    data: Union[ParticleStacks, Callable[[], RefineSeries]]
    half: int
    reference: torch.Tensor
    noise_power: torch.Tensor
    rotations: torch.Tensor
    shifts_A: torch.Tensor
    settings: RefineSettings
    step_deg: float
    offset_step_A: float
    max_frequency_px: float
    device: str = "cpu"


SearchMap = Callable[[list[SearchTask]], list[tuple[torch.Tensor, torch.Tensor]]]


def centring_phases(stacks: ParticleStacks, shifts_A: torch.Tensor) -> torch.Tensor:
    """``e^{+2πi k·s_i/c}`` ``[m, n, c, c//2+1]`` for shifts ``[m, 3]`` (Å, tomogram frame): times a crop's
    spectrum, it moves the particle at ``s_i = m_i·[R_i·t]_xy / pixel`` back to the crop's centre."""
    device = stacks.crops_ft.device
    return shift_phases(projected_shifts_px(stacks.tilt_rotations, stacks.magnification, shifts_A,
                                            stacks.pixel_size_A).to(device), stacks.crop_px)


def _subset(stacks: ParticleStacks, which: torch.Tensor, noise_power: torch.Tensor) -> ParticleStacks:
    return ParticleStacks(stacks.crops_ft[which], stacks.ctf2[which], stacks.tilt_rotations, stacks.pixel_size_A,
                          noise_power, stacks.magnification)


def _predicted(projector: FourierSliceProjector, stacks: ParticleStacks, rotations: torch.Tensor,
               shifts_A: torch.Tensor) -> torch.Tensor:
    """The reference's slices at the particles' poses, moved by their shifts ``[m, n, c, c//2+1]``."""
    m, n = stacks.crops_ft.shape[:2]
    tilts = stacks.tilt_rotations.to(torch.float64)
    mag = stacks.magnification.repeat(m)
    slices = projector.slices((tilts[None] @ rotations[:, None]).reshape(-1, 3, 3).float(), mag)
    slices = slices.reshape(m, n, *slices.shape[-2:]).to(stacks.crops_ft.device) * (mag ** 2).reshape(m, n, 1, 1)
    return slices * centring_phases(stacks, shifts_A).conj()


def _noise_power(series: RefineSeries, half: int, projector: FourierSliceProjector | None) -> torch.Tensor:
    """σ² per shell of one half of a tilt series: from ``|X|²`` without a reference (first iteration)."""
    which = torch.nonzero(series.half == half).reshape(-1)
    s = series.stacks
    predicted = None if projector is None else _predicted(projector, _subset(s, which, s.noise_power),
                                                          series.rotations[which], series.shifts_A[which])
    return estimate_noise_power(s.crops_ft[which], s.ctf2[which], predicted)


def _search(series: RefineSeries, half: int, projector: FourierSliceProjector, noise: torch.Tensor,
            settings: RefineSettings, step_deg: float, offset_step_A: float,
            max_frequency_px: float) -> None:
    """New poses of one half of a tilt series (module docstring, step 1), in place."""
    which = torch.nonzero(series.half == half).reshape(-1)
    rotations, shifts = _half_search(projector, _subset(series.stacks, which, noise), series.rotations[which],
                                     series.shifts_A[which], settings, step_deg, offset_step_A, max_frequency_px)
    series.rotations[which], series.shifts_A[which] = rotations, shifts


def _half_search(projector: FourierSliceProjector, data: ParticleStacks, rotations: torch.Tensor,
                 shifts: torch.Tensor, settings: RefineSettings, step_deg: float, offset_step_A: float,
                 max_frequency_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New rotations ``[m, 3, 3]`` and shifts ``[m, 3]`` (float64, CPU) of the particles ``data`` (one half of
    a tilt series, with its noise power) from their current poses (module docstring, step 1)."""
    if step_deg > settings.local_from_deg:
        finer = [settings.initial_step_deg / 2**k for k in range(1, 12)]
        result = coarse_to_fine_search(projector, data, symmetry=settings.symmetry,
                                       global_step_deg=settings.initial_step_deg,
                                       local_steps_deg=tuple(s for s in finer if s >= step_deg * (1 - 1e-6)),
                                       offset_range_A=settings.offset_range_A, offset_step_A=settings.offset_step_A,
                                       max_frequency_px=max_frequency_px)
    else:
        prior = PosePrior(rotations, shifts, settings.prior_angle_deg, settings.offset_range_A)
        result = local_search(projector, data, rotations[:, None], shifts, step_deg, 2.0 * step_deg,
                              2.0 * offset_step_A, offset_step_A, max_frequency_px, alternate=True, prior=prior,
                              symmetry=settings.symmetry)
    return result.best_rotations.to(torch.float64).cpu(), result.best_shifts_A.to(torch.float64).cpu()


def search_task(task: SearchTask) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one :class:`SearchTask` (in any process): the half's new rotations ``[m_h, 3, 3]`` and shifts
    ``[m_h, 3]`` (float64, CPU), the computation the in-process loop does for that half."""
    if isinstance(task.data, ParticleStacks):
        stacks = task.data
    else:
        series = task.data()
        which = torch.nonzero(series.half == task.half).reshape(-1)
        stacks = _subset(series.stacks, which, series.stacks.noise_power)
    m = int(task.rotations.shape[0])
    if stacks.crops_ft.shape[0] != m or tuple(task.shifts_A.shape) != (m, 3):
        raise TomopipeError(f"auto-refine search task (half {task.half}): its data hold {stacks.crops_ft.shape[0]} "
                            f"particles of the half but it carries {m} rotations and shifts "
                            f"{tuple(task.shifts_A.shape)}")
    data = ParticleStacks(stacks.crops_ft, stacks.ctf2, stacks.tilt_rotations, stacks.pixel_size_A,
                          task.noise_power, stacks.magnification)
    projector = FourierSliceProjector(task.reference.to(task.device), stacks.pixel_size_A, pad_factor=2)
    return _half_search(projector, data, task.rotations, task.shifts_A, task.settings, task.step_deg,
                        task.offset_step_A, task.max_frequency_px)


def _mapped_searches(series: list[RefineSeries], references: dict[int, torch.Tensor],
                     noise: dict[tuple[int, int], torch.Tensor], settings: RefineSettings, step_deg: float,
                     offset_step_A: float, max_frequency_px: float, device: torch.device, search_map: SearchMap,
                     loaders: list[dict[int, Callable[[], RefineSeries]]] | None) -> None:
    """The searches of one iteration through ``search_map`` (module docstring), the poses updated in place;
    halves without particles in a tilt series are left out."""
    keys, tasks = [], []
    for i, s in enumerate(series):
        for h in (1, 2):
            which = torch.nonzero(s.half == h).reshape(-1)
            if which.numel() == 0:
                continue
            data = loaders[i][h] if loaders is not None else _subset(s.stacks, which, s.stacks.noise_power)
            tasks.append(SearchTask(data, h, references[h].detach().cpu(), noise[i, h].detach().cpu(),
                                    s.rotations[which].clone(), s.shifts_A[which].clone(), settings, step_deg,
                                    offset_step_A, max_frequency_px, str(device)))
            keys.append((s, which))
    results = list(search_map(tasks))
    if len(results) != len(tasks):
        raise TomopipeError(f"auto-refine: the search map returned {len(results)} results for {len(tasks)} tasks")
    for (s, which), (rotations, shifts) in zip(keys, results):
        if tuple(rotations.shape) != (which.numel(), 3, 3) or tuple(shifts.shape) != (which.numel(), 3):
            raise TomopipeError(f"auto-refine: a search returned rotations {tuple(rotations.shape)} and shifts "
                                f"{tuple(shifts.shape)} for {which.numel()} particles")
        s.rotations[which] = rotations.to(torch.float64).cpu()
        s.shifts_A[which] = shifts.to(torch.float64).cpu()


def reconstruct_series(series: list[RefineSeries], group: torch.Tensor, pad_factor: int, device
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Half maps and full map at the series' poses and their FSC (module docstring, step 2), symmetrised by
    the point ``group``."""
    c = series[0].stacks.crop_px
    halves = {h: FourierAccumulator(c, pad_factor, device=device) for h in (1, 2)}
    for s in series:
        st = s.stacks
        spectra = st.crops_ft * centring_phases(st, s.shifts_A)
        rotations = st.tilt_rotations.to(torch.float64)[None] @ s.rotations[:, None]  # [m, n, 3, 3]
        used = (st.ctf2.flatten(2) > 0).any(-1)  # [m, n]
        for h in (1, 2):
            pick = used & (s.half == h).to(used.device)[:, None]
            halves[h].insert(spectra[pick], rotations[pick.cpu()].float(), st.ctf2[pick])
    for acc in halves.values():
        if group.shape[0] > 1:
            acc.symmetrise(group)
    return reconstruct_maps(halves, "fsc", 1.0)


def _references(maps: dict[str, torch.Tensor], pixel_A: float, resolution_A: float, join_below_A: float,
                mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Next reference of each half (module docstring, step 3)."""
    n = mask.shape[0]
    spectra = {h: torch.fft.rfftn(maps[f"half{h}"].double()) for h in (1, 2)}
    low = bandpass((n, n, n), pixel_A, high_A=join_below_A, falloff_per_A=0.0).to(torch.float64) > 0
    joined = 0.5 * (spectra[1] + spectra[2])
    lowpass = bandpass((n, n, n), pixel_A, high_A=max(resolution_A, 2.0 * pixel_A)).to(torch.float64)
    return {h: torch.fft.irfftn(torch.where(low, joined, ft) * lowpass, s=(n, n, n)).float() * mask
            for h, ft in spectra.items()}


def _band_px(crop_px: int, pixel_A: float, resolution_A: float) -> float:
    """The search's band limit: the resolution plus 2 shells, below Nyquist."""
    return min(crop_px * pixel_A / resolution_A + 2.0, crop_px // 2 - 0.5)


def _pose_changes(series: list[RefineSeries], before: list[tuple[torch.Tensor, torch.Tensor]], symmetry: str
                  ) -> tuple[float, float]:
    angles = torch.cat([misorientation_deg(r, s.rotations, symmetry) for s, (r, _) in zip(series, before)])
    offsets = torch.cat([(s.shifts_A - t).norm(dim=-1) for s, (_, t) in zip(series, before)])
    return float(angles.mean()), float(offsets.mean())


def auto_refine(series: list[RefineSeries], reference: torch.Tensor | dict[int, torch.Tensor], mask: torch.Tensor,
                settings: RefineSettings, device=None, search_map: SearchMap | None = None,
                loaders: list[dict[int, Callable[[], RefineSeries]]] | None = None) -> RefineResult:
    """Run the loop (module docstring) from ``reference`` (box = the crops', same voxel size, absolute
    greyscale: not rescaled), one map for both halves or ``{1: half1, 2: half2}`` (half maps of an earlier
    refinement: the halves stay independent), with the soft ``mask``; updates the series' poses in place.

    ``search_map``: None searches in this process; else ``search_map(tasks)`` runs the :class:`SearchTask` of
    every tilt series and half of an iteration and returns :func:`search_task`'s result for each, in order.
    ``loaders`` (with ``search_map``): per series ``{1: loader, 2: loader}`` carried by the tasks instead of
    the particles (:class:`SearchTask`)."""
    if not series:
        raise TomopipeError("auto-refine: no particles")
    if loaders is not None and (len(loaders) != len(series) or any(set(lo) != {1, 2} for lo in loaders)):
        raise TomopipeError(f"auto-refine: loaders must give {{1: ..., 2: ...}} for each of the {len(series)} "
                            f"tilt series, got {len(loaders)} entries")
    stacks0 = series[0].stacks
    c, pixel_A = stacks0.crop_px, stacks0.pixel_size_A
    starts = reference if isinstance(reference, dict) else {1: reference, 2: reference}
    for volume in (*starts.values(), mask):
        if tuple(volume.shape) != (c, c, c):
            raise TomopipeError(f"auto-refine: the reference and the mask must be boxes of {c} px (the crops' size), "
                                f"got {tuple(volume.shape)}")
    group = symmetry_group(settings.symmetry)
    device = torch.device(device or stacks0.crops_ft.device)
    start = bandpass((c, c, c), pixel_A, high_A=settings.initial_lowpass_A).to(torch.float64)
    references = {h: torch.fft.irfftn(torch.fft.rfftn(starts[h].double()) * start, s=(c, c, c)).float() * mask
                  for h in (1, 2)}
    noise = {(i, h): _noise_power(s, h, None) for i, s in enumerate(series) for h in (1, 2)}
    resolution_A, step, offset_step = settings.initial_lowpass_A, settings.initial_step_deg, settings.offset_step_A
    best_A, stalled, iterations = math.inf, 0, []
    projectors = {h: FourierSliceProjector(references[h].to(device), pixel_A, pad_factor=2) for h in (1, 2)}
    for iteration in range(1, settings.max_iterations + 1):
        band_px = _band_px(c, pixel_A, resolution_A)
        before = [(s.rotations.clone(), s.shifts_A.clone()) for s in series]
        if search_map is None:
            for i, s in enumerate(series):
                for h in (1, 2):
                    _search(s, h, projectors[h], noise[i, h], settings, step, offset_step, band_px)
        else:
            _mapped_searches(series, references, noise, settings, step, offset_step, band_px, device, search_map,
                             loaders)
        maps, curve = reconstruct_series(series, group, settings.pad_factor, device)
        found_A = fsc_resolution_A(curve, pixel_A, FSC_THRESHOLD, c)
        gained_shells = c * pixel_A / found_A - c * pixel_A / resolution_A if math.isfinite(found_A) else 0.0
        resolution_A = found_A if math.isfinite(found_A) else resolution_A
        references = _references(maps, pixel_A, resolution_A, settings.join_below_A, mask.to(maps["half1"].device))
        projectors = {h: FourierSliceProjector(references[h].to(device), pixel_A, pad_factor=2) for h in (1, 2)}
        noise = {(i, h): _noise_power(s, h, projectors[h]) for i, s in enumerate(series) for h in (1, 2)}
        angle_deg, offset_A = _pose_changes(series, before, settings.symmetry)
        iterations.append({"iteration": iteration, "resolution_A": resolution_A, "angular_step_deg": step,
                           "offset_step_A": offset_step, "band_px": band_px, "mean_angle_change_deg": angle_deg,
                           "mean_offset_change_A": offset_A, "fsc": [round(float(v), 4) for v in curve]})
        log.info("auto-refine iteration %d: %.2f A, step %.3g deg, pose change %.2f deg %.2f A", iteration,
                 resolution_A, step, angle_deg, offset_A)
        stalled = stalled + 1 if c * pixel_A * (1 / resolution_A - 1 / best_A) < MIN_GAIN_SHELLS else 0
        best_A = min(best_A, resolution_A)
        if stalled >= 2 and step <= settings.finest_step_deg:
            break
        if step > settings.finest_step_deg and (gained_shells < 1.0 or angle_deg < 0.5 * step):
            step, offset_step = max(settings.finest_step_deg, step / 2), offset_step / 2  # RELION's auto-sampling
    return RefineResult(maps, curve, resolution_A, iterations, series)
