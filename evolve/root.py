"""Root models: a pretrained timm network cut into components, whatever its kind.

``--root`` is either a directory that ``mutask pretrain`` wrote (``config.json`` +
``model.safetensors``), a real pretrained root's short name (``efficientnet-lite0``: see
:mod:`.realroot`), or ``timm:NAME`` (``--pretrained`` uses timm's own loading). Two kinds of
root share one interface, :class:`Root`; each kind lives in its own module:

- :class:`~.vit_root.ViTRoot`: a plain timm VisionTransformer (class token, absolute position
  embedding, token pooling): ``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.i``,
  ``norm``, ``head``;
- :class:`~.conv_root.ConvRoot`: a timm CNN whose trunk is a sequence of blocks: the
  EfficientNet family (EfficientNet, MobileNetV2, MNASNet...: ``conv_stem``, ``bn1``,
  ``blocks.i.j``, ``conv_head``, ``bn2``, ``classifier``) and ResNet (``conv1``, ``bn1``,
  ``layerN.j``, ``fc``).

``Root(spec, module, source)`` builds the right kind from a ready timm module (any other
network is refused with the reason); ``spec`` rebuilds the architecture
(``{"timm_model": NAME, "kwargs": {...}}``, :func:`build_model`) and the weights travel in the
STATE as the root's components.

A root carries its own preprocessing (:class:`mutask.preprocessing.Preprocessing`): the
per-channel mean and std and the resize filter its weights were trained with, recorded in its
spec under ``"preprocessing"`` (and so in every STATE and artifact built on it). ``timm:NAME``
roots take them from timm's data config for the model (its ``pretrained_cfg``; timm's
centre crop is not applied: images are resized whole to the path's image size);
``mutask pretrain`` roots record mean = std = 0.5, bilinear. A ViT spec without the record is
read as mean = std = 0.5, bilinear, the normalisation such roots were trained and evaluated
with; a conv root without one takes timm's data config of its module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from mutask.errors import MutaskError
from mutask.preprocessing import FILTERS, Preprocessing

from .model import ComponentStore, TaskPath, block_index, component_kind

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

SUPPORTED = (
    "a plain timm VisionTransformer (class token, absolute position embedding, token pooling, e.g. timm:vit_tiny_patch16_224), "
    "a timm EfficientNet-family CNN (e.g. timm:efficientnet_lite0, timm:mobilenetv2_100) or a timm ResNet (e.g. timm:resnet18)"
)


def build_model(spec: dict) -> nn.Module:
    """A timm model from a root spec: ``{"timm_model": NAME, "kwargs": {...}}``
    (``timm_model`` "VisionTransformer" builds the class directly from kwargs)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    name, kwargs = spec["timm_model"], dict(spec.get("kwargs", {}))
    if name == "VisionTransformer":
        return VisionTransformer(**kwargs)
    try:
        return timm.create_model(name, pretrained=bool(spec.get("pretrained", False)), **kwargs)
    except RuntimeError as e:  # unknown model names
        raise MutaskError(f"timm cannot build {name!r}: {e}. Pick a name from timm.list_models(), e.g. vit_tiny_patch16_224 or resnet18.") from e


build_vit = build_model  # the name it had when every root was a ViT


def timm_preprocessing(model: nn.Module, name: str) -> dict:
    """The root record (mean, std, resize) of timm's data config for ``model``
    (``timm.data.resolve_data_config``, from the model's ``pretrained_cfg``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
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
    """The interface every root kind provides. ``Root(spec, module, source)`` returns the kind
    that fits ``module`` (:class:`~.vit_root.ViTRoot` or :class:`~.conv_root.ConvRoot`) and
    raises :class:`MutaskError` with the reason for any other network.

    What a kind sets in ``__init__``: ``spec``, ``source``, ``template`` (the module, for
    rebuilding components from tensors), ``image_size`` (its native size), ``preprocessing``,
    ``class_names``, and its component names: ``stem`` (before the blocks), ``block_names``
    (the trunk, in order; ``depth`` of them; ``adapters.i`` runs before the i-th),
    ``tail`` (after the blocks), ``head_name``; ``always_cloned`` (names a child never shares:
    the final norm); ``depths`` (the numbers of blocks a path may use: depth mutation moves
    along this list); ``min_start_size`` (the smallest size a task starts at)."""

    stem: list[str]
    block_names: list[str]
    tail: list[str]
    head_name: str
    always_cloned: frozenset
    depths: list[int]
    min_start_size: int

    def __new__(cls, spec: dict = None, module: nn.Module = None, source: str = "", *args, **kwargs):
        if cls is Root:
            cls = root_kind(module, source)
        return super().__new__(cls)

    @property
    def depth(self) -> int:
        return len(self.block_names)

    # -- components ---------------------------------------------------------------------
    def modules(self) -> list[tuple[str, nn.Module]]:
        """The root's components as (name, step module), forward order, head last (when the
        root has its own head)."""
        raise NotImplementedError

    def module_for(self, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Rebuild a component's module from its tensors (loading a saved state)."""
        raise NotImplementedError

    def new_head(self, num_classes: int) -> nn.Module:
        """A task's own head, initialised to zero (weights and bias): logits start uniform."""
        raise NotImplementedError

    def new_adapter(self, index: int, width: int) -> nn.Module:
        """A residual adapter before the ``index``-th block, the identity until trained."""
        raise NotImplementedError

    def fit_clone(self, name: str, module: nn.Module, image_size: int) -> None:
        """Adapt a child's fresh clone to the child's image size (in place); nothing by default."""

    def image_size_rule(self, top: int) -> tuple[int, int, str]:
        """(step, smallest, wording) of the image sizes a path of this root can take."""
        raise NotImplementedError

    def add_to(self, store: ComponentStore) -> TaskPath:
        """Put the root's components into ``store`` (locked as root) and return the root path.
        The root path ends with the root's own head when it has one (pretraining classes)."""
        ids = [store.add(name, m, root=True).id for name, m in self.modules()]
        return TaskPath("root", "<root>", ids, {"image_size": self.image_size, "num_blocks": self.depth})

    def params(self) -> int:
        """Root parameters as a path uses them: everything but the root's own head."""
        return sum(p.numel() for n, m in self.modules() if n != self.head_name for p in m.parameters())

    def path_names(self, num_blocks: int, with_adapter) -> list[str]:
        """A path's component names at ``num_blocks`` blocks; ``with_adapter(i)`` says whether
        the i-th block has an adapter before it (called once per block, in order)."""
        names = list(self.stem)
        for i in range(num_blocks):
            if with_adapter(i):
                names.append(f"adapters.{i}")
            names.append(self.block_names[i])
        return names + list(self.tail) + [self.head_name]

    def block_position(self, name: str) -> int | None:
        """Where block ``name`` is in the trunk (0 first), None for any other component."""
        if not hasattr(self, "_block_pos"):
            self._block_pos = {b: i for i, b in enumerate(self.block_names)}
        return self._block_pos.get(name)

    def order(self, name: str) -> float:
        """A component name's place in the forward order (adapters before their block)."""
        if component_kind(name) == "adapters":
            return len(self.stem) + 2 * block_index(name)
        if name in self.stem:
            return self.stem.index(name)
        pos = self.block_position(name)
        if pos is not None:
            return len(self.stem) + 2 * pos + 1
        if name in self.tail:
            return len(self.stem) + 2 * self.depth + self.tail.index(name)
        return 10**6


def root_kind(module: nn.Module, source: str) -> type:
    """The :class:`Root` kind for ``module``; :class:`MutaskError` naming why when none fits."""
    from .conv_root import ConvRoot, conv_layout
    from .vit_root import ViTRoot, vit_problems
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(module, VisionTransformer):
        problems = vit_problems(module)
        if not problems:
            return ViTRoot
        fix = "mutask needs a plain ViT (class token, absolute position embedding, token pooling), e.g. timm:vit_tiny_patch16_224"
    else:
        layout, problems = conv_layout(module)
        if layout is not None:
            return ConvRoot
        if not problems:
            problems = [f"it is a {type(module).__name__}, not a timm VisionTransformer, EfficientNet or ResNet"]
        fix = f"mutask takes {SUPPORTED}"
    raise MutaskError(f"root {source!r} is not supported: {'; '.join(problems)}. {fix}.")


def load_root(spec_or_arg: str | dict, pretrained: bool = False) -> Root:
    """``DIR`` (a ``mutask pretrain`` output), ``timm:NAME``, or a saved spec dict."""
    if isinstance(spec_or_arg, dict):
        spec = spec_or_arg
        if "dir" in spec:
            return load_root(spec["dir"])
        return Root(spec, build_model(spec), f"timm:{spec['timm_model']}")
    arg = str(spec_or_arg)
    from .realroot import REAL_ROOTS, load_real_root

    if arg in REAL_ROOTS:
        return Root(*load_real_root(arg), arg)
    if arg.startswith("timm:"):
        name = arg[5:]
        import timm

        if not timm.is_model(name):
            raise MutaskError(f"unknown timm model {name!r}. Pick one of timm.list_models(): {SUPPORTED}.")
        spec = {"timm_model": name, "kwargs": {}, "pretrained": pretrained}
        try:
            model = build_model(spec)
        except MutaskError:
            raise
        except Exception as e:  # network or cache problems of timm's own loading
            raise MutaskError(f"timm could not load {name!r} (pretrained={pretrained}): {e}. Without network, drop --pretrained or use a local root directory.") from e
        spec["pretrained"] = False  # the weights now travel inside the state, not via timm
        spec["preprocessing"] = timm_preprocessing(model, arg)
        return Root(spec, model, arg)
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
        model = build_model(spec)
        model.load_state_dict(load_file(str(weights)))
    except MutaskError:
        raise
    except Exception as e:
        raise MutaskError(f"root directory {str(d)!r} is unusable ({e}). Re-create it with `mutask pretrain --out {d}`.") from e
    spec = dict(spec)
    spec["dir"] = str(d.resolve())
    return Root(spec, model, str(d))


def save_root_dir(model: nn.Module, spec: dict, out: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (a temp dir renamed into place)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(spec, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
