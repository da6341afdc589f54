"""Shape tasks in the spirit of dSprites and CLEVR: ``shapes`` (which white shape), ``orientation``
(the rotation of a heart or arrow) and ``counting`` (how many coloured objects).

Polygons are drawn at 64x64 and box-downsampled to 32x32 (anti-aliasing). A generator maps
(labels, rng) to uint8 (N, 32, 32, 3) images.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from .render import RENDER_SIZE, composite, downsample, to_uint8


def _heart(k: int = 64) -> np.ndarray:
    """A heart outline of ``k`` points, centred, about unit size."""
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y], 1) / 17.0
    return pts - pts.mean(0)


def _regular(k: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    """The corners of a regular ``k``-gon, the first at angle ``start``."""
    a = start + np.arange(k) * 2 * np.pi / k
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


_ARM = 0.33
SHAPE_POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.75,
    "ellipse": np.stack([np.cos(np.linspace(0, 2 * np.pi, 48, endpoint=False)),
                         0.5 * np.sin(np.linspace(0, 2 * np.pi, 48, endpoint=False))], 1),
    "heart": _heart(),
    "triangle": _regular(3) - _regular(3).mean(0),
    "cross": np.array([[-_ARM, -1], [_ARM, -1], [_ARM, -_ARM], [1, -_ARM], [1, _ARM], [_ARM, _ARM], [_ARM, 1],
                       [-_ARM, 1], [-_ARM, _ARM], [-1, _ARM], [-1, -_ARM], [-_ARM, -_ARM]], float) * 0.9,
}
SHAPE_CLASSES = tuple(SHAPE_POLYGONS)
# Pointing up at 0 degrees (the heart is upright, its tip down).
ARROW = np.array([[-0.2, 1], [-0.2, -0.15], [-0.6, -0.15], [0, -1], [0.6, -0.15], [0.2, -0.15], [0.2, 1]], float)
ORIENTATION_CLASSES = tuple(f"{45 * k}°" for k in range(8))


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    """Rotate clockwise on screen (image y points down) by ``angle`` radians."""
    co, si = np.cos(angle), np.sin(angle)
    return pts @ np.array([[co, si], [-si, co]])


def _draw_polygons(polys: list[np.ndarray]) -> np.ndarray:
    """Filled white polygons on black at 64x64, one per image -> (N, 32, 32) float mask in [0, 1]."""
    hi = np.empty((len(polys), RENDER_SIZE, RENDER_SIZE), np.uint8)
    for i, poly in enumerate(polys):
        img = Image.new("L", (RENDER_SIZE, RENDER_SIZE), 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=255)
        hi[i] = np.asarray(img)
    return downsample(hi) / np.float32(255)


def _place(rng: np.random.Generator, unit: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """``unit`` rotated by ``angle``, scaled by ``radius`` and moved to a random spot inside the 64 px canvas."""
    pts = _rotate(unit, angle) * radius
    lo, hi = -pts.min(0) + 1, RENDER_SIZE - 1 - pts.max(0)
    centre = rng.uniform(lo, np.maximum(hi, lo))
    return pts + centre


def generate_shapes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``shapes``: label y is :data:`SHAPE_CLASSES` [y] at random scale, rotation and position."""
    n = len(labels)
    radius = rng.uniform(9.0, 24.0, n)  # at 64 px
    angle = rng.uniform(0, 2 * np.pi, n)
    polys = [_place(rng, SHAPE_POLYGONS[SHAPE_CLASSES[y]], r, a) for y, r, a in zip(labels, radius, angle)]
    mask = _draw_polygons(polys)
    # dSprites-like: a white shape on black, with a little sensor noise.
    return composite(mask, np.full((n, 3), 255, np.float32), np.zeros((n, 3), np.float32), rng, (0.0, 6.0))


def generate_orientation(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``orientation``: label y is a heart or arrow rotated clockwise by 45 * y degrees (+-22.5)."""
    n = len(labels)
    angle = np.deg2rad(labels * 45.0 + rng.uniform(-22.5, 22.5, n))
    radius = rng.uniform(13.0, 26.0, n)
    which = rng.random(n) < 0.5
    polys = [_place(rng, SHAPE_POLYGONS["heart"] if h else ARROW, r, a) for h, r, a in zip(which, radius, angle)]
    mask = _draw_polygons(polys)
    return composite(mask, np.full((n, 3), 255, np.float32), np.zeros((n, 3), np.float32), rng, (0.0, 6.0))


COUNTING_CLASSES = tuple(str(k) for k in range(1, 7))


def generate_counting(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``counting``: label y is y + 1 non-overlapping coloured circles and squares on grey."""
    n = len(labels)
    hi = np.empty((n, RENDER_SIZE, RENDER_SIZE, 3), np.uint8)
    grey = rng.uniform(95, 165, n)
    for i, y in enumerate(labels):
        count = int(y) + 1
        img = Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), (int(grey[i]),) * 3)
        draw = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        scale = 1.0
        while len(placed) < count:
            r = rng.uniform(4.5, 8.5) * scale  # at 64 px (a square's half side; its corners reach r*sqrt2)
            reach = r * 1.42
            x, yy = rng.uniform(reach + 1, RENDER_SIZE - 1 - reach, 2)
            if all((x - px) ** 2 + (yy - py) ** 2 >= (reach + pr + 3) ** 2 for px, py, pr in placed):
                placed.append((x, yy, reach))
                hue, sat, val = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
                colour = tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, sat, val))
                if rng.random() < 0.5:
                    draw.ellipse([x - r * 1.15, yy - r * 1.15, x + r * 1.15, yy + r * 1.15], fill=colour)
                else:
                    sq = _rotate(np.array([[-r, -r], [r, -r], [r, r], [-r, r]]), rng.uniform(0, np.pi / 2))
                    draw.polygon([(x + p[0], yy + p[1]) for p in sq], fill=colour)
            else:
                scale = max(0.6, scale * 0.995)  # crowded: shrink further objects a little
        hi[i] = np.asarray(img)
    lo = downsample(hi)
    sigma = rng.uniform(0.0, 6.0, n).astype(np.float32)
    lo += sigma[:, None, None, None] * rng.standard_normal(lo.shape, dtype=np.float32)
    return to_uint8(lo)

