"""Resolve a task spec to :class:`TaskData`: an embedded suite task, or an ImageFolder directory.

A spec is one of

* an embedded task name: one of :data:`EMBEDDED_TASKS` (the suite, in its fixed visiting order)
  or :data:`PRETRAIN_TASK` (``symbols``, the offline pretraining source, disjoint from the suite),
  or one of :data:`OPTIONAL_TASKS` (``fashion``: embedded where its data is installed, else a
  clear error that says how to install it);
* a directory path (``~`` is expanded): an ImageFolder task named after the directory's base name;
* ``NAME=DIR``: the directory ``DIR`` as a task called ``NAME``.

Embedded names win over a directory of the same name in the working directory; write ``./digits``
to mean the directory.
"""

from __future__ import annotations

import os
import re

from mutask.evolve.data import TaskData
from mutask.evolve.folder import load_folder
from mutask.evolve.suite import ALL_NAMES, IMAGE_SIZE, OPTIONAL, PRETRAIN, SUITE_ORDER, TASKS, load_embedded
from mutask.evolve.suite.cache import cache_path
from mutask.errors import MutaskError

EMBEDDED_TASKS: tuple[str, ...] = SUITE_ORDER
PRETRAIN_TASK = PRETRAIN
OPTIONAL_TASKS: tuple[str, ...] = OPTIONAL

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def load_task(spec: str, seed: int = 0, *, show_progress: bool | None = None) -> TaskData:
    """The task ``spec`` names (see the module docstring), deterministic for ``seed``.
    ``show_progress``: progress bars while a directory task is indexed and decoded (None: on a
    terminal)."""
    spec = str(spec)
    if spec in ALL_NAMES:
        return load_embedded(spec, seed)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return load_folder(path, seed=seed, show_progress=show_progress)
    if "=" in spec:
        name, directory = spec.split("=", 1)
        if not _NAME.match(name):
            raise MutaskError(
                f"Task name {name!r} in {spec!r} is not valid: use letters, digits, '_', '-', '.' or '+' "
                "(starting with a letter, digit or '_'), as in NAME=DIR."
            )
        if not directory:
            raise MutaskError(f"Task spec {spec!r} has no directory after '=': write NAME=DIR.")
        return load_folder(directory, name=name, seed=seed, show_progress=show_progress)
    if os.path.exists(path):
        return load_folder(path, seed=seed, show_progress=show_progress)  # raises: not a directory
    looks_like_path = os.sep in spec or spec.startswith((".", "~")) or (os.altsep and os.altsep in spec)
    if looks_like_path:
        return load_folder(path, seed=seed, show_progress=show_progress)  # raises: does not exist
    raise MutaskError(
        f"Unknown task {spec!r}: use an embedded task ({', '.join(EMBEDDED_TASKS + OPTIONAL_TASKS)}, or {PRETRAIN_TASK} "
        "for pretraining), a directory path with one sub-folder of images per class, or NAME=DIR."
    )


def describe_tasks(seed: int = 0) -> list[dict]:
    """``TaskData.info()`` of every embedded suite task (not the pretraining task), in visiting order."""
    return [load_task(name, seed).info() for name in EMBEDDED_TASKS]


def describe_optional_tasks(seed: int = 0) -> list[dict]:
    """The optional embedded tasks: ``TaskData.info()`` plus ``"available": True`` where their data
    is installed, else what they would hold (name, classes, split sizes, image size, description)
    with ``"available": False`` and ``"install"``: the reason and the fix."""
    rows = []
    for name in OPTIONAL_TASKS:
        task = TASKS[name]
        if task.available() or cache_path(name, seed).exists():  # its data, or the task built from it before
            rows.append(dict(load_task(name, seed).info(), available=True))
            continue
        per_class = dict(zip(("train", "validation", "test"), task.per_class))
        classes = task.class_names()
        rows.append({
            "name": name,
            "num_classes": len(classes),
            "splits": {k: v * len(classes) for k, v in per_class.items()},
            "image_size": IMAGE_SIZE,
            "description": task.description,
            "available": False,
            "install": task.unavailable_reason(),
        })
    return rows
