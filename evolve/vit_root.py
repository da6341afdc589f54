"""A plain timm VisionTransformer as a root: ``patch_embed``, ``cls_token``, ``pos_embed``,
``blocks.i``, ``norm``, ``head`` (the step modules are in :mod:`.model`).

Depth mutation drops or restores the top block (any number from 1 to the root's depth);
a clone of ``pos_embed`` is resized bilinearly to a child's image size; the final ``norm`` is
always cloned for a new child (the method's rule).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model import Adapter, ClsToken, Head, PatchEmbed, PosEmbed, component_kind, new_head, resample_pos_embed
from .root import Root, root_preprocessing


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


class ViTRoot(Root):
    """A plain ViT root: its architecture facts (``embed_dim``, ``patch_size``, ``norm_eps``)
    and its components."""

    stem = ["patch_embed", "cls_token", "pos_embed"]
    tail = ["norm"]
    head_name = "head"
    always_cloned = frozenset({"norm"})

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
