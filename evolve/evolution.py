"""The muNet loop (with mu2Net's auto-tuned mutation probability), bare: :class:`Evolution`.

    for each round, for each task (a *visit*):
        population = [the task's best path]; seeds = other tasks' best paths and the root
        for each generation:
            parents = the next seeds (unmutated), then parents sampled best-score first
            children = a mutated (or seed) child of each parent
            train the generation's children                            (dispatch)
            accept a child when it beats its parent (a seed's child: always)
        keep the task's best path, lock its components, drop the rest, test it

The operators (seeds, sampling, mutation, score) are :class:`~.operators.Operators`; the
structure policy (muNet or a baseline: ``finetune``, ``freeze:K``, ``adapters:W``, through the
same loop and budget) is :mod:`.strategies`. Plugged in from outside: *dispatch* trains a whole
generation (:mod:`.dispatch`: in this process, or on Ray workers, :mod:`.workers`), *hooks*
see the loop's boundaries (:mod:`.hooks`: saving the STATE for ``--resume``, a progress bar).
The visit in flight is a :class:`~.progress.Visit` in ``system.progress``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .config import EvolveConfig
from .data import TaskData
from .dispatch import InProcess
from .hooks import Hooks, standard_hooks
from .operators import Operators, init_seed
from .progress import Progress, Visit

if TYPE_CHECKING:  # the loop needs no root family, so it does not import the registry's
    from .state import System

log = logging.getLogger("mutask")


class Evolution:
    """The loop over ``system``. ``dispatch`` trains a generation (default: ``pool``, else in
    this process); ``hooks`` see its boundaries (default: save to ``out``, a progress bar)."""

    def __init__(self, system: System, data: dict[str, TaskData], out=None, *, show_progress=True, pool=None, dispatch=None, hooks=None):
        self.sys, self.cfg = system, EvolveConfig(**system.config["evolve"])
        self.ops = Operators(system, data, self.cfg)
        self.dispatch = dispatch or pool or InProcess()
        self.hooks = Hooks(standard_hooks(out, show_progress) if hooks is None else hooks)

    def run(self, task_order: list[str]) -> System:
        prog = self.sys.progress = self.sys.progress or Progress()
        while prog.round < self.cfg.rounds:
            while prog.task_index < len(task_order):
                self.visit(task_order[prog.task_index], prog)
                prog.task_index, prog.visit = prog.task_index + 1, None
                self.hooks.boundary(self.sys)
            prog.round, prog.task_index = prog.round + 1, 0
        self.sys.progress = None
        self.hooks.boundary(self.sys)
        return self.sys

    def visit(self, task: str, prog: Progress) -> None:
        if prog.visit is None:
            prog.visit = self.ops.start_visit(task)
            self.hooks.boundary(self.sys)
        v, size, total = prog.visit, self.cfg.generation_size, self.cfg.children
        self.hooks.visit_started(task, prog.round, self.cfg.rounds, min(total, v.generation * size), total)
        while v.generation * size < total:
            self.generation(task, v, min(size, total - v.generation * size), prog.round)
            v.generation += 1
            self.hooks.boundary(self.sys)
        self.hooks.visit_done(task)
        self.end_visit(task, v)

    def generation(self, task: str, v: Visit, n: int, round_: int) -> None:
        data_keys, batch_seed = self.ops.generation_draws(task, v)
        parents = [self.ops.next_parent(v, i) for i in range(n)]  # (parent, mutate)
        children = [self.ops.make_child(task, p, mutate, data_keys, init_seed(batch_seed, i)) for i, (p, mutate) in enumerate(parents)]
        records = self.dispatch.train_generation(self.ops, task, children, batch_seed, on_done=self.hooks.child_done)
        for (parent, mutate), (child, fresh), record in zip(parents, children, records):
            accept = parent.task != task or child.metrics["score"] > parent.metrics["score"]
            if accept:
                self.ops.accept(v, child, fresh)
            record.update(round=round_ + 1, generation=v.generation, parent=parent.id, seed=not mutate, accepted=accept)
            self.sys.history.append(record)
        self.hooks.generation_done(v.generation + 1, self.ops.best(v))

    def end_visit(self, task: str, v: Visit) -> None:
        best = self.ops.best(v)
        if best is None:
            raise RuntimeError(f"task {task} ended its visit with no accepted path")
        self.ops.keep_best(task, v, best)
        best.metrics["test_accuracy"] = self.ops.test_accuracy(task, best)
        best.metrics["visit_seconds"] = round(time.time() - v.started, 1)
        m = best.metrics
        log.info("%s: best %s val %.3f test %.3f params %d accounted %.0f", task, best.id, m["val_accuracy"], m["test_accuracy"], m["params"], m["accounted_params"])
