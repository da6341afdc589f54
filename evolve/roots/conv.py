"""What the CNN root families share (:class:`ConvRoot`): a timm CNN whose trunk is a sequence
of blocks before a global average pooling and a linear classifier. The families
(:mod:`.efficientnet`, :mod:`.resnet`) only say how their network is cut (:meth:`ConvRoot.layout`).

The head pools globally (average, as timm's ``global_pool``) and applies the linear layer. A
residual adapter before a block is ``x + up(relu(down(bn(x))))`` with 1x1 convolutions
(Rebuffi et al. 2017), ``up`` zero-initialised. There is no position embedding: a path runs at
any image size as it is. Depth mutation only moves between depths whose last block gives the
channels the tail (or head) takes, so the tail's weights always fit: the top blocks of the last
stage (ResNet-18: 7 or 8 blocks; a last stage of one block, as in EfficientNet-Lite0, leaves
the depth fixed). BatchNorm of a frozen component stays in eval mode while a child trains
(:class:`~mutask.evolve.model.PathModel`), so its running statistics never move; a cloned one
trains as in fine-tuning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..model import component_kind
from .base import Root, root_preprocessing, timm_preprocessing

PROBE_SIZE = 64  # pixels of the one forward that finds each block's channels


class PooledHead(nn.Linear):
    """A CNN's head: global average pooling (timm's ``global_pool``, ``avg``) then the linear
    classifier; tensors named as timm's ``classifier`` / ``fc``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.mean(dim=(2, 3)))


def new_pooled_head(channels: int, num_classes: int) -> PooledHead:
    head = PooledHead(channels, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ConvAdapter(nn.Module):
    """Residual adapter for a conv block: x + up(relu(down(bn(x)))), ``down`` and ``up`` 1x1
    convolutions; ``up`` starts at zero, so a new adapter is the identity until trained."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.down = nn.Conv2d(channels, width, 1)
        self.up = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def width(self) -> int:
        return self.down.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(self.norm(x))))


def has_params(m: nn.Module | None) -> bool:
    return m is not None and any(True for _ in m.parameters())


def head_problems(model: nn.Module, head_name: str) -> list[str]:
    """What keeps a CNN of a known family from being a root: pooling other than a global
    average, or a head that is not one linear layer (empty: nothing)."""
    problems = []
    pool = getattr(model, "global_pool", None)
    if getattr(pool, "pool_type", None) != "avg":
        problems.append(f"it pools with {getattr(pool, 'pool_type', type(pool).__name__)!r}, not a global average")
    head = getattr(model, head_name)
    if not isinstance(head, (nn.Linear, nn.Identity)):
        problems.append(f"its {head_name} is a {type(head).__name__}, not a linear layer")
    return problems


class ConvRoot(Root):
    """A CNN root: its components, each block's input and output channels (``in_channels``,
    ``out_channels``), and ``num_features`` (what the head takes)."""

    min_start_size = 32
    head_name: str

    @classmethod
    def layout(cls, model: nn.Module) -> tuple[list, list, list]:
        """(stem, blocks, tail) of ``model``: lists of (name, step module), forward order."""
        raise NotImplementedError

    def __init__(self, spec: dict, model: nn.Module, source: str):
        model.eval()
        stem, blocks, tail = self.layout(model)
        self.spec = spec
        self.source = source
        self.template = model
        self._templates = dict(stem + blocks + tail)
        head = getattr(model, self.head_name)
        self._head = head if isinstance(head, nn.Linear) else None
        self.stem = [n for n, _ in stem]
        self.block_names = [n for n, _ in blocks]
        self.tail = [n for n, _ in tail]
        self.always_cloned = frozenset({"bn2"} & set(self.tail))
        self.in_channels, self.out_channels, self.num_features = self._probe()
        self.depths = [d for d in range(1, self.depth + 1) if self.out_channels[d - 1] == self.out_channels[-1]]
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.image_size = int(spec.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
        if "preprocessing" not in spec:
            spec["preprocessing"] = timm_preprocessing(model, source)
        self.class_names = spec.get("class_names")
        self.preprocessing = root_preprocessing(spec, self.image_size, source)

    def _probe(self) -> tuple[list[int], list[int], int]:
        """Each block's input and output channels, and the channels the head takes: one
        forward of a small image through the stem, the blocks and the tail."""
        ins, outs = [], []
        with torch.no_grad():
            x = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)
            for name in self.stem:
                x = self._templates[name](x)
            for name in self.block_names:
                ins.append(int(x.shape[1]))
                x = self._templates[name](x)
                outs.append(int(x.shape[1]))
            for name in self.tail:
                x = self._templates[name](x)
        return ins, outs, int(x.shape[1])

    def modules(self) -> list[tuple[str, nn.Module]]:
        out = [(name, copy.deepcopy(self._templates[name])) for name in self.stem + self.block_names + self.tail]
        if self._head is not None:
            head = PooledHead(self._head.in_features, self._head.out_features)
            head.load_state_dict(self._head.state_dict())
            out.append((self.head_name, head))
        return out

    def module_for(self, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        if component_kind(name) == "adapters":
            down = tensors["down.weight"]
            m = ConvAdapter(int(down.shape[1]), int(down.shape[0]))
        elif name == self.head_name:
            m = PooledHead(int(tensors["weight"].shape[1]), int(tensors["weight"].shape[0]))
        elif name in self._templates:
            m = copy.deepcopy(self._templates[name])
        else:
            raise ValueError(f"unknown component name {name!r}")
        m.load_state_dict(tensors)
        return m

    def new_head(self, num_classes: int) -> nn.Module:
        return new_pooled_head(self.num_features, num_classes)

    def new_adapter(self, index: int, width: int) -> nn.Module:
        return ConvAdapter(self.in_channels[index], width)

    def image_size_rule(self, top: int) -> tuple[int, int, str]:
        return 1, 16, f"a size from 16 to {top}"
