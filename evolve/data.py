"""Task data: images as uint8 RGB arrays, labels, class names, and the evaluation preprocessing.

Every task, embedded or an ImageFolder directory, becomes a :class:`TaskData` with three
:class:`Split` s. Images stay uint8 RGB (H, W, 3) at their native size; a path at image size S
sees them through :meth:`Split.resized`, which is the *evaluation preprocessing contract*
that export writes into the manifest and serving re-implements without torch:

1. decode, apply the EXIF orientation, convert to RGB (grayscale is tiled, alpha dropped);
2. resize to S x S with Pillow's bilinear filter (skipped when the image already is S x S);
3. float32 pixels / 127.5 - 1, so values lie in [-1, 1]; channels first (NCHW).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

# The contract above, as written into the export manifest.
PREPROCESSING = {
    "mode": "RGB",
    "exif_transpose": True,
    "resize": "bilinear",
    "scale": 1.0 / 127.5,
    "offset": -1.0,
    "layout": "NCHW",
}


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Step 1 of the contract: a decoded Pillow image to a uint8 (H, W, 3) array."""
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_rgb(array: np.ndarray, size: int) -> np.ndarray:
    """Step 2 of the contract: square bilinear resize of one uint8 (H, W, 3) array."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(batch_uint8: np.ndarray) -> np.ndarray:
    """Step 3 of the contract: uint8 (N, S, S, 3) to float32 (N, 3, S, S) in [-1, 1]."""
    x = batch_uint8.astype(np.float32) * np.float32(PREPROCESSING["scale"]) + np.float32(PREPROCESSING["offset"])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass
class Split:
    """One split of a task. ``images`` is a uint8 array (N, H, W, 3) when all images share a
    size, else a list of uint8 (H_i, W_i, 3) arrays (ImageFolder data of mixed sizes)."""

    images: np.ndarray | list
    labels: np.ndarray
    _resized: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def resized(self, size: int) -> np.ndarray:
        """All images at size x size (uint8, N x size x size x 3), cached per size."""
        if size not in self._resized:
            imgs = self.images
            if isinstance(imgs, np.ndarray) and imgs.shape[1] == size and imgs.shape[2] == size:
                out = imgs
            else:
                out = np.stack([resize_rgb(a, size) for a in imgs]) if len(imgs) else np.zeros((0, size, size, 3), np.uint8)
            self._resized[size] = out
        return self._resized[size]


@dataclass
class TaskData:
    """A classification task: name, class names (label i is class_names[i]) and three splits."""

    name: str
    class_names: list[str]
    train: Split
    validation: Split
    test: Split
    image_size: int  # native (typical) image size, used as the default path image size
    description: str = ""
    source: str = ""  # "embedded" or the directory it was loaded from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def info(self) -> dict:
        """What ``mutask tasks --json`` prints for this task."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "splits": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "image_size": self.image_size,
            "description": self.description,
        }
