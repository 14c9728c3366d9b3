"""Projections of a reference volume at arbitrary orientations (central-slice theorem).

The 2-D Fourier transform of a projection along z of a volume rotated by ``M`` (the volume
``f(M⁻¹·x)``) is the central slice ``F(Mᵀ·k)``, k = (kx, ky, 0). The reference is zero-padded
``pad_factor`` times, pre-divided by the trilinear interpolation kernel's real-space response
(``sinc²`` per axis, "gridding correction") and Fourier-transformed once; each projection then
samples its slice by trilinear interpolation at the frequencies of the ``N × N`` output box
(Hermitian symmetry for kx < 0), applies a sub-pixel shift as a phase ramp and is transformed
back. Frequencies beyond the sphere of radius Nyquist are zero.

Output values are the projected potential ``Σ_z V·Δz`` in V·Å (volume in V times the voxel
size along the projection), and the volume's centre (voxel ``N//2``) lands on pixel ``N//2`` of
the output (plus the requested shift).
"""

from __future__ import annotations

import math

import torch

__all__ = ["FourierSliceProjector"]


def _sinc(x: torch.Tensor) -> torch.Tensor:
    px = math.pi * x
    return torch.where(x == 0, torch.ones_like(x), torch.sin(px) / torch.where(x == 0, torch.ones_like(px), px))


class FourierSliceProjector:
    """Projector of one cubic reference volume ``[N, N, N]`` (z, y, x), N even.

    ``project(rotations, shifts_px, magnification)`` returns ``[n, N, N]`` images.
    """

    def __init__(self, volume: torch.Tensor, pixel_size_A: float, pad_factor: int = 2):
        if volume.ndim != 3 or len(set(volume.shape)) != 1 or volume.shape[0] % 2:
            raise ValueError(f"FourierSliceProjector needs a cubic volume of even size, got {tuple(volume.shape)}")
        if pad_factor < 1:
            raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
        if pixel_size_A <= 0:
            raise ValueError(f"pixel_size_A must be > 0, got {pixel_size_A}")
        self.device = volume.device
        self.n = n = int(volume.shape[0])
        self.pad = int(pad_factor)
        self.p = p = n * self.pad
        self.pixel_size_A = float(pixel_size_A)
        d = torch.arange(n, dtype=torch.float64, device=self.device) - n // 2
        kernel = _sinc(d / p) ** 2
        correction = kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :]
        padded = torch.zeros((p, p, p), dtype=torch.float32, device=self.device)
        s = p // 2 - n // 2
        padded[s : s + n, s : s + n, s : s + n] = (volume.double() / correction).float()
        spectrum = torch.fft.rfftn(torch.fft.ifftshift(padded))
        del padded
        spectrum = torch.fft.fftshift(spectrum, dim=(0, 1))  # DC at (p//2, p//2, 0)
        self._flat = spectrum.reshape(-1).contiguous()
        self._dims = (p, p, p // 2 + 1)
        ky = torch.fft.fftfreq(n, d=1.0 / n, device=self.device)  # N-box index units
        kx = torch.fft.rfftfreq(n, d=1.0 / n, device=self.device)
        self._ky = ky[:, None].expand(n, n // 2 + 1).reshape(-1).float()
        self._kx = kx[None, :].expand(n, n // 2 + 1).reshape(-1).float()

    def _sample(self, q: torch.Tensor) -> torch.Tensor:
        """Trilinear interpolation of the half spectrum at padded-index frequencies q [..., 3] (x, y, z)."""
        flip = q[..., 0] < 0
        q = torch.where(flip[..., None], -q, q)
        half = self.p // 2
        radius = half - 1.0
        inside = (q * q).sum(-1) <= radius * radius
        q = torch.where(inside[..., None], q, torch.zeros_like(q))
        fx, fy, fz = q[..., 0], q[..., 1] + half, q[..., 2] + half
        x0, y0, z0 = torch.floor(fx), torch.floor(fy), torch.floor(fz)
        wx, wy, wz = fx - x0, fy - y0, fz - z0
        x0, y0, z0 = x0.long(), y0.long(), z0.long()
        nz, ny, nx = self._dims
        base = (z0 * ny + y0) * nx + x0
        out = torch.zeros(q.shape[:-1], dtype=self._flat.dtype, device=q.device)
        for dz, wz_ in ((0, 1 - wz), (1, wz)):
            for dy, wy_ in ((0, 1 - wy), (1, wy)):
                wzy = wz_ * wy_
                off = (dz * ny + dy) * nx
                out += self._flat[base + off] * (wzy * (1 - wx)) + self._flat[base + off + 1] * (wzy * wx)
        out = torch.where(flip, out.conj(), out)
        return torch.where(inside, out, torch.zeros_like(out))

    def project(
        self,
        rotations: torch.Tensor,
        shifts_px: torch.Tensor | None = None,
        magnification: torch.Tensor | float = 1.0,
        batch: int = 16,
    ) -> torch.Tensor:
        """Projections ``[n, N, N]`` (V·Å) of the volume rotated by ``rotations`` [n, 3, 3].

        The rotation maps reference coordinates to image coordinates (x, y, z), z along the
        beam. ``shifts_px`` [n, 2] (x, y) moves each projection's content by that many pixels
        (any real value; meant for the sub-pixel part). ``magnification`` (scalar or [n]) scales
        the content about the box centre (image = projection(x / m)).
        """
        rot = rotations.to(device=self.device, dtype=torch.float32).reshape(-1, 3, 3)
        count = rot.shape[0]
        shifts = (
            torch.zeros((count, 2), device=self.device)
            if shifts_px is None
            else shifts_px.to(device=self.device, dtype=torch.float32).reshape(-1, 2)
        )
        mag = torch.as_tensor(magnification, dtype=torch.float32, device=self.device).reshape(-1).expand(count)
        n = self.n
        out = torch.empty((count, n, n), dtype=torch.float32, device=self.device)
        for start in range(0, count, batch):
            sl = slice(start, min(start + batch, count))
            r, m = rot[sl], mag[sl]
            scale = (self.pad * m)[:, None]
            kx, ky = self._kx[None] * scale, self._ky[None] * scale  # padded index units
            q = kx[..., None] * r[:, None, 0, :] + ky[..., None] * r[:, None, 1, :]  # Mᵀ·(kx, ky, 0)
            values = self._sample(q)
            phase = -2.0 * math.pi * (self._kx[None] * shifts[sl, 0:1] + self._ky[None] * shifts[sl, 1:2]) / n
            values = values * torch.polar((m * m)[:, None].expand_as(phase), phase)
            img = torch.fft.irfft2(values.reshape(-1, n, n // 2 + 1), s=(n, n))
            out[sl] = torch.fft.fftshift(img, dim=(-2, -1)) * self.pixel_size_A
        return out
