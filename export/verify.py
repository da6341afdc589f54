"""Checking an artifact on its own (``mutask export --verify-only ART``), without torch.

:func:`verify_artifact` runs :func:`export.artifact.load_artifact` (format version, every
file present, weights and graph sha256, every external-data reference on exactly one tensor
of the weights file), then, per task, its graph against its segment chain in ONNX Runtime on
the task's test images (loaded from the spec and seed the manifest records, preprocessed by
the manifest's contract), or on random inputs when the data cannot be loaded (and says so).
"""

from __future__ import annotations

import logging

import numpy as np

from .artifact import ArtifactError, load_artifact, reexport_hint

log = logging.getLogger("mutask")

ATOL = 1e-4  # max |logit difference|
MIN_ARGMAX_AGREEMENT = 0.999
BATCH = 64


def ort_session(path, threads: int | None = None):
    """A CPU ONNX Runtime session for one graph file (external data resolves next to it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_chain(sessions, x: np.ndarray) -> np.ndarray:
    """Feed ``x`` through a chain of single-input, single-output sessions."""
    for s in sessions:
        x = s.run(None, {s.get_inputs()[0].name: x})[0]
    return x


def random_inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    if got.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "argmax_agreement": 0.0, "ok": False}
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if len(got) else 1.0
    return {"max_abs_diff": diff, "argmax_agreement": agree, "ok": bool(diff <= ATOL and agree >= MIN_ARGMAX_AGREEMENT)}


def _inputs(art, task: str, data: dict | None):
    """(batches, labels or None, source description) for a task."""
    entry = art.tasks[task]
    size = entry.image_size
    td, why = None, ""
    if data is not None and task in data:
        td = data[task]
    else:
        try:
            from mutask.evolve.tasks import load_task

            td = load_task(entry.spec, seed=entry.seed)
        except Exception as e:  # directory gone, unknown spec
            why = str(e)
    if td is not None and len(td.test):
        images = td.test.resized(size)
        return [entry.preprocessing.normalize(images[i : i + BATCH]) for i in range(0, len(images), BATCH)], np.asarray(td.test.labels), "test split"
    log.warning("task %s: test data unavailable (%s); checking on random inputs", task, why or "empty test split")
    return [random_inputs(32, size, seed=0)], None, "random inputs (test data unavailable)"


def _open(path):
    """:func:`ort_session`, with ONNX Runtime's refusal as an :class:`ArtifactError`."""
    try:
        return ort_session(path)
    except ImportError as e:
        raise ArtifactError(f"checking an artifact needs ONNX Runtime ({e}). `pip install onnxruntime`.") from None
    except Exception as e:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise ArtifactError(f"{path}: ONNX Runtime cannot load this graph ({type(e).__name__}: {e}). {reexport_hint(path.parent)}") from None


def _run(path, session, x: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    """Output ``output_name`` of ``session`` (the graph at ``path``) fed ``x`` as
    ``input_name``; ONNX Runtime's failure (a graph without those names included) as an
    :class:`ArtifactError`."""
    try:
        return session.run([output_name], {input_name: x})[0]
    except Exception as e:  # onnxruntime's own exception types
        raise ArtifactError(f"{path}: ONNX Runtime cannot run this graph ({type(e).__name__}: {e}). {reexport_hint(path.parent)}") from None


def verify_artifact(path, data=None, *, show_progress: bool = False, raise_on_failure: bool = True) -> dict:
    """Check an artifact's own consistency; returns the report, raises :class:`ArtifactError`
    on any failure (with ``raise_on_failure``)."""
    from tqdm.auto import tqdm

    art = load_artifact(path, verify=True)
    report = {"path": str(art.path), "integrity": "ok: format version, files, sha256, external-data references", "tasks": {}}
    sessions: dict = {}
    for task in tqdm(list(art.tasks), desc="verify", unit="task", disable=not show_progress, leave=False):
        entry = art.tasks[task]
        batches, labels, source = _inputs(art, task, data)
        graph_path = art.graph_path(task)
        graph = _open(graph_path)
        chain_paths = [art.segment_path(sid) for sid in entry.segments]
        for sid, path in zip(entry.segments, chain_paths):
            if sid not in sessions:
                sessions[sid] = _open(path)
        got, via = [], []
        for x in batches:
            got.append(_run(graph_path, graph, x, "image", "logits"))
            for sid, path in zip(entry.segments, chain_paths):
                x = _run(path, sessions[sid], x, "input", "output")
            via.append(x)
        got, via = np.concatenate(got), np.concatenate(via)
        cmp = compare(via, got)
        rec = {
            "inputs": source,
            "examples": int(len(got)),
            "chain": list(entry.segments),
            "chain_vs_graph_max_abs_diff": cmp["max_abs_diff"],
            "chain_vs_graph_argmax_agreement": cmp["argmax_agreement"],
            "ok": cmp["ok"] and got.ndim == 2 and got.shape[1] == len(entry.labels),
        }
        if labels is not None:
            rec["test_accuracy"] = float((got.argmax(1) == labels).mean())
            rec["recorded_test_accuracy"] = entry.metrics.test_accuracy
        report["tasks"][task] = rec
    bad = [t for t, r in report["tasks"].items() if not r["ok"]]
    report["ok"] = not bad
    if bad and raise_on_failure:
        lines = [
            f"  {t}: chain vs graph max |diff| {report['tasks'][t]['chain_vs_graph_max_abs_diff']:.3g}, "
            f"arg-max agreement {report['tasks'][t]['chain_vs_graph_argmax_agreement']:.4f}, outputs {len(art.tasks[t].labels)} labels"
            for t in bad
        ]
        raise ArtifactError(f"artifact {art.path} is inconsistent (segment chains must match task graphs within {ATOL:g}):\n" + "\n".join(lines) + "\nRe-export it with `mutask export STATE --out ART --force`.")
    return report
