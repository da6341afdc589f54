"""The chain check: a task's segment chain against its whole graph in ONNX Runtime (torch-free).

:func:`chain_vs_graph` runs both on a set of input batches, one session alive at a time, and
judges them by :func:`export.agreement.agreement` (the rule, shared with the server's start-up
check). Export's parity check and ``--verify-only`` use it. Needs numpy, and onnxruntime when
graphs are run; no torch.
"""

from __future__ import annotations

import numpy as np

from .agreement import ATOL, MIN_ARGMAX_AGREEMENT, Agreement, agreement
from .manifest import SEGMENT_INPUT, SEGMENT_OUTPUT, TASK_INPUT, TASK_OUTPUT

__all__ = ["ATOL", "MIN_ARGMAX_AGREEMENT", "Agreement", "agreement", "chain_vs_graph", "graph_outputs", "ort_session", "release_heap"]


def ort_session(path, threads: int | None = None):
    """A CPU ONNX Runtime session for one graph file (external data resolves next to it),
    without a memory arena (what a check allocates is returned when the session goes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def release_heap() -> None:
    """Give the heap memory freed so far back to the operating system (glibc's ``malloc_trim``;
    a no-op elsewhere). ONNX Runtime without an arena and torch on the CPU allocate every
    activation with malloc; glibc keeps what they free in its per-thread arenas, so without
    this each session of a ViT-S export's parity check left its high-water mark behind and the
    process grew from session to session."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def graph_outputs(path, batches, input_name: str, output_name: str, open_session=ort_session) -> list[np.ndarray]:
    """One graph's outputs for every batch, from one session released before returning."""
    session = open_session(path)
    try:
        return [session.run([output_name], {input_name: x})[0] for x in batches]
    finally:
        del session
        release_heap()


def chain_vs_graph(graph, segments: list, batches, open_session=ort_session) -> tuple[np.ndarray, Agreement]:
    """(the task graph's logits, how its segment chain agrees with them) on ``batches``.
    ``graph``: the task graph file; ``segments``: its chain's segment graph files, first to
    last; ``open_session``: path -> session (errors it raises propagate)."""
    whole = np.concatenate(graph_outputs(graph, batches, TASK_INPUT, TASK_OUTPUT, open_session))
    outs = batches
    for path in segments:
        outs = graph_outputs(path, outs, SEGMENT_INPUT, SEGMENT_OUTPUT, open_session)
    return whole, agreement(np.concatenate(outs), whole)
