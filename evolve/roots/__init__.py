"""Roots: a pretrained timm network cut into components, one family per module, found through
a registry (after timm's model registry).

- :mod:`.base`: :class:`Root`, the interface every family implements, and the root's
  preprocessing record;
- :mod:`.registry`: :func:`register_root` / :func:`register_names`, :func:`load_root`
  (``--root``: a claimed name, ``timm:NAME``, a ``mutask pretrain`` directory), :func:`root_for`
  (the family that takes a module) and :func:`build_model` (a spec's module);
- the families, each registering itself when imported below: :mod:`.vit` (a plain
  VisionTransformer), :mod:`.efficientnet` and :mod:`.resnet` (sharing the CNN machinery of
  :mod:`.conv`), and :mod:`.efficientnet_lite` (the names ``efficientnet-lite0/1/2``: offline
  ImageNet weights).

Adding a family: one new module that subclasses :class:`Root` and decorates it with
:func:`register_root`, plus its import line here.
"""

from .base import Root, root_preprocessing, timm_preprocessing
from .registry import build_model, load_root, load_root_dir, register_names, register_root, root_for, save_root_dir

from . import vit, efficientnet, resnet, efficientnet_lite  # noqa: E402,F401  (each registers itself)

__all__ = [
    "Root", "root_preprocessing", "timm_preprocessing", "build_model", "load_root", "load_root_dir",
    "register_names", "register_root", "root_for", "save_root_dir",
]
