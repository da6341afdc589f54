"""Root family: a plain timm VisionTransformer (class token, absolute position embedding,
token pooling), and its step modules.

A component is one top-level parameter block of the ViT, named after timm's module names,
plus ``adapters.i``, a residual adapter that runs before ``blocks.i``; each is a small
``nn.Module`` whose ``forward`` is its step of the ViT forward:

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

Depth mutation drops or restores the top block (any number from 1 to the root's depth); a
clone of ``pos_embed`` is resized bilinearly to a child's image size; the final ``norm`` is
always cloned for a new child (the method's rule). A spec ``{"timm_model":
"VisionTransformer", "kwargs": {...}}`` (what ``mutask pretrain`` writes) builds the class
directly from its kwargs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..model import component_kind
from .base import Root, root_preprocessing
from .registry import register_root


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


def vit_problems(vit: nn.Module) -> list[str]:
    """What keeps a timm VisionTransformer from being a plain ViT root (empty: nothing)."""
    problems = []
    if vit.cls_token is None:
        problems.append("it has no class token")
    if getattr(vit, "reg_token", None) is not None:
        problems.append("it has register tokens")
    if vit.pos_embed is None or getattr(vit, "no_embed_class", False):
        problems.append("its position embedding does not cover the class token")
    if vit.global_pool != "token":
        problems.append(f"it pools with {vit.global_pool!r}, not the class token")
    for attr in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(vit, attr, nn.Identity()), nn.Identity):
            problems.append(f"it has a {attr}")
    if getattr(vit, "attn_pool", None) is not None:
        problems.append("it has attention pooling")
    return problems


@register_root
class ViTRoot(Root):
    """A plain ViT root: its architecture facts (``embed_dim``, ``patch_size``, ``norm_eps``)
    and its components."""

    kind = "timm VisionTransformer"
    supported = "a plain timm VisionTransformer (class token, absolute position embedding, token pooling, e.g. timm:vit_tiny_patch16_224)"
    fix = "mutask needs a plain ViT (class token, absolute position embedding, token pooling), e.g. timm:vit_tiny_patch16_224"
    stem = ["patch_embed", "cls_token", "pos_embed"]
    tail = ["norm"]
    head_name = "head"
    always_cloned = frozenset({"norm"})

    @classmethod
    def problems(cls, module: nn.Module) -> list[str] | None:
        return vit_problems(module) if isinstance(module, VisionTransformer) else None

    @classmethod
    def build(cls, spec: dict) -> nn.Module | None:
        return VisionTransformer(**dict(spec.get("kwargs", {}))) if spec["timm_model"] == "VisionTransformer" else None

    def __init__(self, spec: dict, vit: nn.Module, source: str):
        vit.eval()
        self.spec = spec
        self.source = source
        self.template = vit  # module templates for rebuilding components from tensors
        self.embed_dim = int(vit.embed_dim)
        self.block_names = [f"blocks.{i}" for i in range(len(vit.blocks))]
        self.depths = list(range(1, len(vit.blocks) + 1))
        self.patch_size = int(vit.patch_embed.proj.stride[0])
        self.min_start_size = 2 * self.patch_size  # two patches per side: a grid of tokens
        self.image_size = int(vit.patch_embed.img_size[0])
        self.norm_eps = float(getattr(vit.norm, "eps", 1e-6))
        self.class_names = spec.get("class_names")
        self.preprocessing = root_preprocessing(spec, self.image_size, source)

    def modules(self) -> list[tuple[str, nn.Module]]:
        v = self.template
        out = [
            ("patch_embed", PatchEmbed(copy.deepcopy(v.patch_embed.proj), copy.deepcopy(v.patch_embed.norm))),
            ("cls_token", ClsToken(v.cls_token)),
            ("pos_embed", PosEmbed(v.pos_embed)),
        ]
        out += [(f"blocks.{i}", copy.deepcopy(b)) for i, b in enumerate(v.blocks)]
        out.append(("norm", copy.deepcopy(v.norm)))
        if isinstance(v.head, nn.Linear):
            head = Head(v.head.in_features, v.head.out_features)
            head.load_state_dict(v.head.state_dict())
            out.append(("head", head))
        return out

    def module_for(self, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        kind = component_kind(name)
        if kind == "patch_embed":
            m = PatchEmbed(copy.deepcopy(self.template.patch_embed.proj), copy.deepcopy(self.template.patch_embed.norm))
        elif kind == "cls_token":
            m = ClsToken(tensors["token"])
        elif kind == "pos_embed":
            m = PosEmbed(tensors["embed"])
        elif kind == "blocks":
            m = copy.deepcopy(self.template.blocks[0])
        elif kind == "adapters":
            m = Adapter(self.embed_dim, int(tensors["down.weight"].shape[0]), eps=self.norm_eps)
        elif kind == "norm":
            m = copy.deepcopy(self.template.norm)
        elif kind == "head":
            m = Head(self.embed_dim, int(tensors["weight"].shape[0]))
        else:
            raise ValueError(f"unknown component name {name!r}")
        m.load_state_dict(tensors)
        return m

    def new_head(self, num_classes: int) -> nn.Module:
        return new_head(self.embed_dim, num_classes)

    def new_adapter(self, index: int, width: int) -> nn.Module:
        return Adapter(self.embed_dim, width, eps=self.norm_eps)

    def fit_clone(self, name: str, module: nn.Module, image_size: int) -> None:
        """A cloned ``pos_embed`` takes the child's grid (resized bilinearly, class position kept)."""
        tokens = 1 + (image_size // self.patch_size) ** 2
        if name == "pos_embed" and module.embed.shape[1] != tokens:
            module.embed.data = resample_pos_embed(module.embed.data, tokens)

    def image_size_rule(self, top: int) -> tuple[int, int, str]:
        p = self.patch_size
        return p, p, f"a multiple of the root's patch size {p} from {p} to {top - top % p}"
