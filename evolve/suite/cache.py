"""Built embedded tasks cached as compressed ``.npz`` files in ``cache_dir()/tasks/``.

A file is written to a temporary name then renamed, so a crash never leaves a half file; an
unreadable or inconsistent cache file is rebuilt.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from mutask.cache import cache_dir
from mutask.errors import MutaskError
from mutask.evolve.data import Split, TaskData

from .registry import TASKS, generate_task
from .render import IMAGE_SIZE

log = logging.getLogger("mutask")

CACHE_VERSION = 1
_SPLITS = ("train", "validation", "test")


def cache_path(name: str, seed: int) -> Path:
    """Where task ``name`` built for ``seed`` is cached."""
    return cache_dir() / "tasks" / f"{name}-seed{seed}-v{CACHE_VERSION}.npz"


def save(task: TaskData, path: Path) -> None:
    """Write ``task`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
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


def load(name: str, path: Path) -> TaskData:
    """Read a cached task; raises (any exception) if it is unreadable or inconsistent."""
    task = TASKS[name]
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
    if name not in TASKS:
        raise KeyError(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MutaskError(f"Task seed {seed!r} is not a non-negative integer: pass a seed such as 0.")
    seed = int(seed)
    path = cache_path(name, seed)
    if path.exists():  # built before (an optional task's data need not be here any more)
        try:
            return load(name, path)
        except Exception as exc:  # corrupt, truncated or stale: rebuild
            log.warning("Cached task file %s is unreadable (%s); rebuilding it.", path, exc)
    if not TASKS[name].available():
        raise MutaskError(f"Task {name!r} is unavailable here: {TASKS[name].unavailable_reason()}.")
    task = generate_task(name, seed)
    try:
        save(task, path)
    except OSError as exc:
        log.warning("Could not cache task %r in %s (%s); it will be rebuilt next time.", name, path.parent, exc)
    return task
