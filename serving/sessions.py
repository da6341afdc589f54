"""ONNX Runtime sessions for the engine: which execution providers, and how sessions use threads.

Sequential execution, inter-op 1, one inference at a time (the batcher's one worker thread),
each session with an intra-op pool of ``threads`` threads that does not spin, so the pools of
the sessions that are not running sleep and never oversubscribe the cores. The price is idle
threads: sessions x (threads - 1) of them (``--threads`` bounds it). ONNX Runtime's global pool
would be one pool for every session, but its threads spin between runs and its Python API
cannot turn that off (~4 ms of CPU per request in the server on 2 cores), so it is opt-in.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("mutask.serving")

_GLOBAL_POOLS: dict = {}  # set once per process: {"threads": n} once ORT's global pools are on
_GLOBAL_LOCK = threading.Lock()


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


def session_options(threads: int, global_pools: bool = False):
    """Session options on a budget of ``threads`` intra-op threads: per-session pools that do
    not spin (default), or ONNX Runtime's global pools (``global_pools``; once on in a process,
    every later session must use them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no per-session memory arena: on the demo system the sessions' arenas held ~10 MiB for a
    # few KiB of activations each, and plain allocation was no slower (engine images/s at 1, 8
    # and 32 requests per batch, 7 interleaved repeats: 962 vs 935, 1275 vs 1167, 2310 vs 2369)
    so.enable_cpu_mem_arena = False
    with _GLOBAL_LOCK:
        if global_pools and "threads" not in _GLOBAL_POOLS and hasattr(ort, "set_global_thread_pool_sizes"):
            try:
                ort.set_global_thread_pool_sizes(threads, 1)
                _GLOBAL_POOLS["threads"] = threads
            except Exception as e:
                log.info("onnxruntime global thread pools unavailable (%s): per-session pools", e)
        global_threads = _GLOBAL_POOLS.get("threads")
    if global_threads:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def global_pools_on() -> bool:
    return bool(_GLOBAL_POOLS.get("threads"))
