"""Root family: timm's ``ResNet``, cut as ``conv1``, ``bn1`` (with ``act1`` and ``maxpool``);
``layerN.j``; ``fc`` (no tail: a ResNet has no final norm outside its blocks)."""

from __future__ import annotations

import copy

import torch
from timm.models.resnet import ResNet
from torch import nn

from .conv import ConvRoot, head_problems
from .registry import register_root


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


@register_root
class ResNetRoot(ConvRoot):
    kind = "ResNet"
    supported = "a timm ResNet (e.g. timm:resnet18)"
    head_name = "fc"

    @classmethod
    def problems(cls, module: nn.Module) -> list[str] | None:
        return head_problems(module, cls.head_name) if isinstance(module, ResNet) else None

    @classmethod
    def layout(cls, model: nn.Module) -> tuple[list, list, list]:
        stem = [("conv1", model.conv1), ("bn1", NormActPool(model.bn1, model.act1, model.maxpool))]
        blocks = [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}"))]
        return stem, blocks, []
