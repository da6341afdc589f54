"""``fashion``: real product photos from Fashion-MNIST, where Debian's ``dataset-fashion-mnist``
package installed them (``apt-get install dataset-fashion-mnist``: the four IDX files, gzipped,
in ``/usr/share/datasets/fashion-mnist``; ``$MUTASK_FASHION_MNIST`` names another folder).

A deterministic subset sized like the suite's other tasks: per class 150 train and 25
validation images drawn from Fashion-MNIST's own training split and 40 test images from its test
split (1500 / 250 / 400), the 28x28 grayscale pictures padded with 2 black pixels to 32x32 (no
resampling; the photos lie on black) and tiled to 3 channels.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from mutask.errors import MutaskError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
PER_CLASS = (150, 25, 40)  # train, validation (both from the training split), test (from the test split)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL = "apt-get install dataset-fashion-mnist"


def fashion_dir() -> Path:
    """Where the Fashion-MNIST files are looked for."""
    return Path(os.environ.get("MUTASK_FASHION_MNIST") or DEFAULT_DIR)


def fashion_available() -> bool:
    """Whether all four Fashion-MNIST files are there."""
    d = fashion_dir()
    return all((d / f).is_file() for pair in FILES.values() for f in pair)


def unavailable_reason() -> str:
    """Why ``fashion`` cannot be built here, and the fix."""
    return f"Fashion-MNIST is not installed (no IDX files in {fashion_dir()}): {INSTALL} (Debian/Ubuntu), or set MUTASK_FASHION_MNIST to a folder holding its four .gz files"


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, big-endian dims)."""
    raw = gzip.decompress(path.read_bytes())
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes for dimensions {dims}")
    return data.reshape(dims)


def _read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (fashion_dir() / f for f in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != (len(images),) or labels.max() >= len(CLASSES):
        raise ValueError(f"{images_file} and {labels_file} do not hold matching 28x28 images and labels 0-9")
    return images, labels.astype(np.int64)


def _pick(labels: np.ndarray, counts: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets, ``counts[j]`` images of every class in set j, shuffled."""
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < sum(counts):
            raise ValueError(f"class {CLASSES[c]!r} has {len(idx)} images, fewer than {sum(counts)}")
        for j, start in enumerate(np.cumsum((0,) + counts[:-1])):
            parts[j].append(idx[start : start + counts[j]])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _to_rgb32(images: np.ndarray) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3)


def build_fashion(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train, validation and test images (N, 32, 32, 3) uint8 and labels, for ``rng``."""
    if not fashion_available():
        raise MutaskError(f"Task 'fashion' is unavailable here: {unavailable_reason()}.")
    try:
        train_x, train_y = _read_split("train")
        test_x, test_y = _read_split("test")
    except (OSError, ValueError, EOFError) as e:
        raise MutaskError(f"Task 'fashion': the Fashion-MNIST files in {fashion_dir()} are unreadable ({e}); reinstall them ({INSTALL}).") from e
    train_idx, val_idx = _pick(train_y, PER_CLASS[:2], rng)
    (test_idx,) = _pick(test_y, PER_CLASS[2:], rng)
    xs = [_to_rgb32(train_x[train_idx]), _to_rgb32(train_x[val_idx]), _to_rgb32(test_x[test_idx])]
    ys = [train_y[train_idx], train_y[val_idx], test_y[test_idx]]
    return xs, ys
