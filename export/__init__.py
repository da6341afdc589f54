"""Export: an evolved system to ONNX graphs over one deduplicated weights file (``mutask export``).
The reader (what the server ships) is imported eagerly; writing (torch), checking and byte
accounting lazily, so importing this package never imports torch. The format: ``export/FORMAT.md``.
"""

from .artifact import FORMAT_VERSION, Artifact, ArtifactError, load_artifact
from .manifest import Manifest

__all__ = ["FORMAT_VERSION", "Artifact", "ArtifactError", "Manifest", "artifact_stats", "load_artifact", "export_system", "verify_artifact"]
_LAZY = {"export_system": "build", "verify_artifact": "verify", "artifact_stats": "sizes"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
