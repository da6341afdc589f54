"""Dispatch: who trains a generation's children. The loop hands over a whole generation:

    records = dispatch.train_generation(ops, task, children, batch_seed, on_done)

``children`` is [(TaskPath, fresh components)] (the fresh, trainable clones are trained in
place), ``ops`` the :class:`~.operators.Operators` (``train_settings`` gives a child's
:func:`~.train.train` settings, ``judge_child`` scores it and makes its history record),
``on_done()`` is called as each child finishes; the records come back in child order.

Parents are sampled and children made at the generation's start, as in the parallel reference,
whoever trains them. Two implementations: :class:`InProcess` (here, one child after another)
and :class:`~.workers.RayPool` (Ray workers, ``--workers`` / ``--ray-address``). A child's training is a pure function of its job (path,
components, hyperparameters, the generation's batch seed), so both give the same STATE (for
equal threads per child: float reductions can differ with the thread count).
"""

from __future__ import annotations

import time

from .model import PathModel
from .train import train


class InProcess:
    """Trains a generation's children in this process."""

    def train_generation(self, ops, task: str, children: list, batch_seed: int, on_done=None) -> list[dict]:
        # The call site for training a generation together (children sharing the frozen work of
        # their common prefix): that replaces this loop; until then, one child after another.
        records = []
        for child, fresh in children:
            records.append(self.train_child(ops, task, child, fresh, batch_seed))
            if on_done is not None:
                on_done()
        return records

    def train_child(self, ops, task: str, child, fresh: dict, batch_seed: int) -> dict:
        """Train ``child`` here (its fresh components in place); returns its history record."""
        data = ops.data[task]
        model = PathModel.from_store(ops.sys.store, child, fresh).to(ops.dev)
        params = [p for c in fresh.values() for p in c.module.parameters()]
        t0 = time.perf_counter()
        result = train(model, params, data.train, data.validation, child.hparams, **ops.train_settings(child, batch_seed))
        return ops.judge_child(task, child, fresh, result, time.perf_counter() - t0)
