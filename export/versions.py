"""Numbered versions of a system in one directory (``DIR/1``, ``DIR/2``, ...: each an artifact):
what ``mutask export --into DIR`` writes (:func:`mutask.export.cli.next_version_path`) and the
server's model repository (:mod:`mutask.serving.repository`) serves. Only names of ASCII digits
are versions, so the temporary ``.N.export-*`` directory an export renames to ``DIR/N`` when it
is complete is never one.
"""

from __future__ import annotations

import os
import pathlib

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
