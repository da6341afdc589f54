"""The artifact's ONNX graphs: one per segment, and one per task composed from its segment chain.

Exporter: ``torch.onnx.export(dynamo=True, optimize=False)`` (torch.export + onnxscript), then
onnxscript's optimizer with constant folding forbidden on any node that reads a parameter, and
without its rules that fuse a BatchNormalization into the convolution before it. The graphs
therefore read the *original* parameter tensors (a transposed weight or a resampled
position embedding is computed in the graph, not stored), which is what lets every graph point
into the one deduplicated weights file: each initializer that is a component tensor becomes
ONNX external data (offset and length into ``weights.safetensors``), small constants stay
inline, and any other initializer larger than :data:`INLINE_LIMIT` bytes fails the export.

A task's graph is its segment chain merged into one graph (names prefixed by segment id), so
the two agree by construction and each segment is exported once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pathlib
import re
import warnings
from dataclasses import dataclass

import torch

from mutask.errors import MutaskError

from .manifest import FORMAT_VERSION, INLINE_LIMIT, SEGMENT_INPUT, SEGMENT_OUTPUT, TASK_INPUT, TASK_OUTPUT, WEIGHTS
from .weights import content_key

log = logging.getLogger("mutask")

__all__ = ["INLINE_LIMIT", "SegmentGraph", "graph_file_names", "write_segment_graphs", "write_task_graph"]


@dataclass(frozen=True)
class SegmentGraph:
    """One exported segment: its ONNX model (weights external) and its input and output
    shapes, ``"batch"`` for the dynamic axis."""

    proto: object  # onnx.ModelProto
    input_shape: list
    output_shape: list


def _safe_name(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "task"
    out = base
    if out in taken:
        out = f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    taken.add(out)
    return out


def graph_file_names(tasks: list[str], segment_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(task -> ``task.<name>.onnx``, segment id -> ``segment.<sid>.onnx``); task names are
    reduced to file-safe characters, with a hash suffix where two would collide."""
    taken: set = set()
    return {t: f"task.{_safe_name(t, taken)}.onnx" for t in tasks}, {sid: f"segment.{sid}.onnx" for sid in segment_ids}


# ----------------------------------------------------------------------------- one graph


@contextlib.contextmanager
def _quiet_loggers(names=("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")):
    """The exporter's INFO chatter (one line per folding decision) off, unless mutask runs
    at DEBUG level (`mutask -v`)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def _no_weight_rewrites():
    """onnxscript's default rewrite rules without those that compute new weights from old ones
    (fusing a BatchNormalization into the Conv or Gemm before it): a fused weight is a derived
    copy, not a component tensor, and could not point into the weights file. The rules are
    read from ``onnxscript.rewriter`` when the optimizer runs, so they are swapped there for
    the call. Both names are onnxscript internals (seen in 0.7, no public switch); where a release
    lacks them nothing is swapped, and a fused weight then stops the export with the error of
    :func:`_externalize` that names it, not a wrong artifact."""
    from onnxscript import rewriter

    try:
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        fusing = set(_fuse_batchnorm.rules)
        saved = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if r not in fusing)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _to_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str):
    """One graph: dynamo export without optimization, then onnxscript's optimizer with no
    constant folding through parameters (so the graph reads the original tensors)."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    module = module.eval()
    dims = {0: torch.export.Dim("batch")}
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), _quiet_loggers(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, (example,), dynamo=True, optimize=False, verbose=False,
            input_names=[input_name], output_names=[output_name], dynamic_shapes=(dims,),
        )
    model = prog.model
    protected = set(model.graph.initializers)

    def should_fold(node):
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name in protected:
                return False
        return None

    with warnings.catch_warnings(), _quiet_loggers(), _no_weight_rewrites():
        warnings.simplefilter("ignore")
        optimize_ir(model, should_fold=should_fold)
    for v, name in ((model.graph.inputs[0], input_name), (model.graph.outputs[0], output_name)):
        if v.name != name:
            raise RuntimeError(f"exported graph has {v.name!r} where {name!r} was asked")
    dim0 = model.graph.inputs[0].shape[0]
    if isinstance(dim0, int) or getattr(dim0, "value", None) != "batch":
        raise RuntimeError(f"exported graph's batch axis is {dim0!r}, not the dynamic axis 'batch'")
    return ir, model


def _externalize(ir, model, byte_ranges: dict, where: str, cache: dict) -> None:
    """Point every initializer that is a component tensor at its bytes in the weights file;
    keep small constants inline; fail on anything else."""
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        arr = tensor.numpy()
        # the same parameter shows up in several graphs: hash its memory once. The cache
        # keeps the array alive, so its address cannot be reused by other bytes meanwhile.
        ptr = (arr.__array_interface__["data"][0], arr.dtype.str, arr.shape, arr.strides)
        hit = cache.get(ptr)
        if hit is None:
            hit = cache[ptr] = (content_key(arr), arr)
        where_in_file = byte_ranges.get(hit[0])
        if where_in_file is not None:
            offset, length = where_in_file
            value.const_value = ir.ExternalTensor(WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape, name=name)
        elif arr.nbytes > INLINE_LIMIT:
            raise MutaskError(
                f"export of {where}: initializer {name!r} {tuple(arr.shape)} ({arr.nbytes} bytes) is not a component tensor. "
                "The exporter derived a copy of a weight instead of reading the original; this is a mutask bug, please report it."
            )


def _finish(ir, model, where: str):
    """The exported IR as a ModelProto that carries no weights and no exporter provenance."""
    proto = ir.to_proto(model)
    # drop the exporter's per-node provenance (stack traces with local paths, FX names)
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del vi.metadata_props[:]
    del proto.metadata_props[:]
    proto.producer_name = "mutask"
    for init in proto.graph.initializer:
        if init.data_location != 1 and len(init.raw_data) > INLINE_LIMIT:
            raise MutaskError(f"{where}: initializer {init.name!r} stores {len(init.raw_data)} bytes inline; graphs must not carry weights.")
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and len(attr.t.raw_data) > INLINE_LIMIT:
                raise MutaskError(f"{where}: node {node.name!r} carries a {len(attr.t.raw_data)}-byte constant; graphs must not carry weights.")
    return proto


def _rename_io(proto, new_in: str, new_out: str) -> None:
    old_in, old_out = proto.graph.input[0].name, proto.graph.output[0].name
    for node in proto.graph.node:
        for i, n in enumerate(node.input):
            if n == old_in:
                node.input[i] = new_in
        for i, n in enumerate(node.output):
            if n == old_out:
                node.output[i] = new_out
    for node in proto.graph.node:  # an output that is also read inside the graph
        for i, n in enumerate(node.input):
            if n == old_out:
                node.input[i] = new_out
    proto.graph.input[0].name, proto.graph.output[0].name = new_in, new_out


def _compose(protos: list, prefixes: list[str]):
    """One graph from a chain of segment graphs (each one input, one output): values and
    initializers prefixed by their segment id (``onnx.compose.add_prefix``), each output wired
    to the next input (``onnx.compose.merge_graphs``); the result reads :data:`TASK_INPUT` and
    writes :data:`TASK_OUTPUT`. Initializers are copied as they are, so their external-data references keep
    their location, offset and length.

    Not ``onnx.compose.merge_models``: it ends with ``onnx.checker.check_model``, which
    resolves every external-data location against the current working directory and fails
    ("should be stored in weights.safetensors, but it is not regular file") unless the process
    runs inside the artifact directory."""
    import onnx
    import onnx.compose

    for p in protos[1:]:
        if p.ir_version != protos[0].ir_version:
            raise RuntimeError(f"segments disagree on the IR version ({p.ir_version} vs {protos[0].ir_version})")
    parts = [onnx.compose.add_prefix(p, f"{pre}/") for p, pre in zip(protos, prefixes)]
    graph = parts[0].graph
    for nxt in parts[1:]:
        graph = onnx.compose.merge_graphs(graph, nxt.graph, io_map=[(graph.output[0].name, nxt.graph.input[0].name)])
    model = onnx.ModelProto()
    model.CopyFrom(protos[0])
    model.graph.CopyFrom(graph)
    opsets = {}
    for p in protos:
        for o in p.opset_import:
            if opsets.setdefault(o.domain, o.version) != o.version:
                raise RuntimeError(f"segments disagree on the opset of domain {o.domain!r}")
    del model.opset_import[:]
    for dom, ver in opsets.items():
        model.opset_import.add(domain=dom, version=ver)
    _rename_io(model, TASK_INPUT, TASK_OUTPUT)
    return model


def _save(proto, path: pathlib.Path, doc: str) -> None:
    proto.doc_string = doc
    del proto.metadata_props[:]
    for k, v in (("mutask.format_version", str(FORMAT_VERSION)), ("mutask.weights", WEIGHTS)):
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    path.write_bytes(proto.SerializeToString())


# ----------------------------------------------------------------------------- the artifact's graphs


def write_segment_graphs(segments: dict, paths: dict, modules: dict, byte_ranges: dict, dest: pathlib.Path, files: dict, *, show_progress: bool = True) -> dict[str, SegmentGraph]:
    """Export each segment of ``segments`` (:func:`export.segments.plan_segments`) to
    ``dest / files[sid]``. ``paths``: task -> its TaskPath; ``modules``: component id -> CPU
    module; ``byte_ranges``: content key -> (offset, length) in the weights file. A segment's
    example input is its first task's image run through the components before it."""
    from mutask.progress import bar as progress_bar

    from mutask.evolve.model import SegmentModule

    hash_cache: dict = {}
    out = {}
    bar = progress_bar(iterable=list(segments), desc="export graphs", unit="segment", disable=not show_progress, leave=False)
    for sid in bar:
        seg = segments[sid]
        p = paths[seg["tasks"][0]]
        first = p.components.index(seg["components"][0])
        if p.components[first : first + len(seg["components"])] != seg["components"]:
            raise RuntimeError(f"segment {sid} does not match the path of {p.task}")
        bar.set_postfix_str(files[sid])
        example = torch.zeros(2, 3, seg["image_size"], seg["image_size"])
        mods = [modules[c] for c in seg["components"]]
        with torch.no_grad():
            for m in [modules[c] for c in p.components[:first]]:
                example = m(example)
            result = SegmentModule(mods).eval()(example)
        ir, model = _to_onnx(SegmentModule(mods), example, SEGMENT_INPUT, SEGMENT_OUTPUT)
        _externalize(ir, model, byte_ranges, files[sid], hash_cache)
        proto = _finish(ir, model, files[sid])
        _save(proto, dest / files[sid], f"mutask segment {sid} of {seg['tasks']}: {seg['input']} -> {seg['output']}")
        out[sid] = SegmentGraph(proto, ["batch", *example.shape[1:]], ["batch", *result.shape[1:]])
    bar.close()
    return out


def write_task_graph(task: str, chain: list[str], segment_graphs: dict[str, SegmentGraph], path: pathlib.Path) -> None:
    """Write ``task``'s graph (image -> logits): its segment chain composed into one graph."""
    _save(_compose([segment_graphs[sid].proto for sid in chain], chain), path, f"mutask task {task!r}: image -> logits")
