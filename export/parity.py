"""The export's parity check, run on the finished graphs before anything is committed.

Per task: ONNX Runtime (CPU) on the task graph against the PyTorch path, and the task's
segment chain against its task graph, on a bounded, evenly spaced sample of the task's test
split (``samples`` images, read through the split's streaming images; preprocessed by the task's
:class:`mutask.preprocessing.Preprocessing`, the one its manifest entry records: the root's at
the path's image size), or on random inputs when its data cannot be loaded (recorded as
such). Both must agree as :func:`export.chain.agreement` rules (within :data:`export.chain.ATOL`,
arg-max agreement of at least :data:`export.chain.MIN_ARGMAX_AGREEMENT`); the chain check is
:func:`export.chain.chain_vs_graph`.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from mutask.errors import MutaskError

from .chain import ATOL, MIN_ARGMAX_AGREEMENT, agreement, chain_vs_graph, release_heap
from .entries import task_preprocessing
from .manifest import TaskParity
from .verify import DEFAULT_SAMPLES, check_data, check_inputs

__all__ = ["load_task_data", "check_parity"]


def load_task_data(system, tasks: list[str], data: dict | None) -> dict:
    """Task -> TaskData, or None when it cannot be loaded (parity then runs on random inputs).
    ``data`` overrides; otherwise each task is loaded from the spec and seed its STATE records."""
    records = {t: system.tasks.get(t) or {} for t in tasks}
    return {t: check_data(t, rec.get("spec"), rec.get("seed", 0), data) for t, rec in records.items()}


def check_parity(system, paths: dict, modules: dict, chains: dict, task_graphs: dict[str, pathlib.Path], segment_graphs: dict[str, pathlib.Path],
                 task_data: dict, *, out, samples: int = DEFAULT_SAMPLES, show_progress: bool = True) -> dict[str, TaskParity]:
    """Task -> its parity record, on ``samples`` test images per task (0: all of them).
    ``paths``: task -> TaskPath; ``modules``: component id -> CPU module; ``chains``: task ->
    segment ids; ``task_graphs`` / ``segment_graphs``: the graph files; ``task_data``: from
    :func:`load_task_data`. One ONNX Runtime session is alive at a time (the task graph, then
    each segment of its chain in turn), so memory stays at one session's weights and working
    set beyond the sample. Raises :class:`MutaskError` naming every failing task (and saying
    that nothing was written to ``out``) when one is outside the bounds."""
    from mutask.progress import bar

    from mutask.evolve.model import PathModel

    tasks = list(paths)
    parity: dict[str, TaskParity] = {}
    for t in bar(iterable=tasks, desc="parity", unit="task", disable=not show_progress, leave=False):
        p = paths[t]
        batches, _, source = check_inputs(task_data[t], task_preprocessing(system, p), samples)
        model = PathModel([system.store[c].name for c in p.components], [modules[c] for c in p.components]).eval()
        with torch.no_grad():
            ref = np.concatenate([model(torch.from_numpy(x)).numpy() for x in batches])
        got, vs_graph = chain_vs_graph(task_graphs[t], [segment_graphs[sid] for sid in chains[t]], batches)
        del model, batches
        release_heap()
        vs_torch = agreement(got, ref)
        parity[t] = TaskParity(
            inputs=source,
            examples=int(len(ref)),
            onnx_vs_torch_max_abs_diff=vs_torch.max_abs_diff,
            onnx_vs_torch_argmax_agreement=vs_torch.argmax_agreement,
            onnx_vs_torch_ok=vs_torch.ok,
            chain_vs_graph_max_abs_diff=vs_graph.max_abs_diff,
            chain_vs_graph_argmax_agreement=vs_graph.argmax_agreement,
            chain_vs_graph_ok=vs_graph.ok,
            ok=vs_torch.ok and vs_graph.ok,
        )
    failures = [t for t in tasks if not parity[t].ok]
    if failures:
        lines = [
            f"  {t}: ONNX vs PyTorch max |diff| {parity[t].onnx_vs_torch_max_abs_diff:.3g}, arg-max agreement {parity[t].onnx_vs_torch_argmax_agreement:.4f}; "
            f"segment chain vs graph max |diff| {parity[t].chain_vs_graph_max_abs_diff:.3g}, agreement {parity[t].chain_vs_graph_argmax_agreement:.4f}"
            for t in failures
        ]
        raise MutaskError(
            f"export parity failed (needs max |logit diff| <= {ATOL:g} x max(1, max |logit|) and arg-max agreement >= {MIN_ARGMAX_AGREEMENT:.1%}); nothing was written to {out}:\n"
            + "\n".join(lines)
        )
    return parity
