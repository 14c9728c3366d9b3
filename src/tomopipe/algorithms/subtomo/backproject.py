"""Fourier insertion of central slices ("back projection" in Fourier space) and reconstruction.

:class:`FourierAccumulator` inserts image spectra into a padded half spectrum ``[P, P, P//2+1]``
(P = pad·N, DC at index 0, z and y wrapped) with the conventions of
:meth:`tomopipe.algorithms.fourier_slice.FourierSliceProjector.slices`: frequency k = (kx, ky)
of an M-box image spectrum lands at ``q = (P/M)·Rᵀ·(kx, ky, 0)`` (R the rotation reference ->
image), trilinear weights, a sample with qx < 0 goes, conjugated, to -q, nothing beyond
|q| = P/2 - 1. With M = N (scale pad) and no density compensation, insertion is the exact
adjoint of the projector's slice sampling. The grids are kept Hermitian-complete on top: a
contribution to the plane qx = 0 also goes, conjugated, to (0, -y, -z), and the image column
kx = 0 (which holds both k and -k) counts 1/2, as if full spectra went into a full grid.

Exactness: slices of N-box spectra sample the padded grid only every ``pad`` voxels in their
plane, which leaves holes between the rings of low frequencies that trilinear weights cannot
bridge (FSC 0.93 at 0.9 × Nyquist for 2000 noise-free views of a 32³ map). The exact path zero-pads
the images to P before their FFT (:func:`centred_rfft2` with ``size=P``: the slice's own sinc
interpolation), so the samples are one voxel apart (M = P, scale 1; FSC ≥ 0.995 there), at 4×
the insertion cost for pad 2. ``density_compensation`` weights each sample by ``max(|q|, 1)``
(the 1/|q| density of central slices, the radial part of RELION's iterative gridding).

Images are CTF-premultiplied (RELION: data = Σ CTF·F, weight = Σ CTF², the CTF on the inserted
image's frequency grid); a weight of 1 means no CTF. Reconstruction (RELION's
BackProjector::reconstruct): ``F = data / (weight + regularisation(shell))``, inverse FFT on the
padded grid, the centre N//2 kept, then divided by ``sinc²(x/P)`` per axis (the real-space
response of trilinear insertion, "gridding correction"). Images are line sums (Σ_z V over
voxels): a projection from :class:`FourierSliceProjector` (V·Å) divided by the voxel size gives
back V. On the CPU compiled (numba) kernels insert and symmetrise; torch (``index_add_``, gathers)
elsewhere (GPU). Reconstruction runs in float32 (the FFT of the padded grid dominates its cost).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tomopipe.algorithms._numba import HAVE_NUMBA as _HAVE_NUMBA
from tomopipe.algorithms._numba import numba
from tomopipe.algorithms.fourier_slice import gridding_kernel, sample_half_spectrum
from tomopipe.algorithms.symmetry import symmetry_group

__all__ = ["FourierAccumulator", "PseudoSubtomogram", "centred_rfft2", "pseudo_subtomogram", "ssnr_from_fsc"]


if _HAVE_NUMBA:

    @numba.njit(fastmath=True, cache=True)
    def _add(grid, z, y, x, c, re, im, w):  # pragma: no cover - compiled
        """Add c·(re, im, w, 1) to voxel (z, y, x) of the packed grid."""
        grid[z, y, x, 0] += c * re
        grid[z, y, x, 1] += c * im
        grid[z, y, x, 2] += c * w
        grid[z, y, x, 3] += c

    @numba.njit(fastmath=True, cache=True)
    def _add_pair(grid, z, y, x, c, wx, re, im, w):  # pragma: no cover - compiled
        """Add c·(1 - wx) and c·wx times (re, im, w, 1) to voxels x and x + 1 of row (z, y)."""
        _add(grid, z, y, x, c * (1.0 - wx), re, im, w)
        _add(grid, z, y, x + 1, c * wx, re, im, w)

    @numba.njit(fastmath=True, cache=True)
    def _wrap(i, p):  # pragma: no cover - compiled
        """Index i in [-p, 2p) wrapped to [0, p) (cheaper than Python's modulo)."""
        return i + p if i < 0 else (i - p if i >= p else i)

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _insert_numba(slices, ctf_w, rot, scale, compensate, grid, slabs):  # pragma: no cover - compiled
        """Trilinear insertion into the Hermitian-complete packed grid [P, P, P//2+1, (re, im, weight, mult)].

        ``slices`` ``[k, M, M//2+1, (re, im)]``. Each of ``slabs`` threads owns a slab of z planes and writes
        only there (every thread walks all samples): no private grids, and the sums come out in the same
        order as with one thread.
        """
        count, n, nkx = ctf_w.shape
        p = grid.shape[0]
        rad2 = (p // 2 - 1.0) ** 2
        for t in numba.prange(slabs):
            lo, hi = t * p // slabs, (t + 1) * p // slabs
            for b in range(count):
                ux, uy, uz = rot[b, 0, 0] * scale, rot[b, 0, 1] * scale, rot[b, 0, 2] * scale
                vx, vy, vz = rot[b, 1, 0] * scale, rot[b, 1, 1] * scale, rot[b, 1, 2] * scale
                for iy in range(n):
                    ky = iy if iy < n // 2 else iy - n
                    for ix in range(nkx):
                        r2 = (ix * ix + ky * ky) * scale * scale  # |q|² from the image frequency: exact
                        if r2 > rad2:
                            continue
                        qx = ix * ux + ky * vx
                        qz = ix * uz + ky * vz
                        sign = 1.0
                        if qx < 0:
                            qx, qz, sign = -qx, -qz, -1.0
                        fz = math.floor(qz)
                        z0 = _wrap(int(fz), p)
                        z1 = _wrap(z0 + 1, p)
                        x0 = int(qx)
                        own0, own1 = lo <= z0 < hi, lo <= z1 < hi
                        # the plane qx = 0 also receives the conjugate at (0, -y, -z)
                        m0, m1 = _wrap(p - z0, p), _wrap(p - z1, p)
                        mirror0 = x0 == 0 and lo <= m0 < hi
                        mirror1 = x0 == 0 and lo <= m1 < hi
                        if not (own0 or own1 or mirror0 or mirror1):
                            continue
                        qy = sign * (ix * uy + ky * vy)
                        half = 0.5 if ix == 0 else 1.0
                        ramp = max(math.sqrt(r2), 1.0) if compensate else 1.0
                        re = slices[b, iy, ix, 0] * ramp
                        im = sign * slices[b, iy, ix, 1] * ramp
                        w = ctf_w[b, iy, ix] * ramp
                        fy = math.floor(qy)
                        wx, wy, wz = qx - x0, qy - fy, qz - fz
                        y0 = _wrap(int(fy), p)
                        y1 = _wrap(y0 + 1, p)
                        c0, c1 = (1.0 - wz) * half, wz * half
                        if own0:
                            _add_pair(grid, z0, y0, x0, c0 * (1.0 - wy), wx, re, im, w)
                            _add_pair(grid, z0, y1, x0, c0 * wy, wx, re, im, w)
                        if mirror0:
                            _add(grid, m0, _wrap(p - y0, p), 0, c0 * (1.0 - wy) * (1.0 - wx), re, -im, w)
                            _add(grid, m0, _wrap(p - y1, p), 0, c0 * wy * (1.0 - wx), re, -im, w)
                        if own1:
                            _add_pair(grid, z1, y0, x0, c1 * (1.0 - wy), wx, re, im, w)
                            _add_pair(grid, z1, y1, x0, c1 * wy, wx, re, im, w)
                        if mirror1:
                            _add(grid, m1, _wrap(p - y0, p), 0, c1 * (1.0 - wy) * (1.0 - wx), re, -im, w)
                            _add(grid, m1, _wrap(p - y1, p), 0, c1 * wy * (1.0 - wx), re, -im, w)

    @numba.njit(fastmath=True, cache=True)
    def _gather_pair(grid, z, y, x, c, wx):  # pragma: no cover - compiled
        """c·((1 - wx)·G(z, y, x) + wx·G(z, y, x + 1)) for the 4 channels of the packed grid."""
        c0, c1 = c * (1.0 - wx), c * wx
        return (c0 * grid[z, y, x, 0] + c1 * grid[z, y, x + 1, 0], c0 * grid[z, y, x, 1] + c1 * grid[z, y, x + 1, 1],
                c0 * grid[z, y, x, 2] + c1 * grid[z, y, x + 1, 2], c0 * grid[z, y, x, 3] + c1 * grid[z, y, x + 1, 3])

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _symmetrise_numba(grid, ops, out):  # pragma: no cover - compiled
        """``out(q) = Σ_g grid(g·q)`` on the packed grid, trilinear, one z plane per iteration (as
        :meth:`FourierAccumulator._symmetrise_torch`); voxels past the insertion sphere stay zero."""
        p, h = grid.shape[0], grid.shape[2]
        rad2 = (p // 2 - 1.0) ** 2
        for z in numba.prange(p):
            kz = z if z < p // 2 else z - p
            for y in range(p):
                ky = y if y < p // 2 else y - p
                for x in range(h):
                    if x * x + ky * ky + kz * kz > rad2:
                        continue
                    re = im = w = m = 0.0
                    for g in range(ops.shape[0]):
                        qx = ops[g, 0, 0] * x + ops[g, 0, 1] * ky + ops[g, 0, 2] * kz
                        qy = ops[g, 1, 0] * x + ops[g, 1, 1] * ky + ops[g, 1, 2] * kz
                        qz = ops[g, 2, 0] * x + ops[g, 2, 1] * ky + ops[g, 2, 2] * kz
                        sign = 1.0
                        if qx < 0:  # the Hermitian mate: conjugate at -q
                            qx, qy, qz, sign = -qx, -qy, -qz, -1.0
                        x0 = int(qx)  # |g·q| = |q| <= P/2 - 1: x0 + 1 <= P/2, no test (rounding would drop edge voxels)
                        fy, fz = math.floor(qy), math.floor(qz)
                        wx, wy, wz = qx - x0, qy - fy, qz - fz
                        y0, z0 = _wrap(int(fy), p), _wrap(int(fz), p)
                        y1, z1 = _wrap(y0 + 1, p), _wrap(z0 + 1, p)
                        a0, a1 = 1.0 - wz, wz
                        g_re, g_im, g_w, g_m = _gather_pair(grid, z0, y0, x0, a0 * (1.0 - wy), wx)
                        for zi, yi, c in ((z0, y1, a0 * wy), (z1, y0, a1 * (1.0 - wy)), (z1, y1, a1 * wy)):
                            d_re, d_im, d_w, d_m = _gather_pair(grid, zi, yi, x0, c, wx)
                            g_re, g_im, g_w, g_m = g_re + d_re, g_im + d_im, g_w + d_w, g_m + d_m
                        re += g_re
                        im += sign * g_im
                        w += g_w
                        m += g_m
                    out[z, y, x, 0] = re
                    out[z, y, x, 1] = im
                    out[z, y, x, 2] = w
                    out[z, y, x, 3] = m


def centred_rfft2(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``rfft2`` ``[..., size, size//2+1]`` of images ``[..., N, N]`` zero-padded to ``size`` (default N)
    around their centre pixel N//2, which is moved to the origin (computed in float32)."""
    n = images.shape[-1]
    size = n if size is None else int(size)
    if images.ndim < 2 or images.shape[-2] != n or size < n:
        raise ValueError(f"centred_rfft2: need square images no larger than {size}, got {tuple(images.shape)}")
    h = n // 2
    images = images.float()
    padded = images.new_zeros((*images.shape[:-2], size, size))  # pixel j goes to (j - N//2) mod size
    padded[..., :n - h, :n - h] = images[..., h:, h:]
    padded[..., :n - h, size - h:] = images[..., h:, :h]
    padded[..., size - h:, :n - h] = images[..., :h, h:]
    padded[..., size - h:, size - h:] = images[..., :h, :h]
    return torch.fft.rfft2(padded)


def projected_shifts_px(tilt_rotations: torch.Tensor, magnification: torch.Tensor | float, shifts_A: torch.Tensor,
                        pixel_size_A: float) -> torch.Tensor:
    """``[m, n, 2]`` image shifts (px) in the n tilts of 3-D shifts ``[m, 3]`` (Å, tomogram frame):
    ``m_i·[R_i·t]_xy / pixel`` (``tilt_rotations`` ``[n, 3, 3]`` tomogram -> tilt image)."""
    r = tilt_rotations.to(torch.float64)
    s = torch.einsum("iab,mb->mia", r[:, :2], shifts_A.to(r.device, torch.float64))
    mag = torch.as_tensor(magnification, dtype=torch.float64, device=r.device).reshape(-1).expand(r.shape[0])
    return s * (mag[:, None] / pixel_size_A)


def shift_phases(shifts_px: torch.Tensor, size: int) -> torch.Tensor:
    """``e^{+2πi (kx·sx + ky·sy)/size}`` ``[..., size, size//2+1]`` (complex64) for shifts ``[..., 2]`` (x, y
    pixels): times the ``rfft2`` of an image, it moves what lies at ``(sx, sy)`` from the centre to the centre."""
    shifts = shifts_px.to(torch.float64)
    ky = torch.fft.fftfreq(size, d=1.0 / size, device=shifts.device, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(size, d=1.0 / size, device=shifts.device, dtype=torch.float64)[None, :]
    angle = (2.0 * math.pi / size) * (shifts[..., 0, None, None] * kx + shifts[..., 1, None, None] * ky)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def ssnr_from_fsc(fsc_curve: torch.Tensor, min_fsc: float = 1e-3) -> torch.Tensor:
    """SSNR of each half map, ``FSC / (1 - FSC)`` per shell (RELION: the FSC clipped to [min_fsc, 0.999])."""
    f = torch.as_tensor(fsc_curve, dtype=torch.float64).clamp(min_fsc, 0.999)
    return f / (1.0 - f)


@functools.lru_cache(maxsize=1)
def _shell_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Shell ``round(|q| / pad)`` (at most N//2 + 1) of each voxel of the padded half spectrum, flattened
    (cached: every reconstruction of a run uses the same grid)."""
    p = n * pad
    ky = torch.fft.fftfreq(p, d=1.0 / p, device=device, dtype=torch.float64)
    kx = torch.arange(p // 2 + 1, device=device, dtype=torch.float64)
    radius = torch.sqrt(ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx ** 2)
    return torch.round(radius / pad).long().clamp(max=n // 2 + 1).reshape(-1)


class FourierAccumulator:
    """Data (Σ CTF·F, complex), weight (Σ CTF²) and multiplicity (Σ interpolation weights) of a
    box of ``box_px`` (even) on a ``pad_factor``-times padded half spectrum (module docstring).

    ``use_compiled``: None = the numba kernel on the CPU when installed; False = torch only.
    """

    def __init__(self, box_px: int, pad_factor: int = 2, density_compensation: bool = True, device=None,
                 use_compiled: bool | None = None):
        if box_px < 4 or box_px % 2:
            raise ValueError(f"FourierAccumulator: box_px must be even and >= 4, got {box_px}")
        if pad_factor < 1:
            raise ValueError(f"FourierAccumulator: pad_factor must be >= 1, got {pad_factor}")
        self.n, self.pad = int(box_px), int(pad_factor)
        self.p = p = self.n * self.pad
        self.density_compensation = bool(density_compensation)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        on_cpu = self.device.type == "cpu"
        self.use_compiled = (on_cpu and _HAVE_NUMBA) if use_compiled is None else bool(use_compiled)
        if self.use_compiled and not (on_cpu and _HAVE_NUMBA):
            raise ValueError("FourierAccumulator: the compiled kernel needs numba and the CPU")
        # one packed grid (re, im, weight, multiplicity per voxel): one cache line per inserted voxel
        self._grid = torch.zeros((p, p, p // 2 + 1, 4), dtype=torch.float32, device=self.device)

    @property
    def data(self) -> torch.Tensor:
        """Σ CTF·F ``[P, P, P//2+1]`` complex64 (a view)."""
        return torch.view_as_complex(self._grid[..., :2])

    @property
    def weight(self) -> torch.Tensor:
        """Σ CTF² ``[P, P, P//2+1]`` float32 (a view; times max(|q|, 1) with density compensation)."""
        return self._grid[..., 2]

    @property
    def multiplicity(self) -> torch.Tensor:
        """Σ interpolation weights (slices per voxel) ``[P, P, P//2+1]`` float32 (a view)."""
        return self._grid[..., 3]

    def insert(self, slices_ft: torch.Tensor, rotations: torch.Tensor, ctf_weights: torch.Tensor | None = None,
               batch: int = 256) -> None:
        """Add slices ``[k, M, M//2+1]`` (complex; :func:`centred_rfft2` of CTF-premultiplied images,
        M = N, or M = P for the exact path) at rotations ``[k, 3, 3]`` (reference -> image, as the
        projector), with weights ``ctf_weights`` of the same shape (CTF², or None for 1)."""
        m = slices_ft.shape[-1] * 2 - 2 if slices_ft.ndim == 3 else 0
        if m < 2 or tuple(slices_ft.shape[1:]) != (m, m // 2 + 1) or self.p % m:
            raise ValueError(f"insert: slices must be [k, M, M//2+1] with M = {self.n} or a divisor of {self.p}, "
                             f"got {tuple(slices_ft.shape)}")
        count = slices_ft.shape[0]
        if tuple(rotations.shape) != (count, 3, 3):
            raise ValueError(f"insert: {count} slices need rotations [{count}, 3, 3], got {tuple(rotations.shape)}")
        if ctf_weights is not None and ctf_weights.shape != slices_ft.shape:
            raise ValueError(f"insert: ctf_weights {tuple(ctf_weights.shape)} differ from slices "
                             f"{tuple(slices_ft.shape)}")
        scale = float(self.p // m)
        for start in range(0, count, batch):
            sl = slice(start, min(start + batch, count))
            s = slices_ft[sl].to(self.device, torch.complex64)
            w = (torch.ones(s.shape, dtype=torch.float32, device=self.device) if ctf_weights is None
                 else ctf_weights[sl].to(self.device, torch.float32))
            r = rotations[sl].to(self.device, torch.float32)
            if self.use_compiled:
                _insert_numba(torch.view_as_real(s.contiguous()).numpy(), w.contiguous().numpy(),
                              r.contiguous().numpy(), scale, self.density_compensation, self._grid.numpy(),
                              min(numba.get_num_threads(), self.p))
            else:
                self._insert_torch(s, w, r, scale)

    def _insert_torch(self, s: torch.Tensor, w: torch.Tensor, r: torch.Tensor, scale: float) -> None:
        """The torch version of the compiled kernel (same arithmetic, scattered with ``index_add_``)."""
        m, p, h = s.shape[-2], self.p, self.p // 2 + 1
        ky = torch.fft.fftfreq(m, d=1.0 / m, device=self.device).float()[:, None].expand(m, m // 2 + 1)
        kx = torch.fft.rfftfreq(m, d=1.0 / m, device=self.device).float()[None, :].expand(m, m // 2 + 1)
        q = scale * (kx[None, ..., None] * r[:, None, None, 0, :] + ky[None, ..., None] * r[:, None, None, 1, :])
        half = torch.where(kx == 0, 0.5, 1.0).expand_as(s)
        radius = (scale * torch.sqrt(kx * kx + ky * ky)).expand_as(s)  # |q| from the image frequency
        keep = (kx * kx + ky * ky) * scale * scale <= (p // 2 - 1.0) ** 2
        keep = keep.expand_as(s)
        q, s, w, half, radius = q[keep], s[keep], w[keep], half[keep], radius[keep]
        ramp = radius.clamp(min=1.0) if self.density_compensation else torch.ones_like(radius)
        s, w = s * ramp, w * ramp
        flip = q[:, 0] < 0
        q = torch.where(flip[:, None], -q, q)
        s = torch.where(flip, s.conj(), s)
        base = torch.floor(q)
        frac = q - base
        x0 = base[:, 0].long()
        y0, z0 = torch.remainder(base[:, 1].long(), p), torch.remainder(base[:, 2].long(), p)
        for zi, cz in ((z0, 1 - frac[:, 2]), ((z0 + 1) % p, frac[:, 2])):
            for yi, cy in ((y0, 1 - frac[:, 1]), ((y0 + 1) % p, frac[:, 1])):
                for xi, cx in ((x0, 1 - frac[:, 0]), (x0 + 1, frac[:, 0])):
                    c = cz * cy * cx * half
                    self._scatter((zi * p + yi) * h + xi, s, w, c)
                    on = xi == 0  # the plane qx = 0 also receives the conjugate at (0, -y, -z)
                    self._scatter((((p - zi[on]) % p) * p + (p - yi[on]) % p) * h, s[on].conj(), w[on], c[on])

    def _scatter(self, index: torch.Tensor, values: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> None:
        """Add ``c·values``, ``c·w`` (both already times the density ramp) and ``c`` at voxel indices."""
        flat = self._grid.view(-1)
        for channel, value in enumerate((values.real, values.imag, w, torch.ones_like(w))):
            flat.index_add_(0, 4 * index + channel, value * c)

    def add(self, other: FourierAccumulator) -> None:
        """Add another accumulator of the same box, padding and density compensation (e.g. one filled in parallel)."""
        mine, theirs = (self.n, self.pad, self.density_compensation), (other.n, other.pad, other.density_compensation)
        if mine != theirs:
            raise ValueError(f"add: (box, pad, density compensation) {theirs} differ from {mine}")
        self._grid += other._grid.to(self.device)

    def symmetrise(self, group: torch.Tensor | str, chunk: int = 1 << 18) -> None:
        """Replace each grid G(q) by ``Σ_g G(g·q)`` over the point group (``[m, 3, 3]`` or a symbol, RELION's
        settings, see :mod:`~tomopipe.algorithms.symmetry`), trilinear on the padded grid (as RELION's
        BackProjector::symmetrise): a reference with ``V(g·x) = V(x)`` has ``F(g·k) = F(k)``. Voxels past
        the insertion sphere (|q| > P/2 - 1, partly filled by its edge samples) become zero."""
        g = (symmetry_group(group) if isinstance(group, str) else torch.as_tensor(group)).to(self.device,
                                                                                          torch.float32)
        if self.use_compiled:
            out = torch.zeros_like(self._grid)
            _symmetrise_numba(self._grid.numpy(), g.double().numpy(), out.numpy())
            self._grid = out
        else:
            self._symmetrise_torch(g, chunk)

    def _symmetrise_torch(self, g: torch.Tensor, chunk: int) -> None:
        """The torch version of the compiled symmetrisation (group ``g`` ``[m, 3, 3]`` float32)."""
        p = self.p
        ky = torch.fft.fftfreq(p, d=1.0 / p, device=self.device).float()
        kx = torch.arange(p // 2 + 1, device=self.device, dtype=torch.float32)
        shape = self.weight.shape
        grid = torch.stack([kx[None, None, :].expand(shape), ky[None, :, None].expand(shape),
                            ky[:, None, None].expand(shape)], dim=-1).reshape(-1, 3)  # (x, y, z) per voxel
        inside = torch.nonzero((grid * grid).sum(-1) <= (p // 2 - 1.0) ** 2).squeeze(1)
        grids = (self.data.reshape(-1), self.weight.reshape(-1), self.multiplicity.reshape(-1))  # contiguous copies
        out = torch.zeros_like(self._grid).view(-1, 4)
        for start in range(0, inside.numel(), chunk):
            index = inside[start:start + chunk]
            rotated = [grid[index] @ gi.T for gi in g]
            data, weight, multiplicity = (sum(sample_half_spectrum(flat, p, q) for q in rotated) for flat in grids)
            out[index] = torch.stack([data.real, data.imag, weight, multiplicity], dim=-1)
        self._grid = out.view(self._grid.shape)

    def reconstruct(self, ssnr: torch.Tensor | None = None, wiener_constant: float = 0.0) -> torch.Tensor:
        """The volume ``[N, N, N]`` float32, centre at voxel N//2 (module docstring).

        Regularisation added to the weight: ``wiener_constant`` plus, with ``ssnr`` (per shell
        i = 0 .. N//2 of the N box, e.g. :func:`ssnr_from_fsc`), RELION's ``1/τ²``: the shell's
        mean weight divided by its SSNR. Voxels with no weight stay zero.
        """
        n, p = self.n, self.p
        denominator = self.weight + float(wiener_constant)
        if ssnr is not None:
            denominator += self._shell_regularisation(torch.as_tensor(ssnr, dtype=torch.float64))
        denominator.masked_fill_(denominator <= 0, math.inf)  # no weight: the voxel stays zero
        padded = torch.fft.irfftn(self.data / denominator, s=(p, p, p))
        # the centre N//2 of the fftshifted grid: indices i - N//2 (mod P) of the unshifted one
        index = torch.remainder(torch.arange(n, device=self.device) - n // 2, p)
        volume = padded.index_select(0, index).index_select(1, index).index_select(2, index)
        kernel = gridding_kernel(n, p, self.device)
        return volume / (kernel[:, None, None] * kernel[None, :, None] * kernel)

    def _shell_regularisation(self, ssnr: torch.Tensor) -> torch.Tensor:
        """``mean weight(shell) / SSNR(shell)`` on the padded grid (float32); shell = round(|q| / pad)."""
        n = self.n
        if ssnr.shape != (n // 2 + 1,):
            raise ValueError(f"reconstruct: ssnr needs {n // 2 + 1} shells, got {tuple(ssnr.shape)}")
        shell = _shell_index(n, self.pad, self.device)
        w = self.weight.reshape(-1).double()
        count = torch.bincount(shell, weights=(w > 0).double(), minlength=n // 2 + 2)[: n // 2 + 1]
        total = torch.bincount(shell, weights=w, minlength=n // 2 + 2)[: n // 2 + 1]
        mean = total / count.clamp(min=1)
        per_shell = torch.cat([mean / ssnr.to(self.device).clamp(min=1e-12), torch.zeros(1, dtype=torch.float64,
                                                                                          device=self.device)])
        return per_shell.float()[shell].reshape(self.weight.shape)


@dataclass(frozen=True)
class PseudoSubtomogram:
    """RELION 5's pseudo-subtomogram of one particle (``relion_tomo_subtomo``), box N.

    ``data`` ``[N, N, N]``: the data term Σ CTF·F inserted, in real space (centre N//2, no
    gridding correction, not divided by the weights: "abstract 3D image terms", as RELION's
    documentation calls them); ``weights`` and ``multiplicity`` ``[N, N, N//2+1]``: Σ CTF² and the
    number of slices per Fourier voxel (Σ interpolation weights), half spectra with the DC at
    index 0. RELION's ``*_weights.mrc`` holds the weights with the multiplicity concatenated along
    z; the spectrum layout of that file is the writer's concern.
    """

    data: torch.Tensor
    weights: torch.Tensor
    multiplicity: torch.Tensor


def pseudo_subtomogram(slices_ft: torch.Tensor, ctf_weights: torch.Tensor, rotations: torch.Tensor,
                       device=None) -> PseudoSubtomogram:
    """:class:`PseudoSubtomogram` of one particle's tilt images: ``slices_ft`` ``[k, N, N//2+1]``
    (:func:`centred_rfft2` of the CTF-premultiplied crops), ``ctf_weights`` (CTF²) and the
    rotations ``[k, 3, 3]`` (particle pose then tilt projection), inserted without padding or
    density compensation."""
    n = slices_ft.shape[-2]
    acc = FourierAccumulator(n, pad_factor=1, density_compensation=False,
                             device=device if device is not None else slices_ft.device)
    acc.insert(slices_ft, rotations, ctf_weights)
    data = torch.fft.fftshift(torch.fft.irfftn(acc.data, s=(n, n, n)))
    return PseudoSubtomogram(data=data.float(), weights=acc.weight.contiguous(),
                             multiplicity=acc.multiplicity.contiguous())
