"""The muNet operators over a :class:`~.state.System` (:class:`Operators`): a visit's seeds,
sampling a parent, making a child (mutations), scoring it, and the visit's bookkeeping. The loop
that calls them is :class:`~.evolution.Evolution`.

score = validation accuracy * s ** (accounted params / root params).

A visit's first children are its seeds (each other task's best path and the root, unmutated;
at most half of a visit's children, see :meth:`Operators.pick_seeds`), then children of parents
sampled best-score first with probability 0.5 ** (children already made). A generation's draws
all come from the evolution RNG, in a fixed order (its data hyperparameters and batch seed,
every parent, then every child); a new adapter's initial weights come from a seed derived from
the batch seed and the child's index (:func:`init_seed`), so a child's training depends only on
its job and a run gives the same STATE however its children are trained (:mod:`.dispatch`).

The structure policy (muNet or a baseline) is the :mod:`.strategies` object; the root family
(:class:`~.roots.Root`) names a path's components, makes heads and adapters and fits clones to
an image size: nothing here knows an architecture.

Deviations from the reference, on purpose: optimizer momentum is not carried from parent to
child (mu2Net does); pos_embed is always sourced from the parent (or root) and resized when the
image size differs, rather than looked up by shape among ancestors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import hparams as H
from .config import EvolveConfig
from .data import TaskData
from .model import Component, PathModel, TaskPath, block_index
from .progress import Visit
from .strategies import parse_strategy
from .train import accuracy, device

if TYPE_CHECKING:
    from .state import System


class Operators:
    """The muNet operators over ``system``, for the tasks in ``data``, configured by ``cfg``."""

    def __init__(self, system: System, data: dict[str, TaskData], cfg: EvolveConfig):
        self.sys = system
        self.data = data
        self.cfg = cfg
        self.dev = device()
        self.strategy = parse_strategy(cfg.strategy)
        for comp in system.store.components.values():  # every component on the device children train on
            comp.module.to(self.dev)

    def score(self, val_acc: float, accounted: float) -> float:
        return val_acc * self.cfg.scale_factor ** (accounted / self.sys.root_params)

    # -- a visit ----------------------------------------------------------------------------
    def start_visit(self, task: str) -> Visit:
        """Unlock the task's own best path; its population starts from it, its seeds are picked."""
        s = self.sys
        if task in s.best:
            for cid in s.best_path(task).components:
                s.store[cid].locks.discard(task)
        candidates = self.strategy.seed_candidates([s.best[t] for t in s.best if t != task])
        if not self.cfg.reseed_root and task in s.best:
            candidates = [c for c in candidates if c != "root"]
        seeds = self.pick_seeds(candidates)
        return Visit(task=task, population=[s.best[task]] if task in s.best else [], seeds=seeds, started=time.time())

    def best(self, v: Visit) -> TaskPath | None:
        """The visit's best-scoring path so far (None before any is accepted)."""
        return max((self.sys.paths[p] for p in v.population), key=lambda p: p.metrics["score"], default=None)

    def accept(self, v: Visit, child: TaskPath, fresh: dict) -> None:
        """Put an accepted child's path and fresh components into the system and the population."""
        for comp in fresh.values():
            self.sys.store.adopt(comp)
        self.sys.paths[child.id] = child
        v.population.append(child.id)

    def keep_best(self, task: str, v: Visit, best: TaskPath) -> None:
        """End of a visit: the task's best path stays, locking its components; the rest goes."""
        s = self.sys
        for pid in v.population:
            if pid != best.id:
                del s.paths[pid]
        s.best[task] = best.id
        for cid in best.components:
            s.store[cid].locks.add(task)
        s.store.remove_unused({cid for p in s.paths.values() for cid in p.components})

    def test_accuracy(self, task: str, path: TaskPath) -> float:
        model = PathModel.from_store(self.sys.store, path).to(self.dev)
        return accuracy(model, self.data[task].test, self.sys.root.preprocessing.at(path.image_size), precision=self.cfg.precision)

    # -- a generation ---------------------------------------------------------------------------
    def generation_draws(self, task: str, v: Visit) -> tuple[dict, int]:
        """(data hyperparameters, batch seed) every child of the next generation shares: the
        data hyperparameters of the population's best path, mutated (the defaults before any)."""
        base = self.best(v)
        base_hp = base.hparams if base else self.default_hparams(task)
        data_keys = {k: base_hp[k] for k in H.DATA_KEYS}
        if base is not None:
            moved = H.mutate(base_hp, H.DATA_KEYS, self.mu_of(base_hp), self.sys.rng)
            data_keys = {k: moved[k] for k in H.DATA_KEYS}
        return data_keys, self.sys.rng.randrange(2**31)

    def next_parent(self, v: Visit, index: int = 0) -> tuple[TaskPath, bool]:
        """(parent, mutate) of the generation's child ``index``: the next seed unmutated, else
        (``--continue-best``, the generation's first child) the visit's best path unmutated, else
        a sampled parent."""
        best = self.best(v) if self.cfg.continue_best and index == 0 else None
        if v.seeds:
            parent, mutate = self.sys.paths[v.seeds.pop(0)], False
        elif best is not None and best.task == v.task:
            parent, mutate = best, False
        else:
            parent, mutate = self.sample_parent(v), True
        v.child_counts[parent.id] = v.child_counts.get(parent.id, 0) + 1
        return parent, mutate

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
        if self.cfg.lr is not None:
            hp["lr"] = H.snap("lr", self.cfg.lr)
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
