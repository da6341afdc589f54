"""The embedded task suite: small offline 32x32 RGB classification tasks, built on demand.

In the spirit of the muNet paper's character benchmark and VTAB's structured tasks, every task
is generated (or, for ``digits``, derived from data that ships with scikit-learn) without any
download, deterministically for a seed: the generator is a numpy ``Generator`` seeded from
``(seed, crc32(task name))``, so the same seed gives byte-identical arrays.

Glyph tasks (``latin``, ``greek``, ``font_style`` and the pretraining source ``symbols``) render
characters with the DejaVu fonts that matplotlib ships, then apply a random affine transform
(rotation, scale, shear, translation), random stroke/background intensities and noise.
Shape tasks (``shapes``, ``orientation``, ``counting``) draw polygons at 64x64 and box-downsample
to 32x32 (anti-aliasing); ``textures`` is computed in vectorised numpy.

Built tasks are cached as compressed ``.npz`` files in ``cache_dir()/tasks/`` (written to a
temporary file then renamed, so a crash never leaves a half file; an unreadable or inconsistent
cache file is rebuilt).
"""

from __future__ import annotations

import colorsys
import logging
import os
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mutask.evolve.data import Split, TaskData
from mutask.cache import cache_dir
from mutask.errors import MutaskError

log = logging.getLogger("mutask")

IMAGE_SIZE = 32
CACHE_VERSION = 1
_HI = 2 * IMAGE_SIZE  # internal render resolution, box-downsampled 2x


# --------------------------------------------------------------------------- shared helpers


def task_rng(name: str, seed: int) -> np.random.Generator:
    """The task's generator: seeded from (seed, crc32(name)), independent across tasks."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _balanced_labels(num_classes: int, per_class: tuple[int, int, int], rng: np.random.Generator):
    """Shuffled labels for train/validation/test with ``per_class`` images of every class."""
    return [rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), k)) for k in per_class]


def _downsample(hi: np.ndarray) -> np.ndarray:
    """(N, 64, 64[, C]) uint8 -> (N, 32, 32[, C]) float32 2x2 box average."""
    a = hi.astype(np.uint16)
    total = a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]
    return total.astype(np.float32) * np.float32(0.25)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _contrast_pair(n: int, rng: np.random.Generator, min_contrast: float = 90.0, max_contrast: float = 220.0):
    """Foreground/background RGB colours (n, 3) with a random grey-level contrast and a small tint."""
    contrast = rng.uniform(min_contrast, max_contrast, n)
    lo = rng.uniform(0.0, 255.0 - contrast)
    hi = lo + contrast
    dark_on_light = rng.random(n) < 0.5
    fg = np.where(dark_on_light, lo, hi)[:, None] + rng.uniform(-25, 25, (n, 3))
    bg = np.where(dark_on_light, hi, lo)[:, None] + rng.uniform(-25, 25, (n, 3))
    return np.clip(fg, 0, 255).astype(np.float32), np.clip(bg, 0, 255).astype(np.float32)


def _composite(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator, noise: tuple[float, float]):
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


# --------------------------------------------------------------------------- glyph rendering

FONT_FILES = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "sans-bold-oblique": "DejaVuSans-BoldOblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "serif-bold-italic": "DejaVuSerif-BoldItalic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
    "mono-oblique": "DejaVuSansMono-Oblique.ttf",
    "mono-bold-oblique": "DejaVuSansMono-BoldOblique.ttf",
}
ALL_FONTS = tuple(FONT_FILES)
_GLYPH_PT = 46  # font size at the 64 px render resolution
_GLYPH_CANVAS = 128  # glyphs are drawn centred on a canvas this big, then affinely mapped to 64x64
_GLYPH_FIT = 54.0  # glyphs whose ink box is larger than this (at 64 px) are shrunk to fit


@lru_cache(maxsize=None)
def font_path(key: str) -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILES[key]
    if not path.is_file():
        raise MutaskError(
            f"The DejaVu font {path} that matplotlib ships is missing, so glyph tasks cannot be built: "
            "reinstall matplotlib (pip install --force-reinstall matplotlib)."
        )
    return path


@lru_cache(maxsize=None)
def font_codepoints(key: str) -> frozenset:
    """Code points the font has a glyph for (its cmap)."""
    from fontTools.ttLib import TTFont

    with TTFont(str(font_path(key)), lazy=True) as font:
        return frozenset(font.getBestCmap())


def fonts_with(char: str, fonts=ALL_FONTS) -> tuple[str, ...]:
    return tuple(k for k in fonts if ord(char) in font_codepoints(k))


@lru_cache(maxsize=None)
def _font(key: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(key)), _GLYPH_PT)


@lru_cache(maxsize=None)
def _glyph(key: str, char: str) -> tuple[Image.Image, float]:
    """The glyph drawn white on black, its ink box centred on the canvas, and its fit factor."""
    font = _font(key)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (_GLYPH_CANVAS, _GLYPH_CANVAS), 0)
    c = _GLYPH_CANVAS / 2
    ImageDraw.Draw(canvas).text((c - (left + right) / 2, c - (top + bottom) / 2), char, font=font, fill=255)
    fit = min(1.0, _GLYPH_FIT / max(right - left, bottom - top, 1))
    return canvas, fit


@dataclass(frozen=True)
class GlyphAug:
    rotation: float = 15.0  # degrees, uniform +-
    scale: tuple[float, float] = (0.75, 1.15)
    shear: float = 0.25  # uniform +-
    shift: float = 3.0  # pixels at 32x32, uniform +- per axis
    contrast: tuple[float, float] = (90.0, 220.0)
    noise: tuple[float, float] = (0.0, 14.0)  # Gaussian sigma range, grey levels


def render_glyphs(glyphs: list[tuple[str, str]], rng: np.random.Generator, aug: GlyphAug) -> np.ndarray:
    """(font key, character) pairs -> uint8 (N, 32, 32, 3) images under random affine + colour + noise."""
    n = len(glyphs)
    theta = np.deg2rad(rng.uniform(-aug.rotation, aug.rotation, n))
    scale = rng.uniform(aug.scale[0], aug.scale[1], n)
    shear = rng.uniform(-aug.shear, aug.shear, n)
    shift = rng.uniform(-aug.shift, aug.shift, (n, 2)) * (_HI / IMAGE_SIZE)
    hi = np.empty((n, _HI, _HI), np.uint8)
    c_in = np.full(2, _GLYPH_CANVAS / 2)
    c_out = np.full(2, _HI / 2)
    for i, (key, char) in enumerate(glyphs):
        canvas, fit = _glyph(key, char)
        co, si = np.cos(theta[i]), np.sin(theta[i])
        forward = scale[i] * fit * np.array([[co, -si], [si, co]]) @ np.array([[1.0, shear[i]], [0.0, 1.0]])
        inv = np.linalg.inv(forward)
        off = c_in - inv @ (c_out + shift[i])
        coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
        hi[i] = np.asarray(canvas.transform((_HI, _HI), Image.AFFINE, coeffs, resample=Image.BILINEAR))
    mask = _downsample(hi) / np.float32(255)
    fg, bg = _contrast_pair(n, rng, *aug.contrast)
    return _composite(mask, fg, bg, rng, aug.noise)


# --------------------------------------------------------------------------- task generators
# Each generator: (labels, rng) -> uint8 (N, 32, 32, 3) images.

LATIN = "abcdefghijklmnopqrstuvwxyz"
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
FONT_STYLE_CLASSES = ("sans", "sans-bold", "serif", "serif-bold", "mono", "mono-bold")
FONT_STYLE_GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# The pretraining source: 100 Unicode symbols with DejaVu glyphs, none a letter or digit and
# none too letter-like (no x-like multiplication sign, no epsilon-like "element of", ...).
SYMBOLS = (
    "←↑→↓↔↕↖↗↘↙⇐⇒⇔↻"  # arrows
    "+÷±∅√∞∠∫≈≠≡≤≥⊕⊗⊥"  # math operators
    "■□▲△▶▼◀◆◇○●◐◑★☆◊▣▦"  # geometric shapes
    "$€£¥¢₹₽"  # currency
    "!?&@#%§¶†‡*()[]{}/\\¿¡"  # punctuation
    "┼┬┴├┤╬═║╔"  # box drawing
    "✓✚✦✱❖☀☁☂♠♣♥♦♪♫☺"  # dingbats and miscellaneous symbols
)


def _glyph_task(chars: str, fonts=ALL_FONTS, aug: GlyphAug = GlyphAug()):
    def generate(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        choices = [fonts_with(ch, fonts) for ch in chars]
        picks = rng.random(len(labels))
        glyphs = [(choices[y][int(p * len(choices[y]))], chars[y]) for y, p in zip(labels, picks)]
        return render_glyphs(glyphs, rng, aug)

    return generate


def _font_style(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    chars = rng.integers(0, len(FONT_STYLE_GLYPHS), len(labels))
    glyphs = [(FONT_STYLE_CLASSES[y], FONT_STYLE_GLYPHS[c]) for y, c in zip(labels, chars)]
    aug = GlyphAug(rotation=5.0, scale=(0.9, 1.1), shear=0.0, shift=2.0, contrast=(110.0, 220.0), noise=(0.0, 8.0))
    return render_glyphs(glyphs, rng, aug)


def _heart(k: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y], 1) / 17.0
    return pts - pts.mean(0)


def _regular(k: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
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
    hi = np.empty((len(polys), _HI, _HI), np.uint8)
    for i, poly in enumerate(polys):
        img = Image.new("L", (_HI, _HI), 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=255)
        hi[i] = np.asarray(img)
    return _downsample(hi) / np.float32(255)


def _place(rng: np.random.Generator, unit: np.ndarray, radius: float, angle: float) -> np.ndarray:
    pts = _rotate(unit, angle) * radius
    lo, hi = -pts.min(0) + 1, _HI - 1 - pts.max(0)
    centre = rng.uniform(lo, np.maximum(hi, lo))
    return pts + centre


def _shapes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    radius = rng.uniform(9.0, 24.0, n)  # at 64 px
    angle = rng.uniform(0, 2 * np.pi, n)
    polys = [_place(rng, SHAPE_POLYGONS[SHAPE_CLASSES[y]], r, a) for y, r, a in zip(labels, radius, angle)]
    mask = _draw_polygons(polys)
    # dSprites-like: a white shape on black, with a little sensor noise.
    return _composite(mask, np.full((n, 3), 255, np.float32), np.zeros((n, 3), np.float32), rng, (0.0, 6.0))


def _orientation(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    angle = np.deg2rad(labels * 45.0 + rng.uniform(-22.5, 22.5, n))
    radius = rng.uniform(13.0, 26.0, n)
    which = rng.random(n) < 0.5
    polys = [_place(rng, SHAPE_POLYGONS["heart"] if h else ARROW, r, a) for h, r, a in zip(which, radius, angle)]
    mask = _draw_polygons(polys)
    return _composite(mask, np.full((n, 3), 255, np.float32), np.zeros((n, 3), np.float32), rng, (0.0, 6.0))


COUNTING_CLASSES = tuple(str(k) for k in range(1, 7))


def _counting(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    hi = np.empty((n, _HI, _HI, 3), np.uint8)
    grey = rng.uniform(95, 165, n)
    for i, y in enumerate(labels):
        count = int(y) + 1
        img = Image.new("RGB", (_HI, _HI), (int(grey[i]),) * 3)
        draw = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        scale = 1.0
        while len(placed) < count:
            r = rng.uniform(4.5, 8.5) * scale  # at 64 px (a square's half side; its corners reach r*sqrt2)
            reach = r * 1.42
            x, yy = rng.uniform(reach + 1, _HI - 1 - reach, 2)
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
    lo = _downsample(hi)
    sigma = rng.uniform(0.0, 6.0, n).astype(np.float32)
    lo += sigma[:, None, None, None] * rng.standard_normal(lo.shape, dtype=np.float32)
    return _to_uint8(lo)


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


def _textures(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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
    fg, bg = _contrast_pair(n, rng, 70.0, 200.0)
    # Colourful textures: independent colours per channel around the contrast pair.
    fg = np.clip(fg + rng.uniform(-50, 50, (n, 3)), 0, 255).astype(np.float32)
    bg = np.clip(bg + rng.uniform(-50, 50, (n, 3)), 0, 255).astype(np.float32)
    return _composite(mask.astype(np.float32), fg, bg, rng, (0.0, 20.0))


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SuiteTask:
    name: str
    class_names: Callable[[], list[str]]
    description: str
    per_class: tuple[int, int, int] | None  # train/validation/test images per class (None: digits)
    generate: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None


def _greek_names() -> list[str]:
    return [unicodedata.name(ch).split()[-1].lower() for ch in GREEK]


def symbol_class_names() -> list[str]:
    return [unicodedata.name(ch).lower() for ch in SYMBOLS]


_TASKS = {
    "digits": SuiteTask(
        "digits",
        lambda: [str(d) for d in range(10)],
        "Real handwritten digits 0-9 (scikit-learn's 8x8 UCI digits), upscaled to 32x32.",
        None,
        None,
    ),
    "latin": SuiteTask(
        "latin",
        lambda: list(LATIN),
        "Lowercase Latin letters a-z rendered in 12 DejaVu font variants under random affine transforms, colours and noise.",
        (80, 12, 20),
        _glyph_task(LATIN),
    ),
    "greek": SuiteTask(
        "greek",
        _greek_names,
        "The 24 lowercase Greek letters rendered in 12 DejaVu font variants under random affine transforms, colours and noise.",
        (80, 12, 20),
        _glyph_task(GREEK),
    ),
    "font_style": SuiteTask(
        "font_style",
        lambda: list(FONT_STYLE_CLASSES),
        "Which DejaVu font variant (sans/serif/mono, regular/bold) rendered a random letter or digit.",
        (300, 50, 80),
        _font_style,
    ),
    "shapes": SuiteTask(
        "shapes",
        lambda: list(SHAPE_CLASSES),
        "dSprites-like: which white shape (square, ellipse, heart, triangle, cross) at random scale, rotation and position.",
        (300, 50, 80),
        _shapes,
    ),
    "orientation": SuiteTask(
        "orientation",
        lambda: list(ORIENTATION_CLASSES),
        "dSprites-like: clockwise rotation from upright of a heart or arrow, to the nearest 45 degrees.",
        (200, 30, 50),
        _orientation,
    ),
    "counting": SuiteTask(
        "counting",
        lambda: list(COUNTING_CLASSES),
        "CLEVR-like: how many coloured circles and squares (1-6) lie on a grey background.",
        (250, 40, 70),
        _counting,
    ),
    "textures": SuiteTask(
        "textures",
        lambda: list(TEXTURE_CLASSES),
        "Procedural textures (stripes, checkerboard, dots, waves, blobs, grid) at random frequency, phase, colour and noise.",
        (200, 30, 50),
        _textures,
    ),
    "symbols": SuiteTask(
        "symbols",
        symbol_class_names,
        "Pretraining source: 100 Unicode symbols (arrows, math, shapes, currency, punctuation, box drawing, dingbats) "
        "rendered in the DejaVu fonts that have them, under random affine transforms, colours and noise.",
        (160, 30, 30),
        _glyph_task(SYMBOLS, aug=GlyphAug(rotation=12.0, shear=0.2)),
    ),
}

SUITE_ORDER = ("digits", "latin", "greek", "font_style", "shapes", "orientation", "counting", "textures")
PRETRAIN = "symbols"
ALL_NAMES = SUITE_ORDER + (PRETRAIN,)


def _digits(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-learn's digits, bilinearly upscaled, stratified 1200/250/347 split for the seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x8 = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for a in x8])
    images = np.repeat(big[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    rng = task_rng("digits", seed)
    # Largest-remainder allocation per class so totals are exactly 1200/250/347 and stratified.
    totals = np.array([1200, 250, 347])
    parts: list[list[np.ndarray]] = [[], [], []]
    counts = np.bincount(labels, minlength=10)
    quota = counts[:, None] * totals[None, :] / counts.sum()
    alloc = np.floor(quota).astype(int)
    for j in range(3):
        short = totals[j] - alloc[:, j].sum()
        order = np.argsort(-(quota[:, j] - alloc[:, j]), kind="stable")
        alloc[order[:short], j] += 1
    alloc[:, 0] = counts - alloc[:, 1] - alloc[:, 2]  # train absorbs rounding
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = alloc[c, 0], alloc[c, 0] + alloc[c, 1]
        for j, part in enumerate((idx[:a], idx[a:b], idx[b:])):
            parts[j].append(part)
    xs, ys = [], []
    for j in range(3):
        idx = rng.permutation(np.concatenate(parts[j]))
        xs.append(images[idx])
        ys.append(labels[idx])
    return xs, ys


def generate_task(name: str, seed: int = 0) -> TaskData:
    """Build an embedded task from scratch (no cache)."""
    task = _TASKS[name]
    names = task.class_names()
    if task.generate is None:
        xs, ys = _digits(seed)
    else:
        rng = task_rng(name, seed)
        ys = _balanced_labels(len(names), task.per_class, rng)
        images = task.generate(np.concatenate(ys), rng)
        _glyph.cache_clear()  # rendered glyph canvases are only needed while building
        cut = np.cumsum([len(y) for y in ys])[:-1]
        xs = np.split(images, cut)
    return TaskData(
        name=name,
        class_names=names,
        train=Split(xs[0], ys[0]),
        validation=Split(xs[1], ys[1]),
        test=Split(xs[2], ys[2]),
        image_size=IMAGE_SIZE,
        description=task.description,
        source="embedded",
    )


# --------------------------------------------------------------------------- the cache

_SPLITS = ("train", "validation", "test")


def cache_path(name: str, seed: int) -> Path:
    return cache_dir() / "tasks" / f"{name}-seed{seed}-v{CACHE_VERSION}.npz"


def _save(task: TaskData, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"class_names": np.array(task.class_names, dtype=str), "description": np.array(task.description, dtype=str)}
    for s in _SPLITS:
        arrays[f"{s}_images"] = task.split(s).images
        arrays[f"{s}_labels"] = task.split(s).labels
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load(name: str, path: Path) -> TaskData:
    """Read a cached task; raises (any exception) if it is unreadable or inconsistent."""
    task = _TASKS[name]
    expected = task.class_names()
    with np.load(path, allow_pickle=False) as z:
        names = [str(c) for c in z["class_names"]]
        if names != expected:
            raise ValueError("class names differ from this version's")
        splits = {}
        for s in _SPLITS:
            x, y = z[f"{s}_images"], z[f"{s}_labels"]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"bad {s} images {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= len(names))):
                raise ValueError(f"bad {s} labels")
            splits[s] = Split(x, y)
        description = str(z["description"])
    return TaskData(name, names, splits["train"], splits["validation"], splits["test"], IMAGE_SIZE, description, "embedded")


def load_embedded(name: str, seed: int = 0) -> TaskData:
    """The embedded task ``name`` for ``seed``: from the cache, else built and cached."""
    if name not in _TASKS:
        raise KeyError(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MutaskError(f"Task seed {seed!r} is not a non-negative integer: pass a seed such as 0.")
    seed = int(seed)
    path = cache_path(name, seed)
    if path.exists():
        try:
            return _load(name, path)
        except Exception as exc:  # corrupt, truncated or stale: rebuild
            log.warning("Cached task file %s is unreadable (%s); rebuilding it.", path, exc)
    task = generate_task(name, seed)
    try:
        _save(task, path)
    except OSError as exc:
        log.warning("Could not cache task %r in %s (%s); it will be rebuilt next time.", name, path.parent, exc)
    return task
