"""Where mutask keeps what it builds on demand (task datasets, the default root)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MUTASK_CACHE``, else ``$XDG_CACHE_HOME/mutask``, else ``~/.cache/mutask``."""
    env = os.environ.get("MUTASK_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mutask"
