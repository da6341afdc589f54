"""Dispatch: who trains a generation's children. The loop hands over a whole generation:

    records = dispatch.train_generation(ops, task, children, batch_seed, on_done)

``children`` is [(TaskPath, fresh components)] (the fresh, trainable clones are trained in
place), ``ops`` the :class:`~.operators.Operators` (``train_settings`` gives a child's
:func:`~.train.train` settings, ``judge_child`` scores it and makes its history record),
``on_done()`` is called as each child finishes; the records come back in child order.

Parents are sampled and children made at the generation's start, as in the parallel reference,
whoever trains them. Two implementations: :class:`InProcess` (here, the whole generation at once:
:func:`~.generation.train_children` runs each frozen prefix the children share once per batch)
and :class:`~.workers.RayPool` (Ray workers, ``--workers`` / ``--ray-address``). A child's training is a pure function of its job (path,
components, hyperparameters, the generation's batch seed), so both give the same STATE (for
equal threads per child: float reductions can differ with the thread count).
"""

from __future__ import annotations


class InProcess:
    """Trains a generation's children in this process."""

    def train_generation(self, ops, task: str, children: list, batch_seed: int, on_done=None) -> list[dict]:
        from . import generation  # (looked up per call: tests wrap it)

        return generation.train_children(ops, task, children, batch_seed, on_done)
