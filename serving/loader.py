"""Where the served artifact comes from (``MUTASK_ARTIFACT``: a directory; ``MUTASK_BENTOML_MODEL``:
a BentoML model tag, as ``mutask export --bentoml-model`` writes it), and refusing a missing,
truncated or tampered one with a :class:`ServingError` before anything starts (exit code 2).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mutask.errors import MutaskError

ENV_ARTIFACT = "MUTASK_ARTIFACT"
ENV_MODEL = "MUTASK_BENTOML_MODEL"

_CACHE: dict = {}
_LOCK = threading.Lock()


class ServingError(MutaskError):
    """The service cannot start: no artifact, or a bad one. The message names the fix."""


def artifact_source() -> tuple[str, str] | None:
    """("path", DIR) or ("model", TAG) from the environment, or None when neither is set."""
    for kind, name in (("path", ENV_ARTIFACT), ("model", ENV_MODEL)):
        if os.environ.get(name, "").strip():
            return kind, os.environ[name].strip()
    return None


def resolve_artifact_path(artifact: str | os.PathLike | None = None) -> Path:
    """The artifact directory: ``artifact`` if given, else from the environment (a BentoML
    model's directory, or its one sub-directory holding a manifest)."""
    if artifact is not None:
        return Path(artifact).expanduser()
    src = artifact_source()
    if src is None:
        raise ServingError(
            f"no artifact to serve: set {ENV_ARTIFACT}=DIR (a `mutask export` directory) or "
            f"{ENV_MODEL}=TAG (a BentoML model), or run `mutask serve ART`"
        )
    kind, value = src
    if kind == "path":
        return Path(value).expanduser()
    import bentoml

    try:
        root = Path(bentoml.models.get(value).path)
    except Exception as e:
        raise ServingError(f"{ENV_MODEL}={value}: no such BentoML model in the model store ({e}); `bentoml models list` shows them") from None
    return next((d for d in [root, *sorted(root.iterdir())] if (d / "manifest.json").is_file()), root)


def open_artifact(artifact: str | os.PathLike | None = None, *, cache: bool = True):
    """The artifact (see :func:`resolve_artifact_path`), verified
    (:func:`mutask.export.artifact.load_artifact`); :class:`ServingError` when it cannot be
    served. The last one is cached: a process that opens it twice verifies it once."""
    from mutask.export.artifact import ArtifactError, load_artifact

    path = resolve_artifact_path(artifact)
    key = str(path.resolve()) if path.exists() else str(path)
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
        if not path.is_dir():
            raise ServingError(f"artifact {path} {'is not a directory' if path.exists() else 'does not exist'}: pass a directory written by `mutask export`")
        try:
            art = load_artifact(path, verify=True)
        except ArtifactError as e:
            raise ServingError(f"artifact {path} cannot be served: {e}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ServingError(f"artifact {path} cannot be served: {type(e).__name__}: {e}") from None
        if cache:
            _CACHE.clear()  # the last one only: a server that swaps versions keeps none of the old ones
            _CACHE[key] = art
        return art


def clear_cache() -> None:
    """Forget the cached artifact (a swapped-out version's)."""
    with _LOCK:
        _CACHE.clear()
