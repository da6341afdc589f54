"""Where mutask keeps what it builds on demand (task datasets, the default root), and writing
a JSON document atomically (a STATE's ``state.json``, the image cache's index)."""

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$MUTASK_CACHE``, else ``$XDG_CACHE_HOME/mutask``, else ``~/.cache/mutask``."""
    env = os.environ.get("MUTASK_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mutask"


def write_document(path, doc: dict, *, indent: int | None = 1) -> None:
    """Write ``doc`` as JSON to ``path`` atomically: a temporary file in the same directory,
    flushed to disk, then renamed over ``path`` (a crash leaves the old file or the new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; follow the umask like open() does
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
