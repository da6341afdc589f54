"""The muNet loop (with mu2Net's auto-tuned mutation probability), and the baselines.

For each round, each task is visited in a fixed order. A visit unlocks the task's own best
path, then trains ``children`` children in generations of ``generation_size``: first the seeds
(each other task's best path and the root, unmutated), then children of parents sampled
best-score first with probability 0.5 ** (children already made). A same-task child is
accepted only when it beats its parent's score; a child of a seed is accepted. The visit ends
by keeping the task's best path, locking its components and dropping everything else.
Seeds take at most half of a visit's children (see :meth:`Evolution.pick_seeds`).

score = validation accuracy * s ** (accounted params / root params).

Baselines run through the same loop and budget, with a fixed structure policy instead of
muNet's mutations: ``finetune`` (clone everything), ``freeze:K`` (share the embeddings and
the bottom K blocks frozen, clone the rest), ``adapters:W`` (the root frozen, an adapter of
width W before every block). They see only the root as a seed: no transfer between tasks.
The policies live in :mod:`.strategies`; the visit in flight is a :class:`~.progress.Visit`.

A generation is made, trained, then judged: the driver samples its parents and makes every
child first (all of the evolution RNG's draws), then the children train, one after another in
this process or in parallel on Ray workers (:mod:`.workers`, ``--workers`` / ``--ray-address``),
then they are accepted in child order. A child's training depends only on its path, its
components, its hyperparameters and the generation's batch seed, and a new adapter's initial
weights on a seed derived from the batch seed and the child's index (:func:`init_seed`), so a
run gives the same STATE whether its children train in this process or on any number of
workers (for equal threads per child: float reductions can differ with the thread count).

Deviations from the reference, on purpose: on one machine without ``--workers`` children of
a generation are trained one after another (this runs on CPUs), with parents sampled at the
generation's start as in the parallel reference; optimizer momentum is not carried from parent to child (mu2Net does);
pos_embed is always sourced from the parent (or root) and resized bilinearly when the image
size differs, rather than looked up by shape among ancestors.

The root kind (:class:`~.root.Root`: a ViT or a CNN) names a path's components, makes heads
and adapters and fits clones to an image size; the loop itself knows no architecture.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from . import hparams as H
from .config import BUDGETS, EvolveConfig  # noqa: F401 (re-exported)
from .data import TaskData
from .model import Component, TaskPath, PathModel, block_index
from .progress import Progress, Visit
from .state import System
from .strategies import parse_strategy
from .train import accuracy, device, train

log = logging.getLogger("mutask")

class Evolution:
    """Runs the loop over a :class:`System`, saving it to ``out`` at every generation boundary."""

    def __init__(self, system: System, data: dict[str, TaskData], out, *, show_progress: bool = True, pool=None):
        """``pool``: a :class:`.workers.RayPool` that trains each generation's children on Ray
        workers; None trains them here, one after another."""
        self.sys = system
        self.pool = pool
        self.data = data
        self.out = out
        self.cfg = EvolveConfig(**system.config["evolve"])
        self.show_progress = show_progress
        self.dev = device()
        self.strategy = parse_strategy(self.cfg.strategy)
        for comp in system.store.components.values():  # every component on the device children train on
            comp.module.to(self.dev)

    # -- scores -----------------------------------------------------------------------------
    def score(self, val_acc: float, accounted: float) -> float:
        return val_acc * self.cfg.scale_factor ** (accounted / self.sys.root_params)

    # -- the loop -------------------------------------------------------------------------
    def run(self, task_order: list[str]) -> System:
        s = self.sys
        prog = s.progress or Progress()
        s.progress = prog
        while prog.round < self.cfg.rounds:
            while prog.task_index < len(task_order):
                task = task_order[prog.task_index]
                self.visit(task, prog)
                prog.task_index += 1
                prog.visit = None
                s.save(self.out)
            prog.round += 1
            prog.task_index = 0
        s.progress = None
        s.save(self.out)
        return s

    def visit(self, task: str, prog: Progress) -> None:
        s = self.sys
        if prog.visit is None:
            if task in s.best:  # starting a task unlocks its own best path
                for cid in s.best_path(task).components:
                    s.store[cid].locks.discard(task)
            seeds = self.pick_seeds(self.strategy.seed_candidates([s.best[t] for t in s.best if t != task]))
            prog.visit = Visit(
                task=task,
                population=[s.best[task]] if task in s.best else [],
                seeds=seeds,
                started=time.time(),
            )
            s.save(self.out)
        v = prog.visit
        generations = -(-self.cfg.children // self.cfg.generation_size)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.cfg.children,
            initial=min(self.cfg.children, v.generation * self.cfg.generation_size),
            desc=f"round {prog.round + 1}/{self.cfg.rounds} {task}",
            unit="child",
            disable=not self.show_progress,
            leave=True,
        )
        while v.generation < generations:
            n = min(self.cfg.generation_size, self.cfg.children - v.generation * self.cfg.generation_size)
            self.generation(task, v, n, prog.round, bar)
            v.generation += 1
            s.save(self.out)
        bar.close()
        self.end_visit(task, v)

    def generation(self, task: str, v: Visit, n: int, round_: int, bar) -> None:
        s = self.sys
        rng = s.rng
        pop = [s.paths[p] for p in v.population]
        base = max(pop, key=lambda p: p.metrics["score"]) if pop else None
        base_hp = base.hparams if base else self.default_hparams(task)
        data_keys = {k: base_hp[k] for k in H.DATA_KEYS}
        if base is not None:
            moved = H.mutate(base_hp, H.DATA_KEYS, self.mu_of(base_hp), rng)
            data_keys = {k: moved[k] for k in H.DATA_KEYS}
        batch_seed = rng.randrange(2**31)
        plan = []  # (parent, mutate)
        for _ in range(n):
            if v.seeds:
                plan.append((s.paths[v.seeds.pop(0)], False))
            else:
                plan.append((self.sample_parent(v), True))
            v.child_counts[plan[-1][0].id] = v.child_counts.get(plan[-1][0].id, 0) + 1
        children = [self.make_child(task, parent, mutate, data_keys, init_seed(batch_seed, i)) for i, (parent, mutate) in enumerate(plan)]
        if self.pool is None:
            from .generation import train_children  # all of the generation's children at once, frozen work shared

            records = train_children(self, task, children, batch_seed, on_done=lambda: bar.update(1))
        else:
            records = self.pool.train_generation(self, task, children, batch_seed, on_done=lambda: bar.update(1))
        for (parent, mutate), (child, fresh), record in zip(plan, children, records):
            accept = parent.task != task or child.metrics["score"] > parent.metrics["score"]
            if accept:
                for comp in fresh.values():
                    s.store.adopt(comp)
                s.paths[child.id] = child
                v.population.append(child.id)
            record.update(round=round_ + 1, generation=v.generation, parent=parent.id, seed=not mutate, accepted=accept)
            s.history.append(record)
        best = max((s.paths[p] for p in v.population), key=lambda p: p.metrics["score"], default=None)
        if best is not None:
            bar.set_postfix(
                gen=v.generation + 1,
                best_acc=f"{best.metrics['val_accuracy']:.3f}",
                score=f"{best.metrics['score']:.3f}",
                params=f"{best.metrics['params'] / 1e3:.0f}k",
            )

    def end_visit(self, task: str, v: Visit) -> None:
        """Keep the task's best path, lock its components, drop the rest, test the best."""
        s = self.sys
        pop = [s.paths[p] for p in v.population]
        if not pop:
            raise RuntimeError(f"task {task} ended its visit with no accepted path")
        best = max(pop, key=lambda p: p.metrics["score"])
        for p in pop:
            if p.id != best.id:
                del s.paths[p.id]
        s.best[task] = best.id
        for cid in best.components:
            s.store[cid].locks.add(task)
        used = {cid for p in s.paths.values() for cid in p.components}
        s.store.remove_unused(used)
        model = PathModel.from_store(s.store, best).to(self.dev)
        best.metrics["test_accuracy"] = accuracy(model, self.data[task].test, s.root.preprocessing.at(best.image_size), precision=self.cfg.precision)
        best.metrics["visit_seconds"] = round(time.time() - v.started, 1)
        log.info(
            "%s: best %s val %.3f test %.3f params %d accounted %.0f",
            task, best.id, best.metrics["val_accuracy"], best.metrics["test_accuracy"], best.metrics["params"], best.metrics["accounted_params"],
        )

    # -- parents and children -------------------------------------------------------------
    def pick_seeds(self, candidates: list[str]) -> list[str]:
        """Seeds take at most half of a visit's children (deviation: the reference's 64
        children per visit leave ~85% to mutated children; with the small budgets of a CPU
        run, every other task's best path as a seed would leave none). When there are more
        candidates, a random subset (evolution RNG) is tried, in candidate order."""
        cap = max(1, self.cfg.children // 2)
        if len(candidates) <= cap:
            return candidates
        keep = set(self.sys.rng.sample(range(len(candidates)), cap))
        return [c for i, c in enumerate(candidates) if i in keep]

    def sample_parent(self, v: Visit) -> TaskPath:
        """Best score first, each taken with probability 0.5 ** (children it already has);
        failing that, uniformly among the seeds tried and the task's own paths."""
        s = self.sys
        pop = sorted((s.paths[p] for p in v.population), key=lambda p: -p.metrics["score"])
        for p in pop:
            if s.rng.random() < 0.5 ** v.child_counts.get(p.id, 0):
                return p
        candidates = [s.paths[p] for p in v.child_counts if p in s.paths] + pop
        return s.rng.choice(candidates)

    def default_hparams(self, task: str) -> dict:
        """The hyperparameters a task's first paths get: the defaults, at the task's starting
        image size (its tasks record's ``start_image_size``; the root's image size for a STATE
        written before tasks had one)."""
        root = self.sys.root
        hp = H.defaults(root.image_size, root.depth)
        start = self.sys.tasks.get(task, {}).get("start_image_size")
        if start is not None:
            hp["image_size"] = int(start)
        if self.cfg.mutation_prob is not None:
            hp["mu"] = self.cfg.mutation_prob
        return hp

    def mu_of(self, hp: dict) -> float:
        return self.cfg.mutation_prob if self.cfg.mutation_prob is not None else float(hp.get("mu", H.DEFAULTS["mu"]))

    def make_child(self, task: str, parent: TaskPath, mutate: bool, data_keys: dict, seed: int = 0) -> tuple[TaskPath, dict]:
        """A child path of ``parent`` for ``task`` and its fresh (trainable) components. ``seed``
        initialises its new adapters (torch's global RNG is left as it was)."""
        s, rng, root = self.sys, self.sys.rng, self.sys.root
        hp = dict(self.default_hparams(task), **parent.hparams) if parent.id != "root" else self.default_hparams(task)
        structural = self.strategy.mutates_structure
        if mutate:
            hp = H.mutate_mu(hp, rng, self.cfg.mutation_prob)
            keys = H.TRAIN_KEYS + (("num_blocks",) if structural else ())
            hp = H.mutate(hp, keys, hp["mu"], rng, depths=root.depths)
        hp.update(data_keys)
        if not structural:
            hp["num_blocks"] = root.depth
        mu = hp["mu"] if mutate else 0.0

        parent_ids = {s.store[c].name: c for c in parent.components}
        root_ids = {s.store[c].name: c for c in s.root_path.components}
        adapter_width = self.strategy.adapter_width

        def with_adapter(i: int) -> bool:
            if f"adapters.{i}" in parent_ids or adapter_width:
                return True
            return bool(structural and mutate and rng.random() < mu)

        names = root.path_names(hp["num_blocks"], with_adapter)
        fresh: dict[str, Component] = {}
        ids: list[str] = []
        i_adapter = 0
        for name in names:
            src = parent_ids.get(name) or root_ids.get(name)
            if name == root.head_name:
                if parent.task == task and src is not None:
                    comp = s.store.clone(src)
                else:
                    comp = Component(s.store.new_id(), name, root.new_head(self.data[task].num_classes))
            elif src is None:  # a new adapter
                width = adapter_width or hp["adapter_width"]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + i_adapter)
                    comp = Component(s.store.new_id(), name, root.new_adapter(block_index(name), width))
                i_adapter += 1
            elif self.strategy.must_clone(name, s.store[src], mu, rng, root):
                comp = s.store.clone(src)
                root.fit_clone(name, comp.module, hp["image_size"])
            else:
                ids.append(src)
                continue
            comp.module.to(self.dev).requires_grad_(True)
            fresh[comp.id] = comp
            ids.append(comp.id)
        return TaskPath(s.new_path_id(), task, ids, hp, parent=parent.id), fresh

    def train_child(self, task: str, child: TaskPath, fresh: dict, batch_seed: int) -> dict:
        """Train ``child`` here (its fresh components in place); returns its history record."""
        s = self.sys
        data = self.data[task]
        model = PathModel.from_store(s.store, child, fresh).to(self.dev)
        params = [p for c in fresh.values() for p in c.module.parameters()]
        t0 = time.perf_counter()
        result = train(
            model, params, data.train, data.validation, child.hparams, **self.train_settings(child, batch_seed),
        )
        return self.judge_child(task, child, fresh, result, time.perf_counter() - t0)

    def train_settings(self, child: TaskPath, batch_seed: int) -> dict:
        """:func:`.train.train`'s keyword arguments for ``child`` (here and on Ray workers)."""
        return dict(
            pre=self.sys.root.preprocessing.at(child.image_size), precision=self.cfg.precision,
            steps=self.cfg.steps, batch_size=self.cfg.batch_size, validations=self.cfg.validations, seed=batch_seed,
        )

    def judge_child(self, task: str, child: TaskPath, fresh: dict, result, seconds: float) -> dict:
        """Set ``child.metrics`` from its :class:`.train.TrainResult`; returns its history record."""
        s = self.sys
        accounted = s.accounted_params(child.components, task, fresh)
        child.metrics = {
            "val_accuracy": result.val_accuracy,
            "score": self.score(result.val_accuracy, accounted),
            "params": s.path_params(child.components, fresh),
            "accounted_params": accounted,
            "new_params": sum(c.num_params for c in fresh.values()),
            "train_images_per_s": round(result.images_per_s, 1),
        }
        return {
            "task": task,
            "child": child.id,
            "val_accuracy": result.val_accuracy,
            "score": child.metrics["score"],
            "params": child.metrics["params"],
            "accounted_params": accounted,
            "new_params": child.metrics["new_params"],
            "hparams": child.hparams,
            "components": [s.store[c].name if c in s.store else fresh[c].name for c in child.components],
            "train_seconds": round(seconds, 2),
        }


def init_seed(batch_seed: int, index: int) -> int:
    """The seed of child ``index``'s new adapters in a generation with ``batch_seed``."""
    return int(np.random.SeedSequence([batch_seed, index]).generate_state(1, np.uint32)[0]) << 8
