"""The multitask model core: components, the component store, paths, and a path's forward.

The step modules below are a ViT's (:mod:`.vit_root`); a CNN root's are in :mod:`.conv_root`.
Every root kind's path is the same thing: its components' steps in order, head last.

A *component* is one top-level parameter block of a timm VisionTransformer, named after
timm's module names (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.i``, ``norm``,
``head``) plus ``adapters.i``, a residual adapter that runs before ``blocks.i``. Each component
is a small ``nn.Module`` whose ``forward`` is its step of the ViT forward:

===============  ================================  ==================================
component        input                             output
===============  ================================  ==================================
patch_embed      image (B, 3, S, S)                patch tokens (B, N, D)
cls_token        (B, N, D)                         (B, N + 1, D), class token first
pos_embed        (B, N + 1, D)                     + position embedding (grid resized
                                                   bilinearly when N differs, cls kept)
adapters.i       (B, T, D)                         x + up(gelu(down(ln(x))))
blocks.i         (B, T, D)                         timm ``Block``
norm             (B, T, D)                         final LayerNorm
head             (B, T, D)                         logits of the class token (B, C)
===============  ================================  ==================================

So a path's model is just these steps in order (:class:`PathModel`), and any contiguous run of
them is a valid sub-graph: export cuts paths into shared segments that way.

The :class:`ComponentStore` keeps every unique component once; paths refer to components by
id. A component is trainable only while nothing locks it: root components are never
trainable, and every task whose best path uses a component locks it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn


# --------------------------------------------------------------------------- step modules


class PatchEmbed(nn.Module):
    """timm's ``patch_embed`` (``proj`` conv + ``norm``) without its fixed-size check."""

    def __init__(self, proj: nn.Conv2d, norm: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm = norm if norm is not None else nn.Identity()

    @property
    def patch_size(self) -> int:
        return int(self.proj.stride[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ClsToken(nn.Module):
    """timm's ``cls_token``: prepends the learned class token."""

    def __init__(self, token: torch.Tensor):
        super().__init__()
        self.token = nn.Parameter(token.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


def resample_pos_embed(embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, D) position embedding to ``num_tokens`` = 1 + h*h tokens:
    bilinear over the square grid (timm's ``resample_abs_pos_embed``, no antialiasing; it
    interpolates in float32), the class position kept as is. An embedding that already has
    ``num_tokens`` is returned as is, also while exporting, so exported graphs hold no resize
    for it."""
    if embed.shape[1] == num_tokens:
        return embed
    old = int(round(math.sqrt(embed.shape[1] - 1)))
    new = int(round(math.sqrt(num_tokens - 1)))
    if old * old != embed.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(f"position embedding needs square grids, got {embed.shape[1]} -> {num_tokens} tokens")
    return resample_abs_pos_embed(
        embed, new_size=[new, new], old_size=[old, old], num_prefix_tokens=1, interpolation="bilinear", antialias=False
    )


class PosEmbed(nn.Module):
    """timm's ``pos_embed`` (class position included), resized to the input's grid."""

    def __init__(self, embed: torch.Tensor):
        super().__init__()
        self.embed = nn.Parameter(embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resample_pos_embed(self.embed, x.shape[1])


class Adapter(nn.Module):
    """Residual adapter x + up(GELU(down(LayerNorm(x)))); ``up`` starts at zero, so a new
    adapter is the identity until trained."""

    def __init__(self, dim: int, width: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def width(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(self.norm(x))))


class Head(nn.Linear):
    """Task head on the class token (timm's token pooling + ``head``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, 0])


def new_head(dim: int, num_classes: int) -> Head:
    """A task's own head, initialised to zero (weights and bias): logits start uniform."""
    head = Head(dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


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


HEAD_NAMES = ("head", "classifier", "fc")  # a task's head, by root kind: ViT, EfficientNet, ResNet


class PathModel(nn.Module):
    """A path's model: its components' steps in order, ``forward_features`` / ``forward_head``
    split as in timm. Components whose parameters are all frozen and that precede the first
    trainable component run without autograd, so no backward goes through a frozen prefix.
    In training mode, frozen components stay in eval mode: a frozen BatchNorm normalises with
    its running statistics and never updates them (they belong to other tasks or the root)."""

    def __init__(self, names: list[str], modules: list[nn.Module]):
        super().__init__()
        if not names or names[-1] not in HEAD_NAMES:
            raise ValueError("a path ends with its head")
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
