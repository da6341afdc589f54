"""The artifact manifest (``manifest.json``): one typed, versioned schema, torch-free.

Export writes a :class:`Manifest`; the artifact reader, ``--verify-only`` and the server read
one. Parsing checks every field's type and every cross reference (a task's segment chain,
segment parents, components, graph files), so a consumer never re-validates: a manifest that
does not validate raises :class:`ArtifactError` naming the first bad field. The format is
documented in ``export/FORMAT.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mutask.documents import read_document
from mutask.errors import MutaskError
from mutask.preprocessing import Preprocessing

FORMAT = "mutask-artifact"
# 4: tasks' preprocessing records the root's mean, std and resize filter; 3: manifest_sha256
# binds the manifest; 2: segments form a DAG; 1: a prefix tree
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"

Shape = list[Union[int, Literal["batch"]]]


class ArtifactError(MutaskError):
    """An artifact that is missing, damaged, tampered with, or of another format version
    (a manifest that is not valid JSON or does not validate included)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraphFile(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class RootRecord(Strict):
    source: str
    root_params: int = Field(ge=0)
    spec: dict


class TaskMetrics(Strict):
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None


class TaskEntry(Strict):
    graph: str
    labels: list[str] = Field(min_length=1)
    num_classes: int = Field(gt=0)
    image_size: int = Field(gt=0)
    input_shape: Shape
    output_shape: Shape
    preprocessing: Preprocessing
    params: int = Field(ge=0)
    accounted_params: float = Field(ge=0)
    components: list[str] = Field(min_length=1)
    segments: list[str] = Field(min_length=1)
    metrics: TaskMetrics
    spec: str
    seed: int
    path: str
    hparams: dict


class ComponentEntry(Strict):
    name: str
    root: bool
    tensors: list[str]
    tensor_map: dict[str, str]
    num_params: int = Field(ge=0)
    sha256: str
    used_by: list[str]


class SegmentEntry(Strict):
    graph: str
    components: list[str] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    parents: list[str]
    input: Literal["image", "hidden"]
    output: Literal["hidden", "logits"]
    image_size: int = Field(gt=0)
    input_shape: Shape
    output_shape: Shape

    @property
    def shared(self) -> bool:
        return len(self.tasks) > 1


class TaskParity(Strict):
    inputs: str
    examples: int
    onnx_vs_torch_max_abs_diff: float
    onnx_vs_torch_argmax_agreement: float
    onnx_vs_torch_ok: bool
    chain_vs_graph_max_abs_diff: float
    chain_vs_graph_argmax_agreement: float
    chain_vs_graph_ok: bool
    ok: bool


class Parity(Strict):
    atol: float
    min_argmax_agreement: float
    provider: str
    tasks: dict[str, TaskParity]


class Created(Strict):
    at: str
    mutask: str
    torch: str
    onnxruntime: str
    python: str
    exporter: str


def content_digest(doc: dict) -> str:
    """sha256 of a JSON document in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and not os.path.isabs(name)


class Manifest(Strict):
    format: Literal["mutask-artifact"] = FORMAT
    format_version: Literal[4] = FORMAT_VERSION
    weights: str = WEIGHTS
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_bytes: int = Field(ge=8)
    unique_param_bytes: int = Field(ge=0)
    graphs: dict[str, GraphFile]
    root: RootRecord
    tasks: dict[str, TaskEntry] = Field(min_length=1)
    components: dict[str, ComponentEntry]
    segments: dict[str, SegmentEntry] = Field(min_length=1)
    parity: Parity
    created: Created
    manifest_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")  # see sealed()

    # -- what the schema guarantees beyond field types -------------------------------------
    @model_validator(mode="after")
    def _cross_references(self) -> "Manifest":
        for name in [self.weights, *self.graph_files()]:
            if not _plain_name(name):
                raise ValueError(f"file {name!r} is not a plain file name inside the artifact directory")
        for name in self.graph_files():
            if name not in self.graphs:
                raise ValueError(f"graph file {name} has no sha256 record in 'graphs'")
        for sid, seg in self.segments.items():
            if (seg.input == "image") != (not seg.parents):
                raise ValueError(f"segments.{sid}: input {seg.input!r} with parents {seg.parents}")
            for p in seg.parents:
                if p not in self.segments:
                    raise ValueError(f"segments.{sid}.parents: segment {p} does not exist")
            for c in seg.components:
                if c not in self.components:
                    raise ValueError(f"segments.{sid}.components: component {c} does not exist")
        for tid, task in self.tasks.items():
            where = f"tasks.{tid}"
            if len(task.labels) != task.num_classes:
                raise ValueError(f"{where}: {len(task.labels)} labels for num_classes {task.num_classes}")
            if task.preprocessing.image_size != task.image_size:
                raise ValueError(f"{where}: preprocessing.image_size {task.preprocessing.image_size} differs from image_size {task.image_size}")
            for c in task.components:
                if c not in self.components:
                    raise ValueError(f"{where}.components: component {c} does not exist")
            chain = task.segments
            for i, sid in enumerate(chain):
                seg = self.segments.get(sid)
                if seg is None:
                    raise ValueError(f"{where}.segments: segment {sid} does not exist")
                if tid not in seg.tasks:
                    raise ValueError(f"{where}.segments: segment {sid} does not list the task among its tasks")
                if i == 0 and seg.input != "image":
                    raise ValueError(f"{where}.segments: the first segment {sid} does not take the image")
                if i and chain[i - 1] not in seg.parents:
                    raise ValueError(f"{where}.segments: segment {sid} follows {chain[i - 1]}, which is not one of its parents {seg.parents}")
                if i < len(chain) - 1 and seg.output != "hidden":
                    raise ValueError(f"{where}.segments: segment {sid} outputs {seg.output!r} in the middle of the chain")
            if [c for sid in chain for c in self.segments[sid].components] != task.components:
                raise ValueError(f"{where}: its segments' components are not its path {task.components}")
            if self.segments[chain[0]].image_size != task.image_size:
                raise ValueError(f"{where}: image_size {task.image_size} but its first segment takes {self.segments[chain[0]].image_size}")
            if self.segments[chain[-1]].output != "logits":
                raise ValueError(f"{where}.segments: the last segment {chain[-1]} does not output logits")
        self.segment_order()  # raises on a cycle
        return self

    # -- reading helpers -----------------------------------------------------------------
    def graph_files(self) -> list[str]:
        names = [t.graph for t in self.tasks.values()] + [s.graph for s in self.segments.values()]
        return list(dict.fromkeys(names))

    def segment_order(self) -> list[str]:
        """Segment ids with every segment after its parents (ValueError on a cycle)."""
        order, state = [], {}

        def visit(sid, trail=()):
            if state.get(sid) == "done":
                return
            if state.get(sid) == "open":
                cycle = trail[trail.index(sid):] + (sid,)
                raise ValueError(f"segments.{sid}.parents: the parent links form a cycle {' -> '.join(cycle)}")
            state[sid] = "open"
            for p in self.segments[sid].parents:
                visit(p, trail + (sid,))
            state[sid] = "done"
            order.append(sid)

        for sid in self.segments:
            visit(sid)
        return order

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def sealed(self) -> "Manifest":
        """This manifest with ``manifest_sha256`` set: the digest of everything else in it, as
        a reader parses it back. A reader refuses a manifest whose digest does not match, so an
        edit to any field after export (a label, the preprocessing, a metric) is caught."""
        doc = json.loads(self.model_copy(update={"manifest_sha256": ""}).to_json())
        return self.model_copy(update={"manifest_sha256": content_digest(doc)})

    @classmethod
    def load(cls, path, fix: str) -> "Manifest":
        """The manifest at ``path``; :class:`ArtifactError` naming the file, the first bad
        field and ``fix`` for invalid JSON, another format or version, or a field that does
        not validate."""
        doc = read_document(
            path, format=FORMAT, version=FORMAT_VERSION, version_key="format_version",
            what="mutask artifact manifest", fix=fix, error=ArtifactError,
        )
        recorded = doc.get("manifest_sha256")
        if not isinstance(recorded, str) or recorded != content_digest(dict(doc, manifest_sha256="")):
            raise ArtifactError(
                f"{path} does not match the digest export wrote into it (manifest_sha256): it was edited or damaged "
                f"after export, and serving it could answer with the wrong preprocessing or labels. {fix}"
            )
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            if err["loc"]:  # a field's own type or value
                problem = f"field {'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
            else:  # a cross reference; its message starts with the field it is about
                problem = str(err.get("ctx", {}).get("error", err["msg"]))
            more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
            raise ArtifactError(f"{path}: {problem}{more}. The manifest is damaged or was edited. {fix}") from None
