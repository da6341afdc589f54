"""Pixel helpers every generated task shares: the image sizes, 2x box downsampling, random
foreground/background colour pairs and compositing a mask into noisy RGB images."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
RENDER_SIZE = 2 * IMAGE_SIZE  # internal render resolution, box-downsampled 2x


def downsample(hi: np.ndarray) -> np.ndarray:
    """(N, 64, 64[, C]) uint8 -> (N, 32, 32[, C]) float32 2x2 box average."""
    a = hi.astype(np.uint16)
    total = a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]
    return total.astype(np.float32) * np.float32(0.25)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and clip to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def contrast_pair(n: int, rng: np.random.Generator, min_contrast: float = 90.0, max_contrast: float = 220.0):
    """Foreground/background RGB colours (n, 3) with a random grey-level contrast and a small tint."""
    contrast = rng.uniform(min_contrast, max_contrast, n)
    lo = rng.uniform(0.0, 255.0 - contrast)
    hi = lo + contrast
    dark_on_light = rng.random(n) < 0.5
    fg = np.where(dark_on_light, lo, hi)[:, None] + rng.uniform(-25, 25, (n, 3))
    bg = np.where(dark_on_light, hi, lo)[:, None] + rng.uniform(-25, 25, (n, 3))
    return np.clip(fg, 0, 255).astype(np.float32), np.clip(bg, 0, 255).astype(np.float32)


def composite(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator, noise: tuple[float, float]):
    """mask (N, H, W) in [0, 1], colours (N, 3) -> uint8 (N, H, W, 3) with Gaussian pixel noise."""
    n = mask.shape[0]
    sigma = rng.uniform(noise[0], noise[1], n).astype(np.float32)
    out = np.empty(mask.shape + (3,), np.uint8)
    for i in range(0, n, 1024):  # chunks stay in cache: several times faster than one pass
        j = slice(i, i + 1024)
        img = bg[j, None, None, :] + (fg - bg)[j, None, None, :] * mask[j, ..., None]
        noise_px = rng.standard_normal(img.shape, dtype=np.float32)
        noise_px *= sigma[j, None, None, None]
        img += noise_px
        np.rint(img, out=img)
        np.clip(img, 0, 255, out=img)
        out[j] = img
    return out
