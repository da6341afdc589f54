"""Glyph tasks: characters rendered with the DejaVu fonts that matplotlib ships, under a random
affine transform (rotation, scale, shear, translation), random stroke/background colours and noise.

Tasks built here: ``latin``, ``greek``, ``font_style`` and the pretraining source ``symbols``.
A generator maps (labels, rng) to uint8 (N, 32, 32, 3) images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mutask.errors import MutaskError

from .render import IMAGE_SIZE, RENDER_SIZE, composite, contrast_pair, downsample

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


# --------------------------------------------------------------------------- fonts


@lru_cache(maxsize=None)
def font_path(key: str) -> Path:
    """The DejaVu font file of ``key`` (a :data:`FONT_FILES` key) in matplotlib's data."""
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
    """The keys among ``fonts`` whose font has a glyph for ``char``."""
    return tuple(k for k in fonts if ord(char) in font_codepoints(k))


@lru_cache(maxsize=None)
def _font(key: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(key)), _GLYPH_PT)


@lru_cache(maxsize=None)
def glyph_canvas(key: str, char: str) -> tuple[Image.Image, float]:
    """The glyph drawn white on black, its ink box centred on the canvas, and its fit factor
    (cached while a task builds; ``glyph_canvas.cache_clear()`` frees them)."""
    font = _font(key)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (_GLYPH_CANVAS, _GLYPH_CANVAS), 0)
    c = _GLYPH_CANVAS / 2
    ImageDraw.Draw(canvas).text((c - (left + right) / 2, c - (top + bottom) / 2), char, font=font, fill=255)
    fit = min(1.0, _GLYPH_FIT / max(right - left, bottom - top, 1))
    return canvas, fit


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class GlyphAug:
    """Ranges of a glyph's random transform, colours and noise."""

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
    shift = rng.uniform(-aug.shift, aug.shift, (n, 2)) * (RENDER_SIZE / IMAGE_SIZE)
    hi = np.empty((n, RENDER_SIZE, RENDER_SIZE), np.uint8)
    c_in = np.full(2, _GLYPH_CANVAS / 2)
    c_out = np.full(2, RENDER_SIZE / 2)
    for i, (key, char) in enumerate(glyphs):
        canvas, fit = glyph_canvas(key, char)
        co, si = np.cos(theta[i]), np.sin(theta[i])
        forward = scale[i] * fit * np.array([[co, -si], [si, co]]) @ np.array([[1.0, shear[i]], [0.0, 1.0]])
        inv = np.linalg.inv(forward)
        off = c_in - inv @ (c_out + shift[i])
        coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
        hi[i] = np.asarray(canvas.transform((RENDER_SIZE, RENDER_SIZE), Image.AFFINE, coeffs, resample=Image.BILINEAR))
    mask = downsample(hi) / np.float32(255)
    fg, bg = contrast_pair(n, rng, *aug.contrast)
    return composite(mask, fg, bg, rng, aug.noise)


# --------------------------------------------------------------------------- task generators


def glyph_generator(chars: str, fonts=ALL_FONTS, aug: GlyphAug = GlyphAug()):
    """A generator for "which of ``chars``": label y is ``chars[y]`` in a random font among
    ``fonts`` that has it."""

    def generate(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        choices = [fonts_with(ch, fonts) for ch in chars]
        picks = rng.random(len(labels))
        glyphs = [(choices[y][int(p * len(choices[y]))], chars[y]) for y, p in zip(labels, picks)]
        return render_glyphs(glyphs, rng, aug)

    return generate


def generate_font_style(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``font_style``: label y is the font :data:`FONT_STYLE_CLASSES` [y] of a random letter or digit."""
    chars = rng.integers(0, len(FONT_STYLE_GLYPHS), len(labels))
    glyphs = [(FONT_STYLE_CLASSES[y], FONT_STYLE_GLYPHS[c]) for y, c in zip(labels, chars)]
    aug = GlyphAug(rotation=5.0, scale=(0.9, 1.1), shear=0.0, shift=2.0, contrast=(110.0, 220.0), noise=(0.0, 8.0))
    return render_glyphs(glyphs, rng, aug)
