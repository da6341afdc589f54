"""``mutask export``: an evolved system to a deployable artifact (see ``export/FORMAT.md``).

What it writes, into a temp directory next to ART that is renamed into place at the end:

- ``weights.safetensors``: every unique tensor of the components the tasks' best paths use,
  deduplicated by content (sha256 of dtype, shape and bytes), so an unchanged clone costs
  nothing;
- one ONNX graph per segment of the tasks' step graph (:mod:`export.segments`), and one per
  task (image in, logits out) that is its segment chain composed into a single graph (so the
  two agree by construction, and each segment is exported once); all read their weights from
  ``weights.safetensors`` as ONNX external data (offset and length into that file): the
  graphs hold structure only;
- ``manifest.json``: the contract the torch-free server reads (:mod:`export.artifact`).

Exporter: ``torch.onnx.export(dynamo=True, optimize=False)`` (torch.export + onnxscript),
then onnxscript's optimizer with constant folding forbidden on any node that reads a
parameter. The graphs therefore read the *original* parameter tensors (a transposed weight or
a resampled position embedding is computed in the graph, not stored), which is what lets
every graph point into the one deduplicated weights file. Any initializer larger than
:data:`INLINE_LIMIT` bytes that is not a component tensor fails the export.

Parity is always checked before anything is committed: per task, ONNX Runtime (CPU) against
the PyTorch path on the task's test split, and every segment chain against its task graph.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import json
import logging
import os
import pathlib
import platform
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch

from mutask.errors import MutaskError

from .artifact import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, load_artifact, read_safetensors_header, sha256_file
from .segments import plan_segments
from .verify import ATOL, MIN_ARGMAX_AGREEMENT, compare, ort_session, random_inputs, run_chain, verify_artifact  # noqa: F401 (re-exported)

log = logging.getLogger("mutask")

INLINE_LIMIT = 4096  # bytes: larger initializers must be component tensors
PARITY_BATCH = 64

__all__ = ["export_system", "verify_artifact", "INLINE_LIMIT"]


# ----------------------------------------------------------------------------- helpers


def content_key(arr: np.ndarray) -> str:
    """sha256 of dtype, shape and bytes: equal keys mean interchangeable tensors."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{tuple(int(s) for s in arr.shape)}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        raise MutaskError("bfloat16 components cannot be exported (ONNX Runtime's CPU provider and numpy lack it); convert the STATE to float32.")
    return t.numpy()


def _cpu_module(m: torch.nn.Module) -> torch.nn.Module:
    if any(p.device.type != "cpu" for p in list(m.parameters()) + list(m.buffers())):
        m = copy.deepcopy(m).to("cpu")
    return m.eval()


def _safe_name(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "task"
    out = base
    if out in taken:
        out = f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    taken.add(out)
    return out


def _check_out(out: pathlib.Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise MutaskError(f"ART {str(out)!r} exists; mutask never writes over it without --force. Choose a new --out, or add --force to replace it.")
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise MutaskError(f"ART {str(out)!r} exists and is not a mutask artifact (no {MANIFEST}); refusing to replace it even with --force. Choose a new --out.")


def _commit(tmp: pathlib.Path, out: pathlib.Path, force: bool) -> None:
    """Rename the finished temp dir into place; an old ART (with --force) is moved aside
    first and removed only once the new one is in place."""
    _check_out(out, force)
    backup = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        backup = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        backup.rmdir()
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ----------------------------------------------------------------------------- ONNX export


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

    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        optimize_ir(model, should_fold=should_fold)
    for v, name in ((model.graph.inputs[0], input_name), (model.graph.outputs[0], output_name)):
        if v.name != name:
            raise RuntimeError(f"exported graph has {v.name!r} where {name!r} was asked")
    dim0 = model.graph.inputs[0].shape[0]
    if isinstance(dim0, int) or getattr(dim0, "value", None) != "batch":
        raise RuntimeError(f"exported graph's batch axis is {dim0!r}, not the dynamic axis 'batch'")
    return ir, model


def _externalize(ir, model, weights_index: dict, where: str, cache: dict) -> None:
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
        key = hit[0]
        hit = weights_index.get(key)
        if hit is not None:
            offset, length = hit
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
    initializers prefixed by their segment id, each output wired to the next input; the
    result reads ``image`` and writes ``logits``."""
    import onnx
    import onnx.compose

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
    _rename_io(model, "image", "logits")
    return model


def _save(proto, path: pathlib.Path, doc: str) -> None:
    proto.doc_string = doc
    del proto.metadata_props[:]
    for k, v in (("mutask.format_version", str(FORMAT_VERSION)), ("mutask.weights", WEIGHTS)):
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    path.write_bytes(proto.SerializeToString())


# ----------------------------------------------------------------------------- the export


def _task_data(system, tasks: list[str], data: dict | None) -> dict:
    """Task -> TaskData or None (could not be loaded: parity runs on random inputs)."""
    out = {}
    for t in tasks:
        if data is not None and t in data:
            out[t] = data[t]
            continue
        rec = system.tasks.get(t) or {}
        try:
            from mutask.evolve.tasks import load_task  # written alongside; imported lazily

            out[t] = load_task(rec["spec"], seed=rec.get("seed", 0))
        except Exception as e:  # missing directory, unknown spec, module not there yet
            log.warning("task %s: its data cannot be loaded (%s); parity runs on random inputs", t, e)
            out[t] = None
    return out


def export_system(system, out, *, data=None, force: bool = False, bentoml_model: str | None = None, show_progress: bool = True) -> pathlib.Path:
    """Export ``system`` (an :class:`evolve.state.System`) to the artifact directory ``out``.

    ``data``: optional task -> :class:`evolve.data.TaskData` for the parity check (default:
    each task loaded from the spec and seed its STATE records). Raises :class:`MutaskError`
    (and writes nothing at ``out``) on an existing ``out`` without ``force``, or on a
    parity failure. Returns the artifact path."""
    from tqdm.auto import tqdm

    from mutask.preprocessing import Preprocessing
    from mutask.evolve.model import PathModel, SegmentModule

    out = pathlib.Path(out)
    tasks = list(system.best)
    if not tasks:
        raise MutaskError("the STATE has no finished task: evolve at least one task (`mutask evolve --task ...`) before exporting.")
    _check_out(out, force)
    if bentoml_model is not None:
        _check_bento_name(bentoml_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = datetime.datetime.now(datetime.timezone.utc)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        paths = {t: system.best_path(t) for t in tasks}
        store = system.store
        used = list(dict.fromkeys(c for t in tasks for c in paths[t].components))
        modules = {cid: _cpu_module(store[cid].module) for cid in used}

        # -- weights: every unique tensor once ------------------------------------------
        unique: dict[str, tuple[str, np.ndarray]] = {}  # content key -> (weights key, array)
        users: dict[str, list[str]] = {}  # weights key -> component ids
        comp_tensors: dict[str, dict[str, str]] = {}
        comp_sha: dict[str, str] = {}
        for cid in used:
            tmap, h = {}, hashlib.sha256()
            for name, t in modules[cid].state_dict().items():
                arr = _np(t)
                key = content_key(arr)
                if key not in unique:
                    unique[key] = (f"{cid}/{name}", arr)
                wkey = unique[key][0]
                tmap[name] = wkey
                users.setdefault(wkey, [])
                if cid not in users[wkey]:
                    users[wkey].append(cid)
                h.update(f"{name}\0{key}\n".encode())
            comp_tensors[cid], comp_sha[cid] = tmap, h.hexdigest()
        from safetensors.numpy import save_file

        meta = {"format": "mutask-weights", "format_version": str(FORMAT_VERSION)}
        meta.update({wkey: ",".join(cids) for wkey, cids in users.items()})
        wpath = tmp / WEIGHTS
        save_file({wkey: arr for wkey, arr in unique.values()}, str(wpath), metadata=meta)
        start, header = read_safetensors_header(wpath)
        index = {}
        for key, (wkey, arr) in unique.items():
            b, e = header[wkey]["data_offsets"]
            index[key] = (start + b, e - b)
        unique_bytes = sum(arr.nbytes for _, arr in unique.values())
        del unique

        # -- segments ---------------------------------------------------------------------
        steps = {t: [(cid, paths[t].image_size) for cid in paths[t].components] for t in tasks}
        segments, chains = plan_segments(steps)
        taken: set = set()
        task_files = {t: f"task.{_safe_name(t, taken)}.onnx" for t in tasks}
        seg_files = {sid: f"segment.{sid}.onnx" for sid in segments}

        # -- graphs: one export per segment; a task's graph is its segment chain composed --
        hash_cache: dict = {}
        shapes: dict = {}
        protos: dict = {}
        bar = tqdm(list(segments), desc="export graphs", unit="segment", disable=not show_progress, leave=False)
        for sid in bar:
            seg = segments[sid]
            p = paths[seg["tasks"][0]]
            first = p.components.index(seg["components"][0])
            if p.components[first : first + len(seg["components"])] != seg["components"]:
                raise RuntimeError(f"segment {sid} does not match the path of {p.task}")
            bar.set_postfix_str(seg_files[sid])
            example = torch.zeros(2, 3, seg["image_size"], seg["image_size"])
            mods = [modules[c] for c in seg["components"]]
            with torch.no_grad():
                for m in [modules[c] for c in p.components[:first]]:
                    example = m(example)
                res = SegmentModule(mods).eval()(example)
            shapes[sid] = (["batch", *example.shape[1:]], ["batch", *res.shape[1:]])
            ir, model = _to_onnx(SegmentModule(mods), example, "input", "output")
            _externalize(ir, model, index, seg_files[sid], hash_cache)
            protos[sid] = _finish(ir, model, seg_files[sid])
            _save(protos[sid], tmp / seg_files[sid], f"mutask segment {sid} of {seg['tasks']}: {seg['input']} -> {seg['output']}")
        bar.close()
        hash_cache.clear()
        for t in tasks:
            _save(_compose([protos[sid] for sid in chains[t]], chains[t]), tmp / task_files[t], f"mutask task {t!r}: image -> logits")
        del protos

        # -- parity: ONNX Runtime against PyTorch, segment chains against task graphs -------
        loaded = _task_data(system, tasks, data)
        parity = {}
        failures = []
        seg_sessions: dict = {}
        for t in tqdm(tasks, desc="parity", unit="task", disable=not show_progress, leave=False):
            p = paths[t]
            td = loaded[t]
            if td is not None and len(td.test):
                images = td.test.resized(p.image_size)
                pre = Preprocessing(image_size=p.image_size)
                batches = [pre.normalize(images[i : i + PARITY_BATCH]) for i in range(0, len(images), PARITY_BATCH)]
                source = "test split"
            else:
                batches = [random_inputs(32, p.image_size, seed=0)]
                source = "random inputs (task data unavailable)"
            model = PathModel([store[c].name for c in p.components], [modules[c] for c in p.components]).eval()
            sess = ort_session(tmp / task_files[t])
            for sid in chains[t]:
                if sid not in seg_sessions:
                    seg_sessions[sid] = ort_session(tmp / seg_files[sid])
            chain = [seg_sessions[sid] for sid in chains[t]]
            ref, got, via = [], [], []
            with torch.no_grad():
                for x in batches:
                    ref.append(model(torch.from_numpy(x)).numpy())
                    got.append(sess.run(["logits"], {"image": x})[0])
                    via.append(run_chain(chain, x))
            ref, got, via = np.concatenate(ref), np.concatenate(got), np.concatenate(via)
            rec = {"inputs": source, "examples": int(len(ref))}
            rec.update({f"onnx_vs_torch_{k}": v for k, v in compare(got, ref).items()})
            rec.update({f"chain_vs_graph_{k}": v for k, v in compare(via, got).items()})
            rec["ok"] = bool(rec["onnx_vs_torch_ok"] and rec["chain_vs_graph_ok"])
            parity[t] = rec
            if not rec["ok"]:
                failures.append(t)
        if failures:
            lines = [
                f"  {t}: ONNX vs PyTorch max |diff| {parity[t]['onnx_vs_torch_max_abs_diff']:.3g}, arg-max agreement {parity[t]['onnx_vs_torch_argmax_agreement']:.4f}; "
                f"segment chain vs graph max |diff| {parity[t]['chain_vs_graph_max_abs_diff']:.3g}, agreement {parity[t]['chain_vs_graph_argmax_agreement']:.4f}"
                for t in failures
            ]
            raise MutaskError(
                f"export parity failed (needs max |logit diff| <= {ATOL:g} and arg-max agreement >= {MIN_ARGMAX_AGREEMENT:.1%}); nothing was written to {out}:\n"
                + "\n".join(lines)
            )
        del seg_sessions

        # -- manifest ---------------------------------------------------------------------
        graph_files = list(task_files.values()) + list(seg_files.values())
        graphs = {}
        for f in graph_files:
            b = (tmp / f).read_bytes()
            graphs[f] = {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
        from mutask import __version__
        import onnxruntime

        task_recs = {}
        for t in tasks:
            p = paths[t]
            rec = system.tasks.get(t) or {}
            labels = rec.get("class_names")
            if not labels and loaded.get(t) is not None:
                labels = list(loaded[t].class_names)
            num_classes = int(modules[p.components[-1]].out_features)
            if not labels or len(labels) != num_classes:
                labels = [str(i) for i in range(num_classes)]
            shp = (shapes[chains[t][0]][0], shapes[chains[t][-1]][1])
            task_recs[t] = {
                "graph": task_files[t],
                "labels": list(labels),
                "num_classes": num_classes,
                "image_size": p.image_size,
                "input_shape": shp[0],
                "output_shape": shp[1],
                "preprocessing": Preprocessing(image_size=p.image_size).model_dump(),
                "params": system.path_params(p.components),
                "accounted_params": system.accounted_params(p.components, t),
                "components": list(p.components),
                "segments": chains[t],
                "metrics": {"val_accuracy": p.metrics.get("val_accuracy"), "test_accuracy": p.metrics.get("test_accuracy")},
                "spec": rec.get("spec", t),
                "seed": rec.get("seed", 0),
                "path": p.id,
                "hparams": p.hparams,
            }
        comp_recs = {
            cid: {
                "name": store[cid].name,
                "root": bool(store[cid].root),
                "tensors": list(dict.fromkeys(comp_tensors[cid].values())),
                "tensor_map": comp_tensors[cid],
                "num_params": store[cid].num_params,
                "sha256": comp_sha[cid],
                "used_by": [t for t in tasks if cid in paths[t].components],
            }
            for cid in used
        }
        seg_recs = {}
        for sid, seg in segments.items():
            shp = shapes[sid]
            seg_recs[sid] = {
                "graph": seg_files[sid],
                "components": seg["components"],
                "tasks": seg["tasks"],
                "parents": seg["parents"],
                "input": seg["input"],
                "output": seg["output"],
                "image_size": seg["image_size"],
                "input_shape": shp[0],
                "output_shape": shp[1],
            }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weights": WEIGHTS,
            "weights_sha256": sha256_file(wpath),
            "weights_bytes": wpath.stat().st_size,
            "unique_param_bytes": unique_bytes,
            "graphs": graphs,
            "root": {"source": system.root.source, "root_params": system.root_params, "spec": _jsonable(system.root.spec)},
            "tasks": task_recs,
            "components": comp_recs,
            "segments": seg_recs,
            "parity": {"atol": ATOL, "min_argmax_agreement": MIN_ARGMAX_AGREEMENT, "provider": "CPUExecutionProvider", "tasks": parity},
            "created": {
                "at": t_start.isoformat(timespec="seconds"),
                "mutask": __version__,
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
                "exporter": "torch.onnx.export(dynamo=True) + onnxscript optimizer, no folding through parameters",
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        load_artifact(tmp, verify=True)  # the reader accepts what we wrote

        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        if bentoml_model is not None:
            _store_bento(tmp, bentoml_model, manifest)
        _commit(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------- BentoML


def _check_bento_name(name: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?", name.split(":", 1)[0]):
        raise MutaskError(f"--bentoml-model {name!r} is not a valid BentoML model name: lowercase letters, digits, '.', '_' and '-' (at most 63 characters).")


def _store_bento(art_dir: pathlib.Path, name: str, manifest: dict):
    """Copy the artifact's files into a new BentoML model ``name`` (BENTOML_HOME's store)."""
    try:
        import bentoml
    except ImportError as e:
        raise MutaskError(f"--bentoml-model needs BentoML installed ({e}). `pip install bentoml`, or drop --bentoml-model.") from e
    labels = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    metadata = {
        "format_version": FORMAT_VERSION,
        "tasks": {t: {"labels": r["labels"], "image_size": r["image_size"]} for t, r in manifest["tasks"].items()},
        "weights_sha256": manifest["weights_sha256"],
    }
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            dest = pathlib.Path(model.path)
            for f in art_dir.iterdir():
                shutil.copy2(f, dest / f.name)
    except MutaskError:
        raise
    except Exception as e:
        raise MutaskError(f"BentoML could not store model {name!r} ({e}); nothing was written. Check --bentoml-model and BENTOML_HOME.") from e
    log.info("stored in BentoML's model store as %s", model.tag)
    return model.tag
