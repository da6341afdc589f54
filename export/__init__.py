"""Export: an evolved system to ONNX graphs over one deduplicated weights file (``mutask export``).
Importing this package never imports torch: it holds the reader (what the server ships); writing
is :mod:`export.build` (torch), checking :mod:`export.verify`, byte accounting :mod:`export.sizes`.
The format: ``export/FORMAT.md``.
"""

from .artifact import FORMAT_VERSION, Artifact, ArtifactError, load_artifact
from .manifest import Manifest

__all__ = ["FORMAT_VERSION", "Artifact", "ArtifactError", "Manifest", "load_artifact"]
