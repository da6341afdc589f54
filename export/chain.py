"""The chain check, once: a task's segment chain against its whole graph (torch-free).

A task's graph is its segment chain composed into one graph, so running the chain's segments
one after another must give the task graph's logits: max |logit difference| within
:data:`ATOL` times the logits' scale (:func:`logit_scale`) and the same arg-max on at least :data:`MIN_ARGMAX_AGREEMENT` of the rows.
:func:`agreement` is that rule; :func:`chain_vs_graph` runs both on a set of input batches in
ONNX Runtime, one session alive at a time. Export's parity check, ``--verify-only`` and the
server's start-up check (which runs its own sessions, and calls :func:`agreement`) all use them.
Needs numpy, and onnxruntime when graphs are run; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import SEGMENT_INPUT, SEGMENT_OUTPUT, TASK_INPUT, TASK_OUTPUT

__all__ = ["ATOL", "MIN_ARGMAX_AGREEMENT", "Agreement", "agreement", "chain_vs_graph", "graph_outputs", "ort_session", "release_heap"]

# max |logit difference|, per unit of the logits' own scale: float32 sums round in proportion to
# their size, so logits of magnitude 20 (a trained conv head) may differ by 20x what logits of
# magnitude 1 do between two correct runtimes (seen: 3e-4 between a chain and its whole graph)
ATOL = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999


@dataclass(frozen=True)
class Agreement:
    """How far two sets of logits are apart, and whether that is within the bounds."""

    max_abs_diff: float
    argmax_agreement: float
    ok: bool


def agreement(got: np.ndarray, ref: np.ndarray, atol: float = ATOL, min_argmax: float = MIN_ARGMAX_AGREEMENT) -> Agreement:
    """``got`` against ``ref`` (rows of logits): max |difference|, share of rows with the same
    arg-max, and ``ok`` when both are within the bounds (the artifact's: :data:`ATOL`,
    :data:`MIN_ARGMAX_AGREEMENT`; a caller on another device may pass its own). Never ``ok``
    for different shapes or non-finite values."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or got.ndim != 2:
        return Agreement(float("inf"), 0.0, False)
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if len(got) else 1.0
    return Agreement(diff, agree, bool(diff <= atol * logit_scale(ref) and agree >= min_argmax))


def logit_scale(ref: np.ndarray) -> float:
    """What :data:`ATOL` is multiplied by: the largest |logit| of ``ref``, at least 1 (so logits
    within [-1, 1] keep the absolute bound)."""
    ref = np.asarray(ref)
    return max(1.0, float(np.abs(ref).max())) if ref.size and np.isfinite(ref).all() else 1.0


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
