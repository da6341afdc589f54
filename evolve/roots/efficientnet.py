"""Root family: timm's ``EfficientNet`` class (EfficientNet, EfficientNet-Lite, MobileNetV2,
MNASNet, ...), cut as ``conv_stem``, ``bn1``; ``blocks.i.j``; ``conv_head``, ``bn2``;
``classifier``. The final ``bn2`` is always cloned for a new child, as a ViT's final ``norm``.
MobileNetV3 is refused: its head convolution runs after the global pooling."""

from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from torch import nn

from .conv import ConvRoot, has_params, head_problems
from .registry import register_root


@register_root
class EfficientNetRoot(ConvRoot):
    kind = "EfficientNet"
    supported = "a timm EfficientNet-family CNN (e.g. timm:efficientnet_lite0, timm:mobilenetv2_100)"
    head_name = "classifier"

    @classmethod
    def problems(cls, module: nn.Module) -> list[str] | None:
        if type(module).__name__ == "MobileNetV3":
            return ["it is a MobileNetV3, whose head convolution runs after the global pooling (not a sequence of blocks before it)"]
        return head_problems(module, cls.head_name) if isinstance(module, EfficientNet) else None

    @classmethod
    def layout(cls, model: nn.Module) -> tuple[list, list, list]:
        stem = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
        blocks = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
        tail = [(n, getattr(model, n)) for n in ("conv_head", "bn2") if has_params(getattr(model, n, None))]
        return stem, blocks, tail
