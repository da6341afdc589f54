"""The multitask model core: components, the component store, paths, and a path's forward;
no architecture (each root family's step modules live with it in :mod:`.roots`).

A *component* is one parameter block of the root, named after timm's module names
(``blocks.3``, ``norm``, ``layer2.1``...), plus ``adapters.i``, a residual adapter that runs
before the i-th block, and a task's head. Each component is a small ``nn.Module`` whose
``forward`` is its step of the network's forward, so a path's model is just these steps in
order (:class:`PathModel`), and any contiguous run of them is a valid sub-graph: export cuts
paths into shared segments that way (:class:`SegmentModule`).

The :class:`ComponentStore` keeps every unique component once; paths refer to components by
id. A component is trainable only while nothing locks it: root components are never
trainable, and every task whose best path uses a component locks it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


# ------------------------------------------------------------------- components and store


def component_kind(name: str) -> str:
    """``blocks.3`` -> ``blocks``; ``norm`` -> ``norm``."""
    return name.split(".", 1)[0]


def block_index(name: str) -> int | None:
    """``blocks.3`` / ``adapters.3`` -> 3, else None."""
    kind, _, idx = name.partition(".")
    return int(idx) if kind in ("blocks", "adapters") and idx else None


@dataclass(eq=False)
class Component:
    """One unique parameter block: id, timm-style name, its module (which holds the tensors),
    whether it is a root component, and its locks (tasks whose best path uses it)."""

    id: str
    name: str
    module: nn.Module
    root: bool = False
    locks: set = field(default_factory=set)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def trainable(self) -> bool:
        return not self.root and not self.locks

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor name (inside the component) -> tensor, e.g. ``attn.qkv.weight``."""
        return {k: v for k, v in self.module.state_dict().items()}


class ComponentStore:
    """Every unique component once, by id. Modules of stored components are frozen
    (``requires_grad`` off); a child's fresh clones live outside the store until accepted."""

    def __init__(self):
        self.components: dict[str, Component] = {}
        self.next_id = 0

    def __contains__(self, cid: str) -> bool:
        return cid in self.components

    def __getitem__(self, cid: str) -> Component:
        return self.components[cid]

    def __len__(self) -> int:
        return len(self.components)

    def new_id(self) -> str:
        cid = f"c{self.next_id}"
        self.next_id += 1
        return cid

    def add(self, name: str, module: nn.Module, *, root: bool = False, cid: str | None = None) -> Component:
        module.requires_grad_(False)
        module.eval()
        comp = Component(cid or self.new_id(), name, module, root=root)
        if comp.id in self.components:
            raise KeyError(f"component id {comp.id} already in the store")
        self.components[comp.id] = comp
        return comp

    def clone(self, cid: str, name: str | None = None) -> Component:
        """A trainable deep copy of a component, not yet in the store (see :meth:`adopt`)."""
        src = self.components[cid]
        module = copy.deepcopy(src.module)
        module.requires_grad_(True)
        return Component(self.new_id(), name or src.name, module)

    def adopt(self, comp: Component) -> Component:
        """Put a trained clone into the store (frozen from now on)."""
        comp.module.requires_grad_(False)
        comp.module.eval()
        self.components[comp.id] = comp
        return comp

    def remove_unused(self, used: set[str]) -> list[str]:
        """Drop every non-root component that no live path uses; returns the dropped ids."""
        dropped = [cid for cid, c in self.components.items() if cid not in used and not c.root]
        for cid in dropped:
            del self.components[cid]
        return dropped

    def params(self, ids) -> int:
        return sum(self.components[cid].num_params for cid in set(ids))


# ----------------------------------------------------------------------------- paths


@dataclass
class TaskPath:
    """One task's model: ordered component ids + hyperparameters + parent link + metrics."""

    id: str
    task: str
    components: list[str]
    hparams: dict
    parent: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "task": self.task,
            "components": list(self.components),
            "hparams": dict(self.hparams),
            "parent": self.parent,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_json(cls, d: dict) -> "TaskPath":
        return cls(d["id"], d["task"], list(d["components"]), dict(d["hparams"]), d.get("parent"), dict(d.get("metrics", {})))

    @property
    def image_size(self) -> int:
        return int(self.hparams["image_size"])


class PathModel(nn.Module):
    """A path's model: its components' steps in order, ``forward_features`` / ``forward_head``
    split as in timm. Components whose parameters are all frozen and that precede the first
    trainable component run without autograd, so no backward goes through a frozen prefix.
    In training mode, frozen components stay in eval mode: a frozen BatchNorm normalises with
    its running statistics and never updates them (they belong to other tasks or the root)."""

    def __init__(self, names: list[str], modules: list[nn.Module]):
        super().__init__()
        if not names or len(names) != len(modules):
            raise ValueError("a path model needs one module per component name, head last")
        self.names = list(names)
        self.steps = nn.ModuleList(modules)

    def train(self, mode: bool = True) -> "PathModel":
        super().train(mode)
        if mode:
            for m in self.steps:
                if not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    @classmethod
    def from_store(cls, store: ComponentStore, path: TaskPath, overrides: dict | None = None) -> "PathModel":
        """Build from the store; ``overrides`` maps component ids to not-yet-stored clones."""
        overrides = overrides or {}
        comps = [overrides.get(cid) or store[cid] for cid in path.components]
        return cls([c.name for c in comps], [c.module for c in comps])

    def frozen_prefix_len(self) -> int:
        for i, m in enumerate(self.steps):
            if any(p.requires_grad for p in m.parameters()):
                return i
        return len(self.steps)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = len(self.steps) if stop is None else stop
        prefix = min(max(self.frozen_prefix_len(), start), stop) if torch.is_grad_enabled() else start
        if prefix > start:
            with torch.no_grad():
                for m in self.steps[start:prefix]:
                    x = m(x)
        for m in self.steps[prefix:stop]:
            x = m(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 0, len(self.steps) - 1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class SegmentModule(nn.Module):
    """A contiguous run of component steps (what export writes as one segment graph)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.steps = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.steps:
            x = m(x)
        return x
