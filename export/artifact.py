"""Reading an exported artifact, without torch (``serving`` imports this module).

Only json, hashlib, numpy, pydantic and safetensors.numpy: no torch, no onnx. The manifest is
parsed by its schema (:mod:`mutask.export.manifest`); the ONNX graphs are checked with a minimal
protobuf reader (:func:`external_refs`) that lists each initializer's external-data reference,
so :func:`load_artifact` can prove that every weight a graph reads lies inside
``weights.safetensors`` on exactly one tensor's bytes. The format is documented in
``export/FORMAT.md``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import numpy

from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, ArtifactError, ComponentEntry, Manifest, SegmentEntry, TaskEntry

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "Artifact", "ArtifactError", "load_artifact", "artifact_stats"]


def reexport_command(path) -> str:
    """The command that rewrites the artifact at ``path``, in backticks."""
    return f"`mutask export STATE --out {path} --force`"


def reexport_hint(path) -> str:
    """The fix for an artifact at ``path`` that cannot be read as it is."""
    return f"Re-export it: {reexport_command(path)}."


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------- safetensors header


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


# ------------------------------------------------------------------ minimal protobuf reading


def _varint(buf, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(buf):
    """Yield (field number, wire type, value) of one protobuf message; length-delimited values
    are memoryview slices, varints ints, fixed widths raw bytes."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise ValueError("truncated field")
            val, pos = buf[pos : pos + ln], pos + ln
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield num, wt, val


# ONNX field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5,
# GraphProto.input = 11, GraphProto.output = 12; TensorProto.name = 8, .raw_data = 9,
# .external_data = 13, .data_location = 14; StringStringEntryProto.key = 1, .value = 2.


def external_refs(model_bytes: bytes) -> list[dict]:
    """Every initializer of an ONNX model's main graph: ``{"name", "external": bool,
    "location", "offset", "length", "inline_bytes"}`` (no onnx package needed)."""
    buf = memoryview(model_bytes)
    graph = None
    for num, wt, val in _fields(buf):
        if num == 7 and wt == 2:
            graph = val
    if graph is None:
        raise ValueError("no graph in the model")
    out = []
    for num, wt, val in _fields(graph):
        if num != 5 or wt != 2:
            continue
        rec = {"name": "", "external": False, "location": None, "offset": 0, "length": None, "inline_bytes": 0}
        for tnum, twt, tval in _fields(val):
            if tnum == 8 and twt == 2:
                rec["name"] = bytes(tval).decode("utf-8", "replace")
            elif tnum == 9 and twt == 2:
                rec["inline_bytes"] = len(tval)
            elif tnum == 14 and twt == 0:
                rec["external"] = tval == 1
            elif tnum == 13 and twt == 2:
                k = v = ""
                for enum, ewt, evl in _fields(tval):
                    if ewt == 2 and enum == 1:
                        k = bytes(evl).decode("utf-8", "replace")
                    elif ewt == 2 and enum == 2:
                        v = bytes(evl).decode("utf-8", "replace")
                if k == "location":
                    rec["location"] = v
                elif k == "offset":
                    rec["offset"] = int(v)
                elif k == "length":
                    rec["length"] = int(v)
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- the artifact


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

    def labels(self, task: str) -> list[str]:
        return list(self._task(task).labels)

    def tensors(self) -> dict[str, numpy.ndarray]:
        """Every tensor of the weights file, by its name there."""
        from safetensors.numpy import load_file

        return load_file(str(self.weights_path))

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, tasks={sorted(self.tasks)}, segments={len(self.segments)})"


def load_artifact(path, verify: bool = True) -> Artifact:
    """Open an artifact directory. Always validates the manifest (its schema, format version
    and cross references) and checks that every file exists; with ``verify`` also the weights'
    and graphs' sha256, the weights header, and that every external-data reference of every
    graph is exactly one tensor of the weights file. Raises :class:`ArtifactError` naming the file
    (and the field, for a manifest that does not validate) and the fix."""
    try:
        return _open_artifact(pathlib.Path(path), verify)
    except OSError as e:  # unreadable file or directory (permissions, I/O error)
        raise ArtifactError(f"cannot read {e.filename or path}: {e.strerror or e}. Check its permissions, or re-export it: {reexport_command(path)}.") from None


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
            raise ArtifactError(f"artifact {str(d)!r} is missing {name}. Copy the whole directory, or re-export it: {reexport_command(d)}.")
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
            if not r["external"]:
                continue
            if r["location"] != manifest.weights:
                raise ArtifactError(f"{gpath}: initializer {r['name']!r} reads {r['location']!r}, not {manifest.weights}.")
            if r["length"] is None or r["offset"] < start or r["offset"] + r["length"] > size or (r["offset"], r["length"]) not in ranges:
                raise ArtifactError(
                    f"{gpath}: initializer {r['name']!r} reads bytes {r['offset']}..{r['offset'] + (r['length'] or 0)} of {wpath.name}, "
                    f"which are not one tensor of that file ({size} bytes). {reexport_hint(d)}"
                )


def artifact_stats(path) -> dict:
    """Byte accounting of an artifact: files, unique tensor bytes, and the naive alternative
    (one full model file per task: the sum over tasks of the bytes of the tensors its path uses)."""
    art = load_artifact(path, verify=False)
    start, header = read_safetensors_header(art.weights_path)
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    unique = sum(nbytes.values())
    graphs = {n: (art.path / n).stat().st_size for n in art.manifest.graph_files()}
    manifest_bytes = (art.path / MANIFEST).stat().st_size
    weights_bytes = art.weights_path.stat().st_size
    naive = 0
    per_task = {}
    for t, rec in art.tasks.items():
        b = sum(nbytes[k] for cid in dict.fromkeys(rec.components) for k in art.components[cid].tensors)
        per_task[t] = b
        naive += b
    total = weights_bytes + sum(graphs.values()) + manifest_bytes
    return {
        "total_bytes": total,
        "weights_file_bytes": weights_bytes,
        "unique_param_bytes": unique,
        "graph_bytes": sum(graphs.values()),
        "task_graph_bytes": sum(graphs[t.graph] for t in art.tasks.values()),
        "segment_graph_bytes": sum(graphs[s.graph] for s in art.segments.values()),
        "manifest_bytes": manifest_bytes,
        "ratio_total_to_unique": total / unique if unique else float("nan"),
        "naive_bytes": naive,
        "naive_over_total": naive / total if total else float("nan"),
        "task_param_bytes": per_task,
        "num_tasks": len(art.tasks),
        "num_segments": len(art.segments),
        "num_graphs": len(graphs),
    }
