"""Task data: images as uint8 RGB arrays, labels and class names.

Every task, embedded or an ImageFolder directory, becomes a :class:`TaskData` with three
:class:`Split` s. Images stay uint8 RGB (H, W, 3) at their native size; a path at image size S
sees them through :meth:`Split.resized` (steps 1-2 of :mod:`mutask.preprocessing`, the contract
that evaluation, export and serving share; step 3 turns them into the model's input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mutask.preprocessing import resize_rgb


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
