"""Training a generation's children together: frozen work done once, results as if trained alone.

Children of one generation share their data keys (image size, augmentation) and the batch
seed, so every step they see the same (augmented) batch. Most of a child is frozen: the
components before its first trainable one (root components, other tasks' components) run
without autograd. :func:`train_generation` trains every child of a generation in one loop over
the steps and gives each exactly what :func:`.train.train` would give it alone (same batches,
same augmentation, same schedule, same best checkpoint; see below), doing less:

- **Shared frozen prefixes.** The children's frozen prefixes (their leading frozen modules)
  form a trie; each distinct prefix runs once per batch and its output feeds every child that
  continues from it (a child's trainable part, and whatever follows, runs per child).
- **Cached activations.** When the data keys mean no augmentation (the defaults: crop area and
  aspect ratio minimum 1, no flip, no jitter), a frozen prefix's output depends only on the
  image, so it is computed once per training image per generation and read back on later
  epochs; the validation split is never augmented, so its prefix outputs are computed once
  for all of the generation's evaluations and children. The cache is bounded
  (``cache_bytes``): prefixes that do not fit are recomputed each time (still shared).
- **Channels-last** (and with it bf16 autocast where ``auto`` picks it) for convolutional roots
  on the CPU, as :func:`.train.train` does: modules are converted for the generation and back
  afterwards (the store keeps contiguous tensors).

Every batch a frozen prefix runs on is a batch training alone runs it on (a cache fill runs the
whole batch and stores the rows not yet stored; validation runs the same batches as
:func:`.train.predict`), so each child's results equal training it alone bit for bit where the
kernels' results depend only on the shapes (tests/test_generation.py holds it, which keeps a
run's STATE the same whether its children train here or on Ray workers). Each child's
``images_per_s`` is the generation's: all children's training images over the generation's
training time (the time a child costs inside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mutask.preprocessing import Preprocessing

from .data import Split
from .hparams import DATA_KEYS
from .train import (
    EVAL_PIXELS_ON_CPU,
    Batches,
    TrainResult,
    _autocast,
    augment,
    autocast_dtype,
    memory_format,
    use_channels_last,
    batch_order,
    lr_scheduler,
    model_input,
    split_images,
)

CACHE_BYTES = 1 << 30  # frozen-prefix activations kept per generation (training and validation splits together)


def augments(hp: dict) -> bool:
    """Whether data keys ``hp`` transform the training images (any random crop, flip or jitter)."""
    return not (float(hp["crop_area_min"]) >= 1.0 and float(hp["aspect_ratio_min"]) >= 1.0 and not bool(hp["flip"]) and float(hp["color_jitter"]) <= 0.0)


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------ the prefix trie


@dataclass(eq=False)
class Node:
    """One frozen module reached through one prefix: the trie's root (``module`` None) is the
    model input. ``children``: id(module) -> Node."""

    module: nn.Module | None
    parent: "Node | None" = None
    children: dict = field(default_factory=dict)


def prefix_trie(models: list) -> tuple[Node, list[Node], list[int]]:
    """(trie root, each model's frozen-prefix end node, each model's frozen-prefix length).
    A model's frozen prefix is its leading run of modules without trainable parameters (the part
    :class:`~.model.PathModel` runs without autograd); modules are identified by object, so two
    children share a node exactly when they run the same frozen modules in the same order."""
    top = Node(None)
    ends, lengths = [], []
    for model in models:
        node, k = top, 0
        for m in model.steps:
            if _trainable(m):
                break
            node = node.children.setdefault(id(m), Node(m, node))
            k += 1
        ends.append(node)
        lengths.append(k)
    return top, ends, lengths


def run_prefixes(x: torch.Tensor, top: Node, wanted: list[Node]) -> dict[int, torch.Tensor]:
    """Outputs of the ``wanted`` nodes for input ``x`` (no autograd), each shared prefix run once:
    depth first, keeping only what a wanted node below still needs."""
    want = {id(n) for n in wanted}
    needed: set[int] = set()
    for n in wanted:
        while n is not None and id(n) not in needed:
            needed.add(id(n))
            n = n.parent
    out: dict[int, torch.Tensor] = {}

    def walk(node: Node, h: torch.Tensor) -> None:
        if id(node) in want:
            out[id(node)] = h
        for child in node.children.values():
            if id(child) in needed:
                walk(child, child.module(h))

    with torch.no_grad():
        walk(top, x)
    return out


# ------------------------------------------------------------------------ the activation cache


class PrefixCache:
    """Frozen-prefix outputs of one split, per end node and image row, filled on demand. A node is
    admitted on its first batch if all its rows fit in what is left of the shared ``budget``
    (bytes); a node that does not fit is recomputed on every request (still shared)."""

    def __init__(self, n: int, budget: list[int]):
        self.n, self.budget = n, budget  # budget: a one-item list shared by the generation's caches
        self.store: dict[int, torch.Tensor] = {}
        self.filled: dict[int, torch.Tensor] = {}
        self.refused: set[int] = set()

    def _admit(self, key: int, sample: torch.Tensor) -> bool:
        if key in self.store:
            return True
        if key in self.refused:
            return False
        need = self.n * sample[0].numel() * sample.element_size()
        if need > self.budget[0]:
            self.refused.add(key)
            return False
        self.budget[0] -= need
        self.store[key] = torch.empty((self.n, *sample.shape[1:]), dtype=sample.dtype, device=sample.device,
                                      memory_format=_format_of(sample))
        self.filled[key] = torch.zeros(self.n, dtype=torch.bool)
        return True

    def get(self, rows: np.ndarray, inputs, top: Node, nodes: list[Node]) -> dict[int, torch.Tensor]:
        """The outputs of ``nodes`` for images ``rows``; ``inputs(rows)`` gives their model input.
        Where a node lacks any of the rows, the whole batch runs (as training alone runs it, so
        every stored row is what that run computes) and the missing rows are stored."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        ready = {id(n): self.store[id(n)][idx] for n in nodes if id(n) in self.store and bool(self.filled[id(n)][idx].all())}
        todo = [n for n in nodes if id(n) not in ready]
        if todo:
            out = run_prefixes(inputs(rows), top, todo)
            for n in todo:
                key, h = id(n), out[id(n)]
                if self._admit(key, h):
                    missing = ~self.filled[key][idx]
                    self.store[key][idx[missing].to(h.device)] = h[missing.to(h.device)]
                    self.filled[key][idx[missing]] = True
                ready[key] = h
        return ready


def _format_of(t: torch.Tensor):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else torch.contiguous_format


# ------------------------------------------------------------------------ training


@dataclass(eq=False)
class _Child:
    model: nn.Module
    params: list
    hp: dict
    start: int  # first module after the frozen prefix
    end: Node
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    buffers: list
    best: tuple = (-1.0, 0, None, None)
    curve: list = field(default_factory=list)


def _check(models, params_list, hps, pre) -> None:
    if not (len(models) == len(params_list) == len(hps)) or not models:
        raise ValueError("train_generation: one model, parameter list and hparams per child, at least one child")
    if not isinstance(pre, Preprocessing):
        raise TypeError(f"expected the generation's Preprocessing, got {pre!r}")
    for hp in hps:
        if any(hp[k] != hps[0][k] for k in DATA_KEYS):
            raise ValueError(f"train_generation: children of one generation share their data keys {DATA_KEYS}; got {hps[0]} and {hp}")
    if pre.image_size != int(hps[0]["image_size"]):
        raise ValueError(f"train_generation: preprocessing at image size {pre.image_size} for paths at {hps[0]['image_size']}")


def train_generation(
    models: list,
    params_list: list[list[nn.Parameter]],
    train_split: Split,
    val_split: Split,
    hps: list[dict],
    *,
    pre: Preprocessing,
    steps: int,
    batch_size: int,
    validations: int,
    seed: int,
    precision: str = "auto",
    cache_bytes: int = CACHE_BYTES,
    channels_last: bool | None = None,
    progress=None,
) -> list[TrainResult]:
    """Train every child of a generation (``models``: :class:`~.model.PathModel`, each with its
    trainable ``params_list[i]`` and hyperparameters ``hps[i]``, data keys shared) and return
    each its :class:`~.train.TrainResult`, as :func:`.train.train` would with the same settings
    (see the module docstring); each model ends at its best evaluation. ``channels_last`` None:
    on for a convolutional root on the CPU. ``progress(step, steps)`` after every step."""
    _check(models, params_list, hps, pre)
    dev = next(models[0].parameters()).device
    if channels_last is None:
        channels_last = use_channels_last(models, dev)
    dtype = autocast_dtype(precision, dev, channels_last)
    images = split_images(train_split, pre)
    labels = np.asarray(train_split.labels, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    order = batch_order(len(labels), batch_size, steps, gen)
    eval_at = sorted({max(1, round(steps * (k + 1) / validations)) for k in range(max(1, validations))})
    top, ends, starts = prefix_trie(models)
    children = []
    for model, params, hp, start, end in zip(models, params_list, hps, starts, ends):
        opt = torch.optim.SGD(params, lr=float(hp["lr"]), momentum=float(hp["momentum"]), nesterov=bool(hp["nesterov"]) and float(hp["momentum"]) > 0)
        owned = {id(p) for p in params}
        buffers = [b for m in model.modules() if any(id(p) in owned for p in m.parameters(recurse=False)) for b in m.buffers(recurse=False)]
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
        children.append(_Child(model, list(params), hp, start, end, opt, lr_scheduler(opt, steps, hp), scaler, buffers))
    nodes = list({id(n): n for n in ends}.values())
    budget = [int(cache_bytes)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def inputs(split_images_, rows):
        return model_input(split_images_[rows], pre, dev).contiguous(memory_format=fmt)

    train_cache = None if augments(hps[0]) else PrefixCache(len(labels), budget)
    val = _Validation(val_split, pre, dev, top, nodes, budget, fmt, dtype)
    for c in children:
        c.model.train()
    seen, evaluating = 0, 0.0
    batches = iter(Batches(images, labels, order, pre, dev)) if train_cache is None else None
    try:
        with memory_format(models, channels_last):
            t0 = time.perf_counter()
            for step in range(1, steps + 1):
                rows = order[step - 1]
                y = torch.from_numpy(labels[rows]).to(dev)
                if train_cache is None:
                    x = augment(next(batches)[0], hps[0], gen, pre).contiguous(memory_format=fmt)
                    with _autocast(dev, dtype):
                        feats = run_prefixes(x, top, nodes)
                else:
                    with _autocast(dev, dtype):
                        feats = train_cache.get(rows, lambda r: inputs(images, r), top, nodes)
                for c in children:
                    c.sched.step_update(step - 1)
                    with _autocast(dev, dtype):
                        loss = F.cross_entropy(c.model.run(_as(feats[id(c.end)], fmt), c.start), y)
                    c.opt.zero_grad(set_to_none=True)
                    c.scaler.scale(loss).backward()
                    c.scaler.unscale_(c.opt)
                    torch.nn.utils.clip_grad_norm_(c.params, 1.0)
                    c.scaler.step(c.opt)
                    c.scaler.update()
                seen += len(rows)
                if step in eval_at:
                    t_eval = time.perf_counter()
                    for c, acc in zip(children, val.accuracies(children)):
                        c.curve.append((step, acc))
                        if acc > c.best[0]:
                            c.best = (acc, step, [p.detach().clone() for p in c.params], [b.detach().clone() for b in c.buffers])
                    evaluating += time.perf_counter() - t_eval
                if progress is not None:
                    progress(step, steps)
            elapsed = time.perf_counter() - t0 - evaluating
            for c in children:
                c.model.eval()
                with torch.no_grad():
                    for p, v in zip(c.params + c.buffers, c.best[2] + c.best[3]):
                        p.copy_(v)
    finally:
        if batches is not None:
            batches.close()
    rate = seen * len(children) / max(elapsed, 1e-9)  # a child's images per second of the generation's time it costs
    return [TrainResult(c.best[0], c.best[1], steps, rate, c.curve) for c in children]


def _as(t: torch.Tensor, fmt) -> torch.Tensor:
    return t.contiguous(memory_format=fmt) if t.dim() == 4 else t


class _Validation:
    """Every child's validation accuracy, the frozen prefixes' outputs on the validation split
    computed once per generation (cached within the budget) and shared by the children."""

    def __init__(self, split: Split, pre: Preprocessing, dev, top: Node, nodes: list[Node], budget: list[int], fmt, dtype):
        self.labels = np.asarray(split.labels)
        self.n = len(self.labels)
        self.images = split_images(split, pre) if self.n else None
        self.pre, self.dev, self.top, self.nodes, self.fmt, self.dtype = pre, dev, top, nodes, fmt, dtype
        self.cache = PrefixCache(self.n, budget)
        self.batch = 256 if dev.type == "cuda" else max(8, min(256, EVAL_PIXELS_ON_CPU // (pre.image_size * pre.image_size)))

    def _inputs(self, rows):
        return model_input(self.images[rows], self.pre, self.dev).contiguous(memory_format=self.fmt)

    @torch.no_grad()
    def accuracies(self, children: list) -> list[float]:
        if self.n == 0:
            return [0.0] * len(children)
        for c in children:
            c.model.eval()
        correct = [0] * len(children)
        with _autocast(self.dev, self.dtype):
            for i in range(0, self.n, self.batch):
                rows = np.arange(i, min(self.n, i + self.batch))
                feats = self.cache.get(rows, self._inputs, self.top, self.nodes)
                y = self.labels[rows]
                for k, c in enumerate(children):
                    logits = c.model.run(_as(feats[id(c.end)], self.fmt), c.start).float().cpu().numpy()
                    correct[k] += int((logits.argmax(1) == y).sum())
        for c in children:
            c.model.train()
        return [float(k / self.n) for k in correct]


def train_children(evolution, task: str, children: list, batch_seed: int, on_done=None) -> list[dict]:
    """Train a generation's ``children`` ((path, fresh components) pairs of an
    :class:`~.evolution.Evolution`) together in this process; returns each child's history
    record (its ``train_seconds``: its share of the generation's time). ``on_done()`` once per child."""
    from .model import PathModel

    s = evolution.sys
    data = evolution.data[task]
    models = [PathModel.from_store(s.store, child, fresh).to(evolution.dev) for child, fresh in children]
    params = [[p for c in fresh.values() for p in c.module.parameters()] for _, fresh in children]
    settings = evolution.train_settings(children[0][0], batch_seed)
    t0 = time.perf_counter()
    results = train_generation(models, params, data.train, data.validation, [c.hparams for c, _ in children], **settings)
    seconds = (time.perf_counter() - t0) / len(children)
    records = []
    for (child, fresh), result in zip(children, results):
        records.append(evolution.judge_child(task, child, fresh, result, seconds))
        if on_done is not None:
            on_done()
    return records
