"""Numbered versions of a system in one directory: the contract between ``mutask export --into
DIR`` (which writes the next one) and the server's model repository
(:mod:`mutask.serving.repository`, which serves the newest).

``DIR/1``, ``DIR/2``, ...: each an artifact (``export/FORMAT.md``), ordered numerically. Only
names made of ASCII digits are versions; everything else is ignored, in particular the
temporary ``.N.export-*`` directory an export writes into before renaming it to ``DIR/N``
(one rename: a version appears complete or not at all).
"""

from __future__ import annotations

import os
import pathlib

from mutask.errors import MutaskError

from .manifest import MANIFEST


def is_repository(root) -> bool:
    """A directory of numbered versions: a directory without a manifest of its own."""
    root = pathlib.Path(root)
    return root.is_dir() and not (root / MANIFEST).exists()


def version_numbers(root) -> list[int]:
    """The numbered versions in ``root``, oldest first."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return sorted(int(e.name) for e in entries if e.name.isascii() and e.name.isdigit() and e.is_dir())


def next_version_path(root) -> pathlib.Path:
    """Where ``mutask export --into root`` writes: ``root/(newest + 1)``."""
    root = pathlib.Path(root)
    if root.exists() and not root.is_dir():
        raise MutaskError(f"--into {root}: it is a file; name a directory of numbered versions (it is created if missing).")
    if (root / MANIFEST).exists():
        raise MutaskError(f"--into {root}: it is one artifact (it holds {MANIFEST}), not a directory of versions; "
                          f"name a new directory, or move this artifact to {root}/1 first.")
    return root / str(max(version_numbers(root), default=0) + 1)
