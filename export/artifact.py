"""Reading an exported artifact, and a directory of numbered versions of one, without torch
(``serving`` imports this module; nothing here writes an artifact). :func:`load_artifact`
validates the manifest with its schema (:mod:`mutask.export.manifest`) and proves that every
weight a graph reads is exactly one tensor of ``weights.safetensors`` (``export/FORMAT.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct

from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, ArtifactError, ComponentEntry, Manifest, SegmentEntry, TaskEntry

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "Artifact", "ArtifactError", "load_artifact"]


def reexport_hint(path) -> str:
    """The fix for an artifact at ``path`` that cannot be read as it is."""
    return f"Re-export it: `mutask export STATE --out {path} --force`."


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_safetensors_header(path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, read with the standard library.
    A tensor's absolute byte range in the file is ``start + begin`` .. ``start + end``."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ArtifactError(f"{path} is truncated: it has no safetensors header.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise ArtifactError(f"{path} is truncated or damaged: its header claims {n} bytes, the file has {size}.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} has a damaged safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has a damaged safetensors header (not a JSON object).")
    start = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path} has a damaged safetensors header: tensor {key!r} has no valid data_offsets.") from None
        if not (0 <= begin <= end and start + end <= size):
            raise ArtifactError(f"{path}: tensor {key!r} lies outside the file ({start + end} > {size} bytes): truncated.")
    return start, header


def external_refs(model_bytes: bytes) -> list[dict]:
    """Every external-data reference of an ONNX model's initializers: ``{"name", "location",
    "offset", "length"}``, read with ``onnx`` without loading the data. ``ValueError`` for bytes
    that are not an ONNX model."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load_model_from_string(bytes(model_bytes))
    except Exception as e:  # protobuf's DecodeError and the like
        raise ValueError(f"not an ONNX model: {e}") from None
    if not model.HasField("graph"):
        raise ValueError("no graph in the model")
    infos = [(t.name, ExternalDataInfo(t)) for t in model.graph.initializer if uses_external_data(t)]
    return [{"name": name, "location": i.location, "offset": i.offset or 0, "length": i.length} for name, i in infos]


class Artifact:
    """An exported artifact: its directory and its (validated) manifest."""

    def __init__(self, path, manifest: Manifest):
        self.path = pathlib.Path(path)
        self.manifest = manifest

    @property
    def tasks(self) -> dict[str, TaskEntry]:
        return self.manifest.tasks

    @property
    def segments(self) -> dict[str, SegmentEntry]:
        return self.manifest.segments

    @property
    def components(self) -> dict[str, ComponentEntry]:
        return self.manifest.components

    @property
    def weights_path(self) -> pathlib.Path:
        return self.path / self.manifest.weights

    def _task(self, task: str) -> TaskEntry:
        try:
            return self.tasks[task]
        except KeyError:
            raise ArtifactError(f"artifact {self.path} has no task {task!r}; it has {sorted(self.tasks)}.") from None

    def graph_path(self, task: str) -> pathlib.Path:
        return self.path / self._task(task).graph

    def segment_path(self, segment_id: str) -> pathlib.Path:
        try:
            return self.path / self.segments[segment_id].graph
        except KeyError:
            raise ArtifactError(f"artifact {self.path} has no segment {segment_id!r}; it has {sorted(self.segments)}.") from None

    def chain(self, task: str) -> list[str]:
        """The task's segment ids, first (image in) to last (logits out)."""
        return list(self._task(task).segments)


def load_artifact(path, verify: bool = True) -> Artifact:
    """Open an artifact directory: validate the manifest and check that every file exists; with
    ``verify`` also every sha256, the weights header, and that every external-data reference of
    every graph is exactly one tensor of the weights file. :class:`ArtifactError` naming the
    file (and the field, for a manifest that does not validate) and the fix."""
    try:
        return _open_artifact(pathlib.Path(path), verify)
    except OSError as e:  # unreadable file or directory (permissions, I/O error)
        raise ArtifactError(f"cannot read {e.filename or path}: {e.strerror or e}. Check its permissions. {reexport_hint(path)}") from None


def _open_artifact(d: pathlib.Path, verify: bool) -> Artifact:
    if not d.is_dir():
        raise ArtifactError(f"artifact {str(d)!r} does not exist. Write one with `mutask export STATE --out {d}`.")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(d)!r} holds no {MANIFEST}: not a mutask artifact (or an unfinished copy). {reexport_hint(d)}")
    manifest = Manifest.load(mpath, reexport_hint(d))
    art = Artifact(d, manifest)
    for name in [manifest.weights, *manifest.graph_files()]:
        if not (d / name).is_file():
            raise ArtifactError(f"artifact {str(d)!r} is missing {name}. Copy the whole directory. {reexport_hint(d)}")
    wpath = art.weights_path
    size = wpath.stat().st_size
    if size != manifest.weights_bytes:
        raise ArtifactError(f"{wpath} has {size} bytes, the manifest says {manifest.weights_bytes}: it is truncated or altered. {reexport_hint(d)}")
    if verify:
        _verify_files(art, size)
    return art


def _verify_files(art: Artifact, size: int) -> None:
    d, manifest, wpath = art.path, art.manifest, art.weights_path
    if sha256_file(wpath) != manifest.weights_sha256:
        raise ArtifactError(f"{wpath} does not match its sha256 in the manifest: the weights were altered or damaged. {reexport_hint(d)}")
    start, header = read_safetensors_header(wpath)
    ranges = {}
    for key, info in header.items():
        if key != "__metadata__":
            b, e = info["data_offsets"]
            ranges[(start + b, e - b)] = key
    for cid, comp in manifest.components.items():
        for key in comp.tensors:
            if key not in header:
                raise ArtifactError(f"{wpath} lacks tensor {key!r} of component {cid}: weights and manifest disagree. {reexport_hint(d)}")
    for name in manifest.graph_files():
        gpath = d / name
        data = gpath.read_bytes()
        rec = manifest.graphs[name]
        if len(data) != rec.bytes or hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ArtifactError(f"{gpath} does not match its sha256 in the manifest: the graph was altered or damaged. {reexport_hint(d)}")
        try:
            refs = external_refs(data)
        except ValueError as e:
            raise ArtifactError(f"{gpath} is not a readable ONNX model ({e}). {reexport_hint(d)}") from e
        for r in refs:
            if r["location"] != manifest.weights:
                raise ArtifactError(f"{gpath}: initializer {r['name']!r} reads {r['location']!r}, not {manifest.weights}.")
            if (r["offset"], r["length"]) not in ranges:  # the header's ranges all lie inside the file
                raise ArtifactError(
                    f"{gpath}: initializer {r['name']!r} reads bytes {r['offset']}..{r['offset'] + (r['length'] or 0)} of {wpath.name}, "
                    f"which are not one tensor of that file ({size} bytes). {reexport_hint(d)}"
                )


# A directory of numbered versions (DIR/1, DIR/2, ...: each an artifact) is what `mutask export
# --into DIR` writes and the server's model repository serves; only names of ASCII digits are
# versions, so an export's temporary `.N.export-*` directory, renamed to DIR/N when complete, is not.


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
