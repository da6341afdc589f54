"""Task data: class names and three splits of images with labels.

Every task, embedded or an ImageFolder directory, becomes a :class:`TaskData` with three
splits. A split, whichever its kind, offers:

* ``len(split)`` and ``split.labels`` (int64, one per image);
* ``split.resized(size, resize="bilinear")``: every image at size x size, steps 1-2 of
  :mod:`mutask.preprocessing` with Pillow's ``resize`` filter ("bilinear" or "bicubic"), as an
  array-like of uint8 (N, size, size, 3) with ``len()``, ``.shape``, slicing ``[i:j]`` and
  integer-array indexing, each giving a real ``np.ndarray`` (step 3 turns those into the
  model's input);
* ``split.raw(i)``: image i at its native size, uint8 (H, W, 3).

:class:`Split` holds its images in memory (the embedded suite) and keeps each resizing in memory.
:class:`FolderSplit` holds file paths (ImageFolder tasks): it decodes on first use, per size and
filter, into an on-disk cache (:mod:`.imagecache`) and reads rows from it, so its memory does
not grow with the number of images. Files that turn out not to decode fully are left out: once
any cache of a folder split exists (built now or by an earlier process), its ``len`` and
``labels`` count only the images that decode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mutask.errors import MutaskError
from mutask.preprocessing import resize_rgb, to_rgb_array

from . import imagecache
from .imagecache import RESIZES, CachedImages

log = logging.getLogger("mutask")


def _check_resize(size, resize: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise MutaskError(f"image size {size!r} is not a positive integer: pass a size such as 224.")
    if resize not in RESIZES:
        raise MutaskError(f"unknown resize filter {resize!r}: use one of {', '.join(RESIZES)}.")


@dataclass
class Split:
    """One split held in memory. ``images`` is a uint8 array (N, H, W, 3) when all images
    share a size, else a list of uint8 (H_i, W_i, 3) arrays."""

    images: np.ndarray | list
    labels: np.ndarray
    _resized: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> np.ndarray:
        """Image ``i`` at its native size, uint8 (H, W, 3)."""
        return np.asarray(self.images[i], dtype=np.uint8)

    def resized(self, size: int, resize: str = "bilinear") -> np.ndarray:
        """All images at size x size (uint8, N x size x size x 3), kept in memory per size and filter."""
        _check_resize(size, resize)
        key = (int(size), resize)
        if key not in self._resized:
            imgs = self.images
            if isinstance(imgs, np.ndarray) and imgs.shape[1] == size and imgs.shape[2] == size:
                out = imgs
            elif len(imgs):
                out = np.stack([resize_rgb(a, size, resize) for a in imgs])
            else:
                out = np.zeros((0, size, size, 3), np.uint8)
            self._resized[key] = out
        return self._resized[key]


class FolderSplit:
    """One split of an ImageFolder task: its files and labels, decoded on demand.

    ``paths`` are the files to open, ``relative`` the same files relative to the folder (for the
    cache key), ``stats`` their (byte size, mtime in ns) when indexed, ``labels`` theirs, all in
    row order; ``source`` is the folder's real path. Before any cache of the split exists, every
    indexed file counts; after, only those that decode (see the module docstring)."""

    def __init__(self, task: str, split: str, source: str, paths: list[str], relative: list[str],
                 stats: list[tuple[int, int]], labels: np.ndarray, *, show_progress: bool | None = None):
        if not len(paths) == len(relative) == len(stats) == len(labels):
            raise ValueError("paths, relative, stats and labels must have one entry per file")
        self.task, self.split, self.source = task, split, source
        self.paths = list(paths)
        self.relative = list(relative)
        self.stats = list(stats)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.show_progress = show_progress
        self._valid: np.ndarray | None = None  # which files decode, once a cache says
        self._rows_valid: np.ndarray | None = None  # their file indices
        self._labels_valid: np.ndarray | None = None  # their labels
        self._probed = False
        self._directory = None
        self._views: dict[tuple[int, str], CachedImages] = {}

    def __repr__(self) -> str:
        return f"FolderSplit({self.task!r}, {self.split!r}, {len(self)} images)"

    @property
    def cache_directory(self):
        """Where this split's caches live (:func:`.imagecache.split_directory`)."""
        if self._directory is None:
            files = [(r, s, m) for r, (s, m) in zip(self.relative, self.stats)]
            self._directory = imagecache.split_directory(self.source, self.split, files)
        return self._directory

    # -- which rows count ---------------------------------------------------------------
    def _known_validity(self) -> np.ndarray | None:
        """The validity of every file, read from an existing cache on first need; None before
        any cache of this split exists."""
        if self._valid is None and not self._probed and self.paths:
            self._probed = True
            invalid = imagecache.known_invalid(self.cache_directory, len(self.paths))
            if invalid is not None:
                self._set_invalid(invalid)
        return self._valid

    def _set_invalid(self, invalid: list[int]) -> None:
        valid = np.ones(len(self.paths), dtype=bool)
        valid[np.asarray(invalid, dtype=np.int64)] = False
        if self._valid is not None:
            if not np.array_equal(valid, self._valid):
                raise MutaskError(
                    f"the image caches of task {self.task!r} ({self.split}) disagree on which files decode: delete "
                    f"{self.cache_directory} and run again."
                )
            return
        self._valid = valid
        self._rows_valid = np.flatnonzero(valid)
        self._labels_valid = self._labels[valid]
        if invalid:
            log.warning(
                "Task %r: %d of %d %s image(s) in %s do not decode fully (e.g. %s): they are left out of the split; "
                "replace or remove them.", self.task, len(invalid), len(self.paths), self.split, self.source,
                ", ".join(self.relative[i] for i in invalid[:3]),
            )
        if not valid.any():
            raise MutaskError(
                f"none of the {len(self.paths)} {self.split} images of task {self.task!r} in {self.source} decode: "
                "replace them with readable image files."
            )

    def _rows(self) -> np.ndarray:
        """File index of every row that counts."""
        return np.arange(len(self.paths)) if self._known_validity() is None else self._rows_valid

    def __len__(self) -> int:
        return len(self.paths) if self._known_validity() is None else len(self._rows_valid)

    @property
    def labels(self) -> np.ndarray:
        return self._labels if self._known_validity() is None else self._labels_valid

    # -- images ---------------------------------------------------------------------------
    def raw(self, i: int) -> np.ndarray:
        """Image ``i`` (of the rows that count) decoded at its native size, uint8 (H, W, 3)."""
        path = self.paths[int(i) if self._known_validity() is None else int(self._rows_valid[i])]
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb_array(im)
        except Exception as e:
            raise MutaskError(f"{path} does not decode ({e}): replace or remove the file.") from None

    def resized(self, size: int, resize: str = "bilinear") -> CachedImages:
        """Every image that decodes at size x size with filter ``resize``, read from the split's
        disk cache for that size, built (with a progress bar) on first use."""
        _check_resize(size, resize)
        key = (int(size), resize)
        if not self.paths:
            return np.zeros((0, key[0], key[0], 3), np.uint8)
        if key not in self._views:
            directory = self.cache_directory
            doc = imagecache.read_sidecar(directory, key[0], resize, len(self.paths))
            if doc is None:
                doc = imagecache.build(
                    directory, self.paths, key[0], resize, source=self.source, split=self.split,
                    desc=f"decoding {self.task} {self.split} at {size}px", show_progress=self.show_progress,
                )
            self._set_invalid([int(i) for i in doc["invalid"]])
            self._views[key] = CachedImages(directory / f"{key[0]}-{resize}.u8", key[0], self._rows())
        return self._views[key]


@dataclass
class TaskData:
    """A classification task: name, class names (label i is class_names[i]) and three splits."""

    name: str
    class_names: list[str]
    train: Split | FolderSplit
    validation: Split | FolderSplit
    test: Split | FolderSplit
    image_size: int  # typical image size: the suite's, or a folder's median min(H, W) snapped to 16..384
    description: str = ""
    source: str = ""  # "embedded" or the directory it was loaded from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split | FolderSplit:
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
