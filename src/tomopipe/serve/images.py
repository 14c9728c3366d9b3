"""Arrays to what a browser shows: downsampled slices as 8-bit PNG, volumes as small 8-bit blocks.

Pure functions on numpy arrays (no files, no project). Conventions: images ``[y, x]``, volumes
``[z, y, x]``; row 0 of a PNG is ``y = 0`` of the image (the pages flip nothing). Downsampling is
a block mean by an integer factor (the last partial block is dropped), so that a pixel of the PNG
covers ``factor × factor`` pixels of the data and the page can map clicks back exactly:
``data_px = (png_px + 0.5) · factor − 0.5``.
"""

from __future__ import annotations

import math

import imagecodecs
import numpy as np

from tomopipe.errors import TomopipeError


def downsample_factor(shape: tuple[int, ...], max_side_px: int) -> int:
    """The smallest integer factor that brings every side of ``shape`` to ``max_side_px`` or less."""
    if max_side_px < 1:
        raise TomopipeError(f"max_side_px must be at least 1, got {max_side_px}")
    return max(1, math.ceil(max(shape) / max_side_px))


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``-sided blocks along every axis (float32); partial edge blocks are dropped."""
    array = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return array
    shape = [n // factor for n in array.shape]
    if min(shape) < 1:
        raise TomopipeError(f"cannot bin an array of shape {array.shape} by {factor}")
    cropped = array[tuple(slice(0, n * factor) for n in shape)]
    blocks = cropped.reshape([v for n in shape for v in (n, factor)])
    return blocks.mean(axis=tuple(range(1, 2 * len(shape), 2)), dtype=np.float32)


def contrast_limits(image: np.ndarray, low_percent: float = 0.5, high_percent: float = 99.5) -> tuple[float, float]:
    """Display limits at two percentiles of the finite values (a constant image gives ``v, v + 1``)."""
    if not 0.0 <= low_percent < high_percent <= 100.0:
        raise TomopipeError(f"contrast percentiles must satisfy 0 <= low < high <= 100, got "
                            f"{low_percent}, {high_percent}")
    values = np.asarray(image, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [low_percent, high_percent])
    return (float(low), float(high)) if high > low else (float(low), float(low) + 1.0)


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``[low, high]`` to ``[0, 255]``, clipped; NaN becomes 0."""
    scaled = (np.asarray(image, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0).round().astype(np.uint8)


def png_bytes(image_uint8: np.ndarray) -> bytes:
    """A greyscale PNG of an ``[y, x]`` uint8 image."""
    if image_uint8.dtype != np.uint8 or image_uint8.ndim != 2:
        raise TomopipeError(f"a PNG needs a 2-D uint8 image, got {image_uint8.dtype} {image_uint8.shape}")
    return imagecodecs.png_encode(np.ascontiguousarray(image_uint8), level=1)


def image_png(image: np.ndarray, max_side_px: int = 1024, low_percent: float = 0.5,
              high_percent: float = 99.5) -> tuple[bytes, int]:
    """An ``[y, x]`` image as a PNG no larger than ``max_side_px``, contrast from two percentiles;
    returns ``(png, factor)``."""
    factor = downsample_factor(image.shape, max_side_px)
    small = block_mean(image, factor)
    low, high = contrast_limits(small, low_percent, high_percent)
    return png_bytes(to_uint8(small, low, high)), factor


def volume_slice(volume: np.ndarray, axis: str, index: int, thickness_px: int = 1) -> np.ndarray:
    """Section ``index`` of a ``[z, y, x]`` volume across ``axis`` (``"z"``: an ``[y, x]`` image,
    ``"y"``: ``[z, x]``, ``"x"``: ``[z, y]``), averaged over ``thickness_px`` sections centred on it."""
    axes = {"z": 0, "y": 1, "x": 2}
    if axis not in axes:
        raise TomopipeError(f"axis must be one of z, y, x, got {axis!r}")
    n = volume.shape[axes[axis]]
    if not 0 <= index < n:
        raise TomopipeError(f"section {index} is outside 0..{n - 1} along {axis}")
    start = max(0, index - (thickness_px - 1) // 2)
    stop = min(n, start + max(1, thickness_px))
    taken = np.take(volume, np.arange(start, stop), axis=axes[axis])
    return np.asarray(taken, dtype=np.float32).mean(axis=axes[axis])


def volume_uint8(volume: np.ndarray, max_side_px: int = 64, low_percent: float = 1.0,
                 high_percent: float = 99.9) -> tuple[np.ndarray, int, tuple[float, float]]:
    """A ``[z, y, x]`` volume binned to at most ``max_side_px`` a side and scaled to uint8 (for a
    WebGL 3-D texture); returns ``(block, factor, (low, high))`` where ``low``/``high`` are the
    data values of 0 and 255."""
    factor = downsample_factor(volume.shape, max_side_px)
    small = block_mean(volume, factor)
    low, high = contrast_limits(small, low_percent, high_percent)
    return to_uint8(small, low, high), factor, (low, high)


def iso_level_uint8(block_uint8: np.ndarray, enclosed_fraction: float = 0.1) -> int:
    """A first iso-surface level for an 8-bit volume (:func:`volume_uint8`): the level above which its brightest
    ``enclosed_fraction`` of voxels lie, so that the surface wraps the particle rather than the solvent's noise or a
    sharpened map's ringing near the box's edge (a fixed level does that when the box is tight); in 1..254."""
    if not 0.0 < enclosed_fraction < 1.0:
        raise TomopipeError(f"enclosed_fraction must lie between 0 and 1, got {enclosed_fraction}")
    level = np.percentile(np.asarray(block_uint8, dtype=np.float32), 100.0 * (1.0 - enclosed_fraction))
    return int(np.clip(np.round(level), 1, 254))
