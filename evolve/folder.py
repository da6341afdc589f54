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
name starts with ``.`` are ignored.

Loading a folder *indexes* it: each file's header is read (Pillow ``Image.open``, no pixel
decoding), which gives its size; a file that does not open as an image is skipped, and their
count is logged as a warning on the ``mutask`` logger. Pixels are decoded later, per image size,
by :class:`~mutask.evolve.data.FolderSplit` into an on-disk cache (:mod:`.imagecache`), with
:func:`mutask.preprocessing.to_rgb_array` (EXIF orientation applied, grayscale/palette/RGBA/CMYK
converted to RGB; first frame of animations); a file whose header opens but whose pixels do not
decode (truncated) is left out of its split then, with a warning.

The task's typical ``image_size`` is the median over train images of min(H, W) (from the
headers), rounded to a multiple of 16 and clamped to [16, 384] (the ``image_size`` values that
muNet's hyperparameter list holds). ``mutask evolve`` starts a task's paths at
min(the root's image size, this size), at least twice the root's patch size, unless
``--image-size`` says otherwise (see :func:`mutask.evolve.run.start_image_size`). Class names
are the class folder names, sorted; label i is class_names[i].
"""

from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mutask.errors import MutaskError
from mutask.evolve.data import FolderSplit, TaskData
from mutask.cores import available_cores

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


def _probe(path: Path) -> tuple[int, int, int, int] | None:
    """(height, width, byte size, mtime in ns) of an image file from its header alone, or None
    when it does not open as an image."""
    try:
        st = os.stat(path)
        with Image.open(path) as im:
            width, height = im.size
    except Exception:  # unreadable, not an image, decompression bomb...: skipped
        return None
    if width <= 0 or height <= 0:
        return None
    return height, width, st.st_size, st.st_mtime_ns


def _probe_all(paths: list[Path], desc: str, show_progress: bool | None) -> list:
    """:func:`_probe` of every path, in order, by a few threads (reading headers waits on the
    disk), with a progress bar."""
    from mutask.progress import bar as progress_bar

    chunk = 256
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    out: list = []
    disable = None if show_progress is None else not show_progress
    workers = min(16, 4 * available_cores())
    with progress_bar(total=len(paths), desc=desc, unit="file", disable=disable, leave=False) as bar, ThreadPoolExecutor(workers) as pool:
        for probed in pool.map(lambda ps: [_probe(p) for p in ps], chunks):
            out += probed
            bar.update(len(probed))
    return out


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


def load_folder(path, name: str | None = None, seed: int = 0, *, show_progress: bool | None = None) -> TaskData:
    """Index an ImageFolder directory as a task (see the module docstring for layouts and rules).

    ``name`` defaults to the directory's base name. ``seed`` drives the deterministic splitting
    of a flat layout (and the carving of a missing validation/test split); the same directory
    and seed always give the same task. Only file headers are read here; the splits decode on
    demand. ``show_progress``: progress bars for indexing and decoding (None: on a terminal).
    Raises :class:`MutaskError` for a missing path, a directory without class folders, a single
    class, no readable image at all, or a class without any readable image.
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

    # Read every header, in row order, counting what does not open as an image.
    listed = [(split, label, f) for split in _SPLITS for label, c in enumerate(class_names) for f in files[split].get(c, [])]
    headers = _probe_all([f for _, _, f in listed], f"indexing {name}", show_progress)
    kept: dict[str, list] = {s: [] for s in _SPLITS}  # (file, label, (h, w, bytes, mtime))
    per_class = dict.fromkeys(class_names, 0)
    skipped: list[Path] = []
    for (split, label, f), header in zip(listed, headers):
        if header is None:
            skipped.append(f)
            continue
        kept[split].append((f, label, header))
        per_class[class_names[label]] += 1 if split == "train" else 0
    labels = {s: [label for _, label, _ in kept[s]] for s in _SPLITS}
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
    if not any(kept[s] for s in _SPLITS):
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
        if not kept[split]:
            log.warning(
                "Task %r from %s has an empty %s split: add more images per class (3 or more each).",
                name,
                root,
                split,
            )

    source = str(root.resolve())
    splits = {
        s: FolderSplit(
            name, s, source,
            paths=[str(f) for f, _, _ in kept[s]],
            relative=[f.relative_to(root).as_posix() for f, _, _ in kept[s]],
            stats=[(h[2], h[3]) for _, _, h in kept[s]],
            labels=np.asarray(labels[s], dtype=np.int64),
            show_progress=show_progress,
        )
        for s in _SPLITS
    }
    return TaskData(
        name=name,
        class_names=class_names,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        image_size=image_size_for([h[:2] for _, _, h in kept["train"]]),
        description=f"ImageFolder task with {len(class_names)} classes from {root}.",
        source=source,
    )
