"""The ``textures`` task: procedural textures (stripes, checkerboard, dots, waves, blobs, grid) at
random frequency, phase, colour and noise, computed in vectorised numpy at 32x32."""

from __future__ import annotations

import numpy as np

from .render import IMAGE_SIZE, composite, contrast_pair

TEXTURE_CLASSES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "dots",
    "waves",
    "blobs",
    "grid",
)


def generate_textures(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``textures``: label y is the pattern :data:`TEXTURE_CLASSES` [y]."""
    n = len(labels)
    s = IMAGE_SIZE
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5 - s / 2)[:, None]  # (1, s, s) each
    col = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731

    freq = col(rng.uniform(2.5, 6.0, n)) * (2 * np.pi / s)  # radians per pixel
    phase_u, phase_w = col(rng.uniform(0, 2 * np.pi, n)), col(rng.uniform(0, 2 * np.pi, n))
    jitter = rng.uniform(-12, 12, n)
    base = np.select(
        [labels == 0, labels == 1, labels == 2],
        [np.full(n, 90.0), np.zeros(n), np.where(rng.random(n) < 0.5, 45.0, 135.0)],
        rng.uniform(0, 180, n),
    )
    base = np.where(np.isin(labels, [3, 7]), 0.0, base)  # checkerboard and grid stay axis-aligned
    theta = col(np.deg2rad(base + jitter))
    u = (xx * np.cos(theta) + yy * np.sin(theta)) * freq + phase_u
    w = (-xx * np.sin(theta) + yy * np.cos(theta)) * freq + phase_w

    wave_amp = col(rng.uniform(1.5, 3.0, n))
    wave_freq = col(rng.uniform(0.3, 0.6, n))
    # Blobs: low-pass filtered white noise, normalised.
    noise = rng.standard_normal((n, s, s), dtype=np.float32)
    k = np.fft.fftfreq(s) * s
    kr = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)[None]
    cutoff = col(rng.uniform(1.5, 3.5, n))
    blobs = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-((kr / cutoff) ** 2))).real.astype(np.float32)
    blobs /= blobs.std(axis=(1, 2), keepdims=True) + 1e-6

    patterns = {
        0: np.sin(u),
        1: np.sin(u),
        2: np.sin(u),
        3: np.sin(u) * np.sin(w) * 2.0,
        4: np.cos(u) + np.cos(w) - 1.0,
        5: np.sin(u + wave_amp * np.sin(w * wave_freq)),
        6: blobs,
        7: np.maximum(np.cos(u), np.cos(w)) - 0.75,
    }
    field = np.zeros((n, s, s), np.float32)
    for cls, pat in patterns.items():
        sel = labels == cls
        field[sel] = pat[sel]
    offset = col(np.where(np.isin(labels, [0, 1, 2, 5, 6]), rng.uniform(-0.35, 0.35, n), 0.0))
    sharp = col(rng.uniform(2.0, 12.0, n))
    mask = 1.0 / (1.0 + np.exp(-sharp * (field - offset)))
    fg, bg = contrast_pair(n, rng, 70.0, 200.0)
    # Colourful textures: independent colours per channel around the contrast pair.
    fg = np.clip(fg + rng.uniform(-50, 50, (n, 3)), 0, 255).astype(np.float32)
    bg = np.clip(bg + rng.uniform(-50, 50, (n, 3)), 0, 255).astype(np.float32)
    return composite(mask.astype(np.float32), fg, bg, rng, (0.0, 20.0))

