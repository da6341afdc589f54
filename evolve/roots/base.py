"""The interface every root family implements (:class:`Root`), and the preprocessing record
a root carries.

A root is a pretrained timm network cut into *components*, each a small ``nn.Module`` whose
``forward`` is one step of the network's forward: ``stem`` (before the trunk), the trunk's
``block_names`` in order (``adapters.i`` may run before the i-th), ``tail`` (after the trunk)
and the head (``head_name``). A path of any root is its components' steps in order, head last
(:class:`~mutask.evolve.model.PathModel`); the evolution loop knows no architecture beyond
this interface.

A root carries its own preprocessing (:class:`mutask.preprocessing.Preprocessing`): the
per-channel mean and std and the resize filter its weights were trained with, recorded in its
spec under ``"preprocessing"`` (and so in every STATE and artifact built on it). ``timm:NAME``
roots take them from timm's data config for the model (its ``pretrained_cfg``; timm's centre
crop is not applied: images are resized whole to the path's image size); ``mutask pretrain``
roots record mean = std = 0.5, bilinear; a spec without the record reads as that.
"""

from __future__ import annotations

import torch
from pydantic import ValidationError
from torch import nn

from mutask.errors import MutaskError
from mutask.preprocessing import FILTERS, Preprocessing

from ..model import ComponentStore, TaskPath, block_index, component_kind


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


def preprocessing_record(pre: Preprocessing) -> dict:
    """``mean``, ``std`` and ``resize`` as JSON values: what a root records of its preprocessing
    (``spec["preprocessing"]``; a root's image size is its own)."""
    return pre.model_dump(mode="json", include={"mean", "std", "resize"})


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
    """One root family. A family module subclasses this, says which timm modules it takes
    (:meth:`problems`) and registers itself (:func:`~.registry.register_root`).

    Class attributes: ``kind`` (the timm class it takes, for error messages), ``supported``
    (what it takes, with an example ``--root``), ``fix`` (the advice when a module of its kind
    is refused; None: list what every family takes).

    What ``__init__(spec, module, source)`` sets: ``spec``, ``source``, ``template`` (the
    module, for rebuilding components from tensors), ``image_size`` (its native size),
    ``preprocessing``, ``class_names``, and its layout: ``stem``, ``block_names`` (``depth`` of
    them), ``tail``, ``head_name``; ``always_cloned`` (names a child never shares: the final
    norm); ``depths`` (the numbers of blocks a path may use: depth mutation moves along this
    list); ``min_start_size`` (the smallest size a task starts at)."""

    kind: str = ""
    supported: str = ""
    fix: str | None = None

    stem: list[str]
    block_names: list[str]
    tail: list[str]
    head_name: str
    always_cloned: frozenset
    depths: list[int]
    min_start_size: int

    # -- the family ------------------------------------------------------------------------
    @classmethod
    def problems(cls, module: nn.Module) -> list[str] | None:
        """None when ``module`` is not of this family's kind; else what keeps it from being a
        root of this family (empty: nothing)."""
        raise NotImplementedError

    @classmethod
    def build(cls, spec: dict) -> nn.Module | None:
        """The module of a spec this family builds itself (not by timm's model name), else None."""
        return None

    # -- components (each family) -----------------------------------------------------------
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

    # -- what every family shares --------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.block_names)

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
