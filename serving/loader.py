"""Where the served artifact comes from, and refusing a bad one before anything starts.

The artifact is named by ``MUTASK_ARTIFACT`` (an export directory) or ``MUTASK_BENTOML_MODEL``
(a BentoML model tag, as written by ``mutask export --bentoml-model``). :func:`open_artifact`
loads and verifies it (:func:`mutask.export.artifact.load_artifact`: the manifest's schema,
every file's sha256, every weight reference): a missing, truncated or tampered
artifact raises :class:`ServingError` with a message that names the problem, and the server
refuses to start (the CLI exits with code 2).
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
    if os.environ.get(ENV_ARTIFACT, "").strip():
        return "path", os.environ[ENV_ARTIFACT].strip()
    if os.environ.get(ENV_MODEL, "").strip():
        return "model", os.environ[ENV_MODEL].strip()
    return None


def _model_dir(tag: str) -> Path:
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except Exception as e:
        raise ServingError(f"{ENV_MODEL}={tag}: no such BentoML model in the model store ({e}); `bentoml models list` shows them") from None
    return Path(model.path)


def _find_artifact_dir(root: Path) -> Path:
    """The artifact inside a BentoML model directory: the directory itself, or the one
    sub-directory holding a manifest."""
    from mutask.export.artifact import ArtifactError, load_artifact

    try:
        load_artifact(root, verify=False)
        return root
    except ArtifactError:
        pass
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            load_artifact(sub, verify=False)
            return sub
        except ArtifactError:
            continue
    return root  # load_artifact will say what is wrong with it


def resolve_artifact_path(artifact: str | os.PathLike | None = None) -> Path:
    """The artifact directory: ``artifact`` if given, else from the environment."""
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
    return _find_artifact_dir(_model_dir(value))


def open_artifact(artifact: str | os.PathLike | None = None, *, cache: bool = True):
    """Load and verify the artifact (see :func:`resolve_artifact_path`); :class:`ServingError`
    (exit code 2) when it is missing, truncated or tampered with. Verified artifacts are
    cached (the last one only), so a process that opens it twice verifies it once."""
    from mutask.export.artifact import ArtifactError, load_artifact

    path = resolve_artifact_path(artifact)
    key = str(path.resolve()) if path.exists() else str(path)
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
        if not path.exists():
            raise ServingError(f"artifact {path} does not exist: pass a directory written by `mutask export`")
        if not path.is_dir():
            raise ServingError(f"artifact {path} is not a directory: pass a directory written by `mutask export`")
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
