"""Versioned JSON documents (a STATE's ``state.json``, an artifact's ``manifest.json``): reading
one with errors that name the file, the problem and the fix (writing one:
:func:`mutask.cache.write_document`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MutaskError


def read_document(path, *, format: str, version: int, version_key: str, what: str, fix: str, error=MutaskError) -> dict:
    """The JSON object in ``path`` after checking that it is a ``format`` document of
    ``version`` (stored under ``version_key``). ``what`` names the document in messages
    ("mutask STATE"), ``fix`` says what to do; failures raise ``error`` (a MutaskError)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} does not exist: not a {what}. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}): the {what} is damaged. {fix}") from None
    except RecursionError:
        raise error(f"{path} nests too deeply to be a {what}: it is damaged. {fix}") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != format:
        raise error(f"{path} is not a {what} (format {found!r}, expected {format!r}). {fix}")
    if doc.get(version_key) != version:
        raise error(f"{path} has {version_key} {doc.get(version_key)!r}; this mutask reads version {version}. {fix}")
    return doc
