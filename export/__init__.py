"""Export: an evolved system to ONNX graphs over one deduplicated weights file (``mutask export``).

Reading needs no torch: :mod:`export.artifact` (``load_artifact``, ``Artifact``,
``ArtifactError``, ``FORMAT_VERSION``) and the manifest schema it validates with
(:mod:`export.manifest`, ``Manifest``) are what the server imports, eagerly. Writing
(:mod:`export.build`, torch) and checking (:mod:`export.verify`) are reachable from here
lazily, so importing this package never imports torch. The format is specified in
``export/FORMAT.md``, generated from the manifest model by :mod:`export.format`. The graphs'
input and output names are :mod:`export.manifest`'s ``TASK_INPUT`` .. ``SEGMENT_OUTPUT``; the
chain-vs-whole-graph check is :mod:`export.chain` (torch-free; serving may call it).
"""

from .artifact import FORMAT_VERSION, Artifact, ArtifactError, artifact_stats, load_artifact
from .manifest import Manifest

__all__ = ["FORMAT_VERSION", "Artifact", "ArtifactError", "Manifest", "artifact_stats", "load_artifact", "export_system", "verify_artifact"]


def __getattr__(name):
    if name == "export_system":
        from .build import export_system

        return export_system
    if name == "verify_artifact":
        from .verify import verify_artifact

        return verify_artifact
    raise AttributeError(f"module 'export' has no attribute {name!r}")
