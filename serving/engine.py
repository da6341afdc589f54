"""The inference engine: an exported system's segment graphs over one copy of its weights.

An export cuts the tasks' paths into *segments* (see ``export/FORMAT.md``): maximal runs of
steps (a component at an image size) that the same tasks pass. The segments form a directed
acyclic graph: tasks that cloned different early components meet again at a frozen component
they share, whose segment then has several parents. Each step works on every image's rows
independently, so rows of different tasks go through a shared segment in one batch.

:meth:`Engine.run` takes a mixed list of (task, images) and runs every segment that some item
passes through exactly once, in topological order, on the rows of all those items (each item's
rows come from its own previous segment), then returns each item's logits. A batch in which no
two tasks share a segment (a lone request, say) has nothing to share: each task's items run
through that task's own graph, once, over the same weights, instead of a chain of segments.
Where tasks do share segments, a cost model measured at start on this machine
(:mod:`mutask.serving.calibrate`) decides which of the two ways is cheaper (where it is close,
the first batches of that shape try both and the faster stays), and every session
runs in chunks of the number of rows that costs least per row here. Items that pass the same
array (one image for several tasks) share its rows in every segment their tasks share.
Every session reads its weights from one copy: a pool of pre-packed weights made at start
(:mod:`mutask.serving.prepack`), or a :class:`~mutask.serving.weights.WeightStore`.

The manifest was validated by its schema when the artifact was loaded (chains, parents, a
topological order), so the engine only builds sessions and runs them. Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import numpy as np

from .calibrate import MODEL_TRUSTED_BELOW, CostModel, Ways, run_costs
from .calibrate import rows_per_run as measure_rows_per_run
from .prepack import PrepackedPool, can_delete_mapped_files
from .sessions import EngineError, choose_providers, global_pools_on, session_options
from .weights import SHARED_WEIGHTS_DISABLED_OPTIMIZERS, WeightStore

__all__ = ["Engine", "EngineError"]

# A batch goes through the segments only when the cost model predicts them this much cheaper
# than the task graphs: the model, built from each session's one-row run, still leaves out what
# gathering rows and cold caches between many small runs cost (on the demo system chains of
# segments took 1.2-2x what it predicted), and a close call is then checked by the clock
# (calibrate.Ways).
SEGMENTS_MARGIN = 0.85

log = logging.getLogger("mutask.serving")


class Engine:
    """ONNX Runtime sessions for an artifact (an :class:`mutask.export.artifact.Artifact`).

    ``mode="segments"`` (the server): one session per segment and one per task graph (for
    batches with nothing to share), all over one copy of the weights: on CPU the pre-packed
    pool (:mod:`~mutask.serving.prepack`; ``prepack=False``, or where ONNX Runtime cannot, one
    unpacked :class:`WeightStore`), on CUDA the store. ``mode="per_task"``: one
    plain session per task graph, each loading its own weights the way ONNX Runtime does by
    default (the benchmarks' baseline); ``share_weights=False`` does the same for the segment
    sessions (another baseline). ``run`` is synchronous and not re-entrant (the batcher calls
    it from one thread); ``stats`` counts rows, ONNX Runtime runs and seconds per session.
    """

    def __init__(
        self, artifact, *, device: str = "auto", threads: int = 1, verify: bool = True,
        global_pools: bool = False, mode: str = "segments", share_weights: bool = True,
        rows_per_run: int = 0, max_rows: int = 32, prepack: bool = True,
    ):
        import onnxruntime as ort

        if mode not in ("segments", "per_task"):
            raise EngineError(f"unknown engine mode {mode!r}: segments (the server) or per_task (a benchmark baseline)")
        self.artifact = artifact
        self.mode = mode
        self.threads = int(threads)
        self.providers = choose_providers(device)
        self.tasks = artifact.tasks
        self.segments = artifact.segments
        self.order = artifact.manifest.segment_order()
        self.ready = False
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        self.sessions: dict[str, object] = {}
        self.bindings: dict[str, dict] = {}  # session key -> {initializer: tensor in the store}
        units = [(f"task:{tid}", artifact.graph_path(tid), f"task {tid}'s graph") for tid in self.tasks]
        if mode == "segments":
            units = [(sid, artifact.segment_path(sid), f"segment {sid}") for sid in self.order] + units
        shared = mode == "segments" and share_weights
        self.weights, self.pool = None, None
        if shared and prepack and self.providers == ["CPUExecutionProvider"]:
            self.pool = self._prepacked_pool(units, global_pools)
        if shared and self.pool is None:
            self.weights = WeightStore(artifact.weights_path)
        self.weights_mode = "prepacked" if self.pool else "store" if self.weights else "own"
        for key, path, what in units:
            so = session_options(self.threads, global_pools)
            disabled = None
            try:
                if self.pool is not None:
                    path = self.pool_models[key]
                    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once, in the pool
                elif self.weights is not None:
                    self.bindings[key] = self.weights.bind(so, path)
                    disabled = SHARED_WEIGHTS_DISABLED_OPTIMIZERS
                session = ort.InferenceSession(str(path), so, providers=self.providers, disabled_optimizers=disabled)
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"{what}: onnxruntime cannot load {path}: {e}") from e
            if len(session.get_inputs()) != 1:
                raise EngineError(f"{what}: expected one input, the graph has {[i.name for i in session.get_inputs()]}")
            self.sessions[key] = session
        if self.pool is not None:
            if can_delete_mapped_files():
                self.pool.close()  # the sessions keep the pool's pages mapped
            else:
                weakref.finalize(self, self.pool.close)
        self._input_names = {k: s.get_inputs()[0].name for k, s in self.sessions.items()}
        self._output_names = {k: s.get_outputs()[0].name for k, s in self.sessions.items()}
        self._bindings: dict = {}  # session key -> its reused ONNX Runtime IOBinding
        self._shared_tasks = {frozenset(seg.tasks) for seg in self.segments.values() if len(seg.tasks) > 1}
        first = next(iter(self.sessions.values()))
        self.active_providers = list(first.get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.active_providers else "cpu"
        self._state_device = self.device  # where segment outputs stay between segments
        self.load_seconds = time.perf_counter() - t0
        self.stats = {k: {"rows": 0, "runs": 0, "seconds": 0.0} for k in self.sessions}
        if verify:
            self.verify()
        # how many rows one session run takes: given, measured here (the server), or unbounded
        if rows_per_run > 0:
            self.batching = {"rows_per_run": int(rows_per_run), "reason": "set (MUTASK_ROWS_PER_RUN)"}
        elif mode == "segments":
            self.batching = measure_rows_per_run(self, max_rows)
        else:
            self.batching = {"rows_per_run": None, "reason": "one session per task graph, each run takes every row of its task"}
        self.rows_per_run = self.batching["rows_per_run"]
        self.costs = None  # the segment engine's cost model: which way a batch goes
        if mode == "segments" and any(seg.shared for seg in self.segments.values()):
            per_row = {int(k): v for k, v in self.batching.get("seconds_per_row", {}).items()}
            t_costs = time.perf_counter()
            self.costs = CostModel(run_costs(self), per_row, self.rows_per_run)
            self.batching = dict(self.batching, cost_model_seconds=round(time.perf_counter() - t_costs, 3))
        for st in self.stats.values():
            st.update(rows=0, runs=0, seconds=0.0)
        self.ready = True
        log.info(
            "engine (%s): %d tasks, %d sessions on %s (%s), %d ORT threads%s, loaded in %.2f s",
            self.mode, len(self.tasks), len(self.sessions), self.device, ",".join(self.active_providers), self.threads,
            " (global pool)" if global_pools_on() else "", self.load_seconds,
        )

    def _prepacked_pool(self, units: list, global_pools: bool):
        """Every unit's graph optimized and pre-packed once, the packs pooled
        (:mod:`mutask.serving.prepack`); None, with a warning, where this ONNX Runtime cannot
        (the engine then shares one unpacked copy, :class:`WeightStore`)."""
        pool = PrepackedPool()
        try:
            for key, path, _ in units:
                pool.add(key, path, session_options(self.threads, global_pools), self.providers)
            self.pool_models = pool.finish()
            return pool
        except Exception as e:
            pool.close()
            log.warning("pre-packed weights unavailable (%s): sessions share unpacked weights", e)
            return None

    @property
    def costs(self):
        """The cost model that decides a mixed batch's way (None: the segments whenever two of
        its tasks share one); setting it forgets the decisions taken with the old one."""
        return self._costs

    @costs.setter
    def costs(self, model) -> None:
        self._costs = model
        self.ways = Ways()  # each batch shape's way, decided with this model

    def is_shared(self, key: str) -> bool:
        """Whether a ``stats`` key (a segment, or a task's own graph) serves more than one task."""
        seg = self.segments.get(key)
        return bool(seg is not None and seg.shared)

    # ---- inference --------------------------------------------------------------------------

    def run(self, items: list) -> list:
        """Run a mixed batch: ``items`` is a list of (task id, float32 (n, 3, S, S)); returns
        one float32 (n, num_labels) logits array per item. When two of its tasks share a
        segment, every segment runs once, on the rows of every item whose chain passes through
        it; otherwise each task's items run through that task's graph once (the same weights,
        fewer runs). The two ways agree to float rounding (~1e-6), not bit for bit. Items that
        pass the *same array* (one image for several tasks, :meth:`predict_tasks`) share its
        rows in every segment their tasks share: each such segment runs on them once."""
        with self._lock:
            if self.mode != "segments":
                return self._run_per_task(items)
            shape, plan = self._decision(items)
            way = self.ways.trial_way(shape) if plan is not None else None
            if way is None:
                return self._run_segments(items, plan) if plan is not None else self._run_per_task(items)
            t0 = time.perf_counter()
            out = self._run_segments(items, plan) if way == "segments" else self._run_per_task(items)
            self.ways.timed(shape, way, time.perf_counter() - t0)
            return out

    def predict(self, task: str, x: np.ndarray) -> np.ndarray:
        """Logits of one task for a float32 (n, 3, S, S) batch (no batching with others)."""
        return self.run([(task, x)])[0]

    def predict_tasks(self, tasks: list, x: np.ndarray) -> list:
        """Logits of each of ``tasks`` for the same float32 (n, 3, S, S) batch (tasks of one
        preprocessing): every segment the tasks share runs once on ``x``."""
        return self.run([(t, x) for t in tasks])

    def _share_a_segment(self, items: list) -> bool:
        return self._segments_plan(items) is not None

    def _segments_plan(self, items: list) -> list | None:
        """The batch's plan through the segments (:meth:`_plan`) when it should take them, else
        None: two of its tasks share a segment, and the cost model (from this machine's
        timings, see calibrate.py) predicts the plan's segment runs, with the rows they merge or
        share, cost less than each task's graph running its own rows, and (once tried) the
        clock agreed. (Without a model: whenever two tasks share a segment.)"""
        return self._decision(items)[1]

    def _decision(self, items: list) -> tuple:
        """(the batch's shape, its plan or None), decided once per shape (:class:`calibrate.Ways`:
        deciding costs ~0.1 ms on the demo system; where the model picks the segments, the
        clock then checks it, see :meth:`run`)."""
        first: dict = {}
        shape = tuple((task, x.shape[0], first.setdefault(id(x), i)) for i, (task, x) in enumerate(items))
        known, plan = self.ways.get(shape)
        if not known:
            tasks = {task for task, _ in items}
            plan, ratio = self._decide(items, tasks) if len(tasks) > 1 else (None, None)
            self.ways.put(shape, plan, on_trial=plan is not None and ratio is not None and ratio >= MODEL_TRUSTED_BELOW)
        return shape, plan

    def _decide(self, items: list, tasks: set) -> tuple[list | None, float | None]:
        """(the plan through the segments or None, the model's segments/graphs cost ratio)."""
        if not any(len(tasks.intersection(shared)) > 1 for shared in self._shared_tasks):
            return None, None
        plan = self._plan(items)
        if self.costs is None:
            return plan, None
        per_task: dict[str, int] = {}
        for task, x in items:
            per_task[task] = per_task.get(task, 0) + x.shape[0]
        via_graphs = sum(self.costs.seconds(f"task:{t}", n) for t, n in per_task.items())
        via_segments = sum(self.costs.seconds(sid, sum(items[r][1].shape[0] for r in reps)) for sid, _, _, reps in plan)
        ratio = via_segments / via_graphs if via_graphs > 0 else 0.0
        return (plan if ratio < SEGMENTS_MARGIN else None), ratio

    def _plan(self, items: list) -> list:
        """How ``items`` go through the segments: for each segment some item passes, in
        topological order, (segment id, the items through it, each one's slot in the run, one
        item per slot). Items share a slot while they carry the same rows: from the same array
        (one image for several tasks) until their chains part."""
        through: dict[str, list] = {}
        for i, (task, _) in enumerate(items):
            for sid in self.tasks[task].segments:
                through.setdefault(sid, []).append(i)
        source: list = [id(x) for _, x in items]  # what each item's rows are now
        plan = []
        for sid in self.order:
            idx = through.get(sid)
            if not idx:
                continue
            slot_of: dict = {}
            slots = [slot_of.setdefault(source[i], len(slot_of)) for i in idx]
            reps: list = []  # the first item of each slot (slots are numbered as they first appear)
            for i, k in zip(idx, slots):
                if k == len(reps):
                    reps.append(i)
                source[i] = (sid, k)
            plan.append((sid, idx, slots, reps))
        return plan

    def _run_per_task(self, items: list) -> list:
        by_task: dict[str, list] = {}
        for i, (task, _) in enumerate(items):
            by_task.setdefault(task, []).append(i)
        results: list = [None] * len(items)
        for task, idx in by_task.items():
            x = np.concatenate([items[i][1] for i in idx], axis=0) if len(idx) > 1 else items[idx[0]][1]
            out = self._session_run(f"task:{task}", x)
            pos = 0
            for i in idx:
                n = items[i][1].shape[0]
                results[i] = np.asarray(out[pos : pos + n], dtype=np.float32)
                pos += n
        return results

    def _run_segments(self, items: list, plan: list | None = None) -> list:
        where = [(x, 0, x.shape[0]) for _, x in items]  # each item's rows now: (value, first, end)
        host = _Host()
        for sid, idx, slots, reps in self._plan(items) if plan is None else plan:
            parts = [where[r] for r in reps]
            out = self._session_run(sid, _gather(parts, host), bound=True)
            starts = np.cumsum([0] + [hi - lo for _, lo, hi in parts])
            for i, k in zip(idx, slots):
                where[i] = (out, int(starts[k]), int(starts[k + 1]))
        return [np.asarray(host(a)[lo:hi], dtype=np.float32) for a, lo, hi in where]

    def _session_run(self, key: str, x, bound: bool = False):
        """One session's output for ``x`` (rows first), in runs of at most ``rows_per_run``
        rows (see calibrate.py). With ``bound`` (the segment chain) through ONNX Runtime's I/O
        binding: ``x`` may be an ``OrtValue`` (a previous segment's output, passed on as it is)
        and the output stays an ``OrtValue`` on the engine's device, so on CUDA a hidden state
        that goes whole to the next segment never visits the host; on CPU the same code runs."""
        t0 = time.perf_counter()
        session, feed, step = self.sessions[key], self._input_names[key], getattr(self, "rows_per_run", None)
        rows = x.shape[0] if isinstance(x, np.ndarray) else x.shape()[0]
        run = self._bound_run if bound else (lambda k, v: session.run(None, {feed: v})[0])
        if step and rows > step:
            xh = _Host()(x)
            outs = [run(key, xh[i : i + step]) for i in range(0, rows, step)]
            out = np.concatenate([_Host()(o) for o in outs], axis=0)
        else:
            outs = [out := run(key, x)]
        st = self.stats[key]
        st["seconds"] += time.perf_counter() - t0
        st["rows"] += rows
        st["runs"] += len(outs)
        return out

    def _bound_run(self, key: str, x):
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = self.sessions[key].io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x)  # kept referenced here until the run is done
            binding.bind_cpu_input(self._input_names[key], x)
        else:
            binding.bind_ortvalue_input(self._input_names[key], x)
        binding.bind_output(self._output_names[key], self._state_device)
        self.sessions[key].run_with_iobinding(binding)
        out = binding.get_outputs()[0]
        binding.clear_binding_inputs()  # the binding holds no reference to this run's input
        return out

    def verify(self) -> None:
        """Run every task once on a constant image, through its graph and (segment engine)
        through its segment chain: right shape, finite logits, and the two agree."""
        for tid, task in self.tasks.items():
            x = np.zeros((2, 3, task.image_size, task.image_size), np.float32)
            x[1] += 0.5
            try:
                y = self._run_per_task([(tid, x)])[0]
            except Exception as e:
                raise EngineError(f"task {tid}: its graph fails to run: {e}") from e
            if y.shape != (2, len(task.labels)):
                raise EngineError(f"task {tid}: logits of shape {y.shape}, expected (2, {len(task.labels)}) (one per label)")
            if not np.isfinite(y).all():
                raise EngineError(f"task {tid}: non-finite logits on a constant image")
            if self.mode == "segments":
                try:
                    via = self._run_segments([(tid, x)])[0]
                except Exception as e:
                    raise EngineError(f"task {tid}: its segment chain {task.segments} fails to run: {e}") from e
                if via.shape != y.shape or not np.allclose(via, y, rtol=1e-4, atol=1e-4):
                    raise EngineError(f"task {tid}: its segment chain {task.segments} disagrees with its graph; re-export the artifact")
        for st in self.stats.values():
            st.update(rows=0, runs=0, seconds=0.0)

    def shared_share(self) -> float:
        """Share of the compute time spent in segments shared by more than one task."""
        total = sum(s["seconds"] for s in self.stats.values())
        shared = sum(s["seconds"] for k, s in self.stats.items() if self.is_shared(k))
        return shared / total if total else 0.0

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "device": self.device,
            "providers": self.active_providers,
            "ort_threads": self.threads,
            "ort_global_thread_pool": global_pools_on(),
            "weights": self.weights_mode,
            "weights_in_memory_bytes": self.pool.pool_bytes if self.pool else self.weights.nbytes if self.weights else None,
            "batching": self.batching,
            "settled_by_clock": dict(self.ways.settled),
            "segments": {sid: {"parents": list(s.parents), "tasks": list(s.tasks), "shared": s.shared} for sid, s in self.segments.items()},
        }


class _Host:
    """Values as host numpy arrays, each ``OrtValue`` copied to the host once per batch."""

    def __init__(self):
        self._seen: dict = {}

    def __call__(self, value) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        got = self._seen.get(id(value))
        if got is None:
            got = self._seen[id(value)] = (value, value.numpy())
        return got[1]


def _gather(parts: list, host: _Host):
    """One input from (value, lo, hi) row ranges, in order: the value itself when it is one
    whole value (an ``OrtValue`` stays where it is), a view when the ranges are consecutive
    rows of one array, else a copy on the host."""
    a0, lo0, hi = parts[0]
    if len(parts) == 1 and not isinstance(a0, np.ndarray) and (lo0, hi) == (0, a0.shape()[0]):
        return a0
    parts = [(host(a), lo, hi) for a, lo, hi in parts]
    a0 = parts[0][0]
    if all(a is a0 for a, _, _ in parts) and all(parts[k][1] == parts[k - 1][2] for k in range(1, len(parts))):
        return a0[lo0 : parts[-1][2]] if (lo0, parts[-1][2]) != (0, a0.shape[0]) else a0
    return np.concatenate([a[lo:hi] for a, lo, hi in parts], axis=0)
