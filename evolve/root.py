"""Root models: a timm VisionTransformer cut into components.

``--root`` is either a directory that ``mutask pretrain`` wrote (``config.json`` +
``model.safetensors``), a real pretrained root's short name (``efficientnet-lite0``: see
:mod:`.realroot`), or ``timm:NAME`` for any timm VisionTransformer with a class token,
absolute position embedding and token pooling (``--pretrained`` uses timm's own loading).

A root carries its own preprocessing (:class:`mutask.preprocessing.Preprocessing`): the
per-channel mean and std and the resize filter its weights were trained with, recorded in its
spec under ``"preprocessing"`` (and so in every STATE and artifact built on it). ``timm:NAME``
roots take them from timm's data config for the model (its ``pretrained_cfg``; timm's
centre crop is not applied: images are resized whole to the path's image size);
``mutask pretrain`` roots record mean = std = 0.5, bilinear. A spec without the record is read
as mean = std = 0.5, bilinear, the normalisation such roots were trained and evaluated with.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from mutask.errors import MutaskError
from mutask.preprocessing import FILTERS, Preprocessing

from .model import Adapter, ClsToken, ComponentStore, Head, PatchEmbed, TaskPath, PosEmbed, component_kind

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def build_vit(spec: dict) -> nn.Module:
    """A timm VisionTransformer from a root spec: ``{"timm_model": NAME, "kwargs": {...}}``
    (``timm_model`` "VisionTransformer" builds the class directly from kwargs)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    name, kwargs = spec["timm_model"], dict(spec.get("kwargs", {}))
    if name == "VisionTransformer":
        return VisionTransformer(**kwargs)
    try:
        return timm.create_model(name, pretrained=bool(spec.get("pretrained", False)), **kwargs)
    except RuntimeError as e:  # unknown model names
        raise MutaskError(f"timm cannot build {name!r}: {e}. Pick a name from timm.list_models('vit_*').") from e


def check_supported(vit: nn.Module, name: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    problems = []
    if not isinstance(vit, VisionTransformer):
        problems.append(f"it is a {type(vit).__name__}, not a timm VisionTransformer")
    else:
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
    if problems:
        raise MutaskError(
            f"root {name!r} is not supported: {'; '.join(problems)}. mutask needs a plain ViT "
            "(class token, absolute position embedding, token pooling), e.g. timm:vit_tiny_patch16_224."
        )


def timm_preprocessing(vit: nn.Module, name: str) -> dict:
    """The root record (mean, std, resize) of timm's data config for ``vit``
    (``timm.data.resolve_data_config``, from the model's ``pretrained_cfg``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=vit)
    interpolation = str(cfg.get("interpolation", "")).lower()
    if interpolation not in FILTERS:
        raise MutaskError(
            f"root {name!r}: timm's data config resizes its images with {interpolation!r}, and mutask's preprocessing "
            f"resizes with {' or '.join(FILTERS)} only, so the root would see other inputs than it was trained on. "
            "Pick a root whose timm config uses one of those (e.g. timm:vit_tiny_patch16_224, timm:deit_tiny_patch16_224)."
        )
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]], "resize": interpolation}


def root_preprocessing(spec: dict, image_size: int, source: str) -> Preprocessing:
    """The root's preprocessing at its image size, from ``spec["preprocessing"]`` (mean = std
    = 0.5, bilinear when the spec records none)."""
    record = spec.get("preprocessing")
    if record is None:
        return Preprocessing.signed_unit(image_size)
    if not isinstance(record, dict):
        problem = f"a {type(record).__name__}, not a mapping"
    else:
        try:
            return Preprocessing(**dict(record, image_size=image_size))
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_url=False))
    raise MutaskError(
        f"root {source!r}: its preprocessing record {record!r} is invalid ({problem}). It needs mean and std (3 floats "
        f"each, in [0, 1] pixel units, std > 0) and resize ({' or '.join(FILTERS)}); re-create the root "
        "(`mutask pretrain --out DIR`, or --root timm:NAME)."
    )


class Root:
    """A root model: its spec, its architecture facts, its preprocessing (``preprocessing``, a
    :class:`~mutask.preprocessing.Preprocessing` at the root's image size; ``.at(S)`` for a
    path at image size S), and its components in a store."""

    def __init__(self, spec: dict, vit: nn.Module, source: str):
        check_supported(vit, source)
        vit.eval()
        self.spec = spec
        self.source = source
        self.template = vit  # module templates for rebuilding components from tensors
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.patch_size = int(vit.patch_embed.proj.stride[0])
        self.image_size = int(vit.patch_embed.img_size[0])
        self.norm_eps = float(getattr(vit.norm, "eps", 1e-6))
        self.class_names = spec.get("class_names")
        self.preprocessing = root_preprocessing(spec, self.image_size, source)

    # -- components ---------------------------------------------------------------------
    def modules(self) -> list[tuple[str, nn.Module]]:
        """The root's components as (name, step module), forward order, head last."""
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

    def add_to(self, store: ComponentStore) -> TaskPath:
        """Put the root's components into ``store`` (locked as root) and return the root path.
        The root path ends with the root's own head when it has one (pretraining classes)."""
        ids = [store.add(name, m, root=True).id for name, m in self.modules()]
        return TaskPath("root", "<root>", ids, {"image_size": self.image_size, "num_blocks": self.depth})

    def module_for(self, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Rebuild a component's module from its tensors (loading a saved state)."""
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

    def params(self) -> int:
        """Root parameters as a path uses them: everything but the root's own head."""
        return sum(p.numel() for n, m in self.modules() if n != "head" for p in m.parameters())


def load_root(spec_or_arg: str | dict, pretrained: bool = False) -> Root:
    """``DIR`` (a ``mutask pretrain`` output), ``timm:NAME``, or a saved spec dict."""
    if isinstance(spec_or_arg, dict):
        spec = spec_or_arg
        if "dir" in spec:
            return load_root(spec["dir"])
        return Root(spec, build_vit(spec), f"timm:{spec['timm_model']}")
    arg = str(spec_or_arg)
    from .realroot import REAL_ROOTS, load_real_root

    if arg in REAL_ROOTS:  # until conv roots are supported, Root refuses the EfficientNet with its reason
        return Root(*load_real_root(arg), arg)
    if arg.startswith("timm:"):
        name = arg[5:]
        import timm

        if not timm.is_model(name):
            raise MutaskError(f"unknown timm model {name!r}. Pick one of timm.list_models('vit_*'), e.g. timm:vit_tiny_patch16_224.")
        spec = {"timm_model": name, "kwargs": {}, "pretrained": pretrained}
        try:
            vit = build_vit(spec)
        except MutaskError:
            raise
        except Exception as e:  # network or cache problems of timm's own loading
            raise MutaskError(f"timm could not load {name!r} (pretrained={pretrained}): {e}. Without network, drop --pretrained or use a local root directory.") from e
        spec["pretrained"] = False  # the weights now travel inside the state, not via timm
        spec["preprocessing"] = timm_preprocessing(vit, arg)
        return Root(spec, vit, arg)
    return load_root_dir(arg)


def load_root_dir(path: str | os.PathLike) -> Root:
    from safetensors.torch import load_file

    d = Path(path)
    cfg, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise MutaskError(f"root directory {str(d)!r} does not exist. Give a directory written by `mutask pretrain --out DIR`, or timm:NAME.")
    if not cfg.is_file() or not weights.is_file():
        raise MutaskError(f"root directory {str(d)!r} needs {CONFIG_FILE} and {WEIGHTS_FILE} (what `mutask pretrain --out DIR` writes).")
    try:
        spec = json.loads(cfg.read_text())
        vit = build_vit(spec)
        vit.load_state_dict(load_file(str(weights)))
    except MutaskError:
        raise
    except Exception as e:
        raise MutaskError(f"root directory {str(d)!r} is unusable ({e}). Re-create it with `mutask pretrain --out {d}`.") from e
    spec = dict(spec)
    spec["dir"] = str(d.resolve())
    return Root(spec, vit, str(d))


def save_root_dir(vit: nn.Module, spec: dict, out: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (a temp dir renamed into place)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(spec, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
