"""The artifact manifest (``manifest.json``): one typed, versioned schema, torch-free.

Export writes a :class:`Manifest`; the artifact reader, ``--verify-only`` and the server read
one. Parsing checks every field's type and every cross reference (a task's segment chain,
segment parents, components, graph files), so a consumer never re-validates: a manifest that
does not validate raises :class:`ArtifactError` naming the first bad field. The format is
documented in ``export/FORMAT.md``, which :mod:`export.format` generates from these models: each
field's ``description`` is its line there, so the schema is written down here only.
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
# The graphs' input and output names: a task graph reads TASK_INPUT and writes TASK_OUTPUT; a
# segment graph reads SEGMENT_INPUT (the image or a parent's hidden states) and writes SEGMENT_OUTPUT.
TASK_INPUT, TASK_OUTPUT = "image", "logits"
SEGMENT_INPUT, SEGMENT_OUTPUT = "input", "output"
INLINE_LIMIT = 4096  # bytes: a graph's larger initializers must be component tensors (external data)

Shape = list[Union[int, Literal["batch"]]]


class ArtifactError(MutaskError):
    """An artifact that is missing, damaged, tampered with, or of another format version
    (a manifest that is not valid JSON or does not validate included)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _f(description: str, default=..., **constraints):
    """A field with its description: the text ``export/FORMAT.md`` shows for it."""
    return Field(default, description=description, **constraints)


class GraphFile(Strict):
    """One graph file's integrity record (``graphs.<file>``)."""

    sha256: str = _f("sha256 of the file's bytes (hex)", pattern=r"^[0-9a-f]{64}$")
    bytes: int = _f("the file's size in bytes", ge=0)


class RootRecord(Strict):
    """The pretrained network every path starts from."""

    source: str = _f("where the root came from, e.g. `timm:vit_tiny_patch16_224`")
    root_params: int = _f("parameters of the root network", ge=0)
    spec: dict = _f("the root's own description (JSON values), as `mutask evolve` recorded it")


class TaskMetrics(Strict):
    """The task's accuracy as evolution measured it in PyTorch (null when not measured)."""

    val_accuracy: Optional[float] = _f("accuracy on the validation split", None)
    test_accuracy: Optional[float] = _f("accuracy on the test split", None)


class TaskEntry(Strict):
    """One task: its whole graph, its labels and preprocessing, and its chain of segments."""

    graph: str = _f("its graph file, `task.<task>.onnx` (task name reduced to `[A-Za-z0-9._-]`, a hash suffix on a collision)")
    labels: list[str] = _f("class names in output order (`num_classes` of them)", min_length=1)
    num_classes: int = _f("length of the logits row", gt=0)
    image_size: int = _f("S: the graph takes `(batch, 3, S, S)` images", gt=0)
    input_shape: Shape = _f("the task graph's input shape, `\"batch\"` for the dynamic axis")
    output_shape: Shape = _f("the task graph's output shape, `[\"batch\", num_classes]`")
    preprocessing: Preprocessing = _f("the root's preprocessing at `image_size` (see Preprocessing below)")
    params: int = _f("parameters on its path, as `mutask report` counts them", ge=0)
    accounted_params: float = _f("its share of parameters, components shared by k tasks counted 1/k", ge=0)
    components: list[str] = _f("its path: component ids in forward order", min_length=1)
    segments: list[str] = _f("its chain: segment ids, first (image in) to last (logits out)", min_length=1)
    metrics: TaskMetrics = _f("accuracy measured at evolution")
    spec: str = _f("how to load its data (`--verify-only` loads the test split from it)")
    seed: int = _f("the seed its data split was drawn with")
    path: str = _f("the id of its path in the STATE")
    hparams: dict = _f("the path's hyperparameters (image size, learning rate, ...)")


class ComponentEntry(Strict):
    """One component (a block, an embedding, a head) of the exported paths."""

    name: str = _f("its place in the root's layout, e.g. `blocks.3` or `head`")
    root: bool = _f("true when it is the root's own, untrained component")
    tensors: list[str] = _f("its tensors' names in `weights.safetensors` (each at most once)")
    tensor_map: dict[str, str] = _f("tensor name in the component -> tensor name in `weights.safetensors`")
    num_params: int = _f("its parameter count", ge=0)
    sha256: str = _f("sha256 over its `(tensor name, content hash)` lines: equal for equal components")
    used_by: list[str] = _f("the tasks whose paths use it")


class SegmentEntry(Strict):
    """One segment: a maximal run of path steps that the same tasks pass (cutting below)."""

    graph: str = _f("its graph file, `segment.<sid>.onnx`")
    components: list[str] = _f("its component ids in forward order", min_length=1)
    tasks: list[str] = _f("the tasks whose chains pass through it", min_length=1)
    parents: list[str] = _f("the segments that feed it; `[]` exactly when it takes the image")
    input: Literal["image", "hidden"] = _f("`image` (a preprocessed image batch) or `hidden` (a parent's output)")
    output: Literal["hidden", "logits"] = _f("`logits` for the last segment of a chain, else `hidden`")
    image_size: int = _f("the image size of the paths it serves", gt=0)
    input_shape: Shape = _f("its graph's input shape, `\"batch\"` for the dynamic axis")
    output_shape: Shape = _f("its graph's output shape, `\"batch\"` for the dynamic axis")

    @property
    def shared(self) -> bool:
        return len(self.tasks) > 1


class TaskParity(Strict):
    """One task's parity check at export (bounds in `parity`)."""

    inputs: str = _f("what was checked: `test split` (possibly `, K of N images evenly spaced`) or random inputs")
    examples: int = _f("images checked")
    onnx_vs_torch_max_abs_diff: float = _f("max |logit difference|, task graph in ONNX Runtime vs the PyTorch path")
    onnx_vs_torch_argmax_agreement: float = _f("share of images with the same arg-max, task graph vs PyTorch")
    onnx_vs_torch_ok: bool = _f("both within bounds")
    chain_vs_graph_max_abs_diff: float = _f("max |logit difference|, segment chain vs task graph")
    chain_vs_graph_argmax_agreement: float = _f("share of images with the same arg-max, chain vs graph")
    chain_vs_graph_ok: bool = _f("both within bounds")
    ok: bool = _f("both checks passed (an export that fails one writes nothing)")


class Parity(Strict):
    """The parity check export ran before writing the artifact."""

    atol: float = _f("bound on max |logit difference|, times max(1, the largest |logit| of the reference)")
    min_argmax_agreement: float = _f("bound on the share of images with the same arg-max")
    provider: str = _f("the ONNX Runtime execution provider the graphs ran on")
    tasks: dict[str, TaskParity] = _f("task -> its check")


class Created(Strict):
    """Provenance: when the export ran and with what."""

    at: str = _f("when the export started (ISO 8601, with time zone)")
    mutask: str = _f("mutask's version")
    torch: str = _f("torch's version")
    onnxruntime: str = _f("ONNX Runtime's version (parity check)")
    python: str = _f("Python's version")
    exporter: str = _f("how the graphs were exported")


def content_digest(doc: dict) -> str:
    """sha256 of a JSON document in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and not os.path.isabs(name)


class Manifest(Strict):
    """The whole manifest (``manifest.json``). No field outside the schema is allowed."""

    format: Literal["mutask-artifact"] = _f("always `mutask-artifact`", FORMAT)
    format_version: Literal[4] = _f("this document's version; readers refuse any other", FORMAT_VERSION)
    weights: str = _f("the weights file's name", WEIGHTS)
    weights_sha256: str = _f("sha256 of the weights file (hex)", pattern=r"^[0-9a-f]{64}$")
    weights_bytes: int = _f("size of the weights file in bytes", ge=8)
    unique_param_bytes: int = _f("tensor bytes in the weights file (its header excluded)", ge=0)
    graphs: dict[str, GraphFile] = _f("every graph file -> its integrity record")
    root: RootRecord = _f("the pretrained root")
    tasks: dict[str, TaskEntry] = _f("task name -> its entry, in the order the tasks were evolved", min_length=1)
    components: dict[str, ComponentEntry] = _f("component id -> its entry, for every component a task's path uses")
    segments: dict[str, SegmentEntry] = _f("segment id (`s0`, `s1`, ...) -> its entry, ids in a topological order", min_length=1)
    parity: Parity = _f("the checks export ran before writing")
    created: Created = _f("provenance")
    manifest_sha256: str = _f("the digest binding this manifest (Integrity below)", "", pattern=r"^([0-9a-f]{64})?$")

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
