"""The inference engine: an exported system's segment graphs, each weight in memory once.

An export cuts the tasks' paths into *segments* (see ``export/FORMAT.md``): maximal runs of
steps (a component at an image size) that the same tasks pass. The segments form a directed
acyclic graph: tasks that cloned different early components meet again at a frozen component
they share, whose segment then has several parents. Each step works on every image's rows
independently, so rows of different tasks go through a shared segment in one batch.

:meth:`Engine.run` takes a mixed list of (task, images) and runs every segment that some item
passes through exactly once, in topological order, on the rows of all those items (each item's
rows come from its own previous segment), then returns each item's logits. A batch that holds
one task only (a lone request, say) has nothing to share: it runs that task's own graph, once,
over the same weights, instead of its chain of 5 to 8 segment runs.

**Weights once.** The engine reads ``weights.safetensors`` into memory once and hands every
session the tensors it needs as ONNX Runtime initializers that point into that one buffer
(``SessionOptions.add_initializer``), so a component used by several segments (at two image
sizes, say) or by several tasks is never copied per session. Three ONNX Runtime features would
make per-session copies and are turned off for these sessions: pre-packing of MatMul weights
(``session.disable_prepacking``), constant folding, which would fold the graphs'
``Transpose(weight)`` into a new transposed tensor (without it ONNX Runtime fuses the transpose
into ``FusedMatMul``), and the NCHWc layout transformer, which would reorder the patch
embedding's convolution weight into a copy. A test changes every stored tensor in turn and checks
that the logits of every task using it move. The logits are the same; the cost, recorded by
``benchmarks/serving_bench.py`` against segment sessions that load their own weights, is ONNX
Runtime packing a weight matrix on each call instead of once: it does not grow with the rows,
so it fades with batch size and with the model's token count. On CUDA each session
copies the weights it reads to the GPU (host memory still holds them once; on the GPU a
component used at two image sizes is there twice), and hidden states go through host memory
between segments; neither has been measured here (no GPU was available).

:class:`MicroBatcher` feeds it: concurrent requests (any tasks) are collected for up to
``max_wait_ms`` or ``max_batch`` rows, run in one worker thread (one inference at a time),
split per request, and their futures resolved. Threads: sequential execution, inter-op 1, one
inference at a time, each session with an intra-op pool of ``threads`` threads (all cores by
default; the server leaves one core out) that does not spin, so the pools of the sessions not
running sleep and never oversubscribe the cores (see :func:`_session_options`). The price is
idle threads: sessions x (threads - 1) of them (the demo system: 38 sessions; 1 thread each on
2 cores, ~530 idle threads on 16); ``MUTASK_ORT_THREADS`` bounds it.

Torch-free: this module imports onnxruntime and numpy only (and the artifact reader).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pathlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from mutask.export.artifact import external_refs, read_safetensors_header

from .preprocess import check_spec

log = logging.getLogger("mutask.serving")

_GLOBAL_POOLS: dict = {}  # set once per process: {"threads": n} when ORT global pools are on
_GLOBAL_LOCK = threading.Lock()

# safetensors dtype -> numpy (the dtypes an export can hold that numpy has)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class EngineError(RuntimeError):
    """The artifact cannot be served (bad manifest, a graph that fails its check)."""


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def server_threads() -> int:
    """The server's default ONNX Runtime intra-op threads: every core but one, which is left to
    the event loop, the image decoding and the batcher (at least 1). On the 2-core development
    machine, 1 thread answered a request sooner and served more requests per second than 2
    (benchmarks/results/serving.md records the setting)."""
    return max(1, cpu_count() - 1)


def _gpu_present() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def choose_providers(device: str | None = None) -> list:
    """Execution providers for ``device``: "auto" (CUDA where onnxruntime-gpu has it and a GPU
    is present, else CPU), "cuda" (CUDA, CPU fallback) or "cpu". Default: ``MUTASK_DEVICE`` or auto."""
    import onnxruntime as ort

    device = (device or os.environ.get("MUTASK_DEVICE") or "auto").lower()
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise EngineError(f"unknown device {device!r}: use auto, cpu or cuda")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device in ("cuda", "gpu") and not cuda:
        log.warning("device %s asked for, but onnxruntime offers %s: running on CPU", device, available)
    if cuda and (device in ("cuda", "gpu") or (device == "auto" and _gpu_present())):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_options(threads: int, global_pools: bool):
    """Sequential-execution session options on a thread budget of ``threads``.

    Default: per-session intra-op pools of ``threads`` threads (inter-op 1) with spinning off,
    so a finished segment's idle pool does not compete with the next one's, nor with the
    event loop and the decoding. With ``global_pools`` every session shares ONNX Runtime's
    global intra-op pool instead (one pool for all segments); its threads spin between runs
    and ONNX Runtime's Python API cannot turn that off, which cost ~4 ms of CPU per request in
    the server on 2 cores, so it is opt-in (``MUTASK_ORT_GLOBAL_POOLS=1``). Once set, a process
    can no longer create sessions with their own pools."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no per-session memory arena: on the demo system the 38 sessions' arenas held ~10 MiB
    # for a few KiB of activations each, and plain allocation was no slower (engine images/s
    # at 1, 8 and 32 requests per batch, 7 interleaved repeats: 962 vs 935, 1275 vs 1167,
    # 2310 vs 2369 with the arena; measured once, 2026-11-24)
    so.enable_cpu_mem_arena = False
    with _GLOBAL_LOCK:
        if global_pools and "threads" not in _GLOBAL_POOLS and hasattr(ort, "set_global_thread_pool_sizes"):
            try:
                ort.set_global_thread_pool_sizes(threads, 1)
                _GLOBAL_POOLS["threads"] = threads
            except Exception as e:
                log.info("onnxruntime global thread pools unavailable (%s): per-session pools", e)
        global_threads = _GLOBAL_POOLS.get("threads")
    if global_threads:  # set in this process: every session must use them
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class WeightStore:
    """Every tensor of an artifact's ``weights.safetensors``, read into one buffer once.

    ``arrays[name]`` is a numpy view into that buffer and ``values[name]`` an ONNX Runtime
    ``OrtValue`` over the same memory (no copy); :meth:`bind` adds, to a graph's session
    options, the tensors its external-data initializers name (by their offset in the file)."""

    def __init__(self, path):
        import onnxruntime as ort

        start, header = read_safetensors_header(path)
        self.path = pathlib.Path(path)
        self.buffer = np.fromfile(path, dtype=np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        self._by_range: dict[tuple, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise EngineError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which the engine cannot hold (it serves {sorted(_DTYPES)})")
            b, e = info["data_offsets"]
            arr = self.buffer[start + b : start + e].view(dtype).reshape(info["shape"])
            self.arrays[name] = arr
            self._by_range[(start + b, e - b)] = name
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in self.arrays.items()}

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def bind(self, so, graph_path) -> dict[str, str]:
        """Point every external initializer of ``graph_path`` at the store; returns
        {initializer name: tensor name}. :class:`EngineError` if one is not a stored tensor."""
        bound = {}
        for ref in external_refs(graph_path.read_bytes()):
            if not ref["external"]:
                continue
            if ref["location"] != self.path.name:
                raise EngineError(f"{graph_path}: initializer {ref['name']!r} reads {ref['location']!r}, not {self.path.name}")
            name = self._by_range.get((ref["offset"], ref["length"]))
            if name is None:
                raise EngineError(f"{graph_path}: initializer {ref['name']!r} is not one tensor of {self.path}")
            so.add_initializer(ref["name"], self.values[name])
            bound[ref["name"]] = name
        return bound


@dataclass
class Segment:
    id: str
    parents: tuple
    tasks: tuple
    input: str
    output: str
    image_size: int
    children: list = field(default_factory=list)

    @property
    def shared(self) -> bool:
        return len(self.tasks) > 1


@dataclass
class TaskInfo:
    id: str
    labels: list
    image_size: int
    scale: float
    offset: float
    chain: list
    record: dict


class Engine:
    """One ONNX Runtime session per segment of ``artifact`` (an :class:`export.artifact.Artifact`)
    and one per task graph (for single-task batches), all reading their weights from one
    :class:`WeightStore`.

    ``run`` is synchronous and not re-entrant (the batcher calls it from one thread);
    ``stats`` counts rows and seconds per segment (the share of compute in shared segments).
    ``mode="per_task"`` is the benchmarks' baseline: one plain session per task graph, each
    loading its own weights the way ONNX Runtime does by default (``share_weights=False`` does
    the same for the segment sessions: another benchmark baseline).
    """

    def __init__(
        self, artifact, *, device: str | None = None, threads: int | None = None, verify: bool = True,
        global_pools: bool = False, mode: str | None = None, share_weights: bool = True,
    ):
        import onnxruntime as ort

        self.artifact = artifact
        self.mode = (mode or os.environ.get("MUTASK_ENGINE") or "segments").replace("-", "_")
        self.mode = {"tree": "segments"}.get(self.mode, self.mode)  # the name before format 2
        if self.mode not in ("segments", "per_task"):
            raise EngineError(f"unknown engine mode {self.mode!r}: segments (the server) or per_task (a benchmark baseline)")
        self.threads = int(threads or os.environ.get("MUTASK_ORT_THREADS") or cpu_count())
        self.providers = choose_providers(device)
        self.ready = False
        self._lock = threading.Lock()
        self.tasks: dict[str, TaskInfo] = {}
        self.segments: dict[str, Segment] = {}
        self._load_manifest()
        t0 = time.perf_counter()
        # segments: one session per segment, and one per task graph for batches of a single
        # task (one run instead of a chain: nothing to share), all over the shared weight
        # store. per_task: one session per task graph, the baseline that loads every shared
        # weight per task (benchmarks only).
        self.sessions: dict[str, object] = {}
        self.bindings: dict[str, dict] = {}  # session key -> {initializer: tensor in the store}
        # share_weights=False (benchmarks only): each segment session loads its own weights
        # the way ONNX Runtime does by default, to measure what the shared store costs
        self.weights = WeightStore(artifact.weights_path) if self.mode == "segments" and share_weights else None
        units = [(f"task:{tid}", artifact.graph_path(tid), f"task {tid}'s graph") for tid in self.tasks]
        if self.mode == "segments":
            units = [(sid, artifact.segment_path(sid), f"segment {sid}") for sid in self.order] + units
        for key, path, what in units:
            so = _session_options(self.threads, global_pools)
            disabled = None
            try:
                if self.weights is not None:
                    self.bindings[key] = self.weights.bind(so, path)
                    so.add_session_config_entry("session.disable_prepacking", "1")
                    disabled = ["ConstantFolding", "NchwcTransformer"]
                session = ort.InferenceSession(str(path), so, providers=self.providers, disabled_optimizers=disabled)
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"{what}: onnxruntime cannot load {path}: {e}") from e
            inputs = session.get_inputs()
            if len(inputs) != 1:
                raise EngineError(f"{what}: expected one input, the graph has {[i.name for i in inputs]}")
            self.sessions[key] = session
        self._input_names = {k: s.get_inputs()[0].name for k, s in self.sessions.items()}
        first = next(iter(self.sessions.values()), None)
        self.active_providers = list(first.get_providers()) if first else list(self.providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.active_providers else "cpu"
        self.load_seconds = time.perf_counter() - t0
        self.stats = {k: {"rows": 0, "runs": 0, "seconds": 0.0} for k in self.sessions}
        if verify:
            self.verify()
        self.ready = True
        log.info(
            "engine (%s): %d tasks, %d sessions on %s (%s), %d ORT threads%s, loaded in %.2f s",
            self.mode, len(self.tasks), len(self.sessions), self.device, ",".join(self.active_providers), self.threads,
            " (global pool)" if _GLOBAL_POOLS.get("threads") else "", self.load_seconds,
        )

    @classmethod
    def check(cls, artifact) -> None:
        """Validate what the engine needs from the manifest (chains, segment graph,
        preprocessing), without loading any graph: :class:`EngineError` if it cannot be served."""
        probe = cls.__new__(cls)
        probe.artifact, probe.tasks, probe.segments = artifact, {}, {}
        probe._load_manifest()

    def is_shared(self, key: str) -> bool:
        """Whether a ``stats`` key (a segment, or a per-task graph) serves more than one task."""
        seg = self.segments.get(key)
        return bool(seg is not None and seg.shared)

    # ---- manifest -> segment graph -----------------------------------------------------------

    def _load_manifest(self) -> None:
        art = self.artifact
        if not art.tasks:
            raise EngineError("the artifact has no tasks")
        for sid, rec in art.segments.items():
            try:
                self.segments[sid] = Segment(
                    id=sid, parents=tuple(rec["parents"]), tasks=tuple(rec.get("tasks") or ()), input=rec["input"],
                    output=rec["output"], image_size=int(rec["image_size"]),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise EngineError(f"segment {sid}: malformed manifest record ({e!r})") from None
        for sid, seg in self.segments.items():
            if (seg.input == "image") != (not seg.parents):
                raise EngineError(f"segment {sid} takes {seg.input!r} but has parents {list(seg.parents)}")
            for p in seg.parents:
                if p not in self.segments:
                    raise EngineError(f"segment {sid}: parent {p} is not in the manifest")
                self.segments[p].children.append(sid)
        for tid, rec in art.tasks.items():
            try:
                labels = [str(x) for x in rec["labels"]]
                size = int(rec["image_size"])
                scale, offset = check_spec(rec.get("preprocessing") or {}, f"task {tid}")
            except (KeyError, TypeError, ValueError) as e:
                raise EngineError(f"task {tid}: {e}") from None
            chain = list(art.chain(tid))
            if not chain:
                raise EngineError(f"task {tid} has an empty segment chain")
            for i, sid in enumerate(chain):
                seg = self.segments.get(sid)
                if seg is None:
                    raise EngineError(f"task {tid}: segment {sid} is not in the manifest")
                if tid not in seg.tasks:
                    raise EngineError(f"task {tid}: its chain has segment {sid}, which does not list it among its tasks")
                if i == 0 and seg.input != "image":
                    raise EngineError(f"task {tid}: its first segment {sid} does not take the image")
                if i and chain[i - 1] not in seg.parents:
                    raise EngineError(f"task {tid}: segment {sid} follows {chain[i - 1]}, which is not one of its parents {list(seg.parents)}")
                if i < len(chain) - 1 and seg.output != "hidden":
                    raise EngineError(f"task {tid}: segment {sid} outputs {seg.output!r} in the middle of its chain")
            if self.segments[chain[0]].image_size != size:
                raise EngineError(f"task {tid}: image size {size} but its first segment takes {self.segments[chain[0]].image_size}")
            if self.segments[chain[-1]].output != "logits":
                raise EngineError(f"task {tid}: its last segment {chain[-1]} does not output logits")
            self.tasks[tid] = TaskInfo(tid, labels, size, scale, offset, chain, rec)
        # parents before children
        order, state = [], {}

        def visit(sid):
            if state.get(sid) == "done":
                return
            if state.get(sid) == "open":
                raise EngineError(f"segment {sid}: the parent links form a cycle")
            state[sid] = "open"
            for p in self.segments[sid].parents:
                visit(p)
            state[sid] = "done"
            order.append(sid)

        for sid in self.segments:
            visit(sid)
        self.order = order

    # ---- inference --------------------------------------------------------------------------

    def run(self, items: list) -> list:
        """Run a mixed batch: ``items`` is a list of (task id, float32 (n, 3, S, S)); returns
        one float32 (n, num_labels) logits array per item. When two of its tasks share a
        segment, every segment runs once, on the rows of every item whose chain passes through
        it; otherwise each task's items run through that task's graph once (the same weights,
        fewer runs). The two ways agree to float rounding (~1e-6), not bit for bit."""
        with self._lock:
            if self.mode == "segments" and self._share_a_segment({task for task, _ in items}):
                return self._run(items)
            return self._run_per_task(items)

    def _share_a_segment(self, tasks: set) -> bool:
        """Whether two of ``tasks`` pass through one segment (else each task's graph, one run
        each, does the same work in fewer runs)."""
        return len(tasks) > 1 and any(len(tasks.intersection(seg.tasks)) > 1 for seg in self.segments.values())

    def _run_per_task(self, items: list) -> list:
        """Each task's items batched on its own graph (the baseline engine; in the segment
        engine, a batch with one task only)."""
        by_task: dict[str, list] = {}
        for i, (task, _) in enumerate(items):
            by_task.setdefault(task, []).append(i)
        results: list = [None] * len(items)
        for task, idx in by_task.items():
            key = f"task:{task}"
            x = np.concatenate([items[i][1] for i in idx], axis=0) if len(idx) > 1 else items[idx[0]][1]
            out = self._session_run(key, x)
            pos = 0
            for i in idx:
                n = items[i][1].shape[0]
                results[i] = np.asarray(out[pos : pos + n], dtype=np.float32)
                pos += n
        return results

    def _session_run(self, key: str, x: np.ndarray) -> np.ndarray:
        """One run of session ``key`` (a segment id or ``task:<id>``), counted in ``stats``."""
        t0 = time.perf_counter()
        out = self.sessions[key].run(None, {self._input_names[key]: x})[0]
        st = self.stats[key]
        st["seconds"] += time.perf_counter() - t0
        st["rows"] += x.shape[0]
        st["runs"] += 1
        return out

    def _run(self, items: list) -> list:
        through: dict[str, list] = {}  # segment -> the items through it, in item order
        for i, (task, _) in enumerate(items):
            for sid in self.tasks[task].chain:
                through.setdefault(sid, []).append(i)
        # where each item's rows are now: (array, first row, end row)
        where = [(x, 0, x.shape[0]) for _, x in items]
        for sid in self.order:
            idx = through.get(sid)
            if not idx:
                continue
            out = self._session_run(sid, _gather([where[i] for i in idx]))
            pos = 0
            for i in idx:
                n = where[i][2] - where[i][1]
                where[i] = (out, pos, pos + n)
                pos += n
        return [np.asarray(a[lo:hi], dtype=np.float32) for a, lo, hi in where]

    def predict(self, task: str, x: np.ndarray) -> np.ndarray:
        """Logits of one task for a float32 (n, 3, S, S) batch (no batching with others)."""
        return self.run([(task, x)])[0]

    def verify(self) -> None:
        """Run every task once on a constant image, through its graph and (segment engine)
        through its segment chain: right shape, finite logits, and the two agree."""
        for tid, info in self.tasks.items():
            x = np.zeros((2, 3, info.image_size, info.image_size), np.float32)
            x[1] += 0.5
            try:
                y = self._run_per_task([(tid, x)])[0]
            except Exception as e:
                raise EngineError(f"task {tid}: its graph fails to run: {e}") from e
            if y.shape != (2, len(info.labels)):
                raise EngineError(f"task {tid}: logits of shape {y.shape}, expected (2, {len(info.labels)}) (one per label)")
            if not np.isfinite(y).all():
                raise EngineError(f"task {tid}: non-finite logits on a constant image")
            if self.mode == "segments":
                try:
                    via = self._run([(tid, x)])[0]
                except Exception as e:
                    raise EngineError(f"task {tid}: its segment chain {info.chain} fails to run: {e}") from e
                if via.shape != y.shape or not np.allclose(via, y, rtol=1e-4, atol=1e-4):
                    raise EngineError(f"task {tid}: its segment chain {info.chain} disagrees with its graph; re-export the artifact")
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
            "ort_global_thread_pool": bool(_GLOBAL_POOLS.get("threads")),
            "weights_in_memory_bytes": self.weights.nbytes if self.weights is not None else None,
            "segments": {
                sid: {"parents": list(s.parents), "tasks": list(s.tasks), "shared": s.shared, "children": list(s.children)}
                for sid, s in self.segments.items()
            },
        }


def _gather(parts: list) -> np.ndarray:
    """One input array from (array, lo, hi) row ranges, in order: a view when the ranges are
    consecutive rows of one array (e.g. every row of the previous segment), else a copy."""
    a0, lo0, hi = parts[0]
    if all(a is a0 for a, _, _ in parts) and all(parts[k][1] == parts[k - 1][2] for k in range(1, len(parts))):
        return a0[lo0 : parts[-1][2]] if (lo0, parts[-1][2]) != (0, a0.shape[0]) else a0
    return np.concatenate([a[lo:hi] for a, lo, hi in parts], axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(info: TaskInfo, logits: np.ndarray, k: int = 5) -> dict:
    """One row of logits to the answer: task, label, index, top-k scores (softmax)."""
    p = softmax(logits[None])[0]
    order = np.argsort(-p, kind="stable")[: min(k, len(p))]
    index = int(np.argmax(logits))
    return {
        "task": info.id,
        "label": info.labels[index],
        "index": index,
        "scores": {info.labels[int(j)]: float(p[j]) for j in order},
    }


class MicroBatcher:
    """Adaptive asyncio micro-batcher in front of :meth:`Engine.run`.

    ``await submit(task, x)`` queues a request; one collector task per event loop takes the
    first waiting request, then keeps collecting while more are known to be coming (requests
    still being decoded, see :meth:`expect`) for up to ``max_wait_ms``, or until ``max_batch``
    rows; a lone request runs at once. The batch runs in one worker thread (one inference at
    a time), and each request gets its own rows back. ``on_batch(items, seconds)`` is called
    after each batch (metrics).
    """

    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_ms: float = 2.0, on_batch=None):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.on_batch = on_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mutask-infer")
        self._loop = None
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self.incoming = 0  # requests being decoded that will submit soon
        self.batches = 0

    def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._collector is None or self._collector.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._arrived = asyncio.Event()
            self._collector = loop.create_task(self._collect(), name="mutask-batcher")

    class _Expect:
        def __init__(self, b):
            self.b = b

        def __enter__(self):
            self.b.incoming += 1

        def __exit__(self, *exc):
            self.b.incoming -= 1
            if self.b._arrived is not None:
                self.b._arrived.set()

    def expect(self):
        """Context manager around a request's decoding: while it runs, the collector waits
        (up to max_wait_ms) for it instead of running a smaller batch."""
        return MicroBatcher._Expect(self)

    async def submit(self, task: str, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` (n, 3, S, S) of ``task``, batched with concurrent requests."""
        self._ensure()
        n = x.shape[0]
        if n > self.max_batch:  # a large client batch goes through in max_batch chunks
            parts = await asyncio.gather(*(self.submit(task, x[i : i + self.max_batch]) for i in range(0, n, self.max_batch)))
            return np.concatenate(parts, axis=0)
        fut = self._loop.create_future()
        self._queue.put_nowait((task, x, fut))
        self._arrived.set()
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        carry = None
        while True:
            item = carry if carry is not None else await queue.get()
            carry = None
            batch, rows = [item], item[1].shape[0]
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if self.incoming <= 0 or remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if rows + nxt[1].shape[0] > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                rows += nxt[1].shape[0]
            live = [b for b in batch if not b[2].done()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                outs = await loop.run_in_executor(self._executor, self.engine.run, [(t, x) for t, x, _ in live])
            except Exception as e:  # an engine failure fails this batch only
                log.exception("inference failed for a batch of %d requests", len(live))
                for _, _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            self.batches += 1
            for (_, _, fut), out in zip(live, outs):
                if not fut.done():
                    fut.set_result(out)
            if self.on_batch is not None:
                try:
                    self.on_batch([(t, x.shape[0]) for t, x, _ in live], seconds)
                except Exception:
                    log.exception("batch metrics callback failed")

    def close(self) -> None:
        if self._collector is not None and not self._collector.done():
            try:
                self._collector.cancel()
            except RuntimeError:  # its loop is closed
                pass
        self._executor.shutdown(wait=False)
