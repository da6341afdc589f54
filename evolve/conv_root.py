"""A timm CNN whose trunk is a sequence of blocks, as a root.

Two timm families, components named after timm's modules:

==============================  ==============================================  ==============
family (timm class)             stem, trunk, tail                               head
==============================  ==============================================  ==============
``EfficientNet`` (EfficientNet,  ``conv_stem``, ``bn1``; ``blocks.i.j``;          ``classifier``
MobileNetV2, MNASNet, ...)      ``conv_head``, ``bn2``
``ResNet``                      ``conv1``, ``bn1`` (with ``act1`` and           ``fc``
                                ``maxpool``); ``layerN.j``; none
==============================  ==============================================  ==============

The head pools globally (average, as timm's ``global_pool``) and applies the linear layer.
A residual adapter before a block is ``x + up(relu(down(bn(x))))`` with 1x1 convolutions
(Rebuffi et al. 2017), ``up`` zero-initialised. There is no position embedding: a path runs at
any image size as it is. Depth mutation only moves between depths whose last block gives the
channels the tail (or head) takes, so the tail's weights always fit: the top blocks of the
last stage (ResNet-18: 7 or 8 blocks; a last stage of one block, as in EfficientNet-Lite0,
leaves the depth fixed). The final ``bn2`` is always cloned for a new child, as the ViT's
final ``norm`` (a ResNet has no final norm outside its blocks). BatchNorm of a frozen
component stays in eval mode while a child trains (:class:`~.model.PathModel`), so its
running statistics never move; a cloned one trains as in fine-tuning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .model import component_kind
from .root import Root, root_preprocessing, timm_preprocessing

PROBE_SIZE = 64  # pixels of the one forward that finds each block's channels


class NormActPool(nn.BatchNorm2d):
    """ResNet's ``bn1`` -> ``act1`` -> ``maxpool`` as one component; its tensors are ``bn1``'s,
    named as in timm (the activation and the pooling hold none)."""

    def __init__(self, bn: nn.BatchNorm2d, act: nn.Module, pool: nn.Module):
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.act, self.pool = copy.deepcopy(act), copy.deepcopy(pool)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(super().forward(x)))


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


def _has_params(m: nn.Module | None) -> bool:
    return m is not None and any(True for _ in m.parameters())


def _avg_pooled(model: nn.Module) -> bool:
    return getattr(getattr(model, "global_pool", None), "pool_type", None) == "avg"


def conv_layout(model: nn.Module) -> tuple[dict | None, list[str]]:
    """(layout, problems): the layout of a supported CNN (``stem``, ``blocks``, ``tail``: lists
    of (name, step module); ``head_name``; ``head``: timm's linear classifier or None), or None
    and what keeps ``model`` from being one (empty when it is no CNN family mutask knows)."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    kind = type(model).__name__
    if kind == "MobileNetV3":
        return None, ["it is a MobileNetV3, whose head convolution runs after the global pooling (not a sequence of blocks before it)"]
    if not isinstance(model, (EfficientNet, ResNet)):
        return None, []
    problems = []
    if not _avg_pooled(model):
        problems.append(f"it pools with {getattr(model.global_pool, 'pool_type', type(model.global_pool).__name__)!r}, not a global average")
    if isinstance(model, EfficientNet):
        head_name = "classifier"
        stem = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
        blocks = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
        tail = [(n, getattr(model, n)) for n in ("conv_head", "bn2") if _has_params(getattr(model, n, None))]
    else:
        head_name = "fc"
        stem = [("conv1", model.conv1), ("bn1", NormActPool(model.bn1, model.act1, model.maxpool))]
        blocks = [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}"))]
        tail = []
    head = getattr(model, head_name)
    if not isinstance(head, (nn.Linear, nn.Identity)):
        problems.append(f"its {head_name} is a {type(head).__name__}, not a linear layer")
    if problems:
        return None, problems
    layout = dict(stem=stem, blocks=blocks, tail=tail, head_name=head_name, head=head if isinstance(head, nn.Linear) else None)
    return layout, []


class ConvRoot(Root):
    """A CNN root (:func:`conv_layout`): its components, each block's input and output
    channels (``in_channels``, ``out_channels``), and ``num_features`` (what the head takes)."""

    min_start_size = 32

    def __init__(self, spec: dict, model: nn.Module, source: str):
        model.eval()
        layout, problems = conv_layout(model)
        if layout is None:  # Root(...) checked it already; a direct ConvRoot(...) call may not have
            raise ValueError(f"{source}: not a supported CNN: {problems}")
        self.spec = spec
        self.source = source
        self.template = model
        self.head_name = layout["head_name"]
        self._templates = {name: m for name, m in layout["stem"] + layout["blocks"] + layout["tail"]}
        self._head = layout["head"]
        self.stem = [n for n, _ in layout["stem"]]
        self.block_names = [n for n, _ in layout["blocks"]]
        self.tail = [n for n, _ in layout["tail"]]
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
