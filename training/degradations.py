"""Synthetic image degradations used to build QualiCLIP's training pairs.

QualiCLIP reuses the image degradation model of ARNIQA (Agnolucci et al., WACV 2024; code: miccunifi/ARNIQA,
`utils/distortions.py` and `utils/utils_data.py`): 24 distortion types in 7 groups, each with five intensity
parameters, whose definitions go back to KADID-10k / KADIS-700k. This module is an independent, batched PyTorch
implementation of them, in two styles (`DEGRADATION_STYLES`):

- `"arniqa"` (the default, `DEFAULT_STYLE`): what ARNIQA's code computes, quirks included, because that is the
  distribution QualiCLIP's released model was trained on. Examples: Lab conversions of the channel-swapped (BGR)
  image with kornia 0.7's constants and 8-bit truncation, PyTorch's legacy corner-aligned `nearest` in pixelate,
  fixed quantisation thresholds, the index-returning "percentile" of color_shift, jitter's swapped pad and crop,
  the in-place overlapping copy of non_eccentricity_patch. Each such function (`_arniqa_*`) documents its quirks.
- `"clean"`: the evident intent of each distortion without those quirks, documented on the public function of the
  same name (`pixelate`, `quantization`, ...). Nine distortions compute the same thing in both styles.

`tests/test_degradations.py` checks the `arniqa` style against statistics of ARNIQA's own functions
(`tests/data/arniqa_reference.json`), and `training/README.md` tabulates both styles per distortion.

Common to both styles:

- every distortion maps `[B, 3, H, W]` float RGB in [0, 1] to the same shape, dtype and device, clamped to [0, 1]
  (ARNIQA clips after every distortion too);
- work happens on the input's device (only the two codecs, JPEG and JPEG 2000, round-trip through Pillow on CPU);
- randomness comes only from an explicitly passed `torch.Generator`, never from the global RNG (ARNIQA draws from
  the global `random`, numpy and torch generators: the same distributions, other realisations).

Randomness is *level independent*: for a given batch shape a distortion draws the same random numbers whatever its
level, and scales / thresholds them by the level's parameter. Re-seeding the generator identically for every level
(what `apply_composition_all_levels` does) therefore yields the same motion-blur angle, the same noise field,
nested impulse-noise masks, nested patch sets, ... at increasing strength, which is exactly what QualiCLIP's
level-ranking objective needs. Draws are made on the generator's device and moved to the images' device: a CPU
generator gives device-independent results, a CUDA generator avoids a host-to-device copy.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "ALL_DISTORTIONS",
    "DEFAULT_STYLE",
    "DEGRADATION_STYLES",
    "DISTORTION_GROUPS",
    "Distortion",
    "apply_composition",
    "apply_composition_all_levels",
    "apply_distortion",
    "check_style",
    "get_distortion",
    "level_probabilities",
    "sample_composition",
]

NUM_LEVELS = 5

DistortionFn = Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]
"""`fn(images [B, 3, H, W] float, parameter, generator) -> images [B, 3, H, W]` (not yet clamped)."""


# --------------------------------------------------------------------------------------------------- random draws
def _rand(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws made on the generator's device, returned on `like`'s device and dtype."""
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(like.device, like.dtype)


def _randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws made on the generator's device, returned on `like`'s device and dtype."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(like.device, like.dtype)


# ---------------------------------------------------------------------------------------------- colour spaces
# sRGB (D65) -> CIE XYZ. The white point is taken as the matrix row sums so that RGB greys map to a = b = 0 exactly.
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_XYZ_WHITE = _RGB_TO_XYZ.sum(dim=1)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_LAB_DELTA = 6.0 / 29.0

# Full-range BT.601 YCbCr with chroma centred on 0.5 (the JPEG convention).
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)
_YCBCR_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)

_LUMA = (0.299, 0.587, 0.114)


def _mix_channels(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Per-pixel 3x3 colour matrix: `[B, 3, H, W] -> [B, 3, H, W]`."""
    return torch.einsum("ij,bjhw->bihw", matrix.to(x.device, x.dtype), x)


def _channel_vector(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(1, 3, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W] -> [B, 1, H, W]` BT.601 luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    # Clamp inside the power branch so the unused branch of `where` never produces NaN.
    return torch.where(x > 0.04045, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)


def _linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x > 0.0031308, 1.055 * x.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * x)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB `[B, 3, H, W]` in [0, 1] -> CIELAB `[B, 3, H, W]` with L in [0, 100] (D65)."""
    xyz = _mix_channels(_srgb_to_linear(x), _RGB_TO_XYZ) / _channel_vector(_XYZ_WHITE, x)
    cube = _LAB_DELTA**3
    f = torch.where(xyz > cube, xyz.clamp(min=cube) ** (1.0 / 3.0), xyz / (3 * _LAB_DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB `[B, 3, H, W]` -> sRGB `[B, 3, H, W]`; out-of-gamut colours are clipped to [0, 1]."""
    lightness, a, b = lab.unbind(dim=1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    xyz = torch.where(f > _LAB_DELTA, f**3, 3 * _LAB_DELTA**2 * (f - 4.0 / 29.0))
    return _linear_to_srgb(_mix_channels(xyz * _channel_vector(_XYZ_WHITE, lab), _XYZ_TO_RGB))


def rgb_to_hsv(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """RGB `[B, 3, H, W]` -> HSV `[B, 3, H, W]`, all channels in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(dim=1)
    value, argmax = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=eps), torch.zeros_like(value))
    safe = chroma.clamp(min=eps)
    hue = torch.where(
        argmax == 0,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) / 6.0
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV `[B, 3, H, W]` -> RGB `[B, 3, H, W]`.

    Written in the sector-free form `v - v * s * clamp(min(k, 4 - k), 0, 1)`, which stays meaningful for
    saturation outside [0, 1]: a negative saturation pushes colours towards the complementary hue (colorsat1's last
    level relies on this).
    """
    hue, saturation, value = (c.unsqueeze(1) for c in hsv.unbind(dim=1))
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue, 6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB `[B, 3, H, W]` -> full-range YCbCr `[B, 3, H, W]` (chroma centred on 0.5)."""
    return _mix_channels(x, _RGB_TO_YCBCR) + _channel_vector(_YCBCR_OFFSET, x)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_ycbcr` (no clipping)."""
    return _mix_channels(x - _channel_vector(_YCBCR_OFFSET, x), _YCBCR_TO_RGB)


# ----------------------------------------------------------------------------------------------------- filters
@lru_cache(maxsize=64)
def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps on `[-radius, radius]` (float64, CPU; cached)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(t**2) / (2.0 * sigma**2))
    return taps / taps.sum()


@lru_cache(maxsize=16)
def _disk_kernel(radius: float, supersample: int = 32) -> torch.Tensor:
    """Normalised 2-D "pillbox" kernel: each tap is the fraction of its pixel square covered by a disk of `radius`.

    Coverage is estimated on a `supersample x supersample` sub-grid per pixel, which matches the analytic
    anti-aliased disk of KADID's `fspecial('disk')` to well within a percent per tap. Float64, CPU; cached.
    """
    half = max(math.ceil(radius - 0.5), 0)
    sub = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    pos = (torch.arange(-half, half + 1, dtype=torch.float64)[:, None] + sub[None, :]).reshape(-1)
    inside = (pos[:, None] ** 2 + pos[None, :] ** 2) <= radius**2
    size = 2 * half + 1
    coverage = inside.view(size, supersample, size, supersample).to(torch.float64).mean(dim=(1, 3))
    return coverage / coverage.sum()


def _motion_kernels(length: float, angles: torch.Tensor) -> torch.Tensor:
    """One anti-aliased line kernel per angle: `angles [B] (radians) -> [B, K, K]`, each summing to one.

    The line is a centred segment of `length - 1` pixels (so `length == 1` is the identity, as in KADID's
    `fspecial('motion')`); a tap's weight falls off linearly with its distance to the segment, reaching zero at one
    pixel, which is the 1-pixel line width of the original filter.
    """
    half = (length - 1.0) / 2.0
    radius = math.ceil(half) + 1
    coords = torch.arange(-radius, radius + 1, device=angles.device, dtype=angles.dtype)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ux = torch.cos(angles).view(-1, 1, 1)
    uy = torch.sin(angles).view(-1, 1, 1)
    along = (xx * ux + yy * uy).clamp(-half, half)  # closest point of the segment, as a signed arc length
    distance = torch.hypot(xx - along * ux, yy - along * uy)
    weights = (1.0 - distance).clamp(min=0.0)
    return weights / weights.sum(dim=(-2, -1), keepdim=True)


def _pad_replicate(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate") if pad_h or pad_w else x


def _conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter every channel of `x [B, C, H, W]` with one odd-sized `kernel [kh, kw]`, replicate borders."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    padded = _pad_replicate(x.reshape(b * c, 1, h, w), kh // 2, kw // 2)
    weight = kernel.to(x.device, x.dtype).view(1, 1, kh, kw)
    return F.conv2d(padded, weight).view(b, c, h, w)


def _conv_same_per_image(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter image `i` of `x [B, C, H, W]` with `kernels[i]` (`[B, K, K]`, K odd), replicate borders."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    padded = _pad_replicate(x.reshape(1, b * c, h, w), k // 2, k // 2)
    weight = kernels.to(x.device, x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # [B*C, 1, K, K]
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w)


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of every channel of `x [B, C, H, W]`; support `2 * ceil(2 sigma) + 1` by default."""
    if radius is None:
        radius = math.ceil(2.0 * sigma)
    taps = _gaussian_taps(float(sigma), radius)
    return _conv_same(_conv_same(x, taps.view(1, -1)), taps.view(-1, 1))


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift image `i` of `x [B, C, H, W]` by integer `(dy[i], dx[i])` pixels, replicating the borders."""
    b, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - dy.view(-1, 1)).clamp(0, h - 1)  # [B, H]
    cols = (torch.arange(w, device=x.device) - dx.view(-1, 1)).clamp(0, w - 1)  # [B, W]
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def _per_image_quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles per row: `values [B, N], q [K] -> [B, K]`.

    Sort-based rather than `torch.quantile`, which refuses inputs above 16M elements.
    """
    ordered = values.sort(dim=1).values
    position = q.to(values.device, torch.float64) * (values.shape[1] - 1)
    lo = position.floor().long()
    hi = position.ceil().long()
    frac = (position - lo).to(values.dtype)
    return ordered[:, lo] * (1 - frac) + ordered[:, hi] * frac


def _minmax_per_image(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image of `x [B, ...]` to [0, 1]; constant images are left unchanged."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *[1] * (x.dim() - 1))
    hi = flat.max(dim=1).values.view(-1, *[1] * (x.dim() - 1))
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-12), x)


# ------------------------------------------------------------------------------------------------ tone curves
@lru_cache(maxsize=64)
def _tone_curve_pieces(knots_x: tuple[float, ...], knots_y: tuple[float, ...]) -> torch.Tensor:
    """Local cubic coefficients `[n - 1, 4]` (`t^3, t^2, t, 1` with `t = x - knots_x[i]`) of the curve.

    The interpolant is MATLAB's `spline` (what KADID's `curves` uses): the interpolating parabola for three knots
    and the not-a-knot cubic spline for four or more.
    """
    xs = torch.tensor(knots_x, dtype=torch.float64)
    ys = torch.tensor(knots_y, dtype=torch.float64)
    n = xs.numel()
    h = xs.diff()
    slopes = ys.diff() / h
    if n == 3:
        # Newton form y0 + s0 (x - x0) + c2 (x - x0)(x - x1); expanded around each piece's left knot.
        c2 = (slopes[1] - slopes[0]) / (xs[2] - xs[0])
        first_derivative = slopes[0] + c2 * (2 * xs[:2] - xs[0] - xs[1])
        return torch.stack([torch.zeros(2, dtype=torch.float64), c2.expand(2), first_derivative, ys[:2]], dim=1)
    if n < 3:
        raise ValueError("a tone curve needs at least three knots")
    # Unknowns: second derivatives M at the knots. Interior rows are the usual C2 continuity conditions; the first and
    # last rows ask the third derivative to be continuous across the second and second-to-last knots (not-a-knot).
    system = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, dtype=torch.float64)
    system[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])
    system[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])
    for i in range(1, n - 1):
        system[i, i - 1 : i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        rhs[i] = 6 * (slopes[i] - slopes[i - 1])
    m = torch.linalg.solve(system, rhs)
    cubic = (m[1:] - m[:-1]) / (6 * h)
    linear = slopes - h * (2 * m[:-1] + m[1:]) / 6
    return torch.stack([cubic, m[:-1] / 2, linear, ys[:-1]], dim=1)


def _tone_curve(x: torch.Tensor, knots_x: Sequence[float], knots_y: Sequence[float]) -> torch.Tensor:
    """Apply the spline tone curve through `(knots_x, knots_y)` to every value of `x`, clamped to [0, 1]."""
    pieces = _tone_curve_pieces(tuple(float(v) for v in knots_x), tuple(float(v) for v in knots_y))
    pieces = pieces.to(x.device, x.dtype)
    inner = torch.tensor(knots_x[1:-1], device=x.device, dtype=x.dtype)
    starts = torch.tensor(knots_x[:-1], device=x.device, dtype=x.dtype)
    x = x.contiguous()
    index = torch.bucketize(x, inner, right=True)  # values outside the knots extrapolate with the end pieces
    t = x - starts[index]
    coef = pieces[index]  # [..., 4]
    y = ((coef[..., 0] * t + coef[..., 1]) * t + coef[..., 2]) * t + coef[..., 3]
    return y.clamp(0.0, 1.0)


def _midtone_curve(x: torch.Tensor, midpoint: float) -> torch.Tensor:
    """KADID's single-knot `curves`: the parabola through (0, 0), (0.5, `midpoint`), (1, 1), clamped."""
    return _tone_curve(x, (0.0, 0.5, 1.0), (0.0, midpoint, 1.0))


# ========================================================================================= the 24 distortions
# Every function below: (images [B, 3, H, W] float in [0, 1], parameter, generator) -> [B, 3, H, W]; the caller
# (`apply_distortion`) handles dtype, clamping and parameter look-up.


# ------------------------------------------------------------------------------------------------------- blur
def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with standard deviation `sigma` px, support `2 * ceil(2 sigma) + 1`, replicate borders."""
    return _gaussian_blur(x, sigma)


def lens_blur(x: torch.Tensor, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Defocus blur: convolution with an anti-aliased disk ("pillbox") of `radius` px.

    `clean` estimates each tap's coverage by supersampling, close to MATLAB's analytic `fspecial('disk')`; ARNIQA's
    Python port of that formula zeroes one integration limit (see `_arniqa_disk_kernel`), which puts more weight on
    the disk's rim (up to 0.6 dB lower PSNR at radius 8).
    """
    return _conv_same(x, _disk_kernel(float(radius)))


def motion_blur(x: torch.Tensor, length: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Linear motion blur over `length` px at a uniformly random angle in [0, 180) degrees, one angle per image.

    `clean` draws a continuous angle and builds a symmetric anti-aliased segment; ARNIQA draws an integer angle in
    0 .. 180 and uses its port of MATLAB's `fspecial('motion')` (`_arniqa_motion_kernel`). Same strength on average.
    """
    angles = _rand([x.shape[0]], generator, x) * math.pi
    return _conv_same_per_image(x, _motion_kernels(float(length), angles))


# ------------------------------------------------------------------------------------------- colour distortion
def color_diffusion(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour bleeding: blur the CIELAB chroma (a, b) with sigma `1.5 * amount + 2` and scale it by `amount`.

    The scaling follows ARNIQA literally: large amounts both smear and strongly over-saturate the colours. `clean`
    converts the RGB image itself and keeps float precision; ARNIQA converts the channel-swapped (BGR) image, a
    leftover from OpenCV that mixes the blue channel into lightness as if it were red, and truncates the result to
    8 bits (up to 3 dB lower PSNR than `clean`).
    """
    lab = rgb_to_lab(x)
    chroma = _gaussian_blur(lab[:, 1:], 1.5 * amount + 2.0) * amount
    return lab_to_rgb(torch.cat([lab[:, :1], chroma], dim=1))


def color_shift(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Chromatic misregistration: the green channel is translated by `amount` px at edges.

    An edge map (gradient magnitude of the luma, Gaussian-smoothed with sigma 4) weights a blend between the original
    and the shifted green channel, so flat regions stay untouched.

    Choices where ARNIQA is ambiguous:

    * the edge map is normalised robustly: min-max stretched, clipped to its 1st/99th percentiles, and stretched
      again so that the strongest edges receive the full shift (ARNIQA's percentile helper does not work as written);
    * the shift direction is uniform over the full circle (ARNIQA only produces non-negative offsets), one direction
      per image, and the offset is rounded to whole pixels, without ARNIQA's wrap-around (`_arniqa_color_shift`).

    The clipped and re-stretched edge map gives many more pixels the full shift than ARNIQA's: 1 to 3.5 dB lower PSNR.
    """
    b = x.shape[0]
    theta = _rand([b], generator, x) * (2.0 * math.pi)

    luma = _pad_replicate(_luma(x), 1, 1)
    grad_x = (luma[..., 1:-1, 2:] - luma[..., 1:-1, :-2]) / 2.0
    grad_y = (luma[..., 2:, 1:-1] - luma[..., :-2, 1:-1]) / 2.0
    edges = _minmax_per_image(_gaussian_blur(torch.hypot(grad_x, grad_y), 4.0))
    bounds = _per_image_quantiles(edges.flatten(1), torch.tensor([0.01, 0.99]))
    edges = torch.maximum(torch.minimum(edges, bounds[:, 1].view(b, 1, 1, 1)), bounds[:, 0].view(b, 1, 1, 1))
    edges = _minmax_per_image(edges)

    dy = torch.round(amount * torch.sin(theta)).long()
    dx = torch.round(amount * torch.cos(theta)).long()
    green = x[:, 1:2]
    blended = edges * _translate(green, dy, dx) + (1.0 - edges) * green
    return torch.cat([x[:, :1], blended, x[:, 2:]], dim=1)


def color_saturation1(x: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Desaturation in HSV: saturation multiplied by `factor` (< 0 flips towards the complementary hue)."""
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.cat([hsv[:, :1], hsv[:, 1:2] * factor, hsv[:, 2:]], dim=1))


def color_saturation2(x: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Over-saturation in CIELAB: chroma (a, b) multiplied by `factor`; out-of-gamut colours are clipped.

    ARNIQA converts the channel-swapped (BGR) image and truncates to 8 bits, so even its factor 1 changes the
    picture (about 51 dB); `clean` converts the RGB image in float and factor 1 is the identity.
    """
    lab = rgb_to_lab(x)
    return lab_to_rgb(torch.cat([lab[:, :1], lab[:, 1:] * factor], dim=1))


# ------------------------------------------------------------------------------------------------ compression
def _pillow_round_trip(
    x: torch.Tensor, save_kwargs: Callable[[int, int], dict], threaded: bool = False, truncate: bool = False
) -> torch.Tensor:
    """Encode/decode each image of `x [B, 3, H, W]` with Pillow on CPU (8-bit), back on `x`'s device/dtype.

    The 8-bit values are rounded, or truncated with `truncate` (ARNIQA's `(255 x).byte()`). With `threaded`
    the images are coded concurrently; that only pays off for codecs that release the GIL
    (libjpeg does; Pillow's OpenJPEG path measured no gain). Outputs do not depend on the scheduling: every image is
    coded independently and results are kept in batch order.
    """
    scaled = x.detach().clamp(0.0, 1.0) * 255.0
    pixels = (scaled if truncate else scaled.round()).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def round_trip(array: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, **save_kwargs(*array.shape[:2]))
        buffer.seek(0)
        with Image.open(buffer) as image:
            return np.asarray(image.convert("RGB"))

    workers = min(len(pixels), os.cpu_count() or 1) if threaded else 1
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(round_trip, pixels))
    else:
        decoded = [round_trip(array) for array in pixels]
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(x.device, x.dtype) / 255.0


def _jpeg2000_options(ratio: float) -> Callable[[int, int], dict]:
    def kwargs(height: int, width: int) -> dict:
        resolutions = max(1, min(8, math.floor(math.log2(min(height, width))) + 1))
        return {
            "format": "JPEG2000",
            "quality_mode": "rates",
            "quality_layers": [float(ratio)],
            "num_resolutions": resolutions,
            "prog_order": "LRCP",
        }

    return kwargs


def _jpeg_options(quality: float) -> Callable[[int, int], dict]:
    return lambda height, width: {"format": "JPEG", "quality": int(quality), "subsampling": 2}


def jpeg2000(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG 2000 compression at a target compression `ratio` (OpenJPEG through Pillow, on CPU).

    Eight wavelet resolutions as in ARNIQA, reduced for small images because OpenJPEG needs every side to be at
    least `2 ** (resolutions - 1)` px (ARNIQA fails on images under 128 px). `clean` rounds to 8 bits first where
    ARNIQA truncates.
    """
    return _pillow_round_trip(x, _jpeg2000_options(ratio))


def jpeg(x: torch.Tensor, quality: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline JPEG at `quality` (libjpeg through Pillow, on CPU) with 4:2:0 chroma subsampling as in ARNIQA.

    `clean` rounds to 8 bits first where ARNIQA truncates (half a grey level darker on average).
    """
    return _pillow_round_trip(x, _jpeg_options(quality), threaded=True)


# ------------------------------------------------------------------------------------------------------ noise
def white_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive i.i.d. Gaussian noise of `variance` on every RGB value."""
    return x + _randn(x.shape, generator, x) * math.sqrt(variance)


def white_noise_cc(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive i.i.d. Gaussian noise of `variance` in YCbCr (luma and both chroma channels), back to RGB.

    `clean` uses BT.601's exact inverse; ARNIQA's kornia 0.7 inverts with rounded coefficients (no visible change).
    """
    return ycbcr_to_rgb(rgb_to_ycbcr(x) + _randn(x.shape, generator, x) * math.sqrt(variance))


def impulse_noise(x: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt-and-pepper noise: each RGB value independently becomes 0 or 1 (even odds) with probability `density`.

    ARNIQA draws exactly `int(density * 3HW)` positions with replacement, half salt; an independent Bernoulli per
    value has the same expected density (the count varies a little more), vectorises, and nests across levels.
    """
    hit = _rand(x.shape, generator, x) < density
    salt = _rand(x.shape, generator, x) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def multiplicative_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Speckle noise `x * (1 + n)` with `n ~ N(0, variance)` i.i.d. per RGB value."""
    return x * (1.0 + _randn(x.shape, generator, x) * math.sqrt(variance))


# ---------------------------------------------------------------------------------------------- brightness
def brighten(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightening tone curve through (0.5, 0.5 + amount / 2).

    As in KADID, the curve is applied both to the RGB values and to CIELAB lightness, and the two results are
    blended 2:1 (RGB:Lab), which limits the colour shifts of a pure RGB curve. ARNIQA takes the lightness of the
    channel-swapped (BGR) image; `clean` that of the RGB image.
    """
    midpoint = 0.5 + amount / 2.0
    lab = rgb_to_lab(x)
    lightness = _midtone_curve(lab[:, :1] / 100.0, midpoint) * 100.0
    from_lab = lab_to_rgb(torch.cat([lightness, lab[:, 1:]], dim=1))
    return (2.0 * _midtone_curve(x, midpoint) + from_lab) / 3.0


def darken(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Darkening tone curve through (0.5, 0.5 - amount / 2) on the RGB values (ARNIQA's default, no Lab blend)."""
    return _midtone_curve(x, 0.5 - amount / 2.0)


def mean_shift(x: torch.Tensor, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add the signed constant `shift` to every RGB value (clamped by the caller)."""
    return x + shift


# ---------------------------------------------------------------------------------------- spatial distortion
_JITTER_ITERATIONS = 5


def jitter(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixel scattering: five rounds of resampling at positions displaced by i.i.d. `N(0, amount^2)` px.

    Each round draws one (dy, dx) field per image shared by the three channels and resamples bilinearly with
    border replication. ARNIQA's `imscatter` crops its padded frame with rows and columns swapped (a diagonal shift
    of the picture in about one draw in three at amounts >= 0.5) and turns samples beyond the padded border black
    (`_arniqa_jitter`); `clean` does neither, so its PSNR is up to 3 dB higher at amounts 0.5 and 1.
    """
    b, _, h, w = x.shape
    fields = _randn([_JITTER_ITERATIONS, b, h, w, 2], generator, x) * amount
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    y = x
    for field in fields:
        # grid_sample wants (x, y) in [-1, 1] with align_corners=True, i.e. pixel centres at the extremes.
        src_x = (cols - field[..., 1]) * (2.0 / max(w - 1, 1)) - 1.0
        src_y = (rows - field[..., 0]) * (2.0 / max(h - 1, 1)) - 1.0
        grid = torch.stack([src_x, src_y], dim=-1)
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return y


_PATCH_SIZE = 16
_PATCH_RADIUS = 16
_MAX_PATCHES = 100


def _check_patch_room(h: int, w: int) -> int:
    """The patch side, after checking that an `h` x `w` image holds one patch."""
    if h < _PATCH_SIZE or w < _PATCH_SIZE:
        raise ValueError(f"non_eccentricity_patch needs images of at least {_PATCH_SIZE}x{_PATCH_SIZE}, got {h}x{w}")
    return _PATCH_SIZE


def _patch_start(u: torch.Tensor, side: int) -> torch.Tensor:
    """A patch's first row or column from uniform draws `u`: a 16 px margin from the border, clamped on small images."""
    lo = min(_PATCH_RADIUS, side - _PATCH_SIZE)
    hi = max(side - _PATCH_SIZE - _PATCH_RADIUS, lo)
    return torch.round(u * (hi - lo)) + lo


def non_eccentricity_patch(x: torch.Tensor, count: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Copy `count` random 16x16 patches onto a location up to 8 px away from where they were taken.

    Patches are copied sequentially (later ones may copy already-moved content), as in KADID. Sources keep a 16 px
    margin from the borders; for images too small for that margin the positions are clamped into the image. Each
    patch is read whole before it is written; ARNIQA copies a view of the image into itself, so a patch moved
    downwards repeats its own top rows (`_arniqa_non_eccentricity_patch`), about 1 to 2 dB lower PSNR.
    """
    b, _, h, w = x.shape
    count = int(count)
    size = _check_patch_room(h, w)
    # Always draw the maximum number of patches so that, for a fixed seed, lower levels are prefixes of higher ones.
    draws = _rand([b, max(count, _MAX_PATCHES), 4], generator, x).to(torch.float64)

    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    offsets = torch.arange(size, device=x.device)
    y = x.clone()
    for k in range(count):
        src_h = _patch_start(draws[:, k, 0], h)
        src_w = _patch_start(draws[:, k, 1], w)
        dst_h = torch.round((draws[:, k, 2] - 0.5) * _PATCH_RADIUS + src_h).clamp(0, h - size)
        dst_w = torch.round((draws[:, k, 3] - 0.5) * _PATCH_RADIUS + src_w).clamp(0, w - size)
        src_rows = (src_h.long().view(b, 1) + offsets).view(b, size, 1)
        src_cols = (src_w.long().view(b, 1) + offsets).view(b, 1, size)
        dst_rows = (dst_h.long().view(b, 1) + offsets).view(b, size, 1)
        dst_cols = (dst_w.long().view(b, 1) + offsets).view(b, 1, size)
        y[batch, :, dst_rows, dst_cols] = y[batch, :, src_rows, src_cols]  # [B, size, size, C] on both sides
    return y


def pixelate(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nearest-neighbour down-scaling by `0.95 - strength ** 0.6` and nearest-neighbour up-scaling back.

    Uses pixel-centre aligned sampling (`nearest-exact`). PyTorch's legacy `nearest` (which ARNIQA gets through
    kornia) samples from pixel corners, so each round trip also translates the image by a fraction of a block that
    varies irregularly with the scale; that shift is not part of the distortion and makes its strength non-monotone
    (ARNIQA's PSNR is 3 to 12 dB lower than `clean`'s).
    """
    _, _, h, w = x.shape
    scale = 0.95 - strength**0.6
    small = F.interpolate(x, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="nearest-exact")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def quantization(x: torch.Tensor, levels: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Posterisation to `levels` grey levels per channel with image-adaptive thresholds; no dithering.

    Our own take on KADID's multi-level thresholding. ARNIQA's (`_arniqa_quantization`) bins every value with the
    fixed thresholds `int(255 k / levels)` whatever the image and stretches the bin *index* to [0, 1], which also
    changes brightness and contrast (2 to 8 dB lower PSNR than `clean`, and not ordered by level). `clean`:

    * thresholds are the `k / levels` quantiles (k = 1 .. levels - 1) of the image's luma, i.e. equal-population
      bins, a cheap stand-in for Otsu's multi-threshold that adapts to dark or bright images;
    * every R, G and B value is binned with those thresholds and replaced by the mean of its channel's values in that
      bin (the centroid, which minimises the squared error for the given bins); an empty bin falls back to its
      midpoint;
    * no error diffusion: it is sequential per pixel, and ordered posterisation is the intended artefact.
    """
    b, c, h, w = x.shape
    n = int(levels)
    q = torch.arange(1, n, dtype=torch.float64) / n
    thresholds = _per_image_quantiles(_luma(x).flatten(1), q).contiguous()  # [B, n - 1]
    values = x.reshape(b, c * h * w)
    bins = torch.searchsorted(thresholds, values.contiguous())  # [B, C*H*W] in 0 .. n - 1
    bins = bins.view(b, c, h * w)
    flat = x.reshape(b, c, h * w)
    sums = torch.zeros(b, c, n, device=x.device, dtype=x.dtype).scatter_add_(2, bins, flat)
    counts = torch.zeros(b, c, n, device=x.device, dtype=x.dtype).scatter_add_(2, bins, torch.ones_like(flat))
    edges = torch.cat([torch.zeros_like(thresholds[:, :1]), thresholds, torch.ones_like(thresholds[:, :1])], dim=1)
    midpoints = ((edges[:, :-1] + edges[:, 1:]) / 2.0).unsqueeze(1).expand(b, c, n)
    centroids = torch.where(counts > 0, sums / counts.clamp(min=1.0), midpoints)
    return centroids.gather(2, bins).view(b, c, h, w)


_BLOCK_SIZE = 32
_MAX_BLOCKS = 10


def color_block(x: torch.Tensor, count: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Paste `count` uniformly coloured 32x32 blocks (uniform random RGB) at uniform random positions."""
    b, _, h, w = x.shape
    count = int(count)
    # Always draw the maximum number of blocks so that lower levels are prefixes of higher ones for a fixed seed.
    num_draws = max(count, _MAX_BLOCKS)
    colors = _rand([b, num_draws, 3], generator, x)
    corners = _rand([b, num_draws, 2], generator, x).to(torch.float64)
    size_h, size_w = min(_BLOCK_SIZE, h), min(_BLOCK_SIZE, w)
    top = torch.floor(corners[..., 0] * (h - size_h)).long()  # [B, num_draws]
    left = torch.floor(corners[..., 1] * (w - size_w)).long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    y = x
    for k in range(count):  # in order: later blocks cover earlier ones
        block_top = top[:, k].view(b, 1, 1)
        block_left = left[:, k].view(b, 1, 1)
        inside_rows = (rows >= block_top) & (rows < block_top + size_h)  # [B, H, 1]
        inside = inside_rows & (cols >= block_left) & (cols < block_left + size_w)  # [B, H, W]
        y = torch.where(inside.unsqueeze(1), colors[:, k].view(b, 3, 1, 1), y)
    return y


# ----------------------------------------------------------------------------------- sharpness and contrast
_SHARPEN_SIGMA = 6.0


def high_sharpen(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unsharp masking of CIELAB lightness: `L + amount * (L - G * L)`, G a Gaussian with sigma 6 on a 13x13 support.

    Over-sharpening shows as halos along edges; chroma is untouched. ARNIQA sharpens the lightness of the
    channel-swapped (BGR) image; `clean` that of the RGB image.
    """
    lab = rgb_to_lab(x)
    lightness = lab[:, :1]
    blurred = _gaussian_blur(lightness, _SHARPEN_SIGMA, radius=int(_SHARPEN_SIGMA))
    return lab_to_rgb(torch.cat([lightness + amount * (lightness - blurred), lab[:, 1:]], dim=1))


def linear_contrast_change(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """S-shaped contrast curve on RGB: spline through (0.3, 0.25 - amount / 4), (0.5, 0.5), (0.7, 0.75 + amount / 4).

    `amount > 0` raises contrast, `amount < 0` lowers it; note that `amount == 0` is already a mild contrast
    increase (the knots sit 0.05 off the identity), as in KADID.
    """
    return _tone_curve(x, (0.0, 0.3, 0.5, 0.7, 1.0), (0.0, 0.25 - amount / 4.0, 0.5, 0.75 + amount / 4.0, 1.0))


def non_linear_contrast_change(
    x: torch.Tensor, offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Contrast compression towards mid-grey: [0, 1] is mapped linearly onto [0.5 - offset, 0.5 + offset].

    Despite the (KADID) name, ARNIQA's definition is this linear map; smaller `offset` means less contrast.
    """
    return 0.5 + (x.clamp(0.0, 1.0) - 0.5) * (2.0 * offset)


# ================================================================================ ARNIQA style (the paper's data)
# What ARNIQA's `utils/distortions.py` computes, re-derived from its code (our own implementation, batched and
# driven by an explicit generator). Only the distortions whose ARNIQA behaviour differs from the `clean` style have
# a function here; the other ones (gaussian_blur, color_saturation1, white_noise, multiplicative_noise, darken,
# mean_shift, color_block, linear_contrast_change, non_linear_contrast_change) compute the same thing in both styles.
# ARNIQA applies each function to one CHW image; "per image" below is what it did to each image of a batch.

# kornia 0.7 (ARNIQA's pinned version) colour constants: sRGB D65 matrices and reference white.
_KORNIA_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_KORNIA_XYZ_TO_RGB = torch.tensor(
    [
        [3.2404813432005266, -1.5371515162713185, -0.4985363261688878],
        [-0.9692549499965682, 1.8759900014898907, 0.0415559265582928],
        [0.0556466391351772, -0.2040413383665112, 1.0573110696453443],
    ]
)
_KORNIA_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def _kornia_mix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` channel mixing summed left to right as kornia's `rgb_to_xyz` writes it (same rounding)."""
    m = matrix.to(x.device, x.dtype)
    c0, c1, c2 = x.unbind(dim=1)
    return torch.stack([m[i, 0] * c0 + m[i, 1] * c1 + m[i, 2] * c2 for i in range(3)], dim=1)


def _kornia_rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """kornia 0.7's `rgb_to_lab` on `[B, 3, H, W]`: L in [0, 100]; white (0.95047, 1, 1.08883), 7.787 slope."""
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    xyz = _kornia_mix(linear, _KORNIA_RGB_TO_XYZ) / _KORNIA_WHITE.to(x.device, x.dtype).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1.0 / 3.0), 7.787 * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _kornia_lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """kornia 0.7's `lab_to_rgb` (`clip=True`): the inverse of `_kornia_rgb_to_lab`, clamped to [0, 1]."""
    lightness, a, b = lab.unbind(dim=1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0.0)], dim=1)
    xyz = torch.where(f > 0.2068966, f.pow(3.0), (f - 4.0 / 29.0) / 7.787)
    linear = _kornia_mix(xyz * _KORNIA_WHITE.to(lab.device, lab.dtype).view(1, 3, 1, 1), _KORNIA_XYZ_TO_RGB)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308).pow(1.0 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def _bgr(x: torch.Tensor) -> torch.Tensor:
    """Swap the first and last channel (ARNIQA's `x[[2, 1, 0]]`; its own inverse)."""
    return x.flip(1)


def _truncate_8bit(x: torch.Tensor) -> torch.Tensor:
    """`trunc(255 x) / 255`: ARNIQA's 8-bit truncation (not rounding) after some Lab round trips."""
    return torch.trunc(x * 255.0) / 255.0


def _arniqa_lens_blur(x: torch.Tensor, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: correlation with its Python port of MATLAB's `fspecial('disk')`, see `_arniqa_disk_kernel`."""
    return _conv_same(x, _arniqa_disk_kernel(int(radius)))


@lru_cache(maxsize=16)
def _arniqa_disk_kernel(radius: int) -> torch.Tensor:
    """ARNIQA's `fspecial('disk', radius)` for an integer radius: `[2r + 1, 2r + 1]` float64, sums to one.

    MATLAB's anti-aliased disk: each tap is the area of its pixel square inside the circle, computed analytically
    from circular segments. The port differs from MATLAB in one place, reproduced here: the lower integration limit
    `m1` of the edge taps that MATLAB sets to `sqrt(r^2 - (max + 0.5)^2)` is 0 in the port (it tests that the
    square root is defined for *every* tap, which fails at the corners, and then uses 0 everywhere). That makes the
    edge taps of the disk slightly heavier than MATLAB's.
    """
    rad = float(radius)
    if radius < 1 or radius != int(radius):
        raise ValueError(f"ARNIQA's disk kernel is reproduced for integer radii >= 1, got {radius}")
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64).abs()
    a, b = coords.view(-1, 1), coords.view(1, -1)
    big, small = torch.maximum(a, b), torch.minimum(a, b)
    r2 = rad**2
    m1 = torch.where(r2 < (big + 0.5) ** 2 + (small - 0.5) ** 2, small - 0.5, torch.zeros_like(small))
    m2 = torch.where(r2 > (big - 0.5) ** 2 + (small + 0.5) ** 2, small + 0.5, (r2 - (small - 0.5) ** 2).sqrt())
    t1, t2 = torch.asin(m1 / rad), torch.asin(m2 / rad)
    segment = r2 * (0.5 * (t2 - t1) + 0.25 * (torch.sin(2 * t2) - torch.sin(2 * t1))) - (big - 0.5) * (m2 - m1)
    on_edge = ((r2 < (big + 0.5) ** 2 + (small + 0.5) ** 2) & (r2 > (big - 0.5) ** 2 + (small - 0.5) ** 2)) | (
        (small == 0) & (big - 0.5 < rad) & (big + 0.5 >= rad)
    )
    grid = (segment + (m1 - small + 0.5)) * on_edge + ((big + 0.5) ** 2 + (small + 0.5) ** 2 < r2)
    centre = math.ceil(rad - 0.5)
    # MATLAB's correction for radii just above a half integer never applies to integer radii.
    grid[centre, centre] = min(math.pi * r2, math.pi / 2, 1.0)
    return grid / grid.sum()


@lru_cache(maxsize=1024)
def _arniqa_motion_kernel(length: int, angle: int) -> np.ndarray:
    """ARNIQA's port of MATLAB's `fspecial('motion', length, angle)`: an odd-sized float64 array summing to ~1.

    A line of `length` px at `angle` degrees, anti-aliased by the distance of each tap to the line (one pixel
    wide); built as one quadrant, mirrored about the centre, and flipped upside down when the cosine is positive.
    """
    eps = 2.2204e-16
    length = max(1, length)
    half = (length - 1) / 2.0
    phi = (angle % 180) / 180.0 * math.pi
    cos, sin = math.cos(phi), math.sin(phi)
    xsign = 1 if cos >= 0 else -1
    sx = int(half * cos + xsign - length * eps)  # int() truncates towards zero like MATLAB's fix
    sy = int(half * sin + 1 - length * eps)
    x = np.arange(0, sx + xsign, xsign, dtype=np.float64)[None, :]
    y = np.arange(0, sy + 1, dtype=np.float64)[:, None]
    x, y = np.broadcast_arrays(x, y)
    dist = y * cos - x * sin
    last = (np.hypot(x, y) >= half) & (np.abs(dist) <= 1)
    beyond = half - np.abs((x[last] + dist[last] * sin) / cos)
    dist = dist.copy()
    dist[last] = np.sqrt(dist[last] ** 2 + beyond**2)
    dist = np.maximum(1 + eps - np.abs(dist), 0.0)
    rows, cols = dist.shape
    kernel = np.zeros((2 * rows - 1, 2 * cols - 1))
    kernel[:rows, :cols] = dist[::-1, ::-1]
    kernel[rows - 1 :, cols - 1 :] = dist
    kernel /= kernel.sum() + eps * length * length
    return kernel[::-1].copy() if cos > 0 else kernel


def _arniqa_motion_blur(x: torch.Tensor, length: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: MATLAB's motion kernel at a uniformly random *integer* angle in 0 .. 180 degrees, per image."""
    angles = torch.randint(0, 181, (x.shape[0],), generator=generator, device=generator.device).tolist()
    kernels = [_arniqa_motion_kernel(int(length), angle) for angle in angles]
    size = max(max(k.shape) for k in kernels)
    padded = np.zeros((len(kernels), size, size))
    for i, k in enumerate(kernels):  # zero taps around a smaller kernel leave the correlation unchanged
        top, left = (size - k.shape[0]) // 2, (size - k.shape[1]) // 2
        padded[i, top : top + k.shape[0], left : left + k.shape[1]] = k
    return _conv_same_per_image(x, torch.from_numpy(padded).to(x.device, x.dtype))


def _arniqa_color_diffusion(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: Lab of the channel-swapped (BGR) image, a/b blurred and scaled, back, 8-bit truncated, swapped back."""
    lab = _kornia_rgb_to_lab(_bgr(x))
    chroma = _gaussian_blur(lab[:, 1:], 1.5 * amount + 2.0) * amount
    return _bgr(_truncate_8bit(_kornia_lab_to_rgb(torch.cat([lab[:, :1], chroma], dim=1))))


def _arniqa_color_shift(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA's chromatic misregistration of the green channel; three quirks of its code are reproduced.

    * Edge map: as `clean`, but its "percentile" helper returns `torch.sort(e)[1]`, the *indices* that sort
      each row. Clamping `e` between those indices leaves it unchanged except for two pixels per row: the column
      at which column 0 sits in ascending order becomes 0, the one at which it sits in descending order becomes 1.
    * Offset: `round(amount * u / |u|)` with `u` two uniform [0, 1) numbers, so both components are >= 0.
    * Translation: rows are padded by the column offset and rolled by the row offset (and vice versa), then
      cropped; the green channel moves by the offset but wraps around by the difference of the two.
    """
    b, _, h, w = x.shape
    u = _rand([b, 2], generator, x).to(torch.float64)
    offsets = torch.round(u / u.square().sum(dim=1, keepdim=True).sqrt() * amount).long()
    s0, s1 = offsets[:, 0].view(b, 1), offsets[:, 1].view(b, 1)

    luma = _pad_replicate(_luma(x), 1, 1)
    grad_x = (luma[..., 1:-1, 2:] - luma[..., 1:-1, :-2]) / 2.0
    grad_y = (luma[..., 2:, 1:-1] - luma[..., :-2, 1:-1]) / 2.0
    edges = _minmax_per_image(_gaussian_blur(torch.sqrt(grad_x**2 + grad_y**2), 4.0))
    ascending = torch.sort(edges, dim=-1, stable=True).indices
    descending = torch.sort(1.0 - edges, dim=-1, stable=True).indices
    edges = torch.maximum(torch.minimum(edges, ascending.to(edges.dtype)), 1.0 - descending.to(edges.dtype))

    # Composite index maps of pad (rows by s1, columns by s0), roll (rows by s0, columns by s1) and crop.
    rows = (torch.remainder(torch.arange(h, device=x.device) + s1 - s0, h + 2 * s1) - s1).clamp(0, h - 1)
    cols = (torch.remainder(torch.arange(w, device=x.device) + s0 - s1, w + 2 * s0) - s0).clamp(0, w - 1)
    green = x[:, 1:2]
    index = (rows.to(x.device)[:, :, None] * w + cols.to(x.device)[:, None, :]).view(b, 1, h * w)
    shifted = green.reshape(b, 1, h * w).gather(2, index).view(b, 1, h, w)
    return torch.cat([x[:, :1], shifted * edges + green * (1.0 - edges), x[:, 2:]], dim=1)


def _arniqa_color_saturation2(x: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: Lab of the channel-swapped (BGR) image, a/b times `factor`, back, 8-bit truncated, swapped back."""
    lab = _kornia_rgb_to_lab(_bgr(x))
    return _bgr(_truncate_8bit(_kornia_lab_to_rgb(torch.cat([lab[:, :1], lab[:, 1:] * factor], dim=1))))


def _arniqa_jpeg2000(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: 8-bit *truncation*, then OpenJPEG through Pillow (8 resolutions for images of 128 px and more)."""
    return _pillow_round_trip(x, _jpeg2000_options(ratio), truncate=True)


def _arniqa_jpeg(x: torch.Tensor, quality: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: 8-bit *truncation*, then libjpeg at `quality`, 4:2:0 (torchvision's `encode_jpeg` there)."""
    return _pillow_round_trip(x, _jpeg_options(quality), threaded=True, truncate=True)


def _arniqa_white_noise_cc(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: Gaussian noise added in kornia 0.7's YCbCr, whose inverse uses rounded coefficients.

    Forward `cb = 0.564 (b - y) + 0.5`, `cr = 0.713 (r - y) + 0.5`; back with 1.403, 0.714, 0.344, 1.773, which is
    not the exact inverse (a round trip alone moves values by up to ~3e-4).
    """
    r, g, b = x.unbind(dim=1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    ycbcr = torch.stack([luma, (b - luma) * 0.564 + 0.5, (r - luma) * 0.713 + 0.5], dim=1)
    ycbcr = ycbcr + _randn(x.shape, generator, x) * math.sqrt(variance)
    y, cb, cr = ycbcr.unbind(dim=1)
    cb, cr = cb - 0.5, cr - 0.5
    return torch.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], dim=1)


_IMPULSE_MAX_DENSITY = 0.03  # ARNIQA's highest impulse_noise level


def _arniqa_impulse_noise(x: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: `n = int(density * 3HW)` values drawn uniformly *with replacement*; the first `int(n / 2)` set to
    1 (salt), the rest to 0 (pepper, written after the salt).

    Under ARNIQA's torch 2.1 the `(3, n)` numpy index array meant `(channel, row, column)` triples; newer torch
    reads it as one index and fails. Salt and pepper positions are drawn as two independent streams of the largest
    level's size, of which a level uses a prefix: the same distribution, and nested masks across levels.
    """
    b, c, h, w = x.shape
    total = c * h * w
    count = int(density * total)
    salt, pepper = int(0.5 * count), count - int(0.5 * count)
    most = max(int(max(density, _IMPULSE_MAX_DENSITY) * total), count)
    draws = torch.randint(0, total, (2, b, most), generator=generator, device=generator.device).to(x.device)
    flat = x.reshape(b, total).clone()
    flat.scatter_(1, draws[0, :, :salt], 1.0)
    flat.scatter_(1, draws[1, :, :pepper], 0.0)
    return flat.view(b, c, h, w)


def _arniqa_brighten(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: as `clean`, but the lightness curve works on the Lab of the channel-swapped (BGR) image (kornia)."""
    midpoint = 0.5 + amount / 2.0
    lab = _kornia_rgb_to_lab(_bgr(x))
    lightness = _midtone_curve(lab[:, :1] / 100.0, midpoint) * 100.0
    from_lab = _bgr(_kornia_lab_to_rgb(torch.cat([lightness, lab[:, 1:]], dim=1)))
    return (2.0 * _midtone_curve(x, midpoint) + from_lab) / 3.0


_JITTER_EPS = 1e-8


def _arniqa_jitter(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA's `imscatter`: five rounds of bilinear resampling at positions moved by `N(0, amount^2)` px.

    Per round and image, with `(sy, sx)` the column and row displacement fields:

    * the image is replicate-padded by `m_sx = ceil(|max sx|)` rows and `m_sy = ceil(|max sy|)` columns (the
      maximum, not the largest magnitude), sampled at `(row - sx, column - sy)`, and cropped back starting at row
      `m_sy` and column `m_sx`: swapped, so when the two differ the picture also moves by `m_sx - m_sy` px
      diagonally;
    * its bilinear weights divide by `x1 - x0 + 1e-8`: a sample at or beyond the last padded row or column (where
      both neighbours clamp to the same pixel) comes out exactly 0, black.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    y = x
    for field in _randn([_JITTER_ITERATIONS, b, 2, h, w], generator, x) * amount:
        sy, sx = field[:, 0], field[:, 1]  # [B, H, W]: column and row displacements
        m_sx = torch.ceil(sx.flatten(1).max(dim=1).values.abs()).long().view(b, 1, 1)
        m_sy = torch.ceil(sy.flatten(1).max(dim=1).values.abs()).long().view(b, 1, 1)
        pad_h, pad_w = h + 2 * m_sx, w + 2 * m_sy  # the padded frame's size, per image
        # Output pixel (i, j) is padded pixel (i + m_sy, j + m_sx); padded (p, q) holds original
        # (clamp(p - m_sx), clamp(q - m_sy)), for the image and for the displacement fields alike.
        p = (rows + m_sy).clamp(max=pad_h - 1)
        q = (cols + m_sx).clamp(max=pad_w - 1)
        source = ((p - m_sx).clamp(0, h - 1) * w + (q - m_sy).clamp(0, w - 1)).view(b, 1, h * w)
        shift = field.reshape(b, 2, h * w).gather(2, source.expand(b, 2, h * w)).view(b, 2, h, w)
        sample_r = p - shift[:, 1]  # float row coordinate in the padded frame
        sample_c = q - shift[:, 0]
        # Neighbours in the padded frame, clamped to it (float: exact for these small integers).
        floor_r, floor_c = torch.floor(sample_r), torch.floor(sample_c)
        last_r, last_c = (pad_h - 1).to(x.dtype), (pad_w - 1).to(x.dtype)
        r0, r1 = torch.minimum(floor_r.clamp(min=0), last_r), torch.minimum((floor_r + 1).clamp(min=0), last_r)
        c0, c1 = torch.minimum(floor_c.clamp(min=0), last_c), torch.minimum((floor_c + 1).clamp(min=0), last_c)
        wc_den = (c1 - c0) + _JITTER_EPS
        wr_den = (r1 - r0) + _JITTER_EPS
        wc1, wc0 = ((c1 - sample_c) / wc_den).unsqueeze(1), ((sample_c - c0) / wc_den).unsqueeze(1)
        wr1, wr0 = ((r1 - sample_r) / wr_den).unsqueeze(1), ((sample_r - r0) / wr_den).unsqueeze(1)
        # The four neighbours' values, read from the unpadded image: one gather.
        rows0, rows1 = ((r - m_sx).clamp(0, h - 1).long() * w for r in (r0, r1))
        cols0, cols1 = ((c - m_sy).clamp(0, w - 1).long() for c in (c0, c1))
        index = torch.stack([rows0 + cols0, rows0 + cols1, rows1 + cols0, rows1 + cols1], dim=1).view(b, 1, 4 * h * w)
        corners = y.reshape(b, c, h * w).gather(2, index.expand(b, c, 4 * h * w)).view(b, c, 4, h, w)
        top = corners[:, :, 0] * wc1 + corners[:, :, 1] * wc0
        bottom = corners[:, :, 2] * wc1 + corners[:, :, 3] * wc0
        y = top * wr1 + bottom * wr0
    return y


def _arniqa_non_eccentricity_patch(
    x: torch.Tensor, count: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ARNIQA: as `clean`, but each patch is copied from a *view* of the image into the same image.

    When the destination overlaps the source further down, rows already written are read again, so the patch's top
    rows repeat downwards. PyTorch copies such a strided view row by row (each 16-value row read whole before it is
    written, measured with ARNIQA's own function), which is what this does.
    """
    b, _, h, w = x.shape
    count = int(count)
    size = _check_patch_room(h, w)
    draws = _rand([b, max(count, _MAX_PATCHES), 4], generator, x).to(torch.float64)

    batch = torch.arange(b, device=x.device).view(b, 1)
    offsets = torch.arange(size, device=x.device).view(1, size)
    y = x.clone()
    for k in range(count):
        src_h = _patch_start(draws[:, k, 0], h).long()
        src_w = _patch_start(draws[:, k, 1], w).long()
        dst_h = torch.round((draws[:, k, 2] - 0.5) * _PATCH_RADIUS + src_h).clamp(0, h - size).long()
        dst_w = torch.round((draws[:, k, 3] - 0.5) * _PATCH_RADIUS + src_w).clamp(0, w - size).long()
        src_cols = (src_w.view(b, 1) + offsets).to(x.device)  # [B, size]
        dst_cols = (dst_w.view(b, 1) + offsets).to(x.device)
        for row in range(size):
            src_row = (src_h + row).to(x.device).view(b, 1)
            dst_row = (dst_h + row).to(x.device).view(b, 1)
            y[batch, :, dst_row, dst_cols] = y[batch, :, src_row, src_cols]  # [B, size, C] on both sides
    return y


def _arniqa_pixelate(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: down and up with PyTorch's legacy corner-aligned `nearest` (through kornia's `resize`).

    Each round trip also shifts the picture by a fraction of a block that varies with the scale.
    """
    _, _, h, w = x.shape
    scale = 0.95 - strength**0.6
    small = F.interpolate(x, size=(max(1, int(h * scale)), max(1, int(w * scale))), mode="nearest")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _arniqa_quantization(x: torch.Tensor, levels: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: every RGB value binned with the fixed thresholds `int(255 k / levels)`, k = 1 .. levels - 1, and
    the bin index stretched to [0, 1] over the image.

    ARNIQA computes a grey histogram but only uses its (image-independent) bin edges, and never calls the dithering
    extension it loads. The bin index runs over `0 .. levels`: index 0 holds only values exactly 0, so with no
    black pixel the image keeps `levels` values; the min-max stretch is over the whole image (all channels).
    """
    n = int(levels)
    edges = torch.tensor([0] + [int(255 * k / n) for k in range(1, n)] + [256], device=x.device, dtype=x.dtype)
    index = torch.bucketize((x * 255.0).contiguous(), edges).to(x.dtype)
    return _minmax_per_image(index)


def _arniqa_high_sharpen(x: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ARNIQA: as `clean` (sigma 6 on 13x13), on the Lab lightness of the channel-swapped (BGR) image (kornia)."""
    lab = _kornia_rgb_to_lab(_bgr(x))
    lightness = lab[:, :1]
    blurred = _gaussian_blur(lightness, _SHARPEN_SIGMA, radius=int(_SHARPEN_SIGMA))
    return _bgr(_kornia_lab_to_rgb(torch.cat([lightness + amount * (lightness - blurred), lab[:, 1:]], dim=1)))


# ============================================================================================ registry
DEGRADATION_STYLES = ("arniqa", "clean")
"""The two implementations of the 24 distortions: `"arniqa"` (ARNIQA's code as QualiCLIP trained on it, quirks
included; the default) and `"clean"` (the evident intent, without the quirks). See the module docstring."""

DEFAULT_STYLE = "arniqa"


def check_style(style: str) -> str:
    """Returns `style` if it is one of `DEGRADATION_STYLES`; raises `ValueError` naming the valid ones otherwise."""
    if style not in DEGRADATION_STYLES:
        raise ValueError(f"unknown degradation style {style!r}; expected one of {list(DEGRADATION_STYLES)}")
    return style


@dataclass(frozen=True)
class Distortion:
    """One distortion type of ARNIQA's degradation model.

    Attributes:
        name: ARNIQA's distortion, spelled out (`"gaussian_blur"` for ARNIQA's `gaublur`).
        group: one of the 7 groups of `DISTORTION_GROUPS`.
        levels: the five parameters of ARNIQA's `distortion_range`, mildest first.
        fn: the `clean` implementation.
        stochastic: whether the functions consume the generator.
        arniqa_fn: the `arniqa` implementation, or `None` where it computes the same thing as `fn`.
    """

    name: str
    group: str
    levels: tuple[float, ...]
    fn: DistortionFn
    stochastic: bool = False
    arniqa_fn: DistortionFn | None = None

    def function(self, style: str = DEFAULT_STYLE) -> DistortionFn:
        """The implementation of `style` (`"arniqa"` or `"clean"`)."""
        return (self.arniqa_fn or self.fn) if check_style(style) == "arniqa" else self.fn

    def __call__(
        self,
        images: torch.Tensor,
        level: int | torch.Tensor,
        generator: torch.Generator | None = None,
        style: str = DEFAULT_STYLE,
    ) -> torch.Tensor:
        return apply_distortion(images, self, level, generator, style)


def _group(group: str, *entries: tuple) -> tuple[Distortion, ...]:
    """`(name, levels, clean fn, stochastic[, arniqa fn])` entries -> `Distortion`s of `group`."""
    return tuple(Distortion(name, group, *rest) for name, *rest in entries)


DISTORTION_GROUPS: dict[str, tuple[Distortion, ...]] = {
    "blur": _group(
        "blur",
        ("gaussian_blur", (0.1, 0.5, 1, 2, 5), gaussian_blur, False),
        ("lens_blur", (1, 2, 4, 6, 8), lens_blur, False, _arniqa_lens_blur),
        ("motion_blur", (1, 2, 4, 6, 10), motion_blur, True, _arniqa_motion_blur),
    ),
    "color_distortion": _group(
        "color_distortion",
        ("color_diffusion", (1, 3, 6, 8, 12), color_diffusion, False, _arniqa_color_diffusion),
        ("color_shift", (1, 3, 6, 8, 12), color_shift, True, _arniqa_color_shift),
        ("color_saturation1", (0.4, 0.2, 0.1, 0, -0.4), color_saturation1, False),
        ("color_saturation2", (1, 2, 3, 6, 9), color_saturation2, False, _arniqa_color_saturation2),
    ),
    "jpeg": _group(
        "jpeg",
        ("jpeg2000", (16, 32, 45, 120, 170), jpeg2000, False, _arniqa_jpeg2000),
        ("jpeg", (43, 36, 24, 7, 4), jpeg, False, _arniqa_jpeg),
    ),
    "noise": _group(
        "noise",
        ("white_noise", (0.001, 0.002, 0.003, 0.005, 0.01), white_noise, True),
        ("white_noise_cc", (0.0001, 0.0005, 0.001, 0.002, 0.003), white_noise_cc, True, _arniqa_white_noise_cc),
        ("impulse_noise", (0.001, 0.005, 0.01, 0.02, 0.03), impulse_noise, True, _arniqa_impulse_noise),
        ("multiplicative_noise", (0.001, 0.005, 0.01, 0.02, 0.05), multiplicative_noise, True),
    ),
    "brightness_change": _group(
        "brightness_change",
        ("brighten", (0.1, 0.2, 0.4, 0.7, 1.1), brighten, False, _arniqa_brighten),
        ("darken", (0.05, 0.1, 0.2, 0.4, 0.8), darken, False),
        ("mean_shift", (0, 0.08, -0.08, 0.15, -0.15), mean_shift, False),
    ),
    "spatial_distortion": _group(
        "spatial_distortion",
        ("jitter", (0.05, 0.1, 0.2, 0.5, 1), jitter, True, _arniqa_jitter),
        (
            "non_eccentricity_patch", (20, 40, 60, 80, 100), non_eccentricity_patch, True,
            _arniqa_non_eccentricity_patch,
        ),
        ("pixelate", (0.01, 0.05, 0.1, 0.2, 0.5), pixelate, False, _arniqa_pixelate),
        ("quantization", (20, 16, 13, 10, 7), quantization, False, _arniqa_quantization),
        ("color_block", (2, 4, 6, 8, 10), color_block, True),
    ),
    "sharpness_contrast": _group(
        "sharpness_contrast",
        ("high_sharpen", (1, 2, 3, 6, 12), high_sharpen, False, _arniqa_high_sharpen),
        ("linear_contrast_change", (0, 0.15, -0.4, 0.3, -0.6), linear_contrast_change, False),
        ("non_linear_contrast_change", (0.4, 0.3, 0.2, 0.1, 0.05), non_linear_contrast_change, False),
    ),
}  # fmt: skip
"""Ordered mapping group -> its distortions, in ARNIQA's order."""

ALL_DISTORTIONS: tuple[Distortion, ...] = tuple(d for group in DISTORTION_GROUPS.values() for d in group)
"""All 24 distortions, grouped and ordered as in `DISTORTION_GROUPS`."""

_BY_NAME: dict[str, Distortion] = {d.name: d for d in ALL_DISTORTIONS}


def get_distortion(name: str) -> Distortion:
    """Look a distortion up by name (e.g. `"gaussian_blur"`); raises `KeyError` listing the valid names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown distortion {name!r}; expected one of {sorted(_BY_NAME)}") from None


# ========================================================================================= application
def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got {images.dtype}")


def _check_level(level: int, num_levels: int = NUM_LEVELS) -> int:
    level = int(level)
    if not 0 <= level < num_levels:
        raise ValueError(f"level must be in [0, {num_levels - 1}], got {level}")
    return level


def apply_distortion(
    images: torch.Tensor,
    distortion: str | Distortion,
    level: int | torch.Tensor,
    generator: torch.Generator | None = None,
    style: str = DEFAULT_STYLE,
) -> torch.Tensor:
    """Apply one distortion at a level index.

    Args:
        images: `[B, 3, H, W]` float RGB in [0, 1], on any device.
        distortion: a `Distortion` or its name.
        level: `0 .. 4` (0 = mildest). Either a scalar applied to the whole batch or a `[B]` integer tensor of
            per-image levels; in the latter case the batch is processed one level at a time (ascending), each
            sub-batch drawing its own random numbers.
        generator: source of randomness; required for stochastic distortions, ignored otherwise.
        style: `"arniqa"` (ARNIQA's behaviour, what QualiCLIP trained on) or `"clean"`.

    Returns:
        `[B, 3, H, W]` tensor of `images`' dtype and device, clamped to [0, 1].

    Raises:
        ValueError: bad shape, level, style, or a random distortion without a generator.
    """
    _check_images(images)
    spec = get_distortion(distortion) if isinstance(distortion, str) else distortion
    fn = spec.function(style)
    if spec.stochastic and generator is None:
        raise ValueError(f"distortion {spec.name!r} is random and needs an explicit torch.Generator")

    # Half precision is too coarse for colour conversions and tone curves; compute in float32 at least.
    work = images if images.dtype == torch.float64 else images.to(torch.float32)

    if isinstance(level, torch.Tensor) and level.dim() > 0:
        if level.shape != (images.shape[0],):
            raise ValueError(f"per-image levels must have shape [{images.shape[0]}], got {tuple(level.shape)}")
        levels = level.to(images.device)
        out = torch.empty_like(work)
        for value in torch.unique(levels).tolist():
            mask = levels == value
            param = spec.levels[_check_level(value, len(spec.levels))]
            out[mask] = fn(work[mask], param, generator)
    else:
        out = fn(work, spec.levels[_check_level(level, len(spec.levels))], generator)
    return out.clamp(0.0, 1.0).to(images.dtype)


# ========================================================================================= composition
_LEVEL_STD = 2.5

CompositionStep = tuple[str, int]
"""One step of a composition: `(distortion name, level index sampled for it)`."""


def level_probabilities(num_levels: int = NUM_LEVELS, std: float = _LEVEL_STD) -> torch.Tensor:
    """ARNIQA's level prior: a half-Gaussian (mean 0, `std` 2.5) over the indices `0 .. num_levels - 1`."""
    index = torch.arange(num_levels, dtype=torch.float64)
    weights = torch.exp(-(index**2) / (2.0 * std**2))
    return weights / weights.sum()


def sample_composition(
    generator: torch.Generator, max_groups: int = len(DISTORTION_GROUPS), num_levels: int = NUM_LEVELS
) -> list[CompositionStep]:
    """Draw a random distortion composition the way ARNIQA does.

    The number of groups is uniform in `1 .. max_groups`; the groups are a random ordered subset (so the order of
    application is shuffled), with one distortion drawn uniformly inside each group and a level index drawn from the
    half-Gaussian `level_probabilities` over `0 .. num_levels - 1`.

    The sampled levels are what ARNIQA applies; QualiCLIP instead re-applies the same composition at every level,
    which `apply_composition` does when given an explicit `level`.

    Returns:
        list of `(name, level)` in order of application; never two distortions of the same group.
    """
    groups = list(DISTORTION_GROUPS)
    if not 1 <= max_groups <= len(groups):
        raise ValueError(f"max_groups must be in [1, {len(groups)}], got {max_groups}")
    if not 1 <= num_levels <= NUM_LEVELS:
        raise ValueError(f"num_levels must be in [1, {NUM_LEVELS}], got {num_levels}")
    device = generator.device
    count = int(torch.randint(1, max_groups + 1, (1,), generator=generator, device=device))
    order = torch.randperm(len(groups), generator=generator, device=device)[:count].tolist()
    probabilities = level_probabilities(num_levels).to(device)
    steps = []
    for group_index in order:
        members = DISTORTION_GROUPS[groups[group_index]]
        choice = int(torch.randint(len(members), (1,), generator=generator, device=device))
        level = int(torch.multinomial(probabilities, 1, generator=generator))
        steps.append((members[choice].name, level))
    return steps


def apply_composition(
    images: torch.Tensor,
    composition: Sequence[CompositionStep | str],
    level: int | torch.Tensor | None,
    generator: torch.Generator | None = None,
    style: str = DEFAULT_STYLE,
) -> torch.Tensor:
    """Apply a composition's distortions in order, clamping to [0, 1] after each (as ARNIQA does).

    Args:
        images: `[B, 3, H, W]` float RGB in [0, 1].
        composition: steps from `sample_composition`, or bare distortion names.
        level: `0 .. 4` (or per-image `[B]`) applied to *every* step (QualiCLIP), or `None` to use each step's
            own sampled level (ARNIQA; bare names then are an error).
        generator: consumed in order by the stochastic steps; needed if any step is stochastic.
        style: `"arniqa"` or `"clean"` (see `DEGRADATION_STYLES`).

    Returns:
        `[B, 3, H, W]`, same dtype and device as `images`.

    Because the random draws do not depend on the level, calling this with a generator freshly seeded with the same
    seed for each level gives the same random realisation at increasing strength; see
    `apply_composition_all_levels`.
    """
    out = images
    for step in composition:
        name, own_level = (step, None) if isinstance(step, str) else step
        step_level = own_level if level is None else level
        if step_level is None:
            raise ValueError(f"step {name!r} carries no level and no level was given")
        out = apply_distortion(out, name, step_level, generator, style)
    return out


def apply_composition_all_levels(
    images: torch.Tensor,
    composition: Sequence[CompositionStep | str],
    seed: int,
    num_levels: int = NUM_LEVELS,
    generator_device: torch.device | str = "cpu",
    style: str = DEFAULT_STYLE,
) -> torch.Tensor:
    """Apply one composition at every level `0 .. num_levels - 1` with the same random realisation.

    Args:
        images: `[B, 3, H, W]` float RGB in [0, 1].
        composition: as for `apply_composition` (the steps' own levels are ignored).
        seed: seeds a fresh generator for each level, so all levels share angles, noise fields, patch positions.
        num_levels: number of levels to produce.
        generator_device: where random numbers are drawn ("cpu" gives device-independent results).
        style: `"arniqa"` or `"clean"`.

    Returns:
        `[num_levels, B, 3, H, W]`, index 0 the mildest.
    """
    outputs = []
    for level in range(num_levels):
        generator = torch.Generator(device=generator_device).manual_seed(seed)
        outputs.append(apply_composition(images, composition, level, generator, style))
    return torch.stack(outputs)


# ========================================================================================= split execution
CODEC_DISTORTIONS = frozenset(d.name for d in DISTORTION_GROUPS["jpeg"])
"""The distortions that round-trip through an image codec on the CPU (Pillow), whatever the images' device."""


def split_after_last_codec(
    composition: Sequence[CompositionStep | str],
) -> tuple[list[CompositionStep | str], list[CompositionStep | str]]:
    """Split a composition into a head that ends with its last codec step and a tail free of codecs.

    The head is empty when the composition has no codec. Applying the head and then the tail, with the same generator
    carried across, is exactly applying the whole composition; the tail is all tensor operations, which run on any
    device.
    """
    names = [step if isinstance(step, str) else step[0] for step in composition]
    cut = max((index + 1 for index, name in enumerate(names) if name in CODEC_DISTORTIONS), default=0)
    return list(composition[:cut]), list(composition[cut:])


def apply_composition_levels_from(
    images: torch.Tensor,
    composition: Sequence[CompositionStep | str],
    generator_states: Sequence[torch.Tensor],
    style: str = DEFAULT_STYLE,
) -> torch.Tensor:
    """Continue `apply_composition_all_levels` from per-level starting points and generator states.

    Args:
        images: `[num_levels, B, 3, H, W]` (each level's own start), or `[B, 3, H, W]` shared by every level.
        composition: the steps still to apply, each at the level of its slice.
        generator_states: per level, the state (`torch.Generator.get_state()`) of a CPU generator to draw from.
        style: `"arniqa"` or `"clean"`, as for the head.

    Returns:
        `[num_levels, B, 3, H, W]` on `images`' device. With `images` the output of a composition's head (see
        `split_after_last_codec`) at each level and the states its generators ended in, this equals
        `apply_composition_all_levels` of the whole composition; on CPU bit for bit.
    """
    if images.dim() == 5 and images.shape[0] != len(generator_states):
        raise ValueError(f"{images.shape[0]} levels of images but {len(generator_states)} generator states")
    outputs = []
    for level, state in enumerate(generator_states):
        generator = torch.Generator()
        generator.set_state(state)
        start = images[level] if images.dim() == 5 else images
        outputs.append(apply_composition(start, composition, level, generator, style))
    return torch.stack(outputs)
