"""Tilt-image preparation before alignment (the role of IMOD newstack in the seed's
"imod - preprocess tilt series"): antialiased binning by any factor, and density scaling.

Binning. IMOD ``newstack -bin N`` (with an antialias filter) reduces an image by an integer factor
and drops the ``n mod N`` pixels that do not fill a bin. Here the factor may be any number >= 1:
the image is first cropped about its centre (tomopipe's centre ``n // 2`` stays the centre) to
``ceil(n_new · factor)`` pixels, ``n_new = floor(n / factor)``, and then Fourier-cropped to
``n_new`` pixels (:func:`tomopipe.algorithms.filters.fourier_crop_bin`: an ideal antialias filter;
the mean is preserved). The new pixel size is ``pixel_size · crop / n_new`` per axis: exactly
``pixel_size · factor`` for integer factors; for other factors it differs from it, and between x
and y, by less than ``1 / n_new`` (relative).

Density scaling (newstack ``-FloatDensities``; the seed's "Adjust densities mode"):

- ``"none"``: values kept;
- ``"scaled_mean_sd"`` (newstack -float 2, the seed's choice, with -meansd): every image scaled
  and shifted to the given mean and standard deviation;
- ``"shifted_mean"`` (newstack -float 3): every image shifted to the given mean, not scaled.

Images are ``[..., y, x]`` tensors; statistics are per image (over y, x), in float64.
"""

from __future__ import annotations

import math

import torch

from tomopipe.algorithms.filters import fourier_crop_bin, fourier_crop_shape

__all__ = ["DENSITY_MODES", "binned_geometry", "bin_image", "scale_densities"]

DENSITY_MODES = ("none", "scaled_mean_sd", "shifted_mean")


def binned_geometry(shape_yx, factor: float) -> dict:
    """Sizes for binning an image of ``shape_yx`` (ny, nx) by ``factor`` (>= 1).

    Returns ``new_shape`` (ny_new, nx_new), ``crop_shape`` (the centred crop that is Fourier-cropped),
    ``crop_start`` (its first row and column) and ``pixel_factor`` (y, x): new pixel size / old.
    """
    factor = float(factor)
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(f"binning factor must be a number >= 1, got {factor!r}")
    shape = tuple(int(n) for n in shape_yx)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape_yx must be (ny, nx) with positive sizes, got {shape_yx!r}")
    new = fourier_crop_shape(shape, factor)
    if factor == 1.0:
        crop = shape
    else:
        crop = tuple(min(n, math.ceil(m * factor - 1e-9)) for n, m in zip(shape, new))
    start = tuple(n // 2 - c // 2 for n, c in zip(shape, crop))
    return {"new_shape": new, "crop_shape": crop, "crop_start": start,
            "pixel_factor": tuple(c / m for c, m in zip(crop, new))}


def bin_image(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Bin ``image`` ``[..., y, x]`` by ``factor`` (>= 1, any number) as :func:`binned_geometry` says.

    float64 stays float64, anything else becomes float32. ``factor == 1`` returns a copy.
    """
    if image.ndim < 2:
        raise ValueError(f"bin_image: need an image [..., y, x], got shape {tuple(image.shape)}")
    geometry = binned_geometry(image.shape[-2:], factor)
    work = image.to(torch.float64 if image.dtype == torch.float64 else torch.float32)
    (y0, x0), (cy, cx) = geometry["crop_start"], geometry["crop_shape"]
    cropped = work[..., y0:y0 + cy, x0:x0 + cx]
    if geometry["new_shape"] == tuple(cropped.shape[-2:]):
        return cropped.clone()
    out = fourier_crop_bin(cropped.contiguous(), float(factor), ndim=2)
    if tuple(out.shape[-2:]) != geometry["new_shape"]:  # guards the crop arithmetic above
        raise RuntimeError(f"bin_image: got {tuple(out.shape[-2:])}, expected {geometry['new_shape']}")
    return out


def scale_densities(images: torch.Tensor, mode: str, mean: float = 0.0, sd: float = 1.0) -> torch.Tensor:
    """Scale every image of ``images`` ``[..., y, x]`` as ``mode`` says (see the module docstring).

    Raises ValueError for an unknown mode, ``sd <= 0``, or (``scaled_mean_sd``) an image of constant
    value, which cannot be given a standard deviation.
    """
    if mode not in DENSITY_MODES:
        raise ValueError(f"density mode must be one of {', '.join(DENSITY_MODES)}, got {mode!r}")
    if images.ndim < 2:
        raise ValueError(f"scale_densities: need images [..., y, x], got shape {tuple(images.shape)}")
    if mode == "none":
        return images.clone()
    out_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    work = images.to(torch.float64)
    image_mean = work.mean((-2, -1), keepdim=True)
    if mode == "shifted_mean":
        return (work - image_mean + float(mean)).to(out_dtype)
    if not sd > 0:
        raise ValueError(f"the standard deviation to scale to must be > 0, got {sd!r}")
    image_sd = work.std((-2, -1), keepdim=True, correction=0)
    flat = image_sd.reshape(-1)
    if bool((flat == 0).any()):
        index = int(torch.nonzero(flat == 0)[0])
        raise ValueError(f"image {index} has a constant value: it cannot be scaled to a standard deviation")
    return ((work - image_mean) * (float(sd) / image_sd) + float(mean)).to(out_dtype)
