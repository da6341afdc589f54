"""The inference engine: an exported system's ONNX graphs over one copy of its weights.

:meth:`Engine.run` runs rows asked for one task through the task's own graph (each task once
per batch) and one array asked for several tasks through the segment DAG (``export/FORMAT.md``:
each shared segment once). On CPU every session reads its weights from one pre-packed copy
(:mod:`mutask.serving.prepack`); elsewhere each loads its own. Sessions run one at a time (the
batcher's thread), each with its own pool of ``threads`` threads that do not spin, so idle
pools never oversubscribe the cores (ONNX Runtime's global pool spins between runs, and its
Python API cannot turn that off: ~4 ms of CPU per request on 2 cores).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref

import numpy as np

from mutask.export.agreement import agreement

from .prepack import PrepackedPool

__all__ = ["Engine", "EngineError"]

log = logging.getLogger("mutask.serving")


class EngineError(RuntimeError):
    """The artifact cannot be served (a graph that does not load or fails its check)."""


def gpu_present() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: "auto" (CUDA where onnxruntime-gpu has it and a GPU
    is present, else CPU), "cuda" (CUDA, CPU fallback) or "cpu"."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise EngineError(f"unknown device {device!r}: use auto, cpu or cuda")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        log.warning("device cuda asked for, but onnxruntime offers %s: running on CPU", available)
    if cuda and (device == "cuda" or (device == "auto" and gpu_present())):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int):
    """Session options on a budget of ``threads`` intra-op threads that do not spin."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no per-session memory arena: on the demo system the sessions' arenas held ~10 MiB for a
    # few KiB of activations each, and plain allocation was no slower
    so.enable_cpu_mem_arena = False
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class Engine:
    """ONNX Runtime sessions for an artifact (an :class:`mutask.export.artifact.Artifact`): one
    per task graph and one per segment. ``run`` is synchronous and not re-entrant (the batcher
    calls it from one thread); ``stats`` counts rows, runs and seconds per session."""

    def __init__(self, artifact, *, device: str = "auto", threads: int = 1, verify: bool = True, prepack: bool = True):
        import onnxruntime as ort

        self.artifact = artifact
        self.threads = int(threads)
        self.providers = choose_providers(device)
        self.tasks = artifact.tasks
        self.segments = artifact.segments
        self.order = artifact.manifest.segment_order()
        self.ready = False
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        units = [(f"task:{tid}", artifact.graph_path(tid), f"task {tid}'s graph") for tid in self.tasks]
        units += [(sid, artifact.segment_path(sid), f"segment {sid}") for sid in self.order]
        self.pool, models = None, {}
        if prepack and self.providers == ["CPUExecutionProvider"]:
            self.pool, models = _prepacked_pool(units, self.threads, self.providers)
        self.sessions: dict[str, object] = {}
        for key, path, what in units:
            so = session_options(self.threads)
            try:
                if self.pool is not None:
                    path = models[key]
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once, in the pool
                session = ort.InferenceSession(str(path), so, providers=self.providers)
            except Exception as e:
                raise EngineError(f"{what}: onnxruntime cannot load {path}: {e}") from e
            if len(session.get_inputs()) != 1:
                raise EngineError(f"{what}: expected one input, the graph has {[i.name for i in session.get_inputs()]}")
            self.sessions[key] = session
        if self.pool is not None:
            if os.name == "posix":
                self.pool.close()  # the sessions keep the deleted pool's pages mapped
            else:
                weakref.finalize(self, self.pool.close)
        self.weights_mode = "prepacked" if self.pool is not None else "own"
        self._inputs = {k: s.get_inputs()[0].name for k, s in self.sessions.items()}
        self._shared_tasks = [frozenset(seg.tasks) for seg in self.segments.values() if seg.shared]
        self.active_providers = list(next(iter(self.sessions.values())).get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.active_providers else "cpu"
        self.load_seconds = time.perf_counter() - t0
        self.stats = {k: {"rows": 0, "runs": 0, "seconds": 0.0} for k in self.sessions}
        if verify:
            self.verify()
        self.ready = True
        log.info("engine: %d tasks, %d sessions on %s (%s), weights %s, %d ORT threads, loaded in %.2f s", len(self.tasks),
                 len(self.sessions), self.device, ",".join(self.active_providers), self.weights_mode, self.threads, self.load_seconds)

    def run(self, items: list) -> list:
        """One float32 (n, num_labels) array of logits per item of ``items`` (task id, float32
        (n, 3, S, S)). Items that pass the same array for tasks sharing a segment go through the
        segment DAG together; every other item through its task's graph, each task's rows in one
        run. The two ways agree to float rounding (~1e-6)."""
        by_array: dict[int, set] = {}
        for task, x in items:
            by_array.setdefault(id(x), set()).add(task)
        multi = {k for k, tasks in by_array.items() if len(tasks) > 1 and any(len(tasks & shared) > 1 for shared in self._shared_tasks)}
        via_dag = [i for i, (_, x) in enumerate(items) if id(x) in multi]
        via_graphs = [i for i, (_, x) in enumerate(items) if id(x) not in multi]
        out: list = [None] * len(items)
        with self._lock:
            for idx, fn in ((via_graphs, self._run_graphs), (via_dag, self._run_segments)):
                if idx:
                    for i, y in zip(idx, fn([items[i] for i in idx])):
                        out[i] = y
        return out

    def _run_graphs(self, items: list) -> list:
        """Each task's graph once over the rows of all its items."""
        by_task: dict[str, list] = {}
        for i, (task, _) in enumerate(items):
            by_task.setdefault(task, []).append(i)
        results: list = [None] * len(items)
        for task, idx in by_task.items():
            x = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
            y, pos = self._session_run(f"task:{task}", x), 0
            for i in idx:
                n = items[i][1].shape[0]
                results[i], pos = y[pos : pos + n], pos + n
        return results

    def _run_segments(self, items: list) -> list:
        """The segment DAG in topological order, each segment once on the rows of every item
        whose chain passes it (items share rows from the same array until their chains part)."""
        where = [(id(x), x) for _, x in items]  # each item's rows now: (what they are, the array)
        for sid in self.order:
            idx = [i for i, (task, _) in enumerate(items) if sid in self.tasks[task].segments]
            if not idx:
                continue
            slots: dict = {}  # what the rows are -> (first row in the run, the rows)
            for i in idx:
                key, rows = where[i]
                if key not in slots:
                    slots[key] = (sum(r.shape[0] for _, r in slots.values()), rows)
            parts = [rows for _, rows in slots.values()]
            y = self._session_run(sid, np.concatenate(parts) if len(parts) > 1 else parts[0])
            for i in idx:
                key, rows = where[i]
                lo = slots[key][0]
                where[i] = ((sid, key), y[lo : lo + rows.shape[0]])
        return [np.asarray(rows, dtype=np.float32) for _, rows in where]

    def _session_run(self, key: str, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        y = self.sessions[key].run(None, {self._inputs[key]: x})[0]
        st = self.stats[key]
        st["seconds"] += time.perf_counter() - t0
        st["rows"] += x.shape[0]
        st["runs"] += 1
        return y

    def verify(self) -> None:
        """Run every task once on a constant image, through its graph and through its segment
        chain: right shape, finite logits, and the two agree as export's chain check rules
        (:func:`mutask.export.agreement.agreement`)."""
        for tid, task in self.tasks.items():
            x = np.zeros((2, 3, task.image_size, task.image_size), np.float32)
            x[1] += 0.5
            try:
                y = self._run_graphs([(tid, x)])[0]
            except Exception as e:
                raise EngineError(f"task {tid}: its graph fails to run: {e}") from e
            if y.shape != (2, len(task.labels)):
                raise EngineError(f"task {tid}: logits of shape {y.shape}, expected (2, {len(task.labels)}) (one per label)")
            if not np.isfinite(y).all():
                raise EngineError(f"task {tid}: non-finite logits on a constant image")
            try:
                via = self._run_segments([(tid, x)])[0]
            except Exception as e:
                raise EngineError(f"task {tid}: its segment chain {task.segments} fails to run: {e}") from e
            check = agreement(via, y)
            if not check.ok:
                raise EngineError(f"task {tid}: its segment chain {task.segments} disagrees with its graph (max |logit difference| "
                                  f"{check.max_abs_diff:.2g}, export.agreement's rule); re-export the artifact")
        for st in self.stats.values():
            st.update(rows=0, runs=0, seconds=0.0)


def _prepacked_pool(units: list, threads: int, providers: list) -> tuple:
    """(pool, {key: pooled model path}), or (None, {}) with a warning where this ONNX Runtime
    cannot pre-pack (each session then loads its own weights)."""
    pool = PrepackedPool()
    try:
        for key, path, _ in units:
            pool.add(key, path, session_options(threads), providers)
        return pool, pool.finish()
    except Exception as e:
        pool.close()
        log.warning("pre-packed weights unavailable (%s: %s): each session loads its own", type(e).__name__, e)
        return None, {}
