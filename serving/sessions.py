"""ONNX Runtime sessions for the engine: which execution providers, and how sessions use threads.

Sequential execution, one inference at a time (the batcher's thread), each session with its own
intra-op pool of ``threads`` threads that do not spin, so idle sessions' pools sleep and never
oversubscribe the cores. ONNX Runtime's global pool spins between runs and its Python API cannot
turn that off (~4 ms of CPU per request on 2 cores).
"""

from __future__ import annotations

import logging
import os

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
