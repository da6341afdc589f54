"""ImageFolder tasks: a directory with one sub-folder per class becomes a :class:`TaskData`.

Two layouts are understood:

* **flat**: ``DIR/<class>/<images>``. Each class is split deterministically (its files sorted by
  relative path, then shuffled by a generator seeded from ``(seed, crc32(class name))``) about
  70/15/15 into train/validation/test, with at least one image in every split when the class
  has 3 or more images (a class of 2 gives 1 train + 1 validation, a class of 1 only train).
* **split**: ``DIR/train/<class>/...`` plus ``DIR/val/`` (or ``DIR/validation/``) and/or
  ``DIR/test/``, each holding class folders. A missing validation or test split is carved
  deterministically (about 15% of each class) from train. ``DIR/train`` alone also counts.

Images may sit anywhere below a class folder (sub-folders are searched). Files are recognised by
extension (png, jpg/jpeg, bmp, gif, webp, tif/tiff, ppm/pgm/pbm); other files and anything whose
name starts with ``.`` are ignored. Every image is decoded with :func:`mutask.preprocessing.to_rgb_array`
(EXIF orientation applied, grayscale/palette/RGBA/CMYK converted to RGB; first frame of animations).
Files Pillow cannot decode are skipped, and their count is logged as a warning on the
``mutask`` logger.

Images keep their native size: a split's ``images`` is one stacked uint8 (N, H, W, 3) array when
every image of the task has the same size, else a list of (H_i, W_i, 3) arrays. The task's default
``image_size`` is the median over train images of min(H, W), rounded to a multiple of 16 and
clamped to [16, 384]. Class names are the class folder names, sorted; label i is class_names[i].
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mutask.evolve.data import Split, TaskData
from mutask.preprocessing import to_rgb_array
from mutask.errors import MutaskError

log = logging.getLogger("mutask")

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
SPLIT_DIRS = ("train", "val", "validation", "test")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 384
_SPLITS = ("train", "validation", "test")


def _visible_subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir()), key=lambda p: p.name)


def _image_files(class_dir: Path) -> tuple[list[Path], int]:
    """Image files below ``class_dir`` (recursively, hidden entries skipped), sorted by relative
    path, and how many were passed over: a symbolic link is followed only while it stays inside
    the class folder (so a link to a parent or to another class adds nothing, and a link loop
    ends), and a file reached twice through links counts once."""
    base = class_dir.resolve()
    found: dict[Path, Path] = {}  # real file -> the path it was first found under
    seen_dirs: set[Path] = set()
    passed_over = 0
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        real_root = Path(root).resolve()
        if real_root in seen_dirs or not real_root.is_relative_to(base):
            dirs[:] = []
            passed_over += len(files)
            continue
        seen_dirs.add(real_root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root) / f
            real = path.resolve()
            if not real.is_relative_to(base) or real in found:
                passed_over += 1
                continue
            found[real] = path
    return sorted(found.values(), key=lambda p: p.relative_to(class_dir).as_posix()), passed_over


def _split_counts(n: int, fractions: tuple[float, float]) -> tuple[int, int]:
    """How many of ``n`` files go to validation and test (``fractions`` 0 means that split is not carved)."""
    if n >= 3:
        val = max(1, round(fractions[0] * n)) if fractions[0] else 0
        test = max(1, round(fractions[1] * n)) if fractions[1] else 0
        return val, test
    if n == 2 and fractions[0]:
        return 1, 0
    if n == 2 and fractions[1]:
        return 0, 1
    return 0, 0


def _carve(files: list[Path], class_name: str, seed: int, fractions: tuple[float, float]):
    """Deterministically split one class's sorted files into (train, validation, test) lists."""
    rng = np.random.default_rng([int(seed), zlib.crc32(class_name.encode("utf-8"))])
    order = rng.permutation(len(files))
    n_val, n_test = _split_counts(len(files), fractions)
    picked = [files[i] for i in order]
    val, test, train = picked[:n_val], picked[n_val : n_val + n_test], picked[n_val + n_test :]
    train.sort()
    val.sort()
    test.sort()
    return train, val, test


def _decode(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            im.load()
            arr = to_rgb_array(im)
    except Exception:  # unreadable, truncated, not an image, decompression bomb...: skipped
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        return None
    return arr


def _detect_layout(root: Path, subdirs: list[Path]) -> dict[str, Path] | None:
    """The split folders when ``root`` uses the split layout, else None (flat layout)."""
    names = {p.name.lower(): p for p in subdirs}
    if "train" not in names:
        return None
    others = [n for n in names if n in SPLIT_DIRS and n != "train"]
    if not others and len(subdirs) > 1:
        return None  # a class that happens to be called "train"
    if "val" in names and "validation" in names:
        raise MutaskError(
            f"Task directory {root} has both val/ and validation/ split folders: keep one of them "
            "(merge the other into it)."
        )
    extra = [p.name for p in subdirs if p.name.lower() not in SPLIT_DIRS]
    if extra:
        log.warning(
            "Task directory %s uses train/val/test split folders; ignoring the other folder(s) %s.",
            root,
            ", ".join(sorted(extra)),
        )
    layout = {"train": names["train"]}
    if "val" in names or "validation" in names:
        layout["validation"] = names.get("val") or names["validation"]
    if "test" in names:
        layout["test"] = names["test"]
    return layout


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in _visible_subdirs(split_dir)}


def _drop_cross_split_duplicates(files: dict) -> int:
    """Remove from validation and test every file that an earlier split holds too (the same
    file through a link): no image in two splits. Returns how many were removed."""
    seen: set[Path] = set()
    dropped = 0
    for split in _SPLITS:
        for c, paths in files[split].items():
            keep = []
            for p in paths:
                real = p.resolve()
                if real in seen:
                    dropped += 1
                else:
                    seen.add(real)
                    keep.append(p)
            files[split][c] = keep
    return dropped


def _warn_unmeasured_classes(task: str, class_names: list[str], labels: dict) -> None:
    """A warning for classes without validation or test images: their accuracy is not measured."""
    for split in ("validation", "test"):
        present = set(labels[split])
        missing = [c for i, c in enumerate(class_names) if i not in present]
        if missing and labels[split]:
            log.warning(
                "Task %r: class(es) %s have no %s images, so that split does not measure them; give every class at "
                "least 3 images (or its own %s folder).", task, ", ".join(repr(c) for c in missing[:5]) + (" ..." if len(missing) > 5 else ""),
                split, "val" if split == "validation" else split,
            )


def image_size_for(sizes: list[tuple[int, int]]) -> int:
    """Median of min(H, W), rounded to a multiple of 16, clamped to [16, 384]."""
    if not sizes:
        return MIN_IMAGE_SIZE
    med = float(np.median([min(h, w) for h, w in sizes]))
    return int(min(MAX_IMAGE_SIZE, max(MIN_IMAGE_SIZE, 16 * round(med / 16))))


def load_folder(path, name: str | None = None, seed: int = 0) -> TaskData:
    """Load an ImageFolder directory as a task (see the module docstring for layouts and rules).

    ``name`` defaults to the directory's base name. ``seed`` drives the deterministic splitting
    of a flat layout (and the carving of a missing validation/test split); the same directory
    and seed always give the same task. Raises :class:`MutaskError` for a missing path, a
    directory without class folders, a single class, no readable image at all, or a class
    without any readable image.
    """
    root = Path(os.path.expanduser(str(path)))
    if not root.exists():
        raise MutaskError(
            f"Task directory {root} does not exist: pass an existing directory with one sub-folder of images per class."
        )
    if not root.is_dir():
        raise MutaskError(
            f"Task path {root} is not a directory: pass a directory with one sub-folder of images per class."
        )
    if name is None:
        name = root.resolve().name or str(root)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MutaskError(f"Task seed {seed!r} is not a non-negative integer: pass a seed such as 0.")

    subdirs = _visible_subdirs(root)
    if not subdirs:
        raise MutaskError(
            f"Task directory {root} has no class sub-folders: put the images of each class in their own "
            f"sub-folder, e.g. {root}/cat/*.jpg and {root}/dog/*.jpg."
        )
    layout = _detect_layout(root, subdirs)

    # files[split][class name] -> sorted list of files
    files: dict[str, dict[str, list[Path]]] = {s: {} for s in _SPLITS}
    passed_over = 0  # links leaving a class folder, files reached twice
    if layout is None:
        for d in subdirs:
            found, n = _image_files(d)
            passed_over += n
            tr, va, te = _carve(found, d.name, seed, (0.15, 0.15))
            files["train"][d.name], files["validation"][d.name], files["test"][d.name] = tr, va, te
        where = {c: root / c for c in files["train"]}
    else:
        train_classes = _class_dirs(layout["train"])
        if not train_classes:
            raise MutaskError(
                f"Split folder {layout['train']} has no class sub-folders: put the training images of each "
                f"class in their own sub-folder, e.g. {layout['train']}/cat/*.jpg."
            )
        fractions = (0.0 if "validation" in layout else 0.15, 0.0 if "test" in layout else 0.15)
        for c, d in train_classes.items():
            found, n = _image_files(d)
            passed_over += n
            tr, va, te = _carve(found, c, seed, fractions)
            files["train"][c], files["validation"][c], files["test"][c] = tr, va, te
        for split in ("validation", "test"):
            if split not in layout:
                continue
            for c, d in _class_dirs(layout[split]).items():
                if c not in train_classes:
                    raise MutaskError(
                        f"Class folder {d} has no matching folder in {layout['train']}: add training images "
                        f"for class '{c}' there, or remove the folder."
                    )
                files[split][c], n = _image_files(d)
                passed_over += n
        where = {c: layout["train"] / c for c in train_classes}
        passed_over += _drop_cross_split_duplicates(files)

    class_names = sorted(files["train"])
    if len(class_names) < 2:
        raise MutaskError(
            f"Task directory {root} has a single class ({class_names[0]!r}): a classification task needs at "
            "least two class sub-folders; add another class folder."
        )

    # Decode everything, counting what could not be read.
    images: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
    labels: dict[str, list[int]] = {s: [] for s in _SPLITS}
    per_class = dict.fromkeys(class_names, 0)
    skipped: list[Path] = []
    for split in _SPLITS:
        for label, c in enumerate(class_names):
            for f in files[split].get(c, []):
                arr = _decode(f)
                if arr is None:
                    skipped.append(f)
                    continue
                images[split].append(arr)
                labels[split].append(label)
                per_class[c] += 1 if split == "train" else 0
    if passed_over:
        log.warning(
            "Passed over %d image file(s) in %s reached through symbolic links that leave their class folder, or "
            "reached twice (each image counts once, in one split).", passed_over, root,
        )
    _warn_unmeasured_classes(name, class_names, labels)
    if skipped:
        log.warning(
            "Skipped %d unreadable image file(s) in %s (e.g. %s).",
            len(skipped),
            root,
            ", ".join(str(p.relative_to(root)) for p in skipped[:3]),
        )
    if not any(images[s] for s in _SPLITS):
        raise MutaskError(
            f"Task directory {root} has no readable images: put image files (png, jpg, bmp, gif, webp, tiff) "
            "in its class sub-folders."
        )
    empty = [c for c in class_names if per_class[c] == 0]
    if empty:
        raise MutaskError(
            f"Class {empty[0]!r} in {where[empty[0]]} has no readable training images"
            + (f" (nor do {', '.join(repr(c) for c in empty[1:])})" if len(empty) > 1 else "")
            + ": add images to it or remove the folder."
        )
    for split in ("validation", "test"):
        if not images[split]:
            log.warning(
                "Task %r from %s has an empty %s split: add more images per class (3 or more each).",
                name,
                root,
                split,
            )

    shapes = {a.shape for s in _SPLITS for a in images[s]}
    uniform = len(shapes) == 1
    splits = {}
    for s in _SPLITS:
        y = np.asarray(labels[s], dtype=np.int64)
        if uniform:
            h, w, _ = next(iter(shapes))
            x = np.stack(images[s]) if images[s] else np.zeros((0, h, w, 3), np.uint8)
        else:
            x = images[s]
        splits[s] = Split(x, y)

    return TaskData(
        name=name,
        class_names=class_names,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        image_size=image_size_for([a.shape[:2] for a in images["train"]]),
        description=f"ImageFolder task with {len(class_names)} classes from {root}.",
        source=str(root.resolve()),
    )
